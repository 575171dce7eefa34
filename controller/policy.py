"""When to decide and what: the controller's policies over link estimates. Pure.

Policies:
- `dsgd`: tau 0, delta 1, decided once.
- `static`: a fixed (tau, delta), decided once (the CocktailSGD-style baseline).
- `deco`: DeCo (controller/deco.py) on the slowest link (lowest bandwidth, highest latency
  and compute time over the workers), one (tau, delta) for all, as the paper does.
- `deco-hetero` (beyond the paper): a shared tau, each worker its own delta_i = delta*(tau)
  of its own uplink, and a follower whose downlink cannot carry the union of the
  selections in the round time the decision targets its own downlink fraction (a
  compressed downlink with a residual on the server, server/downlink.py); see
  `hetero_proposal`.
- `accordion` (a baseline, Accordion-style): tau 0; every E rounds, compare the mean
  gradient norm of the last interval with the one before; a relative change of at least
  `accordion_eta` marks a critical regime and gets the light compression
  (`accordion_deltas[1]`), otherwise the heavy one (`accordion_deltas[0]`).

DeCo decides in the configured time model (`time_model`, controller/deco.py): `ps` (the
default) prices a round's upload on the slowest uplink and its download (the union,
`traffic_factor` times a push) on the slowest downlink, in series; `paper` is Theorem 3 as
published, one transfer per round (the larger of the two). It minimises the configured
`objective`: `phi` (Algorithm 1) or `time` (rounds x seconds per round with the task's
rounds model, `staleness_weight` and `compression_knee`).

Adaptive policies recompute every `every_rounds` rounds (the paper's E) and as soon as an
estimate moves by more than `change_threshold` (relative) since the last decision. With
E = 0 (infinite) they decide once, on the first estimates: the CocktailSGD-style static
baseline whose (tau, delta) comes from DeCo at the start. A new
decision is published only if it differs enough (tau changes, or delta by more than
`delta_hysteresis` relative), so estimation noise does not make tau flap. Each decision
holds from a round far enough ahead (`switch_margin_rounds`, and `switch_margin_s` of
training at the speed of the last few seconds) that every worker has it before it gets there.
DeCo keeps each link at most `link_share` busy (default a quarter: headroom, so a queue
can drain, and error feedback makes a smaller delta cheap; one round's transfers are
timed at the whole link, `DecoInput.link_share`), hides latency behind
rounds as measured (`ControllerCore.round_floor_s`), and in the ps form prices staleness
(`staleness_weight`): controller/deco.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from wanps.controller.deco import (DEFAULT_BITS_PER_ELEMENT, DEFAULT_OBJECTIVE, DEFAULT_TIME_MODEL, OBJECTIVES,
                                   TIME_MODELS, DecoDecision, DecoInput, deco, delta_at)
from wanps.controller.estimator import LinkEstimate
from wanps.proto.wire import MAX_TAU

POLICIES = ("dsgd", "static", "deco", "deco-hetero", "accordion")


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "static"
    tau: int = 2  # static
    delta: float = 0.01  # static
    tau_max: int = 8
    # Wire bits per sent element; None: measured from the workers' pushes (ControllerCore).
    bits_per_element: float | None = None
    every_rounds: int = 20  # E; 0 = infinite: decide once, on the first estimates, then never again
    change_threshold: float = 0.2
    delta_hysteresis: float = 0.2
    # A decision holds from at least this many rounds, and this much training time, ahead.
    switch_margin_rounds: int = 10
    switch_margin_s: float = 3.0
    # ... and this many rounds ahead while the training speed is not known yet.
    switch_margin_rounds_cold: int = 100
    # accordion: (heavy, light) compression deltas and the critical-regime threshold.
    accordion_deltas: tuple[float, float] = (0.01, 0.1)
    accordion_eta: float = 0.5
    # The per-round overhead o added to T_comp (controller/engine.py estimates it): this
    # quantile of the observations, capped at this many T_comps (0: no overhead term, the
    # paper's model; None: the time model's default, `overhead_cap`).
    overhead_quantile: float = 0.5
    overhead_max_ratio: float | None = None
    # ... once this many observations exist (the first seconds, with workers still starting, mislead).
    overhead_min_samples: int = 5
    # DeCo's round time: "ps" (upload and download in series) or "paper" (Theorem 3 as published).
    time_model: str = DEFAULT_TIME_MODEL
    # The share of each estimated bandwidth DeCo plans a round's transfers on. DeCo's choice
    # fills the link exactly (a round's transfer = its step), so anything it did not price
    # (a slower moment, a retransmission) queues, the queue reads as latency, and a larger
    # latency makes DeCo send more per round: the queue stands. Headroom lets it drain and
    # keeps rounds at the step Theorem 3 predicts; and with error feedback a smaller delta
    # costs few rounds (phi prices it at many). A quarter sits in the broad bottom of the
    # CNN's time to target against delta (docs/controller.md, "Headroom").
    link_share: float = 0.25
    # DeCo minimises phi * (1 + staleness_weight * tau) in the ps form (controller/deco.py); 0
    # or the paper's form: the paper's phi, which prices tau at ~nothing at small delta, where
    # each round of staleness measured cost rounds (docs/controller.md).
    staleness_weight: float = 1.0
    # What DeCo minimises: "phi" (Algorithm 1) or "time" (rounds x seconds per round, with the
    # rounds model (1 + staleness_weight tau)(1 + compression_knee / (delta d)); controller/deco.py).
    objective: str = DEFAULT_OBJECTIVE
    compression_knee: float = 0.0  # k0, elements per push ("time" only)

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.name!r}")
        if not 0 <= self.tau <= MAX_TAU or not 0.0 < self.delta <= 1.0:
            raise ValueError(f"need tau in [0, {MAX_TAU}] and delta in (0, 1]; got tau {self.tau}, delta {self.delta}")
        if self.every_rounds < 0 or self.switch_margin_rounds < 1 or not 0 <= self.tau_max <= MAX_TAU:
            raise ValueError(f"every_rounds must be >= 0, switch_margin_rounds >= 1, tau_max in [0, {MAX_TAU}]")
        if self.bits_per_element is not None and not (0.0 < self.bits_per_element < math.inf):
            raise ValueError(f"bits_per_element must be > 0 and finite; got {self.bits_per_element}")
        if not 0.0 <= self.overhead_quantile <= 1.0 or not (self.overhead_max_ratio is None
                                                             or self.overhead_max_ratio >= 0.0):
            raise ValueError("overhead_quantile must be in [0, 1] and overhead_max_ratio >= 0")
        if not 0.0 <= self.staleness_weight < math.inf:
            raise ValueError(f"staleness_weight must be >= 0 and finite; got {self.staleness_weight}")
        if not 0.0 < self.link_share <= 1.0:
            raise ValueError(f"link_share must be in (0, 1]; got {self.link_share}")
        if self.time_model not in TIME_MODELS:
            raise ValueError(f"time_model must be one of {', '.join(TIME_MODELS)}; got {self.time_model!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not 0.0 <= self.compression_knee < math.inf:
            raise ValueError(f"compression_knee must be >= 0 and finite; got {self.compression_knee}")

    def overhead_cap(self) -> float:
        """The cap on the measured overhead, in T_comps (0: no overhead term).

        Unset, the paper's form keeps the cap of one T_comp it was tuned with (its model
        leaves the download out, and what it leaves out lands in the observations); the PS
        form models both directions and takes the overhead as measured (an observation is
        at most the measured round time minus T_comp).
        """
        if self.overhead_max_ratio is not None:
            return self.overhead_max_ratio
        return 1.0 if self.time_model == "paper" else math.inf


@dataclass(frozen=True)
class Proposal:
    """What a policy wants from `from_round` on."""

    tau: int
    delta: float
    reason: str
    worker_delta: dict[int, float] = field(default_factory=dict)
    predicted_iter_s: float | None = None
    # deco-hetero: the followers given their own downlink fraction (absent: uncompressed).
    worker_downlink_delta: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterView:
    """What the controller knows when it decides."""

    round: int
    num_params: int | None
    estimates: dict[int, LinkEstimate]  # per worker with enough samples
    traffic_factor: float = 1.0  # bytes a worker downloads per round / bytes it pushes
    # accordion: relative change of the mean gradient norm between the last two intervals.
    grad_norm_change: float | None = None
    # Measured fixed cost per round beyond T_comp (seconds), added to the step by DeCo.
    overhead_s: float = 0.0
    # Wire bits per sent element (measured or configured; ControllerCore.bits_per_element).
    bits_per_element: float = DEFAULT_BITS_PER_ELEMENT
    # The shortest round measured when the links do not bind (ControllerCore.round_floor_s).
    round_floor_s: float | None = None


def slowest_link(estimates: dict[int, LinkEstimate]) -> tuple[float, float, float | None]:
    bandwidth = min(e.bandwidth_bps for e in estimates.values())
    latency = max(e.latency_s for e in estimates.values())
    comps = [e.t_comp_s for e in estimates.values() if e.t_comp_s is not None]
    return bandwidth, latency, (max(comps) if comps else None)


def slowest_down(estimates: dict[int, LinkEstimate]) -> float:
    """The lowest downlink bandwidth over the workers; a worker with no downlink estimate yet
    counts with its uplink's (the link is taken as symmetric until measured)."""
    return min(e.down_bandwidth_bps if e.down_bandwidth_bps is not None else e.bandwidth_bps
               for e in estimates.values())


