"""Fault rules of the pure cores: leases, round deadlines, checkpoints, a restarted controller.

Time is a fake clock injected into the core, so no test sleeps.
"""
from __future__ import annotations

import pytest
import torch

from wanps.controller.engine import ControllerCore, Report
from wanps.controller.policy import PolicyConfig
from wanps.proto.codec import Update, model_checksum
from wanps.server.checkpoint import core_state, read_checkpoint, restore_core, write_checkpoint
from wanps.worker.error_feedback import ErrorFeedback
from wanps.rpc.errors import NotFound
from wanps.server.core import CoreConfig, ServerCore

from test_server_core import FP, D, sp, state


def unchanged(before: dict, after: dict) -> bool:
    return torch.equal(before.pop("model"), after.pop("model")) and before == after


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def started_core(workers: int = 3, tau_max: int = 1, **config) -> tuple[ServerCore, list[int], FakeClock]:
    clock = FakeClock()
    core = ServerCore(CoreConfig(tau_max=tau_max, min_workers=workers, **config), clock=clock)
    ids = [core.join(D, FP, name=f"w{i}").worker_id for i in range(workers)]
    core.seed(ids[0], torch.zeros(D))
    return core, ids, clock


def test_a_silent_worker_leaves_at_the_next_boundary_and_rounds_keep_closing():
    core, (a, b, c), clock = started_core(lease_s=5.0, audit=True)
    for i, w in enumerate((a, b, c)):
        core.push(w, 0, 0, sp([i], [1.0]))
    assert core.version == 1
    core.push(a, 1, 1, sp([0], [3.0]))
    core.push(b, 1, 1, sp([1], [3.0]))
    core.push(c, 2, 1, sp([2], [9.0]))  # c queued round 2 (tau 1), never sends round 1
    clock.now += 4.0
    core.touch(a)
    core.touch(b)
    assert core.sweep().expired == ()  # within the lease
    clock.now += 2.0
    result = core.sweep()
    assert result.expired == (c,)
    # Round 1 closed without c (n = 2); c's queued round-2 push is gone.
    assert [r.round for r in result.closed] == [1]
    assert result.closed[0].members == 2
    assert c not in core.members and all(c not in o.updates for o in core.open_rounds.values())
    assert torch.equal(core.model[:3], torch.tensor([-1 / 3 - 1.5, -1 / 3 - 1.5, -1 / 3], dtype=torch.float32))
    with pytest.raises(NotFound):
        core.push(c, 2, 1, sp([2], [1.0]))
    # The rest go on; a replacement joins from the first round nobody pushed.
    assert core.join(D, FP).first_round == 2
    assert core.applied_rounds == [0, 1]


def test_no_lease_runs_out_before_the_cluster_starts():
    clock = FakeClock()
    core = ServerCore(CoreConfig(min_workers=2, lease_s=1.0), clock=clock)
    a = core.join(D, FP).worker_id
    clock.now += 60
    assert core.sweep().expired == ()
    b = core.join(D, FP).worker_id
    core.seed(a, torch.zeros(D))
    assert core.started
    clock.now += 0.5
    assert core.sweep().expired == ()  # the lease started with the cluster
    clock.now += 1.0
    assert core.sweep().expired == (a, b)


def test_a_round_closes_at_its_deadline_and_a_late_push_is_acknowledged_as_late():
    core, (a, b, c), clock = started_core(round_deadline_s=2.0, lease_s=0)
    core.push(a, 0, 0, sp([0], [2.0]))
    clock.now += 1.0
    core.push(b, 0, 0, sp([1], [4.0]))
    assert core.sweep().closed == ()
    clock.now += 1.0
    result = core.sweep()
    assert result.overdue == 0 and result.closed[0].members == 2
    assert torch.equal(core.model[:3], torch.tensor([-1.0, -2.0, 0.0]))
    before = state(core)
    late = core.push(c, 0, 0, sp([2], [8.0]))
    assert late.late and not late.duplicate and unchanged(before, state(core))
    assert core.push(c, 0, 0, sp([2], [8.0])).late  # a replay of a late push is late again
    assert core.push(a, 0, 0, sp([0], [2.0])).duplicate and not core.push(a, 0, 0, sp([0], [2.0])).late
    # c is still a member: the next round waits for it again.
    core.push(a, 1, 1, sp([0], [1.0]))
    core.push(b, 1, 1, sp([0], [1.0]))
    assert core.version == 1
    core.push(c, 1, 0, sp([0], [1.0]))
    assert core.version == 2


def test_the_deadline_counts_from_when_the_round_became_current():
    core, (a, b, c), clock = started_core(round_deadline_s=2.0, lease_s=0, tau_max=2)
    core.push(a, 1, 0, sp([0], [1.0]))  # a is ahead: round 1 is not current yet
    clock.now += 5.0
    assert core.sweep().closed == ()  # round 0 has no push at all: nothing to close with
    for w in (a, b, c):
        core.push(w, 0, 0, sp([0], [1.0]))
    assert core.version == 1
    clock.now += 1.0
    assert core.sweep().closed == ()  # round 1 became current only now
    clock.now += 1.0
    assert core.sweep().closed[0].round == 1


