"""This project's DoRA layer, plugged into PEFT's LoRA ``Linear`` as a LoRA variant.

PEFT keeps target matching, wrapping, saving and merging; this module supplies the DoRA maths: the
closed-form norm (``norm.py``) and its cache, the output combination and merging. The layer is
device-neutral: the kernels of the norm, the down projection and the combination come from the
backend that ``kernels.select`` picks for the output's device and dtype (``kernels/``). A
bitsandbytes 4-bit or 8-bit base layer (QDoRA) gives its output as it is; its W0 is read dequantized
for the norm and a merge writes it back requantized (``quantized.py``).
The magnitude lives where upstream PEFT keeps it (``lora_magnitude_vector[adapter].weight``), so
checkpoints are interchangeable with upstream.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import kernels as dora_kernels
from . import quantized
from .norm import accumulation_dtype, row_sq_norm

_optimizer_generation = 0


def _bump_generation(*_args: Any, **_kwargs: Any) -> None:
    global _optimizer_generation
    _optimizer_generation += 1


# Any optimizer step may change A or B, also when the step bypasses the version counters of the
# module's parameters (DeepSpeed updates partitions and copies them back through `.data`).
register_optimizer_step_post_hook(_bump_generation)


def invalidate_norm_caches() -> None:
    """Force every DoRA layer to recompute its norm at the next forward.

    Call after changing adapter weights by a path that neither steps a torch optimizer nor
    writes the parameters in place (for example assigning ``param.data`` under ZeRO-3).
    """
    _bump_generation()


def _param_key(p: torch.Tensor) -> tuple[int, int]:
    # Under ZeRO-3 the full tensor is re-gathered into fresh memory; the partition is what persists.
    t = getattr(p, "ds_tensor", None)
    t = p if t is None else t
    return (t.data_ptr(), t._version)


def _gathered(*params: torch.Tensor):
    """Gather ZeRO-3 partitioned parameters for reading (a no-op otherwise).

    Only parameters that are not available are gathered (and released again on exit): one that a
    submodule holds right now (the base layer that just ran) is read as it is, because releasing it
    here would pull it from under its module. The status is the same on every rank, so every rank
    joins the same collective.
    """
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if any(p.ds_status == ZeroParamStatus.INFLIGHT for p in params):
        raise RuntimeError("peft_dora: a DoRA weight is being prefetched by ZeRO-3 while its norm is computed.")
    missing = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not missing:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(missing, modifier_rank=None)


class DoraMagnitude(nn.Module):
    """Holds m (shape [out]) and applies the DoRA output combination, B's product included.

    The combination runs inside this module's forward so that ZeRO-3 gathers m around it, and B
    with it: under ZeRO-3 B is registered as this module's external parameter (``lora_B`` itself
    never runs its forward, so its own hooks would not gather it).
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def forward(self, result, h, lora_B, base_d, inv_norm, bias, scaling, in_place, kernels):
        return kernels.combine(result, h, lora_B, base_d, self.weight, inv_norm, bias, scaling, in_place)


def _gather_with(holder: nn.Module, param: torch.Tensor) -> None:
    """Make ZeRO-3 gather ``param`` whenever ``holder`` runs forward or backward (no-op otherwise)."""
    if not hasattr(param, "ds_id"):
        return
    external = getattr(holder, "_external_params", None)
    if external is None or id(param) not in external:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(holder, param)


class NormCache(dict):
    """A layer's cached norms. A copy of the layer starts empty: its parameters are new tensors, which
    the cached entries do not describe (and copying them would copy tensors for nothing)."""

    def __deepcopy__(self, memo: dict) -> NormCache:
        return NormCache()

    def __reduce__(self):
        return (NormCache, ())


def base_weight(module: DoraLinear) -> torch.Tensor:
    """W0 as out x in: a view of the weight (transposed back for fan_in_fan_out layers), or for a
    bitsandbytes layer its dequantized values (a new tensor)."""
    base = module.get_base_layer()
    if quantized.kind(base) is not None:
        return quantized.dequantize(base)
    return base.weight.t() if module.fan_in_fan_out else base.weight


def weight_norm(module: DoraLinear, adapter: str) -> torch.Tensor:
    """||W0 + sBA||_row in float32 (float64 for float64 weights), reused while W0, A, B and s are unchanged.

    For initialisation and merging: always the default kernels of the adapter's device (see ``kernels``).
    """
    lora_A = module.lora_A[adapter].weight
    return _norm_and_inverse(module, adapter, dora_kernels.default_kernels(lora_A.device, lora_A.dtype))[0]


