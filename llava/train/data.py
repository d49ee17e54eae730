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
* Bad data fails before training, not when its batch comes: the whole data file is checked when the
  dataset is built (structure, `<image>` tag against `image` field, every image file present), and
  every problem is reported at once with file, item index and id. With `skip_bad_samples` the bad
  items are dropped with a warning instead; an image that exists but fails to decode is still found
  only when loaded, and is then named the same way (or skipped).
* A sample with no supervised token left (truncated away, empty answers) is logged by id and kept with
  all labels IGNORE_INDEX; the model must return a zero loss for a batch without targets.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

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
from llava.mm_utils import expand2square, to_rgb

logger = logging.getLogger(__name__)

Span = tuple[int, int]

_ROLE_INDEX = {"human": 0, "gpt": 1}

# How many bad items an error lists, and how many a --skip_bad_samples warning names.
LISTED_PROBLEMS = 20
NAMED_DROPS = 5
SKIP_HINT = "pass --skip_bad_samples to drop such samples"


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
            "help": "Drop samples that fail the checks before training (missing image, <image> tag and 'image' "
            "field disagreeing, empty or malformed conversation) with a warning, and skip samples whose image "
            "fails to decode during training (ids kept in the dataset's `skipped` list), instead of stopping."
        },
    )


class UnreadableImageError(ValueError):
    """An image file exists but cannot be decoded; skippable with `skip_bad_samples`."""


class BadSamplesError(ValueError):
    """The data file has items that would stop or silently spoil training; raised before training starts."""


@dataclass(frozen=True)
class SampleProblem:
    """One bad item of the data file: where it is (index in the file, id), what kind, what is wrong."""

    index: int
    sample_id: str
    kind: str
    message: str

    def describe(self) -> str:
        return f"item {self.index} (id {self.sample_id}): {self.message}"


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


