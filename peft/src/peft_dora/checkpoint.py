"""Read DoRA adapter folders, in the PEFT format or the seed's, into this project's DoRA layers.

The seed's trainer saved its trained magnitudes in ``non_lora_trainables.bin`` under a name its
loader never looked for, so its loader silently rebuilt every layer with m = ||W0||. This reader
finds the magnitudes wherever they are, says where it found them, and refuses to guess unless
asked to (``missing_magnitudes="weight_norm"`` reproduces the seed loader for comparison).

Both formats are read into the same plain structure (``AdapterFolder``) and checked against the
model (or, for the converter, against the base weights) before anything is changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from .config import DoraConfig
from .layer import DoraLinear, base_weight, invalidate_norm_caches
from .norm import row_sq_norm

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
PREFIX = "base_model.model."

MissingMagnitudes = Literal["error", "weight_norm"]
# "trained": the magnitudes the checkpoint holds (what training produced). "weight_norm": m = ||W0|| for every
# layer, whatever the checkpoint holds: what the seed's loader evaluated, hence the paper's published DoRA row.
MagnitudeMode = Literal["trained", "weight_norm"]
MAGNITUDE_MODES = ("trained", "weight_norm")

# The name of each tensor kind in either format; the magnitude has one name per format.
_KINDS = {
    "lora_A": "lora_A",
    "lora_B": "lora_B",
    "lora_magnitude_vector": "magnitude",
    "weight_m_wdecomp": "magnitude",
}

# Seed config fields that carry over to DoraConfig unchanged.
_SEED_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "task_type",
                "base_model_name_or_path", "revision")


def parse_adapter_key(key: str) -> tuple[str, str] | None:
    """(module name, "lora_A" | "lora_B" | "magnitude") for a DoRA tensor key, None for any other key.

    Accepts both formats' spellings, with or without an adapter name and the ``base_model.model.``
    prefix: ``<m>.lora_A.weight``, ``<m>.lora_A.default.weight``, ``<m>.lora_magnitude_vector``,
    ``<m>.weight_m_wdecomp.weight``, ``<m>.weight_m_wdecomp.default.weight``.
    """
    parts = key.removeprefix(PREFIX).split(".")
    for i in range(1, len(parts)):
        kind = _KINDS.get(parts[i])
        if kind is None:
            continue
        rest = parts[i + 1 :]
        if rest == ["weight"] or (len(rest) == 2 and rest[1] == "weight") or (not rest and kind == "magnitude"):
            return ".".join(parts[:i]), kind
        return None
    return None


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``.bin`` file; a ``.bin`` is unpickled with ``weights_only=True``."""
    if path.endswith(".safetensors"):
        return load_file(path, device="cpu")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused to unpickle it: it holds objects other than tensors, and loading those could run "
            f"arbitrary code. Re-save it as a plain dict of tensors. ({exc})"
        ) from exc
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(tensors).__name__}.")
    return tensors


def _first_existing(folder: str, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if os.path.isfile(os.path.join(folder, name))), None)


@dataclass
class AdapterFolder:
    """Everything read from an adapter folder, keyed by module name (no ``base_model.model.``)."""

    path: str
    format: Literal["peft", "seed"]
    config: dict[str, Any]
    adapter_file: str
    lora_A: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_B: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitude_files: dict[str, str] = field(default_factory=dict)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)
    other_adapter_keys: list[str] = field(default_factory=list)
    non_lora_file: str | None = None
    non_lora_trainables: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensor(self, module: str, kind: str) -> torch.Tensor:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "magnitude": self.magnitudes}[kind][module]

    def where(self, module: str, kind: str) -> str:
        """``file: key`` of a tensor, for messages."""
        file = self.magnitude_files[module] if kind == "magnitude" else self.adapter_file
        return f"{os.path.join(self.path, file)}: {self.keys[(module, kind)]}"

    @property
    def modules(self) -> set[str]:
        return set(self.lora_A) | set(self.lora_B) | set(self.magnitudes)

    def add(self, file: str, key: str, module: str, kind: str, tensor: torch.Tensor) -> None:
        if (module, kind) in self.keys:
            previous = self.keys[(module, kind)]
            if kind == "magnitude" and self.magnitude_files[module] != file:
                logger.warning(
                    "%s: magnitude of %s found in both %s (%s) and %s (%s); using the one in %s.",
                    self.path, module, self.magnitude_files[module], previous, file, key, self.magnitude_files[module],
                )
                return
            raise ValueError(
                f"{os.path.join(self.path, file)}: keys {previous!r} and {key!r} both hold {kind} of {module}; "
                "a file with several adapters cannot be read, save one adapter per folder."
            )
        self.keys[(module, kind)] = key
        if kind == "magnitude":
            self.magnitudes[module] = tensor
            self.magnitude_files[module] = file
        elif kind == "lora_A":
            self.lora_A[module] = tensor
        else:
            self.lora_B[module] = tensor


