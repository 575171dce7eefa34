"""The mean over a round: a pure function from the round's updates to the delta it applies.

No state and no membership: the caller (ServerCore) decides which updates a round counts
(each expected worker's push, or for a skip its stored last update) and the divisor (the
workers expected in the round, not the updates given). Every replica applies the result
and must stay bit-identical to the server's model, so the float32 arithmetic is fixed:
each element is 0 plus its values added in the order of `updates` (the core passes them
in worker-id order), then divided by the divisor.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from wanps.proto.codec import Update


def aggregate(updates: Sequence[Update], divisor: int) -> Update:
    """sum(updates) / divisor as a sparse delta over the union of their indices.

    Dense if any update is dense; an empty sparse delta for no updates. A shared random
    block (every update the same block) keeps its `block_start`.
    """
    if divisor < 1:
        raise ValueError(f"the divisor must be >= 1, got {divisor}")
    dense = [u for u in updates if u.indices is None]
    if dense:
        size = dense[0].count
        if any(u.count != size for u in dense):
            raise ValueError("dense updates of different sizes")
        total = torch.zeros(size, dtype=torch.float32)
        for u in updates:
            if u.indices is None:
                total.add_(u.values)
            else:
                total.index_add_(0, u.indices, u.values)
        return Update(values=total.div_(divisor), indices=None)
    if not updates:
        return Update(values=torch.empty(0, dtype=torch.float32), indices=torch.empty(0, dtype=torch.int32))
    if len(updates) == 1:
        only = updates[0]
        return Update(values=only.values.to(torch.float32) / divisor, indices=only.indices)
    first = updates[0]
    if first.block_start is not None and all(
        u.block_start == first.block_start and u.count == first.count for u in updates
    ):
        # Random blocks from one shared seed: same indices, so the mean is a plain sum of values.
        total = torch.zeros(first.count, dtype=torch.float32)
        for u in updates:
            total.add_(u.values)
        return Update(values=total.div_(divisor), indices=first.indices, block_start=first.block_start)
    # Sort-based: the union of indices and each pair's slot in it, then one scatter-add into a
    # buffer the size of the union. It needs no d-sized scratch, whose random access over the
    # whole model cost more than the sort (docs/benchmarks.md, the `wanps bench push` table).
    union, slot = torch.unique(torch.cat([u.indices for u in updates]), sorted=True, return_inverse=True)
    values = torch.zeros(union.numel(), dtype=torch.float32)
    values.index_add_(0, slot, torch.cat([u.values for u in updates]))
    return Update(values=values.div_(divisor), indices=union.to(torch.int32))
