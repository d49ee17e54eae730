"""A synthetic visual-instruction task in the real LLaVA-1.5 file formats, generated from a seed.

    python -m llava.demo.synthetic OUT_ROOT [--seed 0] [--train N] [--pretrain N] [--eval-per-benchmark M]

The tiny demo trains a LLaVA from scratch in minutes on CPUs with a random, frozen CLIP tower, so every
visual fact is coarse and global: a 64x64 image shows 1-3 copies of one large shape (4 kinds, 5 plain
colours, one per quadrant), one large centred shape, one big word (6 words in PIL's bitmap font,
scaled up), or unreadable noise / a blank frame. Questions ask for colour, shape, count, position,
the word or its length, or whether something is there; none needs to tell two different objects
apart. Every question type is in the training mix with exactly the wording of its benchmark's
question file, and answers are balanced per question type and cover every evaluation answer.

Written under OUT_ROOT:

    train/llava_demo_mix.json + train/images/     mix665k format (--data_path, --image_folder OUT_ROOT/train)
    pretrain/llava_demo_pretrain.json + images/   stage-1 caption pairs (LLaVA's pretrain format)
    text/corpus.txt                               every prompt / answer line, for the tiny tokenizer and LM
    text/llava_demo_text.json                     text-only chats (scene in words) for the LM's pretraining
    text/llava_demo_facts.json                    plain-text scene facts and worked answers, for the same
    eval/                                         laid out as ./playground/data/eval (README: Evaluation data)

Each part draws from its own random stream (seed, part), so training scenes differ from the evaluation
scenes and the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import base64
import csv
import functools
import io
import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from llava.conversation import conv_templates
from llava.eval.eval_mmbench import CIRCULAR_OFFSET

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Vocabulary and prompt wording

IMAGE_SIZE = 64
CELL = IMAGE_SIZE // 2
BACKGROUND = (255, 255, 255)
JPEG_OPTIONS = {"quality": 95, "subsampling": 0}
JITTER = 2
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
WORDS = ("go", "up", "bus", "cat", "stop", "taxi")
CELLS = {"top left": (0, 0), "top right": (CELL, 0), "bottom left": (0, CELL), "bottom right": (CELL, CELL)}
SIDES = ("left", "right")
HEIGHTS = ("top", "bottom")
COUNTS = ("1", "2", "3")
LETTERS = ("A", "B", "C", "D")
YES_NO = ("yes", "no")
UNANSWERABLE = "unanswerable"
NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}

SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE_LINE = "When the provided information is insufficient, respond with 'Unanswerable'."
OCR_PREFIX = "Reference OCR token: "
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
IMAGE_TAG = "<image>"
PRETRAIN_REQUESTS = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What is in the picture?",
    "Summarize the image in a few words.",
)
SQA_HINTS = ("", "Look at the shapes in the picture.")
MMBENCH_HINTS = ("", "The image shows shapes on a white background.")

BENCHMARKS = ("vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "pope", "mmbench")
MULTI_TURN = ("vqav2", "gqa")
POPE_CATEGORIES = ("adversarial", "popular", "random")
MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")
MAX_TRIES = 10_000


def stream(seed: int, *parts: str) -> random.Random:
    """An independent random stream per (seed, part): string seeds hash the same in every process."""
    return random.Random("/".join([str(seed), *parts]))


# ---------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Blob:
    """One large plain shape; `cell` is a quadrant name, or "middle" for a centred shape."""

    shape: str
    colour: str
    cell: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """What an image shows. kind: shapes | centred | words | noise | blank | none (text-only question)."""

    kind: str
    blobs: tuple[Blob, ...] = ()
    words: tuple[tuple[str, str, tuple[int, int]], ...] = ()  # (word, colour, top-left corner)
    seed: int = 0


def _box_in(rng: random.Random, x: int, y: int, span: int, low: int, high: int) -> tuple[int, int, int, int]:
    size = rng.randint(low, high)
    x0 = x + rng.randint(2, span - 2 - size)
    y0 = y + rng.randint(2, span - 2 - size)
    return (x0, y0, x0 + size, y0 + size)


def _copies(rng: random.Random, cells: Sequence[str]) -> tuple[Blob, ...]:
    """Copies of one shape in one colour, one per cell.

    One kind of object per image on purpose: a tiny language model trained from scratch for minutes
    learns to read global attributes (colour, shape, count, position) but not to bind attributes of
    different objects ("the colour of the circle, not of the square"), so no question needs that.
    """
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    return tuple(Blob(shape, colour, cell, _box_in(rng, *CELLS[cell], CELL, 24, 28)) for cell in cells)


def shapes_scene(rng: random.Random) -> Scene:
    """1-3 copies of a shape, one per quadrant."""
    return Scene("shapes", _copies(rng, sorted(rng.sample(sorted(CELLS), rng.randint(1, 3)))))


def single_scene(rng: random.Random) -> Scene:
    """One shape in one quadrant."""
    return Scene("shapes", _copies(rng, [rng.choice(sorted(CELLS))]))


def _near_centre(rng: random.Random, width: int, height: int) -> tuple[int, int]:
    """A top-left corner that centres a width x height box, give or take JITTER pixels.

    Large things stay near the middle: the random tower's patch features only tell shapes and glyphs
    apart quickly when they fall on about the same patches (a probe on frozen features learns a big
    shape placed anywhere to ~60% in 300 steps, placed like this to ~98%).
    """
    return ((IMAGE_SIZE - width) // 2 + rng.randint(-JITTER, JITTER),
            (IMAGE_SIZE - height) // 2 + rng.randint(-JITTER, JITTER))


def centred_scene(rng: random.Random) -> Scene:
    """One large shape in the middle (a VizWiz-like close-up)."""
    size = rng.randint(40, 46)
    x, y = _near_centre(rng, size, size)
    blob = Blob(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), "middle", (x, y, x + size, y + size))
    return Scene("centred", (blob,))


def words_scene(rng: random.Random) -> Scene:
    """One big word in the middle, in a plain colour."""
    word = rng.choice(WORDS)
    corner = _near_centre(rng, *_glyph_mask(word).size)
    return Scene("words", words=((word, rng.choice(sorted(COLOURS)), corner),))


def no_scene(rng: random.Random) -> Scene:
    """For text-only questions: nothing is drawn."""
    return Scene("none")


def unreadable_scene(rng: random.Random) -> Scene:
    """Coloured noise or a blank grey frame: nothing to answer about."""
    return Scene(rng.choice(("noise", "blank")), seed=rng.randrange(2**31))


@functools.lru_cache(maxsize=None)
def _glyph_mask(word: str) -> Image.Image:
    """The word in capitals in PIL's built-in bitmap font (identical on every platform), drawn small and
    scaled up with NEAREST: 2x wide, 3x tall (taller glyphs put more ink on each patch)."""
    font = ImageFont.load_default_imagefont()
    _, _, right, bottom = font.getbbox(word.upper())
    mask = Image.new("L", (right, bottom), 0)
    ImageDraw.Draw(mask).text((0, 0), word.upper(), font=font, fill=255)
    mask = mask.crop(mask.getbbox())
    return mask.resize((mask.width * 2, mask.height * 3), Image.NEAREST)


def _draw_blob(draw: ImageDraw.ImageDraw, blob: Blob) -> None:
    x0, y0, x1, y1 = blob.box
    fill = COLOURS[blob.colour]
    if blob.shape == "circle":
        draw.ellipse(blob.box, fill=fill)
    elif blob.shape == "square":
        draw.rectangle(blob.box, fill=fill)
    elif blob.shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        bar = (x1 - x0) // 3
        draw.rectangle((x0 + bar, y0, x1 - bar, y1), fill=fill)
        draw.rectangle((x0, y0 + bar, x1, y1 - bar), fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    if scene.kind == "blank":
        grey = random.Random(scene.seed).randint(90, 170)
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    if scene.kind == "noise":
        rng = random.Random(scene.seed)
        blocks = Image.new("RGB", (IMAGE_SIZE // 4, IMAGE_SIZE // 4))
        blocks.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range((IMAGE_SIZE // 4) ** 2)])
        return blocks.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for blob in scene.blobs:
        _draw_blob(draw, blob)
    for word, colour, corner in scene.words:
        image.paste(COLOURS[colour], corner + tuple(c + s for c, s in zip(corner, _glyph_mask(word).size)),
                    _glyph_mask(word))
    return image


def save_image(scene: Scene, path: Path) -> None:
    """PNG or JPEG by file name (each benchmark's own extension); JPEG at a quality that keeps the
    plain colours plain."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        render(scene).save(path, format="PNG")
    else:
        render(scene).save(path, format="JPEG", **JPEG_OPTIONS)


def image_base64(scene: Scene) -> str:
    """The image as MMBench stores it in its TSV (base64 of the JPEG file)."""
    buffer = io.BytesIO()
    render(scene).save(buffer, format="JPEG", **JPEG_OPTIONS)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _and_join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """A short caption for projector pretraining, e.g. "a red circle at the top left"."""
    if scene.kind == "noise":
        return "random colored noise"
    if scene.kind == "blank":
        return "a plain gray image"
    if scene.kind == "centred":
        blob = scene.blobs[0]
        return f"a large {blob.colour} {blob.shape} in the middle"
    if scene.kind == "words":
        word, colour, _ = scene.words[0]
        return f"the word {word} in {colour}"
    blob, count = scene.blobs[0], len(scene.blobs)
    what = f"a {blob.colour} {blob.shape}"
    if count > 1:
        what = f"{NUMBER_WORDS[str(count)]} {blob.colour} {plural(blob.shape)}"
    return f"{what} at the {_and_join([b.cell for b in scene.blobs])}"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


# ---------------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class Question:
    """A question on a scene, with its answer as the benchmark's annotations write it.

    For multiple choice the answer is the letter of the right entry of `choices`.
    """

    text: str
    answer: str
    choices: tuple[str, ...] = ()
    hint: str = ""
    ocr: tuple[str, ...] = ()
    image: bool = True
    answer_type: str = "other"
    full_answer: str = ""


@dataclass(frozen=True)
class QuestionType:
    """A kind of question: how its scenes are drawn, how it is asked, and every answer it can have
    (for multiple choice: every text the right option can have, see `drawn_answer`)."""

    name: str
    scene: Callable[[random.Random], Scene]
    ask: Callable[[random.Random, Scene], Question]
    answers: tuple[str, ...]


def _side(blob: Blob) -> str:
    return blob.cell.split()[-1]


def _multiple_choice(rng: random.Random, gold: str, pool: Iterable[str], most: int = 4) -> tuple[tuple[str, ...], str]:
    """2..most shuffled choices holding `gold`, and gold's letter."""
    others = [x for x in pool if x != gold]
    choices = [gold, *rng.sample(others, rng.randint(1, min(most, len(others) + 1) - 1))]
    rng.shuffle(choices)
    return tuple(choices), LETTERS[choices.index(gold)]


def _named(scene: Scene) -> str:
    """'is the circle' or 'are the circles', as many as the scene holds."""
    shape = scene.blobs[0].shape
    return f"is the {shape}" if len(scene.blobs) == 1 else f"are the {plural(shape)}"


def ask_colour(rng: random.Random, scene: Scene) -> Question:
    return Question(f"What color {_named(scene)}?", scene.blobs[0].colour)


def ask_shape(rng: random.Random, scene: Scene) -> Question:
    blob = scene.blobs[0]
    objects = "is the {} object" if len(scene.blobs) == 1 else "are the {} objects"
    return Question(f"What shape {objects.format(blob.colour)}?", blob.shape)


def ask_count(rng: random.Random, scene: Scene) -> Question:
    return Question("How many shapes are there?", str(len(scene.blobs)), answer_type="number")


def ask_colour_shape_exists(rng: random.Random, scene: Scene) -> Question:
    present = (scene.blobs[0].colour, scene.blobs[0].shape)
    asked = present if rng.random() < 0.5 else rng.choice([(c, s) for c in sorted(COLOURS) for s in SHAPES
                                                          if (c, s) != present])
    return Question(f"Is there a {asked[0]} {asked[1]}?", "yes" if asked == present else "no", answer_type="yes/no")


def ask_side(rng: random.Random, scene: Scene) -> Question:
    blob = scene.blobs[0]
    return Question(f"Is the {blob.shape} on the left or on the right?", _side(blob),
                    full_answer=f"The {blob.shape} is on the {_side(blob)}.")


def ask_height(rng: random.Random, scene: Scene) -> Question:
    blob = scene.blobs[0]
    height = blob.cell.split()[0]
    return Question(f"Is the {blob.colour} shape at the top or at the bottom?", height,
                    full_answer=f"The {blob.colour} shape is at the {height}.")


def ask_side_colour(rng: random.Random, scene: Scene) -> Question:
    blob = scene.blobs[0]
    return Question(f"What color is the shape on the {_side(blob)}?", blob.colour,
                    full_answer=f"The shape on the {_side(blob)} is {blob.colour}.")


def ask_verify_side(rng: random.Random, scene: Scene) -> Question:
    blob = scene.blobs[0]
    side = rng.choice(SIDES)
    answer = "yes" if _side(blob) == side else "no"
    full = f"{answer.capitalize()}, the {blob.colour} shape is on the {_side(blob)}."
    return Question(f"Is the {blob.colour} shape on the {side}?", answer, full_answer=full)


def ask_choose_shape(rng: random.Random, scene: Scene) -> Question:
    blob = scene.blobs[0]
    first, second = rng.sample([blob.shape, rng.choice([s for s in SHAPES if s != blob.shape])], 2)
    return Question(f"Which shape is on the {_side(blob)}, the {first} or the {second}?", blob.shape,
                    full_answer=f"The {blob.shape} is on the {_side(blob)}.")


def ask_this_colour(rng: random.Random, scene: Scene) -> Question:
    return Question("What color is this?", scene.blobs[0].colour)


def ask_this_shape(rng: random.Random, scene: Scene) -> Question:
    return Question("What is this?", scene.blobs[0].shape)


def ask_unanswerable(rng: random.Random, scene: Scene) -> Question:
    return Question(rng.choice(("What color is this?", "What is this?")), UNANSWERABLE, answer_type="unanswerable")


def ask_sqa_colour(rng: random.Random, scene: Scene) -> Question:
    choices, letter = _multiple_choice(rng, scene.blobs[0].colour, sorted(COLOURS))
    return Question(f"What color {_named(scene)}?", letter, choices, hint=rng.choice(SQA_HINTS))


def ask_sqa_count(rng: random.Random, scene: Scene) -> Question:
    choices, letter = _multiple_choice(rng, str(len(scene.blobs)), COUNTS)
    return Question("How many shapes are in the picture?", letter, choices, hint=rng.choice(SQA_HINTS))


def ask_sqa_shape_at(rng: random.Random, scene: Scene) -> Question:
    blob = rng.choice(scene.blobs)
    choices, letter = _multiple_choice(rng, blob.shape, SHAPES)
    return Question(f"Which shape is at the {blob.cell} of the picture?", letter, choices, hint=rng.choice(SQA_HINTS))


def ask_sqa_sides(rng: random.Random, scene: Scene) -> Question:
    shape, sides = rng.choice((("triangle", "3"), ("square", "4")))
    choices, letter = _multiple_choice(rng, sides, ("3", "4", "5"))
    hint = rng.choice(("", f"A {shape} is a flat shape."))
    return Question(f"How many sides does a {shape} have?", letter, choices, hint=hint, image=False)


def ask_sqa_word_kind(rng: random.Random, scene: Scene) -> Question:
    kind, own, other = rng.choice((("color", sorted(COLOURS), SHAPES), ("shape", SHAPES, sorted(COLOURS))))
    gold = rng.choice(own)
    distractors = rng.sample(other, rng.randint(1, 3))
    choices = [gold, *distractors]
    rng.shuffle(choices)
    return Question(f"Which word names a {kind}?", LETTERS[choices.index(gold)], tuple(choices), image=False)


def ask_word(rng: random.Random, scene: Scene) -> Question:
    return _word_question("what word is written in the image?", scene.words[0][0], scene, rng)


def ask_sign(rng: random.Random, scene: Scene) -> Question:
    return _word_question("what does the sign say?", scene.words[0][0], scene, rng)


def ask_letters(rng: random.Random, scene: Scene) -> Question:
    return _word_question("how many letters does the word have?", str(len(scene.words[0][0])), scene, rng)


def _word_question(text: str, answer: str, scene: Scene, rng: random.Random) -> Question:
    """The reference OCR tokens: the word and, half the time, a misread token, in random order
    (so neither copying the first token nor ignoring the image is enough)."""
    word = scene.words[0][0]
    tokens = [word] + ([rng.choice([w for w in WORDS if w != word])] if rng.random() < 0.5 else [])
    rng.shuffle(tokens)
    return Question(text, answer, ocr=tuple(tokens))


def ask_object_exists(rng: random.Random, scene: Scene) -> Question:
    present = scene.blobs[0].shape
    shape = present if rng.random() < 0.5 else rng.choice([s for s in SHAPES if s != present])
    return Question(pope_question(shape), "yes" if shape == present else "no", answer_type="yes/no")


def pope_question(shape: str) -> str:
    """POPE's question wording, with one of the shapes as the object."""
    return f"Is there a {shape} in the image?"


def ask_mmb_colour(rng: random.Random, scene: Scene) -> Question:
    choices, letter = _multiple_choice(rng, scene.blobs[0].colour, sorted(COLOURS))
    return Question(f"What color {_named(scene)} in the image?", letter, choices, hint=rng.choice(MMBENCH_HINTS))


def ask_mmb_shape(rng: random.Random, scene: Scene) -> Question:
    choices, letter = _multiple_choice(rng, scene.blobs[0].shape, SHAPES)
    return Question("Which shape is shown in the image?", letter, choices, hint=rng.choice(MMBENCH_HINTS))


def ask_mmb_where(rng: random.Random, scene: Scene) -> Question:
    blob = scene.blobs[0]
    choices, letter = _multiple_choice(rng, blob.cell, sorted(CELLS))
    return Question(f"Where is the {blob.shape} in the image?", letter, choices, hint=rng.choice(MMBENCH_HINTS))


_COLOURS = tuple(sorted(COLOURS))
QUESTION_TYPES: dict[str, tuple[QuestionType, ...]] = {
    "vqav2": (
        QuestionType("colour", shapes_scene, ask_colour, _COLOURS),
        QuestionType("shape", shapes_scene, ask_shape, SHAPES),
        QuestionType("count", shapes_scene, ask_count, COUNTS),
        QuestionType("exists", shapes_scene, ask_colour_shape_exists, YES_NO),
    ),
    "gqa": (
        QuestionType("side", single_scene, ask_side, SIDES),
        QuestionType("height", single_scene, ask_height, HEIGHTS),
        QuestionType("side_colour", single_scene, ask_side_colour, _COLOURS),
        QuestionType("verify_side", single_scene, ask_verify_side, YES_NO),
        QuestionType("choose_shape", single_scene, ask_choose_shape, SHAPES),
    ),
    "vizwiz": (
        QuestionType("colour", centred_scene, ask_this_colour, _COLOURS),
        QuestionType("shape", centred_scene, ask_this_shape, SHAPES),
        QuestionType("unanswerable", unreadable_scene, ask_unanswerable, (UNANSWERABLE,)),
    ),
    "scienceqa": (
        QuestionType("colour", shapes_scene, ask_sqa_colour, _COLOURS),
        QuestionType("count", shapes_scene, ask_sqa_count, COUNTS),
        QuestionType("shape_at", shapes_scene, ask_sqa_shape_at, SHAPES),
        QuestionType("sides", no_scene, ask_sqa_sides, ("3", "4")),
        QuestionType("word_kind", no_scene, ask_sqa_word_kind, _COLOURS + SHAPES),
    ),
    "textvqa": (
        QuestionType("word", words_scene, ask_word, WORDS),
        QuestionType("sign", words_scene, ask_sign, WORDS),
        QuestionType("letters", words_scene, ask_letters, tuple(sorted({str(len(w)) for w in WORDS}))),
    ),
    "pope": (QuestionType("object", shapes_scene, ask_object_exists, YES_NO),),
    "mmbench": (
        QuestionType("colour", shapes_scene, ask_mmb_colour, _COLOURS),
        QuestionType("shape", shapes_scene, ask_mmb_shape, SHAPES),
        QuestionType("where", single_scene, ask_mmb_where, tuple(sorted(CELLS))),
    ),
}
MMBENCH_CATEGORIES = {
    "colour": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "shape": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "where": ("object_localization", "finegrained_perception (instance-level)"),
}
SQA_TOPICS = {
    "colour": ("natural science", "colors"),
    "count": ("natural science", "counting"),
    "shape_at": ("natural science", "shapes"),
    "sides": ("natural science", "shapes"),
    "word_kind": ("language science", "vocabulary"),
}
GQA_TYPES = {
    "side": ("choose", "rel"),
    "height": ("choose", "rel"),
    "side_colour": ("query", "attr"),
    "verify_side": ("verify", "rel"),
    "choose_shape": ("choose", "obj"),
}


def schedule(rng: random.Random, types: Sequence[QuestionType], n: int) -> list[tuple[QuestionType, str]]:
    """n (type, answer) targets: types in turn, each cycling through all its answers in shuffled rounds.

    Balanced answers give the model no prior to lean on, and once n >= (number of types) x (most answers
    of a type) every (type, answer) pair is drawn: that is how the training mix covers every evaluation
    answer.
    """
    cycles: dict[str, list[str]] = {t.name: [] for t in types}
    order: list[QuestionType] = []
    targets = []
    for _ in range(n):
        if not order:
            order = list(types)
            rng.shuffle(order)
        qtype = order.pop(0)
        if not cycles[qtype.name]:
            cycles[qtype.name] = list(qtype.answers)
            rng.shuffle(cycles[qtype.name])
        targets.append((qtype, cycles[qtype.name].pop(0)))
    return targets


def drawn_answer(question: Question) -> str:
    """What a schedule balances: the answer, or for multiple choice the right option's text.

    Balancing the letters instead would leak them through the number of options (a "D" needs four
    options, a "C" at least three), so that answering the last letter scores well above chance; the
    letter is left to the shuffle, uniform among the options of every question.
    """
    return question.choices[LETTERS.index(question.answer)] if question.choices else question.answer


def targeted_question(rng: random.Random, qtype: QuestionType, target: str) -> tuple[Scene, Question]:
    """A random scene and question of this type whose `drawn_answer` is `target` (rejection sampling)."""
    for _ in range(MAX_TRIES):
        scene = qtype.scene(rng)
        question = qtype.ask(rng, scene)
        if drawn_answer(question) == target:
            return scene, question
    raise RuntimeError(f"question type {qtype.name!r} never produced the answer {target!r}")


def draw_questions(rng: random.Random, benchmark: str, n: int) -> list[tuple[QuestionType, Scene, Question]]:
    """n questions of a benchmark, balanced over its question types and their answers."""
    return [(qtype, *targeted_question(rng, qtype, target))
            for qtype, target in schedule(rng, QUESTION_TYPES[benchmark], n)]


# ---------------------------------------------------------------------------------------------------
# Prompts, as each benchmark's question file words them


def option_lines(choices: Sequence[str]) -> str:
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))


