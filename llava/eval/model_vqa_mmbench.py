"""Answer MMBench (a TSV: index, question, hint, A-D, answer, category, image as base64, ...).

The prompt is the hint (when present) and the question, then one "X. option" line per option up
to the first empty one. Each TSV row is asked once, as the seed did: MMBench's TSVs already hold
every question's circular copies (rows ``index + k * 10^6`` with the options shifted), from which
the scorer and the server compute CircularEval. With ``--all-rounds`` each row is also asked once
per rotation of its options (round_id 0, 1, ...): the option texts move up one letter per round,
and the answers file records the rotated "options" and "option_char" lists. That is for a TSV
without the copies; with them it repeats the copies' prompts.

    python -m llava.eval.model_vqa_mmbench --model-path MODEL --question-file mmbench_dev_20230712.tsv \\
        --answers-file A.jsonl --single-pred-prompt --lang en --temperature 0 --conv-mode vicuna_v1
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from llava.eval import cli
from llava.eval import generation as gen
from llava.eval.eval_mmbench import CIRCULAR_OFFSET
from llava.mm_utils import load_image_from_base64, to_rgb

ALL_OPTIONS = ["A", "B", "C", "D"]
SINGLE_PRED_PROMPTS = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
REQUIRED_COLUMNS = ["index", "question", "image", *ALL_OPTIONS]
logger = logging.getLogger(__name__)


def is_none(value: Any) -> bool:
    """Empty cells (NaN) and the literal strings "nan" / "none" count as missing, as in the seed."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def get_options(row: pd.Series) -> list[str]:
    """Option texts in letter order, up to the first missing one."""
    options = []
    for letter in ALL_OPTIONS:
        if is_none(row[letter]):
            break
        options.append(row[letter])
    return options


def read_questions(path: str) -> pd.DataFrame:
    """The TSV with every cell read as text (option texts such as "1.50" stay as written)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"Question file not found: {file}")
    table = pd.read_table(file, dtype=str)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing}; an MMBench TSV has at least {REQUIRED_COLUMNS}.")
    empty = [str(row["index"]) for _, row in table.iterrows() if is_none(row["image"])]
    if empty:
        raise ValueError(f"{file}: {len(empty)} question(s) without an image (index {', '.join(empty[:10])}).")
    return table


def question_id(index: Any) -> Any:
    """The TSV index as an int when it is one (the scorers and the upload match it to the TSV)."""
    text = str(index).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def decode_rgb(image_b64: str) -> Image.Image:
    return to_rgb(load_image_from_base64(image_b64))


def question_text(row: pd.Series, options: list[str]) -> str:
    """Hint, question and the lettered options: what the answers file records as "prompt"."""
    question = row["question"]
    hint = row.get("hint")
    if not is_none(hint):
        question = hint + "\n" + question
    for letter, option in zip(ALL_OPTIONS, options):
        question = question + "\n" + letter + ". " + option
    return question


def build_requests(
    table: pd.DataFrame, conv_mode: str, model_config: Any, single_pred_prompt: bool, all_rounds: bool, lang: str
) -> list[gen.Request]:
    requests = []
    for _, row in table.iterrows():
        options = get_options(row)
        option_chars = ALL_OPTIONS[: len(options)]
        image = functools.partial(decode_rgb, row["image"])
        for round_id in range(len(options) if all_rounds else 1):
            recorded = question_text(row, options)
            qs = gen.image_prompt(recorded, model_config)
            if single_pred_prompt:
                qs = qs + "\n" + SINGLE_PRED_PROMPTS[lang]
            requests.append(
                gen.Request(
                    question_id=question_id(row["index"]),
                    prompt=gen.templated_prompt(conv_mode, qs),
                    recorded_prompt=recorded,
                    images=[image],
                    round_id=round_id,
                    extra={"options": list(options), "option_char": list(option_chars)},
                )
            )
            options = options[1:] + options[:1]
            option_chars = option_chars[1:] + option_chars[:1]
    return requests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_arguments(parser, conv_mode="llava_v1")
    parser.add_argument("--image-folder", type=str, default="", help="unused: the images are in the TSV")
    parser.add_argument("--question-file", type=str, default="tables/question.jsonl")
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    cli.add_chunk_arguments(parser)
    cli.add_generation_arguments(parser, max_new_tokens=1024)
    parser.add_argument("--all-rounds", action="store_true",
                        help="also ask every rotation of each row's options (for a TSV without circular copies)")
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument("--lang", type=str, default="en", choices=sorted(SINGLE_PRED_PROMPTS))
    return parser.parse_args(argv)


def circular_copies(table: pd.DataFrame) -> int:
    """How many rows are circular copies of another row (index >= 10^6, as MMBench numbers them)."""
    ids = [question_id(index) for index in table["index"]]
    return sum(1 for qid in ids if isinstance(qid, int) and qid >= CIRCULAR_OFFSET)


def main(argv: list[str] | None = None) -> gen.RunSummary:
    cli.configure_logging()
    args = parse_args(argv)
    questions = read_questions(args.question_file)
    copies = circular_copies(questions) if args.all_rounds else 0
    if copies:
        logger.warning("%s already holds %d circular copies (rows at index + k * 10^6): --all-rounds asks each "
                       "row in every rotation again, repeating their prompts; the scores stay the same",
                       args.question_file, copies)
    table = cli.get_chunk(questions, args.num_chunks, args.chunk_idx)
    return cli.answer_questions(
        args,
        lambda conv_mode, config: build_requests(
            table, conv_mode, config, args.single_pred_prompt, args.all_rounds, args.lang
        ),
    )


if __name__ == "__main__":
    main()
