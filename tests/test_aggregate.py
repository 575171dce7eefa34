"""The mean over a round (wanps.server.aggregate), on its own and as ServerCore applies it.

The reference is the definition written element by element in numpy float32: each element
starts at 0, gets every value for it added in the order of the updates, and is divided by
the divisor. Replicas apply the server's deltas and must stay bit-identical to its model,
so results are compared exactly, with values of very different magnitudes (where any other
summation order or precision gives different bits).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wanps.proto.codec import Update, apply_delta, fingerprint_of
from wanps.server.aggregate import aggregate
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


def assert_is_reference(delta: Update, updates: list[Update], divisor: int) -> None:
    values, indices = reference(updates, divisor)
    assert delta.values.dtype == torch.float32
    assert torch.equal(delta.values, torch.from_numpy(values))
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
