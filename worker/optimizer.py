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
from prometheus_client import CollectorRegistry

from wanps.proto.decisions import Decision, decision_for_round
from wanps.rpc.auth import ClientSecurity
from wanps.proto import wanps_pb2 as pb
from wanps.proto.codec import fingerprint_of
from wanps.worker.metrics import WorkerMetrics
from wanps.worker.replica import Replica
from wanps.worker.recovery import ConnectionLost
from wanps.worker.session import ReceivedDelta, WorkerSession
from wanps.worker.skip_rule import SkipRule, step_squared_norm
from wanps.worker.update_rule import UpdateConfig, UpdateRule

log = logging.getLogger("wanps.worker")


def model_fingerprint(params: list[torch.Tensor]) -> bytes:
    return fingerprint_of([(f"p{i}", tuple(p.shape), str(p.dtype)) for i, p in enumerate(params)])


def rebind(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Make each parameter a view of its slice of `flat` (same layout as bind_to_flat)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        offset += n


def bind_to_flat(params: list[torch.Tensor]) -> torch.Tensor:
    """One flat float32 vector holding every parameter; each parameter becomes a view of it."""
    for p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"wanps trains float32 parameters; got {p.dtype}")
    flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
    rebind(params, flat)
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
        momentum: float = 0.0,
        skip_rule: SkipRule | None = None,
        security: ClientSecurity | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`tau`, `delta`: used only without a controller (or until its first decision).

        `compressor`: a name from wanps.worker.compressors.COMPRESSORS ("topk", "topk-sampled",
        "random-block"); `value_dtype`: "float32", "float16" or "bfloat16" for the values of
        sparse pushes (dense pushes stay float32); `compressor_seed`: every worker of a
        cluster must use the same one with "random-block", so their blocks coincide.

        `error_feedback`: "ef" (plain error feedback), "def" or "def-a" (detached error
        feedback, the DEF paper's Algorithm 1: gradients are taken at x - def_lambda * e).
        `zero_grad()` moves the parameters to that point and `step()` moves them back,
        exactly, so call them in the usual order (zero_grad, forward, backward, step). With
        "def", `close()` pushes every worker's residual once (a final dense round), so the
        cluster's model ends at DEF's output y_T = x_T - mean(e_T); "def-a" ends at x_T.
        `momentum`: mu of m = mu*m + g, p = lr*m + e (the DEF paper's eq. (11)).

        `skip_rule`: SASG's adaptive skip (wanps.worker.skip_rule.SkipRule). It needs the
        gradient at the parameters of the last upload on the same batch, so pass `step()` a
        closure that zeroes the gradients, computes the loss and calls backward (as for
        torch.optim.LBFGS); step calls it at the current parameters and, when a skip is
        possible, once more at the anchor.

        `registry`: a prometheus_client CollectorRegistry to count this worker's pushes, bytes,
        tau, delta and staleness on (docs/metrics.md); None (default) counts nothing.
        """
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr))
        self._params = [p for group in self.param_groups for p in group["params"]]
        self.replica = bind_to_flat(self._params)
        self.num_params = self.replica.numel()
        self._grad = torch.zeros_like(self.replica)
        # Built before joining: a bad compressor name or mode fails here, not after seeding the cluster.
        config = UpdateConfig(compressor=compressor, value_dtype=value_dtype, compressor_seed=compressor_seed,
                              error_feedback=error_feedback, def_lambda=def_lambda, momentum=momentum)
        self.rule = UpdateRule(self.num_params, config, skip_rule, device=self.replica.device)
        self._aux_grad = torch.zeros_like(self.replica) if skip_rule is not None else None
        self._per_element_lr: tuple[tuple[float, ...], torch.Tensor] | None = None  # param groups with different lrs
        self._fallback = Decision(0, 0, tau, delta, "local", "no controller decision yet")
        self._seen_decisions: set[int] = set()
        # DEF: the clean replica while the parameters sit at the detached point x - lambda*e.
        self._clean = torch.empty_like(self.replica) if self.rule.detaches else None
        self._detached = False
        self.metrics = WorkerMetrics(registry) if registry is not None else None
        # `security`: token and TLS to dial with (ClientSecurity.from_env() reads the WANPS_TOKEN* / WANPS_TLS* variables).
        self.session = WorkerSession(server, controller, use_uvloop=use_uvloop, security=security, metrics=self.metrics)
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
        if self.rule.skip_rule is not None:
            self.rule.skip_rule.num_workers = max(1, pulled.world_size)
            self._replica.on_apply = self._observe_model_step
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
            self.rule.detached_point(self._clean, out=self.replica)
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
        if self.metrics is not None:
            self.metrics.record_decision(decision.decision_id, min(decision.tau, self.tau_max),
                                         decision.delta_for(self.worker_id), self.round)
        lr = self._gather_grad(self._grad)
        grad_norm = float(torch.linalg.vector_norm(self._grad)) * self._norm_scale(lr)  # Accordion's signal
        compute_seconds = time.monotonic() - self._compute_started
        aux_grad = self._gradient_at_anchor(closure) if self.rule.wants_aux_gradient else None
        update = self.rule.update(self._grad, lr, decision.delta_for(self.worker_id), self.round,
                                  params=self.replica, aux_grad=aux_grad)
        self.session.record_compute(compute_seconds, self.round, grad_norm)
        self._in_flight.append(self.session.push(self.round, self.version, update))
        self.round += 1
        self._wait_until_fresh(self.round - self.tau_at(self.round))
        self._compute_started = time.monotonic()
        return loss

    def _gather_grad(self, out: torch.Tensor) -> float | torch.Tensor:
        """out = the raw gradient (one loop over tensors, not elements); returns the learning
        rate to scale it by: one float, or a per-element vector when groups differ."""
        offset = 0
        lrs: list[tuple[int, int, float]] = []
        for group in self.param_groups:
            for p in group["params"]:
                n = p.numel()
                view = out[offset : offset + n]
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad.reshape(-1))
                lrs.append((offset, n, group["lr"]))
                offset += n
        if len({lr for _, _, lr in lrs}) <= 1:
            return float(lrs[0][2] if lrs else self.defaults["lr"])
        key = tuple(lr for _, _, lr in lrs)
        if self._per_element_lr is None or self._per_element_lr[0] != key:  # rebuilt only when an lr changes
            per_element = torch.empty_like(out)
            for start, n, lr in lrs:
                per_element[start : start + n] = lr
            self._per_element_lr = (key, per_element)
        return self._per_element_lr[1]

    @staticmethod
    def _norm_scale(lr: float | torch.Tensor) -> float:
        return float(lr.mean()) if isinstance(lr, torch.Tensor) else float(lr)

    def _gradient_at_anchor(self, closure: Callable[[], float] | None) -> torch.Tensor:
        """SASG's auxiliary gradient: the closure re-run with the parameters bound to the anchor."""
        if closure is None:
            raise RuntimeError("the SASG skip rule needs step(closure): a closure that zeroes the "
                               "gradients, computes the loss on the same batch and calls backward")
        anchor = self.rule.skip_rule.anchor  # type: ignore[union-attr]
        assert anchor is not None and self._aux_grad is not None
        rebind(self._params, anchor)  # views, no copy: the replica itself is never touched
        try:
            with torch.enable_grad():
                closure()
            self._gather_grad(self._aux_grad)
        finally:
            rebind(self._params, self.replica)
        return self._aux_grad

    def _observe_model_step(self, item: ReceivedDelta) -> None:
        rule = self.rule.skip_rule
        assert rule is not None
        rule.record_model_step(step_squared_norm(item.delta.values))
        if item.members:
            rule.num_workers = item.members

    def _raise_failed_pushes(self) -> None:
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft().result()  # raises the server's refusal, if any
        for late in self.session.take_late_updates():
            self.rule.ef.restore(late)  # its round closed at the deadline without it: send it again later

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
            if self.rule.skip_rule is not None:
                self.rule.skip_rule.forget_upload()
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

    @property
    def skip_rule(self) -> SkipRule | None:
        return self.rule.skip_rule

    def close(self, timeout: float = 60.0) -> None:
        """Wait for pushes in flight, leave at a round boundary, and close the connections.

        With error_feedback="def", first push the residual once (DEF's output step), so the
        model ends at y_T = x_T - mean(e_T) on the server and in this replica."""
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
            if self.rule.config.error_feedback == "def":
                self._flush_residual(deadline)
            for future in self._in_flight:
                future.result(max(0.0, deadline - time.monotonic()))
            self._in_flight.clear()
            self.session.leave()
        finally:
            self.session.close()

    def _flush_residual(self, deadline: float) -> None:
        self._raise_failed_pushes()
        self._in_flight.append(self.session.push(self.round, self.version, self.rule.final_residual()))
        self.round += 1
        # Wait for the flush round to close, so this replica (the user's model) holds y_T too.
        self._replica.catch_up(self.session.deltas, self.round, deadline=deadline, on_idle=self._raise_failed_pushes)

    def __enter__(self) -> Optimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

