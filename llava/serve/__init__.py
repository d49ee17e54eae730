"""Talk to a checkpoint: ``llava.serve.cli`` (terminal chat) and ``llava.serve.web`` (several checkpoints
side by side in a browser). ``how_to_chat`` writes the two commands for a finished demo."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _shown(path: Path | str) -> str:
    """A path as a user would type it: relative to the working folder when inside it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def how_to_chat(out_dir: Path, methods: Sequence[str], eval_dir: Path | None = None) -> str:
    """The commands to talk to a demo's checkpoints: every method side by side in the browser, and one in
    the terminal about one of the demo's evaluation images. LoRA and DoRA load onto the demo's base
    language model, as evaluation loads them; the FT folder holds a full model and ignores the base."""
    from llava.serve.examples import DEMO_EVAL, benchmark_examples

    python = _shown(sys.executable) if os.path.exists(sys.executable) else "python"
    base = _shown(Path(out_dir) / "base" / "vicuna-tiny")
    web = " ".join(["--model-path", *(_shown(Path(out_dir) / m) for m in methods), "--model-base", base])
    examples = []
    if eval_dir is not None and Path(eval_dir).is_dir():
        examples = benchmark_examples(Path(eval_dir))
        if Path(eval_dir).resolve() != DEMO_EVAL:
            web += f" --examples {_shown(eval_dir)}"
    image = _shown(examples[0].image) if examples else "IMAGE.jpg"
    last = _shown(Path(out_dir) / methods[-1])
    return (
        "Talk to what the demo trained:\n"
        f"  {python} -m llava.serve.web {web}\n"
        "    (a page that answers with every checkpoint side by side; open the address it prints)\n"
        f"  {python} -m llava.serve.cli --model-path {last} --model-base {base} --image-file {image}\n"
        "    (a chat in the terminal about one image)"
    )
