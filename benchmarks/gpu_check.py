"""One prepared check of this project's DoRA on a GPU: parity with float64 first, then time and memory.

Methods: ``lora`` (upstream PEFT LoRA), ``dora-upstream`` (upstream PEFT's DoRA), ``dora-eager`` (this
layer, ``PEFT_DORA_KERNELS=torch``) and ``dora-fused`` (this layer, ``PEFT_DORA_KERNELS=triton``).

1. Parity: at each LLaMA-7B shape, dropout 0 and 0.05 (a fixed mask), bf16 runs of the three DoRA
   methods against a float64 formula written out here: output and the gradients of the input, A, B
   and m, as max |run - float64| / max |float64|. A DoRA method whose error exceeds the bound (or is
   not finite) fails the check: the table is still printed and the exit status is 1.
2. One layer's training step (forward on a fresh input without gradient, backward with a fixed output
   gradient, an SGD step that changes A, B and m, so the norm is recomputed every step) at the three
   shapes, 4096 and 16384 tokens, dropout 0 and 0.05: CUDA-event median of the steps and the peak
   memory allocated during a step above what was allocated before it.
3. A model-level step: two LLaMA-7B-sized decoder layers (transformers' LlamaModel, bf16, every
   projection adapted, gradient checkpointing), 2 x 2048 tokens, dropout 0.05 and 0.

r 128, alpha 256, bf16. The tables go to stdout and, with ``--out``, to a file. ``--dry`` runs the same
code on the CPU in float32 at tiny shapes (Triton's interpreter must be on: gpu_check.sh sets it), as
the test suite does; its times say nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_dora
from peft_dora.kernels import ENV

METHODS = ("lora", "dora-upstream", "dora-eager", "dora-fused")
DORA_METHODS = METHODS[1:]
KERNELS = {"dora-eager": "torch", "dora-fused": "triton"}
DECODER_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


@dataclass(frozen=True)
class Plan:
    """What one run measures: the GPU plan, or its tiny CPU stand-in (``--dry``)."""

    device: str
    dtype: torch.dtype
    rank: int
    alpha: int
    shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    check_tokens: int
    dropouts: tuple[float, ...]
    warmup: int
    repeats: int
    model_dims: tuple[int, int, int]  # hidden, intermediate, heads
    model_batch: tuple[int, int]  # sequences, tokens each
    model_repeats: int
    tolerance: float  # parity bound on max |run - float64| / max |float64|


GPU = Plan("cuda", torch.bfloat16, 128, 256, ((4096, 4096), (4096, 11008), (11008, 4096)), (4096, 16384), 256,
           (0.0, 0.05), 3, 20, (4096, 11008, 32), (2, 2048), 10, 3e-2)  # fmt: skip
DRY = Plan("cpu", torch.float32, 8, 16, ((48, 48), (48, 132), (132, 48)), (64, 160), 37,
           (0.0, 0.05), 1, 2, (64, 176, 4), (2, 16), 2, 1e-4)  # fmt: skip


class Report:
    """Lines printed as they come and kept for the output file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "---|" * len(header))
        for row in rows:
            self("| " + " | ".join(row) + " |")


@contextmanager
def kernels_of(method: str):
    """PEFT_DORA_KERNELS as the method needs it (restored after)."""
    old = os.environ.get(ENV)
    os.environ[ENV] = KERNELS.get(method, "auto")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def adapter_config(method: str, plan: Plan, dropout: float, targets: list[str]) -> LoraConfig:
    common = dict(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=dropout, target_modules=targets)
    if method == "lora":
        return LoraConfig(**common)
    if method == "dora-upstream":
        return LoraConfig(use_dora=True, **common)
    return peft_dora.DoraConfig(**common)


@torch.no_grad()
def mid_training(model: nn.Module, seed: int = 1) -> None:
    """B != 0 and m != ||W0 + sBA||, as after some training (so that every term of DoRA counts)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(1e-2 * torch.randn(p.shape, generator=gen))
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen).to(p.device))


def layer_model(method: str, plan: Plan, in_f: int, out_f: int, dropout: float, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(plan.device):
        base = nn.Sequential(OrderedDict(proj=nn.Linear(in_f, out_f, bias=False)))
    model = get_peft_model(base, adapter_config(method, plan, dropout, ["proj"]))
    mid_training(model)
    return model.to(dtype)


class FixedMask(nn.Module):
    """Dropout with one fixed mask, the same for every method and the float64 formula."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)


# ---------------------------------------------------------------- 1. parity


