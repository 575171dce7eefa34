"""When to decide and what: the controller's policies over link estimates. Pure.

Policies:
- `dsgd`: tau 0, delta 1, decided once.
- `static`: a fixed (tau, delta), decided once (the CocktailSGD-style baseline).
- `deco`: DeCo (controller/deco.py) on the slowest link (lowest bandwidth, highest latency
  and compute time over the workers), one (tau, delta) for all, as the paper does.
- `deco-hetero` (beyond the paper): tau from `deco`, then each worker its own delta_i =
  delta*(tau) of its own uplink, scaled so that sum(delta_i) <= n * delta(deco): every
  worker downloads the union of all selections, so the slowest link's download budget
  still binds; within it, slow uplinks send less and fast ones more.
- `accordion` (a baseline, Accordion-style): tau 0; every E rounds, compare the mean
  gradient norm of the last interval with the one before; a relative change of at least
  `accordion_eta` marks a critical regime and gets the light compression
  (`accordion_deltas[1]`), otherwise the heavy one (`accordion_deltas[0]`).

DeCo decides in the configured time model (`time_model`, controller/deco.py): `ps` (the
default) prices a round's upload on the slowest uplink and its download (the union,
`traffic_factor` times a push) on the slowest downlink, in series; `paper` is Theorem 3 as
published, one transfer per round (the larger of the two).

Adaptive policies recompute every `every_rounds` rounds (the paper's E) and as soon as an
estimate moves by more than `change_threshold` (relative) since the last decision. With
E = 0 (infinite) they decide once, on the first estimates: the CocktailSGD-style static
baseline whose (tau, delta) comes from DeCo at the start. A new
decision is published only if it differs enough (tau changes, or delta by more than
`delta_hysteresis` relative), so estimation noise does not make tau flap. Each decision
holds from a round far enough ahead (`switch_margin_rounds`, and `switch_margin_s` of
training at the speed of the last few seconds) that every worker has it before it gets there.
DeCo plans on `link_share` of each estimated bandwidth (headroom, so a queue can drain).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from wanps.controller.deco import (DEFAULT_BITS_PER_ELEMENT, DEFAULT_TIME_MODEL, TIME_MODELS, DecoDecision, DecoInput,
                                   deco, delta_for_tau)
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
    switch_margin_s: float = 2.0
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
    # latency makes DeCo send more per round: the queue stands. Headroom lets it drain.
    link_share: float = 0.9

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
        if not 0.0 < self.link_share <= 1.0:
            raise ValueError(f"link_share must be in (0, 1]; got {self.link_share}")
        if self.time_model not in TIME_MODELS:
            raise ValueError(f"time_model must be one of {', '.join(TIME_MODELS)}; got {self.time_model!r}")

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
    share = config.link_share
    return DecoInput(num_params=view.num_params, bandwidth_bps=bandwidth * share, latency_s=latency,
                     t_comp_s=max(t_comp, 1e-6), bits_per_element=view.bits_per_element,
                     tau_max=config.tau_max, overhead_s=view.overhead_s,
                     down_bandwidth_bps=None if down_bandwidth is None else down_bandwidth * share,
                     download_factor=max(view.traffic_factor, 1e-6), time_model=config.time_model)


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
    down = slowest_down(view.estimates)
    decision: DecoDecision = deco(deco_input(view, bandwidth, latency, t_comp, config, down))
    reason = (f"{decision.reason} ({config.time_model} form): a {bandwidth / 1e6:.1f} up / {down / 1e6:.1f} down "
              f"Mbit/s, b {latency * 1e3:.0f} ms, "
              f"T_comp {t_comp * 1e3:.1f} ms + overhead {view.overhead_s * 1e3:.1f} ms, traffic x{view.traffic_factor:.1f}, "
              f"{view.bits_per_element:.1f} bits/element")
    if config.name == "deco":
        return Proposal(decision.tau, decision.delta, reason, predicted_iter_s=decision.predicted_iter_s)
    # deco-hetero: shared tau, each worker the delta its own uplink carries at that tau, then
    # scaled so the total stays within what deco sends: every worker downloads the union of
    # all selections, so the slowest link's download budget (n * deco's delta) binds everyone.
    own_deltas = {}
    for worker_id, estimate in view.estimates.items():
        own = deco_input(view, estimate.bandwidth_bps, estimate.latency_s, estimate.t_comp_s or t_comp, config,
                         estimate.down_bandwidth_bps)
        own_deltas[worker_id] = max(own.min_delta, delta_for_tau(own, decision.tau))
    budget = decision.delta * len(own_deltas)
    total = sum(own_deltas.values())
    shrink = min(1.0, budget / total) if total > 0 else 1.0
    floor = 1.0 / view.num_params
    worker_delta = {w: min(1.0, max(floor, d * shrink)) for w, d in own_deltas.items()}
    return Proposal(decision.tau, decision.delta, "hetero " + reason, worker_delta=worker_delta,
                    predicted_iter_s=decision.predicted_iter_s)


def differs_enough(old: Proposal | None, new: Proposal, config: PolicyConfig) -> bool:
    if old is None:
        return True
    if old.tau != new.tau:
        return True
    if abs(math.log(new.delta / old.delta)) > math.log1p(config.delta_hysteresis):
        return True
    for worker_id, delta in new.worker_delta.items():
        before = old.worker_delta.get(worker_id)
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
