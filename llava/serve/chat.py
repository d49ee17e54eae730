"""What the chat CLI and the web demo share: a checkpoint loaded for chat, and one conversation about one
image with it.

Loading is the evaluation's (``llava.eval.cli.load_model``: ``--model-base``, ``--dora-magnitudes``,
4/8-bit), prompts are the conversation template's, and each turn is answered by the evaluation's own
generation path (``llava.eval.generation.generate_one``), so a greedy chat answer is the benchmark answer
to the same prompt.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import Conversation, conv_templates
from llava.eval import cli
from llava.eval import generation as gen
from llava.eval.run_llava import infer_conv_mode, user_message
from llava.mm_utils import to_rgb
from llava.model.builder import (
    adapter_kind,
    check_model_folders,
    check_model_location,
    has_own_projector,
    holds_language_model,
)

logger = logging.getLogger(__name__)

# The template LLaVA-1.5 (Vicuna) checkpoints are trained with (training's ``--version v1``) and that
# 7B_eval_dora.sh evaluates them with.
TRAINING_TEMPLATE = "vicuna_v1"
URL_TIMEOUT_S = 10.0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation's model flags plus 4/8-bit. The parser must resolve conflicts: CLI and web then
    redefine --model-path (required; one path or several)."""
    cli.add_model_arguments(parser, conv_mode=None)
    parser.add_argument("--load-8bit", action="store_true", help="the language model in 8 bits (bitsandbytes)")
    parser.add_argument("--load-4bit", action="store_true", help="the language model in 4 bits (bitsandbytes, nf4)")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy, as evaluation")
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=max_new_tokens)


def settings(
    temperature: float, max_new_tokens: int, conv_mode: str, top_p: float | None = None
) -> gen.GenerationSettings:
    """Sampling as asked, ending at the template's stop string (as evaluation ends answers)."""
    return gen.GenerationSettings(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop_str=gen.stop_str_for(conv_mode)
    )


def chat_conv_mode(requested: str | None, model_name: str) -> str:
    """``--conv-mode`` if given; else the family the name shows (LLaMA-2, Mistral, 34B, MPT, as ``run_llava``
    infers it), and for a Vicuna-based LLaVA (a "v1" name, or any other) the template it was trained with."""
    if requested is not None:
        return requested
    inferred = infer_conv_mode(model_name)
    return TRAINING_TEMPLATE if inferred in ("llava_v1", "llava_v0") else inferred


def base_for(model_path: str, model_base: str | None) -> str | None:
    """``--model-base`` goes to the checkpoints that need one (an adapter, a projector-only folder); a folder
    that holds a full model loads alone, so one base can be named for FT, LoRA and DoRA together."""
    folder = Path(model_path).expanduser()
    if model_base is None or not folder.is_dir() or adapter_kind(str(folder)) is not None:
        return model_base
    return None if holds_language_model(folder) else model_base


