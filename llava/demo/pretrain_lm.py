"""Briefly pretrain the tiny language model on generated text, as Vicuna is pretrained for the real model.

Adapters adapt: LoRA and DoRA only move a model that already speaks the language of the task. A
random-weight base would leave them nothing to adapt, so the demo's base first learns the corpus
by plain next-token prediction over packed sequences.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM

logger = logging.getLogger(__name__)


def packed_batches(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    """Endless random windows of ``seq_len`` tokens from one long token stream."""
    starts = len(ids) - seq_len - 1
    if starts <= 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    while True:
        offsets = torch.randint(0, starts, (batch_size,), generator=generator)
        yield torch.stack([ids[o : o + seq_len] for o in offsets.tolist()])


def pretrain_language_model(
    model_dir: Path,
    corpus: Path,
    steps: int = 300,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model_dir`` (a LlamaForCausalLM folder with its tokenizer) in place; returns the losses."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    lines = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    stream = []
    for line in lines:
        stream += tokenizer(line).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor(stream)
    logger.info("Pretraining the language model on %d lines (%d tokens) for %d steps", len(lines), len(ids), steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    batches = packed_batches(ids, seq_len, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretraining the tiny language model", leave=False)
    for _ in bar:
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
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
