"""SASG's skip rule (rule (6), Algorithm 1) and the UpdateRule that composes it: pure, no network."""
from __future__ import annotations

import pytest
import torch

from wanps.worker.skip_rule import SkipRule, gradient_gap, paper_alphas, step_squared_norm
from wanps.worker.update_rule import UpdateConfig, UpdateRule


def test_threshold_weights_the_newest_step_with_alpha_1() -> None:
    rule = SkipRule([3.0, 2.0, 1.0], num_workers=2)
    for step in (100.0, 10.0, 1.0, 0.5):  # oldest first; 100 falls out of the window of D = 3
        rule.record_model_step(step)
    # d=1 -> newest (0.5), d=2 -> 1.0, d=3 -> 10.0; divided by M^2 = 4.
    assert rule.threshold() == pytest.approx((3 * 0.5 + 2 * 1.0 + 1 * 10.0) / 4)


def test_threshold_with_fewer_steps_than_d_uses_what_there_is() -> None:
    rule = SkipRule([1.0] * 10, num_workers=1)
    assert rule.threshold() == 0.0
    rule.record_model_step(2.0)
    assert rule.threshold() == 2.0


def test_first_round_must_upload_then_skip_when_the_gap_is_small() -> None:
    rule = SkipRule([1.0] * 3, num_workers=1)
    rule.record_model_step(1.0)
    assert rule.must_upload and not rule.should_skip(0.0)  # no anchor: nothing stored on the server
    rule.uploaded(torch.zeros(4))
    assert rule.should_skip(0.99) and not rule.should_skip(1.01)
    assert rule.should_skip(1.0)  # "<=" as in rule (6)


def test_forced_upload_once_staleness_reaches_d() -> None:
    """D = 3: after an upload (staleness 1) two skips are allowed, the third round must upload."""
    rule = SkipRule([1.0] * 3, num_workers=1)
    rule.record_model_step(1.0)
    rule.uploaded(torch.zeros(2))
    decisions = []
    for _ in range(7):
        skip = rule.should_skip(0.0)  # the gap is always tiny: only the staleness forces uploads
        decisions.append("skip" if skip else "up")
        rule.skipped() if skip else rule.uploaded(torch.zeros(2))
    assert decisions == ["skip", "skip", "up", "skip", "skip", "up", "skip"]
    assert rule.skips == 5 and rule.uploads == 3 and rule.skip_rate == pytest.approx(5 / 8)


def test_uploaded_keeps_a_copy_of_the_anchor() -> None:
    rule = SkipRule([1.0])
    params = torch.tensor([1.0, 2.0])
    rule.uploaded(params)
    params.add_(5.0)
    assert torch.equal(rule.anchor, torch.tensor([1.0, 2.0]))


def test_paper_alphas_and_bad_weights() -> None:
    assert paper_alphas(0.005) == [100.0] * 10
    assert paper_alphas(0.01, 4, "one") == [100.0] * 4
    with pytest.raises(ValueError):
        SkipRule([])
    with pytest.raises(ValueError):
        SkipRule([1.0, -1.0])
    with pytest.raises(ValueError):
        SkipRule([float("nan")])
    with pytest.raises(ValueError):
        SkipRule([1.0], num_workers=0)
    with pytest.raises(ValueError):
        paper_alphas(0.0)


def test_gap_and_step_norm_by_hand() -> None:
    assert gradient_gap(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])) == 5.0
    assert step_squared_norm(torch.tensor([3.0, -4.0])) == 25.0


# ------------------------------------------------------------------------------ UpdateRule


def test_skip_leaves_error_feedback_and_momentum_untouched() -> None:
    """Algorithm 1, line 10: e^{t+1} = e^t on a skip; the update rule returns None (a skip record)."""
    skip = SkipRule([1e9] * 4, num_workers=1)  # a huge threshold: skip whenever allowed
    rule = UpdateRule(4, UpdateConfig(error_feedback="ef", momentum=0.5), skip_rule=skip)
    params = torch.zeros(4)
    sent = rule.update(torch.tensor([1.0, 2.0, 3.0, 4.0]), 1.0, 0.25, 0, params=params)
    assert sent is not None and sent.indices.tolist() == [3] and sent.values.tolist() == [4.0]
    residual_after_upload = rule.residual.clone()
    momentum_after_upload = rule._momentum_buffer.clone()
    skip.record_model_step(1.0)
    assert rule.wants_aux_gradient
    skipped = rule.update(torch.tensor([9.0, 9.0, 9.0, 9.0]), 1.0, 0.25, 1, params=params, aux_grad=torch.full((4,), 9.0))
    assert skipped is None
    assert torch.equal(rule.residual, residual_after_upload)
    assert torch.equal(rule._momentum_buffer, momentum_after_upload)


