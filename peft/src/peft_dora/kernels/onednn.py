"""oneDNN's float32 linear for DoRA's skinny products on a CPU, where it beats torch.mm's BLAS.

DoRA's own products have one short side, the rank r (W0 A^T for the norm, x A^T for the adapter's
down projection). For these shapes the BLAS behind ``torch.mm`` ran at 50-75% of the measured CPU's
float32 peak and oneDNN's linear near it (an AVX-512 EPYC, benchmarks/dora_layer.py), with the same
float32 arithmetic. Everything here is a CPU float32 detail: callers fall back to plain matmuls on a
GPU, for other dtypes, for small products and where oneDNN is missing or wrong (``works``).
"""

from __future__ import annotations

import torch

# Whether oneDNN's linear runs here and agrees with torch.mm; probed on first use (None: not yet).
_ONEDNN: bool | None = None
# Below this many multiply-adds oneDNN's fixed cost per call (packing, dispatch) outweighs its speed:
# a 128 x 128 x 8 product took 32 us against torch.mm's 10, 512 x 512 x 16 was even, and from
# 1024 x 1024 x 64 on oneDNN was faster (two threads).
_ONEDNN_MIN_MACS = 1 << 25


def works() -> bool:
    """Probe once, on a tiny product, that oneDNN's float32 linear exists and is right on this build."""
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if torch.backends.mkldnn.is_available():
            try:
                w = torch.arange(128, dtype=torch.float32).reshape(8, 16).sin()  # no draw from the global RNG
                a = torch.arange(48, dtype=torch.float32).reshape(3, 16).cos()
                _ONEDNN = bool(torch.allclose(times_packed(w, pack(a)), w @ a.t(), atol=1e-5))
            except (AttributeError, RuntimeError):
                pass
    return _ONEDNN


def worthwhile(t: torch.Tensor, macs: int) -> bool:
    """Whether a product of ``macs`` multiply-adds on ``t``'s device and dtype should go to oneDNN."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and macs >= _ONEDNN_MIN_MACS and works()


def pack(a: torch.Tensor) -> torch.Tensor:
    """The right-hand factor A (r x in, float32) in oneDNN's format, for ``times_packed``."""
    return a.contiguous().to_mkldnn()


def times_packed(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ A^T for a contiguous float32 x (rows x in) and A packed by ``pack``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
