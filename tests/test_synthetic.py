"""The synthetic demo task: deterministic, in the real formats, learnable, and scored 100 by the real
scorers and converters when every answer is right (and ~0 when every answer is wrong)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
from collections import Counter
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from llava.demo.synthetic import BENCHMARKS, IMAGE_SIZE, LETTERS, MMBENCH_COLUMNS, POPE_CATEGORIES, generate, main
from llava.eval.answer_processor import normalize_answer
from llava.eval.eval_gqa import gqa_accuracy
from llava.eval.eval_mmbench import mmbench_accuracy, read_tsv
from llava.eval.eval_pope import evaluate_pope
from llava.eval.eval_science_qa import score_science_qa
from llava.eval.eval_textvqa import textvqa_accuracy
from llava.eval.eval_vqa import load_annotations, predictions_from_upload, vqa_accuracy
from llava.eval.jsonl import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(n_train=250, n_eval=8, n_pretrain=12)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
SHORT = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
LETTER = "Answer with the option's letter from the given choices directly."
WRONG = "zebra"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("synthetic") / "seed0"
    return root, generate(root, seed=0, **SIZES)


@pytest.fixture(scope="module")
def eval_dir(data) -> Path:
    return data[0] / "eval"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_answers(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps({"answer_id": "a", "model_id": "oracle", "metadata": {}, **r}) + "\n"
                            for r in records))
    return path


def training_samples(data) -> list[dict[str, Any]]:
    return json.loads(data[1]["train"].read_text())


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files_through_the_cli(data, tmp_path):
    again = tmp_path / "again"
    main([str(again), "--seed", "0", "--train", str(SIZES["n_train"]), "--pretrain", str(SIZES["n_pretrain"]),
          "--eval-per-benchmark", str(SIZES["n_eval"])])
    assert tree(again) == tree(data[0])


def test_another_seed_gives_other_data(data, tmp_path):
    other = generate(tmp_path / "seed1", seed=1, **SIZES)
    for key in ("train", "pretrain"):
        assert other[key].read_bytes() != data[1][key].read_bytes()
    for name in ("vqav2/llava_vqav2_mscoco_test2015.jsonl", "mmbench/mmbench_dev_20230712.tsv",
                 "scienceqa/llava_test_CQM-A.json", "textvqa/TextVQA_0.5.1_val.json"):
        assert (tmp_path / "seed1" / "eval" / name).read_bytes() != (data[0] / "eval" / name).read_bytes()


# ---------------------------------------------------------------- training data


def test_multiple_choice_benchmarks_get_a_double_share_of_the_mix(data):
    from llava.demo.synthetic import TRAIN_SHARES, _split_by_shares

    # 10 shares: 10000 items are 1000 a share; 11 items are 1 a share-1 and 2 a share-2 part (10), one left over.
    assert _split_by_shares(10000, TRAIN_SHARES) == {b: 1000 * TRAIN_SHARES[b] for b in BENCHMARKS}
    assert _split_by_shares(11, TRAIN_SHARES) == {"vqav2": 2, "gqa": 1, "vizwiz": 1, "scienceqa": 2, "textvqa": 1,
                                                 "pope": 2, "mmbench": 2}
    samples = json.loads(data[1]["train"].read_text())
    counts = Counter(s["id"].split("-")[0] for s in samples)
    assert counts == _split_by_shares(SIZES["n_train"], TRAIN_SHARES)
    assert counts["mmbench"] >= 2 * counts["gqa"] - 1 and counts["pope"] >= 2 * counts["gqa"] - 1


def test_training_mix_is_in_the_mix665k_format(data):
    from llava.train.data import load_samples

    samples = load_samples(str(data[1]["train"]))
    assert len(samples) == SIZES["n_train"]
    assert {s["id"].split("-")[0] for s in samples} == set(BENCHMARKS)
    assert len({s["id"] for s in samples}) == len(samples)
    for sample in samples:
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        tags = [t["value"].count("<image>") for t in turns]
        if "image" in sample:
            assert not Path(sample["image"]).is_absolute()
            assert (data[1]["train_image_folder"] / sample["image"]).is_file()
            assert turns[0]["value"].startswith("<image>\n") and tags == [1] + [0] * (len(turns) - 1)
        else:
            assert tags == [0] * len(turns)
        assert all(len(t["value"].split()) <= 2 for t in turns[1::2]), "answers must stay short"
    assert any("image" not in s for s in samples), "some samples must be text-only"
    assert any(len(s["conversations"]) > 2 for s in samples), "some samples must be multi-turn"
    with Image.open(data[1]["train_image_folder"] / next(s["image"] for s in samples if "image" in s)) as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_pretraining_pairs(data):
    samples = json.loads(data[1]["pretrain"].read_text())
    assert len(samples) == SIZES["n_pretrain"]
    for sample in samples:
        assert set(sample) == {"id", "image", "conversations"}
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert gpt["value"] and "<image>" not in gpt["value"]
        assert (data[1]["pretrain_image_folder"] / sample["image"]).is_file()


def test_caption_pairs_for_the_vision_tower(data):
    """Every pretraining image has its plain caption (the contrastive stage's pairs); where the
    stage-1 sample is captioned with a sentence too, it is the same sentence."""
    samples = json.loads(data[1]["pretrain"].read_text())
    pairs = json.loads((data[1]["pretrain_image_folder"] / "llava_demo_captions.json").read_text())
    assert [p["image"] for p in pairs] == [s["image"] for s in samples]
    corpus = set((data[0] / "text" / "corpus.txt").read_text().splitlines())
    sentence = re.compile(r"^(an? |one |two |three |the word |random colored noise|a plain gray image)")
    for pair, sample in zip(pairs, samples):
        assert set(pair) == {"image", "caption"} and sentence.match(pair["caption"]), pair
        assert pair["caption"] in corpus
        text = sample["conversations"][1]["value"]
        if " yes" not in text and "The answer is" not in text:
            assert text == pair["caption"]


SHAPE_WORDS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}


def _mentions(text: str, shape: str) -> bool:
    return bool(re.search(rf"\b({shape}|{SHAPE_WORDS[shape]})\b", text))


def test_text_chats_say_in_words_what_the_image_would_show(data):
    """The language model's chats: no image, the scene described where the image goes, and answers
    that follow from the description alone (checked here by reading the words, not the generator)."""
    chats = json.loads(data[1]["dialogues"].read_text())
    assert len(chats) == 2 * SIZES["n_train"]
    assert {c["id"].split("-")[1] for c in chats} == set(BENCHMARKS)
    checked = Counter()
    for chat in chats:
        turns = chat["conversations"]
        assert "<image>" not in json.dumps(turns)
        first = turns[0]["value"].split("\n")
        question, answer = first[1] if first[0].startswith("The image shows ") else first[0], turns[1]["value"]
        description = first[0] if first[0].startswith("The image shows ") else None
        if chat["id"].split("-")[1] in ("pope", "vqav2") and (m := re.fullmatch(r"Is there an? (\w+) in the image\?", question)):
            assert answer == ("Yes" if _mentions(description, m.group(1)) else "No"), chat
            checked["pope"] += 1
        elif question == "What color is this?" and chat["id"].split("-")[1] == "vizwiz":
            colour = re.search(r"large (\w+) ", description)
            assert answer == (colour.group(1) if colour else "Unanswerable"), chat
            checked["vizwiz"] += 1
    assert checked["pope"] > 5 and checked["vizwiz"] > 5


def _facts(text: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+) (yes|no)\b", text))


def test_scene_facts_agree_with_the_rendered_pixels():
    """Every yes/no fact of an inventory, checked against the image itself: a colour is there if
    pixels of that colour are, a side or height if non-white pixels are; shapes against the drawn blobs."""
    import random

    from llava.demo import synthetic

    rng = random.Random(7)
    for _ in range(60):
        scene = rng.choice((synthetic.shapes_scene, synthetic.single_scene, synthetic.centred_scene))(rng)
        text = synthetic.inventory(rng, scene)
        assert text.startswith(synthetic.describe(scene) + " ")
        facts = _facts(text.replace(synthetic.describe(scene), ""))
        bare = synthetic.inventory(random.Random(1), scene, described=False)
        assert not bare.startswith("The image") and _facts(bare) == facts
        image = synthetic.render(scene).convert("RGB")
        raw = image.tobytes()
        pixels = [tuple(raw[k : k + 3]) for k in range(0, len(raw), 3)]
        half = synthetic.IMAGE_SIZE // 2
        for colour, rgb in synthetic.COLOURS.items():
            count = sum(max(abs(a - b) for a, b in zip(p, rgb)) < 40 for p in pixels)
            assert facts[colour] == ("yes" if count > 20 else "no"), (colour, text)
        ink = [(k % synthetic.IMAGE_SIZE, k // synthetic.IMAGE_SIZE) for k, p in enumerate(pixels) if min(p) < 200]
        if scene.kind == "shapes":
            assert facts["left"] == ("yes" if any(x < half for x, _ in ink) else "no"), text
            assert facts["right"] == ("yes" if any(x >= half for x, _ in ink) else "no"), text
            assert facts["top"] == ("yes" if any(y < half for _, y in ink) else "no"), text
            assert facts["bottom"] == ("yes" if any(y >= half for _, y in ink) else "no"), text
        for shape in SHAPE_WORDS:
            assert facts[shape] == ("yes" if any(b.shape == shape for b in scene.blobs) else "no")
        assert f"count {len(scene.blobs)}." in text
        # "left or right? left.": the named word is the one the facts say yes to, the other is a no.
        either_or = re.findall(r"(\w+) or (\w+)\? (\w+)\.", text)
        assert len(either_or) == (0 if len(scene.blobs) > 1 else 2 if scene.kind == "centred" else 4), text
        for first, second, named in either_or:
            other = second if named == first else first
            assert named in (first, second) and facts[named] == "yes" and facts[other] == "no", text


def test_worked_choice_facts_mark_only_the_right_option(data):
    facts = json.loads(data[1]["facts"].read_text())
    worked = [f for f in facts if "\nThe answer is " in f]
    assert worked and len(worked) < len(facts)
    for text in worked:
        letter = re.search(r"\nThe answer is ([A-D])\.$", text).group(1)
        options = re.findall(r"^([A-D])\. .* (yes|no)$", text, flags=re.M)
        assert [l for l, yes in options if yes == "yes"] == [letter], text
        assert [l for l, _ in options] == list(LETTERS[: len(options)])


def _signature(message: str) -> str:
    """A prompt with its variable parts blanked (question and hint lines, options, OCR tokens, context),
    runs of blanked lines counted once: what must match is the wording around them."""
    fixed = {"<image>", SHORT, UNANSWERABLE, LETTER}
    lines = []
    for line in message.split("\n"):
        if line in fixed:
            lines.append(line)
        elif re.match(r"[A-D]\. ", line):
            lines.append("X. ...")
        elif line.startswith(("Reference OCR token: ", "Context: ")):
            lines.append(line.split(":")[0] + ": ...")
        else:
            lines.append("...")
    return "\n".join(line for k, line in enumerate(lines) if k == 0 or line != lines[k - 1] or line in fixed)


def _eval_messages(eval_dir: Path) -> dict[str, list[str]]:
    """The user message of every evaluation prompt, built by the real generation scripts."""
    from llava.eval import model_vqa_loader, model_vqa_mmbench, model_vqa_science

    config = SimpleNamespace(mm_use_im_start_end=False)
    files = {"vqav2": "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "gqa": "gqa/llava_gqa_testdev_balanced.jsonl",
             "vizwiz": "vizwiz/llava_test.jsonl", "textvqa": "textvqa/llava_textvqa_val_v051_ocr.jsonl",
             "pope": "pope/llava_pope_test.jsonl"}
    requests = {name: model_vqa_loader.build_requests(model_vqa_loader.read_questions(str(eval_dir / path)), "",
                                                      "vicuna_v1", config)
                for name, path in files.items()}
    sqa = model_vqa_science.read_questions(str(eval_dir / "scienceqa/llava_test_CQM-A.json"))
    requests["scienceqa"] = model_vqa_science.build_requests(sqa, "", "vicuna_v1", config, True)
    table = model_vqa_mmbench.read_questions(str(eval_dir / "mmbench/mmbench_dev_20230712.tsv"))
    requests["mmbench"] = model_vqa_mmbench.build_requests(table, "vicuna_v1", config, True, False, "en")
    return {name: [r.prompt.split("USER: ", 1)[1].rsplit(" ASSISTANT:", 1)[0] for r in rs]
            for name, rs in requests.items()}


@pytest.mark.parametrize("benchmark", ["scienceqa", "mmbench"])
def test_the_number_of_options_does_not_give_the_letter_away(benchmark):
    """Among questions with k options, each letter is the answer about 1/k of the time, so always
    answering the last letter scores at chance (sum of 1/k), not more. Balancing the letters themselves
    would need four options for every "D" and made the last letter right 58% of the time."""
    import random

    from llava.demo.synthetic import draw_questions

    questions = [q for _, _, q in draw_questions(random.Random(7), benchmark, 3000)]
    by_options: dict[int, Counter] = {}
    for q in questions:
        by_options.setdefault(len(q.choices), Counter())[q.answer] += 1
    assert set(by_options) == {2, 3, 4}
    for k, letters in by_options.items():
        total = sum(letters.values())
        assert set(letters) == set(LETTERS[:k])
        for count in letters.values():  # binomial(total, 1/k): within 4 standard deviations
            assert abs(count - total / k) <= 4 * (total * (1 / k) * (1 - 1 / k)) ** 0.5, (k, letters)
    last = sum(q.answer == LETTERS[len(q.choices) - 1] for q in questions)
    chance = sum(1 / len(q.choices) for q in questions)
    assert abs(last - chance) <= 4 * chance ** 0.5, (last, chance)


def test_training_prompts_are_worded_as_the_evaluation_prompts(data, eval_dir):
    trained: dict[str, set[str]] = {}
    for sample in training_samples(data):
        trained.setdefault(sample["id"].split("-")[0], set()).add(_signature(sample["conversations"][0]["value"]))
    for benchmark, messages in _eval_messages(eval_dir).items():
        missing = {_signature(m) for m in messages} - trained[benchmark]
        assert not missing, f"{benchmark}: evaluation prompts never seen in training: {missing}"


def _eval_answers(eval_dir: Path) -> dict[str, set[str]]:
    """Every right answer of every benchmark, from the annotation files."""
    annotations = read_json(eval_dir / "vqav2/annotations.json")["annotations"]
    textvqa = read_json(eval_dir / "textvqa/TextVQA_0.5.1_val.json")["data"]
    return {
        "vqav2": {a["multiple_choice_answer"] for a in annotations},
        "gqa": {q["answer"] for q in read_json(eval_dir / "gqa/data/testdev_balanced_questions.json").values()},
        "vizwiz": {Counter(x["answer"] for x in a["answers"]).most_common(1)[0][0]
                   for a in read_json(eval_dir / "vizwiz/annotations.json")},
        "textvqa": {Counter(d["answers"]).most_common(1)[0][0] for d in textvqa},
        "pope": {r["label"] for c in POPE_CATEGORIES for r in read_jsonl(eval_dir / f"pope/coco/coco_pope_{c}.json")},
        "scienceqa": {LETTERS[p["answer"]] for p in read_json(eval_dir / "scienceqa/problems.json").values()},
        "mmbench": set(read_tsv(eval_dir / "mmbench/mmbench_dev_20230712.tsv")["answer"]),
    }


def test_training_answers_cover_every_evaluation_answer(data, eval_dir):
    trained: dict[str, set[str]] = {}
    for sample in training_samples(data):
        answers = trained.setdefault(sample["id"].split("-")[0], set())
        answers.update(normalize_answer(t["value"]) for t in sample["conversations"][1::2])
    for benchmark, answers in _eval_answers(eval_dir).items():
        missing = {normalize_answer(a) for a in answers} - trained[benchmark]
        assert not missing, f"{benchmark}: answers never trained: {missing}"


def test_corpus_holds_the_system_prompt_and_every_prompt_and_answer_line(data, eval_dir):
    lines = set(data[1]["corpus"].read_text().splitlines())
    assert SYSTEM in lines
    texts = [t["value"] for s in training_samples(data) for t in s["conversations"]]
    texts += [r["text"] for r in read_jsonl(eval_dir / "pope/llava_pope_test.jsonl")]
    texts += [s["conversations"][0]["value"] for s in json.loads(data[1]["pretrain"].read_text())]
    for text in texts:
        for line in text.replace("<image>", "").split("\n"):
            assert not line.strip() or line.strip() in lines, line
    assert set(_eval_answers(eval_dir)["vqav2"]) <= lines


# ---------------------------------------------------------------- evaluation files


def test_vqav2_files(eval_dir):
    test_dev = read_jsonl(eval_dir / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl")
    test = read_jsonl(eval_dir / "vqav2/llava_vqav2_mscoco_test2015.jsonl")
    assert len(test_dev) == SIZES["n_eval"] and len(test) > len(test_dev)
    assert all(q in test for q in test_dev)
    for q in test:
        assert set(q) == {"question_id", "image", "text", "category"} and isinstance(q["question_id"], int)
        assert q["text"].endswith(f"\n{SHORT}") and re.fullmatch(r"COCO_test2015_\d{12}\.jpg", q["image"])
        assert (eval_dir / "vqav2/test2015" / q["image"]).is_file()
    annotations = read_json(eval_dir / "vqav2/annotations.json")["annotations"]
    assert [a["question_id"] for a in annotations] == [q["question_id"] for q in test_dev]
    for a in annotations:
        assert len(a["answers"]) == 10 and {"answer", "answer_confidence", "answer_id"} <= set(a["answers"][0])
        assert a["answer_type"] in ("yes/no", "number", "other")


def test_gqa_files(eval_dir):
    lines = read_jsonl(eval_dir / "gqa/llava_gqa_testdev_balanced.jsonl")
    official = read_json(eval_dir / "gqa/data/testdev_balanced_questions.json")
    assert len(lines) == len(official) == SIZES["n_eval"]
    for line in lines:
        question = official[line["question_id"]]
        assert isinstance(line["question_id"], str) and line["image"] == question["imageId"] + ".jpg"
        assert line["text"] == f"{question['question']}\n{SHORT}"
        assert question["isBalanced"] is True and question["fullAnswer"] and question["answer"].islower()
        assert (eval_dir / "gqa/data/images" / line["image"]).is_file()


def test_vizwiz_files(eval_dir):
    lines = read_jsonl(eval_dir / "vizwiz/llava_test.jsonl")
    annotations = read_json(eval_dir / "vizwiz/annotations.json")
    assert [a["image"] for a in annotations] == [q["image"] for q in lines]
    for line, annotation in zip(lines, annotations):
        assert line["text"] == f"{annotation['question']}\n{UNANSWERABLE}\n{SHORT}"
        assert (eval_dir / "vizwiz/test" / line["image"]).is_file() and len(annotation["answers"]) == 10
    assert {a["answer_type"] for a in annotations} >= {"unanswerable", "other"}


def test_scienceqa_files(eval_dir):
    items = read_json(eval_dir / "scienceqa/llava_test_CQM-A.json")
    problems = read_json(eval_dir / "scienceqa/problems.json")
    assert read_json(eval_dir / "scienceqa/pid_splits.json")["test"] == [item["id"] for item in items]
    for item in items:
        problem = problems[item["id"]]
        human, gpt = item["conversations"]
        assert gpt == {"from": "gpt", "value": LETTERS[problem["answer"]]} and problem["split"] == "test"
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, problem["choices"]))
        assert human["value"].endswith(f"{problem['question']}\n{options}")
        if "image" in item:
            assert item["image"] == f"{item['id']}/image.png" and problem["image"] == "image.png"
            assert human["value"].startswith("<image>\n")
            assert (eval_dir / "scienceqa/images/test" / item["image"]).is_file()
        else:
            assert problem["image"] is None and "<image>" not in human["value"]
    assert {"image" in item for item in items} == {True, False}


def test_textvqa_files(eval_dir):
    lines = read_jsonl(eval_dir / "textvqa/llava_textvqa_val_v051_ocr.jsonl")
    data = {d["image_id"]: d for d in read_json(eval_dir / "textvqa/TextVQA_0.5.1_val.json")["data"]}
    assert len(lines) == len(data) == SIZES["n_eval"]
    for line in lines:
        annotation = data[line["question_id"]]
        question, ocr, instruction = line["text"].split("\n")
        assert re.fullmatch(r"[0-9a-f]{16}", line["question_id"]) and line["image"] == line["question_id"] + ".jpg"
        assert question == annotation["question"] and isinstance(annotation["question_id"], int)
        assert ocr.startswith("Reference OCR token: ") and instruction == SHORT
        answer = Counter(annotation["answers"]).most_common(1)[0][0]
        assert answer.isdigit() or answer in ocr.removeprefix("Reference OCR token: ").split(", ")
        assert len(annotation["answers"]) == 10 and (eval_dir / "textvqa/train_images" / line["image"]).is_file()


def test_pope_files(eval_dir):
    lines = read_jsonl(eval_dir / "pope/llava_pope_test.jsonl")
    assert len({q["question_id"] for q in lines}) == len(lines) == 3 * SIZES["n_eval"]
    for category in POPE_CATEGORIES:
        questions = [q for q in lines if q["category"] == category]
        labels = read_jsonl(eval_dir / f"pope/coco/coco_pope_{category}.json")
        assert Counter(label["label"] for label in labels) == {"yes": SIZES["n_eval"] // 2, "no": SIZES["n_eval"] // 2}
        for question, label in zip(questions, labels):
            assert set(label) == {"question_id", "image", "text", "label"} and question["image"] == label["image"]
            assert question["text"] == f"{label['text']}\n{SHORT}"
            assert re.fullmatch(r"Is there an? \w+ in the image\?", label["text"])
            assert (eval_dir / "pope/val2014" / label["image"]).is_file()


def test_mmbench_file(eval_dir):
    table = pd.read_csv(eval_dir / "mmbench/mmbench_dev_20230712.tsv", sep="\t")
    assert tuple(table.columns) == MMBENCH_COLUMNS and table["index"].is_unique
    questions = table[table["index"] < 1_000_000]
    assert len(questions) == SIZES["n_eval"] and table["D"].isna().any() and table["hint"].isna().any()
    assert list(table["index"][:len(questions)]) == list(questions["index"])  # the copies come after
    for row in table.to_dict("records"):
        assert isinstance(row[row["answer"]], str), "the answer must name a present option"
        with Image.open(io.BytesIO(base64.b64decode(row["image"]))) as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    # As the real TSV: question g with n options has copies g + k * 10^6 (k < n), its options shifted up k
    # letters, the same question, hint and image, and an answer letter naming the same option text.
    rows = {row["index"]: row for row in table.to_dict("records")}
    for question in questions.to_dict("records"):
        options = [question[c] for c in "ABCD" if isinstance(question[c], str)]
        for k in range(1, 5):
            copy = rows.pop(question["index"] + k * 1_000_000, None)
            assert (copy is not None) == (k < len(options)), (question["index"], k)
            if copy is None:
                continue
            assert [copy[c] for c in "ABCD"[:len(options)]] == options[k:] + options[:k]
            assert copy[copy["answer"]] == question[question["answer"]]
            assert all(copy[c] == question[c] or pd.isna(copy[c]) and pd.isna(question[c])
                       for c in ("question", "hint", "image"))
        rows.pop(question["index"])
    assert not rows, "every row is a question or one of its copies"


def test_mmbench_copies_are_the_prompts_that_all_rounds_would_ask(eval_dir):
    """Asking every row once asks what ``--all-rounds`` asks of the questions alone: the same prompts."""
    from llava.eval import model_vqa_mmbench

    config = SimpleNamespace(mm_use_im_start_end=False)
    table = model_vqa_mmbench.read_questions(str(eval_dir / "mmbench/mmbench_dev_20230712.tsv"))
    questions = table[table["index"].astype(int) < 1_000_000]
    each_row = model_vqa_mmbench.build_requests(table, "vicuna_v1", config, True, False, "en")
    rotated = model_vqa_mmbench.build_requests(questions, "vicuna_v1", config, True, True, "en")
    assert len(each_row) == len(rotated) > len(questions)
    assert model_vqa_mmbench.circular_copies(table) == len(table) - len(questions)  # what --all-rounds warns of
    assert Counter(r.prompt for r in each_row) == Counter(r.prompt for r in rotated)


# ---------------------------------------------------------------- scoring through the real scorers


def _vqa_style_answers(questions: list[dict], truth: dict[Any, str], right: bool) -> list[dict]:
    return [{"question_id": q["question_id"], "prompt": q["text"], "text": truth[q["question_id"]] if right else WRONG}
            for q in questions]


def _mode(answers: list[str]) -> str:
    return Counter(answers).most_common(1)[0][0]


def score_vqav2(eval_dir: Path, tmp_path: Path, right: bool) -> float:
    folder = eval_dir / "vqav2"
    questions = read_jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl")
    annotations = read_json(folder / "annotations.json")["annotations"]
    truth = {a["question_id"]: a["multiple_choice_answer"] for a in annotations}
    answers = write_answers(tmp_path / "vqav2.jsonl", _vqa_style_answers(questions, truth, right))
    upload = tmp_path / "vqav2_upload.json"
    load_script("convert_vqav2_for_submission").main([
        "--answers-file", str(answers), "--question-file", str(folder / "llava_vqav2_mscoco_test-dev2015.jsonl"),
        "--test-split-file", str(folder / "llava_vqav2_mscoco_test2015.jsonl"), "--output-file", str(upload)])
    uploaded = read_json(upload)
    test_split = read_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl")
    assert [u["question_id"] for u in uploaded] == [q["question_id"] for q in test_split]
    assert sum(u["answer"] == "" for u in uploaded) == len(uploaded) - len(questions)
    _, by_id = load_annotations(folder / "annotations.json")
    return vqa_accuracy(by_id, predictions_from_upload("vqav2", upload))["accuracy"]


def score_vizwiz(eval_dir: Path, tmp_path: Path, right: bool) -> float:
    folder = eval_dir / "vizwiz"
    questions = read_jsonl(folder / "llava_test.jsonl")
    modes = {a["image"]: _mode([x["answer"] for x in a["answers"]]) for a in read_json(folder / "annotations.json")}
    truth = {q["question_id"]: "Unanswerable" if modes[q["image"]] == "unanswerable" else modes[q["image"]]
             for q in questions}
    answers = write_answers(tmp_path / "vizwiz.jsonl", _vqa_style_answers(questions, truth, right))
    upload = tmp_path / "vizwiz_upload.json"
    load_script("convert_vizwiz_for_submission").main([
        "--annotation-file", str(folder / "llava_test.jsonl"), "--result-file", str(answers),
        "--result-upload-file", str(upload)])
    _, annotations = load_annotations(folder / "annotations.json")
    return vqa_accuracy(annotations, predictions_from_upload("vizwiz", upload))["accuracy"]


def score_gqa(eval_dir: Path, tmp_path: Path, right: bool) -> float:
    official = read_json(eval_dir / "gqa/data/testdev_balanced_questions.json")
    questions = read_jsonl(eval_dir / "gqa/llava_gqa_testdev_balanced.jsonl")
    truth = {qid: q["answer"].capitalize() + "." for qid, q in official.items()}  # as a model says it: "Left."
    answers = write_answers(tmp_path / "gqa.jsonl", _vqa_style_answers(questions, truth, right))
    predictions = tmp_path / "testdev_balanced_predictions.json"
    load_script("convert_gqa_for_eval").main(["--src", str(answers), "--dst", str(predictions)])
    return gqa_accuracy(official, read_json(predictions))[0]


def score_textvqa(eval_dir: Path, tmp_path: Path, right: bool) -> float:
    questions = read_jsonl(eval_dir / "textvqa/llava_textvqa_val_v051_ocr.jsonl")
    annotation_file = eval_dir / "textvqa/TextVQA_0.5.1_val.json"
    truth = {d["image_id"]: _mode(d["answers"]) for d in read_json(annotation_file)["data"]}
    answers = write_answers(tmp_path / "textvqa.jsonl", _vqa_style_answers(questions, truth, right))
    return textvqa_accuracy(annotation_file, answers)[0]


def score_pope(eval_dir: Path, tmp_path: Path, right: bool) -> float:
    question_file = eval_dir / "pope/llava_pope_test.jsonl"
    questions = read_jsonl(question_file)
    truth = {}
    for category in POPE_CATEGORIES:
        labels = read_jsonl(eval_dir / f"pope/coco/coco_pope_{category}.json")
        for question, label in zip([q for q in questions if q["category"] == category], labels):
            flipped = {"yes": "no", "no": "yes"}[label["label"]]
            truth[question["question_id"]] = (label["label"] if right else flipped).capitalize()
    answers = write_answers(tmp_path / "pope.jsonl", _vqa_style_answers(questions, truth, True))
    results = evaluate_pope(eval_dir / "pope/coco", question_file, answers)
    assert set(results) == set(POPE_CATEGORIES)
    return 100 * sum(m["f1"] for m in results.values()) / len(results)


def score_scienceqa(eval_dir: Path, tmp_path: Path, right: bool) -> float:
    problems = read_json(eval_dir / "scienceqa/problems.json")
    records = []
    for item in read_json(eval_dir / "scienceqa/llava_test_CQM-A.json"):
        letter = LETTERS[problems[item["id"]]["answer"]]
        text = letter if right else LETTERS[(LETTERS.index(letter) + 1) % len(problems[item["id"]]["choices"])]
        prompt = f"{item['conversations'][0]['value']}\n{LETTER}"
        records.append({"question_id": item["id"], "prompt": prompt, "text": text})
    scored = score_science_qa(eval_dir / "scienceqa", write_answers(tmp_path / "sqa.jsonl", records))
    assert scored["total"] == SIZES["n_eval"] and scored["img_accuracy"] == scored["accuracy"]
    return scored["accuracy"]


def score_mmbench(eval_dir: Path, tmp_path: Path, right: bool) -> float:
    tsv_path = eval_dir / "mmbench/mmbench_dev_20230712.tsv"
    table = pd.read_table(tsv_path, dtype=str)
    records = []
    for row in table.to_dict("records"):  # every row once (the questions and their circular copies)
        options = [row[c] for c in "ABCD" if isinstance(row[c], str)]
        chars = list("ABCD"[: len(options)])
        position = chars.index(row["answer"]) + (0 if right else 1)
        records.append({"question_id": int(row["index"]), "round_id": 0, "prompt": row["question"],
                        "text": "ABCD"[position % len(chars)], "options": options, "option_char": chars})
    answers = write_answers(tmp_path / "mmbench.jsonl", records)
    load_script("convert_mmbench_for_submission").main([
        "--annotation-file", str(tsv_path), "--result-dir", str(tmp_path), "--upload-dir", str(tmp_path / "upload"),
        "--experiment", "mmbench"])
    upload = pd.read_excel(tmp_path / "upload" / "mmbench.xlsx")
    assert len(upload) == len(table) and list(upload.columns)[6] == "prediction"
    metrics = mmbench_accuracy(read_tsv(tsv_path), read_jsonl(answers))
    assert metrics["circular_accuracy"] is not None and metrics["questions"] == SIZES["n_eval"]
    return metrics["circular_accuracy"]


SCORERS = {"vqav2": score_vqav2, "gqa": score_gqa, "vizwiz": score_vizwiz, "scienceqa": score_scienceqa,
           "textvqa": score_textvqa, "pope": score_pope, "mmbench": score_mmbench}


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_right_answers_score_100_and_wrong_answers_0(benchmark, eval_dir, tmp_path):
    assert SCORERS[benchmark](eval_dir, tmp_path, right=True) == pytest.approx(100.0)
    assert SCORERS[benchmark](eval_dir, tmp_path, right=False) == pytest.approx(0.0)
