"""The web demo (``python -m llava.serve.web``) as a user starts it: one process serving two tiny
checkpoints side by side (a full model and a DoRA adapter on it as base), asked through its API with
``gradio_client`` and through the page in Debian's headless chromium.

The expected answers come from the evaluation's generation loop (batch size 1, greedy) on the prompt
written out here from the vicuna_v1 template.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_dora_magnitude_mode import seed_format_checkpoint
from test_serve_cli import SYSTEM, write_eval_folder

from llava.eval import generation as gen
from llava.model.builder import load_pretrained_model
from llava.tiny_base import build_tiny_llava

try:
    import gradio_client  # noqa: F401
    import selenium  # noqa: F401
except ImportError as err:
    raise ImportError(f"{err}: the web tests need the serve extra (bash scripts/setup.sh installs it)") from err

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 10
QUESTION = "what color is the cat on the left?"
LABELS = ("FT", "DoRA")
APT = "apt-get install chromium chromium-driver (scripts/setup.sh does it when run as root)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tiny_base, tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("serve_web")
    full = build_tiny_llava(tiny_base, root / "ft")
    seed_format_checkpoint(full, root / "dora")
    return full, root / "dora", write_eval_folder(root / "eval")


@pytest.fixture(scope="module")
def expected(checkpoints) -> dict[str, str]:
    """Each checkpoint's answer from the evaluation loop, loaded directly (the adapter onto its base)."""
    full, dora, eval_dir = checkpoints
    image = eval_dir / "vqav2" / "test2015" / "COCO_test2015_000000000001.jpg"
    settings = gen.GenerationSettings(temperature=0, max_new_tokens=MAX_NEW, stop_str="</s>")
    request = gen.Request(0, f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:", QUESTION, [gen.open_rgb(str(image))])
    answers = {}
    for label, (path, base) in zip(LABELS, [(full, None), (dora, full)]):
        base = None if base is None else str(base)
        tokenizer, model, processor, _ = load_pretrained_model(str(path), base, device="cpu")
        answers[label] = next(gen.Generator(model, tokenizer, processor, settings, batch_size=1).answer([request]))[1]
    assert all(answers.values()) and answers["FT"] != answers["DoRA"], answers
    return answers


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    """The one command, on a free local port; stopped after the module."""
    full, dora, eval_dir = checkpoints
    port = free_port()
    log = tmp_path_factory.mktemp("serve_web_log") / "web.log"
    command = [
        sys.executable, "-m", "llava.serve.web", "--model-path", str(full), str(dora), "--model-base", str(full),
        "--labels", *LABELS, "--examples", str(eval_dir), "--device", "cpu", "--port", str(port),
        "--max-new-tokens", str(MAX_NEW),
    ]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the web demo exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the web demo did not answer on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_api_answers_with_every_checkpoint_as_the_evaluation_loop(server, checkpoints, expected):
    from gradio_client import Client, handle_file

    image = checkpoints[2] / "vqav2" / "test2015" / "COCO_test2015_000000000001.jpg"
    client = Client(server, verbose=False)
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/answer"]
    answers = client.predict(handle_file(str(image)), QUESTION, 0, MAX_NEW, api_name="/answer")
    assert answers == expected
    with pytest.raises(Exception, match="Type a question"):
        client.predict(handle_file(str(image)), "  ", 0, MAX_NEW, api_name="/answer")


def chromium():
    """Debian's chromium through its chromedriver, headless; a clear failure when they are missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(f"The browser test needs Debian's chromium and its driver: {APT}.")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    flags = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900")
    for flag in flags:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def words(text: str) -> str:
    return " ".join(text.split())


def test_page_shows_both_checkpoints_answers_to_an_uploaded_image(server, checkpoints, expected, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    upload = checkpoints[2] / "vqav2" / "test2015" / "COCO_test2015_000000000001.jpg"
    browser = chromium()
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        labels = [words(browser.find_element(By.ID, f"chat-{k}").text) for k in range(2)]
        assert labels == list(LABELS)
        assert "VQAv2: What color is the shape?" in browser.page_source  # the benchmark examples are offered
        browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(upload))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image img"))
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        browser.find_element(By.ID, "ask").click()
        def answered(k: int, label: str):
            return lambda b: words(expected[label]) in words(b.find_element(By.ID, f"chat-{k}").text)

        for k, label in enumerate(LABELS):
            wait.until(answered(k, label))
        chats = [words(browser.find_element(By.ID, f"chat-{k}").text) for k in range(2)]
        assert chats == [f"{label} {QUESTION} {words(expected[label])}" for label in LABELS]
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.quit()


def test_follow_up_questions_go_on_with_each_checkpoints_own_conversation(checkpoints, expected):
    """The page's chat, called in-process: answers stream in pieces, and the second turn's prompt holds each
    checkpoint's own first answer."""
    from llava.serve import web

    full, dora, eval_dir = checkpoints
    image_path = eval_dir / "vqav2" / "test2015" / "COCO_test2015_000000000001.jpg"
    args = web.parse_args(["--model-path", str(full), str(dora), "--model-base", str(full), "--labels", *LABELS,
                           "--examples", str(eval_dir), "--device", "cpu"])
    demo = web.load_demo(args)
    image = gen.open_rgb(str(image_path))
    steps = [history for _, history in demo.ask(image, QUESTION, 0, MAX_NEW, [])]
    assert steps[-1] == [[(QUESTION, expected[label])] for label in LABELS]
    partials = [history[0][-1][1] for history in steps if not history[1]]  # FT's answer while it streams
    assert len(set(partials)) > 2 and all(expected["FT"].startswith(p) for p in partials)

    follow_up = "and the car near the tree?"
    final = [history for _, history in demo.ask(image, follow_up, 0, MAX_NEW, steps[-1])][-1]
    settings = gen.GenerationSettings(temperature=0, max_new_tokens=MAX_NEW, stop_str="</s>")
    for k, label in enumerate(LABELS):
        model = demo.models[k].loaded
        prompt = f"{SYSTEM} USER: <image>\n{QUESTION} ASSISTANT: {expected[label]}</s>USER: {follow_up} ASSISTANT:"
        request = gen.Request(0, prompt, follow_up, [image])
        generator = gen.Generator(model.model, model.tokenizer, model.image_processor, settings, batch_size=1)
        second = next(generator.answer([request]))[1]
        assert final[k] == [(QUESTION, expected[label]), (follow_up, second)]


def test_labels_tell_every_checkpoint_apart():
    """The labels key the API's answers: equal ones would drop an answer."""
    from llava.serve.web import labels_for

    assert labels_for(["runs/7b/checkpoints/dora", "runs/13b/checkpoints/dora", "x/lora"], None) == [
        "7b/checkpoints/dora", "13b/checkpoints/dora", "lora"]
    assert labels_for(["checkpoints/demo/ft", "checkpoints/demo-seed1/ft"], None) == ["demo/ft", "demo-seed1/ft"]
    assert labels_for(["a/ft", "a/ft"], None) == ["a/ft (1)", "a/ft (2)"]
    with pytest.raises(ValueError, match="--labels must be distinct"):
        labels_for(["a", "b"], ["same", "same"])


def fake_full_model(folder: Path) -> Path:
    """A folder the checks take for a full model (config.json, weights); never loaded in these tests."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def web_without_loading(monkeypatch):
    """``llava.serve.web`` whose model loading fails the test: every refusal must come before it."""
    from llava.serve import chat as chat_lib
    from llava.serve import web

    monkeypatch.setattr(chat_lib, "load_chat_model", lambda *a, **k: pytest.fail("a model was loaded"))
    return web


def test_every_path_is_checked_before_any_model_loads(web_without_loading, tmp_path, monkeypatch):
    """A typo in the last --model-path (or in --model-base) used to surface only after the earlier
    checkpoints had loaded, as transformers' "Repo id must be in the form ..."."""
    fake_full_model(tmp_path / "checkpoints" / "demo" / "ft")
    fake_full_model(tmp_path / "checkpoints" / "base" / "vicuna")
    monkeypatch.chdir(tmp_path)
    port = ["--port", str(free_port()), "--device", "cpu"]
    cases = [
        (["checkpoints/demo/ft", "checkpoints/demo/dorra", "--model-base", "checkpoints/base/vicuna"],
         r"checkpoints/demo/dorra: no such folder \(--model-path\)"),
        (["checkpoints/demo/ft", "--model-base", "checkpoints/base/vicunaX"],
         r"checkpoints/base/vicunaX: no such folder \(--model-base\)"),
        (["checkpoints/demo/ft", "--examples", "playground/nowhere"],
         r"--examples playground/nowhere: no such folder .*README\.md, 'Evaluation data'"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=f"^llava.serve.web: {message}"):
            web_without_loading.main(["--model-path", *flags, *port])


def test_a_device_the_machine_lacks_is_refused_before_loading(web_without_loading, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ft = fake_full_model(tmp_path / "ft")
    with pytest.raises(SystemExit, match=r"^llava.serve.web: --device cuda:1: this machine has no CUDA device"):
        web_without_loading.main(["--model-path", str(ft), "--device", "cuda:1", "--port", str(free_port())])


def test_a_busy_port_is_refused_before_loading(web_without_loading, tmp_path):
    """gradio said so only at launch, after every model had loaded."""
    ft = fake_full_model(tmp_path / "ft")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"^llava.serve.web: --port {port}: 127\.0\.0\.1:{port} is in use"
                                             r".*--port N"):
            web_without_loading.main(["--model-path", str(ft), "--device", "cpu", "--port", str(port)])


def test_page_reads_photos_as_evaluation_does_and_routes_the_projector(checkpoints, tmp_path):
    """The page's image component hands over the uploaded file, which is opened as evaluation opens it: a
    photo with an EXIF orientation tag is not turned (gradio's own PIL conversion would turn it). With
    several checkpoints, --mm-projector goes only to those without a projector of their own."""
    import gradio as gr
    import numpy as np
    import torch
    from gradio.data_classes import FileData
    from PIL import Image

    from llava.serve import web

    full, dora, eval_dir = checkpoints
    bare = tmp_path / "dora_without_projector"
    shutil.copytree(dora, bare)
    non_lora = torch.load(bare / "non_lora_trainables.bin", weights_only=True)
    projector_keys = [k for k in non_lora if "mm_projector" in k]
    torch.save({k: v for k, v in non_lora.items() if k not in projector_keys}, bare / "non_lora_trainables.bin")
    own = {k.removeprefix("base_model.model."): v for k, v in non_lora.items() if k in projector_keys}
    replacement = {k: torch.randn_like(v) for k, v in own.items()}
    torch.save(replacement, tmp_path / "projector.bin")

    args = web.parse_args(["--model-path", str(full), str(dora), str(bare), "--model-base", str(full),
                           "--mm-projector", str(tmp_path / "projector.bin"), "--device", "cpu"])
    demo = web.load_demo(args)
    assert [m.label for m in demo.models] == [full.name, dora.name, bare.name]
    states = [m.loaded.model.state_dict() for m in demo.models]
    ft_own = load_pretrained_model(str(full), None, device="cpu")[1].state_dict()
    assert all(torch.equal(states[0][k], ft_own[k]) for k in own)  # the full model keeps its projector
    assert all(torch.equal(states[1][k], own[k]) for k in own)  # so does the adapter that has one
    assert all(torch.equal(states[2][k], replacement[k]) for k in own)  # the one without gets the file

    photo = Image.new("RGB", (48, 24), (200, 30, 30))
    photo.paste((20, 20, 220), (0, 0, 12, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    photo.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    page = demo.build()
    component = next(block for block in page.blocks.values() if isinstance(block, gr.Image))
    handed = component.preprocess(FileData(path=str(tmp_path / "phone.jpg"), orig_name="phone.jpg"))
    image, _ = demo._check(handed, "what?")
    evaluated = gen.open_rgb(str(tmp_path / "phone.jpg"))
    assert image.size == evaluated.size == (48, 24)
    assert (np.asarray(image) == np.asarray(evaluated)).all()
