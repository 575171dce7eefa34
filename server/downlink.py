"""Per-follower downlink compression with a server-side residual (bidirectional error feedback).

A follower on a slow downlink may ask (`UpdatesRequest.downlink_delta`, a fraction in (0, 1])
for a compressed stream instead of every round's full aggregated delta. The server then
keeps, for that follower only, a mirror `m_f` of the follower's replica (float32, 4 bytes per
parameter: the memory a residual costs). Its residual is what the follower has not received:

    r_f = x - m_f          (x: the server's model; so the follower's replica is x - r_f)

Each closed round, after the server applied its delta to x, the follower gets the top-k of
the residual by magnitude, k = ceil(downlink_delta * d), as an ordinary subtractive delta:

    idx = the k largest |x - m_f| (sorted; elements already equal are never sent)
    C   = m_f[idx] - x[idx]          (a DeltaChunk's values: replica[idx] -= C)
    m_f = apply_delta(m_f, C)        (the one operation the follower applies too)

so `r_f <- r_f + delta_round - C(r_f + delta_round)`, the error-feedback recursion, with the
residual recomputed from x and m_f each round instead of accumulated (no drift: a rounding
left in one round is part of the next round's residual).

A residual is retuned while its stream stays open (`retune`, from `SetDownlink`): a new
fraction holds from the next round; "off" drains it: every pending element goes each round
(dense when that is cheaper, never more than a model pull), until a round leaves the mirror
equal to the model to the bit (`drained`), usually the first or the second: m - (m - x) is x
exactly when m and x are within a factor of two (Sterbenz), and a rounding left in one round
is the next round's residual. The follower's replica is then the model, and its stream goes
back to the rounds every follower gets.

What is exact (bit-for-bit) and what is not: the follower applies the same `apply_delta`
with the same values in the same order, so its replica equals `m_f` to the bit at every
version; the server sends `checksum(m_f)` (the follower's own expected checksum) when a
model checksum is due, and the follower checks against it. `x - r_f` recomputes m_f only up
to float32 rounding of the two subtractions (x - (x - m) is not m in general), so the
conservation "replica == x - r_f" holds with r_f defined as x - m_f, and the test of it is
the mirror's. After a full pull the follower's replica is x again and its residual zero.

Pure: no gRPC, no threads; the servicer runs it on the core thread (server/service.py).
"""
from __future__ import annotations

import math

import torch

from wanps.proto.checksum import model_checksum
from wanps.proto.codec import Update, apply_delta

# Refusal texts name the field, so the person sees what to change.
FRACTION_FIELD = "downlink_delta"


def check_fraction(fraction: float) -> None:
    """A downlink fraction must be in (0, 1] (0 means "off" on the wire and never gets here)."""
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"{FRACTION_FIELD} must be a fraction of elements in (0, 1], got {fraction!r}")


def elements_per_round(fraction: float, num_params: int) -> int:
    """k: elements a compressed follower receives per round (at least one of a nonempty model)."""
    return min(num_params, max(1, math.ceil(fraction * num_params))) if num_params else 0


class DownlinkResidual:
    """One compressed follower's state on the server: the mirror of its replica (see the module)."""

    def __init__(self, model: torch.Tensor, fraction: float) -> None:
        check_fraction(fraction)
        self.mirror = model.detach().clone()  # the follower's replica; residual zero (it just synced)
        self.retune(fraction)

    def retune(self, fraction: float | None) -> None:
        """The fraction for the rounds from now on; None: drain (see the module)."""
        if fraction is not None:
            check_fraction(fraction)
        self.draining = fraction is None
        self.fraction = 1.0 if fraction is None else float(fraction)
        self.k = elements_per_round(self.fraction, self.mirror.numel())

    def drained(self, model: torch.Tensor) -> bool:
        """Draining, and the follower's replica is the model, to the bit."""
        return self.draining and torch.equal(self.mirror, model)

    @property
    def nbytes(self) -> int:
        return self.mirror.numel() * self.mirror.element_size()

    def residual(self, model: torch.Tensor) -> torch.Tensor:
        """r_f = x - m_f (float32, a new tensor): what the follower's replica lacks."""
        return model - self.mirror

    def step(self, model: torch.Tensor) -> Update:
        """The follower's delta for the model as it is now (after the round's delta): the top-k
        of its residual, applied to the mirror as the follower will apply it. O(d) per call."""
        pending = self.mirror - model  # -r_f: what the follower still has to subtract
        if self.k >= pending.numel():
            indices = torch.nonzero(pending, as_tuple=True)[0]
        else:
            indices = pending.abs().topk(self.k, sorted=False).indices
            indices = indices[pending[indices] != 0]  # elements already equal cost nothing to skip
        if 2 * indices.numel() > pending.numel():
            update = Update(values=pending, indices=None)  # dense: 4 bytes an element, not 8
        else:
            indices = indices.sort().values.to(torch.int32)
            update = Update(values=pending[indices.long()], indices=indices)
        apply_delta(self.mirror, update)
        return update

    def checksum(self) -> int:
        """The checksum the follower's replica must have (proto/checksum.py, of the mirror)."""
        return model_checksum(self.mirror)
