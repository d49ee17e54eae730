"""One wrapped Linear on a CUDA GPU in bf16: LoRA vs upstream PEFT's DoRA vs this project's DoRA.

The GPU companion of ``dora_layer.py`` (which measures fp32 on CPU). Same step: forward on a
fresh input, backward with a fixed output gradient, an SGD step that changes A, B and m (so the
DoRA norm is recomputed every step). r 128, alpha 256, LLaMA-7B shapes, bf16 weights and inputs.

Before timing, it checks that this project's layer agrees with upstream PEFT's DoRA on the same
weights: output and the gradients of A, B and m, both in bf16, compared with a float64 run of
the same layer (the error of each bf16 run against float64, side by side).

Times are CUDA-event medians of ``--repeats`` steps after warm-up; memory is the peak allocated
during a step minus what was allocated before it (weights and optimizer state excluded).

    python benchmarks/dora_layer_cuda.py [--tokens 4096,16384] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_dora

R, ALPHA = 128, 256
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
METHODS = ("lora", "dora-upstream", "dora-this")
MIB = 2**20


def build(method: str, in_f: int, out_f: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(in_f, out_f, bias=False))
    common = dict(r=R, lora_alpha=ALPHA, target_modules=["proj"])
    config = {"lora": LoraConfig(**common), "dora-upstream": LoraConfig(use_dora=True, **common),
              "dora-this": peft_dora.DoraConfig(**common)}[method]
    model = get_peft_model(model, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 1e-2)
        if method != "lora":
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.1 * torch.randn_like(magnitude))
    return model.to("cuda", dtype)


def grads(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(g)
    out = {"output": y.detach()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "A" if "lora_A" in name else "B" if "lora_B" in name else "m"
            out[key] = p.grad.detach()
    return out


def check(in_f: int, out_f: int, tokens: int) -> None:
    """Relative error (max |a - ref| / max |ref|) of each bf16 run against this layer in float64."""
    torch.manual_seed(1)
    x = torch.randn(1, tokens, in_f, device="cuda", dtype=torch.float64)
    g = torch.randn(1, tokens, out_f, device="cuda", dtype=torch.float64)
    reference = grads(build("dora-this", in_f, out_f, torch.float64), x, g)
    upstream64 = grads(build("dora-upstream", in_f, out_f, torch.float64), x, g)
    row = [f"{in_f}x{out_f}"]
    for key in ("output", "A", "B", "m"):
        agree = (upstream64[key] - reference[key]).abs().max() / reference[key].abs().max()
        row.append(f"{key}: fp64 diff {agree:.1e}")
    print("  ".join(row))
    for method in ("dora-upstream", "dora-this"):
        result = grads(build(method, in_f, out_f, torch.bfloat16), x.bfloat16(), g.bfloat16())
        errors = [(result[k].double() - reference[k]).abs().max() / reference[k].abs().max() for k in reference]
        print(f"  bf16 {method:14s} rel. error vs fp64: " + "  ".join(
            f"{k} {e:.2e}" for k, e in zip(reference, errors)))


def measure(method: str, in_f: int, out_f: int, tokens: int, repeats: int) -> tuple[float, float]:
    model = build(method, in_f, out_f, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6)
    g = torch.randn(1, tokens, out_f, device="cuda", dtype=torch.bfloat16)
    times, peaks = [], []
    for k in range(3 + repeats):
        x = torch.randn(1, tokens, in_f, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x).backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if k >= 3:
            times.append(start.elapsed_time(end))
            peaks.append((torch.cuda.max_memory_allocated() - before) / MIB)
        del x
    del model, opt
    torch.cuda.empty_cache()
    return statistics.median(times), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check-tokens", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use benchmarks/dora_layer.py for the CPU measurements")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\nAgreement (bf16 runs against this layer in float64; 'fp64 diff' is upstream vs this in float64):")
    for in_f, out_f in SHAPES:
        check(in_f, out_f, args.check_tokens)
    print("\n| shape | tokens | " + " | ".join(f"{m} ms | {m} MiB" for m in METHODS)
          + " | this/LoRA time | this/LoRA mem | upstream/this time |")
    print("|" + "---|" * (2 + 2 * len(METHODS) + 3))
    for tokens in map(int, args.tokens.split(",")):
        for in_f, out_f in SHAPES:
            r = {m: measure(m, in_f, out_f, tokens, args.repeats) for m in METHODS}
            cells = " | ".join(f"{r[m][0]:.2f} | {r[m][1]:.0f}" for m in METHODS)
            this, lora, up = r["dora-this"], r["lora"], r["dora-upstream"]
            print(f"| {in_f}->{out_f} | {tokens} | {cells} | {this[0] / lora[0]:.2f} | {this[1] / lora[1]:.2f} "
                  f"| {up[0] / this[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
