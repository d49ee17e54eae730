"""Answer a JSONL question file (VQAv2, GQA, VizWiz, TextVQA, POPE) with a LLaVA model.

Questions are ``{"question_id", "image", "text"}`` lines; each prompt is the image tag, a newline and
the text, in the conversation template; images are preprocessed as the model was trained (pad).
The answers file records "prompt" as the question text, as the seed did.

    python -m llava.eval.model_vqa_loader --model-path MODEL --question-file Q.jsonl \\
        --image-folder IMAGES --answers-file A.jsonl --temperature 0 --conv-mode vicuna_v1
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any, Sequence

from llava.eval import cli
from llava.eval import generation as gen
from llava.eval.jsonl import read_jsonl


def _question_field(question: dict[str, Any], key: str, number: int, path: str) -> Any:
    if key not in question:
        raise ValueError(f"{path}: question {number} (id {question.get('question_id')!r}) has no {key!r} field.")
    return question[key]


def read_questions(path: str) -> list[dict[str, Any]]:
    """Question lines, each checked for the fields this script reads."""
    questions = read_jsonl(path)
    for number, question in enumerate(questions, start=1):
        for key in ("question_id", "image", "text"):
            _question_field(question, key, number, path)
    return questions


def image_path(image_folder: str, question: dict[str, Any]) -> str:
    return os.path.join(os.path.expanduser(image_folder), question["image"])


def build_requests(
    questions: Sequence[dict[str, Any]], image_folder: str, conv_mode: str, model_config: Any
) -> list[gen.Request]:
    return [
        gen.Request(
            question_id=q["question_id"],
            prompt=gen.templated_prompt(conv_mode, gen.image_prompt(q["text"], model_config)),
            recorded_prompt=q["text"],
            images=[functools.partial(gen.open_rgb, image_path(image_folder, q))],
        )
        for q in questions
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_arguments(parser, conv_mode="llava_v1")
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.jsonl")
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    cli.add_chunk_arguments(parser)
    cli.add_generation_arguments(parser, max_new_tokens=128)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> gen.RunSummary:
    cli.configure_logging()
    args = parse_args(argv)
    questions = cli.get_chunk(read_questions(args.question_file), args.num_chunks, args.chunk_idx)
    cli.check_images_exist((q["question_id"], image_path(args.image_folder, q)) for q in questions)
    return cli.answer_questions(
        args, lambda conv_mode, config: build_requests(questions, args.image_folder, conv_mode, config)
    )


if __name__ == "__main__":
    main()
