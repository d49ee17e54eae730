"""What a checkpoint folder holds, read from its files alone (no torch import: shell scripts ask it)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_SAMPLE = 1 << 20


def is_adapter(model_path: str) -> bool:
    return os.path.exists(os.path.join(model_path, "adapter_config.json"))


def adapter_kind(model_path: str) -> str | None:
    """"dora" or "lora" for an adapter folder (either format), None for anything else."""
    if not is_adapter(model_path):
        return None
    config = json.loads(Path(model_path, "adapter_config.json").read_text())
    peft_type = str(config.get("peft_type", "")).upper()
    return "dora" if peft_type == "DORA" or (peft_type == "LORA" and config.get("use_dora", False)) else "lora"


def _file_digest(path: Path, digest: Any) -> None:
    """Feed a file's name, size and content into ``digest``: all of a small file, the ends of a large one."""
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        if size <= 2 * _SAMPLE:
            digest.update(f.read())
            return
        digest.update(f.read(_SAMPLE))
        f.seek(size - _SAMPLE)
        digest.update(f.read())


def checkpoint_fingerprint(*sources: str | None) -> str:
    """What identifies the model that answers: the files of each local folder or file (a retrained or
    other checkpoint differs in them), or the name of a hub model. Cheap even for 7B weights."""
    digest = hashlib.sha256()
    for source in sources:
        if source is None:
            digest.update(b"-")
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
                _file_digest(file, digest)
        elif path.is_file():
            _file_digest(path, digest)
        else:
            digest.update(f"hub:{source}".encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
