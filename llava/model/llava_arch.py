"""The LLaVA pieces shared by every language model: vision tower, projector, and image splicing."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .multimodal_encoder.builder import build_vision_tower
from .multimodal_projector.builder import build_vision_projector

logger = logging.getLogger(__name__)


def load_projector_weights(path: str) -> dict[str, torch.Tensor]:
    """Projector weights from ``mm_projector.bin`` (a pickle, read tensors-only) or a safetensors file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def labels_within_length(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tokens_per_image: int,
    max_length: int,
) -> torch.Tensor:
    """``labels`` with IGNORE_INDEX wherever ``prepare_inputs_labels_for_multimodal`` will cut the token off.

    Each image placeholder becomes ``tokens_per_image`` positions and the spliced sequence is then cut at
    ``max_length``, so a supervised token survives only if its position after the splice is below it.
    Counting supervised tokens from these labels gives what the model's loss really sums over.
    """
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    position = real.long().cumsum(dim=-1) - 1  # position among the real tokens (padding may sit anywhere)
    image = (input_ids == IMAGE_TOKEN_INDEX) & real
    images_before = image.long().cumsum(dim=-1) - image.long()
    spliced = position + images_before * (tokens_per_image - 1)
    return labels.masked_fill(~real | (spliced >= max_length), IGNORE_INDEX)


