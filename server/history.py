"""The broadcast history: each closed round's delta, encoded once, for every `Updates` follower."""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator

from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.rpc.errors import FailedPrecondition
from wanps.server.core import ClosedRound


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


class RoundHistory:
    """Encoded deltas of the last closed rounds, and a wake-up for followers of new ones.

    It knows only what has been published to it (on the event loop), never the core's
    version, which runs ahead on the core thread until the publication lands.
    """

    def __init__(self, keep: int) -> None:
        self._keep = max(1, keep)
        self._rounds: OrderedDict[int, tuple[pb.DeltaChunk, ...]] = OrderedDict()
        self._changed = asyncio.Event()
        self.published_through = -1  # the newest round published
        self.closed = False

    def publish(self, round_: int, chunks: tuple[pb.DeltaChunk, ...]) -> None:
        self._rounds[round_] = chunks
        self.published_through = round_
        while len(self._rounds) > self._keep:
            self._rounds.popitem(last=False)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def follow(self, from_round: int) -> AsyncIterator[pb.DeltaChunk]:
        next_round = from_round
        while not self.closed:
            chunks = self._rounds.get(next_round)
            if chunks is not None:
                for chunk in chunks:
                    yield chunk
                next_round += 1
                continue
            if next_round <= self.published_through:
                raise FailedPrecondition(
                    f"round {next_round} is no longer in the server's history; pull the model again"
                )
            await self._changed.wait()
