"""Real models on real workers, in-process clusters: buffers, frozen layers, low precision,
param-group options, bad input, a restart from a checkpoint."""
from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import pytest
import torch
from torch import nn

from conftest import join_threads, wait_until
from wanps.proto.codec import Update
from wanps.server.checkpoint import read_checkpoint
from wanps.server.service import ServerConfig, start_server
from wanps.worker import Observer, Optimizer
from wanps.worker.layout import ModelMismatch, collect_module, layout_of, with_buffers
from wanps.worker.skip_rule import SkipRule
from wanps.worker.tasks import get_task

# Bounds on a hang, not on speed. The one "a worker did not finish" (a 90 s join per thread, 120 s
# per test) fits load, not a race: with tau <= 1 both workers end within a round of each other,
# so worker 0 was still in its last rounds at its 90 s join while worker 1 had just ended.
pytestmark = pytest.mark.timeout(300)
WORKERS_TIMEOUT_S = 240
TASK = get_task("synthetic")  # 32 features, 4 classes


def bn_mlp(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A BatchNorm MLP with a frozen first layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    return model.to(dtype)


def in_threads(count: int, work: Callable[[int], object], timeout: float = WORKERS_TIMEOUT_S) -> dict[int, object]:
    """Run work(i) for i in range(count) on threads; their results, or the first error raised
    (a thread still running at `timeout` fails naming it, with its stack)."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    join_threads(threads, timeout, errors)
    assert not errors, errors
    assert len(results) == count  # every thread ended, none with an error: each left its result
    return results


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- low precision


def test_a_bfloat16_model_trains_on_a_float32_master_and_stays_bit_identical(make_cluster):
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None)
    probe_x, probe_y = next(TASK.batches(0, 1, 256, seed=99))

    def work(i: int) -> dict:
        model = bn_mlp(i + 1, torch.bfloat16)
        opt = Optimizer(model, server=cluster.server_address, lr=0.2, tau=1, delta=0.3, buffer_sync_every=4)
        model.eval()
        with torch.no_grad():
            before = float(TASK.loss(model, probe_x.to(torch.bfloat16), probe_y))
        model.train()
        initial = opt.replica.clone()
        batches = TASK.batches(opt.rank, 2, 32, i + 1)
        for _ in range(40):
            x, y = next(batches)
            opt.zero_grad()
            TASK.loss(model, x.to(torch.bfloat16), y).backward()
            opt.step()
        opt.close()
        model.eval()
        with torch.no_grad():
            after = float(TASK.loss(model, probe_x.to(torch.bfloat16), probe_y))
        return {"state": model.state_dict(), "replica": opt.replica.clone(), "initial": initial,
                "before": before, "after": after, "layout": opt.layout, "model": model}

    a, b = in_threads(2, work).values()
    assert a["after"] < a["before"] - 0.1, (a["before"], a["after"])  # it learned
    assert not torch.equal(a["replica"], a["initial"])
    # The float32 master is the truth: replicas equal each other and the server's model, bit for bit.
    assert a["replica"].dtype == torch.float32
    assert torch.equal(a["replica"], b["replica"]) and torch.equal(a["replica"], cluster.core.model)
    assert same_state(a["state"], b["state"])
    # The model's bfloat16 parameters are the master rounded; buffers too (BatchNorm in bfloat16).
    for entry in a["layout"].entries:
        tensor = a["state"][entry.name]
        assert tensor.dtype == entry.dtype
        assert torch.equal(tensor.reshape(-1), a["replica"][entry.slice].to(entry.dtype)), entry.name
    assert a["state"]["0.weight"].dtype == torch.bfloat16 and a["state"]["1.running_var"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------- param groups


def test_weight_decay_and_momentum_per_group_follow_torch_sgd(make_cluster):
    """One worker, dense pushes (delta 1), tau 0: the replica moves exactly as torch.optim.SGD
    moves a copy of the model with the same groups (momentum buffer m = mu*m + g + wd*x)."""
    cluster = make_cluster(min_workers=1, tau_max=0, policy=None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    reference = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    reference.load_state_dict(model.state_dict())
    groups = [{"params": model[0].parameters(), "weight_decay": 0.5, "momentum": 0.9},
              {"params": model[2].parameters(), "lr": 0.3, "momentum": 0.5}]
    opt = Optimizer(model, server=cluster.server_address, lr=0.1, tau=0, delta=1.0, param_groups=groups)
    sgd = torch.optim.SGD([{"params": reference[0].parameters(), "weight_decay": 0.5, "momentum": 0.9},
                           {"params": reference[2].parameters(), "lr": 0.3, "momentum": 0.5}], lr=0.1)
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))  # plain SGD, one lr: the options must matter
    bare_sgd = torch.optim.SGD(bare.parameters(), lr=0.1)
    try:
        data = torch.randn(6, 8, 4, generator=torch.Generator().manual_seed(1))
        for x in data:
            for net, optimizer in ((model, opt), (reference, sgd), (bare, bare_sgd)):
                optimizer.zero_grad()
                net(x).square().mean().backward()
                optimizer.step()
        for (name, mine), theirs, plain in zip(model.named_parameters(), reference.parameters(), bare.parameters()):
            assert torch.allclose(mine, theirs, atol=1e-6, rtol=1e-5), name
            assert float((mine - plain).detach().abs().max()) > 1e-3, name
    finally:
        opt.close()


def test_options_that_change_the_update_are_refused_before_joining(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    model = nn.Linear(2, 2)
    for option, match in ((dict(nesterov=True), "nesterov=True"), (dict(dampening=0.1), "dampening=0.1"),
                          (dict(maximize=True), "maximize"), (dict(betas=(0.9, 0.99)), "'betas' is not supported"),
                          (dict(momentum=1.5), "momentum must be in"), (dict(weight_decay=-1), "weight_decay")):
        with pytest.raises(ValueError, match=match):
            Optimizer([{"params": model.parameters(), **option}], server=cluster.server_address)
        with pytest.raises(ValueError, match=match):
            Optimizer(model, server=cluster.server_address, param_groups=[{"params": model.parameters(), **option}])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        Optimizer(model, server=cluster.server_address, param_groups=[{"params": [nn.Parameter(torch.zeros(1))]}])
    with pytest.raises(ValueError, match="no trainable parameters"):
        Optimizer(nn.Linear(2, 2).requires_grad_(False), server=cluster.server_address)
    with pytest.raises(ValueError, match="param_groups= goes with a module"):
        Optimizer(model.parameters(), server=cluster.server_address, param_groups=[])
    assert cluster.core.num_params is None and not cluster.core.members  # nobody joined
    # Neutral values of torch.optim.SGD's options are fine, and so are names.
    opt = Optimizer([{"params": model.parameters(), "dampening": 0, "nesterov": False, "name": "all"}],
                    server=cluster.server_address, lr=0.1)
    try:
        with pytest.raises(RuntimeError, match="add_param_group after construction is not supported"):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
        assert len(opt.param_groups) == 1
    finally:
        opt.close()


# ---------------------------------------------------------------------------- bad input


def test_a_different_model_is_refused_naming_the_first_differing_tensor(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    first = Optimizer(bn_mlp(1), server=cluster.server_address, lr=0.1)
    try:
        other = bn_mlp(2)
        other[3] = nn.Linear(16, 5)
        with pytest.raises(ModelMismatch, match=r"tensor 2 of the layout: the cluster has '3.weight' \(4, 16\) "
                                                r"float32 trainable, this model has '3.weight' \(5, 16\)") as refused:
            Optimizer(other, server=cluster.server_address, lr=0.1)
        assert refused.value.__cause__.code() == grpc.StatusCode.FAILED_PRECONDITION
        unfrozen = bn_mlp(2).requires_grad_(True)
        with pytest.raises(ModelMismatch, match="the cluster has '1.weight' .* this model has '0.weight'"):
            Optimizer(unfrozen, server=cluster.server_address, lr=0.1)
        with pytest.raises(ModelMismatch, match="bfloat16"):
            Observer(bn_mlp(2, torch.bfloat16), cluster.server_address)
        assert sorted(cluster.core.members) == [first.worker_id]
    finally:
        first.close()


def test_parameters_without_names_join_a_cluster_of_modules(make_cluster):
    """A worker that passes parameters of a model without buffers matches one that passes the module."""
    cluster = make_cluster(min_workers=2, tau_max=1, policy=None)
    models = [TASK.build_model(1), TASK.build_model(2)]

    def work(i: int) -> torch.Tensor:
        opt = Optimizer(models[0] if i == 0 else models[1].parameters(), server=cluster.server_address, lr=0.1,
                        tau=0, delta=0.5)
        batches = TASK.batches(opt.rank, 2, 16, i)
        for _ in range(5):
            x, y = next(batches)
            opt.zero_grad()
            TASK.loss(models[i], x, y).backward()
            opt.step()
        opt.wait_for_version(5, timeout_s=30)
        opt.close()
        return opt.replica.clone()

    a, b = in_threads(2, work).values()
    assert torch.equal(a, b) and torch.equal(a, cluster.core.model)


def test_a_sparse_gradient_is_refused_at_the_first_step(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    embedding = nn.Embedding(10, 2, sparse=True)
    opt = Optimizer(embedding.parameters(), server=cluster.server_address, lr=0.1)  # no module: known only at the step
    try:
        embedding(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError, match="sparse gradient"):
            opt.step()
    finally:
        opt.close()


# ---------------------------------------------------------------------------- buffer sync


def test_sasg_uploads_at_buffer_sync_rounds_and_the_round_after(make_cluster):
    """A skip makes the server reuse the last upload: one that carried buffers must never be reused."""
    cluster = make_cluster(min_workers=2, tau_max=1, policy=None)

    def work(i: int) -> dict:
        model = bn_mlp(i + 1)
        rule = SkipRule([1e12] * 10)  # skips whenever allowed
        opt = Optimizer(model, server=cluster.server_address, lr=0.05, tau=0, delta=0.5, skip_rule=rule,
                        buffer_sync_every=4)
        uploads = []
        batches = TASK.batches(opt.rank, 2, 32, i)
        for _ in range(17):
            x, y = next(batches)

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = TASK.loss(model, x, y)
                loss.backward()
                return loss

            before = rule.uploads
            round_ = opt.round
            opt.step(closure)
            uploads.append((round_, rule.uploads > before))
        opt.close()
        return {"uploads": uploads, "state": model.state_dict(), "sync": opt.buffer_sync_every}

    a, b = in_threads(2, work).values()
    assert a["sync"] == 4
    for round_, uploaded in a["uploads"] + b["uploads"]:
        if (round_ + 1) % 4 == 0 or round_ % 4 == 0:  # a sync round, or the one after it (and round 0)
            assert uploaded, round_
    assert any(not uploaded for _, uploaded in a["uploads"]), "the rule never skipped: the test shows nothing"
    assert same_state(a["state"], b["state"])


def test_a_late_push_puts_back_only_its_gradient_part(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    opt = Optimizer(bn_mlp(1), server=cluster.server_address, lr=0.1)
    try:
        t = opt.trainable_params
        residual = opt.rule.residual.clone()
        gradient_part = Update(values=torch.tensor([1.0, 2.0]), indices=torch.tensor([0, t - 1], dtype=torch.int32))
        buffers = Update(values=torch.tensor([5.0]), indices=torch.tensor([opt.num_params - 1], dtype=torch.int32))
        opt.session.late_updates.append(with_buffers(gradient_part, opt.layout, buffers))
        opt._raise_failed_pushes()  # what step() does first
        expected = residual.clone()
        expected[0] += 1.0
        expected[t - 1] += 2.0
        assert torch.equal(opt.rule.residual, expected)
    finally:
        opt.close()


def test_buffers_survive_a_server_restart_from_a_checkpoint(loop_thread, tmp_path):
    """The server's model carries the buffers: its checkpoint holds the last sync's mean, a
    resumed server serves it to a new observer, and training goes on to identical state_dicts."""
    config = dict(host="127.0.0.1", metrics_port=-1, min_workers=2, tau_max=2, checkpoint_dir=str(tmp_path),
                  checkpoint_every=0)
    server = loop_thread.run(start_server(ServerConfig(port=0, **config)))
    port = server.port
    pause_at, rounds = 10, 22
    resume = threading.Event()
    try:
        def work(i: int) -> dict:
            model = bn_mlp(i + 1)
            opt = Optimizer(model, server=f"127.0.0.1:{port}", lr=0.1, tau=1, delta=0.3, buffer_sync_every=4)
            batches = TASK.batches(opt.rank, 2, 32, i + 1)
            while opt.round < rounds:
                if opt.round == pause_at:
                    assert resume.wait(WORKERS_TIMEOUT_S)
                x, y = next(batches)
                opt.zero_grad()
                TASK.loss(model, x, y).backward()
                opt.step()
            opt.close()
            return {"state": model.state_dict(), "replica": opt.replica.clone(), "version": opt.version,
                    "recoveries": opt.session.recoveries}

        results: dict = {}
        runner_errors: list[BaseException] = []

        def run_workers() -> None:
            try:
                results.update(in_threads(2, work))
            except BaseException as exc:  # surfaced below
                runner_errors.append(exc)

        runner = threading.Thread(target=run_workers)
        runner.start()
        wait_until(lambda: server.service.core.version >= pause_at or not runner.is_alive(),
                   f"version {pause_at}", timeout_s=WORKERS_TIMEOUT_S)
        assert not runner_errors, runner_errors
        assert server.service.core.version == pause_at  # both workers wait before computing round 10
        loop_thread.run(server.stop(0))  # writes the final checkpoint
        saved = read_checkpoint(tmp_path)["model"]
        at = {e.name: e.slice for e in layout_of(collect_module(bn_mlp(0)))[0].entries}
        count_at, mean_at = saved[at["1.num_batches_tracked"]], saved[at["1.running_mean"]]
        assert count_at > 0 and mean_at.abs().sum() > 0  # the last sync's mean (round 7), not the seed's
        server = loop_thread.run(start_server(ServerConfig(port=port, resume_dir=str(tmp_path), **config)))
        follower = bn_mlp(7)
        observer = Observer(follower, f"127.0.0.1:{port}")
        try:
            assert observer.version == pause_at
            # The replica holds the workers' mean count, which is x.5 when one of them had run one
            # more forward pass at the sync; every module loads it rounded (as ModelBinding does).
            assert int(follower[1].num_batches_tracked) == int(count_at.round())
            assert torch.equal(follower[1].running_mean, mean_at)
            resume.set()
            join_threads([runner], WORKERS_TIMEOUT_S, runner_errors)
            assert not runner_errors, runner_errors
            assert len(results) == 2
            a, b = results[0], results[1]
            assert a["recoveries"] >= 1 and b["recoveries"] >= 1
            assert a["version"] == b["version"] == rounds + 1  # close() synced once more, in round 22
            assert same_state(a["state"], b["state"])
            assert torch.equal(a["replica"], server.service.core.model)
            observer.wait_for_version(rounds + 1, timeout_s=30)
            assert same_state(follower.state_dict(), a["state"])
        finally:
            observer.close()
    finally:
        resume.set()
        loop_thread.run(server.stop(0))


def test_a_server_that_does_not_answer_is_a_clear_error_naming_the_address() -> None:
    """A wrong address: ConnectionError naming it, within the caller's join timeout (not gRPC's own)."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once this socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match=rf"no wanps server answered at 127\.0\.0\.1:{port} within 1 s"):
        Optimizer(nn.Linear(4, 2), server=f"127.0.0.1:{port}", lr=0.1, join_timeout_s=1)
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}"):
        Observer(nn.Linear(4, 2), f"127.0.0.1:{port}", join_timeout_s=1)
