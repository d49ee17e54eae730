"""What the demo's language model can do while it is pretrained, for several initial weight spreads.

    .venv/bin/python benchmarks/demo_lm_curve.py playground/data/demo-seed2 --seed 2 --init-std 0.02 0.06

For each spread (``TinySizes.lm_init_std``; LLaMA's default is 0.02, the demo's 0.06), a fresh tiny
base is built in a scratch folder exactly as the demo's base stage builds it from the data folder
(same tokenizer, sizes, documents and schedule), and every ``--every`` steps the language model
answers greedily the held-out described chats of ``benchmarks/demo_lm_probe.py``. Prints one row per
probe: right answers out of ``--questions`` for ScienceQA, MMBench, POPE and VQAv2. ``--steps`` defaults
to the demo's (3000: about 7 minutes a run on 2 cores; 2000, as docs/demo.md's table: about 5).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from dataclasses import replace
from pathlib import Path

from demo_lm_probe import probe_questions, right_answers
from transformers import AutoTokenizer

from llava.demo.run import DemoConfig, make_base

PROBED = ("scienceqa", "mmbench", "pope", "vqav2")


def printed_probe(tokenizer_dir: Path, questions: dict[str, list[tuple[str, str]]], std: float):
    """A probe for ``pretrain_language_model`` that prints a row of right answers per benchmark (the
    tokenizer is read when probing: the base stage writes it before pretraining starts)."""

    tokenizer_once = functools.cache(lambda: AutoTokenizer.from_pretrained(str(tokenizer_dir)))

    def probe(model, step: int) -> None:
        tokenizer = tokenizer_once()
        cells = [f"{right_answers(tokenizer, model, asked)}/{len(asked)}" for asked in questions.values()]
        print(f"| {std} | {step} | " + " | ".join(cells) + " |", flush=True)

    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="a demo data folder (playground/data/demo, ...-seedN)")
    parser.add_argument("--seed", type=int, default=0, help="the seed the data folder was made with")
    parser.add_argument("--init-std", type=float, nargs="+", default=[0.02, 0.06])
    parser.add_argument("--steps", type=int, default=DemoConfig.lm_steps)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--questions", type=int, default=40)
    args = parser.parse_args()

    questions = {b: probe_questions(b, args.questions) for b in PROBED}
    print("| initial std | step | " + " | ".join(PROBED) + " |")
    print("|---" * (len(PROBED) + 2) + "|")
    for std in args.init_std:
        with tempfile.TemporaryDirectory() as scratch:
            defaults = DemoConfig()
            cfg = replace(defaults, data_dir=args.data_dir, out_dir=Path(scratch), seed=args.seed,
                          lm_steps=args.steps, sizes={**defaults.sizes, "lm_init_std": std})
            probe = printed_probe(cfg.out_dir / "base" / "vicuna-tiny", questions, std)
            make_base(cfg, probe=probe, probe_every=args.every)


if __name__ == "__main__":
    main()
