"""Unit tests of the wire codec (wanps.proto.codec): pure tensor <-> bytes code, no network."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.proto.codec import (
    CHUNK_ELEMENTS,
    Update,
    WireError,
    apply_delta,
    decode_delta,
    decode_update,
    iter_chunks,
    iter_model_chunks,
    join_chunks,
    model_crc32,
)

SPARSE, DENSE = pb.CODEC_SPARSE, pb.CODEC_DENSE
F32 = pb.VALUE_DTYPE_FLOAT32


def u32(values: list[int]) -> bytes:
    return np.array(values, dtype="<u4").tobytes()


def f32(values: list[float]) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


def address_of(raw: bytes) -> int:
    """Address of the first byte of a bytes object's buffer (numpy views it without copying)."""
    return np.frombuffer(raw, dtype=np.uint8).ctypes.data


def encode(values: torch.Tensor, indices: torch.Tensor | None) -> tuple[list[bytes], list[bytes]]:
    chunks = list(iter_chunks(values, indices))
    return [c[0] for c in chunks], [c[1] for c in chunks]


def roundtrip(values: torch.Tensor, indices: torch.Tensor | None, num_params: int) -> Update:
    index_parts, value_parts = encode(values, indices)
    return decode_update(
        DENSE if indices is None else SPARSE,
        F32,
        int(values.numel()),
        join_chunks(index_parts),
        join_chunks(value_parts),
        num_params,
    )


# ------------------------------------------------------------------------------ round trips


def test_sparse_roundtrip_single_chunk() -> None:
    values = torch.tensor([1.5, -2.25, 3.0e-8, 7.0], dtype=torch.float32)
    indices = torch.tensor([0, 3, 8, 9], dtype=torch.int64)
    index_parts, value_parts = encode(values, indices)
    assert len(index_parts) == 1
    assert index_parts[0] == u32([0, 3, 8, 9])
    assert value_parts[0] == f32([1.5, -2.25, 3.0e-8, 7.0])
    decoded = roundtrip(values, indices, num_params=10)
    assert decoded.indices is not None
    assert decoded.indices.dtype == torch.int32
    assert decoded.values.dtype == torch.float32
    assert decoded.indices.tolist() == [0, 3, 8, 9]
    assert torch.equal(decoded.values, values)
    assert decoded.count == 4
    assert decoded.nbytes == 4 * 4 + 4 * 4


