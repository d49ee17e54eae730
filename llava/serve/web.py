"""Several checkpoints side by side in the browser: upload an image, ask, and read every answer.

    python -m llava.serve.web --model-path FT LORA DORA [--model-base BASE] [--port 7860]

One process loads every checkpoint (on one machine that is all LLaVA's controller / worker split was
for) and answers with each in turn, streaming the tokens; each keeps its own conversation about the
image, which a new image starts afresh. ``--model-base`` goes to the checkpoints that need one
(adapters, projector-only folders). The examples are benchmark questions from ``--examples``
(default: the demo's evaluation data, when it has been generated). Besides the page, ``/answer`` (for
``gradio_client``) answers one question about one image with every checkpoint.

Nothing is fetched from outside: gradio's analytics are off and the page uses its bundled assets.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import TextIteratorStreamer

from llava.eval import cli as eval_cli
from llava.mm_utils import to_rgb
from llava.serve import chat as chat_lib
from llava.serve.examples import DEMO_EVAL, Example, benchmark_examples

logger = logging.getLogger(__name__)

History = list[list[tuple[str, str]]]  # per checkpoint: (question, answer) turns


def import_gradio() -> Any:
    """gradio, with its analytics off; a clear message when the optional extra is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as err:
        raise SystemExit(
            "The web demo needs gradio, in the project's optional extra 'serve': "
            "pip install -e '.[serve]' (scripts/setup.sh installs it)."
        ) from err
    return gradio


def labels_for(paths: list[str], labels: list[str] | None) -> list[str]:
    """``--labels`` if given (distinct), else each folder's name, with as many parent folders as it takes
    to tell it from the others (the same folder twice is numbered). Labels are the API's answer keys:
    two equal ones would drop an answer."""
    if labels is not None:
        if len(labels) != len(paths):
            raise ValueError(f"--labels gives {len(labels)} name(s) for {len(paths)} --model-path(s).")
        if len(set(labels)) != len(labels):
            raise ValueError(f"--labels must be distinct (they name each checkpoint's answer): {labels}")
        return labels
    parts = [Path(p).parts or (p,) for p in paths]
    chosen = []
    for own in parts:
        depth = 1
        while depth < len(own) and sum(other[-depth:] == own[-depth:] for other in parts) > 1:
            depth += 1
        chosen.append("/".join(own[-depth:]))
    return [f"{label} ({chosen[:k].count(label) + 1})" if chosen.count(label) > 1 else label
            for k, label in enumerate(chosen)]


def stream_answer(chat: chat_lib.Chat, question: str, sampling: Any) -> Iterator[str]:
    """The answer so far, each time tokens arrive, then the final answer (as evaluation decodes it)."""
    streamer = TextIteratorStreamer(chat.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["answer"] = chat.ask(question, sampling, streamer)
        except Exception as err:  # noqa: BLE001  (any failure is re-raised in the caller below)
            outcome["error"] = err
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    partial = ""
    for piece in streamer:
        partial += piece
        stop = sampling.stop_str
        yield (partial[: partial.index(stop)] if stop and stop in partial else partial).strip()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["answer"]


class Demo:
    """The loaded checkpoints and what the page does with them."""

    def __init__(self, models: list[chat_lib.ChatModel], examples: list[Example], temperature: float = 0.0,
                 max_new_tokens: int = 128, top_p: float | None = None) -> None:
        self.models = models
        self.examples = examples
        self.temperature = temperature  # the page's starting values
        self.max_new_tokens = max_new_tokens
        self.top_p = top_p

    def _sampling(self, model: chat_lib.ChatModel, temperature: float, max_new_tokens: int) -> Any:
        return chat_lib.settings(float(temperature), int(max_new_tokens), model.conv_mode, self.top_p)

    def answer(self, image: Image.Image | str | None, question: str, temperature: float = 0.0,
               max_new_tokens: int = 128) -> dict[str, str]:
        """One question about one image, answered by every checkpoint (a fresh conversation each)."""
        image, question = self._check(image, question)
        return {
            model.label: chat_lib.Chat(model, image).ask(question, self._sampling(model, temperature, max_new_tokens))
            for model in self.models
        }

    def ask(self, image: Image.Image | str | None, question: str, temperature: float, max_new_tokens: int,
            history: History) -> Iterator[tuple[str, History]]:
        """The next turn of every conversation, one checkpoint after another, streamed."""
        image, question = self._check(image, question)
        history = [list(turns) for turns in history] if history else [[] for _ in self.models]
        for k, model in enumerate(self.models):
            chat = chat_lib.Chat(model, image, turns=list(history[k]))
            history[k].append((question, ""))
            for partial in stream_answer(chat, question, self._sampling(model, temperature, max_new_tokens)):
                history[k][-1] = (question, partial)
                yield "", [list(turns) for turns in history]  # a snapshot: the next token changes history

    @staticmethod
    def _check(image: Image.Image | str | None, question: str) -> tuple[Image.Image, str]:
        """The image as evaluation reads it: the page hands over the uploaded file's path, which is opened
        like an evaluation image (no EXIF rotation, which gradio's own PIL conversion would apply)."""
        gr = import_gradio()
        if image is None:
            raise gr.Error("Upload an image first (or pick an example below).")
        if not question or not question.strip():
            raise gr.Error("Type a question.")
        image = chat_lib.open_image(str(image)) if isinstance(image, (str, os.PathLike)) else to_rgb(image)
        return image, question.strip()

    def build(self) -> Any:
        """The page: image, question and settings on the left, one chat per checkpoint on the right."""
        gr = import_gradio()
        with gr.Blocks(title="LLaVA: checkpoints side by side") as page:
            gr.Markdown(
                "## Talk to the checkpoints\nUpload an image, ask a question: every checkpoint answers it. "
                "Follow-up questions go on with the same image; a new image starts over."
            )
            history = gr.State([])
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    # The file as uploaded (type "filepath" with no image_mode): gradio's PIL conversion would
                    # turn photos by their EXIF orientation, which evaluation and the terminal chat do not.
                    image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                     height=260, elem_id="image")
                    question = gr.Textbox(label="Question", placeholder="What colour is the shape?", lines=2,
                                          elem_id="question")
                    with gr.Row():
                        send = gr.Button("Ask", variant="primary", elem_id="ask", min_width=60)
                        clear = gr.Button("Clear", elem_id="clear", min_width=60)
                    with gr.Accordion("Generation", open=False):
                        temperature = gr.Slider(0.0, 1.5, value=self.temperature, step=0.1,
                                                label="Temperature (0: greedy)")
                        max_new_tokens = gr.Slider(1, 1024, value=self.max_new_tokens, step=1, label="Max new tokens")
                with gr.Column(scale=3), gr.Row():
                    chats = [
                        gr.Chatbot(label=model.label, elem_id=f"chat-{k}", height=360)
                        for k, model in enumerate(self.models)
                    ]
            if self.examples:
                gr.Examples(
                    examples=[[str(e.image), e.question] for e in self.examples],
                    example_labels=[f"{e.benchmark}: {e.question.splitlines()[0]}" for e in self.examples],
                    inputs=[image, question],
                    label="Examples from the benchmarks",
                )
            answers = gr.JSON(visible=False)
            api_ask = gr.Button(visible=False)

            def show(turns: History) -> list[list[dict[str, str]]]:
                return [_messages(turns[k] if k < len(turns) else []) for k in range(len(self.models))]

            def on_ask(image, text, temp, max_new, turns):
                try:
                    for cleared, updated in self.ask(image, text, temp, max_new, turns):
                        yield cleared, updated, *show(updated)
                except ValueError as err:  # e.g. an image tag in a follow-up question: said on the page
                    raise gr.Error(str(err)) from err

            inputs = [image, question, temperature, max_new_tokens, history]
            outputs = [question, history, *chats]
            # One generation at a time over the shared models, whoever asks.
            send.click(on_ask, inputs, outputs, api_visibility="private", concurrency_id="models")
            question.submit(on_ask, inputs, outputs, api_visibility="private", concurrency_id="models")
            for trigger in (clear.click, image.change):  # a new image (uploaded or an example) starts over
                # queued behind a running answer, which would otherwise repaint the chats after the reset
                trigger(lambda: ([], *show([])), None, [history, *chats], api_visibility="private",
                        concurrency_id="models")
            api_ask.click(self.answer, [image, question, temperature, max_new_tokens], answers, api_name="answer",
                          concurrency_id="models")
        return page


