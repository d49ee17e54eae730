"""TextVQA scorer (the seed's flags and printout): VQA soft accuracy against TextVQA_0.5.1_val.json.

    python -m llava.eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json \
        (--result-file answers.jsonl | --result-dir DIR) [--metrics-json textvqa.json]

Answers are matched to annotations by (question_id, question): the question_id is TextVQA's
image_id and the question is taken from the answer's prompt (``question_from_prompt``), both
lowercased, as the seed matched them. Prediction and the 10 human answers are normalised with the
official processor; a question scores the mean over the 10 leave-one-out subsets of
min(1, matches / 3). Accuracy is the mean over every answer line that found an annotation, in
percent, as the seed's m4c evaluation: a question asked twice on one image (the same text) is two
lines and both count, each scored against the annotation listed last for that pair, as the seed's
lookup. Answers without an annotation are reported on stderr and left out, where the seed stopped
with a KeyError.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from llava.eval.answer_processor import leave_one_out_accuracy, normalize_answer
from llava.eval.jsonl import InputFileError, id_key, read_json, read_jsonl, write_json_atomic

_OCR_TOKENS_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: str) -> str:
    """The question inside a TextVQA prompt, lowercased. Three layouts: "OCR tokens: ... Question: ...
    Short answer:", "Reference OCR token: ..." with the question on the next line, or the question first."""
    if prompt.startswith("OCR tokens: "):
        match = _OCR_TOKENS_QUESTION.search(prompt)
        if match is None:
            raise ValueError(f"prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:': {prompt!r}")
        return match.group(1).lower()
    lines = prompt.split("\n")
    if prompt.startswith("Reference OCR token:") and len(lines) > 1:
        return lines[1].lower()
    return lines[0].lower()


def textvqa_accuracy(annotation_file: str | Path, result_file: str | Path) -> tuple[float, int]:
    """(accuracy in percent, number of answers scored) for one answers file."""
    data = read_json(annotation_file)
    if not isinstance(data, dict) or "data" not in data:
        raise InputFileError(f"{annotation_file}: expected TextVQA's {{'data': [...]}} annotation file")
    references = {(id_key(item["image_id"]), item["question"].lower()): item["answers"] for item in data["data"]}
    # question_id is an image id, shared by all questions on that image: the key includes the question.
    answers: list[tuple[tuple[str, str], str]] = []
    for number, record in enumerate(read_jsonl(result_file), start=1):
        if not {"question_id", "prompt", "text"} <= record.keys():
            raise InputFileError(f"{result_file}: answer {number} lacks question_id, prompt or text")
        answers.append(((id_key(record["question_id"]), question_from_prompt(record["prompt"])), record["text"]))
    scores, unmatched = [], []
    for key, text in answers:
        gold = references.get(key)
        if gold is None:
            unmatched.append(f"{key[0]} {key[1]!r}")
            continue
        scores.append(leave_one_out_accuracy(normalize_answer(text), [normalize_answer(a) for a in gold]))
    if unmatched:
        print(f"{result_file}: {len(unmatched)} answer(s) match no (image_id, question) of {annotation_file}, "
              f"not scored (first: {'; '.join(unmatched[:5])})", file=sys.stderr)
    if len(scores) < len(data["data"]):
        print(f"{result_file}: {len(data['data']) - len(scores)} annotated question(s) have no answer", file=sys.stderr)
    if not scores:
        raise InputFileError(f"{result_file}: no answer matches an annotation of {annotation_file}")
    return 100.0 * sum(scores) / len(scores), len(scores)


def eval_single(annotation_file: str | Path, result_file: str | Path) -> tuple[float, int]:
    """Score one file and print the seed's lines (experiment name, samples, accuracy)."""
    print(Path(result_file).stem)
    accuracy, samples = textvqa_accuracy(annotation_file, result_file)
    print(f"Samples: {samples}\nAccuracy: {accuracy:.2f}%\n")
    return accuracy, samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    parser.add_argument("--result-file", help="answers JSONL")
    parser.add_argument("--result-dir", help="score every .jsonl file in this folder")
    parser.add_argument("--metrics-json", help="also write {accuracy (percent), samples} for --result-file")
    args = parser.parse_args(argv)
    if args.result_file is None and args.result_dir is None:
        parser.error("give --result-file or --result-dir")
    if args.metrics_json and args.result_file is None:
        parser.error("--metrics-json describes --result-file; give it")
    try:
        if args.result_file is not None:
            accuracy, samples = eval_single(args.annotation_file, args.result_file)
            if args.metrics_json:
                write_json_atomic(args.metrics_json, {"accuracy": accuracy, "samples": samples}, indent=2)
        if args.result_dir is not None:
            for path in sorted(Path(args.result_dir).iterdir()):
                if path.suffix != ".jsonl":
                    print(f"Skipping {path.name}")
                    continue
                eval_single(args.annotation_file, path)
    except InputFileError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
