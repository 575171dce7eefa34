"""DeCo (Algorithm 1 of the DeCo-SGD paper) and Theorem 3's iteration time. Pure functions.

Notation (the paper's): a = bandwidth (bit/s), b = end-to-end latency (s), S_g = gradient
size (bit), T_comp = compute time per step (s), tau = staleness, delta = compression ratio.

    T_avg(tau, delta) ~= max{ (T_comp + b + delta*S_g/a) / (tau + 1), delta*S_g/a, T_comp }   (Theorem 3)
    (wanps: T_step = T_comp + o in place of T_comp everywhere, o the measured per-round overhead)
    delta*(tau)        = min{ (tau*T_comp - b) * a/S_g, T_comp * a/S_g, 1 }                   (Remark 4)
    phi(tau, delta)    = (1 - delta) / (delta * (1 - delta/2)**tau)
    DeCo: over tau in [ceil(b/T_comp), ceil((b + S_g/a)/T_comp)], minimise phi(tau, delta*(tau)),
          smallest tau on ties.

Where wanps departs from the paper (docs/controller.md says why):
- A measured per-round overhead o (applying deltas, encoding and sending the push, the
  server's aggregation: fixed work per round that Theorem 3 leaves out, and which on
  shared cores can be a large fraction of a short step) is added to the step:
  T_step = T_comp + o replaces T_comp in Theorem 3 and in Algorithm 1. The overhead is
  CPU work, so transfers overlap it as they overlap compute. o = 0 is the paper's model.
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

DEFAULT_BITS_PER_ELEMENT = 64  # uint32 index + float32 value, as sent on the wire
# From this delta on, workers send every value and no index: 32 bits per element.
DENSE_FROM_DELTA = 0.5
DENSE_BITS_PER_ELEMENT = 32


@dataclass(frozen=True)
class DecoInput:
    num_params: int  # d
    bandwidth_bps: float  # a, bit/s
    latency_s: float  # b, s
    t_comp_s: float  # T_comp, s
    bits_per_element: float = DEFAULT_BITS_PER_ELEMENT
    tau_max: int = 16
    overhead_s: float = 0.0  # o: measured fixed cost per round beyond T_comp, s

    def __post_init__(self) -> None:
        if self.num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {self.num_params}")
        if not self.bandwidth_bps > 0 or not math.isfinite(self.bandwidth_bps):
            raise ValueError(f"bandwidth must be a positive finite number of bit/s, got {self.bandwidth_bps}")
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

    @property
    def step_s(self) -> float:
        """T_step = T_comp + o: what one round costs a worker before any waiting on the link."""
        return self.t_comp_s + self.overhead_s

    @property
    def gradient_bits(self) -> float:
        """S_g: the bits a dense round would send."""
        return self.num_params * self.bits_per_element

    @property
    def min_delta(self) -> float:
        """One element per round at least."""
        return min(1.0, 1.0 / self.num_params)


@dataclass(frozen=True)
class DecoDecision:
    tau: int
    delta: float
    phi: float
    predicted_iter_s: float  # Theorem 3's T_avg for (tau, delta)
    tau_range: tuple[int, int]  # [ceil(b/T_comp), ceil((b + S_g/a)/T_comp)] before capping
    feasible: bool  # False: no tau <= tau_max hides the communication; the fallback was taken
    reason: str

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


def predicted_for(x: DecoInput, tau: int, delta: float) -> float:
    """Theorem 3 for any (tau, delta) on these inputs, with T_step = T_comp + o for T_comp.

    delta * S_g is what a sparse round sends; from delta 0.5 on workers send dense (fewer
    bits), so for large deltas this is an upper bound.
    """
    if not 0.0 < delta <= 1.0 or tau < 0:
        raise ValueError(f"need tau >= 0 and delta in (0, 1]; got tau {tau}, delta {delta}")
    transfer = delta * x.gradient_bits / x.bandwidth_bps
    return predicted_iteration_time(x.step_s, x.latency_s, transfer, tau)


def overhead_sample(measured_s: float, x: DecoInput, tau: int, delta: float, slack: float = 0.05) -> float | None:
    """One observation of the per-round overhead o from a measured seconds-per-round m.

    The overhead is CPU work in series with compute, so Theorem 3 with it is
    m = max{T_comp + o, (T_comp + o + b + tr)/(tau + 1), tr} (tr = delta*S_g/a). Unless the
    transfer term binds, o = min{m - T_comp, (tau + 1) m - T_comp - b - tr} inverts it
    exactly (whichever of the first two terms is the larger gives the smaller o). When tr
    exceeds the other terms with the overhead already known (`x.overhead_s`, plus `slack`),
    the round waits on the link and o cannot be seen: None.
    """
    transfer = delta * x.gradient_bits / x.bandwidth_bps
    serial = max(x.step_s, (x.step_s + x.latency_s + transfer) / (tau + 1))
    if transfer > serial * (1.0 + slack):
        return None
    t_comp = x.t_comp_s
    return max(0.0, min(measured_s - t_comp, (tau + 1) * measured_s - t_comp - x.latency_s - transfer))


def delta_for_tau(x: DecoInput, tau: int) -> float:
    """Remark 4's delta*(tau) with T_step for T_comp, unclamped (<= 0 when tau*T_step <= b)."""
    scale = x.bandwidth_bps / x.gradient_bits
    return min((tau * x.step_s - x.latency_s) * scale, x.step_s * scale, 1.0)


def tau_range(x: DecoInput) -> tuple[int, int]:
    low = math.ceil(x.latency_s / x.step_s)
    high = math.ceil((x.latency_s + x.gradient_bits / x.bandwidth_bps) / x.step_s)
    return low, max(low, high)


def deco(x: DecoInput) -> DecoDecision:
    """Algorithm 1: the (tau, delta) with the smallest phi that hides communication."""
    low, high = tau_range(x)
    best: tuple[float, int, float] | None = None  # (phi, tau, delta)
    for tau in range(low, min(high, x.tau_max) + 1):
        delta = delta_for_tau(x, tau)
        if delta <= 0.0:
            continue  # tau*T_comp <= b: this tau cannot hide the latency
        delta = max(delta, x.min_delta)
        value = phi(tau, delta)
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
        delta = max(x.min_delta, min(1.0, x.step_s * x.bandwidth_bps / x.gradient_bits))
        value = phi(tau, delta)
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
    )