def _norm_and_inverse(module: DoraLinear, adapter: str, kernels) -> tuple[torch.Tensor, torch.Tensor]:
    base = module.get_base_layer()
    lora_A = module.lora_A[adapter].weight
    lora_B = module.lora_B[adapter].weight
    scaling = module.scaling[adapter]
    if torch.compiler.is_compiling():
        # A compiled graph cannot key a cache on storage addresses; the norm becomes part of the graph.
        return kernels.weight_norm(base_weight(module), lora_A.detach(), lora_B.detach(), scaling)
    key = (
        kernels.name,
        _optimizer_generation,
        _param_key(base.weight),
        _param_key(lora_A),
        _param_key(lora_B),
        float(scaling),
        base.weight.dtype,
        lora_A.dtype,
        lora_A.device,
    )
    cached = module._dora_norm_cache.get(adapter)
    if cached is not None and cached[0] == key:
        return cached[1:]
    with _gathered(base.weight, lora_A, lora_B):
        weight = base_weight(module)
        sq = _weight_sq_norm(module, weight, lora_A, lora_B) if kernels.reuses_weight_sq_norm else None
        norm, inv_norm = kernels.weight_norm(weight, lora_A.detach(), lora_B.detach(), scaling, weight_sq_norm=sq)
    entry = (key, norm, inv_norm)
    module._dora_norm_cache[adapter] = entry
    return entry[1:]


def _unmerged_weight(module: DoraLinear) -> torch.Tensor:
    """W0 (out x in) while adapters are merged into the base layer, read without changing the layer.

    A bitsandbytes layer's W0 is the weight its first merge kept, dequantized (exact); otherwise the
    merged adapters are taken out of a float copy again, last first, as ``unmerge`` takes them out.
    """
    base = module.get_base_layer()
    if quantized.kind(base) is not None:
        return quantized.dequantize(base, module._caches[f"{module.merged_adapters[0]}-quantized-weight"])
    weight = base.weight.detach()
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    weight = weight.to(dtype)
    for adapter in reversed(module.merged_adapters):
        if adapter in module.lora_variant:
            weight = _taken_out(module, adapter, weight, module._caches[f"{adapter}-dora-norm"].to(dtype))
        else:
            weight = weight - module.get_delta_weight(adapter).to(dtype)
    return weight.t() if module.fan_in_fan_out else weight


