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


# The blocked path (below) runs for models of at least BLOCKED_MIN_PARAMS when the round's
# pairs reach BLOCKED_FROM_PAIRS_PER_PARAM of the model's parameters; otherwise the sort.
# Measured on one core, d = 124M, 4 updates (docs/benchmarks.md, "wanps bench scale"): at 40%
# pairs per parameter 0.99 s and 393 MiB beside the inputs against the sort's 1.84 s and
# 1328 MiB; at 10%, 0.47 s and 135 MiB against 0.42 s and 335 MiB; at 4%, 0.25 s against
# 0.18 s. From 1/16 on, the blocked path costs at most ~15% more time and saves 2.5-3.4x memory.
BLOCKED_FROM_PAIRS_PER_PARAM = 1 / 16
BLOCKED_MIN_PARAMS = 1 << 20
# Parameters per block of the blocked path: a 16 MiB float32 scratch and a 4 MiB mask.
BLOCK_PARAMS = 1 << 22


def aggregate(updates: Sequence[Update], divisor: int, num_params: int | None = None) -> Update:
    """sum(updates) / divisor as a sparse delta over the union of their indices.

    Dense if any update is dense; an empty sparse delta for no updates. A shared random
    block (every update the same block) keeps its `block_start`. With `num_params` (the
    model's size), rounds with many pairs take the blocked path: the same sums in the same
    order, in less time and memory than the sort.
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
    pairs = sum(u.count for u in updates)
    if num_params is not None and num_params >= BLOCKED_MIN_PARAMS and pairs >= num_params * BLOCKED_FROM_PAIRS_PER_PARAM:
        return blocked_mean(updates, divisor, num_params)
    # Sort-based: the union of indices and each pair's slot in it, then one scatter-add into a
    # buffer the size of the union. It needs no d-sized scratch, whose random access over the
    # whole model cost more than the sort (docs/benchmarks.md, the `wanps bench push` table).
    union, slot = torch.unique(torch.cat([u.indices for u in updates]), sorted=True, return_inverse=True)
    values = torch.zeros(union.numel(), dtype=torch.float32)
    values.index_add_(0, slot, torch.cat([u.values for u in updates]))
    return Update(values=values.div_(divisor), indices=union.to(torch.int32))


def blocked_mean(updates: Sequence[Update], divisor: int, num_params: int, block: int = BLOCK_PARAMS) -> Update:
    """The sparse mean, one block of the index space at a time: each update's pairs in the
    block (found by binary search: indices are sorted) are added, in order, into a zeroed
    block-sized scratch, and the block's union is read off a mask. Every element is 0 plus
    its values in the order of `updates`, as in the sort path, so the result is the same to
    the bit. Memory: the result (8 bytes per union element, allocated once for at most
    min(d, pairs) elements) and one block's scratch; no d-sized buffer, no sort of all
    pairs (which costs ~4x the pairs' bytes in copies, the inverse and the permutation).
    """
    pairs = sum(u.count for u in updates)
    capacity = min(num_params, pairs)
    union = torch.empty(capacity, dtype=torch.int32)
    values = torch.empty(capacity, dtype=torch.float32)
    edges = torch.arange(0, num_params + block, block, dtype=torch.int64).clamp_(max=num_params).to(torch.int32)
    bounds = [torch.searchsorted(u.indices, edges).tolist() for u in updates]
    scratch = torch.empty(min(block, num_params), dtype=torch.float32)
    mask = torch.empty(min(block, num_params), dtype=torch.bool)
    filled = 0
    for b in range(edges.numel() - 1):
        start, stop = int(edges[b]), int(edges[b + 1])
        if start >= stop:
            break
        width = stop - start
        block_sum = scratch[:width].zero_()
        present = mask[:width].zero_()
        for u, bound in zip(updates, bounds):
            lo, hi = bound[b], bound[b + 1]
            if lo == hi:
                continue
            local = u.indices[lo:hi] - start
            block_sum.index_add_(0, local, u.values[lo:hi])
            present[local] = True
        found = present.nonzero().view(-1)
        count = found.numel()
        torch.index_select(block_sum, 0, found, out=values[filled : filled + count])
        union[filled : filled + count] = found + start
        filled += count
    if filled * 4 < capacity * 3:  # much overlap: do not keep the unused capacity alive with the delta
        union, values = union[:filled].clone(), values[:filled].clone()
    else:
        union, values = union[:filled], values[:filled]
    return Update(values=values.div_(divisor), indices=union)
