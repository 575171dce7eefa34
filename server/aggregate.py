"""The mean over a round: a pure function from the round's updates to the delta it applies.

No state and no membership: the caller (ServerCore) decides which updates a round counts
(each expected worker's push, or for a skip its stored last update) and the divisor (the
workers expected in the round, not the updates given). Every replica applies the result
and must stay bit-identical to the server's model, so the float32 arithmetic is fixed:
each element is 0 plus its values added one at a time in the order of `updates` (the core
passes them in worker-id order), then divided by the divisor. Every path below computes
exactly that, whatever the density, the piece or block size or the thread count
(tests/test_aggregate.py checks each against the element-by-element definition).

Sparse updates arrive sorted (strictly increasing indices: the codec refuses anything else
on decode), so the index space can be cut anywhere and each update's pairs on either side
found by binary search; an element's values never span a cut. Two paths:
- `pieces_mean` (sparse rounds): the index space cut into pieces of about PIECE_PAIRS
  pairs, and in each piece the union of its indices with each pair's slot in it
  (`torch.unique`), then one scatter-add into the piece's part of the delta, in update
  order. A piece fits in the CPU's cache: sorting all of a large round's pairs at once cost
  up to 3.5x more per pair (docs/benchmarks.md, `wanps bench aggregate`).
- `blocked_mean` (dense rounds): one block of the index space at a time, each update's
  pairs in the block added in update order into a zeroed block-sized scratch, the block's
  union read off a mask. No sort at all; linear in the pairs and in the model's size, so
  it wins when the pairs are dense in the model.
`aggregate` picks by density, and with an executor cuts the index space in two halves of
about equal pairs: the upper half runs on the executor's thread while the caller's runs
the lower (numpy and torch release the GIL). Both paths write into one delta allocated
once for at most min(range, pairs) elements per range. Sparse inputs must keep `Update`'s
contract (sorted unique indices): the binary searches rely on it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from wanps.proto.codec import Update

# Measured with `wanps bench aggregate` (docs/benchmarks.md): the blocked path runs from
# BLOCKED_FROM_PAIRS_PER_PARAM pairs per parameter of the range on, in models of at least
# BLOCKED_MIN_PARAMS parameters; sparser rounds go by pieces.
BLOCKED_FROM_PAIRS_PER_PARAM = 1 / 8
BLOCKED_MIN_PARAMS = 1 << 20
# Parameters per block of the blocked path: a 4 MiB float32 scratch and a 1 MiB mask, which
# stay in the last-level cache while a block's pairs are added (measured faster than 4M or 16M).
BLOCK_PARAMS = 1 << 20
# Pairs per piece of the pieces path: the piece's indices, slots and values stay in cache.
PIECE_PAIRS = 1 << 18
# Rounds with fewer pairs run on one thread: handing half to another thread costs more.
SPLIT_FROM_PAIRS = 1 << 17


@dataclass(frozen=True)
class _Run:
    """One update's pairs in a range of the index space: sorted unique int32 indices, float32 values."""

    indices: torch.Tensor
    values: torch.Tensor


def _runs_of(updates: Sequence[Update]) -> list[_Run]:
    return [_Run(u.indices, u.values.to(torch.float32)) for u in updates if u.count]


def _empty() -> Update:
    return Update(values=torch.empty(0, dtype=torch.float32), indices=torch.empty(0, dtype=torch.int32))


