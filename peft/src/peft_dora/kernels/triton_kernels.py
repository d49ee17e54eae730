"""The Triton kernels behind the ``triton`` backend (``fused.py`` launches them).

Activations (base output, h, base_d, gradients) are read as rows with unit stride along features, as
the caller lays them out; W0, A and B with any strides. Products run
on tensor cores with operands in the compute dtype (bfloat16/float16; float32 in IEEE or TF32, as the
caller says) and float32 accumulators; every sum, the scale m / n and the final combination are float32.

- ``norm_partial_kernel`` and ``norm_finish_kernel``: one pass over W0, by blocks of rows and slices of
  columns (enough programs to fill the GPU, A re-read once per block): W0 A^T on tensor cores,
  ||W0||_row^2 from the same tiles, rowsum(B * W0 A^T) per slice; then the slices summed in a fixed
  order, the closed form ||W0||^2 + 2s rowsum(B * W0 A^T) + s^2 rowsum(B (A A^T) * B), root, inverse.
- ``combine_kernel``: one pass over the base output: y = scale (result + s h B^T) + (1 - scale) b, or
  with dropout y = result - (base_d - b) + scale (base_d - b + s h B^T), with scale = m / n in float32.
- ``combine_backward_kernel``: one pass over the output gradient g: g * scale (g * (scale - 1) with
  dropout) for the input's gradient, and per block of tokens the partial sums that m's gradient
  needs (sum_t g * v, sum_t g), written to a buffer that the caller sums in a fixed order.
"""

from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def norm_partial_kernel(
    w_ptr, a_ptr, b_ptr, sq_ptr, cross_ptr,
    out_features, in_features, rank, columns_per_split,
    stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """For one block of rows and one slice of W0's columns: ||W0||_row^2 and rowsum(B * W0 A^T) over it."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < out_features
    rank_ok = ranks < rank
    w_at = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = split * columns_per_split
    last = tl.minimum(first + columns_per_split, in_features)
    for k in range(first, last, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < last
        w = tl.load(w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w32 = w.to(tl.float32)
        sq += tl.sum(w32 * w32, axis=1)
        a_t = tl.load(a_ptr + cols[:, None] * stride_ak + ranks[None, :] * stride_ar,
                      mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        w_at = tl.dot(w, a_t.to(w.dtype), w_at, input_precision=PRECISION)
    b = tl.load(b_ptr + rows[:, None] * stride_bm + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
    tl.store(sq_ptr + split * out_features + rows, sq, mask=row_ok)
    tl.store(cross_ptr + split * out_features + rows, tl.sum(b * w_at, axis=1), mask=row_ok)


@triton.jit
def norm_finish_kernel(
    sq_ptr, cross_ptr, b_ptr, aat_ptr, norm_ptr, inv_ptr,
    out_features, rank, splits, scaling, stride_bm, stride_br,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """The slices' sums in a fixed order, the quadratic term rowsum(B (A A^T) * B), the root and its inverse."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < out_features
    rank_ok = ranks < rank
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for split in range(0, splits):
        sq += tl.load(sq_ptr + split * out_features + rows, mask=row_ok, other=0.0)
        cross += tl.load(cross_ptr + split * out_features + rows, mask=row_ok, other=0.0)
    b = tl.load(b_ptr + rows[:, None] * stride_bm + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
    aat = tl.load(aat_ptr + ranks[:, None] * rank + ranks[None, :], mask=rank_ok[:, None] & rank_ok[None, :], other=0.0)
    quad = tl.sum(tl.dot(b, aat, input_precision="ieee") * b, axis=1)
    norm = tl.sqrt(tl.maximum(sq + 2.0 * scaling * cross + scaling * scaling * quad, 0.0))
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    tl.store(inv_ptr + rows, 1.0 / tl.where(row_ok, norm, 1.0), mask=row_ok)  # no division for padding rows


@triton.jit
def _lora_tile(h_ptr, b_ptr, rows, cols, tokens, features, rank, stride_h, stride_bm, stride_br,
               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
               DTYPE: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """h B^T for a tile of tokens x features, float32."""
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in range(0, rank, BLOCK_R):
        ks = k + tl.arange(0, BLOCK_R)
        k_ok = ks < rank
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=(rows < tokens)[:, None] & k_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + cols[None, :] * stride_bm + ks[:, None] * stride_br,
                      mask=k_ok[:, None] & (cols < features)[None, :], other=0.0)
        acc = tl.dot(h.to(DTYPE), b_t.to(DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def combine_kernel(
    res_ptr, h_ptr, b_ptr, bd_ptr, m_ptr, inv_ptr, bias_ptr, y_ptr,
    tokens, features, rank, scaling,
    stride_res, stride_h, stride_bm, stride_br, stride_bd, stride_y,
    HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < features
    mask = (rows < tokens)[:, None] & col_ok[None, :]
    at = rows.to(tl.int64)[:, None]  # 64-bit offsets: tokens x features may pass 2**31
    scale = tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) * tl.load(inv_ptr + cols, mask=col_ok, other=0.0)
    scale = scale[None, :]
    y = tl.load(res_ptr + at * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lora = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        lora = scaling * _lora_tile(h_ptr, b_ptr, rows, cols, tokens, features, rank, stride_h, stride_bm, stride_br,
                                    BLOCK_T, BLOCK_N, BLOCK_R, y_ptr.dtype.element_ty, PRECISION)
    bias = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        base_d = tl.load(bd_ptr + at * stride_bd + cols[None, :], mask=mask, other=0.0).to(tl.float32) - bias
        y = y - base_d + scale * (base_d + lora)
    else:
        y = scale * (y + lora) + (1.0 - scale) * bias
    tl.store(y_ptr + at * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def combine_backward_kernel(
    g_ptr, v_ptr, h_ptr, b_ptr, m_ptr, inv_ptr, gin_ptr, part_gv_ptr, part_g_ptr,
    tokens, features, rank, scaling,
    stride_g, stride_v, stride_h, stride_bm, stride_br, stride_gin,
    HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_GRAD: tl.constexpr, MAGNITUDE_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """v is what m's gradient multiplies g by: the output y without dropout, base_d with it (to which
    s h B^T is added here); the caller subtracts the bias's share and divides."""
    pid_t = tl.program_id(0)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < features
    mask = (rows < tokens)[:, None] & col_ok[None, :]
    at = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + at * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if INPUT_GRAD:
        scale = tl.load(m_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) * tl.load(inv_ptr + cols, mask=col_ok, other=0.0)
        if DROPOUT:
            scale = scale - 1.0
        tl.store(gin_ptr + at * stride_gin + cols[None, :], (g * scale[None, :]).to(gin_ptr.dtype.element_ty),
                 mask=mask)
    if MAGNITUDE_GRAD:
        v = tl.load(v_ptr + at * stride_v + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if DROPOUT and HAS_LORA:
            v += scaling * _lora_tile(h_ptr, b_ptr, rows, cols, tokens, features, rank, stride_h, stride_bm, stride_br,
                                      BLOCK_T, BLOCK_N, BLOCK_R, g_ptr.dtype.element_ty, PRECISION)
        tl.store(part_gv_ptr + pid_t * features + cols, tl.sum(g * v, axis=0), mask=col_ok)
        if HAS_BIAS:
            tl.store(part_g_ptr + pid_t * features + cols, tl.sum(g, axis=0), mask=col_ok)


# Whether these kernels run in Triton's interpreter (numpy on the CPU): decided when they were defined.
INTERPRETED = type(combine_kernel).__name__ == "InterpretedFunction"
