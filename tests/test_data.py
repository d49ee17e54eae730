"""Training data pipeline: prompts, label masks from character spans, images, bad data, collation."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava import conversation as conversation_lib
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token
from llava.train import data as data_lib
from llava.train.data import (
    BadSamplesError,
    DataArguments,
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    UnreadableImageError,
    build_conversation_prompt,
    make_supervised_data_module,
    preprocess,
    preprocess_multimodal,
    tokenize_with_offsets,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def load_tokenizer(folder: Path, **kwargs):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(folder), **kwargs)


@pytest.fixture(scope="module")
def legacy_tokenizer_dir(tiny_llama_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same vocabulary with `legacy: true`, the setting LLaVA-1.5's transformers 4.31 behaved like."""
    folder = tmp_path_factory.mktemp("tiny_llama_tokenizer_legacy")
    shutil.copy(tiny_llama_tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    config = json.loads((tiny_llama_tokenizer_dir / "tokenizer_config.json").read_text())
    config["legacy"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["non_legacy", "legacy"])
def tokenizer_dir(request, tiny_llama_tokenizer_dir: Path, legacy_tokenizer_dir: Path) -> Path:
    return tiny_llama_tokenizer_dir if request.param == "non_legacy" else legacy_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    """A private copy (tests change model_max_length / pad), with pad = unk as LLaVA's trainer sets it."""
    tok = load_tokenizer(tokenizer_dir)
    tok.pad_token = tok.unk_token
    return tok


@pytest.fixture
def template(monkeypatch):
    """Select the training template the way the trainer does (`default_conversation = conv_templates[v]`)."""

    def use(name: str) -> None:
        monkeypatch.setattr(conversation_lib, "default_conversation", conversation_lib.conv_templates[name])

    use("vicuna_v1")
    return use


@pytest.fixture(scope="module")
def processor(clip_processor):
    return clip_processor


def turns(*texts: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(texts)]


def supervised_runs(input_ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of supervised tokens (labels equal to the input ids there)."""
    runs: list[list[int]] = []
    current: list[int] = []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return runs


def write_dataset(folder: Path, samples: list[dict]) -> Path:
    path = folder / "data.json"
    path.write_text(json.dumps(samples))
    return path


def make_args(tmp_path: Path, processor, **kwargs) -> DataArguments:
    args = DataArguments(
        data_path=str(tmp_path / "data.json"), is_multimodal=True, image_folder=str(tmp_path / "images")
    )
    for key, value in kwargs.items():
        setattr(args, key, value)
    args.image_processor = processor
    return args


def make_dataset(tmp_path: Path, tokenizer, processor, **kwargs) -> LazySupervisedDataset:
    return LazySupervisedDataset(str(tmp_path / "data.json"), tokenizer, make_args(tmp_path, processor, **kwargs))


def save_image(folder: Path, name: str, size=(32, 32), colour=(255, 0, 0)) -> None:
    path = folder / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# ---------------------------------------------------------------------------------------------------
# Prompts and label masks


def test_vicuna_v1_prompt_of_two_turns():
    source = turns("<image>\nWhat is on the table?", "A red cup.", "How many?", "There are 2.")
    prompt, spans = build_conversation_prompt(source, conversation_lib.conv_templates["vicuna_v1"], "s0")
    assert prompt == (
        SYSTEM
        + " USER: <image>\nWhat is on the table? ASSISTANT: A red cup.</s>"
        + "USER: How many? ASSISTANT: There are 2.</s>"
    )
    assert [prompt[a:b] for a, b in spans] == [" A red cup.</s>", " There are 2.</s>"]


def test_first_turn_not_from_human_is_dropped():
    source = [{"from": "gpt", "value": "Hello."}] + turns("Is it red?", "Yes.")
    prompt, spans = build_conversation_prompt(source, conversation_lib.conv_templates["vicuna_v1"], "s0")
    assert prompt == SYSTEM + " USER: Is it red? ASSISTANT: Yes.</s>"
    assert [prompt[a:b] for a, b in spans] == [" Yes.</s>"]


CONVERSATIONS = {
    "single": turns("<image>\nWhat is the man holding?", "The man is holding a blue cup."),
    "multi": turns(
        "<image>\nDescribe the picture.",
        "There are 3 dogs near a tree,\nand a car on the left!",
        "What color is the car?",
        "Yellow.",
        "Is there a bird?",
        "no",
    ),
}


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_supervised_tokens_decode_to_the_answers(tokenizer, template, kind, with_image):
    source = [dict(turn) for turn in CONVERSATIONS[kind]]
    if not with_image:
        source[0]["value"] = source[0]["value"].replace("<image>\n", "")
    answers = [turn["value"] for turn in source[1::2]]
    out = preprocess([source], tokenizer, has_image=with_image)
    input_ids, labels = out["input_ids"][0], out["labels"][0]
    runs = supervised_runs(input_ids, labels)
    assert [tokenizer.decode(run) for run in runs] == [answer + "</s>" for answer in answers]
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)
    prompt, _ = build_conversation_prompt(source, conversation_lib.default_conversation, "s")
    expected = tokenizer_image_token(prompt, tokenizer) if with_image else tokenizer(prompt).input_ids
    assert input_ids.tolist() == expected
    assert input_ids.tolist().count(IMAGE_TOKEN_INDEX) == (1 if with_image else 0)


def original_v1_labels(prompt: str, tokenizer, has_image: bool) -> tuple[list[int], bool]:
    """LLaVA-1.5's own masking (per-round token counting), as a reference: (labels, mismatch)."""
    conv = conversation_lib.default_conversation

    def tokenize(text: str) -> list[int]:
        return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids

    input_ids = tokenize(prompt)
    labels = list(input_ids)
    answer_prefix = conv.sep + conv.roles[1] + ": "
    cur_len = 1
    labels[0] = IGNORE_INDEX
    for round_text in prompt.split(conv.sep2):
        parts = round_text.split(answer_prefix)
        if round_text == "" or len(parts) != 2:
            break
        instruction_len = len(tokenize(parts[0] + answer_prefix)) - 2
        labels[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += len(tokenize(round_text))
    labels[cur_len:] = [IGNORE_INDEX] * (len(labels) - cur_len)
    return labels, cur_len != len(input_ids)


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_labels_match_the_original_wherever_its_token_counting_worked(tokenizer, template, kind, with_image):
    """Same labels as LLaVA-1.5; its counting only breaks on multi-turn samples with a non-legacy tokenizer."""
    source = [dict(turn) for turn in CONVERSATIONS[kind]]
    if not with_image:
        source[0]["value"] = source[0]["value"].replace("<image>\n", "")
    prompt, _ = build_conversation_prompt(source, conversation_lib.default_conversation, "s")
    reference, mismatch = original_v1_labels(prompt, tokenizer, with_image)
    assert mismatch == (kind == "multi" and not tokenizer.legacy)
    if not mismatch:
        assert preprocess([source], tokenizer, has_image=with_image)["labels"][0].tolist() == reference


def test_eos_split_fallback_gives_the_same_tokens_for_a_legacy_tokenizer(legacy_tokenizer_dir, template, monkeypatch):
    """A tokenizer that reads "</s>" as characters gets the EOS id inserted; a legacy one matches exactly."""
    tokenizer = load_tokenizer(legacy_tokenizer_dir)
    source = CONVERSATIONS["multi"]
    native = preprocess([source], tokenizer, has_image=True)
    monkeypatch.setattr(data_lib, "_eos_text_is_special", lambda tok: False)
    split = preprocess([source], tokenizer, has_image=True)
    assert torch.equal(native["input_ids"][0], split["input_ids"][0])
    assert torch.equal(native["labels"][0], split["labels"][0])


def test_image_token_appears_once_where_the_tag_was(tokenizer):
    prompt = SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
    ids, offsets = tokenize_with_offsets(prompt, tokenizer, has_image=True)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    position = ids.index(IMAGE_TOKEN_INDEX)
    start = prompt.index("<image>")
    assert offsets[position] == (start, start + len("<image>"))
    assert tokenizer.decode(ids[1:position]) == prompt[:start]
    assert all(end <= start for _, end in offsets[:position])
    assert all(begin >= start + len("<image>") for begin, _ in offsets[position + 1 :])


def test_image_token_is_never_supervised(tokenizer, template):
    source = turns("What is it?", "<image>\nA cat.")
    labels = preprocess([source], tokenizer, has_image=True)["labels"][0]
    assert IMAGE_TOKEN_INDEX not in labels.tolist()


def test_plain_template_supervises_only_the_caption_and_newline(tokenizer, template):
    template("plain")
    caption = "A small dog under a green tree."
    source = turns("<image>\nDescribe it.", caption)
    out = preprocess([source], tokenizer)
    input_ids, labels = out["input_ids"][0], out["labels"][0]
    assert input_ids.tolist() == tokenizer_image_token("<image>" + caption + "\n", tokenizer)
    assert input_ids[:2].tolist() == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert (labels[:2] == IGNORE_INDEX).all()
    assert torch.equal(labels[2:], input_ids[2:])
    assert tokenizer.decode(input_ids[2:]) == caption + "\n"


def test_plain_template_needs_an_image_turn_pair(tokenizer, template):
    template("plain")
    with pytest.raises(ValueError, match="cap-7.*image"):
        preprocess([turns("Describe it.", "A dog.")], tokenizer, sample_ids=["cap-7"])


def test_llama_2_answers_keep_their_closing_eos(tokenizer, template):
    template("llava_llama_2")
    out = preprocess([CONVERSATIONS["multi"]], tokenizer, has_image=True)
    runs = supervised_runs(out["input_ids"][0], out["labels"][0])
    answers = [turn["value"] for turn in CONVERSATIONS["multi"][1::2]]
    assert [tokenizer.decode(run) for run in runs] == [answer + " </s>" for answer in answers]


def test_truncation_keeps_lengths_within_model_max_length(tokenizer_dir, template):
    tokenizer = load_tokenizer(tokenizer_dir)
    full = preprocess([CONVERSATIONS["multi"]], tokenizer, has_image=True)["input_ids"][0]
    tokenizer.model_max_length = len(full) - 5
    out = preprocess([CONVERSATIONS["multi"]], tokenizer, has_image=True)
    assert len(out["input_ids"][0]) == len(out["labels"][0]) == len(full) - 5
    assert torch.equal(out["input_ids"][0], full[: len(full) - 5])
    assert (out["labels"][0] != IGNORE_INDEX).any()


def test_fully_truncated_sample_is_kept_unsupervised_with_a_warning(tokenizer_dir, template, caplog):
    tokenizer = load_tokenizer(tokenizer_dir, model_max_length=12)
    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        out = preprocess([CONVERSATIONS["single"]], tokenizer, has_image=True, sample_ids=["long-42"])
    assert len(out["input_ids"][0]) == 12
    assert (out["labels"][0] == IGNORE_INDEX).all()
    assert "long-42" in caplog.text


def test_empty_answer_gives_no_supervision_and_a_warning(tokenizer, template, caplog):
    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        out = preprocess([turns("Hello?", "")], tokenizer, sample_ids=["empty-1"])
    assert (out["labels"][0] == IGNORE_INDEX).all()
    assert "empty-1" in caplog.text


def test_non_alternating_roles_name_the_sample(tokenizer, template):
    source = [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Again"}]
    with pytest.raises(ValueError, match="bad-roles.*alternate"):
        preprocess([source], tokenizer, sample_ids=["bad-roles"])


def test_preprocess_multimodal_moves_the_image_tag_to_the_front():
    sources = [turns("What is this?\n<image>", "A cat.")]
    out = preprocess_multimodal(sources, DataArguments(is_multimodal=True))
    assert out[0][0]["value"] == "<image>\nWhat is this?"
    assert out[0][1]["value"] == "A cat."


# ---------------------------------------------------------------------------------------------------
# Dataset: images and bad data


def image_sample(sample_id: str, image: str) -> dict:
    return {"id": sample_id, "image": image, "conversations": turns("<image>\nWhat is it?", "A red square.")}


def test_dataset_item_with_image(tmp_path, tokenizer, template, processor):
    save_image(tmp_path, "coco/a.png")
    write_dataset(tmp_path, [image_sample("a", "coco/a.png")])
    dataset = make_dataset(tmp_path, tokenizer, processor)
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32)
    assert item["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) == 1
    runs = supervised_runs(item["input_ids"], item["labels"])
    assert [tokenizer.decode(run) for run in runs] == ["A red square.</s>"]


def test_text_only_sample_gets_a_zero_image_in_multimodal_mode(tmp_path, tokenizer, template, processor):
    write_dataset(tmp_path, [{"id": "t", "conversations": turns("Hi?", "Hello.")}])
    dataset = make_dataset(tmp_path, tokenizer, processor)
    image = dataset[0]["image"]
    assert image.shape == (3, 32, 32) and not image.any()
    plain = make_dataset(tmp_path, tokenizer, processor, is_multimodal=False)
    assert "image" not in plain[0]


def test_pad_mode_fills_with_the_mean_colour(tmp_path, tokenizer, template, processor):
    save_image(tmp_path, "wide.png", size=(32, 8), colour=(255, 0, 0))
    write_dataset(tmp_path, [image_sample("w", "wide.png")])
    padded = make_dataset(tmp_path, tokenizer, processor, image_aspect_ratio="pad")[0]["image"]
    for c in range(3):
        background = int(CLIP_MEAN[c] * 255) / 255
        assert padded[c, 0, 0].item() == pytest.approx((background - CLIP_MEAN[c]) / CLIP_STD[c], abs=1e-5)
        assert padded[c, 0, 0].item() == pytest.approx(0.0, abs=0.02)
        red = 1.0 if c == 0 else 0.0
        assert padded[c, 16, 16].item() == pytest.approx((red - CLIP_MEAN[c]) / CLIP_STD[c], abs=1e-5)
    cropped = make_dataset(tmp_path, tokenizer, processor)[0]["image"]
    assert cropped[0, 0, 0].item() == pytest.approx((1.0 - CLIP_MEAN[0]) / CLIP_STD[0], abs=1e-5)


def test_corrupt_image_at_decode_time_names_file_item_id_path_and_the_flag(tmp_path, tokenizer, template, processor):
    """A file that exists passes the check (stat only); decoding it names everything needed to fix it."""
    save_image(tmp_path, "good.png")
    (tmp_path / "images" / "coco").mkdir()
    (tmp_path / "images" / "coco" / "broken.png").write_text("not an image")
    write_dataset(tmp_path, [image_sample("good", "good.png"), image_sample("bad-2", "coco/broken.png")])
    dataset = make_dataset(tmp_path, tokenizer, processor)
    with pytest.raises(UnreadableImageError) as caught:
        dataset[1]
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'data.json'}: item 1 (id bad-2): image 'coco/broken.png' cannot be decoded")
    assert str(tmp_path / "images" / "coco" / "broken.png") in message
    assert "--skip_bad_samples" in message


def test_image_removed_after_the_check_names_file_item_and_id(tmp_path, tokenizer, template, processor):
    save_image(tmp_path, "a.png")
    write_dataset(tmp_path, [image_sample("gone-5", "a.png")])
    dataset = make_dataset(tmp_path, tokenizer, processor)
    (tmp_path / "images" / "a.png").unlink()
    expected = r"data\.json: item 0 \(id gone-5\): image 'a\.png' not found.*--skip_bad_samples"
    with pytest.raises(FileNotFoundError, match=expected):
        dataset[0]


def test_malformed_json_names_file_and_line(tmp_path, tokenizer, processor):
    path = tmp_path / "broken_data.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]')
    with pytest.raises(ValueError, match=r"broken_data\.json.*line 3"):
        LazySupervisedDataset(str(path), tokenizer, make_args(tmp_path, processor))


def test_top_level_not_a_list_is_reported_at_load(tmp_path, tokenizer, processor):
    write_dataset(tmp_path, {"id": "a"})
    with pytest.raises(ValueError, match=r"data\.json: the top level must be a JSON list"):
        make_dataset(tmp_path, tokenizer, processor)


def test_skip_bad_samples_skips_undecodable_images_during_training(tmp_path, tokenizer, template, processor, caplog):
    """Decode failures are skipped as they come (the next sample is returned); ids counted in `skipped`."""
    save_image(tmp_path, "good.png")
    (tmp_path / "images" / "broken.png").write_text("not an image")
    samples = [
        image_sample("missing", "gone.png"),
        image_sample("broken", "broken.png"),
        image_sample("good", "good.png"),
        image_sample("broken-too", "broken.png"),
    ]
    write_dataset(tmp_path, samples)
    dataset = make_dataset(tmp_path, tokenizer, processor, skip_bad_samples=True)
    assert len(dataset) == 3 and dataset.item_indices == [1, 2, 3]
    good = dataset[1]
    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        first = dataset[0]
        wrapped = dataset[2]
    assert torch.equal(first["input_ids"], good["input_ids"]) and torch.equal(wrapped["image"], good["image"])
    assert dataset.skipped == ["broken", "broken-too", "broken"]
    assert "item 1 (id broken)" in caplog.text and "item 3 (id broken-too)" in caplog.text
    assert "pass --skip_bad_samples" not in caplog.text


def test_modality_lengths_are_negative_for_text_only(tmp_path, tokenizer, processor):
    save_image(tmp_path, "a.png")
    samples = [image_sample("i", "a.png"), {"id": "t", "conversations": turns("One two three", "Four five")}]
    write_dataset(tmp_path, samples)
    dataset = make_dataset(tmp_path, tokenizer, processor)
    image_words = len("<image>\nWhat is it?".split()) + len("A red square.".split())
    assert dataset.modality_lengths == [image_words, -5]
    assert dataset.lengths == [image_words + 128, 5]


# ---------------------------------------------------------------------------------------------------
# Checks over the whole data file, before training
#
# Timing (a note, not an assertion): 100k generated items in the mix665k shape (73k with an image,
# 64k distinct empty files in six folders, 1-5 rounds each), on a busy 2-core machine with a warm file
# cache, are checked in 1.1-1.9 s: 0.55-1.1 s for the items, 0.12-0.26 s for the image files (one
# isfile per file instead: 0.27 s); reading the 46 MB JSON takes another 1-2 s. The same files
# referenced by 665k items: 4.5 s to check, 16 s for make_supervised_data_module with the JSON read.


def good_text(sample_id: str = "text-ok") -> dict:
    return {"id": sample_id, "conversations": turns("Hi?", "Hello.")}


BAD_ITEMS = {
    "missing image": (
        image_sample("m-1", "coco/absent.png"),
        "image 'coco/absent.png' not found under --image_folder",
    ),
    "missing folder": (
        image_sample("m-2", "ocr_vqa/images/1.jpg"),
        "image 'ocr_vqa/images/1.jpg' not found: there is no folder 'ocr_vqa/images' under --image_folder",
    ),
    "path outside the folder": (image_sample("m-3", "../x.png"), "image path '../x.png' leads outside --image_folder"),
    "image not a string": (
        {"id": "m-4", "image": ["a.png"], "conversations": turns("<image>\nWhat?", "A.")},
        "'image' is ['a.png']; it must be a path",
    ),
    "tag without field": (
        {"id": "t-1", "conversations": turns("<image>\nWhat is it?", "A cat.")},
        "1 <image> tag(s) in its conversation but no 'image' field",
    ),
    "field without tag": (
        {"id": "t-2", "image": "a.png", "conversations": turns("What is it?", "A cat.")},
        "has an 'image' but 0 <image> tags; it needs exactly one",
    ),
    "two tags": (
        {
            "id": "t-3",
            "image": "a.png",
            "conversations": turns("<image>\nWhat?", "A cat.", "<image>\nAnd now?", "A dog."),
        },
        "has an 'image' but 2 <image> tags; it needs exactly one",
    ),
    "tag in an answer": (
        {"id": "t-4", "image": "a.png", "conversations": turns("What is it?", "<image>\nA cat.")},
        "its <image> tag is in a 'gpt' answer",
    ),
    "empty conversation": ({"id": "c-1", "conversations": []}, "'conversations' is empty"),
    "only a human turn": ({"id": "c-2", "conversations": turns("Hi?")}, "no non-empty 'gpt' answer"),
    "only a gpt turn (dropped)": (
        {"id": "c-3", "conversations": [{"from": "gpt", "value": "Hello."}]},
        "no non-empty 'gpt' answer after the human turn (a first turn not from 'human' is dropped)",
    ),
    "blank answers": ({"id": "c-4", "conversations": turns("", " ")}, "no non-empty 'gpt' answer"),
    "conversations a dict": (
        {"id": "c-5", "conversations": {"from": "human", "value": "Hi"}},
        "'conversations' is a dict, not a list",
    ),
    "conversations a string": ({"id": "c-6", "conversations": "Hi"}, "'conversations' is a str, not a list"),
    "no conversations": ({"id": "c-7"}, "has no 'conversations'"),
    "turn not an object": ({"id": "c-8", "conversations": ["Hi", "Hello"]}, "turn 0 must be an object"),
    "value not a string": (
        {"id": "c-9", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": None}]},
        "turn 1 must be an object with a string 'from' and a string 'value'",
    ),
    "roles": (
        {"id": "c-10", "conversations": turns("Hi", "Hello", "Bye") + turns("x")},
        "roles must alternate human/gpt, but turn 3 is from 'human'",
    ),
    "item not an object": (["not", "a", "sample"], "is a JSON list, not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_item_is_reported_before_training_with_file_index_and_id(tmp_path, tokenizer, processor, case):
    bad, expected = BAD_ITEMS[case]
    save_image(tmp_path, "a.png")
    save_image(tmp_path, "coco/other.png")
    write_dataset(tmp_path, [good_text(), bad, image_sample("img-ok", "a.png")])
    with pytest.raises(BadSamplesError) as caught:
        make_dataset(tmp_path, tokenizer, processor)
    message = str(caught.value)
    sample_id = bad["id"] if isinstance(bad, dict) else "#1"
    assert message.startswith(f"{tmp_path / 'data.json'}: 1 of 3 samples are bad")
    assert "--skip_bad_samples" in message
    assert f"\n  item 1 (id {sample_id}): {expected}" in message


def test_every_problem_is_counted_and_the_first_twenty_listed(tmp_path, tokenizer, processor):
    save_image(tmp_path, "coco/other.png")
    samples = [good_text()]
    samples += [image_sample(f"miss-{k}", f"coco/{k}.png") for k in range(15)]
    samples += [{"id": f"empty-{k}", "conversations": []} for k in range(10)]
    write_dataset(tmp_path, samples)
    with pytest.raises(BadSamplesError) as caught:
        make_dataset(tmp_path, tokenizer, processor)
    lines = str(caught.value).splitlines()
    assert "25 of 26 samples are bad (image file: 15, conversation: 10)" in lines[0]
    assert "The first 20:" in lines[0]
    assert [line.split(":")[0] for line in lines[1:21]] == [f"  item {k} (id miss-{k - 1})" for k in range(1, 16)] + [
        f"  item {k} (id empty-{k - 16})" for k in range(16, 21)
    ]
    assert lines[21:] == ["  ... and 5 more"]


def test_skip_bad_samples_drops_bad_items_before_training(tmp_path, tokenizer, template, processor, caplog):
    save_image(tmp_path, "a.png")
    samples = [good_text("t0"), image_sample("gone", "b.png"), image_sample("i2", "a.png")]
    samples += [{"id": "empty", "conversations": []}]
    samples += [{"id": f"tag-{k}", "conversations": turns("<image>\nHi", "Hello.")} for k in range(6)]
    write_dataset(tmp_path, samples)
    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        dataset = make_dataset(tmp_path, tokenizer, processor, skip_bad_samples=True)
    assert len(dataset) == 2 and dataset.item_indices == [0, 2]
    assert [s["id"] for s in dataset.list_data_dict] == ["t0", "i2"]
    assert [(p.index, p.sample_id, p.kind) for p in dataset.dropped][:3] == [
        (1, "gone", "image file"),
        (3, "empty", "conversation"),
        (4, "tag-0", "<image> tag"),
    ]
    warning = caplog.text
    assert "data.json: --skip_bad_samples: dropping 8 of 10 samples before training" in warning
    assert "<image> tag: 6, image file: 1, conversation: 1" in warning
    assert "item 1 (id gone)" in warning and "item 6 (id tag-2)" in warning and "tag-3" not in warning
    assert dataset.modality_lengths[1] > 0 and dataset[1]["image"].shape == (3, 32, 32)


def test_no_kept_sample_has_a_zero_modality_length(tmp_path, tokenizer, processor):
    """Blank conversations are dropped up front, so length grouping never meets a zero length."""
    samples = [good_text(), {"id": "blank", "conversations": turns(" ", "")}, {"id": "empty", "conversations": []}]
    write_dataset(tmp_path, samples)
    dataset = make_dataset(tmp_path, tokenizer, processor, skip_bad_samples=True)
    assert dataset.modality_lengths == [-2] and [p.sample_id for p in dataset.dropped] == ["blank", "empty"]


def test_skip_bad_samples_with_nothing_left_fails(tmp_path, tokenizer, processor):
    write_dataset(tmp_path, [{"id": "empty", "conversations": []}])
    with pytest.raises(BadSamplesError, match=r"data\.json: no sample to train on \(1 in the file, all dropped\)"):
        make_dataset(tmp_path, tokenizer, processor, skip_bad_samples=True)


@pytest.mark.parametrize("skip", [False, True])
def test_images_without_an_image_folder_fail_whatever_the_skip_flag(tmp_path, tokenizer, processor, skip):
    """Dropping every image sample is never what was meant: a missing --image_folder is not skippable."""
    write_dataset(tmp_path, [image_sample("i", "a.png"), good_text()])
    with pytest.raises(ValueError, match=r"data\.json: 1 samples have an 'image' but no --image_folder"):
        make_dataset(tmp_path, tokenizer, processor, image_folder=None, skip_bad_samples=skip)
    with pytest.raises(ValueError, match=r"--image_folder .*elsewhere is not a folder"):
        make_dataset(tmp_path, tokenizer, processor, image_folder=str(tmp_path / "elsewhere"), skip_bad_samples=skip)


def test_image_check_stats_what_a_folder_listing_cannot_show(tmp_path, tokenizer, processor, monkeypatch):
    """An unlistable folder (or a name the listing spells differently) falls back to one stat per file."""
    save_image(tmp_path, "coco/a.png")
    write_dataset(tmp_path, [image_sample("a", "coco/a.png"), image_sample("b", "coco/b.png")])

    def refuse(path):
        raise PermissionError(path)

    monkeypatch.setattr(data_lib.os, "scandir", refuse)
    with pytest.raises(BadSamplesError) as caught:
        make_dataset(tmp_path, tokenizer, processor)
    assert "1 of 2 samples are bad" in str(caught.value) and "item 1 (id b)" in str(caught.value)


def test_the_same_image_in_many_items_reports_each_item(tmp_path, tokenizer, processor):
    save_image(tmp_path, "coco/other.png")
    write_dataset(tmp_path, [image_sample("q1", "coco/x.png"), good_text(), image_sample("q2", "./coco/x.png")])
    with pytest.raises(BadSamplesError) as caught:
        make_dataset(tmp_path, tokenizer, processor)
    message = str(caught.value)
    assert "item 0 (id q1): image 'coco/x.png' not found" in message
    assert "item 2 (id q2): image './coco/x.png' not found" in message


def test_first_turn_not_from_human_is_dropped_before_the_checks(tmp_path, tokenizer, processor):
    save_image(tmp_path, "a.png")
    sample = image_sample("g", "a.png")
    sample["conversations"] = [{"from": "gpt", "value": "Hello."}] + sample["conversations"]
    write_dataset(tmp_path, [sample])
    assert len(make_dataset(tmp_path, tokenizer, processor)) == 1


def test_check_runs_before_any_sample_is_loaded(tmp_path, tokenizer, processor, monkeypatch):
    """The trainer gets its dataset from make_supervised_data_module: bad data stops it there, before a batch."""
    save_image(tmp_path, "a.png")
    write_dataset(tmp_path, [image_sample("a", "a.png"), image_sample("late", "zz/missing.png")])
    loaded = []
    monkeypatch.setattr(LazySupervisedDataset, "_get_sample", lambda self, i: loaded.append(i))
    monkeypatch.setattr(data_lib.Image, "open", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(BadSamplesError, match=r"item 1 \(id late\): image 'zz/missing\.png' not found"):
        make_supervised_data_module(tokenizer, make_args(tmp_path, processor))
    assert loaded == []


def test_training_checks_the_data_before_it_loads_the_model(tmp_path, tiny_llama_tokenizer_dir):
    """The tokenizer folder holds no weights: a run that loaded the model first would fail on that instead."""
    import subprocess
    import sys

    write_dataset(tmp_path, [image_sample("first", "nowhere.png")])
    command = [sys.executable, "-m", "llava.train.train", "--model_name_or_path", str(tiny_llama_tokenizer_dir),
               "--version", "v1", "--data_path", str(tmp_path / "data.json"), "--image_folder", str(tmp_path),
               "--vision_tower", str(tmp_path / "no-tower"), "--mm_use_im_patch_token", "False",
               "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode != 0
    assert "BadSamplesError" in result.stderr and "item 0 (id first): image 'nowhere.png' not found" in result.stderr
    assert "Loading the language model" not in result.stderr


def test_the_demo_data_passes_the_checks(tmp_path):
    """The generated mix665k-format data (finetuning mix and projector pretraining pairs) has no bad item."""
    from llava.demo.synthetic import generate

    paths = generate(tmp_path, seed=0, n_train=180, n_eval=2, n_pretrain=8)
    for data, folder in (("train", "train_image_folder"), ("pretrain", "pretrain_image_folder")):
        samples = data_lib.load_samples(str(paths[data]))
        assert data_lib.check_samples(samples, str(paths[data]), str(paths[folder])) == []


# ---------------------------------------------------------------------------------------------------
# Collator and data module


def item(input_ids: list[int], labels: list[int], image: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "image": image}


def test_collator_pads_and_masks(tokenizer):
    """Pad is <unk> (id 0): the real <unk> inside the second sequence must stay attended."""
    instances = [
        item([1, 5, 6, 7], [-100, -100, 6, 7], torch.ones(3, 4)),
        item([1, 0, 8], [-100, 0, 8], torch.zeros(3, 4)),
    ]
    batch = DataCollatorForSupervisedDataset(tokenizer)(instances)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 0, 8, pad]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, 0, 8, -100]]
    assert batch["attention_mask"].tolist() == [[True] * 4, [True, True, True, False]]
    assert batch["images"].shape == (2, 3, 4)


def test_collator_truncates_and_keeps_odd_images_in_a_list(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir, model_max_length=3)
    tokenizer.pad_token = tokenizer.unk_token
    instances = [item([1, 5, 6, 7], [1, 5, 6, 7], torch.ones(3, 4, 4)), item([1, 8], [1, 8], torch.ones(3, 2, 2))]
    batch = DataCollatorForSupervisedDataset(tokenizer)(instances)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 3)
    assert isinstance(batch["images"], list) and len(batch["images"]) == 2


def test_collator_needs_a_pad_token(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    instances = [{"input_ids": torch.tensor([1, 5]), "labels": torch.tensor([1, 5])}]
    with pytest.raises(ValueError, match="pad token"):
        DataCollatorForSupervisedDataset(tokenizer)(instances)


def test_data_module_batches_dataset_items(tmp_path, tokenizer, template, processor):
    save_image(tmp_path, "a.png")
    write_dataset(tmp_path, [image_sample("a", "a.png"), {"id": "t", "conversations": turns("Hi?", "Hello there.")}])
    module = make_supervised_data_module(tokenizer, make_args(tmp_path, processor))
    assert module["eval_dataset"] is None
    dataset, collator = module["train_dataset"], module["data_collator"]
    batch = collator([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3, 32, 32)
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]


def test_data_arguments_parse_from_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--data_path", "d.json", "--image_folder", "imgs", "--image_aspect_ratio", "pad", "--skip_bad_samples", "True"]
    )
    assert (args.data_path, args.image_folder, args.image_aspect_ratio) == ("d.json", "imgs", "pad")
    assert args.skip_bad_samples is True
    assert args.is_multimodal is False and args.lazy_preprocess is False


def test_preprocess_takes_a_list_of_sources(tokenizer, template):
    out = preprocess([turns("Hi?", "Hello."), turns("Is it red?", "Yes.")], tokenizer, sample_ids=["a", "b"])
    assert len(out["input_ids"]) == len(out["labels"]) == 2
    decoded = [[tokenizer.decode(run) for run in supervised_runs(i, l)] for i, l in zip(out["input_ids"], out["labels"])]
    assert decoded == [["Hello.</s>"], ["Yes.</s>"]]
