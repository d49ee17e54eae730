"""The embedded default: the whole study, FT vs LoRA vs DoRA, at tiny scale on a laptop.

Reads top to bottom, one stage after another; each stage leaves a ``.done`` marker so a rerun
reuses what is finished (``--fresh`` starts over):

1. data        synthetic images and conversations in the real formats (llava.demo.synthetic)
2. base        a tiny CLIP + LLaMA built from configs, its tokenizer trained on the generated text,
               its language model briefly pretrained on that text (as Vicuna is for the real model)
3. projector   stage-1 projector pretraining (projector only, ``plain`` template)
4. finetune    full finetuning, LoRA and DoRA through ``Dora_7b.sh`` (same module and flags, sizes scaled)
5. evaluate    every checkpoint, and the untrained base, through ``7B_eval_dora.sh`` on all seven benchmarks
6. table       the paper-style table
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DemoConfig:
    """Sizes of the tiny study. The defaults finish in minutes on two CPU cores."""

    data_dir: Path = ROOT / "playground" / "data" / "demo"
    out_dir: Path = ROOT / "checkpoints" / "demo"
    seed: int = 0
    n_train: int = 3000
    n_eval: int = 40
    lm_steps: int = 2000
    projector_epochs: float = 2.0
    finetune_epochs: float = 2.0
    lora_r: int = 16
    lora_alpha: int = 32
    lr_adapter: float = 2e-3
    lr_full: float = 2e-4
    lr_projector: float = 2e-3
    batch: int = 16
    eval_batch: int = 16
    methods: tuple[str, ...] = ("ft", "lora", "dora")
    sizes: dict = field(default_factory=lambda: dict(vocab_size=800, hidden_size=128, intermediate_size=256, num_layers=3))


ROW_NAMES = {"base": "Base (untrained)", "ft": "FT", "lora": "LoRA", "dora": "DoRA"}


def stage(name: str, marker: Path):
    """Run the decorated stage unless its marker exists; write the marker when it succeeds."""

    def wrap(fn):
        def run(*args, **kwargs):
            if marker.exists():
                logger.info("[%s] done already (%s): reusing it", name, marker.parent)
                return
            start = time.monotonic()
            logger.info("[%s] ...", name)
            fn(*args, **kwargs)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("ok\n")
            logger.info("[%s] finished in %.0f s", name, time.monotonic() - start)

        return run

    return wrap


def sh(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> None:
    """Run a command from the repository root; its output goes to ``log`` and is shown if it fails."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    if log is None:
        subprocess.run(cmd, cwd=ROOT, env=full_env, check=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        result = subprocess.run(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {result.returncode}); log: {log}\n{tail}")


def make_data(cfg: DemoConfig) -> None:
    from llava.demo.synthetic import generate

    generate(cfg.data_dir, seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval)


def make_base(cfg: DemoConfig) -> None:
    from llava.demo.pretrain_lm import pretrain_language_model
    from llava.tiny_base import TinySizes, build_tiny_base

    corpus = cfg.data_dir / "text" / "corpus.txt"
    sentences = corpus.read_text().splitlines()
    base = build_tiny_base(cfg.out_dir / "base", sentences, TinySizes(**cfg.sizes), seed=cfg.seed)
    text = cfg.data_dir / "text"
    pretrain_language_model(base.language_model, corpus, text / "llava_demo_text.json", text / "llava_demo_facts.json",
                            steps=cfg.lm_steps, seed=cfg.seed)


def pretrain_projector(cfg: DemoConfig) -> None:
    base = cfg.out_dir / "base"
    train = cfg.data_dir / "pretrain"
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
         "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "10",
         "--model_max_length", "512", "--dataloader_num_workers", "0", "--lazy_preprocess", "True",
         "--report_to", "none", "--seed", str(cfg.seed), "--disable_tqdm", "True"],
        log=cfg.out_dir / "logs" / "projector.log",
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
    }
    method_flags = {
        "ft": ["--lora_enable", "False", "--learning_rate", str(cfg.lr_full)],
        "lora": ["--use_dora", "False", "--learning_rate", str(cfg.lr_adapter)],
        "dora": ["--learning_rate", str(cfg.lr_adapter)],
    }[method]
    flags = ["--lora_r", str(cfg.lora_r), "--lora_alpha", str(cfg.lora_alpha), "--mm_projector_lr", str(cfg.lr_projector),
             "--num_train_epochs", str(cfg.finetune_epochs), "--model_max_length", "512",
             "--dataloader_num_workers", "0", "--logging_steps", "10", "--gradient_checkpointing", "False",
             "--seed", str(cfg.seed), "--disable_tqdm", "True", *method_flags]  # fmt: skip
    shutil.rmtree(cfg.out_dir / method, ignore_errors=True)
    sh(["bash", "Dora_7b.sh", *flags], env=env, log=cfg.out_dir / "logs" / f"finetune_{method}.log")


