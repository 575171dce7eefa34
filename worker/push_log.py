"""The pushes a worker keeps for a replay after a lost connection. Pure: no network, no threads.

A push stays logged until the server says its round is durable (checkpointed: a restarted
server cannot lose it); a byte cap bounds the log in any case, dropping the oldest pushes
first. The cap counts what a logged push really holds: its encoded messages (what a replay
sends) and its update's tensors (what a late or lost round gives back to error feedback),
wherever they live.

A dropped push is not forgotten: its update is added to a dense sum over the trainable
prefix (4 T bytes, on the update's device) with the rounds it covers. If the server later
loses those rounds (it resumed from an older checkpoint), `take_lost` hands the sum back, to
go into the error-feedback residual instead of being lost with an empty replay; once they
are durable the sum is freed. A sum cannot be split, so there is one per stretch between
checkpoints: every push reply names the newest checkpoint the server has taken
(`snapshot_version`, written or still being written) besides the newest durable one, and
only rounds the server had closed when a reply left it are dropped, so no checkpoint the
worker has not heard of can fall inside a sum. The server writes one checkpoint at a time,
so at most two or three sums exist at once (MAX_DROPPED_SUMS bounds them in any case).

The training thread appends while the I/O loop notes replies, so every method takes the lock.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from wanps.proto.codec import Update
from wanps.worker.layout import trainable_part

if TYPE_CHECKING:  # annotations only
    from wanps.proto import wanps_pb2 as pb

log = logging.getLogger("wanps.worker")

# Bytes the log may hold (messages and tensors); pushes of rounds not yet closed stay beyond it.
PUSH_LOG_MAX_BYTES = 64 * 1024 * 1024
# Sums of dropped rounds kept at once (one per checkpoint not yet durable, normally <= 2); past
# it the two oldest are merged (a crash inside them could then not be told apart: a warning).
MAX_DROPPED_SUMS = 4


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def held_bytes(update: Update | None, messages: list[pb.PushMessage]) -> int:
    """What keeping a push costs: its encoded messages plus its update's tensors."""
    held = sum(message.ByteSize() for message in messages)
    if update is not None:
        held += tensor_bytes(update.values) + tensor_bytes(update.indices)
    return held


@dataclass(frozen=True)
class LoggedPush:
    round: int
    computed_at_version: int
    update: Update | None  # None: a skip record
    messages: list[pb.PushMessage]  # as sent: a replay sends the same bytes
    nbytes: int  # payload bytes on the wire (indices + values)
    held: int = field(default=-1)  # bytes this entry keeps alive; computed when not given

    def __post_init__(self) -> None:
        if self.held < 0:
            object.__setattr__(self, "held", held_bytes(self.update, self.messages))


@dataclass
class DroppedRounds:
    """The summed update of rounds [first, last] dropped over the cap, all after `since`
    (the checkpoint version they follow)."""

    since: int
    first: int
    last: int
    values: torch.Tensor | None  # dense over the trainable prefix; None while only skips were dropped

    def rounds(self) -> range:
        return range(self.first, self.last + 1)


