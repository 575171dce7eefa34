"""The mean over a round (wanps.server.aggregate), on its own and as ServerCore applies it.

The reference is the definition written element by element in numpy float32: each element
starts at 0, gets every value for it added in the order of the updates, and is divided by
the divisor. Replicas apply the server's deltas and must stay bit-identical to its model,
so results are compared exactly, with values of very different magnitudes (where any other
summation order or precision gives different bits).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from wanps.proto.codec import Update, apply_delta, fingerprint_of, model_checksum
from wanps.server import aggregate as aggregate_module
from wanps.server import core as core_module
from wanps.server.aggregate import aggregate, blocked_mean, pieces_mean
from wanps.server.core import CoreConfig, ServerCore

D = 64


def sp(indices: list[int], values: list[float]) -> Update:
    return Update(values=torch.tensor(values, dtype=torch.float32), indices=torch.tensor(indices, dtype=torch.int32))


def dn(values: list[float]) -> Update:
    return Update(values=torch.tensor(values, dtype=torch.float32), indices=None)


def reference(updates: list[Update], divisor: int, d: int = D) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, indices or None for dense) of sum(updates) / divisor, element by element in float32."""
    total = np.zeros(d, dtype=np.float32)
    touched = np.zeros(d, dtype=bool)
    for u in updates:
        index = np.arange(d) if u.indices is None else u.indices.numpy()
        np.add.at(total, index, u.values.numpy())  # unbuffered: one float32 add per value, in order
        touched[index] = True
    if any(u.indices is None for u in updates):
        return total / np.float32(divisor), None
    where = np.flatnonzero(touched)
    return total[where] / np.float32(divisor), where


def assert_is_reference(delta: Update, updates: list[Update], divisor: int, d: int = D) -> None:
    values, indices = reference(updates, divisor, d)
    assert delta.values.dtype == torch.float32
    # The bits, not ==: 0.0 == -0.0, and a sum that starts at 0 is never -0.0.
    assert torch.equal(delta.values.view(torch.int32), torch.from_numpy(values).view(torch.int32))
    if indices is None:
        assert delta.indices is None
    else:
        assert delta.indices.dtype == torch.int32 and delta.indices.tolist() == indices.tolist()


