"""Reading DoRA checkpoints (PEFT format and the seed's) and converting the seed's to the PEFT format.

Every expectation is independent of the code under test: the seed folders are written here by hand in
the seed's layout, and reference outputs come from a copy of the base model whose weights are replaced
by W = m / ||W0 + sBA|| * (W0 + sBA), computed in float64.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from peft_dora import DoraConfig, DoraLinear, invalidate_norm_caches, load_dora_adapter
from peft_dora.convert import main as convert_main

R, ALPHA = 4, 8
SCALING = ALPHA / R
INPUT_IDS = torch.tensor([[1, 5, 9, 33, 2, 60, 7, 12, 40, 3]])
PROJECTOR_SHAPES = {"0.weight": (32, 16), "0.bias": (32,), "2.weight": (32, 32), "2.bias": (32,)}


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    return model(input_ids=INPUT_IDS).logits


def linear_names(model: torch.nn.Module, suffixes: list[str]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in suffixes]


@torch.no_grad()
def reference_logits(layers: dict[str, dict[str, torch.Tensor | None]]) -> torch.Tensor:
    """Logits of the base model with each layer's weight replaced by its DoRA weight (float64 maths)."""
    model = tiny_base()
    for name, t in layers.items():
        linear = model.get_submodule(name)
        v = linear.weight.double()
        if t["A"] is not None:
            v = v + SCALING * t["B"].double() @ t["A"].double()
        linear.weight.copy_((t["m"].double() / v.norm(dim=1))[:, None] * v)
    return logits(model)


def make_seed_folder(
    path: Path,
    *,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    wdecompose: tuple[str, ...] = (),
    magnitudes_in: str | None = "non_lora",
    adapter_key_style: str = "plain",
    seed: int = 1,
) -> dict[str, dict[str, torch.Tensor | None]]:
    """Write a seed-format DoRA folder from known random A, B, m; return them by module name.

    ``magnitudes_in``: "non_lora" (as the seed's trainer saved them), "adapter", or None (lost).
    """
    base = tiny_base()
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, dict[str, torch.Tensor | None]] = {}
    for name in linear_names(base, list(targets) + list(wdecompose)):
        w0 = base.get_submodule(name).weight.detach()
        out_features, in_features = w0.shape
        m = w0.norm(dim=1) * (1 + 0.5 * torch.rand(out_features, generator=gen))
        if name.split(".")[-1] in targets:
            a = 0.3 * torch.randn(R, in_features, generator=gen)
            b = 0.3 * torch.randn(out_features, R, generator=gen)
        else:
            a = b = None
        layers[name] = {"A": a, "B": b, "m": m}

    adapter, non_lora = {}, {}
    ab = {"plain": "{}.weight", "named": "{}.default.weight"}[adapter_key_style]
    for name, t in layers.items():
        if t["A"] is not None:
            adapter[f"base_model.model.{name}.{ab.format('lora_A')}"] = t["A"].clone()
            adapter[f"base_model.model.{name}.{ab.format('lora_B')}"] = t["B"].clone()
        if magnitudes_in == "non_lora":
            non_lora[f"base_model.model.{name}.weight_m_wdecomp.default.weight"] = t["m"].unsqueeze(1).clone()
        elif magnitudes_in == "adapter":
            adapter[f"base_model.model.{name}.weight_m_wdecomp.weight"] = t["m"].unsqueeze(1).clone()
    for suffix, shape in PROJECTOR_SHAPES.items():
        non_lora[f"base_model.model.model.mm_projector.{suffix}"] = torch.randn(*shape, generator=gen)

    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "DORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama", "r": R,
        "lora_alpha": ALPHA, "lora_dropout": 0.05, "target_modules": list(targets), "bias": "none",
        "Wdecompose_target_modules": list(wdecompose) or None, "dora_simple": True, "merge_weights": False,
        "fan_in_fan_out": False, "enable_lora": None, "modules_to_save": None, "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    torch.save(adapter, path / "adapter_model.bin")
    torch.save(non_lora, path / "non_lora_trainables.bin")
    (path / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu"}))
    return layers


def projector(path: Path) -> dict[str, torch.Tensor]:
    tensors = torch.load(path / "non_lora_trainables.bin", weights_only=True)
    return {k: v for k, v in tensors.items() if "mm_projector" in k}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_peft_format_roundtrip_loads_in_vanilla_peft_and_here(tmp_path):
    model = get_peft_model(
        tiny_base(),
        DoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "up_proj"],
                   wdecompose_target_modules=["o_proj"], task_type="CAUSAL_LM"),
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DoraLinear):
                for holder in (module.lora_A["default"], module.lora_B["default"]):
                    if isinstance(holder.weight, torch.nn.Parameter):
                        holder.weight.copy_(0.3 * torch.randn(holder.weight.shape, generator=gen))
                m = module.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.5 * torch.rand(m.shape, generator=gen))
    invalidate_norm_caches()
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny_base()), atol=1e-2)
    model.save_pretrained(tmp_path)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
        vanilla = PeftModel.from_pretrained(tiny_base(), tmp_path)
    assert not any(isinstance(m, DoraLinear) for m in vanilla.modules())
    assert_close(logits(vanilla), expected)

    ours, report = load_dora_adapter(tiny_base(), tmp_path)
    assert sum(isinstance(m, DoraLinear) for m in ours.modules()) == 8
    assert_close(logits(ours), expected)
    assert (report.format, report.dora_layers, report.magnitude_only_layers) == ("peft", 8, 2)
    assert report.magnitudes_found == {"adapter_model.safetensors": 8}
    assert report.missing_magnitudes == [] and report.non_lora_trainables == {}


