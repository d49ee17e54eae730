#!/usr/bin/env bash
# The README's first command: the whole study (FT vs LoRA vs DoRA) at tiny scale on a laptop.
#   bash scripts/demo.sh [--fresh]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/python" -m llava.demo.run "$@"
