"""Evaluating a seed-format DoRA checkpoint with its trained magnitudes or as the seed's loader did.

The seed's loader dropped the trained magnitudes, so the paper's DoRA row was produced with
m = ||W0||. The expectations are built by hand, independently of the loader: a copy of the tiny
LLaVA whose every adapted weight is replaced by W = m / ||W0 + sBA|| * (W0 + sBA), computed in
float64, with m either the checkpoint's trained magnitudes or the base weight's row norms.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import adapter_kind, load_pretrained_model
from llava.tiny_base import build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
R, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def seed_format_checkpoint(llava_dir: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Write what the seed's trainer wrote for a DoRA run; return A, B, m per module and the projector.

    adapter_model.bin holds only lora_A / lora_B; the magnitudes ([out, 1], ``weight_m_wdecomp``) sit in
    non_lora_trainables.bin beside a projector that differs from the base's.
    """
    base = LlavaLlamaForCausalLM.from_pretrained(llava_dir)
    gen = torch.Generator().manual_seed(7)
    layers, adapter, non_lora = {}, {}, {}
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] not in TARGETS:
            continue
        w0 = module.weight.detach()
        out_features, in_features = w0.shape
        a = 0.3 * torch.randn(R, in_features, generator=gen)
        b = 0.3 * torch.randn(out_features, R, generator=gen)
        m = w0.norm(dim=1) * (1 + torch.rand(out_features, generator=gen))
        layers[name] = {"A": a, "B": b, "m": m}
        adapter[f"base_model.model.{name}.lora_A.weight"] = a
        adapter[f"base_model.model.{name}.lora_B.weight"] = b
        non_lora[f"base_model.model.{name}.weight_m_wdecomp.default.weight"] = m.unsqueeze(1)
    projector = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in base.get_model().mm_projector.state_dict().items()}
    for key, value in projector.items():
        non_lora[f"base_model.model.model.mm_projector.{key}"] = value
    out.mkdir(parents=True)
    torch.save(adapter, out / "adapter_model.bin")
    torch.save(non_lora, out / "non_lora_trainables.bin")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "DORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "vicuna", "r": R,
        "lora_alpha": ALPHA, "lora_dropout": 0.05, "target_modules": TARGETS, "bias": "none",
        "Wdecompose_target_modules": None, "dora_simple": True, "merge_weights": False,
        "fan_in_fan_out": False, "enable_lora": None, "modules_to_save": None, "inference_mode": True,
    }))
    shutil.copy(llava_dir / "config.json", out / "config.json")
    return {"layers": layers, "projector": projector}


