"""Unit tests of top-k compression with error feedback (wanps.worker.error_feedback): pure tensor code."""
from __future__ import annotations

import math

import pytest
import torch

from wanps.proto.codec import Update
from wanps.worker.compressors import topk_exact
from wanps.worker.error_feedback import ErrorFeedback, elements_for


def densify(update: Update, d: int) -> torch.Tensor:
    out = torch.zeros(d, dtype=update.values.dtype)
    if update.indices is None:
        return out + update.values
    return out.index_put_((update.indices.long(),), update.values)


# ------------------------------------------------------------------------------ elements_for


@pytest.mark.parametrize(
    ("delta", "d", "k"),
    [
        (1.0, 10, 10),
        (0.5, 10, 5),
        (0.25, 10, 3),  # ceil(2.5)
        (0.1, 10, 1),
        (0.11, 10, 2),  # ceil(1.1)
        (1e-9, 10, 1),  # at least one element
        (1e-9, 1, 1),
        (0.5, 1, 1),
        (0.999, 1000, 999),
        (0.9991, 1000, 1000),
        (0.01, 1_000_000, 10_000),
    ],
)
def test_elements_for(delta: float, d: int, k: int) -> None:
    assert elements_for(delta, d) == k


@pytest.mark.parametrize("delta", [0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf")])
def test_elements_for_rejects_delta_outside_0_1(delta: float) -> None:
    with pytest.raises(ValueError, match="delta must be in"):
        elements_for(delta, 10)


@pytest.mark.parametrize(("delta", "d", "k"), [(0.07, 100, 7), (0.14, 100, 14), (0.28, 100, 28), (0.56, 100, 56)])
def test_elements_for_is_not_fooled_by_float_rounding(delta: float, d: int, k: int) -> None:
    assert elements_for(delta, d) == k


# ------------------------------------------------------------------------------ topk_exact


def test_topk_exact_picks_largest_magnitudes_sorted() -> None:
    update = torch.tensor([0.1, -5.0, 3.0, -0.2, 4.0, 0.0, -3.5])
    indices = topk_exact(update, 3)
    assert indices.dtype == torch.int64
    assert indices.tolist() == [1, 4, 6]  # |-5|, |4|, |-3.5|
    assert topk_exact(update, 1).tolist() == [1]
    assert topk_exact(update, 4).tolist() == [1, 2, 4, 6]


@pytest.mark.parametrize("k", [7, 8, 100])
def test_topk_exact_with_k_at_least_numel_is_everything(k: int) -> None:
    update = torch.tensor([0.1, -5.0, 3.0, -0.2, 4.0, 0.0, -3.5])
    assert topk_exact(update, k).tolist() == list(range(7))


@pytest.mark.parametrize("seed", range(5))
def test_topk_exact_random(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    d = 1000
    # Distinct magnitudes (a permutation), random signs: the top-k set is unique.
    magnitudes = torch.randperm(d, generator=gen).float() + 1.0
    signs = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
    update = magnitudes * signs
    k = int(torch.randint(1, d, (1,), generator=gen))
    indices = topk_exact(update, k)
    assert indices.numel() == k
    assert bool((indices[1:] > indices[:-1]).all())  # strictly ascending
    expected = torch.nonzero(magnitudes > d - k).flatten()  # magnitudes d-k+1 .. d
    assert torch.equal(indices, expected)


# ------------------------------------------------------------------------------ error feedback


def test_error_feedback_one_step_by_hand() -> None:
    ef = ErrorFeedback(5)
    grad = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.25])
    update = ef.compress(grad, 0.4)  # k = 2
    assert update.indices is not None and update.indices.dtype == torch.int32
    assert update.indices.tolist() == [1, 3]
    assert update.values.tolist() == [-3.0, 2.0]
    assert ef.residual.tolist() == [0.5, 0.0, 1.0, 0.0, -0.25]
    # Next step: p = g + e = [1.5, 1, 1.5, 0, 0.75] -> top 2 are [0] and [2].
    update = ef.compress(torch.tensor([1.0, 1.0, 0.5, 0.0, 1.0]), 0.4)
    assert update.indices.tolist() == [0, 2] and update.values.tolist() == [1.5, 1.5]
    assert ef.residual.tolist() == [0.0, 1.0, 0.0, 0.0, 0.75]


def test_error_feedback_does_not_modify_the_gradient() -> None:
    ef = ErrorFeedback(4)
    ef.compress(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.25)
    grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    ef.compress(grad, 0.25)
    assert grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_error_feedback_dense_when_delta_is_one() -> None:
    ef = ErrorFeedback(4)
    ef.compress(torch.tensor([1.0, -2.0, 3.0, 0.5]), 0.25)  # sends the 3, keeps the rest
    assert ef.residual.tolist() == [1.0, -2.0, 0.0, 0.5]
    update = ef.compress(torch.tensor([0.25, 0.25, 0.25, 0.25]), 1.0)
    assert update.indices is None
    assert update.values.tolist() == [1.25, -1.75, 0.25, 0.75]
    assert torch.count_nonzero(ef.residual) == 0
    # The pushed values are a copy: later steps do not change them.
    ef.compress(torch.ones(4), 1.0)
    assert update.values.tolist() == [1.25, -1.75, 0.25, 0.75]


def test_error_feedback_goes_dense_from_half_the_elements() -> None:
    """Half the elements sparse cost as many bytes as all of them dense (no indices)."""
    assert ErrorFeedback(10).compress(torch.arange(10, dtype=torch.float32), 0.5).indices is None
    below = ErrorFeedback(10).compress(torch.arange(10, dtype=torch.float32), 0.4)
    assert below.indices.tolist() == [6, 7, 8, 9]


def test_error_feedback_dense_when_k_rounds_up_to_everything() -> None:
    ef = ErrorFeedback(10)
    update = ef.compress(torch.arange(10, dtype=torch.float32), 0.95)  # ceil(9.5) = 10
    assert update.indices is None and update.values.tolist() == list(map(float, range(10)))
    assert torch.count_nonzero(ef.residual) == 0


@pytest.mark.parametrize("seed", range(3))
def test_error_feedback_invariant_over_many_steps(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    d = 257
    ef = ErrorFeedback(d)
    sent = torch.zeros(d, dtype=torch.float64)
    scaled_total = torch.zeros(d, dtype=torch.float64)
    deltas = [0.01, 0.05, 0.3, 0.5, 1.0]
    for step in range(200):
        lr = [0.1, 0.01, 1.0][step % 3]
        scaled = lr * torch.randn(d, generator=gen)
        delta = deltas[int(torch.randint(0, len(deltas), (1,), generator=gen))]
        p = ef.residual + scaled  # what the step must split into pushed + kept, exactly
        update = ef.compress(scaled, delta)
        k = elements_for(delta, d)
        assert update.count == (d if 2 * k >= d else k)
        pushed = densify(update, d)
        # Exact split of p: every element is either pushed or kept, never both, never altered.
        assert torch.equal(pushed + ef.residual, p)
        if update.indices is None:
            assert 2 * k >= d and torch.count_nonzero(ef.residual) == 0
        else:
            idx = update.indices.long()
            assert bool((idx[1:] > idx[:-1]).all())
            assert bool((ef.residual[idx] == 0).all())  # exactly zero where sent
            assert torch.equal(update.values, p[idx])
            # What was sent dominates what was kept.
            kept = ef.residual.abs().max().item()
            assert update.values.abs().min().item() >= kept
        sent += pushed.double()
        scaled_total += scaled.double()
        assert torch.allclose(sent + ef.residual.double(), scaled_total, atol=1e-4, rtol=1e-5)
    # Nothing is lost: a final dense step empties the residual into the pushed total.
    update = ef.compress(torch.zeros(d), 1.0)
    sent += densify(update, d).double()
    assert torch.count_nonzero(ef.residual) == 0
    assert torch.allclose(sent, scaled_total, atol=1e-4, rtol=1e-5)
    assert not math.isclose(float(scaled_total.abs().sum()), 0.0)
