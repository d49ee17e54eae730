"""The ``torch`` kernels: DoRA in plain PyTorch operators, for any device and dtype.

The reference the other backends are tested against, and the default on GPUs until the fused
kernels have been measured there. The norm is the closed form of ``norm.py`` (float32, or float64
for float64 weights), the down projection is ``lora_A`` called as the module it is, and the
combination is ``combine.DoraCombine``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..norm import dora_weight_norm, weight_times_at
from .combine import DoraCombine


class TorchKernels:
    """The backend interface (see ``kernels/__init__.py``), in PyTorch operators."""

    name = "torch"
    # Whether ``weight_norm`` wants the constant ||W0||_row^2 passed in (the layer caches it): a fused
    # norm that reads W0 anyway gets it for free and ignores it.
    reuses_weight_sq_norm = True

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run on ``device`` in ``dtype``, None when it can."""
        return None

    def times_at(self, weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """W0 A^T in A's dtype, the norm's one product over W0."""
        return weight_times_at(weight, a)

    def weight_norm(
        self,
        weight: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        weight_sq_norm: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(||W0 + sBA||_row, its reciprocal), detached, in the accumulation dtype."""
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq_norm=weight_sq_norm, times_at=self.times_at)
        return norm, norm.reciprocal()

    def down(self, lora_A: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """h = x A^T, through the module itself (so that its hooks, e.g. ZeRO-3's, run)."""
        return lora_A(x)

    def combine(
        self,
        result: torch.Tensor,
        h: torch.Tensor | None,
        lora_B: torch.Tensor | None,
        base_d: torch.Tensor | None,
        magnitude: torch.Tensor,
        inv_norm: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        in_place: bool,
    ) -> torch.Tensor:
        """The DoRA output (see ``combine.py``); ``in_place``: ``result`` may be written over."""
        return DoraCombine.apply(result, h, lora_B, base_d, magnitude, inv_norm, bias, scaling, in_place)


KERNELS = TorchKernels()
