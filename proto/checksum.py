"""The model checksum: replicas prove they equal the server's model, where the model lives.

    checksum(x) = ( sum_i (i + 1) * s_i ) mod p,    p = 2**32 - 5 (prime)

where s_i is the float32 bit pattern of x_i read as a signed 32-bit integer and i its
position in the flat model. It is computed with int64 tensor arithmetic only, on the
device that holds the model (CPU or GPU): nothing but the final integer crosses to the
host, and the value is the same on every device, thread count and chunking, because
integer sums are exact whatever their order.

What it detects (i < 2**31, so the weights 1 .. 2**31 are distinct and nonzero mod p):
- any change of one element, so any single flipped bit: the checksum moves by
  (i + 1) * (s' - s) mod p, which is zero only when |s' - s| = p; a bit flip moves s by
  +-2**b, never a multiple of the odd prime p, and |s' - s| = p needs one of the two
  patterns to be a NaN (0x7FFFFFFB..0x7FFFFFFF against -0.0 or a tiny negative denormal);
- two swapped elements: the checksum moves by (i - j) * (s_j - s_i) mod p, nonzero for
  any two distinct non-NaN values (|i - j| < p);
- anything else with probability about 1 - 1/p (like a CRC-32).

It is additive over pieces: the checksum of a piece at element offset `o` (weights o + 1,
o + 2, ...) summed mod p over the pieces of a model is the model's checksum, so a model
streamed in chunks, or split across shards, is checked without reassembling it.

How it stays inside int64 (no overflow anywhere, bounds in absolute value, |s| <= 2**31):
the model is cut into blocks of BLOCK = G * C = 4096 * 64 elements (the last one padded
with zeros, which add nothing), each viewed as a (G, C) grid, element (g, b) at block
position g*C + b. With R_g the row sums and K_b the column sums of a block at offset o,

    sum (o + g*C + b + 1) * s_gb = o * L + C * sum_g g * R_g + sum_b (b + 1) * K_b,  L = sum_g R_g

|R_g| <= C * 2**31 = 2**37, |L| <= 2**18 * 2**31 = 2**49, |sum_g g * R_g| <= G**2/2 * 2**37 = 2**60,
|K_b| <= G * 2**31 = 2**43, |sum_b (b + 1) * K_b| <= C**2 * 2**43 = 2**55. Each is reduced
mod p (to [0, p), p < 2**32) before it is multiplied again: o * (L mod p) < 2**31 * 2**32 =
2**63, C * (. mod p) < 2**38; a block's term is below 3p < 2**34, and a model of at most
2**31 elements has at most 2**13 blocks: the running sum stays below 2**47. Memory traffic
is O(d): one int32 -> int64 copy of each block and two reductions over it (a block at a
time on the CPU, so it stays in cache; many blocks per pass on a GPU, to launch few kernels).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

CHECKSUM_MODULUS = 2**32 - 5  # the largest prime below 2**32: a checksum fits a uint32 field
# Models of up to this many elements (wanps's limit is 2**31 - 1, proto/wire.py MAX_PARAMS).
CHECKSUM_MAX_ELEMENTS = 2**31
_COLUMNS = 64  # C
_ROWS = 4096  # G
BLOCK_ELEMENTS = _ROWS * _COLUMNS
# Blocks per pass: 1 Mi elements (8 MiB of int64) on a CPU, 16 Mi (128 MiB) on a GPU.
_BLOCKS_PER_PASS = {"cpu": 4}
_BLOCKS_PER_PASS_DEVICE = 64


def checksum_part(values: torch.Tensor, offset: int = 0) -> int:
    """The checksum terms of a piece of a float32 model that starts at element `offset`.

    `combine_checksums` of the parts of a model (each with its offset) is `model_checksum`
    of the whole. Computed on `values`' device; one small integer comes back.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"the model checksum is defined on float32 values, got {values.dtype}")
    n = values.numel()
    if offset < 0 or offset + n > CHECKSUM_MAX_ELEMENTS:
        raise ValueError(f"checksum: elements [{offset}, {offset + n}) exceed the {CHECKSUM_MAX_ELEMENTS} it covers")
    if n == 0:
        return 0
    bits = values.detach().reshape(-1).contiguous().view(torch.int32)
    device = bits.device
    per_pass = BLOCK_ELEMENTS * _BLOCKS_PER_PASS.get(device.type, _BLOCKS_PER_PASS_DEVICE)
    blocks_total = -(-n // BLOCK_ELEMENTS)
    wide = torch.empty(min(per_pass, blocks_total * BLOCK_ELEMENTS), dtype=torch.int64, device=device)
    row_weights = torch.arange(_ROWS, dtype=torch.int64, device=device)  # g
    column_weights = torch.arange(1, _COLUMNS + 1, dtype=torch.int64, device=device)  # b + 1
    total = torch.zeros((), dtype=torch.int64, device=device)
    p = CHECKSUM_MODULUS
    for start in range(0, n, per_pass):
        stop = min(start + per_pass, n)
        blocks = -(-(stop - start) // BLOCK_ELEMENTS)
        block = wide[: blocks * BLOCK_ELEMENTS]
        block[: stop - start].copy_(bits[start:stop])  # sign-extends each int32
        block[stop - start :].zero_()
        grid = block.view(blocks, _ROWS, _COLUMNS)
        row_sums = grid.sum(2)  # R_g, per block
        column_sums = grid.sum(1)  # K_b, per block
        block_sums = row_sums.sum(1)  # L
        row_term = row_sums.mul_(row_weights).sum(1)  # sum_g g * R_g
        column_term = column_sums.mul_(column_weights).sum(1)  # sum_b (b + 1) * K_b
        offsets = torch.arange(blocks, dtype=torch.int64, device=device).mul_(BLOCK_ELEMENTS).add_(offset + start)
        terms = (offsets.mul_(block_sums.remainder_(p)).remainder_(p)
                 + row_term.remainder_(p).mul_(_COLUMNS).remainder_(p)
                 + column_term.remainder_(p))
        total.add_(terms.sum())
    return int(total.item()) % p


def combine_checksums(parts: Iterable[int]) -> int:
    """The checksum of a model from the `checksum_part`s of its pieces."""
    return sum(parts) % CHECKSUM_MODULUS


def model_checksum(model: torch.Tensor) -> int:
    """The checksum of a flat float32 model (see the module): equal checksums at a version =
    identical replicas. Computed where `model` lives; the same value on any device."""
    return checksum_part(model, 0)