def read_adapter_folder(path: str | os.PathLike) -> AdapterFolder:
    """Read an adapter folder of either format; magnitudes are looked for in the adapter file and in
    ``non_lora_trainables``, whose other tensors (the projector) are kept as they are keyed there."""
    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; expected a DoRA adapter folder (PEFT or seed format).")
    with open(config_path) as f:
        config = json.load(f)
    peft_type = str(config.get("peft_type", "")).upper()
    formats = {"LORA": "peft", "DORA": "seed"}
    if peft_type not in formats:
        raise ValueError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; expected 'LORA' (PEFT format with "
            "use_dora true) or 'DORA' (the seed's format)."
        )
    adapter_file = _first_existing(path, ADAPTER_FILES)
    if adapter_file is None:
        raise FileNotFoundError(f"{path}: no adapter weights ({' or '.join(ADAPTER_FILES)}).")
    folder = AdapterFolder(path=path, format=formats[peft_type], config=config, adapter_file=adapter_file)
    for key, tensor in load_tensors(os.path.join(path, adapter_file)).items():
        parsed = parse_adapter_key(key)
        if parsed is None:
            folder.other_adapter_keys.append(key)
        else:
            folder.add(adapter_file, key, *parsed, tensor)
    folder.non_lora_file = _first_existing(path, NON_LORA_FILES)
    if folder.non_lora_file is not None:
        for key, tensor in load_tensors(os.path.join(path, folder.non_lora_file)).items():
            parsed = parse_adapter_key(key)
            if parsed is not None and parsed[1] == "magnitude":
                folder.add(folder.non_lora_file, key, *parsed, tensor)
            elif parsed is not None:
                raise ValueError(
                    f"{os.path.join(path, folder.non_lora_file)}: holds {key!r}, a LoRA weight that belongs in "
                    f"{adapter_file}; the folder is not one this reader understands."
                )
            else:
                folder.non_lora_trainables[key] = tensor
    if folder.format == "seed" and folder.other_adapter_keys:
        raise ValueError(
            f"{os.path.join(path, adapter_file)}: {folder.other_adapter_keys[0]!r} is neither a LoRA weight nor a "
            f"magnitude ({len(folder.other_adapter_keys)} such keys); the seed's adapter file holds only those."
        )
    found = Counter(folder.magnitude_files.values())
    logger.info(
        "%s: %s format; lora_A/lora_B for %d modules in %s; magnitudes: %s; %d other tensors in %s.",
        path, folder.format, len(folder.lora_A), adapter_file,
        ", ".join(f"{n} in {file}" for file, n in sorted(found.items())) or "none",
        len(folder.non_lora_trainables), folder.non_lora_file or "no non-LoRA trainables file",
    )
    return folder


def _init_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(DoraConfig) if f.init}


