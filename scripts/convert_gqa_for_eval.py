"""Convert GQA answers for the official eval.py (the seed's script and flags).

    python scripts/convert_gqa_for_eval.py --src merge.jsonl --dst gqa/data/testdev_balanced_predictions.json

writes [{"questionId", "prediction"}], the prediction being the answer text with trailing "." removed,
lowercased; a question answered twice keeps its last answer.
"""

from __future__ import annotations

import argparse
import sys

from llava.eval.eval_gqa import predictions_from_answers
from llava.eval.jsonl import InputFileError, write_json_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="answers JSONL")
    parser.add_argument("--dst", required=True, help="predictions JSON to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        predictions = predictions_from_answers(args.src)
    except InputFileError as error:
        sys.exit(f"error: {error}")
    write_json_atomic(args.dst, predictions)


if __name__ == "__main__":
    main()
