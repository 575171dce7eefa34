"""Models on any device, checked on the CPU: the model checksum, what crosses between host and
device (proto/staging.py), and where a worker's buffers live. tests/test_cuda.py runs the
same on a GPU where there is one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from device_checks import CrossDeviceCopies, assert_all_on, batches, decoded_deltas, reference_checksum, tiny_mlp, train
from wanps.proto import checksum as checksum_module
from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.proto.checksum import (
    BLOCK_ELEMENTS,
    CHECKSUM_MAX_ELEMENTS,
    CHECKSUM_MODULUS,
    checksum_part,
    combine_checksums,
    model_checksum,
)
from wanps.proto.codec import Update, apply_delta, decode_delta, update_to_device
from wanps.proto.staging import DeviceStaging, host_tensors, pack, pack_layout, unpack
from wanps.worker import Optimizer
from wanps.worker.skip_rule import SkipRule
from wanps.worker.update_rule import UpdateConfig, UpdateRule

P = CHECKSUM_MODULUS


def from_bits(bits: list[int] | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint32).view(np.float32).copy())


# ------------------------------------------------------------------------------ the checksum

def test_the_modulus_is_the_largest_prime_below_2_32() -> None:
    assert P == 2**32 - 5
    assert all(P % q for q in range(3, int(P**0.5) + 1, 2))


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 4095, BLOCK_ELEMENTS - 1, BLOCK_ELEMENTS, BLOCK_ELEMENTS + 1,
                               3 * BLOCK_ELEMENTS + 17])
def test_checksum_matches_the_pure_python_definition(n: int) -> None:
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e20
    assert model_checksum(values) == reference_checksum(values)


def test_checksum_of_special_values_matches_the_definition() -> None:
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45,
                            3.4e38, -3.4e38, 1.0, -1.0])
    nan_patterns = from_bits([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x80000000, 0x00000001])
    values = torch.cat([special, nan_patterns])
    assert model_checksum(values) == reference_checksum(values)
    assert model_checksum(torch.zeros(4)) != model_checksum(torch.tensor([0.0, -0.0, 0.0, 0.0]))


def test_checksum_is_the_same_contiguous_and_in_chunks() -> None:
    values = torch.randn(5 * BLOCK_ELEMENTS + 123, generator=torch.Generator().manual_seed(1))
    whole = model_checksum(values)
    for cuts in ([0, values.numel()], [0, 1, values.numel()], [0, 1000, BLOCK_ELEMENTS + 5, 4 * BLOCK_ELEMENTS,
                                                               values.numel()],
                 list(range(0, values.numel(), 131072)) + [values.numel()]):
        parts = [checksum_part(values[a:b], a) for a, b in zip(cuts, cuts[1:])]
        assert combine_checksums(parts) == whole, cuts
    # the wire's own chunks (a pull's ModelChunks)
    raw = values.numpy().tobytes()
    parts = [checksum_part(torch.frombuffer(bytearray(piece), dtype=torch.float32), offset)
             for offset, piece in codec.iter_model_chunks(raw)]
    assert combine_checksums(parts) == whole
    # a strided view, and the many-blocks-per-pass arrangement a GPU uses
    strided = torch.randn(2 * BLOCK_ELEMENTS + 9, 3)[:, 1]
    assert model_checksum(strided) == model_checksum(strided.contiguous()) == reference_checksum(strided.contiguous())


@pytest.mark.parametrize("blocks_per_pass", [1, 3, 64])
def test_checksum_does_not_depend_on_how_many_blocks_a_pass_takes(monkeypatch, blocks_per_pass: int) -> None:
    values = torch.randn(7 * BLOCK_ELEMENTS + 5, generator=torch.Generator().manual_seed(2))
    expected = reference_checksum(values)
    monkeypatch.setattr(checksum_module, "_BLOCKS_PER_PASS", {"cpu": blocks_per_pass})
    assert model_checksum(values) == expected


def test_checksum_changes_on_any_single_bit_flip() -> None:
    values = torch.randn(BLOCK_ELEMENTS + 77, generator=torch.Generator().manual_seed(3))
    before = model_checksum(values)
    bits = values.view(torch.int32)
    for position in (0, 1, 63, 64, BLOCK_ELEMENTS - 1, BLOCK_ELEMENTS, values.numel() - 1):
        for bit in range(32):
            flipped = bits.clone()
            flipped[position] ^= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)
            assert model_checksum(flipped.view(torch.float32)) != before, (position, bit)


def test_checksum_changes_when_two_elements_swap() -> None:
    values = torch.randn(2 * BLOCK_ELEMENTS, generator=torch.Generator().manual_seed(4))
    before = model_checksum(values)
    for i, j in ((0, 1), (0, values.numel() - 1), (63, 64), (BLOCK_ELEMENTS - 1, BLOCK_ELEMENTS), (5, 4096 * 64 + 5)):
        swapped = values.clone()
        swapped[i], swapped[j] = values[j], values[i]
        assert model_checksum(swapped) != before, (i, j)
    # a sum or a plain CRC of the multiset would miss this; equal values swap to the same model
    assert model_checksum(torch.tensor([1.0, 2.0])) != model_checksum(torch.tensor([2.0, 1.0]))
    assert model_checksum(torch.tensor([1.0, 1.0])) == model_checksum(torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("pattern", [0x80000000, 0x7FFFFFFF, "alternating"])
def test_checksum_has_no_overflow_at_the_largest_values_and_positions(pattern) -> None:
    """|s| = 2**31 everywhere, at the very end of the range the checksum covers."""
    n = 2 * BLOCK_ELEMENTS + 3
    if pattern == "alternating":
        bits = np.where(np.arange(n) % 2 == 0, 0x80000000, 0x7FFFFFFF).astype(np.uint32)
    else:
        bits = np.full(n, pattern, dtype=np.uint32)
    values = from_bits(bits)
    offset = CHECKSUM_MAX_ELEMENTS - n
    assert checksum_part(values, offset) == reference_checksum(values, offset)


def test_checksum_refuses_what_it_does_not_cover() -> None:
    with pytest.raises(TypeError):
        model_checksum(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        checksum_part(torch.zeros(3), CHECKSUM_MAX_ELEMENTS - 2)
    assert model_checksum(torch.zeros(0)) == 0


# ------------------------------------------------------------------------------ host <-> device

def test_cpu_tensors_are_never_copied_before_their_bytes() -> None:
    values, indices = torch.randn(10), torch.arange(10, dtype=torch.int32)
    host_values, host_indices = host_tensors(values, indices)
    assert host_values is values and host_indices is indices
    assert DeviceStaging("cpu").to_device([indices, values])[0] is indices
    delta = Update(values=values, indices=indices)
    assert update_to_device(delta, DeviceStaging("cpu")) is delta


def test_pack_and_unpack_round_trip_at_aligned_offsets() -> None:
    tensors = [torch.arange(5, dtype=torch.int32), torch.randn(5), torch.randn(3).to(torch.float16),
               torch.randn(7).to(torch.bfloat16), torch.empty(0, dtype=torch.int32), torch.randn(2, 3)]
    offsets, size = pack_layout(tensors)
    assert all(o % 16 == 0 for o in offsets) and size >= sum(t.numel() * t.element_size() for t in tensors)
    buffer = torch.empty(size, dtype=torch.uint8)
    pack(buffer, tensors, offsets)
    for original, view in zip(tensors, unpack(buffer.clone(), tensors, offsets)):
        assert view.dtype == original.dtype and view.shape == original.shape and torch.equal(view, original)


@pytest.mark.parametrize("dense", [False, True])
def test_a_received_delta_crosses_to_the_device_in_one_copy(dense: bool) -> None:
    """The `meta` device has no data, but the copies, dtypes and shapes are real."""
    d = 1000
    indices = None if dense else torch.tensor([3, 17, 400, 999], dtype=torch.int32)
    values = torch.randn(d if dense else 4)
    index_raw = b"" if dense else codec.index_bytes(indices)
    delta = decode_delta(index_raw, codec.value_bytes(values), values.numel(), d, dense)
    staging = DeviceStaging("meta")
    for _ in range(2):  # the staging memory is reused
        with CrossDeviceCopies() as seen:
            moved = update_to_device(delta, staging)
        assert [(src, dst) for src, dst, _ in seen.copies] == [("cpu", "meta")]
        assert seen.copies[0][2] >= delta.nbytes
        assert moved.values.device.type == "meta" and moved.values.dtype == torch.float32
        assert moved.values.shape == values.shape
        if not dense:
            assert moved.indices.device.type == "meta" and moved.indices.dtype == torch.int32
            assert moved.indices.shape == indices.shape


@pytest.mark.parametrize("dense", [False, True])
def test_the_one_copy_delta_path_gives_the_same_replica(dense: bool) -> None:
    """Packed into one buffer, copied once, viewed: the replica ends bit for bit where applying
    the decoded delta directly puts it."""
    d = 3 * codec.CHUNK_ELEMENTS + 11
    start = torch.randn(d, generator=torch.Generator().manual_seed(4))
    direct, staged = start.clone(), start.clone()
    for delta in decoded_deltas(d, dense, seed=5, rounds=3):
        apply_delta(direct, delta)
        moving = [delta.values] if dense else [delta.indices, delta.values]
        offsets, size = pack_layout(moving)
        buffer = torch.empty(size, dtype=torch.uint8)
        pack(buffer, moving, offsets)
        copied = buffer.clone()  # what DeviceStaging copies to the device, once
        views = unpack(copied, moving, offsets)
        apply_delta(staged, Update(values=views[-1], indices=None if dense else views[0]))
    assert torch.equal(direct, staged)
    assert model_checksum(direct) == model_checksum(staged)


# ------------------------------------------------------------------------------ where buffers live

@pytest.mark.parametrize("config,skip", [
    (UpdateConfig(compressor="topk", momentum=0.9, value_dtype="float16"), False),
    (UpdateConfig(compressor="random-block", error_feedback="def", value_dtype="bfloat16"), False),
    (UpdateConfig(compressor="topk", value_dtype="float32"), True),
])
def test_the_update_rule_allocates_and_selects_on_its_device(config: UpdateConfig, skip: bool) -> None:
    """On `meta` (no data, real placement): every buffer, the selection and the update the rule
    returns are on the rule's device; an allocation that forgot its device would be on the CPU."""
    d = 1000
    rule = UpdateRule(d, config, SkipRule([1.0] * 3) if skip else None, device="meta")
    params = torch.zeros(d, device="meta")
    if rule.detaches:
        detached = rule.detached_point(params, out=torch.empty(d, device="meta"))
        assert detached.device.type == "meta"
    update = rule.update(torch.zeros(d, device="meta"), 0.1, 0.05, 3, params=params)
    assert update is not None
    placed = {"residual": rule.residual, "values": update.values, "indices": update.indices}
    if rule._momentum_buffer is not None:
        placed["momentum"] = rule._momentum_buffer
    if skip:
        placed["anchor"] = rule.skip_rule.anchor
    assert {name: t.device.type for name, t in placed.items()} == {name: "meta" for name in placed}
    rule.ef.restore(update)  # a late update goes back into the residual, on the device
    assert rule.final_residual().values.device.type == "meta"


