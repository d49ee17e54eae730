"""The one generation loop behind every benchmark: batched, left-padded, resumable.

Each benchmark script only turns its question file into ``Request``s (a prompt already formatted
with the conversation template, its images, the fields its answers file records); ``llava.eval.cli``
loads the model and calls ``run_generation``, which appends one JSON line per question to the
answers file (``llava.eval.answers_file``) and flushes it.

Batching must not change answers: greedy decoding (temperature 0) gives the same answers as batch
size 1. Left padding with an attention mask (positions follow the mask) makes every row compute
what it would alone, up to rounding: a matmul over B rows does not add up in the same order as
over one row, so logits differ in the last bits even for equal-length rows (equal-length buckets
do not remove it). Such a difference can only flip an argmax whose top two logits are closer than
it, so each batched row records its smallest top-1/top-2 gap, and a row whose gap fell under
``tie_margin`` is generated again at batch size 1. The margin bounds the rounding batching causes
for the model's dtype (``DEFAULT_TIE_MARGINS``); ``--tie-margin 0`` turns the check off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from PIL import Image
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava.conversation import Conversation, SeparatorStyle, conv_templates
from llava.eval import answers_file as answers_file_io
from llava.mm_utils import KeywordsStoppingCriteria, process_images, to_rgb, tokenizer_image_token

logger = logging.getLogger(__name__)

T = TypeVar("T")
ImageSource = Image.Image | Callable[[], Image.Image]
AnswerKey = answers_file_io.AnswerKey
Preprocessing = Literal["model", "plain"]

# Smallest top-1/top-2 logit gap trusted not to flip under batching, per compute dtype. Batched and
# single rows differ by ~1e-6 in fp32 (measured on CPU). The half-precision margins are estimates, not
# measurements: fp16 rounds logits of magnitude 16-32 to 2^-6 and bf16 to 2^-3, and batched kernels
# may differ by several such steps; ``--tie-margin`` sets another bound.
DEFAULT_TIE_MARGINS = {torch.float32: 1e-4, torch.float16: 0.25, torch.bfloat16: 1.0}


@dataclass
class Request:
    """One question to answer.

    ``prompt`` is the full templated prompt with one ``<image>`` tag per image; ``recorded_prompt``
    is what the answers file records as "prompt" (the seed records the question, not the template).
    ``images`` are PIL images or zero-argument loaders, so large benchmarks load them per batch.
    """

    question_id: Any
    prompt: str
    recorded_prompt: str
    images: Sequence[ImageSource] = ()
    round_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> AnswerKey:
        return (self.question_id, self.round_id)


@dataclass(frozen=True)
class GenerationSettings:
    """The seed's sampling flags plus the template's stop string."""

    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    max_new_tokens: int = 128
    stop_str: str | None = None
    tie_margin: float | None = None  # None: DEFAULT_TIE_MARGINS for the model's dtype

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and self.num_beams == 1


@dataclass
class RunSummary:
    total: int
    already_answered: int
    generated: int
    rerun_at_batch_one: int


# ----------------------------------------------------------------------------- prompts and images


def open_rgb(path: str) -> Image.Image:
    """An image file as RGB (``to_rgb``), read fully so no file handle stays open. ScienceQA's too: the
    seed's script left the conversion to the CLIP processor, which in its transformers 4.31 was PIL's."""
    with Image.open(path) as image:
        return to_rgb(image)


def image_prompt(question: str, model_config: Any) -> str:
    """The question behind the image tag(s), as the seed wrote them (with start/end tags if trained so)."""
    if getattr(model_config, "mm_use_im_start_end", False):
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + question
    return DEFAULT_IMAGE_TOKEN + "\n" + question


def templated_prompt(conv_mode: str, user_message: str) -> str:
    """The full prompt: the template's system text, the user turn, and an open assistant turn."""
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], user_message)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def stop_str_for(conv_mode: str) -> str:
    """The string that ends an answer: the template's closing separator (as the seed chose it)."""
    conv: Conversation = conv_templates[conv_mode]
    return conv.sep2 if conv.sep_style == SeparatorStyle.TWO else conv.sep


# ----------------------------------------------------------------------------- batches


@dataclass
class _Batch:
    requests: list[Request]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: torch.Tensor | None


def pad_id_of(tokenizer: Any) -> int:
    """Left-padding id: the tokenizer's pad token, else unk (LLaMA has no pad), else eos."""
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("The tokenizer has no pad, unk or eos token to pad batches with.")


def preprocess_images(
    images: list[Image.Image], image_processor: Any, model_config: Any, preprocessing: Preprocessing
) -> torch.Tensor:
    """Pixel tensors [n, 3, H, W]: "model" follows model_config (pad for LLaVA-1.5), "plain" is the bare processor."""
    if preprocessing == "plain":
        return image_processor(images, return_tensors="pt")["pixel_values"]
    pixels = process_images(images, image_processor, model_config)
    return pixels if isinstance(pixels, torch.Tensor) else torch.stack(pixels)


