"""In-process simulation: many workers on one core, the real worker and server cores, no sockets.

For studies that need more workers than a few cores can run as processes (SASG's rounds and
bits to target, DEF's accuracy at high compression). Each simulated worker owns an
`UpdateRule` (momentum, EF/DEF, compressor, SASG skip rule: the very object
`wanps.worker.Optimizer` drives) and pushes into a real `ServerCore`; the round's mean is
applied by the core exactly as the server does. What is left out is only the network:
every replica is the server's model, which the simulation therefore keeps once, and the
rounds close in order. Staleness (`staleness`, DeCo's tau) is the model each round's
gradients are taken at: round r's at the model after round r - tau - 1 closed, as a worker
with tau rounds in flight holds it (the first tau + 1 rounds at the initial model); rounds
to a target then count what staleness and compression cost, with no clock in them
(`wanps bench convergence`). The distributed path is tested separately
(tests/test_algorithms_live.py).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from wanps.proto.codec import Update
from wanps.server.core import CoreConfig, ServerCore
from wanps.worker.optimizer import bind_to_flat, model_fingerprint
from wanps.worker.skip_rule import SkipRule, step_squared_norm
from wanps.worker.tasks import Task
from wanps.worker.update_rule import UpdateConfig, UpdateRule


@dataclass(frozen=True)
class SimulationConfig:
    num_workers: int = 4
    batch_size: int = 32
    lr: float = 0.1
    rounds: int = 1000
    delta: float = 1.0
    # Every worker's algorithm options (compressor, value dtype, EF/DEF, momentum), as Optimizer takes them.
    update: UpdateConfig = field(default_factory=UpdateConfig)
    # SASG: alpha_d for d = 1..D (None: never skip); each worker gets its own SkipRule from them.
    skip_alphas: tuple[float, ...] | None = None
    seed: int = 0
    eval_every: int = 50
    eval_limit: int | None = None  # test examples per evaluation (None: all)
    target_accuracy: float | None = None
    stop_at_target: bool = False
    # tau: round r's gradients are taken at the model after round r - tau - 1 (DeCo's staleness).
    staleness: int = 0

    def __post_init__(self) -> None:
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")
        if self.staleness and self.skip_alphas is not None:
            # SASG's anchors and model steps are kept per synchronous round (SkipRule).
            raise ValueError("the SASG skip rule is simulated with synchronous rounds only (staleness 0)")
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {self.delta}")


@dataclass
class Checkpoint:
    round: int
    uploads: int
    bits: int
    accuracy: float


@dataclass
class SimulationResult:
    trace: list[Checkpoint] = field(default_factory=list)
    rounds: int = 0
    uploads: int = 0
    skips: int = 0
    bits_up: int = 0
    final_accuracy: float = 0.0
    # DEF only: accuracy of y_T = x_T - mean(e_T) after the residual flush (final_accuracy is x_T's).
    flushed_accuracy: float | None = None
    # The server's model at the end (after the flush for DEF).
    model: torch.Tensor | None = None

    def first_reaching(self, target: float) -> Checkpoint | None:
        return next((c for c in self.trace if c.accuracy >= target), None)


def update_bits(update: Update | None) -> int:
    """Payload bits of a push as it travels (a skip record carries no payload)."""
    return 0 if update is None else 8 * update.nbytes


def simulate(task: Task, config: SimulationConfig, model_factory: Callable[[int], nn.Module] | None = None,
             on_checkpoint: Callable[[Checkpoint], None] | None = None) -> SimulationResult:
    model = (model_factory or task.build_model)(config.seed)
    params = [p for p in model.parameters()]
    flat = bind_to_flat(params)  # the parameters gradients are taken at (x, x - lambda*e or an anchor)
    num_params = flat.numel()
    core = ServerCore(CoreConfig(tau_max=0, min_workers=config.num_workers, checksum_every=0))
    workers = []
    for rank in range(config.num_workers):
        joined = core.join(num_params, model_fingerprint(params), f"sim{rank}")
        if joined.must_seed:
            core.seed(joined.worker_id, flat.clone())
        skip = SkipRule(config.skip_alphas, config.num_workers) if config.skip_alphas else None
        rule = UpdateRule(num_params, config.update, skip)
        workers.append((joined.worker_id, rule, task.batches(rank, config.num_workers, config.batch_size, config.seed)))
    result = SimulationResult()
    grad = torch.empty(num_params)
    aux = torch.empty(num_params)

    def gradient_at(point: torch.Tensor, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
        flat.copy_(point)
        model.zero_grad(set_to_none=False)
        task.loss(model, x, y).backward()
        torch.cat([p.grad.reshape(-1) for p in params], out=out)

    def evaluate(round_: int) -> float:
        flat.copy_(core.model)
        accuracy = task.accuracy(model, config.eval_limit)
        checkpoint = Checkpoint(round_, result.uploads, result.bits_up, accuracy)
        result.trace.append(checkpoint)
        if on_checkpoint is not None:
            on_checkpoint(checkpoint)
        return accuracy

    detached = torch.empty(num_params)
    # With staleness tau, the models of the last tau + 1 closed rounds: models[0] is round r's
    # (the model after round r - tau - 1). Buffers reused as rounds close.
    models: deque[torch.Tensor] = deque([core.model.clone() for _ in range(config.staleness + 1)]
                                        if config.staleness else [])
    for round_ in range(config.rounds):
        version = core.version
        stale = models[0] if models else core.model
        for worker_id, rule, batches in workers:
            x, y = next(batches)
            point = rule.detached_point(stale, detached) if rule.detaches else stale
            gradient_at(point, x, y, grad)
            aux_grad = None
            if rule.wants_aux_gradient:
                assert rule.skip_rule is not None and rule.skip_rule.anchor is not None
                gradient_at(rule.skip_rule.anchor, x, y, aux)
                aux_grad = aux
            update = rule.update(grad, config.lr, config.delta, round_, params=core.model, aux_grad=aux_grad)
            result.uploads += update is not None
            result.skips += update is None
            result.bits_up += update_bits(update)
            closed = core.push(worker_id, round_, version, update).closed
        assert closed and closed[-1].round == round_, "a synchronous round closes with its last push"
        if models:
            oldest = models.popleft()
            models.append(oldest.copy_(core.model))
        step = step_squared_norm(closed[-1].delta.values)
        for _, rule, _ in workers:
            if rule.skip_rule is not None:
                rule.skip_rule.record_model_step(step)
        result.rounds = round_ + 1
        if not math.isfinite(step):
            break  # diverged: the server's model holds inf or NaN
        if result.rounds % config.eval_every == 0 or result.rounds == config.rounds:
            accuracy = evaluate(result.rounds)
            if config.stop_at_target and config.target_accuracy is not None and accuracy >= config.target_accuracy:
                break
    if not result.trace or result.trace[-1].round != result.rounds:
        evaluate(result.rounds)
    result.final_accuracy = result.trace[-1].accuracy
    if config.update.error_feedback == "def":
        # DEF's output step, as Optimizer.close() does it: every worker pushes its residual once.
        version = core.version
        for worker_id, rule, _ in workers:
            core.push(worker_id, result.rounds, version, rule.final_residual())
        flat.copy_(core.model)
        result.flushed_accuracy = task.accuracy(model, config.eval_limit)
    result.model = core.model.clone()
    return result
