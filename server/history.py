"""The broadcast history: each closed round's delta, encoded once, for every `Updates` follower.

Bounded in bytes: it keeps the newest rounds whose payload (index + value bytes) fits the
budget (`--history-mb`), at most `--history-rounds` of them, and always the newest one. A
round that a member worker's stream has not sent yet is kept beyond the budget (a worker
that lags gets its rounds, not a model pull), but only while it is among the newest
`pin_rounds` (tau_max + 1): by the round rules a worker's stream is never further behind
than its tau + 1 rounds when a round closes, unless rounds close at their deadline without
it, and that straggler then pulls the model like any follower that fell out of the history.
Observers are not pinned: one that lags past the budget pulls the model again.

So the history holds at most max(budget, pin_rounds x the largest round's payload), and in
a steady cluster (tau + 1) rounds or the budget, whichever is larger (docs/operations.md,
"Server memory").
"""
from __future__ import annotations

import asyncio
import itertools
import dataclasses
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.rpc.errors import FailedPrecondition
from wanps.server.core import ClosedRound

DEFAULT_HISTORY_MB = 256


def encode_round(closed: ClosedRound) -> tuple[pb.DeltaChunk, ...]:
    """A closed round's delta as the DeltaChunks every follower receives; the last one carries the model checksum."""
    delta = closed.delta
    dense = delta.indices is None
    chunks = []
    for index_raw, value_raw in codec.iter_chunks(delta.values, delta.indices):
        chunks.append(
            pb.DeltaChunk(
                round=closed.round,
                version=closed.version,
                total_count=delta.count,
                indices=index_raw,
                values=value_raw,
                pushed=closed.pushed,
                skipped=closed.skipped,
                dense=dense,
            )
        )
    last = chunks[-1]
    last.last = True
    if closed.model_checksum is not None:
        last.has_model_checksum = True
        last.model_checksum = closed.model_checksum
    return tuple(chunks)


def encode_follower_round(closed: ClosedRound, delta: codec.Update, follower_checksum: int | None,
                          fraction: float = 1.0) -> tuple[pb.DeltaChunk, ...]:
    """A closed round as one compressed follower receives it (server/downlink.py): its own
    delta, and on the last chunk the checksum its replica must have (not the model's) and the
    fraction the round was cut to (so the follower knows its replica may differ from the model)."""
    chunks = encode_round(dataclasses.replace(closed, delta=delta, model_checksum=None))
    if follower_checksum is not None:
        chunks[-1].has_follower_checksum = True
        chunks[-1].follower_checksum = follower_checksum
    chunks[-1].downlink_delta = fraction
    return chunks


def stamp_sent(chunks: tuple[pb.DeltaChunk, ...], sent_ns: int) -> None:
    """Mark a round's chunks with when they go to the streams (DeltaChunk.sent_ns), once, at
    publication: a stream that replays the round later times it from its own previous
    arrival instead (worker/one_way.py), so the first stamp is the right one."""
    for chunk in chunks:
        chunk.sent_ns = sent_ns


@dataclasses.dataclass(frozen=True)
class FollowerBatch:
    """What one compressed follower gets when rounds close: its own rounds, then, when its
    residual drained in the last of them, the round from which it follows the shared ones."""

    rounds: list[tuple[int, tuple[pb.DeltaChunk, ...]]]
    hand_back: int | None = None


def payload_bytes(chunks: tuple[pb.DeltaChunk, ...]) -> int:
    return sum(len(c.indices) + len(c.values) for c in chunks)