def float64_reference(model: nn.Module, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None):
    """Output and gradients (x, A, B, m) of DoRA written out in float64, from the model's own weights."""
    layer = model.base_model.model.proj
    w0 = layer.get_base_layer().weight.detach().double()
    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    m = layer.lora_magnitude_vector["default"].weight.detach().double().requires_grad_()
    s = layer.scaling["default"]
    x = x.double().requires_grad_()
    x_d = x if mask is None else x * mask.double()
    n = torch.linalg.norm(w0 + s * b.detach() @ a.detach(), dim=1)
    y = x @ w0.T + (m / n - 1) * (x_d @ w0.T) + (m / n) * s * (x_d @ a.T @ b.T)
    y.backward(g.double())
    return {"y": y.detach(), "x": x.grad, "A": a.grad, "B": b.grad, "m": m.grad}


def run_once(model: nn.Module, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None):
    layer = model.base_model.model.proj
    if mask is not None:
        layer.lora_dropout["default"] = FixedMask(mask)
    model.train()
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(g)
    weights = {"A": layer.lora_A, "B": layer.lora_B, "m": layer.lora_magnitude_vector}
    return {"y": y.detach(), "x": x.grad, **{k: v["default"].weight.grad for k, v in weights.items()}}


def parity(plan: Plan, report: Report) -> bool:
    report(f"## Parity: {plan.dtype} runs against float64, max |run - float64| / max |float64| "
           f"({plan.check_tokens} tokens, bound {plan.tolerance:g})")  # fmt: skip
    report()
    rows, ok = [], True
    for in_f, out_f in plan.shapes:
        gen = torch.Generator(device="cpu").manual_seed(in_f + out_f)
        x = torch.randn(1, plan.check_tokens, in_f, generator=gen).to(plan.device)
        g = torch.randn(1, plan.check_tokens, out_f, generator=gen).to(plan.device)
        for dropout in plan.dropouts:
            mask = None
            if dropout:
                keep = torch.rand(1, plan.check_tokens, in_f, generator=gen) >= dropout
                mask = (keep / (1 - dropout)).to(plan.device)
            model64 = layer_model("dora-eager", plan, in_f, out_f, dropout, torch.float64)
            reference = float64_reference(model64, x, g, mask)
            for method in DORA_METHODS:
                with kernels_of(method):
                    model = layer_model(method, plan, in_f, out_f, dropout, plan.dtype)
                    model.load_state_dict(model64.state_dict())
                    got = run_once(model, x.to(plan.dtype), g.to(plan.dtype), mask)
                errors = {k: ((got[k].double() - ref).abs().max() / ref.abs().max()).item() for k, ref in reference.items()}
                passed = all(math.isfinite(e) and e <= plan.tolerance for e in errors.values())
                ok &= passed
                rows.append([f"{in_f}->{out_f}", f"{dropout:g}", method] + [f"{errors[k]:.1e}" for k in reference]
                            + ["ok" if passed else "FAIL"])  # fmt: skip
                del model
    report.table(["shape", "dropout", "method", "y", "x grad", "A grad", "B grad", "m grad", "parity"], rows)
    report()
    return ok


# ---------------------------------------------------------------- 2. and 3. timing


class Clock:
    """CUDA events on a GPU (the device's time), the host clock on a CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def timed(self, out: list[float]):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            yield
            out.append(1e3 * (time.perf_counter() - t0))

    def memory_before(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_above(self, before: int) -> float:
        return (torch.cuda.max_memory_allocated() - before) / MIB if self.cuda else float("nan")


def time_steps(model: nn.Module, plan: Plan, clock: Clock, make_input, g: torch.Tensor | None, repeats: int):
    """(median ms, peak MiB) of training steps: forward, backward, SGD step, zero_grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6)
    model.train()
    times, peaks = [], []
    for k in range(plan.warmup + repeats):
        x = make_input()
        before = clock.memory_before()
        step: list[float] = []
        with clock.timed(step):
            out = model(x) if g is not None else model(inputs_embeds=x).last_hidden_state
            if g is not None:
                out.backward(g)
            else:
                out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if k >= plan.warmup:
            times.append(step[0])
            peaks.append(clock.peak_above(before))
        del x, out
    return statistics.median(times), max(peaks)