class PushLog:
    def __init__(self, max_bytes: int = PUSH_LOG_MAX_BYTES, trainable: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.trainable = trainable  # T: the pushed prefix (the session sets it at join)
        self.durable_version = 0  # rounds below it are on the server's disk
        self.closed_version = 0  # rounds below it had closed when the newest reply left the server
        self.held_bytes = 0
        self._snapshots: list[int] = []  # checkpoints taken, not yet durable (ascending)
        self._dropped: list[DroppedRounds] = []  # ascending rounds
        self._pushes: OrderedDict[int, LoggedPush] = OrderedDict()  # by round, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pushes)

    @property
    def dropped(self) -> tuple[DroppedRounds, ...]:
        with self._lock:
            return tuple(self._dropped)

    def append(self, logged: LoggedPush) -> None:
        """Keep `logged` (replacing an earlier push of the same round); over the cap, drop the
        oldest pushes of closed rounds into their sum."""
        with self._lock:
            old = self._pushes.pop(logged.round, None)
            if old is not None:
                self.held_bytes -= old.held
            self._pushes[logged.round] = logged
            self.held_bytes += logged.held
            self._enforce_cap()

    def note_reply(self, version: int, durable_version: int, snapshot_version: int = 0) -> None:
        """A push reply: the server's version when it answered, its durable version and the
        newest checkpoint it has taken. Pushes of durable rounds are forgotten."""
        with self._lock:
            if snapshot_version > max(self.durable_version, durable_version) and snapshot_version not in self._snapshots:
                self._snapshots.append(snapshot_version)
                self._snapshots.sort()
            self._forget_below(durable_version)
            # After the snapshot is noted: every checkpoint below this version is known now.
            self.closed_version = max(self.closed_version, version)
            self._enforce_cap()

    def forget_below(self, durable_version: int) -> None:
        """Drop the pushes of rounds the server can no longer lose (below its durable version)."""
        with self._lock:
            self._forget_below(durable_version)

    def _forget_below(self, durable_version: int) -> None:
        self.durable_version = max(self.durable_version, durable_version)
        while self._pushes:
            round_, logged = next(iter(self._pushes.items()))
            if round_ >= self.durable_version:
                break
            self._pushes.popitem(last=False)
            self.held_bytes -= logged.held
        self._snapshots = [s for s in self._snapshots if s > self.durable_version]
        # A sum whose rounds are all durable can no longer be lost.
        self._dropped = [d for d in self._dropped if d.last >= self.durable_version]

    def _enforce_cap(self) -> None:
        # Only rounds closed when the newest reply left the server: a push in flight may still
        # come back late or need a replay, and no checkpoint the worker has not heard of lies
        # below that version (see the module).
        while self.held_bytes > self.max_bytes and len(self._pushes) > 1:
            round_, oldest = next(iter(self._pushes.items()))
            if round_ >= self.closed_version:
                break
            self._pushes.popitem(last=False)
            self.held_bytes -= oldest.held
            self._accumulate(oldest)

    def _accumulate(self, dropped: LoggedPush) -> None:
        since = max([self.durable_version, *(s for s in self._snapshots if s <= dropped.round)])
        if not self._dropped or self._dropped[-1].since != since:
            self._dropped.append(DroppedRounds(since, dropped.round, dropped.round, None))
            if len(self._dropped) > MAX_DROPPED_SUMS:
                self._merge_oldest()
        into = self._dropped[-1]
        into.last = max(into.last, dropped.round)
        if dropped.update is None or self.trainable is None:
            return
        part = trainable_part(dropped.update, self.trainable)
        values = part.values.to(torch.float32)
        if into.values is None:
            into.values = torch.zeros(self.trainable, dtype=torch.float32, device=values.device)
        if part.indices is None:
            into.values[: values.numel()].add_(values)
        else:
            into.values.index_add_(0, part.indices.to(device=values.device, dtype=torch.long), values)

    def _merge_oldest(self) -> None:
        first, second = self._dropped[0], self._dropped[1]
        log.warning("push log: more than %d checkpoints pending; the dropped rounds %d-%d and %d-%d are summed "
                    "together", MAX_DROPPED_SUMS - 1, first.first, first.last, second.first, second.last)
        if first.values is not None and second.values is not None:
            second.values.add_(first.values)
        elif first.values is not None:
            second.values = first.values
        second.first, second.since = first.first, first.since
        del self._dropped[0]

    def take_lost(self, server_version: int, held_rounds: set[int]) -> Update | None:
        """After a reconnect: the summed update of the dropped rounds the server lost (at or
        above its version and not held in an open round), as a dense update over [0, T) for
        the error-feedback residual; None when it lost none of them. Forgets every sum.

        A sum is handed back whole when the server lost every round in it, and kept out when
        it lost none; one it lost only part of (not possible while the server reports its
        checkpoints, see the module) gets a warning and its mass is lost."""
        with self._lock:
            dropped, self._dropped, self._snapshots = self._dropped, [], []
        total: torch.Tensor | None = None
        for part in dropped:
            lost = [r for r in part.rounds() if r >= server_version and r not in held_rounds]
            if not lost:
                continue
            if len(lost) != len(part.rounds()):
                log.warning("rounds %d-%d were dropped from the push log over its cap and the server lost %d of "
                            "them (from round %d): their updates cannot be told apart and are lost",
                            part.first, part.last, len(lost), lost[0])
                continue
            if part.values is not None:
                total = part.values if total is None else total.add_(part.values)
        return None if total is None else Update(values=total, indices=None)

    def restart_at(self, server_version: int) -> None:
        """After a reconnect: the server is at `server_version` (a resumed one may be behind
        what this log saw closed); rounds from it on are not closed until they close again."""
        with self._lock:
            self.closed_version = server_version

    def get(self, round_: int) -> LoggedPush | None:
        with self._lock:
            return self._pushes.get(round_)

    def clear(self) -> None:
        """Forget every push and the durable version (a new membership starts over)."""
        with self._lock:
            self._pushes.clear()
            self.held_bytes = 0
            self.durable_version = 0
            self.closed_version = 0
            self._snapshots = []
            self._dropped = []
