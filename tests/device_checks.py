"""What the device tests share: a tiny model, a worker that trains it in-process, and every
buffer a worker allocates, by name (tests/test_device.py on the CPU, tests/test_cuda.py on a GPU)."""
from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wanps.proto.checksum import CHECKSUM_MODULUS
from wanps.proto.codec import Update, decode_delta, iter_chunks
from wanps.worker import Optimizer


def reference_checksum(values: torch.Tensor, offset: int = 0) -> int:
    """The definition, slowly: sum_i (offset + i + 1) * int32 bits of x_i, mod p, in Python ints."""
    bits = values.contiguous().numpy().view(np.int32).tolist()
    return sum(map(operator.mul, range(offset + 1, offset + 1 + len(bits)), bits)) % CHECKSUM_MODULUS


class CrossDeviceCopies(TorchDispatchMode):
    """Records every copy whose source and destination are on different devices."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            self.copies.append((args[1].device.type, args[0].device.type, args[0].numel() * args[0].element_size()))
        if func is torch.ops.aten._to_copy.default and out.device != args[0].device:
            self.copies.append((args[0].device.type, out.device.type, out.numel() * out.element_size()))
        return out


def tiny_mlp(device: torch.device | str, seed: int = 0) -> torch.nn.Module:
    """2,372 float32 parameters, built the same on every device (seeded on the CPU, then moved)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(device)


def batches(device: torch.device | str, seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A fixed-seed stream of (x, y) batches of 16, made on the CPU and moved to `device`."""
    generator = torch.Generator().manual_seed(seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(16, 32, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)
        return x.to(device), y.to(device)

    return next_batch


def train(opt: Optimizer, model: torch.nn.Module, next_batch, steps: int) -> None:
    """`steps` closure steps (the closure form works with and without the SASG skip rule)."""
    for _ in range(steps):
        x, y = next_batch()

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def worker_buffers(opt: Optimizer) -> dict[str, torch.Tensor]:
    """Every model-sized (or scratch) tensor a worker allocated, by what it is."""
    rule = opt.rule
    found: dict[str, torch.Tensor | None] = {
        "replica": opt.replica,
        "grad buffer": opt._grad,
        "residual": rule.residual,
        "momentum": rule._momentum_buffer,
        "DEF clean copy": opt._clean,
        "SASG aux grad": opt._aux_grad,
        "SASG anchor": None if rule.skip_rule is None else rule.skip_rule.anchor,
        "compressor magnitude scratch": getattr(rule.ef.compressor, "_magnitude", None),
        "compressor mask scratch": getattr(rule.ef.compressor, "_mask", None),
    }
    binding = opt._binding
    for entry, tensor in (*binding.trainable, *binding.frozen, *binding.buffers):
        found[f"{entry.role} {entry.name or entry.offset}"] = tensor.data
    return {name: tensor for name, tensor in found.items() if tensor is not None}


def assert_all_on(device: torch.device, opt: Optimizer, required: set[str]) -> None:
    buffers = worker_buffers(opt)
    missing = required - set(buffers)
    assert not missing, f"buffers not allocated (the test would prove nothing about them): {sorted(missing)}"
    wrong = {name: str(t.device) for name, t in buffers.items() if t.device != device}
    assert not wrong, f"buffers not on {device}: {wrong}"
    scratch = [buffers[n] for n in ("compressor magnitude scratch", "compressor mask scratch") if n in buffers]
    # The compressor selects over the trainable part of the replica (the layout's first T elements).
    assert all(t.numel() == opt.trainable_params for t in scratch), "the compressor's scratch was never used"


def decoded_deltas(d: int, dense: bool, seed: int, rounds: int):
    """`rounds` random deltas for a d-element model (10% sparse or dense), each encoded into wire
    chunks and decoded again: what a replica receives."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        if dense:
            indices, values = None, torch.randn(d, generator=generator)
        else:
            indices = torch.sort(torch.randperm(d, generator=generator)[: d // 10]).values.to(torch.int32)
            values = torch.randn(indices.numel(), generator=generator)
        chunks = list(iter_chunks(values, indices))
        delta: Update = decode_delta(b"".join(c[0] for c in chunks), b"".join(c[1] for c in chunks),
                                     values.numel(), d, dense)
        yield delta
