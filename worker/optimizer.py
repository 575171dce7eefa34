"""`wanps.worker.Optimizer`: train through a wanps cluster as with a torch optimizer.

    opt = wanps.worker.Optimizer(model, server="host:50051", controller="host:50052", lr=0.1)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    opt.close()

Given the module, the optimizer replicates its whole state: every parameter (trainable or
frozen) and every persistent buffer, laid out in one flat float32 vector by
`wanps.worker.layout.ModelLayout`. On construction it joins the cluster, seeds that vector
if it is the first worker (otherwise its own initial values are replaced), pulls it, and
binds the model to it (wanps.worker.binding): float32 parameters become views of their
slice; bfloat16/float16 parameters are refreshed from the float32 master at step
boundaries; buffers are copied in at each buffer sync. `step()` pushes C(lr*m + e) over the
trainable prefix for the current round and blocks only until the replica is recent enough
for the next round (version >= round - tau), applying the deltas of closed rounds at that
moment and never in between, so forward and backward always see a fixed replica.

Buffer sync: every `buffer_sync_every` rounds (B, at least the server's tau_max + 1) and at
`close()`, a worker's push also carries, for every buffer element where they differ,
replica - local. The server's mean then leaves the replica's buffers at the mean of the
workers' local buffers, and each worker copies them into its module when it applies that
round, so all workers hold identical buffers after every sync.
"""
from __future__ import annotations

import concurrent.futures
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from wanps.proto.decisions import Decision, decision_for_round
from wanps.rpc.auth import ClientSecurity
from wanps.proto import wanps_pb2 as pb
from wanps.proto.codec import Update
from wanps.worker.binding import ModelBinding
from wanps.worker.io_loop import Interrupted
from wanps.worker.layout import (collect_module, collect_parameters, layout_of, trainable_part,
                                 with_buffers)
from wanps.worker.metrics import WorkerMetrics
from wanps.worker.recovery import ConnectionLost
from wanps.worker.session import ReceivedDelta, check_downlink_delta
from wanps.worker.shards import open_session, replica_for
from wanps.worker.skip_rule import SkipRule, step_squared_norm
from wanps.worker.update_rule import UpdateConfig, UpdateRule

log = logging.getLogger("wanps.worker")

#: Param-group options the optimizer honours.
HONOURED_OPTIONS = ("lr", "momentum", "weight_decay")
#: torch.optim.SGD options accepted only at their neutral value (anything else would change the update).
NEUTRAL_OPTIONS = ("dampening", "nesterov", "maximize", "foreach", "fused", "differentiable", "capturable")
#: Group keys that carry no option.
METADATA_KEYS = ("params", "param_names", "name", "initial_lr")
DEFAULT_BUFFER_SYNC_EVERY = 16
NOTHING_TO_TRAIN = ("the model has no trainable parameters (requires_grad=True) to train; "
                    "use wanps.worker.Observer to follow a cluster")
# close() after interrupt(): how long the pushes in flight and the Leave may still take.
STOP_GRACE_S = 2.0


def model_fingerprint(params: Iterable[torch.Tensor]) -> bytes:
    """The fingerprint `Optimizer(params)` joins with (unnamed tensors, frozen when requires_grad is False)."""
    layout, _ = layout_of(collect_parameters([{"params": list(params)}]))
    return layout.fingerprint()


def bind_to_flat(params: list[torch.Tensor]) -> torch.Tensor:
    """One flat float32 vector holding these float32 parameters, each becoming a view of it."""
    for p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"bind_to_flat binds float32 parameters; got {p.dtype}")
    flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def check_group_options(group: dict) -> None:
    """Refuse, with a clear error, any param-group option this optimizer would not honour."""
    for key, value in group.items():
        if key in METADATA_KEYS:
            continue
        if key in NEUTRAL_OPTIONS:
            if value:
                raise ValueError(f"param group option {key}={value!r} is not supported: wanps.worker.Optimizer "
                                 f"honours {', '.join(HONOURED_OPTIONS)} per group (SGD with momentum m = mu*m + g "
                                 "and weight decay g + wd*p), nothing that changes the update otherwise")
            continue
        if key not in HONOURED_OPTIONS:
            raise ValueError(f"param group option {key!r} is not supported: wanps.worker.Optimizer honours "
                             f"{', '.join(HONOURED_OPTIONS)} per group")
        number = float(value)
        if key == "lr" and not number >= 0:
            raise ValueError(f"lr must be >= 0 in a param group, got {value}")
        if key == "momentum" and not 0.0 <= number < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {value}")
        if key == "weight_decay" and not number >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {value}")


