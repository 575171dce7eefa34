"""Which shard of a key-range sharded cluster this server is, and the checks that keep
workers, shards and checkpoints agreeing on it (docs/architecture.md, "Beyond one server").

A shard is an ordinary parameter server for the model of its range (proto/shards.py): the
core, aggregation, history, checkpoints and metrics know nothing of the other shards. What
is shard-specific is only here and at the edges that call it:
- `--shard I/N` (or `host/N`: the trailing integer of the host name, as a Kubernetes
  StatefulSet numbers its pods, minus `--shard-ordinal-base`) -> `ShardSpec`;
- a Join carries the worker's view (shard index, count, whole size): a worker that lists
  the shards in another order or another number of them is refused (FAILED_PRECONDITION
  naming both), and a `num_params` that is not the length of the range its view names is
  malformed (INVALID_ARGUMENT); the whole size is kept by the core (a different model is
  refused there, naming both sizes);
- a checkpoint records the shard it was written by, and resuming it as another is refused.
Pure: no gRPC, no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from wanps.proto.shards import describe_shard, shard_range
from wanps.rpc.errors import FailedPrecondition, InvalidArgument

HOST = "host"
_TRAILING_INTEGER = re.compile(r"(\d+)$")


class ShardMismatch(ValueError):
    """A checkpoint written by another shard than the one resuming it."""


@dataclass(frozen=True)
class ShardSpec:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a cluster has at least 1 shard, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is outside 0..{self.count - 1}")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def describe(self, total: int | None = None) -> str:
        return describe_shard(self.index, self.count, total)


def host_ordinal(hostname: str) -> int:
    """The trailing integer of a host name: `wanps-server-2` -> 2 (a StatefulSet pod's ordinal)."""
    match = _TRAILING_INTEGER.search(hostname)
    if match is None:
        raise ValueError(f"host name {hostname!r} does not end in a number, so it names no shard "
                         f"({HOST}/N is for StatefulSet pods such as wanps-server-2)")
    return int(match.group(1))


def parse_shard(text: str, hostname: str, ordinal_base: int = 0) -> ShardSpec:
    """`I/N` or `host/N` (the host name's ordinal minus `ordinal_base`) -> ShardSpec.
    ValueError with a one-line reason otherwise."""
    index_text, slash, count_text = text.strip().partition("/")
    if not slash or not count_text.strip().isdigit():
        raise ValueError(f"--shard {text!r}: expected I/N (e.g. 0/1, 2/3) or {HOST}/N")
    count = int(count_text)
    index_text = index_text.strip()
    if index_text == HOST:
        try:
            index = host_ordinal(hostname) - ordinal_base
        except ValueError as exc:
            raise ValueError(f"--shard {text!r}: {exc}") from None
        origin = f" (host {hostname!r}, ordinal base {ordinal_base})"
    elif index_text.isdigit():
        index, origin = int(index_text), ""
    else:
        raise ValueError(f"--shard {text!r}: the index is a number from 0 or the word {HOST!r}")
    try:
        return ShardSpec(index, count)
    except ValueError as exc:
        raise ValueError(f"--shard {text!r}{origin}: {exc}") from None


@dataclass(frozen=True)
class ShardView:
    """What a Join says about the cluster: this server is shard `index` of `count`, cutting a
    vector of `total` elements."""

    index: int
    count: int
    total: int


def view_of(shard_index: int, shard_count: int, total_params: int, num_params: int) -> ShardView:
    """A JoinRequest's view; unset fields (all 0) are a single server's: 0 of 1, the whole model."""
    if shard_count == 0 and shard_index == 0 and total_params == 0:
        return ShardView(0, 1, num_params)
    return ShardView(shard_index, shard_count, total_params)


def check_view(spec: ShardSpec, view: ShardView, num_params: int) -> None:
    """Refuse a Join whose view of the cluster is not this shard's (see the module)."""
    if view.count < 1 or not 0 <= view.index < view.count:
        raise InvalidArgument(f"shard_index {view.index} of shard_count {view.count} names no shard")
    if (view.index, view.count) != (spec.index, spec.count):
        raise FailedPrecondition(
            f"this worker takes this server for shard {view.index}/{view.count}, but it is shard "
            f"{spec.index}/{spec.count}: give every worker all {spec.count} shard addresses in shard order "
            f"(wanps worker --server SHARD0,SHARD1,...)")
    start, stop = shard_range(view.total, view.index, view.count)
    if num_params != stop - start:
        raise InvalidArgument(f"num_params {num_params} is not the length of "
                              f"{describe_shard(view.index, view.count, view.total)}")


def push_context(spec: ShardSpec, total: int | None) -> str:
    """Said after a refused push's reason on a sharded server: which range its indices are local to."""
    if not spec.sharded:
        return ""
    if total is None:
        return f"this server is {spec.describe()}; indices are local to its range"
    start, stop = shard_range(total, spec.index, spec.count)
    return (f"this server is {spec.describe(total)}: a push's indices are local to that range, "
            f"0 <= index < {stop - start}")


def check_checkpoint(recorded: list | tuple | None, spec: ShardSpec, where: str) -> None:
    """A checkpoint resumes only as the shard that wrote it (one without a record: shard 0/1)."""
    index, count = (0, 1) if recorded is None else (int(recorded[0]), int(recorded[1]))
    if (index, count) != (spec.index, spec.count):
        raise ShardMismatch(f"the checkpoint in {where} was written by shard {index}/{count}; this server is "
                            f"shard {spec.index}/{spec.count} (give each shard its own checkpoint directory)")
