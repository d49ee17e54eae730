"""The table's "# Params (%)": trainable / all parameters of the assembled LLaVA model, vision tower included.

    python -m llava.train.count_params <the flags of llava.train.train>

builds the model those flags name on the meta device from config files alone (no weights are read,
none need to exist), applies training's own freezing rules and adapter, and prints a line for people,
then, last, the JSON that training writes to ``trainable_parameters.json``:
``{"trainable": N, "total": N, "percent": P}``. Flags that only matter to a run (``--deepspeed``,
``--bf16``, ``--output_dir``, ``--data_path``, ...) are accepted and not acted on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from llava.train.train import ModelArguments

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters of one model; ``percent`` is the table's "# Params (%)"."""

    trainable: int
    total: int

    @property
    def exact_percent(self) -> float:
        return 100 * self.trainable / self.total

    @property
    def percent(self) -> float:
        """The paper's figure: the percentage cut (truncated, not rounded) to two decimals.

        Only truncation turns LoRA's 4.6161 % into the paper's 4.61 (DoRA: 4.6337 % into 4.63).
        Integer arithmetic: in floats a share exactly on a cut (23 of 1,000, 2.3 %) would come out as 2.29.
        """
        return (10_000 * self.trainable // self.total) / 100

    def record(self) -> dict[str, int | float]:
        return {"trainable": self.trainable, "total": self.total, "percent": self.percent}

    def describe(self) -> str:
        return (f"{self.trainable:,} trainable of {self.total:,} parameters = {self.exact_percent:.4f}% "
                f"(cut to two decimals as the paper prints it: {self.percent:.2f})")


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count every parameter of the model, vision tower included, as PEFT's count after the tower is attached.

    A ZeRO-3 partitioned parameter counts at its full size (``ds_numel``); its local tensor is empty.
    """
    trainable = total = 0
    for parameter in model.parameters():
        n = getattr(parameter, "ds_numel", parameter.numel())
        total += n
        trainable += n if parameter.requires_grad else 0
    if total == 0:
        raise ValueError("The model has no parameters to count.")
    return ParameterCount(trainable, total)


def parse_training_flags(argv: list[str]) -> tuple[ModelArguments, SimpleNamespace]:
    """Read the flags with the training module's own parser (unknown flags fail as they would there).

    The training arguments are kept as plain values: ``TrainingArguments.__post_init__`` picks a device
    and sets up DeepSpeed (``--deepspeed``), and checks ``--bf16`` against the hardware; a count needs none.
    """
    import transformers

    from llava.train.data import DataArguments
    from llava.train.train import ModelArguments, TrainingArguments

    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    values = vars(parser.parse_args(argv))
    model_args = ModelArguments(**{f.name: values[f.name] for f in dataclasses.fields(ModelArguments) if f.init})
    training_args = SimpleNamespace(**{f.name: values[f.name] for f in dataclasses.fields(TrainingArguments) if f.init})
    return model_args, training_args


def _require_files(path: str, names: tuple[str, ...], flag: str) -> None:
    """A local folder must hold the config files; anything else is left to the hub (or its cache)."""
    if os.path.isdir(path):
        missing = [name for name in names if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise SystemExit(f"count_params: {flag} {path} has no {' or '.join(missing)}: "
                             f"the count needs the model's config files (its weights are not needed).")
    elif path.startswith((".", os.sep)):
        raise SystemExit(f"count_params: {flag} {path} is not a folder: name a local folder or a hub id.")


def _v0_tokenizer(model_args: ModelArguments, training_args: SimpleNamespace):
    """The tokenizer, when ``--version v0`` needs it (it may add a [PAD] row) and there is one."""
    path = model_args.model_name_or_path
    if model_args.version != "v0":
        return None
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        logger.warning("%s holds no tokenizer: the count leaves out the [PAD] row --version v0 adds to a "
                       "tokenizer without one (LLaVA-1.5 trains with --version v1, stage 1 with plain).", path)
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, cache_dir=training_args.cache_dir)


def build_meta_model(model_args: ModelArguments, training_args: SimpleNamespace) -> nn.Module:
    """The model that training would build from these flags, on the meta device: shapes, no values.

    Training's own steps decide what is trainable (``prepare_language_model``, ``configure_tokenizer``,
    ``attach_vision_modules``); only loading differs: configs instead of weights, no pretrained projector.
    """
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from llava.train import train as training

    if training_args.bits in (4, 8):
        raise SystemExit(f"count_params: --bits {training_args.bits} is not supported: quantized weights are "
                         f"packed by bitsandbytes, so their count is not the model's; count with --bits 16.")
    _require_files(model_args.model_name_or_path, ("config.json",), "--model_name_or_path")
    if model_args.vision_tower is not None:
        _require_files(model_args.vision_tower, ("config.json", "preprocessor_config.json"), "--vision_tower")
    # Its weights would be read for nothing: the projector's shape comes from --mm_projector_type.
    model_args = dataclasses.replace(model_args, pretrain_mm_mlp_adapter=None)
    config = LlavaConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir)
    tokenizer = _v0_tokenizer(model_args, training_args)
    compute_dtype = training.compute_dtype_of(training_args)
    meta = torch.device("meta")
    with meta:
        model = LlavaLlamaForCausalLM(config)
        model = training.prepare_language_model(model, model_args, training_args, compute_dtype)
        if tokenizer is not None:
            training.configure_tokenizer(model, tokenizer, model_args, mean_resizing=False)
        if model_args.vision_tower is not None:
            training.attach_vision_modules(model, model_args, training_args, compute_dtype, meta)
    return model


def describe_recipe(model_args: ModelArguments, training_args: SimpleNamespace) -> str:
    if model_args.tune_mm_mlp_adapter:
        method = "stage 1 (projector only)"
    elif training_args.lora_enable:
        method = (f"{'DoRA' if training_args.use_dora else 'LoRA'} r={training_args.lora_r} "
                  f"alpha={training_args.lora_alpha}")
    else:
        method = "full finetuning"
    parts = [model_args.model_name_or_path]
    if model_args.vision_tower is not None:
        parts += [model_args.vision_tower, model_args.mm_projector_type]
    return f"{method}, {' + '.join(parts)}"


def main(argv: list[str] | None = None) -> ParameterCount:
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.logging.set_verbosity_error()
    model_args, training_args = parse_training_flags(sys.argv[1:] if argv is None else argv)
    count = count_parameters(build_meta_model(model_args, training_args))
    print(f"{describe_recipe(model_args, training_args)}: {count.describe()}")
    print(json.dumps(count.record()))
    return count


if __name__ == "__main__":
    main()