def _load_pixels(
    request: Request, image_processor: Any, model_config: Any, preprocessing: Preprocessing
) -> torch.Tensor | None:
    if not request.images:
        return None
    try:
        images = [source() if callable(source) else source for source in request.images]
    except Exception as err:
        raise RuntimeError(f"Question {request.question_id!r}: cannot read its image: {err}") from err
    return preprocess_images(images, image_processor, model_config, preprocessing)


def _left_padded(ids: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, longest - len(x) :] = x
        attention_mask[row, longest - len(x) :] = 1
    return input_ids, attention_mask


def _assemble(requests: list[Request], pixels: list[torch.Tensor | None], tokenizer: Any) -> _Batch:
    """Left-padded token ids and the batch's images in splicing order.

    The model takes one image per ``<image>`` tag, and one (unused) image for a row without tags, so
    text-only rows get a zero image when any row of the batch has images.
    """
    ids = [tokenizer_image_token(r.prompt, tokenizer, return_tensors="pt") for r in requests]
    input_ids, attention_mask = _left_padded(ids, pad_id_of(tokenizer))
    present = [p for p in pixels if p is not None]
    images = None
    if present:
        blank = torch.zeros_like(present[0][:1])
        images = torch.cat([blank if p is None else p for p in pixels])
    return _Batch(requests, input_ids, attention_mask, images)


class _GapRecorder(LogitsProcessor):
    """Records, per step and row, the gap between the two largest logits (what greedy decides on)."""

    def __init__(self) -> None:
        self.gaps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top2 = scores.topk(2, dim=-1).values
        self.gaps.append(top2[:, 0] - top2[:, 1])
        return scores


def _row_min_gaps(gaps: list[torch.Tensor], output_ids: torch.Tensor, eos_id: int | None) -> list[float]:
    """Each row's smallest gap over the steps up to its end (its first eos); later steps do not count."""
    table = torch.stack(gaps, dim=1).float().cpu()
    result = []
    for row, ids in enumerate(output_ids.tolist()):
        steps = len(ids)
        if eos_id is not None and eos_id in ids:
            steps = ids.index(eos_id) + 1
        result.append(float(table[row, : max(steps, 1)].min()))
    return result


def decode_answer(ids: list[int], tokenizer: Any, stop_str: str | None) -> str:
    """Answer text: tokens before the first eos, special tokens skipped, cut at the stop string, stripped."""
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if stop_str and stop_str in text:
        text = text[: text.index(stop_str)]
    return text.strip()


