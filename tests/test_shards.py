"""Key-range shards (docs/architecture.md, "Beyond one server"): `wanps server --shard I/N`,
workers and observers over N shards.

Pure parts first (ranges, the --shard flag, how a push is split, the Join view), then
clusters of real gRPC servers on 127.0.0.1 (in this process, port 0, workers in threads):
replicas equal the concatenation of the shards' models, conservation on every shard, skips
on every shard, the controller hearing one worker, a late joiner, a shard restarted empty,
bad input; and one cluster of real processes where a shard is killed with SIGKILL and
resumed from its checkpoint while `wanps worker --server A,B` processes train.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from wanps.controller.estimator import KIND_PUSH
from wanps.controller.policy import PolicyConfig
from wanps.controller.service import ControllerConfig, start_controller
from wanps.deploy.processes import ManagedProcess, start_process, stop_all, wanps_command
from conftest import OptimizerInThread
from conftest import wait_until as wait_for
from wanps.proto import structure as structures
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.proto.codec import Update, push_messages
from wanps.proto.shards import shard_range, shard_ranges
from wanps.proto.structure import TensorSpec
from wanps.rpc.errors import FailedPrecondition, InvalidArgument
from wanps.server.checkpoint import core_state, read_checkpoint, restore_core
from wanps.server.cli import parse_config as server_config
from wanps.server.core import CoreConfig, ServerCore
from wanps.server.service import RunningServer, ServerConfig, start_server
from wanps.server.shard import ShardMismatch, ShardSpec, ShardView, check_view, parse_shard
from wanps.worker import Interrupted, Optimizer
from wanps.worker.layout import ModelMismatch, collect_module, layout_of
from wanps.worker.observer import Observer
from wanps.worker.session import WorkerSession
from wanps.worker.shards import ShardOrderError, ShardedSession, open_session, split_update, to_global
from wanps.worker.skip_rule import SkipRule
from wanps.worker.tasks import get_task

pytestmark = pytest.mark.timeout(180)


# ---------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("total,count", [(total, count) for total in (1, 2, 7, 10, 661, 1_000_003)
                                         for count in (1, 2, 3, 7) if count <= total])
def test_ranges_are_contiguous_balanced_and_cover_the_vector(total, count):
    ranges = shard_ranges(total, count)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert ranges == [(i * total // count, (i + 1) * total // count) for i in range(count)]
    assert shard_range(total, 0, 1) == (0, total)


def test_the_shard_flag_takes_an_index_or_the_host_ordinal():
    assert parse_shard("0/1", "vm") == ShardSpec(0, 1)
    assert parse_shard("2/3", "vm") == ShardSpec(2, 3)
    assert parse_shard("host/3", "wanps-server-2") == ShardSpec(2, 3)  # a StatefulSet pod
    assert parse_shard("host/3", "wanps_server.3", ordinal_base=1) == ShardSpec(2, 3)  # Swarm's slot counts from 1
    for bad, what in [("3/3", "outside 0..2"), ("1", "expected I/N"), ("a/2", "the index is a number"),
                      ("0/0", "at least 1 shard"), ("host/2", "does not end in a number"), ("-1/2", "the index")]:
        with pytest.raises(ValueError, match=what) as refused:
            parse_shard(bad, "vm")
        assert f"--shard {bad!r}" in str(refused.value) and "\n" not in str(refused.value)
    assert parse_shard("host/2", "server-2", ordinal_base=1) == ShardSpec(1, 2)
    with pytest.raises(ValueError, match=r"host 'server-2', ordinal base 0\): shard index 2 is outside 0..1"):
        parse_shard("host/2", "server-2")


def test_a_bad_shard_flag_is_a_one_line_usage_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        server_config(["--shard", "2/2"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "wanps server: error: --shard '2/2': shard index 2 is outside 0..1")
    monkeypatch.setenv("WANPS_SHARD", "host/3")
    monkeypatch.setenv("WANPS_SHARD_ORDINAL_BASE", "1")
    monkeypatch.setattr("socket.gethostname", lambda: "wanps_server.3")  # Swarm's {{.Task.Slot}} is 3
    config = server_config([])
    assert (config.shard_index, config.shard_count) == (2, 3)
    assert (server_config(["--shard", "1/2"]).shard_index, ServerConfig().shard_count) == (1, 1)


def test_a_push_is_split_by_range_with_local_indices():
    ranges = shard_ranges(10, 3)  # [0, 3) [3, 6) [6, 10)
    sparse = Update(values=torch.tensor([1.0, 2.0, 3.0, 4.0]), indices=torch.tensor([0, 2, 7, 9], dtype=torch.int32))
    pieces = split_update(sparse, ranges)
    assert [p.indices.tolist() for p in pieces] == [[0, 2], [], [1, 3]]
    assert [p.values.tolist() for p in pieces] == [[1.0, 2.0], [], [3.0, 4.0]]
    # A shard with nothing of the push gets an empty push, not a skip (None).
    assert pieces[1] is not None and pieces[1].count == 0 and pieces[1].block_start is None
    back = [to_global(p, start) for p, (start, _) in zip(pieces, ranges)]
    assert torch.cat([p.indices for p in back]).tolist() == [0, 2, 7, 9]
    # A random block across a boundary becomes one block in each range it touches.
    block = Update(values=torch.arange(5, dtype=torch.float32), indices=torch.arange(2, 7, dtype=torch.int32),
                   block_start=2)
    pieces = split_update(block, ranges)
    assert [(p.block_start, p.values.tolist()) for p in pieces] == [(2, [0.0]), (0, [1.0, 2.0, 3.0]), (0, [4.0])]
    assert [p.indices.tolist() for p in pieces] == [[2], [0, 1, 2], [0]]
    inside = split_update(Update(values=torch.ones(2), indices=torch.arange(7, 9, dtype=torch.int32), block_start=7),
                          ranges)
    assert [p.count for p in inside] == [0, 0, 2] and inside[2].block_start == 1 and inside[0].block_start is None
    # Dense: each range's slice, dense again (count = the range's length).
    dense = split_update(Update(values=torch.arange(10, dtype=torch.float32), indices=None), ranges)
    assert [p.values.tolist() for p in dense] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert all(p.indices is None for p in dense)
    assert to_global(dense[1], 3).indices.tolist() == [3, 4, 5]
    assert split_update(None, ranges) == [None, None, None]  # a skip is a skip on every shard


def test_a_join_view_must_be_this_shards():
    spec = ShardSpec(1, 3)
    check_view(spec, ShardView(1, 3, 10), 3)  # [3, 6)
    with pytest.raises(FailedPrecondition, match="shard 0/3, but it is shard 1/3"):
        check_view(spec, ShardView(0, 3, 10), 3)
    with pytest.raises(FailedPrecondition, match="shard 1/2, but it is shard 1/3"):
        check_view(spec, ShardView(1, 2, 10), 5)
    with pytest.raises(InvalidArgument, match=r"num_params 4 is not the length of shard 1/3 \[3, 6\) of 10"):
        check_view(spec, ShardView(1, 3, 10), 4)
    with pytest.raises(InvalidArgument, match="names no shard"):
        check_view(spec, ShardView(3, 3, 10), 3)


def test_a_shard_core_keeps_the_whole_size_and_its_checkpoint_its_shard():
    specs = (TensorSpec("w", (10,), "torch.float32", "trainable"),)
    fingerprint = structures.fingerprint(specs)
    core = ServerCore(CoreConfig(shard_index=1, shard_count=2))
    core.join(5, fingerprint, structure=specs, total_params=10)  # [5, 10) of 10
    assert (core.num_params, core.total_params) == (5, 10)
    with pytest.raises(FailedPrecondition, match="has 12 elements in all; the cluster's shards cut a model of 10"):
        core.join(6, fingerprint, total_params=12)
    with pytest.raises(InvalidArgument, match="its tensors hold 10 elements, num_params is 12"):
        core.join(6, fingerprint, structure=specs, total_params=12)
    assert len(core.members) == 1
    state = core_state(core)
    assert state["shard"] == [1, 2] and state["total_params"] == 10
    assert restore_core(state, CoreConfig(shard_index=1, shard_count=2)).total_params == 10
    for other in (CoreConfig(), CoreConfig(shard_index=0, shard_count=2), CoreConfig(shard_index=1, shard_count=3)):
        with pytest.raises(ShardMismatch, match=f"DIR was written by shard 1/2; this server is shard "
                                                f"{other.shard_index}/{other.shard_count}"):
            restore_core(state, other, where="DIR")
    # A checkpoint from before shards is the single server's.
    legacy = {key: value for key, value in core_state(ServerCore(CoreConfig())).items()
              if key not in ("shard", "total_params")}
    assert restore_core(legacy, CoreConfig()).total_params is None
    with pytest.raises(ShardMismatch, match="written by shard 0/1"):
        restore_core(legacy, CoreConfig(shard_index=0, shard_count=2), where="DIR")


def test_one_address_is_the_single_servers_session():
    session = open_session("127.0.0.1:1")  # never dialled: channels connect lazily
    try:
        assert type(session) is WorkerSession and session.shard_view is None
    finally:
        session.close()
    with pytest.raises(ValueError, match="more than once"):
        open_session("127.0.0.1:1,127.0.0.1:1")
    with pytest.raises(ValueError, match="separated by commas"):
        open_session("127.0.0.1:1,")


# ---------------------------------------------------------------------------- in-process clusters


def start_shards(loop_thread, count: int, **options) -> list[RunningServer]:
    servers = []
    for index in range(count):
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, shard_index=index, shard_count=count,
                              **options)
        servers.append(loop_thread.run(start_server(config, CollectorRegistry())))
    return servers


@pytest.fixture
def shards(loop_thread) -> Iterator[Callable[..., list[RunningServer]]]:
    started: list[RunningServer] = []

    def start(count: int, **options) -> list[RunningServer]:
        servers = start_shards(loop_thread, count, **options)
        started.extend(servers)
        return servers

    yield start
    for server in started:
        loop_thread.run(server.stop(0))


def addresses(servers: list[RunningServer]) -> str:
    return ",".join(f"127.0.0.1:{server.port}" for server in servers)


def whole_model(servers: list[RunningServer]) -> torch.Tensor:
    return torch.cat([server.service.core.model for server in servers])


def assert_conserved(servers: list[RunningServer]) -> None:
    """On every shard: each round applied once, in order; model = initial - sum of applied means."""
    for server in servers:
        core = server.service.core
        assert core.applied_rounds == list(range(core.version))
        expected = core.initial_model.double() - core.applied_sum
        assert torch.allclose(expected, core.model.double(), atol=1e-5)


def run_in_threads(work: Callable[[int], None], count: int, timeout: float = 120) -> None:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def closure_for(opt: Optimizer, model: nn.Module, task, batch) -> Callable[[], torch.Tensor]:
    x, y = batch

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task.loss(model, x, y)
        loss.backward()
        return loss

    return closure


def test_two_shards_train_as_one_server_with_skips_and_one_worker_for_the_controller(loop_thread, shards):
    """Two workers with SASG (a huge threshold: every round that may skip does) and an observer
    over two shards, with a controller: every replica equals the shards' models side by side at
    the same versions, each shard conserves its model, a skip is a skip on both shards, and
    the controller hears each worker's whole push once per round (bytes summed over shards)."""
    servers = shards(2, min_workers=2, tau_max=2, audit=True)
    controller = loop_thread.run(start_controller(ControllerConfig(
        host="127.0.0.1", port=0, metrics_port=-1, policy=PolicyConfig(name="static", tau=2, delta=0.2))))
    task = get_task("synthetic")
    models = [task.build_model(0) for _ in range(3)]  # built here: build_model seeds torch's global generator
    rounds, max_delay = 21, 4
    finals: dict[int, tuple[int, torch.Tensor, int, int]] = {}
    observers: list[Observer] = []
    registries = [CollectorRegistry() for _ in range(2)]
    try:
        def work(index: int) -> None:
            if index == 2:  # the observer: its pull waits for the workers to seed every shard
                observers.append(Observer(models[2], addresses(servers), keep_deltas=True))
                return
            model = models[index]
            opt = Optimizer(model, server=addresses(servers), controller=f"127.0.0.1:{controller.port}", lr=0.1,
                            skip_rule=SkipRule([1e12] * max_delay), registry=registries[index])
            try:
                assert isinstance(opt.session, ShardedSession)
                batches = task.batches(opt.rank, opt.world_size, 16, seed=index)
                for _ in range(rounds):
                    opt.step(closure_for(opt, model, task, next(batches)))
                opt.wait_for_version(rounds, timeout_s=60)
                finals[index] = (opt.version, opt.replica.clone(), opt.worker_id, opt.skip_rule.skips)
            finally:
                opt.close()

        try:
            run_in_threads(work, 3)
            observer = observers[0]
            assert observer.wait_for_version(rounds, timeout_s=30) == rounds
            observed = observer.replica.values.clone()
            applied = list(observer.replica.applied)
        finally:
            for observer in observers:
                observer.close()
        model = whole_model(servers)
        assert [server.service.core.version for server in servers] == [rounds, rounds]
        for version, replica, _, _ in finals.values():
            assert version == rounds and torch.equal(replica, model)
        assert torch.equal(observed, model)
        assert_conserved(servers)
        # The observer saw each round once, joined over both shards (global indices).
        assert [delta.round for delta in applied] == list(range(observer.initial_version, rounds))
        replayed = observer.initial_values.clone()
        for delta in applied:
            replayed.index_add_(0, delta.delta.indices.long(), delta.delta.values, alpha=-1.0)
        assert torch.equal(replayed, model)
        # Skips: every worker skipped the same rounds on both shards.
        skips = sum(skips for *_, skips in finals.values())
        assert skips == 2 * (rounds - 1 - (rounds - 1) // max_delay)
        for server in servers:
            pushes = server.service.metrics.pushes
            assert pushes.labels(kind="skip")._value.get() == skips
            assert pushes.labels(kind="update")._value.get() == 2 * rounds - skips
            assert server.service.metrics.shard_count._value.get() == 2
        assert [server.service.metrics.shard_index._value.get() for server in servers] == [0, 1]
        # The controller: one worker per Optimizer (its id on shard 0), the whole model's size,
        # and a push sample per uploaded round carrying the whole push (k elements of both shards).
        engine = controller.service.core
        trainable = sum(p.numel() for p in models[0].parameters())
        assert engine.num_params == trainable
        k = -(-2 * trainable // 10)  # ceil(0.2 * T): what the static decision sends
        for _, _, worker_id, _ in finals.values():
            pushes = [nbytes for _, kind, nbytes in engine._traffic[worker_id] if kind == KIND_PUSH]
            uploads = [nbytes for nbytes in pushes if nbytes > 0]
            assert uploads and all(nbytes == 8 * k for nbytes in uploads), uploads
            assert len(pushes) <= rounds
        # A worker's own metrics count each round once, whole, under the id the controller knows.
        for registry, (_, _, worker_id, worker_skips) in zip(registries, (finals[0], finals[1])):
            assert registry.get_sample_value("wanps_worker_pushes_total", {"kind": "skip"}) == worker_skips
            assert registry.get_sample_value("wanps_worker_pushes_total", {"kind": "update"}) == rounds - worker_skips
            assert registry.get_sample_value("wanps_worker_push_duration_seconds_count") <= rounds
            assert registry.get_sample_value("wanps_worker_id") == worker_id
    finally:
        loop_thread.run(controller.stop(0))


class NormedNet(nn.Module):
    """Small, with BatchNorm: its buffers end the flat vector, so buffer syncs reach the last shard."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def push_round_to_one_shard(servers: list[RunningServer], model: nn.Module, round_: int, shard: int) -> None:
    """A member that joins every shard, pushes `round_` (nothing in it) to one shard only, and
    leaves: that shard's next unpushed round is then one later than the others'."""
    layout, _ = layout_of(collect_module(model))
    count = len(servers)
    ranges = shard_ranges(layout.size, count)
    specs = tuple(layout.structure)
    stubs = []
    with contextlib.ExitStack() as stack:
        for server in servers:
            channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
            stubs.append(pb_grpc.ParameterServerStub(channel))
        replies = [stub.Join(join_request((index, count, layout.size), stop - start, specs), timeout=10)
                   for index, (stub, (start, stop)) in enumerate(zip(stubs, ranges))]
        header = pb.PushHeader(worker_id=replies[shard].worker_id, round=round_, computed_at_version=round_,
                               member_secret=replies[shard].member_secret)
        messages, _ = push_messages(header, Update(values=torch.empty(0), indices=torch.empty(0, dtype=torch.int32)))
        assert not stubs[shard].Push(iter(messages), timeout=10).duplicate
        for stub, reply in zip(stubs, replies):
            stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, member_secret=reply.member_secret), timeout=10)


def test_three_shards_and_a_late_joiner(loop_thread, shards):
    """Two workers train a model with BatchNorm over three shards; a third joins late, when
    shard 0 expects it one round later than shards 1 and 2 (another member pushed that round
    to shard 0 only). It starts at the earlier round, sends shard 0 nothing for it (that part
    goes back into its error feedback), and everyone ends at the same round with the shards'
    models, identical state_dicts, and each shard conserved."""
    servers = shards(3, min_workers=2, tau_max=2, audit=True)
    task = get_task("synthetic")
    models = [NormedNet() for _ in range(3)]
    rounds, late_from = 30, 8
    joined_late = threading.Event()
    finals: dict[int, tuple[int, torch.Tensor, dict, list[int]]] = {}

    def work(index: int) -> None:
        model = models[index]
        if index == 2:  # the late joiner: once every shard has closed the rounds before late_from
            deadline = time.monotonic() + 60
            while min(s.service.core.version for s in servers) < late_from:
                assert time.monotonic() < deadline, "the early workers did not reach the late joiner's round"
                time.sleep(0.02)
            push_round_to_one_shard(servers, NormedNet(), late_from, shard=0)
        opt = Optimizer(model, server=addresses(servers).split(","), lr=0.1, tau=1, delta=0.3, buffer_sync_every=4)
        first_rounds = list(opt.session.first_rounds)
        if index == 2:
            joined_late.set()
        batches = task.batches(index, 3, 16, seed=index)
        try:
            while opt.round < rounds:
                if opt.round == late_from:
                    joined_late.wait(60)  # the early workers wait for it before pushing this round
                x, y = next(batches)
                opt.zero_grad()
                task.loss(model, x, y).backward()
                opt.step()
        finally:
            opt.close()  # the final round: buffers synced, every worker's state_dict the same
        finals[index] = (opt.version, opt.replica.clone(), model.state_dict(), first_rounds)

    run_in_threads(work, 3)
    assert finals[2][3] == [late_from + 1, late_from, late_from]
    assert finals[0][3] == finals[1][3] == [0, 0, 0]
    model = whole_model(servers)
    versions = {server.service.core.version for server in servers}
    assert versions == {rounds + 1}  # the rounds, then close()'s buffer sync
    for version, replica, _, _ in finals.values():
        assert version == rounds + 1 and torch.equal(replica, model)
    reference = finals[0][2]
    for _, _, state, _ in finals.values():
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[name], reference[name]) for name in reference)
    assert_conserved(servers)


def test_a_shard_restarted_empty_is_reseeded_and_brought_back_in_step(loop_thread, shards):
    """Shard 1 of 2 restarts without a checkpoint: the workers join it again (one seeds it
    with its range), send it empty pushes for the rounds it now expects again, and training
    goes on with rounds in step on both shards; replicas equal the shards' models."""
    servers = shards(2, min_workers=2, tau_max=2, audit=True)
    task = get_task("synthetic")
    models = [task.build_model(seed) for seed in (1, 2)]
    restarted = threading.Event()
    target: list[int] = []
    finals: dict[int, tuple[int, torch.Tensor, int]] = {}

    def work(index: int) -> None:
        model = models[index]
        opt = Optimizer(model.parameters(), server=addresses(servers), lr=0.2, tau=1, delta=0.1)
        batches = task.batches(opt.rank, 2, 32, seed=index)
        try:
            while not (restarted.is_set() and opt.round >= target[0]):
                x, y = next(batches)
                opt.zero_grad()
                task.loss(model, x, y).backward()
                opt.step()
            opt.wait_for_version(opt.round, timeout_s=60)
            finals[index] = (opt.version, opt.replica.clone(), opt.session.recoveries)
        finally:
            opt.close()

    def restart_shard_1() -> None:
        deadline = time.monotonic() + 60
        while min(server.service.core.version for server in servers) < 15:
            assert time.monotonic() < deadline, "the workers did not reach round 15"
            time.sleep(0.02)
        port = servers[1].port
        loop_thread.run(servers[1].stop(0))
        servers[1] = start_shards_at(loop_thread, 1, 2, port, min_workers=2, tau_max=2, audit=True)
        target.append(servers[0].service.core.version + 20)  # every worker is below it (tau 1)
        restarted.set()

    def run_all(index: int) -> None:
        if index == 2:
            restart_shard_1()
        else:
            work(index)

    try:
        run_in_threads(run_all, 3)
        end = target[0]
        assert [server.service.core.version for server in servers] == [end, end]
        model = whole_model(servers)
        for version, replica, recoveries in finals.values():
            assert version == end and torch.equal(replica, model) and recoveries >= 1
        assert_conserved(servers)  # shard 1: every round from 0 applied once (empties, then updates)
    finally:
        loop_thread.run(servers[1].stop(0))


def start_shards_at(loop_thread, index: int, count: int, port: int, **options) -> RunningServer:
    config = ServerConfig(host="127.0.0.1", port=port, metrics_port=-1, shard_index=index, shard_count=count,
                          **options)
    return loop_thread.run(start_server(config, CollectorRegistry()))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compressor,value_dtype", [("random-block", "bfloat16"), ("topk-sampled", "float16")])
def test_random_blocks_and_16_bit_values_over_shards_on_the_models_device(loop_thread, shards, device, compressor,
                                                                          value_dtype):
    """The push is split where the model lives (searchsorted and the index shift on its device;
    a random block crossing the boundary becomes two blocks); replicas (views of each shard's
    range on the device) stay equal to the shards' models."""
    from device_checks import batches as device_batches
    from device_checks import tiny_mlp, train

    place = torch.device(device) if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    servers = shards(2, min_workers=2, tau_max=2)
    models = [tiny_mlp(place) for _ in range(2)]  # built here: the same initial model in both
    steps = 12
    finals: dict[int, tuple[int, torch.Tensor]] = {}

    def work(index: int) -> None:
        opt = Optimizer(models[index], server=addresses(servers), lr=0.1, tau=1, delta=0.3, compressor=compressor,
                        value_dtype=value_dtype)
        try:
            assert opt.replica.device == place
            train(opt, models[index], device_batches(place, index), steps)
            opt._wait_until_fresh(opt.round)  # every pushed round applied
            finals[index] = (opt.version, opt.replica.cpu())
        finally:
            opt.close()

    run_in_threads(work, 2)
    model = whole_model(servers)
    for version, replica in finals.values():
        assert version == steps and torch.equal(replica, model)
    assert [server.service.core.version for server in servers] == [steps, steps]


def join_request(view: tuple[int, int, int], num_params: int, specs: tuple[TensorSpec, ...]) -> pb.JoinRequest:
    request = pb.JoinRequest(role=pb.ROLE_WORKER, num_params=num_params, name="raw",
                             model_fingerprint=structures.fingerprint(specs), structure=structures.to_messages(specs))
    request.shard_index, request.shard_count, request.total_params = view
    return request


def test_bad_input_gets_a_clear_error_and_changes_nothing(loop_thread, shards):
    servers = shards(3, min_workers=1, tau_max=2)
    listed = addresses(servers).split(",")
    cores = [server.service.core for server in servers]

    def state() -> list[tuple]:
        return [(core.next_worker_id, len(core.members), core.started, core.version, dict(core.open_rounds))
                for core in cores]

    before = state()
    net = nn.Linear(8, 2)  # 18 elements: [0, 6) [6, 12) [12, 18)
    # Shards listed in the wrong order, or not all of them (a different N): refused before any join.
    for wrong, message in [([listed[1], listed[0], listed[2]], f"the server at {listed[1]} is shard 1/3, but it is "
                                                                "listed as shard 0/3"),
                           (listed[:2], f"the server at {listed[0]} is shard 0/3, but it is listed as shard 0/2")]:
        with pytest.raises(ShardOrderError, match=message):
            Optimizer(net, server=wrong, lr=0.1, join_timeout_s=30)
        with pytest.raises(ShardOrderError):
            Observer(net, wrong, join_timeout_s=30)
    assert state() == before

    # A raw Join naming another shard or a range length that is not its shard's.
    specs = (TensorSpec("weight", (2, 8), "torch.float32", "trainable"), TensorSpec("bias", (2,), "torch.float32",
                                                                                      "trainable"))
    with grpc.insecure_channel(listed[1]) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(join_request((0, 3, 18), 6, specs), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "takes this server for shard 0/3, but it is shard 1/3" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(join_request((1, 2, 18), 9, specs), timeout=10)
        assert "shard 1/2, but it is shard 1/3" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Join(join_request((1, 3, 18), 7, specs), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "num_params 7 is not the length of shard 1/3 [6, 12) of 18 elements" in refused.value.details()
    assert state() == before

    # A worker joins all three shards properly; then a push whose indices leave its shard's range.
    opt = Optimizer(net, server=listed, lr=0.1, tau=0, delta=1.0)
    try:
        core = cores[1]
        shard_session = opt.session.shards[1]
        member = shard_session.worker_id
        version = core.version
        header = pb.PushHeader(worker_id=member, round=version, computed_at_version=version,
                               member_secret=shard_session.member_secret)
        crossing = Update(values=torch.ones(2), indices=torch.tensor([5, 6], dtype=torch.int32))  # local 6 >= 6
        messages, _ = push_messages(header, crossing)
        with grpc.insecure_channel(listed[1]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.ParameterServerStub(channel).Push(iter(messages), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == (
            "indices: 6 is out of range for a model of 6 parameters (this server is shard 1/3 [6, 12) of 18 "
            "elements: a push's indices are local to that range, 0 <= index < 6)")
        assert core.version == version and not core.open_rounds and core.members[member].highest_round_sent == -1

        # A different model (another size) is refused by every shard, naming what differs.
        with pytest.raises(ModelMismatch, match="differs from the cluster's model"):
            Optimizer(nn.Linear(8, 3), server=listed, lr=0.1, join_timeout_s=30)
        assert [len(c.members) for c in cores] == [1, 1, 1]
    finally:
        opt.close()


# ---------------------------------------------------------------------------- real processes


def server_command(listen: str, shard: str, checkpoint_dir: Path, *extra: str) -> list[str]:
    return wanps_command("server", "--listen", listen, "--metrics-listen", "off", "--shard", shard,
                         "--min-workers", "2", "--tau-max", "2", "--checkpoint-dir", str(checkpoint_dir),
                         "--checkpoint-every", "4", "--audit", *extra)


def ping_version(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.ParameterServerStub(channel).Ping(pb.PingRequest(), timeout=2).version
        except grpc.RpcError:
            return None


def wait_until(condition: Callable[[], bool], processes: list[ManagedProcess], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        for process in processes:
            assert process.running() or process.wait() == 0, f"{process.name} died:\n{process.tail()}"
        time.sleep(0.05)


def one_line_error(process: ManagedProcess) -> str:
    """The last line a process that refused to start wrote (its exit code 2, no traceback)."""
    assert process.wait(60) == 2, process.tail()
    text = process.tail(50)
    assert "Traceback" not in text, text
    return text.strip().splitlines()[-1]


def test_a_shard_killed_and_resumed_from_its_checkpoint_while_workers_train(tmp_path):
    """Two `wanps server --shard I/2` processes, two `wanps worker --server A,B` processes.
    Shard 1 is killed (SIGKILL) mid-training and started again with --resume on its port: the
    workers reconnect to it alone, re-push what it lost, and finish; every shard conserves its
    model and every replica equals the final checkpoints side by side. A worker given the
    shards out of order, and a server resuming another shard's checkpoint, stop with one line."""
    rounds, count = 40, 2
    logs = tmp_path / "logs"
    checkpoints = [tmp_path / f"shard-{index}" for index in range(count)]
    processes: list[ManagedProcess] = []
    try:
        servers = [start_process(f"shard-{index}", server_command("127.0.0.1:0", f"{index}/{count}",
                                                                  checkpoints[index]), logs)
                   for index in range(count)]
        processes += servers
        for server in servers:
            server.wait_ready(60)
        listed = ",".join(server.address for server in servers)
        # Out of order: refused before joining anything (the servers wait for two workers all along).
        swapped = start_process("worker-swapped", wanps_command(
            "worker", "--server", f"{servers[1].address},{servers[0].address}", "--task", "synthetic"), logs,
            wait_for_line=False)
        processes.append(swapped)
        replicas = [tmp_path / f"replica-{index}.pt" for index in range(2)]
        workers = [start_process(f"worker-{index}", wanps_command(
            "worker", "--server", listed, "--task", "synthetic", "--lr", "0.2", "--batch-size", "32", "--seed",
            str(index + 1), "--until-round", str(rounds), "--save-replica", str(replicas[index]), "--tau", "1",
            "--delta", "0.1", "--name", f"w{index}"), logs, wait_for_line=False) for index in range(2)]
        processes += workers

        victim = servers[1]
        wait_until(lambda: (ping_version(victim.address) or 0) >= 10, workers)
        # Shard 0's checkpoint, resumed as shard 1: refused (run while the others train).
        misplaced = start_process("shard-misplaced", server_command("127.0.0.1:0", f"1/{count}", tmp_path / "unused",
                                                                    "--resume", str(checkpoints[0])), logs)
        processes.append(misplaced)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        resumed = start_process("shard-1-resumed", server_command(victim.address, f"1/{count}", checkpoints[1],
                                                                  "--resume", str(checkpoints[1])), logs)
        processes.append(resumed)
        resumed.wait_ready(60)
        servers[1] = resumed
        for worker in workers:
            assert worker.wait(150) == 0, worker.tail()
        for server in servers:
            assert server.stop() == 0  # SIGTERM: the final checkpoint
        states = [read_checkpoint(directory) for directory in checkpoints]
        for index, state in enumerate(states):
            audit = state["audit"]
            assert state["shard"] == [index, count] and state["version"] == rounds
            assert audit["applied_rounds"] == list(range(rounds)), f"shard {index} applied a round twice or skipped one"
            expected = audit["initial_model"].double() - audit["applied_sum"]
            assert torch.allclose(expected, state["model"].double(), atol=1e-5)
        model = torch.cat([state["model"] for state in states])
        assert model.numel() == states[0]["total_params"]
        for path in replicas:
            saved = torch.load(path, weights_only=True)
            assert saved["version"] == rounds and torch.equal(saved["values"], model)
            assert saved["recoveries"] >= 1  # each worker recovered the killed shard
        assert "resumed from" in resumed.tail(200)
        assert one_line_error(swapped).startswith(
            f"wanps worker: the server at {servers[1].address} is shard 1/2, but it is listed as shard 0/2")
        assert one_line_error(misplaced) == (
            f"wanps server: --resume: the checkpoint in {checkpoints[0]} was written by shard 0/2; this server is "
            f"shard 1/2 (give each shard its own checkpoint directory)")
    finally:
        stop_all(processes)


@pytest.mark.slow  # ~45 s on the loaded 2-core machine (six processes train to 90%); make test-all runs it
def test_the_demo_runs_over_two_shards(tmp_path):
    """`wanps demo --shards 2`: two `wanps server --shard I/2`, workers and the observer over both."""
    out = tmp_path / "results"
    done = subprocess.run(
        wanps_command("demo", "--task", "synthetic", "--workers", "2", "--shards", "2", "--direct",
                      "--policy", "static", "--tau", "1", "--delta", "0.1", "--lr", "0.2", "--target-accuracy", "0.9",
                      "--time-limit", "90", "--eval-every", "0.5", "--out", str(out), "--no-progress"),
        capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "demo.json").read_text())
    assert result["reached_target"] is True and result["shards"] == 2
    assert result["bytes_up"] > 0 and result["bytes_down"] > 0
    assert sorted(path.name for path in (out / "logs").glob("server-*.log")) == ["server-0.log", "server-1.log"]
    assert "2 shards" in done.stdout


def test_interrupt_stops_a_sharded_worker_waiting_for_its_first_pull(shards):
    """interrupt() reaches every shard's session: a worker joined to two shards and waiting
    for a cluster that never starts (min_workers 2) raises Interrupted at once."""
    servers = shards(2, min_workers=2)
    building = OptimizerInThread(nn.Linear(4, 2), server=addresses(servers), lr=0.1, join_timeout_s=600)
    wait_for(lambda: all(len(server.service.view.members) == 1 for server in servers),
             "the worker joined to both shards")
    building.optimizer.interrupt()
    building.join(30)
    assert len(building.errors) == 1 and isinstance(building.errors[0], Interrupted), building.errors
