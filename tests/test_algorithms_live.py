"""SASG, DEF's output step and momentum through a real cluster (gRPC on 127.0.0.1), with tau > 0."""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from wanps.worker import Optimizer
from wanps.worker.skip_rule import SkipRule
from wanps.worker.tasks import get_task
from wanps.worker.update_rule import UpdateConfig

pytestmark = pytest.mark.timeout(180)


def run_workers(count: int, make_optimizer: Callable[[torch.nn.Module], Optimizer], rounds: int,
                before_close: Callable[[int, Optimizer], None] | None = None,
                batch_seed: Callable[[int], int] = lambda index: index) -> list[Optimizer]:
    """`count` workers in threads, each `rounds` closure steps on its own synthetic batches."""
    task = get_task("synthetic")
    optimizers: list[Optimizer | None] = [None] * count
    errors: list[BaseException] = []
    ready = threading.Barrier(count)
    # Built here, not in the threads: build_model seeds torch's global generator, and two
    # threads drawing from it at once would give the seeding worker a different model.
    models = [task.build_model(0) for _ in range(count)]

    def work(index: int) -> None:
        model = models[index]
        opt = make_optimizer(model)
        optimizers[index] = opt
        batches = task.batches(opt.rank, opt.world_size, 16, seed=batch_seed(index))
        try:
            ready.wait(60)  # everyone joined before anyone steps (a round waits for the members it has)
            for _ in range(rounds):
                x, y = next(batches)

                def closure() -> torch.Tensor:
                    opt.zero_grad()
                    loss = task.loss(model, x, y)
                    loss.backward()
                    return loss

                opt.step(closure)
            if before_close is not None:
                before_close(index, opt)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            opt.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    return [opt for opt in optimizers if opt is not None]