def test_checkpoint_round_trip_restores_everything(tmp_path):
    core, (a, b, c), clock = started_core(tau_max=2, audit=True, round_deadline_s=1.0, lease_s=0)
    for i, w in enumerate((a, b, c)):
        core.push(w, 0, 0, sp([i], [1.0]))
    core.push(a, 1, 1, sp([3, 4], [0.5, 0.25]))
    core.push(b, 1, 1, None)  # a skip
    core.push(a, 2, 1, Update(values=torch.ones(D), indices=None))  # dense, queued
    clock.now += 2
    core.push(c, 1, 1, sp([5], [1.0]))
    core.push(b, 2, 1, sp([6], [1.0]))
    clock.now += 2
    core.sweep()  # round 2 closes at its deadline without c
    assert core.version == 3 and 2 in core.members[c].missed_rounds
    core.push(a, 3, 3, sp([7], [2.0]))
    write_checkpoint(tmp_path, core_state(core))
    restored = restore_core(read_checkpoint(tmp_path), core.config, clock=clock)
    assert torch.equal(restored.model, core.model) and restored.version == core.version
    assert sorted(restored.members) == sorted(core.members)
    for w, m in core.members.items():
        r = restored.members[w]
        assert (r.first_round, r.last_round, r.highest_round_sent, r.missed_rounds) == (
            m.first_round, m.last_round, m.highest_round_sent, m.missed_rounds)
        assert (r.last_update is None) == (m.last_update is None)
        if m.last_update is not None:
            assert torch.equal(r.last_update.values, m.last_update.values)
    assert restored.open_rounds.keys() == core.open_rounds.keys()
    assert restored.resume_info(a).held_rounds == (3,)
    assert restored.push(c, 2, 2, sp([2], [1.0])).late
    assert restored.applied_rounds == [0, 1, 2]
    # Both continue identically.
    for target in (core, restored):
        target.push(b, 3, 3, sp([8], [1.0]))
        target.push(c, 3, 3, sp([9], [1.0]))
    assert restored.version == core.version == 4
    assert torch.equal(restored.model, core.model)
    assert restored.join(D, FP).worker_id == core.join(D, FP).worker_id  # ids never collide
    # Conservation from the audit record: final == initial - sum of applied means.
    assert torch.allclose(restored.initial_model.double() - restored.applied_sum, restored.model.double())


def test_checkpoint_write_is_atomic_and_a_bad_format_is_refused(tmp_path):
    core, _, _ = started_core()
    write_checkpoint(tmp_path, core_state(core))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    state_dict = read_checkpoint(tmp_path)
    state_dict["format"] = 99
    with pytest.raises(ValueError, match="format"):
        restore_core(state_dict, core.config)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing")


def test_resume_info_tells_a_worker_what_the_server_holds():
    core, (a, b, c), clock = started_core(tau_max=2, lease_s=1.0)
    core.push(a, 0, 0, sp([0], [1.0]))
    core.push(a, 1, 0, sp([0], [1.0]))
    info = core.resume_info(a)
    assert info.member and info.version == 0 and info.held_rounds == (0, 1)
    assert info.model_checksum == model_checksum(core.model)
    clock.now += 2
    core.touch(a)
    core.touch(b)
    core.sweep()
    assert not core.resume_info(c).member
    assert not ServerCore(CoreConfig()).resume_info(1).member  # a server restarted empty: join again


def test_a_restarted_controller_schedules_its_first_decision_ahead_of_the_reported_round():
    policy = PolicyConfig(name="static", tau=2, delta=0.1, switch_margin_rounds_cold=50)
    fresh = ControllerCore(policy)
    fresh.report(Report(1, 0, D, ()), 0.0)
    assert fresh.book.latest.from_round == 0  # a cluster that has not trained yet starts at round 0
    restarted = ControllerCore(policy, first_decision_id=10_000)
    decision = restarted.report(Report(1, 700, D, ()), 0.0)
    assert decision.from_round == 750 and decision.decision_id == 10_000


@pytest.mark.parametrize("delta", [0.1, 0.9])  # sparse and dense pushes
def test_a_late_update_goes_back_into_the_residual_exactly(delta):
    ef = ErrorFeedback(64)
    grad = torch.randn(64, generator=torch.Generator().manual_seed(3))
    update = ef.compress(grad, delta)
    ef.restore(update)  # the server said `late`: as if it had never been sent
    assert torch.equal(ef.residual, grad)


def test_server_flags_for_faults(tmp_path, capsys):
    from wanps.server.cli import parse_config

    config = parse_config(["--lease-s", "5", "--round-deadline-s", "0.5", "--checkpoint-dir", str(tmp_path),
                              "--checkpoint-every", "7", "--audit"])
    assert (config.lease_s, config.round_deadline_s, config.checkpoint_every, config.audit) == (5, 0.5, 7, True)
    assert config.core_config().lease_s == 5 and config.sweep_interval_s() == 0.05
    for bad in (["--lease-s", "-1"], ["--resume", str(tmp_path / "nothing-here")]):
        with pytest.raises(SystemExit):
            parse_config(bad)
    assert "no checkpoint at" in capsys.readouterr().err
