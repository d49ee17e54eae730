#!/usr/bin/env bash
# Create .venv at the repository root and install llava and peft-dora into it (editable),
# with the pinned releases below. Idempotent: a second run only checks and returns.
#   bash scripts/setup.sh            CPU / default install
#   EXTRAS=gpu bash scripts/setup.sh  also flash-attn (needs CUDA)
#   BROWSER=1 bash scripts/setup.sh   also Debian's chromium for the web demo's browser test (scripts/test.sh)
# bitsandbytes (--bits 4/8, QDoRA) is a default dependency: its 4-bit and 8-bit layers also run on a CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.setup-stamp"
# The stamp records what was installed; it changes whenever the pins or the project metadata do.
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/peft/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)${EXTRAS:+-$EXTRAS}"

# The web demo's browser test drives Debian's chromium through chromedriver (selenium downloads nothing);
# only the test command asks for it (BROWSER=1), so the demo never installs a browser.
if [ "${BROWSER:-0}" = 1 ] && { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver with apt-get (for the web demo's browser test)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "setup: apt-get could not install chromium chromium-driver; the browser test will fail until they are installed"
  else
    echo "setup: chromium or chromedriver is missing; the browser test needs: sudo apt-get install chromium chromium-driver"
  fi
fi

# The test suite runs the pinned PEFT release's own DoRA tests against this project's layer; they ship
# only in its source distribution, kept here.
UPSTREAM="$VENV/upstream"
upstream_sdist() { ls "$UPSTREAM"/peft-*.tar.gz >/dev/null 2>&1; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && upstream_sdist && "$VENV/bin/python" -c "import llava, peft_dora" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_quiet() {
  # pip's notes about this machine's local package folders are noise; its errors are not.
  set +e
  "$VENV/bin/python" -m pip "$@" --disable-pip-version-check -q 2>&1 | grep -v "is ignored: it is neither"
  local rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}
echo "setup: installing torch (CPU build where it lies on disk) and the pinned libraries"
pip_quiet install "torch==2.13.0"
echo "setup: installing llava and peft-dora (editable, with the test and serve extras)"
pip_quiet install -e "$ROOT/peft" -e "$ROOT[test,serve]"
if [ "${EXTRAS:-}" = "gpu" ]; then
  echo "setup: installing the GPU extras (flash-attn)"
  pip_quiet install -e "$ROOT[gpu]" --no-build-isolation
fi
PEFT_VERSION="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("peft"))')"
if [ ! -f "$UPSTREAM/peft-$PEFT_VERSION.tar.gz" ]; then
  echo "setup: downloading PEFT $PEFT_VERSION's source distribution (its DoRA tests run against this project's layer)"
  rm -rf "$UPSTREAM"
  pip_quiet download --no-deps --no-binary :all: -d "$UPSTREAM" "peft==$PEFT_VERSION" \
    || echo "setup: the download failed; tests/test_upstream_peft_suite.py fails until it succeeds (rerun this script)"
fi
echo "$WANT" > "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, transformers, peft, deepspeed; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, deepspeed {deepspeed.__version__}")' 2>/dev/null))"