def question_text(benchmark: str, question: Question) -> str:
    """The question file's text (VQA-style files), or the human turn without `<image>` and without the
    letter instruction that `--single-pred-prompt` adds (ScienceQA, MMBench)."""
    if benchmark in ("vqav2", "gqa", "pope"):
        return f"{question.text}\n{SHORT_ANSWER}"
    if benchmark == "vizwiz":
        return f"{question.text}\n{UNANSWERABLE_LINE}\n{SHORT_ANSWER}"
    if benchmark == "textvqa":
        return f"{question.text}\n{OCR_PREFIX}{', '.join(question.ocr)}\n{SHORT_ANSWER}"
    if benchmark == "scienceqa":
        context = f"Context: {question.hint}\n" if question.hint else ""
        return f"{context}{question.text}\n{option_lines(question.choices)}"
    if benchmark == "mmbench":
        hint = f"{question.hint}\n" if question.hint else ""
        return f"{hint}{question.text}\n{option_lines(question.choices)}"
    raise ValueError(f"unknown benchmark {benchmark!r}")


def training_prompt(benchmark: str, question: Question) -> str:
    """The human turn the model sees at evaluation time for this question (image tag included)."""
    text = question_text(benchmark, question)
    if benchmark in ("scienceqa", "mmbench"):
        text = f"{text}\n{LETTER_ANSWER}"
    return f"{IMAGE_TAG}\n{text}" if question.image else text


