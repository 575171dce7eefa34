"""Tensors <-> wire bytes, shared by every wanps process.

Wire rules (see docs/architecture.md):
- indices: uint32 little-endian, strictly increasing (sorted and unique), each < num_params;
- values: float32, float16 or bfloat16 little-endian (the header's value_dtype); 16-bit
  values are upcast to float32 on decode, so aggregation always runs in float32;
- random block (CODEC_RANDOM_BLOCK): values only, for [block_start, block_start + count);
- anything larger than CHUNK_ELEMENTS elements is sent as several chunks.

Decoding is zero-copy: `torch.frombuffer` over the received `bytes`. Indices are viewed
as int32 (valid because a model has fewer than 2**31 parameters, checked at join), which
is an index dtype torch accepts directly, so no conversion pass is needed.

`apply_delta` is the single definition of how a round's delta changes a model; the
server and every replica call it, which is what keeps replicas bit-identical.

Models may live on a GPU (docs/architecture.md, "Device placement"): the encoders accept
device tensors and copy only what is sent to the host (proto/staging.py), decoding stays on
the host, and `update_to_device` moves a decoded delta to the model's device in one copy.
`model_checksum` (proto/checksum.py) is computed where the model lives.
"""
from __future__ import annotations

import hashlib
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from wanps.proto import wanps_pb2 as pb
from wanps.proto.checksum import checksum_part, combine_checksums, model_checksum  # noqa: F401 (re-exported)
from wanps.proto.staging import DeviceStaging, host_tensors
from wanps.proto.wire import CHUNK_ELEMENTS, MAX_PARAMS, WireError

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("wanps's zero-copy codec assumes a little-endian host")


_VALUE_DTYPES: dict[int, torch.dtype] = {
    pb.VALUE_DTYPE_FLOAT32: torch.float32,
    pb.VALUE_DTYPE_FLOAT16: torch.float16,
    pb.VALUE_DTYPE_BFLOAT16: torch.bfloat16,
}
# The wire dtype a tensor's dtype is sent as (anything else is cast to float32).
_WIRE_DTYPE_OF: dict[torch.dtype, int] = {dtype: wire for wire, dtype in _VALUE_DTYPES.items()}
# What this build decodes.
SUPPORTED_VALUE_DTYPES = frozenset(_VALUE_DTYPES)
SUPPORTED_CODECS = frozenset({pb.CODEC_SPARSE, pb.CODEC_DENSE, pb.CODEC_RANDOM_BLOCK})


@dataclass(frozen=True)
class Update:
    """One update or delta on the wire: sparse (sorted unique `indices` with their `values`),
    dense (`indices` None: every element, in order) or a random block.

    `values` is float32 once decoded; a worker's update may hold float16/bfloat16 values,
    which is the dtype they travel in. A random-block update sets `block_start` and keeps
    `indices` = arange(block_start, block_start + count), so the server core aggregates it
    like any sparse update; the indices are never sent.
    """

    values: torch.Tensor  # float32 (float16/bfloat16 before encoding), 1-D
    indices: torch.Tensor | None  # int32, 1-D, sorted, unique; None = dense
    block_start: int | None = None  # set for a random block

    @property
    def count(self) -> int:
        return int(self.values.numel())

    @property
    def value_dtype(self) -> int:
        """The ValueDtype these values travel as."""
        return _WIRE_DTYPE_OF.get(self.values.dtype, pb.VALUE_DTYPE_FLOAT32)

    @property
    def codec(self) -> int:
        if self.block_start is not None:
            return pb.CODEC_RANDOM_BLOCK
        return pb.CODEC_DENSE if self.indices is None else pb.CODEC_SPARSE

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire."""
        index_bytes = 0 if self.codec != pb.CODEC_SPARSE else self.indices.numel() * 4  # type: ignore[union-attr]
        value_size = 4 if self.value_dtype == pb.VALUE_DTYPE_FLOAT32 else 2
        return index_bytes + self.values.numel() * value_size


# ---------------------------------------------------------------------------- encode


def index_bytes(indices: torch.Tensor) -> bytes:
    """int32/int64 indices (each < 2**31) -> uint32 LE bytes (device tensors: staged, see iter_chunks)."""
    return _raw(_on_host(indices.to(torch.int32)))


def value_bytes(values: torch.Tensor) -> bytes:
    """float16/bfloat16 values as they are (numpy has no bfloat16: viewed as int16), anything else as float32."""
    return _raw(_on_host(_wire_values(values)))


def _wire_values(values: torch.Tensor) -> torch.Tensor:
    """The values in the dtype they travel as (on their device; no copy when already so)."""
    return values if values.dtype in (torch.float16, torch.bfloat16) else values.to(torch.float32)


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor  # the CPU path: no copy before the bytes
    (host,) = host_tensors(tensor)
    assert host is not None
    return host


def _raw(host: torch.Tensor) -> bytes:
    """A host tensor's bytes (its one copy, into the `bytes` object)."""
    host = host.contiguous()
    if host.dtype in (torch.float16, torch.bfloat16):
        host = host.view(torch.int16)
    return host.numpy().tobytes()


