"""The embedded default: the whole study, FT vs LoRA vs DoRA, at tiny scale on a laptop.

Reads top to bottom, one stage after another; each stage leaves a ``.done`` marker so a rerun
reuses what is finished (``--fresh`` starts over):

1. data        synthetic images and conversations in the real formats (llava.demo.synthetic)
2. base        a tiny CLIP + LLaMA built from configs, its tokenizer trained on the generated text,
               its language model briefly pretrained on that text (as Vicuna is for the real model)
3. vision      the CLIP vision tower pretrained contrastively on generated image/caption pairs
               (as the real tower is; llava.demo.pretrain_clip)
4. projector   stage-1 projector pretraining (projector only, ``plain`` template)
5. finetune    full finetuning, LoRA and DoRA through ``Dora_7b.sh`` (same module and flags, sizes scaled)
6. evaluate    every checkpoint, and the untrained base, through ``7B_eval_dora.sh`` on all seven benchmarks
7. table       the paper-style table (table.md) and the study as a picture (study.png) in the output folder

Finetunes and evaluations are independent of one another once the projector is trained: ``--jobs``
of them run at a time (default: one per CPU core, up to 2), each on one thread. A tiny model keeps one
thread busy far better than two, so two single-threaded jobs finish sooner than the same jobs one after
another on two threads; and a training run's numbers depend on its thread count, so one thread for
every finetune and evaluation makes their results the same whatever --jobs and the core count are.

``--seeds 0 1 2`` runs the study once per seed, each in its own folders, and adds the table as
mean ± standard deviation over the seeds (llava.demo.report).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from llava.serve import how_to_chat

logger = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DemoConfig:
    """Sizes of the tiny study. The defaults finish in minutes on two CPU cores."""

    data_dir: Path = ROOT / "playground" / "data" / "demo"
    out_dir: Path = ROOT / "checkpoints" / "demo"
    seed: int = 0
    n_train: int = 5000
    n_pretrain: int = 3000
    n_text: int = 6000
    n_eval: int = 300
    lm_steps: int = 3000
    clip_steps: int = 400
    projector_epochs: float = 2.0
    finetune_epochs: float = 2.0
    lora_r: int = 16
    lora_alpha: int = 32
    lr_adapter: float = 2e-3
    lr_full: float = 2e-4
    lr_projector: float = 2e-3
    batch: int = 16
    eval_batch: int = 16
    logging_steps: int = 10
    log_every: int = 50
    jobs: int = 1
    methods: tuple[str, ...] = ("ft", "lora", "dora")
    sizes: dict = field(default_factory=lambda: dict(vocab_size=800, hidden_size=128, intermediate_size=256, num_layers=3,
                                                       lm_init_std=0.06))


ROW_NAMES = {"base": "Base (untrained)", "ft": "FT", "lora": "LoRA", "dora": "DoRA",
             "dora_branch": "DoRA (branch dropout)"}  # the last: benchmarks/demo_dora_dropout.py, not the study
FINETUNE_COST = {"ft": 1.0, "lora": 1.3, "dora": 1.6, "dora_branch": 1.6}  # relative time of a finetune at the demo's sizes


STUDY_VERSION = 8  # raised whenever a stage's output changes for the same settings
PRESENTATION_FIELDS = ("data_dir", "out_dir", "eval_batch", "logging_steps", "log_every", "jobs")


def settings(cfg: DemoConfig) -> str:
    """What a stage's output depends on: every setting of the study (not where it goes or how it
    logs), and the study's version. Each stage's marker holds it, so a rerun after a change of
    settings or of the study redoes the stages instead of reusing outputs made another way."""
    fields = {k: v for k, v in asdict(cfg).items() if k not in PRESENTATION_FIELDS}
    return json.dumps({"study_version": STUDY_VERSION, **fields}, sort_keys=True, default=list) + "\n"


def stage(name: str, marker: Path, made_with: str):
    """Run the decorated stage unless its marker says it was done with ``made_with``; write the marker
    when it succeeds. A marker with other settings is stale: the stage runs again."""

    def wrap(fn):
        def run(*args, **kwargs):
            if marker.exists():
                if marker.read_text() == made_with:
                    logger.info("[%s] done already (%s): reusing it", name, marker.parent)
                    return
                logger.info("[%s] was made with other settings or an older version of the demo (%s): redoing it",
                            name, marker)
                marker.unlink()
            start = time.monotonic()
            logger.info("[%s] ...", name)
            fn(*args, **kwargs)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(made_with)
            logger.info("[%s] finished in %.0f s", name, time.monotonic() - start)

        return run

    return wrap


def sh(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None,
       progress: Callable[[str], str | None] | None = None) -> None:
    """Run a command from the repository root; its output goes to ``log`` and is shown if it fails.

    Each output line (a progress bar's carriage-return updates split apart) is offered to
    ``progress``, and what it returns is logged: the terminal shows steps and questions as they go.
    """
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    if log is None:
        subprocess.run(cmd, cwd=ROOT, env=full_env, check=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        child = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in child.stdout:
            f.write(line)
            f.flush()
            for piece in re.split(r"[\r\n]", line.decode("utf-8", "replace")):
                message = progress(piece) if progress and piece.strip() else None
                if message:
                    logger.info(message)
        returncode = child.wait()
    if returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {returncode}); log: {log}\n{tail}")


def job_threads(cfg: DemoConfig) -> dict[str, str]:
    """Thread settings for a finetune or an evaluation: one thread, however many run side by side.

    Training rounds differently on one thread than on two (a DoRA finetune's weights, and its scores,
    came out different), so a fixed count keeps a seed's table the same for any ``--jobs`` and core count.
    """
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_jobs(jobs: int, tasks: dict[str, tuple[Callable[[], None], tuple[str, ...]]]) -> None:
    """Run ``tasks`` (name -> (function, names of the tasks it waits for)) with at most ``jobs`` at a time,
    each as soon as what it waits for is done, in the order given among those ready. A failure stops
    new tasks from starting; the running ones finish, then it is raised."""
    pending, running, done, slots = dict(tasks), {}, set(), max(1, jobs)
    unknown = {after for _, waits in tasks.values() for after in waits} - set(tasks)
    if unknown:
        raise ValueError(f"tasks wait for unknown tasks: {sorted(unknown)}")
    with ThreadPoolExecutor(slots) as pool:
        while pending or running:
            ready = [name for name, (_, waits) in pending.items() if set(waits) <= done]
            if not ready and not running:
                raise ValueError(f"tasks wait for each other: {sorted(pending)}")
            for name in ready[: slots - len(running)]:
                running[pool.submit(pending.pop(name)[0])] = name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            failed: Future | None = None
            for future in finished:
                done.add(running.pop(future))
                if future.exception() is not None:
                    failed = failed or future
            if failed is not None:
                pending.clear()
                wait(running)
                failed.result()


def training_progress(name: str, steps: int, every: int, logging_steps: int = 10) -> Callable[[str], str | None]:
    """Reads the Trainer's log lines ({'loss': ..., 'epoch': ...}, one per ``logging_steps`` steps)
    and reports every ``every`` steps: step, epoch and loss."""
    seen = 0

    def report(line: str) -> str | None:
        nonlocal seen
        if not line.startswith("{") or "'loss'" not in line or "train_runtime" in line:
            return None
        seen += 1
        step = min(seen * logging_steps, steps)
        if step % every and step != steps:
            return None
        entry = ast.literal_eval(line.strip())
        return f"[{name}] step {step}/{steps} (epoch {float(entry['epoch']):.2f}): loss {float(entry['loss']):.3f}"

    return report


def eval_progress(name: str) -> Callable[[str], str | None]:
    """Reports each benchmark of 7B_eval_dora.sh once its questions are answered (the generation
    loop's progress bar, named after its answers file, reaches its total)."""
    state = {"benchmark": "", "reported": ""}

    def report(line: str) -> str | None:
        if line.startswith("== "):
            state["benchmark"] = line[3:].strip()
            return None
        done = re.search(r"\.jsonl: *100%\|.*\| *(\d+)/(\d+) \[", line)
        if done and done.group(1) == done.group(2) and state["reported"] != state["benchmark"]:
            state["reported"] = state["benchmark"]
            return f"[evaluate {name}] {state['benchmark']}: {done.group(2)} questions answered"
        return None

    return report


def optimizer_steps(samples: int, batch: int, epochs: float) -> int:
    """The Trainer's number of optimizer steps (one process, no accumulation)."""
    return math.ceil(math.ceil(samples / batch) * epochs)


def make_data(cfg: DemoConfig) -> None:
    from llava.demo.synthetic import generate

    generate(cfg.data_dir, seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval, n_pretrain=cfg.n_pretrain,
             n_text=cfg.n_text)


def make_base(cfg: DemoConfig, probe=None, probe_every: int = 0) -> None:
    """The tiny base with its language model pretrained; ``probe``/``probe_every`` go to the pretraining."""
    from llava.demo.pretrain_lm import pretrain_language_model
    from llava.tiny_base import TinySizes, build_tiny_base

    shutil.rmtree(cfg.out_dir / "base", ignore_errors=True)
    corpus = cfg.data_dir / "text" / "corpus.txt"
    sentences = corpus.read_text().splitlines()
    base = build_tiny_base(cfg.out_dir / "base", sentences, TinySizes(**cfg.sizes), seed=cfg.seed)
    text = cfg.data_dir / "text"
    pretrain_language_model(base.language_model, corpus, text / "llava_demo_text.json", text / "llava_demo_facts.json",
                            steps=cfg.lm_steps, seed=cfg.seed, log_every=cfg.log_every * 4, probe=probe,
                            probe_every=probe_every)


def pretrain_vision(cfg: DemoConfig) -> None:
    from llava.demo.pretrain_clip import pretrain_vision_tower

    pretrain = cfg.data_dir / "pretrain"
    pretrain_vision_tower(cfg.out_dir / "base" / "clip-tiny", cfg.out_dir / "base" / "vicuna-tiny",
                          pretrain / "llava_demo_captions.json", pretrain, steps=cfg.clip_steps, seed=cfg.seed,
                          log_every=cfg.log_every)


def pretrain_projector(cfg: DemoConfig) -> None:
    base = cfg.out_dir / "base"
    train = cfg.data_dir / "pretrain"
    steps = optimizer_steps(cfg.n_pretrain, cfg.batch, cfg.projector_epochs)
    sh(
        [sys.executable, "-m", "llava.train.train_mem",
         "--model_name_or_path", str(base / "vicuna-tiny"), "--version", "plain",
         "--data_path", str(train / "llava_demo_pretrain.json"), "--image_folder", str(train),
         "--vision_tower", str(base / "clip-tiny"), "--mm_projector_type", "mlp2x_gelu",
         "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2",
         "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
         "--output_dir", str(cfg.out_dir / "projector"), "--num_train_epochs", str(cfg.projector_epochs),
         "--per_device_train_batch_size", str(cfg.batch), "--gradient_accumulation_steps", "1",
         "--save_strategy", "no", "--learning_rate", str(cfg.lr_projector), "--weight_decay", "0.",
         "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", str(cfg.logging_steps),
         "--model_max_length", "512", "--dataloader_num_workers", "0", "--lazy_preprocess", "True",
         "--report_to", "none", "--seed", str(cfg.seed), "--disable_tqdm", "True"],
        log=cfg.out_dir / "logs" / "projector.log",
        progress=training_progress("projector", steps, cfg.log_every, cfg.logging_steps),
    )  # fmt: skip


def finetune(cfg: DemoConfig, method: str) -> None:
    """One method through Dora_7b.sh itself: one process, float32, the demo's sizes."""
    base = cfg.out_dir / "base"
    env = {
        "LAUNCHER": "python",
        "PYTHON": sys.executable,
        "PRECISION": "",
        "MODEL_BASE": str(base / "vicuna-tiny"),
        "DATA_PATH": str(cfg.data_dir / "train" / "llava_demo_mix.json"),
        "IMAGE_FOLDER": str(cfg.data_dir / "train"),
        "VISION_TOWER": str(base / "clip-tiny"),
        "PRETRAIN_MM": str(cfg.out_dir / "projector" / "mm_projector.bin"),
        "OUTPUT_DIR": str(cfg.out_dir / method),
        "BATCH": str(cfg.batch),
        "GRAD_ACC": "1",
        **job_threads(cfg),
    }
    method_flags = {
        "ft": ["--lora_enable", "False", "--learning_rate", str(cfg.lr_full)],
        "lora": ["--use_dora", "False", "--learning_rate", str(cfg.lr_adapter)],
        "dora": ["--learning_rate", str(cfg.lr_adapter)],
        "dora_branch": ["--learning_rate", str(cfg.lr_adapter), "--dora_dropout", "branch"],
    }[method]
    flags = ["--lora_r", str(cfg.lora_r), "--lora_alpha", str(cfg.lora_alpha), "--mm_projector_lr", str(cfg.lr_projector),
             "--num_train_epochs", str(cfg.finetune_epochs), "--model_max_length", "512",
             "--dataloader_num_workers", "0", "--logging_steps", str(cfg.logging_steps), "--gradient_checkpointing", "False",
             "--seed", str(cfg.seed), "--disable_tqdm", "True", *method_flags]  # fmt: skip
    shutil.rmtree(cfg.out_dir / method, ignore_errors=True)
    steps = optimizer_steps(cfg.n_train, cfg.batch, cfg.finetune_epochs)
    sh(["bash", "Dora_7b.sh", *flags], env=env, log=cfg.out_dir / "logs" / f"finetune_{method}.log",
       progress=training_progress(f"finetune {ROW_NAMES[method]}", steps, cfg.log_every, cfg.logging_steps))


def untrained_reference(cfg: DemoConfig) -> Path:
    """The base with the stage-1 projector and no instruction tuning: a projector-only folder."""
    folder = cfg.out_dir / "untrained"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "mm_projector.bin"):
        shutil.copy2(cfg.out_dir / "projector" / name, folder / name)
    return folder


def evaluate(cfg: DemoConfig, name: str, checkpoint: Path) -> None:
    """One row through 7B_eval_dora.sh. Answers left by an earlier attempt are moved aside (FRESH=1):
    this stage only runs when it was not finished with the current checkpoints."""
    results = cfg.out_dir / "results"
    env = {
        "FRESH": "1",
        "MODEL_BASE": str(cfg.out_dir / "base" / "vicuna-tiny"),
        "PYTHON": sys.executable,
        "BATCH_SIZE": str(cfg.eval_batch),
        "CUDA_VISIBLE_DEVICES": "",
        **job_threads(cfg),
    }
    sh(["bash", "7B_eval_dora.sh", ROW_NAMES[name], str(checkpoint), str(cfg.data_dir / "eval"), str(results), str(ROOT)],
       env=env, log=cfg.out_dir / "logs" / f"eval_{name}.log", progress=eval_progress(ROW_NAMES[name]))  # fmt: skip


def result_rows(cfg: DemoConfig) -> list[dict]:
    """The results.json rows of the base and every method, in table order."""
    from llava.eval.summarize import find_results, load_results

    results = cfg.out_dir / "results"
    return [load_results(p) for p in find_results([results / ROW_NAMES[name] for name in ("base", *cfg.methods)])]


def losses(cfg: DemoConfig) -> dict[str, list[tuple[int, float]]]:
    from llava.demo.report import loss_history

    return {ROW_NAMES[m]: loss_history(cfg.out_dir / m) for m in cfg.methods}


def report(cfg: DemoConfig) -> str:
    """The paper-style table, written with the study's picture into the output folder."""
    from llava.demo.report import draw_study
    from llava.eval.summarize import render_table

    rows = result_rows(cfg)
    table = render_table(rows)
    (cfg.out_dir / "table.md").write_text(table + "\n")
    draw_study(cfg.out_dir / "study.png", {cfg.seed: {"rows": rows, "losses": losses(cfg)}},
               f"Tiny study, seed {cfg.seed}: FT vs LoRA vs DoRA")
    logger.info("Table and picture: %s, %s", cfg.out_dir / "table.md", cfg.out_dir / "study.png")
    return table


def run(cfg: DemoConfig, fresh: bool = False) -> str:
    if fresh:
        for path in (cfg.data_dir, cfg.out_dir):
            shutil.rmtree(path, ignore_errors=True)
    made_with = settings(cfg)
    stage("data", cfg.data_dir / ".done", made_with)(make_data)(cfg)
    stage("base", cfg.out_dir / "base" / ".done", made_with)(make_base)(cfg)
    stage("vision", cfg.out_dir / "base" / "clip-tiny" / ".done", made_with)(pretrain_vision)(cfg)
    stage("projector", cfg.out_dir / "projector" / ".done", made_with)(pretrain_projector)(cfg)
    checkpoints = {"base": untrained_reference(cfg), **{m: cfg.out_dir / m for m in cfg.methods}}

    def trained(method: str) -> Callable[[], None]:
        marker = cfg.out_dir / method / ".done"
        return lambda: stage(f"finetune {ROW_NAMES[method]}", marker, made_with)(finetune)(cfg, method)

    def evaluated(name: str) -> Callable[[], None]:
        marker = cfg.out_dir / "results" / ROW_NAMES[name] / ".done"
        return lambda: stage(f"evaluate {ROW_NAMES[name]}", marker, made_with)(evaluate)(cfg, name, checkpoints[name])

    # The slowest finetunes first, then each evaluation once its checkpoint is there.
    tasks = {f"finetune {m}": (trained(m), ()) for m in sorted(cfg.methods, key=FINETUNE_COST.get, reverse=True)}
    tasks["evaluate base"] = (evaluated("base"), ())
    tasks.update({f"evaluate {m}": (evaluated(m), (f"finetune {m}",)) for m in cfg.methods})
    run_jobs(cfg.jobs, tasks)
    return report(cfg)


def run_seeds(cfgs: list[DemoConfig], summary_dir: Path, fresh: bool = False) -> str:
    """The study once per seed, then the table as mean ± std over the seeds (table.md and study.png
    in ``summary_dir``); returns the per-seed tables and the summary."""
    from llava.demo.report import draw_study, summary_table

    parts = []
    for cfg in cfgs:
        start = time.monotonic()
        logger.info("=== seed %d (%s)", cfg.seed, cfg.out_dir)
        table = run(cfg, fresh=fresh)
        parts.append(f"Seed {cfg.seed} ({(time.monotonic() - start) / 60:.1f} min this call):\n\n{table}")
    runs = {cfg.seed: {"rows": result_rows(cfg), "losses": losses(cfg)} for cfg in cfgs}
    summary = summary_table({seed: run["rows"] for seed, run in runs.items()})
    summary_dir.mkdir(parents=True, exist_ok=True)
    (summary_dir / "table.md").write_text(summary + "\n")
    seeds = " ".join(str(cfg.seed) for cfg in cfgs)
    draw_study(summary_dir / "study.png", runs, f"Tiny study over seeds {seeds}: mean ± std (dots: seeds)")
    logger.info("Table over seeds and picture: %s, %s", summary_dir / "table.md", summary_dir / "study.png")
    return "\n\n".join(parts + [f"Over seeds {seeds}:\n\n{summary}"])


def seed_folder(folder: Path, seed: int) -> Path:
    """Seed 0 keeps the folder's name; another seed gets its own folder beside it (name-seedN)."""
    return folder.with_name(folder.name + f"-seed{seed}") if seed else folder


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def seed_value(text: str) -> int:
    """A seed numpy and torch both take (0 to 2**32 - 1): refused here, not in the projector stage minutes later."""
    seed = int(text)
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"{text} is not a seed: give an integer from 0 to {2**32 - 1}")
    return seed


