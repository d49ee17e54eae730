"""The paper's table (Markdown) from the results.json files that evaluation runs leave behind.

    python -m llava.eval.summarize RESULTPATH [RESULTPATH ...]
    python -m llava.eval.summarize --record RESULTPATH/ckpt vqav2 78.6 [--source server|recorded]
    python -m llava.eval.summarize --write RESULTPATH/ckpt --method DoRA --params-percent 4.63 \
        --dora-magnitudes trained --metrics pope=pope.json --metrics sqa=sqa.json --score gqa=62.9 \
        --upload vqav2=upload.json --checkpoint ID --model-path CKPT_PATH
    python -m llava.eval.summarize --check-row RESULTPATH/ckpt --checkpoint ID --model-path CKPT_PATH \
        [--dora-magnitudes trained] [--fresh]

A RESULTPATH is a results.json file, a folder holding one, or a folder whose sub-folders (one per
checkpoint) hold one; each results.json is one row. ``--write`` (what the eval script calls, also
``write_results``) merges into a folder's results.json: ``--metrics BENCH=FILE`` takes the paper's
figure from a scorer's ``--metrics-json`` file, ``--score BENCH=X`` a figure computed elsewhere,
``--upload BENCH=FILE`` the file to submit to an evaluation server, ``--dora-magnitudes`` how a DoRA
checkpoint's magnitudes were loaded, ``--checkpoint`` / ``--model-path`` which checkpoint made the row
(the fingerprint its answers record). A row holds one model's scores: writing another checkpoint's or
another magnitude mode's results into it is refused, and ``--check-row`` (what the eval script runs
before answering anything) refuses the same early, or with ``--fresh`` moves the old results.json
aside. ``--record`` stores the score a server returned in a row an evaluation made. Every write is
atomic.

results.json::

    {
      "method": "DoRA",                 # the row's name (default: the folder's name)
      "params_percent": 4.63,           # trainable parameters, % of the model; null if unknown
      "dora_magnitudes": "trained",     # DoRA only: "trained" | "weight_norm"; null (or absent) otherwise
      "checkpoint": "3f2a...",          # the evaluated checkpoint's fingerprint; absent in older files
      "model_path": "/abs/path/ckpt",   # the evaluated checkpoint's folder; absent in older files
      "benchmarks": {                   # any of: vqav2 gqa vizwiz sqa textvqa pope mmbench
        "gqa":   {"score": 62.9, "source": "local",  "upload": null},
        "vqav2": {"score": null, "source": "server", "upload": "/abs/path/answers_upload/....json"},
        "mmbench": {"score": null, "source": "server", "upload": "/abs/path/....xlsx",
                    "single_round_accuracy": 71.2},
        "pope":  {"score": 85.9, "source": "local", "upload": null, "yes_ratio": 0.48}
      }
    }

score: the paper's figure in percent (VQAv2 / VizWiz / TextVQA / GQA accuracy, ScienceQA
IMG-accuracy, POPE mean F1 of its categories x100, MMBench CircularEval accuracy) or null; source:
"local" (computed here by a scorer), "server" (returned by an evaluation server and recorded), or
"recorded" (typed in from elsewhere, e.g. a paper); upload: the file to submit, or null.
MMBench answers without rotations have no CircularEval figure: their entry keeps score null and
the round-0 accuracy as ``single_round_accuracy``, shown as "(71.2 1-round)", outside Avg. (An
MMBench score written before that field existed is read as the score, as it was.)
yes_ratio (POPE): the share of questions answered "yes", mean of the categories. A model that gives
one answer to (almost) every question gets an F1 of about 66.7 ("yes") or 0 ("no") without looking;
the table says so under it.
dora_magnitudes: "trained" (the checkpoint's magnitudes) or "weight_norm" (m = ||W0||, as the
seed's loader evaluated the paper's DoRA row); the table's Method cell says which.

A missing score shows "-"; where an upload exists, a footnote says what to submit and how to record
the result. Avg is the mean of the scores present, marked when some are missing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from llava.eval.answers_file import move_aside
from llava.eval.jsonl import InputFileError, read_json, write_json_atomic

# (key, column title); the table's column order.
BENCHMARKS = (
    ("vqav2", "VQAv2"), ("gqa", "GQA"), ("vizwiz", "VisWiz"), ("sqa", "SQA"),
    ("textvqa", "VQAT"), ("pope", "POPE"), ("mmbench", "MMBench"),
)
ALIASES = {"viswiz": "vizwiz", "scienceqa": "sqa", "vqat": "textvqa", "t-vqa": "textvqa", "mmbench_dev": "mmbench"}
SOURCES = ("local", "server", "recorded")
DORA_MAGNITUDES = ("trained", "weight_norm")
ENTRY_FIELDS = ("score", "source", "upload", "single_round_accuracy", "yes_ratio")
NUMBER_FIELDS = {"score": 100.0, "single_round_accuracy": 100.0, "yes_ratio": 1.0}  # field: largest value
ONE_ANSWER_SHARE = 0.99  # POPE: a yes ratio this close to 1 (or 0) is one answer given to everything
RESULTS_NAME = "results.json"
# What the Method cell adds for each DoRA magnitude mode ("|" escaped: the cell is in a Markdown table).
MAGNITUDE_LABELS = {"trained": "trained m", "weight_norm": "m = \\|\\|W0\\|\\|"}
WEIGHT_NORM_NOTE = ("m = ||W0||: magnitudes set to the base weights' row norms, as the seed's loader evaluated "
                    "the paper's DoRA row.")
SINGLE_ROUND_NOTE = (
    "(X 1-round): MMBench single-round accuracy (each question asked once, options in their original order), "
    "not CircularEval, the paper's MMBench metric; not in Avg. The TSV held no circular copies: use MMBench's "
    "own TSV, run 7B_eval_dora.sh with MMBENCH_ALL_ROUNDS=1, or submit the MMBench upload to the evaluation "
    "server and record its score.")


def benchmark_key(name: str) -> str:
    """The canonical key of a benchmark name (case-insensitive; VisWiz, SQA, VQAT accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in dict(BENCHMARKS):
        raise ValueError(f"unknown benchmark {name!r}; use one of {', '.join(k for k, _ in BENCHMARKS)}")
    return key


def paper_score(benchmark: str, metrics: Mapping[str, Any]) -> float:
    """The paper's figure from a scorer's --metrics-json content (MMBench: CircularEval only)."""
    key = benchmark_key(benchmark)
    if key == "pope":
        f1s = [category["f1"] for category in metrics.values()]
        if not f1s:
            raise ValueError("POPE metrics have no category")
        return 100.0 * sum(f1s) / len(f1s)
    field = {"sqa": "img_accuracy", "mmbench": "circular_accuracy"}.get(key, "accuracy")
    if metrics.get(field) is None:
        raise ValueError(f"{key} metrics have no {field!r}" + (
            " (answers without rotations: only single_round_accuracy, which is not the MMBench score)"
            if key == "mmbench" else ""))
    return float(metrics[field])


def metrics_fields(benchmark: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The results.json entry fields a scorer's --metrics-json content sets.

    MMBench metrics without rotations set only ``single_round_accuracy``: that figure is not the
    paper's MMBench score, which stays as it was (see ``write_results``).
    """
    key = benchmark_key(benchmark)
    if key == "pope":
        ratios = [category.get("yes_ratio") for category in metrics.values()]
        fields = {"score": paper_score(key, metrics), "source": "local"}
        return fields if None in ratios else {**fields, "yes_ratio": sum(ratios) / len(ratios)}
    if key != "mmbench":
        return {"score": paper_score(key, metrics), "source": "local"}
    single = metrics.get("single_round_accuracy")
    fields = {} if single is None else {"single_round_accuracy": float(single)}
    if metrics.get("circular_accuracy") is not None:
        fields.update(score=paper_score(key, metrics), source="local")
    elif not fields:
        raise ValueError("mmbench metrics have neither 'circular_accuracy' nor 'single_round_accuracy'")
    return fields


def results_file(path: str | Path) -> Path:
    """``path`` itself if it names a file, else ``path/results.json``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / RESULTS_NAME


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_entry(path: Path, name: str, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise InputFileError(f"{path}: benchmarks.{name} must be {{'score', 'source', 'upload'}}")
    for field in NUMBER_FIELDS:
        value = entry.get(field)
        if value is not None and not _is_number(value):
            raise InputFileError(f"{path}: benchmarks.{name}.{field} must be a number or null, not {value!r}")
    return entry


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json, checked against the schema (errors name the file)."""
    path = results_file(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", {}), dict):
        raise InputFileError(f"{path}: expected {{'method', 'params_percent', 'benchmarks': {{...}}}}")
    magnitudes = data.get("dora_magnitudes")
    if magnitudes is not None and magnitudes not in DORA_MAGNITUDES:
        raise InputFileError(f"{path}: dora_magnitudes must be one of {', '.join(DORA_MAGNITUDES)} or null, "
                             f"not {magnitudes!r}")
    benchmarks = {}
    for name, entry in data.get("benchmarks", {}).items():
        try:
            key = benchmark_key(name)
        except ValueError as error:
            raise InputFileError(f"{path}: {error}") from None
        benchmarks[key] = _checked_entry(path, name, entry)
    known = {"method", "params_percent", "dora_magnitudes", "benchmarks"}
    return {"method": data.get("method") or path.parent.name, "params_percent": data.get("params_percent"),
            "dora_magnitudes": magnitudes, "benchmarks": benchmarks,
            **{k: v for k, v in data.items() if k not in known}}


def row_conflict(path: Path, data: Mapping[str, Any], checkpoint: str | None, dora_magnitudes: str | None) -> str | None:
    """Why ``data`` (a row's results.json) cannot take results of ``checkpoint`` in ``dora_magnitudes``, or None.

    A row without a recorded fingerprint (written before rows recorded one) is taken as this checkpoint's.
    """
    recorded = data.get("checkpoint")
    if checkpoint is not None and recorded is not None and recorded != checkpoint:
        made_by = data.get("model_path") or "another checkpoint"
        return (f"{path} holds the results of {made_by}, not of the checkpoint evaluated now (its files differ)")
    mode = data.get("dora_magnitudes")
    if dora_magnitudes is not None and mode is not None and mode != dora_magnitudes:
        return f"{path} holds results with DORA_MAGNITUDES={mode}; this run uses {dora_magnitudes}"
    return None


ROW_HINT = ("Use another CKPT name or RESULTPATH, so that each row holds one model's scores, or FRESH=1 "
            "(summarize --fresh) to move the old results aside and start the row over.")


def check_row(path: str | Path, checkpoint: str | None, dora_magnitudes: str | None = None,
              fresh: bool = False) -> Path | None:
    """Before an evaluation answers anything: refuse a row made by another model (``ValueError``).

    With ``fresh`` an existing results.json is moved aside instead (kept, never deleted); returns its new name.
    """
    target = results_file(path)
    if not target.exists():
        return None
    if fresh:
        return move_aside(target)
    conflict = row_conflict(target, load_results(target), checkpoint, dora_magnitudes)
    if conflict:
        raise ValueError(f"{conflict}. {ROW_HINT}")
    return None


def _merge_entry(benchmarks: dict[str, dict[str, Any]], key: str, fields: Mapping[str, Any]) -> None:
    """Merge one benchmark's fields; a single-round MMBench figure replaces a local score, never a server's."""
    unknown = set(fields) - set(ENTRY_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for {key}; use {', '.join(ENTRY_FIELDS)}")
    if "single_round_accuracy" in fields and key != "mmbench":
        raise ValueError(f"single_round_accuracy is an MMBench field, not one of {key}")
    if "yes_ratio" in fields and key != "pope":
        raise ValueError(f"yes_ratio is a POPE field, not one of {key}")
    if fields.get("source", "local") not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {fields['source']!r}")
    default_source = "server" if "upload" in fields and "score" not in fields else "local"
    entry = benchmarks.setdefault(key, {"score": None, "source": default_source, "upload": None})
    if "single_round_accuracy" in fields and "score" not in fields and entry.get("source") == "local":
        entry["score"] = None  # an earlier local MMBench figure; this run has no CircularEval one
    for field, upper in NUMBER_FIELDS.items():
        value = fields.get(field)
        if value is not None and not 0.0 <= float(value) <= upper:
            raise ValueError(f"{key} {field} {value} is outside 0-{upper:g}" +
                             (" (scores are percentages, e.g. 78.6)" if upper == 100.0 else ""))
    entry.update(fields)
    for field in NUMBER_FIELDS:
        if entry.get(field) is not None:
            entry[field] = float(entry[field])


def write_results(path: str | Path, method: str | None = None, params_percent: float | None = None,
                  benchmarks: Mapping[str, Mapping[str, Any]] | None = None,
                  dora_magnitudes: str | None = None, checkpoint: str | None = None,
                  model_path: str | None = None) -> Path:
    """Merge into ``path``'s results.json (created if absent): only the fields given change.

    ``dora_magnitudes`` ("trained" | "weight_norm") says how a DoRA checkpoint's magnitudes were loaded;
    ``checkpoint`` (a fingerprint) and ``model_path`` which checkpoint made the results. Results of another
    checkpoint or magnitude mode than the row already holds are refused (``ValueError``).
    """
    if dora_magnitudes is not None and dora_magnitudes not in DORA_MAGNITUDES:
        raise ValueError(f"dora_magnitudes must be one of {', '.join(DORA_MAGNITUDES)}, not {dora_magnitudes!r}")
    target = results_file(path)
    data = load_results(target) if target.exists() else {
        "method": target.parent.name, "params_percent": None, "dora_magnitudes": None, "benchmarks": {}}
    conflict = row_conflict(target, data, checkpoint, dora_magnitudes)
    if conflict:
        raise ValueError(f"{conflict}: not written. {ROW_HINT}")
    if method is not None:
        data["method"] = method
    if params_percent is not None:
        data["params_percent"] = float(params_percent)
    if dora_magnitudes is not None:
        data["dora_magnitudes"] = dora_magnitudes
    if checkpoint is not None:
        data["checkpoint"] = checkpoint
    if model_path is not None:
        data["model_path"] = model_path
    for name, fields in (benchmarks or {}).items():
        _merge_entry(data["benchmarks"], benchmark_key(name), fields)
    data["benchmarks"] = {k: data["benchmarks"][k] for k, _ in BENCHMARKS if k in data["benchmarks"]}
    write_json_atomic(target, data, indent=2)
    return target


def record_score(path: str | Path, benchmark: str, score: float, source: str = "server") -> dict[str, Any]:
    """Store a score returned by an evaluation server (or copied from elsewhere: source="recorded");
    returns the benchmark's entry as it was before (empty if the row had none).

    Only into an existing row, so that a mistyped folder cannot add a row (or, at RESULTPATH itself, a
    results.json that would hide every checkpoint's row below it).
    """
    target = results_file(path)
    if not target.is_file():
        rows = sorted(p.parent.name for p in Path(path).glob(f"*/{RESULTS_NAME}")) if Path(path).is_dir() else []
        hint = (f" It holds the rows {', '.join(rows)}: give RESULTPATH/CKPT." if rows else
                " Give RESULTPATH/CKPT of an evaluated checkpoint, or start a row by hand with "
                f"--write {path} --method NAME.")
        raise ValueError(f"{target} does not exist, so there is no row to record into.{hint}")
    earlier = dict(load_results(target)["benchmarks"].get(benchmark_key(benchmark), {}))
    write_results(path, benchmarks={benchmark: {"score": score, "source": source}})
    return earlier


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """The results.json files named by the command line's RESULTPATHs, in order."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / RESULTS_NAME).is_file():
            found.append(path / RESULTS_NAME)
        else:
            children = sorted(path.glob(f"*/{RESULTS_NAME}"))
            if not children:
                raise InputFileError(f"{path}: no {RESULTS_NAME} here or in its sub-folders; run the evaluation "
                                     "(7B_eval_dora.sh) or create one with --write")
            found.extend(children)
    return found


def _format_number(value: float) -> str:
    return f"{value:.1f}"


def method_cell(row: Mapping[str, Any]) -> str:
    """The row's name, with the DoRA magnitude mode it was evaluated in."""
    label = MAGNITUDE_LABELS.get(row.get("dora_magnitudes"))
    return row["method"] if label is None else f"{row['method']} ({label})"


def benchmark_score(row: Mapping[str, Any], key: str) -> float | None:
    """A results.json row's score for one benchmark; None where it has none (or not a finite one)."""
    score = (row.get("benchmarks", {}).get(key) or {}).get("score")
    return score if score is not None and math.isfinite(score) else None


def _single_round_only(row: Mapping[str, Any]) -> float | None:
    """The MMBench single-round accuracy of a row that has no MMBench score, else None."""
    entry = row.get("benchmarks", {}).get("mmbench") or {}
    return entry.get("single_round_accuracy") if benchmark_score(row, "mmbench") is None else None


def one_pope_answer(row: Mapping[str, Any]) -> tuple[str, float] | None:
    """("yes" | "no", share) when the row answered POPE with one word (almost) throughout, else None."""
    ratio = (row.get("benchmarks", {}).get("pope") or {}).get("yes_ratio")
    if ratio is None:
        return None
    if ratio >= ONE_ANSWER_SHARE:
        return "yes", ratio
    return ("no", 1 - ratio) if ratio <= 1 - ONE_ANSWER_SHARE else None


def one_pope_answer_note(who: str, answer: tuple[str, float]) -> str:
    word, share = answer
    return (f'{who} answered "{word}" to {100 * share:.0f}% of the POPE questions: its POPE F1 is what that '
            f'one answer scores (about 66.7 for "yes", 0 for "no"), not a sign that it looks at the image.')


def _benchmark_cell(row: Mapping[str, Any], key: str, title: str, folder: str, footnotes: list[str]) -> str:
    """A score's cell; where the score is missing, appends the footnote that says what to submit."""
    entry = row.get("benchmarks", {}).get(key) or {}
    score = benchmark_score(row, key)
    if score is not None:
        return _format_number(score)
    single = _single_round_only(row) if key == "mmbench" else None
    cell = "-" if single is None else f"({_format_number(single)} 1-round)"
    if entry.get("upload"):
        footnotes.append(f"[{len(footnotes) + 1}] {row['method']}, {title}: submit {entry['upload']} to the "
                         f"evaluation server, then record its score: python -m llava.eval.summarize --record "
                         f"{folder} {key} SCORE")
        cell += f" [{len(footnotes)}]"
    return cell


def _average_cell(scores: Sequence[float]) -> tuple[str, bool]:
    """(cell, partial): the mean of the scores present, starred when some benchmark has none."""
    if not scores:
        return "-", False
    partial = len(scores) < len(BENCHMARKS)
    return _format_number(sum(scores) / len(scores)) + ("*" if partial else ""), partial


def render_table(rows: Sequence[Mapping[str, Any]], folders: Sequence[str] | None = None) -> str:
    """The paper's Markdown table for results.json contents, with footnotes for what is missing.

    ``folders`` (one per row) go into the footnotes' --record commands.
    """
    titles = [title for _, title in BENCHMARKS]
    lines = ["| Method | # Params (%) | " + " | ".join(titles) + " | Avg |", "|---" * (len(titles) + 3) + "|"]
    footnotes: list[str] = []
    partial_average = single_round = weight_norm = False
    for number, row in enumerate(rows):
        folder = folders[number] if folders else "RESULTDIR"
        cells = [_benchmark_cell(row, key, title, folder, footnotes) for key, title in BENCHMARKS]
        average, partial = _average_cell([s for s in (benchmark_score(row, key) for key, _ in BENCHMARKS) if s is not None])
        single_round |= _single_round_only(row) is not None
        partial_average |= partial
        weight_norm |= row.get("dora_magnitudes") == "weight_norm"
        params = row.get("params_percent")
        params_cell = "-" if params is None else f"{params:g}"
        lines.append(f"| {method_cell(row)} | {params_cell} | " + " | ".join(cells) + f" | {average} |")
    notes = []
    if partial_average:
        notes.append(f"* Avg over the benchmarks with a score only, not all {len(BENCHMARKS)}.")
    if single_round:
        notes.append(SINGLE_ROUND_NOTE)
    if weight_norm:
        notes.append(WEIGHT_NORM_NOTE)
    notes += [one_pope_answer_note(method_cell(row), answer) for row in rows if (answer := one_pope_answer(row))]
    notes.extend(footnotes)
    return "\n".join(lines + ([""] + notes if notes else []))


def label_by_source(rows: list[dict[str, Any]], sources: Sequence[str]) -> list[dict[str, Any]]:
    """Rows whose Method cells would read alike get the RESULTPATH they came from added to their name."""
    cells = [method_cell(row) for row in rows]
    return [{**row, "method": f"{row['method']} [{source}]"} if cells.count(cell) > 1 else row
            for row, cell, source in zip(rows, cells, sources)]


def _pairs(values: list[str] | None, what: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not rest:
            raise ValueError(f"{what} takes BENCH=VALUE, got {value!r}")
        pairs.append((benchmark_key(name), rest))
    return pairs


def _write_from_args(args: argparse.Namespace) -> Path:
    benchmarks: dict[str, dict[str, Any]] = {}
    for key, file in _pairs(args.metrics, "--metrics"):
        benchmarks.setdefault(key, {}).update(metrics_fields(key, read_json(file)))
    for key, value in _pairs(args.score, "--score"):
        benchmarks.setdefault(key, {}).update(score=float(value), source="local")
    for key, file in _pairs(args.upload, "--upload"):
        benchmarks.setdefault(key, {})["upload"] = file
    return write_results(args.write, args.method, args.params_percent, benchmarks, args.dora_magnitudes,
                         args.checkpoint, args.model_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="RESULTPATH", help="results.json files or folders")
    parser.add_argument("--record", nargs=3, metavar=("DIR", "BENCH", "SCORE"), help="store a server's score")
    parser.add_argument("--source", default="server", choices=SOURCES, help="with --record (default: server)")
    parser.add_argument("--write", metavar="DIR", help="merge the options below into DIR/results.json")
    parser.add_argument("--method", help="with --write: the row's name")
    parser.add_argument("--params-percent", type=float, help="with --write: trainable parameters, percent")
    parser.add_argument("--dora-magnitudes", choices=DORA_MAGNITUDES,
                        help="with --write: a DoRA checkpoint's magnitudes as evaluated: trained, or weight_norm "
                             "(m = ||W0||, as the seed's loader did)")
    parser.add_argument("--metrics", action="append", metavar="BENCH=FILE", help="with --write: a scorer's JSON")
    parser.add_argument("--score", action="append", metavar="BENCH=X", help="with --write: a local score")
    parser.add_argument("--upload", action="append", metavar="BENCH=FILE", help="with --write: a file to submit")
    parser.add_argument("--checkpoint", help="with --write / --check-row: the evaluated checkpoint's fingerprint")
    parser.add_argument("--model-path", help="with --write: the evaluated checkpoint's folder")
    parser.add_argument("--check-row", metavar="DIR",
                        help="refuse (exit 2) if DIR/results.json holds another checkpoint's or mode's results")
    parser.add_argument("--fresh", action="store_true", help="with --check-row: move DIR/results.json aside instead")
    args = parser.parse_args(argv)
    if not (args.paths or args.record or args.write or args.check_row):
        parser.error("give RESULTPATHs to print, --record, --write or --check-row")
    if args.check_row:
        try:
            check_row(args.check_row, args.checkpoint, args.dora_magnitudes, args.fresh)
        except (InputFileError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
    try:
        if args.record:
            directory, benchmark, score = args.record
            earlier = record_score(directory, benchmark, float(score), args.source)
            replaced = ("" if earlier.get("score") is None else
                        f"; it replaces the {earlier.get('source', 'local')} score {earlier['score']:g}")
            print(f"{results_file(directory)}: {benchmark_key(benchmark)} = {float(score)} ({args.source}){replaced}")
        if args.write:
            _write_from_args(args)
        if args.paths:
            files = [(given, file) for given in args.paths for file in find_results([given])]
            rows = [load_results(file) for _, file in files]
            print(render_table(label_by_source(rows, [given for given, _ in files]), [str(f.parent) for _, f in files]))
    except (InputFileError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
