"""benchmarks/gpu_check.sh: its dry mode (tiny shapes, float32, Triton's interpreter on the CPU) runs end
to end, and its parity check catches a wrong result."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before the fused kernels are first defined

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

from peft_dora.kernels import fused  # noqa: E402


def test_dry_run_end_to_end(tmp_path):
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "parity: ok" in out
    for heading in ("## Parity", "## One layer's training step", "## Model-level step"):
        assert heading in out, heading
    for method in gpu_check.METHODS:
        assert f"{method} ms / MiB" in out
    plan = gpu_check.DRY
    rows = len(gpu_check.DORA_METHODS) * len(plan.dropouts) + len(plan.tokens) * len(plan.dropouts)  # parity, timing
    for in_f, out_f in plan.shapes:
        assert out.count(f"| {in_f}->{out_f} |") == rows
    assert (tmp_path / "gpu_check.md").read_text().strip() == out.strip()


def test_parity_check_catches_a_wrong_fused_output(monkeypatch):
    """An output 1e-3 off (ten times the dry bound) fails the fused method alone."""
    real = fused.KERNELS.combine
    monkeypatch.setattr(fused.KERNELS, "combine", lambda *args: real(*args) * 1.001)
    plan = dataclasses.replace(gpu_check.DRY, shapes=((48, 40),), dropouts=(0.0,))
    report = gpu_check.Report()
    assert gpu_check.parity(plan, report) is False
    verdicts = {line.split("|")[3].strip(): line.split("|")[-2].strip() for line in report.lines if "| 48->40 |" in line}
    assert verdicts == {"dora-upstream": "ok", "dora-eager": "ok", "dora-fused": "FAIL"}