@pytest.fixture(scope="module")
def checkpoint(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("magnitude_mode")
    llava_dir = build_tiny_llava(tiny_base, root / "llava")
    return llava_dir, root / "dora-seed", seed_format_checkpoint(llava_dir, root / "dora-seed")


@torch.no_grad()
def hand_merged(llava_dir: Path, written: dict, magnitudes: str) -> LlavaLlamaForCausalLM:
    """The base with each DoRA weight written in by hand (float64 maths), m trained or ||W0||."""
    model = LlavaLlamaForCausalLM.from_pretrained(llava_dir).eval()
    model.get_vision_tower().load_model()
    model.get_model().mm_projector.load_state_dict(written["projector"])
    for name, t in written["layers"].items():
        linear = model.get_submodule(name)
        w0 = linear.weight.double()
        v = w0 + (ALPHA / R) * t["B"].double() @ t["A"].double()
        m = t["m"].double() if magnitudes == "trained" else w0.norm(dim=1)
        linear.weight.copy_((m / v.norm(dim=1))[:, None] * v)
    return model


@torch.no_grad()
def logits(model, image_processor) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, IMAGE_TOKEN_INDEX, 33, 2, 60, 7, 12, 40]])
    image = Image.fromarray((torch.rand(24, 40, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    pixels = process_images([image], image_processor, model.config)
    return model(input_ids=ids, images=pixels).logits


def test_both_modes_equal_hand_merged_models_and_differ(checkpoint):
    llava_dir, seed_dir, written = checkpoint
    assert adapter_kind(str(seed_dir)) == "dora" and adapter_kind(str(llava_dir)) is None
    results = {}
    for mode in ("trained", "weight_norm"):
        _, model, processor, _ = load_pretrained_model(str(seed_dir), str(llava_dir), device="cpu", dora_magnitudes=mode)
        results[mode] = logits(model, processor)
        want = logits(hand_merged(llava_dir, written, mode), processor)
        torch.testing.assert_close(results[mode], want, rtol=0, atol=1e-5)
    assert (results["trained"] - results["weight_norm"]).abs().max() > 0.1


def test_weight_norm_mode_needs_no_magnitudes_and_trained_mode_refuses(checkpoint, tmp_path):
    llava_dir, seed_dir, written = checkpoint
    stripped = tmp_path / "no-magnitudes"
    shutil.copytree(seed_dir, stripped)
    tensors = torch.load(stripped / "non_lora_trainables.bin", weights_only=True)
    torch.save({k: v for k, v in tensors.items() if "weight_m_wdecomp" not in k}, stripped / "non_lora_trainables.bin")
    with pytest.raises(ValueError, match="have no magnitude"):
        load_pretrained_model(str(stripped), str(llava_dir), device="cpu")
    _, model, processor, _ = load_pretrained_model(str(stripped), str(llava_dir), device="cpu",
                                                   dora_magnitudes="weight_norm")
    torch.testing.assert_close(logits(model, processor), logits(hand_merged(llava_dir, written, "weight_norm"), processor),
                               rtol=0, atol=1e-5)


def test_weights_load_straight_onto_the_device(checkpoint, monkeypatch):
    """Every from_pretrained of an evaluation load names the device, so no full CPU copy is built first."""
    from transformers import CLIPVisionModel

    llava_dir, seed_dir, _ = checkpoint
    seen = []
    for cls in (LlavaLlamaForCausalLM, CLIPVisionModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("device_map")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    _, model, _, _ = load_pretrained_model(str(seed_dir), str(llava_dir), device="cpu")
    assert [name for name, _ in seen] == ["LlavaLlamaForCausalLM", "CLIPVisionModel"]
    assert all(device_map == {"": "cpu"} for _, device_map in seen), seen
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def run_eval(name: str, ckpt: Path, eval_dir: Path, results: Path, llava_dir: Path, magnitudes: str | None,
             **extra: str):
    env = {**os.environ, "MODEL_BASE": str(llava_dir), "CUDA_VISIBLE_DEVICES": "", "BATCH_SIZE": "16",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env.pop("DORA_MAGNITUDES", None)
    if magnitudes is not None:
        env["DORA_MAGNITUDES"] = magnitudes
    return subprocess.run(["bash", "7B_eval_dora.sh", name, str(ckpt), str(eval_dir), str(results), str(REPO)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow
def test_7b_eval_dora_sh_evaluates_both_modes_into_labelled_rows(checkpoint, tmp_path):
    from llava.demo.synthetic import generate

    llava_dir, seed_dir, _ = checkpoint
    eval_dir = generate(tmp_path / "data", seed=0, n_train=200, n_eval=3)["eval"]
    for skipped in ("vqav2", "vizwiz", "scienceqa", "textvqa"):  # the demo's test runs all seven; three suffice here
        shutil.rmtree(eval_dir / skipped)
    official = eval_dir / "gqa" / "data" / "eval"
    official.mkdir()
    # A stand-in for GQA's official eval.py: it reads its inputs from the folder it runs in, as the real one.
    (official / "eval.py").write_text(
        "import json, sys\n"
        "predictions = json.load(open(sys.argv[2] + '_predictions.json'))\n"
        "questions = json.load(open(sys.argv[2] + '_questions.json'))\n"
        "print(f'official stand-in: {len(predictions)} predictions for {len(questions)} questions')\n")
    before = snapshot(eval_dir)
    results = tmp_path / "results"

    trained = run_eval("dora-trained", seed_dir, eval_dir, results, llava_dir, None)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    seed_loader = run_eval("dora-seed-loader", seed_dir, eval_dir, results, llava_dir, "weight_norm")
    assert seed_loader.returncode == 0, seed_loader.stdout[-3000:] + seed_loader.stderr[-3000:]
    assert snapshot(eval_dir) == before, "the evaluation wrote into EVALPATH"
    assert "official stand-in: 3 predictions for 3 questions" in trained.stdout  # it ran, from the result folder

    recorded = {row: json.loads((results / row / "results.json").read_text())
                for row in ("dora-trained", "dora-seed-loader")}
    assert recorded["dora-trained"]["dora_magnitudes"] == "trained"
    assert recorded["dora-seed-loader"]["dora_magnitudes"] == "weight_norm"

    table = subprocess.run([os.sys.executable, "-m", "llava.eval.summarize", str(results)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    methods = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| dora")]
    assert methods == [r"| dora-seed-loader (m = \|\|W0\|\|)", "| dora-trained (trained m)"], table
    assert "m = ||W0||: magnitudes set to the base weights' row norms" in table

    def answers(row: str, bench: str) -> list[str]:
        path = next((results / bench / "answers").rglob(f"{row}/merge.jsonl"))
        return [json.loads(line)["text"] for line in path.read_text().splitlines()]

    benches = ("gqa", "pope", "mmbench")
    assert any(answers("dora-trained", b) != answers("dora-seed-loader", b) for b in benches)
    asked = [json.loads(line)["question_id"] for line in
             next((results / "mmbench" / "answers").rglob("dora-trained/merge.jsonl")).read_text().splitlines()]
    assert max(asked) >= 1_000_000, "MMBench's circular copies (rows at index + k * 10^6) were not asked"
    metrics = json.loads((results / "mmbench" / "dora-trained.metrics.json").read_text())
    assert metrics["circular_accuracy"] is not None and metrics["questions"] < len(asked)

    row = results / "dora-trained" / "results.json"
    kept = row.read_text()
    mixed = run_eval("dora-trained", seed_dir, eval_dir, results, llava_dir, "weight_norm")
    assert mixed.returncode == 2
    assert "DORA_MAGNITUDES=trained" in mixed.stderr and "another CKPT name" in mixed.stderr
    # Another checkpoint into the row: refused before anything is answered; FRESH=1 starts the row over.
    gqa_only = tmp_path / "gqa-only"
    shutil.copytree(eval_dir, gqa_only, ignore=shutil.ignore_patterns("pope", "mmbench"))
    other = run_eval("dora-trained", llava_dir, gqa_only, results, llava_dir, None)
    assert other.returncode == 2 and f"holds the results of {seed_dir}" in other.stderr, other.stderr[-2000:]
    assert row.read_text() == kept
    fresh = run_eval("dora-trained", llava_dir, gqa_only, results, llava_dir, None, FRESH="1")
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    restarted = json.loads(row.read_text())
    assert restarted["model_path"] == str(llava_dir) and restarted.get("dora_magnitudes") is None
    assert [p.read_text() for p in row.parent.glob("results.replaced-*.json")] == [kept]
    # A run refused for every benchmark (here by the answers, which another checkpoint made) writes no row.
    row.unlink()
    refused = run_eval("dora-trained", seed_dir, gqa_only, results, llava_dir, "weight_norm")
    assert refused.returncode == 1 and "failed: GQA" in refused.stderr, refused.stderr[-2000:]
    assert not row.exists()


@pytest.mark.parametrize("bits", ["load_8bit", "load_4bit"])
def test_quantized_loads_keep_the_adapter_unmerged_over_the_quantized_base(checkpoint, bits):
    """Merging would round the merged weight to 4/8 bits again: the DoRA layers stay, over bitsandbytes layers."""
    import bitsandbytes as bnb

    from peft_dora import DoraLinear

    llava_dir, seed_dir, written = checkpoint
    _, model, processor, _ = load_pretrained_model(str(seed_dir), str(llava_dir), device="cpu",
                                                   torch_dtype=torch.float32, **{bits: True})
    layers = [m for m in model.modules() if isinstance(m, DoraLinear)]
    assert len(layers) == len(written["layers"])
    assert all(isinstance(m.get_base_layer(), (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in layers)
    projector = model.get_model().mm_projector.state_dict()
    assert all(torch.equal(projector[k], v) for k, v in written["projector"].items())  # loaded unquantized
    want = logits(hand_merged(llava_dir, written, "trained"), processor)
    error = (logits(model, processor) - want).abs().max() / want.abs().max()
    assert error < {"load_8bit": 0.01, "load_4bit": 0.05}[bits], error  # quantization error only (measured 0.1%, 1.5%)
