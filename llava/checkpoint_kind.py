"""What a checkpoint folder holds, read from its files alone (no torch import: shell scripts ask it)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def is_adapter(model_path: str) -> bool:
    return os.path.exists(os.path.join(model_path, "adapter_config.json"))


def adapter_kind(model_path: str) -> str | None:
    """"dora" or "lora" for an adapter folder (either format), None for anything else."""
    if not is_adapter(model_path):
        return None
    config = json.loads(Path(model_path, "adapter_config.json").read_text())
    peft_type = str(config.get("peft_type", "")).upper()
    return "dora" if peft_type == "DORA" or (peft_type == "LORA" and config.get("use_dora", False)) else "lora"
