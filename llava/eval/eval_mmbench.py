"""Local MMBench-dev accuracy with CircularEval, from the answers file and the TSV's "answer" column.

    python -m llava.eval.eval_mmbench --annotation-file mmbench_dev_20230712.tsv \
        --result-file answers.jsonl [--metrics-json mmbench.json]

CircularEval, the paper's MMBench metric, as the MMBench authors score it (VLMEvalKit): the TSV
itself holds every question's circular copies. Row ``g`` is the question and rows ``g + k * 10^6``
are its copies with the options shifted, each with its own "answer" letter
(one row per option, so a TSV has up to four times as many rows as questions). A question counts as correct only if
every row of its group, ``index % 10^6``, is answered with the letter of its right option; a row
without an answer counts as wrong. ``questions`` is the number of groups, not of rows.

With ``--all-rounds`` the generator also asks each row once per rotation of its options and writes
``round_id``, ``options`` (the option texts in the order shown) and ``option_char`` (the TSV letter
of each shown option); every rotation of every row of a group must then be right. That is for a
TSV without the copies; for one with them it asks the same prompts again and changes no score.
A TSV without copies answered without rotations has no CircularEval figure, only the single-round
accuracy (each question's own row, round 0), which is not the paper's MMBench metric and is never
reported as one.

``--metrics-json`` writes ``{"circular_accuracy": percent or null (neither copies nor rotations),
"single_round_accuracy": percent, "questions": n}``.

The letter is read from the answer text by ``parse_letter``, as the MMBench authors' reference
evaluation (VLMEvalKit's ``can_infer``) reads it before it falls back to an LLM judge:

1. an answer holding one of the "cannot answer" phrases of its reject list is wrong;
2. the characters ``.()[],:;!*#{}`` are blanked out and the answer is split into words. If exactly one
   shown letter stands alone as a word and its first occurrence is among the last four words, that
   letter is the answer ("B", "B. a cat", "(B)", "I pick B"); a letter named earlier in a longer
   answer ("B is right because it is red") is not taken at this step. If no shown letter but a
   lone "Z" appears, the answer is wrong;
3. else, if the raw answer says "answer is X" or "correct answer is X" (any case, X one of A-D,
   possibly in ``**bold**``) and X is a shown letter, X;
4. else, unless the answer is more than twice as long as all option texts together, the one option
   whose text appears in the answer (ignoring case);
5. anything else, including an answer that names several letters ("A or B"), is wrong.

The reference's LLM judge for what these rules cannot read is not reproduced (without it an
unreadable answer is wrong, as the reference's exact-matching mode scores it).
"""

from __future__ import annotations

import argparse
import math
import re
import string
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from llava.eval.jsonl import InputFileError, id_key, read_jsonl, write_json_atomic

if TYPE_CHECKING:
    import pandas as pd

OPTION_COLUMNS = ("A", "B", "C", "D", "E")
# The reference's list of refusals: an answer holding one is wrong whatever else it says.
REJECT_PHRASES = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_BLANK_OUT = str.maketrans(".()[],:;!*#{}", " " * 13)
_LAST_WORDS = 4
CIRCULAR_OFFSET = 1_000_000
_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)


def read_tsv(path: str | Path) -> pd.DataFrame:
    """The MMBench TSV as a pandas DataFrame (default dtypes, as the seed read it)."""
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t")
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None


def _is_none(value: Any) -> bool:
    """The generator's test for an absent option: missing, NaN, or the text "nan"/"none"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.lower() in {"nan", "none"}


def present_options(row: dict[str, Any]) -> list[str]:
    """A TSV row's options up to the first absent one, as the generator lists them."""
    options = []
    for column in OPTION_COLUMNS:
        value = row.get(column)
        if _is_none(value):
            break
        options.append(str(value))
    return options


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def clean_prediction(text: str) -> str:
    """The answer without the control characters a spreadsheet cannot hold (openpyxl refuses them).

    The upload holds this text, so the server reads it; the local score reads the same.
    """
    return _CONTROL_CHARACTERS.sub("", text)


def parse_letter(text: str, letters: Sequence[str], options: Sequence[str] = ()) -> str | None:
    """The shown letter an answer picks (rules in the module docstring), None if it picks none or several."""
    letters = list(letters)  # a string of letters would match substrings such as "" or "AB"
    if any(phrase in text for phrase in REJECT_PHRASES):
        return None
    words = text.translate(_BLANK_OUT).split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1 and words.index(named[0]) >= len(words) - _LAST_WORDS:
        return named[0]
    if not named and "Z" in words:
        return None
    stated = _ANSWER_IS.search(text)
    if stated and stated.group(1).upper() in letters:
        return stated.group(1).upper()
    return _letter_of_option_text(text, letters, options)