def deco_input(view: ClusterView, bandwidth: float, latency: float, t_comp: float, config: PolicyConfig,
               down_bandwidth: float | None = None) -> DecoInput:
    assert view.num_params is not None
    # The aggregated delta a worker downloads is up to n times its own push (traffic_factor):
    # the PS form sends it down the downlink after the push; the paper's form takes the
    # larger of the two transfers as the round's one.
    return DecoInput(num_params=view.num_params, bandwidth_bps=bandwidth, latency_s=latency,
                     t_comp_s=max(t_comp, 1e-6), bits_per_element=view.bits_per_element,
                     tau_max=config.tau_max, overhead_s=view.overhead_s, link_share=config.link_share,
                     down_bandwidth_bps=down_bandwidth,
                     download_factor=max(view.traffic_factor, 1e-6), time_model=config.time_model,
                     round_floor_s=view.round_floor_s, staleness_weight=config.staleness_weight,
                     objective=config.objective, compression_knee=config.compression_knee)


def propose(config: PolicyConfig, view: ClusterView) -> Proposal | None:
    """The policy's (tau, delta) for this view, or None when it cannot tell yet."""
    if config.name == "dsgd":
        return Proposal(0, 1.0, "D-SGD: synchronous and uncompressed")
    if config.name == "static":
        return Proposal(config.tau, config.delta, f"static: tau {config.tau}, delta {config.delta:g}")
    if config.name == "accordion":
        if view.grad_norm_change is None:
            return None
        heavy, light = config.accordion_deltas
        critical = view.grad_norm_change >= config.accordion_eta
        return Proposal(0, light if critical else heavy,
                        f"accordion: gradient norm changed {view.grad_norm_change:.0%} "
                        f"({'critical' if critical else 'not critical'})")
    if view.num_params is None or not view.estimates:
        return None
    bandwidth, latency, t_comp = slowest_link(view.estimates)
    if t_comp is None:
        return None
    if config.name == "deco-hetero":
        return hetero_proposal(config, view, bandwidth, latency, t_comp)
    down = slowest_down(view.estimates)
    x = deco_input(view, bandwidth, latency, t_comp, config, down)
    decision: DecoDecision = deco(x)
    return Proposal(decision.tau, decision.delta, deco_reason(decision, x, view),
                    predicted_iter_s=decision.predicted_iter_s)


