"""The sparse updates benchmarks push: random pairs, and what one pair costs on the wire."""
from __future__ import annotations

import numpy as np
import torch

from wanps.proto import codec

# Payload bytes per element at fp32: a uint32 index and a float32 value.
PAYLOAD_BYTES_PER_ELEMENT = 8


def random_update(num_params: int, pairs: int, seed: int | np.random.Generator) -> codec.Update:
    """`pairs` sorted unique indices below `num_params`, small finite float32 values.

    `seed` may be a generator, which then advances (successive updates differ).
    """
    rng = np.random.default_rng(seed)
    indices = distinct_sorted_indices(num_params, pairs, rng)
    values = (rng.standard_normal(pairs, dtype=np.float32) * 1e-3).astype(np.float32)
    return codec.Update(values=torch.from_numpy(values), indices=torch.from_numpy(indices))


# From this many pairs on, draw with replacement and keep distinct ones: `rng.choice`
# without replacement permutes all of [0, num_params) (9.6 s and 1 GB for 12.4M of 124M).
FAST_DRAW_FROM_PAIRS = 1 << 20


def distinct_sorted_indices(num_params: int, pairs: int, rng: np.random.Generator) -> np.ndarray:
    """`pairs` distinct int32 indices below `num_params`, sorted, uniformly at random."""
    if pairs < FAST_DRAW_FROM_PAIRS or pairs * 2 > num_params:
        return np.sort(rng.choice(num_params, size=pairs, replace=False)).astype(np.int32)
    # A uniform draw with replacement, its distinct values, then `pairs` of those at random:
    # still a uniform subset. 2 * pairs <= num_params, so 1.5 * pairs draws leave >= pairs distinct.
    drawn = _distinct(rng.integers(0, num_params, size=pairs + pairs // 2, dtype=np.int64))
    while drawn.size < pairs:  # only if the draw was very unlucky
        drawn = _distinct(np.concatenate([drawn, rng.integers(0, num_params, size=pairs, dtype=np.int64)]))
    keep = np.ones(drawn.size, dtype=bool)
    keep[rng.choice(drawn.size, size=drawn.size - pairs, replace=False)] = False
    return drawn[keep].astype(np.int32)


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique of numpy 2.4 took 39 s for 18.6M int64 here)."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))]