def dora_config_for(folder: AdapterFolder) -> DoraConfig:
    """The DoraConfig that rebuilds the folder's layers: its own config (PEFT) or the seed's fields mapped."""
    where = os.path.join(folder.path, CONFIG_FILE)
    raw = dict(folder.config)
    if folder.format == "peft":
        if not raw.get("use_dora", False):
            raise ValueError(
                f"{where}: use_dora is not true, so this is a plain LoRA adapter, not DoRA; "
                "load it with peft.PeftModel.from_pretrained."
            )
        raw.pop("runtime_config", None)
        accepted = _init_fields()
        ignored = sorted(set(raw) - accepted)
        if ignored:
            logger.info("%s: ignoring fields DoraConfig does not know: %s", where, ", ".join(ignored))
        return DoraConfig(**{k: v for k, v in raw.items() if k in accepted})

    for required in ("r", "lora_alpha", "target_modules"):
        if raw.get(required) is None:
            raise ValueError(f"{where}: the seed's config has no {required!r}.")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={raw['bias']!r} seed checkpoints are not supported (only 'none').")
    if raw.get("modules_to_save"):
        raise ValueError(f"{where}: modules_to_save={raw['modules_to_save']!r} is not supported for seed checkpoints.")
    if raw.get("enable_lora"):
        raise ValueError(f"{where}: enable_lora (merged QKV layers) is not supported.")
    kwargs = {k: raw[k] for k in _SEED_FIELDS if raw.get(k) is not None}
    kwargs["wdecompose_target_modules"] = raw.get("Wdecompose_target_modules") or raw.get("wdecompose_target_modules")
    kwargs.setdefault("lora_dropout", 0.0)
    return DoraConfig(**kwargs)


@dataclass(frozen=True)
class LayerSpec:
    """One DoRA layer as the model (or the base weights) defines it."""

    out_features: int
    in_features: int
    rank: int
    magnitude_only: bool


def _rank(config: DoraConfig, name: str) -> int:
    if config.is_magnitude_only(name):
        return 1
    return config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), name), config.r)


def check_layers(
    folder: AdapterFolder, config: DoraConfig, shapes: dict[str, tuple[int, int]], targets: set[str]
) -> dict[str, LayerSpec]:
    """Check every tensor of the folder against the layers the config builds; return those layers.

    ``shapes`` maps each Linear module of the model to (out, in); ``targets`` are the ones the config
    wraps. Raises ValueError naming the key for a module the model lacks or the config does not
    target, a wrong shape, missing lora_A/lora_B, or non-zero A/B on a magnitude-only module.
    """
    layers = {
        name: LayerSpec(*shapes[name], _rank(config, name), config.is_magnitude_only(name)) for name in sorted(targets)
    }
    for (module, kind), key in sorted(folder.keys.items()):
        shape = tuple(folder.tensor(module, kind).shape)
        if module not in shapes:
            raise ValueError(
                f"{folder.where(module, kind)} (shape {list(shape)}) is for {module!r}, but the model has no Linear "
                "module of that name: the adapter was trained on another model, load it into its own base model."
            )
        if module not in layers:
            raise ValueError(
                f"{folder.where(module, kind)} (shape {list(shape)}) is for {module!r}, which the adapter config "
                f"does not target (target_modules={config.target_modules!r}): the config does not belong to "
                "these weights."
            )
        spec = layers[module]
        expected = {
            "lora_A": [(spec.rank, spec.in_features)],
            "lora_B": [(spec.out_features, spec.rank)],
            "magnitude": [(spec.out_features,), (spec.out_features, 1)],
        }[kind]
        if shape not in expected:
            raise ValueError(
                f"{folder.where(module, kind)} has shape {list(shape)}, but the model's {module} needs "
                f"{' or '.join(str(list(e)) for e in expected)} (its weight is {spec.out_features} x "
                f"{spec.in_features}, adapter rank {spec.rank}): the adapter was trained on another model or rank."
            )
        if spec.magnitude_only and kind != "magnitude" and bool(folder.tensor(module, kind).any()):
            raise ValueError(
                f"{folder.where(module, kind)} is not zero, but the config makes {module} magnitude-only "
                "(wdecompose_target_modules), whose A and B must be zero."
            )
    has_ab = set(folder.lora_A) & set(folder.lora_B)
    bare = [name for name, spec in layers.items() if not spec.magnitude_only and name not in has_ab]
    if bare:
        raise ValueError(
            f"{os.path.join(folder.path, folder.adapter_file)}: no lora_A/lora_B for {_some(bare)}, which the adapter "
            f"config targets (target_modules={config.target_modules!r}). Either the file is incomplete, or the model "
            "has matching modules the trained one lacked (a vision tower built before the adapter is loaded: load "
            "the adapter first)."
        )
    return layers