def test_upstream_peft_dora_checkpoint_loads_here(tmp_path):
    model = get_peft_model(
        tiny_base(), LoraConfig(r=R, lora_alpha=ALPHA, use_dora=True, target_modules=["k_proj", "gate_proj"])
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen))
    expected = logits(model)
    model.save_pretrained(tmp_path)

    ours, report = load_dora_adapter(tiny_base(), tmp_path)

    assert sum(isinstance(m, DoraLinear) for m in ours.modules()) == report.dora_layers == 4
    assert_close(logits(ours), expected)


class NotATensor:
    pass


def test_bin_files_are_unpickled_weights_only(tmp_path):
    make_seed_folder(tmp_path)
    torch.save({"base_model.model.model.mm_projector.0.weight": NotATensor()}, tmp_path / "non_lora_trainables.bin")
    with pytest.raises(ValueError, match=r"non_lora_trainables\.bin: refused to unpickle"):
        load_dora_adapter(tiny_base(), tmp_path)


@pytest.mark.parametrize(
    "magnitudes_in, key_style, found_in",
    [("non_lora", "plain", "non_lora_trainables.bin"), ("adapter", "named", "adapter_model.bin")],
)
def test_seed_format_restores_trained_magnitudes(tmp_path, magnitudes_in, key_style, found_in):
    layers = make_seed_folder(tmp_path, magnitudes_in=magnitudes_in, adapter_key_style=key_style)
    expected = reference_logits(layers)
    assert not torch.allclose(expected, logits(tiny_base()), atol=1e-2)

    model, report = load_dora_adapter(tiny_base(), tmp_path)

    assert_close(logits(model), expected)
    assert report.format == "seed" and report.dora_layers == len(layers) == 6
    assert report.magnitudes_found == {found_in: 6}
    assert report.missing_magnitudes == [] and report.missing_filled_with is None
    assert report.non_lora_file == "non_lora_trainables.bin"
    stored = projector(tmp_path)
    assert set(report.non_lora_trainables) == {f"model.mm_projector.{s}" for s in PROJECTOR_SHAPES}
    for key, tensor in report.non_lora_trainables.items():
        assert torch.equal(tensor, stored[f"base_model.model.{key}"])
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_magnitudes_fail_unless_weight_norm_is_asked_for(tmp_path):
    layers = make_seed_folder(tmp_path, magnitudes_in=None)
    base = tiny_base()
    with pytest.raises(ValueError, match=r"6 DoRA layer.*model\.layers\.0\.self_attn\.q_proj.*weight_norm"):
        load_dora_adapter(base, tmp_path)
    assert not any(isinstance(m, DoraLinear) for m in base.modules())

    model, report = load_dora_adapter(tiny_base(), tmp_path, missing_magnitudes="weight_norm")

    w0 = tiny_base()
    seed_loader_layers = {
        name: {**t, "m": w0.get_submodule(name).weight.detach().double().norm(dim=1)} for name, t in layers.items()
    }
    assert_close(logits(model), reference_logits(seed_loader_layers))
    assert sorted(report.missing_magnitudes) == sorted(layers)
    assert report.missing_filled_with == "weight_norm" and report.magnitudes_found == {}


