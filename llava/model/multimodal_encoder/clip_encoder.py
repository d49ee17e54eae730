"""The frozen CLIP vision tower: patch features of the second-to-last layer.

Images are preprocessed with the PIL-based CLIP processor, the one the original LLaVA used.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPImageProcessorPil as CLIPImageProcessor
from transformers import CLIPVisionConfig, CLIPVisionModel


class CLIPVisionTower(nn.Module):
    """Wraps ``CLIPVisionModel``; weights load lazily so a LLaVA checkpoint can be built from config first."""

    def __init__(self, vision_tower: str, args, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        else:
            self.cfg_only = CLIPVisionConfig.from_pretrained(self.vision_tower_name)

    def load_model(self, device_map=None) -> None:
        """Load the image processor and the frozen tower.

        Under ``torch.device("meta")`` (``llava.train.count_params``) the tower is built from its
        config alone: meta tensors hold no values, so no weights are read and none need to exist.
        """
        if self.is_loaded:
            return
        self.image_processor = CLIPImageProcessor.from_pretrained(self.vision_tower_name)
        if torch.get_default_device().type == "meta":
            self.vision_tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(self.vision_tower_name))
        else:
            self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name, device_map=device_map)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def feature_select(self, outputs) -> torch.Tensor:
        features = outputs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            return features[:, 1:]
        if self.select_feature == "cls_patch":
            return features
        raise ValueError(f"Unexpected mm_vision_select_feature: {self.select_feature!r} (use 'patch' or 'cls_patch').")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(outputs).to(images.dtype)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self):
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def tokens_per_image(self) -> int:
        """Positions one image takes in the language model's sequence (its patches, plus CLS with 'cls_patch')."""
        return self.num_patches + (self.select_feature == "cls_patch")
