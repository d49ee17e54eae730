"""Briefly pretrain the tiny language model on generated text, as Vicuna is pretrained for the real model.

Adapters adapt: LoRA and DoRA only move a model that already speaks the language of the task. A
random-weight base would leave them nothing to adapt, so the demo's base first learns, by
next-token prediction on whole documents, the corpus lines, plain-text scene facts, and text-only
chats in the conversation template where the scene is described in words (as Vicuna can answer from
what it is told before LLaVA teaches it to look).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llava.constants import IGNORE_INDEX
from llava.conversation import conv_templates
from llava.train.data import (
    build_conversation_prompt,
    supervised_mask,
    tokenize_with_offsets,
)

logger = logging.getLogger(__name__)


def document_batches(docs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                     generator: torch.Generator, group: int = 1):
    """Endless batches of whole documents drawn at random, right-padded (padding is never learned).

    Documents are not packed together: a chat must not see the previous chat's scene, as at
    instruction tuning, where every sample stands alone. With ``group`` > 1, ``group`` batches' worth
    of documents are drawn at once, sorted by length and cut into batches served in random order
    (as a length-grouped sampler does): the same documents, much less padding to compute.
    """
    while True:
        picks = torch.randint(0, len(docs), (batch_size * group,), generator=generator).tolist()
        if group > 1:
            picks.sort(key=lambda k: len(docs[k][0]))
        order = torch.randperm(group, generator=generator).tolist() if group > 1 else [0]
        for chunk in order:
            yield _padded([docs[k] for k in picks[chunk * batch_size: (chunk + 1) * batch_size]], pad_id)


def _padded(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(doc_ids) for doc_ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (doc_ids, doc_labels) in enumerate(batch):
        ids[row, : len(doc_ids)] = torch.tensor(doc_ids)
        labels[row, : len(doc_labels)] = torch.tensor(doc_labels)
    return ids, labels


def documents(tokenizer, texts: list[str], dialogues: Path | None, conv_mode: str,
              max_tokens: int = 512) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of every plain text (all tokens learned) and every chat rendered in the
    conversation template (only the answers learned, as in instruction tuning); each ends in EOS."""
    docs = []
    for text in texts:
        ids = (tokenizer(text).input_ids + [tokenizer.eos_token_id])[:max_tokens]
        docs.append((ids, ids))
    if dialogues is not None:
        conv = conv_templates[conv_mode]
        for sample in json.loads(Path(dialogues).read_text()):
            prompt, spans = build_conversation_prompt(sample["conversations"], conv, sample.get("id", "?"))
            ids, offsets = tokenize_with_offsets(prompt, tokenizer, has_image=False)
            mask = supervised_mask(offsets, spans)
            labels = [i if learned else IGNORE_INDEX for i, learned in zip(ids, mask)]
            docs.append((ids[:max_tokens], labels[:max_tokens]))
    return docs


def pretrain_language_model(
    model_dir: Path,
    corpus: Path,
    dialogues: Path | None = None,
    facts: Path | None = None,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    conv_mode: str = "vicuna_v1",
    log_every: int = 200,
    group: int = 8,
    probe: Callable[[LlamaForCausalLM, int], None] | None = None,
    probe_every: int = 0,
) -> list[float]:
    """Train ``model_dir`` (a LlamaForCausalLM folder with its tokenizer) in place; returns the losses.

    ``corpus`` is one text a line; ``facts`` a JSON list of texts; ``dialogues`` chats in the mix665k
    format without images. ``group``: batches drawn together and grouped by length (``document_batches``).
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    texts = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    if facts is not None:
        texts += json.loads(Path(facts).read_text())
    docs = documents(tokenizer, texts, dialogues, conv_mode)
    tokens = sum(len(ids) for ids, _ in docs)
    logger.info("Pretraining the language model on %d documents (%d tokens) for %d steps", len(docs), tokens, steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    batches = document_batches(docs, batch_size, pad_id, torch.Generator().manual_seed(seed), group)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        batch, batch_labels = next(batches)
        loss = model(input_ids=batch, labels=batch_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            recent = losses[-log_every:]
            logger.info("language model step %d/%d: loss %.3f", step, steps, sum(recent) / len(recent))
        if probe is not None and probe_every and step % probe_every == 0:
            model.eval()
            probe(model, step)
            model.train()
    model.save_pretrained(str(model_dir))
    logger.info("Language model loss %.3f -> %.3f", losses[0], sum(losses[-10:]) / min(10, len(losses)))
    return losses
