"""The adapter's down projection h = x A^T (PEFT's ``lora_A``), with the CPU's faster products.

Same maths as ``nn.Linear`` without bias; only the kernels differ, and only on a CPU in float32 for
products large enough (``onednn.worthwhile``): the forward runs through oneDNN (1.1-1.4x faster than
``torch.mm`` on the CPU of benchmarks/dora_layer.py), and A's gradient is computed as (x^T g)^T
instead of g^T x, the same sums in an order its BLAS ran 1.1-1.5x faster at two threads (0.9-1.2x at
one). A layer's step gained 1-2%. Everywhere else, and under autocast, it is ``nn.Linear``'s forward.
"""

from __future__ import annotations

import torch
from torch import nn

from . import onednn


class _DownProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = onednn.times_packed(x.view(-1, x.shape[-1]), onednn.pack(weight))
        ctx.save_for_backward(x, weight)
        return h.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            # A transposed view: autograd lays it out like A when it stores the gradient.
            grad_weight = (x.view(-1, x.shape[-1]).t() @ grad_rows).t()
        return grad_x, grad_weight


class DownLinear(nn.Linear):
    """``lora_A`` of this project's DoRA layers (PEFT builds an ``nn.Linear``; its class is swapped)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            self.bias is None
            and x.dtype == weight.dtype
            and x.is_contiguous()
            and not torch.is_autocast_enabled(x.device.type)
            and onednn.worthwhile(x, x.numel() * weight.shape[0])
        ):
            return _DownProduct.apply(x, weight)
        return super().forward(x)
