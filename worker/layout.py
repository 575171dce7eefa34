"""The replicated vector: which tensor of the user's model lives where. Pure.

A worker replicates one flat float32 vector, ordered

    [ trainable parameters | frozen parameters | floating buffers | integer buffers ]
      0 ................ T   ................ T+F  ............... B_int ........... d

- trainable parameters (requires_grad) are what the worker pushes: compression, k and the
  size reported to the controller (DeCo's S_g) see only [0, T);
- frozen parameters are seeded, pulled and never pushed;
- floating buffers (BatchNorm's running statistics) and integer or boolean buffers
  (num_batches_tracked) are averaged over the workers every few rounds (the optimizer's
  buffer sync). Integer buffers are held as float32, exact up to 2**24 (larger values are
  refused at construction and would be rounded later).

The server's model is that whole vector, so seeding, pulls, checkpoints and observers carry
frozen parameters and buffers with no server change. `ModelLayout` knows names, shapes,
dtypes, roles and offsets, and nothing about tensors' memory: `collect_module` and
`collect_parameters` find (and check) the tensors, wanps.worker.binding binds them.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wanps.proto import structure as structures
from wanps.proto.codec import Update
from wanps.proto.structure import BUFFER, FROZEN, INT_BUFFER, ROLES, TRAINABLE, TensorSpec

__all__ = ["BUFFER", "FROZEN", "INT_BUFFER", "TRAINABLE", "LayoutEntry", "ModelLayout", "ModelMismatch", "ModelTensor",
           "collect_module", "collect_parameters", "layout_of", "trainable_part", "with_buffers", "widen"]

#: Parameter dtypes a float32 master replica holds exactly (float64 would be rounded).
PARAMETER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Integer buffers are held as float32: exact up to here.
INT_BUFFER_LIMIT = 2**24


@dataclass(frozen=True)
class LayoutEntry:
    name: str  # "" when the tensor came without a name (parameters passed without their module)
    shape: tuple[int, ...]
    dtype: torch.dtype  # the model tensor's dtype; the replica holds float32
    role: str
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.stop)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, tuple(self.shape), str(self.dtype), self.role)

    def describe(self) -> str:
        return self.spec.describe()


class ModelLayout:
    """Entries in layout order with their offsets; `order[i]` is the index, in the input
    given to the constructor, of the tensor at layout position i (a stable sort by role)."""

    def __init__(self, tensors: Iterable[tuple[str, Sequence[int], torch.dtype, str]]) -> None:
        given = list(tensors)
        for name, _, _, role in given:
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} for {name!r}")
        self.order: tuple[int, ...] = tuple(sorted(range(len(given)), key=lambda i: ROLES.index(given[i][3])))
        entries = []
        offset = 0
        for i in self.order:
            name, shape, dtype, role = given[i]
            entry = LayoutEntry(name, tuple(int(s) for s in shape), dtype, role, offset)
            entries.append(entry)
            offset += entry.numel
        self.entries: tuple[LayoutEntry, ...] = tuple(entries)
        self.size = offset

        def end_of(role: str) -> int:
            ends = [e.stop for e in self.entries if ROLES.index(e.role) <= ROLES.index(role)]
            return max(ends, default=0)

        self.trainable = end_of(TRAINABLE)  # T: [0, T) is pushed
        self.frozen_stop = end_of(FROZEN)  # [T, frozen_stop) frozen parameters
        self.buffer_start = self.frozen_stop  # [buffer_start, size) buffers, floating then integer
        self.int_buffer_start = end_of(BUFFER)

    def with_role(self, *roles: str) -> tuple[LayoutEntry, ...]:
        return tuple(e for e in self.entries if e.role in roles)

    @property
    def buffer_elements(self) -> int:
        return self.size - self.buffer_start

    @property
    def has_buffers(self) -> bool:
        return any(e.role in (BUFFER, INT_BUFFER) for e in self.entries)

    @property
    def structure(self) -> tuple[TensorSpec, ...]:
        return tuple(e.spec for e in self.entries)

    def fingerprint(self) -> bytes:
        return structures.fingerprint(self.structure)

    def first_difference(self, other: ModelLayout | Sequence[TensorSpec]) -> str | None:
        """Compared as the server compares a joining model (`other`) with the cluster's (self)."""
        theirs = other.structure if isinstance(other, ModelLayout) else tuple(other)
        return structures.first_difference(self.structure, theirs)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (f"ModelLayout({len(self.entries)} tensors, {self.size} elements: {self.trainable} trainable, "
                f"{self.frozen_stop - self.trainable} frozen, {self.buffer_elements} in buffers)")


