"""Compressors (wanps.worker.compressors), 16-bit values and random blocks, end to end.

Pure tensor tests first (hand-checked tiny examples, the EF invariant with every compressor
and value dtype), then the codec and the server core, then real servers over gRPC.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.server.aggregate import aggregate
from wanps.worker import cli as worker_cli
from wanps.worker.error_feedback import ErrorFeedback
from wanps.worker.compressors import (
    COMPRESSORS,
    ExactTopK,
    RandomBlock,
    SampledTopK,
    block_start_for,
    make_compressor,
    topk_exact,
)

from wire import RawClient

DTYPES = ["float32", "float16", "bfloat16"]


def densify(update: codec.Update, d: int) -> torch.Tensor:
    """The float32 vector a push adds (what the server sees after decoding)."""
    out = torch.zeros(d, dtype=torch.float32)
    values = update.values.to(torch.float32)
    if update.indices is None:
        return out + values
    return out.index_put_((update.indices.long(),), values)


def decode_pushed(update: codec.Update, num_params: int) -> tuple[pb.PushHeader, codec.Update]:
    """Encode exactly as a worker does, then decode exactly as the server does."""
    messages, _ = codec.push_messages(pb.PushHeader(worker_id=1, round=0), update)
    header = messages[0].header
    chunks = [m.chunk for m in messages[1:]]
    decoded = codec.decode_update(header.codec, header.value_dtype, header.count,
                                  b"".join(c.indices for c in chunks), b"".join(c.values for c in chunks),
                                  num_params, block_start=header.block_start)
    return header, decoded


# ------------------------------------------------------------------------------ registry


def test_registry_holds_the_three_compressors_under_their_names() -> None:
    assert set(COMPRESSORS) == {"topk", "topk-sampled", "random-block"}
    for name, cls in COMPRESSORS.items():
        assert cls.name == name
        assert isinstance(make_compressor(name), cls)
    with pytest.raises(ValueError, match="unknown compressor 'nope'"):
        make_compressor("nope")


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_every_compressor_codec_is_a_real_enum_value_the_server_decodes(name: str) -> None:
    cls = COMPRESSORS[name]
    assert cls.codec in pb.Codec.values() and cls.codec != pb.CODEC_UNSPECIFIED
    assert cls.codec in codec.SUPPORTED_CODECS
    # And what it produces through error feedback really travels as that codec and decodes.
    d = 300_000  # above SampledTopK's sample size, so its sampled path runs
    g = torch.randn(d, generator=torch.Generator().manual_seed(3))
    update = ErrorFeedback(d, name).compress(g, 0.01, round_=5)
    header, decoded = decode_pushed(update, d)
    assert header.codec == cls.codec
    assert torch.equal(densify(decoded, d), densify(update, d))


# ------------------------------------------------------------------------------ selections


def test_exact_topk_tiny() -> None:
    p = torch.tensor([0.1, -5.0, 3.0, -0.2, 4.0, 0.0, -3.5])
    assert ExactTopK().select(p, 3).indices.tolist() == [1, 4, 6]


@pytest.mark.parametrize("seed", range(5))
def test_sampled_topk_with_an_accurate_count_is_the_exact_topk(seed: int) -> None:
    # d = 1000, k = 10, tolerance 5%: a count within [9.5, 10.5] is exactly 10, and the
    # 10 elements above a threshold are the 10 largest.
    p = torch.randn(1000, generator=torch.Generator().manual_seed(seed))
    selection = SampledTopK(seed=seed, sample_size=100).select(p, 10)
    assert selection.indices.tolist() == topk_exact(p, 10).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_sampled_topk_count_order_and_threshold(seed: int) -> None:
    d, k = 400_000, 4000
    p = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * torch.rand(d) ** 3  # heavy tails
    compressor = SampledTopK(seed=seed, sample_size=20_000)
    indices = compressor.select(p, k).indices
    assert abs(indices.numel() - k) <= 0.05 * k
    assert bool((indices[1:] > indices[:-1]).all())  # the wire rule: sorted, unique
    chosen = torch.zeros(d, dtype=torch.bool)
    chosen[indices] = True
    assert p.abs()[chosen].min() >= p.abs()[~chosen].max()  # nothing left behind is larger


def test_sampled_topk_reuses_its_buffers() -> None:
    compressor = SampledTopK(sample_size=1000)
    p = torch.randn(50_000)
    compressor.select(p, 500)
    buffers = (compressor._magnitude.data_ptr(), compressor._mask.data_ptr())
    compressor.select(torch.randn(50_000), 500)
    assert (compressor._magnitude.data_ptr(), compressor._mask.data_ptr()) == buffers


def test_sampled_topk_trims_ties_to_exactly_k() -> None:
    p = torch.ones(10_000)  # every element is at the threshold: all are candidates
    indices = SampledTopK(sample_size=1000).select(p, 100).indices
    assert indices.numel() == 100 and bool((indices[1:] > indices[:-1]).all())


def test_sampled_topk_refines_when_the_first_threshold_selects_too_few() -> None:
    class TooHighFirst(SampledTopK):
        calls = 0

        def _threshold(self, sample, wanted, d):
            self.calls += 1
            if self.calls == 1:
                return torch.tensor(float("inf"))  # selects nothing
            return super()._threshold(sample, wanted, d)

    p = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    compressor = TooHighFirst(sample_size=1000)
    assert compressor.select(p, 50).indices.tolist() == topk_exact(p, 50).tolist()
    assert compressor.refinements == 1


def test_random_block_tiny() -> None:
    start = block_start_for(seed=7, round_=3, num_params=10, k=4)
    assert 0 <= start <= 6
    selection = RandomBlock(seed=7).select(torch.zeros(10), 4, round_=3)
    assert (selection.block_start, selection.count, selection.indices) == (start, 4, None)
    assert RandomBlock(seed=7).select(torch.zeros(10), 10, round_=3).block_start == 0  # the only block


def test_random_block_workers_with_one_seed_agree_and_rounds_differ() -> None:
    a, b = RandomBlock(seed=11), RandomBlock(seed=11)
    d, k = 1_000_000, 1000
    starts = [a.select(torch.zeros(d), k, r).block_start for r in range(20)]
    assert starts == [b.select(torch.zeros(d), k, r).block_start for r in range(20)]
    assert len(set(starts)) > 15  # a new block most rounds
    assert all(0 <= s <= d - k for s in starts)
    other = [RandomBlock(seed=12).select(torch.zeros(d), k, r).block_start for r in range(20)]
    assert other != starts


# ------------------------------------------------------------------------------ error feedback


@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_ef_invariant_exact_each_step(name: str, value_dtype: str) -> None:
    """p == dequantized(sent) + residual, bit for bit, for every compressor and dtype."""
    d = 250_000
    generator = torch.Generator().manual_seed(0)
    ef = ErrorFeedback(d, name, value_dtype, seed=4)
    total_grad = torch.zeros(d, dtype=torch.float64)
    total_sent = torch.zeros(d, dtype=torch.float64)
    for round_ in range(4):
        g = torch.randn(d, generator=generator) * 1e-2
        p = ef.residual + g
        update = ef.compress(g, 0.02, round_)
        assert update.values.dtype == getattr(torch, value_dtype)
        sent = densify(update, d)
        assert torch.equal(sent + ef.residual, p)
        total_grad += g.double()
        total_sent += sent.double()
    assert torch.allclose(total_sent + ef.residual.double(), total_grad, atol=1e-6)


@pytest.mark.parametrize(("value_dtype", "wire", "limit"), [("float16", pb.VALUE_DTYPE_FLOAT16, 65504.0),
                                                            ("bfloat16", pb.VALUE_DTYPE_BFLOAT16, None)])
def test_16_bit_values_keep_the_rounding_in_the_residual(value_dtype: str, wire: int, limit: float | None) -> None:
    g = torch.zeros(10)
    g[3], g[7] = 70000.0, 1.0001
    ef = ErrorFeedback(10, "topk", value_dtype)
    update = ef.compress(g, 0.2)  # k = 2
    assert update.indices.tolist() == [3, 7] and update.value_dtype == wire
    sent = update.values.to(torch.float32)
    assert bool(torch.isfinite(sent).all())
    if limit is not None:
        assert sent[0] == limit  # saturated, not inf
    assert sent[1] == 1.0  # 1.0001 rounds to 1 in both (float16 step 2**-10, bfloat16 2**-7)
    assert ef.residual[3] == g[3] - sent[0] and ef.residual[7] == g[7] - 1.0
    assert ef.residual[7] != 0  # the lost 0.0001 is kept, not dropped


def test_value_dtype_is_validated() -> None:
    with pytest.raises(ValueError, match="value_dtype must be one of"):
        ErrorFeedback(10, "topk", "int8")


# ------------------------------------------------------------------------------ codec and core


@pytest.mark.parametrize(("value_dtype", "bytes_per_element"), [("float32", 8), ("float16", 6), ("bfloat16", 6)])
def test_sparse_payload_bytes_per_element(value_dtype: str, bytes_per_element: int) -> None:
    update = ErrorFeedback(1000, "topk", value_dtype).compress(torch.randn(1000), 0.1)
    _, nbytes = codec.push_messages(pb.PushHeader(), update)
    assert nbytes == update.nbytes == 100 * bytes_per_element


def test_random_block_travels_as_values_only_and_decodes_to_its_range() -> None:
    update = ErrorFeedback(1000, "random-block", "float16", seed=2).compress(torch.randn(1000), 0.05, 9)
    header, decoded = decode_pushed(update, 1000)
    assert header.codec == pb.CODEC_RANDOM_BLOCK and header.block_start == update.block_start
    _, nbytes = codec.push_messages(pb.PushHeader(), update)
    assert nbytes == 50 * 2  # no indices
    start = block_start_for(2, 9, 1000, 50)
    assert decoded.block_start == start
    assert decoded.indices.tolist() == list(range(start, start + 50))
    assert decoded.values.dtype == torch.float32


def test_aggregate_sums_shared_blocks_directly_and_matches_the_general_path() -> None:
    a = codec.Update(values=torch.tensor([1.0, 2.0, 3.0]), indices=torch.arange(4, 7, dtype=torch.int32),
                           block_start=4)
    b = codec.Update(values=torch.tensor([3.0, 0.5, -3.0]), indices=torch.arange(4, 7, dtype=torch.int32),
                           block_start=4)
    mean = aggregate([a, b], 2)
    assert mean.block_start == 4 and mean.indices.tolist() == [4, 5, 6]
    assert mean.values.tolist() == [2.0, 1.25, 0.0]
    as_sparse = [codec.Update(values=u.values, indices=u.indices) for u in (a, b)]
    assert torch.equal(aggregate(as_sparse, 2).values, mean.values)
    # Blocks at different starts go through the general union path.
    c = codec.Update(values=torch.tensor([1.0, 1.0]), indices=torch.arange(5, 7, dtype=torch.int32),
                           block_start=5)
    mixed = aggregate([a, c], 2)
    assert mixed.block_start is None and mixed.indices.tolist() == [4, 5, 6]
    assert mixed.values.tolist() == [0.5, 1.5, 2.0]


# ------------------------------------------------------------------------------ configuration


def test_worker_cli_flags_and_env_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    args = worker_cli.build_parser().parse_args(["--compressor", "topk-sampled", "--value-dtype", "bfloat16"])
    assert (args.compressor, args.value_dtype) == ("topk-sampled", "bfloat16")
    defaults = worker_cli.build_parser().parse_args([])
    assert (defaults.compressor, defaults.value_dtype) == ("topk", "float32")
    monkeypatch.setenv("WANPS_COMPRESSOR", "random-block")
    monkeypatch.setenv("WANPS_VALUE_DTYPE", "float16")
    args = worker_cli.build_parser().parse_args([])
    assert (args.compressor, args.value_dtype) == ("random-block", "float16")
    with pytest.raises(SystemExit):
        worker_cli.build_parser().parse_args(["--compressor", "nope"])


# ------------------------------------------------------------------------------ real servers


@pytest.fixture
def two_workers(make_cluster):
    """A started 2-worker cluster on a 16-parameter model, driven by a raw client."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None)
    client = RawClient(cluster.server_address)
    first, second = client.join(), client.join()
    client.seed(first.worker_id, torch.arange(16, dtype=torch.float32))
    yield cluster, client, first.worker_id, second.worker_id
    client.close()


