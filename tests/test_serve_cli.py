"""The terminal chat (``python -m llava.serve.cli``) on a tiny LLaVA, scripted through its standard input.

The expectations come from the evaluation's generation loop (``Generator``, batch size 1, greedy) on
prompts written out here by hand from the vicuna_v1 template, not from the chat's own prompt building.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.eval import generation as gen
from llava.model.builder import load_pretrained_model
from llava.serve import chat as chat_lib
from llava.serve import how_to_chat
from llava.serve.cli import StreamPrinter
from llava.serve.examples import benchmark_examples
from llava.tiny_base import build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
MAX_NEW = 12
QUESTIONS = ["what color is the cat on the left?", "and the car near the tree?"]


def noise_image(path: Path, seed: int = 5) -> Path:
    pixels = torch.rand(30, 44, 3, generator=torch.Generator().manual_seed(seed)) * 255
    Image.fromarray(pixels.byte().numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_base, tmp_path_factory) -> Path:
    return build_tiny_llava(tiny_base, tmp_path_factory.mktemp("serve_cli") / "llava-tiny")


def eval_loop_answer(model_dir: Path, image: Path, prompt: str) -> str:
    """What the benchmarks' generation loop answers to ``prompt`` at temperature 0."""
    tokenizer, model, processor, _ = load_pretrained_model(str(model_dir), None, device="cpu")
    settings = gen.GenerationSettings(temperature=0, max_new_tokens=MAX_NEW, stop_str="</s>")
    request = gen.Request(0, prompt, "q", images=[gen.open_rgb(str(image))])
    return next(gen.Generator(model, tokenizer, processor, settings, batch_size=1).answer([request]))[1]


