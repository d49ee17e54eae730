"""Row norms of W0 + s * B @ A without building the out x in matrix.

||W0 + sBA||_row^2 = ||W0||_row^2 + 2s * rowsum(B * (W0 A^T)) + s^2 * rowsum((B (A A^T)) * B)
                   = ||W0||_row^2 + 2s * rowsum(B * (W0 A^T + (s/2) B (A A^T)))

The largest temporaries are out x r and r x r. Everything is accumulated in float32 whatever the
dtype of W0, because the norm divides the magnitude and its rounding error is felt by every output;
in float64 when W0 or the adapter is float64, whose users expect float64's accuracy.
"""

from __future__ import annotations

from typing import Callable

import torch

# W0 rows (in A's dtype) times A^T.
Product = Callable[[torch.Tensor], torch.Tensor]

# Rows of a low-precision W0 converted to float32 at a time: bounds the temporary to ~16 MiB.
_CHUNK_ELEMENTS = 1 << 22


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, float32 otherwise (the norm's and DoRA scale's dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_chunks(weight: torch.Tensor, dtype: torch.dtype):
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        yield weight[start : start + rows].to(dtype)


@torch.no_grad()
def row_sq_norm(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Squared L2 norm of each row of ``weight`` (out x in), detached, in ``dtype``
    (default: ``accumulation_dtype(weight)``)."""
    dtype = dtype or accumulation_dtype(weight)
    if weight.dtype == dtype:
        return torch.linalg.vector_norm(weight, dim=1).square()
    return torch.cat([torch.linalg.vector_norm(chunk, dim=1).square() for chunk in _row_chunks(weight, dtype)])


def weight_times_at(weight: torch.Tensor, a: torch.Tensor, times: Product | None = None) -> torch.Tensor:
    """W0 @ A^T (out x r) in A's dtype (float32 or float64); W0 in row chunks unless already in it.

    ``times(rows)`` multiplies a contiguous or strided block of W0's rows, already in A's dtype, by A^T
    (default: a plain matmul); a backend passes its own (the CPU's oneDNN product, ``kernels/cpu.py``).
    """
    times = times or (lambda w: w @ a.t())
    if weight.dtype == a.dtype:
        return times(weight)
    return torch.cat([times(chunk) for chunk in _row_chunks(weight, a.dtype)])


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_sq_norm: torch.Tensor | None = None,
    times_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = weight_times_at,
) -> torch.Tensor:
    """Row norms of ``weight + scaling * lora_B @ lora_A`` (detached, in ``accumulation_dtype``).

    ``weight`` is W0 as out x in; ``weight_sq_norm`` may pass the constant ||W0||_row^2 (in that dtype);
    ``times_at(weight, a)`` computes W0 A^T in a's dtype (``weight_times_at`` by default).
    """
    dtype = accumulation_dtype(weight, lora_A, lora_B)
    if weight_sq_norm is None:
        weight_sq_norm = row_sq_norm(weight, dtype)
    a = lora_A.to(dtype)
    b = lora_B.to(dtype)
    # Both terms as one row dot with B: rowsum(B * (W0 A^T + (s/2) B A A^T)) = cross + (s/2) quad,
    # with one out x r temporary, written in place.
    terms = times_at(weight, a).addmm_(b, a @ a.t(), alpha=scaling / 2)
    sq = torch.add(weight_sq_norm, torch.linalg.vecdot(b, terms), alpha=2.0 * scaling)
    return sq.clamp_min_(0.0).sqrt_()