def _normalised_turns(source: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    """(speaker, text) pairs after LLaVA's rules; ValueError saying what is wrong (without naming the sample)."""
    first = 1 if source and source[0].get("from") != "human" else 0
    result = []
    for j, turn in enumerate(source[first:]):
        speaker = _ROLE_INDEX.get(turn.get("from"))
        if speaker is None:
            raise ValueError(f"turn {first + j} is from {turn.get('from')!r}; expected 'human' or 'gpt'")
        if speaker != j % 2:
            expected = "human" if j % 2 == 0 else "gpt"
            raise ValueError(
                f"roles must alternate human/gpt, but turn {first + j} is from {turn['from']!r} "
                f"where {expected!r} was expected"
            )
        result.append((speaker, turn["value"]))
    return result


def conversation_turns(source: Sequence[dict[str, Any]], name: str) -> list[tuple[int, str]]:
    """(speaker, text) pairs, speaker 0 = human, 1 = gpt, after LLaVA's rules.

    A first turn not from "human" is dropped (as the original did); the rest must alternate
    human/gpt. Raises ValueError naming the sample otherwise, instead of the original's bare assert.
    """
    try:
        return _normalised_turns(source)
    except ValueError as err:
        raise ValueError(f"sample {name}: {err}") from None


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


def load_samples(data_path: str) -> list[Any]:
    """Read the training JSON, naming the file and the place when it is malformed (items: `check_samples`)."""
    try:
        with open(data_path, encoding="utf-8") as f:
            samples = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{data_path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(samples, list):
        raise ValueError(f"{data_path}: the top level must be a JSON list of samples, not {type(samples).__name__}")
    return samples


# ---------------------------------------------------------------------------------------------------
# Checks over the whole data file, before training


def _checked_turns(sample: Any) -> list[tuple[int, str]]:
    """The item's turns as training reads them; ValueError saying why it cannot be trained on."""
    if not isinstance(sample, dict):
        raise ValueError(f"is a JSON {type(sample).__name__}, not an object with 'conversations'")
    conversations = sample.get("conversations")
    if conversations is None:
        raise ValueError("has no 'conversations'; it needs a list of {'from', 'value'} turns")
    if not isinstance(conversations, list):
        kind = type(conversations).__name__
        raise ValueError(f"'conversations' is a {kind}, not a list of {{'from', 'value'}} turns")
    if not conversations:
        raise ValueError("'conversations' is empty; it needs a human turn and a gpt answer")
    for j, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise ValueError(f"turn {j} must be an object with a string 'from' and a string 'value'")
    turns = _normalised_turns(conversations)
    if not any(speaker == 1 and text.strip() for speaker, text in turns):
        raise ValueError(
            "no non-empty 'gpt' answer after the human turn (a first turn not from 'human' is dropped): "
            "nothing to train on"
        )
    return turns


def _image_tag_problem(sample: dict[str, Any], turns: Sequence[tuple[int, str]]) -> Optional[str]:
    """Why the `<image>` tags (in the turns trained on) and the `image` field disagree, or None.

    LLaVA-1.5 splices one image where its single tag stands in a human turn (in mix665k: the first turn of
    every image sample; text-only samples have no tag). A tag without an image would be trained as plain
    text, an image without a tag would be loaded and never seen, a second tag has no image to take.
    """
    tag = DEFAULT_IMAGE_TOKEN
    tags = [(speaker, text.count(tag)) for speaker, text in turns]
    count = sum(n for _, n in tags)
    if "image" not in sample:
        if count:
            return f"{count} {tag} tag(s) in its conversation but no 'image' field; add the image or remove the tag"
        return None
    if count != 1:
        return f"has an 'image' but {count} {tag} tags; it needs exactly one, in the human turn that shows the image"
    if any(speaker == 1 and n for speaker, n in tags):
        return f"its {tag} tag is in a 'gpt' answer; move it to the human turn that shows the image"
    return None


def sample_problem(sample: Any) -> Optional[tuple[str, str]]:
    """(kind, what is wrong) for one item, or None; everything that needs no file access."""
    try:
        turns = _checked_turns(sample)
    except ValueError as err:
        return "conversation", str(err)
    image = sample.get("image")
    if "image" in sample and (not isinstance(image, str) or not image.strip()):
        return "image path", f"'image' is {image!r}; it must be a path relative to --image_folder"
    message = _image_tag_problem(sample, turns)
    return None if message is None else ("<image> tag", message)


def _path_inside(root: str, image_file: str) -> Optional[str]:
    """The normalised path of `image_file` under `root` (a normalised absolute path), or None when it
    leads outside; lexical, as `os.path.join` reads it (an absolute path inside `root` is accepted)."""
    path = os.path.normpath(os.path.join(root, image_file))
    return path if path == root or path.startswith(os.path.join(root, "")) else None


def _missing_in_folder(folder: str, names: dict[str, str], root: str, image_folder: str) -> dict[str, str]:
    """{image path: why} for the `names` (file name -> image path) in `folder` that are not files there."""
    directory = _path_inside(root, folder)
    if directory is None:
        reason = f"leads outside --image_folder {image_folder}; image paths are relative to it"
        return {image_file: f"image path {image_file!r} {reason}" for image_file in names.values()}
    try:
        with os.scandir(directory) as entries:
            present = {entry.name for entry in entries if entry.name in names and entry.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        reason = f"there is no folder {folder!r} under --image_folder {image_folder}"
        return {image_file: f"image {image_file!r} not found: {reason}" for image_file in names.values()}
    except OSError:
        present = set()
    return {
        image_file: f"image {image_file!r} not found under --image_folder {image_folder}"
        for name, image_file in names.items()
        if name not in present and not os.path.isfile(os.path.join(directory, name))
    }


def missing_images(image_files: Iterable[str], image_folder: str) -> dict[str, str]:
    """{image path: why} for the paths that are not files under `image_folder`; no image is opened.

    Each folder is listed once, folders in parallel (listing is I/O bound), instead of one stat per image:
    665k images live in a handful of folders, and on a network file system a listing costs about as much
    as one stat. A name absent from its listing is stat-ed before it is reported (case-insensitive file
    systems, unusual names), so the listing only ever saves work.
    """
    root = os.path.normpath(os.path.abspath(image_folder))
    by_folder: dict[str, dict[str, str]] = {}
    for image_file in image_files:
        folder, slash, name = image_file.rpartition("/")
        by_folder.setdefault(folder or slash, {})[name] = image_file
    missing: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(by_folder)))) as pool:
        for found in pool.map(lambda item: _missing_in_folder(*item, root, image_folder), by_folder.items()):
            missing.update(found)
    return missing


def _check_image_folder(image_folder: Optional[str], data_path: str, image_samples: int) -> None:
    """Fail on what dropping samples cannot fix: images referenced but no folder to find them in."""
    if image_folder is None:
        raise ValueError(
            f"{data_path}: {image_samples} samples have an 'image' but no --image_folder was given; "
            "pass the folder their paths are relative to"
        )
    if not os.path.isdir(image_folder):
        raise ValueError(f"{data_path}: --image_folder {image_folder} is not a folder; {image_samples} samples need it")


def check_samples(samples: Sequence[Any], data_path: str, image_folder: Optional[str]) -> list[SampleProblem]:
    """Every bad item of the data file (at most one problem each, the first found), in file order.

    Runs before training so a bad item stops the run at once, not hours in when its batch comes: the
    conversation's shape, the `<image>` tag against the `image` field, and that each image file exists
    (stat only: decoding 665k images would take hours). Raises ValueError when images are referenced
    but there is no --image_folder to look in.
    """
    problems: list[SampleProblem] = []
    items_of_image: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        found = sample_problem(sample)
        if found is not None:
            problems.append(SampleProblem(index, _sample_id(sample, index), *found))
        elif "image" in sample:
            items_of_image.setdefault(sample["image"], []).append(index)
    if items_of_image:
        _check_image_folder(image_folder, data_path, sum(len(items) for items in items_of_image.values()))
        for image_file, reason in missing_images(items_of_image, image_folder).items():
            problems.extend(
                SampleProblem(i, _sample_id(samples[i], i), "image file", reason) for i in items_of_image[image_file]
            )
    return sorted(problems, key=lambda problem: problem.index)


