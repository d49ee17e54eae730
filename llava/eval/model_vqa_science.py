"""Answer ScienceQA (llava_test_CQM-A.json: a JSON list of {"id", "image"?, "conversations"}).

The prompt is the human turn without its ``<image>`` tag; questions with an image put the tag back
in front. Images go through the plain CLIP processor (no square padding), as the seed's script did.
The answers file records "prompt" with "<image>\\n" in front for image questions: the scorer's
IMG-accuracy counts those.

    python -m llava.eval.model_vqa_science --model-path MODEL --question-file llava_test_CQM-A.json \\
        --image-folder scienceqa/images/test --answers-file A.jsonl --single-pred-prompt \\
        --temperature 0 --conv-mode vicuna_v1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval import cli
from llava.eval import generation as gen

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def read_questions(path: str) -> list[dict[str, Any]]:
    """The question list, each item checked for an id and a first (human) turn."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"Question file not found: {file}")
    try:
        questions = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err.msg}, line {err.lineno}, column {err.colno}).") from None
    if not isinstance(questions, list):
        raise ValueError(f"{file}: expected a JSON list of questions, got {type(questions).__name__}.")
    for number, question in enumerate(questions, start=1):
        if not isinstance(question, dict) or "id" not in question or not question.get("conversations"):
            raise ValueError(f"{file}: item {number} needs an 'id' and a non-empty 'conversations' list.")
    return questions


def image_path(image_folder: str, question: dict[str, Any]) -> str:
    return os.path.join(os.path.expanduser(image_folder), question["image"])


def build_request(
    question: dict[str, Any], image_folder: str, conv_mode: str, model_config: Any, single_pred_prompt: bool
) -> gen.Request:
    text = question["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    qs, recorded = text, text
    images = []
    if "image" in question:
        images = [functools.partial(gen.open_rgb, image_path(image_folder, question))]
        qs = gen.image_prompt(qs, model_config)
        recorded = DEFAULT_IMAGE_TOKEN + "\n" + recorded
    if single_pred_prompt:
        qs = qs + "\n" + SINGLE_PRED_PROMPT
        recorded = recorded + "\n" + SINGLE_PRED_PROMPT
    return gen.Request(
        question_id=question["id"],
        prompt=gen.templated_prompt(conv_mode, qs),
        recorded_prompt=recorded,
        images=images,
    )


def build_requests(
    questions: Sequence[dict[str, Any]], image_folder: str, conv_mode: str, model_config: Any, single_pred_prompt: bool
) -> list[gen.Request]:
    return [build_request(q, image_folder, conv_mode, model_config, single_pred_prompt) for q in questions]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_arguments(parser, conv_mode="llava_v0")
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.json")
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    cli.add_chunk_arguments(parser)
    cli.add_generation_arguments(parser, max_new_tokens=1024)
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument(
        "--answer-prompter", action="store_true",
        help="the seed's two-pass chain-of-thought prompt for LLaVA-v0; not supported",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> gen.RunSummary:
    cli.configure_logging()
    args = parse_args(argv)
    if args.answer_prompter:
        raise SystemExit("--answer-prompter (the seed's two-pass LLaVA-v0 reasoning prompt) is not supported.")
    questions = cli.get_chunk(read_questions(args.question_file), args.num_chunks, args.chunk_idx)
    cli.check_images_exist((q["id"], image_path(args.image_folder, q)) for q in questions if "image" in q)
    return cli.answer_questions(
        args,
        lambda conv_mode, config: build_requests(
            questions, args.image_folder, conv_mode, config, args.single_pred_prompt
        ),
        preprocessing="plain",
        switch_plain_template=False,
    )


if __name__ == "__main__":
    main()
