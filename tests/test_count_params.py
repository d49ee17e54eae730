"""The "# Params (%)" column: the count command on the real 7B configs (no weights), and against training."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from llava.tiny_base import TinySizes
from llava.train.count_params import ParameterCount, build_meta_model, parse_training_flags

ROOT = Path(__file__).resolve().parents[1]

# Vicuna-7B v1.5's config.json (LLaMA-2 7B architecture).
VICUNA_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
    "initializer_range": 0.02, "max_position_embeddings": 4096, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
    "vocab_size": 32000,
}  # fmt: skip
# openai/clip-vit-large-patch14-336's config.json: a full CLIP config; the tower is its vision_config.
CLIP_L_336 = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "initializer_factor": 1.0,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "image_size": 336, "projection_dim": 768, "hidden_act": "quick_gelu",
                      "layer_norm_eps": 1e-05},
}  # fmt: skip
CLIP_PREPROCESSOR = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
}  # fmt: skip

# The same architectures counted by hand.
H, FFN, LAYERS, VOCAB = 4096, 11008, 32, 32000
LLAMA_7B = (
    2 * VOCAB * H  # token embeddings and lm_head (untied)
    + LAYERS * (4 * H * H + 3 * H * FFN + 2 * H)  # q/k/v/o, gate/up/down (no biases), two RMSNorms
    + H  # final RMSNorm
)
D, MLP, VISION_LAYERS, PATCH, IMAGE = 1024, 4096, 24, 14, 336
CLIP_TOWER = (
    D  # class embedding
    + 3 * PATCH * PATCH * D  # patch embedding (a convolution without bias)
    + ((IMAGE // PATCH) ** 2 + 1) * D  # position embeddings: 576 patches and the class token
    + 2 * D  # pre-layernorm
    + VISION_LAYERS * (4 * (D * D + D) + 2 * 2 * D + (D * MLP + MLP) + (MLP * D + D))  # attention, 2 LNs, MLP
    + 2 * D  # post-layernorm
)
PROJECTOR = (D * H + H) + (H * H + H)  # mlp2x_gelu: Linear(1024, 4096), GELU, Linear(4096, 4096)
R = 128
# r * (in + out) for A (r x in) and B (out x r) on each decoder Linear: q/k/v/o 4096->4096, gate/up 4096->11008,
# down 11008->4096.
LORA = LAYERS * R * (4 * (H + H) + 2 * (H + FFN) + (FFN + H))
MAGNITUDES = LAYERS * (4 * H + 2 * FFN + H)  # DoRA: one per output feature of each wrapped Linear
ALL_7B = LLAMA_7B + CLIP_TOWER + PROJECTOR

RECIPES_7B = {
    "lora": (["--lora_enable", "True", "--use_dora", "False"], LORA + PROJECTOR, ALL_7B + LORA, 4.61),
    "dora": (["--lora_enable", "True"], LORA + MAGNITUDES + PROJECTOR, ALL_7B + LORA + MAGNITUDES, 4.63),
    # The paper prints "100" for full finetuning; with the frozen vision tower it is 95.70.
    "full": (["--lora_enable", "False"], LLAMA_7B + PROJECTOR, ALL_7B, 95.70),
    "stage1": (["--tune_mm_mlp_adapter", "True", "--version", "plain"], PROJECTOR, ALL_7B, 0.29),
}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def count_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "llava.train.count_params", *flags]


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def configs_7b(tmp_path_factory) -> tuple[Path, Path]:
    """Config files only, as the command needs them: no weights anywhere."""
    root = tmp_path_factory.mktemp("configs_7b")
    (root / "vicuna-7b-v1.5").mkdir()
    (root / "vicuna-7b-v1.5" / "config.json").write_text(json.dumps(VICUNA_7B))
    (root / "clip-vit-large-patch14-336").mkdir()
    (root / "clip-vit-large-patch14-336" / "config.json").write_text(json.dumps(CLIP_L_336))
    (root / "clip-vit-large-patch14-336" / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR))
    return root / "vicuna-7b-v1.5", root / "clip-vit-large-patch14-336"


@pytest.fixture(scope="module")
def counts_7b(configs_7b, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Each recipe with Dora_7b.sh's flags (DeepSpeed ZeRO-3, bf16 included), the four commands run side by side."""
    model, tower = configs_7b
    runs = {}
    for name, (flags, _, _, _) in RECIPES_7B.items():
        out = tmp_path_factory.mktemp(f"out_{name}") / "run"
        cmd = count_command(
            "--model_name_or_path", str(model), "--vision_tower", str(tower), "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--version", "v1", "--lora_r", str(R), "--lora_alpha", "256",
            "--pretrain_mm_mlp_adapter", str(out.parent / "absent_mm_projector.bin"),
            "--deepspeed", str(ROOT / "scripts" / "zero3.json"), "--bf16", "True", "--tf32", "True",
            "--gradient_checkpointing", "True", "--output_dir", str(out), *flags,
        )  # fmt: skip
        runs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    results = {}
    for name, (proc, out) in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return results


def test_hand_counts_are_the_known_totals():
    assert LLAMA_7B == 6_738_415_616  # LLaMA-7B
    assert ALL_7B + LORA == 7_382_718_464 and LORA + PROJECTOR == 340_795_392
    assert ALL_7B + LORA + MAGNITUDES == 7_384_078_336 and LORA + MAGNITUDES + PROJECTOR == 342_155_264


