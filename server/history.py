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


def encode_follower_round(closed: ClosedRound, delta: codec.Update, follower_checksum: int | None
                          ) -> tuple[pb.DeltaChunk, ...]:
    """A closed round as one compressed follower receives it (server/downlink.py): its own
    delta, and on the last chunk the checksum its replica must have (not the model's)."""
    chunks = encode_round(dataclasses.replace(closed, delta=delta, model_checksum=None))
    if follower_checksum is not None:
        chunks[-1].has_follower_checksum = True
        chunks[-1].follower_checksum = follower_checksum
    return chunks


def stamp_sent(chunks: tuple[pb.DeltaChunk, ...], sent_ns: int) -> None:
    """Mark a round's chunks with when they go to the streams (DeltaChunk.sent_ns), once, at
    publication: a stream that replays the round later times it from its own previous
    arrival instead (worker/one_way.py), so the first stamp is the right one."""
    for chunk in chunks:
        chunk.sent_ns = sent_ns


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
    """One compressed follower's own encoded rounds (server/downlink.py), in publication order,
    for its `Updates` stream. At most `keep` wait: a follower further behind has fallen out of
    its stream, like one out of the history, and pulls the model again."""

    def __init__(self, keep: int) -> None:
        self._keep = max(1, keep)
        self._rounds: deque[tuple[pb.DeltaChunk, ...]] = deque()
        self._changed = asyncio.Event()
        self.failure: Exception | None = None
        self.closed = False

    def publish(self, round_: int, chunks: tuple[pb.DeltaChunk, ...]) -> None:
        if self.failure is not None:
            return
        if len(self._rounds) >= self._keep:
            self._rounds.clear()
            self.failure = FailedPrecondition(
                f"round {round_}: this compressed follower is more than {self._keep} rounds behind; "
                "pull the model again")
        else:
            self._rounds.append(chunks)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def follow(self) -> AsyncIterator[pb.DeltaChunk]:
        while True:
            if self.failure is not None:
                raise self.failure
            if self._rounds:
                for chunk in self._rounds.popleft():
                    yield chunk
                continue
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()
