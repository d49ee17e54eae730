"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

# Triton decides between compiling and interpreting when it is first imported, which any test module may
# cause: set before all of them, so the fused kernels' tests run under its interpreter on a CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from llava.tiny_base import tiny_sentences, train_tiny_llama_tokenizer  # noqa: F401  (re-exported for tests)


@pytest.fixture(scope="session")
def tiny_llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a freshly trained tiny LLaMA tokenizer (tokenizer.model + tokenizer_config.json)."""
    return train_tiny_llama_tokenizer(tmp_path_factory.mktemp("tiny_llama_tokenizer"), tiny_sentences())


@pytest.fixture(scope="session")
def tiny_llama_tokenizer(tiny_llama_tokenizer_dir: Path):
    """The tiny tokenizer loaded the way LLaVA loads Vicuna's."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(tiny_llama_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory):
    """The tiny LLaVA-1.5 base (LLaMA + tokenizer, CLIP tower + processor, projector), built once per session."""
    from llava.tiny_base import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def clip_processor():
    """A CLIP image processor at the tiny tower's size (32 px), with CLIP's mean and std."""
    from transformers import CLIPImageProcessor

    from llava.tiny_base import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
