"""The study's outputs beyond one table: the table over several seeds (mean ± std) and the picture.

One run of the tiny study is one draw: its scores move by several points with the seed and with
the CPU's float rounding. Over seeds, each cell is the mean ± the sample standard deviation (n-1)
of that cell's per-seed values, and Avg the mean ± std of the per-seed averages.

The picture (PNG, matplotlib's Agg backend) shows, for one seed or several, the training loss of
FT, LoRA and DoRA over optimizer steps (the Trainer's ``trainer_state.json`` log) and the seven
scores of every method against the untrained base.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval.summarize import (
    BENCHMARKS,
    benchmark_score,
    method_cell,
    one_pope_answer,
    one_pope_answer_note,
)

COLUMNS = [title for _, title in BENCHMARKS]
ROW_ORDER = ("Base (untrained)", "FT", "LoRA", "DoRA")
COLOURS = {"Base (untrained)": "#9e9e9e", "FT": "#1f77b4", "LoRA": "#ff7f0e", "DoRA": "#2ca02c"}


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n-1); the std is None for fewer than two values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def scores(row: Mapping) -> dict[str, float | None]:
    """A results.json row's seven scores by column title (None where missing) and its Avg."""
    values = {title: benchmark_score(row, key) for key, title in BENCHMARKS}
    present = [v for v in values.values() if v is not None]
    values["Avg"] = sum(present) / len(present) if len(present) == len(BENCHMARKS) else None
    return values


def _cell(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if len(present) < len(values) or not present:
        return "-"
    mean, std = mean_std(present)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def summary_table(runs: Mapping[int, Sequence[Mapping]]) -> str:
    """The paper's table over seeds: ``runs`` maps a seed to its results.json rows (one per method)."""
    by_method: dict[str, list[Mapping]] = {}
    for rows in runs.values():
        for row in rows:
            by_method.setdefault(method_cell(row), []).append(row)

    def order(label: str) -> tuple[int, str]:
        method = by_method[label][0]["method"]
        return (ROW_ORDER.index(method) if method in ROW_ORDER else len(ROW_ORDER), label)

    header = "| Method | # Params (%) | " + " | ".join(COLUMNS) + " | Avg |"
    lines = [header, "|---" * (len(COLUMNS) + 3) + "|"]
    for method in sorted(by_method, key=order):
        rows = by_method[method]
        params = {row.get("params_percent") for row in rows}
        params_cell = "-" if params == {None} else "/".join(f"{p:g}" for p in sorted(p for p in params if p is not None))
        cells = [_cell([scores(row)[title] for row in rows]) for title in [*COLUMNS, "Avg"]]
        lines.append(f"| {method} | {params_cell} | " + " | ".join(cells) + " |")
    seeds = ", ".join(str(seed) for seed in runs)
    note = f"Mean ± sample standard deviation (n-1) over {len(runs)} seeds ({seeds}); Avg: over the seeds' averages."
    lines += ["", note]
    lines += [one_pope_answer_note(f"{method_cell(row)} (seed {seed})", answer)
              for seed, rows in runs.items() for row in rows if (answer := one_pope_answer(row))]
    return "\n".join(lines)


def loss_history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) pairs the Trainer logged, from ``trainer_state.json``; [] if there is none."""
    state = Path(run_dir) / "trainer_state.json"
    if not state.exists():
        return []
    history = json.loads(state.read_text()).get("log_history", [])
    return [(entry["step"], float(entry["loss"])) for entry in history if "loss" in entry and "step" in entry]


def draw_study(png: Path, runs: Mapping[int, Mapping[str, object]], title: str) -> Path:
    """Write the picture: ``runs`` maps a seed to {"rows": results.json rows, "losses": {method: [(step, loss)]}}.

    Left, each finetune's training loss (one line per seed); right, each benchmark's score per method
    (bars: mean over seeds; error bars: sample std; dots: the seeds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    for seed, run in runs.items():
        for method, history in run["losses"].items():
            if history:
                steps, losses = zip(*history)
                first = seed == next(iter(runs))
                left.plot(steps, losses, color=COLOURS.get(method), alpha=0.85, lw=1.3, label=method if first else None)
    left.set(xlabel="optimizer step", ylabel="training loss", title="Finetuning loss" + (" (one line per seed)" if len(runs) > 1 else ""))
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend()

    methods = [m for m in ROW_ORDER if any(row["method"] == m for run in runs.values() for row in run["rows"])]
    width = 0.8 / max(1, len(methods))
    columns = [*COLUMNS, "Avg"]
    for k, method in enumerate(methods):
        per_seed = [scores(row) for run in runs.values() for row in run["rows"] if row["method"] == method]
        xs = [c + (k - (len(methods) - 1) / 2) * width for c in range(len(columns))]
        means, errors = [], []
        for column in columns:
            values = [s[column] for s in per_seed if s[column] is not None]
            mean, std = mean_std(values) if values else (0.0, None)
            means.append(mean)
            errors.append(std or 0.0)
        right.bar(xs, means, width, yerr=errors if len(per_seed) > 1 else None, capsize=2,
                  color=COLOURS.get(method), label=method)
        if len(per_seed) > 1:
            for x, column in zip(xs, columns):
                right.scatter([x] * len(per_seed), [s[column] or 0.0 for s in per_seed], s=6, color="black", zorder=3)
    right.set_xticks(range(len(columns)), columns)
    right.set(ylabel="score", ylim=(0, 105), title="Scores against the untrained base")
    right.grid(axis="y", alpha=0.3)
    right.legend(ncols=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
