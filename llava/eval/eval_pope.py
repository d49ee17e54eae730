"""POPE scorer (the seed's flags and printout), per category of llava_pope_test.jsonl.

    python -m llava.eval.eval_pope --annotation-dir pope/coco --question-file pope/llava_pope_test.jsonl \
        --result-file answers.jsonl [--metrics-json pope.json]

Labels come from ``coco_pope_<category>.json`` (JSONL with "label": yes|no). As in the seed, the
k-th question of a category in the question file takes the k-th label of that category's file; the
alignment is made through the question file, so an answers file in any order, or with questions
missing, still meets the right labels. An answer counts as "no" when the words of its first
sentence (commas dropped) include "No", "no" or "not"; anything else is "yes", the positive class.
Precision, recall and F1 are 0 where their denominator is 0 (the seed would stop with an error).
The paper's POPE figure is the mean F1 of the three categories, x100.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from llava.eval.jsonl import InputFileError, check_answers, id_key, read_jsonl, read_questions, write_json_atomic

NEGATIVE_WORDS = frozenset({"No", "no", "not"})
LABEL_PREFIX, LABEL_SUFFIX = "coco_pope_", ".json"


def parse_yes_no(text: str) -> str:
    """The seed's reading of a free-form answer: 'no' if the first sentence says no/not, else 'yes'."""
    first_sentence = text.split(".")[0].replace(",", "")
    return "no" if NEGATIVE_WORDS.intersection(first_sentence.split(" ")) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """Confusion counts and metrics (fractions) for parsed predictions against yes/no labels."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("no predictions to score")
    pairs = list(zip((p == "yes" for p in predictions), (label == "yes" for label in labels)))
    tp = sum(pred and gold for pred, gold in pairs)
    fp = sum(pred and not gold for pred, gold in pairs)
    tn = sum(not pred and not gold for pred, gold in pairs)
    fn = sum(not pred and gold for pred, gold in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs),
    }


def label_files(annotation_dir: Path) -> dict[str, Path]:
    """``{category: coco_pope_<category>.json}`` in the annotation folder, sorted by category."""
    found = sorted(annotation_dir.glob(f"{LABEL_PREFIX}*{LABEL_SUFFIX}"))
    if not found:
        raise InputFileError(f"{annotation_dir}: no {LABEL_PREFIX}<category>{LABEL_SUFFIX} label files; put POPE's "
                             "output/coco folder there (see the README's POPE section)")
    return {path.name[len(LABEL_PREFIX):-len(LABEL_SUFFIX)]: path for path in found}


def print_category(category: str, samples: int, metrics: dict[str, float | int]) -> None:
    """The seed's per-category printout of ``pope_metrics``."""
    print(f"Category: {category}, # samples: {samples}")
    print("TP\tFP\tTN\tFN\t")
    print("\t".join(str(metrics[k]) for k in ("tp", "fp", "tn", "fn")))
    for title, key in (("Accuracy", "accuracy"), ("Precision", "precision"), ("Recall", "recall"),
                       ("F1 score", "f1"), ("Yes ratio", "yes_ratio")):
        print(f"{title}: {metrics[key]}")
    print(", ".join(f"{metrics[k]:.3f}" for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")))
    print("====================================")


def evaluate_pope(annotation_dir: str | Path, question_file: str | Path,
                  result_file: str | Path) -> dict[str, dict[str, float | int]]:
    """Score every category that has a label file and answers; prints the seed's lines."""
    questions = read_questions(question_file)
    check = check_answers(result_file, [q["question_id"] for q in questions])
    files = label_files(Path(annotation_dir))
    uncovered = sorted({q.get("category", "<none>") for q in questions} - set(files))
    if uncovered:
        print(f"{question_file}: no label file for categories {', '.join(uncovered)}; not scored", file=sys.stderr)
    results = {}
    for category, label_path in files.items():
        in_category = [q for q in questions if q.get("category") == category]
        labels = read_jsonl(label_path)
        if len(labels) != len(in_category):
            raise InputFileError(
                f"{label_path} has {len(labels)} labels but {question_file} has {len(in_category)} questions of "
                f"category {category!r}; labels are matched to questions by position, so the two must come from "
                "the same POPE release")
        predictions, gold = [], []
        for number, (question, label) in enumerate(zip(in_category, labels), start=1):
            if label.get("label") not in ("yes", "no"):
                raise InputFileError(f"{label_path}:{number}: 'label' must be yes or no; use POPE's output/coco "
                                     "files (JSONL of question_id, image, text, label)")
            answer = check.answers.get(id_key(question["question_id"]))
            if answer is not None:
                predictions.append(parse_yes_no(answer["text"]))
                gold.append(label["label"])
        if not predictions:
            print(f"Category: {category}: no answers; not scored", file=sys.stderr)
            continue
        metrics = pope_metrics(predictions, gold)
        print_category(category, len(predictions), metrics)
        results[category] = metrics
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-dir", required=True, help="folder with coco_pope_<category>.json")
    parser.add_argument("--question-file", required=True, help="llava_pope_test.jsonl")
    parser.add_argument("--result-file", required=True, help="answers JSONL")
    parser.add_argument("--metrics-json", help="also write {category: {accuracy, precision, recall, f1, yes_ratio}}")
    args = parser.parse_args(argv)
    try:
        results = evaluate_pope(args.annotation_dir, args.question_file, args.result_file)
    except InputFileError as error:
        sys.exit(f"error: {error}")
    if args.metrics_json:
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        write_json_atomic(args.metrics_json, {c: {k: m[k] for k in keys} for c, m in results.items()}, indent=2)


if __name__ == "__main__":
    main()
