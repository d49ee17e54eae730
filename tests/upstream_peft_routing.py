"""A pytest plugin that runs upstream PEFT's own tests with this project's DoRA layer.

Loaded with ``-p upstream_peft_routing`` by ``test_upstream_peft_suite.py`` into a pytest run over the
tests of PEFT's source distribution. Every LoRA module that PEFT creates for an ``nn.Linear`` while the
config asks for DoRA is built as ``peft_dora.layer.DoraLinear`` (the class ``DoraConfig`` registers for
``nn.Linear``), so upstream's expectations (merge, unmerge, save and load, disabling, deleting, mixed
batches, dtypes, pickling) are checked against this layer. For each test it appends one JSON line to
``$UPSTREAM_ROUTING_REPORT``: how many of this project's layers were built, and how many times
upstream's own DoRA was set up on an ``nn.Linear`` (which would mean the routing missed a layer).
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
from torch import nn


def _stub_missing(name: str, **attributes) -> None:
    """PEFT's shared test helpers import diffusers and datasets for tests that need the hub; none run here."""
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


_stub_missing("diffusers", StableDiffusionPipeline=type("StableDiffusionPipeline", (), {}))
_stub_missing("datasets", load_dataset=None)

from peft.tuners.lora import variants
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft_dora.layer import DoraLinear

_counts = {"project_layers": 0, "upstream_dora_on_linear": 0}

_create_new_module = LoraModel._create_new_module


def _create_project_dora(lora_config, adapter_name, target, **kwargs):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if getattr(lora_config, "use_dora", False) and isinstance(base, nn.Linear):
        _counts["project_layers"] += 1
        return DoraLinear(target, adapter_name, config=lora_config, **kwargs)
    return _create_new_module(lora_config, adapter_name, target, **kwargs)


LoraModel._create_new_module = staticmethod(_create_project_dora)

_upstream_init = variants.DoraLinearVariant.init


def _counted_upstream_init(module, adapter_name, **kwargs):
    if isinstance(module.get_base_layer(), nn.Linear):
        _counts["upstream_dora_on_linear"] += 1
    return _upstream_init(module, adapter_name, **kwargs)


variants.DoraLinearVariant.init = staticmethod(_counted_upstream_init)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    for key in _counts:
        _counts[key] = 0
    yield
    with open(os.environ["UPSTREAM_ROUTING_REPORT"], "a") as report:
        report.write(json.dumps({"test": item.nodeid, **_counts}) + "\n")
