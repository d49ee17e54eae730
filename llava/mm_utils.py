"""Image and token helpers shared by training, evaluation and serving."""

from __future__ import annotations

import base64
from io import BytesIO
from typing import Any, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB the way the seed's pipeline saw it: PIL's conversion, which drops an alpha
    channel (transparent pixels keep their stored colour). PIL keeps a palette's transparent colour in
    ``info``, and transformers 5's processors read it to composite that colour onto white (4.31's did
    not), so it is removed too."""
    rgb = image.convert("RGB")
    rgb.info.pop("transparency", None)
    return rgb


def load_image_from_base64(image: str) -> Image.Image:
    """Decode an image sent inline (web demo, MMBench TSV)."""
    return Image.open(BytesIO(base64.b64decode(image)))


def expand2square(pil_img: Image.Image, background_color: Any) -> Image.Image:
    """Pad to a centred square so the CLIP centre crop keeps the whole image (`image_aspect_ratio pad`)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def process_images(images: Sequence[Image.Image], image_processor: Any, model_cfg: Any) -> torch.Tensor | list:
    """Turn PIL images into pixel tensors the way the model was trained (`model_cfg.image_aspect_ratio`)."""
    if getattr(model_cfg, "image_aspect_ratio", None) != "pad":
        return image_processor(images, return_tensors="pt")["pixel_values"]
    # int() truncates, as LLaVA-1.5 did: CLIP's mean becomes (122, 116, 104), not the rounded (123, 117, 104).
    background = tuple(int(x * 255) for x in image_processor.image_mean)
    new_images = [
        image_processor.preprocess(expand2square(image, background), return_tensors="pt")["pixel_values"][0]
        for image in images
    ]
    if all(x.shape == new_images[0].shape for x in new_images):
        return torch.stack(new_images, dim=0)
    return new_images


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Tokenize a prompt with `<image>` tags, putting `image_token_index` where each tag was.

    Each text chunk is tokenized on its own (the tag is not a vocabulary token); when the tokenizer adds a
    BOS, only the first chunk keeps it.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[offset:])
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"Unsupported tensor type: {return_tensors}")


def get_model_name_from_path(model_path: str) -> str:
    """Name a model after its folder; an intermediate checkpoint gets its run's name in front."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a sequence once its generated text ends with (token ids) or contains (decoded text) a keyword.

    Returns one flag per sequence, as the current `StoppingCriteria` API expects: `generate` keeps producing tokens
    until every sequence of the batch has been flagged, which is what the original's `all()` over the
    batch meant, without losing a sequence whose keyword has scrolled out of the checked window.
    """

    def __init__(self, keywords: Sequence[str], tokenizer: Any, input_ids: torch.Tensor) -> None:
        self.keywords = list(keywords)
        self.keyword_ids: list[torch.Tensor] = []
        self.max_keyword_len = 0
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.max_keyword_len = max(self.max_keyword_len, len(ids))
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))
        self.tokenizer = tokenizer
        self.start_len = input_ids.shape[1]

    def call_for_batch(self, output_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> bool:
        """Whether the single sequence `output_ids` (shape [1, length]) has produced a keyword."""
        generated = output_ids.shape[1] - self.start_len
        if generated <= 0:
            return False
        for keyword_id in self.keyword_ids:
            n = keyword_id.shape[0]
            if n <= generated and torch.equal(output_ids[0, -n:], keyword_id.to(output_ids.device)):
                return True
        offset = min(generated, self.max_keyword_len)
        text = self.tokenizer.batch_decode(output_ids[:, -offset:], skip_special_tokens=True)[0]
        return any(keyword in text for keyword in self.keywords)

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        flags = [self.call_for_batch(input_ids[i : i + 1], scores) for i in range(input_ids.shape[0])]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)