def open_image(source: str, timeout: float = URL_TIMEOUT_S) -> Image.Image:
    """An RGB image from a local file or an http(s) URL, with an error that says what to do."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ValueError(f"Cannot fetch {source} ({reason}): download the image and pass its path.") from err
        try:
            with Image.open(io.BytesIO(data)) as image:
                return to_rgb(image)
        except OSError as err:
            raise ValueError(f"{source} did not return an image ({len(data)} bytes): {err}") from err
    if os.path.isdir(source):
        raise ValueError(f"{source} is a folder, not an image file: name one image in it.")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"Image file not found: {source}")
    try:
        return gen.open_rgb(source)
    except UnidentifiedImageError as err:
        raise ValueError(f"{source} is not an image PIL can read: name a JPEG, PNG or other image file.") from err
    except OSError as err:
        raise ValueError(f"{source}: cannot read the image ({err}).") from err


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` this machine lacks before any model loads: torch would fail only when the
    first weight moves there, with an assertion about how it was compiled."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device}: not a device torch knows; use cpu, cuda or cuda:N.") from err
    if parsed.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {device}: this machine has no CUDA device (or torch was built without CUDA); "
                         "use --device cpu, or leave the flag out.")
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")


def check_models(args: argparse.Namespace, model_paths: Sequence[str], route_projector: bool = False) -> None:
    """Check ``--model-base`` and every checkpoint's folder before any model loads, so that a typo in the
    last of several paths is not found only after the others have loaded."""
    if args.model_base is not None:
        check_model_location(os.path.expanduser(args.model_base), "--model-base")
    for path in model_paths:
        model_path, model_base, mm_projector = _model_flags(args, path, route_projector)
        check_model_folders(model_path, model_base, mm_projector)


@dataclass
class ChatModel:
    """A loaded checkpoint, the template it is talked to with, and the name it is shown under."""

    loaded: cli.LoadedModel
    conv_mode: str
    label: str

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


def load_chat_model(args: argparse.Namespace, model_path: str, label: str | None = None,
                    route_projector: bool = False) -> ChatModel:
    """Load one checkpoint with the evaluation's loader; ``args`` carries the shared model flags.

    With ``route_projector`` (several checkpoints on one page) ``--mm-projector`` goes, like
    ``--model-base``, only to the checkpoints without a projector of their own; alone, a checkpoint
    takes it as evaluation does (in place of its own).
    """
    _, model_base, mm_projector = _model_flags(args, model_path, route_projector)
    if model_base is None and args.model_base is not None:
        logger.info("%s holds a full model: loading it without --model-base", model_path)
    if mm_projector is None and getattr(args, "mm_projector", None) is not None:
        logger.info("%s has a projector of its own: --mm-projector is not applied to it", model_path)
    per_model = argparse.Namespace(**{**vars(args), "model_path": model_path, "model_base": model_base,
                                      "mm_projector": mm_projector})
    loaded = cli.load_model(per_model)
    conv_mode = chat_conv_mode(args.conv_mode, loaded.name)
    logger.info("%s: template %s", model_path, conv_mode)
    return ChatModel(loaded, conv_mode, label or loaded.name)


def _model_flags(args: argparse.Namespace, model_path: str,
                 route_projector: bool) -> tuple[str, str | None, str | None]:
    """The path, base and projector one checkpoint is loaded with (see ``load_chat_model``)."""
    model_path = os.path.expanduser(model_path)
    model_base = base_for(model_path, args.model_base)
    model_base = None if model_base is None else os.path.expanduser(model_base)
    mm_projector = getattr(args, "mm_projector", None)
    if route_projector and mm_projector is not None and has_own_projector(model_path, model_base):
        mm_projector = None
    return model_path, model_base, mm_projector


@dataclass
class Chat:
    """One conversation about one image: the image goes with the first question, later turns are text."""

    model: ChatModel
    image: Image.Image
    turns: list[tuple[str, str]] = field(default_factory=list)
    last_prompt: str = ""

    @property
    def roles(self) -> Sequence[str]:
        return conv_templates[self.model.conv_mode].roles

    def conversation(self, question: str) -> Conversation:
        """The template with every earlier turn answered and ``question`` waiting for its answer."""
        conv = conv_templates[self.model.conv_mode].copy()
        start_end = getattr(self.model.loaded.model.config, "mm_use_im_start_end", False)
        for k, (asked, answer) in enumerate([*self.turns, (question, None)]):
            if k > 0 and DEFAULT_IMAGE_TOKEN in asked:
                raise ValueError(
                    f"The image goes with the first question only: remove {DEFAULT_IMAGE_TOKEN} from this one."
                )
            conv.append_message(conv.roles[0], user_message(asked, start_end) if k == 0 else asked)
            conv.append_message(conv.roles[1], answer)
        return conv

    def ask(self, question: str, sampling: gen.GenerationSettings, streamer: Any = None) -> str:
        """Answer the next question (tokens go to ``streamer`` as they come) and remember the turn."""
        prompt = self.conversation(question).get_prompt()
        request = gen.Request(question_id=len(self.turns), prompt=prompt, recorded_prompt=question, images=[self.image])
        loaded = self.model.loaded
        answer = gen.generate_one(loaded.model, loaded.tokenizer, loaded.image_processor, request, sampling, streamer)
        self.last_prompt = prompt
        self.turns.append((question, answer))
        return answer
