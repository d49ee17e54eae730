"""The one seam for device-specific DoRA kernels: the layer asks ``select(device, dtype)`` for a backend.

A backend supplies the three computations whose speed depends on the device, each with the same
maths as the reference:

- ``weight_norm``: ||W0 + sBA||_row (and its reciprocal), the closed form of ``norm.py``;
- ``down``: the adapter's down projection h = x_d A^T (``lora_A`` stays a plain ``nn.Linear``);
- ``combine``: the DoRA output from the base output, h, B, m and the norm, with its backward.

Backends (``NAMES``):

- ``torch``: plain PyTorch operators, any device and dtype (the reference, and the GPU default);
- ``cpu``: ``torch`` plus oneDNN's float32 products on a CPU (the CPU default; the products that
  have float32 operands, e.g. float32 adapters over a bfloat16 base, take oneDNN's kernels);
- ``triton``: fused Triton kernels registered as ``torch.library`` custom ops (CUDA GPUs, or a CPU
  under Triton's interpreter); opt-in until it has been measured on a GPU.

``PEFT_DORA_KERNELS=torch|cpu|triton`` forces one for every forward and backward pass (``auto`` or
unset: the defaults above). A forced backend that cannot run on a layer's device and dtype raises
``KernelsUnavailable``: it never falls back silently. Initialisation and merging compute the norm
once, where accuracy counts, and always use the device's default (``default_kernels``).
"""

from __future__ import annotations

import importlib
import os

import torch

ENV = "PEFT_DORA_KERNELS"
NAMES = ("torch", "cpu", "triton")
_MODULES = {"torch": "reference", "cpu": "cpu", "triton": "fused"}
_LOADED: dict = {}


class KernelsUnavailable(RuntimeError):
    """A backend was asked for where it cannot run."""


def backend(name: str):
    """The backend called ``name`` (its module is imported on first use: Triton only when asked for)."""
    if name not in _MODULES:
        raise ValueError(f"{ENV}: unknown DoRA kernels {name!r}; choose one of {', '.join(NAMES)} or auto.")
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}").KERNELS
    return _LOADED[name]


def default_name(device: torch.device, dtype: torch.dtype) -> str:
    """The backend used unless one is forced: ``cpu`` on a CPU, ``torch`` elsewhere, whatever the dtype
    (the fused ``triton`` kernels stay opt-in until measured on a GPU)."""
    return "cpu" if device.type == "cpu" else "torch"


def default_kernels(device: torch.device, dtype: torch.dtype):
    return backend(default_name(device, dtype))


def forced_name() -> str | None:
    """The backend ``PEFT_DORA_KERNELS`` names, None for ``auto`` or unset."""
    name = os.environ.get(ENV, "").strip().lower()
    return None if name in ("", "auto") else name


def select(device: torch.device, dtype: torch.dtype):
    """The backend for a layer whose output lives on ``device`` in ``dtype``: the forced one or the default."""
    name = forced_name()
    if name is None:
        return default_kernels(device, dtype)
    chosen = backend(name)
    reason = chosen.unavailable(device, dtype)
    if reason is not None:
        raise KernelsUnavailable(f"{ENV}={name}: cannot run on {device.type} in {dtype}: {reason}")
    return chosen


__all__ = ["ENV", "NAMES", "KernelsUnavailable", "backend", "default_kernels", "default_name", "forced_name", "select"]