def aggregate(updates: Sequence[Update], divisor: int, num_params: int | None = None,
              executor: Executor | None = None) -> Update:
    """sum(updates) / divisor as a sparse delta over the union of their indices.

    Dense if any update is dense; an empty sparse delta for no updates. A shared random
    block (every update the same block) keeps its `block_start`. `num_params` (the model's
    size) lets dense rounds of large models take the blocked path; `executor` (one free
    thread is enough) lets large rounds run half of the index space on it. The result is
    the same to the bit either way.
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
        return _empty()
    if len(updates) == 1:
        only = updates[0]
        # 0 + v, as every element of a mean starts: turns a pushed -0.0 into 0.0 like the other paths.
        return Update(values=torch.add(only.values.to(torch.float32), 0.0).div_(divisor), indices=only.indices)
    first = updates[0]
    if first.block_start is not None and all(
        u.block_start == first.block_start and u.count == first.count for u in updates
    ):
        # Random blocks from one shared seed: same indices, so the mean is a plain sum of values.
        total = torch.zeros(first.count, dtype=torch.float32)
        for u in updates:
            total.add_(u.values)
        return Update(values=total.div_(divisor), indices=first.indices, block_start=first.block_start)
    runs = _runs_of(updates)
    if not runs:
        return _empty()
    stop = num_params if num_params is not None else max(int(r.indices[-1]) for r in runs) + 1
    if executor is None or _pairs(runs) < SPLIT_FROM_PAIRS:
        ranges = [(runs, 0, stop)]
    else:
        (cut,) = _cuts(runs, 2)
        low, high = _split_runs(runs, [cut])
        ranges = [(low, 0, cut), (high, cut, stop)]
    # One output for the whole round, each range writing into its own part of it: at most
    # its pairs, or its width if smaller (the union's size is known only once it is built).
    capacities = [min(range_stop - range_start, _pairs(range_runs)) for range_runs, range_start, range_stop in ranges]
    offsets = [0, capacities[0]]
    indices = torch.empty(sum(capacities), dtype=torch.int32)
    values = torch.empty(sum(capacities), dtype=torch.float32)

    def fill(part: int) -> int:
        range_runs, range_start, range_stop = ranges[part]
        at, capacity = offsets[part], capacities[part]
        count = _range_sums(range_runs, range_start, range_stop, num_params,
                            indices[at : at + capacity], values[at : at + capacity])
        values[at : at + count].div_(divisor)
        return count

    if len(ranges) == 1:
        filled = fill(0)
    else:
        upper = executor.submit(fill, 1)  # type: ignore[union-attr]
        try:
            lower_count = fill(0)
        finally:
            upper_count = upper.result()  # never leave work running past the call, even on an error
        for output in (indices, values):
            _move_down(output, capacities[0], lower_count, upper_count)
        filled = lower_count + upper_count
    return _trimmed(indices, values, filled)


def _move_down(output: torch.Tensor, source: int, target: int, count: int) -> None:
    """output[target : target + count] = output[source : source + count], target <= source,
    in forward chunks no longer than the gap where possible (no copy of the whole part)."""
    if target == source or count == 0:
        return
    step = max(source - target, 1 << 20)
    array = output.numpy()
    for at in range(0, count, step):
        end = min(at + step, count)
        # Chunks within the gap do not overlap; a longer one (small gap), numpy copies safely.
        np.copyto(array[target + at : target + end], array[source + at : source + end])


def _trimmed(indices: torch.Tensor, values: torch.Tensor, filled: int) -> Update:
    if filled * 4 < indices.numel() * 3:  # much overlap: do not keep the unused capacity alive with the delta
        return Update(values=values[:filled].clone(), indices=indices[:filled].clone())
    return Update(values=values[:filled], indices=indices[:filled])


def _pairs(runs: Sequence[_Run]) -> int:
    return sum(r.indices.numel() for r in runs)


def _cuts(runs: Sequence[_Run], pieces: int) -> list[int]:
    """`pieces - 1` indices that cut the runs' pairs into about equal parts: quantiles of an
    evenly spaced sample of every run's indices (each run sampled in proportion to its pairs)."""
    stride = max(1, _pairs(runs) // (pieces * 16))
    sample = np.sort(np.concatenate([r.indices.numpy()[::stride] for r in runs]))
    return [int(sample[len(sample) * i // pieces]) for i in range(1, pieces)]


def _split_runs(runs: Sequence[_Run], cuts: Sequence[int]) -> list[list[_Run]]:
    """Each run's pairs between consecutive cuts (views, found by binary search): len(cuts) + 1
    parts, each a list of the runs' non-empty slices in update order."""
    boundaries = torch.tensor(cuts, dtype=torch.int32)
    parts: list[list[_Run]] = [[] for _ in range(len(cuts) + 1)]
    for run in runs:
        edges = [0, *torch.searchsorted(run.indices, boundaries).tolist(), run.indices.numel()]
        for part, lo, hi in zip(parts, edges, edges[1:]):
            if lo < hi:
                part.append(_Run(run.indices[lo:hi], run.values[lo:hi]))
    return parts


def _range_sums(runs: Sequence[_Run], start: int, stop: int, num_params: int | None,
                out_indices: torch.Tensor, out_sums: torch.Tensor) -> int:
    """The union of the runs' pairs (all in [start, stop)) and its sums into the outputs, by
    the path their density calls for; returns the union's size."""
    if not runs:
        return 0
    dense_enough = _pairs(runs) >= (stop - start) * BLOCKED_FROM_PAIRS_PER_PARAM
    if num_params is not None and num_params >= BLOCKED_MIN_PARAMS and dense_enough:
        return _blocked_sums(runs, start, stop, BLOCK_PARAMS, out_indices, out_sums)
    return _pieces_sums(runs, PIECE_PAIRS, out_indices, out_sums)


def _alone(runs: Sequence[_Run], sums: Callable[[torch.Tensor, torch.Tensor], int], capacity: int,
           divisor: int) -> Update:
    """One path over all the runs, on this thread (for `pieces_mean`, `blocked_mean`)."""
    indices = torch.empty(capacity, dtype=torch.int32)
    values = torch.empty(capacity, dtype=torch.float32)
    filled = sums(indices, values)
    values[:filled].div_(divisor)
    return _trimmed(indices, values, filled)


def pieces_mean(updates: Sequence[Update], divisor: int, piece_pairs: int = PIECE_PAIRS) -> Update:
    """The sparse mean, piece by piece of the index space (module docstring)."""
    runs = _runs_of(updates)
    if not runs:
        return aggregate([], divisor)
    return _alone(runs, lambda i, v: _pieces_sums(runs, piece_pairs, i, v), _pairs(runs), divisor)


def _pieces_sums(runs: Sequence[_Run], piece_pairs: int, out_indices: torch.Tensor, out_sums: torch.Tensor) -> int:
    pieces = -(-_pairs(runs) // piece_pairs)
    parts = _split_runs(runs, _cuts(runs, pieces)) if pieces > 1 else [list(runs)]
    filled = 0
    for part in parts:
        if not part:
            continue
        union, slot = torch.unique(torch.cat([r.indices for r in part]), sorted=True, return_inverse=True)
        count = union.numel()
        out_indices[filled : filled + count] = union
        # index_add_ adds in input order: each element's values in update order, onto 0.
        out_sums[filled : filled + count].zero_().index_add_(0, slot, torch.cat([r.values for r in part]))
        filled += count
    return filled


def blocked_mean(updates: Sequence[Update], divisor: int, num_params: int, block: int = BLOCK_PARAMS) -> Update:
    """The sparse mean, one block of the index space at a time (module docstring). Memory:
    the result (8 bytes per union element, allocated once for at most min(d, pairs) elements)
    and one block's scratch and mask; no d-sized buffer, no sort."""
    runs = _runs_of(updates)
    if not runs:
        return aggregate([], divisor)
    return _alone(runs, lambda i, v: _blocked_sums(runs, 0, num_params, block, i, v),
                  min(num_params, _pairs(runs)), divisor)


def _blocked_sums(runs: Sequence[_Run], start: int, stop: int, block: int, out_indices: torch.Tensor,
                  out_sums: torch.Tensor) -> int:
    union_np = out_indices.numpy()
    edges = [*range(start, stop, block), stop]
    run_indices = [r.indices.numpy() for r in runs]
    bounds = [np.searchsorted(indices, edges).tolist() for indices in run_indices]
    width = min(block, stop - start)
    scratch = torch.zeros(width, dtype=torch.float32)
    mask = torch.zeros(width, dtype=torch.bool)
    mask_np = mask.numpy()
    filled = 0
    for b in range(len(edges) - 1):
        block_start, block_width = edges[b], edges[b + 1] - edges[b]
        touched = False
        for run, indices, bound in zip(runs, run_indices, bounds):
            lo, hi = bound[b], bound[b + 1]
            if lo == hi:
                continue
            local = torch.from_numpy(indices[lo:hi] - np.int32(block_start))
            scratch.index_add_(0, local, run.values[lo:hi])
            mask[local] = True
            touched = True
        if not touched:
            continue
        # numpy's nonzero of a bool array is branch-free: several times torch's at these densities.
        found = np.flatnonzero(mask_np[:block_width])
        count = found.size
        found_t = torch.from_numpy(found)
        torch.index_select(scratch, 0, found_t, out=out_sums[filled : filled + count])
        np.add(found, block_start, out=union_np[filled : filled + count], casting="unsafe")
        filled += count
        # Zero what the block touched for the next one: entry by entry when few, else all.
        if count * 16 < block_width:
            scratch.index_fill_(0, found_t, 0.0)
            mask_np[found] = False
        else:
            scratch.zero_()
            mask_np[:] = False
    return filled