def random_update(g: torch.Generator, kind: str, block_start: int = 0) -> Update:
    # Magnitudes from 1e-3 to 1e7 in one update: float32 sums of them depend on the order.
    scale = 10.0 ** torch.randint(-3, 8, (D,), generator=g).float()
    if kind == "dense":
        return Update(values=torch.randn(D, generator=g) * scale, indices=None)
    if kind == "block":
        indices = torch.arange(block_start, block_start + 8, dtype=torch.int32)
        return Update(values=torch.randn(8, generator=g) * scale[:8], indices=indices, block_start=block_start)
    k = int(torch.randint(1, D // 2, (1,), generator=g))
    indices = torch.randperm(D, generator=g)[:k].sort().values.to(torch.int32)
    return Update(values=torch.randn(k, generator=g) * scale[:k], indices=indices)


# ------------------------------------------------------------------------------ the function


def test_overlapping_sparse_updates_give_their_union_with_the_mean_of_each_element() -> None:
    delta = aggregate([sp([1, 4, 6], [2.0, 4.0, 1.0]), sp([4, 9], [2.0, 8.0])], 2)
    assert delta.indices.dtype == torch.int32 and delta.indices.tolist() == [1, 4, 6, 9]
    assert delta.values.tolist() == [1.0, 3.0, 0.5, 4.0]
    # An element whose values cancel stays in the union, with 0.
    cancelled = aggregate([sp([3], [1.5]), sp([3, 5], [-1.5, 2.0])], 2)
    assert cancelled.indices.tolist() == [3, 5] and cancelled.values.tolist() == [0.0, 1.0]


def test_a_dense_update_makes_the_mean_dense() -> None:
    delta = aggregate([sp([0, 9], [4.0, 1.0]), dn([float(i) for i in range(10)])], 2)
    assert delta.indices is None
    assert delta.values.tolist() == [2.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0]
    with pytest.raises(ValueError, match="different sizes"):
        aggregate([dn([1.0] * 10), dn([1.0] * 9)], 2)


def test_an_empty_round_is_an_empty_sparse_delta() -> None:
    delta = aggregate([], 3)
    assert delta.indices is not None and delta.count == 0
    assert delta.indices.dtype == torch.int32 and delta.values.dtype == torch.float32


def test_the_divisor_is_the_workers_counted_not_the_updates_given() -> None:
    updates = [sp([2], [6.0]), sp([2, 3], [2.0, 4.0])]
    assert aggregate(updates, 2).values.tolist() == [4.0, 2.0]
    assert aggregate(updates, 4).values.tolist() == [2.0, 1.0]  # two of four workers had an update
    assert aggregate([sp([5], [3.0])], 3).values.tolist() == [1.0]
    with pytest.raises(ValueError, match="divisor"):
        aggregate(updates, 0)


def test_values_are_summed_in_the_order_given_in_float32() -> None:
    big, one = 1e8, 1.0  # float32 steps by 8 at 1e8: 1e8 + 1 == 1e8
    assert aggregate([sp([0], [big]), sp([0], [one]), sp([0], [-big])], 1).values.tolist() == [0.0]
    assert aggregate([sp([0], [big]), sp([0], [-big]), sp([0], [one])], 1).values.tolist() == [1.0]
    # The dense path and the shared-block path keep the same order.
    assert aggregate([dn([big]), dn([-big]), sp([0], [one])], 1).values.tolist() == [1.0]
    assert aggregate([dn([big]), sp([0], [one]), dn([-big])], 1).values.tolist() == [0.0]
    blocks = [Update(values=torch.tensor([v]), indices=torch.tensor([0], dtype=torch.int32), block_start=0)
              for v in (big, -big, one)]
    assert aggregate(blocks, 1).values.tolist() == [1.0]


def test_a_single_update_is_zero_plus_its_values_so_minus_zero_becomes_zero() -> None:
    delta = aggregate([sp([1, 2, 3], [-0.0, 0.0, -2.0])], 2)
    assert delta.values.view(torch.int32).tolist() == torch.tensor([0.0, 0.0, -1.0]).view(torch.int32).tolist()


def test_a_shared_random_block_keeps_its_start_and_other_blocks_do_not() -> None:
    g = torch.Generator().manual_seed(1)
    shared = [random_update(g, "block", 5) for _ in range(3)]
    delta = aggregate(shared, 3)
    assert delta.block_start == 5
    assert_is_reference(delta, shared, 3)
    mixed = [*shared, random_update(g, "block", 9)]
    delta = aggregate(mixed, 4)
    assert delta.block_start is None
    assert_is_reference(delta, mixed, 4)


@pytest.mark.parametrize("seed", range(12))
def test_random_rounds_match_the_element_by_element_definition_bit_for_bit(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    kinds = ["sparse", "sparse", "dense", "block"]
    updates = [random_update(g, kinds[int(torch.randint(0, 4, (1,), generator=g))], 3)
               for _ in range(int(torch.randint(1, 6, (1,), generator=g)))]
    divisor = len(updates) + int(torch.randint(0, 3, (1,), generator=g))
    assert_is_reference(aggregate(updates, divisor), updates, divisor)


def test_aggregate_changes_none_of_its_inputs() -> None:
    updates = [sp([1, 2], [1.0, 2.0]), dn([1.0] * D)]
    before = [(u.values.clone(), None if u.indices is None else u.indices.clone()) for u in updates]
    aggregate(updates, 2)
    aggregate(updates[:1], 2)
    for u, (values, indices) in zip(updates, before):
        assert torch.equal(u.values, values) and (indices is None or torch.equal(u.indices, indices))


# ------------------------------------------------------------------------------ the paths of a sparse round


def varied_sparse(rng: np.random.Generator, d: int, k: int) -> Update:
    """k sorted distinct indices below d; values from 1e-3 to 1e7 (sums depend on their order), explicit
    zeros (they stay in the union) and negative zeros (a sum from 0 never gives one)."""
    indices = np.sort(rng.choice(d, size=k, replace=False)).astype(np.int32)
    values = (rng.standard_normal(k) * 10.0 ** rng.integers(-3, 8, k)).astype(np.float32)
    values[::7] = 0.0
    values[3::11] = -0.0
    return Update(values=torch.from_numpy(values), indices=torch.from_numpy(indices))


class CountingExecutor(ThreadPoolExecutor):
    """One helper thread that counts the work handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="test-helper")
        self.submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


# (d, pairs of each update, block): overlapping updates, an update within one block, a
# last partial block, an empty update, every element, blocks larger than the model, and
# blocks so sparse that the blocked path zeroes only the entries each one touched.
PATH_CASES = [
    (10_000, (30, 50, 20), 1000),
    (1000, (100, 300, 7), 64),
    (1003, (1, 2, 1003), 100),
    (500, (0, 40, 40, 0), 64),
    (777, (777, 777), 1 << 20),
    (4096, (50, 2000, 900, 1500, 5), 256),
    (300, (1,) * 40, 16),  # many one-pair updates: fewer samples than pieces
]


@pytest.mark.parametrize("d, ks, block", PATH_CASES)
def test_the_pieces_and_the_blocked_paths_match_the_definition_bit_for_bit(d, ks, block) -> None:
    rng = np.random.default_rng(d + sum(ks))
    updates = [varied_sparse(rng, d, k) for k in ks]
    divisor = len(ks) + 1
    for piece_pairs in (1, 7, 64, 1 << 18):  # a piece per pair, several pieces, one piece
        assert_is_reference(pieces_mean(updates, divisor, piece_pairs), updates, divisor, d)
    assert_is_reference(blocked_mean(updates, divisor, d, block=block), updates, divisor, d)


@pytest.mark.parametrize("d, ks, block", PATH_CASES)
def test_a_round_split_over_two_threads_matches_the_definition_bit_for_bit(d, ks, block, monkeypatch) -> None:
    """Each half of the index space takes the path its density calls for (the thresholds lowered
    so that small rounds go both ways); an element's sum never spans the cut."""
    monkeypatch.setattr(aggregate_module, "SPLIT_FROM_PAIRS", 1)
    monkeypatch.setattr(aggregate_module, "BLOCKED_MIN_PARAMS", 1)
    monkeypatch.setattr(aggregate_module, "BLOCK_PARAMS", block)
    rng = np.random.default_rng(d * 7 + sum(ks))
    updates = [varied_sparse(rng, d, k) for k in ks]
    divisor = len(ks)
    with CountingExecutor() as helper:
        assert_is_reference(aggregate(updates, divisor, d, executor=helper), updates, divisor, d)
        assert helper.submitted == 1  # the upper half ran on the helper
        monkeypatch.setattr(aggregate_module, "PIECE_PAIRS", 16)
        for threshold in (0.0, 2.0):  # every half blocked, then every half by pieces
            monkeypatch.setattr(aggregate_module, "BLOCKED_FROM_PAIRS_PER_PARAM", threshold)
            assert_is_reference(aggregate(updates, divisor, d, executor=helper), updates, divisor, d)


@pytest.mark.parametrize("d, pairs_per_param", [((1 << 20) + 3, 1 / 8), ((8 << 20) + 3, 1 / 40)])
def test_a_large_round_on_two_threads_has_the_same_bits(d: int, pairs_per_param: float) -> None:
    """At the real thresholds: 3 updates of d/8 pairs each (the blocked path) or of d/40 in a
    model of 8M parameters (two pieces in each half)."""
    rng = np.random.default_rng(11)
    updates = [varied_sparse(rng, d, int(d * pairs_per_param)) for _ in range(3)]
    with CountingExecutor() as helper:
        split = aggregate(updates, 3, d, executor=helper)
        assert helper.submitted == 1
    assert_is_reference(split, updates, 3, d)
    one_thread = aggregate(updates, 3, d)
    assert torch.equal(one_thread.indices, split.indices)
    assert torch.equal(one_thread.values.view(torch.int32), split.values.view(torch.int32))


# ------------------------------------------------------------------------------ as ServerCore applies it


@pytest.mark.parametrize("seed", range(4))
def test_server_core_applies_the_mean_of_pushes_and_reused_updates_bit_for_bit(seed: int) -> None:
    """Pushes, skips (the worker's last applied update again, or nothing before its first)
    and dense updates, over several rounds: every closed round's delta is the reference
    mean of what each worker counts, in worker order over all workers, and the model is
    the initial one minus those deltas, applied with the replicas' `apply_delta`."""
    g = torch.Generator().manual_seed(seed)
    workers = 4
    core = ServerCore(CoreConfig(tau_max=0, min_workers=workers))
    fp = fingerprint_of([("w", (D,), "torch.float32")])
    ids = [core.join(D, fp).worker_id for _ in range(workers)]
    replica = torch.randn(D, generator=g) * 100
    core.seed(ids[0], replica.clone())
    last: dict[int, Update] = {}
    for round_ in range(12):
        pushed = {}
        for worker_id in ids:
            choice = int(torch.randint(0, 6, (1,), generator=g))
            pushed[worker_id] = None if choice < 2 else random_update(g, "dense" if choice == 5 else "sparse")
        closed = ()
        for worker_id in ids:
            closed = core.push(worker_id, round_, round_, pushed[worker_id]).closed
        last.update({w: u for w, u in pushed.items() if u is not None})
        counted = [last[w] for w in ids if w in last]
        assert len(closed) == 1
        assert_is_reference(closed[0].delta, counted, workers)
        apply_delta(replica, aggregate(counted, workers))
        assert torch.equal(core.model, replica)


def test_a_core_with_a_helper_thread_applies_and_checksums_the_same_bits(monkeypatch) -> None:
    """Aggregate, apply and checksum split over the core thread and a helper: the same model and
    checksums, round after round, as one thread."""
    monkeypatch.setattr(core_module, "SPLIT_FROM_ELEMENTS", 1000)
    monkeypatch.setattr(aggregate_module, "SPLIT_FROM_PAIRS", 1000)
    d, workers = 50_000, 3
    rng = np.random.default_rng(3)
    fp = fingerprint_of([("w", (d,), "torch.float32")])
    initial = torch.from_numpy(rng.standard_normal(d).astype(np.float32))
    with CountingExecutor() as helper:
        cores = [ServerCore(CoreConfig(tau_max=0, min_workers=workers, checksum_every=1)),
                 ServerCore(CoreConfig(tau_max=0, min_workers=workers, checksum_every=1), helper=helper)]
        ids = [[core.join(d, fp).worker_id for _ in range(workers)] for core in cores]
        for core, core_ids in zip(cores, ids):
            core.seed(core_ids[0], initial.clone())
        for round_ in range(4):
            pushes = [varied_sparse(rng, d, int(rng.integers(2000, 20_000))) for _ in range(workers)]
            closed = [[c for w, u in zip(core_ids, pushes) for c in core.push(w, round_, round_, u).closed]
                      for core, core_ids in zip(cores, ids)]
            assert closed[1][0].model_checksum == closed[0][0].model_checksum == model_checksum(cores[0].model)
            assert torch.equal(cores[0].model.view(torch.int32), cores[1].model.view(torch.int32))
        assert helper.submitted == 4 * 3  # per round: half the mean, half the apply, half the checksum


@pytest.mark.parametrize("gap", [0, 3, (1 << 20) + 17, 3 << 20])
def test_the_upper_half_moves_down_onto_the_lower_halfs_end(gap) -> None:
    """How the two halves' outputs become one (in place, in chunks no longer than the gap
    where it is wide): whatever the gap, the moved part is the upper half, unchanged."""
    count, target = (2 << 20) + 5, 11
    output = torch.arange(target + gap + count, dtype=torch.int32)
    upper = output[target + gap :].clone()
    aggregate_module._move_down(output, target + gap, target, count)
    assert torch.equal(output[target : target + count], upper)
    assert torch.equal(output[:target], torch.arange(target, dtype=torch.int32))
