"""train.py's adapter flags reach the adapter that training builds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava.train.train import TrainingArguments, build_adapter_config
from peft import get_peft_model


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(self.q_proj(x))


def args(tmp_path, **flags) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], lora_enable=True, lora_r=2,
                             lora_alpha=4, target_modules="q_proj,v_proj", **flags)  # fmt: skip


@pytest.mark.parametrize("mode", ["seed", "branch"])
def test_dora_dropout_reaches_every_dora_layer(tmp_path, mode: str) -> None:
    model = TwoLayers()
    config = build_adapter_config(model, args(tmp_path, dora_dropout=mode))
    assert config.dora_dropout == mode
    config.task_type = None  # a plain module, not a causal LM with generation
    peft_model = get_peft_model(model, config)
    layers = [m for m in peft_model.modules() if hasattr(m, "_dora_dropout")]
    assert len(layers) == 2
    assert all(layer._dora_dropout["default"] == mode for layer in layers)


def test_the_default_is_the_seeds_formula(tmp_path) -> None:
    assert build_adapter_config(TwoLayers(), args(tmp_path)).dora_dropout == "seed"


def test_branch_dropout_without_dora_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="--dora_dropout branch needs DoRA"):
        build_adapter_config(TwoLayers(), args(tmp_path, use_dora=False, dora_dropout="branch"))


def test_an_unknown_dora_dropout_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="--dora_dropout must be one of"):
        args(tmp_path, dora_dropout="input")