@pytest.mark.parametrize("recipe", list(RECIPES_7B))
def test_7b_recipe_counts_from_configs_alone(counts_7b, recipe):
    _, trainable, total, paper_percent = RECIPES_7B[recipe]
    result, out = counts_7b[recipe]
    assert last_json(result) == {"trainable": trainable, "total": total, "percent": paper_percent}
    human = result.stdout.strip().splitlines()[-2]
    assert f"{trainable:,} trainable of {total:,} parameters = {100 * trainable / total:.4f}%" in human
    assert not out.exists(), "a count must not act on --output_dir"


def test_percent_is_cut_to_two_decimals_not_rounded():
    assert ParameterCount(340_795_392, 7_382_718_464).percent == 4.61  # 4.6161 %: rounding would agree
    assert ParameterCount(4_619, 100_000).percent == 4.61  # 4.619 %: rounding would give 4.62
    assert ParameterCount(23, 1_000).percent == 2.3  # exactly 2.3 %, though 100 * 23 / 1000 * 100 < 230 in floats
    assert ParameterCount(5, 5).percent == 100.0


@pytest.mark.parametrize("missing", ["model", "preprocessor"])
def test_missing_config_files_are_named(tmp_path, configs_7b, missing):
    model, tower = configs_7b
    if missing == "model":
        model = tmp_path / "vicuna"
        model.mkdir()
        expected = f"--model_name_or_path {model} has no config.json"
    else:
        tower = tmp_path / "clip"
        tower.mkdir()
        (tower / "config.json").write_text(json.dumps(CLIP_L_336))
        expected = f"--vision_tower {tower} has no preprocessor_config.json"
    args = parse_training_flags(["--model_name_or_path", str(model), "--vision_tower", str(tower)])
    with pytest.raises(SystemExit, match=re.escape(expected)):
        build_meta_model(*args)


def numel(path: Path) -> int:
    """Elements in a checkpoint file, from its shapes (safetensors) or its tensors (.bin)."""
    if path.suffix == ".bin":
        return sum(t.numel() for t in torch.load(path, map_location="cpu", weights_only=True).values())
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


@pytest.mark.slow
def test_command_prints_what_training_records(tiny_base, tmp_path):
    """Dora_7b.sh's recipe on the tiny base: one real training step writes trainable_parameters.json."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "images" / "0.png")
    sample = {"id": "0", "image": "images/0.png",
              "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "data.json").write_text(json.dumps([sample]))
    out = tmp_path / "out"
    flags = [
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-3",
        "--model_name_or_path", str(tiny_base.language_model), "--version", "v1",
        "--data_path", str(tmp_path / "data.json"), "--image_folder", str(tmp_path),
        "--vision_tower", str(tiny_base.vision_tower), "--pretrain_mm_mlp_adapter", str(tiny_base.projector),
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad",
        "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "1",
        "--save_strategy", "no", "--gradient_checkpointing", "True", "--lazy_preprocess", "True",
        "--report_to", "none", "--use_cpu", "True",
    ]  # fmt: skip
    training = subprocess.Popen([sys.executable, "-m", "llava.train.train", *flags], cwd=ROOT, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    counted = subprocess.run(count_command(*flags), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    stdout, stderr = training.communicate(timeout=300)
    assert training.returncode == 0, stdout[-2000:] + stderr[-4000:]

    recorded = json.loads((out / "trainable_parameters.json").read_text())
    assert last_json(counted) == recorded
    tiny = TinySizes()
    h, ffn, v = tiny.hidden_size, tiny.intermediate_size, tiny.vision_hidden_size
    lora = tiny.num_layers * 8 * (4 * (h + h) + 2 * (h + ffn) + (ffn + h))
    magnitudes = tiny.num_layers * (4 * h + 2 * ffn + h)
    projector = (v * h + h) + (h * h + h)
    assert recorded["trainable"] == lora + magnitudes + projector
    # The frozen vision tower is part of the total: language model + tower + projector + adapter.
    parts = (numel(tiny_base.language_model / "model.safetensors") + numel(tiny_base.vision_tower / "model.safetensors")
             + numel(tiny_base.projector))  # fmt: skip
    assert numel(tiny_base.projector) == projector
    assert recorded["total"] == parts + lora + magnitudes


@pytest.mark.parametrize(("select", "positions"), [("patch", 576), ("cls_patch", 577)])
def test_the_real_tower_puts_its_patches_into_the_sequence(configs_7b, select: str, positions: int):
    """CLIP-L/336's image takes (336 / 14)^2 = 576 positions: what the token count of --loss_weighting token
    and the cut at model_max_length reckon with."""
    from types import SimpleNamespace

    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.model.llava_arch import labels_within_length
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    tower = CLIPVisionTower(str(configs_7b[1]), SimpleNamespace(mm_vision_select_layer=-2,
                                                                mm_vision_select_feature=select), delay_load=True)
    assert tower.tokens_per_image == positions
    # One image after the system prompt, then 1500 supervised tokens: at 2048 the last ones are cut.
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX] + [7] * 1500])
    labels = torch.where(ids == 7, ids, torch.full_like(ids, IGNORE_INDEX))
    kept = labels_within_length(ids, labels, None, tower.tokens_per_image, 2048)
    assert int((kept != IGNORE_INDEX).sum()) == 2048 - (2 + positions)