def training_answer(question: Question) -> str:
    """The assistant's answer as LLaVA-1.5's data writes it: "Yes"/"No", "Unanswerable", else as annotated."""
    if question.answer in YES_NO or question.answer == UNANSWERABLE:
        return question.answer.capitalize()
    return question.answer


def human_answers(rng: random.Random, answer: str, pool: Sequence[str]) -> list[str]:
    """Ten annotators' answers: mostly the answer, sometimes one written differently and one wrong one.

    At least eight stay equal to the answer after normalisation, so the right prediction scores 1.0.
    """
    answers = [answer] * 10
    if rng.random() < 0.3:
        answers[rng.randrange(10)] = NUMBER_WORDS.get(answer, answer.capitalize())
    wrong = [a for a in pool if a != answer]
    if wrong and rng.random() < 0.2:
        answers[rng.randrange(10)] = rng.choice(wrong)
    return answers


# ---------------------------------------------------------------------------------------------------
# Writers


class Corpus:
    """Every line of text the demo's tokenizer and language model should know, first-seen order."""

    def __init__(self) -> None:
        self._lines: dict[str, None] = {}

    def add(self, *texts: str) -> None:
        for text in texts:
            for line in text.replace(IMAGE_TAG, "").split("\n"):
                if line.strip():
                    self._lines.setdefault(line.strip(), None)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in self._lines), encoding="utf-8")
        return path


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _turn(speaker: str, value: str) -> dict[str, str]:
    return {"from": speaker, "value": value}


