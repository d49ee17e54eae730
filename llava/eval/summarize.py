"""The paper's table (Markdown) from the results.json files that evaluation runs leave behind.

    python -m llava.eval.summarize RESULTPATH [RESULTPATH ...]
    python -m llava.eval.summarize --record RESULTPATH/ckpt vqav2 78.6 [--source server|recorded]
    python -m llava.eval.summarize --write RESULTPATH/ckpt --method DoRA --params-percent 4.63 \
        --metrics pope=pope.json --metrics sqa=sqa.json --score gqa=62.9 --upload vqav2=upload.json

A RESULTPATH is a results.json file, a folder holding one, or a folder whose sub-folders (one per
checkpoint) hold one; each results.json is one row. ``--write`` (what the eval script calls, also
``write_results``) merges into a folder's results.json: ``--metrics BENCH=FILE`` takes the paper's
figure from a scorer's ``--metrics-json`` file, ``--score BENCH=X`` a figure computed elsewhere,
``--upload BENCH=FILE`` the file to submit to an evaluation server. ``--record`` stores the score a
server returned. Every write is atomic.

results.json::

    {
      "method": "DoRA",                 # the row's name (default: the folder's name)
      "params_percent": 4.63,           # trainable parameters, % of the model; null if unknown
      "benchmarks": {                   # any of: vqav2 gqa vizwiz sqa textvqa pope mmbench
        "gqa":   {"score": 62.9, "source": "local",  "upload": null},
        "vqav2": {"score": null, "source": "server", "upload": "/abs/path/answers_upload/....json"}
      }
    }

score: the paper's figure in percent (VQAv2 / VizWiz / TextVQA / GQA accuracy, ScienceQA
IMG-accuracy, POPE mean F1 of its categories x100, MMBench accuracy) or null; source: "local"
(computed here by a scorer), "server" (returned by an evaluation server and recorded), or
"recorded" (typed in from elsewhere, e.g. a paper); upload: the file to submit, or null. A
missing score shows "-"; where an upload exists, a footnote says what to submit and how to record
the result. Avg is the mean of the scores present, marked when some are missing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from llava.eval.jsonl import InputFileError, read_json, write_json_atomic

# (key, column title); the table's column order.
BENCHMARKS = (
    ("vqav2", "VQAv2"), ("gqa", "GQA"), ("vizwiz", "VisWiz"), ("sqa", "SQA"),
    ("textvqa", "VQAT"), ("pope", "POPE"), ("mmbench", "MMBench"),
)
ALIASES = {"viswiz": "vizwiz", "scienceqa": "sqa", "vqat": "textvqa", "t-vqa": "textvqa", "mmbench_dev": "mmbench"}
SOURCES = ("local", "server", "recorded")
RESULTS_NAME = "results.json"


def benchmark_key(name: str) -> str:
    """The canonical key of a benchmark name (case-insensitive; VisWiz, SQA, VQAT accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in dict(BENCHMARKS):
        raise ValueError(f"unknown benchmark {name!r}; use one of {', '.join(k for k, _ in BENCHMARKS)}")
    return key


def paper_score(benchmark: str, metrics: Mapping[str, Any]) -> float:
    """The paper's figure from a scorer's --metrics-json content."""
    key = benchmark_key(benchmark)
    if key == "pope":
        f1s = [category["f1"] for category in metrics.values()]
        if not f1s:
            raise ValueError("POPE metrics have no category")
        return 100.0 * sum(f1s) / len(f1s)
    field = "img_accuracy" if key == "sqa" else "accuracy"
    if metrics.get(field) is None:
        raise ValueError(f"{key} metrics have no {field!r}")
    return float(metrics[field])


def results_file(path: str | Path) -> Path:
    """``path`` itself if it names a file, else ``path/results.json``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / RESULTS_NAME


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json, checked against the schema (errors name the file)."""
    path = results_file(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", {}), dict):
        raise InputFileError(f"{path}: expected {{'method', 'params_percent', 'benchmarks': {{...}}}}")
    data["method"] = data.get("method") or path.parent.name
    data.setdefault("params_percent", None)
    data.setdefault("benchmarks", {})
    benchmarks = {}
    for name, entry in data["benchmarks"].items():
        try:
            key = benchmark_key(name)
        except ValueError as error:
            raise InputFileError(f"{path}: {error}") from None
        if not isinstance(entry, dict):
            raise InputFileError(f"{path}: benchmarks.{name} must be {{'score', 'source', 'upload'}}")
        score = entry.get("score")
        if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool)):
            raise InputFileError(f"{path}: benchmarks.{name}.score must be a number or null, not {score!r}")
        benchmarks[key] = entry
    data["benchmarks"] = benchmarks
    return data


