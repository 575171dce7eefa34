"""A local replica of the server's model and the rule for moving it forward.

The replica lives where the model's parameters live (CPU or GPU). Deltas arrive decoded on
the host; each crosses to the replica's device in one copy (`codec.update_to_device`) and is
applied there with `codec.apply_delta`; the checksum the server sends is compared with
`codec.model_checksum` computed on the device, so no full copy of the model ever leaves it.
"""
from __future__ import annotations

import queue
import time
from collections.abc import Callable

import torch

from wanps.proto import codec
from wanps.proto.staging import DeviceStaging
from wanps.worker.io_loop import Interrupted
from wanps.worker.recovery import ConnectionLost
from wanps.worker.session import ReceivedDelta, ReplicaDiverged


class Replica:
    """The flat float32 model at `version`, advanced only by the server's deltas, in order."""

    def __init__(self, values: torch.Tensor, version: int) -> None:
        self.values = values
        self.version = version
        self._to_device = DeviceStaging(values.device)  # reusable (pinned on CUDA) staging for deltas
        # Observers may keep every delta they applied (tests use it to check conservation).
        self.applied: list[ReceivedDelta] | None = None
        # Called after each applied delta (SASG records the model's step norms).
        self.on_apply: Callable[[ReceivedDelta], None] | None = None
        # The last delta applied was a compressed follower's own round (server/downlink.py):
        # the replica may differ from the model, so a recovery must pull. A pull clears it.
        self.compressed = False
        # Seconds spent blocked waiting for deltas, in total (the optimizer's overhead leaves it out).
        self.blocked_s = 0.0

    def apply(self, item: ReceivedDelta | BaseException) -> None:
        if isinstance(item, (ConnectionLost, Interrupted)):
            raise item  # lost: the owner recovers (WorkerSession.recover) and waits again; interrupted: it stops
        if isinstance(item, BaseException):
            raise RuntimeError("the update stream from the server failed") from item
        if item.version != self.version + 1:
            raise ReplicaDiverged(f"received version {item.version} while at {self.version}")
        codec.apply_delta(self.values, codec.update_to_device(item.delta, self._to_device))
        self.version = item.version
        self.compressed = item.downlink_delta > 0
        if item.model_checksum is not None and codec.model_checksum(self.values) != item.model_checksum:
            raise ReplicaDiverged(f"replica checksum differs from the server's at version {self.version}")
        if self.applied is not None:
            self.applied.append(item)
        if self.on_apply is not None:
            self.on_apply(item)

    def catch_up(
        self,
        deltas: queue.Queue,
        min_version: int,
        deadline: float | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> int:
        """Apply every delta already received; block (until `deadline`) while below min_version."""
        self.blocked_s += apply_until(deltas, lambda: self.version >= min_version, self.apply, deadline, on_idle)
        return self.version


def apply_until(deltas: queue.Queue, reached: Callable[[], bool], apply: Callable[[object], None],
                deadline: float | None = None, on_idle: Callable[[], None] | None = None) -> float:
    """Apply every delta already received (`apply`); block, waking each second for `on_idle`,
    until `reached()` or `deadline` (time.monotonic()). A single replica and a sharded one
    (worker/shards.py) move forward by this one loop. Returns the seconds it spent blocked
    (waiting for a delta, not applying one): the worker's overhead is its time less this."""
    blocked = 0.0
    while True:
        block = not reached() and (deadline is None or time.monotonic() < deadline)
        try:
            if block:
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                waiting_since = time.monotonic()
                try:
                    item = deltas.get(timeout=wait)
                finally:
                    blocked += time.monotonic() - waiting_since
            else:
                item = deltas.get_nowait()
        except queue.Empty:
            if not block:
                return blocked
            if on_idle is not None:
                on_idle()
            continue
        apply(item)