def _split_evenly(n: int, parts: Sequence[str]) -> dict[str, int]:
    return {part: n // len(parts) + (k < n % len(parts)) for k, part in enumerate(parts)}


def _follow_ups(rng: random.Random, benchmark: str, qtype: QuestionType, scene: Scene,
                asked: str) -> list[Question]:
    """1-2 more questions on the same scene (mix665k packs several VQA questions per image)."""
    same_scene = [t for t in QUESTION_TYPES[benchmark] if t.scene is qtype.scene]
    questions, seen = [], {asked}
    for _ in range(rng.randint(1, 2)):
        question = rng.choice(same_scene).ask(rng, scene)
        if question.text not in seen:
            seen.add(question.text)
            questions.append(question)
    return questions


def _conversation(rng: random.Random, benchmark: str, drawn: tuple[QuestionType, Scene, Question],
                  image_text: str) -> list[dict[str, str]]:
    """The turns of one item; `image_text` stands where the image goes (the `<image>` tag, or words)."""
    qtype, scene, question = drawn
    prompt = training_prompt(benchmark, question).replace(IMAGE_TAG, image_text, 1)
    turns = [_turn("human", prompt), _turn("gpt", training_answer(question))]
    if benchmark in MULTI_TURN and rng.random() < 1 / 3:
        for follow_up in _follow_ups(rng, benchmark, qtype, scene, question.text):
            turns += [_turn("human", question_text(benchmark, follow_up)), _turn("gpt", training_answer(follow_up))]
    return turns


def training_sample(rng: random.Random, benchmark: str, index: int, image_folder: Path,
                    drawn: tuple[QuestionType, Scene, Question], corpus: Corpus) -> dict[str, Any]:
    """One mix665k item; images under image_folder/images/<benchmark>/."""
    sample: dict[str, Any] = {"id": f"{benchmark}-{index:06d}"}
    if drawn[2].image:
        extension = "png" if benchmark == "scienceqa" else "jpg"
        sample["image"] = f"images/{benchmark}/{index:06d}.{extension}"
        save_image(drawn[1], image_folder / sample["image"])
    sample["conversations"] = _conversation(rng, benchmark, drawn, IMAGE_TAG)
    corpus.add(*(turn["value"] for turn in sample["conversations"]))
    return sample


TRAIN_SHARES = {"vqav2": 1, "gqa": 1, "vizwiz": 1, "scienceqa": 2, "textvqa": 1, "pope": 2, "mmbench": 2}


def _split_by_shares(n: int, shares: dict[str, int]) -> dict[str, int]:
    """n items split in proportion to ``shares``, the remainder going one each to the first parts."""
    total = sum(shares.values())
    counts = {part: n * share // total for part, share in shares.items()}
    for part in list(shares)[: n - sum(counts.values())]:
        counts[part] += 1
    return counts


def write_train(out_dir: Path, seed: int, n: int, corpus: Corpus) -> Path:
    """The instruction-tuning mix: every benchmark's question types, balanced within a benchmark,
    shuffled together. POPE and the two multiple-choice benchmarks get a double share (TRAIN_SHARES):
    checking a named object against the image, and picking the letter of the option that names what
    the image shows, are the skills a tiny model learns last."""
    samples = []
    for benchmark, count in _split_by_shares(n, TRAIN_SHARES).items():
        rng = stream(seed, "train", benchmark)
        for index, drawn in enumerate(draw_questions(rng, benchmark, count)):
            samples.append(training_sample(rng, benchmark, index, out_dir, drawn, corpus))
    stream(seed, "train", "order").shuffle(samples)
    return _write_json(out_dir / "llava_demo_mix.json", samples)


def describe(scene: Scene) -> str:
    """The scene in words, e.g. "The image shows two red circles at the top left and bottom right." """
    return f"The image shows {caption(scene)}."


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def inventory(rng: random.Random, scene: Scene, described: bool = True) -> str:
    """The scene's description (unless not ``described``) followed by a yes/no fact for every shape,
    colour and side, and the count, e.g. "The image shows a blue cross at the top right. circle no,
    cross yes, ... count 1."

    A question word is followed at once by its answer here, so a small model learns, with a direct
    gradient, to notice whether a word of the question was already said; the chats' yes/no and
    option-letter answers build on that (learned from the chats alone, they stall at chance).
    """
    blobs = scene.blobs
    groups = [[f"{s} {_yes_no(any(b.shape == s for b in blobs))}" for s in SHAPES],
              [f"{c} {_yes_no(any(b.colour == c for b in blobs))}" for c in sorted(COLOURS)]]
    if scene.kind == "shapes":
        groups += [[f"{side} {_yes_no(any(_side(b) == side for b in blobs))}" for side in SIDES],
                   [f"{h} {_yes_no(any(b.cell.startswith(h) for b in blobs))}" for h in HEIGHTS]]
    for group in groups:
        rng.shuffle(group)
    facts = ". ".join(", ".join(group) for group in groups) + f". count {len(blobs)}."
    if len(blobs) == 1:
        facts += " " + " ".join(_either_or(rng, *pair) for pair in _pairs(rng, blobs[0], scene.kind))
    return f"{describe(scene)} {facts}" if described else facts


def _pairs(rng: random.Random, blob: Blob, kind: str) -> list[tuple[str, str]]:
    """(true, false) word pairs about one shape: its shape, its colour and, in a quadrant, its side and height."""
    pairs = [(blob.shape, rng.choice([s for s in SHAPES if s != blob.shape])),
             (blob.colour, rng.choice([c for c in sorted(COLOURS) if c != blob.colour]))]
    if kind == "shapes":
        side, height = _side(blob), blob.cell.split()[0]
        pairs += [(side, next(s for s in SIDES if s != side)), (height, next(h for h in HEIGHTS if h != height))]
    rng.shuffle(pairs)
    return pairs


def _either_or(rng: random.Random, true: str, false: str) -> str:
    """ "left or right? left." in a random order of the two words: the step from noticing a word to saying it."""
    first, second = rng.sample([true, false], 2)
    return f"{first} or {second}? {true}."


def choice_facts(benchmark: str, scene: Scene, question: Question, described: bool = True) -> str:
    """A multiple-choice question written out with a yes/no after every option, then its letter."""
    context = f"{describe(scene)}\n" if question.image and described else ""
    hint = question.hint and (f"Context: {question.hint}\n" if benchmark == "scienceqa" else f"{question.hint}\n")
    options = "\n".join(f"{letter}. {choice} {_yes_no(letter == question.answer)}"
                        for letter, choice in zip(LETTERS, question.choices))
    return f"{context}{hint}{question.text}\n{options}\nThe answer is {question.answer}."


def write_text_facts(out_dir: Path, seed: int, n: int, corpus: Corpus) -> Path:
    """Plain-text documents for the language model: scene inventories and worked multiple-choice answers."""
    rng = stream(seed, "facts")
    documents = [inventory(rng, rng.choice((shapes_scene, single_scene, centred_scene))(rng)) for _ in range(n // 2)]
    for benchmark, count in _split_evenly(n - n // 2, ("scienceqa", "mmbench")).items():
        documents += [choice_facts(benchmark, scene, question)
                      for _, scene, question in draw_questions(stream(seed, "facts", benchmark), benchmark, count)]
    rng.shuffle(documents)
    corpus.add(*documents)
    return _write_json(out_dir / "llava_demo_facts.json", documents)


def write_text_dialogues(out_dir: Path, seed: int, n: int, corpus: Corpus) -> Path:
    """Text-only chats for the language model's pretraining: every question type of the mix, with the
    scene described in words where the image would be.

    This is the demo's stand-in for what Vicuna already knows before visual instruction tuning: how to
    answer a yes/no question or pick an option's letter from what it has been told. Instruction tuning
    then only has to teach the model to read the same facts from the image.
    """
    samples = []
    for benchmark, count in _split_evenly(n, BENCHMARKS).items():
        rng = stream(seed, "text", benchmark)
        for index, drawn in enumerate(draw_questions(rng, benchmark, count)):
            turns = _conversation(rng, benchmark, drawn, describe(drawn[1]) if drawn[2].image else "")
            corpus.add(*(turn["value"] for turn in turns))
            samples.append({"id": f"text-{benchmark}-{index:06d}", "conversations": turns})
    stream(seed, "text", "order").shuffle(samples)
    return _write_json(out_dir / "llava_demo_text.json", samples)


def write_pretrain(out_dir: Path, seed: int, n: int, corpus: Corpus) -> Path:
    """Stage-1 pairs: image + a brief request -> caption (the plain template keeps only image and caption).

    Of the shape images, 40% are captioned with their facts instead of a sentence ("circle no, cross
    yes, ...") and 20% with a worked multiple-choice question about them ("A. red no\nB. blue yes\nThe
    answer is B."): the language model learned in its pretraining to notice a word said before, so
    these teach the projector to make image tokens that answer to the same words.

    Every image's plain caption also goes to llava_demo_captions.json ({"image", "caption"}): the
    pairs the vision tower's contrastive pretraining learns from, as CLIP learned from alt-texts.
    """
    rng = stream(seed, "pretrain")
    samplers = (shapes_scene, shapes_scene, single_scene, centred_scene, words_scene, unreadable_scene)
    samples, captions = [], []
    for index in range(n):
        scene = rng.choice(samplers)(rng)
        image = f"images/{index:06d}.jpg"
        save_image(scene, out_dir / image)
        captions.append({"image": image, "caption": caption(scene)})
        request, draw = rng.choice(PRETRAIN_REQUESTS), rng.random()
        has_shapes = scene.kind in ("shapes", "centred")
        if has_shapes and draw < 0.4:
            text = inventory(rng, scene, described=False)
        elif has_shapes and draw < 0.6:
            asks = (ask_mmb_colour, ask_mmb_shape)
            if scene.kind == "shapes" and len(scene.blobs) == 1:
                asks += (ask_mmb_where,)
            text = choice_facts("mmbench", scene, rng.choice(asks)(rng, scene), described=False)
        else:
            text = caption(scene)
        corpus.add(request, text)
        samples.append({"id": f"pretrain-{index:06d}", "image": image,
                        "conversations": [_turn("human", f"{IMAGE_TAG}\n{request}"), _turn("gpt", text)]})
    corpus.add(*(c["caption"] for c in captions))
    _write_json(out_dir / "llava_demo_captions.json", captions)
    return _write_json(out_dir / "llava_demo_pretrain.json", samples)


def _vqav2_annotation(rng: random.Random, question_id: int, image_id: int, qtype: QuestionType,
                      question: Question) -> dict[str, Any]:
    answers = human_answers(rng, question.answer, qtype.answers)
    return {
        "question_id": question_id, "image_id": image_id,
        "question_type": " ".join(question.text.lower().split()[:3]), "answer_type": question.answer_type,
        "multiple_choice_answer": question.answer,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(answers, 1)],
    }  # fmt: skip


def write_vqav2(eval_dir: Path, rng: random.Random, n: int, corpus: Corpus) -> Path:
    """test-dev questions (answered, annotated) and the test2015 superset the upload must cover."""
    folder = eval_dir / "vqav2"
    drawn = draw_questions(rng, "vqav2", n + max(1, n // 4))
    image_ids = rng.sample(range(1, 581930), len(drawn))
    questions, annotations = [], []
    for k, ((qtype, scene, question), image_id) in enumerate(zip(drawn, image_ids)):
        name = f"COCO_test2015_{image_id:012d}.jpg"
        save_image(scene, folder / "test2015" / name)
        record = {"question_id": image_id * 1000, "image": name, "text": question_text("vqav2", question),
                  "category": "default"}
        corpus.add(record["text"], question.answer)
        questions.append(record)
        if k < n:
            annotations.append(_vqav2_annotation(rng, record["question_id"], image_id, qtype, question))
    answered = {a["question_id"] for a in annotations}
    _write_jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl",
                 sorted((q for q in questions if q["question_id"] in answered), key=lambda q: q["question_id"]))
    _write_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl", sorted(questions, key=lambda q: q["question_id"]))
    _write_json(folder / "annotations.json", {
        "info": {"description": "synthetic VQAv2-format annotations of the demo's test-dev questions"},
        "data_type": "mscoco", "data_subtype": "test-dev2015", "license": {"name": "synthetic"},
        "annotations": sorted(annotations, key=lambda a: a["question_id"]),
    })  # fmt: skip
    return folder


def write_gqa(eval_dir: Path, rng: random.Random, n: int, corpus: Corpus) -> Path:
    """testdev-balanced questions, images, and the official questions file (answers, fullAnswers)."""
    folder = eval_dir / "gqa"
    drawn = draw_questions(rng, "gqa", n)
    image_ids = rng.sample(range(1, 2_400_000), n)
    question_ids = rng.sample(range(10_000_000, 99_999_999), n)
    lines, official = [], {}
    for (qtype, scene, question), image_id, question_id in zip(drawn, image_ids, question_ids):
        image, qid = f"n{image_id}", str(question_id)
        save_image(scene, folder / "data" / "images" / f"{image}.jpg")
        lines.append({"question_id": qid, "image": f"{image}.jpg", "text": question_text("gqa", question)})
        structural, semantic = GQA_TYPES[qtype.name]
        official[qid] = {
            "imageId": image, "question": question.text, "answer": question.answer, "fullAnswer": question.full_answer,
            "isBalanced": True, "groups": {"global": None, "local": f"synthetic-{qtype.name}"},
            "types": {"structural": structural, "semantic": semantic, "detailed": qtype.name},
            "semantic": [], "semanticStr": "", "entailed": [], "equivalent": [qid],
            "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
        }  # fmt: skip
        corpus.add(lines[-1]["text"], question.answer, question.full_answer)
    _write_jsonl(folder / "llava_gqa_testdev_balanced.jsonl", lines)
    _write_json(folder / "data" / "testdev_balanced_questions.json", official)
    return folder


def write_vizwiz(eval_dir: Path, rng: random.Random, n: int, corpus: Corpus) -> Path:
    """Questions (a third unanswerable: noise or blank images) and val-format annotations for local scoring."""
    folder = eval_dir / "vizwiz"
    lines, annotations = [], []
    for index, (qtype, scene, question) in enumerate(draw_questions(rng, "vizwiz", n)):
        name = f"VizWiz_test_{index:08d}.jpg"
        save_image(scene, folder / "test" / name)
        lines.append({"question_id": index, "image": name, "text": question_text("vizwiz", question)})
        answers = human_answers(rng, question.answer, qtype.answers)
        annotations.append({
            "image": name, "question": question.text,
            "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers],
            "answer_type": question.answer_type, "answerable": int(question.answer != UNANSWERABLE),
        })  # fmt: skip
        corpus.add(lines[-1]["text"], question.answer)
    _write_jsonl(folder / "llava_test.jsonl", lines)
    _write_json(folder / "annotations.json", annotations)
    return folder


def write_scienceqa(eval_dir: Path, rng: random.Random, n: int, corpus: Corpus) -> Path:
    """llava_test_CQM-A.json, problems.json, pid_splits.json and images/test/<id>/image.png."""
    folder = eval_dir / "scienceqa"
    drawn = draw_questions(rng, "scienceqa", n)
    pids = [str(pid) for pid in rng.sample(range(1, 21209), n)]
    items, problems = [], {}
    for (qtype, scene, question), pid in zip(drawn, pids):
        item: dict[str, Any] = {"id": pid}
        if question.image:
            item["image"] = f"{pid}/image.png"
            save_image(scene, folder / "images" / "test" / pid / "image.png")
        human = question_text("scienceqa", question)
        item["conversations"] = [_turn("human", f"{IMAGE_TAG}\n{human}" if question.image else human),
                                 _turn("gpt", question.answer)]
        items.append(item)
        subject, topic = SQA_TOPICS[qtype.name]
        problems[pid] = {
            "question": question.text, "choices": list(question.choices), "answer": LETTERS.index(question.answer),
            "hint": question.hint, "image": "image.png" if question.image else None, "task": "closed choice",
            "grade": "grade1", "subject": subject, "topic": topic, "category": qtype.name, "skill": qtype.name,
            "lecture": "", "solution": "", "split": "test",
        }  # fmt: skip
        corpus.add(human, question.answer)
    _write_json(folder / "llava_test_CQM-A.json", items)
    _write_json(folder / "problems.json", problems)
    splits = {"train": [], "val": [], "test": pids, "trainval": [], "minitrain": [], "minival": [],
              "minitest": pids[: max(1, n // 4)]}
    _write_json(folder / "pid_splits.json", splits)
    return folder


def write_textvqa(eval_dir: Path, rng: random.Random, n: int, corpus: Corpus) -> Path:
    """One question per image (question_id = the image id), annotations and train_images/<id>.jpg."""
    folder = eval_dir / "textvqa"
    drawn = draw_questions(rng, "textvqa", n)
    question_ids = rng.sample(range(34602, 39602), n)
    image_ids = [f"{rng.getrandbits(64):016x}" for _ in range(n)]
    lines, data = [], []
    for (qtype, scene, question), question_id, image_id in zip(drawn, question_ids, image_ids):
        save_image(scene, folder / "train_images" / f"{image_id}.jpg")
        lines.append({"question_id": image_id, "image": f"{image_id}.jpg", "text": question_text("textvqa", question)})
        data.append({
            "question": question.text, "image_id": image_id, "image_classes": [], "flickr_original_url": "",
            "flickr_300k_url": "", "image_width": IMAGE_SIZE, "image_height": IMAGE_SIZE,
            "answers": human_answers(rng, question.answer, qtype.answers),
            "question_tokens": question.text.rstrip("?").split(), "question_id": question_id, "set_name": "val",
        })  # fmt: skip
        corpus.add(lines[-1]["text"], question.answer)
    _write_jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", lines)
    _write_json(folder / "TextVQA_0.5.1_val.json",
                {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    return folder


@functools.lru_cache(maxsize=None)
def _mask(shape: str) -> frozenset[tuple[int, int]]:
    image = Image.new("RGB", (CELL, CELL), BACKGROUND)
    _draw_blob(ImageDraw.Draw(image), Blob(shape, "black", "middle", (2, 2, CELL - 4, CELL - 4)))
    return frozenset((x, y) for x in range(CELL) for y in range(CELL) if image.getpixel((x, y)) != BACKGROUND)


def look_alike(shape: str, candidates: Sequence[str]) -> str:
    """The candidate whose silhouette overlaps the shape's most (intersection over union)."""
    return max(candidates, key=lambda c: (len(_mask(c) & _mask(shape)) / len(_mask(c) | _mask(shape)),
                                          -SHAPES.index(c)))


def _pope_negative(category: str, rng: random.Random, shape: str, frequency: Counter[str]) -> str:
    """An absent shape, chosen the way POPE chooses absent objects: at random, the most frequent in the
    set (popular), or the hardest to tell apart (adversarial: POPE takes objects that co-occur with
    the present ones; with one kind of shape per image, the absent shape that looks most alike)."""
    absent = [s for s in SHAPES if s != shape]
    if category == "random":
        return rng.choice(absent)
    if category == "popular":
        return max(absent, key=lambda s: (frequency[s], -SHAPES.index(s)))
    return look_alike(shape, absent)


def write_pope(eval_dir: Path, rng: random.Random, n: int, corpus: Corpus) -> Path:
    """n questions per category on shared images, alternating yes/no (balanced), POPE's label files."""
    folder = eval_dir / "pope"
    scenes = [shapes_scene(rng) for _ in range(math.ceil(n / 2))]
    image_ids = rng.sample(range(1, 581930), len(scenes))
    names = [f"COCO_val2014_{image_id:012d}.jpg" for image_id in image_ids]
    for scene, name in zip(scenes, names):
        save_image(scene, folder / "val2014" / name)
    shapes = [scene.blobs[0].shape for scene in scenes]
    frequency = Counter(shapes)
    lines = []
    for category in POPE_CATEGORIES:
        labels = []
        for k in range(n):
            shape, label = shapes[k // 2], "yes"
            if k % 2:
                shape, label = _pope_negative(category, rng, shape, frequency), "no"
            labels.append({"question_id": k + 1, "image": names[k // 2], "text": pope_question(shape), "label": label})
            lines.append({"question_id": len(lines) + 1, "image": names[k // 2],
                          "text": f"{pope_question(shape)}\n{SHORT_ANSWER}", "category": category})
            corpus.add(lines[-1]["text"], label)
        _write_jsonl(folder / "coco" / f"coco_pope_{category}.json", labels)
    _write_jsonl(folder / "llava_pope_test.jsonl", lines)
    return folder


def write_mmbench(eval_dir: Path, rng: random.Random, n: int, corpus: Corpus) -> Path:
    """mmbench_dev_20230712.tsv: MMBench's columns, images inline as base64, empty cells for absent options,
    and, as in the real TSV, each question's circular copies after the questions: row index + k * 10^6
    shows the options shifted up k letters, with its own answer letter."""
    folder = eval_dir / "mmbench"
    drawn = draw_questions(rng, "mmbench", n)
    indices = sorted(rng.sample(range(0, 5000), n))
    rows, copies = [], []
    for (qtype, scene, question), index in zip(drawn, indices):
        category, l2_category = MMBENCH_CATEGORIES[qtype.name]
        image = image_base64(scene)
        choices = list(question.choices)
        right = LETTERS.index(question.answer)
        for shift in range(len(choices)):
            shifted = choices[shift:] + choices[:shift]
            options = shifted + [""] * (len(LETTERS) - len(shifted))
            answer = LETTERS[(right - shift) % len(choices)]
            (copies if shift else rows).append([index + shift * CIRCULAR_OFFSET, question.text, question.hint,
                                                *options, answer, category, image, "synthetic", l2_category, "", "dev"])
        corpus.add(question_text("mmbench", question), question.answer)
    rows += sorted(copies, key=lambda row: row[0])
    path = folder / "mmbench_dev_20230712.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(MMBENCH_COLUMNS)
        writer.writerows(rows)
    return folder


EVAL_WRITERS: dict[str, Callable[[Path, random.Random, int, Corpus], Path]] = {
    "vqav2": write_vqav2,
    "gqa": write_gqa,
    "vizwiz": write_vizwiz,
    "scienceqa": write_scienceqa,
    "textvqa": write_textvqa,
    "pope": write_pope,
    "mmbench": write_mmbench,
}


def _vicuna_lines() -> tuple[str, str]:
    conv = conv_templates["vicuna_v1"]
    return conv.system, " ".join(f"{role}:" for role in conv.roles)


def _timed(name: str, write: Callable[..., Path], *args: Any) -> Path:
    start = time.perf_counter()
    path = write(*args)
    logger.info("%s: %s (%.1f s)", name, path, time.perf_counter() - start)
    return path


def generate(out_root: str | Path, seed: int = 0, n_train: int = 4000, n_eval: int = 40,
             n_pretrain: int | None = None, n_text: int | None = None) -> dict[str, Path]:
    """Write the whole task under out_root; returns the paths the demo passes to training and evaluation.

    n_eval is the number of questions per benchmark (per category for POPE); n_pretrain defaults to
    n_train, n_text (text-only chats for the language model) to 2 * n_train. Every evaluation answer is a training answer once each benchmark's share of n_train
    goes through all its (question type, answer) pairs: n_train >= 250 (10 shares x 25, TRAIN_SHARES).
    """
    out_root = Path(out_root)
    n_pretrain = n_train if n_pretrain is None else n_pretrain
    n_text = 2 * n_train if n_text is None else n_text
    corpus = Corpus()
    corpus.add(*_vicuna_lines())
    paths: dict[str, Path] = {}
    paths["train"] = _timed("train", write_train, out_root / "train", seed, n_train, corpus)
    paths["pretrain"] = _timed("pretrain", write_pretrain, out_root / "pretrain", seed, n_pretrain, corpus)
    paths["dialogues"] = _timed("text", write_text_dialogues, out_root / "text", seed, n_text, corpus)
    paths["facts"] = _timed("facts", write_text_facts, out_root / "text", seed, n_text, corpus)
    paths["train_image_folder"], paths["pretrain_image_folder"] = paths["train"].parent, paths["pretrain"].parent
    for benchmark, write_benchmark in EVAL_WRITERS.items():
        rng = stream(seed, "eval", benchmark)
        paths[benchmark] = _timed(f"eval {benchmark}", write_benchmark, out_root / "eval", rng, n_eval, corpus)
    paths["eval"] = out_root / "eval"
    paths["corpus"] = corpus.write(out_root / "text" / "corpus.txt")
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4000, help="instruction-tuning samples")
    parser.add_argument("--pretrain", type=int, help="projector-pretraining pairs (default: --train)")
    parser.add_argument("--text", type=int, help="text-only chats for the language model (default: 2 x --train)")
    parser.add_argument("--eval-per-benchmark", type=int, default=40,
                        help="questions per benchmark (per category for POPE)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    paths = generate(args.out_root, args.seed, args.train, args.eval_per_benchmark, args.pretrain, args.text)
    logger.info("done in %.1f s: %s", time.perf_counter() - start, args.out_root)
    return paths


if __name__ == "__main__":
    main()
