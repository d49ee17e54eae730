"""The one generation loop behind every benchmark: batched, left-padded, resumable.

Each benchmark script only turns its question file into ``Request``s (a prompt already formatted
with the conversation template, its images, the fields its answers file records) and calls
``run_generation``, which appends one JSON line per question to the answers file and flushes it.

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

import argparse
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import shortuuid
import torch
from PIL import Image
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava.conversation import Conversation, SeparatorStyle, conv_templates
from llava.mm_utils import KeywordsStoppingCriteria, get_model_name_from_path, process_images, tokenizer_image_token

logger = logging.getLogger(__name__)

T = TypeVar("T")
ImageSource = Image.Image | Callable[[], Image.Image]
AnswerKey = tuple[Any, Any]
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


# ----------------------------------------------------------------------------- chunks


def split_list(items: Sequence[T], n: int) -> list[Sequence[T]]:
    """Split into contiguous chunks of ceil(len / n) items, as the seed did (the last may be short)."""
    chunk_size = math.ceil(len(items) / n)
    if chunk_size == 0:
        return [items[0:0]]
    return [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]


def get_chunk(items: Sequence[T], n: int, k: int) -> Sequence[T]:
    """Chunk ``k`` of ``n`` (the seed's get_chunk); a chunk index past the last chunk gets nothing."""
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--chunk-idx {k} is not in [0, --num-chunks {n}).")
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else items[0:0]


# ----------------------------------------------------------------------------- input files


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL question file; a bad line is reported with its file and number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Question file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
            records.append(record)
    return records


def check_images_exist(images: Iterable[tuple[Any, str]]) -> None:
    """Fail before generation if any (question_id, image path) is missing, naming them and the count."""
    missing = [(qid, path) for qid, path in images if not os.path.isfile(path)]
    if not missing:
        return
    shown = "\n".join(f"  question {qid!r}: {path}" for qid, path in missing[:10])
    more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise FileNotFoundError(f"{len(missing)} image(s) not found (check --image-folder):\n{shown}{more}")


def open_rgb(path: str) -> Image.Image:
    """An image file as RGB, read fully so no file handle stays open."""
    with Image.open(path) as image:
        return image.convert("RGB")


def open_as_is(path: str) -> Image.Image:
    """An image file in its own mode (the seed's ScienceQA script left conversion to the processor)."""
    with Image.open(path) as image:
        image.load()
        return image.copy()


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


# ----------------------------------------------------------------------------- answers file


def read_answered(path: Path) -> dict[AnswerKey, list[Any]]:
    """Prompts already answered in ``path``, per (question_id, round_id), in file order.

    A last line without its newline was cut by a killed run: it is removed from the file, so the
    question is answered again and appears once.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning(
            "%s: dropping a partly written last line (%d bytes) left by an interrupted run", path, len(data) - keep
        )
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    answered: dict[AnswerKey, list[Any]] = defaultdict(list)
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Answers file {path}, line {number}: not valid JSON ({err.msg}); fix or remove the file."
            ) from None
        if not isinstance(record, dict) or "question_id" not in record:
            raise ValueError(f"Answers file {path}, line {number}: not an answer line (no question_id).")
        answered[(record["question_id"], record.get("round_id"))].append(record.get("prompt"))
    return answered


def pending_requests(requests: Sequence[Request], answered: dict[AnswerKey, list[Any]], path: Path) -> list[Request]:
    """The requests still to answer; the n-th request of a key is done if the file has n answers for it.

    Counting (not a set) keeps questions that share an id apart (TextVQA's ids are image ids).
    """
    seen: Counter[AnswerKey] = Counter()
    todo = []
    for request in requests:
        done = answered.get(request.key, [])
        index = seen[request.key]
        seen[request.key] += 1
        if index >= len(done):
            todo.append(request)
        elif done[index] is not None and done[index] != request.recorded_prompt:
            raise ValueError(
                f"Answers file {path} answers question {request.question_id!r} for another prompt "
                f"({done[index]!r} instead of {request.recorded_prompt!r}): it was written for other questions "
                "or flags; remove it or choose another --answers-file."
            )
    return todo


def answer_line(request: Request, text: str, model_id: str) -> dict[str, Any]:
    """One answers-file record, keys in the seed's order."""
    line: dict[str, Any] = {"question_id": request.question_id}
    if request.round_id is not None:
        line["round_id"] = request.round_id
    line["prompt"] = request.recorded_prompt
    line["text"] = text
    line.update(request.extra)
    line.update({"answer_id": shortuuid.uuid(), "model_id": model_id, "metadata": {}})
    return line


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
    model: Any, tokenizer: Any, batch: _Batch, settings: GenerationSettings, record_gaps: bool
) -> tuple[list[str], list[float] | None]:
    """Texts of one batch and, if asked, each row's smallest top-1/top-2 logit gap."""
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
) -> RunSummary:
    """Answer every request not yet in ``answers_file``, appending and flushing one line per answer."""
    validate_requests(requests)
    path = Path(answers_file).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    todo = pending_requests(requests, read_answered(path), path)
    done = len(requests) - len(todo)
    logger.info(
        "%d question(s), %d already answered in %s, %d to generate at batch size %d on %s (%s)",
        len(requests), done, path, len(todo), batch_size, model.device, str(model.dtype).removeprefix("torch."),
    )
    generator = Generator(model, tokenizer, image_processor, settings, batch_size, preprocessing)
    with path.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc=path.name, unit="q") as bar:
        for request, text in generator.answer(todo):
            out.write(json.dumps(answer_line(request, text, model_id)) + "\n")
            out.flush()
            bar.update(1)
    if generator.reruns:
        logger.info("%d near-tie answer(s) were generated again at batch size 1", generator.reruns)
    return RunSummary(len(requests), done, len(todo), generator.reruns)


