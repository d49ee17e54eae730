"""The DeepSpeed configs clip gradients as the seed's runs did.

The seed's DeepSpeed (0.9-0.12) did not clip when a config named no ``gradient_clipping``; DeepSpeed
0.19 clips at 1.0 then. zero2.json and zero3.json (the seed's, without the key) therefore say 0
explicitly; zero3_offload.json had ``"auto"`` (the Trainer's --max_grad_norm) and keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def resolved(name: str, max_grad_norm: float = 1.0) -> DeepSpeedConfig:
    """The engine's view of a config once the Trainer has filled its "auto" values (as its integration does)."""
    config = json.loads((SCRIPTS / name).read_text())
    config.update(train_micro_batch_size_per_gpu=4, train_batch_size=4, gradient_accumulation_steps=1)
    config["fp16"]["enabled"], config["bf16"]["enabled"] = False, True
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = max_grad_norm
    zero = config["zero_optimization"]
    for key, value in {"reduce_bucket_size": 4096 * 4096, "stage3_prefetch_bucket_size": int(0.9 * 4096 * 4096),
                       "stage3_param_persistence_threshold": 10 * 4096}.items():
        if zero.get(key) == "auto":
            zero[key] = value
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    return DeepSpeedConfig(config)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_seed_configs_do_not_clip(name):
    assert resolved(name).gradient_clipping == 0


def test_offload_config_clips_at_max_grad_norm():
    assert resolved("zero3_offload.json", max_grad_norm=0.7).gradient_clipping == 0.7