@pytest.mark.parametrize("use_numpy", [True, False])
def test_sampled_topk_selects_the_same_with_numpy_and_with_torch(use_numpy: bool) -> None:
    """The torch path (what runs on a GPU) and the CPU's numpy path select the same elements."""
    from wanps.worker.compressors import SampledTopK

    p = torch.randn(200_000, generator=torch.Generator().manual_seed(6))
    reference = SampledTopK(seed=3, sample_size=5000).select(p, 2000).indices
    compressor = SampledTopK(seed=3, sample_size=5000)
    compressor.use_numpy = use_numpy
    selected = compressor.select(p, 2000).indices
    assert torch.equal(selected, reference)
    assert compressor._magnitude.device == p.device and compressor._mask.device == p.device


def test_every_worker_buffer_is_on_the_parameters_device(make_cluster) -> None:
    """Replica, gradient buffer, residual, momentum, DEF's clean copy, SASG's auxiliary gradient
    and anchor, the sampled top-k's scratch: all where the parameters are (the CPU here)."""
    device = torch.device("cpu")
    cluster = make_cluster(min_workers=1, policy=None)
    model = tiny_mlp(device)
    opt = Optimizer(model.parameters(), server=cluster.server_address, lr=0.05, tau=1, delta=0.1,
                    compressor="topk-sampled", error_feedback="def", momentum=0.9)
    try:
        opt.rule.ef.compressor.sample_size = 256  # the tiny model takes the sampled path
        train(opt, model, batches(device, 0), 4)
        assert_all_on(device, opt, {"replica", "grad buffer", "residual", "momentum", "DEF clean copy",
                                    "compressor magnitude scratch", "compressor mask scratch"})
    finally:
        opt.close()
    cluster = make_cluster(min_workers=1, policy=None)
    model = tiny_mlp(device)
    opt = Optimizer(model.parameters(), server=cluster.server_address, lr=0.05, tau=1, delta=0.1,
                    momentum=0.5, skip_rule=SkipRule([1e12] * 3))
    try:
        train(opt, model, batches(device, 1), 4)
        assert opt.skip_rule.skips > 0  # the auxiliary gradient was computed
        assert_all_on(device, opt, {"replica", "grad buffer", "residual", "momentum", "SASG aux grad", "SASG anchor"})
        opt._wait_until_fresh(opt.round)  # tau 1: the last round may still be closing
        assert torch.equal(opt.replica, cluster.core.model)
    finally:
        opt.close()


def test_seed_and_pull_checksums_are_the_new_ones(make_cluster) -> None:
    """SeedModelReply, the first ModelChunk and every checked DeltaChunk carry `model_checksum`."""
    cluster = make_cluster(min_workers=1, policy=None)
    model = tiny_mlp("cpu")
    opt = Optimizer(model.parameters(), server=cluster.server_address, lr=0.05, tau=0, delta=0.1)
    try:
        train(opt, model, batches("cpu", 2), 3)
        pulled = opt.session.pull(10)
        assert pulled.model_checksum == model_checksum(cluster.core.model) == model_checksum(opt.replica)
        assert "model_checksum" in pb.DeltaChunk.DESCRIPTOR.fields_by_name
        assert pb.DeltaChunk.DESCRIPTOR.fields_by_name["model_checksum"].number == 8
    finally:
        opt.close()


def test_bench_checksum_smoke(tmp_path, capsys) -> None:
    from wanps.bench.cli import main

    out = tmp_path / "checksum.json"
    assert main(["checksum", "--sizes", "300000", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "crc32 ms" in printed and "300,000" in printed
    assert out.exists()