# ----------------------------------------------------------------------------- command lines


def add_model_arguments(parser: argparse.ArgumentParser, conv_mode: str | None) -> None:
    parser.add_argument("--model-path", type=str, default="facebook/opt-350m")
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--conv-mode", type=str, default=conv_mode, choices=sorted(conv_templates))
    parser.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument(
        "--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
        help="auto: float16 on GPU, float32 on CPU",
    )


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, batch_size: int | None = 8) -> None:
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    defaults = ", ".join(f"{str(t).removeprefix('torch.')} {margin:g}" for t, margin in DEFAULT_TIE_MARGINS.items())
    parser.add_argument(
        "--tie-margin", type=float, default=None,
        help=f"greedy rows whose top-2 logits come closer than this are answered again alone "
        f"(default by dtype: {defaults}; 0 turns the check off)",
    )
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size)


def add_chunk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)


def settings_from_args(args: argparse.Namespace, stop_str: str | None) -> GenerationSettings:
    return GenerationSettings(
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        stop_str=stop_str,
        tie_margin=args.tie_margin,
    )


def resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


@dataclass
class LoadedModel:
    tokenizer: Any
    model: Any
    image_processor: Any
    name: str


def load_model(args: argparse.Namespace) -> LoadedModel:
    """Load ``--model-path`` (and ``--model-base``) on ``--device`` in ``--dtype``."""
    from llava.model.builder import load_pretrained_model

    model_path = os.path.expanduser(args.model_path)
    name = get_model_name_from_path(model_path)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    logger.info("Loading %s on %s (%s)", model_path, device, str(dtype).removeprefix("torch."))
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, args.model_base, name, device=device, torch_dtype=dtype
    )
    return LoadedModel(tokenizer, model, image_processor, name)


def mmtag_conv_mode(conv_mode: str, model_name: str) -> str:
    """The seed switched stage-1 ("plain") models to the mmtag template unless they were fine-tuned."""
    if "plain" not in model_name or "finetune" in model_name.lower() or "mmtag" in conv_mode:
        return conv_mode
    switched = conv_mode + "_mmtag"
    if switched not in conv_templates:
        logger.warning("%s looks like a plain (stage-1) model, but there is no %s template", model_name, switched)
        return conv_mode
    logger.warning("%s looks like a plain (stage-1) model: switching to the %s template", model_name, switched)
    return switched


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