def iter_chunks(values: torch.Tensor, indices: torch.Tensor | None) -> Iterator[tuple[bytes, bytes]]:
    """(index_bytes, value_bytes) pairs of at most CHUNK_ELEMENTS elements each.

    Always yields at least one pair, so an empty update is still one (empty) chunk.
    CPU tensors are read in place, as they are. Tensors on a device (a GPU model's
    selection) are converted to their wire dtypes there, copied to the host once (all of
    them, into reusable pinned memory: non-blocking copies, one synchronize) and their
    chunks' bytes taken at once, before the staging memory can be reused.
    """
    on_device = values.device.type != "cpu" or (indices is not None and indices.device.type != "cpu")
    if not on_device:
        yield from _host_chunks(values, indices)
        return
    wire_indices = None if indices is None else indices.to(torch.int32)
    host_values, host_indices = host_tensors(_wire_values(values), wire_indices)
    assert host_values is not None
    yield from list(_host_chunks(host_values, host_indices))


def _host_chunks(values: torch.Tensor, indices: torch.Tensor | None) -> Iterator[tuple[bytes, bytes]]:
    total = int(values.numel())
    start = 0
    while True:
        stop = min(start + CHUNK_ELEMENTS, total)
        idx = b"" if indices is None else index_bytes(indices[start:stop])
        yield idx, value_bytes(values[start:stop])
        start = stop
        if start >= total:
            return


def push_messages(header: pb.PushHeader, update: Update | None) -> tuple[list[pb.PushMessage], int]:
    """The message stream of one push (header, then chunks) and its payload bytes.

    `update` None is a skip record. Fills the header's codec, dtype, count and block start
    first: the header is copied into its message, so it must be complete by then.
    """
    header.skip = update is None
    chunks: list[pb.PushMessage] = []
    nbytes = 0
    if update is not None:
        header.codec = update.codec
        header.value_dtype = update.value_dtype
        header.count = update.count
        sent_indices = update.indices if header.codec == pb.CODEC_SPARSE else None
        if update.block_start is not None:
            header.block_start = update.block_start
        for index_raw, value_raw in iter_chunks(update.values, sent_indices):
            chunks.append(pb.PushMessage(chunk=pb.SparseChunk(indices=index_raw, values=value_raw)))
            nbytes += len(index_raw) + len(value_raw)
    return [pb.PushMessage(header=header), *chunks], nbytes


# ---------------------------------------------------------------------------- decode


