"""The pushes a worker keeps for a replay after a lost connection. Pure: no network, no threads.

A push stays logged until the server says its round is durable (checkpointed: a restarted
server cannot lose it); a byte cap bounds the log in any case, dropping the oldest first.
The training thread appends while the I/O loop forgets, so every method takes the lock.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the log never looks inside a push
    from wanps.proto import codec
    from wanps.proto import wanps_pb2 as pb

# Payload bytes the log may hold; the newest push stays even when it alone is larger.
PUSH_LOG_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LoggedPush:
    round: int
    computed_at_version: int
    update: codec.Update | None  # None: a skip record
    messages: list[pb.PushMessage]  # as sent: a replay sends the same bytes
    nbytes: int


class PushLog:
    def __init__(self, max_bytes: int = PUSH_LOG_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.durable_version = 0  # rounds below it are on the server's disk
        self.nbytes = 0
        self._pushes: OrderedDict[int, LoggedPush] = OrderedDict()  # by round, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pushes)

    def append(self, logged: LoggedPush) -> None:
        """Keep `logged` (replacing an earlier push of the same round); drop the oldest over the cap."""
        with self._lock:
            old = self._pushes.pop(logged.round, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._pushes[logged.round] = logged
            self.nbytes += logged.nbytes
            while self.nbytes > self.max_bytes and len(self._pushes) > 1:
                _, dropped = self._pushes.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def forget_below(self, durable_version: int) -> None:
        """Drop the pushes of rounds the server can no longer lose (below its durable version)."""
        with self._lock:
            self.durable_version = max(self.durable_version, durable_version)
            while self._pushes:
                round_, logged = next(iter(self._pushes.items()))
                if round_ >= self.durable_version:
                    break
                self._pushes.popitem(last=False)
                self.nbytes -= logged.nbytes

    def get(self, round_: int) -> LoggedPush | None:
        with self._lock:
            return self._pushes.get(round_)

    def clear(self) -> None:
        """Forget every push and the durable version (a new membership starts over)."""
        with self._lock:
            self._pushes.clear()
            self.nbytes = 0
            self.durable_version = 0
