"""The real training entry (the module Dora_7b.sh runs) on the tiny base: one process, resume, ZeRO-3."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava.tiny_base import build_tiny_base

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def write_colour_dataset(folder: Path, n_images: int = 48, n_text: int = 8, seed: int = 0) -> Path:
    """A task a tiny model learns in a few steps: name the colour of a plain image."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    data = []
    for i in range(n_images):
        colour = rng.choice(sorted(COLOURS))
        Image.new("RGB", (40, 28), COLOURS[colour]).save(folder / "images" / f"{i}.png")
        data.append({
            "id": f"img{i}",
            "image": f"images/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the picture?"},
                {"from": "gpt", "value": colour},
            ],
        })  # fmt: skip
    for i in range(n_text):
        data.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    (folder / "data.json").write_text(json.dumps(data))
    return folder / "data.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_e2e")
    base = build_tiny_base(root / "base")
    data = write_colour_dataset(root / "data")
    return root, base, data


def train_command(base, data: Path, out: Path, *extra: str) -> list[str]:
    """The flags of Dora_7b.sh, with sizes for the tiny base."""
    return [
        sys.executable, "-m", "llava.train.train_mem",
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-3",
        "--model_name_or_path", str(base.language_model), "--version", "v1",
        "--data_path", str(data), "--image_folder", str(data.parent),
        "--vision_tower", str(base.vision_tower), "--pretrain_mm_mlp_adapter", str(base.projector),
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
        "--output_dir", str(out), "--num_train_epochs", "2",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--save_strategy", "steps", "--save_steps", "4",
        "--learning_rate", "2e-2", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--model_max_length", "256", "--gradient_checkpointing", "True",
        "--lazy_preprocess", "True", "--report_to", "none", "--seed", "7", "--use_cpu", "True",
        *extra,
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return {**tensors, **load_file(str(folder / "non_lora_trainables.safetensors"))}


@pytest.fixture(scope="module")
def one_process_run(setup):
    root, base, data = setup
    out = root / "run_full"
    run(train_command(base, data, out))
    return out


@pytest.mark.slow
def test_one_process_training_learns_and_saves_every_checkpoint(setup, one_process_run):
    out = one_process_run
    history = losses(out)
    assert len(history) == 28  # 2 epochs of 56 samples / batch 4
    # A random-weight tiny base learns slowly; 0.3 nats is half the drop observed over these 28 steps.
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5 - 0.3, history
    for folder in [out, *sorted(out.glob("checkpoint-*"))]:
        for name in ("config.json", "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors"):
            assert (folder / name).exists(), folder / name
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
        # as readable as the config beside them (safetensors alone writes weights 0o600)
        assert {m for n, m in modes.items() if n.endswith(".safetensors")} == {modes["config.json"]}, modes
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    projector = load_file(str(out / "non_lora_trainables.safetensors"))
    assert sorted(projector) == [f"base_model.model.model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]


@pytest.mark.slow
def test_trained_output_loads_with_the_builder_and_merged_equals_unmerged(setup, one_process_run):
    from peft import PeftModel

    from llava.mm_utils import tokenizer_image_token
    from llava.model import LlavaLlamaForCausalLM
    from llava.model.builder import load_pretrained_model

    _, base, _ = setup
    tokenizer, merged, processor, _ = load_pretrained_model(str(one_process_run), str(base.language_model), device="cpu")
    prompt = "A chat. USER: <image>\nWhat color is the picture? ASSISTANT:"
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0)
    image = processor.preprocess(Image.new("RGB", (32, 32), COLOURS["blue"]), return_tensors="pt")["pixel_values"]

    # The unmerged PEFT model, assembled by hand from the saved pieces.
    config = merged.config
    unmerged = LlavaLlamaForCausalLM.from_pretrained(str(base.language_model), config=config)
    projector = load_file(str(one_process_run / "non_lora_trainables.safetensors"))
    unmerged.load_state_dict({k.removeprefix("base_model.model."): v for k, v in projector.items()}, strict=False)
    # The adapter goes on before the vision tower is built, or CLIP's q/k/v_proj would match its targets too.
    unmerged = PeftModel.from_pretrained(unmerged, str(one_process_run)).eval()
    unmerged.get_vision_tower().load_model()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, images=image).logits, unmerged(ids, images=image).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(setup, one_process_run):
    root, base, data = setup
    out = root / "run_killed"
    cmd = train_command(base, data, out)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read()[-5000:]
        assert time.monotonic() < deadline, "no checkpoint-4 after 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    run(cmd)  # the same command: picks up the latest complete checkpoint
    resumed, uninterrupted = adapter_tensors(out), adapter_tensors(one_process_run)
    assert sorted(resumed) == sorted(uninterrupted)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-4, atol=1e-5, msg=key)
    assert losses(out)[-1] == pytest.approx(losses(one_process_run)[-1], rel=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dora_7b_env(base, data: Path, out: Path) -> dict[str, str]:
    return {
        **env(),
        "DS_ACCELERATOR": "cpu",
        "MASTER_PORT": str(_free_port()),
        "MODEL_BASE": str(base.language_model),
        "DATA_PATH": str(data),
        "IMAGE_FOLDER": str(data.parent),
        "VISION_TOWER": str(base.vision_tower),
        "PRETRAIN_MM": str(base.projector),
        "OUTPUT_DIR": str(out),
        "NUM_GPUS": "2",
        "BATCH": "4",
        "GRAD_ACC": "1",
        "PRECISION": "",
    }


@pytest.mark.slow
def test_dora_7b_sh_trains_under_zero3_on_two_processes(setup):
    """Dora_7b.sh itself, through the deepspeed launcher, two CPU ranks (gloo), ZeRO-3."""
    root, base, data = setup
    out = root / "run_zero3"
    flags = ["--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "2e-2", "--mm_projector_lr", "2e-3",
             "--save_steps", "4", "--model_max_length", "256", "--dataloader_num_workers", "0",
             "--num_train_epochs", "2", "--seed", "7"]  # fmt: skip
    result = subprocess.run(["bash", "Dora_7b.sh", *flags], cwd=ROOT, env=dora_7b_env(base, data, out),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    history = losses(out)
    assert len(history) == 14  # 2 epochs of 56 samples / (2 ranks x batch 4)
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5 - 0.3, history
    final, checkpoint = adapter_tensors(out), adapter_tensors(out / "checkpoint-14")
    assert final.keys() == checkpoint.keys()
    for key, tensor in final.items():
        assert tensor.numel() > 0, f"{key} was saved partitioned (empty)"
        torch.testing.assert_close(tensor, checkpoint[key], msg=key)

    from llava.model.builder import load_pretrained_model

    tokenizer, model, _, _ = load_pretrained_model(str(out), str(base.language_model), device="cpu")
    assert model.get_model().mm_projector[0].weight.shape == final["base_model.model.model.mm_projector.0.weight"].shape
    torch.testing.assert_close(model.get_model().mm_projector[0].weight, final["base_model.model.model.mm_projector.0.weight"])


def test_dora_7b_sh_checks_its_inputs_before_launching(tmp_path):
    result = subprocess.run(
        ["bash", "Dora_7b.sh"],
        cwd=ROOT,
        env={**env(), "DATA_PATH": str(tmp_path / "nope.json"), "PRETRAIN_MM": str(tmp_path / "nope.bin"),
             "IMAGE_FOLDER": str(tmp_path), "LAUNCHER": "deepspeed"},  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"missing: the instruction-tuning annotations at {tmp_path / 'nope.json'}" in result.stdout
    assert "llava_v1_5_mix665k.json" in result.stdout
    assert f"missing: the pretrained projector at {tmp_path / 'nope.bin'}" in result.stdout
    assert "nothing was launched" in result.stderr


def test_dora_7b_sh_takes_any_path_but_org_slash_name_as_local(tmp_path):
    """A relative path without "./" used to get only a note that it would come from the hub, and the run
    failed after loading the language model. The hints name the README's real section."""
    inputs = {"DATA_PATH": str(tmp_path / "nope.json"), "PRETRAIN_MM": str(tmp_path / "nope.bin"),
              "IMAGE_FOLDER": str(tmp_path / "images"), "LAUNCHER": "python"}

    def launch(**paths: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "Dora_7b.sh"], cwd=ROOT, env={**env(), **inputs, **paths}, capture_output=True,
                              text=True, timeout=60, check=False)

    typos = launch(MODEL_BASE="checkpoints/nowhere/vicuna-tinyX", VISION_TOWER="clip-tinyy")
    assert typos.returncode == 2 and "nothing was launched" in typos.stderr
    assert "missing: the base language model at checkpoints/nowhere/vicuna-tinyX" in typos.stdout
    assert "missing: the vision tower at clip-tinyy" in typos.stdout
    assert "Hugging Face hub" not in typos.stdout
    assert "README.md, 'Reproducing the paper' > 'Setup and downloads'" in typos.stdout
    assert "Finetuning Dataset" not in typos.stdout and "(Data, Weights)" not in typos.stdout
    hub = launch(MODEL_BASE="lmsys/vicuna-7b-v1.5", VISION_TOWER="openai/clip-vit-large-patch14-336")
    assert "note: the base language model 'lmsys/vicuna-7b-v1.5' is not a local folder" in hub.stdout
    assert "note: the vision tower 'openai/clip-vit-large-patch14-336' is not a local folder" in hub.stdout
    assert "missing: the base language model" not in hub.stdout and "missing: the vision tower" not in hub.stdout


def test_a_reporter_whose_package_is_missing_is_refused_before_anything_loads(monkeypatch):
    """transformers says so only when the Trainer is built, after the data check and the model load."""
    from transformers.integrations import integration_utils

    from llava.train.train import check_report_to

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(integration_utils, "is_comet_available", lambda: False)
    for name in ("wandb", "comet_ml"):
        with pytest.raises(ValueError, match=rf"--report_to {name}: the {name} package is not installed"):
            check_report_to([name])
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    check_report_to(["wandb"])
    check_report_to([])


def test_the_old_evaluation_strategy_name_is_taken_and_a_disagreement_refused(tmp_path):
    from llava.train.train import TrainingArguments

    def strategy(**flags: str) -> str:
        return str(TrainingArguments(output_dir=str(tmp_path), report_to="none", **flags).eval_strategy.value)

    assert strategy(evaluation_strategy="steps") == "steps"  # the seed's spelling
    assert strategy(evaluation_strategy="steps", eval_strategy="steps") == "steps"
    assert strategy(evaluation_strategy="no") == "no"
    with pytest.raises(ValueError, match="--evaluation_strategy no and --eval_strategy steps disagree"):
        strategy(evaluation_strategy="no", eval_strategy="steps")