def _letter_of_option_text(text: str, letters: Sequence[str], options: Sequence[str]) -> str | None:
    """The one option whose text the answer contains; long answers are not searched (they quote several)."""
    lowered = text.lower()
    texts = [str(option) for option in options]
    if len(lowered) > 2 * sum(len(option) for option in texts):
        return None
    containing = [letter for letter, option in zip(letters, texts) if option.lower() in lowered]
    return containing[0] if len(containing) == 1 else None


def round_is_correct(answer: dict[str, Any], gold_letter: str, tsv_options: Sequence[str]) -> bool:
    """Whether one answered round picks the option that the TSV marks right."""
    options = answer.get("options") or list(tsv_options)
    shown = list(string.ascii_uppercase[:len(options)])
    original = answer.get("option_char") or list(shown)
    picked = parse_letter(clean_prediction(answer.get("text", "")), shown, options)
    return picked is not None and original[shown.index(picked)] == gold_letter


def question_group(index: Any) -> int:
    """The question a TSV row belongs to: row ``g + k * 10^6`` is circular copy k of question ``g``."""
    return int(index) % CIRCULAR_OFFSET


def mmbench_accuracy(tsv: pd.DataFrame, answers: Sequence[dict[str, Any]],
                     source: str = "answers") -> dict[str, Any]:
    """{"circular_accuracy" (None without copies or rotations), "single_round_accuracy", "questions"}."""
    if "answer" not in tsv.columns:
        raise InputFileError("the TSV has no 'answer' column (a test split?): only the evaluation server scores it")
    rounds: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    duplicates = 0
    for answer in answers:
        by_round = rounds[id_key(answer["question_id"])]
        round_id = int(answer.get("round_id", 0))
        duplicates += round_id in by_round
        by_round[round_id] = answer
    if duplicates:
        print(f"{source}: {duplicates} duplicated answer(s); the last answer of each round is used", file=sys.stderr)
    rotated = any(round_id > 0 for by_round in rounds.values() for round_id in by_round)
    rows = {id_key(row["index"]): row for row in tsv.to_dict("records")}
    if not rows:
        raise InputFileError("the TSV has no questions")
    groups: dict[int, list[str]] = defaultdict(list)
    for qid, row in rows.items():
        groups[question_group(row["index"])].append(qid)
    copies = any(len(members) > 1 for members in groups.values())
    unknown = [qid for qid in rounds if qid not in rows]
    if unknown:
        print(f"{source}: {len(unknown)} answered row(s) not in the TSV, ignored "
              f"(first: {', '.join(unknown[:5])})", file=sys.stderr)
    unanswered = [qid for qid in rows if qid not in rounds]
    if unanswered:
        print(f"{source}: {len(unanswered)} TSV row(s) without an answer, counted wrong "
              f"(first: {', '.join(unanswered[:5])})", file=sys.stderr)

    def row_results(qid: str) -> dict[int, bool]:
        row = rows[qid]
        options = present_options(row)
        return {r: round_is_correct(a, str(row["answer"]), options) for r, a in rounds.get(qid, {}).items()}

    single_correct = circular_correct = incomplete = 0
    for members in groups.values():
        own = min(members, key=lambda qid: int(rows[qid]["index"]))  # the question's own row: index == group
        results = {qid: row_results(qid) for qid in members}
        single_correct += results[own].get(0, False)
        expected = [(qid, r) for qid in members for r in range(len(present_options(rows[qid])) if rotated else 1)]
        complete = all(r in results[qid] for qid, r in expected)
        incomplete += any(results.values()) and not complete
        circular_correct += complete and all(right for by_round in results.values() for right in by_round.values())
    circular = copies or rotated
    if circular and incomplete:
        print(f"{source}: {incomplete} question(s) lack answers for some of their rows or rotations, counted "
              "wrong by CircularEval", file=sys.stderr)
    return {
        "circular_accuracy": 100.0 * circular_correct / len(groups) if circular else None,
        "single_round_accuracy": 100.0 * single_correct / len(groups),
        "questions": len(groups),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True, help="mmbench_dev_20230712.tsv")
    parser.add_argument("--result-file", required=True, help="answers JSONL (with round_id/options/option_char)")
    parser.add_argument("--metrics-json", help="also write {circular_accuracy, single_round_accuracy, questions}")
    args = parser.parse_args(argv)
    try:
        metrics = mmbench_accuracy(read_tsv(args.annotation_file), read_jsonl(args.result_file), args.result_file)
    except InputFileError as error:
        sys.exit(f"error: {error}")
    print(f"Questions: {metrics['questions']}")
    print(f"Accuracy (round 0): {metrics['single_round_accuracy']:.2f}%")
    if metrics["circular_accuracy"] is not None:
        print(f"CircularEval accuracy: {metrics['circular_accuracy']:.2f}%")
    else:
        print("The TSV holds no circular copies (rows at index + k * 10^6) and the answers no rotations "
              "(generated without --all-rounds): no CircularEval accuracy (the MMBench metric); the round-0 "
              "accuracy above is not it")
    if args.metrics_json:
        write_json_atomic(args.metrics_json, metrics, indent=2)


if __name__ == "__main__":
    main()