def _taken_out(module: DoraLinear, adapter: str, weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """A weight (as PEFT stores it) that holds a merged DoRA adapter, with that adapter taken out again:
    W / (m / n) - sBA, in the norm's dtype (n: the norm the merge used)."""
    factor = (module.lora_magnitude_vector[adapter].weight.detach().to(norm.dtype) / norm).unsqueeze(1)
    if module.fan_in_fan_out:
        factor = factor.t()
    return weight.to(norm.dtype) / factor - module.get_delta_weight(adapter).to(norm.dtype)


def _unmerged_norm(module: DoraLinear, adapter: str) -> torch.Tensor:
    """||W0 + sBA||_row with W0 from ``_unmerged_weight`` (uncached: merging is rare)."""
    lora_A = module.lora_A[adapter].weight
    lora_B = module.lora_B[adapter].weight
    kernels = dora_kernels.default_kernels(lora_A.device, lora_A.dtype)
    with _gathered(lora_A, lora_B):
        weight = _unmerged_weight(module)
        return kernels.weight_norm(weight, lora_A.detach(), lora_B.detach(), module.scaling[adapter])[0]


def _weight_sq_norm(module: DoraLinear, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor):
    """||W0||_row^2 in the norm's dtype, cached while W0 is unchanged (it is frozen)."""
    dtype = accumulation_dtype(weight, lora_A, lora_B)
    sq_key = (_param_key(module.get_base_layer().weight), weight.dtype, weight.device, dtype)
    sq = module._dora_norm_cache.get("__w0_sq__")
    if sq is None or sq[0] != sq_key:
        sq = (sq_key, row_sq_norm(weight, dtype))
        module._dora_norm_cache["__w0_sq__"] = sq
    return sq[1]


class DoraVariant(LoraVariant):
    """DoRA as a PEFT LoRA variant (static methods, PEFT's variant interface)."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: DoraLinear, adapter_name: str, **kwargs: Any) -> None:
        """m = ||W0 + sBA||_row (||W0|| with PEFT's B = 0: the wrapped layer starts equal to its base layer).
        For a bitsandbytes base W0 is the dequantized weight it multiplies by, so the wrapped layer starts
        equal to the quantized layer, not to the float layer it was quantized from."""
        lora_A = module.lora_A[adapter_name].weight
        if getattr(module, "_dora_magnitude_only", {}).get(adapter_name):
            with torch.no_grad():
                module.lora_A[adapter_name].weight.zero_()
        tensors = (lora_A, module.lora_B[adapter_name].weight, module.get_base_layer().weight)
        if any(t.is_meta for t in tensors):
            # PEFT's low_cpu_mem_usage: A and B stay empty until a checkpoint is loaded into them, and so does m.
            magnitude = torch.empty(module.out_features, dtype=lora_A.dtype, device="meta")
        else:
            magnitude = weight_norm(module, adapter_name).to(device=lora_A.device, dtype=lora_A.dtype)
        module.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    @staticmethod
    def _factor(module: DoraLinear, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(m / n as a column, n) for merging, both in the norm's dtype.

        n is the norm the forward uses, of W0 + sBA: when other adapters are merged already, of W0
        without them (as upstream PEFT's DoRA takes it), not of the weight that holds them.
        """
        norm = _unmerged_norm(module, adapter) if module.merged_adapters else weight_norm(module, adapter)
        magnitude = module.lora_magnitude_vector[adapter].weight.detach().to(norm.dtype)
        return (magnitude / norm).unsqueeze(1), norm

    @staticmethod
    def _merged(module: DoraLinear, adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        factor, norm = DoraVariant._factor(module, adapter)
        module._cache_store(f"{adapter}-dora-norm", norm)
        delta = module.get_delta_weight(adapter).to(norm.dtype)
        weight = orig_weight.to(norm.dtype)
        if module.fan_in_fan_out:
            return (factor.t() * (weight + delta)).to(orig_weight.dtype)
        return (factor * (weight + delta)).to(orig_weight.dtype)

    @staticmethod
    def merge_safe(module: DoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return DoraVariant._merged(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module: DoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = DoraVariant._merged(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: DoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        norm = module._cache_pop(f"{active_adapter}-dora-norm")
        return _taken_out(module, active_adapter, orig_weight.data, norm).to(orig_weight.dtype)

    @staticmethod
    def forward(module: DoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any):
        kernels = dora_kernels.select(result.device, result.dtype)
        base = module.get_base_layer()
        dropout = module.lora_dropout[active_adapter]
        if isinstance(dropout, nn.Identity) or not module.training:
            x_d, base_d = x, None
        elif module._dora_dropout.get(active_adapter) == "branch":
            x_d, base_d = dropout(x), None  # dropout on the low-rank branch alone (DoraConfig.dora_dropout)
        else:
            x_d = dropout(x)
            base_d = base(x_d.to(result.dtype))  # W0 x_d + b: the combination takes the bias out
        # The first adapter gets the base layer's fresh output, which nothing else reads, and may write
        # over it; a later one gets the previous adapter's output, which that adapter keeps for backward.
        first = next((a for a in module.active_adapters if a in module.lora_A), None) == active_adapter
        magnitude_only = getattr(module, "_dora_magnitude_only", {}).get(active_adapter, False)
        holder = module.lora_magnitude_vector[active_adapter]
        h = lora_B = None
        if not magnitude_only:
            h = kernels.down(module.lora_A[active_adapter], x_d)
            lora_B = module.lora_B[active_adapter].weight
            _gather_with(holder, lora_B)
        inv_norm = _norm_and_inverse(module, active_adapter, kernels)[1]
        bias = None
        if base.bias is not None:
            with _gathered(base.bias):
                # A copy when partitioned: the function keeps the bias for backward.
                bias = base.bias.detach().clone() if hasattr(base.bias, "ds_id") else base.bias.detach()
        return holder(result, h, lora_B, base_d, inv_norm, bias, module.scaling[active_adapter], first, kernels)


class DoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` whose DoRA variant is this project's, over a float or bitsandbytes layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        self._dora_norm_cache = NormCache()
        self._dora_magnitude_only = {}
        self._dora_dropout = {}
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): DoraVariant}

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> LoraVariant | None:
        # A DoraConfig declares its own variant field (``peft_dora``), which only this class resolves.
        if config.use_dora:
            return DoraVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        target_name = kwargs.get("target_name", "")
        self._dora_dropout[adapter_name] = getattr(config, "dora_dropout", "seed")
        is_magnitude_only = getattr(config, "is_magnitude_only", None)
        if is_magnitude_only is not None and is_magnitude_only(target_name):
            # Magnitude-only (the seed's `wdecompose_target_modules`): y = (m / ||W0||) * W0 x + b.
            # A rank-1 A and B, both zero and frozen, keep the checkpoint loadable by upstream PEFT.
            self._dora_magnitude_only[adapter_name] = True
            r = 1
            config.rank_pattern[re.escape(target_name)] = 1
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if self._dora_magnitude_only.get(adapter_name):
            # On the base weight's device even when PEFT builds the adapter on the meta device: constant zeros.
            device = self.get_base_layer().weight.device
            for holder in (self.lora_A[adapter_name], self.lora_B[adapter_name]):
                weight = holder.weight
                del holder.weight
                holder.register_buffer("weight", torch.zeros(weight.shape, dtype=weight.dtype, device=device))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """PEFT's merge; for a bitsandbytes base: dequantize, merge, requantize, keeping the weight it
        replaces so that ``unmerge`` restores it bit for bit (requantizing twice would not)."""
        base = self.get_base_layer()
        if quantized.kind(base) is None:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            return
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            weight = quantized.dequantize(base)
            if adapter in self.lora_variant:
                merged = self.lora_variant[adapter].merge_safe(self, adapter, weight)
                self._caches.pop(f"{adapter}-dora-norm", None)  # unmerge restores the kept weight instead
            else:
                merged = weight + self.get_delta_weight(adapter).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            self._cache_store(f"{adapter}-quantized-weight", quantized.current(base))
            quantized.install(base, quantized.quantize_like(base, merged))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        if quantized.kind(base) is None:
            super().unmerge()
            return
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                quantized.install(base, self._cache_pop(f"{adapter}-quantized-weight"))

    def __repr__(self) -> str:
        return "dora." + super().__repr__()
