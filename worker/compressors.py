"""Compressors: which elements of p = lr*g + e a worker sends. Pure tensor code, no network.

A compressor only selects; `ErrorFeedback` (worker/error_feedback.py) takes the values, rounds
them to the wire dtype and keeps the rest as the residual. Adding one is one class here:

    @register
    class MyCompressor:
        name = "my-name"                # what --compressor and Optimizer(compressor=...) take
        codec = pb.CODEC_SPARSE         # how its selection travels (a real, decodable Codec)
        def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None: ...
        def select(self, p: torch.Tensor, k: int, round_: int) -> Selection: ...

A compressor is built for the device p lives on (the model's: CPU or GPU) and keeps any
scratch memory there; its selection (indices) is on that device too, so selecting moves
nothing to the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from wanps.proto import wanps_pb2 as pb


@dataclass(frozen=True)
class Selection:
    """Either sorted unique indices (int64, on p's device) or one contiguous block
    [block_start, block_start + count)."""

    indices: torch.Tensor | None = None
    block_start: int | None = None
    count: int = 0

    @classmethod
    def of_indices(cls, indices: torch.Tensor) -> Selection:
        return cls(indices=indices, count=int(indices.numel()))

    @classmethod
    def block(cls, start: int, count: int) -> Selection:
        return cls(block_start=start, count=count)


class Compressor(Protocol):
    name: str
    codec: int

    def select(self, p: torch.Tensor, k: int, round_: int) -> Selection:
        """Choose about k elements of the 1-D float32 p (exactly k unless the class says otherwise)."""
        ...


COMPRESSORS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    if cls.name in COMPRESSORS:
        raise ValueError(f"compressor {cls.name!r} is registered twice")
    COMPRESSORS[cls.name] = cls
    return cls


def make_compressor(name: str, seed: int = 0, device: torch.device | str = "cpu") -> Compressor:
    try:
        cls = COMPRESSORS[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r} (known: {', '.join(sorted(COMPRESSORS))})") from None
    return cls(seed=seed, device=device)


def topk_exact(update: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, on update's device) of the k largest-magnitude elements, sorted ascending (the wire order)."""
    if k >= update.numel():
        return torch.arange(update.numel(), device=update.device)
    _, indices = torch.topk(update.abs(), k, sorted=False)
    return torch.sort(indices).values


@register
class ExactTopK:
    """The k largest magnitudes, exactly (torch.topk). The default."""

    name = "topk"
    codec = pb.CODEC_SPARSE

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        del seed  # deterministic
        self.device = torch.device(device)  # no scratch memory: nothing to place

    def select(self, p: torch.Tensor, k: int, round_: int = 0) -> Selection:
        return Selection.of_indices(topk_exact(p, k))


@register
class SampledTopK:
    """Approximate top-k as in Deep Gradient Compression: a threshold from a random sample.

    The |p| threshold is the (1 - k/d) quantile of `sample_size` random elements; one
    compare + nonzero over p selects (sorted and unique for free). If the count is more than
    `tolerance` above k, an exact top-k over the few candidates trims it to k; if more than
    `tolerance` below, one refinement pass with a lower threshold (then a trim). The |p| and
    mask buffers are d-sized, on the compressor's device, and reused across calls: only
    k-sized tensors are allocated. On the CPU the d-sized passes run in numpy over the same
    memory: on one thread its compare and flatnonzero are faster than torch's ge and
    nonzero, and those two passes are most of this compressor's time (docs/benchmarks.md,
    "Compressors: selection time"). On any other device they are torch's, where p lives.
    """

    name = "topk-sampled"
    codec = pb.CODEC_SPARSE

    def __init__(self, seed: int = 0, sample_size: int = 100_000, tolerance: float = 0.05,
                 device: torch.device | str = "cpu") -> None:
        self.sample_size = sample_size
        self.tolerance = tolerance
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._magnitude = torch.empty(0, dtype=torch.float32, device=self.device)
        self._mask = torch.empty(0, dtype=torch.bool, device=self.device)
        # numpy's compare and flatnonzero on the CPU; torch's where p is elsewhere.
        self.use_numpy = self.device.type == "cpu"
        self.refinements = 0  # how often the first threshold selected too few (for tests, benchmarks)

    def _buffers(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._magnitude.numel() != d:
            self._magnitude = torch.empty(d, dtype=torch.float32, device=self.device)
            self._mask = torch.empty(d, dtype=torch.bool, device=self.device)
        return self._magnitude, self._mask

    def _threshold(self, sample: torch.Tensor, wanted: float, d: int) -> torch.Tensor:
        """The magnitude above which about `wanted` of the d elements lie, from the sample."""
        above = min(sample.numel(), max(1, round(sample.numel() * wanted / d)))
        return sample.kthvalue(sample.numel() - above + 1).values

    def _above(self, magnitude: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Sorted int64 indices of the elements with |p| >= threshold."""
        if self.use_numpy:
            mask_array = mask.numpy()  # a view, no copy
            np.greater_equal(magnitude.numpy(), np.float32(threshold.item()), out=mask_array)
            return torch.from_numpy(np.flatnonzero(mask_array))
        torch.ge(magnitude, threshold, out=mask)
        return torch.nonzero(mask).view(-1)  # row-major: sorted

    def select(self, p: torch.Tensor, k: int, round_: int = 0) -> Selection:
        d = p.numel()
        if k >= d or d <= self.sample_size:  # small tensors: exact is as fast
            return Selection.of_indices(topk_exact(p, k))
        if p.device.type != self.device.type or self.device.index not in (None, p.device.index):
            raise ValueError(f"this compressor was built for {self.device}, p is on {p.device}")
        magnitude, mask = self._buffers(d)
        if self.use_numpy:
            np.abs(p.detach().contiguous().numpy(), out=magnitude.numpy())
        else:
            torch.abs(p.detach(), out=magnitude)
        positions = torch.randint(0, d, (self.sample_size,), generator=self._generator, device=self.device)
        sample = magnitude.index_select(0, positions)
        indices = self._above(magnitude, mask, self._threshold(sample, k, d))
        if indices.numel() < k * (1 - self.tolerance):
            # Too few (the sample over-estimated the threshold): ask for 1.5x, trimmed below.
            self.refinements += 1
            indices = self._above(magnitude, mask, self._threshold(sample, 1.5 * k, d))
            if indices.numel() < k * (1 - self.tolerance):  # a pathological sample: be exact
                return Selection.of_indices(topk_exact(p, k))
        if indices.numel() > k * (1 + self.tolerance):
            # Too many: exact top-k among the candidates only (about k of them, not d).
            keep = torch.topk(magnitude.index_select(0, indices), k, sorted=False).indices
            indices = indices.index_select(0, torch.sort(keep).values)  # candidates are sorted: keep them so
        return Selection.of_indices(indices)


def block_start_for(seed: int, round_: int, num_params: int, k: int) -> int:
    """The block every worker with this seed picks in this round (RBGS): a uniform start."""
    return int(np.random.default_rng((seed, round_)).integers(0, num_params - k + 1))


@register
class RandomBlock:
    """Random block (RBGS, from the DEF paper): k contiguous elements from a shared seed.

    Every worker with the same seed sends the same block in a round, so only the values
    and the block start travel, and the server sums the blocks directly.
    """

    name = "random-block"
    codec = pb.CODEC_RANDOM_BLOCK

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if seed < 0:
            raise ValueError(f"random-block seed must be >= 0, got {seed}")
        self.seed = seed
        self.device = torch.device(device)  # the block is two integers: nothing to place

    def select(self, p: torch.Tensor, k: int, round_: int = 0) -> Selection:
        k = min(k, p.numel())
        return Selection.block(block_start_for(self.seed, round_, p.numel(), k), k)