def deco_reason(decision: DecoDecision, x: DecoInput, view: ClusterView) -> str:
    """The decision and what it was made on: the estimates, and the share of each link it keeps busy."""
    floor = f" (rounds >= {x.round_s * 1e3:.1f} ms measured)" if x.round_s > x.step_s else ""
    return (f"{decision.reason} ({x.time_model} form): a {x.bandwidth_bps / 1e6:.1f} up / "
            f"{x.downlink_bps / 1e6:.1f} down Mbit/s (kept {x.link_share:.0%} busy at most), b {x.latency_s * 1e3:.0f} ms, "
            f"T_comp {x.t_comp_s * 1e3:.1f} ms + overhead "
            f"{view.overhead_s * 1e3:.1f} ms{floor}, traffic x{view.traffic_factor:.1f}, "
            f"{view.bits_per_element:.1f} bits/element")


def down_of(estimate: LinkEstimate) -> float:
    """A worker's downlink bandwidth: its own estimate, else its uplink's (symmetric until measured)."""
    return estimate.down_bandwidth_bps if estimate.down_bandwidth_bps is not None else estimate.bandwidth_bps


# A follower whose downlink is below this share of the workers' median downlink is one a
# compressed downlink is for (an egress-limited site among faster ones).
SLOW_DOWNLINK_SHARE = 0.5


