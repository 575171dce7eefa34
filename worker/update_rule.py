"""What a worker sends each round, from its gradients. Pure tensor code, no network.

One `UpdateRule` composes, by its `UpdateConfig` (and an optional skip rule):
- momentum (the DEF paper's eq. (11): m = mu*m + g; p = lr*m + e; mu = 0 is plain SGD),
- error feedback: "ef" (plain), "def" / "def-a" (detached: gradients taken at x - lambda*e),
- a compressor (worker/compressors.py) with its wire value dtype,
- SASG's skip rule (worker/skip_rule.py): skip the upload when the gradient barely moved.

Its state (momentum, residual, the compressor's scratch) lives on `device`, the model's
(CPU or GPU), so an update is computed where the gradients are.

The networked `wanps.worker.Optimizer` and the in-process simulation
(`wanps.bench.simulate`) both drive this same object, so the benchmarks of the
algorithms measure the code that trains over the network.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wanps.proto.codec import Update
from wanps.worker.compressors import make_compressor
from wanps.worker.error_feedback import ErrorFeedback, wire_value_dtype
from wanps.worker.skip_rule import SkipRule, gradient_gap

#: "def" outputs DEF's y_T = x_T - mean(e_T) (a final residual flush); "def-a" outputs x_T.
ERROR_FEEDBACK_MODES = ("ef", "def", "def-a")


@dataclass(frozen=True)
class UpdateConfig:
    """The algorithm options of a worker's updates, checked once, here.

    SASG's skip rule is not among them: a `SkipRule` is one worker's state (its anchor,
    staleness and the last model steps), not an option, while this is a value that many
    workers may share (the simulation gives all its workers one). `UpdateRule` takes it
    beside the config.
    """

    compressor: str = "topk"
    value_dtype: str = "float32"
    compressor_seed: int = 0
    error_feedback: str = "ef"
    def_lambda: float = 0.3
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.error_feedback not in ERROR_FEEDBACK_MODES:
            raise ValueError(f"error_feedback must be one of {', '.join(ERROR_FEEDBACK_MODES)}, "
                             f"got {self.error_feedback!r}")
        if self.error_feedback != "ef" and not 0.0 <= self.def_lambda <= 1.0:
            raise ValueError(f"def_lambda must be in [0, 1], got {self.def_lambda}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        make_compressor(self.compressor, self.compressor_seed)  # a compressor checks its own name and seed
        wire_value_dtype(self.value_dtype)


class UpdateRule:
    def __init__(self, num_params: int, config: UpdateConfig, skip_rule: SkipRule | None = None,
                 device: torch.device | str = "cpu") -> None:
        if skip_rule is not None and config.error_feedback != "ef":
            # Both move the point gradients are taken at; their combination is in neither paper.
            raise ValueError("the SASG skip rule works with plain error feedback ('ef') only")
        self.num_params = num_params
        self.config = config
        self.device = torch.device(device)
        self.ef = ErrorFeedback(num_params, config.compressor, config.value_dtype, seed=config.compressor_seed,
                                device=self.device)
        self.def_lambda = config.def_lambda if config.error_feedback != "ef" else 0.0
        self._momentum_buffer = torch.zeros(num_params, device=self.device) if config.momentum else None
        self._momentum: float | torch.Tensor = config.momentum  # set_momentum: per element
        self.skip_rule = skip_rule

    def set_momentum(self, mu: float | torch.Tensor) -> None:
        """mu of m = mu*m + g from now on: one float, or one per element (the optimizer's
        per-group momentum). The momentum buffer is made when a mu first becomes nonzero."""
        self._momentum = mu
        nonzero = bool((mu != 0).any()) if isinstance(mu, torch.Tensor) else mu != 0
        if self._momentum_buffer is None and nonzero:
            self._momentum_buffer = torch.zeros_like(self.ef.residual)

    # -------------------------------------------------------------- where to take gradients

    @property
    def detaches(self) -> bool:
        return self.def_lambda > 0.0

    def detached_point(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """DEF: out = x - lambda * e, the point this worker's gradient is taken at."""
        return torch.sub(x, self.ef.residual, alpha=self.def_lambda, out=out)

    @property
    def wants_aux_gradient(self) -> bool:
        """SASG needs the gradient at the anchor this round (it may skip)."""
        return self.skip_rule is not None and not self.skip_rule.must_upload

    # -------------------------------------------------------------- the update

    def update(
        self,
        grad: torch.Tensor,
        lr: float | torch.Tensor,
        delta: float,
        round_: int,
        *,
        params: torch.Tensor | None = None,
        aux_grad: torch.Tensor | None = None,
    ) -> Update | None:
        """C(lr * m + e) to push, or None to skip (SASG). `grad` is the raw gradient (it is
        overwritten: the rule uses it as its working buffer). `params` are the parameters the
        gradient was taken at (SASG's next anchor); `aux_grad` the gradient at the anchor."""
        rule = self.skip_rule
        if rule is not None:
            if aux_grad is not None and rule.should_skip(gradient_gap(grad, aux_grad)):
                rule.skipped()  # Algorithm 1: e and (here) momentum stay as they are
                return None
            if params is None:
                raise ValueError("the skip rule needs the parameters an uploaded gradient was taken at")
            rule.uploaded(params)
        if self._momentum_buffer is not None:
            self._momentum_buffer.mul_(self._momentum).add_(grad)
            grad.copy_(self._momentum_buffer)
        grad.mul_(lr)
        return self.ef.compress(grad, delta, round_)

    def final_residual(self) -> Update:
        """DEF's output step: push e densely once, so the server's mean gives y_T = x_T - mean(e_T).

        The residual leaves the worker (it is zero afterwards): calling this twice sends nothing twice.
        """
        values = self.ef.residual.clone()
        self.ef.residual.zero_()
        return Update(values=values, indices=None)

    @property
    def residual(self) -> torch.Tensor:
        return self.ef.residual
