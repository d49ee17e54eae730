"""ScienceQA scorer (the seed's flags, printout and output files) over one split of problems.json.

    python -m llava.eval.eval_science_qa --base-dir scienceqa --result-file answers.jsonl \
        --output-file details.json --output-result result.json [--split test] [--metrics-json sqa.json]

The predicted letter is parsed as the seed did (``parse_option_letter``); a letter beyond the
problem's choices, an unparsable answer and a missing answer are all wrong. Accuracy is over every
problem of the split; IMG-accuracy over the answered problems whose prompt contains "<image>" (the
paper's SQA figure). Both are printed in percent.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from llava.eval.jsonl import InputFileError, check_answers, read_json, write_json_atomic

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
# As in the seed the "." is a regex wildcard: any one character must follow the letter.
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_option_letter(text: str, options: Sequence[str] = OPTIONS) -> str:
    """The answer's letter: the whole text if it is an option, else "X. ..." -> X, else the single
    "The answer is X." match, else FAILED."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    matches = _THE_ANSWER_IS.findall(text)
    return matches[0] if len(matches) == 1 else FAILED


def letter_index(letter: str, num_choices: int, options: Sequence[str] = OPTIONS) -> int:
    """Index of the letter among the problem's choices, -1 if it names none of them."""
    present = list(options[:num_choices])
    return present.index(letter) if letter in present else -1


def score_science_qa(base_dir: str | Path, result_file: str | Path, split: str = "test") -> dict[str, Any]:
    """Per-problem analysis and totals; the keys mirror the seed's two output files."""
    base_dir = Path(base_dir)
    splits = read_json(base_dir / "pid_splits.json")
    problems = read_json(base_dir / "problems.json")
    if split not in splits:
        raise InputFileError(f"{base_dir / 'pid_splits.json'}: no split {split!r} (has {', '.join(splits)})")
    split_ids = splits[split]
    unknown = [pid for pid in split_ids if pid not in problems]
    if unknown:
        raise InputFileError(f"{base_dir / 'problems.json'}: {len(unknown)} problem(s) of split {split!r} missing "
                             f"(first: {', '.join(unknown[:5])}); use the problems.json that came with pid_splits.json")
    answers = check_answers(result_file, split_ids, require=("text", "prompt")).answers
    correct, incorrect, parsed, outputs = [], [], {}, {}
    for pid in split_ids:
        problem = problems[pid]
        answer = answers.get(pid, {"text": FAILED, "prompt": "Unknown"})
        letter = parse_option_letter(answer["text"])
        index = letter_index(letter, len(problem["choices"]))
        analysis = {
            "question_id": pid,
            "parsed_ans": letter,
            "ground_truth": OPTIONS[problem["answer"]],
            "question": answer["prompt"],
            "pred": answer["text"],
            "is_multimodal": "<image>" in answer["prompt"],
        }
        (correct if index == problem["answer"] else incorrect).append(analysis)
        parsed[pid] = index
        outputs[pid] = answer["text"]
    total = len(correct) + len(incorrect)
    image_correct = sum(a["is_multimodal"] for a in correct)
    image_total = image_correct + sum(a["is_multimodal"] for a in incorrect)
    return {
        "details": {"correct": correct, "incorrect": incorrect},
        "result": {"acc": 100.0 * len(correct) / total if total else 0.0, "correct": len(correct), "count": total,
                   "results": parsed, "outputs": outputs},
        "total": total,
        "correct": len(correct),
        "accuracy": 100.0 * len(correct) / total if total else None,
        "img_accuracy": 100.0 * image_correct / image_total if image_total else None,
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, help="answers JSONL (question_id = problem id)")
    parser.add_argument("--output-file", help="write the per-problem analysis ({correct: [...], incorrect: [...]})")
    parser.add_argument("--output-result", help="write {acc, correct, count, results, outputs}")
    parser.add_argument("--split", default="test")
    parser.add_argument("--metrics-json", help="also write {accuracy, img_accuracy, total} (percent)")
    args = parser.parse_args(argv)
    try:
        scored = score_science_qa(args.base_dir, args.result_file, args.split)
    except InputFileError as error:
        sys.exit(f"error: {error}")
    if scored["total"] == 0:
        sys.exit(f"error: split {args.split!r} has no problems")
    print(f"Total: {scored['total']}, Correct: {scored['correct']}, Accuracy: {_percent(scored['accuracy'])}, "
          f"IMG-Accuracy: {_percent(scored['img_accuracy'])}")
    if args.output_file:
        write_json_atomic(args.output_file, scored["details"], indent=2)
    if args.output_result:
        write_json_atomic(args.output_result, scored["result"], indent=2)
    if args.metrics_json:
        write_json_atomic(args.metrics_json, {k: scored[k] for k in ("accuracy", "img_accuracy", "total")}, indent=2)


if __name__ == "__main__":
    main()
