"""A model's structure as both sides of a Join see it: one `TensorSpec` per tensor.

The worker's layout (wanps.worker.layout) orders the replicated float32 vector as
[trainable parameters | frozen parameters | floating buffers | integer buffers]; its
structure is the list of those tensors in that order, with name, shape, the model's dtype
and role. The fingerprint digests it, and the JoinRequest carries it, so the server can
refuse a different model by naming the first tensor that differs.

A worker that passed tensors without names (`Optimizer(model.parameters())`) sends empty
names: such an entry matches any name at its position (shapes, dtypes and roles must still
be equal), so it can share a cluster with workers and observers that passed the module.

Torch-free: the server and the rpc layer use it too.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wanps.proto import wanps_pb2 as pb

TRAINABLE = "trainable"
FROZEN = "frozen"
BUFFER = "buffer"
INT_BUFFER = "int-buffer"
#: In layout order: the replicated vector holds the roles in this order.
ROLES = (TRAINABLE, FROZEN, BUFFER, INT_BUFFER)

_ROLE_TO_WIRE = {
    TRAINABLE: pb.TENSOR_ROLE_TRAINABLE,
    FROZEN: pb.TENSOR_ROLE_FROZEN,
    BUFFER: pb.TENSOR_ROLE_BUFFER,
    INT_BUFFER: pb.TENSOR_ROLE_INT_BUFFER,
}
_ROLE_FROM_WIRE = {wire: role for role, wire in _ROLE_TO_WIRE.items()}
MAX_NAME_CHARS = 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "" = unnamed (matches any name at its position)
    shape: tuple[int, ...]
    dtype: str  # the model tensor's dtype, as str(torch.dtype): "torch.float32"
    role: str  # one of ROLES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        name = repr(self.name) if self.name else "an unnamed tensor"
        dtype = self.dtype.removeprefix("torch.")
        return f"{name} {tuple(self.shape)} {dtype} {self.role}"


def fingerprint(specs: Iterable[TensorSpec]) -> bytes:
    """SHA-256 of names, shapes, dtypes and roles, in layout order."""
    digest = hashlib.sha256(b"wanps-structure-1;")
    for spec in specs:
        digest.update(f"{spec.name}:{tuple(spec.shape)}:{spec.dtype}:{spec.role};".encode())
    return digest.digest()


def _same(cluster: TensorSpec, joining: TensorSpec) -> bool:
    names_match = not cluster.name or not joining.name or cluster.name == joining.name
    return (names_match and tuple(cluster.shape) == tuple(joining.shape) and cluster.dtype == joining.dtype
            and cluster.role == joining.role)


def first_difference(cluster: Sequence[TensorSpec], joining: Sequence[TensorSpec]) -> str | None:
    """None when the structures match; otherwise a sentence naming the first tensor that differs."""
    for position, (ours, theirs) in enumerate(zip(cluster, joining)):
        if not _same(ours, theirs):
            return (f"tensor {position} of the layout: the cluster has {ours.describe()}, "
                    f"this model has {theirs.describe()}")
    if len(cluster) > len(joining):
        return (f"the cluster's model has {len(cluster)} tensors, this one {len(joining)}: "
                f"this model lacks {cluster[len(joining)].describe()} (tensor {len(joining)} of the layout)")
    if len(joining) > len(cluster):
        return (f"the cluster's model has {len(cluster)} tensors, this one {len(joining)}: "
                f"the cluster has nothing for {joining[len(cluster)].describe()} (tensor {len(cluster)} of the layout)")
    return None


def problem_with(specs: Sequence[TensorSpec], num_params: int, model_fingerprint: bytes) -> str | None:
    """Why a structure sent with a Join cannot be right, or None."""
    for position, spec in enumerate(specs):
        if spec.role not in ROLES:
            return f"structure: tensor {position} has no valid role"
        if len(spec.name) > MAX_NAME_CHARS:
            return f"structure: tensor {position}'s name is longer than {MAX_NAME_CHARS} characters"
    total = sum(spec.numel for spec in specs)
    if total != num_params:
        return f"structure: its tensors hold {total} elements, num_params is {num_params}"
    if fingerprint(specs) != model_fingerprint:
        return "structure: model_fingerprint is not the digest of the structure sent with it"
    return None


# ---------------------------------------------------------------------------- wire


def to_messages(specs: Iterable[TensorSpec]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype, role=_ROLE_TO_WIRE[s.role])
            for s in specs]


def from_messages(messages: Iterable[pb.TensorSpec]) -> tuple[TensorSpec, ...]:
    """Unknown roles become "" (refused by `problem_with`)."""
    return tuple(TensorSpec(name=m.name, shape=tuple(int(n) for n in m.shape), dtype=m.dtype,
                            role=_ROLE_FROM_WIRE.get(m.role, "")) for m in messages)


# ---------------------------------------------------------------------------- checkpoints


def to_data(specs: Sequence[TensorSpec] | None) -> list[list] | None:
    """Plain data (for a checkpoint)."""
    return None if specs is None else [[s.name, list(s.shape), s.dtype, s.role] for s in specs]


def from_data(data: list[list] | None) -> tuple[TensorSpec, ...] | None:
    if data is None:
        return None
    return tuple(TensorSpec(name=str(n), shape=tuple(int(x) for x in shape), dtype=str(d), role=str(r))
                 for n, shape, d, r in data)
