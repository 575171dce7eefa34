"""Moving wire tensors between the host, where bytes are, and the device a model lives on.

Only what travels crosses: a push's selected indices and values go device -> host before
they become bytes, a round's received delta goes host -> device before it is applied.
CPU tensors never move (the codec's zero-copy CPU path is unchanged).

- `HostStaging.to_host`: device tensors copied into one reusable host buffer (pinned for
  CUDA: the copies are asynchronous, `non_blocking`, and one synchronize waits for all of
  them). The returned host tensors are views of that buffer: take their bytes before the
  next call on the same thread (each thread has its own buffer, `host_tensors`).
- `DeviceStaging.to_device`: host tensors packed into one reusable (pinned for CUDA) host
  buffer and copied to the device in ONE copy, then viewed there. The buffer is not
  rewritten until the previous copy has finished (a CUDA event).

`pack_layout`, `pack` and `unpack` are the packing itself, pure and testable on any device.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

_ALIGN = 16  # bytes; every packed tensor starts at a multiple (any dtype's alignment)


def pack_layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of `tensors` packed one after another (aligned), and the total size."""
    offsets, size = [], 0
    for tensor in tensors:
        offsets.append(size)
        size += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return offsets, size


def unpack(buffer: torch.Tensor, like: Sequence[torch.Tensor], offsets: Sequence[int]) -> list[torch.Tensor]:
    """Views of a uint8 `buffer` with the dtypes and shapes of `like`, at `offsets`."""
    views = []
    for tensor, offset in zip(like, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        views.append(buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape))
    return views


def pack(buffer: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: Sequence[int],
         non_blocking: bool = False) -> list[torch.Tensor]:
    """Copy `tensors` into a uint8 `buffer` at `offsets`; returns their views in it."""
    views = unpack(buffer, tensors, offsets)
    for view, tensor in zip(views, tensors):
        view.copy_(tensor, non_blocking=non_blocking)
    return views


class _Reusable:
    """A uint8 host buffer that only grows (pinned when asked)."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, size: int) -> torch.Tensor:
        if self.buffer.numel() < size:
            capacity = max(size, 2 * self.buffer.numel(), 4096)
            self.buffer = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pin)
        return self.buffer


class HostStaging:
    """Device -> host for the codec's encoders (see the module)."""

    def __init__(self) -> None:
        self._pinned: _Reusable | None = None

    def to_host(self, tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        moving = [t for t in tensors if t is not None and t.device.type != "cpu"]
        if not moving:
            return list(tensors)
        device = moving[0].device
        if any(t.device != device for t in moving):
            raise ValueError(f"tensors of one update on several devices: {sorted({str(t.device) for t in moving})}")
        if device.type != "cuda":  # another accelerator: a plain (blocking) copy each
            return [None if t is None else t.cpu() for t in tensors]
        if self._pinned is None:
            self._pinned = _Reusable(pin=True)
        offsets, size = pack_layout(moving)
        views = iter(pack(self._pinned.get(size), moving, offsets, non_blocking=True))
        torch.cuda.current_stream(device).synchronize()  # the one wait for every copy above
        return [t if t is None or t.device.type == "cpu" else next(views) for t in tensors]


_per_thread = threading.local()


def host_tensors(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """`tensors` on the host: CPU ones as they are, device ones through this thread's staging."""
    staging = getattr(_per_thread, "staging", None)
    if staging is None:
        staging = _per_thread.staging = HostStaging()
    return staging.to_host(tensors)


class DeviceStaging:
    """Host -> one device, one copy per call (see the module). One per consumer thread."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._host = _Reusable(pin=self._cuda)
        self._copied: torch.cuda.Event | None = None

    def to_device(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return list(tensors)
        offsets, size = pack_layout(tensors)
        if size == 0:
            return [t.to(self.device) for t in tensors]
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of the staging buffer has finished
        host = self._host.get(size)
        pack(host, tensors, offsets)
        # A fresh device buffer (from the caching allocator): the views handed out stay valid.
        on_device = torch.empty(size, dtype=torch.uint8, device=self.device)
        on_device.copy_(host[:size], non_blocking=self._cuda)
        if self._cuda:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))
        return unpack(on_device, tensors, offsets)
