"""Write the MMBench upload spreadsheet (the seed's script and flags).

    python scripts/convert_mmbench_for_submission.py --annotation-file mmbench_dev_20230712.tsv \
        --result-dir answers/mmbench_dev_20230712 --upload-dir answers_upload/mmbench_dev_20230712 --experiment NAME

reads <result-dir>/<experiment>.jsonl and writes <upload-dir>/<experiment>.xlsx: the TSV without its
hint, category, source, image, comment and l2-category columns, with a "prediction" column (the raw
answer text) inserted as the 7th column, one row per TSV index, circular copies included (the server
scores CircularEval from them). Only round 0 answers are used (``--all-rounds`` runs also hold rotated
rounds, which the upload has no place for); rows without an answer keep an empty prediction and are
reported. Control characters, which a spreadsheet cannot hold,
are removed from the predictions (the local score reads the same cleaned text).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from llava.eval.eval_mmbench import clean_prediction, read_tsv
from llava.eval.jsonl import InputFileError, id_key, read_jsonl, replacing

DROPPED_COLUMNS = ["hint", "category", "source", "image", "comment", "l2-category"]
PREDICTION_POSITION = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True, help="the MMBench TSV")
    parser.add_argument("--result-dir", required=True, help="folder of <experiment>.jsonl")
    parser.add_argument("--upload-dir", required=True, help="folder for <experiment>.xlsx")
    parser.add_argument("--experiment", required=True, help="answers file name without .jsonl")
    return parser.parse_args(argv)


def upload_frame(tsv: pd.DataFrame, answers: list[dict[str, Any]]) -> pd.DataFrame:
    """The upload table: TSV minus the dropped columns, with the round-0 predictions as 7th column."""
    predictions = {
        id_key(a["question_id"]): clean_prediction(a["text"]) for a in answers if int(a.get("round_id", 0)) == 0
    }
    indices = [id_key(index) for index in tsv["index"]]
    unknown = set(predictions) - set(indices)
    if unknown:
        print(f"{len(unknown)} answer(s) for indices not in the TSV, ignored (first: {', '.join(sorted(unknown)[:5])})",
              file=sys.stderr)
    unanswered = [index for index in indices if index not in predictions]
    if unanswered:
        print(f"{len(unanswered)} TSV row(s) without an answer keep an empty prediction "
              f"(first: {', '.join(unanswered[:5])})", file=sys.stderr)
    frame = tsv.drop(columns=[c for c in DROPPED_COLUMNS if c in tsv.columns])
    frame.insert(PREDICTION_POSITION, "prediction", [predictions.get(index) for index in indices])
    return frame


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        frame = upload_frame(read_tsv(args.annotation_file),
                             read_jsonl(Path(args.result_dir) / f"{args.experiment}.jsonl"))
    except InputFileError as error:
        sys.exit(f"error: {error}")
    with replacing(Path(args.upload_dir) / f"{args.experiment}.xlsx") as temp:
        frame.to_excel(temp, index=False, engine="openpyxl")


if __name__ == "__main__":
    main()
