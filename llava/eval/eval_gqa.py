"""GQA accuracy: locally from the official questions file, or by the official eval.py as the seed ran it.

    python -m llava.eval.eval_gqa --questions gqa/data/testdev_balanced_questions.json \
        (--predictions testdev_balanced_predictions.json | --result-file answers.jsonl) \
        [--official-dir gqa/data [--work-dir DIR]] [--metrics-json gqa.json]

Local accuracy: exact match of the prediction (as ``scripts/convert_gqa_for_eval.py`` writes it:
trailing "." removed, lowercased) and the question's "answer", over the balanced questions of the
file (every question of testdev_balanced); a question without a prediction is wrong. This is the
"Accuracy" the official eval.py prints. With ``--official-dir`` the official eval.py found there
(``eval/eval.py`` or ``eval.py``) is also run as the seed ran it (``python eval/eval.py --tier TIER``
reading ``<tier>_predictions.json`` and the other data files from its working folder), but from a
working folder of its own (``--work-dir``, default beside the predictions) that links every entry of
the GQA data folder and holds the predictions: nothing is written into the evaluation data, so two
checkpoints evaluated at once cannot overwrite each other's predictions.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from llava.eval.jsonl import InputFileError, id_key, read_answers, read_json, write_json_atomic

_ACCURACY_LINE = re.compile(r"^Accuracy:\s*([0-9.]+)%", re.MULTILINE)


def gqa_prediction(text: str) -> str:
    """What the GQA converter submits for an answer text."""
    return text.rstrip(".").lower()


def predictions_from_answers(result_file: str | Path) -> list[dict[str, Any]]:
    """The converter's [{"questionId", "prediction"}] list from an answers JSONL (last answer wins)."""
    answers, duplicates = read_answers(result_file)
    if duplicates:
        print(f"{result_file}: {duplicates} duplicated answer(s); the last answer of each question is used",
              file=sys.stderr)
    return [{"questionId": a["question_id"], "prediction": gqa_prediction(a["text"])} for a in answers.values()]


def gqa_accuracy(questions: dict[str, dict[str, Any]], predictions: Iterable[dict[str, Any]]) -> tuple[float, int]:
    """(accuracy in percent, number of questions) over the balanced questions."""
    predicted = {id_key(p["questionId"]): p["prediction"] for p in predictions}
    scored = {qid: q for qid, q in questions.items() if q.get("isBalanced", True)}
    if not scored:
        raise InputFileError("the GQA questions file has no balanced questions to score")
    missing = [qid for qid in scored if qid not in predicted]
    unknown = [qid for qid in predicted if qid not in questions]
    if missing:
        print(f"{len(missing)} GQA question(s) without a prediction, counted wrong (first: {', '.join(missing[:5])})",
              file=sys.stderr)
    if unknown:
        print(f"{len(unknown)} prediction(s) for questions not in the questions file, ignored "
              f"(first: {', '.join(unknown[:5])})", file=sys.stderr)
    correct = sum(predicted.get(qid) == q["answer"] for qid, q in scored.items())
    return 100.0 * correct / len(scored), len(scored)


def find_official_eval(gqa_dir: str | Path) -> Path | None:
    """The official eval.py under the GQA data folder, if the user installed it."""
    for candidate in (Path(gqa_dir) / "eval" / "eval.py", Path(gqa_dir) / "eval.py"):
        if candidate.is_file():
            return candidate
    return None


def official_work_dir(predictions_file: str | Path, tier: str = "testdev_balanced") -> Path:
    """The default working folder of the official eval.py: beside the predictions."""
    return Path(predictions_file).resolve().parent / f"{tier}_official_eval"


def mirror_data_folder(gqa_dir: Path, work_dir: Path, predictions_file: Path, tier: str) -> None:
    """Make ``work_dir`` look like the GQA data folder (a link per entry) with these predictions in it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / f"{tier}_predictions.json"
    for entry in gqa_dir.iterdir():
        link = work_dir / entry.name
        if entry.resolve() == work_dir.resolve() or link == target or link.is_symlink() or link.exists():
            continue
        link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(predictions_file, temporary)
    temporary.replace(target)


def run_official_eval(gqa_dir: str | Path, predictions_file: str | Path, tier: str = "testdev_balanced",
                      work_dir: str | Path | None = None) -> tuple[str, float | None]:
    """Run the official eval.py like the seed (``python eval/eval.py --tier TIER`` in a folder holding the
    GQA data and ``<tier>_predictions.json``), from ``work_dir``, which mirrors ``gqa_dir`` (see
    ``mirror_data_folder``); ``gqa_dir`` itself is only read.

    Returns the script's output and the accuracy it printed (None if no "Accuracy: X%" line).
    """
    gqa_dir = Path(gqa_dir).resolve()
    script = find_official_eval(gqa_dir)
    if script is None:
        raise InputFileError(f"{gqa_dir}: no eval/eval.py or eval.py; get GQA's evaluation script (see the README's "
                             "GQA section) or use the local accuracy")
    work_dir = Path(work_dir) if work_dir is not None else official_work_dir(predictions_file, tier)
    mirror_data_folder(gqa_dir, work_dir, Path(predictions_file), tier)
    completed = subprocess.run([sys.executable, str(script), "--tier", tier], cwd=work_dir,
                               capture_output=True, text=True)
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {completed.returncode}):\n{output}")
    match = _ACCURACY_LINE.search(completed.stdout)
    return output, float(match.group(1)) if match else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", required=True, help="official testdev_balanced_questions.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", help="converted predictions [{questionId, prediction}]")
    source.add_argument("--result-file", help="answers JSONL (converted on the fly)")
    parser.add_argument("--official-dir", help="also run the official eval.py found in this folder (gqa/data)")
    parser.add_argument("--work-dir", help="with --official-dir: the official script's working folder, mirroring the "
                        "data folder (default: beside the predictions, or the answers file)")
    parser.add_argument("--tier", default="testdev_balanced")
    parser.add_argument("--metrics-json", help="also write {accuracy (percent), questions}")
    args = parser.parse_args(argv)
    try:
        questions = read_json(args.questions)
        if not isinstance(questions, dict):
            raise InputFileError(f"{args.questions}: expected the official {{questionId: question}} object")
        if args.predictions:
            predictions = read_json(args.predictions)
            if not isinstance(predictions, list):
                raise InputFileError(f"{args.predictions}: expected a list of {{questionId, prediction}}")
        else:
            predictions = predictions_from_answers(args.result_file)
        accuracy, count = gqa_accuracy(questions, predictions)
        print(f"Questions: {count}\nAccuracy: {accuracy:.2f}%")
        if args.official_dir:
            predictions_file = args.predictions
            if predictions_file is None:
                predictions_file = Path(args.result_file).resolve().parent / f"{args.tier}_predictions.json"
                write_json_atomic(predictions_file, predictions)
            output, _ = run_official_eval(args.official_dir, predictions_file, args.tier, args.work_dir)
            print(output, end="")
    except (InputFileError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    if args.metrics_json:
        write_json_atomic(args.metrics_json, {"accuracy": accuracy, "questions": count}, indent=2)


if __name__ == "__main__":
    main()