def _some(names: list[str]) -> str:
    """The first few names and how many there are, for messages."""
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def missing_magnitudes_error(folder: AdapterFolder, missing: list[str], fix: str) -> ValueError:
    """The error for DoRA layers without a magnitude; ``fix`` says how to proceed anyway."""
    searched = " and ".join(f for f in (folder.adapter_file, folder.non_lora_file) if f)
    return ValueError(
        f"{folder.path}: {len(missing)} DoRA layer(s) have no magnitude in {searched}: {_some(missing)}. A DoRA layer "
        f"cannot be restored without its trained magnitude. {fix}"
    )


@dataclass
class LoadReport:
    """What ``load_dora_adapter`` found and did."""

    format: Literal["peft", "seed"]
    path: str
    dora_layers: int
    magnitude_only_layers: int
    magnitude_files: dict[str, str]
    missing_magnitudes: list[str]
    missing_filled_with: str | None
    non_lora_file: str | None
    non_lora_trainables: dict[str, torch.Tensor]
    magnitudes: MagnitudeMode = "trained"

    @property
    def magnitudes_found(self) -> dict[str, int]:
        """How many magnitudes came from each file."""
        return dict(Counter(self.magnitude_files.values()))

    def summary(self) -> str:
        """The report in plain words, as logged."""
        found = ", ".join(f"{n} from {file}" for file, n in sorted(self.magnitudes_found.items())) or "none"
        parts = [
            f"{self.path}: {self.format} format, {self.dora_layers} DoRA layers "
            f"({self.magnitude_only_layers} magnitude-only); magnitudes: {found}."
        ]
        if self.magnitudes == "weight_norm":
            parts.append(
                "Magnitude mode weight_norm: every magnitude was set to ||W0|| (row norms of the base weight) as the "
                "seed's loader did, ignoring the trained ones: this reproduces the paper's DoRA row, not the trained model."
            )
        elif self.missing_magnitudes:
            parts.append(
                f"{len(self.missing_magnitudes)} layers had no magnitude and were set to ||W0|| (row norms of the "
                "base weight), as the seed's loader did: their outputs differ from the trained model."
            )
        if self.non_lora_file:
            parts.append(f"{len(self.non_lora_trainables)} non-LoRA trainable tensors in {self.non_lora_file}.")
        return " ".join(parts)


def _strip(key: str) -> str:
    return key.removeprefix(PREFIX)


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear)
    }


def _dora_modules(peft_model: PeftModel) -> dict[str, DoraLinear]:
    layers = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, DoraLinear):
            raise ValueError(f"{_strip(name)} is a {type(module).__name__}; this project's DoRA wraps nn.Linear only.")
        layers[_strip(name)] = module
    return layers


@torch.no_grad()
def _assign(
    modules: dict[str, DoraLinear],
    layers: dict[str, LayerSpec],
    folder: AdapterFolder,
    adapter_name: str,
    magnitudes: MagnitudeMode,
) -> None:
    """Write A, B and m of every layer from what was read; m = ||W0|| where the folder has none or where
    ``magnitudes="weight_norm"`` asks for it."""
    for name, spec in layers.items():
        module = modules[name]
        if not spec.magnitude_only:
            module.lora_A[adapter_name].weight.copy_(folder.lora_A[name])
            module.lora_B[adapter_name].weight.copy_(folder.lora_B[name])
        magnitude = folder.magnitudes.get(name) if magnitudes == "trained" else None
        if magnitude is None:
            magnitude = row_sq_norm(base_weight(module)).sqrt()
        module.lora_magnitude_vector[adapter_name].weight.copy_(magnitude.reshape(-1))


