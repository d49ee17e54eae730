"""Write the VizWiz upload (the seed's script and flags).

    python scripts/convert_vizwiz_for_submission.py --annotation-file vizwiz/llava_test.jsonl \
        --result-file answers.jsonl --result-upload-file answers_upload/NAME.json

The upload is a JSON list with one {"image", "answer"} per question of the question file, in its order,
the answer normalised by the official processor. The seed stopped when a question had no answer; here
such questions get "" and are reported, so the file can still be checked (the server wants them all).
"""

from __future__ import annotations

import argparse
import sys

from llava.eval.answer_processor import normalize_answer
from llava.eval.jsonl import InputFileError, check_answers, id_key, read_questions, write_json_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True, help="the question file, llava_test.jsonl")
    parser.add_argument("--result-file", required=True, help="answers JSONL")
    parser.add_argument("--result-upload-file", required=True, help="upload JSON to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        questions = read_questions(args.annotation_file)
        check = check_answers(args.result_file, [q["question_id"] for q in questions])
    except InputFileError as error:
        sys.exit(f"error: {error}")
    print(f"total results: {len(check.answers) + len(check.unknown)}, total split: {len(questions)}, error_line: 0")
    upload = []
    for question in questions:
        answer = check.answers.get(id_key(question["question_id"]))
        upload.append({"image": question["image"], "answer": normalize_answer(answer["text"]) if answer else ""})
    write_json_atomic(args.result_upload_file, upload)


if __name__ == "__main__":
    main()
