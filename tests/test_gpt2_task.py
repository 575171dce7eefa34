"""The GPT-2-shaped built-in tasks: the architecture, the synthetic tokens, and a tiny one
trained through a real cluster (its loss goes down)."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import join_threads
from wanps.worker import Optimizer
from wanps.worker.cli import build_parser
from wanps.worker.tasks import GPT2_SMALL, GPT2_TINY, SEQUENCE_TASKS, MarkovTokens, get_task

pytestmark = pytest.mark.timeout(180)


def test_gpt2_small_has_gpt2_smalls_shape_and_a_tied_head():
    task = get_task("gpt2-small")
    assert (GPT2_SMALL.vocab_size, GPT2_SMALL.context, GPT2_SMALL.d_model, GPT2_SMALL.layers, GPT2_SMALL.heads) == (
        50257, 1024, 768, 12, 12)
    model = task.build_model(0)
    assert sum(p.numel() for p in model.parameters()) == GPT2_SMALL.num_params == 124_439_808
    assert model.lm_head.weight is model.wte.weight  # one parameter: the optimizer replicates it once
    assert len(model.blocks) == 12 and task.seq_len == 128 and task.seq_len < GPT2_SMALL.context
    x, y = next(task.batches(0, 2, batch_size=1))
    assert x.shape == y.shape == (1, 128) and int(x.max()) < 50257
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token


def test_the_tiny_variant_is_the_same_architecture_and_learns_locally():
    task = get_task("gpt2-tiny")
    model = task.build_model(0)
    assert sum(p.numel() for p in model.parameters()) == GPT2_TINY.num_params
    assert {"gpt2-tiny", "gpt2-small"} <= SEQUENCE_TASKS
    x, y = next(task.batches(0, 1, batch_size=4))
    logits = model(x)
    assert logits.shape == (4, task.seq_len, GPT2_TINY.vocab_size)
    # Causal: the prediction at position t does not depend on tokens after t.
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % GPT2_TINY.vocab_size
    assert torch.allclose(model(changed)[:, :-1], logits[:, :-1], atol=1e-6)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, GPT2_TINY.context + 1, dtype=torch.long))


def test_the_tokens_follow_a_fixed_chain_with_learnable_structure():
    chain = MarkovTokens(256)
    again = MarkovTokens(256)
    assert torch.equal(chain.successors, again.successors)  # deterministic: no download, no state
    tokens = chain.sample(8, 50, torch.Generator().manual_seed(3))
    for seq in tokens:
        for a, b in zip(seq[:-1].tolist(), seq[1:].tolist()):
            assert b in chain.successors[a].tolist()
    assert chain.entropy_rate < 0.25 * torch.log(torch.tensor(256.0)).item()
    task = get_task("gpt2-tiny")
    first = [next(task.batches(rank, 2, 4))[0] for rank in (0, 1)]
    assert not torch.equal(first[0], first[1])  # each worker draws its own sequences


def test_sequence_length_is_an_option_of_sequence_tasks_only():
    assert get_task("gpt2-tiny", seq_len=64).seq_len == 64
    with pytest.raises(ValueError, match="seq_len"):
        get_task("gpt2-tiny", seq_len=GPT2_TINY.context + 1)
    with pytest.raises(ValueError, match="takes no sequence length"):
        get_task("mnist", seq_len=16)
    args = build_parser().parse_args(["--task", "gpt2-small", "--seq-len", "256", "--batch-size", "1"])
    assert (args.task, args.seq_len, args.batch_size) == ("gpt2-small", 256, 1)
    assert build_parser().parse_args([]).batch_size == 0  # 0: the task's default
    assert get_task("gpt2-small").default_batch_size == 2 and get_task("mnist").default_batch_size == 64


def test_gpt2_tiny_trains_through_a_real_cluster(make_cluster):
    """Two workers, sparse pushes (top-k, delta 0.25, error feedback), 150 synchronous rounds:
    the server's model ends with a held-out loss well below its start (5.56 -> 2.7 when this
    was written; the test asks for 1 nat less) and the replicas equal to each other."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None)
    task = get_task("gpt2-tiny")
    initial_loss, _ = task.evaluate(task.build_model(0))
    rounds = 150
    replicas: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def train(index: int) -> None:
        try:
            model = task.build_model(index)
            with Optimizer(model.parameters(), server=cluster.server_address, lr=0.5, tau=0, delta=0.25,
                           name=f"gpt-{index}") as opt:
                batches = task.batches(opt.rank, opt.world_size, 16, seed=index)
                while opt.round < rounds:
                    x, y = next(batches)
                    opt.zero_grad()
                    task.loss(model, x, y).backward()
                    opt.step()
                opt.wait_for_version(rounds, timeout_s=120)
                replicas[index] = opt.replica.clone()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    join_threads(threads, 170, errors)
    assert not errors, errors
    assert cluster.core.version >= rounds
    trained = task.build_model(0)
    flat = torch.cat([p.detach().reshape(-1) for p in trained.parameters()])
    assert flat.numel() == cluster.core.model.numel()
    offset = 0
    with torch.no_grad():
        for p in trained.parameters():
            p.copy_(cluster.core.model[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    final_loss, accuracy = task.evaluate(trained)
    assert final_loss < initial_loss - 1.0, (initial_loss, final_loss)
    assert accuracy > 0.2  # the chain's best is 0.5 (its most likely successor); untrained: ~0.004
    assert all(torch.equal(r, replicas[0]) for r in replicas.values())
