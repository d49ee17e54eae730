#!/usr/bin/env bash
# The project's test command: set up .venv if needed, then run the whole pytest suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k dora -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BROWSER=1 bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$ROOT/.venv/bin/python" -m pytest -q -ra "$@"
