"""The controller's state and decision loop, with no network code.

`ControllerCore` takes worker reports (rounds, link samples), keeps one `LinkEstimator`
per worker, and turns the policy's proposals into decisions in its `DecisionBook`, each
holding from a round far enough ahead that every worker hears of it first. The gRPC
servicer (controller/service.py) only decodes reports and streams the book.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from wanps.controller.deco import DEFAULT_BITS_PER_ELEMENT, DENSE_BITS_PER_ELEMENT, DENSE_FROM_DELTA, overhead_sample
from wanps.proto.decisions import Decision, decision_for_round
from wanps.controller.decisions import MAX_PENDING_DECISIONS, DecisionBook
from wanps.controller.estimator import KIND_COMPUTE, KIND_DOWNLOAD, KIND_PUSH, EstimatorConfig, LinkEstimate, LinkEstimator, Sample
from wanps.controller.policy import (ClusterView, PolicyConfig, Proposal, deco_input, differs_enough, estimates_moved,
                                     propose, slowest_down, slowest_link)


class TooManyPendingDecisions(RuntimeError):
    """A policy switch would schedule one more decision ahead than the book keeps."""


@dataclass(frozen=True)
class Report:
    worker_id: int
    round: int
    num_params: int
    samples: tuple[Sample, ...]


# Bounds on a measured wire cost per element: a bad report cannot make DeCo price a push at ~0.
MIN_MEASURED_BITS = 8.0
# The training speed a switch is scheduled by: of the last few seconds of reports.
RECENT_SPEED_S = 3.0
MAX_MEASURED_BITS = 256.0


class ControllerCore:
    def __init__(self, policy: PolicyConfig, estimator: EstimatorConfig | None = None,
                 first_decision_id: int = 1) -> None:
        self.policy = policy
        self.estimator_config = estimator or EstimatorConfig()
        # A restarted controller starts its ids above its predecessor's (the service passes a
        # clock-based start), so workers holding old decisions never confuse the two.
        self.book = DecisionBook(first_decision_id)
        self.estimators: dict[int, LinkEstimator] = {}
        self.estimates: dict[int, LinkEstimate] = {}
        self.num_params: int | None = None
        self.reported_round = 0
        self._proposal: Proposal | None = None  # what the newest decision carries
        self._estimates_at_decision: dict[int, LinkEstimate] = {}
        # Whether a report moved its worker's estimate past the threshold since the last
        # decision (checked per report for the reporting worker only: O(1), not O(workers)).
        self._moved_since_decision = False
        self._decided_at_round: int | None = None
        self._progress: deque[tuple[float, int]] = deque(maxlen=64)  # (time, reported round)
        self._traffic: dict[int, deque[tuple[float, str, int]]] = {}
        # accordion: per interval of E rounds, (sum of gradient norms, count).
        self._norms: dict[int, list[float]] = {}
        # Per-round overhead observations (deco.overhead_sample) for the decision in force,
        # at most one a second (about the last minute).
        self._overhead_samples: deque[float] = deque(maxlen=64)
        self._overhead_sampled_at: float | None = None
        # When a worker last began or stopped reporting: round times from before describe
        # another cluster (`_members_changed`).
        self._members_changed_at: float | None = None
        self._history: deque[Decision] = deque(maxlen=256)  # the book is pruned; this is not
        # (bytes, elements) of the latest sparse pushes of all workers: the wire cost of a sent element.
        self._wire_costs: deque[tuple[int, int]] = deque(maxlen=256)

    # ------------------------------------------------------------------ inputs

    def report(self, report: Report, now_s: float) -> Decision | None:
        if report.num_params:
            self.num_params = report.num_params
        if report.round > self.reported_round or not self._progress:
            self.reported_round = max(self.reported_round, report.round)
            self._progress.append((now_s, self.reported_round))
        if report.worker_id not in self.estimators:
            self._members_changed(now_s)
        estimator = self.estimators.setdefault(report.worker_id, LinkEstimator(self.estimator_config))
        traffic = self._traffic.setdefault(report.worker_id, deque(maxlen=256))
        for sample in report.samples:
            estimator.add(sample)
            # Buckets are pruned behind the newest reported round; one far ahead of it (no honest
            # sample is) would never be. One interval of slack: a report may lag its own samples.
            if (sample.kind == KIND_COMPUTE and sample.grad_norm > 0
                    and sample.round <= self.reported_round + max(1, self.policy.every_rounds)):
                bucket = self._norms.setdefault(sample.round // max(1, self.policy.every_rounds), [0.0, 0])
                bucket[0] += sample.grad_norm
                bucket[1] += 1
            if sample.kind in (KIND_PUSH, KIND_DOWNLOAD):
                traffic.append((sample.at_s, sample.kind, sample.nbytes))
            # Dense pushes (every element, no index) are priced apart (DENSE_BITS_PER_ELEMENT).
            if (sample.kind == KIND_PUSH and sample.elements > 0 and sample.nbytes > 0
                    and (self.num_params is None or sample.elements < self.num_params)):
                self._wire_costs.append((sample.nbytes, sample.elements))
        estimate = estimator.estimate(now_s)
        if estimate is not None:
            estimator.forget_before(estimate.window_start_s)
            previous = self.estimates.get(report.worker_id)
            if estimate.down_bandwidth_bps is None and previous is not None and previous.down_bandwidth_bps:
                # No downlink point in the window does not make the downlink as fast as the
                # uplink (DeCo's fallback): on a congested one the deltas are what is stuck.
                # The last measured value holds until the downlink is measured again.
                estimate = dataclasses.replace(estimate, down_bandwidth_bps=previous.down_bandwidth_bps,
                                               down_samples=0, down_method="held")
            self.estimates[report.worker_id] = estimate
            before = self._estimates_at_decision.get(report.worker_id)
            if estimates_moved({} if before is None else {report.worker_id: before}, {report.worker_id: estimate},
                               self.policy.change_threshold):
                self._moved_since_decision = True
        self.sample_overhead(now_s)
        return self.maybe_decide(now_s)

    def forget(self, worker_id: int, now_s: float) -> None:
        if worker_id in self.estimators:
            self._members_changed(now_s)
        self.estimators.pop(worker_id, None)
        self.estimates.pop(worker_id, None)
        self._traffic.pop(worker_id, None)

    def set_policy(self, policy: PolicyConfig, now_s: float) -> Decision | None:
        """Switch policy at run time; decide at once if the new policy can. Refused (changing
        nothing) when the decision would be one more than the book keeps ahead."""
        if self._would_add_pending() and self.book.pending(self.reported_round) >= MAX_PENDING_DECISIONS:
            raise TooManyPendingDecisions(
                f"{MAX_PENDING_DECISIONS} decisions are already scheduled ahead of round {self.reported_round}; "
                "switch again once the workers have reached them")
        self.policy = policy
        self._proposal = None
        self._decided_at_round = None
        return self.maybe_decide(now_s)

    def decide(self, from_round: int, tau: int, delta: float, policy: str, reason: str,
               worker_downlink_delta: dict[int, float] | None = None) -> Decision:
        """Record a decision by hand (tests, drills), pruned like any other."""
        decision = self.book.add(from_round, tau, delta, policy, reason,
                                 worker_downlink_delta=worker_downlink_delta)
        self.book.prune(self.reported_round)
        self._history.append(decision)
        return decision

    # ------------------------------------------------------------------ deciding

    def view(self) -> ClusterView:
        return ClusterView(round=self.reported_round, num_params=self.num_params, estimates=dict(self.estimates),
                           traffic_factor=self.traffic_factor(), grad_norm_change=self.grad_norm_change(),
                           overhead_s=self.overhead_s(), bits_per_element=self.bits_per_element(),
                           round_floor_s=self.round_floor_s())

    def bits_per_element(self) -> float:
        """Wire bits per sent element: the configured value, else measured from the pushes.

        Measured as the recent sparse pushes' payload bytes over their elements, so the cost
        is the codec's real one (uint32 index + float32 value = 64, + float16 = 48, a random
        block 32 or 16), whichever compressor and value dtype the workers use. Workers may
        differ: the sums weigh each by what it sent. Until the first push: DEFAULT_BITS_PER_ELEMENT.
        """
        if self.policy.bits_per_element is not None:
            return self.policy.bits_per_element
        if not self._wire_costs:
            return DEFAULT_BITS_PER_ELEMENT
        nbytes = sum(b for b, _ in self._wire_costs)
        elements = sum(e for _, e in self._wire_costs)
        return min(max(8.0 * nbytes / elements, MIN_MEASURED_BITS), MAX_MEASURED_BITS)

    # ------------------------------------------------------------------ per-round overhead

    def _members_changed(self, now_s: float) -> None:
        """A worker began or stopped reporting: the overheads inferred so far are dropped, and
        new ones come from rounds after it.

        A worker reports once it has joined and pulled the model, and the server waits for it
        from its first round on: the others' rounds wait, unseen by the controller, while it
        pulls the model over a slow downlink, and read as overhead; the round floor they
        gave put tau at 0 at the start of `cnn-slow-down` (docs/benchmarks.md, fourth
        session). A worker that leaves takes its share of the rounds with it.
        """
        self._overhead_samples.clear()
        self._members_changed_at = now_s

    def sample_overhead(self, now_s: float) -> None:
        """One overhead observation over the last measurement window (about 10 s of reports).

        What Theorem 3 does not model: decoding and applying deltas, encoding the push, the
        RPCs, the server's aggregation, all on shared cores. Each decision in force during
        the window gives deco.overhead_sample for the measured seconds per round; the
        observation is their mean weighted by the rounds each covered. If a decision that
        covered more than a fifth of the window waited on the link, o cannot be seen: no
        observation. Errors of the link estimates still get in, which is why `overhead_s`
        takes a quantile and caps it.
        """
        if self._overhead_sampled_at is not None and now_s - self._overhead_sampled_at < 1.0:
            return
        window = self._measurement_window()
        if window is None or self.num_params is None or not self.estimates:
            return
        (t0, r0), (t1, r1) = window
        if self._members_changed_at is not None and t0 < self._members_changed_at:
            return  # rounds from before the newest worker reported (`_members_changed`)
        if any(e.t_comp_s is None or e.down_bandwidth_bps is None for e in self.estimates.values()):
            # A worker not stepping yet: the rounds wait on its start. A downlink not measured
            # yet is taken as fast as its uplink: rounds that waited on a slow one would read
            # as overhead.
            return
        bandwidth, latency, t_comp = slowest_link(self.estimates)
        assert t_comp is not None  # every estimate has one
        self._overhead_sampled_at = now_s
        view = ClusterView(round=self.reported_round, num_params=self.num_params, estimates=self.estimates,
                           traffic_factor=self.traffic_factor(), overhead_s=self.overhead_s(),
                           bits_per_element=self.bits_per_element())
        # Every downlink as it is, the slowest one included: deco-hetero prices its decisions
        # without the slow ones (they may get their own fraction), but a slow downlink that
        # carries the union binds the rounds, and read as overhead it set a round floor of
        # 0.5 s, which took tau to 0 and kept the rounds that long.
        # Whether a round waited on the link, and what its transfers took, are questions about
        # the link as measured: the share is headroom for DeCo's choices, not a slower link.
        x = dataclasses.replace(deco_input(view, bandwidth, latency, t_comp, self.policy, slowest_down(self.estimates)),
                                link_share=1.0)
        measured = (t1 - t0) / (r1 - r0)
        total, weights = 0.0, 0.0
        for decision, rounds in self._decisions_over(r0, r1):
            delta = decision.delta
            if delta >= DENSE_FROM_DELTA:  # dense rounds send every value and no index
                delta = min(delta, DENSE_BITS_PER_ELEMENT / view.bits_per_element)
            sample = overhead_sample(measured, x, decision.tau, delta)
            weight = rounds / (r1 - r0)
            if sample is None:
                if weight > 0.2:
                    return  # the window waited on the link
                continue
            total += weight * sample
            weights += weight
        if weights > 0:
            self._overhead_samples.append(total / weights)

    def _decisions_over(self, r0: int, r1: int) -> list[tuple[Decision, int]]:
        """The decisions in force over rounds [r0, r1), with how many of those rounds each held."""
        covered = []
        starts = sorted({r0, *(d.from_round for d in self._history if r0 < d.from_round < r1)})
        for begin, end in zip(starts, [*starts[1:], r1]):
            decision = decision_for_round(self._history, begin)
            if decision is not None and end > begin:
                covered.append((decision, end - begin))
        return covered

    def overhead_s(self) -> float:
        """The per-round overhead o DeCo adds to T_comp: what the workers measured themselves
        when every worker reports it; else a quantile of the observations inferred from round times.

        An overestimated bandwidth only ever adds to an observation, so a low-to-middle
        quantile (default the median) is taken; in the paper's form a cap (a multiple of the
        slowest T_comp, `PolicyConfig.overhead_cap`) bounds what its missing download term
        can feed back into the decision.
        """
        if self.policy.overhead_cap() <= 0 or not self.estimates:
            return 0.0
        _, _, t_comp = slowest_link(self.estimates)
        if t_comp is None:
            return 0.0
        measured = [e.overhead_s for e in self.estimates.values()]
        if all(o is not None for o in measured):
            # Workers that measure their own overhead (LinkSample.overhead_s): the slowest's, as
            # T_comp is; the round times cannot tell it from a link that binds. The cap holds.
            return min(max(measured), self.policy.overhead_cap() * t_comp)  # type: ignore[type-var]
        inferred = self._inferred_overhead_s()
        return 0.0 if inferred is None else min(inferred, self.policy.overhead_cap() * t_comp)

    def _inferred_overhead_s(self) -> float | None:
        """The quantile of the overheads inferred from round times (None: too few yet)."""
        if len(self._overhead_samples) < max(1, self.policy.overhead_min_samples):
            return None
        return float(np.quantile(np.fromiter(self._overhead_samples, dtype=np.float64), self.policy.overhead_quantile))

    def round_floor_s(self) -> float | None:
        """The shortest round the cluster runs when the links do not bind: the slowest T_comp
        plus the overhead inferred from round times (None: not inferred yet, or no overhead term).

        The workers' own overhead leaves out what they wait for that is not the link: cores
        shared with the other processes, the server waiting for the slowest worker's push. On
        `make run` (four workers and a server on two cores) rounds ran at about twice
        T_comp + o, and DeCo, hiding the latency behind rounds half as long as they were,
        took tau_max where far fewer rounds in flight covered it (docs/benchmarks.md). DeCo
        hides latency behind rounds this long (deco.DecoInput.round_floor_s); it does not
        let a link fill them (the throughput term keeps T_step).
        """
        inferred = self._inferred_overhead_s()
        if self.policy.overhead_cap() <= 0 or inferred is None or not self.estimates:
            return None
        _, _, t_comp = slowest_link(self.estimates)
        return None if t_comp is None else t_comp + min(inferred, self.policy.overhead_cap() * t_comp)

    def grad_norm_change(self) -> float | None:
        """|mean norm of the last complete interval / the one before - 1| (None until two exist)."""
        current = self.reported_round // max(1, self.policy.every_rounds)
        for old in [b for b in self._norms if b < current - 2]:
            del self._norms[old]  # keep memory bounded
        complete = sorted(b for b in self._norms if b < current)  # after the pruning: no deleted bucket
        if len(complete) < 2:
            return None
        (s0, n0), (s1, n1) = self._norms[complete[-2]], self._norms[complete[-1]]
        before, after = s0 / n0, s1 / n1
        return abs(after - before) / before if before > 0 else None

    def traffic_factor(self) -> float:
        """Bytes a worker downloads per byte it pushes (median over workers), in [1, workers]."""
        ratios = []
        for events in self._traffic.values():
            pushed = sum(n for _, kind, n in events if kind == KIND_PUSH)
            downloaded = sum(n for _, kind, n in events if kind == KIND_DOWNLOAD)
            if pushed > 0 and downloaded > 0:
                ratios.append(downloaded / pushed)
        if not ratios:
            return 1.0
        ratios.sort()
        return min(max(1.0, ratios[len(ratios) // 2]), max(1, len(self._traffic)))

    def maybe_decide(self, now_s: float) -> Decision | None:
        adaptive = self.policy.name.startswith("deco") or self.policy.name == "accordion"
        if not adaptive and self._proposal is not None:
            return None  # dsgd and static decide once
        if adaptive and self._decided_at_round is not None:
            if self.policy.every_rounds == 0:
                return None  # E = infinity: the first measured decision stands
            due = self.reported_round - self._decided_at_round >= self.policy.every_rounds
            moved = self._moved_since_decision
            # A move does not replace a decision that has not taken effect yet: noisy
            # estimates (a starved CPU, pings queued behind deltas) would otherwise publish
            # a decision per report, each superseding the last before any worker used it.
            pending = self.book.latest is not None and self.book.latest.from_round > self.reported_round
            if not (due or (moved and not pending)):
                return None
        # An adaptive switch must be scheduled ahead in time, which needs the training speed.
        speed_known = self.measured_iteration_s() is not None
        proposal = propose(self.policy, self.view()) if (speed_known or not adaptive) else None
        if proposal is None:
            if self.book.latest is not None:
                return None
            # Adaptive policies measure the links from training traffic, so training starts
            # with the configured (tau, delta) and switches once estimates exist.
            proposal = Proposal(self.policy.tau, self.policy.delta,
                                f"bootstrap: tau {self.policy.tau}, delta {self.policy.delta:g} until links are measured")
        else:
            self._decided_at_round = self.reported_round
            self._estimates_at_decision = dict(self.estimates)
            self._moved_since_decision = False
        if not differs_enough(self._proposal, proposal, self.policy):
            return None
        self.book.prune(self.reported_round)
        if self._would_add_pending() and self.book.pending(self.reported_round) >= MAX_PENDING_DECISIONS:
            return None  # the book is full of switches ahead: decide again once rounds reach them
        self._proposal = proposal
        decision = self.book.add(self._next_from_round(), proposal.tau, proposal.delta, self.policy.name,
                                 proposal.reason, proposal.worker_delta, proposal.predicted_iter_s or 0.0,
                                 proposal.worker_downlink_delta)
        self.book.prune(self.reported_round)
        self._history.append(decision)
        return decision

    def _next_from_round(self) -> int:
        """Where the next decision holds from. Round 0 only for the first decision of a cluster
        nobody has trained yet. A restarted controller hears reports of round R > 0 first; its
        first decision then holds from a round every worker reaches after hearing of it, like
        any switch (workers keep their last decision until then). Never before a decision
        already scheduled: the newest decision must hold from there on (at the same round it
        replaces the older one), not be overtaken by an older one scheduled later."""
        latest = self.book.latest
        if latest is None and self.reported_round == 0:
            return 0
        scheduled = latest.from_round if latest is not None and latest.from_round > self.reported_round else 0
        return max(self.switch_round(), scheduled)

    def _would_add_pending(self) -> bool:
        """Whether the next decision adds one to those ahead (rather than replacing the newest)."""
        latest = self.book.latest
        return latest is None or self._next_from_round() != latest.from_round

    def switch_round(self) -> int:
        """A round every worker reaches only after it has heard of a decision made now.

        Reports arrive about once a second, so the newest reported round can lag the
        fastest worker; the margin covers `switch_margin_s` of training at the speed of the
        last few seconds (after a link drop, the last 10 s would count rounds at the old,
        faster speed, and the switch would come many seconds late), and at least
        `switch_margin_rounds` rounds.
        """
        iteration = self.measured_iteration_s(RECENT_SPEED_S) or self.measured_iteration_s()
        if iteration is None:
            # Speed unknown (fewer than two reports): rounds may already be running unseen.
            return self.reported_round + self.policy.switch_margin_rounds_cold
        margin = max(self.policy.switch_margin_rounds, math.ceil(self.policy.switch_margin_s / max(iteration, 1e-6)))
        return self.reported_round + margin

    # ------------------------------------------------------------------ reads

    def measured_iteration_s(self, window_s: float = 10.0) -> float | None:
        """Seconds per round over the reports of the last `window_s` (None until two differ)."""
        window = self._measurement_window(window_s)
        if window is None:
            return None
        (t0, r0), (t1, r1) = window
        return (t1 - t0) / (r1 - r0)

    def _measurement_window(self, window_s: float = 10.0) -> tuple[tuple[float, int], tuple[float, int]] | None:
        """(time, round) at the start and the end of the last `window_s` of reports."""
        if len(self._progress) < 2:
            return None
        t1, r1 = self._progress[-1]
        t0, r0 = next(((t, r) for t, r in self._progress if t >= t1 - window_s and r < r1), self._progress[-2])
        return ((t0, r0), (t1, r1)) if r1 > r0 else None

    def current(self) -> Decision | None:
        relevant = self.book.relevant(self.reported_round)
        return relevant[0] if relevant else None


def with_policy(policy: PolicyConfig, name: str, tau: int | None = None, delta: float | None = None) -> PolicyConfig:
    """A copy of `policy` switched to `name` (and, for static, its tau and delta)."""
    changes: dict = {"name": name}
    if tau is not None:
        changes["tau"] = tau
    if delta is not None:
        changes["delta"] = delta
    return dataclasses.replace(policy, **changes)