def release(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def layer_table(plan: Plan, clock: Clock, report: Report) -> None:
    report(f"## One layer's training step, {plan.dtype}, r {plan.rank} (median ms of {plan.repeats} steps; "
           "peak MiB allocated during a step above what was allocated before it)")  # fmt: skip
    report()
    rows = []
    for dropout in plan.dropouts:
        for tokens in plan.tokens:
            for in_f, out_f in plan.shapes:
                r = {}
                g = torch.randn(1, tokens, out_f, device=plan.device, dtype=plan.dtype)
                for method in METHODS:
                    with kernels_of(method):
                        model = layer_model(method, plan, in_f, out_f, dropout, plan.dtype)
                        make = lambda: torch.randn(1, tokens, in_f, device=plan.device, dtype=plan.dtype)  # noqa: E731
                        r[method] = time_steps(model, plan, clock, make, g, plan.repeats)
                    del model
                    release(plan.device)
                rows.append(timing_row([f"{in_f}->{out_f}", str(tokens), f"{dropout:g}"], r, dropout, clock.cuda))
    report.table(["shape", "tokens", "dropout", *timing_header()], rows)
    report()


def timing_header() -> list[str]:
    cells = [f"{m} ms / MiB" for m in METHODS]
    return cells + ["fused/LoRA time", "fused/LoRA mem", "upstream/fused time", "eager/fused time"]


def timing_row(first: list[str], r: dict, dropout: float, goals: bool) -> list[str]:
    """Cells of one row; with ``goals``, the issue's goals (fused within 1.10x LoRA's time and 1.05x its
    memory, upstream at least 1.5x slower) are marked at dropout 0, where they apply."""
    fused, lora, up, eager = r["dora-fused"], r["lora"], r["dora-upstream"], r["dora-eager"]

    def mark(value: float, ok: bool) -> str:
        if math.isnan(value):
            return "n/a"
        return f"{value:.2f}" + (" ok" if ok else " MISS") * (goals and not dropout)

    def mib(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.0f}"

    cells = [f"{r[m][0]:.2f} / {mib(r[m][1])}" for m in METHODS]
    time_ratio, mem_ratio, speedup = fused[0] / lora[0], fused[1] / lora[1], up[0] / fused[0]
    return first + cells + [mark(time_ratio, time_ratio <= 1.10), mark(mem_ratio, mem_ratio <= 1.05),
                            mark(speedup, speedup >= 1.5), f"{eager[0] / fused[0]:.2f}"]  # fmt: skip


def decoder_model(method: str, plan: Plan, dropout: float) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    hidden, intermediate, heads = plan.model_dims
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=256,
                         max_position_embeddings=plan.model_batch[1], use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = LlamaModel(config)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23; older: the alias
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, adapter_config(method, plan, dropout, DECODER_MODULES))
    mid_training(model)
    return model.to(plan.dtype)


def model_table(plan: Plan, clock: Clock, report: Report) -> None:
    sequences, length = plan.model_batch
    hidden, intermediate, heads = plan.model_dims
    report(f"## Model-level step: 2 decoder layers ({hidden} hidden, {intermediate} intermediate, {heads} heads), "
           f"{sequences} x {length} tokens, {plan.dtype}, gradient checkpointing, every projection adapted "
           f"(median ms of {plan.model_repeats} steps)")  # fmt: skip
    report()
    rows = []
    for dropout in sorted(plan.dropouts, reverse=True):
        r = {}
        for method in METHODS:
            with kernels_of(method):
                model = decoder_model(method, plan, dropout)
                make = lambda: torch.randn(sequences, length, hidden, device=plan.device, dtype=plan.dtype)  # noqa: E731
                r[method] = time_steps(model, plan, clock, make, None, plan.model_repeats)
            del model
            release(plan.device)
        rows.append(timing_row([f"{dropout:g}"], r, dropout, clock.cuda))
    report.table(["dropout", *timing_header()], rows)
    report()


def environment(plan: Plan, report: Report) -> None:
    import peft
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if plan.device == "cuda" else f"CPU ({platform.machine()}), dry run"
    report(f"# gpu_check: {device}")
    report()
    report(f"- torch {torch.__version__}, triton {triton_version}, peft {peft.__version__}, "
           f"transformers {transformers.__version__}, python {platform.python_version()}")  # fmt: skip
    if peft.__version__ != "0.21.2":
        report(f"- WARNING: peft_dora is tested with peft 0.21.2, this is {peft.__version__}")
    report()


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # renamed checkpointing API
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU in float32 (Triton interpreter)")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--repeats", type=int, help="timed steps per layer configuration")
    args = parser.parse_args(argv)
    plan = DRY if args.dry else GPU
    if args.repeats:
        plan = Plan(**{**plan.__dict__, "repeats": args.repeats})
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (DRY=1 runs the tiny CPU version)")
    if plan.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("gpu_check --dry: set TRITON_INTERPRET=1 (gpu_check.sh does) so the fused kernels run on the CPU")
    report = Report()
    start = time.perf_counter()
    environment(plan, report)
    ok = parity(plan, report)
    clock = Clock(plan.device)
    layer_table(plan, clock, report)
    model_table(plan, clock, report)
    report(f"parity: {'ok' if ok else 'FAILED'}; whole run {time.perf_counter() - start:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(report.lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