def slow_downlinks(estimates: dict[int, LinkEstimate]) -> set[int]:
    """The followers whose downlink is well below the others' (under SLOW_DOWNLINK_SHARE of
    the median): the asymmetric ones a compressed downlink is for. Measured against the
    downlinks, not the uplinks: a congested downlink holds back the acknowledgements and
    window updates of its own worker's uplink, whose estimate then collapses too (0.1-0.6
    Mbit/s on a 20 Mbit/s uplink in `cnn-slow-down`), and a rule "slower than every uplink"
    then found no slow downlink at all. Without downlink estimates (each taken as its
    uplink) on alike uplinks, none."""
    downs = sorted(down_of(e) for e in estimates.values())
    median = downs[len(downs) // 2]
    return {w for w, e in estimates.items() if down_of(e) < SLOW_DOWNLINK_SHARE * median}


def pricing_downlink(config: PolicyConfig, estimates: dict[int, LinkEstimate]) -> float:
    """The downlink DeCo prices a round's download on under this policy: the slowest one,
    except for deco-hetero, where followers on slow downlinks may get their own downlink
    fraction and the slowest of the others binds (`hetero_proposal`)."""
    if config.name == "deco-hetero":
        slow = slow_downlinks(estimates)
        if len(slow) < len(estimates):
            return min(down_of(e) for w, e in estimates.items() if w not in slow)
    return slowest_down(estimates)


def hetero_proposal(config: PolicyConfig, view: ClusterView, bandwidth: float, latency: float, t_comp: float
                    ) -> Proposal:
    """deco-hetero: a shared tau, per-worker uplink deltas, per-follower downlink fractions.

    Every uncompressed follower downloads the union of all selections each round, so under
    bit-identical replicas the slowest downlink caps what everybody may send, and a single
    slow downlink (an egress-limited site, a consumer line) drags every delta down. Instead:
    1. DeCo (tau, delta, and the round time T it targets) on the slowest uplink (`bandwidth`,
       with the largest `latency` and `t_comp`) and on the
       slowest downlink among the followers whose downlink is not well below the others'
       (`slow_downlinks`, `pricing_downlink`): the slow ones are left out of the bind;
    2. a follower whose downlink cannot carry the union (traffic_factor * delta * S_g, as
       DeCo prices the download) within T gets its own downlink fraction: what its downlink
       carries in T, T * a_down / S_g (S_g the wire bits of a dense round; a compressed
       follower receives its own top-k, no union). The rest stays on the server as its
       downlink residual and reaches it in later rounds;
    3. each worker's uplink delta is what the objective pairs with tau on its own uplink
       (`deco.delta_at`: delta*(tau) for phi), shrunk so that the sum
       stays within n * delta: the union then fits what step 1 priced, which only the
       uncompressed followers have to carry.
    """
    assert view.num_params is not None
    down = pricing_downlink(config, view.estimates)
    x = deco_input(view, bandwidth, latency, t_comp, config, down)
    decision = deco(x)
    round_s = decision.predicted_iter_s
    union_bits = x.download_factor * decision.delta * x.gradient_bits
    floor = 1.0 / view.num_params
    worker_downlink_delta = {}
    for worker_id in sorted(slow_downlinks(view.estimates)):
        worker_down = down_of(view.estimates[worker_id]) * config.link_share  # headroom, as DeCo's
        if union_bits / worker_down > round_s:
            worker_downlink_delta[worker_id] = min(1.0, max(floor, round_s * worker_down / x.gradient_bits))
    own_deltas = {}
    for worker_id, estimate in view.estimates.items():
        # A compressed follower no longer downloads the union: its uplink alone sets its delta.
        own_down = down if worker_id in worker_downlink_delta else estimate.down_bandwidth_bps
        own = deco_input(view, estimate.bandwidth_bps, estimate.latency_s, estimate.t_comp_s or t_comp, config,
                         own_down)
        own_deltas[worker_id] = delta_at(own, decision.tau)
    budget = decision.delta * len(own_deltas)
    total = sum(own_deltas.values())
    shrink = min(1.0, budget / total) if total > 0 else 1.0
    worker_delta = {w: min(1.0, max(floor, d * shrink)) for w, d in own_deltas.items()}
    compressed = ", ".join(f"worker {w} {f:.4g} ({down_of(view.estimates[w]) / 1e6:.1f} Mbit/s down)"
                           for w, f in worker_downlink_delta.items())
    reason = f"hetero {deco_reason(decision, x, view)}; downlink fractions: {compressed or 'none'}"
    return Proposal(decision.tau, decision.delta, reason, worker_delta=worker_delta,
                    predicted_iter_s=decision.predicted_iter_s, worker_downlink_delta=worker_downlink_delta)


def differs_enough(old: Proposal | None, new: Proposal, config: PolicyConfig) -> bool:
    if old is None:
        return True
    if old.tau != new.tau:
        return True
    if abs(math.log(new.delta / old.delta)) > math.log1p(config.delta_hysteresis):
        return True
    for new_deltas, old_deltas in ((new.worker_delta, old.worker_delta),
                                   (new.worker_downlink_delta, old.worker_downlink_delta)):
        if new_deltas is new.worker_downlink_delta and set(new_deltas) != set(old_deltas):
            return True  # a follower's downlink turns compressed or uncompressed
        for worker_id, delta in new_deltas.items():
            before = old_deltas.get(worker_id)
            if before is None or abs(math.log(delta / before)) > math.log1p(config.delta_hysteresis):
                return True
    return False


def estimates_moved(old: dict[int, LinkEstimate], new: dict[int, LinkEstimate], threshold: float) -> bool:
    """True if a worker appeared, or its bandwidth (either direction), latency or T_comp moved by > threshold."""
    for worker_id, estimate in new.items():
        before = old.get(worker_id)
        if before is None:
            return True
        # (old, new, absolute tolerance): near-zero latencies and compute times are jittery.
        pairs = [(before.bandwidth_bps, estimate.bandwidth_bps, 0.0), (before.latency_s, estimate.latency_s, 0.005)]
        if before.down_bandwidth_bps and estimate.down_bandwidth_bps:
            pairs.append((before.down_bandwidth_bps, estimate.down_bandwidth_bps, 0.0))
        if before.t_comp_s and estimate.t_comp_s:
            pairs.append((before.t_comp_s, estimate.t_comp_s, 0.001))
        for a, b, tolerance in pairs:
            if abs(a - b) > max(threshold * max(a, b), tolerance):
                return True
    return False
