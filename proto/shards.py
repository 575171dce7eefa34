"""Key-range shards: how the flat vector is cut over N parameter servers (the contract).

The replicated vector of P float32 elements (parameters and buffers, in the worker's layout
order) is cut into N contiguous ranges balanced by element count: shard i owns

    [floor(i * P / N), floor((i + 1) * P / N))

so every range holds floor(P / N) or ceil(P / N) elements, the ranges are disjoint, in order,
and cover [0, P). Shard i is an independent server for the model of its range: on the wire
every index a worker sends it, and every index of the deltas it broadcasts, is local to the
range (global index = range start + local index). N = 1 is the single server.

Torch-free: the server, the worker and the deployment code use it.
"""
from __future__ import annotations


def shard_range(total: int, index: int, count: int) -> tuple[int, int]:
    """(start, stop) of shard `index` of `count` over a vector of `total` elements."""
    if count < 1:
        raise ValueError(f"a cluster has at least one shard, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    if total < 0:
        raise ValueError(f"a vector has a size >= 0, got {total}")
    return index * total // count, (index + 1) * total // count


def shard_ranges(total: int, count: int) -> list[tuple[int, int]]:
    """Every shard's (start, stop), in shard order."""
    return [shard_range(total, index, count) for index in range(count)]


def describe_shard(index: int, count: int, total: int | None = None) -> str:
    """`shard 1/3 [40, 80) of 120 elements`, for messages that name a shard and its range."""
    if total is None:
        return f"shard {index}/{count}"
    start, stop = shard_range(total, index, count)
    return f"shard {index}/{count} [{start}, {stop}) of {total} elements"
