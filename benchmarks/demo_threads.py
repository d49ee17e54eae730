"""Whether the demo's stages give the same weights on one and on two threads (docs/demo.md, "Threads").

    .venv/bin/python benchmarks/demo_threads.py [--data playground/data/demo] [--steps 40]

Needs the demo's data (``bash scripts/demo.sh`` writes it). In a scratch folder, for 1 and then 2
threads (``OMP_NUM_THREADS`` of a child process): the tiny base is built and its language model
pretrained for ``--steps`` steps, the vision tower pretrained for ``--steps`` steps, and the projector
trained by ``llava.train.train_mem`` for half as many, on the one-thread run's base both times so that
its difference is its own. Prints the largest weight difference of each stage between the two thread
counts (0 means bit-identical). About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def build(data: Path, out: Path, steps: int) -> None:
    """The base and vision stages as the demo runs them, shortened to ``steps`` steps each."""
    from llava.demo.pretrain_clip import pretrain_vision_tower
    from llava.demo.pretrain_lm import pretrain_language_model
    from llava.demo.run import DemoConfig
    from llava.tiny_base import TinySizes, build_tiny_base

    text, pretrain = data / "text", data / "pretrain"
    corpus = text / "corpus.txt"
    base = build_tiny_base(out, corpus.read_text().splitlines(), TinySizes(**DemoConfig().sizes), seed=0)
    pretrain_language_model(base.language_model, corpus, text / "llava_demo_text.json",
                            text / "llava_demo_facts.json", steps=steps, seed=0, log_every=steps)
    pretrain_vision_tower(out / "clip-tiny", out / "vicuna-tiny", pretrain / "llava_demo_captions.json", pretrain,
                          steps=steps, seed=0, log_every=steps)


def projector(data: Path, base: Path, out: Path, steps: int, env: dict[str, str]) -> None:
    """The demo's projector stage on ``base`` (a folder with the built language model and vision tower)."""
    pretrain = data / "pretrain"
    subprocess.run(
        [sys.executable, "-m", "llava.train.train_mem", "--model_name_or_path", str(base / "vicuna-tiny"),
         "--version", "plain", "--data_path", str(pretrain / "llava_demo_pretrain.json"),
         "--image_folder", str(pretrain), "--vision_tower", str(base / "clip-tiny"),
         "--mm_projector_type", "mlp2x_gelu", "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2",
         "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
         "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "16",
         "--save_strategy", "no", "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine",
         "--model_max_length", "512", "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "0",
         "--disable_tqdm", "True"],
        cwd=ROOT, env=env, check=True, capture_output=True)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "playground" / "data" / "demo")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child process's part
    args = parser.parse_args()
    if args.build is not None:
        build(args.data, args.build, args.steps)
        return
    if not (args.data / "pretrain").is_dir():
        sys.exit(f"{args.data}: no demo data; run `bash scripts/demo.sh` first (or pass --data).")
    with tempfile.TemporaryDirectory() as scratch:
        runs = {}
        for threads in ("1", "2"):
            out = Path(scratch) / f"threads{threads}"
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            subprocess.run([sys.executable, __file__, "--data", str(args.data), "--steps", str(args.steps),
                            "--build", str(out)], env=env, check=True, capture_output=True)
            projector(args.data, Path(scratch) / "threads1", out / "projector", max(1, args.steps // 2), env)
            runs[threads] = {
                "language model": load_file(out / "vicuna-tiny" / "model.safetensors"),
                "vision tower": load_file(out / "clip-tiny" / "model.safetensors"),
                "projector": torch.load(out / "projector" / "mm_projector.bin", weights_only=True),
            }
        print("| stage | largest weight difference, 1 vs 2 threads |\n|---|---|")
        for stage in runs["1"]:
            print(f"| {stage} | {largest_difference(runs['1'][stage], runs['2'][stage]):.3g} |")


if __name__ == "__main__":
    main()
