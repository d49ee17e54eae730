"""Time and peak memory of one training step of ONE wrapped Linear layer: LoRA vs DoRA.

Methods (all r=128, lora_alpha=256, fp32, CPU):
  lora           upstream PEFT ``LoraConfig``
  dora-upstream  upstream PEFT ``LoraConfig(use_dora=True)``
  dora-this      this project's ``peft_dora.DoraConfig``

Shapes are the LLaMA-7B projections (in->out): 4096->4096 (q/k/v/o), 4096->11008 (gate/up),
11008->4096 (down); tokens 1024 and 4096 by default.

A step is a training step in which the adapter weights change every step:
  forward on a fresh input x ([1, tokens, in], requires_grad=False), y.backward(g) with a fixed
  random g, an SGD step with a tiny learning rate on every trainable parameter (A, B and, for DoRA,
  the magnitude), grads set to None. The SGD step writes A and B in place (and bumps this
  project's optimizer generation), so the DoRA norm cannot be served from a cache. Note that
  ``p.data.add_(...)`` would NOT do: ``.data`` has its own version counter, so a version-keyed
  cache would not see the change. For ``dora-this`` the script counts how often the norm was
  actually computed and prints it ("norm k/N"). 2 warm-up steps, then the median of
  ``--repeats`` steps (time.perf_counter); fwd/bwd columns are medians of the forward and of the
  backward alone, the rest of the step being the SGD update.

Each (method, shape, tokens) runs in its own subprocess (this script with ``--worker``), so that
the peak memory is that configuration's alone: peak RSS (``resource.getrusage`` ru_maxrss) minus
the RSS just before the model and the inputs are built, i.e. W0, A, B, m, x, g, the activations
and the temporaries of forward and backward. The absolute peak RSS is printed too.

The methods of one (shape, tokens) are timed in turns: their processes live side by side, only one
computes at a time, and the driver asks each for one step in a rotating order. A shared machine's
slow spells (here they move a step's time by 10% and more for seconds at a time) then fall on all
methods alike, so their ratios hold where separate, consecutive runs would not: the time ratios
are medians of per-step ratios, step i of one method against step i of the other (the ratio of
the two median times is printed too). ``--rounds K``
repeats the whole set with fresh processes and pools the steps; ``--threads N`` sets torch's thread
count (default: torch's default). The "cpu ms" column is the median process CPU time of a step
(time.process_time).

``--dropout P`` (default 0.0) sets ``lora_dropout``. With dropout the paper's forward needs W0
applied to the dropped-out input, W0 dropout(x), an extra out x in matmul (and its activation)
that both DoRA implementations pay and LoRA does not, so the DoRA/LoRA targets are meant for
``--dropout 0``. ``--dora-dropout branch`` gives this project's layer the opt-in deviation that applies
dropout to the low-rank branch alone (``DoraConfig(dora_dropout="branch")``: no W0 dropout(x)).

With glibc's default allocator the peak RSS also holds freed heap memory not yet given back, which
depends on the order of allocations and moves the peak by tens of MiB either way; ``--exact-memory``
sets MALLOC_MMAP_THRESHOLD_=131072 in the workers, so that every tensor is its own mapping returned
on free and the peak follows the live tensors (the fair comparison of what each method holds).

``--input-grad`` makes the input require grad, as for a layer inside a model: backward then
also computes dL/dx (one more out x in matmul for every method), which dilutes DoRA's fixed
per-step cost (the norm). The default (no input grad) is the harshest case for DoRA.

Usage:
  python benchmarks/dora_layer.py                                  # everything
  python benchmarks/dora_layer.py --tokens 1024 --repeats 3
  python benchmarks/dora_layer.py --shapes 4096x4096 --methods lora,dora-this
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("lora", "dora-upstream", "dora-this")
SHAPES = ("4096x4096", "4096x11008", "11008x4096")
TOKENS = (1024, 4096)
R, ALPHA = 128, 256
WARMUP = 2

# Targets, checked at TARGET_TOKENS tokens (printed for every row).
TARGET_TIME = 1.10  # dora-this / lora time
TARGET_MEM = 1.05  # dora-this / lora peak memory above baseline
TARGET_SPEEDUP = 1.5  # dora-upstream / dora-this time
TARGET_TOKENS = 1024

MIB = 1024 * 1024


def _parse_shape(s: str) -> tuple[int, int]:
    a, b = s.lower().replace("->", "x").split("x")
    return int(a), int(b)


def _current_rss() -> int:
    """Resident set size now, in bytes (falls back to the peak where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss()


def _peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --------------------------------------------------------------------------------------------
# Worker: one configuration, one process.
# --------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model

    import peft_dora
    from peft_dora import kernels

    # Count the norm computations of this project's layer (a Python counter: negligible cost).
    norm_calls = [0]
    backend = kernels.select(torch.device("cpu"), torch.float32)
    inner_norm = backend.weight_norm

    def counted_norm(*a, **k):
        norm_calls[0] += 1
        return inner_norm(*a, **k)

    backend.weight_norm = counted_norm

    if args.threads:
        torch.set_num_threads(args.threads)
    in_f, out_f = _parse_shape(args.shape)
    tokens, method = args.tokens, args.method

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(in_f, out_f, bias=False)

        def forward(self, x):
            return self.proj(x)

    # Warm the allocator and the math library on something small, outside the measurement.
    torch.ones(8, 8) @ torch.ones(8, 8)

    baseline = _current_rss()
    torch.manual_seed(0)
    model = Block()
    common = dict(r=R, lora_alpha=ALPHA, lora_dropout=args.dropout, target_modules=["proj"])
    if method == "lora":
        config = LoraConfig(**common)
    elif method == "dora-upstream":
        config = LoraConfig(use_dora=True, **common)
    elif method == "dora-this":
        config = peft_dora.DoraConfig(dora_dropout=args.dora_dropout, **common)
    else:
        raise SystemExit(f"unknown method {method!r}")
    model = get_peft_model(model, config)
    model.train()
    layer = model.base_model.model.proj
    with torch.no_grad():
        # Mid-training state: B != 0 (so DoRA's norm differs from the magnitude).
        layer.lora_B["default"].weight.normal_(0.0, 1e-3)
    if method == "dora-this":
        assert type(layer).__name__ == "DoraLinear", type(layer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6)
    g = torch.randn(1, tokens, out_f)
    after_build = _current_rss()
    peak_after_build = _peak_rss()

    norm_calls[0] = 0
    steps = 0
    print("READY", flush=True)
    for line in sys.stdin:  # the driver asks for one step at a time (see run_paired)
        if line.strip() != "step":
            break
        x = torch.randn(1, tokens, in_f, requires_grad=args.input_grad)  # fresh batch, outside the timing
        c0 = time.process_time()
        t0 = time.perf_counter()
        y = model(x)
        t1 = time.perf_counter()
        y.backward(g)
        t2 = time.perf_counter()
        opt.step()  # changes A, B (and m) in place: no norm can be reused
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        c3 = time.process_time()
        del x, y
        steps += 1
        print("STEP " + json.dumps({"fwd": t1 - t0, "bwd": t2 - t1, "step": t3 - t0, "cpu": c3 - c0}), flush=True)

    peak = _peak_rss()
    result = {
        "threads": torch.get_num_threads(),
        "peak_mib": (peak - baseline) / MIB,
        "build_mib": (after_build - baseline) / MIB,
        "build_peak_mib": (peak_after_build - baseline) / MIB,
        "abs_peak_mib": peak / MIB,
        "baseline_mib": baseline / MIB,
        "norm_calls": norm_calls[0] if method == "dora-this" else None,
        "steps": steps,
    }
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def _worker_command(method: str, shape: str, tokens: int, args: argparse.Namespace) -> list[str]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--method", method,
        "--shape", shape,
        "--tokens", str(tokens),
        "--dropout", str(args.dropout),
        "--dora-dropout", args.dora_dropout,
    ]
    if args.input_grad:
        cmd.append("--input-grad")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _worker_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peft", "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.exact_memory:
        # glibc: every allocation above 128 KiB is its own mapping, unmapped on free (this also turns
        # off the dynamic threshold), so the peak RSS follows the live tensors, not heap retention.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def _read_tagged(proc: subprocess.Popen, tag: str) -> str | None:
    """The payload of the worker's next line starting with ``tag`` (None if the worker ended)."""
    for line in proc.stdout:
        if line.startswith(tag):
            return line[len(tag):].strip()
    return None