def _module_groups(module: nn.Module, param_groups: Iterable[dict] | None) -> list[dict]:
    """Param groups over the module's trainable parameters: the given ones, then one group
    (with the defaults) of every trainable parameter they leave out."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if param_groups is None:
        return [{"params": trainable}] if trainable else []
    owned = {id(p) for p in module.parameters()}
    groups: list[dict] = []
    listed: set[int] = set()
    for group in param_groups:
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if id(p) not in owned:
                raise ValueError("param_groups lists a tensor that is not a parameter of the model")
        listed.update(id(p) for p in params)
        groups.append({**group, "params": params})
    rest = [p for p in trainable if id(p) not in listed]
    if rest:
        groups.append({"params": rest})
    return groups


class Optimizer(torch.optim.Optimizer):
    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        server: str | Sequence[str],
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
        weight_decay: float = 0.0,
        skip_rule: SkipRule | None = None,
        security: ClientSecurity | None = None,
        registry: CollectorRegistry | None = None,
        param_groups: Iterable[dict] | None = None,
        buffer_sync_every: int = DEFAULT_BUFFER_SYNC_EVERY,
        downlink_delta: float | None = None,
    ) -> None:
        """`params`: the model (an nn.Module: every parameter and persistent buffer is
        replicated; parameters with requires_grad=False are frozen: seeded, never pushed), or,
        as with any torch optimizer, parameters or param groups (only those tensors are
        replicated; a passed parameter with requires_grad=False is frozen).

        `server`: HOST:PORT of the parameter server, or of every shard of a sharded cluster in
        shard order ("A,B,C" or a list; worker/shards.py): the worker joins every shard as one
        worker, splits each push by range and follows every shard.

        `param_groups` (with a module only): groups over the module's parameters, e.g. without
        weight decay for biases; trainable parameters they leave out form one more group. A
        group may set `lr`, `momentum` and `weight_decay`; any other option that changes the
        update (nesterov, dampening, maximize, ...) is refused here, and so is
        `add_param_group` after construction (the replicated layout is fixed at join).

        `tau`, `delta`: used only without a controller (or until its first decision).

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
        `momentum`: mu of m = mu*m + g, p = lr*m + e (the DEF paper's eq. (11)); `weight_decay`:
        wd of g + wd*x (torch.optim.SGD's); both the defaults of every param group.

        `skip_rule`: SASG's adaptive skip (wanps.worker.skip_rule.SkipRule). It needs the
        gradient at the parameters of the last upload on the same batch, so pass `step()` a
        closure that zeroes the gradients, computes the loss and calls backward (as for
        torch.optim.LBFGS); step calls it at the current parameters and, when a skip is
        possible, once more at the anchor. Buffer-sync rounds, and the round after one, always
        upload (a skip would make the server reuse the buffer part).

        `buffer_sync_every`: B, the buffer sync's period in rounds (raised to the server's
        tau_max + 1 when smaller, so that every worker computed a sync push at the same
        replica buffers). Every worker of a cluster must use the same B. A sync costs at most
        8 bytes per buffer element per worker (index + float32 value, only elements that
        differ), every B rounds; a model without buffers never syncs.

        `downlink_delta`: for a slow downlink, the fraction in (0, 1] of elements this worker
        downloads per round: the top of what its replica lacks, the rest kept on the server as
        this worker's downlink residual (bidirectional error feedback, server/downlink.py), so
        its replica is the server's model minus that residual. None (default): what the
        controller's decision says for this worker (deco-hetero gives a follower on a slow
        downlink its own fraction, and changes it as the links change, without a pull), else
        every round's full aggregated delta (the replica bit-identical to the server's model).
        A fraction given here wins over the controller's: it stays fixed.

        `registry`: a prometheus_client CollectorRegistry to count this worker's pushes, bytes,
        tau, delta and staleness on (docs/metrics.md); None (default) counts nothing.

        Bad input fails here, before joining: parameters on several devices, non-floating or
        float64 parameters, embeddings with sparse=True (a sparse gradient passed otherwise
        fails at the first step), unknown options. A model whose structure differs from the
        cluster's raises ModelMismatch naming the first tensor that differs.
        """
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if buffer_sync_every < 1:
            raise ValueError(f"buffer_sync_every must be >= 1, got {buffer_sync_every}")
        check_downlink_delta(downlink_delta)
        module = params if isinstance(params, nn.Module) else None
        if module is not None:
            if not any(p.requires_grad for p in module.parameters()):
                raise ValueError(NOTHING_TO_TRAIN)
            groups: Iterable = _module_groups(module, param_groups)
        elif param_groups is not None:
            raise ValueError("param_groups= goes with a module; with parameters, pass the groups as the first argument")
        else:
            groups = params
        self._layout_fixed = False
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._layout_fixed = True
        tensors = collect_module(module) if module is not None else collect_parameters(self.param_groups)
        self.layout, ordered = layout_of(tensors)
        if self.layout.trainable == 0:
            raise ValueError(NOTHING_TO_TRAIN)
        self._binding = ModelBinding(self.layout, ordered)
        self.replica = self._binding.flat
        self.num_params = self.layout.size  # the replicated vector: parameters and buffers
        self.trainable_params = self.layout.trainable  # T: pushed, compressed, S_g for DeCo
        t = self.trainable_params
        slot = {id(p): entry for entry, p in self._binding.trainable}
        self._group_slices = [[(slot[id(p)].offset, slot[id(p)].stop) for p in group["params"] if id(p) in slot]
                              for group in self.param_groups]
        self._per_element: dict[str, tuple[tuple[float, ...], torch.Tensor]] = {}
        self._grad = torch.zeros(t, device=self.replica.device)
        # Built before joining: a bad compressor name or mode fails here, not after seeding the cluster.
        config = UpdateConfig(compressor=compressor, value_dtype=value_dtype, compressor_seed=compressor_seed,
                              error_feedback=error_feedback, def_lambda=def_lambda, momentum=momentum)
        self.rule = UpdateRule(t, config, skip_rule, device=self.replica.device)
        self._momentum_in_rule: float | torch.Tensor = float(momentum)
        self._sync_momentum()
        self._aux_grad = torch.zeros_like(self._grad) if skip_rule is not None else None
        self._fallback = Decision(0, 0, tau, delta, "local", "no controller decision yet")
        self._fixed_downlink_delta = downlink_delta  # None: the controller's decisions set it
        self._seen_decisions: set[int] = set()
        # DEF: the clean trainable replica while the parameters sit at the detached point x - lambda*e.
        self._clean = torch.empty_like(self._grad) if self.rule.detaches else None
        self._detached = False
        self._requested_sync_every = buffer_sync_every
        self.buffer_sync_every = buffer_sync_every
        self._last_push_synced = False
        self._final_round: int | None = None
        self.metrics = WorkerMetrics(registry) if registry is not None else None
        # `security`: token and TLS to dial with (ClientSecurity.from_env() reads the WANPS_TOKEN* / WANPS_TLS* variables).
        self.session = open_session(server, controller, use_uvloop=use_uvloop, security=security, metrics=self.metrics,
                                    downlink_delta=downlink_delta)
        try:
            self._join(name or socket.gethostname(), join_timeout_s)
            if controller:
                self.session.follow_decisions()
                decided = self.session.wait_for_decision(decision_timeout_s)
                self.session.raise_if_interrupted()  # interrupt() wakes that wait too
                if not decided:
                    log.warning("no decision from the controller within %.0f s; using tau %d delta %g",
                                decision_timeout_s, tau, delta)
            else:
                self.session.follow_decisions()  # pings only
        except BaseException:
            self.session.close()
            raise
        self._in_flight: deque[Future[pb.PushReply]] = deque()
        self._compute_started = time.monotonic()
        self._round_overhead_s = 0.0  # the last round's own work besides compute (0: none yet)
        self.last_decision: Decision = self.decision_at(self.round)
        self.closed = False

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_layout_fixed", False):
            raise RuntimeError("wanps.worker.Optimizer: add_param_group after construction is not supported: "
                               "the replicated layout is fixed when the optimizer joins the cluster, so pass every "
                               "group when building it")
        check_group_options(param_group)
        super().add_param_group(param_group)

    def _join(self, name: str, timeout: float) -> None:
        reply = self.session.first_join(self.num_params, self.layout.fingerprint(), name, timeout,
                                        structure=self.layout.structure, trainable_params=self.trainable_params)
        self.worker_id = reply.worker_id
        self.tau_max = reply.tau_max
        # Every worker must compute a sync round at the same replica buffers: B > tau_max.
        self.buffer_sync_every = max(self._requested_sync_every, self.tau_max + 1)
        if self.layout.has_buffers and self.buffer_sync_every != self._requested_sync_every:
            log.info("buffer sync every %d rounds (the server's tau_max is %d)", self.buffer_sync_every, self.tau_max)
        if reply.must_seed:
            self.session.seed(self.replica)
        pulled = self.session.first_pull(timeout)
        self.replica.copy_(pulled.values)
        self._binding.refresh_parameters(frozen=True)
        self._binding.load_buffers()
        self._replica = replica_for(self.session, self.replica, pulled)
        self._replica.on_apply = self._on_apply
        if self.rule.skip_rule is not None:
            self.rule.skip_rule.num_workers = max(1, pulled.world_size)
        self.round = pulled.first_round
        self.rank, self.world_size = pulled.rank, pulled.world_size
        self.session.follow_updates(self.version)
        log.info("worker %d: rank %d of %d, version %d, first round %d; %r", self.worker_id, self.rank,
                 self.world_size, self.version, self.round, self.layout)

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

    def is_sync_round(self, round_: int) -> bool:
        """Whether this round's push carries the buffers (never for a model without buffers)."""
        return self.layout.has_buffers and (round_ + 1) % self.buffer_sync_every == 0

    # ------------------------------------------------------------------ the step

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._detach()

    @torch.no_grad()
    def _detach(self) -> None:
        """DEF: move the parameters to x - lambda*e for the coming forward and backward."""
        if self._clean is not None and not self._detached and not self.closed:
            trainable = self.replica[: self.trainable_params]
            self._clean.copy_(trainable)
            self.rule.detached_point(self._clean, out=trainable)
            self._binding.refresh_parameters()
            self._detached = True

    @torch.no_grad()
    def _reattach(self) -> None:
        """Back to the exact replica x (a copy, not an addition: replicas stay bit-identical)."""
        if self._clean is not None and self._detached:
            self.replica[: self.trainable_params].copy_(self._clean)
            self._binding.refresh_parameters()
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
        if self._fixed_downlink_delta is None:
            self.session.follow_downlink(decision.downlink_delta_for(self.worker_id))
        if self.metrics is not None:
            self.metrics.record_decision(decision.decision_id, min(decision.tau, self.tau_max),
                                         decision.delta_for(self.worker_id), self.round)
        trainable = self.replica[: self.trainable_params]
        self._binding.gather_gradients(self._grad)
        lr = self._per_group("lr")
        grad_norm = float(torch.linalg.vector_norm(self._grad)) * self._norm_scale(lr)  # Accordion's signal
        self._add_weight_decay(self._grad, trainable)
        self._sync_momentum()
        tail_started = time.monotonic()
        compute_seconds = tail_started - self._compute_started
        sync = self.is_sync_round(self.round)
        # At a sync round, and the round after it, upload whatever SASG says: a skip makes the
        # server reuse the last upload, and that must not be one carrying buffers.
        must_upload = sync or self._last_push_synced
        wants_aux = self.rule.wants_aux_gradient and not must_upload
        aux_grad = self._gradient_at_anchor(closure) if wants_aux else None
        update = self.rule.update(self._grad, lr, decision.delta_for(self.worker_id), self.round,
                                  params=trainable, aux_grad=aux_grad)
        if update is not None or sync:
            update = with_buffers(update, self.layout, self._binding.buffer_differences() if sync else None)
        self._last_push_synced = sync
        self.session.record_compute(compute_seconds, self.round, grad_norm, self._round_overhead_s)
        self._in_flight.append(self.session.push(self.round, self.version, update))
        self.round += 1
        replica, blocked_before = self._replica, self._replica.blocked_s
        self._wait_until_fresh(self.round - self.tau_at(self.round))
        self._binding.refresh_parameters()
        self._compute_started = time.monotonic()
        # What DeCo adds to T_comp: this step's own work besides compute (compressing, pushing,
        # applying deltas, refreshing the parameters), not the time it waited for deltas. The
        # controller inferred it from round times before, which on a link-bound round cannot
        # tell the link from the overhead. Never 0 on the wire (0 means "not measured").
        if replica is self._replica:  # else a recovery pulled a new one: this round measured nothing
            blocked = replica.blocked_s - blocked_before
            self._round_overhead_s = max(1e-6, self._compute_started - tail_started - blocked)
        else:
            self._round_overhead_s = 0.0
        return loss

    def _per_group(self, key: str) -> float | torch.Tensor:
        """A param-group option over the trainable vector: one float when every group that
        holds trainable parameters agrees, else a per-element vector (one fill per tensor,
        rebuilt only when a group's value changes)."""
        values = tuple(float(group[key]) for group in self.param_groups)
        used = {v for v, slices in zip(values, self._group_slices) if slices}
        if len(used) <= 1:
            return next(iter(used), float(self.defaults[key]))
        cached = self._per_element.get(key)
        if cached is not None and cached[0] == values:
            return cached[1]
        per_element = torch.zeros_like(self._grad)
        for value, slices in zip(values, self._group_slices):
            for start, stop in slices:
                per_element[start:stop] = value
        self._per_element[key] = (values, per_element)
        return per_element

    def _add_weight_decay(self, grad: torch.Tensor, at: torch.Tensor) -> None:
        """g += wd * x (torch.optim.SGD's weight decay), per group."""
        wd = self._per_group("weight_decay")
        if isinstance(wd, torch.Tensor):
            grad.addcmul_(wd, at)
        elif wd:
            grad.add_(at, alpha=wd)

    def _sync_momentum(self) -> None:
        """The update rule's mu follows the groups' momentum (a float, or per element)."""
        mu, current = self._per_group("momentum"), self._momentum_in_rule
        same = mu is current or (isinstance(mu, float) and isinstance(current, float) and mu == current)
        if not same:
            self.rule.set_momentum(mu)
            self._momentum_in_rule = mu

    @staticmethod
    def _norm_scale(lr: float | torch.Tensor) -> float:
        return float(lr.mean()) if isinstance(lr, torch.Tensor) else float(lr)

    def _gradient_at_anchor(self, closure: Callable[[], float] | None) -> torch.Tensor:
        """SASG's auxiliary gradient: the closure re-run with the parameters at the anchor."""
        if closure is None:
            raise RuntimeError("the SASG skip rule needs step(closure): a closure that zeroes the "
                               "gradients, computes the loss on the same batch and calls backward")
        anchor = self.rule.skip_rule.anchor  # type: ignore[union-attr]
        assert anchor is not None and self._aux_grad is not None
        self._binding.show_trainable(anchor)  # float32: views, no copy; the replica itself is never touched
        try:
            with torch.enable_grad():
                closure()
            self._binding.gather_gradients(self._aux_grad)
            self._add_weight_decay(self._aux_grad, anchor)
        finally:
            self._binding.show_replica()
        return self._aux_grad

    def _on_apply(self, item: ReceivedDelta) -> None:
        """After each applied delta (at a step boundary)."""
        rule = self.rule.skip_rule
        if rule is not None:
            rule.record_model_step(step_squared_norm(trainable_part(item.delta, self.trainable_params).values))
            if item.members:
                rule.num_workers = item.members
        if self.is_sync_round(item.round) or (item.round == self._final_round and self.layout.has_buffers):
            self._binding.load_buffers()  # the mean of the workers' buffers, the same in every worker

    def _raise_failed_pushes(self) -> None:
        """Also what every wait calls while idle (at least once a second): an interrupted
        worker stops here."""
        self.session.raise_if_interrupted()
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft().result()  # raises the server's refusal, if any
        for late in self.session.take_late_updates():
            # Its round closed at the deadline without it: send it again later (the gradient
            # part only: a late buffer sync is simply missed).
            self.rule.ef.restore(trainable_part(late, self.trainable_params))

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
        # A pull may have replaced the replica: low-precision parameters follow it. Buffers
        # keep their local values until the next sync.
        self._binding.refresh_parameters(frozen=True)
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
                reached = self._replica.catch_up(self.session.deltas, version, deadline=deadline,
                                                 on_idle=self._raise_failed_pushes)
                self._binding.refresh_parameters()
                return reached
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
    def delta_bytes(self) -> int:
        """Of bytes_down: the rounds' deltas alone (what a compressed downlink makes smaller)."""
        return self.session.delta_bytes

    @property
    def skip_rule(self) -> SkipRule | None:
        return self.rule.skip_rule

    def interrupt(self) -> None:
        """Stop waiting: whatever this worker waits for (joining, a round, a reconnect) is given
        up and the waiting call (step(), wait_for_version(), close()) raises
        `wanps.worker.Interrupted`; close() then only says goodbye (pushes in flight and a
        Leave, STOP_GRACE_S each at most). Safe from any thread and from a signal handler:
        `wanps worker` calls it on SIGTERM and SIGINT."""
        self.session.interrupt()

    def close(self, timeout: float = 60.0) -> None:
        """Wait for pushes in flight, leave at a round boundary, and close the connections.

        With error_feedback="def", first push the residual once (DEF's output step), so the
        model ends at y_T = x_T - mean(e_T) on the server and in this replica. A model with
        buffers syncs them once more in the same final round. Either way close() then waits
        for that round to be applied, so workers that close after the same round end with
        identical state_dict()s (parameters and buffers). After interrupt() (or when it comes
        during close), close() takes at most a few seconds: see `interrupt`."""
        if self.closed:
            return
        self._reattach()
        self.closed = True
        try:
            if not self.session.interrupted:
                try:
                    self._close_in_step(timeout)
                    return
                except Interrupted:
                    pass
            self._close_stopping()
        finally:
            self.session.close()

    def _close_stopping(self) -> None:
        """close() of an interrupted worker: give the pushes in flight and a Leave a moment
        (so the others need not wait out this worker's lease), then go."""
        deadline = time.monotonic() + STOP_GRACE_S
        for future in self._in_flight:
            try:
                future.result(max(0.0, deadline - time.monotonic()))
            except BaseException:  # noqa: BLE001 - stopping: what is not done by now is given up
                break
        for future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        if not self.session.lost:
            try:
                self.session.leave(timeout=STOP_GRACE_S, interruptible=False)
            except Exception as exc:  # noqa: BLE001 - the server may be gone: nothing more to do
                log.info("worker %s: no Leave on the way out (%s)", self.worker_id, exc)

    def _close_in_step(self, timeout: float) -> None:
        """close() of a worker nobody interrupted (see close)."""
        deadline = time.monotonic() + timeout
        try:
            # A connection lost since the last step: re-send this worker's last pushes, so
            # the others need not wait out its lease.
            self._replica.catch_up(self.session.deltas, 0, on_idle=self._raise_failed_pushes)
        except ConnectionLost:
            self._recover(timeout_s=max(1.0, timeout / 2))
        residual = self.rule.final_residual() if self.rule.config.error_feedback == "def" else None
        if residual is not None or self.layout.has_buffers:
            self._push_final_round(residual, deadline)
        try:
            for future in self._in_flight:
                while not future.done():  # in slices: interrupt() must not wait out a stalled push
                    self.session.raise_if_interrupted()
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"close(): pushes still in flight after {timeout:g} s")
                    concurrent.futures.wait([future], timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                future.result()  # raises the server's refusal, if any
        finally:
            for future in self._in_flight:
                future.cancel()  # timed out: a push still running must not outlive close()
            self._in_flight.clear()
        self.session.leave()

    def _push_final_round(self, residual: Update | None, deadline: float) -> None:
        """One last round: DEF's residual flush and/or a buffer sync."""
        self._raise_failed_pushes()
        self.round = max(self.round, self.version)
        if self.layout.has_buffers:
            # Computed at the replica of every earlier round applied: the buffers every worker
            # closing at this round sees, and what the replica holds when this round is applied.
            self._replica.catch_up(self.session.deltas, self.round, deadline=deadline,
                                   on_idle=self._raise_failed_pushes)
        buffers = self._binding.buffer_differences() if self.layout.has_buffers else None
        self._final_round = self.round
        self._in_flight.append(self.session.push(self.round, self.version,
                                                 with_buffers(residual, self.layout, buffers)))
        self.round += 1
        # Wait for it to close, so this replica (the user's model) holds y_T and the synced buffers too.
        self._replica.catch_up(self.session.deltas, self.round, deadline=deadline, on_idle=self._raise_failed_pushes)
        self._binding.refresh_parameters()

    def __enter__(self) -> Optimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
