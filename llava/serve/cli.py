"""Talk to a checkpoint about one image in the terminal, its answers streamed as they are generated.

    python -m llava.serve.cli --model-path CKPT [--model-base BASE] --image-file photo.jpg

Each line you type is a question; the conversation goes on with the same image (LLaVA-1.5's template,
as the checkpoint was trained). An empty line is skipped; "exit", "quit" or end of input (Ctrl-D) ends
it. ``--temperature 0`` answers greedily, exactly as the evaluation does for the same prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, TextIO

from transformers import TextStreamer

from llava.eval import cli as eval_cli
from llava.serve import chat as chat_lib

logger = logging.getLogger(__name__)
QUIT = ("exit", "quit")


class StreamPrinter(TextStreamer):
    """Writes an answer as its tokens arrive, ending at the template's stop string: eos is hidden by the
    tokenizer, but a separator such as v0's "###" is text, so what might begin one is held back."""

    def __init__(self, tokenizer: Any, stop_str: str | None, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop_str = stop_str or ""
        self.out = out
        self.pending = ""
        self.started = False
        self.stopped = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.stopped:
            self.pending += text
            if self.stop_str and self.stop_str in self.pending:
                self.pending = self.pending[: self.pending.index(self.stop_str)]
                self.stopped = True
            hold = 0 if self.stopped or stream_end else _prefix_overlap(self.pending, self.stop_str)
            shown, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
            if not self.started:
                shown = shown.lstrip()
                self.started = bool(shown)
            self.out.write(shown)
        if stream_end:
            self.out.write("\n")
        self.out.flush()


def _prefix_overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that begins ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def display_role(role: str) -> str:
    """A template's role as a prompt label (MPT's roles carry their markup)."""
    return role.replace("<|im_start|>", "").strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve"
    )
    chat_lib.add_model_arguments(parser)
    parser.add_argument("--model-path", required=True,
                        help="a checkpoint folder (full model, adapter or projector-only) or a hub id")
    parser.add_argument("--image-file", required=True, help="a local image file, or an http(s) URL")
    chat_lib.add_sampling_arguments(parser, temperature=0.2, max_new_tokens=512)
    parser.add_argument("--debug", action="store_true",
                        help="after each answer, print the full prompt and the answer as JSON on stderr")
    return parser.parse_args(argv)


def read_question(prompt: str, stdin: TextIO | None, out: TextIO) -> str | None:
    """The next line typed (None at end of input); the terminal's own line editing when reading the real stdin."""
    if stdin is None:
        try:
            return input(prompt)
        except EOFError:
            out.write("\n")
            return None
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    return line.rstrip("\n") if line else None


def main(argv: list[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> chat_lib.Chat:
    """Run the chat until the input ends; returns the conversation (its turns and last prompt)."""
    out = out or sys.stdout
    eval_cli.configure_logging()
    args = parse_args(argv)
    try:
        chat_lib.check_device(args.device)
        image = chat_lib.open_image(args.image_file)
        chat_lib.check_models(args, [args.model_path])
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"llava.serve.cli: {err}") from None
    model = chat_lib.load_chat_model(args, args.model_path)
    chat = chat_lib.Chat(model, image)
    sampling = chat_lib.settings(args.temperature, args.max_new_tokens, model.conv_mode, args.top_p)
    user, assistant = (display_role(r) for r in chat.roles)
    while True:
        question = read_question(f"{user}: ", stdin, out)
        if question is None or question.strip().lower() in QUIT:
            break
        if not question.strip():
            continue
        out.write(f"{assistant}: ")
        out.flush()
        try:
            answer = chat.ask(question.strip(), sampling, StreamPrinter(model.tokenizer, sampling.stop_str, out))
        except ValueError as err:
            out.write(f"\n{err}\n")
            continue
        if args.debug:
            print(json.dumps({"prompt": chat.last_prompt, "answer": answer}), file=sys.stderr, flush=True)
    return chat


if __name__ == "__main__":
    main()
