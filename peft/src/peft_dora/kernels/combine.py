"""The DoRA output combination, LoRA's B product included, as one autograd function (the ``torch``
and ``cpu`` kernels' ``combine``).

With n the (constant) row norm of W0 + sBA, scale = m / n and h = A x_d (x_d = dropout(x)):

    y = result + (scale - 1) * (base_d - b) + scale * s * h B^T

where result = W0 x + b and base_d = W0 x_d + b, the base layer's output for the dropped-out input.
Without dropout x_d = x and this is
y = scale * (W0 x + s h B^T) + b, built without any new batch x out buffer: when the caller says
nobody else reads ``result`` (``in_place``; it is the base layer's fresh output), the B product is
added to it inside the matrix multiplication and it is scaled in place; otherwise a copy is.

Taking B in here is what keeps DoRA near LoRA's cost: the factors ``scale`` and ``s`` are folded
into the small out x r operands of the backward products (B for the gradient of h, the out x r
product for B's gradient) instead of into a batch x out gradient, so backward holds no batch x out
buffer at all when the input needs no gradient.

Plain autograd would also keep an extra batch x out activation alive for the magnitude's gradient.
Without dropout we keep the output itself instead (it usually outlives the layer anyway) and
recover W0 x + s h B^T = (y - b) / scale in backward. An entry of m that is exactly zero then gets
a zero gradient, the only case where the output does not determine the product.

The scale and the reductions are in the norm's dtype: float32, or float64 for a float64 model.
"""

from __future__ import annotations

import torch


# Elements of the batch x out operands multiplied at a time in the magnitude's gradient: the product
# never exists whole, so the backward pass holds no more batch x out buffers than LoRA's. On a CPU
# small cache-sized chunks are fastest; on a GPU every chunk costs kernel launches, so chunks are
# large there (the product, in the operands' dtype, is a bounded fraction of one activation).
# Per device type: (elements per chunk, whether to upcast the operands before multiplying).
_DOT_CHUNKING = {"cpu": (1 << 18, True)}
_DOT_CHUNKING_DEFAULT = (1 << 25, False)


def _token_sum(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sum over every dimension but the last, accumulated in ``dtype``."""
    return t.reshape(-1, t.shape[-1]).sum(dim=0, dtype=dtype)


def _token_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum over tokens of a * b (per output feature), accumulated in ``dtype``, chunk by chunk."""
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    elements, upcast = _DOT_CHUNKING.get(a.device.type, _DOT_CHUNKING_DEFAULT)
    rows = max(1, elements // max(1, a.shape[1]))
    out = None
    for start in range(0, a.shape[0], rows):
        a_rows, b_rows = a[start : start + rows], b[start : start + rows]
        if upcast:
            part = (a_rows.to(dtype) * b_rows.to(dtype)).sum(dim=0)
        else:
            part = torch.mul(a_rows, b_rows).sum(dim=0, dtype=dtype)
        out = part if out is None else out.add_(part)
    return out if out is not None else torch.zeros(a.shape[1], dtype=dtype, device=a.device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as a matrix with one row per token (a view when it can be)."""
    return t.reshape(-1, t.shape[-1])


class DoraCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, h, lora_B, base_d, magnitude, inv_norm, bias, scaling, in_place):
        dtype = result.dtype
        scale32 = magnitude.to(inv_norm.dtype) * inv_norm
        scale = scale32.to(dtype)
        if h is not None:
            h_rows, b_t = _rows(h).to(dtype), lora_B.to(dtype).t()
        # The base output is written over when the caller allows it (nothing else reads it).
        in_place = in_place and result.is_contiguous()
        y = result if in_place else result.clone(memory_format=torch.contiguous_format)
        if base_d is None:
            if h is not None:
                _rows(y).addmm_(h_rows, b_t, alpha=scaling)
            # scale * (y - b) + b, as scale * y + (1 - scale) * b.
            y.mul_(scale)
            if bias is not None:
                y.add_((bias.to(scale32.dtype) * (1 - scale32)).to(dtype))
            saved = y
        else:
            # u = W0 x_d + s h B^T, the term that the scale multiplies (also what m's gradient needs).
            base_d = base_d.to(dtype) if bias is None else base_d.to(dtype) - bias.to(dtype)
            u = base_d if h is None else torch.addmm(_rows(base_d), h_rows, b_t, alpha=scaling).view(base_d.shape)
            y.sub_(base_d).addcmul_(u, scale)
            saved = u
        if in_place:
            ctx.mark_dirty(result)
        ctx.save_for_backward(saved, h, lora_B, magnitude, inv_norm, bias)
        ctx.dropout = base_d is not None
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad):
        saved, h, lora_B, magnitude, inv_norm, bias = ctx.saved_tensors
        acc = inv_norm.dtype
        m32 = magnitude.to(acc)
        scale32 = m32 * inv_norm
        grad_m = None
        if ctx.needs_input_grad[4]:
            if ctx.dropout:
                grad_m = _token_dot(grad, saved, acc) * inv_norm
            else:
                # sum_t g * u / n with u = (y - b) / scale, i.e. (sum_t g * y - b * sum_t g) / m.
                gy = _token_dot(grad, saved, acc)
                if bias is not None:
                    gy = gy - bias.to(acc) * _token_sum(grad, acc)
                grad_m = gy / m32.masked_fill(m32 == 0, float("inf"))
            grad_m = grad_m.to(magnitude.dtype)
        grad_h = grad_lora_B = None
        if h is not None:
            # dL/d(h B^T) = grad * scale * s: the factor goes on the out x r side of each product.
            factor = (scale32 * ctx.scaling).unsqueeze(1)
            grad_rows = _rows(grad)
            if ctx.needs_input_grad[1]:
                b_scaled = (lora_B.to(acc) * factor).to(grad.dtype)
                grad_h = (grad_rows @ b_scaled).view(h.shape).to(h.dtype)
            if ctx.needs_input_grad[2]:
                product = grad_rows.t() @ _rows(h).to(grad.dtype)
                grad_lora_B = (product.to(acc) * factor).to(lora_B.dtype)
        grad_result = grad_base_d = None
        if ctx.dropout:
            if ctx.needs_input_grad[0]:
                grad_result = grad
            if ctx.needs_input_grad[3]:
                grad_base_d = grad * (scale32 - 1).to(grad.dtype)
        elif ctx.needs_input_grad[0]:
            grad_result = grad * scale32.to(grad.dtype)
        return grad_result, grad_h, grad_lora_B, grad_base_d, grad_m, None, None, None, None
