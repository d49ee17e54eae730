"""Helpers shared by the DoRA layer's test files."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomise(model: nn.Module, scale: float = 0.3, seed: int | None = None) -> None:
    """Give A, B and m random values so that every term of the DoRA formula matters.

    A and B become ``scale`` times standard normal; m is multiplied by a factor in [1, 1.5). With ``seed``
    the values are drawn in float32 from their own generator, else in the parameter's dtype from torch's
    global one.
    """
    gen = None if seed is None else torch.Generator().manual_seed(seed)

    def draw(sample, p: torch.Tensor) -> torch.Tensor:
        return sample(p.shape, generator=gen) if gen is not None else sample(p.shape, dtype=p.dtype)

    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.copy_(scale * draw(torch.randn, p))
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.5 * draw(torch.rand, p))
