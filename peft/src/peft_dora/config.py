"""``DoraConfig``: a ``peft.LoraConfig`` with ``use_dora=True`` that builds this project's DoRA layers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig
from torch import nn

Targets = Optional[Union[list[str], str]]
# Where ``lora_dropout`` applies (see DoraConfig.dora_dropout).
DORA_DROPOUT_MODES = ("seed", "branch")


def matches(targets: Targets, name: str) -> bool:
    """PEFT's target rule: a regex must match the whole name, a list entry must end it."""
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _as_regex(targets: Targets) -> str:
    if isinstance(targets, str):
        return targets
    return r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"


def _union(a: Targets, b: Targets) -> Targets:
    if not b:
        return a
    if not a:
        return b if isinstance(b, str) else sorted(set(b))
    if isinstance(a, str) or isinstance(b, str):
        return f"(?:{_as_regex(a)})|(?:{_as_regex(b)})"
    return sorted(set(a) | set(b))


@dataclass
class DoraConfig(LoraConfig):
    """LoRA config with DoRA on, plus the seed's magnitude-only modules.

    ``target_modules`` get A, B and a magnitude; modules matching only ``wdecompose_target_modules``
    get a trainable magnitude alone (y = m / ||W0|| * W0 x + b). The saved ``target_modules`` is the
    union, so upstream PEFT rebuilds every DoRA layer from the file.
    """

    wdecompose_target_modules: Targets = field(
        default=None,
        metadata={"help": "Modules whose magnitude alone is trained (the seed's `Wdecompose_target_modules`)."},
    )
    lora_target_modules: Targets = field(
        default=None,
        metadata={"help": "The modules that get A and B; filled from `target_modules` when not given."},
    )
    dora_dropout: str = field(
        default="seed",
        metadata={
            "help": "Where lora_dropout applies while training. 'seed' (default): the seed's and the paper's "
            "formula, y = W0 x + b + (m/n - 1) W0 x_d + (m/n) s B A x_d with x_d = dropout(x), in which the "
            "dropped-out input also goes through W0 (a second base product, forward and backward). 'branch': "
            "opt-in, a DEVIATION from that formula: dropout on the low-rank branch only, "
            "y = (m/n) (W0 x + s B A x_d) + b, with no second base product. Both are y = (m/n) (W0 + sBA) x + b "
            "without dropout and in evaluation."
        },
    )
    peft_dora: bool = field(
        default=True,
        metadata={
            "help": "Marks the config as this project's DoRA (always true). Declared as a LoRA variant so that a "
            "layer upstream PEFT built (one holding a plain LoRA adapter) refuses it, naming this field, instead "
            "of silently giving it upstream's DoRA; this project's layers resolve it to their own.",
            "is_lora_variant": True,
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"DoraConfig: r must be a positive integer, got {self.r!r}.")
        if self.dora_dropout not in DORA_DROPOUT_MODES:
            raise ValueError(
                f"DoraConfig: dora_dropout must be one of {', '.join(DORA_DROPOUT_MODES)}, got {self.dora_dropout!r}."
            )
        self.use_dora = True
        self.peft_dora = True
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.wdecompose_target_modules, (set, tuple)):
            self.wdecompose_target_modules = sorted(self.wdecompose_target_modules)
        if self.lora_target_modules is None:
            self.lora_target_modules = self.target_modules
        self.target_modules = _union(self.lora_target_modules, self.wdecompose_target_modules)
        super().__post_init__()
        from .layer import DoraLinear

        self._register_custom_module({nn.Linear: DoraLinear})

    def is_magnitude_only(self, name: str) -> bool:
        """True for a module that gets a magnitude but no A and B (LoRA targets take precedence)."""
        return matches(self.wdecompose_target_modules, name) and not matches(self.lora_target_modules, name)