def run_paired(methods: list[str], shape: str, tokens: int, args: argparse.Namespace) -> dict[str, dict]:
    """One process per method, all alive at once, stepping in turn.

    Only one worker computes at any moment and the turn order rotates every step, so a slow spell of a
    shared machine falls on every method alike: the methods' times are paired, step by step. Each
    process still holds only its own configuration, so its peak RSS is that configuration's alone.
    Returns per method the per-step timings and the worker's RESULT.
    """
    env = _worker_env(args)
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, object] = {}
    for method in methods:
        logs[method] = tempfile.TemporaryFile(mode="w+")
        procs[method] = subprocess.Popen(
            _worker_command(method, shape, tokens, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=logs[method], text=True, env=env,
        )
    alive = [m for m in methods if _read_tagged(procs[m], "READY") is not None]
    timings: dict[str, list[dict]] = {m: [] for m in alive}
    for i in range(WARMUP + args.repeats):
        first = i % len(alive) if alive else 0  # the turn order rotates every step
        for method in alive[first:] + alive[:first]:
            procs[method].stdin.write("step\n")
            procs[method].stdin.flush()
            reply = _read_tagged(procs[method], "STEP ")
            if reply is None:
                alive = [m for m in alive if m != method]
                continue
            if i >= WARMUP:
                timings[method].append(json.loads(reply))
    out: dict[str, dict] = {}
    for method, proc in procs.items():
        result = None
        if method in alive:
            proc.stdin.write("done\n")
            proc.stdin.flush()
            result = _read_tagged(proc, "RESULT ")
        proc.stdin.close()
        proc.wait()
        log = logs[method]
        if result is None:
            log.seek(0)
            sys.stderr.write(f"[{method} {shape} {tokens}] failed (rc={proc.returncode}):\n{log.read()[-4000:]}\n")
        else:
            out[method] = {"timings": timings[method], **json.loads(result)}
        log.close()
    return out


def macs_floor(d_in: int, d_out: int, tokens: int, input_grad: bool, dropout: float) -> float:
    """Least possible DoRA / LoRA ratio of multiply-adds for one step of this benchmark.

    LoRA: W0 x, A x, B h forward; gradients of B and A (and of x: through W0 and A) backward.
    Exact DoRA adds the norm's W0 A^T once per optimizer step (its r x r terms are negligible),
    and with dropout W0 dropout(x) (and its input gradient).
    """
    ig = 1 if input_grad else 0
    lora = tokens * d_in * d_out * (1 + ig) + tokens * R * (2 * d_in + 3 * d_out + ig * d_in)
    extra = d_out * d_in * R + (tokens * d_in * d_out * (1 + ig) if dropout > 0 else 0)
    return 1 + extra / lora


def _summary(runs: list[dict]) -> dict:
    """Medians over the timed steps of all rounds (paired in time across methods), and the median
    over rounds of each memory figure."""
    steps = [t for r in runs for t in r["timings"]]
    ms = lambda key: 1e3 * statistics.median(t[key] for t in steps)  # noqa: E731
    memory = {k: statistics.median(r[k] for r in runs) for k in ("peak_mib", "build_mib", "abs_peak_mib")}
    return {
        "time_ms": ms("step"), "min_ms": 1e3 * min(t["step"] for t in steps), "cpu_ms": ms("cpu"),
        "fwd_ms": ms("fwd"), "bwd_ms": ms("bwd"), **memory, "threads": runs[0]["threads"],
        "norm_calls": None if runs[0]["norm_calls"] is None else sum(r["norm_calls"] for r in runs),
        "steps": sum(r["steps"] for r in runs),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _paired_ratio(num: list[dict] | None, den: list[dict] | None, key: str = "step") -> float | None:
    """Median over paired steps of num's time / den's time.

    Step i of two methods ran in the same turn of the same round (seconds apart), so each ratio sees
    one state of the machine; their median is what the paired design is for. The ratio of the two
    medians is printed next to it: it also carries the drift between turns and between rounds.
    """
    if not num or not den:
        return None
    by_round = {r["round"]: r["timings"] for r in den}
    ratios = [a[key] / b[key] for r in num for a, b in zip(r["timings"], by_round.get(r["round"], ())) if b[key] > 0]
    return statistics.median(ratios) if ratios else None


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _check(v: float | None, ok) -> str:
    return "" if v is None else (" ok" if ok(v) else " MISS")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of INxOUT (default: %(default)s)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--repeats", type=int, default=5, help="timed steps after %d warm-up steps" % WARMUP)
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (see the docstring)")
    p.add_argument("--dora-dropout", default="seed", choices=("seed", "branch"),
                   help="this layer's DoraConfig.dora_dropout (branch: an opt-in deviation, see the docstring)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every paired set of runs this many times with fresh processes, pooling the steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--input-grad", action="store_true",
                   help="input requires grad (a layer inside a model): backward also computes dL/dx")
    p.add_argument("--exact-memory", action="store_true",
                   help="glibc MALLOC_MMAP_THRESHOLD_=131072 in the workers: peak RSS follows live tensors")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        args.tokens = int(args.tokens)
        worker(args)
        return

    import torch

    shapes = [f"{a}x{b}" for a, b in map(_parse_shape, args.shapes.split(","))]
    tokens_list = [int(t) for t in args.tokens.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    import peft

    print("# DoRA layer benchmark: one wrapped Linear, forward + backward + SGD step, fp32 CPU")
    print()
    print(f"- machine: {platform.processor() or platform.machine()} ({platform.platform()}), "
          f"{os.cpu_count()} CPUs")
    print(f"- torch {torch.__version__}, default threads {torch.get_num_threads()}; peft {peft.__version__}; "
          f"python {platform.python_version()}")
    from peft_dora import kernels

    print(f"- this layer's kernels: {kernels.select(torch.device('cpu'), torch.float32).name} "
          f"({kernels.ENV}={os.environ.get(kernels.ENV, 'auto')})")
    threads = args.threads or torch.get_num_threads()
    print(f"- r={R}, lora_alpha={ALPHA}, lora_dropout={args.dropout}, dora_dropout={args.dora_dropout}, "
          f"warm-up {WARMUP}, "
          f"methods timed in turns, median of {args.repeats} steps x {args.rounds} round(s), {threads} threads, "
          f"input requires grad: {args.input_grad}, "
          f"allocator: {'MALLOC_MMAP_THRESHOLD_=131072' if args.exact_memory else 'default'}")
    print("- peak MiB = peak RSS - RSS just before building the model and inputs; after build MiB = RSS once "
          "W0, A, B, m and g exist; time = whole step (fwd + bwd + SGD update + zero_grad)")
    print()

    rounds: dict[tuple[str, int, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for shape in shapes:
            for tokens in tokens_list:
                for method, r in run_paired(methods, shape, tokens, args).items():
                    r["round"] = rnd
                    rounds.setdefault((shape, tokens, method), []).append(r)
                    step_ms = 1e3 * statistics.median(t["step"] for t in r["timings"])
                    sys.stderr.write(f"round {rnd + 1}/{args.rounds} {shape} {tokens} {method}: "
                                     f"{step_ms:.1f} ms, {r['peak_mib']:.1f} MiB\n")
    results = {key: _summary(runs) for key, runs in rounds.items()}

    print("| shape (in->out) | tokens | method | time ms | min ms | cpu ms | fwd ms | bwd ms | peak MiB "
          "| after build MiB | abs peak MiB | threads | norm computed |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape in shapes:
        for tokens in tokens_list:
            for method in methods:
                r = results.get((shape, tokens, method))
                if r is None:
                    continue
                norm = "" if r["norm_calls"] is None else f"{r['norm_calls']}/{r['steps']} steps"
                print(f"| {shape.replace('x', '->')} | {tokens} | {method} | {r['time_ms']:.1f} | {r['min_ms']:.1f} "
                      f"| {r['cpu_ms']:.1f} "
                      f"| {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['peak_mib']:.1f} | {r['build_mib']:.1f} "
                      f"| {r['abs_peak_mib']:.1f} | {r['threads']} | {norm} |")
    print()
    print("time and cpu ratios: medians of the paired per-step ratios (wall clock and process CPU time;")
    print("\"of medians\" = the ratio of the two methods' median times); mem = ratio of peak MiB above baseline.")
    print(f"Targets (at {TARGET_TOKENS} tokens, dropout 0): DoRA(this)/LoRA time <= {TARGET_TIME:.2f}, "
          f"DoRA(this)/LoRA memory <= {TARGET_MEM:.2f}, DoRA(upstream)/DoRA(this) time >= {TARGET_SPEEDUP:.1f}")
    print()
    print("floor = exact DoRA's least DoRA/LoRA ratio of multiply-adds (the norm's W0 A^T, r/tokens of")
    print("the base matmul, is paid every optimizer step); see macs_floor.")
    print()
    print("| shape (in->out) | tokens | this/LoRA time | of medians | floor | this/LoRA mem | upstream/this time "
          "| upstream/LoRA time | upstream/LoRA mem | this/LoRA cpu | upstream/this cpu |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        for tokens in tokens_list:
            lo, up, th = (results.get((shape, tokens, m)) for m in ("lora", "dora-upstream", "dora-this"))
            runs_lo, runs_up, runs_th = (rounds.get((shape, tokens, m)) for m in ("lora", "dora-upstream", "dora-this"))
            get = lambda r, k: None if r is None else r[k]  # noqa: E731
            t_this = _paired_ratio(runs_th, runs_lo)
            t_this_medians = _ratio(get(th, "time_ms"), get(lo, "time_ms"))
            m_this = _ratio(get(th, "peak_mib"), get(lo, "peak_mib"))
            t_up = _paired_ratio(runs_up, runs_th)
            t_upl = _paired_ratio(runs_up, runs_lo)
            m_upl = _ratio(get(up, "peak_mib"), get(lo, "peak_mib"))
            c_this = _paired_ratio(runs_th, runs_lo, "cpu")
            c_up = _paired_ratio(runs_up, runs_th, "cpu")
            # The branch-only dropout needs no second base product: its floor is dropout 0's.
            second_base = args.dropout if args.dora_dropout == "seed" else 0.0
            floor = macs_floor(*_parse_shape(shape), tokens, args.input_grad, second_base)
            checked = tokens == TARGET_TOKENS and args.dropout == 0.0
            c = (lambda v, ok: _check(v, ok)) if checked else (lambda v, ok: "")
            print(f"| {shape.replace('x', '->')} | {tokens} "
                  f"| {_fmt(t_this)}{c(t_this, lambda v: v <= TARGET_TIME)} | {_fmt(t_this_medians, '.3f')} "
                  f"| {floor:.3f} "
                  f"| {_fmt(m_this)}{c(m_this, lambda v: v <= TARGET_MEM)} "
                  f"| {_fmt(t_up)}{c(t_up, lambda v: v >= TARGET_SPEEDUP)} "
                  f"| {_fmt(t_upl)} | {_fmt(m_upl)} "
                  f"| {_fmt(c_this)}{c(c_this, lambda v: v <= TARGET_TIME)} "
                  f"| {_fmt(c_up)}{c(c_up, lambda v: v >= TARGET_SPEEDUP)} |")


if __name__ == "__main__":
    main()
