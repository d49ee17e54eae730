"""bitsandbytes base layers (``Linear4bit``, ``Linear8bitLt``): their W0 read out, and written back.

Both are ``nn.Linear`` subclasses whose ``weight`` holds codes, not W0, so DoRA's norm reads W0 here,
through bitsandbytes' own dequantization, and a merge writes a requantized weight back here. Two
states of these layers change what their weight means, and both are read as the forward would:

- 4-bit, on a CPU with AVX512-BF16: the first no-grad forward in eval mode repacks the codes in
  place into a CPU layout with bfloat16 block scales (``quant_state.packing_format_for_cpu``);
  read as the plain layout those bytes are scrambled values. They are unpacked first, and the
  bfloat16 scales that forward multiplies by are used.
- 8-bit: the row scales (``SCB``) sit on the weight until the first forward moves them, with the
  codes, to the layer's ``state``; a weight re-assigned without them has no scale at all, which is
  refused. Writing a weight back therefore hands over codes and scales together (``install``).

bitsandbytes is imported only when such a layer is met.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Kind = Literal["4bit", "8bit"]


def kind(layer: nn.Module) -> Kind | None:
    """Which bitsandbytes format ``layer.weight`` holds, None for a plain floating-point weight."""
    weight = getattr(layer, "weight", None)
    name = type(weight).__name__
    if name == "Params4bit":
        return "4bit"
    if name == "Int8Params" and weight.dtype == torch.int8:
        return "8bit"  # an Int8Params with has_fp16_weights=True holds W0 itself
    return None


def _name(layer: nn.Module) -> str:
    return type(layer).__name__


def _int8_codes_and_scales(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 codes and row scales the layer's next forward multiplies by."""
    weight, state = layer.weight, layer.state
    if getattr(weight, "SCB", None) is not None:
        return weight.data, weight.SCB  # the forward moves both to ``state`` first
    if state.SCB is not None:
        return (state.CB if state.CB is not None else weight.data), state.SCB
    raise RuntimeError(
        f"{_name(layer)}: its int8 weight has no row scales (SCB) on the weight nor in its state, so W0 "
        "cannot be read: the weight was re-assigned without them. Assign a weight quantized by "
        "bnb.nn.Int8Params(float_weight_on_cpu, has_fp16_weights=False).to(device), which carries both."
    )


def _dequantize_cpu_packed(weight: torch.Tensor, state) -> torch.Tensor:
    """W0 (float32) from the 4-bit AVX512-BF16 CPU layout: codes unpacked to the plain layout,
    scaled by the bfloat16 block scales (stored one column per row) that its forward uses."""
    import bitsandbytes.functional as F

    codes, _ = F._convert_weight_packed_for_cpu_inverse(weight, copy.deepcopy(state))
    plain = F.QuantState(
        absmax=state.absmax.t().reshape(-1).float(),
        shape=state.shape,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=torch.float32,
    )
    return F.dequantize_4bit(codes, plain)


def dequantize(layer: nn.Module, kept: QuantizedWeight | None = None) -> torch.Tensor:
    """W0 (out x in) of a bitsandbytes layer, as its forward multiplies by it: 4-bit in the dtype it was
    quantized from (float32 from the CPU layout), 8-bit in float32. A fresh tensor each call.
    With ``kept`` (from ``current``), the weight the layer held then, in the layer's format."""
    import bitsandbytes.functional as F

    if kind(layer) == "8bit":
        codes_and_scales = (kept.param.data, kept.scales) if kept is not None else _int8_codes_and_scales(layer)
        return F.int8_vectorwise_dequant(*codes_and_scales)
    weight = layer.weight if kept is None else kept.param
    state = weight.quant_state
    if state is None:
        raise RuntimeError(f"{_name(layer)}: its 4-bit weight has no quant_state (never quantized, or it was lost).")
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(weight.data, state)
    return F.dequantize_4bit(weight.data, state)


@dataclass
class QuantizedWeight:
    """A quantized weight with everything needed to put it back: 8-bit codes need their row scales."""

    param: nn.Parameter
    scales: torch.Tensor | None = None


def current(layer: nn.Module) -> QuantizedWeight:
    """The layer's weight as it stands, to be put back later with ``install``."""
    if kind(layer) == "8bit":
        return QuantizedWeight(layer.weight, _int8_codes_and_scales(layer)[1])
    return QuantizedWeight(layer.weight)


def quantize_like(layer: nn.Module, weight: torch.Tensor) -> QuantizedWeight:
    """``weight`` (out x in, floating point) quantized in the layer's format and settings."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    old = layer.weight
    if kind(layer) == "8bit":
        codes, scales, _ = F.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        return QuantizedWeight(bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False), scales)
    state = old.quant_state
    packed = getattr(state, "packing_format_for_cpu", False)
    dtype = state.original_dtype if packed else state.dtype  # the packed layout's own dtype is bfloat16
    codes, new_state = F.quantize_4bit(
        weight.to(dtype).contiguous(),
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
    )
    param = bnb.nn.Params4bit(
        codes,
        requires_grad=False,
        quant_state=new_state,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=layer,
        bnb_quantized=True,
    )
    return QuantizedWeight(param)


def install(layer: nn.Module, weight: QuantizedWeight) -> None:
    """Make ``weight`` the layer's weight, with its quantization state where the forward looks for it."""
    layer.weight = weight.param
    if kind(layer) == "8bit":
        # The forward takes codes and scales from the weight while ``weight.CB`` is set, else from the
        # state, which still holds the old ones: clear it and put both on the weight.
        layer.state.reset_grads()
        weight.param.CB = weight.param.data
        weight.param.SCB = weight.scales
    else:
        layer.quant_state = weight.param.quant_state
