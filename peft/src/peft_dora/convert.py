"""Convert a seed-format DoRA adapter folder to the PEFT format, working on tensors alone.

    python -m peft_dora.convert SEED_DIR OUT_DIR [--missing-magnitudes error|weight_norm] [--base-model PATH]

The output loads with upstream ``peft.PeftModel.from_pretrained`` and with
``peft_dora.load_dora_adapter``. The base model is needed only to size magnitude-only modules (the
seed's ``Wdecompose_target_modules``: no A or B to read the input size from) and to compute
m = ||W0|| for layers without a magnitude when that is explicitly asked for.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from typing import Callable

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import (
    CONFIG_FILE,
    PREFIX,
    AdapterFolder,
    MissingMagnitudes,
    check_layers,
    dora_config_for,
    missing_magnitudes_error,
    read_adapter_folder,
)
from .config import DoraConfig
from .norm import row_sq_norm

ADAPTER_OUT = "adapter_model.safetensors"
NON_LORA_OUT = "non_lora_trainables.safetensors"


class BaseWeights:
    """The base model's weights by module name, read one tensor at a time so a 7B model stays on disk.

    ``path`` is a ``.safetensors`` file, a folder of ``*.safetensors`` shards, or any folder
    ``transformers.AutoModelForCausalLM`` loads (then the whole model is loaded once).
    """

    def __init__(self, path: str, fan_in_fan_out: bool = False) -> None:
        self.path = path
        self.fan_in_fan_out = fan_in_fan_out
        self._files: dict[str, str] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        if os.path.isfile(path) and path.endswith(".safetensors"):
            files = [path]
        elif os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        else:
            raise FileNotFoundError(f"--base-model {path}: expected a transformers model folder or .safetensors file.")
        for file in files:
            with safe_open(file, "pt") as f:
                self._files.update(dict.fromkeys(f.keys(), file))
        if not files:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
            self._tensors = {k: v.detach() for k, v in model.state_dict().items()}

    def _raw_shape(self, key: str) -> tuple[int, ...]:
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        with safe_open(self._files[key], "pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every 2-D ``<module>.weight``, by module name."""
        shapes = {}
        for key in [*self._files, *self._tensors]:
            if key.endswith(".weight"):
                shape = self._raw_shape(key)
                if len(shape) == 2:
                    shapes[key[: -len(".weight")]] = shape[::-1] if self.fan_in_fan_out else shape
        return shapes

    def weight(self, module: str) -> torch.Tensor:
        """W0 of ``module`` as out x in."""
        key = f"{module}.weight"
        if key in self._tensors:
            weight = self._tensors[key]
        else:
            with safe_open(self._files[key], "pt") as f:
                weight = f.get_tensor(key)
        return weight.t() if self.fan_in_fan_out else weight


