"""What every benchmark's generation script shares: its flags, its chunk of the questions, the model,
and the load-then-generate tail (``answer_questions``), written once.

A benchmark script parses its flags with the ``add_*_arguments`` helpers, reads its question file,
takes its chunk (``get_chunk``), checks its images, and hands ``answer_questions`` a function that
turns the questions into ``Request``s once the model (and so its template and config) is known.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from llava.checkpoint_kind import checkpoint_fingerprint
from llava.conversation import conv_templates
from llava.eval import answers_file
from llava.eval import generation as gen
from llava.mm_utils import get_model_name_from_path

logger = logging.getLogger(__name__)

T = TypeVar("T")
DORA_MAGNITUDES = ("trained", "weight_norm")


# ----------------------------------------------------------------------------- chunks and inputs


def split_list(items: Sequence[T], n: int) -> list[Sequence[T]]:
    """Split into contiguous chunks of ceil(len / n) items, as the seed did (the last may be short)."""
    chunk_size = math.ceil(len(items) / n)
    if chunk_size == 0:
        return [items[0:0]]
    return [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]


def get_chunk(items: Sequence[T], n: int, k: int) -> Sequence[T]:
    """Chunk ``k`` of ``n`` (the seed's get_chunk); a chunk index past the last chunk gets nothing."""
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--chunk-idx {k} is not in [0, --num-chunks {n}).")
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else items[0:0]


def check_images_exist(images: Iterable[tuple[Any, str]]) -> None:
    """Fail before the model loads if any (question_id, image path) is missing, naming them and the count."""
    missing = [(qid, path) for qid, path in images if not os.path.isfile(path)]
    if not missing:
        return
    shown = "\n".join(f"  question {qid!r}: {path}" for qid, path in missing[:10])
    more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise FileNotFoundError(f"{len(missing)} image(s) not found (check --image-folder):\n{shown}{more}")


# ----------------------------------------------------------------------------- flags


def add_model_arguments(parser: argparse.ArgumentParser, conv_mode: str | None) -> None:
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--conv-mode", type=str, default=conv_mode, choices=sorted(conv_templates))
    parser.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument(
        "--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
        help="auto: float16 on GPU, float32 on CPU",
    )
    parser.add_argument(
        "--mm-projector", type=str, default=None,
        help="a projector file (keys model.mm_projector.*, like stage 1's mm_projector.bin) to use instead of the "
        "checkpoint's; needed for an adapter saved without its projector",
    )
    parser.add_argument(
        "--dora-magnitudes", choices=DORA_MAGNITUDES, default="trained",
        help="DoRA checkpoints only. trained: the magnitudes training produced (default); weight_norm: m = ||W0|| "
        "for every layer, as the seed's loader evaluated the paper's published DoRA row",
    )


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, batch_size: int | None = 8) -> None:
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    defaults = ", ".join(f"{str(t).removeprefix('torch.')} {margin:g}" for t, margin in gen.DEFAULT_TIE_MARGINS.items())
    parser.add_argument(
        "--tie-margin", type=float, default=None,
        help=f"greedy rows whose top-2 logits come closer than this are answered again alone "
        f"(default by dtype: {defaults}; 0 turns the check off)",
    )
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size)


def add_chunk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument(
        "--fresh", action="store_true",
        help="move an existing --answers-file aside (renamed, kept) and answer every question again",
    )


def settings_from_args(args: argparse.Namespace, stop_str: str | None) -> gen.GenerationSettings:
    return gen.GenerationSettings(
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        stop_str=stop_str,
        tie_margin=args.tie_margin,
    )


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------- the model


def resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


@dataclass
class LoadedModel:
    tokenizer: Any
    model: Any
    image_processor: Any
    name: str
    run_info: dict[str, Any] = field(default_factory=dict)  # settings each answer records (answers_file)


def load_model(args: argparse.Namespace) -> LoadedModel:
    """Load ``--model-path`` (and ``--model-base``) straight onto ``--device`` in ``--dtype``."""
    from llava.model.builder import adapter_kind, load_pretrained_model

    model_path = os.path.expanduser(args.model_path)
    name = get_model_name_from_path(model_path)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    magnitudes = getattr(args, "dora_magnitudes", "trained")
    mm_projector = getattr(args, "mm_projector", None)
    is_dora = adapter_kind(model_path) == "dora"
    logger.info(
        "Loading %s on %s (%s)%s", model_path, device, str(dtype).removeprefix("torch."),
        f", DoRA magnitudes: {magnitudes}" if is_dora else "",
    )
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, args.model_base, name, device=device, torch_dtype=dtype, dora_magnitudes=magnitudes,
        mm_projector=mm_projector, load_8bit=getattr(args, "load_8bit", False),
        load_4bit=getattr(args, "load_4bit", False),
    )
    run_info: dict[str, Any] = {
        "model_path": os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
        "checkpoint": checkpoint_fingerprint(model_path, args.model_base, mm_projector),
    }
    if is_dora:
        run_info["dora_magnitudes"] = magnitudes
    return LoadedModel(tokenizer, model, image_processor, name, run_info)


def mmtag_conv_mode(conv_mode: str, model_name: str) -> str:
    """The seed switched stage-1 ("plain") models to the mmtag template unless they were fine-tuned."""
    if "plain" not in model_name or "finetune" in model_name.lower() or "mmtag" in conv_mode:
        return conv_mode
    switched = conv_mode + "_mmtag"
    if switched not in conv_templates:
        logger.warning("%s looks like a plain (stage-1) model, but there is no %s template", model_name, switched)
        return conv_mode
    logger.warning("%s looks like a plain (stage-1) model: switching to the %s template", model_name, switched)
    return switched


# ----------------------------------------------------------------------------- the shared tail


def answer_questions(
    args: argparse.Namespace,
    build_requests: Callable[[str, Any], list[gen.Request]],
    preprocessing: gen.Preprocessing = "model",
    switch_plain_template: bool = True,
) -> gen.RunSummary:
    """Load the model, build the requests for its template and config, and answer them into
    ``--answers-file`` (resuming it, or after moving it aside with ``--fresh``).
    ``build_requests(conv_mode, model_config)`` makes the requests."""
    loaded = load_model(args)
    if getattr(args, "fresh", False):
        answers_file.move_aside(Path(args.answers_file).expanduser())
    conv_mode = mmtag_conv_mode(args.conv_mode, loaded.name) if switch_plain_template else args.conv_mode
    # The template and sampling flags shape every answer: recorded, so a resumed run cannot mix answers made
    # under other ones (the recorded "prompt" is the bare question and would not tell them apart).
    run_info = {**loaded.run_info, "conv_mode": conv_mode, "temperature": args.temperature, "top_p": args.top_p,
                "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    return gen.run_generation(
        build_requests(conv_mode, loaded.model.config),
        loaded.model,
        loaded.tokenizer,
        loaded.image_processor,
        settings_from_args(args, gen.stop_str_for(conv_mode)),
        args.answers_file,
        model_id=loaded.name,
        batch_size=args.batch_size,
        preprocessing=preprocessing,
        run_info=run_info,
    )
