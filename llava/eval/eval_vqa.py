"""Local VQA accuracy for VQAv2 and VizWiz, given annotations in their official formats.

    python -m llava.eval.eval_vqa --annotation-file ANNOTATIONS \
        (--result-file answers.jsonl [--question-file questions.jsonl] | --upload-file upload.json) \
        [--metrics-json vqa.json]

The test splits are scored only by the evaluation servers; this scores a split whose answers you
have (VQAv2 val, VizWiz val) the way those servers do:

- annotations: VQAv2's ``{"annotations": [{"question_id", "answers": [{"answer"}...], "answer_type"}]}``
  (questions keyed by question_id) or VizWiz's list of ``{"image", "answers": [{"answer",
  "answer_confidence"}], "answer_type", ...}`` (keyed by image file name; an answers JSONL then
  needs ``--question-file`` to map question_id to image);
- a prediction is the upload's answer: ``normalize_answer(text)`` for an answers JSONL, the answer
  as written for an upload file; a question without one is scored with "" (as the converter
  uploads it);
- per question, as each benchmark's official evaluation code does:
  - VQAv2 (the VQA evaluation's ``evaluate``): newlines/tabs become spaces and the ends are
    stripped, in the prediction and the human answers; when the human answers are then not all the
    same, they and the prediction go through the punctuation and number/article steps, otherwise
    all are compared as they are;
  - VizWiz (VizWiz's ``evaluate``): the prediction is cleaned the same way and always goes through
    those steps; the human answers are compared as written (VizWiz's copies of the contraction
    table differ in their apostrophes; the VQA table is used);
  and the score is the mean over the ten leave-one-out subsets of min(1, matches / 3). (VQAv2's
  code leaves out every answer record equal to the left-out one; its records carry distinct
  answer ids, so that is one answer, as VizWiz's index-based loop does.)

Accuracy is the mean over the annotated questions (those of ``--question-file`` when given), in percent.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from llava.eval.answer_processor import (
    leave_one_out_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
)
from llava.eval.jsonl import InputFileError, check_answers, id_key, read_json, read_questions, write_json_atomic


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process(text: str) -> str:
    return process_digit_article(process_punctuation(text))


def vqa_score(prediction: str, human_answers: Sequence[str]) -> float:
    """One VQAv2 question's official accuracy for an uploaded (already normalised) prediction."""
    prediction = _clean(prediction)
    references = [_clean(answer) for answer in human_answers]
    if len(set(references)) > 1:
        references = [_process(answer) for answer in references]
        prediction = _process(prediction)
    return leave_one_out_accuracy(prediction, references)


def vizwiz_score(prediction: str, human_answers: Sequence[str]) -> float:
    """One VizWiz question's official accuracy: only the prediction is processed, never the humans' answers."""
    return leave_one_out_accuracy(_process(_clean(prediction)), list(human_answers))


SCORERS = {"vqav2": vqa_score, "vizwiz": vizwiz_score}


