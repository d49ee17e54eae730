"""DoRA with dropout on the low-rank branch only (``--dora_dropout branch``) against the seed's formula, on the demo.

    bash scripts/demo.sh --seed N                                # for each seed, once (reused if done)
    .venv/bin/python benchmarks/demo_dora_dropout.py --seeds 0 1 2

The seed's formula passes the dropped-out input through W0 as well, which costs a second base product
(forward and backward); ``branch`` drops out the low-rank branch's input only (``DoraConfig.dora_dropout``),
a deviation from the seed and the paper. For each seed's finished study (its default folders) this runs one
more DoRA finetune with the study's settings and ``--dora_dropout branch`` (folder ``dora_branch``),
evaluates it on the seven benchmarks like the study's rows, and prints both DoRA rows per seed, the
difference per benchmark (mean and standard deviation over seeds) and each finetune's training time
(transformers' ``train_runtime``; two finetunes running side by side slow each other).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
from pathlib import Path

from llava.demo.run import (
    ROW_NAMES,
    DemoConfig,
    default_jobs,
    evaluate,
    finetune,
    run_jobs,
    seed_folder,
    settings,
    stage,
)
from llava.eval.summarize import BENCHMARKS, load_results

VARIANT = "dora_branch"


def study(seed: int, jobs: int) -> DemoConfig:
    """The seed's study in its default folders; stops with what to run when it is not finished."""
    cfg = DemoConfig(seed=seed, data_dir=seed_folder(DemoConfig.data_dir, seed),
                     out_dir=seed_folder(DemoConfig.out_dir, seed), jobs=jobs)  # fmt: skip
    marker = cfg.out_dir / "results" / ROW_NAMES["dora"] / ".done"
    if not marker.exists() or marker.read_text() != settings(cfg):
        flag = f" --seed {seed}" if seed else ""
        raise SystemExit(f"{cfg.out_dir}: no finished study with the demo's settings; run `bash scripts/demo.sh{flag}` first")
    return cfg


def train_runtime(folder: Path) -> float:
    """Seconds of training that transformers recorded for a finetune."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return next(entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry)


def scores(cfg: DemoConfig, method: str) -> dict[str, float]:
    row = load_results(cfg.out_dir / "results" / ROW_NAMES[method])
    return {key: row["benchmarks"][key]["score"] for key, _ in BENCHMARKS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="finetunes and evaluations at a time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfgs = [study(seed, args.jobs) for seed in args.seeds]

    tasks = {}
    for cfg in cfgs:
        made_with = settings(cfg)
        name = f"{ROW_NAMES[VARIANT]}, seed {cfg.seed}"
        checkpoint = cfg.out_dir / VARIANT
        marker = cfg.out_dir / "results" / ROW_NAMES[VARIANT] / ".done"
        train = stage(f"finetune {name}", checkpoint / ".done", made_with)(finetune)
        score = stage(f"evaluate {name}", marker, made_with)(evaluate)
        tasks[f"train {cfg.seed}"] = (functools.partial(train, cfg, VARIANT), ())
        tasks[f"score {cfg.seed}"] = (functools.partial(score, cfg, VARIANT, checkpoint), (f"train {cfg.seed}",))
    run_jobs(args.jobs, tasks)

    head = "| seed | DoRA | " + " | ".join(name for _, name in BENCHMARKS) + " | training s |"
    lines = [head, "|" + "---|" * (len(BENCHMARKS) + 3)]
    differences = {key: [] for key, _ in BENCHMARKS}
    for cfg in cfgs:
        seed_rows = {method: scores(cfg, method) for method in ("dora", VARIANT)}
        for method, label in (("dora", "seed's formula"), (VARIANT, "branch dropout")):
            values = " | ".join(f"{score:.1f}" for score in seed_rows[method].values())
            lines.append(f"| {cfg.seed} | {label} | {values} | {train_runtime(cfg.out_dir / method):.0f} |")
        for key, found in differences.items():
            found.append(seed_rows[VARIANT][key] - seed_rows["dora"][key])
    if len(cfgs) > 1:
        cells = " | ".join(f"{statistics.mean(d):+.1f} ± {statistics.stdev(d):.1f}" for d in differences.values())
        lines.append(f"| mean ± std | branch - seed's | {cells} | |")
    else:  # one seed has no spread to show
        cells = " | ".join(f"{d[0]:+.1f}" for d in differences.values())
        lines.append(f"| difference | branch - seed's | {cells} | |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