def write_results(path: str | Path, method: str | None = None, params_percent: float | None = None,
                  benchmarks: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Merge into ``path``'s results.json (created if absent): only the fields given change."""
    target = results_file(path)
    data = load_results(target) if target.exists() else {
        "method": target.parent.name, "params_percent": None, "benchmarks": {}}
    if method is not None:
        data["method"] = method
    if params_percent is not None:
        data["params_percent"] = float(params_percent)
    for name, fields in (benchmarks or {}).items():
        unknown = set(fields) - {"score", "source", "upload"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} for {name}; use score, source, upload")
        if fields.get("source", "local") not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {fields['source']!r}")
        default_source = "server" if "upload" in fields and "score" not in fields else "local"
        entry = data["benchmarks"].setdefault(benchmark_key(name),
                                              {"score": None, "source": default_source, "upload": None})
        entry.update(fields)
        if entry.get("score") is not None:
            entry["score"] = float(entry["score"])
    data["benchmarks"] = {k: data["benchmarks"][k] for k, _ in BENCHMARKS if k in data["benchmarks"]}
    write_json_atomic(target, data, indent=2)
    return target


def record_score(path: str | Path, benchmark: str, score: float, source: str = "server") -> Path:
    """Store a score returned by an evaluation server (or copied from elsewhere: source="recorded")."""
    return write_results(path, benchmarks={benchmark: {"score": score, "source": source}})


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


def render_table(rows: Sequence[Mapping[str, Any]], folders: Sequence[str] | None = None) -> str:
    """The paper's Markdown table for results.json contents, with footnotes for what is missing.

    ``folders`` (one per row) go into the footnotes' --record commands.
    """
    titles = [title for _, title in BENCHMARKS]
    lines = ["| Method | # Params (%) | " + " | ".join(titles) + " | Avg |", "|---" * (len(titles) + 3) + "|"]
    footnotes: list[str] = []
    partial_average = False
    for number, row in enumerate(rows):
        folder = folders[number] if folders else "RESULTDIR"
        cells, scores = [], []
        for key, title in BENCHMARKS:
            entry = row.get("benchmarks", {}).get(key) or {}
            score = entry.get("score")
            if score is not None and math.isfinite(score):
                cells.append(_format_number(score))
                scores.append(score)
            elif entry.get("upload"):
                footnotes.append(f"[{len(footnotes) + 1}] {row['method']}, {title}: submit {entry['upload']} to the "
                                 f"evaluation server, then record its score: python -m llava.eval.summarize --record "
                                 f"{folder} {key} SCORE")
                cells.append(f"- [{len(footnotes)}]")
            else:
                cells.append("-")
        if not scores:
            average = "-"
        elif len(scores) < len(BENCHMARKS):
            average = _format_number(sum(scores) / len(scores)) + "*"
            partial_average = True
        else:
            average = _format_number(sum(scores) / len(scores))
        params = row.get("params_percent")
        params_cell = "-" if params is None else f"{params:g}"
        lines.append(f"| {row['method']} | {params_cell} | " + " | ".join(cells) + f" | {average} |")
    notes = []
    if partial_average:
        notes.append(f"* Avg over the benchmarks with a score only, not all {len(BENCHMARKS)}.")
    notes.extend(footnotes)
    return "\n".join(lines + ([""] + notes if notes else []))


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
        benchmarks.setdefault(key, {}).update(score=paper_score(key, read_json(file)), source="local")
    for key, value in _pairs(args.score, "--score"):
        benchmarks.setdefault(key, {}).update(score=float(value), source="local")
    for key, file in _pairs(args.upload, "--upload"):
        benchmarks.setdefault(key, {})["upload"] = file
    return write_results(args.write, args.method, args.params_percent, benchmarks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="RESULTPATH", help="results.json files or folders")
    parser.add_argument("--record", nargs=3, metavar=("DIR", "BENCH", "SCORE"), help="store a server's score")
    parser.add_argument("--source", default="server", choices=SOURCES, help="with --record (default: server)")
    parser.add_argument("--write", metavar="DIR", help="merge the options below into DIR/results.json")
    parser.add_argument("--method", help="with --write: the row's name")
    parser.add_argument("--params-percent", type=float, help="with --write: trainable parameters, percent")
    parser.add_argument("--metrics", action="append", metavar="BENCH=FILE", help="with --write: a scorer's JSON")
    parser.add_argument("--score", action="append", metavar="BENCH=X", help="with --write: a local score")
    parser.add_argument("--upload", action="append", metavar="BENCH=FILE", help="with --write: a file to submit")
    args = parser.parse_args(argv)
    if not (args.paths or args.record or args.write):
        parser.error("give RESULTPATHs to print, --record or --write")
    try:
        if args.record:
            directory, benchmark, score = args.record
            written = record_score(directory, benchmark, float(score), args.source)
            print(f"{written}: {benchmark_key(benchmark)} = {float(score)} ({args.source})")
        if args.write:
            _write_from_args(args)
        if args.paths:
            files = find_results(args.paths)
            print(render_table([load_results(path) for path in files], [str(path.parent) for path in files]))
    except (InputFileError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
