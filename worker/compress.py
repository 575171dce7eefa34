"""Compression with error feedback, in update space. Pure tensor code, no network.

Workers push updates already scaled by their learning rate: p = lr * g + e, push C(p),
keep e = p - C(p) (the SASG and DEF papers' form). The invariant after any number of
steps is sum(pushed) + e == sum(lr * g), up to float rounding.
"""
from __future__ import annotations

import math
from decimal import Decimal

import torch

from wanps.proto.codec import SparseUpdate


def elements_for(delta: float, num_params: int) -> int:
    """How many elements a compression ratio delta sends: ceil(delta * d), at least 1."""
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    # Decimal: 0.07 * 100 is 7.000000000000001 in binary floating point; ceil must see 7.
    return min(num_params, max(1, math.ceil(Decimal(repr(float(delta))) * num_params)))


def topk_exact(update: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the k largest-magnitude elements, sorted ascending (the wire order)."""
    if k >= update.numel():
        return torch.arange(update.numel())
    _, indices = torch.topk(update.abs(), k, sorted=False)
    return torch.sort(indices).values


class ErrorFeedback:
    """Plain error feedback (EF) around exact top-k.

    The residual buffer doubles as the working buffer for p = lr*g + e, so a step
    allocates only the selected indices and values.
    """

    def __init__(self, num_params: int) -> None:
        self.residual = torch.zeros(num_params, dtype=torch.float32)

    def compress(self, scaled_grad: torch.Tensor, delta: float) -> SparseUpdate:
        """Take lr*g, return C(lr*g + e) to push; keep the rest as the new residual."""
        p = self.residual.add_(scaled_grad)  # p = lr*g + e, in place
        k = elements_for(delta, p.numel())
        # From half the elements on, dense is smaller on the wire (values only, no indices)
        # and sends more: use it.
        if 2 * k >= p.numel():
            update = SparseUpdate(values=p.clone(), indices=None)
            p.zero_()
            return update
        indices = topk_exact(p, k)
        values = p.index_select(0, indices)
        p.index_fill_(0, indices, 0.0)  # e = p - C(p): what was sent leaves the residual exactly
        return SparseUpdate(values=values, indices=indices.to(torch.int32))
