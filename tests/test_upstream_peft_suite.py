"""Upstream PEFT's own DoRA tests, run against this project's DoRA layer.

``scripts/setup.sh`` downloads the source distribution of the pinned PEFT release from the package
registry into ``.venv/upstream/``; its ``tests/`` folder is unpacked here and its DoRA tests of the
custom-model and LoRA-variant suites run in a pytest of their own, with ``upstream_peft_routing`` building
this project's layer wherever upstream would build its own DoRA on an ``nn.Linear``. These are
upstream's expectations of a DoRA layer (merge and unmerge against the forward, safe merge, save and
load, disabling and deleting adapters, mixed adapter batches, half precision, pickling, FSDP), not ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import peft

ROOT = Path(__file__).resolve().parents[1]
SDIST = ROOT / ".venv" / "upstream" / f"peft-{peft.__version__}.tar.gz"
SUITES = ("tests/test_custom_models.py", "tests/test_lora_variants.py")
# Tests that load a model from the Hugging Face hub (no network here), and tests that put DoRA on a layer
# upstream built for a plain LoRA adapter first (upstream's DoRA by design: DoraConfig refuses that case).
DESELECTED = (
    "tests/test_custom_models.py::TestPeftCustomModel::test_gpt2_dora_merge_and_unload",
    "tests/test_custom_models.py::TestPeftCustomModel::test_gpt2_dora_merge_and_unload_safe_merge",
    "tests/test_custom_models.py::TestPeftCustomModel::test_dora_save_and_load_remapping",
    "tests/test_custom_models.py::TestMultipleActiveAdapters::test_plain_lora_and_dora_adapters_merge_matches_forward",
)


def unpack_tests(sdist: Path, into: Path) -> Path:
    """The sdist's ``tests/`` folder, as a package (the sdist leaves out its ``__init__.py``)."""
    top = f"peft-{peft.__version__}/tests/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(top) and (m.isfile() or m.isdir())]
        archive.extractall(into, members=members, filter="data")
    root = into / f"peft-{peft.__version__}"
    (root / "tests" / "__init__.py").touch()
    return root


@pytest.mark.slow
def test_upstream_peft_dora_tests_pass_on_this_layer(tmp_path):
    if not SDIST.is_file():
        pytest.fail(f"{SDIST.relative_to(ROOT)} is missing: run `bash scripts/setup.sh`, which downloads PEFT "
                    f"{peft.__version__}'s source distribution (its tests) from the package registry.")
    root = unpack_tests(SDIST, tmp_path)
    report, junit = tmp_path / "routing.jsonl", tmp_path / "junit.xml"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), UPSTREAM_ROUTING_REPORT=str(report), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "pytest", *SUITES, "-k", "dora", "-p", "upstream_peft_routing",
               "-p", "no:cacheprovider", "-o", "addopts=", "-q", "--tb=short", f"--junitxml={junit}",
               *(f"--deselect={test}" for test in DESELECTED)]
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]

    suite = ET.parse(junit).getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == 0, counts
    assert counts["tests"] - counts["skipped"] > 600, counts

    rows = [json.loads(line) for line in report.read_text().splitlines()]
    routed = [row["test"] for row in rows if row["project_layers"]]
    missed = [row["test"] for row in rows if row["upstream_dora_on_linear"]]
    assert not missed, f"upstream's DoRA was built on an nn.Linear in: {missed[:5]}"
    assert len(routed) > 250, f"only {len(routed)} upstream tests built this project's layer"
