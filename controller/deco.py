"""DeCo (Algorithm 1 of the DeCo-SGD paper) and Theorem 3's iteration time. Pure functions.

Notation (the paper's): a = bandwidth (bit/s), b = end-to-end latency (s), S_g = gradient
size (bit), T_comp = compute time per step (s), tau = staleness, delta = compression ratio.

    T_avg(tau, delta) ~= max{ (T_comp + b + delta*S_g/a) / (tau + 1), delta*S_g/a, T_comp }   (Theorem 3)
    delta*(tau)        = min{ (tau*T_comp - b) * a/S_g, T_comp * a/S_g, 1 }                   (Remark 4)
    phi(tau, delta)    = (1 - delta) / (delta * (1 - delta/2)**tau)
    DeCo: over tau in [ceil(b/T_comp), ceil((b + S_g/a)/T_comp)], minimise phi(tau, delta*(tau)),
          smallest tau on ties.

Where wanps departs from the paper (docs/controller.md says why):
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


@dataclass(frozen=True)
class DecoInput:
    num_params: int  # d
    bandwidth_bps: float  # a, bit/s
    latency_s: float  # b, s
    t_comp_s: float  # T_comp, s
    bits_per_element: float = DEFAULT_BITS_PER_ELEMENT
    tau_max: int = 16

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


def delta_for_tau(x: DecoInput, tau: int) -> float:
    """Remark 4's delta*(tau), unclamped (may be <= 0 when tau*T_comp <= b)."""
    scale = x.bandwidth_bps / x.gradient_bits
    return min((tau * x.t_comp_s - x.latency_s) * scale, x.t_comp_s * scale, 1.0)


def tau_range(x: DecoInput) -> tuple[int, int]:
    low = math.ceil(x.latency_s / x.t_comp_s)
    high = math.ceil((x.latency_s + x.gradient_bits / x.bandwidth_bps) / x.t_comp_s)
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
        delta = max(x.min_delta, min(1.0, x.t_comp_s * x.bandwidth_bps / x.gradient_bits))
        value = phi(tau, delta)
        feasible = False
        reason = f"DeCo fallback: latency needs tau >= {low} > tau_max {x.tau_max}"
    transfer = delta * x.gradient_bits / x.bandwidth_bps
    return DecoDecision(
        tau=tau,
        delta=delta,
        phi=value,
        predicted_iter_s=predicted_iteration_time(x.t_comp_s, x.latency_s, transfer, tau),
        tau_range=(low, high),
        feasible=feasible,
        reason=reason,
    )