def test_upload_when_the_gradient_moved_more_than_the_threshold() -> None:
    skip = SkipRule([1.0] * 4, num_workers=2)
    rule = UpdateRule(2, UpdateConfig(), skip_rule=skip)
    rule.update(torch.tensor([1.0, 1.0]), 0.1, 1.0, 0, params=torch.zeros(2))
    skip.record_model_step(4.0)  # threshold = 1 * 4 / 2^2 = 1
    moved = rule.update(torch.tensor([3.0, 1.0]), 0.1, 1.0, 1, params=torch.ones(2), aux_grad=torch.tensor([1.0, 1.0]))
    assert moved is not None  # gap 4 > 1
    assert torch.equal(skip.anchor, torch.ones(2))  # the new anchor is where this gradient was taken


def test_momentum_matches_eq_11_by_hand() -> None:
    """m = mu*m + g; p = lr*m + e; dense (delta 1) so C(p) = p and e stays 0."""
    rule = UpdateRule(2, UpdateConfig(momentum=0.9))
    first = rule.update(torch.tensor([1.0, 2.0]), 0.1, 1.0, 0)
    second = rule.update(torch.tensor([1.0, 0.0]), 0.1, 1.0, 1)
    assert torch.allclose(first.values, torch.tensor([0.1, 0.2]))
    assert torch.allclose(second.values, torch.tensor([0.1 * (0.9 * 1 + 1), 0.1 * (0.9 * 2 + 0)]))


def test_ef_invariant_with_momentum_and_top_k() -> None:
    """sum(pushed) + e == sum(lr * m_t) after any number of steps."""
    torch.manual_seed(0)
    rule = UpdateRule(50, UpdateConfig(momentum=0.5))
    pushed = torch.zeros(50)
    m = torch.zeros(50)
    expected = torch.zeros(50)
    for t in range(20):
        g = torch.randn(50)
        m = 0.5 * m + g
        expected += 0.05 * m
        update = rule.update(g.clone(), 0.05, 0.1, t)
        pushed.index_add_(0, update.indices.long(), update.values)
    assert torch.allclose(pushed + rule.residual, expected, atol=1e-5)


def test_def_detached_point_and_final_residual() -> None:
    rule = UpdateRule(5, UpdateConfig(error_feedback="def", def_lambda=0.3))
    rule.update(torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0]), 1.0, 0.4, 0)  # k = 2: sends -2 and 1, keeps 0.5
    assert torch.equal(rule.residual, torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0]))
    x = torch.full((5,), 10.0)
    expected = torch.tensor([10.0, 10.0, 10.0 - 0.3 * 0.5, 10.0, 10.0])
    assert torch.allclose(rule.detached_point(x, torch.empty(5)), expected)
    flush = rule.final_residual()
    assert flush.indices is None and flush.values.tolist() == [0.0, 0.0, 0.5, 0.0, 0.0]
    assert torch.count_nonzero(rule.residual) == 0 and rule.final_residual().values.abs().sum() == 0


@pytest.mark.parametrize(("options", "skip_rule"), [
    (dict(error_feedback="bogus"), None), (dict(error_feedback="def", def_lambda=1.5), None),
    (dict(momentum=1.0), None), (dict(momentum=-0.1), None), (dict(error_feedback="def"), SkipRule([1.0])),
])
def test_update_rule_refuses_bad_configuration(options: dict, skip_rule: SkipRule | None) -> None:
    with pytest.raises(ValueError):
        UpdateRule(4, UpdateConfig(**options), skip_rule)


@pytest.mark.parametrize(("options", "message"), [
    (dict(compressor="nope"), "unknown compressor 'nope'"),
    (dict(value_dtype="float8"), "value_dtype must be one of"),
    (dict(compressor="random-block", compressor_seed=-1), "seed must be >= 0"),
])
def test_update_config_refuses_what_the_compressor_and_error_feedback_would(options: dict, message: str) -> None:
    """The config fails on its own, before any UpdateRule (or a cluster join) is attempted."""
    with pytest.raises(ValueError, match=message):
        UpdateConfig(**options)


def test_upload_without_params_is_refused_when_skipping_is_on() -> None:
    rule = UpdateRule(2, UpdateConfig(), skip_rule=SkipRule([1.0]))
    with pytest.raises(ValueError):
        rule.update(torch.ones(2), 0.1, 1.0, 0)


def test_alphas_from_spec() -> None:
    from wanps.worker.skip_rule import alphas_from_spec

    assert alphas_from_spec("half", 0.1, 2) == [5.0, 5.0]
    assert alphas_from_spec("one", 0.1, 1) == [10.0]
    assert alphas_from_spec("7.5", 0.1, 3) == [7.5] * 3
    with pytest.raises(ValueError, match="alpha"):
        alphas_from_spec("lots", 0.1)


def test_forgetting_the_upload_forces_the_next_one() -> None:
    """After a rejoin the server holds no update of this worker: a skip would reuse nothing."""
    rule = SkipRule([1e9] * 4, num_workers=1)
    rule.record_model_step(1.0)
    rule.uploaded(torch.zeros(2))
    assert rule.should_skip(0.0)
    rule.forget_upload()
    assert rule.must_upload and not rule.should_skip(0.0)