def parse_args(argv: list[str] | None = None) -> tuple[list[DemoConfig], argparse.Namespace]:
    """One config per seed (``--seed N``, or each of ``--seeds``)."""
    parser = argparse.ArgumentParser(prog="scripts/demo.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete the demo's data and checkpoints first")
    parser.add_argument("--data-dir", type=Path, help=f"default: {DemoConfig.data_dir.relative_to(ROOT)}[-seedN]")
    parser.add_argument("--out-dir", type=Path, help=f"default: {DemoConfig.out_dir.relative_to(ROOT)}[-seedN]")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=seed_value, default=0,
                       help="seed of the data, the base and every run (default 0); another seed gets its own folders")
    seeds.add_argument("--seeds", type=seed_value, nargs="+",
                       help="run the study once per seed, each in its own folders (with --data-dir / --out-dir: "
                            "DIR for seed 0, DIR-seedN for the others), then the table as mean ± std over them")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="finetunes and evaluations run at a time, each on one thread "
                             f"(default {default_jobs()}: one per core, up to 2)")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (the test suite's run)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs: at least 1")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")
    cfgs = []
    for seed in args.seeds if args.seeds is not None else [args.seed]:
        several = args.seeds is not None
        data = seed_folder(args.data_dir, seed) if args.data_dir and several else args.data_dir
        out = seed_folder(args.out_dir, seed) if args.out_dir and several else args.out_dir
        cfg = DemoConfig(data_dir=data or seed_folder(DemoConfig.data_dir, seed),
                         out_dir=out or seed_folder(DemoConfig.out_dir, seed), seed=seed, jobs=args.jobs)
        cfgs.append(quick(cfg) if args.quick else cfg)
    return cfgs, args


def summary_folder(out_dir: Path, seeds: list[int]) -> Path:
    """Where the table over seeds goes: beside the seeds' folders, named after them (demo-seeds0-1-2)."""
    return out_dir.with_name(out_dir.name + "-seeds" + "-".join(map(str, seeds)))


def main(argv: list[str] | None = None) -> None:
    cfgs, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.monotonic()
    if args.seeds is None:
        result = run(cfgs[0], fresh=args.fresh)
        where = cfgs[0].out_dir
    else:
        where = summary_folder(args.out_dir or DemoConfig.out_dir, args.seeds)
        result = run_seeds(cfgs, where, fresh=args.fresh)
    print("\n" + result)
    print(f"\nDemo finished in {(time.monotonic() - start) / 60:.1f} min; outputs in {where}")
    print("\n" + how_to_chat(cfgs[0].out_dir, cfgs[0].methods, cfgs[0].data_dir / "eval"))


def quick(cfg: DemoConfig) -> DemoConfig:
    """A shortened run for the test suite: every stage, a few steps each."""
    return replace(cfg, n_train=260, n_pretrain=200, n_text=400, n_eval=6, lm_steps=5, clip_steps=5,
                   projector_epochs=0.25, finetune_epochs=0.25, lora_r=4, lora_alpha=8, batch=8, logging_steps=2,
                   log_every=4)


if __name__ == "__main__":
    main()