class RoundHistory:
    """Encoded deltas of the last closed rounds, and a wake-up for followers of new ones.

    It knows only what has been published to it (on the event loop), never the core's
    version, which runs ahead on the core thread until the publication lands.
    """

    def __init__(self, keep: int, budget_bytes: int | None = None, pin_rounds: int = 1) -> None:
        self._keep = max(1, keep)
        self._budget = budget_bytes  # None: rounds only
        self._pin_rounds = max(1, pin_rounds)
        self._rounds: OrderedDict[int, tuple[tuple[pb.DeltaChunk, ...], int]] = OrderedDict()
        self.bytes = 0  # payload bytes of the rounds held
        self._changed = asyncio.Event()
        self._pins: dict[int, int] = {}  # follower -> the next round its stream sends (member workers only)
        self._follower_ids = itertools.count()
        self.published_through = -1  # the newest round published
        self.closed = False

    def __len__(self) -> int:
        return len(self._rounds)

    @property
    def rounds(self) -> list[int]:
        return list(self._rounds)

    def publish(self, round_: int, chunks: tuple[pb.DeltaChunk, ...]) -> None:
        size = payload_bytes(chunks)
        self._rounds[round_] = (chunks, size)
        self.bytes += size
        self.published_through = round_
        self._evict()
        self._wake()

    def release(self) -> None:
        """Forget every round held (no member is left to follow them); followers that come
        later start from the next round, older ones pull the model."""
        self._rounds.clear()
        self.bytes = 0

    def _evict(self) -> None:
        pinned_from = min(self._pins.values(), default=None)
        while len(self._rounds) > 1:
            oldest, (_, size) = next(iter(self._rounds.items()))
            over = len(self._rounds) > self._keep or (self._budget is not None and self.bytes > self._budget)
            if not over:
                return
            needed = pinned_from is not None and oldest >= pinned_from
            if needed and oldest > self.published_through - self._pin_rounds and len(self._rounds) <= self._keep:
                return  # a member's stream still needs it, and it is recent enough to keep
            del self._rounds[oldest]
            self.bytes -= size

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, from_round: int, pin: bool = False, until: int | None = None
                     ) -> AsyncIterator[pb.DeltaChunk]:
        """Every round's chunks from `from_round` on (before `until`, if given), as they are
        published. `pin`: keep the rounds this stream has yet to send beyond the byte budget
        (for member workers)."""
        follower = next(self._follower_ids)
        next_round = from_round
        try:
            while not self.closed and (until is None or next_round < until):
                if pin:
                    self._pins[follower] = next_round
                entry = self._rounds.get(next_round)
                if entry is not None:
                    for chunk in entry[0]:
                        yield chunk
                    next_round += 1
                    continue
                if next_round <= self.published_through:
                    raise FailedPrecondition(
                        f"round {next_round} is no longer in the server's history; pull the model again"
                    )
                if pin:
                    self._evict()  # what this stream held back may go now
                await self._changed.wait()
        finally:
            self._pins.pop(follower, None)


class FollowerRounds:
    """One `Updates` stream's own rounds (server/downlink.py), in publication order, and where
    the stream switches between them and the shared history: `start(v)` (a residual opened at
    version v: its own rounds from round v on), the rounds, `hand_back(v)` (the residual
    drained: the shared history from round v on). The core thread decides each switch and the
    event loop publishes it here in the same FIFO hops as the rounds, so a switch always sits
    between the right rounds. At most `keep` entries wait: a follower further behind has
    fallen out of its stream, like one out of the history, and pulls the model again."""

    def __init__(self, keep: int) -> None:
        self._keep = max(1, keep)
        self._entries: deque[tuple[pb.DeltaChunk, ...] | _Switch] = deque()
        self._changed = asyncio.Event()
        self.failure: Exception | None = None
        self.closed = False
        # Set on the event loop when the stream ends, read by the core thread: a residual is
        # never opened for a stream that has ended (nothing would drop it).
        self.ended = False
        self.handed_back_at: int | None = None  # where `follow` last handed the stream back

    def start(self, version: int) -> None:
        self._append(_Switch(own=True, version=version))

    def hand_back(self, version: int) -> None:
        self._append(_Switch(own=False, version=version))

    def publish(self, round_: int, chunks: tuple[pb.DeltaChunk, ...]) -> None:
        self._append(chunks, round_)

    def _append(self, entry: tuple[pb.DeltaChunk, ...] | _Switch, round_: int | None = None) -> None:
        if self.failure is not None:
            return
        if len(self._entries) >= self._keep:
            self._entries.clear()
            self.failure = FailedPrecondition(
                f"round {round_ if round_ is not None else '?'}: this compressed follower is more than {self._keep} "
                "rounds behind; pull the model again")
        else:
            self._entries.append(entry)
        self._changed.set()

    @property
    def own_from(self) -> int | None:
        """While the stream follows the shared history: the round its own rounds start at, once
        a residual opened for it (the next entry is then its start)."""
        head = self._entries[0] if self._entries else None
        return head.version if isinstance(head, _Switch) and head.own else None

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def follow(self) -> AsyncIterator[pb.DeltaChunk]:
        """The stream's own rounds, after its start, until it is handed back to the shared
        history (`handed_back_at` then says from which round) or closed."""
        self.handed_back_at = None
        while True:
            if self.failure is not None:
                raise self.failure
            if self._entries:
                entry = self._entries.popleft()
                if isinstance(entry, _Switch):
                    if entry.own:
                        continue
                    self.handed_back_at = entry.version
                    return
                for chunk in entry:
                    yield chunk
                continue
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()


@dataclasses.dataclass(frozen=True)
class _Switch:
    own: bool  # True: the stream's own rounds from round `version`; False: the shared ones
    version: int