def load_dora_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    missing_magnitudes: MissingMagnitudes = "error",
    magnitudes: MagnitudeMode = "trained",
    is_trainable: bool = False,
) -> tuple[PeftModel, LoadReport]:
    """Wrap ``model`` with the DoRA adapter in folder ``path`` (PEFT format or the seed's).

    Every tensor is checked against the model before the model is touched. A DoRA layer without a
    magnitude is an error unless ``missing_magnitudes="weight_norm"``, which sets m = ||W0|| as the
    seed's loader did. ``magnitudes="weight_norm"`` sets m = ||W0|| for every layer, whether or not the
    folder holds magnitudes: exactly what the seed's loader evaluated (it dropped them), i.e. how the
    paper's DoRA row was produced. Non-LoRA trainables (the projector) are returned in the report, keyed
    without ``base_model.model.``, for the caller to load into the model.
    """
    if missing_magnitudes not in ("error", "weight_norm"):
        raise ValueError(f"missing_magnitudes must be 'error' or 'weight_norm', got {missing_magnitudes!r}.")
    if magnitudes not in MAGNITUDE_MODES:
        raise ValueError(f"magnitudes must be one of {MAGNITUDE_MODES}, got {magnitudes!r}.")
    if isinstance(model, PeftModel):
        raise TypeError("load_dora_adapter takes the base model, not a PeftModel.")
    folder = read_adapter_folder(path)
    config = dora_config_for(folder)
    config.inference_mode = not is_trainable
    shapes = _linear_shapes(model)
    targets = {name for name in shapes if check_target_module_exists(config, name)}
    layers = check_layers(folder, config, shapes, targets)
    missing = [name for name in layers if name not in folder.magnitudes]
    if missing and missing_magnitudes == "error" and magnitudes == "trained":
        raise missing_magnitudes_error(
            folder, missing,
            "Pass missing_magnitudes='weight_norm' to set m = ||W0|| (the base weight's row norms) for them, which "
            "reproduces the seed's loader (it dropped the magnitudes silently); outputs then differ from training.",
        )

    if folder.format == "peft":
        with warnings.catch_warnings():
            # PEFT warns about the lora keys its file lacks; check_layers allowed only magnitudes, restored
            # below, and the zero A/B of magnitude-only layers, which the layer already holds.
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(
                model, folder.path, adapter_name=adapter_name, is_trainable=is_trainable, config=config
            )
    else:
        # As PeftModel.from_pretrained builds it (get_peft_model would rename base_model_name_or_path).
        peft_model = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)(model, config, adapter_name)
        if not is_trainable:
            peft_model.eval()

    modules = _dora_modules(peft_model)
    if set(modules) != set(layers):
        raise RuntimeError(
            f"PEFT wrapped {sorted(set(modules) ^ set(layers))[:3]} differently from PEFT's own target rule; "
            "this is a bug in peft_dora.checkpoint."
        )
    # The PEFT format was loaded by PEFT already; writing again from what was read makes both formats end
    # in the same state and restores magnitudes PEFT does not look for.
    _assign(modules, layers, folder, adapter_name, magnitudes)
    invalidate_norm_caches()

    report = LoadReport(
        format=folder.format,
        path=folder.path,
        dora_layers=len(layers),
        magnitude_only_layers=sum(spec.magnitude_only for spec in layers.values()),
        magnitude_files={name: folder.magnitude_files[name] for name in layers if name in folder.magnitude_files},
        missing_magnitudes=missing,
        missing_filled_with="weight_norm" if missing else None,
        non_lora_file=folder.non_lora_file,
        non_lora_trainables={_strip(k): v for k, v in folder.non_lora_trainables.items()},
        magnitudes=magnitudes,
    )
    logger.info(report.summary())
    if missing and magnitudes == "trained":
        logger.warning("%s: set m = ||W0|| for DoRA layers without a magnitude: %s", folder.path, _some(missing))
    return peft_model, report
