"""Build a tiny LLaVA-1.5 base from configs: a Vicuna-like LLaMA, a CLIP vision tower, a projector.

Everything is written in the real formats and loaded back through the same ``from_pretrained``
paths as the real weights, so tests and the demo exercise the real loading code without a hub:

    python -m llava.tiny_base OUT_DIR [--text corpus.txt]

writes OUT_DIR/vicuna-tiny (LlamaForCausalLM + a sentencepiece tokenizer trained on the fly),
OUT_DIR/clip-tiny (CLIPVisionModel + its image processor) and OUT_DIR/projector/mm_projector.bin.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

logger = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

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


@dataclass
class TinySizes:
    """Widths of the tiny base; defaults run a training step in well under a second on a CPU."""

    vocab_size: int = 400
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vision_hidden_size: int = 32
    vision_layers: int = 3
    image_size: int = 32
    patch_size: int = 8
    projector_type: str = "mlp2x_gelu"
    # Spread of the language model's initial weights (LlamaConfig.initializer_range). LLaMA's 0.02 suits
    # widths in the thousands; at width 128 it leaves attention nearly uniform for hundreds of steps.
    lm_init_std: float = 0.02


@dataclass
class TinyBase:
    language_model: Path
    vision_tower: Path
    projector: Path


def build_tiny_base(out_dir: Path, sentences: list[str] | None = None, sizes: TinySizes | None = None, seed: int = 0) -> TinyBase:
    """Write the three tiny components under ``out_dir`` (random weights, fixed seed)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llava.model.multimodal_projector.builder import build_vision_projector

    sizes = sizes or TinySizes()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)

    lm_dir = train_tiny_llama_tokenizer(out_dir / "vicuna-tiny", sentences or tiny_sentences(), sizes.vocab_size)
    lm_config = LlamaConfig(
        vocab_size=sizes.vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=sizes.lm_init_std,
    )
    LlamaForCausalLM(lm_config).save_pretrained(lm_dir)

    clip_dir = out_dir / "clip-tiny"
    clip_config = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=sizes.vision_hidden_size * 4,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=4,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden_size,
    )
    CLIPVisionModel(clip_config).save_pretrained(clip_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(clip_dir)

    projector_dir = out_dir / "projector"
    projector_dir.mkdir(parents=True, exist_ok=True)
    projector = build_vision_projector(
        SimpleNamespace(
            mm_projector_type=sizes.projector_type,
            mm_hidden_size=sizes.vision_hidden_size,
            hidden_size=sizes.hidden_size,
        )
    )
    state = {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    torch.save(state, projector_dir / "mm_projector.bin")
    logger.info("Tiny base written to %s", out_dir)
    return TinyBase(lm_dir, clip_dir, projector_dir / "mm_projector.bin")


def build_tiny_llava(base: TinyBase, out_dir: Path, distinct_answers: bool = True) -> Path:
    """A full tiny LLaVA-1.5 folder (language model + vision tower + projector), as the builder loads it.

    With ``distinct_answers`` the lm_head is scaled up and its byte-fallback rows are zeroed, so that
    greedy answers of the random model differ between questions and decode to readable text (byte
    tokens would all decode to the same replacement characters); generation tests compare answers.
    """
    from transformers import AutoTokenizer

    from llava.model import LlavaLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base.language_model)
    model = LlavaLlamaForCausalLM.from_pretrained(base.language_model)
    model.get_model().initialize_vision_modules(
        SimpleNamespace(
            vision_tower=str(base.vision_tower),
            mm_vision_select_layer=-2,
            mm_vision_select_feature="patch",
            pretrain_mm_mlp_adapter=str(base.projector),
            mm_projector_type="mlp2x_gelu",
            mm_patch_merge_type="flat",
        )
    )
    model.config.image_aspect_ratio = "pad"
    if distinct_answers:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        byte_rows = [i for i, token in enumerate(tokens) if token.startswith("<0x")]
        with torch.no_grad():
            model.lm_head.weight.mul_(5)
            model.lm_head.weight[byte_rows] = 0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--text", type=Path, help="a text file (one sentence a line) to train the tokenizer on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sentences = args.text.read_text().splitlines() if args.text else None
    base = build_tiny_base(args.out_dir, sentences, seed=args.seed)
    print(f"language model: {base.language_model}\nvision tower:   {base.vision_tower}\nprojector:      {base.projector}")


if __name__ == "__main__":
    main()
