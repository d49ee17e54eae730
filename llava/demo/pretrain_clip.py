"""Briefly pretrain the tiny CLIP vision tower, contrastively, on the generated image/caption pairs.

LLaVA's vision tower is a pretrained CLIP: its patch features already say what is where, and the
projector only has to translate them. A random tiny tower's features say little that a projector
can make readable (stage-1 captions were learned barely better than always answering "no"), so
the demo's base gets what the real one has: a CLIP model (this tower plus a small text encoder)
trained to match each image with its caption, as CLIP was. Only the vision tower is kept; it is
saved back as a plain ``CLIPVisionModel`` folder, which the rest of the pipeline loads as before.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionModel,
)

logger = logging.getLogger(__name__)


def load_pairs(captions: Path, image_folder: Path, processor, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels (through the tower's own processor, as LLaVA feeds it), caption token ids ending in EOS
    (right-padded), and each caption's id among the distinct captions (equal captions share one)."""
    pairs = json.loads(Path(captions).read_text())
    images = [Image.open(Path(image_folder) / p["image"]).convert("RGB") for p in pairs]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    texts = [p["caption"] for p in pairs]
    ids = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq)
    distinct = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    return pixels, tokens, torch.tensor([distinct[t] for t in texts])


def build_clip(vision: CLIPVisionModel, vocab_size: int, width: int = 64, layers: int = 2) -> CLIPModel:
    """A CLIP model whose vision half is ``vision`` itself and whose text half is small."""
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.config.to_dict(), projection_dim=width)
    model = CLIPModel(config)
    model.vision_model = vision
    return model


def embed(model: CLIPModel, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length image and caption embeddings. A caption is read at its EOS, the last real token
    (CLIP's own pooling picks the highest token id, which is not EOS in a LLaMA vocabulary)."""
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    mask = (tokens != 0).long()
    hidden = model.text_model(input_ids=tokens, attention_mask=mask).last_hidden_state
    text = model.text_projection(hidden[torch.arange(len(tokens)), mask.sum(1) - 1])
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every pair of equal captions counted as a match: the
    generated captions repeat ("random colored noise"), and a repeat is not a negative."""
    logits = scale * image @ text.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


@torch.no_grad()
def match_accuracy(model: CLIPModel, pixels: torch.Tensor, tokens: torch.Tensor, caption_ids: torch.Tensor) -> float:
    """Share of images whose best-scoring caption (among the distinct captions given) is their own."""
    model.eval()
    first = {int(c): k for k, c in reversed(list(enumerate(caption_ids)))}
    distinct = torch.tensor(sorted(first.values()))
    image, text = embed(model, pixels, tokens[distinct])
    best = caption_ids[distinct][(image @ text.T).argmax(1)]
    return (best == caption_ids).float().mean().item()


def pretrain_vision_tower(
    vision_dir: Path,
    tokenizer_dir: Path,
    captions: Path,
    image_folder: Path,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 50,
) -> tuple[list[float], float]:
    """Train the tower in ``vision_dir`` (a CLIPVisionModel folder with its processor) in place.

    Returns the losses and the share of held-out images (a tenth of the pairs, never trained on)
    whose best-matching caption is their own."""
    torch.manual_seed(seed)
    vision = CLIPVisionModel.from_pretrained(str(vision_dir), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    processor = CLIPImageProcessorPil.from_pretrained(str(vision_dir))
    pixels, tokens, caption_ids = load_pairs(captions, image_folder, processor, tokenizer)
    held = max(1, len(pixels) // 10)
    model = build_clip(vision, len(tokenizer))
    logger.info("Pretraining the vision tower on %d image/caption pairs (%d distinct captions) for %d steps",
                len(pixels) - held, len(set(caption_ids.tolist())), steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        model.train()
        picks = held + torch.randint(0, len(pixels) - held, (batch_size,), generator=generator)
        image, text = embed(model, pixels[picks], tokens[picks])
        loss = contrastive_loss(image, text, model.logit_scale.exp().clamp(max=100), caption_ids[picks])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            logger.info("vision tower step %d/%d: loss %.3f", step, steps, sum(losses[-log_every:]) / len(losses[-log_every:]))
    accuracy = match_accuracy(model, pixels[:held], tokens[:held], caption_ids[:held])
    logger.info("Held-out images matched to their own caption: %.1f%% (%d images)", 100 * accuracy, held)

    vision.save_pretrained(str(vision_dir))
    return losses, accuracy
