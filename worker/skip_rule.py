"""SASG's adaptive skip rule (rule (6) and Algorithm 1 of the SASG paper). Pure, no network.

At round t a worker skips its upload (the server reuses its last stored update) when

    ||grad f(w_t; xi_t) - grad f(w_{t-tau}; xi_t)||^2  <=  sum_{d=1..D} alpha_d / M^2 * ||w_{t+1-d} - w_{t-d}||^2

where w_{t-tau} are the parameters the worker's last upload was computed at (the "anchor",
one extra copy of the parameters), the right-hand gradient is the auxiliary gradient on the
same batch, and the right side sums the squared norms of the last D model steps. Staleness
tau counts rounds since the last upload: 1 right after an upload, +1 per skip; at tau >= D
the worker must upload (Algorithm 1, line 6), so the server never reuses an update more
than D - 1 rounds in a row and no stored update is older than D rounds.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

#: The paper's defaults: D = 10 and alpha_d = 1/(2 gamma) (MNIST) or 1/gamma (CIFAR).
PAPER_MAX_DELAY = 10
ALPHA_VARIANTS = {"half": 0.5, "one": 1.0}


def paper_alphas(lr: float, max_delay: int = PAPER_MAX_DELAY, variant: str = "half") -> list[float]:
    """alpha_d for d = 1..D as in the paper's experiments: 1/(2*lr) ("half") or 1/lr ("one")."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if variant not in ALPHA_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(ALPHA_VARIANTS)}, got {variant!r}")
    return [ALPHA_VARIANTS[variant] / lr] * max_delay


def alphas_from_spec(spec: str, lr: float, max_delay: int = PAPER_MAX_DELAY) -> list[float]:
    """'half' (1/(2 lr)), 'one' (1/lr) or a number: the same alpha_d for d = 1..D."""
    if spec in ALPHA_VARIANTS:
        return paper_alphas(lr, max_delay, spec)
    try:
        value = float(spec)
    except ValueError:
        raise ValueError(f"alpha must be 'half', 'one' or a number, got {spec!r}") from None
    return [value] * max_delay


class SkipRule:
    """One worker's skip state: anchor parameters, staleness, and the last D model-step norms."""

    def __init__(self, alphas: Sequence[float], num_workers: int = 1) -> None:
        if not alphas:
            raise ValueError("alphas needs at least one weight (D >= 1)")
        if any(not a >= 0.0 for a in alphas):  # also refuses NaN
            raise ValueError(f"every alpha_d must be >= 0, got {list(alphas)}")
        self.alphas = [float(a) for a in alphas]
        self.max_delay = len(self.alphas)
        self.num_workers = num_workers
        # Squared norms of ||w_{s+1} - w_s||^2, newest first after reversal: index 0 is d = 1.
        self._steps: deque[float] = deque(maxlen=self.max_delay)
        self.anchor: torch.Tensor | None = None
        self.staleness = 1
        self.skips = 0
        self.uploads = 0
        self.last_gap = 0.0  # the last evaluated left side, for observers and tests

    @property
    def num_workers(self) -> int:
        return self._num_workers

    @num_workers.setter
    def num_workers(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"num_workers must be >= 1, got {value}")
        self._num_workers = value

    def record_model_step(self, squared_norm: float) -> None:
        """The model moved by a step of this squared norm (one closed round)."""
        self._steps.append(float(squared_norm))

    def threshold(self) -> float:
        """The right side of rule (6): sum_d alpha_d / M^2 * ||w_{t+1-d} - w_{t-d}||^2."""
        newest_first = reversed(self._steps)
        total = sum(alpha * step for alpha, step in zip(self.alphas, newest_first))
        return total / (self.num_workers * self.num_workers)

    @property
    def must_upload(self) -> bool:
        """No anchor yet (nothing stored on the server) or staleness has reached D."""
        return self.anchor is None or self.staleness >= self.max_delay

    def should_skip(self, gradient_gap: float) -> bool:
        """Rule (6) with the forced upload; `gradient_gap` = ||g(w_t) - g(w_anchor)||^2 on one batch."""
        self.last_gap = float(gradient_gap)
        return not self.must_upload and self.last_gap <= self.threshold()

    def uploaded(self, params: torch.Tensor) -> None:
        """The worker uploaded an update computed at `params`: they become the anchor."""
        if self.anchor is None:
            self.anchor = params.detach().clone()
        else:
            self.anchor.copy_(params)
        self.staleness = 1
        self.uploads += 1

    def forget_upload(self) -> None:
        """The server no longer holds this worker's last update (it joined again under a new
        id): the next round must upload, since a skip would reuse nothing."""
        self.anchor = None
        self.staleness = 1

    def skipped(self) -> None:
        self.staleness += 1
        self.skips += 1

    @property
    def skip_rate(self) -> float:
        decided = self.skips + self.uploads
        return self.skips / decided if decided else 0.0


def gradient_gap(grad: torch.Tensor, aux_grad: torch.Tensor) -> float:
    """||grad - aux_grad||^2 in float64 (the sum of ~1e6 squares loses digits in float32)."""
    return float(torch.sub(grad, aux_grad).double().square().sum())


def step_squared_norm(values: torch.Tensor) -> float:
    """||w_{t+1} - w_t||^2 from a round's delta values (indices are unique in an aggregated delta)."""
    return float(values.double().square().sum())
