"""The ``triton`` kernels: DoRA's norm and output combination fused, as ``torch.library`` custom ops.

Three custom ops (``peft_dora::weight_norm``, ``peft_dora::combine``, ``peft_dora::combine_backward``)
launch the kernels of ``triton_kernels.py``; each has a fake implementation (shapes and dtypes only)
and ``combine`` has its autograd formula registered, so ``torch.compile(fullgraph=True)`` traces a
layer through them as opaque nodes. Eager code calls the same implementations through an
``autograd.Function`` instead: a custom op's dispatch costs ~3x a Function's on the host, per call.
What each saves over the ``torch`` kernels:

- the norm reads W0 once (no float32 copy of a bfloat16 W0, ||W0||^2 from the same tiles) and runs
  W0 A^T on tensor cores in W0's dtype (A rounded to it) with float32 sums; m / n is formed in the
  combination's kernels, where m meets n;
- the forward writes y in one pass over the base output, B's product computed tile by tile inside
  it, and applies m / n in float32 (the ``torch`` kernels and upstream round it to the activations'
  dtype first: in bfloat16 a scale within ~0.2% of 1 becomes exactly 1);
- the backward reads the output gradient once for the input's gradient and m's gradient (per-block
  partial sums, summed in a fixed order: deterministic). The gradients of h and B stay two cuBLAS
  products with the factor m / n * s on their small out x r operands, as in ``combine.py``.

The combination is out of place: a custom op may not return an alias of its input.
Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
the kernels are first used; its bfloat16 ``tl.dot`` is wrong, so bfloat16 is refused there).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .reference import TorchKernels

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tile sizes, to be tuned on a GPU. The combination: tokens x features per program (the B product's rank
# in chunks of at most 64, ``_rank_block``).
_COMBINE_TOKENS, _COMBINE_FEATURES, _COMBINE_WARPS = 64, 128, 8
# The norm: W0 rows per program, columns per step (its float32 W0 A^T tile is rows x padded rank).
_NORM_ROWS, _NORM_COLUMNS, _NORM_WARPS, _NORM_STAGES = 64, 64, 4, 3


def _kernels():
    from . import triton_kernels

    return triton_kernels


def _padded(n: int) -> int:
    """The next power of two, at least 16 (tl.dot's least size)."""
    return max(16, 1 << max(0, n - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 operands as torch.matmul would take them (TF32 only if allowed)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_options(warps: int, stages: int | None = None) -> dict:
    if _kernels().INTERPRETED:
        return {}
    return {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows(t: Tensor) -> Tensor:
    """The tensor as a matrix with one row per token and unit stride along features."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter's CPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _norm_splits(out_features: int, in_features: int, device: torch.device) -> int:
    """Slices of W0's columns, so that about two programs per multiprocessor share the norm's pass over W0
    (each slice at least four column blocks long)."""
    blocks = _cdiv(out_features, _NORM_ROWS)
    most = max(1, in_features // (4 * _NORM_COLUMNS))
    return max(1, min(most, _cdiv(2 * _processors(device), blocks)))


def _norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """(||W0 + sBA||_row, its reciprocal) in float32; W0 out x in (any strides), A r x in, B out x r."""
    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    a32 = lora_A.float()
    aat = (a32 @ a32.t()).contiguous()
    block_r = _padded(rank)
    splits = _norm_splits(out_features, in_features, weight.device)
    columns = _cdiv(_cdiv(in_features, splits), _NORM_COLUMNS) * _NORM_COLUMNS
    splits = _cdiv(in_features, columns)
    sq = torch.empty(splits, out_features, dtype=torch.float32, device=weight.device)
    cross = torch.empty_like(sq)
    kernels = _kernels()
    warps = _NORM_WARPS if block_r <= 64 else 2 * _NORM_WARPS  # float32 tiles of rows x padded rank
    kernels.norm_partial_kernel[(_cdiv(out_features, _NORM_ROWS), splits)](
        weight, lora_A, lora_B, sq, cross,
        out_features, in_features, rank, columns,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        BLOCK_M=_NORM_ROWS, BLOCK_K=_NORM_COLUMNS, BLOCK_R=block_r, PRECISION=_precision(weight.dtype),
        **_launch_options(warps, _NORM_STAGES),
    )  # fmt: skip
    norm = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    inv = torch.empty_like(norm)
    kernels.norm_finish_kernel[(_cdiv(out_features, _NORM_ROWS),)](
        sq, cross, lora_B, aat, norm, inv, out_features, rank, splits, float(scaling), lora_B.stride(0),
        lora_B.stride(1), BLOCK_M=_NORM_ROWS, BLOCK_R=block_r, **_launch_options(warps),
    )  # fmt: skip
    return norm, inv


def _combine_grid(tokens: int, features: int) -> tuple[int, int]:
    return (_cdiv(tokens, _COMBINE_TOKENS), _cdiv(features, _COMBINE_FEATURES))


def _rank_block(h: Optional[Tensor]) -> tuple[int, int]:
    """(rank, rank chunk per tl.dot) of the B product; (0, 16) without one."""
    rank = 0 if h is None else h.shape[-1]
    return rank, min(64, _padded(rank))


def _combine(
    result: Tensor,
    h: Optional[Tensor],
    lora_B: Optional[Tensor],
    base_d: Optional[Tensor],
    magnitude: Tensor,
    inv_norm: Tensor,
    bias: Optional[Tensor],
    scaling: float,
) -> Tensor:
    """The DoRA output (``combine.py``'s formula, base_d including the bias), in result's dtype."""
    res = _rows(result)
    tokens, features = res.shape
    y = torch.empty_like(result, memory_format=torch.contiguous_format)
    h_rows = _rows(h) if h is not None else res
    bd_rows = _rows(base_d) if base_d is not None else res
    b = lora_B if lora_B is not None else res
    rank, block_r = _rank_block(h)
    _kernels().combine_kernel[_combine_grid(tokens, features)](
        res, h_rows, b, bd_rows, magnitude, inv_norm, bias if bias is not None else magnitude, y,
        tokens, features, rank, float(scaling),
        res.stride(0), h_rows.stride(0), b.stride(0), b.stride(1), bd_rows.stride(0), features,
        HAS_LORA=h is not None, DROPOUT=base_d is not None, HAS_BIAS=bias is not None,
        BLOCK_T=_COMBINE_TOKENS, BLOCK_N=_COMBINE_FEATURES, BLOCK_R=block_r, PRECISION=_precision(result.dtype),
        **_launch_options(_COMBINE_WARPS),
    )  # fmt: skip
    return y


def _combine_backward(
    grad: Tensor,
    saved: Tensor,
    h: Optional[Tensor],
    lora_B: Optional[Tensor],
    magnitude: Tensor,
    inv_norm: Tensor,
    bias: Optional[Tensor],
    scaling: float,
    dropout: bool,
    input_grad: bool,
    magnitude_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(the gradient of result, or of base_d with dropout; m's gradient in float32), each empty unless asked for.

    ``saved`` is the output y without dropout and base_d with it.
    """
    g = _rows(grad)
    tokens, features = g.shape
    v = _rows(saved)
    h_rows = _rows(h) if h is not None else g
    b = lora_B if lora_B is not None else g
    grad_input = torch.empty_like(grad, memory_format=torch.contiguous_format) if input_grad else g.new_empty(0)
    blocks = _cdiv(tokens, _COMBINE_TOKENS)
    part_gv = torch.empty(blocks, features, dtype=torch.float32, device=g.device)
    part_g = torch.empty_like(part_gv) if bias is not None else part_gv
    rank, block_r = _rank_block(h)
    _kernels().combine_backward_kernel[_combine_grid(tokens, features)](
        g, v, h_rows, b, magnitude, inv_norm, grad_input, part_gv, part_g,
        tokens, features, rank, float(scaling),
        g.stride(0), v.stride(0), h_rows.stride(0), b.stride(0), b.stride(1), features,
        HAS_LORA=h is not None, DROPOUT=dropout, HAS_BIAS=bias is not None,
        INPUT_GRAD=input_grad, MAGNITUDE_GRAD=magnitude_grad,
        BLOCK_T=_COMBINE_TOKENS, BLOCK_N=_COMBINE_FEATURES, BLOCK_R=block_r, PRECISION=_precision(grad.dtype),
        **_launch_options(_COMBINE_WARPS),
    )  # fmt: skip
    if not magnitude_grad:
        return grad_input, part_gv.new_empty(0)
    gv = part_gv.sum(dim=0)
    if bias is not None:
        gv = gv - bias.float() * part_g.sum(dim=0)
    if dropout:
        return grad_input, gv * inv_norm
    # sum_t g * (y - b) / scale / n = (sum_t g y - b sum_t g) / m; an entry of m that is exactly 0 gets 0.
    m32 = magnitude.float()
    return grad_input, gv / m32.masked_fill(m32 == 0, float("inf"))


def _gradients(ctx, grad: Tensor, partial_sums: Callable) -> tuple:
    """The combination's input gradients: ``partial_sums`` (the custom op, or its implementation in eager
    code) for the input's and m's, two products for h's and B's."""
    saved, h, lora_B, magnitude, inv_norm, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    input_index = 3 if ctx.dropout else 0
    grad_input, grad_m = partial_sums(
        grad, saved, h, lora_B, magnitude, inv_norm, bias, ctx.scaling, ctx.dropout, needs[input_index], needs[4]
    )
    grad_result = grad_base_d = grad_h = grad_lora_B = None
    if ctx.dropout:
        grad_result = grad if needs[0] else None
        grad_base_d = grad_input if needs[3] else None
    elif needs[0]:
        grad_result = grad_input
    if h is not None and (needs[1] or needs[2]):
        # dL/d(h B^T) = grad * scale * s: the factor goes on the out x r side of each product.
        factor = (magnitude.float() * inv_norm * ctx.scaling).unsqueeze(1)
        grad_rows = grad.reshape(-1, grad.shape[-1])
        if needs[1]:
            grad_h = (grad_rows @ (lora_B.float() * factor).to(grad.dtype)).view(h.shape).to(h.dtype)
        if needs[2]:
            product = grad_rows.t() @ h.reshape(-1, h.shape[-1]).to(grad.dtype)
            grad_lora_B = (product.float() * factor).to(lora_B.dtype)
    grad_magnitude = grad_m.to(magnitude.dtype) if needs[4] else None
    return grad_result, grad_h, grad_lora_B, grad_base_d, grad_magnitude, None, None, None


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    result, h, lora_B, base_d, magnitude, inv_norm, bias, scaling = inputs
    ctx.dropout = base_d is not None
    ctx.scaling = scaling
    ctx.save_for_backward(base_d if ctx.dropout else output, h, lora_B, magnitude, inv_norm, bias)


class _FusedCombine(torch.autograd.Function):
    """The combination in eager code: the custom ops' implementations without their dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _combine(*inputs)
        _save(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad):
        return _gradients(ctx, grad, _combine_backward)


weight_norm_op = torch.library.custom_op("peft_dora::weight_norm", _norm, mutates_args=())
combine_op = torch.library.custom_op("peft_dora::combine", _combine, mutates_args=())
combine_backward_op = torch.library.custom_op("peft_dora::combine_backward", _combine_backward, mutates_args=())


@weight_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling):
    norm = weight.new_empty(weight.shape[0], dtype=torch.float32)
    return norm, torch.empty_like(norm)


@combine_op.register_fake
def _(result, h, lora_B, base_d, magnitude, inv_norm, bias, scaling):
    return torch.empty_like(result, memory_format=torch.contiguous_format)


@combine_backward_op.register_fake
def _(grad, saved, h, lora_B, magnitude, inv_norm, bias, scaling, dropout, input_grad, magnitude_grad):
    grad_input = torch.empty_like(grad, memory_format=torch.contiguous_format) if input_grad else grad.new_empty(0)
    grad_m = magnitude.new_empty(magnitude.shape if magnitude_grad else (0,), dtype=torch.float32)
    return grad_input, grad_m


combine_op.register_autograd(lambda ctx, grad: _gradients(ctx, grad, combine_backward_op), setup_context=_save)


class TritonKernels(TorchKernels):
    """The backend interface (``kernels/__init__.py``) over the fused ops; the down projection is cuBLAS's."""

    name = "triton"
    reuses_weight_sq_norm = False

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if dtype not in _DTYPES:
            return f"the fused kernels take {', '.join(str(d) for d in _DTYPES)}"
        interpreted = _kernels().INTERPRETED
        if device.type == "cpu" and not interpreted:
            return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before the first use"
        if device.type not in ("cpu", "cuda"):
            return "the fused kernels run on CUDA GPUs (or a CPU under Triton's interpreter)"
        if interpreted and dtype == torch.bfloat16:
            return "Triton's interpreter computes bfloat16 tl.dot wrongly; use float32 or float16 there"
        return None

    def weight_norm(self, weight, lora_A, lora_B, scaling, weight_sq_norm=None):
        norm = weight_norm_op if torch.compiler.is_compiling() else _norm
        return norm(weight, lora_A, lora_B, float(scaling))

    def down(self, lora_A: nn.Linear, x: Tensor) -> Tensor:
        return lora_A(x)

    def combine(self, result, h, lora_B, base_d, magnitude, inv_norm, bias, scaling, in_place):
        if torch.compiler.is_compiling():
            return combine_op(result, h, lora_B, base_d, magnitude, inv_norm, bias, float(scaling))
        return _FusedCombine.apply(result, h, lora_B, base_d, magnitude, inv_norm, bias, float(scaling))


KERNELS = TritonKernels()
