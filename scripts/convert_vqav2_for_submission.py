"""Write the VQAv2 upload for the test-dev answers (the seed's script, its flags and defaults kept).

    python scripts/convert_vqav2_for_submission.py --split llava_vqav2_mscoco_test-dev2015 --ckpt NAME \
        [--dir ./playground/data/eval/vqav2]

reads <dir>/answers/<split>/<ckpt>/merge.jsonl and <dir>/llava_vqav2_mscoco_test2015.jsonl and writes
<dir>/answers_upload/<split>/<ckpt>.json: a JSON list with one {"question_id", "answer"} per question of
the whole test2015 split, in its order; the answer is normalised by the official processor, "" where the
question was not answered (the server requires every test2015 question). The DoRA seed's eval script
split the folder in two: --save_dir (answers and upload) and --eval_dir (question files). Each file can
also be named directly (--answers-file, --question-file, --test-split-file, --output-file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava.eval.answer_processor import normalize_answer
from llava.eval.jsonl import InputFileError, check_answers, id_key, read_questions, write_json_atomic

TEST_SPLIT_NAME = "llava_vqav2_mscoco_test2015.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="./playground/data/eval/vqav2", help="the seed's VQAv2 folder")
    parser.add_argument("--ckpt", help="checkpoint name (answers/<split>/<ckpt>/merge.jsonl)")
    parser.add_argument("--split", help="answered split, e.g. llava_vqav2_mscoco_test-dev2015")
    parser.add_argument("--save-dir", "--save_dir", dest="save_dir", help="folder of answers/ and answers_upload/")
    parser.add_argument("--eval-dir", "--eval_dir", dest="eval_dir", help="folder of the question files")
    parser.add_argument("--answers-file", help="answers JSONL (default <save-dir>/answers/<split>/<ckpt>/merge.jsonl)")
    parser.add_argument("--question-file", help="the answered questions (default <eval-dir>/<split>.jsonl if present)")
    parser.add_argument("--test-split-file", help=f"the full test split (default <eval-dir>/{TEST_SPLIT_NAME})")
    parser.add_argument("--output-file", help="upload JSON (default <save-dir>/answers_upload/<split>/<ckpt>.json)")
    args = parser.parse_args(argv)
    save_dir = Path(args.save_dir or args.dir)
    eval_dir = Path(args.eval_dir or args.dir)
    if (args.answers_file is None or args.output_file is None) and not (args.split and args.ckpt):
        parser.error("give --split and --ckpt, or both --answers-file and --output-file")
    if args.answers_file is None:
        args.answers_file = save_dir / "answers" / args.split / args.ckpt / "merge.jsonl"
    if args.output_file is None:
        args.output_file = save_dir / "answers_upload" / args.split / f"{args.ckpt}.json"
    if args.question_file is None and args.split and (eval_dir / f"{args.split}.jsonl").is_file():
        args.question_file = eval_dir / f"{args.split}.jsonl"
    if args.test_split_file is None:
        args.test_split_file = eval_dir / TEST_SPLIT_NAME
    return args


def build_upload(answers: dict[str, dict], test_split: list[dict]) -> list[dict]:
    """One entry per test2015 question, in its order; "" for unanswered questions."""
    return [{"question_id": q["question_id"],
             "answer": normalize_answer(answers[id_key(q["question_id"])]["text"])
             if id_key(q["question_id"]) in answers else ""}
            for q in test_split]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.question_file is not None:
            answered = [q["question_id"] for q in read_questions(args.question_file)]
            check_answers(args.answers_file, answered)
        test_split = read_questions(args.test_split_file)
        answers = check_answers(args.answers_file, [q["question_id"] for q in test_split], report=False)
    except InputFileError as error:
        sys.exit(f"error: {error}")
    if answers.unknown:
        print(f"{args.answers_file}: {len(answers.unknown)} answer(s) for questions not in {args.test_split_file}, "
              f"left out of the upload (first: {', '.join(answers.unknown[:5])})", file=sys.stderr)
    print(f"total results: {len(answers.answers) + len(answers.unknown)}, total split: {len(test_split)}, "
          "error_line: 0")
    write_json_atomic(args.output_file, build_upload(answers.answers, test_split))


if __name__ == "__main__":
    main()