class ModelMismatch(ValueError):
    """The cluster trains a model of another structure; the message names the first tensor that differs."""


# ---------------------------------------------------------------------------- the user's tensors


@dataclass(frozen=True)
class ModelTensor:
    name: str
    tensor: torch.Tensor
    role: str


def _check_parameter(name: str, p: torch.Tensor) -> None:
    shown = repr(name) if name else "a parameter"
    if not p.is_floating_point():
        raise ValueError(f"{shown} is {p.dtype}: wanps replicates floating-point parameters "
                         "(float32, bfloat16 or float16)")
    if p.dtype not in PARAMETER_DTYPES:
        raise ValueError(f"{shown} is {p.dtype}: the float32 master replica would round it; "
                         "convert the model (model.float()) or use float32, bfloat16 or float16")
    if p.layout != torch.strided:
        raise ValueError(f"{shown} is a sparse tensor ({p.layout}); wanps replicates dense parameters")


def _buffer_role(name: str, b: torch.Tensor) -> str:
    if b.layout != torch.strided:
        raise ValueError(f"buffer {name!r} is a sparse tensor ({b.layout}); wanps replicates dense buffers")
    if b.is_floating_point():
        if b.dtype not in PARAMETER_DTYPES:
            raise ValueError(f"buffer {name!r} is {b.dtype}: the float32 replica would round it; "
                             "convert the model (model.float()) or use float32, bfloat16 or float16")
        return BUFFER
    if b.is_complex():
        raise ValueError(f"buffer {name!r} is {b.dtype}: wanps replicates real buffers only")
    if b.numel() and b.dtype != torch.bool and int(b.detach().abs().max()) > INT_BUFFER_LIMIT:
        raise ValueError(f"buffer {name!r} holds integers beyond 2**24, which a float32 replica cannot hold "
                         "exactly")
    return INT_BUFFER


def _check_one_device(tensors: Sequence[ModelTensor]) -> None:
    first: ModelTensor | None = None
    for item in tensors:
        if first is None:
            first = item
        elif item.tensor.device != first.tensor.device:
            name = repr(item.name) if item.name else "a parameter"
            first_name = repr(first.name) if first.name else "another parameter"
            raise ValueError(f"{name} is on {item.tensor.device} but {first_name} is on {first.tensor.device}: "
                             "wanps replicates a model that lives on one device; move it there first")


def collect_module(module: nn.Module) -> list[ModelTensor]:
    """Every parameter (trainable: requires_grad, or frozen) and every persistent buffer of
    `module`, with its name, checked. Non-persistent buffers (not in state_dict(): derived
    constants such as attention masks) are the module's own and are not replicated."""
    tensors: list[ModelTensor] = []
    for name, p in module.named_parameters():
        _check_parameter(name, p)
        tensors.append(ModelTensor(name, p, TRAINABLE if p.requires_grad else FROZEN))
    for name, b in _persistent_buffers(module):
        tensors.append(ModelTensor(name, b, _buffer_role(name, b)))
    _check_one_device(tensors)
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.sparse and sub.weight.requires_grad:
            shown = repr(name) if name else "the module"
            raise ValueError(f"{shown} is an embedding with sparse=True: its gradients are sparse tensors, and "
                             "wanps gathers dense gradients; build it with sparse=False")
    return tensors


