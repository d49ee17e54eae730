"""Merge a LoRA / DoRA adapter into its base model and save a full LLaVA model (the seed's script).

    python scripts/merge_lora_weights.py --model-path ADAPTER --model-base BASE --save-model-path OUT

The adapter is loaded and merged by ``llava.model.builder.load_pretrained_model`` (DoRA magnitudes included),
in float32 for an exact merge; the merged ``LlavaLlamaForCausalLM`` and its tokenizer are then saved in
``--dtype`` (default: the dtype the base was saved in, float16 for Vicuna as the seed wrote it), so that
``load_pretrained_model(OUT, None)`` loads it as a full model.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import PretrainedConfig

from llava.eval.cli import configure_logging
from llava.mm_utils import get_model_name_from_path
from llava.model.builder import check_model_location, load_pretrained_model
from llava.output_folder import (
    check_output_folder,
    open_safetensors_modes,
    replace_folder,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="adapter folder (adapter_config.json, config.json, ...)")
    parser.add_argument("--model-base", required=True, help="the base language model the adapter was trained on")
    parser.add_argument("--save-model-path", required=True, type=Path, help="where to write the merged model")
    parser.add_argument("--dtype", default="auto", choices=[*DTYPES, "auto"],
                        help="dtype of the saved weights (auto: the dtype recorded in the base's config.json)")
    parser.add_argument("--missing-magnitudes", default="error", choices=["error", "weight_norm"],
                        help="weight_norm: reproduce the seed loader for DoRA checkpoints without magnitudes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --save-model-path if it exists (never one holding the adapter or the base)")
    parser.add_argument("--dora-magnitudes", default="trained", choices=["trained", "weight_norm"],
                        help="weight_norm: m = ||W0|| for every DoRA layer, the model the seed's loader evaluated")
    return parser.parse_args(argv)


def base_dtype(model_base: str) -> torch.dtype:
    """The dtype the base model was saved in (its config's ``dtype``, ``torch_dtype`` before transformers 5).

    ``model_base`` is a local folder or a hub id (read from the hub's cache, or downloaded).
    """
    config, _ = PretrainedConfig.get_config_dict(model_base)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"{model_base}: its config.json records dtype {name!r}; pass --dtype explicitly.")
    return DTYPES[name]


def merge_lora(model_path: str, model_base: str, save_model_path: Path, dtype: str = "auto",
               missing_magnitudes: str = "error", dora_magnitudes: str = "trained", overwrite: bool = False) -> None:
    """Merge, then save through ``save_model_path.tmp``, renamed at the end: a failed run leaves no half model."""
    check_model_location(model_path, "--model-path")
    check_model_location(model_base, "--model-base")
    out = Path(save_model_path)
    check_output_folder(out, overwrite, [model_path, model_base])
    out_dtype = base_dtype(model_base) if dtype == "auto" else DTYPES[dtype]
    tokenizer, model, _, _ = load_pretrained_model(
        model_path, model_base, get_model_name_from_path(model_path), device="cpu", torch_dtype=torch.float32,
        missing_magnitudes=missing_magnitudes, dora_magnitudes=dora_magnitudes,
    )
    model.to(out_dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    open_safetensors_modes(tmp)
    replace_folder(tmp, out)
    print(f"Merged {model_path} into {model_base}; saved the full model ({out_dtype}) to {out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging()  # the loader's lines, e.g. that the projector transformers reports missing was loaded
    try:
        merge_lora(args.model_path, args.model_base, args.save_model_path, args.dtype, args.missing_magnitudes,
                   args.dora_magnitudes, args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"merge_lora_weights: {error}") from error


if __name__ == "__main__":
    main()