def untrained_reference(cfg: DemoConfig) -> Path:
    """The base with the stage-1 projector and no instruction tuning: a projector-only folder."""
    folder = cfg.out_dir / "untrained"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "mm_projector.bin"):
        shutil.copy2(cfg.out_dir / "projector" / name, folder / name)
    return folder


def evaluate(cfg: DemoConfig, name: str, checkpoint: Path) -> None:
    results = cfg.out_dir / "results"
    env = {
        "MODEL_BASE": str(cfg.out_dir / "base" / "vicuna-tiny"),
        "PYTHON": sys.executable,
        "BATCH_SIZE": str(cfg.eval_batch),
        "MMBENCH_ALL_ROUNDS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    sh(["bash", "7B_eval_dora.sh", ROW_NAMES[name], str(checkpoint), str(cfg.data_dir / "eval"), str(results), str(ROOT)],
       env=env, log=cfg.out_dir / "logs" / f"eval_{name}.log")  # fmt: skip


def table(cfg: DemoConfig) -> str:
    from llava.eval.summarize import find_results, load_results, render_table

    results = cfg.out_dir / "results"
    paths = find_results([results / ROW_NAMES[name] for name in ("base", *cfg.methods)])
    return render_table([load_results(p) for p in paths])


def run(cfg: DemoConfig, fresh: bool = False) -> str:
    if fresh:
        for path in (cfg.data_dir, cfg.out_dir):
            shutil.rmtree(path, ignore_errors=True)
    stage("data", cfg.data_dir / ".done")(make_data)(cfg)
    stage("base", cfg.out_dir / "base" / ".done")(make_base)(cfg)
    stage("projector", cfg.out_dir / "projector" / ".done")(pretrain_projector)(cfg)
    for method in cfg.methods:
        stage(f"finetune {ROW_NAMES[method]}", cfg.out_dir / method / ".done")(finetune)(cfg, method)
    checkpoints = {"base": untrained_reference(cfg), **{m: cfg.out_dir / m for m in cfg.methods}}
    for name, checkpoint in checkpoints.items():
        marker = cfg.out_dir / "results" / ROW_NAMES[name] / ".done"
        stage(f"evaluate {ROW_NAMES[name]}", marker)(evaluate)(cfg, name, checkpoint)
    return table(cfg)


def parse_args(argv: list[str] | None = None) -> tuple[DemoConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete the demo's data and checkpoints first")
    parser.add_argument("--data-dir", type=Path, help=f"default: {DemoConfig.data_dir.relative_to(ROOT)}[-seedN]")
    parser.add_argument("--out-dir", type=Path, help=f"default: {DemoConfig.out_dir.relative_to(ROOT)}[-seedN]")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, the base and every run (default 0); another seed gets its own folders")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (the test suite's run)")
    args = parser.parse_args(argv)
    suffix = f"-seed{args.seed}" if args.seed else ""
    cfg = DemoConfig(
        data_dir=args.data_dir or DemoConfig.data_dir.with_name(DemoConfig.data_dir.name + suffix),
        out_dir=args.out_dir or DemoConfig.out_dir.with_name(DemoConfig.out_dir.name + suffix),
        seed=args.seed,
    )
    return (quick(cfg) if args.quick else cfg), args


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.monotonic()
    result = run(cfg, fresh=args.fresh)
    print("\n" + result)
    print(f"\nDemo finished in {(time.monotonic() - start) / 60:.1f} min; outputs in {cfg.out_dir}")


def quick(cfg: DemoConfig) -> DemoConfig:
    """A shortened run for the test suite: every stage, a few steps each."""
    cfg.n_train, cfg.n_eval, cfg.lm_steps = 200, 6, 5
    cfg.projector_epochs, cfg.finetune_epochs = 0.25, 0.25
    cfg.lora_r, cfg.lora_alpha, cfg.batch = 4, 8, 8
    return cfg


if __name__ == "__main__":
    main()
