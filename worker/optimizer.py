"""`wanps.worker.Optimizer`: train through a wanps cluster as with a torch optimizer.

    opt = wanps.worker.Optimizer(model.parameters(), server="host:50051", controller="host:50052", lr=0.1)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    opt.close()

On construction the optimizer joins the cluster, seeds the model if it is the first
worker (otherwise its own initial values are replaced), pulls the model, and binds every
parameter to a slice of one flat float32 replica. `step()` pushes C(lr*g + e) for the
current round and blocks only until the replica is recent enough for the next round
(version >= round - tau), applying the deltas of closed rounds at that moment and never
in between, so forward and backward always see a fixed replica.
"""
from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future

import torch

from wanps.controller.decisions import Decision, decision_for_round
from wanps.proto import wanps_pb2 as pb
from wanps.proto.codec import fingerprint_of
from wanps.worker.compress import ErrorFeedback
from wanps.worker.replica import Replica
from wanps.worker.session import ConnectionLost, WorkerSession

log = logging.getLogger("wanps.worker")


def model_fingerprint(params: list[torch.Tensor]) -> bytes:
    return fingerprint_of([(f"p{i}", tuple(p.shape), str(p.dtype)) for i, p in enumerate(params)])


def bind_to_flat(params: list[torch.Tensor]) -> torch.Tensor:
    """One flat float32 vector holding every parameter; each parameter becomes a view of it."""
    for p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"wanps trains float32 parameters; got {p.dtype}")
    flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    return flat