def _kind_counts(problems: Sequence[SampleProblem]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in Counter(p.kind for p in problems).most_common())


def describe_problems(data_path: str, problems: Sequence[SampleProblem], total: int) -> str:
    """The error for a data file with bad items: counts by kind, then the first LISTED_PROBLEMS of them."""
    shown = problems[:LISTED_PROBLEMS]
    lines = [
        f"{data_path}: {len(problems)} of {total} samples are bad ({_kind_counts(problems)}). "
        f"Fix them in the data file (or fix --image_folder), or {SKIP_HINT} before training. "
        + ("They are:" if len(shown) == len(problems) else f"The first {len(shown)}:")
    ]
    lines += [f"  {problem.describe()}" for problem in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


def _word_count(sample: dict[str, Any]) -> int:
    return sum(len(turn["value"].split()) for turn in sample["conversations"])


class LazySupervisedDataset(Dataset):
    """LLaVA's training samples, turned into tensors one at a time (as the original's lazy mode).

    The whole data file is checked when the dataset is built (`check_samples`): bad items raise
    BadSamplesError, or with `data_args.skip_bad_samples` are dropped with a warning (kept in `dropped`).
    `item_indices` maps dataset positions back to items of the file, for messages. With
    `skip_bad_samples`, a sample whose image fails to load during training is logged, its id appended to
    `skipped` (per process: each DataLoader worker keeps its own list) and the next sample is returned.
    """

    def __init__(self, data_path: str, tokenizer: Any, data_args: DataArguments) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.data_args = data_args
        self.data_path = data_path
        self.list_data_dict, self.item_indices, self.dropped = self._checked_samples(load_samples(data_path))
        self.skipped: list[str] = []

    def _checked_samples(self, samples: list[Any]) -> tuple[list[dict[str, Any]], list[int], list[SampleProblem]]:
        """The good samples, their indices in the file, and the bad ones (raising unless skipping them)."""
        start = time.perf_counter()
        problems = check_samples(samples, self.data_path, self.data_args.image_folder)
        logger.info("%s: checked %d samples in %.1f s", self.data_path, len(samples), time.perf_counter() - start)
        if problems and not self.data_args.skip_bad_samples:
            raise BadSamplesError(describe_problems(self.data_path, problems, len(samples)))
        if problems:
            logger.warning(
                "%s: --skip_bad_samples: dropping %d of %d samples before training (%s), e.g. %s",
                self.data_path,
                len(problems),
                len(samples),
                _kind_counts(problems),
                "; ".join(problem.describe() for problem in problems[:NAMED_DROPS]),
            )
        bad = {problem.index for problem in problems}
        indices = [i for i in range(len(samples)) if i not in bad]
        if not indices:
            raise BadSamplesError(f"{self.data_path}: no sample to train on ({len(samples)} in the file, all dropped)")
        return [samples[i] for i in indices], indices, problems

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
                sample_id = _sample_id(self.list_data_dict[index], self.item_indices[index])
                self.skipped.append(sample_id)
                logger.warning("skipping sample %s (%d skipped so far): %s", sample_id, len(self.skipped), err)
        raise RuntimeError(f"{self.data_path}: no sample has a readable image")

    def _get_sample(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.list_data_dict[i]
        file_index = self.item_indices[i]
        sample_id = _sample_id(sample, file_index)
        where = f"{self.data_path}: item {file_index} (id {sample_id})"
        sources = copy.deepcopy([sample["conversations"]])
        has_image = "image" in sample
        if has_image:
            image = self._load_image(sample["image"], where)
            sources = preprocess_multimodal(sources, self.data_args)
        name = f"{sample_id} (item {file_index} of {self.data_path})"
        data = preprocess(sources, self.tokenizer, has_image=has_image, sample_ids=[name])
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

    def _image_path(self, image_file: str, where: str) -> str:
        """`image_folder/image_file`, refusing paths that leave the folder.

        The check is lexical (no symlink resolution): image folders are often symlinks to dataset disks.
        """
        folder = self.data_args.image_folder
        if folder is None:
            raise ValueError(f"{where} has image {image_file!r} but no --image_folder was given")
        path = _path_inside(os.path.normpath(os.path.abspath(folder)), image_file)
        if path is None:
            raise ValueError(f"{where}: image path {image_file!r} leads outside image_folder {folder!r}")
        return path

    def _skip_hint(self) -> str:
        return "" if self.data_args.skip_bad_samples else f"; {SKIP_HINT} (skipped when loaded)"

    def _load_image(self, image_file: str, where: str) -> torch.Tensor:
        path = self._image_path(image_file, where)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{where}: image {image_file!r} not found (file {path}); it was there when the data was checked"
                + self._skip_hint()
            )
        try:
            with Image.open(path) as opened:
                image = to_rgb(opened)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UnreadableImageError(
                f"{where}: image {image_file!r} cannot be decoded (file {path}): {err}; replace or remove the file"
                + self._skip_hint()
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
