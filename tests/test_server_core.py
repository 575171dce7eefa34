"""Unit tests of the parameter server's pure core (wanps.server.core): no network.

Values are chosen to be exact in float32 (small integers and halves), so the expected
aggregates are computed by hand and compared exactly.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from wanps.proto.codec import MAX_PARAMS, Update, apply_delta, fingerprint_of, model_checksum
from wanps.rpc.errors import FailedPrecondition, InvalidArgument, NotFound, RequestError
from wanps.server.core import CoreConfig, ServerCore
from wanps.worker.replica import Replica
from wanps.worker.session import ReceivedDelta

D = 10
FP = fingerprint_of([("w", (D,), "torch.float32")])


def sp(indices: list[int], values: list[float]) -> Update:
    return Update(values=torch.tensor(values, dtype=torch.float32), indices=torch.tensor(indices, dtype=torch.int32))


def dn(values: list[float]) -> Update:
    return Update(values=torch.tensor(values, dtype=torch.float32), indices=None)


def dense_of(update: Update, d: int = D) -> torch.Tensor:
    out = torch.zeros(d, dtype=torch.float64)
    if update.indices is None:
        out += update.values.double()
    else:
        out.index_add_(0, update.indices.long(), update.values.double())
    return out


def make_core(
    workers: int = 2, tau_max: int = 0, d: int = D, init: torch.Tensor | None = None, **config: Any
) -> tuple[ServerCore, list[int], torch.Tensor]:
    """A started core with `workers` members; the first one seeds `init` (zeros by default)."""
    core = ServerCore(CoreConfig(tau_max=tau_max, min_workers=workers, **config))
    fp = FP if d == D else fingerprint_of([("w", (d,), "torch.float32")])
    ids = [core.join(d, fp, name=f"w{i}").worker_id for i in range(workers)]
    init = torch.zeros(d) if init is None else init
    core.seed(ids[0], init.clone())
    assert core.started
    return core, ids, init


def state(core: ServerCore) -> dict[str, Any]:
    """Everything a call may change, copied (tensors cloned, stored updates by identity)."""
    return {
        "model": None if core.model is None else core.model.clone(),
        "version": core.version,
        "num_params": core.num_params,
        "fingerprint": core.fingerprint,
        "started": core.started,
        "seeder": core.seeder_id,
        "observers": set(core.observers),
        "members": {
            w: (m.name, m.first_round, m.last_round, id(m.last_update), m.highest_round_sent)
            for w, m in core.members.items()
        },
        "open_rounds": {
            r: ({w: id(u) for w, u in o.updates.items()}, dict(o.computed_at), set(o.skips))
            for r, o in core.open_rounds.items()
        },
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            assert a is not None and b is not None and torch.equal(a, b), key
        else:
            assert a == b, key


def assert_refused(core: ServerCore, error: type[RequestError], match: str, call: Callable[..., Any], *args: Any) -> None:
    before = state(core)
    with pytest.raises(error, match=match):
        call(*args)
    assert_same_state(before, state(core))


def push_ok(core: ServerCore, worker: int, round_: int, update: Update | None, computed_at: int | None = None):
    result = core.push(worker, round_, core.version if computed_at is None else computed_at, update)
    assert not result.duplicate
    return result


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs", [{"tau_max": -1}, {"min_workers": 0}, {"checksum_every": -1}])
def test_config_rejects_negative_values(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        CoreConfig(**kwargs)


def test_fingerprint_depends_on_names_shapes_dtypes() -> None:
    base = [("a", (2, 3), "float32"), ("b", (4,), "float32")]
    assert fingerprint_of(base) == fingerprint_of(list(base))
    assert len(fingerprint_of(base)) == 32
    assert fingerprint_of(base) != fingerprint_of([("a", (3, 2), "float32"), ("b", (4,), "float32")])
    assert fingerprint_of(base) != fingerprint_of([("x", (2, 3), "float32"), ("b", (4,), "float32")])
    assert fingerprint_of(base) != fingerprint_of([("a", (2, 3), "float16"), ("b", (4,), "float32")])
    assert fingerprint_of(base) != fingerprint_of(base[::-1])


# ------------------------------------------------------------------------------ join, seed, start


def test_join_seed_start_with_min_workers() -> None:
    core = ServerCore(CoreConfig(tau_max=0, min_workers=2))
    first = core.join(D, FP, name="a")
    assert (first.worker_id, first.rank, first.world_size, first.version, first.must_seed, first.first_round) == (
        1, 0, 1, 0, True, 0,
    )
    assert not core.started and not core.seeded
    init = torch.arange(D, dtype=torch.float32)
    checksum = core.seed(first.worker_id, init)
    assert checksum == model_checksum(init)
    assert core.seeded and not core.started  # 1 member < min_workers 2
    init.add_(100.0)  # the core keeps its own copy
    assert torch.equal(core.model, torch.arange(D, dtype=torch.float32))
    second = core.join(D, FP, name="b")
    assert (second.worker_id, second.rank, second.world_size, second.version, second.must_seed, second.first_round) == (
        2, 1, 2, 0, False, 0,
    )
    assert core.started
    assert core.members[2].name == "b"


def test_start_waits_for_the_seed_when_enough_workers_joined() -> None:
    core = ServerCore(CoreConfig(min_workers=2))
    a = core.join(D, FP)
    b = core.join(D, FP)
    assert a.must_seed and not b.must_seed
    assert not core.started
    assert_refused(core, FailedPrecondition, "has not started", core.push, a.worker_id, 0, 0, sp([1], [1.0]))
    core.seed(a.worker_id, torch.zeros(D))
    assert core.started


def test_push_before_start_is_refused() -> None:
    core = ServerCore(CoreConfig(min_workers=2))
    a = core.join(D, FP)
    core.seed(a.worker_id, torch.zeros(D))
    assert core.seeded and not core.started
    assert_refused(core, FailedPrecondition, "has not started", core.push, a.worker_id, 0, 0, sp([1], [1.0]))
    assert_refused(core, FailedPrecondition, "has not started", core.push, a.worker_id, 0, 0, None)


def test_seed_refusals_change_nothing() -> None:
    core = ServerCore(CoreConfig(min_workers=2))
    a = core.join(D, FP)
    b = core.join(D, FP)
    assert_refused(core, FailedPrecondition, "was not asked to seed", core.seed, b.worker_id, torch.zeros(D))
    assert_refused(core, InvalidArgument, "seed must be 10 float32 values", core.seed, a.worker_id, torch.zeros(D + 1))
    assert_refused(core, InvalidArgument, "seed must be", core.seed, a.worker_id, torch.zeros(D, dtype=torch.float64))
    assert_refused(core, InvalidArgument, "seed must be", core.seed, a.worker_id, torch.zeros(2, 5))
    nan = torch.zeros(D)
    nan[3] = float("nan")
    assert_refused(core, InvalidArgument, "NaN or infinite", core.seed, a.worker_id, nan)
    inf = torch.zeros(D)
    inf[0] = float("-inf")
    assert_refused(core, InvalidArgument, "NaN or infinite", core.seed, a.worker_id, inf)
    assert not core.seeded
    core.seed(a.worker_id, torch.ones(D))
    assert_refused(core, FailedPrecondition, "already seeded", core.seed, a.worker_id, torch.zeros(D))
    assert torch.equal(core.model, torch.ones(D))


def test_join_refusals_change_nothing_and_consume_no_id() -> None:
    core = ServerCore(CoreConfig(min_workers=1))
    assert_refused(core, InvalidArgument, "num_params must be in", core.join, 0, FP)
    assert_refused(core, InvalidArgument, "num_params must be in", core.join, MAX_PARAMS + 1, FP)
    assert_refused(core, InvalidArgument, "fingerprint is empty", core.join, D, b"")
    a = core.join(D, FP)
    assert a.worker_id == 1
    assert_refused(core, FailedPrecondition, "model has 11 parameters; this cluster trains 10", core.join, D + 1, FP)
    other = fingerprint_of([("v", (D,), "torch.float32")])
    assert_refused(core, FailedPrecondition, "fingerprint", core.join, D, other)
    core.seed(a.worker_id, torch.zeros(D))
    assert_refused(core, FailedPrecondition, "model has 9 parameters", core.join, D - 1, FP)
    assert core.join(D, FP).worker_id == 2  # refused joins consumed no id


def test_rank_and_world_size() -> None:
    core = ServerCore(CoreConfig(min_workers=3))
    joins = [core.join(D, FP) for _ in range(3)]
    assert [j.worker_id for j in joins] == [1, 2, 3]
    assert [j.rank for j in joins] == [0, 1, 2]
    assert [j.world_size for j in joins] == [1, 2, 3]
    assert core.active_workers() == [1, 2, 3]
    core.leave(2)
    assert core.active_workers() == [1, 3]
    assert (core.rank_of(1), core.rank_of(2), core.rank_of(3)) == (0, -1, 1)
    fourth = core.join(D, FP)
    assert (fourth.worker_id, fourth.rank, fourth.world_size) == (4, 2, 3)


def test_observer_is_not_a_member() -> None:
    core, ids, _ = make_core(workers=1)
    obs = core.join(D, FP, observer=True)
    assert obs.rank == -1 and not obs.must_seed and obs.world_size == 1
    assert core.is_known(obs.worker_id) and obs.worker_id not in core.members
    assert_refused(core, NotFound, "not a member", core.push, obs.worker_id, 0, 0, sp([0], [1.0]))
    push_ok(core, ids[0], 0, sp([0], [2.0]))  # the round closes without the observer
    assert core.version == 1
    assert core.leave(obs.worker_id) == (0, ())
    assert not core.is_known(obs.worker_id)


def test_observer_joining_first_does_not_seed() -> None:
    core = ServerCore(CoreConfig(min_workers=1))
    obs = core.join(D, FP, observer=True)
    assert not obs.must_seed
    worker = core.join(D, FP)
    assert worker.must_seed and worker.rank == 0 and worker.world_size == 1


# ------------------------------------------------------------------------------ aggregation


def test_mean_over_expected_workers_with_union_of_sparse_indices() -> None:
    init = torch.arange(D, dtype=torch.float32)
    core, (a, b, c), _ = make_core(workers=3, init=init)
    r1 = push_ok(core, a, 0, sp([1, 3], [3.0, 6.0]))
    r2 = push_ok(core, b, 0, sp([3, 5], [3.0, 12.0]))
    assert r1.closed == () and r2.closed == () and core.version == 0
    r3 = push_ok(core, c, 0, sp([0, 3, 9], [-3.0, 0.75, 1.5]))
    assert r3.version == 1 and len(r3.closed) == 1
    closed = r3.closed[0]
    assert (closed.round, closed.version, closed.pushed, closed.skipped, closed.members) == (0, 1, 3, 0, 3)
    assert closed.staleness == (0, 0, 0)
    assert closed.delta.indices is not None
    assert closed.delta.indices.dtype == torch.int32
    assert closed.delta.indices.tolist() == [0, 1, 3, 5, 9]
    # (-3)/3, 3/3, (6 + 3 + 0.75)/3, 12/3, 1.5/3
    assert closed.delta.values.tolist() == [-1.0, 1.0, 3.25, 4.0, 0.5]
    expected = init.clone()
    expected[[0, 1, 3, 5, 9]] -= torch.tensor([-1.0, 1.0, 3.25, 4.0, 0.5])
    assert torch.equal(core.model, expected)
    assert closed.model_checksum == model_checksum(expected)
    assert core.open_rounds == {}


def test_no_state_leaks_between_rounds() -> None:
    core, (a, b), _ = make_core(workers=2)
    push_ok(core, a, 0, sp([2, 4], [2.0, 4.0]))
    push_ok(core, b, 0, sp([4, 6], [2.0, 8.0]))
    push_ok(core, a, 1, sp([4], [1.0]))
    closed = push_ok(core, b, 1, sp([2], [1.0])).closed[0]
    # Leftovers of round 0 in any accumulator would show up here.
    assert closed.delta.indices.tolist() == [2, 4]
    assert closed.delta.values.tolist() == [0.5, 0.5]
    assert core.model.tolist() == [0, 0, -1.5, 0, -3.5, 0, -4, 0, 0, 0]


def test_dense_and_sparse_mixed_gives_a_dense_mean() -> None:
    core, (a, b), _ = make_core(workers=2)
    push_ok(core, a, 0, dn([float(i) for i in range(D)]))
    closed = push_ok(core, b, 0, sp([0, 9], [4.0, 1.0])).closed[0]
    assert closed.delta.indices is None
    assert closed.delta.values.tolist() == [2.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0]
    assert core.model.tolist() == [-2.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0, -5.0]


def test_two_dense_updates() -> None:
    core, (a, b), _ = make_core(workers=2, init=torch.ones(D))
    push_ok(core, a, 0, dn([2.0] * D))
    closed = push_ok(core, b, 0, dn([4.0] * D)).closed[0]
    assert closed.delta.indices is None and closed.delta.values.tolist() == [3.0] * D
    assert core.model.tolist() == [-2.0] * D


def test_single_worker_mean_is_the_update() -> None:
    core, (a,), _ = make_core(workers=1)
    closed = push_ok(core, a, 0, sp([7], [2.5])).closed[0]
    assert closed.delta.indices.tolist() == [7] and closed.delta.values.tolist() == [2.5]
    assert core.model[7].item() == -2.5 and core.version == 1


def test_dense_update_of_wrong_size_is_refused() -> None:
    core, (a, _), _ = make_core(workers=2)
    assert_refused(core, InvalidArgument, "dense update has 9 values, model has 10", core.push, a, 0, 0, dn([1.0] * 9))


# ------------------------------------------------------------------------------ order and window


def test_rounds_close_in_order_only_when_complete() -> None:
    core, (a, b), _ = make_core(workers=2, tau_max=2)
    for r in range(3):
        assert push_ok(core, a, r, sp([r], [2.0])).closed == ()
    assert push_ok(core, b, 2, sp([5], [2.0])).closed == ()
    assert push_ok(core, b, 1, None).closed == ()
    assert core.version == 0 and sorted(core.open_rounds) == [0, 1, 2]
    result = push_ok(core, b, 0, sp([5], [4.0]))
    assert [c.round for c in result.closed] == [0, 1, 2]
    assert [c.version for c in result.closed] == [1, 2, 3]
    assert result.version == 3 and core.version == 3 and core.open_rounds == {}
    # Round 0: (a:[0]=2, b:[5]=4)/2; round 1: a:[1]=2, b skips -> reuses [5]=4; round 2: a:[2]=2, b:[5]=2.
    assert [(c.delta.indices.tolist(), c.delta.values.tolist()) for c in result.closed] == [
        ([0, 5], [1.0, 2.0]),
        ([1, 5], [1.0, 2.0]),
        ([2, 5], [1.0, 1.0]),
    ]
    assert [(c.pushed, c.skipped) for c in result.closed] == [(2, 0), (1, 1), (2, 0)]


def test_pushes_ahead_up_to_tau_max_and_not_beyond() -> None:
    core, (a, b), _ = make_core(workers=2, tau_max=2)
    push_ok(core, a, 2, sp([0], [1.0]))
    assert_refused(core, FailedPrecondition, r"round 3 is outside the open window \[0, 2\] \(tau_max 2\)",
                   core.push, a, 3, 0, sp([0], [1.0]))
    assert_refused(core, FailedPrecondition, "outside the open window", core.push, b, 3, 0, None)
    push_ok(core, a, 0, sp([0], [1.0]))
    push_ok(core, b, 0, sp([0], [1.0]))
    assert core.version == 1
    push_ok(core, b, 3, sp([0], [1.0]), computed_at=1)  # the window moved to [1, 3]
    assert_refused(core, FailedPrecondition, r"outside the open window \[1, 3\]", core.push, b, 4, 1, None)


def test_tau_zero_accepts_only_the_current_round() -> None:
    core, (a, _), _ = make_core(workers=2, tau_max=0)
    assert_refused(core, FailedPrecondition, r"outside the open window \[0, 0\]", core.push, a, 1, 0, sp([0], [1.0]))
    push_ok(core, a, 0, sp([0], [1.0]))


def test_computed_at_version_ahead_of_the_server_is_refused() -> None:
    core, (a, _), _ = make_core(workers=2, tau_max=3)
    assert_refused(core, InvalidArgument, "computed_at_version 1 is ahead of the server's version 0",
                   core.push, a, 1, 1, sp([0], [1.0]))
    assert_refused(core, InvalidArgument, "ahead", core.push, a, 0, 5, None)


def test_update_staler_than_tau_max_is_refused() -> None:
    core, (a, b), _ = make_core(workers=2, tau_max=1)
    for r in range(2):
        push_ok(core, a, r, sp([0], [1.0]), computed_at=0)
        push_ok(core, b, r, sp([1], [1.0]), computed_at=0)
    assert core.version == 2
    assert_refused(core, FailedPrecondition, "computed at version 1 is staler than tau_max 1",
                   core.push, a, 3, 1, sp([0], [1.0]))
    assert_refused(core, FailedPrecondition, "staler than tau_max", core.push, a, 2, 0, None)
    result = push_ok(core, a, 3, sp([0], [1.0]), computed_at=2)  # 3 - 2 = 1 <= tau_max
    assert result.closed == ()
    push_ok(core, a, 2, sp([0], [1.0]), computed_at=1)
    closed = push_ok(core, b, 2, sp([1], [1.0]), computed_at=2).closed
    assert [c.round for c in closed] == [2]
    assert closed[0].staleness == (1, 0)  # sorted by worker id: a (2 - 1), b (2 - 2)


def test_staleness_reported_per_applied_push() -> None:
    core, (a, b, c), _ = make_core(workers=3, tau_max=2)
    push_ok(core, a, 0, sp([0], [1.0]))
    push_ok(core, b, 0, sp([0], [1.0]))
    push_ok(core, c, 0, sp([0], [1.0]))
    push_ok(core, a, 2, sp([0], [1.0]), computed_at=0)
    push_ok(core, b, 1, sp([0], [1.0]), computed_at=0)
    push_ok(core, a, 1, sp([0], [1.0]), computed_at=1)
    closed = push_ok(core, c, 1, None).closed[0]
    assert closed.round == 1 and closed.staleness == (0, 1)  # a: 1 - 1, b: 1 - 0; c skipped
    push_ok(core, b, 2, sp([0], [1.0]), computed_at=2)
    closed = push_ok(core, c, 2, sp([0], [1.0]), computed_at=1).closed[0]
    assert closed.staleness == (2, 0, 1)


# ------------------------------------------------------------------------------ duplicates


def test_duplicate_in_open_round_changes_nothing() -> None:
    core, (a, b), _ = make_core(workers=2, tau_max=1)
    push_ok(core, a, 0, sp([1], [1.0]))
    push_ok(core, a, 1, None)
    before = state(core)
    for round_, update in [(0, sp([2], [5.0])), (0, None), (1, sp([3], [1.0])), (1, None), (0, dn([1.0] * D))]:
        result = core.push(a, round_, 0, update)
        assert result.duplicate and result.version == 0 and result.closed == ()
        assert_same_state(before, state(core))
    closed = push_ok(core, b, 0, sp([1], [3.0])).closed[0]
    assert closed.delta.values.tolist() == [2.0]  # the first push of a counted, not the duplicates


def test_duplicate_of_a_closed_round_changes_nothing() -> None:
    core, (a, b), _ = make_core(workers=2)
    push_ok(core, a, 0, sp([1], [1.0]))
    push_ok(core, b, 0, sp([1], [3.0]))
    assert core.version == 1
    before = state(core)
    for worker, update in [(a, sp([1], [1.0])), (b, None), (a, dn([9.0] * D))]:
        result = core.push(worker, 0, 0, update)
        assert result.duplicate and result.version == 1 and result.closed == ()
        assert_same_state(before, state(core))
    assert core.model[1].item() == -2.0


def test_check_push_reports_duplicates() -> None:
    core, (a, b), _ = make_core(workers=2)
    assert core.check_push(a, 0, 0) is False
    push_ok(core, a, 0, sp([1], [1.0]))
    assert core.check_push(a, 0, 0) is True
    assert core.check_push(b, 0, 0) is False


# ------------------------------------------------------------------------------ SASG skips


def test_skip_reuses_the_last_applied_update() -> None:
    core, (a, b), _ = make_core(workers=2)
    push_ok(core, a, 0, sp([0, 2], [2.0, 4.0]))
    push_ok(core, b, 0, sp([2], [2.0]))
    push_ok(core, a, 1, None)
    closed = push_ok(core, b, 1, sp([8], [6.0])).closed[0]
    assert (closed.pushed, closed.skipped, closed.members) == (1, 1, 2)
    assert closed.staleness == (0,)
    assert closed.delta.indices.tolist() == [0, 2, 8]
    assert closed.delta.values.tolist() == [1.0, 2.0, 3.0]
    # A second skip reuses the same update again.
    push_ok(core, a, 2, None)
    closed = push_ok(core, b, 2, None).closed[0]
    assert (closed.pushed, closed.skipped) == (0, 2)
    assert closed.delta.indices.tolist() == [0, 2, 8]
    assert closed.delta.values.tolist() == [1.0, 2.0, 3.0]  # a: [0]=2,[2]=4; b: [8]=6
    assert core.model.tolist() == [-3.0, 0, -7.0, 0, 0, 0, 0, 0, -6.0, 0]


def test_skip_with_tau_reuses_the_update_of_the_last_closed_round() -> None:
    core, (a, b), _ = make_core(workers=2, tau_max=2)
    A, C = sp([0], [2.0]), sp([4], [8.0])
    push_ok(core, a, 0, A)
    push_ok(core, a, 1, None)  # round 0 still open: a's stored update is not A yet
    push_ok(core, a, 2, C)  # pushed, but not applied until round 2 closes
    assert core.members[a].last_update is None
    push_ok(core, b, 0, sp([6], [2.0]))
    assert core.members[a].last_update is A
    closed1 = push_ok(core, b, 1, sp([6], [2.0])).closed[0]
    # Round 1 reuses A (the last applied), not C (pushed for a later round).
    assert closed1.round == 1
    assert closed1.delta.indices.tolist() == [0, 6] and closed1.delta.values.tolist() == [1.0, 1.0]
    closed2 = push_ok(core, b, 2, None).closed[0]
    # Round 2: a pushed C; b skips and reuses its round-1 update [6]=2.
    assert closed2.delta.indices.tolist() == [4, 6] and closed2.delta.values.tolist() == [4.0, 1.0]
    assert core.members[a].last_update is C
    push_ok(core, a, 3, None)
    closed3 = push_ok(core, b, 3, sp([1], [2.0])).closed[0]
    assert closed3.delta.indices.tolist() == [1, 4] and closed3.delta.values.tolist() == [1.0, 4.0]


def test_skip_with_no_stored_update_adds_zero_but_counts() -> None:
    core, (a, b), init = make_core(workers=2, init=torch.ones(D))
    push_ok(core, a, 0, None)
    closed = push_ok(core, b, 0, sp([3], [4.0])).closed[0]
    assert closed.members == 2 and (closed.pushed, closed.skipped) == (1, 1)
    assert closed.delta.indices.tolist() == [3] and closed.delta.values.tolist() == [2.0]  # 4 / 2, not 4 / 1
    assert core.model[3].item() == -1.0


def test_every_worker_skipping_with_nothing_stored_still_advances() -> None:
    core, (a, b), init = make_core(workers=2, init=torch.arange(D, dtype=torch.float32))
    push_ok(core, a, 0, None)
    closed = push_ok(core, b, 0, None).closed[0]
    assert closed.version == 1 and closed.delta.count == 0
    assert closed.delta.indices is not None and closed.delta.indices.numel() == 0
    assert torch.equal(core.model, init)
    assert closed.model_checksum == model_checksum(init)


# ------------------------------------------------------------------------------ membership changes


def test_join_after_start_gets_the_first_unpushed_round() -> None:
    core, (a, b), _ = make_core(workers=2, tau_max=2)
    push_ok(core, a, 0, sp([0], [3.0]))
    push_ok(core, a, 1, sp([0], [3.0]))
    joined = core.join(D, FP, name="late")
    c = joined.worker_id
    assert (joined.first_round, joined.version, joined.must_seed, joined.rank, joined.world_size) == (2, 0, False, 2, 3)
    assert core.expected_workers(1) == [a, b] and core.expected_workers(2) == [a, b, c]
    assert_refused(core, FailedPrecondition, "round 1 is before this worker's first round 2",
                   core.push, c, 1, 0, sp([0], [1.0]))
    c0 = push_ok(core, b, 0, sp([1], [3.0])).closed
    c1 = push_ok(core, b, 1, sp([1], [3.0])).closed
    assert [x.members for x in c0 + c1] == [2, 2]
    push_ok(core, a, 2, sp([0], [3.0]))
    push_ok(core, b, 2, sp([1], [3.0]))
    assert core.version == 2  # round 2 waits for the newcomer
    closed = push_ok(core, c, 2, sp([2], [6.0]), computed_at=2).closed[0]
    assert closed.members == 3
    assert closed.delta.indices.tolist() == [0, 1, 2] and closed.delta.values.tolist() == [1.0, 1.0, 2.0]


def test_join_after_start_with_nothing_pushed_starts_at_the_version() -> None:
    core, (a,), _ = make_core(workers=1)
    push_ok(core, a, 0, sp([0], [1.0]))
    joined = core.join(D, FP)
    assert joined.first_round == 1 == joined.version
    push_ok(core, a, 1, sp([0], [1.0]))
    assert core.version == 1
    push_ok(core, joined.worker_id, 1, None)
    assert core.version == 2


def test_leave_can_close_a_pending_round() -> None:
    core, (a, b), _ = make_core(workers=2)
    push_ok(core, b, 0, sp([4], [2.0]))
    last_round, closed = core.leave(a)
    assert last_round == -1
    assert [c.round for c in closed] == [0]
    assert closed[0].members == 1 and closed[0].delta.values.tolist() == [2.0]  # 2 / 1
    assert a not in core.members and core.active_workers() == [b]
    assert_refused(core, NotFound, "worker 1 is not a member", core.push, a, 1, 1, sp([0], [1.0]))
    assert_refused(core, NotFound, "not a member", core.leave, a)


def test_leave_takes_effect_after_the_last_pushed_round() -> None:
    core, (a, b), _ = make_core(workers=2, tau_max=2)
    push_ok(core, a, 0, sp([0], [2.0]))
    push_ok(core, a, 1, sp([0], [4.0]))
    last_round, closed = core.leave(a)
    assert (last_round, closed) == (1, ())
    assert core.members[a].last_round == 1
    assert_refused(core, FailedPrecondition, "worker 1 left after round 1", core.push, a, 2, 0, sp([0], [1.0]))
    assert core.expected_workers(1) == [a, b] and core.expected_workers(2) == [b]
    c0 = push_ok(core, b, 0, sp([1], [2.0])).closed[0]
    assert c0.members == 2 and c0.delta.values.tolist() == [1.0, 1.0]
    c1 = push_ok(core, b, 1, None).closed[0]  # b reuses [1]=2
    assert c1.members == 2 and c1.delta.indices.tolist() == [0, 1] and c1.delta.values.tolist() == [2.0, 1.0]
    assert a not in core.members  # gone once its last round closed
    c2 = push_ok(core, b, 2, sp([1], [2.0])).closed[0]
    assert c2.members == 1 and c2.delta.values.tolist() == [2.0]


def test_leave_twice_before_its_last_round_closes_keeps_the_first_answer() -> None:
    core, (a, b), _ = make_core(workers=2, tau_max=1)
    push_ok(core, a, 0, sp([0], [2.0]))
    push_ok(core, a, 1, sp([0], [2.0]))
    assert core.leave(a) == (1, ())
    assert core.leave(a) == (1, ())


def test_leave_before_seeding_hands_the_seed_to_the_next_joiner() -> None:
    core = ServerCore(CoreConfig(min_workers=1))
    first = core.join(D, FP)
    assert first.must_seed
    assert core.leave(first.worker_id) == (-1, ())
    assert first.worker_id not in core.members
    second = core.join(D, FP)
    assert second.must_seed and second.rank == 0
    assert_refused(core, FailedPrecondition, "not asked to seed", core.seed, first.worker_id, torch.zeros(D))
    core.seed(second.worker_id, torch.zeros(D))
    assert core.started


def test_unknown_worker_is_not_found() -> None:
    core, _, _ = make_core(workers=2)
    assert_refused(core, NotFound, "worker 99 is not a member of this cluster", core.push, 99, 0, 0, sp([0], [1.0]))
    assert_refused(core, NotFound, "worker 99", core.push, 99, 0, 0, None)
    assert_refused(core, NotFound, "worker 99", core.leave, 99)
    with pytest.raises(NotFound):
        core.check_push(99, 0, 0)
    assert not core.is_known(99)


# ------------------------------------------------------------------------------ checksums and snapshot


def test_checksum_every_n_rounds() -> None:
    core, (a,), _ = make_core(workers=1, checksum_every=3)
    checksums = [push_ok(core, a, r, sp([r], [1.0])).closed[0].model_checksum for r in range(7)]
    assert [c is not None for c in checksums] == [False, False, True, False, False, True, False]
    assert checksums[5] == model_checksum(core.model - torch.tensor([0, 0, 0, 0, 0, 0, -1.0, 0, 0, 0]))
    never, (b,), _ = make_core(workers=1, checksum_every=0)
    assert push_ok(never, b, 0, sp([0], [1.0])).closed[0].model_checksum is None


def test_snapshot() -> None:
    core = ServerCore(CoreConfig())
    with pytest.raises(FailedPrecondition, match="not been seeded"):
        core.snapshot()
    core, (a,), _ = make_core(workers=1, init=torch.arange(D, dtype=torch.float32))
    push_ok(core, a, 0, sp([9], [1.0]))
    version, raw, checksum = core.snapshot()
    assert version == 1
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32), core.model)
    assert checksum == model_checksum(core.model)


# ------------------------------------------------------------------------------ randomized conservation


def random_update(rng: random.Random, d: int) -> Update | None:
    kind = rng.random()
    if kind < 0.2:
        return None
    if kind < 0.3:
        return Update(values=torch.tensor([rng.uniform(-1, 1) for _ in range(d)], dtype=torch.float32),
                            indices=None)
    k = rng.randint(0, d)
    indices = sorted(rng.sample(range(d), k))
    return sp(indices, [rng.uniform(-1, 1) for _ in range(k)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_rounds_conserve_the_model(seed: int) -> None:
    """Random pushes, skips, duplicates, refusals, a leave and a join, checked against a reference.

    The reference recomputes every round's mean in float64 from what was pushed (skips reuse
    the worker's last applied update); the server's model must equal the initial model minus
    every closed round's delta, bitwise when replayed with apply_delta, and a replica applying
    the broadcast deltas must agree with every checksum.
    """
    rng = random.Random(seed)
    d, tau_max = 40, 2
    init = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    core, ids, _ = make_core(workers=3, tau_max=tau_max, d=d, init=init)
    fp = fingerprint_of([("w", (d,), "torch.float32")])
    first = {w: 0 for w in ids}
    last: dict[int, int | None] = {w: None for w in ids}
    next_round = {w: 0 for w in ids}
    pushed: dict[int, dict[int, Update | None]] = {}
    ref_last: dict[int, Update | None] = {w: None for w in ids}
    closed_all = []
    left = joined = False

    def check(closed) -> None:
        for c in closed:
            assert c.round == len(closed_all) and c.version == c.round + 1
            expected = [w for w in sorted(first) if first[w] <= c.round and (last[w] is None or c.round <= last[w])]
            total = torch.zeros(d, dtype=torch.float64)
            any_dense = False
            for w in expected:
                update = pushed[c.round][w]
                if update is not None:
                    ref_last[w] = update
                if ref_last[w] is not None:
                    total += dense_of(ref_last[w], d)
                    any_dense = any_dense or ref_last[w].indices is None
            assert c.members == len(expected)
            assert c.pushed == sum(pushed[c.round][w] is not None for w in expected)
            assert c.skipped == sum(pushed[c.round][w] is None for w in expected)
            assert (c.delta.indices is None) == any_dense
            if c.delta.indices is not None and c.delta.count > 1:
                assert bool((c.delta.indices[1:] > c.delta.indices[:-1]).all())
            assert torch.allclose(dense_of(c.delta, d), total / len(expected), atol=1e-6, rtol=1e-5)
            closed_all.append(c)

    for step in range(400):
        if step == 150 and not left:
            leaver = ids[1]
            last_round, closed = core.leave(leaver)
            assert last_round == next_round[leaver] - 1  # the last round it pushed
            last[leaver] = last_round
            left = True
            check(closed)
            continue
        if step == 250 and not joined:
            result = core.join(d, fp)
            first[result.worker_id] = result.first_round
            last[result.worker_id] = None
            next_round[result.worker_id] = result.first_round
            ref_last[result.worker_id] = None
            assert result.first_round >= core.version
            assert all(result.first_round > r for r, rnd in pushed.items() if rnd and r >= core.version)
            joined = True
            continue
        members = [w for w in core.members if w in next_round]
        roll = rng.random()
        if roll < 0.1:
            # A replay of something already sent: acknowledged, nothing changes.
            candidates = [w for w in members if next_round[w] > first[w]]
            if candidates:
                w = rng.choice(candidates)
                r = rng.randint(first[w], next_round[w] - 1)
                before = state(core)
                result = core.push(w, r, core.version, random_update(rng, d))
                assert result.duplicate and result.closed == ()
                assert_same_state(before, state(core))
            continue
        if roll < 0.15:
            # Beyond the window: refused, nothing changes.
            w = rng.choice(members)
            assert_refused(core, FailedPrecondition, "outside the open window|left after round", core.push, w, core.version + tau_max + 1, core.version, None)
            continue
        eligible = [
            w for w in members
            if next_round[w] <= core.version + tau_max and (last[w] is None or next_round[w] <= last[w])
        ]
        assert eligible, "no worker can push: the core would be stuck"
        w = rng.choice(eligible)
        r = next_round[w]
        update = random_update(rng, d)
        computed_at = rng.randint(max(0, r - tau_max), core.version)
        result = push_ok(core, w, r, update, computed_at=computed_at)
        pushed.setdefault(r, {})[w] = update
        next_round[w] = r + 1
        check(result.closed)
        # Bounded memory: only rounds of the open window are held.
        assert len(core.open_rounds) <= tau_max + 1
        assert all(core.version <= k <= core.version + tau_max for k in core.open_rounds)

    assert len(closed_all) > 50 and left and joined
    assert core.version == len(closed_all)
    # Bitwise: replaying the broadcast deltas on a copy of the initial model gives the server's model.
    replay = init.clone()
    for c in closed_all:
        apply_delta(replay, c.delta)
    assert torch.equal(replay, core.model)
    # And the model moved by exactly the sum of the deltas (up to float32 rounding of each step).
    total = sum((dense_of(c.delta, d) for c in closed_all), torch.zeros(d, dtype=torch.float64))
    assert torch.allclose(core.model.double(), init.double() - total, atol=1e-4)
    # A replica fed the same deltas agrees with every checksum the server published.
    replica = Replica(init.clone(), 0)
    for c in closed_all:
        replica.apply(ReceivedDelta(round=c.round, version=c.version, delta=c.delta, model_checksum=c.model_checksum,
                                    nbytes=c.delta.nbytes))
        assert c.model_checksum == model_checksum(replica.values)
    assert replica.version == core.version
    assert torch.equal(replica.values, core.model)
