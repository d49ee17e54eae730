"""Scorers, converters and the results table against small files whose figures are worked out by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from llava.eval.answer_processor import (
    leave_one_out_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
)
from llava.eval.eval_mmbench import mmbench_accuracy, parse_letter
from llava.eval.eval_pope import parse_yes_no
from llava.eval.eval_science_qa import FAILED, parse_option_letter
from llava.eval.eval_textvqa import question_from_prompt
from llava.eval.eval_vqa import vizwiz_score, vqa_accuracy, vqa_score
from llava.eval.jsonl import InputFileError, check_answers, read_jsonl, write_json_atomic
from llava.eval.summarize import (
    check_row,
    load_results,
    metrics_fields,
    paper_score,
    record_score,
    render_table,
    results_file,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    """Run a module (-m ...) or a script path from the repo root, as a user would."""
    completed = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    return completed


def answer(question_id, text: str, prompt: str = "", **extra) -> dict:
    return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
            "metadata": {}, **extra}


# ---------------------------------------------------------------- answer normalisation

@pytest.mark.parametrize("raw, expected", [
    ("The man's hat.", "man 's hat"),
    ("two", "2"),
    ("Ten", "10"),
    ("none", "0"),
    ("dont", "don't"),
    ("1,000", "1000"),
    ("Dr. Pepper", "dr pepper"),  # a period not followed by a digit is dropped
    ("end...", "end"),
    ("3.5", "3.5"),
    ("a\ttall\nman", "tall man"),
    ("An apple", "apple"),
    ("the", ""),
    ("well-known", "well known"),  # "-" touches no space: replaced by a space
    ("yes - no", "yes no"),  # "-" touches a space: removed
    ("What?", "what"),
    ("50% off!", "50% off"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_is_removed_everywhere_when_digits_hold_a_comma():
    # The official rule is decided per answer: "1,000" makes every mark vanish, even "(" inside a word.
    assert process_punctuation("1,000 (a)b") == "1000 ab"
    assert process_punctuation("x(a)b") == "x a b"


# Expected values are what the official VQA evaluation (vqaEval.py's processPunctuation, then
# processDigitArticle) returns for each input.
@pytest.mark.parametrize("raw, punctuation_step, both_steps", [
    ("1,,000", "1  000", "1 000"),  # two commas are not "digit, comma, digit": each becomes a space
    ("1,000", "1000", "1000"),
    ("a,b 1,2", "ab 12", "ab 12"),  # "1,2" somewhere: every mark is removed, also the one in "a,b"
    ("a,b", "a b", "b"),  # no digits: the comma becomes a space, then "a" goes as an article
    ("1,2,3", "123", "123"),
    ("12,,34 (x)", "12  34 x ", "12 34 x"),
    ("yes , no", "yes  no", "yes no"),  # the comma touches a space: removed
    ("a ,b", "a b", "b"),
    ("(a) b", " a b", "b"),  # ")" touches a space, so every ")" is removed; "(" touches none
    ("dr. pepper", "dr pepper", "dr pepper"),
    ("3.", "3", "3"),
    ("u.s.a.", "usa", "usa"),
    (".5", ".5", ".5"),  # a period before a digit stays
    ("a.5", "a.5", "a.5"),
    ("3 .5", "3 .5", "3 .5"),
    ("1.000,5", "1.0005", "1.0005"),
])
def test_punctuation_and_digit_steps_match_the_official_code(raw, punctuation_step, both_steps):
    assert process_punctuation(raw) == punctuation_step
    assert process_digit_article(process_punctuation(raw)) == both_steps


# Expected values are what EvalAI's answer processor (EvalAIAnswerProcessor, as LLaVA ships it) returns.
@pytest.mark.parametrize("raw, expected", [
    ("1,,000", "1000"),  # it deletes every comma first
    ("1,000", "1000"),
    ("a,b 1,2", "ab 12"),
    ("a,b", "ab"),
    ("1,000 (a)b", "1000 b"),
    ("a-b 1,2", "b 12"),
    ("yes , no", "yes no"),
    ("It's 3.", "it 's 3"),
    ("dr. pepper", "dr pepper"),
    (".5", ".5"),
])
def test_normalize_answer_matches_evalai(raw, expected):
    assert normalize_answer(raw) == expected


def test_at_most_32_periods_are_dropped_as_in_the_official_code():
    assert normalize_answer("." * 40) == "." * 8


def test_leave_one_out_accuracy_by_hand():
    others = ["x"] * 10
    # 3 of 10 say "a": leaving out one of them leaves 2 matches (2/3), any of the other 7 leaves 3 (1).
    assert leave_one_out_accuracy("a", ["a"] * 3 + others[:7]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert leave_one_out_accuracy("a", ["a"] * 2 + others[:8]) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert leave_one_out_accuracy("a", ["a"] + others[:9]) == pytest.approx(9 * (1 / 3) / 10)
    assert leave_one_out_accuracy("a", ["a"] * 4 + others[:6]) == 1.0
    assert leave_one_out_accuracy("a", others) == 0.0


# ---------------------------------------------------------------- reading files

def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te\n')
    with pytest.raises(InputFileError, match=r"answers\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_jsonl_lines_split_on_newline_only(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"question_id": 1, "text": "a\u2028b"}, ensure_ascii=False) + "\r\n\n", encoding="utf-8")
    assert read_jsonl(path) == [{"question_id": 1, "text": "a\u2028b"}]


def test_check_answers_reports_mismatch_and_keeps_last_duplicate(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [answer(1, "old"), answer(2, "b"), answer(1, "new"), answer(9, "?")])
    check = check_answers(path, [1, 2, 3])
    assert check.answers["1"]["text"] == "new"
    assert (check.duplicates, check.unknown, check.unanswered) == (1, ["9"], ["3"])
    err = capsys.readouterr().err
    assert "1 duplicated answer" in err
    assert "1 answer(s) for questions not in the question file, ignored (first: 9)" in err
    assert "1 question(s) without an answer (first: 3)" in err


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path):
    target = tmp_path / "out" / "m.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]


# ---------------------------------------------------------------- POPE

def test_pope_parsing():
    assert parse_yes_no("Yes, there is a dog.") == "yes"
    assert parse_yes_no("Yes. But there is no cat.") == "yes"  # only the first sentence counts
    assert parse_yes_no("There is not a car") == "no"
    assert parse_yes_no("No") == "no"
    assert parse_yes_no("Nope") == "yes"  # the seed's rule: whole words only


def test_pope_cli(tmp_path):
    labels = tmp_path / "coco"
    labels.mkdir()
    # POPE numbers each category from 1; labels pair with questions by position within the category.
    write_jsonl(labels / "coco_pope_random.json", [
        {"question_id": i + 1, "image": f"r{i}.jpg", "text": "Is there a dog?", "label": label}
        for i, label in enumerate(["yes", "yes", "yes", "no"])])
    write_jsonl(labels / "coco_pope_adversarial.json", [
        {"question_id": i + 1, "image": f"a{i}.jpg", "text": "Is there a cat?", "label": label}
        for i, label in enumerate(["no", "yes"])])
    questions = write_jsonl(tmp_path / "q.jsonl", [
        *({"question_id": 101 + i, "image": f"r{i}.jpg", "text": "Is there a dog?", "category": "random"}
          for i in range(4)),
        *({"question_id": 201 + i, "image": f"a{i}.jpg", "text": "Is there a cat?", "category": "adversarial"}
          for i in range(2))])
    # Answers out of order: random -> TP, TP, FN, FP; adversarial -> TN, TP.
    answers = write_jsonl(tmp_path / "a.jsonl", [
        answer(202, "yes"), answer(104, "Yes"), answer(103, "There is not a car"), answer(201, "No"),
        answer(102, "Yes. But there is no cat."), answer(101, "Yes, there is a dog.")])
    metrics_file = tmp_path / "pope.json"
    out = run("-m", "llava.eval.eval_pope", "--annotation-dir", str(labels), "--question-file", str(questions),
              "--result-file", str(answers), "--metrics-json", str(metrics_file)).stdout
    random_part = out[out.index("Category: random"):]
    assert out.index("Category: adversarial, # samples: 2") < out.index("Category: random, # samples: 4")
    assert "TP\tFP\tTN\tFN\t\n2\t1\t0\t1\n" in random_part
    assert "Accuracy: 0.5\n" in random_part
    assert "Precision: 0.6666666666666666\n" in random_part
    assert "Recall: 0.6666666666666666\n" in random_part
    assert "F1 score: 0.6666666666666666\n" in random_part
    assert "Yes ratio: 0.75\n" in random_part
    assert "====================================" in random_part
    metrics = json.loads(metrics_file.read_text())
    assert metrics["adversarial"] == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}
    assert set(metrics["random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert paper_score("pope", metrics) == pytest.approx(100 * (2 / 3 + 1) / 2)
    # results.json keeps the share of "yes" answers: random 3 of 4, adversarial 1 of 2 -> (0.75 + 0.5) / 2
    assert metrics_fields("pope", metrics)["yes_ratio"] == pytest.approx(0.625)


def _pope_row(tmp_path, name: str, yes: list[float]) -> dict:
    """A row written through the CLI from POPE metrics whose categories answered "yes" at these rates."""
    metrics = tmp_path / f"{name}.json"
    metrics.write_text(json.dumps({f"c{i}": {"f1": 0.5, "yes_ratio": r} for i, r in enumerate(yes)}))
    run("-m", "llava.eval.summarize", "--write", str(tmp_path / name), "--method", name,
        "--metrics", f"pope={metrics}")
    return load_results(tmp_path / name)


def test_a_model_that_gives_one_pope_answer_is_named_under_the_table(tmp_path):
    rows = [_pope_row(tmp_path, "always-yes", [1.0, 1.0, 1.0]), _pope_row(tmp_path, "looks", [0.5, 0.48, 0.52]),
            _pope_row(tmp_path, "always-no", [0.0, 0.01, 0.0]), _pope_row(tmp_path, "mostly-yes", [1.0, 0.95, 0.97])]
    assert rows[0]["benchmarks"]["pope"] == {"score": 50.0, "source": "local", "upload": None, "yes_ratio": 1.0}
    notes = render_table(rows).split("\n\n", 1)[1].splitlines()
    tail = ('its POPE F1 is what that one answer scores (about 66.7 for "yes", 0 for "no"), '
            "not a sign that it looks at the image.")
    assert [n for n in notes if "POPE questions" in n] == [
        f'always-yes answered "yes" to 100% of the POPE questions: {tail}',
        f'always-no answered "no" to 100% of the POPE questions: {tail}',
    ]  # 1 - 0.0033 rounds to 100%; "mostly-yes" (0.973) and "looks" are not named
    with pytest.raises(ValueError, match="POPE field"):
        write_results(tmp_path / "looks", benchmarks={"gqa": {"score": 1.0, "yes_ratio": 0.5}})


# ---------------------------------------------------------------- TextVQA

def test_textvqa_question_from_prompt():
    instruction = "Answer the question using a single word or phrase."
    assert question_from_prompt(f"What brand?\nReference OCR token: Coca, Cola\n{instruction}") == "what brand?"
    assert question_from_prompt(f"Reference OCR token: a, b\nWhat Brand?\n{instruction}") == "what brand?"
    assert question_from_prompt("OCR tokens: a b Question: What Brand? Short answer:") == "what brand?"


def test_textvqa_cli(tmp_path):
    # Two questions on the same image: the match needs the question as well as the image id.
    annotations = {"data": [
        {"image_id": "abc1", "question": "What brand is this?", "question_id": 1,
         "answers": ["Coca Cola"] * 3 + ["pepsi"] * 7},
        {"image_id": "abc1", "question": "How many bottles?", "question_id": 2,
         "answers": ["two"] + ["3"] * 9},
    ]}
    annotation_file = tmp_path / "TextVQA_0.5.1_val.json"
    annotation_file.write_text(json.dumps(annotations))
    tail = "\nReference OCR token: Coca, Cola\nAnswer the question using a single word or phrase."
    answers = write_jsonl(tmp_path / "run.jsonl", [
        answer("abc1", "Coca-Cola.", "What brand is this?" + tail),  # "coca cola": 3 of 10 -> 0.9
        answer("abc1", "2", "How many bottles?" + tail),  # "two" -> "2": 1 of 10 -> 0.3
    ])
    metrics_file = tmp_path / "t.json"
    out = run("-m", "llava.eval.eval_textvqa", "--annotation-file", str(annotation_file),
              "--result-file", str(answers), "--metrics-json", str(metrics_file)).stdout
    assert "run\nSamples: 2\nAccuracy: 60.00%\n" in out
    assert json.loads(metrics_file.read_text()) == {"accuracy": pytest.approx(60.0), "samples": 2}


def test_textvqa_scores_every_answer_line_as_the_seed(tmp_path):
    """The same question twice on one image: two lines, both scored (the seed's m4c evaluation counts
    every line), each against the annotation listed last for that (image, question)."""
    annotations = {"data": [
        {"image_id": "im", "question": "What word?", "question_id": 1, "answers": ["stop"] * 10},
        {"image_id": "im", "question": "what word?", "question_id": 2, "answers": ["exit"] * 10},
        {"image_id": "im", "question": "What colour?", "question_id": 3, "answers": ["red"] * 10},
    ]}
    annotation_file = tmp_path / "TextVQA_0.5.1_val.json"
    annotation_file.write_text(json.dumps(annotations))
    answers = write_jsonl(tmp_path / "run.jsonl", [
        answer("im", "stop", "What word?"), answer("im", "exit", "What word?"), answer("im", "red", "What colour?"),
    ])
    out = run("-m", "llava.eval.eval_textvqa", "--annotation-file", str(annotation_file),
              "--result-file", str(answers)).stdout
    assert "run\nSamples: 3\nAccuracy: 66.67%\n" in out  # "stop" scores 0 against the later "exit" annotation


# ---------------------------------------------------------------- ScienceQA

@pytest.mark.parametrize("text, letter", [
    ("B", "B"),
    ("C. a fox", "C"),
    ("I think so. The answer is A. Because", "A"),
    ("The answer is A. The answer is B.", FAILED),  # two matches
    ("The answer is D", FAILED),  # the pattern needs one character after the letter
    (" B", FAILED),
    ("b", FAILED),
])
def test_science_qa_parsing(text, letter):
    assert parse_option_letter(text) == letter


def test_science_qa_cli(tmp_path):
    problems = {f"p{i}": {"question": "?", "choices": ["x", "y", "z"], "answer": a, "split": "test"}
                for i, a in enumerate([1, 2, 0, 0, 2, 0], start=1)}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(problems), "val": []}))
    answers = write_jsonl(tmp_path / "sqa.jsonl", [
        answer("p1", "B", "<image>\nQ"),  # single letter: right
        answer("p2", "C. z", "Q"),  # "X. ": right
        answer("p3", "The answer is A.", "<image>\nQ"),  # pattern: right
        answer("p4", "The answer is A. The answer is B.", "<image>\nQ"),  # two matches: FAILED
        answer("p5", "E", "Q"),  # beyond the three choices: wrong
    ])  # p6 unanswered: FAILED
    metrics_file, details, result = tmp_path / "m.json", tmp_path / "details.json", tmp_path / "result.json"
    completed = run("-m", "llava.eval.eval_science_qa", "--base-dir", str(tmp_path), "--result-file", str(answers),
                    "--output-file", str(details), "--output-result", str(result),
                    "--metrics-json", str(metrics_file))
    # 3 of 6 right; IMG: p1, p3 right out of the answered image questions p1, p3, p4.
    assert completed.stdout == "Total: 6, Correct: 3, Accuracy: 50.00%, IMG-Accuracy: 66.67%\n"
    assert "1 question(s) without an answer (first: p6)" in completed.stderr
    assert json.loads(metrics_file.read_text()) == {
        "accuracy": 50.0, "img_accuracy": pytest.approx(200 / 3), "total": 6}
    analysis = json.loads(details.read_text())
    assert [a["question_id"] for a in analysis["correct"]] == ["p1", "p2", "p3"]
    assert {a["question_id"]: a["parsed_ans"] for a in analysis["incorrect"]} == {"p4": FAILED, "p5": "E", "p6": FAILED}
    assert json.loads(result.read_text())["results"] == {"p1": 1, "p2": 2, "p3": 0, "p4": -1, "p5": -1, "p6": -1}


# ---------------------------------------------------------------- VQAv2 / VizWiz uploads and local accuracy

def test_vqav2_upload_covers_the_test_split(tmp_path):
    vqa = tmp_path / "vqav2"
    split = "llava_vqav2_mscoco_test-dev2015"
    vqa.mkdir()
    write_jsonl(vqa / "llava_vqav2_mscoco_test2015.jsonl",
                [{"question_id": i, "image": f"{i}.jpg", "text": "?"} for i in (1, 2, 3, 4)])
    write_jsonl(vqa / f"{split}.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": "?"} for i in (1, 2, 3)])
    (vqa / "answers" / split / "ckpt").mkdir(parents=True)
    write_jsonl(vqa / "answers" / split / "ckpt" / "merge.jsonl",
                [answer(3, "Yes"), answer(1, "Two dogs."), answer(99, "stray")])
    completed = run("scripts/convert_vqav2_for_submission.py", "--dir", str(vqa), "--split", split, "--ckpt", "ckpt")
    assert "1 question(s) without an answer (first: 2)" in completed.stderr
    assert "1 answer(s) for questions not in" in completed.stderr
    expected = [{"question_id": 1, "answer": "2 dogs"}, {"question_id": 2, "answer": ""},
                {"question_id": 3, "answer": "yes"}, {"question_id": 4, "answer": ""}]
    upload = vqa / "answers_upload" / split / "ckpt.json"
    assert upload.read_text() == json.dumps(expected)

    other = tmp_path / "result" / "up.json"
    run("scripts/convert_vqav2_for_submission.py", "--split", split, "--ckpt", "ckpt", "--save_dir", str(vqa),
        "--eval_dir", str(vqa), "--output-file", str(other))
    assert other.read_text() == json.dumps(expected)


def test_vizwiz_upload(tmp_path):
    questions = write_jsonl(tmp_path / "llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "?"},
        {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "?"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(1, "A red Cup."), answer(0, "Unanswerable")])
    upload = tmp_path / "up" / "a.json"
    run("scripts/convert_vizwiz_for_submission.py", "--annotation-file", str(questions),
        "--result-file", str(answers), "--result-upload-file", str(upload))
    assert upload.read_text() == json.dumps([{"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
                                             {"image": "VizWiz_test_00000001.jpg", "answer": "red cup"}])


def test_vqa_score_follows_the_official_evaluation():
    # Differing human answers: both sides go through punctuation/number steps; 3 of 10 -> 0.9.
    assert vqa_score("2", ["two"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # Identical human answers are compared as written.
    assert vqa_score("yes", ["yes"] * 10) == 1.0
    assert vqa_score("", ["yes"] * 10) == 0.0
    # The official evaluation gives 90.0 and 0.0: "1,,000" becomes "1 000" (not "1000") when processed.
    assert vqa_score("1 000", ["1,,000"] * 3 + ["other"] * 7) == pytest.approx(0.9)
    assert vqa_score("1000", ["1,,000"] * 3 + ["other"] * 7) == 0.0
    # ... and 0.0 here: identical human answers are not processed, so "1,,000" only matches itself.
    assert vqa_score("1 000", ["1,,000"] * 10) == 0.0


def test_vizwiz_score_processes_only_the_prediction():
    # VizWiz's official evaluation gives 60.0 (2 of 10 humans wrote "cup"; "the cup" is not processed);
    # the VQAv2 rule processes the humans' answers too and gives 100.0.
    humans = ["cup"] * 2 + ["the cup"] * 8
    assert vizwiz_score("A cup.", humans) == pytest.approx(0.6)
    assert vqa_score("cup", humans) == 1.0
    annotations = {"v0.jpg": {"image": "v0.jpg", "answer_type": "other",
                              "answers": [{"answer": a, "answer_confidence": "yes"} for a in humans]}}
    assert vqa_accuracy(annotations, {"v0.jpg": "cup"})["accuracy"] == pytest.approx(60.0)


def test_vqa_local_accuracy_cli(tmp_path):
    annotations = {"annotations": [
        {"question_id": 1, "answer_type": "number", "answers": [{"answer": a, "answer_id": i + 1}
                                                                for i, a in enumerate(["2"] * 3 + ["3"] * 7)]},
        {"question_id": 2, "answer_type": "yes/no", "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]},
        {"question_id": 3, "answer_type": "other", "answers": [{"answer": "red", "answer_id": i} for i in range(10)]},
    ]}
    annotation_file = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotation_file.write_text(json.dumps(annotations))
    answers = write_jsonl(tmp_path / "a.jsonl", [answer(1, "Two"), answer(2, "Yes")])  # 3 unanswered
    metrics_file = tmp_path / "m.json"
    out = run("-m", "llava.eval.eval_vqa", "--annotation-file", str(annotation_file), "--result-file", str(answers),
              "--metrics-json", str(metrics_file)).stdout
    assert "Questions: 3\nAccuracy: 63.33%\n" in out  # (0.9 + 1 + 0) / 3
    assert json.loads(metrics_file.read_text())["per_answer_type"] == {
        "number": pytest.approx(90.0), "other": 0.0, "yes/no": 100.0}

    vizwiz = [{"image": "v0.jpg", "question": "?", "answerable": 0, "answer_type": "unanswerable",
               "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
              {"image": "v1.jpg", "question": "?", "answerable": 1, "answer_type": "other",
               "answers": [{"answer": "cup", "answer_confidence": "yes"}] * 2
               + [{"answer": "mug", "answer_confidence": "maybe"}] * 8}]
    (tmp_path / "val.json").write_text(json.dumps(vizwiz))
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "image": "v0.jpg"},
                                                   {"question_id": 8, "image": "v1.jpg"}])
    answers = write_jsonl(tmp_path / "v.jsonl", [answer(7, "Unanswerable"), answer(8, "A cup")])
    out = run("-m", "llava.eval.eval_vqa", "--annotation-file", str(tmp_path / "val.json"),
              "--result-file", str(answers), "--question-file", str(questions)).stdout
    assert "Accuracy: 80.00%" in out  # (1 + 0.6) / 2


# ---------------------------------------------------------------- GQA

def test_gqa_convert_and_local_accuracy(tmp_path):
    answers = write_jsonl(tmp_path / "merge.jsonl", [answer("q1", "Yes."), answer("q2", "Right"),
                                                     answer("q3", "wrong"), answer("q3", "Red...")])
    predictions = tmp_path / "data" / "testdev_balanced_predictions.json"
    run("scripts/convert_gqa_for_eval.py", "--src", str(answers), "--dst", str(predictions))
    assert predictions.read_text() == json.dumps([{"questionId": "q1", "prediction": "yes"},
                                                  {"questionId": "q2", "prediction": "right"},
                                                  {"questionId": "q3", "prediction": "red"}])
    questions = {"q1": {"answer": "yes", "isBalanced": True}, "q2": {"answer": "left", "isBalanced": True},
                 "q3": {"answer": "red", "isBalanced": True}, "q4": {"answer": "no", "isBalanced": True},
                 "q5": {"answer": "up", "isBalanced": False}}
    questions_file = tmp_path / "data" / "testdev_balanced_questions.json"
    questions_file.write_text(json.dumps(questions))
    # A stand-in for GQA's eval.py: checks where it runs and what it reads, prints like the real one.
    (tmp_path / "data" / "eval").mkdir()
    (tmp_path / "data" / "eval" / "eval.py").write_text(
        "import json, sys\n"
        "assert sys.argv[1:] == ['--tier', 'testdev_balanced']\n"
        "predictions = json.load(open('testdev_balanced_predictions.json'))\n"
        "print(f'Binary: 0.00%\\nAccuracy: {len(predictions) * 10:.2f}%')\n")
    metrics_file = tmp_path / "gqa.json"
    completed = run("-m", "llava.eval.eval_gqa", "--questions", str(questions_file), "--predictions", str(predictions),
                    "--official-dir", str(tmp_path / "data"), "--metrics-json", str(metrics_file))
    assert completed.stdout.startswith("Questions: 4\nAccuracy: 50.00%\n")  # q1, q3 right; q4 missing; q5 unbalanced
    assert "Accuracy: 30.00%" in completed.stdout  # the stand-in official script ran on the same predictions
    assert json.loads(metrics_file.read_text()) == {"accuracy": 50.0, "questions": 4}


# ---------------------------------------------------------------- MMBench

def mmbench_tsv(path: Path) -> Path:
    rows = [
        {"index": 0, "question": "q0", "hint": "h", "A": "cat", "B": "dog", "C": None, "D": None, "answer": "B"},
        {"index": 1, "question": "q1", "hint": None, "A": "red", "B": "blue", "C": "green", "D": None, "answer": "A"},
        {"index": 2, "question": "q2", "hint": "h", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "D"},
    ]
    for row in rows:
        row.update({"category": "c", "image": "aGk=", "source": "s", "l2-category": "l2", "comment": None,
                    "split": "dev"})
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def rotation(question_id, round_id: int, options: list[str], text: str) -> dict:
    letters = "ABCD"[:len(options)]
    shift = round_id % len(options)
    return answer(question_id, text, round_id=round_id, options=options[shift:] + options[:shift],
                  option_char=list(letters[shift:] + letters[:shift]))


def mmbench_answers() -> list[dict]:
    return [
        # q0 (right: B "dog"): round 0 shows A cat, B dog; round 1 shows A dog, B cat.
        rotation(0, 0, ["cat", "dog"], "B"), rotation(0, 1, ["cat", "dog"], "A"),
        # q1 (right: A "red"): rounds show red at A, then C, then B; the last rotation is answered wrong.
        rotation(1, 0, ["red", "blue", "green"], "A"), rotation(1, 1, ["red", "blue", "green"], "C."),
        rotation(1, 2, ["red", "blue", "green"], "A"),
        # q2 (right: D): two of its four rotations only.
        rotation(2, 0, ["1", "2", "3", "4"], "The answer is D"), rotation(2, 1, ["1", "2", "3", "4"], "C"),
    ]


# Expected letters are what VLMEvalKit's can_infer (the MMBench authors' matching without an LLM judge)
# returns for options A "red apple", B "green pear", C "plum"; its False and "Z" are None here.
@pytest.mark.parametrize("text, expected", [
    ("B", "B"), (" C\n", "C"), ("B.", "B"), ("[C]", "C"), ("C. dog", "C"), ("A because", "A"),
    ("I pick (B)", "B"), ("It is A.", "A"), ("A A", "A"),
    ("A or B", None), ("B or A", None), ("Either A or B", None),  # several letters: not credited
    ("B is right because it is red", None),  # the letter is not among the last four words
    ("The answer is B because it is red", "B"),  # ... but "answer is X" names it
    ("The correct answer is **C**, a plum, since it is purple", "C"),
    ("answer is c.", "C"),
    ("answer is E", None),  # E is not a shown letter
    ("a red apple", "A"), ("I think it is a plum", "C"),  # one option's text in the answer
    ("plum or green pear", None),  # two options' texts
    ("The fruit in the picture is most likely a red apple", None),  # longer than twice the option texts
    ("Z", None), ("Cannot determine the answer: A", None),  # "Z" and the reject list
    ("both fruits", None), ("", None), ("AB", None),
])
def test_mmbench_letter_parsing(text, expected):
    assert parse_letter(text, "ABC", ["red apple", "green pear", "plum"]) == expected


def test_mmbench_circular_eval(tmp_path):
    tsv = pd.read_csv(mmbench_tsv(tmp_path / "dev.tsv"), sep="\t")
    metrics = mmbench_accuracy(tsv, mmbench_answers())
    # q0 right in both rotations; q1 wrong in its last; q2 lacks two: 1 of 3. Round 0 is right for all 3.
    assert metrics == {"circular_accuracy": pytest.approx(100 / 3), "single_round_accuracy": 100.0, "questions": 3}
    round0 = [a for a in mmbench_answers() if a["round_id"] == 0]
    assert mmbench_accuracy(tsv, round0) == {"circular_accuracy": None, "single_round_accuracy": 100.0,
                                             "questions": 3}


def test_mmbench_circular_eval_counted_by_hand(tmp_path):
    tsv = pd.read_csv(mmbench_tsv(tmp_path / "dev.tsv"), sep="\t")
    answers = [
        # q0 (right: dog): round 1 shows A dog, B cat; "dog" is read from the option text as A.
        rotation(0, 0, ["cat", "dog"], "B"), rotation(0, 1, ["cat", "dog"], "dog"),
        # q1 (right: red, at A, C, B in turn): round 2 names two letters, which is not credited.
        rotation(1, 0, ["red", "blue", "green"], "A"), rotation(1, 1, ["red", "blue", "green"], "C"),
        rotation(1, 2, ["red", "blue", "green"], "B or A"),
        # q2 (right: "4", at D, C, B, A in turn): all four right.
        rotation(2, 0, ["1", "2", "3", "4"], "(D)"), rotation(2, 1, ["1", "2", "3", "4"], "C"),
        rotation(2, 2, ["1", "2", "3", "4"], "B"), rotation(2, 3, ["1", "2", "3", "4"], "The answer is A"),
    ]
    # Circularly right: q0 and q2 (2 of 3); round 0 right: all three.
    assert mmbench_accuracy(tsv, answers) == {"circular_accuracy": pytest.approx(200 / 3),
                                              "single_round_accuracy": 100.0, "questions": 3}
    answers[1] = rotation(0, 1, ["cat", "dog"], "B")  # now names cat: q0 falls too
    assert mmbench_accuracy(tsv, answers)["circular_accuracy"] == pytest.approx(100 / 3)


def mmbench_tsv_with_copies(path: Path) -> Path:
    """As the real dev TSV: the questions, then their circular copies at index + k * 10^6 (options shifted
    up k letters, the answer letter following the right option)."""
    rows = [
        {"index": 5, "question": "q5", "A": "cat", "B": "dog", "C": None, "D": None, "answer": "B"},
        {"index": 7, "question": "q7", "A": "red", "B": "blue", "C": "green", "D": None, "answer": "A"},
        {"index": 9, "question": "q9", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "D"},
        {"index": 1_000_005, "question": "q5", "A": "dog", "B": "cat", "C": None, "D": None, "answer": "A"},
        {"index": 1_000_007, "question": "q7", "A": "blue", "B": "green", "C": "red", "D": None, "answer": "C"},
        {"index": 2_000_007, "question": "q7", "A": "green", "B": "red", "C": "blue", "D": None, "answer": "B"},
        {"index": 1_000_009, "question": "q9", "A": "2", "B": "3", "C": "4", "D": "1", "answer": "C"},
        {"index": 2_000_009, "question": "q9", "A": "3", "B": "4", "C": "1", "D": "2", "answer": "B"},
        {"index": 3_000_009, "question": "q9", "A": "4", "B": "1", "C": "2", "D": "3", "answer": "A"},
    ]
    for row in rows:
        row.update({"hint": None, "category": "c", "image": "aGk=", "source": "s", "l2-category": "l2",
                    "comment": None, "split": "dev"})
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_mmbench_circular_eval_over_the_tsv_copies(tmp_path):
    """The real TSV holds each question's circular copies as rows: each row is asked once and a question
    counts only if all rows of its group (index % 10^6) are right; 3 questions, not 9 rows."""
    tsv = pd.read_csv(mmbench_tsv_with_copies(tmp_path / "dev.tsv"), sep="\t")
    letters = {5: "B", 7: "A", 9: "D", 1_000_005: "A", 1_000_007: "C", 2_000_007: "B",
               1_000_009: "C", 2_000_009: "B", 3_000_009: "A"}
    answers = [answer(index, letter) for index, letter in letters.items()]
    assert mmbench_accuracy(tsv, answers) == {"circular_accuracy": 100.0, "single_round_accuracy": 100.0,
                                              "questions": 3}
    answers[4] = answer(1_000_007, "A")  # q7's first copy picks blue: q7 fails, its own row stays right
    answers[8] = answer(3_000_009, "4")  # q9's last copy answered with the option text "4", at A: still right
    assert mmbench_accuracy(tsv, answers) == {"circular_accuracy": pytest.approx(200 / 3),
                                              "single_round_accuracy": 100.0, "questions": 3}
    answers[0] = answer(5, "A")  # q5's own row wrong: q5 fails, and its single-round answer too
    assert mmbench_accuracy(tsv, answers) == {"circular_accuracy": pytest.approx(100 / 3),
                                              "single_round_accuracy": pytest.approx(200 / 3), "questions": 3}
    # A copy left unanswered fails its question (q9), and only the questions' own rows give round 0.
    assert mmbench_accuracy(tsv, [a for a in answers if a["question_id"] != 2_000_009]) == {
        "circular_accuracy": 0.0, "single_round_accuracy": pytest.approx(200 / 3), "questions": 3}


def test_mmbench_rotating_the_copies_too_changes_no_score(tmp_path):
    """--all-rounds over a TSV that holds the copies: every rotation of every row is asked; as each
    rotation of a row is a prompt some copy also shows, the same answers give the same score."""
    path = mmbench_tsv_with_copies(tmp_path / "dev.tsv")
    tsv = pd.read_csv(path, sep="\t")
    picks = {"q5": "dog", "q7": "red", "q9": "3"}  # q9 is answered wrong, whatever the order
    answers = []
    for row in pd.read_csv(path, sep="\t", dtype=str).to_dict("records"):  # option texts as written
        options = [row[c] for c in "ABCD" if isinstance(row[c], str)]
        for round_id in range(len(options)):
            shown = options[round_id:] + options[:round_id]
            letter = "ABCD"[shown.index(picks[row["question"]])]
            answers.append(rotation(int(row["index"]), round_id, options, letter))
    assert mmbench_accuracy(tsv, answers) == {"circular_accuracy": pytest.approx(200 / 3),
                                              "single_round_accuracy": pytest.approx(200 / 3), "questions": 3}


def test_mmbench_cli_and_upload(tmp_path):
    tsv = mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv")
    results = tmp_path / "answers"
    results.mkdir()
    write_jsonl(results / "exp.jsonl", [a for a in mmbench_answers() if a["question_id"] != 2])
    metrics_file = tmp_path / "mmbench.json"
    out = run("-m", "llava.eval.eval_mmbench", "--annotation-file", str(tsv),
              "--result-file", str(results / "exp.jsonl"), "--metrics-json", str(metrics_file)).stdout
    assert "CircularEval accuracy: 33.33%" in out  # q0 only; q2 unanswered
    assert json.loads(metrics_file.read_text()) == {
        "circular_accuracy": pytest.approx(100 / 3), "single_round_accuracy": pytest.approx(200 / 3), "questions": 3}
    round0 = write_jsonl(tmp_path / "round0.jsonl", [a for a in mmbench_answers() if a["round_id"] == 0])
    out = run("-m", "llava.eval.eval_mmbench", "--annotation-file", str(tsv), "--result-file", str(round0),
              "--metrics-json", str(metrics_file)).stdout
    assert "Accuracy (round 0): 100.00%" in out and "CircularEval accuracy:" not in out
    assert json.loads(metrics_file.read_text()) == {"circular_accuracy": None, "single_round_accuracy": 100.0,
                                                    "questions": 3}
    run("scripts/convert_mmbench_for_submission.py", "--annotation-file", str(tsv), "--result-dir", str(results),
        "--upload-dir", str(tmp_path / "upload"), "--experiment", "exp")
    sheet = pd.read_excel(tmp_path / "upload" / "exp.xlsx", engine="openpyxl")
    assert list(sheet.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert list(sheet["index"]) == [0, 1, 2]
    assert list(sheet["prediction"][:2]) == ["B", "A"]  # round 0 answers
    assert math.isnan(sheet["prediction"][2])


# ---------------------------------------------------------------- results table

def test_results_table_and_recording(tmp_path):
    paper_ft = dict(zip(["vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mmbench"],
                        [78.5, 61.9, 50.0, 66.8, 58.2, 85.9, 64.3]))
    write_results(tmp_path / "runs" / "ft", "FT", 100, {k: {"score": v, "source": "recorded"}
                                                         for k, v in paper_ft.items()})
    dora = tmp_path / "runs" / "dora"
    sqa_metrics = tmp_path / "sqa.json"
    sqa_metrics.write_text(json.dumps({"accuracy": 70.0, "img_accuracy": 69.9, "total": 10}))
    run("-m", "llava.eval.summarize", "--write", str(dora), "--method", "DoRA", "--params-percent", "4.63",
        "--metrics", f"sqa={sqa_metrics}", "--score", "gqa=62.9", "--upload", "vqav2=/r/vqav2/up.json")
    table = run("-m", "llava.eval.summarize", str(tmp_path / "runs")).stdout.splitlines()
    assert table[0] == "| Method | # Params (%) | VQAv2 | GQA | VisWiz | SQA | VQAT | POPE | MMBench | Avg |"
    assert table[2] == "| DoRA | 4.63 | - [1] | 62.9 | - | 69.9 | - | - | - | 66.4* |"  # (62.9 + 69.9) / 2
    assert table[3] == "| FT | 100 | 78.5 | 61.9 | 50.0 | 66.8 | 58.2 | 85.9 | 64.3 | 66.5 |"  # 465.6 / 7
    assert any(line.startswith("[1] DoRA, VQAv2: submit /r/vqav2/up.json") for line in table)
    assert any(line.startswith("* Avg over the benchmarks with a score only") for line in table)

    run("-m", "llava.eval.summarize", "--record", str(dora), "VQAv2", "78.6")
    saved = json.loads((dora / "results.json").read_text())
    assert saved["benchmarks"]["vqav2"] == {"score": 78.6, "source": "server", "upload": "/r/vqav2/up.json"}
    assert saved["benchmarks"]["gqa"] == {"score": 62.9, "source": "local", "upload": None}
    assert render_table([saved]).splitlines()[2].startswith("| DoRA | 4.63 | 78.6 | 62.9 |")


HEADER = ["| Method | # Params (%) | VQAv2 | GQA | VisWiz | SQA | VQAT | POPE | MMBench | Avg |",
          "|---|---|---|---|---|---|---|---|---|---|"]
SINGLE_ROUND_FOOTNOTE = (
    "(X 1-round): MMBench single-round accuracy (each question asked once, options in their original order), "
    "not CircularEval, the paper's MMBench metric; not in Avg. The TSV held no circular copies: use MMBench's "
    "own TSV, run 7B_eval_dora.sh with MMBENCH_ALL_ROUNDS=1, or submit the MMBench upload to the evaluation "
    "server and record its score.")


def test_mmbench_paper_score_is_circular_accuracy_only():
    assert paper_score("mmbench", {"circular_accuracy": 66.1, "single_round_accuracy": 71.2, "questions": 3}) == 66.1
    with pytest.raises(ValueError, match="circular_accuracy"):
        paper_score("mmbench", {"circular_accuracy": None, "single_round_accuracy": 71.2, "questions": 3})
    with pytest.raises(ValueError, match="circular_accuracy"):
        paper_score("mmbench", {"accuracy": 71.2})


def test_mmbench_single_round_is_never_shown_as_the_score(tmp_path):
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"circular_accuracy": None, "single_round_accuracy": 71.2, "questions": 3}))
    circular = tmp_path / "circular.json"
    circular.write_text(json.dumps({"circular_accuracy": 60.0, "single_round_accuracy": 70.0, "questions": 3}))
    dora = tmp_path / "runs" / "dora"

    def write(metrics: Path) -> dict:
        run("-m", "llava.eval.summarize", "--write", str(dora), "--method", "DoRA", "--params-percent", "4.63",
            "--score", "gqa=62.9", "--metrics", f"mmbench={metrics}", "--upload", "mmbench=/r/mmbench/up.xlsx")
        return json.loads((dora / "results.json").read_text())

    saved = write(single)
    assert saved["benchmarks"]["mmbench"] == {"score": None, "source": "server", "upload": "/r/mmbench/up.xlsx",
                                              "single_round_accuracy": 71.2}
    assert render_table([saved], ["RUN"]).splitlines() == HEADER + [
        "| DoRA | 4.63 | - | 62.9 | - | - | - | - | (71.2 1-round) [1] | 62.9* |",
        "",
        "* Avg over the benchmarks with a score only, not all 7.",
        SINGLE_ROUND_FOOTNOTE,
        ("[1] DoRA, MMBench: submit /r/mmbench/up.xlsx to the evaluation server, then record its score: "
         "python -m llava.eval.summarize --record RUN mmbench SCORE"),
    ]
    run("-m", "llava.eval.summarize", "--record", str(dora), "mmbench", "66.1")
    assert render_table([load_results(dora)]).splitlines()[2:] == [
        "| DoRA | 4.63 | - | 62.9 | - | - | - | - | 66.1 | 64.5* |",  # (62.9 + 66.1) / 2
        "",
        "* Avg over the benchmarks with a score only, not all 7.",
    ]
    assert write(single)["benchmarks"]["mmbench"]["score"] == 66.1  # a rerun keeps the server's score
    assert write(circular)["benchmarks"]["mmbench"] == {"score": 60.0, "source": "local",
                                                        "upload": "/r/mmbench/up.xlsx", "single_round_accuracy": 70.0}
    # A later single-round run supersedes a local score: no stale figure is left as the MMBench score.
    assert write(single)["benchmarks"]["mmbench"]["score"] is None


def test_old_results_json_mmbench_score_reads_as_before(tmp_path):
    old = tmp_path / "lora" / "results.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"method": "LoRA", "params_percent": 4.61, "benchmarks": {
        "mmbench": {"score": 66.1, "source": "local", "upload": None}}}))
    loaded = load_results(old)
    assert loaded["dora_magnitudes"] is None
    assert render_table([loaded]).splitlines() == HEADER + [
        "| LoRA | 4.61 | - | - | - | - | - | - | 66.1 | 66.1* |",
        "",
        "* Avg over the benchmarks with a score only, not all 7.",
    ]


def test_dora_magnitudes_in_results_and_table(tmp_path):
    paper_dora = dict(zip(["vqav2", "gqa", "vizwiz", "sqa", "textvqa", "pope", "mmbench"],
                          [78.6, 62.9, 52.2, 69.9, 57.0, 87.2, 66.1]))
    seed_like = write_results(tmp_path / "seed", "DoRA", 4.63, {k: {"score": v} for k, v in paper_dora.items()},
                              dora_magnitudes="weight_norm")
    run("-m", "llava.eval.summarize", "--write", str(tmp_path / "trained"), "--method", "DoRA",
        "--params-percent", "4.63", "--dora-magnitudes", "trained", "--score", "gqa=63.0")
    lora = write_results(tmp_path / "lora", "LoRA", 4.61, {"gqa": {"score": 62.9}})
    assert json.loads(seed_like.read_text())["dora_magnitudes"] == "weight_norm"
    assert json.loads((tmp_path / "trained" / "results.json").read_text())["dora_magnitudes"] == "trained"
    assert json.loads(lora.read_text())["dora_magnitudes"] is None
    rows = [load_results(path) for path in (seed_like, tmp_path / "trained", lora)]
    assert render_table(rows).splitlines() == HEADER + [
        "| DoRA (m = \\|\\|W0\\|\\|) | 4.63 | 78.6 | 62.9 | 52.2 | 69.9 | 57.0 | 87.2 | 66.1 | 67.7 |",  # 473.9 / 7
        "| DoRA (trained m) | 4.63 | - | 63.0 | - | - | - | - | - | 63.0* |",
        "| LoRA | 4.61 | - | 62.9 | - | - | - | - | - | 62.9* |",
        "",
        "* Avg over the benchmarks with a score only, not all 7.",
        ("m = ||W0||: magnitudes set to the base weights' row norms, as the seed's loader evaluated "
         "the paper's DoRA row."),
    ]
    # Later writes without the option keep the mode; a bad mode is refused when written and when read.
    write_results(tmp_path / "seed", benchmarks={"gqa": {"score": 63.1}})
    assert load_results(seed_like)["dora_magnitudes"] == "weight_norm"
    with pytest.raises(ValueError, match="dora_magnitudes"):
        write_results(tmp_path / "seed", dora_magnitudes="norm")
    seed_like.write_text(json.dumps({"method": "DoRA", "dora_magnitudes": "norm", "benchmarks": {}}))
    with pytest.raises(InputFileError, match="dora_magnitudes"):
        load_results(seed_like)


def test_a_row_holds_one_models_results(tmp_path):
    """Results of another checkpoint or magnitude mode never merge into a row: refused on write, and before
    an evaluation starts (--check-row), where --fresh moves the old results.json aside instead."""
    row = tmp_path / "results" / "dora"
    write_results(row, "dora", 14.77, {"gqa": {"score": 74.0}}, "trained", checkpoint="aaaa", model_path="/ck/dora")
    write_results(row, benchmarks={"pope": {"score": 80.0}}, dora_magnitudes="trained", checkpoint="aaaa")
    with pytest.raises(ValueError, match=r"holds the results of /ck/dora, not of the checkpoint evaluated now"):
        write_results(row, "dora", 14.43, {"gqa": {"score": 72.3}}, checkpoint="bbbb", model_path="/ck/lora")
    with pytest.raises(ValueError, match="holds results with DORA_MAGNITUDES=trained; this run uses weight_norm"):
        write_results(row, benchmarks={"gqa": {"score": 72.7}}, dora_magnitudes="weight_norm", checkpoint="aaaa")
    saved = load_results(row)
    assert (saved["params_percent"], saved["checkpoint"], saved["model_path"]) == (14.77, "aaaa", "/ck/dora")
    assert {k: v["score"] for k, v in saved["benchmarks"].items()} == {"gqa": 74.0, "pope": 80.0}

    assert check_row(row, "aaaa", "trained") is None
    refused = subprocess.run([sys.executable, "-m", "llava.eval.summarize", "--check-row", str(row), "--checkpoint",
                              "bbbb"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "another CKPT name or RESULTPATH" in refused.stderr
    with pytest.raises(ValueError, match="DORA_MAGNITUDES=trained"):
        check_row(row, "aaaa", "weight_norm")
    before = (row / "results.json").read_text()
    moved = check_row(row, "bbbb", fresh=True)
    assert not (row / "results.json").exists() and moved.read_text() == before  # kept, beside the row

    # A row written before rows recorded their checkpoint is taken as this checkpoint's, and records it now.
    legacy = tmp_path / "results" / "legacy"
    write_results(legacy, "legacy", None, {"gqa": {"score": 60.0}})
    assert check_row(legacy, "cccc") is None
    assert load_results(write_results(legacy, checkpoint="cccc"))["checkpoint"] == "cccc"


def test_record_goes_into_an_existing_row_and_takes_percentages(tmp_path):
    results = tmp_path / "results"
    write_results(results / "dora", "dora", 4.63, {"gqa": {"score": 62.9}})
    for wrong, message in ((results / "DoRa", r"DoRa/results\.json does not exist.*--write"),
                           (results, r"It holds the rows dora: give RESULTPATH/CKPT")):
        with pytest.raises(ValueError, match=message):
            record_score(wrong, "vqav2", 78.6)
        assert not results_file(wrong).exists()
    for score in (786.0, -1.0):
        with pytest.raises(ValueError, match="outside 0-100"):
            record_score(results / "dora", "vqav2", score)
    refused = subprocess.run([sys.executable, "-m", "llava.eval.summarize", "--record", str(results), "vqav2", "78.6"],
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "give RESULTPATH/CKPT" in refused.stderr
    record_score(results / "dora", "vqav2", 78.6)
    assert load_results(results / "dora")["benchmarks"]["vqav2"]["score"] == 78.6
    told = run("-m", "llava.eval.summarize", "--record", str(results / "dora"), "gqa", "50").stdout
    assert told.rstrip().endswith("gqa = 50.0 (server); it replaces the local score 62.9"), told


def test_scorer_cli_reports_bad_jsonl_with_file_and_line(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "category": "random"}])
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 1, "text": "yes"}\nnot json\n')
    completed = subprocess.run([sys.executable, "-m", "llava.eval.eval_pope", "--annotation-dir", str(tmp_path),
                                "--question-file", str(questions), "--result-file", str(answers)],
                               cwd=REPO, capture_output=True, text=True)
    assert completed.returncode != 0
    assert f"{answers}:2: not valid JSON" in completed.stderr


def test_rows_of_several_resultpaths_that_read_alike_name_their_folder(tmp_path):
    for seed, score in (("seed0", 74.0), ("seed1", 69.0)):
        write_results(tmp_path / seed / "FT", "FT", 94.1, {"gqa": {"score": score}})
    write_results(tmp_path / "seed1" / "LoRA", "LoRA", 14.43, {"gqa": {"score": 81.0}})
    table = run("-m", "llava.eval.summarize", str(tmp_path / "seed0"), str(tmp_path / "seed1")).stdout.splitlines()
    assert [line.split(" | ")[:3] for line in table[2:5]] == [
        [f"| FT [{tmp_path / 'seed0'}]", "94.1", "-"], [f"| FT [{tmp_path / 'seed1'}]", "94.1", "-"], ["| LoRA", "14.43", "-"]]
    assert [line.split(" | ")[3] for line in table[2:5]] == ["74.0", "69.0", "81.0"]