def _persistent_buffers(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    for name, b in module.named_buffers():
        owner_name, _, local = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if local in owner._non_persistent_buffers_set:
            continue
        yield name, b


def collect_parameters(groups: Sequence[dict]) -> list[ModelTensor]:
    """The parameters of torch param groups, in group order, checked. Names come from
    `param_names` (torch fills it when given `model.named_parameters()`), otherwise they
    are empty. A parameter with requires_grad=False is frozen: seeded, never pushed."""
    tensors: list[ModelTensor] = []
    for group in groups:
        names = group.get("param_names") or [""] * len(group["params"])
        for name, p in zip(names, group["params"]):
            _check_parameter(name, p)
            tensors.append(ModelTensor(name, p, TRAINABLE if p.requires_grad else FROZEN))
    _check_one_device(tensors)
    return tensors


def layout_of(tensors: Sequence[ModelTensor]) -> tuple[ModelLayout, list[ModelTensor]]:
    """The layout of these tensors and the tensors in layout order."""
    layout = ModelLayout((t.name, tuple(t.tensor.shape), t.tensor.dtype, t.role) for t in tensors)
    return layout, [tensors[i] for i in layout.order]


# ---------------------------------------------------------------------------- updates over the layout


def _cut(indices: torch.Tensor, bound: int) -> int:
    """How many of these sorted indices are below `bound`."""
    return int(torch.searchsorted(indices, torch.tensor([bound], dtype=indices.dtype, device=indices.device)))


def trainable_part(update: Update, trainable: int) -> Update:
    """The elements of an update (or delta) in [0, T): what error feedback and SASG see."""
    if update.indices is None:
        return Update(values=update.values[:trainable], indices=None)
    cut = _cut(update.indices, trainable)
    if cut == update.count:
        return update
    return Update(values=update.values[:cut], indices=update.indices[:cut])


def widen(update: Update, layout: ModelLayout) -> Update:
    """A T-sized update from the update rule as an update of the whole vector. Sparse and
    block updates already index into [0, T); a dense one (values for [0, T)) becomes dense over
    the whole vector (zeros elsewhere: x - 0 == x) or sparse, whichever is smaller."""
    return with_buffers(update, layout, None)


def with_buffers(update: Update | None, layout: ModelLayout, buffers: Update | None) -> Update:
    """`update` (over [0, T), or None for nothing) plus `buffers` (sparse, indices in
    [buffer_start, size), float32): one push over the whole vector, indices sorted.

    With buffers, 16-bit values are sent as float32 (exact: they came from float32), so the
    buffer values are not rounded."""
    d, t = layout.size, layout.trainable
    if update is None:
        update = Update(values=torch.empty(0, dtype=torch.float32, device=_device(buffers)),
                        indices=torch.empty(0, dtype=torch.int32, device=_device(buffers)))
    if buffers is None:
        if update.indices is not None or update.count == d:
            return update
        if 4 * d <= 8 * t:
            values = torch.zeros(d, dtype=torch.float32, device=update.values.device)
            values[:t] = update.values
            return Update(values=values, indices=None)
        indices = torch.arange(t, dtype=torch.int32, device=update.values.device)
        return Update(values=update.values, indices=indices)
    buffer_values = buffers.values.to(torch.float32)
    assert buffers.indices is not None
    if update.indices is None:  # dense over [0, T)
        if 4 * d <= 8 * (t + buffers.count):
            values = torch.zeros(d, dtype=torch.float32, device=update.values.device)
            values[:t] = update.values
            values[buffers.indices.long()] = buffer_values
            return Update(values=values, indices=None)
        indices = torch.arange(t, dtype=torch.int32, device=update.values.device)
    else:
        indices = update.indices.to(torch.int32)
    return Update(values=torch.cat([update.values.to(torch.float32), buffer_values]),
                  indices=torch.cat([indices, buffers.indices.to(torch.int32)]))


def _device(update: Update | None) -> torch.device | None:
    return None if update is None else update.values.device