def test_sparse_roundtrip_multi_chunk() -> None:
    num_params = 3 * CHUNK_ELEMENTS
    count = 2 * CHUNK_ELEMENTS + 5
    gen = torch.Generator().manual_seed(1)
    indices = torch.randperm(num_params, generator=gen)[:count].sort().values
    values = torch.randn(count, generator=gen)
    index_parts, value_parts = encode(values, indices)
    assert [len(p) // 4 for p in index_parts] == [CHUNK_ELEMENTS, CHUNK_ELEMENTS, 5]
    assert [len(p) // 4 for p in value_parts] == [CHUNK_ELEMENTS, CHUNK_ELEMENTS, 5]
    decoded = roundtrip(values, indices, num_params)
    assert decoded.indices is not None
    assert torch.equal(decoded.indices.long(), indices)
    assert torch.equal(decoded.values, values)


@pytest.mark.parametrize(("count", "chunks"), [(1, 1), (CHUNK_ELEMENTS - 1, 1), (CHUNK_ELEMENTS, 1), (CHUNK_ELEMENTS + 1, 2)])
def test_chunk_boundaries(count: int, chunks: int) -> None:
    values = torch.arange(count, dtype=torch.float32)
    got = list(iter_chunks(values, torch.arange(count)))
    assert len(got) == chunks
    assert sum(len(v) for _, v in got) == 4 * count
    assert all(len(i) == len(v) <= 4 * CHUNK_ELEMENTS for i, v in got)


def test_dense_roundtrip_multi_chunk() -> None:
    num_params = CHUNK_ELEMENTS + 3
    values = torch.randn(num_params, generator=torch.Generator().manual_seed(2))
    index_parts, value_parts = encode(values, None)
    assert index_parts == [b"", b""]
    assert [len(p) // 4 for p in value_parts] == [CHUNK_ELEMENTS, 3]
    decoded = roundtrip(values, None, num_params)
    assert decoded.indices is None
    assert torch.equal(decoded.values, values)
    assert decoded.nbytes == 4 * num_params


def test_empty_update_is_one_empty_chunk_and_decodes() -> None:
    values = torch.empty(0, dtype=torch.float32)
    indices = torch.empty(0, dtype=torch.int32)
    assert list(iter_chunks(values, indices)) == [(b"", b"")]
    decoded = roundtrip(values, indices, num_params=10)
    assert decoded.indices is not None and decoded.indices.numel() == 0
    assert decoded.values.numel() == 0
    assert decoded.count == 0 and decoded.nbytes == 0
    model = torch.arange(10, dtype=torch.float32)
    apply_delta(model, decoded)
    assert torch.equal(model, torch.arange(10, dtype=torch.float32))


def test_encode_converts_dtypes() -> None:
    # float64 values and int64 indices go out as float32 / uint32.
    idx, val = next(iter_chunks(torch.tensor([0.5, 2.0], dtype=torch.float64), torch.tensor([2, 7], dtype=torch.int64)))
    assert idx == u32([2, 7])
    assert val == f32([0.5, 2.0])


def test_decode_delta_sparse_and_dense() -> None:
    sparse = decode_delta(u32([1, 4]), f32([0.5, -1.0]), 2, 6, dense=False)
    assert sparse.indices is not None and sparse.indices.tolist() == [1, 4]
    assert sparse.values.tolist() == [0.5, -1.0]
    dense = decode_delta(b"", f32([1, 2, 3]), 3, 3, dense=True)
    assert dense.indices is None and dense.values.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(WireError, match="out of range"):
        decode_delta(u32([6]), f32([1.0]), 1, 6, dense=False)


# ------------------------------------------------------------------------------ zero copy


def test_join_chunks_single_part_is_not_copied() -> None:
    raw = f32([1.0, 2.0])
    assert join_chunks([raw]) is raw
    assert join_chunks([f32([1.0]), f32([2.0])]) == raw


def test_decode_is_zero_copy_for_one_chunk() -> None:
    index_raw = u32([2, 5, 7])
    value_raw = f32([1.0, -2.0, 4.0])
    joined_i, joined_v = join_chunks([index_raw]), join_chunks([value_raw])
    decoded = decode_update(SPARSE, F32, 3, joined_i, joined_v, num_params=8)
    assert decoded.indices is not None
    assert decoded.values.data_ptr() == address_of(value_raw)
    assert decoded.indices.data_ptr() == address_of(index_raw)
    dense_raw = f32([1.0, 2.0, 3.0])
    dense = decode_update(DENSE, F32, 3, b"", join_chunks([dense_raw]), num_params=3)
    assert dense.values.data_ptr() == address_of(dense_raw)


# ------------------------------------------------------------------------------ rejections


def test_index_length_mismatch() -> None:
    with pytest.raises(WireError, match=r"indices: expected 3 uint32 \(12 bytes\), got 8 bytes"):
        decode_update(SPARSE, F32, 3, u32([1, 2]), f32([1, 2, 3]), 10)


def test_value_length_mismatch() -> None:
    with pytest.raises(WireError, match=r"values: expected 3 x 4 bytes \(12\), got 16 bytes"):
        decode_update(SPARSE, F32, 3, u32([1, 2, 3]), f32([1, 2, 3, 4]), 10)


def test_indices_and_values_disagree_in_length() -> None:
    # count says 2; the indices carry 2 but the values only 1: rejected, whichever side is off.
    with pytest.raises(WireError, match="values: expected 2"):
        decode_update(SPARSE, F32, 2, u32([1, 2]), f32([1.0]), 10)
    with pytest.raises(WireError, match="indices: expected 2"):
        decode_update(SPARSE, F32, 2, u32([1]), f32([1.0, 2.0]), 10)


def test_index_equal_to_num_params_is_out_of_range() -> None:
    with pytest.raises(WireError, match="indices: 10 is out of range for a model of 10 parameters"):
        decode_update(SPARSE, F32, 2, u32([3, 10]), f32([1, 2]), 10)
    # The last valid index is accepted.
    ok = decode_update(SPARSE, F32, 2, u32([3, 9]), f32([1, 2]), 10)
    assert ok.indices is not None and ok.indices.tolist() == [3, 9]


@pytest.mark.parametrize("big", [2**31, 2**31 + 5, 2**32 - 1])
def test_single_uint32_index_at_or_above_2_31_is_out_of_range(big: int) -> None:
    with pytest.raises(WireError, match=f"indices: {big} is out of range"):
        decode_update(SPARSE, F32, 1, u32([big]), f32([1.0]), 10)


@pytest.mark.parametrize("big", [2**31, 2**32 - 1])
def test_uint32_index_at_or_above_2_31_after_valid_ones_reports_range(big: int) -> None:
    # Sorted as uint32 (the wire type), so the only rule it breaks is the range; viewed as
    # int32 it is negative, which must not be reported as an ordering problem.
    with pytest.raises(WireError, match=f"indices: {big} is out of range for a model of 10 parameters"):
        decode_update(SPARSE, F32, 3, u32([1, 5, big]), f32([1, 2, 3]), 10)


def test_unsorted_indices() -> None:
    with pytest.raises(WireError, match=r"strictly increasing \(sorted, no duplicates\)"):
        decode_update(SPARSE, F32, 3, u32([1, 5, 3]), f32([1, 2, 3]), 10)


def test_duplicate_indices() -> None:
    with pytest.raises(WireError, match=r"strictly increasing \(sorted, no duplicates\)"):
        decode_update(SPARSE, F32, 3, u32([1, 5, 5]), f32([1, 2, 3]), 10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dense", [False, True])
def test_non_finite_values(bad: float, dense: bool) -> None:
    with pytest.raises(WireError, match="values: NaN or infinite values are not accepted"):
        if dense:
            decode_update(DENSE, F32, 3, b"", f32([1.0, bad, 2.0]), 3)
        else:
            decode_update(SPARSE, F32, 3, u32([0, 1, 2]), f32([1.0, 2.0, bad]), 3)


@pytest.mark.parametrize(
    ("codec_value", "shown"),
    [(pb.CODEC_UNSPECIFIED, "CODEC_UNSPECIFIED"), (99, "99")],
)
def test_unsupported_codec(codec_value: int, shown: str) -> None:
    with pytest.raises(WireError, match=f"codec {shown} is not supported"):
        decode_update(codec_value, F32, 1, u32([0]), f32([1.0]), 10)


@pytest.mark.parametrize(
    ("dtype_value", "shown"),
    [
        (pb.VALUE_DTYPE_UNSPECIFIED, "VALUE_DTYPE_UNSPECIFIED"),
        (42, "42"),
    ],
)
@pytest.mark.parametrize("dense", [False, True])
def test_unsupported_value_dtype(dtype_value: int, shown: str, dense: bool) -> None:
    with pytest.raises(WireError, match=f"value_dtype {shown} is not supported"):
        if dense:
            decode_update(DENSE, dtype_value, 2, b"", f32([1.0, 2.0]), 2)
        else:
            decode_update(SPARSE, dtype_value, 2, u32([0, 1]), f32([1.0, 2.0]), 10)


def test_dense_count_must_equal_num_params() -> None:
    with pytest.raises(WireError, match="dense update: count 3 != model size 4"):
        decode_update(DENSE, F32, 3, b"", f32([1, 2, 3]), 4)
    with pytest.raises(WireError, match="dense update: count 5 != model size 4"):
        decode_update(DENSE, F32, 5, b"", f32([1, 2, 3, 4, 5]), 4)


def test_dense_with_indices() -> None:
    with pytest.raises(WireError, match="dense update: must carry no indices"):
        decode_update(DENSE, F32, 2, u32([0, 1]), f32([1, 2]), 2)


def test_sparse_count_larger_than_model() -> None:
    with pytest.raises(WireError, match="sparse update: count 11 exceeds model size 10"):
        decode_update(SPARSE, F32, 11, u32(list(range(11))), f32([1.0] * 11), 10)


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


# ------------------------------------------------------------------------------ model helpers


def test_apply_delta_sparse() -> None:
    model = torch.arange(6, dtype=torch.float32)  # [0, 1, 2, 3, 4, 5]
    delta = Update(values=torch.tensor([0.5, -2.0]), indices=torch.tensor([1, 4], dtype=torch.int32))
    apply_delta(model, delta)
    assert model.tolist() == [0.0, 0.5, 2.0, 3.0, 6.0, 5.0]


def test_apply_delta_sparse_from_wire_bytes() -> None:
    model = torch.ones(5)
    delta = decode_update(SPARSE, F32, 2, u32([0, 4]), f32([0.25, 3.0]), 5)
    apply_delta(model, delta)
    assert model.tolist() == [0.75, 1.0, 1.0, 1.0, -2.0]


def test_apply_delta_dense() -> None:
    model = torch.tensor([1.0, 2.0, 3.0])
    apply_delta(model, Update(values=torch.tensor([0.5, -1.0, 3.0]), indices=None))
    assert model.tolist() == [0.5, 3.0, 0.0]


def test_model_crc32_matches_zlib_and_detects_one_bit() -> None:
    model = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    crc = model_crc32(model)
    assert crc == zlib.crc32(model.numpy().tobytes())
    assert model_crc32(model.clone()) == crc
    for position, bit in [(0, 0), (517, 13), (999, 31)]:
        flipped = model.clone()
        flipped.view(torch.int32)[position] ^= 1 << bit if bit < 31 else -(2**31)
        assert not torch.equal(flipped, model)
        assert model_crc32(flipped) != crc
    # +0.0 and -0.0 compare equal as floats but are different bytes.
    assert model_crc32(torch.zeros(4)) != model_crc32(torch.tensor([0.0, -0.0, 0.0, 0.0]))


def test_model_crc32_of_strided_view_equals_its_contiguous_copy() -> None:
    model = torch.arange(20, dtype=torch.float32)
    view = model[::3]
    assert model_crc32(view) == model_crc32(view.contiguous()) == zlib.crc32(view.contiguous().numpy().tobytes())


@pytest.mark.parametrize("num_floats", [0, 1, CHUNK_ELEMENTS, CHUNK_ELEMENTS + 1, 2 * CHUNK_ELEMENTS + 3])
def test_iter_model_chunks_covers_the_model_exactly(num_floats: int) -> None:
    raw = torch.arange(num_floats, dtype=torch.float32).numpy().tobytes()
    chunks = list(iter_model_chunks(raw))
    expected_offsets = list(range(0, max(num_floats, 1), CHUNK_ELEMENTS))
    assert [offset for offset, _ in chunks] == expected_offsets
    assert b"".join(part for _, part in chunks) == raw
    assert all(len(part) <= 4 * CHUNK_ELEMENTS for _, part in chunks)
    # Each chunk starts exactly at its announced element offset.
    for offset, part in chunks:
        assert part == raw[4 * offset : 4 * offset + len(part)]
    if num_floats == 0:
        assert chunks == [(0, b"")]


def test_constants() -> None:
    assert codec.MAX_PARAMS == 2**31 - 1
    assert CHUNK_ELEMENTS * 8 == 1024 * 1024  # ~1 MiB per chunk (indices + float32 values)


# ------------------------------------------------------------------------------ 16-bit values, random blocks

F16, BF16, BLOCK = pb.VALUE_DTYPE_FLOAT16, pb.VALUE_DTYPE_BFLOAT16, pb.CODEC_RANDOM_BLOCK


@pytest.mark.parametrize(("wire", "dtype"), [(F16, torch.float16), (BF16, torch.bfloat16)])
def test_16_bit_values_round_trip_as_float32(wire: int, dtype: torch.dtype) -> None:
    values = torch.tensor([0.5, -1.25, 3.0e-3, 1000.0]).to(dtype)
    indices = torch.tensor([1, 4, 5, 9])
    (index_raw, value_raw), = iter_chunks(values, indices)
    assert len(value_raw) == 2 * 4  # 2 bytes per value on the wire
    decoded = decode_update(SPARSE, wire, 4, index_raw, value_raw, 10)
    assert decoded.values.dtype == torch.float32
    assert torch.equal(decoded.values, values.to(torch.float32))
    assert decoded.indices.tolist() == [1, 4, 5, 9]


@pytest.mark.parametrize(("wire", "dtype"), [(F16, torch.float16), (BF16, torch.bfloat16)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_16_bit_values_must_be_finite(wire: int, dtype: torch.dtype, bad: float) -> None:
    raw = torch.tensor([1.0, bad]).to(dtype).view(torch.int16).numpy().tobytes()
    with pytest.raises(WireError, match="NaN or infinite"):
        decode_update(SPARSE, wire, 2, u32([0, 1]), raw, 10)


def test_random_block_decodes_to_its_index_range() -> None:
    decoded = decode_update(BLOCK, F32, 3, b"", f32([1, 2, 3]), 10, block_start=7)
    assert decoded.block_start == 7 and decoded.indices.tolist() == [7, 8, 9]
    assert decoded.values.tolist() == [1.0, 2.0, 3.0]


def test_random_block_validation() -> None:
    with pytest.raises(WireError, match=r"block \[8, 11\) runs past the model's 10 parameters"):
        decode_update(BLOCK, F32, 3, b"", f32([1, 2, 3]), 10, block_start=8)
    with pytest.raises(WireError, match="must carry no indices"):
        decode_update(BLOCK, F32, 1, u32([0]), f32([1.0]), 10)
    with pytest.raises(WireError, match="block_start is only meaningful"):
        decode_update(SPARSE, F32, 1, u32([0]), f32([1.0]), 10, block_start=2)