def view_bytes(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A zero-copy tensor over received bytes (the wire contract: decoding never copies).

    torch warns that it cannot mark such a tensor read-only. Silenced here, at this call only:
    it is safe because nothing writes to a decoded tensor (the server's core only reads
    updates, and copies what it keeps; apply_delta reads the delta into the model; a worker
    copies a delta to its device or reads it), so the immutable bytes are never written through.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(raw, dtype=dtype)


def join_chunks(parts: list[bytes]) -> bytes:
    """One chunk needs no copy; several are concatenated once."""
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def decode_indices(raw: bytes, count: int, num_params: int) -> torch.Tensor:
    if len(raw) != 4 * count:
        raise WireError(f"indices: expected {count} uint32 ({4 * count} bytes), got {len(raw)} bytes")
    if count == 0:
        return torch.empty(0, dtype=torch.int32)
    # Viewed as int32: a uint32 >= 2**31 shows up negative and fails the range check.
    # Checked with numpy over the same memory: its per-call overhead is far below torch's for small arrays.
    view = np.frombuffer(raw, dtype="<i4")
    if count > 1 and not (view[1:] > view[:-1]).all():
        negative = view[view < 0]  # only on this error path: name the real problem
        if negative.size:
            raise WireError(f"indices: {int(negative[0]) + 2**32} is out of range for a model of {num_params} parameters")
        raise WireError("indices: must be strictly increasing (sorted, no duplicates)")
    indices = view_bytes(raw, torch.int32)
    first, last = int(view[0]), int(view[-1])
    if first < 0 or last >= num_params:
        bad = first if first < 0 else last
        shown = bad if bad >= 0 else bad + 2**32
        raise WireError(f"indices: {shown} is out of range for a model of {num_params} parameters")
    return indices


def _names(enum, values: frozenset[int]) -> str:
    return ", ".join(enum.Name(v) for v in sorted(values))


def decode_values(raw: bytes, count: int, value_dtype: int) -> torch.Tensor:
    """float32 values (zero-copy for float32; float16/bfloat16 are upcast, one k-sized copy)."""
    if value_dtype not in SUPPORTED_VALUE_DTYPES:
        name = pb.ValueDtype.Name(value_dtype) if value_dtype in pb.ValueDtype.values() else str(value_dtype)
        raise WireError(f"value_dtype {name} is not supported (supported: {_names(pb.ValueDtype, SUPPORTED_VALUE_DTYPES)})")
    dtype = _VALUE_DTYPES[value_dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(raw) != itemsize * count:
        raise WireError(f"values: expected {count} x {itemsize} bytes ({itemsize * count}), got {len(raw)} bytes")
    if count == 0:
        return torch.empty(0, dtype=torch.float32)
    if dtype == torch.float32:
        if not np.isfinite(np.frombuffer(raw, dtype="<f4")).all():
            raise WireError("values: NaN or infinite values are not accepted")
        return view_bytes(raw, dtype)
    # The server aggregates in float32: upcast here so the core never sees 16-bit values.
    values = view_bytes(raw, dtype).to(torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise WireError("values: NaN or infinite values are not accepted")
    return values


def decode_update(
    codec: int,
    value_dtype: int,
    count: int,
    index_raw: bytes,
    value_raw: bytes,
    num_params: int,
    block_start: int = 0,
) -> Update:
    """Validate and decode one update's joined bytes. Raises WireError, changes nothing."""
    if codec not in SUPPORTED_CODECS:
        name = pb.Codec.Name(codec) if codec in pb.Codec.values() else str(codec)
        raise WireError(f"codec {name} is not supported (supported: {_names(pb.Codec, SUPPORTED_CODECS)})")
    if codec == pb.CODEC_RANDOM_BLOCK:
        if index_raw:
            raise WireError("random-block update: must carry no indices")
        if block_start + count > num_params:
            raise WireError(f"random-block update: block [{block_start}, {block_start + count}) runs past "
                            f"the model's {num_params} parameters")
        values = decode_values(value_raw, count, value_dtype)
        # The core aggregates it as a sparse update; arange is k-sized, like a sparse push's indices.
        indices = torch.arange(block_start, block_start + count, dtype=torch.int32)
        return Update(values=values, indices=indices, block_start=block_start)
    if block_start:
        raise WireError(f"block_start is only meaningful for CODEC_RANDOM_BLOCK, got {block_start}")
    if codec == pb.CODEC_DENSE:
        if count != num_params:
            raise WireError(f"dense update: count {count} != model size {num_params}")
        if index_raw:
            raise WireError("dense update: must carry no indices")
        return Update(values=decode_values(value_raw, count, value_dtype), indices=None)
    if count > num_params:
        raise WireError(f"sparse update: count {count} exceeds model size {num_params}")
    indices = decode_indices(index_raw, count, num_params)
    values = decode_values(value_raw, count, value_dtype)
    return Update(values=values, indices=indices)


def decode_delta(index_raw: bytes, value_raw: bytes, count: int, num_params: int, dense: bool) -> Update:
    """A round's aggregated delta from the server (validated too: a replica trusts no one)."""
    return decode_update(
        pb.CODEC_DENSE if dense else pb.CODEC_SPARSE,
        pb.VALUE_DTYPE_FLOAT32,
        count,
        index_raw,
        value_raw,
        num_params,
    )


# ---------------------------------------------------------------------------- model


def fingerprint_of(named_shapes: list[tuple[str, tuple[int, ...], str]]) -> bytes:
    """Digest of a model's structure; every member's must match the seeder's (checked at Join)."""
    digest = hashlib.sha256()
    for name, shape, dtype in named_shapes:
        digest.update(f"{name}:{tuple(shape)}:{dtype};".encode())
    return digest.digest()


def apply_delta(model: torch.Tensor, delta: Update) -> None:
    """model -= delta, in place. The one definition every replica and the server share."""
    if delta.indices is None:
        model.sub_(delta.values)
    elif delta.count:
        model.index_add_(0, delta.indices, delta.values, alpha=-1.0)


def update_to_device(update: Update, staging: DeviceStaging) -> Update:
    """A decoded update (host tensors over the received bytes) on `staging`'s device, in one
    host -> device copy (indices and values packed together). On the CPU: `update` itself."""
    if staging.device.type == "cpu":
        return update
    if update.indices is None:
        (values,) = staging.to_device([update.values])
        return Update(values=values, indices=None, block_start=update.block_start)
    indices, values = staging.to_device([update.indices, update.values])
    return Update(values=values, indices=indices, block_start=update.block_start)


def model_crc32(model: torch.Tensor) -> int:
    """zlib's CRC-32 of a CPU model's float32 bytes. No longer on the wire (replicas compare
    `model_checksum`, computed where the model lives); kept as the benchmark's baseline."""
    return zlib.crc32(model.detach().contiguous().numpy().view("u1")) & 0xFFFFFFFF


def iter_model_chunks(model_bytes: bytes) -> Iterator[tuple[int, bytes]]:
    """(element offset, float32 bytes) slices of a model snapshot, CHUNK_ELEMENTS each."""
    view = memoryview(model_bytes)
    step = CHUNK_ELEMENTS * 4
    for start in range(0, max(len(view), 1), step):
        yield start // 4, bytes(view[start : start + step])
