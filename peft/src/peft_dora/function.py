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


def _token_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the last, accumulated in float32."""
    return t.reshape(-1, t.shape[-1]).sum(dim=0, dtype=torch.float32)


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
        scale = scale32.to(grad.dtype)
        grad_scaled = grad * scale
        grad_lora = None
        if ctx.lora_dtype is not None:
            grad_lora = (grad_scaled * ctx.scaling).to(ctx.lora_dtype)
        grad_m = None
        if ctx.needs_input_grad[3]:
            if ctx.dropout:
                grad_m = _token_sum(grad * saved) * inv_norm
            else:
                # sum_t g * u / n with u = (y - b) / scale, i.e. (sum_t g * y - b * sum_t g) / m.
                gy = _token_sum(grad * saved)
                if bias is not None:
                    gy = gy - bias.float() * _token_sum(grad)
                m32 = magnitude.float()
                grad_m = torch.where(m32 != 0, gy / torch.where(m32 != 0, m32, 1.0), 0.0)
            grad_m = grad_m.to(magnitude.dtype)
        if ctx.dropout:
            grad_result = grad
            grad_base_d = grad_scaled - grad
        else:
            grad_result = grad_scaled
            grad_base_d = None
        return grad_result, grad_lora, grad_base_d, grad_m, None, None, None
