"""The shared generation loop and the benchmark entry points, on a tiny LLaVA on the CPU.

Batch-size-1 answers are the reference every batched run is compared with; command lines run as
users run them (in-process ``main(argv)``, and one real subprocess that is killed mid-run).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from llava.conversation import conv_templates
from llava.eval import answers_file, cli
from llava.eval import generation as gen
from llava.eval import model_vqa_loader, model_vqa_mmbench, model_vqa_science, run_llava
from llava.model.builder import load_pretrained_model
from llava.tiny_base import build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = "12"
WORDS = "what color is the cat on the left of the red car near a small tree in the street".split()


def noise_image(seed: int, size: tuple[int, int]) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def question_text(i: int) -> str:
    """Questions of different lengths (3 to 20 words)."""
    return " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + (i * 5) % 18)) + "?"


@pytest.fixture(scope="module")
def model_dir(tiny_base, tmp_path_factory) -> Path:
    return build_tiny_llava(tiny_base, tmp_path_factory.mktemp("llava_tiny"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    tokenizer, model, processor, _ = load_pretrained_model(str(model_dir), None, "llava_tiny", device="cpu")
    return SimpleNamespace(tokenizer=tokenizer, model=model, processor=processor)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> SimpleNamespace:
    """An image folder and a 9-question JSONL file with varied question lengths and image sizes."""
    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    questions = []
    for i in range(9):
        name = f"img{i}.png"
        noise_image(i, (24 + 7 * i, 40 - 2 * i)).save(root / "images" / name)
        questions.append({"question_id": 100 + i, "image": name, "text": question_text(i), "category": "x"})
    qfile = root / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return SimpleNamespace(root=root, images=root / "images", questions=questions, qfile=qfile)


def loader_argv(model_dir: Path, vqa, answers: Path, *extra: str) -> list[str]:
    return [
        "--model-path", str(model_dir), "--question-file", str(vqa.qfile), "--image-folder", str(vqa.images),
        "--answers-file", str(answers), "--temperature", "0", "--conv-mode", "vicuna_v1",
        "--max_new_tokens", MAX_NEW, "--device", "cpu", *extra,
    ]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answers_by_id(path: Path) -> list[tuple]:
    return [(line["question_id"], line.get("round_id"), line["prompt"], line["text"]) for line in read_lines(path)]


@pytest.fixture(scope="module")
def clean_run(model_dir, vqa, tmp_path_factory) -> Path:
    """The reference answers file: one uninterrupted, unchunked run at batch size 4."""
    answers = tmp_path_factory.mktemp("clean") / "sub" / "answers.jsonl"
    model_vqa_loader.main(loader_argv(model_dir, vqa, answers, "--batch-size", "4"))
    return answers


# ----------------------------------------------------------------------------- the loop


def mixed_requests(vqa) -> list[gen.Request]:
    """Image questions of different lengths and text-only ones, interleaved."""
    requests = []
    for i, q in enumerate(vqa.questions):
        with_image = i % 3 != 1
        message = ("<image>\n" if with_image else "") + q["text"]
        images = [gen.open_rgb(str(vqa.images / q["image"]))] if with_image else []
        requests.append(gen.Request(q["question_id"], gen.templated_prompt("vicuna_v1", message), q["text"], images))
    return requests


def answer_texts(
    loaded, requests, batch_size: int, tie_margin: float | None, stop_str: str = "</s>"
) -> tuple[list[str], int]:
    settings = gen.GenerationSettings(
        temperature=0, max_new_tokens=int(MAX_NEW), stop_str=stop_str, tie_margin=tie_margin
    )
    generator = gen.Generator(loaded.model, loaded.tokenizer, loaded.processor, settings, batch_size=batch_size)
    return [text for _, text in generator.answer(requests)], generator.reruns


@pytest.fixture(scope="module")
def batch_one_answers(loaded, vqa) -> list[str]:
    """The reference: the mixed requests answered one at a time."""
    return answer_texts(loaded, mixed_requests(vqa), batch_size=1, tie_margin=0)[0]


def test_batched_greedy_answers_equal_batch_size_one(loaded, vqa, batch_one_answers):
    requests = mixed_requests(vqa)
    lengths = {len(r.prompt) for r in requests}
    assert len(lengths) > 4 and any(not r.images for r in requests)
    single = batch_one_answers
    assert len(set(single)) > len(single) // 2, "the tiny model should answer questions differently"
    batched_unchecked, reruns_off = answer_texts(loaded, requests, batch_size=4, tie_margin=0)
    batched, _ = answer_texts(loaded, requests, batch_size=4, tie_margin=None)
    assert reruns_off == 0
    assert batched_unchecked == single
    assert batched == single


def test_near_tie_rows_are_answered_again_alone(loaded, vqa, batch_one_answers):
    requests = mixed_requests(vqa)[:5]
    batched, reruns = answer_texts(loaded, requests, batch_size=4, tie_margin=float("inf"))
    assert reruns == len(requests) - 1  # the last batch holds one row: already alone
    assert batched == batch_one_answers[:5]


def test_batched_rows_stop_at_a_stop_string_like_batch_size_one(loaded, vqa, batch_one_answers):
    """A template whose separator is not eos (v0's "###") stops on text; here a string the model writes."""
    requests = mixed_requests(vqa)
    full = batch_one_answers
    counts = Counter(piece for text in full for piece in text.split())
    stop = next(piece for piece, n in counts.most_common() if 1 < n < len(full) and not piece.isdigit())
    single, _ = answer_texts(loaded, requests, batch_size=1, tie_margin=0, stop_str=stop)
    batched, _ = answer_texts(loaded, requests, batch_size=4, tie_margin=0, stop_str=stop)
    assert batched == single
    assert any(stop in text for text in full) and not any(stop in text for text in single)
    assert [text[: text.index(stop)].strip() if stop in text else text for text in full] == single


def test_request_image_count_must_match_the_tags():
    request = gen.Request(1, gen.templated_prompt("vicuna_v1", "<image>\nhi"), "hi", images=[])
    with pytest.raises(ValueError, match=r"Question 1: the prompt has 1 <image> tag\(s\) but 0 image"):
        gen.validate_requests([request])


# ----------------------------------------------------------------------------- chunks and resume


def test_get_chunk_splits_like_the_seed():
    items = list(range(10))
    assert [list(cli.get_chunk(items, 3, k)) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(cli.get_chunk(items, 1, 0)) == items
    assert list(cli.get_chunk([0, 1], 3, 2)) == []


def test_three_chunks_concatenate_to_the_unchunked_answers(model_dir, vqa, clean_run, tmp_path):
    merged = []
    for k in range(3):
        chunk_file = tmp_path / f"3_{k}.jsonl"
        model_vqa_loader.main(loader_argv(model_dir, vqa, chunk_file, "--num-chunks", "3", "--chunk-idx", str(k)))
        merged += answers_by_id(chunk_file)
    assert merged == answers_by_id(clean_run)
    line = read_lines(clean_run)[0]
    assert list(line) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert line["prompt"] == vqa.questions[0]["text"] and line["model_id"] == model_dir.name


def test_killed_run_resumes_without_duplicates(model_dir, vqa, clean_run, tmp_path):
    answers = tmp_path / "answers.jsonl"
    argv = loader_argv(model_dir, vqa, answers, "--batch-size", "1")
    command = [sys.executable, "-m", "llava.eval.model_vqa_loader", *argv]
    log = tmp_path / "run.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 60
        while time.time() < deadline and process.poll() is None:
            if answers.exists() and answers.read_bytes().count(b"\n") >= 2:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed midway: {log.read_text()[-2000:]}"
    written = answers.read_bytes()
    assert 2 <= written.count(b"\n") < len(vqa.questions)
    # A kill in the middle of a write leaves half a line: cut the last line in two.
    last_start = written.rstrip(b"\n").rfind(b"\n") + 1
    answers.write_bytes(written[: last_start + (len(written) - last_start) // 2])

    model_vqa_loader.main(loader_argv(model_dir, vqa, answers, "--batch-size", "4"))
    assert answers.read_bytes().endswith(b"\n")
    assert sorted(answers_by_id(answers)) == sorted(answers_by_id(clean_run))
    model_vqa_loader.main(loader_argv(model_dir, vqa, answers, "--batch-size", "4"))
    assert len(read_lines(answers)) == len(vqa.questions)


def test_resume_counts_questions_that_share_an_id(tmp_path):
    requests = [gen.Request("img1", "p", "q1"), gen.Request("img1", "p", "q2"), gen.Request("img2", "p", "q3")]
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": "img1", "prompt": "q1", "text": "x"}) + "\n" + '{"question_id": "im')
    todo = answers_file.pending_requests(requests, answers_file.read_answered(answers), answers)
    assert [r.recorded_prompt for r in todo] == ["q2", "q3"]
    assert answers.read_text().count("\n") == 1 and answers.read_text().endswith("\n")


def test_resume_refuses_an_answers_file_for_other_prompts(tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 1, "prompt": "old prompt", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="answers question 1 for another prompt"):
        answers_file.pending_requests([gen.Request(1, "p", "new prompt")], answers_file.read_answered(answers), answers)


def test_answers_of_another_checkpoint_stop_the_run_and_fresh_moves_them_aside(model_dir, vqa, clean_run, tmp_path):
    other = tmp_path / "other_checkpoint"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "retrained": True}))  # another run, same shapes
    answers = tmp_path / "answers.jsonl"
    shutil.copy(clean_run, answers)
    recorded = read_lines(answers)[0]["metadata"]
    assert recorded["model_path"] == str(model_dir) and len(recorded["checkpoint"]) == 16

    model_vqa_loader.main(loader_argv(model_dir, vqa, answers, "--batch-size", "4"))  # same checkpoint: resumes
    assert answers.read_bytes() == clean_run.read_bytes()
    with pytest.raises(ValueError, match=rf"line 1: answered by {model_dir}, not by the checkpoint evaluated now "
                                         rf"\({other};.*--fresh"):
        model_vqa_loader.main(loader_argv(other, vqa, answers, "--batch-size", "4"))
    assert answers.read_bytes() == clean_run.read_bytes()  # nothing was appended

    model_vqa_loader.main(loader_argv(other, vqa, answers, "--batch-size", "4", "--fresh"))
    kept = list(tmp_path.glob("answers.replaced-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_bytes() == clean_run.read_bytes()
    lines = read_lines(answers)
    assert len(lines) == len(vqa.questions) and {line["metadata"]["model_path"] for line in lines} == {str(other)}
    assert [line["text"] for line in lines] == [line["text"] for line in read_lines(clean_run)]  # same weights


def test_resume_refuses_answers_made_with_other_dora_magnitudes(tmp_path):
    answers = tmp_path / "a.jsonl"
    old = {"question_id": 1, "prompt": "p1", "text": "x", "metadata": {}}  # written before the mode was recorded
    trained = {"question_id": 2, "prompt": "p2", "text": "y", "metadata": {"dora_magnitudes": "trained"}}
    answers.write_text(json.dumps(old) + "\n" + json.dumps(trained) + "\n")
    answered = answers_file.read_answered(answers)
    answers_file.check_run_settings(answered, {"dora_magnitudes": "trained"}, answers)  # both lines are "trained"
    with pytest.raises(ValueError, match=r"a\.jsonl, line 1: answered with dora_magnitudes='trained', but this run "
                                         r"uses dora_magnitudes='weight_norm'"):
        answers_file.check_run_settings(answered, {"dora_magnitudes": "weight_norm"}, answers)
    with pytest.raises(ValueError, match="line 2: answered with dora_magnitudes='trained'.*=None"):
        answers_file.check_run_settings(answered, {}, answers)  # a non-DoRA checkpoint

    line = answers_file.answer_line(gen.Request(3, "p3", "p3"), "z", "m", {"dora_magnitudes": "weight_norm"})
    assert line["metadata"] == {"dora_magnitudes": "weight_norm"}


def test_resume_refuses_answers_made_with_another_template_or_sampling(model_dir, vqa, clean_run, tmp_path):
    # The recorded "prompt" is the bare question, the same under every template: only the recorded
    # settings can tell a vicuna_v1 answer from a llava_v1 one.
    answers = tmp_path / "answers.jsonl"
    shutil.copy(clean_run, answers)
    recorded = read_lines(answers)[0]["metadata"]
    assert recorded["conv_mode"] == "vicuna_v1" and recorded["temperature"] == 0
    assert recorded["max_new_tokens"] == int(MAX_NEW) and recorded["num_beams"] == 1 and recorded["top_p"] is None
    argv = loader_argv(model_dir, vqa, answers, "--batch-size", "4")
    with pytest.raises(ValueError, match=r"line 1: answered with conv_mode='vicuna_v1', but this run uses "
                                         r"conv_mode='llava_v1'.*--fresh"):
        model_vqa_loader.main([*argv, "--conv-mode", "llava_v1"])
    with pytest.raises(ValueError, match=r"line 1: answered with max_new_tokens=.*max_new_tokens=64"):
        model_vqa_loader.main([*argv, "--max_new_tokens", "64"])
    assert answers.read_bytes() == clean_run.read_bytes()  # nothing was appended

    old = {"question_id": 1, "prompt": "p1", "text": "x", "metadata": {}}  # written before the settings were recorded
    answers.write_text(json.dumps(old) + "\n")
    answers_file.check_run_settings(answers_file.read_answered(answers), {"conv_mode": "llava_v1"}, answers)


# ----------------------------------------------------------------------------- bad input


def test_bad_jsonl_line_names_the_file_and_line(model_dir, vqa, tmp_path):
    qfile = tmp_path / "broken.jsonl"
    lines = vqa.qfile.read_text().splitlines()
    lines[2] = lines[2][:-5]
    qfile.write_text("\n".join(lines) + "\n")
    argv = loader_argv(model_dir, vqa, tmp_path / "a.jsonl")
    argv[argv.index("--question-file") + 1] = str(qfile)
    with pytest.raises(ValueError, match=rf"{qfile}:3: not valid JSON"):
        model_vqa_loader.main(argv)


def test_missing_images_are_reported_before_generation(model_dir, vqa, tmp_path):
    qfile = tmp_path / "q.jsonl"
    questions = vqa.questions[:3] + [{"question_id": 7, "image": "nowhere.png", "text": "?"}]
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    argv = loader_argv(model_dir, vqa, tmp_path / "a.jsonl")
    argv[argv.index("--question-file") + 1] = str(qfile)
    with pytest.raises(FileNotFoundError) as info:
        model_vqa_loader.main(argv)
    assert "1 image(s) not found" in str(info.value)
    assert f"question 7: {vqa.images / 'nowhere.png'}" in str(info.value)
    assert not (tmp_path / "a.jsonl").exists()


# ----------------------------------------------------------------------------- ScienceQA


SQA_QUESTION = "Which animal is a mammal?\nContext: N/A\nOptions: (A) frog (B) cat"
SINGLE_PRED = "Answer with the option's letter from the given choices directly."


def test_science_prompt_with_single_pred_prompt():
    config = SimpleNamespace(mm_use_im_start_end=False)
    item = {"id": "4", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n" + SQA_QUESTION}]}
    request = model_vqa_science.build_request(item, "imgs", "vicuna_v1", config, single_pred_prompt=True)
    assert request.recorded_prompt == "<image>\n" + SQA_QUESTION + "\n" + SINGLE_PRED
    assert request.prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\n" + SQA_QUESTION + "\n" + SINGLE_PRED
        + " ASSISTANT:"
    )
    text_only = {"id": "5", "conversations": [{"from": "human", "value": SQA_QUESTION}]}
    request = model_vqa_science.build_request(text_only, "imgs", "vicuna_v1", config, single_pred_prompt=True)
    assert request.recorded_prompt == SQA_QUESTION + "\n" + SINGLE_PRED and not request.images
    assert "<image>" not in request.prompt


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_science_images_drop_transparency_as_the_seed(mode, tmp_path):
    """A diagram on a transparent background stored as black: the seed's processor (transformers 4.31)
    converted with PIL, which drops the alpha channel, so the background reaches CLIP black, not white
    (transformers 5's own conversion would composite it onto white)."""
    from transformers import CLIPImageProcessor

    pixels = np.zeros((40, 60, 4), np.uint8)
    pixels[10:30, 20:40] = (255, 0, 0, 255)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P":
        image = image.convert("RGB").convert("P")
        image.info["transparency"] = 0
    image.save(tmp_path / "diagram.png", **({"transparency": 0} if mode == "P" else {}))
    assert Image.open(tmp_path / "diagram.png").mode == mode
    item = {"id": "1", "image": "diagram.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
    request = model_vqa_science.build_request(item, str(tmp_path), "vicuna_v1",
                                              SimpleNamespace(mm_use_im_start_end=False), single_pred_prompt=True)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                                   image_mean=mean, image_std=std)
    values = gen.preprocess_images([request.images[0]()], processor, None, "plain")[0]
    black = torch.tensor([(0 - m) / s for m, s in zip(mean, std)])
    torch.testing.assert_close(values[:, 0, 0], black, rtol=0, atol=1e-4)  # a background corner
    red = torch.tensor([(1 - mean[0]) / std[0], (0 - mean[1]) / std[1], (0 - mean[2]) / std[2]])
    torch.testing.assert_close(values[:, 12, 12], red, rtol=0, atol=1e-4)  # the square's centre


def test_science_run_records_image_and_text_only_questions(model_dir, vqa, tmp_path):
    def turns(question: str, answer: str) -> list[dict]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    items = [
        {"id": "a", "image": "img0.png", "conversations": turns("<image>\n" + SQA_QUESTION, "B")},
        {"id": "b", "conversations": turns(SQA_QUESTION, "B")},
        {"id": "c", "image": "img1.png", "conversations": turns("<image>\nWhat is it?", "A")},
    ]
    qfile = tmp_path / "sqa.json"
    qfile.write_text(json.dumps(items))
    answers = tmp_path / "sqa" / "answers.jsonl"
    model_vqa_science.main([
        "--model-path", str(model_dir), "--question-file", str(qfile), "--image-folder", str(vqa.images),
        "--answers-file", str(answers), "--single-pred-prompt", "--temperature", "0", "--conv-mode", "vicuna_v1",
        "--max_new_tokens", "4", "--device", "cpu", "--batch-size", "3",
    ])
    lines = read_lines(answers)
    assert [line["question_id"] for line in lines] == ["a", "b", "c"]
    assert [line["prompt"].startswith("<image>\n") for line in lines] == [True, False, True]


# ----------------------------------------------------------------------------- MMBench


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_mmbench_tsv(path: Path) -> None:
    import pandas as pd

    rows = [
        {"index": 11, "question": "What is in the image?", "hint": "", "A": "a cat", "B": "a dog", "C": "a car",
         "D": "a tree", "answer": "A", "category": "c", "image": png_base64(noise_image(1, (30, 20))), "source": "s",
         "l2-category": "l2", "comment": "", "split": "dev"},
        {"index": 12, "question": "Which color?", "hint": "Look at the sky.", "A": "1.50", "B": "blue", "C": "green",
         "D": "", "answer": "B", "category": "c", "image": png_base64(noise_image(2, (20, 30))), "source": "s",
         "l2-category": "l2", "comment": "", "split": "dev"},
    ]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def test_mmbench_all_rounds_rotates_the_options(model_dir, tmp_path):
    tsv = tmp_path / "mmbench.tsv"
    write_mmbench_tsv(tsv)
    answers = tmp_path / "mm" / "answers.jsonl"
    model_vqa_mmbench.main([
        "--model-path", str(model_dir), "--question-file", str(tsv), "--answers-file", str(answers),
        "--single-pred-prompt", "--all-rounds", "--temperature", "0", "--conv-mode", "vicuna_v1",
        "--max_new_tokens", "4", "--device", "cpu",
    ])
    lines = read_lines(answers)
    keys = [(line["question_id"], line["round_id"]) for line in lines]
    assert keys == [(11, 0), (11, 1), (11, 2), (11, 3), (12, 0), (12, 1), (12, 2)]
    assert [line["options"] for line in lines[4:]] == [
        ["1.50", "blue", "green"], ["blue", "green", "1.50"], ["green", "1.50", "blue"]
    ]
    assert [line["option_char"] for line in lines[4:]] == [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"]]
    assert lines[5]["prompt"] == "Look at the sky.\nWhich color?\nA. blue\nB. green\nC. 1.50"
    assert lines[1]["prompt"] == "What is in the image?\nA. a dog\nB. a car\nC. a tree\nD. a cat"
    assert list(lines[0]) == [
        "question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id", "model_id", "metadata"
    ]

    table = model_vqa_mmbench.read_questions(str(tsv))
    requests = model_vqa_mmbench.build_requests(table, "vicuna_v1", SimpleNamespace(), True, True, "en")
    expected = "USER: <image>\nLook at the sky.\nWhich color?\nA. blue\nB. green\nC. 1.50\n" + SINGLE_PRED + " ASSISTANT:"
    assert requests[5].prompt.endswith(expected)

    model_vqa_mmbench.main([
        "--model-path", str(model_dir), "--question-file", str(tsv), "--answers-file", str(answers),
        "--single-pred-prompt", "--all-rounds", "--temperature", "0", "--conv-mode", "vicuna_v1",
        "--max_new_tokens", "4", "--device", "cpu",
    ])
    assert len(read_lines(answers)) == 7


# ----------------------------------------------------------------------------- run_llava


def test_run_llava_answers_like_the_loop(model_dir, vqa, clean_run, capsys):
    question = vqa.questions[0]
    answer = run_llava.main([
        "--model-path", str(model_dir), "--image-file", str(vqa.images / question["image"]),
        "--query", question["text"],
        "--conv-mode", "vicuna_v1", "--temperature", "0", "--max_new_tokens", MAX_NEW, "--device", "cpu",
    ])
    assert answer == read_lines(clean_run)[0]["text"]
    assert capsys.readouterr().out == answer + "\n"


def test_run_llava_refuses_urls():
    with pytest.raises(ValueError, match="images are read from local files only"):
        run_llava.main(["--model-path", "x", "--image-file", "https://example.com/a.jpg", "--query", "hi"])


def test_run_llava_infers_the_template_from_the_name():
    assert run_llava.infer_conv_mode("llava-v1.5-7b") == "llava_v1"
    assert run_llava.infer_conv_mode("llava-llama-2-13b") == "llava_llama_2"
    assert run_llava.choose_conv_mode("vicuna_v1", "llava-v1.5-7b") == "vicuna_v1"
    assert "llava_v1" in conv_templates