def _shapes_from_adapter(folder: AdapterFolder) -> dict[str, tuple[int, int]]:
    """(out, in) of each module from its A and B, for converting without the base model."""
    shapes = {}
    for name in sorted(folder.modules):
        a, b = folder.lora_A.get(name), folder.lora_B.get(name)
        if a is None and b is None:
            raise ValueError(
                f"{folder.where(name, 'magnitude')}: {name} has a magnitude but no lora_A/lora_B (a magnitude-only "
                "module); its input size is known only from the base weights: pass --base-model PATH."
            )
        if a is None or b is None or a.dim() != 2 or b.dim() != 2:
            present = "lora_A" if b is None else "lora_B"
            raise ValueError(
                f"{folder.where(name, present)}: {name} needs a 2-D lora_A and lora_B; found "
                f"lora_A {None if a is None else list(a.shape)}, lora_B {None if b is None else list(b.shape)}."
            )
        shapes[name] = (b.shape[0], a.shape[1])
    return shapes


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, so ``path`` is either old or complete.

    The file gets the mode the umask gives a new file: safetensors 0.8 creates its files 0o600 whatever
    the umask, which would leave the converted weights unreadable to the rest of a team.
    """
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        umask = os.umask(0o077)  # reading the umask means setting it: a strict one for the instant
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_config(config: DoraConfig, out_dir: str) -> None:
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-config-") as tmp:
        config.save_pretrained(tmp)
        os.replace(os.path.join(tmp, CONFIG_FILE), os.path.join(out_dir, CONFIG_FILE))


def convert(
    seed_dir: str,
    out_dir: str,
    *,
    missing_magnitudes: MissingMagnitudes = "error",
    base_model: str | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Read the seed-format folder ``seed_dir`` and write its PEFT-format equivalent to ``out_dir``."""
    if os.path.realpath(seed_dir) == os.path.realpath(out_dir):
        raise ValueError(f"{out_dir}: is the seed folder itself; write the PEFT format to another folder.")
    folder = read_adapter_folder(seed_dir)
    if folder.format != "seed":
        raise ValueError(f"{seed_dir}: already in the PEFT format (peft_type LORA); nothing to convert.")
    config = dora_config_for(folder)
    base = BaseWeights(base_model, config.fan_in_fan_out) if base_model else None
    shapes = base.shapes() if base is not None else _shapes_from_adapter(folder)
    targets = {name for name in shapes if check_target_module_exists(config, name)}
    layers = check_layers(folder, config, shapes, targets)
    missing = [name for name in layers if name not in folder.magnitudes]
    if missing and missing_magnitudes == "error":
        raise missing_magnitudes_error(
            folder, missing,
            "Pass --missing-magnitudes weight_norm --base-model PATH to write m = ||W0|| (the base weight's row "
            "norms) for them, which reproduces the seed's loader; outputs then differ from the trained model.",
        )
    if missing and base is None:
        raise missing_magnitudes_error(
            folder, missing, "--missing-magnitudes weight_norm computes m = ||W0||, which needs --base-model PATH."
        )

    tensors = {}
    magnitude_only = []
    for name, spec in layers.items():
        magnitude = folder.magnitudes.get(name)
        magnitude = row_sq_norm(base.weight(name)).sqrt() if magnitude is None else magnitude.reshape(-1)
        if spec.magnitude_only:
            magnitude_only.append(name)
            a = torch.zeros(1, spec.in_features, dtype=magnitude.dtype)
            b = torch.zeros(spec.out_features, 1, dtype=magnitude.dtype)
        else:
            a, b = folder.lora_A[name], folder.lora_B[name]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
        tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude.contiguous()
    config.rank_pattern.update({re.escape(name): 1 for name in magnitude_only})
    config.inference_mode = True

    found = Counter(folder.magnitude_files.values())
    echo(f"Read {seed_dir} (seed format, r={config.r}, lora_alpha={config.lora_alpha}):")
    echo(f"  {len(layers)} DoRA layers: {len(layers) - len(magnitude_only)} with A and B, "
         f"{len(magnitude_only)} magnitude-only")
    echo("  magnitudes: " + (", ".join(f"{n} from {file}" for file, n in sorted(found.items())) or "none")
         + (f"; {len(missing)} missing, set to ||W0|| from {base_model}" if missing else ""))
    echo(f"  {len(folder.non_lora_trainables)} non-LoRA trainable tensors"
         + (f" in {folder.non_lora_file}" if folder.non_lora_file else ""))

    os.makedirs(out_dir, exist_ok=True)
    written = []
    _write_atomic(os.path.join(out_dir, ADAPTER_OUT), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    written.append(f"{ADAPTER_OUT} ({len(tensors)} tensors)")
    _write_config(config, out_dir)
    written.append(f"{CONFIG_FILE} (peft_type LORA, use_dora true)")
    if folder.non_lora_trainables:
        non_lora = {k: v.contiguous().clone() for k, v in folder.non_lora_trainables.items()}
        _write_atomic(os.path.join(out_dir, NON_LORA_OUT), lambda p: save_file(non_lora, p, metadata={"format": "pt"}))
        written.append(f"{NON_LORA_OUT} ({len(non_lora)} tensors)")
    model_config = os.path.join(seed_dir, "config.json")
    if os.path.isfile(model_config):
        _write_atomic(os.path.join(out_dir, "config.json"), lambda p: shutil.copyfile(model_config, p))
        written.append("config.json")
    echo(f"Wrote {out_dir}: " + ", ".join(written))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``peft-dora-convert``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="peft-dora-convert",
        description="Convert a seed-format DoRA adapter (peft_type DORA) to the PEFT format (peft_type LORA, "
        "use_dora true) that upstream PEFT and peft_dora.load_dora_adapter load.",
    )
    parser.add_argument("seed_dir", help="folder with the seed's adapter_config.json and adapter_model.bin")
    parser.add_argument("out_dir", help="folder to write the PEFT-format adapter to")
    parser.add_argument(
        "--missing-magnitudes", choices=["error", "weight_norm"], default="error",
        help="what to do for DoRA layers without a magnitude: fail (default), or write m = ||W0|| as the seed's "
        "loader did (needs --base-model)",
    )
    parser.add_argument(
        "--base-model", default=None,
        help="base model folder or .safetensors file; needed for magnitude-only modules and for weight_norm",
    )
    args = parser.parse_args(argv)
    try:
        convert(args.seed_dir, args.out_dir, missing_magnitudes=args.missing_magnitudes, base_model=args.base_model)
    except (ValueError, FileNotFoundError) as exc:
        print(f"peft-dora-convert: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
