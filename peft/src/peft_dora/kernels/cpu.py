"""The ``cpu`` kernels: the ``torch`` kernels with oneDNN's float32 products for DoRA's skinny products.

Two products have the rank r as one short side, and for these the BLAS behind ``torch.mm`` is slower
than oneDNN on the CPU measured (an AVX-512 EPYC, benchmarks/dora_layer.py; see ``onednn.py``):

- the norm's W0 A^T, the one product DoRA adds to LoRA's per-step work (1.2-1.7x faster);
- the down projection h = x A^T (1.1-1.4x faster), whose A gradient is then computed as (x^T g)^T
  instead of g^T x, the same sums in an order its BLAS ran 1.1-1.5x faster at two threads (0.9-1.2x
  at one). A layer's step gained 1-2%.

Each is chosen per call: float32 operands, a product large enough (``onednn.worthwhile``), a working
oneDNN; anything else (other dtypes, autocast, a strided input, a ``lora_A`` with hooks, which must
run as a module) goes the ``torch`` kernels' way. Same arithmetic either way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from ..norm import weight_times_at
from . import onednn
from .reference import TorchKernels


class _DownProduct(torch.autograd.Function):
    """h = x A^T with oneDNN's forward and A's gradient as (x^T g)^T."""

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


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) besides its forward."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    shared = (module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks,
              module_hooks._global_backward_hooks, module_hooks._global_backward_pre_hooks)  # fmt: skip
    return any(len(hooks) > 0 for hooks in own + shared)


class CpuKernels(TorchKernels):
    name = "cpu"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None if device.type == "cpu" else "these kernels are for CPU tensors"

    def times_at(self, weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        if not onednn.worthwhile(a, rows * cols * a.shape[0]):
            return weight_times_at(weight, a)
        packed = onednn.pack(a)  # once, for every chunk of W0
        return weight_times_at(
            weight, a, lambda w: onednn.times_packed(w, packed) if w.is_contiguous() else w @ a.t()
        )

    def down(self, lora_A: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        weight = lora_A.weight
        if (
            lora_A.bias is None
            and x.dtype == weight.dtype
            and x.is_contiguous()
            and not torch.is_autocast_enabled(x.device.type)
            and not _has_hooks(lora_A)
            and onednn.worthwhile(x, x.numel() * weight.shape[0])
        ):
            return _DownProduct.apply(x, weight)
        return lora_A(x)


KERNELS = CpuKernels()
