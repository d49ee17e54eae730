"""Questions per second of the evaluation loop at batch size 1 and 16, and whether answers stay identical.

Builds a tiny LLaVA-1.5 (tiny LLaMA + CLIP + projector, ``llava.tiny_base``) in a temporary folder,
writes ``--questions`` VQA-style questions of varied lengths with non-square images, and answers
them greedily through ``run_generation`` (the loop every benchmark script uses: image loading,
batching, generation, answers file). Batch size 1 is the reference: the "identical" column is the
share of answers equal to it, "alone" how many rows the near-tie check answered again at batch
size 1. A few questions are answered first as a warm-up, untimed. On a shared machine other
processes slow some runs badly (and batch size 1, many small steps, the most), so each batch size
runs ``--rounds`` times, interleaved, and its fastest run counts.

    python benchmarks/eval_throughput.py [--questions 64] [--max-new-tokens 16] [--batch-sizes 1 16] [--rounds 3]

Target: at least 4x the questions per second at batch 16, with 100% identical answers.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from llava.eval import generation as gen
from llava.model.builder import load_pretrained_model
from llava.tiny_base import build_tiny_base
from llava.tiny_base import build_tiny_llava as build_tiny_llava_folder

WORDS = "what color is the cat on the left of the red car near a small tree in the street".split()


def build_tiny_llava(root: Path) -> Path:
    """A full tiny LLaVA folder whose greedy answers differ between questions."""
    return build_tiny_llava_folder(build_tiny_base(root / "base"), root / "llava-tiny")


def write_questions(root: Path, count: int) -> list[gen.Request]:
    """VQA-style requests: 3-20 word questions, one noise image each (sizes vary)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    requests = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        size = (24 + (7 * i) % 40, 24 + (5 * i) % 30)
        path = root / "images" / f"{i}.png"
        Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()).save(path)
        text = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + (i * 5) % 18)) + "?"
        prompt = gen.templated_prompt("vicuna_v1", "<image>\n" + text)
        requests.append(gen.Request(i, prompt, text, images=[functools.partial(gen.open_rgb, str(path))]))
    return requests


@dataclass
class Row:
    batch: int
    questions: int
    seconds: float
    answers: list[str]
    alone: int


def timed_run(requests, loaded, settings, batch_size: int, answers_file: Path) -> Row:
    start = time.perf_counter()
    summary = gen.run_generation(
        requests, loaded.model, loaded.tokenizer, loaded.processor, settings, answers_file, "llava-tiny", batch_size
    )
    seconds = time.perf_counter() - start
    answers = [json.loads(line)["text"] for line in answers_file.read_text().splitlines()]
    return Row(batch_size, len(requests), seconds, answers, summary.rerun_at_batch_one)


def best_of_rounds(requests, loaded, settings, batch_sizes: list[int], rounds: int, root: Path) -> list[Row]:
    """Each batch size ``rounds`` times, interleaved; the fastest run of each counts (others share the CPU)."""
    best: dict[int, Row] = {}
    for round_index in range(rounds):
        for batch_size in batch_sizes:
            row = timed_run(requests, loaded, settings, batch_size, root / f"answers_{batch_size}_{round_index}.jsonl")
            if batch_size in best and best[batch_size].answers != row.answers:
                raise RuntimeError(f"Batch size {batch_size}: answers changed between rounds")
            if batch_size not in best or row.seconds < best[batch_size].seconds:
                best[batch_size] = row
    return [best[b] for b in batch_sizes]


def markdown(rows: list[Row]) -> str:
    reference = rows[0]
    lines = [
        "| batch | questions | seconds | q/s | speed-up | identical answers % | answered again alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        same = sum(a == b for a, b in zip(row.answers, reference.answers)) / len(reference.answers) * 100
        qps = row.questions / row.seconds
        speedup = qps / (reference.questions / reference.seconds)
        cells = [row.batch, row.questions, f"{row.seconds:.2f}", f"{qps:.2f}", f"{speedup:.1f}x", f"{same:.0f}"]
        cells.append(row.alone)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="the first is the reference")
    parser.add_argument("--tie-margin", type=float, default=None, help="near-tie threshold (default: the loop's)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per batch size; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny_llava(root)
        tokenizer, model, processor, _ = load_pretrained_model(str(model_dir), None, "llava-tiny", device="cpu")
        loaded = SimpleNamespace(tokenizer=tokenizer, model=model, processor=processor)
        requests = write_questions(root / "data", args.questions)
        settings = gen.GenerationSettings(
            temperature=0, max_new_tokens=args.max_new_tokens, stop_str="</s>", tie_margin=args.tie_margin
        )
        timed_run(requests[:4], loaded, settings, 4, root / "warmup.jsonl")
        rows = best_of_rounds(requests, loaded, settings, args.batch_sizes, args.rounds, root)

    margin = gen.tie_margin_for(settings, torch.float32)
    print(
        f"Tiny LLaVA on CPU ({torch.get_num_threads()} threads), fp32, greedy, max_new_tokens {args.max_new_tokens}, "
        f"best of {args.rounds} rounds, tie margin {margin:g}, {len(set(rows[0].answers))} distinct answers among {args.questions}\n"
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
