"""The answers file: one JSON line per question, appended and flushed as soon as it is answered.

A rerun answers only what the file lacks, so a killed run loses at most the line it was writing (a
last line without its newline is cut off and answered again). Resuming must never mix answers of
different runs: an existing answer for the same question but another prompt, or one made under other
run settings recorded in its "metadata" (``RUN_FIELDS``, e.g. the DoRA magnitude mode), stops the run
with a message instead of being reused.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TextIO

import shortuuid

if TYPE_CHECKING:
    from llava.eval.generation import Request

logger = logging.getLogger(__name__)

AnswerKey = tuple[Any, Any]

# Run settings recorded in each answer's "metadata" and checked on resume, with what a line written
# before the setting was recorded stands for: the behaviour at the time, or None (unknown: not checked).
RUN_FIELDS = {"dora_magnitudes": "trained", "checkpoint": None}
# Settings that change the answers themselves but not the recorded "prompt" (the question, not the template):
# checked where both the existing line and this run record them (lines written before they were recorded,
# or by a caller that does not record them, are not checked).
GENERATION_FIELDS = ("conv_mode", "temperature", "top_p", "num_beams", "max_new_tokens")
FRESH_HINT = "or pass --fresh (7B_eval_dora.sh: FRESH=1) to move the old answers aside and answer again"


def read_answered(path: Path) -> dict[AnswerKey, list[dict[str, Any]]]:
    """Answer lines already in ``path``, per (question_id, round_id), in file order.

    A last line without its newline was cut by a killed run: it is removed from the file, so the
    question is answered again and appears once.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning(
            "%s: dropping a partly written last line (%d bytes) left by an interrupted run", path, len(data) - keep
        )
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    answered: dict[AnswerKey, list[dict[str, Any]]] = defaultdict(list)
    for number, line in enumerate(data.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Answers file {path}, line {number}: not valid JSON ({err.msg}); fix or remove the file."
            ) from None
        if not isinstance(record, dict) or "question_id" not in record:
            raise ValueError(f"Answers file {path}, line {number}: not an answer line (no question_id).")
        record["_line"] = number
        answered[(record["question_id"], record.get("round_id"))].append(record)
    return answered


_UNKNOWN = object()


def _recorded_setting(record: dict[str, Any], name: str, run_info: dict[str, Any]) -> Any:
    metadata = record.get("metadata") or {}
    if name in metadata:
        return metadata[name]
    if RUN_FIELDS[name] is None:
        return _UNKNOWN
    # A line from before the setting was recorded: it was made with the only behaviour there was, which
    # applied to the same kind of checkpoint (a DoRA setting means nothing for other checkpoints).
    return RUN_FIELDS[name] if name in run_info else None


def check_run_settings(answered: dict[AnswerKey, list[dict[str, Any]]], run_info: dict[str, Any], path: Path) -> None:
    """Stop if any existing answer was made by another checkpoint or under other settings than ``run_info``."""
    for records in answered.values():
        for record in records:
            metadata = record.get("metadata") or {}
            for name in GENERATION_FIELDS:
                if name in metadata and name in run_info and metadata[name] != run_info[name]:
                    raise ValueError(
                        f"Answers file {path}, line {record['_line']}: answered with {name}={metadata[name]!r}, but "
                        f"this run uses {name}={run_info[name]!r}; answers of different settings must not be mixed. "
                        f"Choose another --answers-file (7B_eval_dora.sh: another CKPT name or RESULTPATH), {FRESH_HINT}."
                    )
            for name in RUN_FIELDS:
                recorded, wanted = _recorded_setting(record, name, run_info), run_info.get(name)
                if recorded is _UNKNOWN or recorded == wanted:
                    continue
                if name == "checkpoint":
                    made_by = (record.get("metadata") or {}).get("model_path", "another checkpoint")
                    raise ValueError(
                        f"Answers file {path}, line {record['_line']}: answered by {made_by}, not by the checkpoint "
                        f"evaluated now ({run_info.get('model_path')}; its files differ). Choose another "
                        f"--answers-file (7B_eval_dora.sh: another CKPT name or RESULTPATH), {FRESH_HINT}."
                    )
                raise ValueError(
                    f"Answers file {path}, line {record['_line']}: answered with {name}={recorded!r}, but this "
                    f"run uses {name}={wanted!r}; answers of different settings must not be mixed. Choose another "
                    f"--answers-file (7B_eval_dora.sh: another CKPT name or RESULTPATH), {FRESH_HINT}."
                )


def move_aside(path: Path) -> Path | None:
    """Rename an existing answers (or results) file out of the way (kept, never deleted); returns its new name."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}")
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.stem}.replaced-{stamp}-{number}{path.suffix}")
    path.rename(target)
    logger.warning("--fresh: moved the existing %s aside to %s", path, target.name)
    return target


def pending_requests(
    requests: Sequence[Request], answered: dict[AnswerKey, list[dict[str, Any]]], path: Path
) -> list[Request]:
    """The requests still to answer; the n-th request of a key is done if the file has n answers for it.

    Counting (not a set) keeps questions that share an id apart (TextVQA's ids are image ids).
    """
    seen: Counter[AnswerKey] = Counter()
    todo = []
    for request in requests:
        done = answered.get(request.key, [])
        index = seen[request.key]
        seen[request.key] += 1
        if index >= len(done):
            todo.append(request)
            continue
        prompt = done[index].get("prompt")
        if prompt is not None and prompt != request.recorded_prompt:
            raise ValueError(
                f"Answers file {path} answers question {request.question_id!r} for another prompt "
                f"({prompt!r} instead of {request.recorded_prompt!r}): it was written for other questions "
                "or flags; remove it or choose another --answers-file."
            )
    return todo


def answer_line(request: Request, text: str, model_id: str, run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """One answers-file record, keys in the seed's order; run settings go into "metadata"."""
    line: dict[str, Any] = {"question_id": request.question_id}
    if request.round_id is not None:
        line["round_id"] = request.round_id
    line["prompt"] = request.recorded_prompt
    line["text"] = text
    line.update(request.extra)
    line.update({"answer_id": shortuuid.uuid(), "model_id": model_id, "metadata": dict(run_info or {})})
    return line


@contextmanager
def appending(path: Path) -> Iterator[TextIO]:
    """The answers file opened for appending (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        yield out


def write_answer(out: TextIO, line: dict[str, Any]) -> None:
    """Append one answer and flush it, so that a killed run keeps every finished answer."""
    out.write(json.dumps(line) + "\n")
    out.flush()