class LlavaMetaModel:
    """Mixed into the decoder's base model: owns ``vision_tower`` and ``mm_projector``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        if hasattr(config, "mm_vision_tower"):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)

    def get_vision_tower(self):
        vision_tower = getattr(self, "vision_tower", None)
        if isinstance(vision_tower, list):
            vision_tower = vision_tower[0]
        return vision_tower

    def initialize_vision_modules(self, model_args, fsdp=None) -> None:
        """Attach the vision tower and projector for training (the seed's stage-1 and stage-2 entry)."""
        self.config.mm_vision_tower = model_args.vision_tower
        if self.get_vision_tower() is None:
            vision_tower = build_vision_tower(model_args)
            self.vision_tower = [vision_tower] if fsdp else vision_tower
        else:
            vision_tower = self.get_vision_tower()
            vision_tower.load_model()

        self.config.use_mm_proj = True
        self.config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear")
        self.config.mm_hidden_size = vision_tower.hidden_size
        self.config.mm_vision_select_layer = model_args.mm_vision_select_layer
        self.config.mm_vision_select_feature = model_args.mm_vision_select_feature
        self.config.mm_patch_merge_type = getattr(model_args, "mm_patch_merge_type", "flat")

        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(self.config)
        else:
            self.mm_projector.requires_grad_(True)

        if getattr(model_args, "pretrain_mm_mlp_adapter", None) is not None:
            weights = load_projector_weights(model_args.pretrain_mm_mlp_adapter)
            projector_weights = {k.split("mm_projector.", 1)[1]: v for k, v in weights.items() if "mm_projector." in k}
            if not projector_weights:
                raise ValueError(f"{model_args.pretrain_mm_mlp_adapter} holds no 'mm_projector.*' weights.")
            _load_maybe_partitioned(self.mm_projector, projector_weights, model_args.pretrain_mm_mlp_adapter)
            logger.info("Loaded the pretrained projector from %s", model_args.pretrain_mm_mlp_adapter)


def _load_maybe_partitioned(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that also works when DeepSpeed ZeRO-3 has partitioned the module."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                _strict_load(module, state, source)
    else:
        _strict_load(module, state, source)


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    for key, tensor in state.items():
        if key not in expected:
            raise ValueError(f"{source}: unexpected projector key {key!r} (the model has {sorted(expected)}).")
        if expected[key].shape != tensor.shape:
            raise ValueError(
                f"{source}: projector weight {key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (check --mm_projector_type and the base model)."
            )
    module.load_state_dict(state, strict=True)


class LlavaMetaForCausalLM(ABC):
    """Mixed into the causal LM: encodes images and splices them in place of IMAGE_TOKEN_INDEX."""

    @abstractmethod
    def get_model(self):
        ...

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.get_model().mm_projector(self.get_model().get_vision_tower()(images))

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images,
        image_sizes=None,
        padding_side: str | None = None,
    ):
        """Replace each IMAGE_TOKEN_INDEX by the projected patch features of its image.

        Returns (None, position_ids, attention_mask, past_key_values, inputs_embeds, labels), with
        sequences truncated to ``tokenizer_model_max_length`` after splicing and re-padded on
        ``padding_side`` (the config's ``tokenizer_padding_side`` by default; generation uses left).
        """
        vision_tower = self.get_vision_tower()
        if vision_tower is None or images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels

        if isinstance(images, list) or images.ndim == 5:
            images = torch.cat([image.unsqueeze(0) if image.ndim == 3 else image for image in images], dim=0)
        image_features = self.encode_images(images)

        original_labels, original_position_ids, original_attention_mask = labels, position_ids, attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            attention_mask = attention_mask.bool()
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)

        ids_per_sample = [ids[mask] for ids, mask in zip(input_ids, attention_mask)]
        labels_per_sample = [lab[mask] for lab, mask in zip(labels, attention_mask)]
        embed_tokens = self.get_model().embed_tokens

        new_embeds, new_labels = [], []
        image_idx = 0
        for ids, lab in zip(ids_per_sample, labels_per_sample):
            image_positions = torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist()
            if not image_positions:
                # A text-only sample still consumes its (zero) image so every rank runs the same modules.
                features = image_features[image_idx]
                new_embeds.append(torch.cat([embed_tokens(ids), features[0:0]], dim=0))
                new_labels.append(lab)
                image_idx += 1
                continue
            bounds = [-1] + image_positions + [ids.shape[0]]
            text_ids = [ids[bounds[i] + 1 : bounds[i + 1]] for i in range(len(bounds) - 1)]
            text_labels = [lab[bounds[i] + 1 : bounds[i + 1]] for i in range(len(bounds) - 1)]
            text_embeds = torch.split(embed_tokens(torch.cat(text_ids)), [len(t) for t in text_ids], dim=0)
            pieces, piece_labels = [], []
            for i, (embeds, piece_lab) in enumerate(zip(text_embeds, text_labels)):
                pieces.append(embeds)
                piece_labels.append(piece_lab)
                if i < len(image_positions):
                    features = image_features[image_idx]
                    image_idx += 1
                    pieces.append(features)
                    piece_labels.append(torch.full((features.shape[0],), IGNORE_INDEX, device=lab.device, dtype=lab.dtype))
            new_embeds.append(torch.cat(pieces))
            new_labels.append(torch.cat(piece_labels))

        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        if max_length is not None:
            new_embeds = [e[:max_length] for e in new_embeds]
            new_labels = [lab[:max_length] for lab in new_labels]

        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        longest = max(e.shape[0] for e in new_embeds)
        batch = len(new_embeds)
        hidden = new_embeds[0].shape[1]
        embeds_padded = new_embeds[0].new_zeros(batch, longest, hidden)
        labels_padded = torch.full((batch, longest), IGNORE_INDEX, dtype=new_labels[0].dtype, device=new_labels[0].device)
        mask_padded = torch.zeros((batch, longest), dtype=attention_mask.dtype, device=attention_mask.device)
        positions = torch.zeros((batch, longest), dtype=torch.long, device=attention_mask.device)
        for i, (embeds, lab) in enumerate(zip(new_embeds, new_labels)):
            n = embeds.shape[0]
            span = slice(longest - n, longest) if side == "left" else slice(0, n)
            embeds_padded[i, span] = embeds
            labels_padded[i, span] = lab
            mask_padded[i, span] = True
            positions[i, span] = torch.arange(n, dtype=torch.long, device=positions.device)

        labels_out = None if original_labels is None else labels_padded
        mask_out = None if original_attention_mask is None else mask_padded.to(original_attention_mask.dtype)
        if side == "left" and original_attention_mask is None:
            mask_out = mask_padded  # left padding is only meaningful with a mask
        positions_out = None if original_position_ids is None else positions
        return None, positions_out, mask_out, past_key_values, embeds_padded, labels_out