def test_chat_answers_equal_the_evaluation_loop_and_carry_the_conversation(model_dir, tmp_path):
    image = noise_image(tmp_path / "photo.png")
    command = [
        sys.executable, "-m", "llava.serve.cli", "--model-path", str(model_dir), "--image-file", str(image),
        "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--debug",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, input="\n".join(QUESTIONS) + "\n", capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = re.findall(r"ASSISTANT: (.*)\n", done.stdout)
    debug = [json.loads(line) for line in done.stderr.splitlines() if line.startswith('{"prompt"')]
    assert len(printed) == 2 and len(debug) == 2, done.stdout

    first_prompt = f"{SYSTEM} USER: <image>\n{QUESTIONS[0]} ASSISTANT:"
    first = eval_loop_answer(model_dir, image, first_prompt)
    assert first, "the tiny model should say something"
    assert debug[0] == {"prompt": first_prompt, "answer": first}
    assert printed[0].strip() == first  # what was streamed to the terminal is the answer

    second_prompt = f"{first_prompt} {first}</s>USER: {QUESTIONS[1]} ASSISTANT:"
    assert debug[1]["prompt"] == second_prompt
    second = eval_loop_answer(model_dir, image, second_prompt)
    assert debug[1]["answer"] == second and printed[1].strip() == second
    assert done.stdout.rstrip().endswith("USER:")  # end of input ends the chat


class _CharTokenizer:
    """Decodes ids as characters, enough for TextStreamer's bookkeeping."""

    def decode(self, ids, **_: object) -> str:
        return "".join(chr(i) for i in ids)


def streamed(tokens: str, stop: str | None) -> str:
    out = io.StringIO()
    printer = StreamPrinter(_CharTokenizer(), stop, out)
    printer.put(torch.tensor([[]], dtype=torch.long))  # the prompt, skipped
    for ch in tokens:
        printer.put(torch.tensor([ord(ch)]))
    printer.end()
    return out.getvalue()


def test_stream_printer_stops_at_a_text_separator_and_holds_back_its_start():
    assert streamed(" Two red cubes. ", None) == "Two red cubes. \n"
    assert streamed("left ## right###Human: more", "###") == "left ## right\n"
    assert streamed("almost #", "###") == "almost #\n"  # a possible start of the stop string is shown at the end


def test_template_choice_follows_the_training_template_unless_the_name_or_flag_says_otherwise():
    assert chat_lib.chat_conv_mode(None, "dora") == "vicuna_v1"
    assert chat_lib.chat_conv_mode(None, "llava-v1.5-7b-dora-release") == "vicuna_v1"
    assert chat_lib.chat_conv_mode(None, "llava-llama-2-13b-chat") == "llava_llama_2"
    assert chat_lib.chat_conv_mode("llava_v1", "dora") == "llava_v1"


def test_model_base_goes_only_to_checkpoints_that_need_one(model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    projector_only = tmp_path / "projector"
    projector_only.mkdir()
    (projector_only / "mm_projector.bin").write_bytes(b"")
    assert chat_lib.base_for(str(model_dir), "BASE") is None
    assert chat_lib.base_for(str(adapter), "BASE") == "BASE"
    assert chat_lib.base_for(str(projector_only), "BASE") == "BASE"
    assert chat_lib.base_for("org/hub-model", "BASE") == "BASE"


def test_images_open_from_files_and_unreachable_urls_fail_clearly(tmp_path):
    image = noise_image(tmp_path / "a.png")
    assert chat_lib.open_image(str(image)).size == (44, 30)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        chat_lib.open_image(str(tmp_path / "missing.png"))
    from llava.serve import cli as serve_cli

    with pytest.raises(SystemExit, match="llava.serve.cli: Image file not found: .*missing.png"):
        serve_cli.main(["--model-path", str(tmp_path), "--image-file", str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"Cannot fetch http://127\.0\.0\.1:9/x\.jpg .*download the image"):
        chat_lib.open_image("http://127.0.0.1:9/x.jpg", timeout=2)


def test_a_folder_or_a_non_image_file_is_refused_in_one_line(tmp_path):
    """Before, a folder was "not found" and a text file crashed with PIL's UnidentifiedImageError."""
    from llava.serve import cli as serve_cli

    text = tmp_path / "notes.md"
    text.write_text("# not an image\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))} is a folder, not an image file"):
        chat_lib.open_image(str(tmp_path))
    with pytest.raises(ValueError, match=f"{re.escape(str(text))} is not an image PIL can read"):
        chat_lib.open_image(str(text))
    with pytest.raises(SystemExit, match=f"^llava.serve.cli: {re.escape(str(tmp_path))} is a folder, not an image"):
        serve_cli.main(["--model-path", str(tmp_path), "--image-file", str(tmp_path)])
    done = subprocess.run([sys.executable, "-m", "llava.serve.cli", "--model-path", str(tmp_path), "--image-file",
                           str(text)], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line == f"llava.serve.cli: {text} is not an image PIL can read: name a JPEG, PNG or other image file."


def test_a_device_the_machine_lacks_is_refused_before_loading(tmp_path, monkeypatch):
    """``--device cuda`` without CUDA failed inside torch ("Torch not compiled with CUDA enabled")."""
    from llava.serve import cli as serve_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = noise_image(tmp_path / "a.png")
    with pytest.raises(SystemExit, match=r"^llava.serve.cli: --device cuda: this machine has no CUDA device"):
        serve_cli.main(["--model-path", str(tmp_path / "nope"), "--image-file", str(image), "--device", "cuda"])
    with pytest.raises(SystemExit, match=r"^llava.serve.cli: --device gpu: not a device torch knows"):
        serve_cli.main(["--model-path", str(tmp_path / "nope"), "--image-file", str(image), "--device", "gpu"])
    chat_lib.check_device("cpu")
    chat_lib.check_device(None)


def test_a_missing_checkpoint_or_base_is_named_before_loading(model_dir, tmp_path, monkeypatch):
    """A mistyped relative path reached transformers as a hub id ("Repo id must be in the form ..."); a
    projector-only folder without --model-base failed on its missing tokenizer."""
    from llava.serve import cli as serve_cli

    image = noise_image(tmp_path / "a.png")
    projector_only = tmp_path / "checkpoints" / "demo" / "projector"
    projector_only.mkdir(parents=True)
    (projector_only / "config.json").write_text((model_dir / "config.json").read_text())
    (projector_only / "mm_projector.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(chat_lib, "load_chat_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cases = [
        (["--model-path", "checkpoints/demo/nope"], r"checkpoints/demo/nope: no such folder \(--model-path\)"),
        (["--model-path", "checkpoints/demo/projector", "--model-base", "checkpoints/base/vicuna-tinyX"],
         r"checkpoints/base/vicuna-tinyX: no such folder \(--model-base\)"),
        (["--model-path", "checkpoints/demo/projector"],
         "checkpoints/demo/projector holds only a projector .* no --model-base was given"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=f"^llava.serve.cli: {message}"):
            serve_cli.main([*flags, "--image-file", str(image), "--device", "cpu"])


def write_eval_folder(root: Path) -> Path:
    """Two benchmarks in their official layout (README.md, "Evaluation data"), one question without its image."""
    (root / "vqav2" / "test2015").mkdir(parents=True)
    noise_image(root / "vqav2" / "test2015" / "COCO_test2015_000000000001.jpg")
    lines = [{"question_id": 1000, "image": "COCO_test2015_000000000001.jpg",
              "text": "What color is the shape?\nAnswer the question using a single word or phrase."},
             {"question_id": 2000, "image": "absent.jpg", "text": "How many?"}]
    (root / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl").write_text("".join(json.dumps(q) + "\n" for q in lines))
    (root / "pope" / "val2014").mkdir(parents=True)
    noise_image(root / "pope" / "val2014" / "COCO_val2014_000000000007.jpg", seed=6)
    pope = {"question_id": 1, "image": "COCO_val2014_000000000007.jpg", "category": "random",
            "text": "Is there a circle in the image?\nAnswer the question using a single word or phrase."}
    (root / "pope" / "llava_pope_test.jsonl").write_text(json.dumps(pope) + "\n")
    return root


def test_examples_come_from_the_benchmark_question_files(tmp_path):
    eval_dir = write_eval_folder(tmp_path / "eval")
    examples = benchmark_examples(eval_dir, per_benchmark=2)
    assert [(e.benchmark, e.image.name, e.question.splitlines()[0]) for e in examples] == [
        ("VQAv2", "COCO_test2015_000000000001.jpg", "What color is the shape?"),
        ("POPE", "COCO_val2014_000000000007.jpg", "Is there a circle in the image?"),
    ]


def test_how_to_chat_names_both_commands_with_the_base_for_the_adapters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eval_dir = write_eval_folder(tmp_path / "data" / "eval")
    text = how_to_chat(tmp_path / "out", ["ft", "lora", "dora"], eval_dir)
    web = next(line for line in text.splitlines() if "llava.serve.web" in line)
    cli = next(line for line in text.splitlines() if "llava.serve.cli" in line)
    assert web.endswith("-m llava.serve.web --model-path out/ft out/lora out/dora --model-base out/base/vicuna-tiny "
                        "--examples data/eval")
    assert cli.endswith("-m llava.serve.cli --model-path out/dora --model-base out/base/vicuna-tiny "
                        "--image-file data/eval/vqav2/test2015/COCO_test2015_000000000001.jpg")


@pytest.mark.parametrize("flag, layer", [("--load-4bit", "Linear4bit"), ("--load-8bit", "Linear8bitLt")])
def test_quantization_flags_load_the_language_model_quantized(model_dir, flag, layer):
    from llava.serve.cli import parse_args

    args = parse_args(["--model-path", str(model_dir), "--image-file", "unused.png", "--device", "cpu", flag])
    model = chat_lib.load_chat_model(args, args.model_path).loaded.model
    assert type(model.get_model().layers[0].self_attn.q_proj).__name__ == layer
    assert type(model.get_model().mm_projector[0]).__name__ == "Linear"  # the projector stays unquantized
