"""Reading question / answer files and writing results, with errors that say which file and line.

Scorers never trust that an answers file matches its question file: ``check_answers`` reports
answers for unknown questions, questions without answers and duplicated answers (the last one
wins, as when a rerun appends a fresh answer) on stderr before anything is scored, so stdout keeps
only the figures the seed printed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

PathLike = str | os.PathLike


class InputFileError(ValueError):
    """An input file is missing or malformed; the message names the file (and line) and what to do."""


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL file, each a JSON object."""
    path = Path(path)
    records = []
    try:
        # Split on "\n" only (not str.splitlines): answers may hold U+2028 and friends inside strings.
        with path.open(encoding="utf-8", newline="\n") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    records.append(_parse_line(path, number, line))
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    return records


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputFileError(
            f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}). Each line must be one "
            "JSON object; a run killed while writing leaves a cut-off last line: delete that line and "
            "rerun the generation to answer the question again."
        ) from None
    if not isinstance(record, dict):
        raise InputFileError(f"{path}:{number}: expected a JSON object per line, found {type(record).__name__}")
    return record


def read_json(path: PathLike) -> Any:
    """A whole JSON file (annotations, ScienceQA problems, uploads)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (it looks like JSONL: one object per line)" if text.lstrip().startswith("{") and "\n{" in text else ""
        raise InputFileError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno}){hint}"
        ) from None


def read_questions(path: PathLike) -> list[dict[str, Any]]:
    """A question file: JSONL (.jsonl) or a JSON list (ScienceQA's llava_test_CQM-A.json)."""
    data = read_jsonl(path) if str(path).endswith(".jsonl") else read_json(path)
    if not isinstance(data, list):
        raise InputFileError(f"{path}: expected a list of questions, found {type(data).__name__}")
    return data


@contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it (``os.replace``) once the block succeeds,
    so readers never see half a file and a failed write leaves the old file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    try:
        yield Path(temp_name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp's 0600 would make results private
        os.replace(temp_name, path)
    finally:
        Path(temp_name).unlink(missing_ok=True)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write a text file atomically (see ``replacing``)."""
    with replacing(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_json_atomic(path: PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """``json.dump`` to ``path`` atomically (see ``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, **dump_kwargs))


def id_key(value: Any) -> str:
    """Question ids compared as text: a file may hold 5 where another holds "5"."""
    return str(value)


@dataclass
class AnswerCheck:
    """The answers of one file keyed by question id, and how the file differs from its questions."""

    answers: dict[str, dict[str, Any]]
    source: str
    duplicates: int = 0
    unknown: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)

    def report(self, stream: TextIO | None = None, shown: int = 5) -> None:
        """Print one line per problem (nothing when the files agree)."""
        stream = stream or sys.stderr
        if self.duplicates:
            print(f"{self.source}: {self.duplicates} duplicated answer(s); the last answer of each question is used",
                  file=stream)
        if self.unknown:
            print(f"{self.source}: {len(self.unknown)} answer(s) for questions not in the question file, ignored "
                  f"(first: {', '.join(self.unknown[:shown])})", file=stream)
        if self.unanswered:
            print(f"{self.source}: {len(self.unanswered)} question(s) without an answer "
                  f"(first: {', '.join(self.unanswered[:shown])})", file=stream)


def read_answers(path: PathLike, key: str = "question_id",
                 require: Iterable[str] = ("text",)) -> tuple[dict[str, dict[str, Any]], int]:
    """Answers keyed by ``id_key(line[key])`` (last one wins) and the number of duplicates dropped."""
    answers: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for number, record in enumerate(read_jsonl(path), start=1):
        missing = [name for name in (key, *require) if name not in record]
        if missing:
            raise InputFileError(f"{path}: answer {number} has no {', '.join(missing)} field; is this an answers file?")
        question_id = id_key(record[key])
        duplicates += question_id in answers
        answers[question_id] = record
    return answers, duplicates


def check_answers(path: PathLike, question_ids: Iterable[Any] | None, key: str = "question_id",
                  report: bool = True, require: Iterable[str] = ("text",)) -> AnswerCheck:
    """Read an answers file and compare it with the question ids (in question-file order).

    Answers to unknown questions are dropped from ``answers``; unanswered questions are listed.
    With ``question_ids=None`` only duplicates are checked. Every answer must hold ``require``.
    """
    answers, duplicates = read_answers(path, key, require)
    check = AnswerCheck(answers=answers, source=str(path), duplicates=duplicates)
    if question_ids is not None:
        wanted = [id_key(question_id) for question_id in question_ids]
        wanted_set = set(wanted)
        check.unknown = [question_id for question_id in answers if question_id not in wanted_set]
        check.unanswered = [question_id for question_id in wanted if question_id not in answers]
        for question_id in check.unknown:
            del answers[question_id]
    if report:
        check.report()
    return check
