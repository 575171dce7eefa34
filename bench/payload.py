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
    indices = np.sort(rng.choice(num_params, size=pairs, replace=False)).astype(np.int32)
    values = (rng.standard_normal(pairs, dtype=np.float32) * 1e-3).astype(np.float32)
    return codec.Update(values=torch.from_numpy(values), indices=torch.from_numpy(indices))
