"""Models on a GPU, end to end: runs wherever torch.cuda.is_available(), skipped elsewhere.

A 2-worker in-process cluster (real gRPC on 127.0.0.1) trains a tiny MLP that lives on the
GPU: every replica stays bit-identical to the server's (CPU) model, every buffer a worker
allocates is on the GPU, the checksum computed on the GPU equals the CPU's, only selected
elements cross to the host, and received deltas cross back in one copy each.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

from device_checks import (  # noqa: E402
    CrossDeviceCopies,
    assert_all_on,
    batches,
    decoded_deltas,
    reference_checksum,
    tiny_mlp,
    train,
)
from wanps.proto import codec  # noqa: E402
from wanps.proto import wanps_pb2 as pb  # noqa: E402
from wanps.proto.checksum import BLOCK_ELEMENTS, checksum_part, model_checksum  # noqa: E402
from wanps.proto.codec import Update, apply_delta, iter_chunks, update_to_device  # noqa: E402
from wanps.proto.staging import DeviceStaging  # noqa: E402
from wanps.worker import Optimizer  # noqa: E402
from wanps.worker.skip_rule import SkipRule  # noqa: E402

pytestmark = pytest.mark.timeout(240)

CUDA = torch.device("cuda", torch.cuda.current_device())


def run_two_workers(cluster, make_optimizer: Callable[[torch.nn.Module], Optimizer], steps: int,
                    required: set[str]) -> list[Optimizer]:
    """Two workers in threads, each `steps` steps; every buffer is checked on the GPU before they
    close, and every replica equals the server's model after they closed."""
    models = [tiny_mlp(CUDA) for _ in range(2)]  # built here: tiny_mlp seeds the global generator
    optimizers: list[Optimizer | None] = [None, None]
    errors: list[BaseException] = []
    joined, trained = threading.Barrier(2), threading.Barrier(2)

    def work(index: int) -> None:
        opt = None
        try:
            opt = make_optimizer(models[index])
            optimizers[index] = opt
            compressor = opt.rule.ef.compressor
            if hasattr(compressor, "sample_size"):
                compressor.sample_size = 256  # the tiny model takes the sampled (device) path
            joined.wait(120)
            train(opt, models[index], batches(CUDA, index), steps)
            opt._wait_until_fresh(opt.round)  # every pushed round applied
            assert_all_on(CUDA, opt, required)
            # Equal to the server's model at this version, and the checksum agrees on both devices.
            on_gpu = model_checksum(opt.replica)
            assert on_gpu == model_checksum(opt.replica.cpu()) == reference_checksum(opt.replica.cpu())
            trained.wait(120)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            trained.abort()
        finally:
            if opt is not None:
                opt.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(200)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    opts = [opt for opt in optimizers if opt is not None]
    server_model = cluster.core.model
    for opt in opts:
        assert opt.replica.device == CUDA
        assert opt.version == cluster.core.version
        assert torch.equal(opt.replica.cpu(), server_model), "a GPU replica differs from the server's model"
        assert model_checksum(opt.replica) == model_checksum(server_model)
    return opts


def test_two_gpu_workers_ef_sampled_topk_float16_momentum(make_cluster) -> None:
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None)
    run_two_workers(cluster, lambda model: Optimizer(
        model.parameters(), server=cluster.server_address, lr=0.05, tau=1, delta=0.1,
        compressor="topk-sampled", value_dtype="float16", momentum=0.9), steps=12,
        required={"replica", "grad buffer", "residual", "momentum",
                  "compressor magnitude scratch", "compressor mask scratch"})


