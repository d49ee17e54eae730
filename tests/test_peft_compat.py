"""This project's DoRA layer under PEFT's other entry points: meta-device loading, deep copies, mixing
with plain LoRA adapters. Expectations come from the normal path, float64 formulas and upstream PEFT."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from dora_testing import randomise as shared_randomise
from peft_dora import DoraConfig, DoraLinear


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 7, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def base_model(seed: int = 0) -> TwoLayers:
    torch.manual_seed(seed)
    return TwoLayers()


def config(**kwargs) -> DoraConfig:
    return DoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["up"], "wdecompose_target_modules": ["down"],
                         **kwargs})


def randomise(model: nn.Module, seed: int = 1) -> None:
    shared_randomise(model, scale=0.3, seed=seed)


def dora_reference(x: torch.Tensor, layer: DoraLinear, adapter: str = "default") -> torch.Tensor:
    """The layer's DoRA output as a float64 formula: (m / ||W0 + sBA||) * (W0 + sBA) x + b."""
    base = layer.get_base_layer()
    v = base.weight.detach().double()
    if isinstance(layer.lora_A[adapter].weight, nn.Parameter):
        a, b = layer.lora_A[adapter].weight.detach().double(), layer.lora_B[adapter].weight.detach().double()
        v = v + layer.scaling[adapter] * b @ a
    m = layer.lora_magnitude_vector[adapter].weight.detach().double()
    y = (m / torch.linalg.norm(v, dim=1)) * (x.double() @ v.T)
    return y + base.bias.detach().double() if base.bias is not None else y


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def test_low_cpu_mem_usage_get_peft_model_then_load_equals_the_normal_path():
    """PEFT builds A, B (and so m) on the meta device; loading the adapter then gives the normal model."""
    normal = get_peft_model(base_model(), config())
    randomise(normal)
    x = torch.randn(4, 12)

    empty = get_peft_model(base_model(), config(), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in empty.named_parameters() if "lora_" in n} == {"meta"}
    set_peft_model_state_dict(empty, get_peft_model_state_dict(normal), low_cpu_mem_usage=True)

    assert all(isinstance(empty.base_model.model.get_submodule(n), DoraLinear) for n in ("up", "down"))
    assert not any(t.is_meta for t in adapter_tensors(empty).values())
    for key, tensor in adapter_tensors(normal).items():
        assert torch.equal(adapter_tensors(empty)[key], tensor), key
    torch.testing.assert_close(empty(x), normal(x), rtol=0, atol=0)
    layer = empty.base_model.model.up
    torch.testing.assert_close(layer(x).double(), dora_reference(x, layer), rtol=1e-5, atol=1e-6)


def test_low_cpu_mem_usage_from_pretrained_equals_the_normal_path(tmp_path):
    normal = get_peft_model(base_model(), config())
    randomise(normal)
    normal.save_pretrained(tmp_path)
    x = torch.randn(4, 12)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
        loaded = PeftModel.from_pretrained(base_model(), tmp_path, config=config())
        empty_first = PeftModel.from_pretrained(base_model(), tmp_path, config=config(), low_cpu_mem_usage=True)

    assert not any(t.is_meta for t in adapter_tensors(empty_first).values())
    for key, tensor in adapter_tensors(loaded).items():
        assert torch.equal(adapter_tensors(empty_first)[key], tensor), key
    # Same tensors; only float32 rounding may differ (the loaded tensors sit at other addresses, which
    # can change the vector kernels' summation order).
    torch.testing.assert_close(empty_first(x), loaded(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(empty_first(x), normal(x), rtol=1e-6, atol=1e-7)


def test_deepcopy_of_a_fresh_model_is_independent():
    """A reference-model copy (as preference tuning makes) of a model whose base weights still required
    grad while the norms were computed: the copy works, starts with its own empty norm cache, and a change
    to the copy's B changes the copy alone."""
    model = get_peft_model(base_model(), DoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    randomise(model)
    x = torch.randn(4, 12)
    layer = model.base_model.model.up
    before = layer(x).detach().clone()

    twin = copy.deepcopy(model)
    twin_layer = twin.base_model.model.up
    assert twin_layer._dora_norm_cache is not layer._dora_norm_cache and len(twin_layer._dora_norm_cache) == 0
    torch.testing.assert_close(twin_layer(x), before, rtol=0, atol=0)

    with torch.no_grad():
        twin_layer.lora_B["default"].weight.mul_(-2.0)
    torch.testing.assert_close(twin_layer(x).double(), dora_reference(x, twin_layer), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(twin_layer(x), before, atol=1e-3)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    torch.testing.assert_close(layer(x).double(), dora_reference(x, layer), rtol=1e-5, atol=1e-6)
    assert layer.lora_B["default"].weight.data_ptr() != twin_layer.lora_B["default"].weight.data_ptr()


def test_dora_config_on_a_layer_holding_plain_lora_is_refused_loudly():
    """Upstream PEFT built that layer and would silently give it upstream's DoRA, not this project's."""
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["up"]))
    with pytest.raises(ValueError, match="peft_dora"):
        model.add_adapter("dora", DoraConfig(r=4, lora_alpha=8, target_modules=["up"]))
    assert "dora" not in model.peft_config and "dora" not in model.base_model.model.up.lora_A


def test_plain_lora_on_a_dora_layer_is_upstream_lora_and_a_second_dora_is_ours():
    """The other order works: this project's layer holds a plain LoRA adapter as upstream computes it."""
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["up"])
    model = get_peft_model(base_model(), DoraConfig(r=4, lora_alpha=8, target_modules=["up"]))
    model.add_adapter("plain", lora)
    model.add_adapter("dora2", DoraConfig(r=2, lora_alpha=2, target_modules=["up"]))
    layer = model.base_model.model.up
    assert "plain" not in layer.lora_variant and type(layer.lora_variant["dora2"]).__module__ == "peft_dora.layer"
    upstream = get_peft_model(base_model(), lora)
    randomise(model)
    upstream_state = {k.replace(".plain.", ".default."): v for k, v in adapter_tensors(model).items() if ".plain." in k}
    assert upstream.load_state_dict(upstream_state, strict=False).unexpected_keys == []
    model.base_model.set_adapter("plain")
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), upstream(x), rtol=1e-6, atol=1e-6)
    model.base_model.set_adapter("dora2")
    torch.testing.assert_close(layer(x).double(), dora_reference(x, layer, "dora2"), rtol=1e-5, atol=1e-6)