def load_annotations(path: str | Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """("vqav2" | "vizwiz", {key: annotation}); the key is the question id or the image file name."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return "vqav2", {id_key(a["question_id"]): a for a in data["annotations"]}
    if isinstance(data, list) and all(isinstance(a, dict) and "image" in a and "answers" in a for a in data):
        return "vizwiz", {a["image"]: a for a in data}
    raise InputFileError(f"{path}: neither VQAv2 annotations ({{'annotations': [...]}}) nor a VizWiz list of "
                         "{image, answers, ...}")


def predictions_from_answers(kind: str, result_file: str | Path,
                             question_file: str | Path | None) -> tuple[dict[str, str], list[str] | None]:
    """Normalised predictions keyed like the annotations, and the keys of the question file (if any)."""
    questions = read_questions(question_file) if question_file else None
    if kind == "vizwiz" and questions is None:
        raise InputFileError("VizWiz annotations are keyed by image: give --question-file so that each answer's "
                             "question_id can be mapped to its image")
    answers = check_answers(result_file, None if questions is None else [q["question_id"] for q in questions]).answers
    predictions = {qid: normalize_answer(a["text"]) for qid, a in answers.items()}
    if questions is None:
        return predictions, None
    if kind == "vqav2":
        return predictions, [id_key(q["question_id"]) for q in questions]
    image_of = {id_key(q["question_id"]): q["image"] for q in questions}
    return {image_of[qid]: text for qid, text in predictions.items()}, list(image_of.values())


def predictions_from_upload(kind: str, upload_file: str | Path) -> dict[str, str]:
    """An upload file's answers keyed like the annotations."""
    key = "question_id" if kind == "vqav2" else "image"
    data = read_json(upload_file)
    if not isinstance(data, list) or not all(isinstance(x, dict) and key in x and "answer" in x for x in data):
        raise InputFileError(f"{upload_file}: expected a {kind} upload, a list of {{{key}, answer}}")
    return {id_key(x[key]): x["answer"] for x in data}


def annotation_kind(annotations: dict[str, dict[str, Any]]) -> str:
    """"vqav2" or "vizwiz": VizWiz records name their image and have no question id."""
    first = next(iter(annotations.values()), {})
    return "vizwiz" if "image" in first and "question_id" not in first else "vqav2"


def vqa_accuracy(annotations: dict[str, dict[str, Any]], predictions: dict[str, str],
                 keys: Sequence[str] | None = None, kind: str | None = None) -> dict[str, Any]:
    """{"accuracy": percent, "questions": n, "per_answer_type": {type: percent}} over ``keys``.

    ``kind`` ("vqav2" | "vizwiz", read from the annotations when None) picks the official per-question rule.
    """
    score_question = SCORERS[kind or annotation_kind(annotations)]
    keys = list(annotations) if keys is None else [k for k in keys if k in annotations]
    if not keys:
        raise InputFileError("no annotated question to score: do the answers and the annotations share ids?")
    unknown = [k for k in predictions if k not in annotations]
    missing = [k for k in keys if k not in predictions]
    if unknown:
        print(f"{len(unknown)} prediction(s) for questions without an annotation, ignored "
              f"(first: {', '.join(unknown[:5])})", file=sys.stderr)
    if missing:
        print(f"{len(missing)} annotated question(s) without a prediction, scored as '' "
              f"(first: {', '.join(missing[:5])})", file=sys.stderr)
    by_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for key in keys:
        annotation = annotations[key]
        score = score_question(predictions.get(key, ""), [a["answer"] for a in annotation["answers"]])
        scores.append(score)
        by_type[annotation.get("answer_type", "all")].append(score)
    return {
        "accuracy": 100.0 * sum(scores) / len(scores),
        "questions": len(scores),
        "per_answer_type": {t: 100.0 * sum(s) / len(s) for t, s in sorted(by_type.items())},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True, help="VQAv2 annotations JSON or VizWiz val JSON")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--result-file", help="answers JSONL")
    source.add_argument("--upload-file", help="an upload file (what the converter wrote)")
    parser.add_argument("--question-file", help="question JSONL: restricts the questions scored; maps ids to images")
    parser.add_argument("--metrics-json", help="also write {accuracy (percent), questions, per_answer_type}")
    args = parser.parse_args(argv)
    try:
        kind, annotations = load_annotations(args.annotation_file)
        if args.result_file:
            predictions, keys = predictions_from_answers(kind, args.result_file, args.question_file)
        else:
            predictions = predictions_from_upload(kind, args.upload_file)
            keys = None
            if args.question_file:
                field = "question_id" if kind == "vqav2" else "image"
                keys = [id_key(q[field]) for q in read_questions(args.question_file)]
        metrics = vqa_accuracy(annotations, predictions, keys, kind)
    except InputFileError as error:
        sys.exit(f"error: {error}")
    print(f"Questions: {metrics['questions']}\nAccuracy: {metrics['accuracy']:.2f}%")
    for answer_type, accuracy in metrics["per_answer_type"].items():
        print(f"Accuracy ({answer_type}): {accuracy:.2f}%")
    if args.metrics_json:
        write_json_atomic(args.metrics_json, metrics, indent=2)


if __name__ == "__main__":
    main()