def _generate_batch(
    model: Any, tokenizer: Any, batch: _Batch, settings: GenerationSettings, record_gaps: bool, streamer: Any = None
) -> tuple[list[str], list[float] | None]:
    """Texts of one batch and, if asked, each row's smallest top-1/top-2 logit gap; a ``streamer``
    (transformers' TextStreamer protocol, batch size 1) is handed the tokens as they are generated."""
    device = model.device
    rows = batch.input_ids.shape[0]
    kwargs: dict[str, Any] = {
        "do_sample": settings.temperature > 0,
        "num_beams": settings.num_beams,
        "max_new_tokens": settings.max_new_tokens,
        "use_cache": True,
        "pad_token_id": pad_id_of(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }
    if settings.temperature > 0:
        kwargs.update(temperature=settings.temperature, top_p=1.0 if settings.top_p is None else settings.top_p)
    if settings.stop_str and settings.stop_str != tokenizer.eos_token:
        # generate() hands the criteria only the new tokens (the prompt goes in as embeddings).
        start = torch.empty((rows, 0), dtype=torch.long)
        criteria = KeywordsStoppingCriteria([settings.stop_str], tokenizer, start)
        kwargs["stopping_criteria"] = StoppingCriteriaList([criteria])
    recorder = _GapRecorder() if record_gaps else None
    if recorder is not None:
        kwargs["logits_processor"] = LogitsProcessorList([recorder])
    if streamer is not None:
        kwargs["streamer"] = streamer
    images = None if batch.images is None else batch.images.to(device=device, dtype=model.dtype)
    with torch.inference_mode():
        output_ids = model.generate(
            batch.input_ids.to(device), images=images, attention_mask=batch.attention_mask.to(device), **kwargs
        )
    texts = [decode_answer(ids, tokenizer, settings.stop_str) for ids in output_ids.tolist()]
    gaps = None
    if recorder is not None and recorder.gaps:
        gaps = _row_min_gaps(recorder.gaps, output_ids, tokenizer.eos_token_id)
    return texts, gaps


def _batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _one_ahead(items: Iterator[T]) -> Iterator[T]:
    """Yield each item once the next one has been produced, so its background work is already queued."""
    previous: list[T] = []
    for item in items:
        if previous:
            yield previous.pop()
        previous.append(item)
    yield from previous


def validate_requests(requests: Sequence[Request]) -> None:
    """Every request must bring exactly one image per ``<image>`` tag (else images would shift rows)."""
    for request in requests:
        tags = request.prompt.count(DEFAULT_IMAGE_TOKEN)
        if tags != len(request.images):
            raise ValueError(
                f"Question {request.question_id!r}: the prompt has {tags} {DEFAULT_IMAGE_TOKEN} tag(s) "
                f"but {len(request.images)} image(s) were given."
            )


def tie_margin_for(settings: GenerationSettings, dtype: torch.dtype) -> float:
    if settings.tie_margin is not None:
        return settings.tie_margin
    return DEFAULT_TIE_MARGINS.get(dtype, DEFAULT_TIE_MARGINS[torch.float16])


class Generator:
    """Answers requests in batches; greedy answers equal those of batch size 1 (see module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        settings: GenerationSettings,
        batch_size: int = 8,
        preprocessing: Preprocessing = "model",
        image_workers: int = 4,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        self.image_workers = image_workers
        self.tie_margin = tie_margin_for(settings, model.dtype)
        self.reruns = 0

    def answer(self, requests: Sequence[Request]) -> Iterator[tuple[Request, str]]:
        """(request, answer text) in request order; images load in background threads a batch ahead."""
        validate_requests(requests)
        with ThreadPoolExecutor(max_workers=self.image_workers) as pool:
            batches = _batches(requests, self.batch_size)
            jobs = ((batch, [pool.submit(self._pixels, r) for r in batch]) for batch in batches)
            for batch, futures in _one_ahead(jobs):
                yield from zip(batch, self._answer_batch(batch, futures))

    def _pixels(self, request: Request) -> torch.Tensor | None:
        return _load_pixels(request, self.image_processor, self.model.config, self.preprocessing)

    def _answer_batch(self, requests: list[Request], futures: list[Future]) -> list[str]:
        batch = _assemble(requests, [f.result() for f in futures], self.tokenizer)
        check = self.settings.greedy and len(requests) > 1 and self.tie_margin > 0
        texts, gaps = _generate_batch(self.model, self.tokenizer, batch, self.settings, record_gaps=check)
        for row, gap in enumerate(gaps or []):
            if gap < self.tie_margin:
                texts[row] = self._answer_alone(requests[row], gap)
        return texts

    def _answer_alone(self, request: Request, gap: float) -> str:
        logger.debug(
            "Question %r: top-2 logit gap %.3g < %.3g, answering it alone", request.question_id, gap, self.tie_margin
        )
        self.reruns += 1
        single = _assemble([request], [self._pixels(request)], self.tokenizer)
        return _generate_batch(self.model, self.tokenizer, single, self.settings, record_gaps=False)[0][0]


def generate_one(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    request: Request,
    settings: GenerationSettings,
    streamer: Any = None,
    preprocessing: Preprocessing = "model",
) -> str:
    """One request alone (a chat turn), its tokens optionally streamed: the same path as a benchmark's
    batch of one, so a greedy chat answer equals the evaluation loop's for the same prompt."""
    validate_requests([request])
    pixels = _load_pixels(request, image_processor, model.config, preprocessing)
    batch = _assemble([request], [pixels], tokenizer)
    return _generate_batch(model, tokenizer, batch, settings, record_gaps=False, streamer=streamer)[0][0]


def run_generation(
    requests: Sequence[Request],
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    settings: GenerationSettings,
    answers_file: str | os.PathLike,
    model_id: str,
    batch_size: int = 8,
    preprocessing: Preprocessing = "model",
    run_info: dict[str, Any] | None = None,
) -> RunSummary:
    """Answer every request not yet in ``answers_file``, appending and flushing one line per answer.

    ``run_info`` (e.g. ``{"dora_magnitudes": "weight_norm"}``) goes into each line's "metadata"; answers
    already in the file that were made under other settings stop the run (``answers_file``).
    """
    validate_requests(requests)
    run_info = dict(run_info or {})
    path = Path(answers_file).expanduser()
    answered = answers_file_io.read_answered(path)
    answers_file_io.check_run_settings(answered, run_info, path)
    todo = answers_file_io.pending_requests(requests, answered, path)
    done = len(requests) - len(todo)
    logger.info(
        "%d question(s), %d already answered in %s, %d to generate at batch size %d on %s (%s)",
        len(requests), done, path, len(todo), batch_size, model.device, str(model.dtype).removeprefix("torch."),
    )
    generator = Generator(model, tokenizer, image_processor, settings, batch_size, preprocessing)
    with answers_file_io.appending(path) as out, tqdm(total=len(todo), desc=path.name, unit="q") as bar:
        for request, text in generator.answer(todo):
            answers_file_io.write_answer(out, answers_file_io.answer_line(request, text, model_id, run_info))
            bar.update(1)
    if generator.reruns:
        logger.info("%d near-tie answer(s) were generated again at batch size 1", generator.reruns)
    return RunSummary(len(requests), done, len(todo), generator.reruns)