def push_update(client: RawClient, worker_id: int, round_: int, update: codec.Update) -> pb.PushReply:
    header = pb.PushHeader(worker_id=worker_id, round=round_, computed_at_version=round_,
                           member_secret=client.secret(worker_id))
    messages, _ = codec.push_messages(header, update)
    return client.stub.Push(iter(messages), timeout=10)


@pytest.mark.timeout(60)
def test_server_aggregates_random_blocks_from_a_shared_seed(two_workers) -> None:
    cluster, client, a, b = two_workers
    grads = [torch.randn(16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    updates = [ErrorFeedback(16, "random-block", "float16", seed=5).compress(g, 0.25, 0) for g in grads]
    assert updates[0].block_start == updates[1].block_start  # the same block, chosen separately
    for worker_id, update in zip((a, b), updates):
        assert not push_update(client, worker_id, 0, update).duplicate
    version, model = client.pull(a)
    assert version == 1
    expected = torch.arange(16, dtype=torch.float32) - (densify(updates[0], 16) + densify(updates[1], 16)) / 2
    assert torch.equal(model, expected)


@pytest.mark.timeout(60)
def test_server_accepts_float16_and_bfloat16_sparse_pushes(two_workers) -> None:
    cluster, client, a, b = two_workers
    updates = [ErrorFeedback(16, "topk", dtype).compress(torch.linspace(-1, 1, 16) * (i + 1), 0.25)
               for i, dtype in enumerate(("float16", "bfloat16"))]
    for worker_id, update in zip((a, b), updates):
        push_update(client, worker_id, 0, update)
    _, model = client.pull(a)
    expected = torch.arange(16, dtype=torch.float32) - (densify(updates[0], 16) + densify(updates[1], 16)) / 2
    assert torch.equal(model, expected)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("header_fields", "values", "words"),
    [
        (dict(codec=pb.CODEC_RANDOM_BLOCK, block_start=14, count=4), np.ones(4, "<f2"), "runs past"),
        (dict(codec=pb.CODEC_RANDOM_BLOCK, block_start=2**40, count=1), np.ones(1, "<f2"), "runs past"),
        (dict(codec=pb.CODEC_RANDOM_BLOCK, block_start=0, count=2), np.array([1, np.inf], "<f2"), "NaN"),
        (dict(codec=pb.CODEC_RANDOM_BLOCK, block_start=0, count=2), np.ones(2, "<f4"), "values: expected"),
    ],
)
def test_malformed_16_bit_and_block_pushes_are_refused(two_workers, header_fields, values, words) -> None:
    cluster, client, a, _ = two_workers
    before = (cluster.core.model.clone(), cluster.core.version, dict(cluster.core.open_rounds))
    header = pb.PushHeader(worker_id=a, round=0, computed_at_version=0, value_dtype=pb.VALUE_DTYPE_FLOAT16,
                           member_secret=client.secret(a), **header_fields)
    with pytest.raises(grpc.RpcError) as refused:
        client.push_raw(header, [pb.SparseChunk(values=values.tobytes())])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.value.details()
    assert torch.equal(cluster.core.model, before[0])
    assert (cluster.core.version, dict(cluster.core.open_rounds)) == before[1:]


@pytest.mark.timeout(120)
def test_optimizer_trains_with_a_configured_compressor_and_dtype(make_cluster) -> None:
    from wanps.worker import Optimizer
    from wanps.worker.tasks import get_task

    cluster = make_cluster(min_workers=1, policy=None)
    task = get_task("synthetic")
    model = task.build_model(0)
    with pytest.raises(ValueError, match="unknown compressor"):
        Optimizer(model.parameters(), server=cluster.server_address, compressor="nope")
    opt = Optimizer(model.parameters(), server=cluster.server_address, lr=0.1, delta=0.05,
                    compressor="random-block", value_dtype="float16", compressor_seed=3)
    try:
        batches = task.batches(opt.rank, opt.world_size, 16, 0)
        for _ in range(3):
            x, y = next(batches)
            opt.zero_grad()
            task.loss(model, x, y).backward()
            opt.step()
    finally:
        opt.close()
    assert opt.version == 3
    assert torch.equal(opt.replica, cluster.core.model)


def test_bench_compress_smoke(tmp_path, capsys) -> None:
    import json

    from wanps.bench import compressors as bench_compress

    out = tmp_path / "bench.json"
    assert bench_compress.main(["--sizes", "200000", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["compressor"] for r in rows] == ["topk", "topk-sampled", "random-block"]
    assert all(r["k"] == 2000 and r["ms_median"] > 0 for r in rows)
    assert abs(rows[1]["selected_over_k"] - 1) <= 0.05
    assert "selected_over_k" in capsys.readouterr().out
