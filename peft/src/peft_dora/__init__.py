"""This project's DoRA for PEFT: ``get_peft_model(model, DoraConfig(...))`` builds its layers."""

from .checkpoint import MAGNITUDE_MODES, LoadReport, load_dora_adapter
from .config import DoraConfig
from .layer import DoraLinear, DoraVariant, invalidate_norm_caches
from .norm import dora_weight_norm

__all__ = ["DoraConfig", "DoraLinear", "DoraVariant", "dora_weight_norm", "invalidate_norm_caches"]
__all__ += ["MAGNITUDE_MODES", "LoadReport", "load_dora_adapter"]
