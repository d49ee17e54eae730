"""Training data of LLaVA-1.5: JSON samples -> prompt -> input_ids and labels, images -> pixel tensors.

Behaviour follows LLaVA-1.5's `llava/train/train.py` (same prompts, same token stream as
`tokenizer_image_token`, same supervised text: each assistant answer and its closing separator), with
three changes that make it robust:

* The label mask comes from character spans. The prompt is built turn by turn through the
  `Conversation` template, recording where each answer (with its closing `</s>`) sits in the string;
  every token then carries its character offsets, and a token is supervised when its characters overlap
  an answer span. The original added up per-turn token counts instead, which breaks whenever a turn
  tokenizes differently alone than in context (the "tokenization mismatch" that silently dropped whole
  samples when the tokenizer's `legacy` setting changed).
* Bad data fails early with the sample id and file in the message (or, with `skip_bad_samples`, bad
  images are counted and skipped).
* A sample with no supervised token left (truncated away, empty answers) is logged by id and kept with
  all labels IGNORE_INDEX; the model must return a zero loss for a batch without targets.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from llava import conversation as conversation_lib
from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import Conversation, SeparatorStyle
from llava.mm_utils import expand2square

logger = logging.getLogger(__name__)

Span = tuple[int, int]

_ROLE_INDEX = {"human": 0, "gpt": 1}


@dataclass
class DataArguments:
    """Data flags of LLaVA's training command line.

    The trainer also attaches `image_processor` and `mm_use_im_start_end` to this object at run time,
    as the original did.
    """

    data_path: str = field(default=None, metadata={"help": "Path to the training data."})
    lazy_preprocess: bool = False
    is_multimodal: bool = False
    image_folder: Optional[str] = field(default=None)
    image_aspect_ratio: str = "square"
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Count and skip samples whose image is missing/unreadable (ids kept in the dataset's "
            "`skipped` list) instead of failing."
        },
    )


class UnreadableImageError(ValueError):
    """An image file exists but cannot be decoded; skippable with `skip_bad_samples`."""


# ---------------------------------------------------------------------------------------------------
# Conversations -> prompt strings with answer spans


def preprocess_multimodal(sources: Sequence[list[dict[str, Any]]], data_args: Any) -> Sequence[list[dict[str, Any]]]:
    """Move `<image>` to the start of its turn followed by a newline, the layout LLaVA-1.5 was trained on.

    Modifies `sources` in place (the dataset passes a copy) and returns it, as the original did.
    """
    if not data_args.is_multimodal:
        return sources
    version = conversation_lib.default_conversation.version
    replace_token = DEFAULT_IMAGE_TOKEN
    if getattr(data_args, "mm_use_im_start_end", False):
        replace_token = DEFAULT_IM_START_TOKEN + replace_token + DEFAULT_IM_END_TOKEN
    for source in sources:
        for sentence in source:
            if DEFAULT_IMAGE_TOKEN in sentence["value"]:
                text = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                sentence["value"] = (DEFAULT_IMAGE_TOKEN + "\n" + text).strip()
                if "mmtag" in version:
                    sentence["value"] = sentence["value"].replace(
                        DEFAULT_IMAGE_TOKEN, "<Image>" + DEFAULT_IMAGE_TOKEN + "</Image>"
                    )
            sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, replace_token)
    return sources


def conversation_turns(source: Sequence[dict[str, Any]], name: str) -> list[tuple[int, str]]:
    """(speaker, text) pairs, speaker 0 = human, 1 = gpt, after LLaVA's rules.

    A first turn not from "human" is dropped (as the original did); the rest must alternate
    human/gpt. Raises ValueError naming the sample otherwise, instead of the original's bare assert.
    """
    first = 1 if source and source[0].get("from") != "human" else 0
    result = []
    for j, turn in enumerate(source[first:]):
        speaker = _ROLE_INDEX.get(turn.get("from"))
        if speaker is None:
            raise ValueError(
                f"sample {name}: turn {first + j} is from {turn.get('from')!r}; expected 'human' or 'gpt'"
            )
        if speaker != j % 2:
            expected = "human" if j % 2 == 0 else "gpt"
            raise ValueError(
                f"sample {name}: roles must alternate human/gpt, but turn {first + j} is from {turn['from']!r} "
                f"where {expected!r} was expected"
            )
        result.append((speaker, turn["value"]))
    return result


def _render(conv: Conversation, messages: Sequence[tuple[str, Optional[str]]]) -> str:
    rendered = conv.copy()
    rendered.messages = [[role, message] for role, message in messages]
    return rendered.get_prompt()


def build_conversation_prompt(
    source: Sequence[dict[str, Any]], conv: Conversation, name: str
) -> tuple[str, list[Span]]:
    """The template's prompt for one sample and the character span of every answer in it.

    An answer's span is what the model has to generate at inference time: from the end of the generation
    prompt (the conversation so far with the assistant's message left open, e.g. "... ASSISTANT:") to the
    end of the rendered turn. For vicuna_v1 that is " ANSWER</s>": the space after "ASSISTANT:" is
    included because the model produces it (a lone "▁" before a digit, or fused as "▁Yes"), as the
    original's token counting also supervised it; for llama_2 it is " ANSWER </s>", for mpt
    "ANSWER<|im_end|>". Rendering through the template itself keeps the spans exact for any template.
    An empty answer renders as the bare generation prompt, so it gets no span.
    """
    messages: list[tuple[str, Optional[str]]] = []
    answers: list[tuple[int, str]] = []
    for speaker, text in conversation_turns(source, name):
        role = conv.roles[speaker]
        generation_prompt = _render(conv, messages + [(role, None)]) if speaker == 1 else ""
        messages.append((role, text))
        if speaker == 1:
            rendered = _render(conv, messages)
            if not rendered.startswith(generation_prompt):
                raise ValueError(f"template {conv.version!r} does not render turn by turn; cannot locate its answers")
            answers.append((len(generation_prompt), rendered[len(generation_prompt) :]))
    prompt = _render(conv, messages)
    for start, answer in answers:
        if prompt[start : start + len(answer)] != answer:
            raise ValueError(f"template {conv.version!r} does not render turn by turn; cannot locate its answers")
    return prompt, [(start, start + len(answer)) for start, answer in answers if answer]


def build_plain_prompt(source: Sequence[dict[str, Any]], conv: Conversation, name: str) -> tuple[str, list[Span]]:
    """Stage-1 (projector pretraining) prompt: `<image>` + caption + sep, supervising caption and sep.

    As the original, the human turn is replaced by the bare image tag whatever its text.
    """
    if len(source) != 2:
        raise ValueError(f"sample {name}: the plain template needs exactly 2 turns (image, caption), got {len(source)}")
    if DEFAULT_IMAGE_TOKEN not in source[0]["value"]:
        raise ValueError(f"sample {name}: the plain template needs {DEFAULT_IMAGE_TOKEN} in the first turn")
    prompt = DEFAULT_IMAGE_TOKEN + source[1]["value"] + conv.sep
    return prompt, [(len(DEFAULT_IMAGE_TOKEN), len(prompt))]


# ---------------------------------------------------------------------------------------------------
# Prompt strings -> input_ids with character offsets -> labels


def _eos_text_is_special(tokenizer: Any) -> bool:
    """Whether `</s>` written in the text becomes the EOS id (true for LLaMA tokenizers in transformers 5)."""
    eos = tokenizer.eos_token
    return eos is not None and tokenizer(eos, add_special_tokens=False).input_ids == [tokenizer.eos_token_id]


def _encode(text: str, tokenizer: Any, add_special_tokens: bool = True) -> tuple[list[int], list[Span]]:
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(encoding.input_ids), [tuple(offset) for offset in encoding.offset_mapping]


def _encode_chunk(text: str, tokenizer: Any, eos_is_special: bool) -> tuple[list[int], list[Span]]:
    """Tokenize one text chunk as `tokenizer(text)` does, with the character span of every token.

    When the tokenizer reads the EOS string as plain characters, the chunk is split on it and the EOS id is
    inserted with the span of its text, so an answer's closing `</s>` is always the EOS token.
    """
    eos = tokenizer.eos_token
    if eos_is_special or eos is None or eos not in text:
        return _encode(text, tokenizer)
    ids: list[int] = []
    offsets: list[Span] = []
    position = 0
    for k, piece in enumerate(text.split(eos)):
        if k > 0:
            ids.append(tokenizer.eos_token_id)
            offsets.append((position - len(eos), position))
        piece_ids, piece_offsets = _encode(piece, tokenizer, add_special_tokens=k == 0)
        ids.extend(piece_ids)
        offsets.extend((start + position, end + position) for start, end in piece_offsets)
        position += len(piece) + len(eos)
    return ids, offsets


def tokenize_with_offsets(prompt: str, tokenizer: Any, has_image: bool) -> tuple[list[int], list[Span]]:
    """input_ids exactly as `tokenizer_image_token` (with an image) or `tokenizer` (without) give them,
    plus each token's (start, end) character span in `prompt`.

    IMAGE_TOKEN_INDEX gets the span of its `<image>` tag; BOS gets an empty span. Offsets need a
    tokenizers-backed ("fast") tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} gives no character offsets; load a fast (tokenizers) tokenizer")
    eos_is_special = _eos_text_is_special(tokenizer)
    chunks = prompt.split(DEFAULT_IMAGE_TOKEN) if has_image else [prompt]
    ids: list[int] = []
    offsets: list[Span] = []
    drop_bos = False
    position = 0
    for k, chunk in enumerate(chunks):
        chunk_ids, chunk_offsets = _encode_chunk(chunk, tokenizer, eos_is_special)
        if k == 0:
            drop_bos = bool(chunk_ids) and chunk_ids[0] == tokenizer.bos_token_id
        else:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((position - len(DEFAULT_IMAGE_TOKEN), position))
            if drop_bos:
                chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
        ids.extend(chunk_ids)
        offsets.extend((start + position, end + position) for start, end in chunk_offsets)
        position += len(chunk) + len(DEFAULT_IMAGE_TOKEN)
    return ids, offsets


