"""The user's tensors bound to the flat float32 replica (wanps.worker.layout orders it).

- float32 parameters are views of their slice of the replica (zero copy: deltas applied to
  the replica are what the model sees);
- bfloat16/float16 parameters are separate tensors; the float32 replica is their master and
  `refresh_parameters()` copies it into them at step boundaries. Their gradients are
  gathered into float32;
- buffers are never views: forward passes change them in place, which would break the
  replica's bit-identity. `load_buffers()` copies the replica's buffer range into them
  (integer ones rounded); `buffer_differences()` is what a buffer-sync push carries.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from wanps.proto.codec import Update
from wanps.worker.layout import BUFFER, FROZEN, INT_BUFFER, TRAINABLE, LayoutEntry, ModelLayout, ModelTensor


class ModelBinding:
    def __init__(self, layout: ModelLayout, tensors: Sequence[ModelTensor]) -> None:
        """`tensors` in layout order (wanps.worker.layout.layout_of)."""
        assert len(tensors) == len(layout.entries)
        self.layout = layout
        device = tensors[0].tensor.device if tensors else torch.device("cpu")
        self.flat = torch.empty(layout.size, dtype=torch.float32, device=device)
        with torch.no_grad():
            for entry, item in zip(layout.entries, tensors):
                self.flat[entry.slice].copy_(item.tensor.detach().reshape(-1))
        pairs = [(entry, item.tensor) for entry, item in zip(layout.entries, tensors)]
        self.trainable = [(e, t) for e, t in pairs if e.role == TRAINABLE]
        self.frozen = [(e, t) for e, t in pairs if e.role == FROZEN]
        self.buffers = [(e, t) for e, t in pairs if e.role in (BUFFER, INT_BUFFER)]
        self._pointed_elsewhere = False
        self._buffer_scratch: torch.Tensor | None = None
        for entry, p in self.trainable + self.frozen:
            if p.dtype == torch.float32:
                p.data = self.flat[entry.slice].view_as(p)

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def zero_copy(self) -> bool:
        """Every parameter is a view of the replica (a float32 model)."""
        return all(p.dtype == torch.float32 for _, p in self.trainable + self.frozen)

    # ------------------------------------------------------------------ parameters

    @torch.no_grad()
    def refresh_parameters(self, frozen: bool = False) -> None:
        """Copy the replica into the low-precision parameters (trainable; frozen ones too when
        asked: they change only when the replica is pulled). float32 ones are views already."""
        for entry, p in self.trainable + (self.frozen if frozen else []):
            if p.dtype != torch.float32:
                p.data.copy_(self.flat[entry.slice].view_as(p))

    @torch.no_grad()
    def show_trainable(self, values: torch.Tensor) -> None:
        """Let the model's trainable parameters hold `values` (T elements: DEF's detached
        point, SASG's anchor) without touching the replica: float32 parameters become views
        of `values`, low-precision ones get a copy. `show_replica()` undoes it."""
        for entry, p in self.trainable:
            if p.dtype == torch.float32:
                p.data = values[entry.slice].view_as(p)
            else:
                p.data.copy_(values[entry.slice].view_as(p))
        self._pointed_elsewhere = True

    @torch.no_grad()
    def show_replica(self) -> None:
        if not self._pointed_elsewhere:
            return
        for entry, p in self.trainable:
            if p.dtype == torch.float32:
                p.data = self.flat[entry.slice].view_as(p)
            else:
                p.data.copy_(self.flat[entry.slice].view_as(p))
        self._pointed_elsewhere = False

    @torch.no_grad()
    def gather_gradients(self, out: torch.Tensor) -> None:
        """out (T elements) = the trainable parameters' gradients (zero where there is none),
        float32. One copy per tensor."""
        for entry, p in self.trainable:
            view = out[entry.slice]
            grad = p.grad
            if grad is None:
                view.zero_()
                continue
            if grad.layout != torch.strided:
                raise RuntimeError(f"{_shown(entry)} has a sparse gradient ({grad.layout}); wanps gathers dense "
                                   "gradients (build embeddings with sparse=False)")
            view.copy_(grad.reshape(-1))
        for entry, p in self.frozen:
            if p.grad is not None:
                raise RuntimeError(f"{_shown(entry)} was frozen when the optimizer was built (requires_grad=False) "
                                   "and now has a gradient: the replicated layout is fixed at construction, so "
                                   "build a new optimizer (and cluster) to train it")

    # ------------------------------------------------------------------ buffers

    @torch.no_grad()
    def load_buffers(self) -> None:
        """The module's buffers = the replica's buffer range (integer ones rounded)."""
        for entry, b in self.buffers:
            values = self.flat[entry.slice].view(b.shape)
            if entry.role == INT_BUFFER:
                values = values.round()
            b.copy_(values)

    @torch.no_grad()
    def buffer_differences(self) -> Update:
        """replica - local for every buffer element where they differ, as a sparse update of
        the whole vector: the server's mean of every worker's then leaves the replica at the
        mean of the workers' local buffers."""
        start = self.layout.buffer_start
        if self._buffer_scratch is None:
            self._buffer_scratch = torch.empty(self.layout.size - start, dtype=torch.float32, device=self.device)
        local = self._buffer_scratch
        for entry, b in self.buffers:
            local[entry.offset - start : entry.stop - start].copy_(b.detach().reshape(-1))
        difference = torch.sub(self.flat[start:], local, out=local)
        where = torch.nonzero(difference).reshape(-1)
        return Update(values=difference.index_select(0, where), indices=(where + start).to(torch.int32))


def _shown(entry: LayoutEntry) -> str:
    return f"parameter {entry.name!r}" if entry.name else f"an unnamed parameter {tuple(entry.shape)}"