def test_sasg_skips_and_forced_uploads_keep_replicas_identical_with_tau(make_cluster) -> None:
    """A huge threshold: every worker skips whenever allowed, so uploads come exactly every D rounds;
    the server reuses stored updates across tau = 2 and every replica ends equal to its model."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy="static", tau=2, delta=0.2)
    max_delay, rounds = 4, 21
    finals: dict[int, tuple[int, torch.Tensor]] = {}

    def record(index: int, opt: Optimizer) -> None:
        opt._wait_until_fresh(opt.round)  # every pushed round applied
        finals[index] = (opt.version, opt.replica.clone())

    opts = run_workers(2, lambda model: Optimizer(
        model.parameters(), server=cluster.server_address, controller=cluster.controller_address, lr=0.1,
        skip_rule=SkipRule([1e12] * max_delay)), rounds, before_close=record)
    for opt in opts:
        rule = opt.skip_rule
        # Round 0 uploads (no anchor), then staleness forces one upload every D rounds.
        assert rule.uploads == 1 + (rounds - 1) // max_delay
        assert rule.skips == rounds - rule.uploads
    assert cluster.core.version == rounds
    for version, replica in finals.values():
        assert version == rounds and torch.equal(replica, cluster.core.model)


def test_sasg_with_a_zero_threshold_never_skips_while_the_model_moves(make_cluster) -> None:
    """alpha = 0: rule (6) holds only for an exactly equal gradient, so every round uploads while the
    model moves every round (tau = 0; with tau > 0 a round computed at an unchanged replica may skip)."""
    cluster = make_cluster(min_workers=1, tau_max=0, policy="static", tau=0, delta=0.2)
    opts = run_workers(1, lambda model: Optimizer(
        model.parameters(), server=cluster.server_address, controller=cluster.controller_address, lr=0.1,
        skip_rule=SkipRule([0.0] * 3)), 10)
    rule = opts[0].skip_rule
    assert rule.skips == 0 and rule.uploads == 10
    assert rule.num_workers == 1  # taken from the rounds' membership


def test_sasg_without_a_closure_says_what_it_needs(make_cluster) -> None:
    cluster = make_cluster(min_workers=1, tau_max=0, policy="static", tau=0, delta=0.5)
    task = get_task("synthetic")
    model = task.build_model(0)
    opt = Optimizer(model.parameters(), server=cluster.server_address, controller=cluster.controller_address,
                    lr=0.1, skip_rule=SkipRule([1e12] * 3))
    try:
        x, y = next(task.batches(0, 1, 8))
        for round_ in range(2):
            opt.zero_grad()
            task.loss(model, x, y).backward()
            if round_ == 0:
                opt.step()  # the first upload needs no auxiliary gradient
            else:
                with pytest.raises(RuntimeError, match="closure"):
                    opt.step()
    finally:
        opt.close()


@pytest.mark.parametrize("mode", ["def", "def-a"])
def test_def_output_is_x_minus_the_mean_residual_and_def_a_is_x(make_cluster, mode: str) -> None:
    """DEF: close() pushes every residual once, so the model ends at y_T = x_T - mean_k(e_k,T)."""
    cluster = make_cluster(min_workers=2, tau_max=1, policy="static", tau=1, delta=0.05)
    before: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
    barrier = threading.Barrier(2)

    def record(index: int, opt: Optimizer) -> None:
        opt._wait_until_fresh(opt.round)  # every pushed round applied: the replica is x_T
        barrier.wait(60)
        before[index] = (opt.version, opt.rule.residual.clone(), opt.replica.clone())

    opts = run_workers(2, lambda model: Optimizer(
        model.parameters(), server=cluster.server_address, controller=cluster.controller_address, lr=0.2,
        momentum=0.9, error_feedback=mode, def_lambda=0.3), 12, before_close=record)
    (version_a, residual_a, x_t), (version_b, residual_b, x_t_b) = before[0], before[1]
    assert version_a == version_b == 12 and torch.equal(x_t, x_t_b)
    assert torch.count_nonzero(residual_a) > 0 and torch.count_nonzero(residual_b) > 0
    final = cluster.core.model
    if mode == "def":
        assert cluster.core.version == 13  # one more round: the residual flush
        for opt in opts:
            assert torch.equal(opt.replica, final)  # the user's model holds y_T too
        assert torch.count_nonzero(opts[0].rule.residual) == 0
        # y_T = x_T - mean(e_T), up to float32 rounding of the server's mean.
        assert torch.allclose(final, x_t - (residual_a + residual_b) / 2, atol=1e-6)
        assert not torch.allclose(final, x_t, atol=1e-4)  # the flush really moved the model
    else:
        assert cluster.core.version == 12  # DEF-A outputs x_T: no extra round
        assert torch.equal(final, x_t)
        assert all(torch.equal(opt.replica, final) for opt in opts)


@pytest.mark.parametrize("options", [
    dict(momentum=0.5, delta=0.1),
    dict(delta=0.1, skip_alphas=(50.0,) * 4),
    dict(delta=0.1, error_feedback="def", compressor="random-block"),
], ids=["ef-momentum", "sasg", "def-random-block"])
def test_simulation_trains_the_same_model_as_the_cluster(make_cluster, options: dict) -> None:
    """The in-process simulation runs the same UpdateRule and ServerCore: bit-identical models."""
    from wanps.bench.simulate import SimulationConfig, simulate

    rounds, lr = 12, 0.1
    update = UpdateConfig(**{k: v for k, v in options.items() if k not in ("delta", "skip_alphas")})
    config = SimulationConfig(num_workers=2, batch_size=16, lr=lr, rounds=rounds, eval_every=rounds,
                              delta=options["delta"], skip_alphas=options.get("skip_alphas"), update=update)
    simulated = simulate(get_task("synthetic"), config)

    delta = options["delta"]
    # No controller: (tau 0, delta) hold from round 0 whatever the timing of a first decision.
    cluster = make_cluster(min_workers=2, tau_max=0, policy=None)
    skip = options.get("skip_alphas")
    opts = run_workers(2, lambda model: Optimizer(
        model.parameters(), server=cluster.server_address, controller=None, lr=lr, tau=0, delta=delta,
        momentum=options.get("momentum", 0.0), error_feedback=options.get("error_feedback", "ef"),
        compressor=options.get("compressor", "topk"),
        skip_rule=SkipRule(list(skip)) if skip else None), rounds, batch_seed=lambda index: 0)
    if skip:
        assert sum(opt.skip_rule.skips for opt in opts) == simulated.skips
        assert simulated.skips > 0  # the comparison covered skips
    if options.get("error_feedback") == "def":
        # The simulation evaluates y_T after its flush round; the cluster's close() did the same.
        assert cluster.core.version == rounds + 1
    else:
        assert cluster.core.version == rounds
    assert torch.equal(cluster.core.model, simulated.model)
    assert all(torch.equal(opt.replica, simulated.model) for opt in opts)


def test_param_groups_with_their_own_learning_rates(make_cluster) -> None:
    """Each group's gradient is scaled by its own lr: dense pushes (delta 1) show it exactly."""
    cluster = make_cluster(min_workers=1, tau_max=0, policy=None)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    groups = [{"params": model[0].parameters(), "lr": 0.5}, {"params": model[1].parameters(), "lr": 2}]
    opt = Optimizer(groups, server=cluster.server_address, controller=None, lr=0.1, tau=0, delta=1.0)
    try:
        before = opt.replica.clone()
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        first = sum(p.numel() for p in model[0].parameters())
        scale = torch.cat([torch.full((first,), 0.5), torch.full((grads.numel() - first,), 2.0)])
        assert torch.allclose(opt.replica, before - scale * grads)
    finally:
        opt.close()