def supervised_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[bool]:
    """Which tokens are trained on: those sharing at least one character with an answer span.

    Spans start right after the generation prompt ("ASSISTANT:"), so the model learns the token it must
    produce first at inference: "▁Yes" (space fused with the word) or a lone "▁" (before a digit) are
    supervised, exactly as the original's token counting did. Tokens with an empty span (BOS) never are,
    nor is the "▁" a legacy tokenizer inserts after `</s>` (its span is the next turn's first character).
    Decoding a supervised run gives the answer and its closing `</s>` (the LLaMA decoder drops the
    leading space). Offsets are non-decreasing, so one pass suffices.
    """
    mask = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(end > start and k < len(spans) and start < spans[k][1] and end > spans[k][0])
    return mask


def _sample_name(sample_ids: Optional[Sequence[Any]], index: int) -> str:
    if sample_ids is not None and index < len(sample_ids):
        return str(sample_ids[index])
    return f"sources[{index}]"


def _tokenize_sample(
    prompt: str, spans: Sequence[Span], tokenizer: Any, has_image: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, offsets = tokenize_with_offsets(prompt, tokenizer, has_image)
    mask = supervised_mask(offsets, spans)
    labels = [i if keep and i != IMAGE_TOKEN_INDEX else IGNORE_INDEX for i, keep in zip(ids, mask)]
    max_length = tokenizer.model_max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        logger.warning(
            "sample %s: no supervised token left (%d tokens, model_max_length %d); it contributes no loss",
            name,
            len(ids),
            max_length,
        )
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def preprocess(
    sources: Sequence[Sequence[dict[str, Any]]],
    tokenizer: Any,
    has_image: bool = False,
    sample_ids: Optional[Sequence[Any]] = None,
) -> dict[str, list[torch.Tensor]]:
    """Turn conversations into input_ids and labels with the current `default_conversation` template.

    `sources` is a list of conversations (lists of {"from", "value"} turns); `sample_ids` (optional, same
    order) name them in errors and warnings. Only answers and their closing separator are supervised;
    sequences are cut to `tokenizer.model_max_length`. A sample left with no supervised token is logged
    and kept with all labels IGNORE_INDEX.
    """
    conv = conversation_lib.default_conversation
    if conv.sep_style == SeparatorStyle.PLAIN:
        build, has_image = build_plain_prompt, True
    elif conv.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2, SeparatorStyle.MPT):
        build = build_conversation_prompt
    else:
        raise ValueError(f"training with the {conv.sep_style.name} template ({conv.version!r}) is not supported")
    input_ids, labels = [], []
    for index, source in enumerate(sources):
        name = _sample_name(sample_ids, index)
        prompt, spans = build(source, conv, name)
        ids, targets = _tokenize_sample(prompt, spans, tokenizer, has_image, name)
        input_ids.append(ids)
        labels.append(targets)
    return dict(input_ids=input_ids, labels=labels)


