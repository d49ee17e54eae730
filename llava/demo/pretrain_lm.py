"""Briefly pretrain the tiny language model on generated text, as Vicuna is pretrained for the real model.

Adapters adapt: LoRA and DoRA only move a model that already speaks the language of the task. A
random-weight base would leave them nothing to adapt, so the demo's base first learns, by plain
next-token prediction over packed sequences, the corpus lines and text-only chats in the conversation
template where the scene is described in words (as Vicuna can answer from what it is told before
LLaVA teaches it to look).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

from llava.conversation import conv_templates
from llava.constants import IGNORE_INDEX
from llava.train.data import build_conversation_prompt, supervised_mask, tokenize_with_offsets

logger = logging.getLogger(__name__)


def packed_batches(ids: torch.Tensor, labels: torch.Tensor, seq_len: int, batch_size: int,
                   generator: torch.Generator):
    """Endless random windows of ``seq_len`` tokens (and their labels) from one long token stream."""
    starts = len(ids) - seq_len - 1
    if starts <= 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    while True:
        offsets = torch.randint(0, starts, (batch_size,), generator=generator).tolist()
        yield (torch.stack([ids[o : o + seq_len] for o in offsets]),
               torch.stack([labels[o : o + seq_len] for o in offsets]))


def documents(tokenizer, corpus: Path, dialogues: Path | None, conv_mode: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of every corpus line (all tokens learned) and every chat rendered in the
    conversation template (only the answers learned, as in instruction tuning); each ends in EOS."""
    lines = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    docs = []
    for line in lines:
        ids = tokenizer(line).input_ids + [tokenizer.eos_token_id]
        docs.append((ids, ids))
    if dialogues is not None:
        conv = conv_templates[conv_mode]
        for sample in json.loads(Path(dialogues).read_text()):
            prompt, spans = build_conversation_prompt(sample["conversations"], conv, sample.get("id", "?"))
            ids, offsets = tokenize_with_offsets(prompt, tokenizer, has_image=False)
            mask = supervised_mask(offsets, spans)
            docs.append((ids, [i if learned else IGNORE_INDEX for i, learned in zip(ids, mask)]))
    return docs


def pretrain_language_model(
    model_dir: Path,
    corpus: Path,
    dialogues: Path | None = None,
    steps: int = 300,
    seq_len: int = 256,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    conv_mode: str = "vicuna_v1",
) -> list[float]:
    """Train ``model_dir`` (a LlamaForCausalLM folder with its tokenizer) in place; returns the losses."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    docs = documents(tokenizer, corpus, dialogues, conv_mode)
    ids = torch.tensor([token for doc, _ in docs for token in doc])
    labels = torch.tensor([label for _, doc_labels in docs for label in doc_labels])
    logger.info("Pretraining the language model on %d documents (%d tokens) for %d steps", len(docs), len(ids), steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    batches = packed_batches(ids, labels, seq_len, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretraining the tiny language model", leave=False)
    for _ in bar:
        batch, batch_labels = next(batches)
        loss = model(input_ids=batch, labels=batch_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(str(model_dir))
    logger.info("Language model loss %.3f -> %.3f", losses[0], sum(losses[-10:]) / min(10, len(losses)))
    return losses
