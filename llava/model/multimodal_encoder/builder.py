"""Builds the vision tower named by ``mm_vision_tower`` (a hub id or a local folder)."""

from __future__ import annotations

import os

from .clip_encoder import CLIPVisionTower


def build_vision_tower(vision_tower_cfg, **kwargs) -> CLIPVisionTower:
    vision_tower = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if vision_tower is None:
        raise ValueError("No vision tower configured: set mm_vision_tower (e.g. openai/clip-vit-large-patch14-336).")
    if os.path.exists(vision_tower) or vision_tower.startswith("openai") or "clip" in vision_tower.lower():
        return CLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)
    raise ValueError(f"Unknown vision tower: {vision_tower!r} (a CLIP model id or a local CLIP folder is expected).")
