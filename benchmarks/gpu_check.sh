#!/usr/bin/env bash
# One prepared command for a lent GPU: this project's DoRA against LoRA and upstream PEFT's DoRA,
# parity with float64 first, then CUDA-event timings and peak memory (benchmarks/gpu_check.py says what).
#   bash benchmarks/gpu_check.sh          on a CUDA GPU: LLaMA-7B shapes, bf16, r 128 (a few minutes on one H200)
#   DRY=1 bash benchmarks/gpu_check.sh    on the CPU: tiny shapes, float32, Triton's interpreter (the test suite's run)
# Python: $PYTHON, else the repository's .venv (not with WHEELS, meant for a GPU machine's own python3),
# else python3. peft_dora is taken from this checkout.
# WHEELS=DIR first installs the wheels in DIR (e.g. peft 0.21.2 where the machine has another version)
# into a temporary folder put ahead on the path. The report is also written to $OUT/gpu_check.md when OUT is set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${WHEELS:-}" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export PYTHONPATH="$ROOT/peft/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
  SITE="$(mktemp -d)"
  trap 'rm -rf "$SITE"' EXIT
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
ARGS=()
if [ -n "${DRY:-}" ]; then
  export TRITON_INTERPRET=1
  ARGS+=(--dry)
fi
if [ -n "${OUT:-}" ]; then
  ARGS+=(--out "$OUT/gpu_check.md")
fi
export PYTHONUNBUFFERED=1
"$PY" "$ROOT/benchmarks/gpu_check.py" "${ARGS[@]}" "$@"
