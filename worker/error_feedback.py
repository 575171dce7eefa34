"""Error feedback around a compressor, in update space. Pure tensor code, no network.

The compressors (which elements to send) live in worker/compressors.py.

Workers push updates already scaled by their learning rate: p = lr * g + e, push C(p),
keep e = p - C(p) (the SASG and DEF papers' form). The invariant after any number of
steps is sum(pushed) + e == sum(lr * g), up to float rounding.

Everything here stays on the device the residual was built for (the model's): the
residual, the selection, the wire-dtype rounding, the pushed indices and values. Only the
codec's encoders copy the selected indices and values to the host.
"""
from __future__ import annotations

import math
from decimal import Decimal

import torch

from wanps.proto.codec import Update
from wanps.worker.compressors import Compressor, make_compressor


def elements_for(delta: float, num_params: int) -> int:
    """How many elements a compression ratio delta sends: ceil(delta * d), at least 1."""
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    # Decimal: 0.07 * 100 is 7.000000000000001 in binary floating point; ceil must see 7.
    return min(num_params, max(1, math.ceil(Decimal(repr(float(delta))) * num_params)))


VALUE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def wire_value_dtype(value_dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype sparse values travel in, from its name or itself; anything else is refused."""
    if isinstance(value_dtype, str):
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        value_dtype = VALUE_DTYPES[value_dtype]
    if value_dtype not in VALUE_DTYPES.values():
        raise ValueError(f"value_dtype must be float32, float16 or bfloat16, got {value_dtype}")
    return value_dtype


def quantize(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values in the wire dtype, on their device; out-of-range magnitudes saturate instead
    of becoming inf (the server refuses inf, and error feedback keeps what the clamp cut off)."""
    if dtype == torch.float32:
        return values
    limit = torch.finfo(dtype).max
    return values.clamp(-limit, limit).to(dtype)


class ErrorFeedback:
    """Plain error feedback (EF) around a compressor (exact top-k by default).

    The residual buffer doubles as the working buffer for p = lr*g + e, so a step
    allocates only the selected indices and values. With float16/bfloat16 values the
    rounding error stays in the residual too: e = p - dequantized(sent), exactly.
    `device`: where the residual, the compressor's scratch and the selection live (the model's).
    """

    def __init__(self, num_params: int, compressor: Compressor | str = "topk",
                 value_dtype: str | torch.dtype = "float32", seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.residual = torch.zeros(num_params, dtype=torch.float32, device=self.device)
        self.compressor = (make_compressor(compressor, seed, device=self.device) if isinstance(compressor, str)
                           else compressor)
        self.value_dtype = wire_value_dtype(value_dtype)

    def compress(self, scaled_grad: torch.Tensor, delta: float, round_: int = 0) -> Update:
        """Take lr*g, return C(lr*g + e) to push; keep the rest as the new residual."""
        p = self.residual.add_(scaled_grad)  # p = lr*g + e, in place
        k = elements_for(delta, p.numel())
        # From half the elements on, dense is smaller on the wire (values only, no indices)
        # and sends more: use it (in float32, as before).
        if 2 * k >= p.numel():
            update = Update(values=p.clone(), indices=None)
            p.zero_()
            return update
        selection = self.compressor.select(p, k, round_)
        if selection.block_start is not None:
            start, stop = selection.block_start, selection.block_start + selection.count
            block = p[start:stop]  # a view: the residual is updated in place below
            values = quantize(block, self.value_dtype).clone()
            self._keep_rest(block, values)
            indices = torch.arange(start, stop, dtype=torch.int32, device=p.device)
            return Update(values=values, indices=indices, block_start=start)
        indices = selection.indices
        assert indices is not None
        selected = p.index_select(0, indices)
        values = quantize(selected, self.value_dtype)
        if self.value_dtype == torch.float32:
            p.index_fill_(0, indices, 0.0)  # e = p - C(p): what was sent leaves the residual exactly
        else:
            self._keep_rest(selected, values)
            p.index_copy_(0, indices, selected)
        return Update(values=values, indices=indices.to(torch.int32))

    def restore(self, update: Update) -> None:
        """Put an update the server did not apply back into the residual (e += update), so
        it goes out again in a later push and no gradient is lost."""
        values = update.values.to(device=self.residual.device, dtype=torch.float32)
        if update.indices is None:
            self.residual.add_(values)
        else:
            self.residual.index_add_(0, update.indices.to(device=self.residual.device, dtype=torch.long), values)

    @staticmethod
    def _keep_rest(selected: torch.Tensor, values: torch.Tensor) -> None:
        """selected -= float32(values), in place: what rounding (or saturation) lost stays.

        Exact: a float32 and its nearest float16/bfloat16 are within a factor 2 of each other,
        so their difference is representable (Sterbenz), and sent + residual == p bit for bit.
        """
        selected.sub_(values.to(torch.float32))
