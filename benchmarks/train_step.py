"""Time and peak memory of one optimizer step: LoRA vs this project's DoRA vs upstream PEFT's DoRA.

The model is a 2-layer LLaMA decoder with LLaMA-7B widths (hidden 4096, MLP 11008, 32 heads) and a
small vocabulary (the output layer is not what is compared). A step is what Dora_7b.sh does per
optimizer step on one device: gradient accumulation over 4 micro-batches of 1 x 1024 tokens with
gradient checkpointing, then AdamW. Adapters: r 128, alpha 256 on every Linear of the decoder.
The weights change every step, so the DoRA norm is recomputed once per step (and reused by the
checkpoint recomputation and the accumulation micro-steps).

Each method runs in its own process, so the peak memory (peak RSS above the RSS before the model
was built) is that method's alone.

    python benchmarks/train_step.py [--tokens 1024] [--steps 2] [--methods lora,dora,upstream-dora]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = {"lora": "LoRA (PEFT)", "dora": "DoRA (this project)", "upstream-dora": "DoRA (upstream PEFT)"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, tokens: int, steps: int, accumulation: int, layers: int, dropout: float, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_dora import DoraConfig

    torch.manual_seed(0)
    baseline = rss_mib()
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    common = dict(r=128, lora_alpha=256, lora_dropout=dropout, target_modules=TARGETS)
    if method == "lora":
        adapter = LoraConfig(**common)
    elif method == "upstream-dora":
        adapter = LoraConfig(**common, use_dora=True)
    else:
        adapter = DoraConfig(**common)
    model = get_peft_model(model, adapter)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        start = time.perf_counter()
        for _ in range(accumulation):
            ids = torch.randint(3, config.vocab_size, (1, tokens))
            loss = model(input_ids=ids, labels=ids).loss / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up (also allocates the optimizer state)
    times = [step() for _ in range(steps)]
    return {
        "method": method,
        "seconds": statistics.median(times),
        "peak_mib": peak_rss_mib() - baseline,
        "abs_peak_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps after one warm-up step")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.steps, args.accumulation, args.layers, args.dropout,
                                args.threads)))
        return

    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, "--tokens", str(args.tokens), "--steps", str(args.steps),
               "--accumulation", str(args.accumulation), "--layers", str(args.layers), "--dropout", str(args.dropout),
               "--threads", str(args.threads)]  # fmt: skip
        print(f"running {METHODS[method]} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])

    any_result = next(iter(results.values()))
    print(f"\nMachine: {platform.processor() or platform.machine()}, torch {any_result['torch']}, "
          f"{any_result['threads']} threads; {args.layers}-layer LLaMA-7B-width decoder, r 128, "
          f"{args.accumulation} x {args.tokens} tokens per step, gradient checkpointing, fp32, dropout {args.dropout}\n")  # fmt: skip
    print("| method | step time (s, median) | peak memory (MiB above baseline) |")
    print("|---|---|---|")
    for method, r in results.items():
        print(f"| {METHODS[method]} | {r['seconds']:.2f} | {r['peak_mib']:.0f} |")
    if {"lora", "dora"} <= results.keys():
        lora, dora = results["lora"], results["dora"]
        print(f"\nDoRA (this) / LoRA: time {dora['seconds'] / lora['seconds']:.3f}x (target <= 1.10), "
              f"peak memory {dora['peak_mib'] / lora['peak_mib']:.3f}x (target <= 1.05)")  # fmt: skip
    if {"dora", "upstream-dora"} <= results.keys():
        up, dora = results["upstream-dora"], results["dora"]
        print(f"DoRA (upstream) / DoRA (this): time {up['seconds'] / dora['seconds']:.2f}x, "
              f"peak memory {up['peak_mib'] / dora['peak_mib']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
