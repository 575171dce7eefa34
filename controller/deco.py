"""DeCo (Algorithm 1 of the DeCo-SGD paper) and Theorem 3's iteration time, in two time models. Pure functions.

Notation (the paper's): a = bandwidth (bit/s), b = end-to-end latency (s), S_g = gradient
size (bit), T_comp = compute time per step (s), tau = staleness, delta = compression ratio.

The paper's form (`time_model="paper"`), one transfer tr = delta*S_g/a per round:

    T_avg(tau, delta) ~= max{ (T_comp + b + tr) / (tau + 1), tr, T_comp }                     (Theorem 3)
    delta*(tau)        = min{ (tau*T_comp - b) * a/S_g, T_comp * a/S_g, 1 }                   (Remark 4)
    phi(tau, delta)    = (1 - delta) / (delta * (1 - delta/2)**tau)
    DeCo: over tau in [ceil(b/T_comp), ceil((b + S_g/a)/T_comp)], minimise phi(tau, delta*(tau)),
          smallest tau on ties.

The parameter-server form (`time_model="ps"`, the default): a round's push goes up
(up = delta*S_g/a_up), the server aggregates, and the round's delta, the union of the
workers' selections (f times a push, f the measured download factor), comes down
(down = f*delta*S_g/a_down). Within a round the two are in series; across rounds they
overlap (the links are full duplex: round r's download shares nothing with round r+1's
upload), so each direction only has to carry its own share every step:

    T_avg(tau, delta) ~= max{ (T_step + b + up + down) / (tau + 1), max(up, down), T_step }
    delta*(tau)        = min{ (tau*T_step - b) / (c_up + c_down), T_step / max(c_up, c_down), 1 }
    tau in [ceil(b/T_step), ceil((b + c_up + c_down)/T_step)]

with c_up = S_g/a_up and c_down = f*S_g/a_down (seconds per unit of delta). Both forms
are one computation over (serial cost, throughput cost) per unit of delta: the paper's
has c for both (c = the larger direction's, which with f = 1 and a symmetric link is
S_g/a exactly), the PS form c_up + c_down and max(c_up, c_down). `predicted_for` is the
one prediction: the controller's decisions and `wanps bench train`'s `predicted_ps_iter_s`
both call it.

Where wanps departs from the paper (docs/controller.md says why):
- A measured per-round overhead o (applying deltas, encoding and sending the push, the
  server's aggregation: fixed work per round that Theorem 3 leaves out, and which on
  shared cores can be a large fraction of a short step) is added to the step:
  T_step = T_comp + o replaces T_comp in Theorem 3 and in Algorithm 1. The overhead is
  CPU work, so transfers overlap it as they overlap compute. o = 0 is the paper's model.
- A measured round floor m (`round_floor_s`: rounds measured longer than T_step while the
  links did not bind, from cores shared with other processes or the server waiting on the
  slowest worker) sets how many rounds in flight hide the latency: the chain
  T_step + b + delta*c_s must fit in tau + 1 rounds of m, not of T_step. The throughput
  term keeps T_step, so a link is never planned full for the whole of a longer round.
- A staleness weight w (`staleness_weight`, 0 by default here: the paper; the ps form only,
  so the paper's form is always the paper's DeCo) prices tau: DeCo minimises
  phi(tau, delta) (1 + w tau). At the deltas of wide-area links (~0.003)
  phi's (1 - delta/2)^tau is ~1, so phi prices tau at nothing and DeCo takes the largest
  tau its delta grows with; measured, each round of staleness cost rounds to the target
  (docs/controller.md).
- Two objectives (`objective`). "phi" (the default) is Algorithm 1: among the (tau,
  delta*(tau)) that hide communication, the smallest phi (1 + w tau). "time" (beyond the
  paper) minimises the time to the target itself, rounds x seconds per round, over every
  tau up to tau_max and every delta, hiding or not:

      rounds(tau, delta) ~ (1 + w tau) (1 + k0 / (delta d)),   T_avg(tau, delta) as above

  w (`staleness_weight`) and k0 (`compression_knee`, elements per push) are the task's:
  `wanps bench convergence` measures rounds against (tau, delta) without a clock and fits
  them. phi says rounds grow as 1/delta; measured with error feedback they are about flat
  above ~k0 elements per push, and a round of staleness can cost more in rounds than a
  slower round costs in time (docs/controller.md, "The objective"). Algorithm 1 never
  trades a slower round for less staleness; this does.
- S_g = d * bits_per_element: the real wire cost of one *sent* element (uint32 index +
  float32 value = 64 bits) by default, so that delta * S_g is what a round really sends;
  `bits_per_element=32` reproduces the paper's model.
- Every edge is clamped rather than left undefined: a tau whose delta*(tau) <= 0 is
  skipped; tau is capped at `tau_max`; delta is at least `min_delta` (one element, by
  default); if no tau in range is feasible, the largest allowed tau is taken with the
  delta that keeps transmission within one compute step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_BITS_PER_ELEMENT = 64  # uint32 index + float32 value, as sent on the wire
# From this delta on, workers send every value and no index: 32 bits per element.
DENSE_FROM_DELTA = 0.5
DENSE_BITS_PER_ELEMENT = 32
# "ps": upload and download of a round in series (the parameter server's round); "paper":
# Theorem 3 as published, one transfer per round (reproduces the paper's Table 3).
TIME_MODELS = ("ps", "paper")
DEFAULT_TIME_MODEL = "ps"
# "phi": Algorithm 1 (min phi among the choices that hide communication); "time": min
# rounds x T_avg over all (tau, delta) with a measured rounds model (`rounds_factor`).
OBJECTIVES = ("phi", "time")
DEFAULT_OBJECTIVE = "phi"
# The "time" objective's candidate deltas per tau: log-spaced from one element to dense
# (about 6% apart at a million parameters), plus each tau's delta*(tau).
TIME_OBJECTIVE_DELTAS = 241


@dataclass(frozen=True)
class DecoInput:
    num_params: int  # d
    bandwidth_bps: float  # a (the uplink: what a worker's push crosses), bit/s
    latency_s: float  # b, s
    t_comp_s: float  # T_comp, s
    bits_per_element: float = DEFAULT_BITS_PER_ELEMENT
    tau_max: int = 16
    overhead_s: float = 0.0  # o: measured fixed cost per round beyond T_comp, s
    down_bandwidth_bps: float | None = None  # a_down, bit/s; None: the same as the uplink
    download_factor: float = 1.0  # f: bytes a worker downloads per byte it pushes (the round's union)
    time_model: str = DEFAULT_TIME_MODEL
    # m: the seconds a round takes when the links do not bind, as measured (T_comp plus the
    # overhead seen in the round times: cores shared with other processes, the server waiting
    # for the slowest worker), when longer than T_step; None: T_step. Latency hides behind
    # rounds as they really run: with rounds of m, fewer of them in flight cover b.
    round_floor_s: float | None = None
    # w: each round of staleness costs this share more rounds to converge, beyond phi's
    # (1 - delta/2)^tau (which at delta ~ 0.003 is ~1: tau for free). 0: the paper's phi.
    # The ps form only: the paper's form stays the paper's DeCo (its Table 3 exactly).
    staleness_weight: float = 0.0
    # The share of each link a decision may keep busy round after round: the throughput
    # term's cost is divided by it (headroom, so a queue that forms can drain). One round's
    # transfers still cross the link at its measured rate: the serial chain is not.
    link_share: float = 1.0
    objective: str = DEFAULT_OBJECTIVE
    # k0: the elements per push below which compression costs rounds ("time" objective only).
    compression_knee: float = 0.0

    def __post_init__(self) -> None:
        if self.num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {self.num_params}")
        if not self.bandwidth_bps > 0 or not math.isfinite(self.bandwidth_bps):
            raise ValueError(f"bandwidth must be a positive finite number of bit/s, got {self.bandwidth_bps}")
        if self.down_bandwidth_bps is not None and (not self.down_bandwidth_bps > 0
                                                    or not math.isfinite(self.down_bandwidth_bps)):
            raise ValueError(f"down bandwidth must be a positive finite number of bit/s, got {self.down_bandwidth_bps}")
        if not self.latency_s >= 0 or not math.isfinite(self.latency_s):
            raise ValueError(f"latency must be >= 0 s, got {self.latency_s}")
        if not self.t_comp_s > 0 or not math.isfinite(self.t_comp_s):
            raise ValueError(f"t_comp must be > 0 s, got {self.t_comp_s}")
        if not self.bits_per_element > 0:
            raise ValueError(f"bits_per_element must be > 0, got {self.bits_per_element}")
        if self.tau_max < 0:
            raise ValueError(f"tau_max must be >= 0, got {self.tau_max}")
        if not self.overhead_s >= 0 or not math.isfinite(self.overhead_s):
            raise ValueError(f"overhead must be >= 0 s, got {self.overhead_s}")
        if not self.download_factor > 0 or not math.isfinite(self.download_factor):
            raise ValueError(f"download_factor must be > 0 and finite, got {self.download_factor}")
        if self.time_model not in TIME_MODELS:
            raise ValueError(f"time_model must be one of {', '.join(TIME_MODELS)}, got {self.time_model!r}")
        if not self.staleness_weight >= 0 or not math.isfinite(self.staleness_weight):
            raise ValueError(f"staleness_weight must be >= 0, got {self.staleness_weight}")
        if not 0.0 < self.link_share <= 1.0:
            raise ValueError(f"link_share must be in (0, 1], got {self.link_share}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.compression_knee >= 0 or not math.isfinite(self.compression_knee):
            raise ValueError(f"compression_knee must be >= 0 elements, got {self.compression_knee}")
        if self.round_floor_s is not None and (not self.round_floor_s > 0 or not math.isfinite(self.round_floor_s)):
            raise ValueError(f"round_floor_s must be > 0 s and finite, got {self.round_floor_s}")

    @property
    def step_s(self) -> float:
        """T_step = T_comp + o: what one round costs a worker before any waiting on the link."""
        return self.t_comp_s + self.overhead_s

    @property
    def round_s(self) -> float:
        """The shortest round: T_step, or the measured floor `round_floor_s` when longer."""
        return max(self.step_s, self.round_floor_s or 0.0)

    @property
    def gradient_bits(self) -> float:
        """S_g: the bits a dense round would send."""
        return self.num_params * self.bits_per_element

    @property
    def min_delta(self) -> float:
        """One element per round at least."""
        return min(1.0, 1.0 / self.num_params)

    @property
    def downlink_bps(self) -> float:
        return self.bandwidth_bps if self.down_bandwidth_bps is None else self.down_bandwidth_bps

    def transfer_s(self, delta: float) -> tuple[float, float]:
        """(upload, download) seconds of a round at `delta`: the push, and the union coming back."""
        push_bits = delta * self.gradient_bits
        return push_bits / self.bandwidth_bps, push_bits * self.download_factor / self.downlink_bps

    def costs_s(self) -> tuple[float, float]:
        """(serial, throughput) seconds per unit of delta.

        serial: what one round's transfers add to its chain of compute, latency and transfer;
        throughput: what the busiest link carries per round, on `link_share` of it. The paper
        counts one transfer (the larger direction) in both; the PS form both directions in
        series, and the larger one for throughput.
        """
        up, down = self.transfer_s(1.0)
        if self.time_model == "paper":
            return max(up, down), max(up, down) / self.link_share
        return up + down, max(up, down) / self.link_share


@dataclass(frozen=True)
class DecoDecision:
    tau: int
    delta: float
    phi: float  # the value the objective minimised: phi (1 + w tau), or rounds factor x T_avg (s) for "time"
    predicted_iter_s: float  # T_avg for (tau, delta) in the time model the decision was made in
    tau_range: tuple[int, int]  # [ceil(b/T_comp), ceil((b + S_g/a)/T_comp)] before capping
    feasible: bool  # False: no tau <= tau_max hides the communication; the fallback was taken
    reason: str
    time_model: str = DEFAULT_TIME_MODEL

    def as_dict(self) -> dict:
        return asdict(self)


def phi(tau: int, delta: float) -> float:
    """The convergence penalty of (tau, delta); 0 for delta = 1 (no compression)."""
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    return (1.0 - delta) / (delta * (1.0 - delta / 2.0) ** tau)


def predicted_iteration_time(t_comp_s: float, latency_s: float, transfer_s: float, tau: int) -> float:
    """Theorem 3: T_avg = max{(T_comp + b + delta*S_g/a)/(tau+1), delta*S_g/a, T_comp}."""
    return max((t_comp_s + latency_s + transfer_s) / (tau + 1), transfer_s, t_comp_s)


def sent_delta(delta: float, bits_per_element: float) -> float:
    """The delta that prices what a round at `delta` really sends: from DENSE_FROM_DELTA on,
    workers send every value and no index (DENSE_BITS_PER_ELEMENT per element)."""
    if delta >= DENSE_FROM_DELTA:
        return min(1.0, DENSE_BITS_PER_ELEMENT / bits_per_element)
    return delta


def predicted_for(x: DecoInput, tau: int, delta: float) -> float:
    """T_avg for any (tau, delta) on these inputs in x's time model, with T_step = T_comp + o.

    delta * S_g is what a sparse round sends; from delta 0.5 on workers send dense (fewer
    bits): callers that know the wire cost pass `sent_delta(delta, bits)`, else this is an
    upper bound.
    """
    if not 0.0 < delta <= 1.0 or tau < 0:
        raise ValueError(f"need tau >= 0 and delta in (0, 1]; got tau {tau}, delta {delta}")
    return float(round_seconds(x, tau, delta))


def round_seconds(x: DecoInput, tau: int, sent: float | np.ndarray) -> float | np.ndarray:
    """Theorem 3's T_avg at `sent` (one delta or an array of them; unchecked: `predicted_for`
    is the checked form): max{(T_step + b + delta c_s)/(tau + 1), delta c_t, m}."""
    serial, throughput = x.costs_s()
    return np.maximum(np.maximum((x.step_s + x.latency_s + sent * serial) / (tau + 1), sent * throughput), x.round_s)


def overhead_sample(measured_s: float, x: DecoInput, tau: int, delta: float, slack: float = 0.05) -> float | None:
    """One observation of the per-round overhead o from a measured seconds-per-round m.

    The overhead is CPU work in series with compute, so the time model with it is
    m = max{T_comp + o, (T_comp + o + b + delta c_s)/(tau + 1), delta c_t} (c_s, c_t the
    serial and throughput costs, `DecoInput.costs_s`). Unless the throughput term binds,
    o = min{m - T_comp, (tau + 1) m - T_comp - b - delta c_s} inverts it exactly (whichever
    of the first two terms is the larger gives the smaller o). When the throughput term
    exceeds the others with the overhead already known (`x.overhead_s`, plus `slack`), the
    round waits on the link and o cannot be seen: None.
    """
    serial_cost, throughput_cost = x.costs_s()
    serial = max(x.step_s, (x.step_s + x.latency_s + delta * serial_cost) / (tau + 1))
    if delta * throughput_cost > serial * (1.0 + slack):
        return None
    t_comp = x.t_comp_s
    return max(0.0, min(measured_s - t_comp, (tau + 1) * measured_s - t_comp - x.latency_s - delta * serial_cost))


def objective(x: DecoInput, tau: int, delta: float) -> float:
    """What Algorithm 1 minimises: phi, times (1 + w tau) in the ps form (`staleness_weight`)."""
    weight = x.staleness_weight if x.time_model == "ps" else 0.0
    return phi(tau, delta) * (1.0 + weight * tau)


def delta_for_tau(x: DecoInput, tau: int) -> float:
    """Remark 4's delta*(tau) with T_step for T_comp, unclamped (<= 0 when the chain has no room).

    The largest delta whose round time is the shortest round m (T_step, or the measured
    floor): the serial chain T_step + b + delta*c_s fits in tau + 1 rounds of m, and the
    busiest link carries a round within one step. With m = T_step the first term is
    Remark 4's (tau*T_step - b)/c_s. The throughput term keeps T_step: a link filled for
    all of a longer measured round leaves no room for the jitter that made it longer.
    """
    serial, throughput = x.costs_s()
    chain = tau * x.round_s + (x.round_s - x.step_s) - x.latency_s  # (tau + 1) m - T_step - b
    return min(chain / serial, x.step_s / throughput, 1.0)


def tau_range(x: DecoInput) -> tuple[int, int]:
    """[the smallest tau whose chain has room for a transfer, the one whose chain carries delta = 1]
    (with m = T_step: [ceil(b/T_step), ceil((b + c_s)/T_step)])."""
    spare = x.round_s - x.step_s  # what a longer measured round adds to the chain's room
    low = max(0, math.ceil((x.latency_s - spare) / x.round_s))
    high = math.ceil((x.latency_s - spare + x.costs_s()[0]) / x.round_s)
    return low, max(low, high)


def rounds_factor(x: DecoInput, tau: int, delta: float | np.ndarray) -> float | np.ndarray:
    """The "time" objective's rounds to the target, relative: (1 + w tau) (1 + k0 / (delta d))
    (one delta or an array of them)."""
    return (1.0 + x.staleness_weight * tau) * (1.0 + x.compression_knee / (delta * x.num_params))


def time_choice(x: DecoInput, tau: int) -> tuple[float, float]:
    """For one tau, the "time" objective's (delta, rounds factor x T_avg): the smallest value
    over the candidate deltas, the largest delta among equals (with k0 = 0, every delta a
    round carries without waiting is as good: send the most)."""
    deltas = np.geomspace(x.min_delta, 1.0, TIME_OBJECTIVE_DELTAS)
    boundary = delta_for_tau(x, tau)
    if boundary > x.min_delta:
        deltas = np.append(deltas, boundary)
    # What a round really sends: from DENSE_FROM_DELTA on, every value and no index.
    sent = np.where(deltas >= DENSE_FROM_DELTA, sent_delta(1.0, x.bits_per_element), deltas)
    value = rounds_factor(x, tau, deltas) * round_seconds(x, tau, sent)
    best = value.min()
    chosen = float(deltas[value <= best * (1.0 + 1e-9)].max())
    return chosen, float(best)


def delta_at(x: DecoInput, tau: int) -> float:
    """The delta x's objective pairs with `tau`: delta*(tau), at least one element ("phi"), or
    the one with the smallest rounds x T_avg ("time"). deco-hetero's per-worker deltas."""
    if x.objective == "time":
        return time_choice(x, tau)[0]
    return max(x.min_delta, delta_for_tau(x, tau))


