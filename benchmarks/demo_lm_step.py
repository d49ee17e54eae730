"""Time one pretraining step of the demo's tiny language model at other widths, heads and depths.

    .venv/bin/python benchmarks/demo_lm_step.py checkpoints/demo playground/data/demo \
        --shapes 128,4,3 128,8,3 256,8,3 256,8,4

Each shape is hidden size, attention heads, layers (the intermediate size is twice the hidden size);
the model is freshly initialised from the demo's config with those sizes and trained on the demo's
own documents in its length-grouped batches. Prints milliseconds per step (median of the timed steps)
after a few warm-up steps. For choosing the tiny base's sizes; the numbers depend on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llava.demo.pretrain_lm import document_batches, documents


def step_times(model: LlamaForCausalLM, batches, warmup: int, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for index in range(warmup + steps):
        ids, labels = next(batches)
        start = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="a finished demo's output folder (its base is read)")
    parser.add_argument("data_dir", type=Path, help="the same demo's data folder")
    parser.add_argument("--shapes", nargs="+", default=["128,4,3", "128,8,3", "256,8,3"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    lm_dir = args.out_dir / "base" / "vicuna-tiny"
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    text = args.data_dir / "text"
    texts = [line for line in (text / "corpus.txt").read_text().splitlines() if line.strip()]
    texts += json.loads((text / "llava_demo_facts.json").read_text())
    docs = documents(tokenizer, texts, text / "llava_demo_text.json", "vicuna_v1")
    print(f"| hidden, heads, layers | parameters | ms per step (batch {args.batch}, {torch.get_num_threads()} threads) |")
    print("|---|---|---|")
    for shape in args.shapes:
        hidden, heads, layers = (int(v) for v in shape.split(","))
        config = LlamaForCausalLM.from_pretrained(str(lm_dir)).config
        config.update({"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": heads,
                       "num_key_value_heads": heads, "head_dim": hidden // heads, "num_hidden_layers": layers})
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        batches = document_batches(docs, args.batch, tokenizer.unk_token_id, torch.Generator().manual_seed(0), group=8)
        median = statistics.median(step_times(model, batches, args.warmup, args.steps))
        parameters = sum(p.numel() for p in model.parameters())
        print(f"| {hidden}, {heads}, {layers} | {parameters / 1e6:.2f}M | {1000 * median:.0f} |")


if __name__ == "__main__":
    main()