def test_two_gpu_workers_def_random_block_bfloat16(make_cluster) -> None:
    """DEF's clean copy on the GPU, and its dense final flush pushed from the GPU."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None)
    run_two_workers(cluster, lambda model: Optimizer(
        model.parameters(), server=cluster.server_address, lr=0.05, tau=2, delta=0.1,
        compressor="random-block", compressor_seed=3, value_dtype="bfloat16", error_feedback="def"), steps=10,
        required={"replica", "grad buffer", "residual", "DEF clean copy"})


def test_two_gpu_workers_sasg(make_cluster) -> None:
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None)
    opts = run_two_workers(cluster, lambda model: Optimizer(
        model.parameters(), server=cluster.server_address, lr=0.05, tau=1, delta=0.2,
        skip_rule=SkipRule([1e12] * 3)), steps=10,
        required={"replica", "grad buffer", "residual", "SASG aux grad", "SASG anchor"})
    assert all(opt.skip_rule.skips > 0 for opt in opts)


def test_a_gpu_step_copies_only_selected_elements_to_the_host(make_cluster) -> None:
    """No model-sized device -> host copy in a step; deltas cross host -> device in one copy each."""
    cluster = make_cluster(min_workers=1, policy=None)
    model = tiny_mlp(CUDA)
    opt = Optimizer(model.parameters(), server=cluster.server_address, lr=0.05, tau=0, delta=0.05, momentum=0.9)
    try:
        next_batch = batches(CUDA, 0)
        train(opt, model, next_batch, 2)  # warm: staging buffers exist
        with CrossDeviceCopies() as seen:
            train(opt, model, next_batch, 5)
        model_bytes = 4 * opt.num_params
        to_host = [c for c in seen.copies if c[0] == "cuda" and c[1] == "cpu"]
        to_device = [c for c in seen.copies if c[0] == "cpu" and c[1] == "cuda"]
        assert to_host and all(nbytes < model_bytes for _, _, nbytes in to_host), to_host
        # the batches (2 a step) and one copy per applied delta (tau 0: one a step)
        assert len(to_device) <= 5 * 3, to_device
        assert torch.equal(opt.replica.cpu(), cluster.core.model)
    finally:
        opt.close()


@pytest.mark.parametrize("n", [1, 1000, BLOCK_ELEMENTS + 1, 20_000_000])
def test_the_checksum_is_the_same_on_the_gpu(n: int) -> None:
    """20M elements: more than one GPU pass (16Mi elements)."""
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e30
    expected = model_checksum(values)
    if n <= BLOCK_ELEMENTS + 1:
        assert expected == reference_checksum(values)
    on_gpu = values.to(CUDA)
    assert model_checksum(on_gpu) == expected
    assert checksum_part(on_gpu[n // 2 :], n // 2) == checksum_part(values[n // 2 :], n // 2)
    flipped = on_gpu.view(torch.int32).clone()
    flipped[n // 3] ^= 1
    assert model_checksum(flipped.view(torch.float32)) != expected
    extreme = torch.full((n,), -0.0, device=CUDA)  # every int32 at -2**31
    assert model_checksum(extreme) == model_checksum(extreme.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encoding_from_the_gpu_gives_the_cpus_bytes(dtype: torch.dtype) -> None:
    k = 2 * codec.CHUNK_ELEMENTS + 5
    generator = torch.Generator().manual_seed(7)
    indices = torch.sort(torch.randperm(10 * k, generator=generator)[:k]).values  # int64, as top-k gives
    values = torch.randn(k, generator=generator).to(dtype)
    for _ in range(2):  # the pinned staging memory is reused
        assert list(iter_chunks(values.to(CUDA), indices.to(CUDA))) == list(iter_chunks(values, indices))
        assert list(iter_chunks(values.to(CUDA), None)) == list(iter_chunks(values, None))
        assert codec.index_bytes(indices.to(CUDA)) == codec.index_bytes(indices)
        assert codec.value_bytes(values.to(CUDA)) == codec.value_bytes(values)
    header_gpu, header_cpu = pb.PushHeader(worker_id=1, round=2), pb.PushHeader(worker_id=1, round=2)
    update_gpu = Update(values=values.to(CUDA), indices=indices.to(torch.int32).to(CUDA))
    update_cpu = Update(values=values, indices=indices.to(torch.int32))
    assert codec.push_messages(header_gpu, update_gpu) == codec.push_messages(header_cpu, update_cpu)


@pytest.mark.parametrize("dense", [False, True])
def test_deltas_applied_on_the_gpu_match_the_cpu_bit_for_bit(dense: bool) -> None:
    d = 3 * codec.CHUNK_ELEMENTS + 11
    on_cpu = torch.randn(d, generator=torch.Generator().manual_seed(7))
    on_gpu = on_cpu.to(CUDA)
    staging = DeviceStaging(CUDA)
    for delta in decoded_deltas(d, dense, seed=8, rounds=4):
        apply_delta(on_cpu, delta)
        apply_delta(on_gpu, update_to_device(delta, staging))
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert model_checksum(on_gpu) == model_checksum(on_cpu)