def test_mismatched_checkpoints_name_the_key(tmp_path):
    make_seed_folder(tmp_path)
    adapter = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    adapter[key] = torch.zeros(R, 16)
    torch.save(adapter, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=rf"{key}.*\[4, 16\].*\[4, 32\]"):
        load_dora_adapter(tiny_base(), tmp_path)

    adapter[key] = torch.zeros(R, 32)
    extra = "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"
    adapter[extra] = torch.zeros(32, R)
    torch.save(adapter, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=rf"{extra}.*no Linear module"):
        load_dora_adapter(tiny_base(), tmp_path)


def test_converter_output_loads_in_vanilla_peft(tmp_path, capsys):
    seed_dir, out_dir = tmp_path / "seed", tmp_path / "out"
    layers = make_seed_folder(seed_dir)

    assert convert_main([str(seed_dir), str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "6 from non_lora_trainables.bin" in printed and "4 non-LoRA trainable tensors" in printed

    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (R, ALPHA, "CAUSAL_LM")
    assert sorted(load_file(out_dir / "non_lora_trainables.safetensors")) == sorted(projector(seed_dir))
    for key, tensor in load_file(out_dir / "non_lora_trainables.safetensors").items():
        assert torch.equal(tensor, projector(seed_dir)[key])
    assert (out_dir / "config.json").read_text() == (seed_dir / "config.json").read_text()
    assert not list(out_dir.glob(".*"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out_dir.iterdir()} == {0o666 & ~umask}  # not safetensors' 0o600

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
        vanilla = PeftModel.from_pretrained(tiny_base(), out_dir)
    assert_close(logits(vanilla), reference_logits(layers))


def test_converter_handles_magnitude_only_modules_given_the_base_model(tmp_path, capsys):
    seed_dir, out_dir, base_dir = tmp_path / "seed", tmp_path / "out", tmp_path / "base"
    layers = make_seed_folder(seed_dir, targets=("q_proj", "v_proj"), wdecompose=("o_proj",))
    expected = reference_logits(layers)
    tiny_base().save_pretrained(base_dir)

    assert convert_main([str(seed_dir), str(out_dir)]) == 1
    assert "--base-model" in capsys.readouterr().err

    assert convert_main([str(seed_dir), str(out_dir), "--base-model", str(base_dir)]) == 0
    assert "2 magnitude-only" in capsys.readouterr().out
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    assert set(config["rank_pattern"].values()) == {1} and len(config["rank_pattern"]) == 2

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unexpected keyword arguments")
        vanilla = PeftModel.from_pretrained(tiny_base(), out_dir)
    assert_close(logits(vanilla), expected)

    seed_model, report = load_dora_adapter(tiny_base(), seed_dir)
    assert report.magnitude_only_layers == 2
    assert_close(logits(seed_model), expected)
    converted_model, _ = load_dora_adapter(tiny_base(), out_dir)
    assert_close(logits(converted_model), expected)