def _messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    messages = []
    for asked, answer in turns:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
    return messages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve"
    )
    chat_lib.add_model_arguments(parser)
    parser.add_argument("--model-path", nargs="+", required=True, help="one or more checkpoints, shown side by side")
    chat_lib.add_sampling_arguments(parser, temperature=0.0, max_new_tokens=128)
    parser.add_argument("--labels", nargs="+", help="a name per --model-path (default: the folders' names)")
    parser.add_argument("--examples", type=Path, default=None,
                        help="an evaluation folder laid out as playground/data/eval whose questions become the "
                        "page's examples (default: the demo's, when present)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (needs the internet)")
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> list[str]:
    """The checkpoints' labels, once every flag that names something has been checked: loading several
    models takes a while, and a typo in the last one should not wait for the others."""
    labels = labels_for(args.model_path, args.labels)
    if args.examples is not None and not args.examples.is_dir():
        raise FileNotFoundError(
            f"--examples {args.examples}: no such folder (an evaluation folder laid out as playground/data/eval: "
            "README.md, 'Evaluation data')."
        )
    chat_lib.check_device(args.device)
    chat_lib.check_models(args, args.model_path, route_projector=len(args.model_path) > 1)
    return labels


def check_port(host: str, port: int) -> None:
    """Refuse a port another server holds before any model loads (gradio would say so only at launch)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port}: {host}:{port} is in use (another server?); pick a free port with "
                                 "--port N.") from err
            raise ValueError(f"--host {host} --port {port}: cannot serve there ({err.strerror}).") from err


def load_demo(args: argparse.Namespace) -> Demo:
    """Every checkpoint loaded, and the examples; a wrong flag fails before any model loads."""
    labels = check_flags(args)
    examples_dir = args.examples or DEMO_EVAL
    examples = benchmark_examples(examples_dir) if examples_dir.is_dir() else []
    several = len(args.model_path) > 1
    models = [chat_lib.load_chat_model(args, path, label, route_projector=several)
              for path, label in zip(args.model_path, labels)]
    return Demo(models, examples, args.temperature, args.max_new_tokens, args.top_p)


def main(argv: list[str] | None = None) -> None:
    eval_cli.configure_logging()
    args = parse_args(argv)
    gr = import_gradio()
    try:
        check_port(args.host, args.port)
        check_flags(args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"llava.serve.web: {err}") from None
    demo = load_demo(args)
    page = demo.build()
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=args.host, server_port=args.port, share=args.share, theme=gr.themes.Default())


if __name__ == "__main__":
    main()