# ---------------------------------------------------------------------------------------------------
# Dataset, collator


def _sample_id(sample: Any, index: int) -> str:
    if isinstance(sample, dict) and "id" in sample:
        return str(sample["id"])
    return f"#{index}"


def load_samples(data_path: str) -> list[dict[str, Any]]:
    """Read and check the training JSON up front, so bad data fails before training, naming where."""
    try:
        with open(data_path, encoding="utf-8") as f:
            samples = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{data_path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(samples, list):
        raise ValueError(f"{data_path}: the top level must be a JSON list of samples, not {type(samples).__name__}")
    for index, sample in enumerate(samples):
        where = f"{data_path}: item {index} (id {_sample_id(sample, index)})"
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise ValueError(f"{where} has no 'conversations' list")
        for j, turn in enumerate(sample["conversations"]):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ValueError(f"{where}: turn {j} needs a 'from' and a string 'value'")
        conversation_turns(sample["conversations"], f"{_sample_id(sample, index)} (item {index} of {data_path})")
        if "image" in sample and not isinstance(sample["image"], str):
            raise ValueError(f"{where}: 'image' must be a path string")
    return samples


def _word_count(sample: dict[str, Any]) -> int:
    return sum(len(turn["value"].split()) for turn in sample["conversations"])


class LazySupervisedDataset(Dataset):
    """LLaVA's training samples, turned into tensors one at a time (as the original's lazy mode).

    With `data_args.skip_bad_samples`, a sample whose image is missing or unreadable is logged, its id
    appended to `skipped` (per process: each DataLoader worker keeps its own list) and the next sample
    is returned instead.
    """

    def __init__(self, data_path: str, tokenizer: Any, data_args: DataArguments) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.data_args = data_args
        self.data_path = data_path
        self.list_data_dict = load_samples(data_path)
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.list_data_dict)

    @property
    def lengths(self) -> list[int]:
        """Rough lengths for length grouping: words, plus 128 for an image."""
        return [_word_count(s) + (128 if "image" in s else 0) for s in self.list_data_dict]

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, negative for text-only samples, so `group_by_modality_length` can tell them apart."""
        return [_word_count(s) if "image" in s else -_word_count(s) for s in self.list_data_dict]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.data_args.skip_bad_samples:
            return self._get_sample(i)
        for attempt in range(len(self)):
            index = (i + attempt) % len(self)
            try:
                return self._get_sample(index)
            except (FileNotFoundError, UnreadableImageError) as err:
                sample_id = _sample_id(self.list_data_dict[index], index)
                self.skipped.append(sample_id)
                logger.warning("skipping sample %s (%d skipped so far): %s", sample_id, len(self.skipped), err)
        raise RuntimeError(f"{self.data_path}: no sample has a readable image")

    def _get_sample(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.list_data_dict[i]
        sample_id = _sample_id(sample, i)
        sources = copy.deepcopy([sample["conversations"]])
        has_image = "image" in sample
        if has_image:
            image = self._load_image(sample["image"], sample_id)
            sources = preprocess_multimodal(sources, self.data_args)
        data = preprocess(sources, self.tokenizer, has_image=has_image, sample_ids=[sample_id])
        item = dict(input_ids=data["input_ids"][0], labels=data["labels"][0])
        if has_image:
            item["image"] = image
        elif self.data_args.is_multimodal:
            # Text-only samples still go through the vision tower so every rank runs the same modules.
            crop_size = self._processor().crop_size
            item["image"] = torch.zeros(3, crop_size["height"], crop_size["width"])
        return item

    def _processor(self) -> Any:
        processor = getattr(self.data_args, "image_processor", None)
        if processor is None:
            raise ValueError("data_args.image_processor is not set (the trainer takes it from the vision tower)")
        return processor

    def _image_path(self, image_file: str, sample_id: str) -> str:
        """`image_folder/image_file`, refusing paths that leave the folder.

        The check is lexical (no symlink resolution): image folders are often symlinks to dataset disks.
        """
        folder = self.data_args.image_folder
        if folder is None:
            raise ValueError(f"sample {sample_id} has image {image_file!r} but no --image_folder was given")
        root = os.path.normpath(os.path.abspath(folder))
        path = os.path.normpath(os.path.join(root, image_file))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"sample {sample_id}: image path {image_file!r} leads outside image_folder {folder!r}")
        return path

    def _load_image(self, image_file: str, sample_id: str) -> torch.Tensor:
        path = self._image_path(image_file, sample_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sample {sample_id}: image {image_file!r} not found (file {path})")
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UnreadableImageError(
                f"sample {sample_id}: image {image_file!r} is unreadable (file {path}): {err}"
            ) from err
        processor = self._processor()
        if self.data_args.image_aspect_ratio == "pad":
            # int() truncates the mean colour, as LLaVA-1.5 did.
            image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
        return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads a batch: input_ids with the pad id, labels with IGNORE_INDEX; stacks images."""

    tokenizer: Any

    def __call__(self, instances: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError(
                "the tokenizer has no pad token; LLaVA pads LLaMA with <unk> "
                "(tokenizer.pad_token = tokenizer.unk_token)"
            )
        max_length = self.tokenizer.model_max_length
        input_ids = [instance["input_ids"][:max_length] for instance in instances]
        labels = [instance["labels"][:max_length] for instance in instances]
        lengths = torch.tensor([len(ids) for ids in input_ids])
        padded_ids = torch.nn.utils.rnn.pad_sequence(input_ids, batch_first=True, padding_value=pad_id)
        batch: dict[str, Any] = dict(
            input_ids=padded_ids,
            labels=torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
            # From the lengths, not `input_ids != pad`: pad is <unk>, and a real <unk> must stay attended.
            attention_mask=torch.arange(padded_ids.shape[1])[None, :] < lengths[:, None],
        )
        if any("image" in instance for instance in instances):
            images = [instance.get("image") for instance in instances]
            same_shape = all(x is not None and x.shape == images[0].shape for x in images)
            batch["images"] = torch.stack(images) if same_shape else images
        return batch


def make_supervised_data_module(tokenizer: Any, data_args: DataArguments) -> dict[str, Any]:
    """Dataset and collator for the Trainer (always lazy, as LLaVA-1.5 trained; no eval set)."""
    train_dataset = LazySupervisedDataset(data_path=data_args.data_path, tokenizer=tokenizer, data_args=data_args)
    return dict(
        train_dataset=train_dataset,
        eval_dataset=None,
        data_collator=DataCollatorForSupervisedDataset(tokenizer=tokenizer),
    )
