"""The DoRA output combination as one autograd function.

With n the (constant) row norm of W0 + sBA and scale = m / n:

    y = result + (scale - 1) * base_d + scale * s * lora

where result = W0 x + b, base_d = W0 x_d (x_d = dropout(x)) and lora = B A x_d. Without dropout
x_d = x and this is y = scale * (W0 x + s B A x) + b.

Plain autograd would keep an extra batch x out activation alive for the magnitude's gradient.
Without dropout we keep the output itself instead (it usually outlives the layer anyway) and
recover W0 x + s B A x = (y - b) / scale in backward. An entry of m that is exactly zero then gets
a zero gradient, the only case where the output does not determine the product.
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


def _token_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the last, accumulated in float32."""
    return t.reshape(-1, t.shape[-1]).sum(dim=0, dtype=torch.float32)


def _token_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over tokens of a * b (per output feature), accumulated in float32, chunk by chunk."""
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    elements, upcast = _DOT_CHUNKING.get(a.device.type, _DOT_CHUNKING_DEFAULT)
    rows = max(1, elements // max(1, a.shape[1]))
    out = torch.zeros(a.shape[1], dtype=torch.float32, device=a.device)
    for start in range(0, a.shape[0], rows):
        a_rows, b_rows = a[start : start + rows], b[start : start + rows]
        if upcast:
            out += (a_rows.float() * b_rows.float()).sum(dim=0)
        else:
            out += torch.mul(a_rows, b_rows).sum(dim=0, dtype=torch.float32)
    return out


class DoraCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, lora, base_d, magnitude, inv_norm, bias, scaling):
        dtype = result.dtype
        ctx.lora_dtype = lora.dtype if lora is not None else None
        scale = (magnitude.float() * inv_norm).to(dtype)
        lora = lora.to(dtype) if lora is not None else None
        if base_d is None:
            # y = scale * (result - b + s * lora) + b, built in one buffer that becomes the output.
            y = torch.add(result, lora, alpha=scaling) if lora is not None else result.clone()
            if bias is not None:
                y.sub_(bias)
            y.mul_(scale)
            if bias is not None:
                y.add_(bias)
            ctx.save_for_backward(y, magnitude, inv_norm, bias)
        else:
            base_d = base_d.to(dtype)
            u = base_d if lora is None else torch.add(base_d, lora, alpha=scaling)
            y = torch.addcmul(result - base_d, u, scale)
            ctx.save_for_backward(u, magnitude, inv_norm, None)
        ctx.dropout = base_d is not None
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad):
        saved, magnitude, inv_norm, bias = ctx.saved_tensors
        scale32 = magnitude.float() * inv_norm
        grad_m = None
        if ctx.needs_input_grad[3]:
            if ctx.dropout:
                grad_m = _token_dot(grad, saved) * inv_norm
            else:
                # sum_t g * u / n with u = (y - b) / scale, i.e. (sum_t g * y - b * sum_t g) / m.
                gy = _token_dot(grad, saved)
                if bias is not None:
                    gy = gy - bias.float() * _token_sum(grad)
                m32 = magnitude.float()
                grad_m = torch.where(m32 != 0, gy / torch.where(m32 != 0, m32, 1.0), 0.0)
            grad_m = grad_m.to(magnitude.dtype)
        grad_lora = None
        if ctx.lora_dtype is not None and ctx.needs_input_grad[1]:
            grad_lora = (grad * (scale32 * ctx.scaling).to(grad.dtype)).to(ctx.lora_dtype)
        grad_result = grad_base_d = None
        if ctx.dropout:
            if ctx.needs_input_grad[0]:
                grad_result = grad
            if ctx.needs_input_grad[2]:
                grad_base_d = grad * (scale32 - 1).to(grad.dtype)
        elif ctx.needs_input_grad[0]:
            grad_result = grad * scale32.to(grad.dtype)
        return grad_result, grad_lora, grad_base_d, grad_m, None, None, None