class Optimizer(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        server: str,
        controller: str | None = None,
        lr: float = 0.1,
        *,
        tau: int = 0,
        delta: float = 1.0,
        name: str | None = None,
        decision_timeout_s: float = 30.0,
        join_timeout_s: float = 600.0,
        use_uvloop: bool = True,
        compressor: str = "topk",
        value_dtype: str = "float32",
        compressor_seed: int = 0,
        error_feedback: str = "ef",
        def_lambda: float = 0.3,
    ) -> None:
        """`tau`, `delta`: used only without a controller (or until its first decision).

        `compressor`: a name from wanps.worker.compressors.COMPRESSORS ("topk", "topk-sampled",
        "random-block"); `value_dtype`: "float32", "float16" or "bfloat16" for the values of
        sparse pushes (dense pushes stay float32); `compressor_seed`: every worker of a
        cluster must use the same one with "random-block", so their blocks coincide.

        `error_feedback`: "ef" (plain error feedback) or "def" (detached error feedback, the
        DEF paper's Algorithm 1: gradients are taken at x - def_lambda * e). `zero_grad()`
        moves the parameters to that point and `step()` moves them back, exactly, so call
        them in the usual order (zero_grad, forward, backward, step). The cluster's model
        is DEF-A's output x_T; DEF's y_T = x_T - mean(e_T) needs a residual gather at the
        end that is not built yet.
        """
        if error_feedback not in ("ef", "def"):
            raise ValueError(f"error_feedback must be 'ef' or 'def', got {error_feedback!r}")
        if error_feedback == "def" and not 0.0 <= def_lambda <= 1.0:
            raise ValueError(f"def_lambda must be in [0, 1], got {def_lambda}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr))
        self._params = [p for group in self.param_groups for p in group["params"]]
        self.replica = bind_to_flat(self._params)
        self.num_params = self.replica.numel()
        self._grad = torch.zeros_like(self.replica)
        # Built before joining: a bad compressor name fails here, not after seeding the cluster.
        self._ef = ErrorFeedback(self.num_params, compressor, value_dtype, seed=compressor_seed)
        self._fallback = Decision(0, 0, tau, delta, "local", "no controller decision yet")
        self._seen_decisions: set[int] = set()
        # DEF: the clean replica while the parameters sit at the detached point x - lambda*e.
        self._def_lambda = def_lambda if error_feedback == "def" else 0.0
        self._clean = torch.empty_like(self.replica) if self._def_lambda else None
        self._detached = False
        self.session = WorkerSession(server, controller, use_uvloop=use_uvloop)
        try:
            self._join(name or socket.gethostname(), join_timeout_s)
            if controller:
                self.session.follow_decisions()
                if not self.session.wait_for_decision(decision_timeout_s):
                    log.warning("no decision from the controller within %.0f s; using tau %d delta %g",
                                decision_timeout_s, tau, delta)
            else:
                self.session.follow_decisions()  # pings only
        except BaseException:
            self.session.close()
            raise
        self._in_flight: deque[Future[pb.PushReply]] = deque()
        self._compute_started = time.monotonic()
        self.last_decision: Decision = self.decision_at(self.round)
        self.closed = False

    def _join(self, name: str, timeout: float) -> None:
        reply = self.session.join(self.num_params, model_fingerprint(self._params), name)
        self.worker_id = reply.worker_id
        self.tau_max = reply.tau_max
        if reply.must_seed:
            self.session.seed(self.replica)
        pulled = self.session.pull(timeout)
        self.replica.copy_(pulled.values)
        self._replica = Replica(self.replica, pulled.version)
        self.round = pulled.first_round
        self.rank, self.world_size = pulled.rank, pulled.world_size
        self.session.follow_updates(self.version)
        log.info("worker %d: rank %d of %d, version %d, first round %d", self.worker_id, self.rank,
                 self.world_size, self.version, self.round)

    # ------------------------------------------------------------------ decisions

    def decision_at(self, round_: int) -> Decision:
        decisions = self.session.decisions()
        first_look = not self._seen_decisions  # what was in force when this worker joined is not late
        for late in (d for d in decisions if d.decision_id not in self._seen_decisions):
            self._seen_decisions.add(late.decision_id)
            if late.from_round < round_ and not first_look:
                # Workers switch together only if they hear of a decision before its round.
                log.warning("decision %d for round %d arrived at round %d: this worker switches late",
                            late.decision_id, late.from_round, round_)
        return decision_for_round(decisions, round_) or self._fallback

    def tau_at(self, round_: int) -> int:
        return min(self.decision_at(round_).tau, self.tau_max)

    # ------------------------------------------------------------------ the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._detach()

    @torch.no_grad()
    def _detach(self) -> None:
        """DEF: move the parameters to x - lambda*e for the coming forward and backward."""
        if self._clean is not None and not self._detached and not self.closed:
            self._clean.copy_(self.replica)
            self.replica.sub_(self._ef.residual, alpha=self._def_lambda)
            self._detached = True

    @torch.no_grad()
    def _reattach(self) -> None:
        """Back to the exact replica x (a copy, not an addition: replicas stay bit-identical)."""
        if self._clean is not None and self._detached:
            self.replica.copy_(self._clean)
            self._detached = False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if self.closed:
            raise RuntimeError("step() after close()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._reattach()
        self._raise_failed_pushes()
        # A straggler whose rounds closed at their deadline without it (docs/operations.md)
        # moves on to the model's version instead of pushing rounds that are already late.
        self.round = max(self.round, self.version)
        decision = self.decision_at(self.round)
        self.last_decision = decision
        self._gather_scaled_grad()
        grad_norm = float(torch.linalg.vector_norm(self._grad))  # Accordion's signal, reported with T_comp
        update = self._ef.compress(self._grad, decision.delta_for(self.worker_id), self.round)
        self.session.record_compute(time.monotonic() - self._compute_started, self.round, grad_norm)
        self._in_flight.append(self.session.push(self.round, self.version, update))
        self.round += 1
        self._wait_until_fresh(self.round - self.tau_at(self.round))
        self._compute_started = time.monotonic()
        return loss

    def _gather_scaled_grad(self) -> None:
        """grad buffer = lr * g, per parameter (one loop over tensors, not elements)."""
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                n = p.numel()
                view = self._grad[offset : offset + n]
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad.reshape(-1)).mul_(group["lr"])
                offset += n

    def _raise_failed_pushes(self) -> None:
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft().result()  # raises the server's refusal, if any
        for late in self.session.take_late_updates():
            self._ef.restore(late)  # its round closed at the deadline without it: send it again later

    def _wait_until_fresh(self, min_version: int) -> None:
        """Apply every delta received so far; block until the replica reaches min_version.
        A lost connection is recovered here (docs/operations.md), then the wait goes on."""
        while True:
            try:
                self._replica.catch_up(self.session.deltas, min_version, on_idle=self._raise_failed_pushes)
                return
            except ConnectionLost:
                if self._recover():  # joined again: the round counter moved, so does the bound
                    min_version = self.round - self.tau_at(self.round)

    def _recover(self, timeout_s: float = 600.0) -> bool:
        """Reconnect and reconcile (WorkerSession.recover). True when this worker joined again."""
        def wait_for(version: int) -> None:
            self._replica.catch_up(self.session.deltas, version, on_idle=self._raise_failed_pushes)

        recovery = self.session.recover(self._replica, wait_for, self.tau_max, self.round, timeout=timeout_s)
        self._in_flight.extend(recovery.futures)
        if recovery.rejoined:
            self.worker_id = self.session.worker_id
            self.round = recovery.first_round
        return recovery.rejoined

    @property
    def version(self) -> int:
        return self._replica.version

    def wait_for_version(self, version: int, timeout_s: float) -> int:
        """Apply deltas (recovering a lost connection) until the replica reaches `version` or
        `timeout_s` passes. Returns the replica's version. If the worker has to join again
        meanwhile, versions restart from its new first round, which becomes the target."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._replica.catch_up(self.session.deltas, version, deadline=deadline,
                                              on_idle=self._raise_failed_pushes)
            except ConnectionLost:
                if self._recover():
                    version = self.round

    # ------------------------------------------------------------------ end

    @property
    def bytes_up(self) -> int:
        return self.session.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.session.bytes_down

    def close(self, timeout: float = 60.0) -> None:
        """Wait for pushes in flight, leave at a round boundary, and close the connections."""
        if self.closed:
            return
        self._reattach()
        self.closed = True
        try:
            deadline = time.monotonic() + timeout
            try:
                # A connection lost since the last step: re-send this worker's last pushes, so
                # the others need not wait out its lease.
                self._replica.catch_up(self.session.deltas, 0, on_idle=self._raise_failed_pushes)
            except ConnectionLost:
                self._recover(timeout_s=max(1.0, timeout / 2))
            for future in self._in_flight:
                future.result(max(0.0, deadline - time.monotonic()))
            self._in_flight.clear()
            self.session.leave()
        finally:
            self.session.close()

    def __enter__(self) -> Optimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

