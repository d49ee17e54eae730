"""Dora_7b.sh under DeepSpeed does not clip gradients, as the seed's runs did not.

The seed's zero2.json / zero3.json named no ``gradient_clipping``, which its DeepSpeed (0.9-0.12) read
as 0; DeepSpeed 0.19 reads a missing key as 1.0. The configs say ``"auto"`` (the Trainer's
--max_grad_norm, which transformers requires to agree with the config) and Dora_7b.sh passes
--max_grad_norm 0 to the DeepSpeed launch.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

ROOT = Path(__file__).resolve().parents[1]


def resolved(name: str, max_grad_norm: float) -> DeepSpeedConfig:
    """The engine's view of a config once "auto" values are filled as transformers' integration fills them."""
    config = json.loads((ROOT / "scripts" / name).read_text())
    config.update(train_micro_batch_size_per_gpu=4, train_batch_size=4, gradient_accumulation_steps=1)
    config["fp16"]["enabled"], config["bf16"]["enabled"] = False, True
    assert config.get("gradient_clipping") == "auto", f"{name}: the clipping must follow --max_grad_norm"
    config["gradient_clipping"] = max_grad_norm
    zero = config["zero_optimization"]
    for key, value in {"reduce_bucket_size": 4096 * 4096, "stage3_prefetch_bucket_size": int(0.9 * 4096 * 4096),
                       "stage3_param_persistence_threshold": 10 * 4096}.items():
        if zero.get(key) == "auto":
            zero[key] = value
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    return DeepSpeedConfig(config)


def launched_max_grad_norm(tmp_path: Path) -> float:
    """The --max_grad_norm that Dora_7b.sh hands the training module under the deepspeed launcher."""
    launcher = tmp_path / "deepspeed"
    launcher.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    launcher.chmod(0o755)
    for name in ("data.json", "mm_projector.bin"):
        (tmp_path / name).write_text("")
    env = {**os.environ, "DEEPSPEED": str(launcher), "LAUNCHER": "deepspeed", "DATA_PATH": str(tmp_path / "data.json"),
           "IMAGE_FOLDER": str(tmp_path), "PRETRAIN_MM": str(tmp_path / "mm_projector.bin"),
           "MODEL_BASE": str(tmp_path), "VISION_TOWER": str(tmp_path)}
    args = subprocess.run(["bash", "Dora_7b.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    values = [args[i + 1] for i, arg in enumerate(args) if arg == "--max_grad_norm"]
    assert values, args
    return float(values[-1])  # the last one wins, as with any repeated flag


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_dora_7b_sh_under_deepspeed_does_not_clip(name, tmp_path):
    assert resolved(name, launched_max_grad_norm(tmp_path)).gradient_clipping == 0
