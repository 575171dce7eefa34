"""The replicated vector's layout (wanps.worker.layout), the structure a Join carries
(wanps.proto.structure), the binding of a model to the replica, and the server's join check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wanps.proto import structure as structures
from wanps.proto.codec import Update
from wanps.proto.structure import TensorSpec
from wanps.rpc.errors import FailedPrecondition, InvalidArgument
from wanps.server.checkpoint import core_state, restore_core
from wanps.server.core import CoreConfig, ServerCore
from wanps.worker.binding import ModelBinding
from wanps.worker.layout import (BUFFER, FROZEN, INT_BUFFER, TRAINABLE, ModelLayout, collect_module,
                                 collect_parameters, layout_of, trainable_part, widen, with_buffers)


def bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    model[0].requires_grad_(False)  # a frozen first layer
    return model


def layout_of_module(model: nn.Module) -> ModelLayout:
    return layout_of(collect_module(model))[0]


# ---------------------------------------------------------------------------- layout


def test_the_layout_orders_trainable_frozen_buffers_then_integer_buffers():
    layout = layout_of_module(bn_cnn())
    assert [(e.name, e.role, e.offset, e.numel) for e in layout.entries] == [
        ("1.weight", TRAINABLE, 0, 2), ("1.bias", TRAINABLE, 2, 2),
        ("4.weight", TRAINABLE, 4, 96), ("4.bias", TRAINABLE, 100, 3),
        ("0.weight", FROZEN, 103, 18), ("0.bias", FROZEN, 121, 2),
        ("1.running_mean", BUFFER, 123, 2), ("1.running_var", BUFFER, 125, 2),
        ("1.num_batches_tracked", INT_BUFFER, 127, 1),
    ]
    assert (layout.trainable, layout.frozen_stop, layout.buffer_start, layout.int_buffer_start, layout.size) == (
        103, 123, 123, 127, 128)
    assert layout.has_buffers and layout.buffer_elements == 5
    assert layout.entries[2].shape == (3, 32) and layout.entries[2].dtype == torch.float32


def test_a_layout_without_buffers_or_frozen_parameters_is_all_trainable():
    layout = layout_of_module(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)))
    assert layout.trainable == layout.frozen_stop == layout.size == 11
    assert not layout.has_buffers and layout.buffer_elements == 0


def test_non_persistent_buffers_are_not_replicated():
    model = nn.Linear(2, 2)
    model.register_buffer("mask", torch.ones(2, 2, dtype=torch.bool), persistent=False)
    model.register_buffer("scale", torch.ones(2))
    layout = layout_of_module(model)
    assert [(e.name, e.role) for e in layout.entries] == [("weight", TRAINABLE), ("bias", TRAINABLE),
                                                          ("scale", BUFFER)]


def test_parameters_without_a_module_are_unnamed_and_frozen_ones_go_last():
    a, c = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(4))
    b = nn.Parameter(torch.zeros(3), requires_grad=False)
    layout, ordered = layout_of(collect_parameters([{"params": [a, b]}, {"params": [c]}]))
    assert [(e.name, e.role, e.offset) for e in layout.entries] == [("", TRAINABLE, 0), ("", TRAINABLE, 2),
                                                                     ("", FROZEN, 6)]
    assert [t.tensor for t in ordered] == [a, c, b]
    assert layout.trainable == 6
    named = torch.optim.SGD(nn.Linear(2, 1).named_parameters(), lr=0.1).param_groups
    assert [e.name for e in layout_of(collect_parameters(named))[0].entries] == ["weight", "bias"]


def test_the_fingerprint_changes_with_name_shape_dtype_and_role():
    base = layout_of_module(bn_cnn())
    assert base.fingerprint() == layout_of_module(bn_cnn(seed=5)).fingerprint()  # values do not count
    renamed = nn.Sequential(nn.Identity(), *bn_cnn())
    renamed[1].requires_grad_(False)
    reshaped = bn_cnn()
    reshaped[4] = nn.Linear(32, 4)
    retyped = bn_cnn().to(torch.bfloat16)
    unfrozen = bn_cnn().requires_grad_(True)
    fingerprints = {layout_of_module(m).fingerprint() for m in (renamed, reshaped, retyped, unfrozen)}
    assert base.fingerprint() not in fingerprints and len(fingerprints) == 4
    specs = list(base.structure)
    spec = specs[0]
    for changed in (TensorSpec("x", spec.shape, spec.dtype, spec.role),
                    TensorSpec(spec.name, (1, 2), spec.dtype, spec.role),
                    TensorSpec(spec.name, spec.shape, "torch.float16", spec.role),
                    TensorSpec(spec.name, spec.shape, spec.dtype, FROZEN)):
        assert structures.fingerprint([changed, *specs[1:]]) != base.fingerprint()


def test_the_first_difference_is_named_with_shape_dtype_and_role():
    cluster = layout_of_module(bn_cnn())
    other = bn_cnn()
    other[4] = nn.Linear(32, 5)
    message = cluster.first_difference(layout_of_module(other))
    assert message == ("tensor 2 of the layout: the cluster has '4.weight' (3, 32) float32 trainable, "
                       "this model has '4.weight' (5, 32) float32 trainable")
    assert cluster.first_difference(layout_of_module(bn_cnn(seed=3))) is None
    no_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Identity(), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    no_bn[0].requires_grad_(False)
    message = cluster.first_difference(layout_of_module(no_bn))
    assert "'1.weight' (2,) float32 trainable" in message and "'4.weight' (3, 32)" in message
    shorter = cluster.structure[:-1]
    assert cluster.first_difference(shorter) == (
        "the cluster's model has 9 tensors, this one 8: this model lacks '1.num_batches_tracked' () int64 "
        "int-buffer (tensor 8 of the layout)")
    # Unnamed entries (a worker that passed parameters) match any name at their position.
    unnamed = [TensorSpec("", s.shape, s.dtype, s.role) for s in cluster.structure]
    assert cluster.first_difference(unnamed) is None
    assert "an unnamed tensor" in structures.first_difference(unnamed, layout_of_module(other).structure)


def test_integer_buffers_beyond_float32_exactness_are_refused():
    model = nn.Linear(1, 1)
    model.register_buffer("steps", torch.tensor(2**24 + 1))
    with pytest.raises(ValueError, match="2\\*\\*24"):
        collect_module(model)
    model.steps.fill_(2**24)
    assert layout_of_module(model).entries[-1].role == INT_BUFFER


# ---------------------------------------------------------------------------- bad models


def test_bad_models_are_refused_by_name():
    frozen_int = nn.Linear(2, 2)
    frozen_int.register_parameter("counts", nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False))
    with pytest.raises(ValueError, match="'counts' is torch.int64: wanps replicates floating-point parameters"):
        collect_module(frozen_int)
    with pytest.raises(ValueError, match="'weight' is torch.float64"):
        collect_module(nn.Linear(2, 2).double())
    with_double_buffer = nn.Linear(2, 2)
    with_double_buffer.register_buffer("total", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="buffer 'total' is torch.float64"):
        collect_module(with_double_buffer)
    two_devices = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="'1.weight' is on meta but '0.weight' is on cpu"):
        collect_module(two_devices)
    with pytest.raises(ValueError, match="is on meta"):
        collect_parameters([{"params": list(two_devices.parameters())}])
    with pytest.raises(ValueError, match="'0' is an embedding with sparse=True"):
        collect_module(nn.Sequential(nn.Embedding(10, 2, sparse=True)))
    frozen_sparse = nn.Embedding(10, 2, sparse=True).requires_grad_(False)  # never has a gradient: fine
    assert layout_of_module(frozen_sparse).entries[0].role == FROZEN


# ---------------------------------------------------------------------------- binding


def test_float32_parameters_are_views_of_the_replica_and_buffers_are_copies():
    model = bn_cnn()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    layout, ordered = layout_of(collect_module(model))
    binding = ModelBinding(layout, ordered)
    assert binding.zero_copy
    for entry in layout.entries:
        assert torch.equal(binding.flat[entry.slice], initial[entry.name].reshape(-1).float())
    binding.flat[layout.entries[0].slice] += 1  # a delta applied to the replica is what the model sees
    assert torch.equal(model[1].weight, initial["1.weight"] + 1)
    model[1].running_mean.add_(5)  # a forward pass changes buffers in place: the replica must not move
    assert torch.equal(binding.flat[123:125], initial["1.running_mean"])
    binding.flat[127] = 6.6  # integer buffers come back rounded
    binding.load_buffers()
    assert torch.equal(model[1].running_mean, initial["1.running_mean"]) and int(model[1].num_batches_tracked) == 7


def test_low_precision_parameters_follow_a_float32_master():
    model = bn_cnn().to(torch.bfloat16)
    layout, ordered = layout_of(collect_module(model))
    binding = ModelBinding(layout, ordered)
    assert not binding.zero_copy and binding.flat.dtype == torch.float32
    weight = layout.entries[2]
    binding.flat[weight.slice] += 1e-3  # below bfloat16's resolution near 1: only the master keeps it
    binding.refresh_parameters()
    assert torch.equal(model[4].weight.reshape(-1), binding.flat[weight.slice].to(torch.bfloat16))
    model[4].weight.grad = torch.ones_like(model[4].weight)
    out = torch.full((layout.trainable,), 7.0)
    binding.gather_gradients(out)
    assert out.dtype == torch.float32 and torch.equal(out[weight.slice], torch.ones(weight.numel))
    assert torch.equal(out[: weight.offset], torch.zeros(weight.offset))  # no gradient: zero


def test_buffer_differences_carry_replica_minus_local_where_they_differ():
    model = bn_cnn()
    layout, ordered = layout_of(collect_module(model))
    binding = ModelBinding(layout, ordered)
    assert binding.buffer_differences().count == 0
    model[1].running_mean[1] = 0.5
    model[1].num_batches_tracked += 3
    update = binding.buffer_differences()
    assert update.indices.tolist() == [124, 127] and update.values.tolist() == [-0.5, -3.0]


# ---------------------------------------------------------------------------- updates over the layout


def test_updates_widen_to_the_whole_vector():
    layout = layout_of_module(bn_cnn())  # T = 103, d = 128
    t, d = layout.trainable, layout.size
    dense = Update(values=torch.arange(t, dtype=torch.float32), indices=None)
    wide = widen(dense, layout)  # 4d <= 8T: dense over the whole vector, zeros elsewhere
    assert wide.indices is None and wide.count == d and torch.equal(wide.values[:t], dense.values)
    assert not wide.values[t:].any()
    sparse = Update(values=torch.tensor([1.0, 2.0], dtype=torch.float16),
                    indices=torch.tensor([3, 50], dtype=torch.int32))
    assert widen(sparse, layout) is sparse
    buffers = Update(values=torch.tensor([0.5, -3.0]), indices=torch.tensor([124, 127], dtype=torch.int32))
    both = with_buffers(sparse, layout, buffers)
    assert both.indices.tolist() == [3, 50, 124, 127] and both.values.dtype == torch.float32  # 16-bit sent as float32
    assert both.values.tolist() == [1.0, 2.0, 0.5, -3.0]
    only_buffers = with_buffers(None, layout, buffers)
    assert only_buffers.indices.tolist() == [124, 127]
    dense_both = with_buffers(dense, layout, buffers)
    assert dense_both.indices is None and dense_both.values[124] == 0.5 and dense_both.values[127] == -3.0
    # What error feedback gets back from a late push, and what SASG measures of a delta: [0, T) only.
    assert trainable_part(both, t).indices.tolist() == [3, 50]
    assert trainable_part(dense_both, t).count == t
    small_t = layout_of_module(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(40, affine=False)))  # T 2, d 83: 4d > 8T
    dense_small = Update(values=torch.ones(small_t.trainable), indices=None)
    assert widen(dense_small, small_t).indices.tolist() == list(range(small_t.trainable))


# ---------------------------------------------------------------------------- the server's join check


def test_the_server_names_the_first_differing_tensor_and_checks_the_structure_it_is_sent():
    cluster = layout_of_module(bn_cnn())
    core = ServerCore(CoreConfig(min_workers=2))
    core.join(cluster.size, cluster.fingerprint(), structure=cluster.structure)
    other = bn_cnn()
    other[4] = nn.Linear(32, 5)
    layout = layout_of_module(other)
    with pytest.raises(FailedPrecondition, match=r"differs from the cluster's model: tensor 2 of the layout: the "
                                                 r"cluster has '4.weight' \(3, 32\) float32 trainable, this model has "
                                                 r"'4.weight' \(5, 32\)"):
        core.join(layout.size, layout.fingerprint(), structure=layout.structure)
    with pytest.raises(FailedPrecondition, match="fingerprint"):  # without a structure: fingerprints only
        core.join(cluster.size, layout.fingerprint())
    with pytest.raises(InvalidArgument, match="not the digest"):
        core.join(cluster.size, b"x" * 32, structure=cluster.structure)
    with pytest.raises(InvalidArgument, match="hold 128 elements, num_params is 129"):
        core.join(cluster.size + 1, cluster.fingerprint(), structure=cluster.structure)
    unnamed = [TensorSpec("", s.shape, s.dtype, s.role) for s in cluster.structure]
    assert core.join(cluster.size, structures.fingerprint(unnamed), structure=unnamed).worker_id == 2
    # The structure survives a checkpoint, so a resumed server still names differences.
    restored = restore_core(core_state(core), core.config)
    assert restored.structure == cluster.structure
    with pytest.raises(FailedPrecondition, match="'4.weight'"):
        restored.join(layout.size, layout.fingerprint(), structure=layout.structure)
    old_checkpoint = core_state(core)
    del old_checkpoint["structure"]
    assert restore_core(old_checkpoint, core.config).structure is None
