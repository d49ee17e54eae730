"""Shared pytest fixtures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

_WORDS = (
    "the a an cat dog bird car bus man woman child tree house street sign table plate cup red blue green "
    "yellow white black small large left right top bottom of on in under near with and is are there what "
    "how many which color picture image photo shows question answer yes no user assistant describe"
).split()


def tiny_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences: enough text to train a small BPE vocabulary."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99)))
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return sentences


def train_tiny_llama_tokenizer(out_dir: Path, sentences: list[str], vocab_size: int = 400) -> Path:
    """Train a LLaMA-style sentencepiece BPE model and write a folder `LlamaTokenizer.from_pretrained` loads.

    The trainer options mirror LLaMA's tokenizer (byte fallback, identity normalisation, no whitespace
    collapsing, split digits, ids unk=0 bos=1 eos=2, no pad) so that tokenization quirks (the dummy
    prefix "▁", newlines as byte pieces) are the ones the real 32000-token vocabulary shows. The folder
    holds `tokenizer.model` plus a `tokenizer_config.json` like Vicuna's (BOS added, no EOS, non-legacy):
    transformers 5 reads a lone `.model` with `add_bos_token=False`.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "padding_side": "right",
        "model_max_length": 2048,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a freshly trained tiny LLaMA tokenizer (tokenizer.model + tokenizer_config.json)."""
    return train_tiny_llama_tokenizer(tmp_path_factory.mktemp("tiny_llama_tokenizer"), tiny_sentences())


@pytest.fixture(scope="session")
def tiny_llama_tokenizer(tiny_llama_tokenizer_dir: Path):
    """The tiny tokenizer loaded the way LLaVA loads Vicuna's."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(tiny_llama_tokenizer_dir))