def deco(x: DecoInput) -> DecoDecision:
    """The (tau, delta) x's objective picks: Algorithm 1 ("phi") or the shortest time to the target ("time")."""
    if x.objective == "time":
        return deco_time(x)
    low, high = tau_range(x)
    best: tuple[float, int, float] | None = None  # (phi, tau, delta)
    for tau in range(low, min(high, x.tau_max) + 1):
        delta = delta_for_tau(x, tau)
        if delta <= 0.0:
            continue  # tau*T_comp <= b: this tau cannot hide the latency
        delta = max(delta, x.min_delta)
        value = objective(x, tau, delta)
        if best is None or value < best[0]:  # strict: the smallest tau wins ties
            best = (value, tau, delta)
    if best is not None:
        value, tau, delta = best
        feasible = True
        reason = f"DeCo: min phi over tau in [{low}, {min(high, x.tau_max)}]"
    else:
        # Nothing in range (latency beyond tau_max compute steps): take the most staleness
        # allowed and send no more than one compute step can carry.
        tau = min(low, x.tau_max)
        delta = max(x.min_delta, min(1.0, x.step_s / x.costs_s()[1]))
        value = objective(x, tau, delta)
        feasible = False
        reason = f"DeCo fallback: latency needs tau >= {low} > tau_max {x.tau_max}"
    return DecoDecision(
        tau=tau,
        delta=delta,
        phi=value,
        predicted_iter_s=predicted_for(x, tau, delta),
        tau_range=(low, high),
        feasible=feasible,
        reason=reason,
        time_model=x.time_model,
    )


def deco_time(x: DecoInput) -> DecoDecision:
    """The "time" objective: min over tau in [0, tau_max] and every delta of rounds x T_avg
    (`rounds_factor`, `predicted_for`), the smallest tau on ties. Always feasible: a round
    that waits on the latency or the link is priced, not excluded."""
    best: tuple[float, int, float] | None = None  # (value, tau, delta)
    for tau in range(x.tau_max + 1):
        delta, value = time_choice(x, tau)
        if best is None or value < best[0] * (1.0 - 1e-9):
            best = (value, tau, delta)
    assert best is not None
    value, tau, delta = best
    return DecoDecision(
        tau=tau,
        delta=delta,
        phi=value,
        predicted_iter_s=predicted_for(x, tau, sent_delta(delta, x.bits_per_element)),
        tau_range=tau_range(x),
        feasible=True,
        reason=(f"DeCo, time to target: min rounds x T over tau in [0, {x.tau_max}] "
                f"(rounds x{rounds_factor(x, tau, delta):.2f}: w {x.staleness_weight:g}, "
                f"k0 {x.compression_knee:g} elements)"),
        time_model=x.time_model,
    )
