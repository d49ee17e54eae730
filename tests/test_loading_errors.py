"""Checkpoints that would load wrong are refused before any model is built, with a message naming the files.

Each case was silent or late before: an adapter without its projector was evaluated with a random one,
DoRA magnitudes under a LoRA config were dropped, a folder without config.json failed per benchmark,
a mistyped EVALPATH skipped every benchmark with exit code 0, a control character in an MMBench
answer broke the upload, and the merge script took only local base folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from llava.eval.eval_mmbench import mmbench_accuracy
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import check_model_location, is_hub_id, load_pretrained_model
from llava.tiny_base import build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def lora_run(tiny_base, tmp_path_factory):
    """A LoRA run's output (adapter, config.json, non_lora_trainables.bin) on the plain tiny language model."""
    root = tmp_path_factory.mktemp("lora_run")
    llava_dir = build_tiny_llava(tiny_base, root / "llava")
    torch.manual_seed(0)
    model = get_peft_model(LlavaLlamaForCausalLM.from_pretrained(llava_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    out = root / "run"
    model.save_pretrained(out)
    shutil.copy(llava_dir / "config.json", out / "config.json")
    projector = {f"base_model.model.model.mm_projector.{k}": torch.randn_like(v)
                 for k, v in model.get_base_model().get_model().mm_projector.state_dict().items()}
    torch.save(projector, out / "non_lora_trainables.bin")
    return out


def never_built(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the checkpoint was checked")

    monkeypatch.setattr(LlavaLlamaForCausalLM, "from_pretrained", classmethod(refuse))


def test_adapter_without_projector_is_refused_unless_one_is_named(lora_run, tiny_base, tmp_path, monkeypatch):
    folder = tmp_path / "no_projector"
    shutil.copytree(lora_run, folder)
    (folder / "non_lora_trainables.bin").unlink()
    with monkeypatch.context() as patch:
        never_built(patch)
        with pytest.raises(FileNotFoundError, match=r"no projector weights .* non_lora_trainables\.safetensors or "
                                                    r"non_lora_trainables\.bin.*--mm-projector"):
            load_pretrained_model(str(folder), str(tiny_base.language_model), device="cpu")
    _, model, _, _ = load_pretrained_model(str(folder), str(tiny_base.language_model), device="cpu",
                                           mm_projector=str(tiny_base.projector))
    want = torch.load(tiny_base.projector, weights_only=True)
    got = model.state_dict()
    assert all(torch.equal(got[key], value) for key, value in want.items())


def test_dora_magnitudes_under_a_lora_config_are_refused(lora_run, tiny_base, tmp_path, monkeypatch):
    folder = tmp_path / "mislabelled"
    shutil.copytree(lora_run, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    magnitude = key.replace("lora_A.weight", "lora_magnitude_vector")
    tensors[magnitude] = torch.ones(tensors[key.replace("lora_A", "lora_B")].shape[0])
    save_file(tensors, folder / "adapter_model.safetensors")
    never_built(monkeypatch)
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors holds DoRA magnitudes \({magnitude}, 1 in all\)"
                                         r".*use_dora is not true"):
        load_pretrained_model(str(folder), str(tiny_base.language_model), device="cpu")


def test_folder_without_config_json_is_refused(lora_run, tiny_base, tmp_path, monkeypatch):
    folder = tmp_path / "no_config"
    shutil.copytree(lora_run, folder)
    (folder / "config.json").unlink()
    never_built(monkeypatch)
    with pytest.raises(FileNotFoundError, match=rf"{folder}: no config\.json"):
        load_pretrained_model(str(folder), str(tiny_base.language_model), device="cpu")


def test_hub_ids_are_exactly_org_slash_name():
    assert is_hub_id("lmsys/vicuna-7b-v1.5")
    for path in ("checkpoints/demo/nope", "./org/name", "../name", "/abs/name", "~/name", ".org/name", "vicuna",
                 "org/", "/name", "org//name"):
        assert not is_hub_id(path), path
    check_model_location("not-cached-org/not-cached-model", "--model-base")  # left to transformers' own error


@pytest.mark.parametrize("missing", ["model_path", "model_base", "model_path_with_base"])
def test_a_mistyped_checkpoint_path_is_named_as_a_missing_folder(missing, lora_run, tiny_base, tmp_path, monkeypatch):
    """A relative path with two or more slashes cannot be a hub id: before, transformers took it for one
    ("Repo id must be in the form ...") or the folder checks blamed its missing files."""
    shutil.copytree(lora_run, tmp_path / "checkpoints" / "demo" / "dora")
    shutil.copytree(tiny_base.language_model, tmp_path / "checkpoints" / "base" / "vicuna")
    monkeypatch.chdir(tmp_path)
    never_built(monkeypatch)
    model_path, model_base, flag = {
        "model_path": ("checkpoints/demo/nope", None, "--model-path"),
        "model_base": ("checkpoints/demo/dora", "checkpoints/base/vicunaX", "--model-base"),
        "model_path_with_base": ("checkpoints/demo/dorra", "checkpoints/base/vicuna", "--model-path"),
    }[missing]
    typo = model_base if missing == "model_base" else model_path
    with pytest.raises(FileNotFoundError, match=rf"^{typo}: no such folder \({flag}\)\. Check the path"):
        load_pretrained_model(model_path, model_base, device="cpu")


def test_a_projector_only_folder_without_a_base_is_refused(lora_run, tiny_base, tmp_path, monkeypatch):
    """Without --model-base such a folder failed on its missing tokenizer ("Couldn't instantiate the backend
    tokenizer ... sentencepiece or tiktoken"), which never said what was missing."""
    folder = tmp_path / "projector_only"
    folder.mkdir()
    shutil.copy(lora_run / "config.json", folder / "config.json")
    shutil.copy(tiny_base.projector, folder / "mm_projector.bin")
    with monkeypatch.context() as patch:
        never_built(patch)
        with pytest.raises(ValueError, match=rf"{folder} holds only a projector .* no --model-base was given: pass the "
                                             "language model it was trained on"):
            load_pretrained_model(str(folder), None, device="cpu")
    _, model, _, _ = load_pretrained_model(str(folder), str(tiny_base.language_model), device="cpu")
    want = torch.load(tiny_base.projector, weights_only=True)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in want.items())


def eval_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "7B_eval_dora.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env})


def test_eval_script_stops_at_once_on_a_missing_evalpath_or_config(lora_run, tiny_base, tmp_path):
    results = tmp_path / "results"
    missing = eval_script("x", str(lora_run), str(tmp_path / "evl"), str(results), str(REPO),
                          MODEL_BASE=str(tiny_base.language_model))
    assert missing.returncode == 2 and f"EVALPATH {tmp_path / 'evl'} is not a folder" in missing.stderr
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    bare = eval_script("x", str(no_config), str(tmp_path), str(results), str(REPO))
    assert bare.returncode == 2 and "has no config.json" in bare.stderr
    assert not results.exists()


def test_control_characters_are_cleaned_from_the_upload_and_the_score(tmp_path):
    tsv = pd.DataFrame({"index": [0, 1], "question": ["q0", "q1"], "hint": ["", ""], "A": ["cat", "up"],
                        "B": ["dog", "down"], "answer": ["B", "A"], "category": ["c", "c"], "image": ["x", "x"],
                        "source": ["s", "s"], "l2-category": ["l", "l"], "comment": ["", ""], "split": ["dev", "dev"]})
    tsv_path = tmp_path / "mmbench.tsv"
    tsv.to_csv(tsv_path, sep="\t", index=False)
    answers = [{"question_id": 0, "round_id": 0, "text": "B\x01", "options": ["cat", "dog"], "option_char": ["A", "B"]},
               {"question_id": 1, "round_id": 0, "text": "\x1bA\x00", "options": ["up", "down"],
                "option_char": ["A", "B"]}]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    subprocess.run([sys.executable, "scripts/convert_mmbench_for_submission.py", "--annotation-file", str(tsv_path),
                    "--result-dir", str(tmp_path), "--upload-dir", str(tmp_path / "up"), "--experiment", "run"],
                   cwd=REPO, check=True, capture_output=True)
    upload = pd.read_excel(tmp_path / "up" / "run.xlsx")
    assert list(upload["prediction"]) == ["B", "A"]
    assert mmbench_accuracy(tsv, answers)["single_round_accuracy"] == 100.0


def hub_cache(root: Path, repo_id: str, folder: Path) -> None:
    """A Hugging Face hub cache holding ``folder`` as the snapshot of ``repo_id`` (what a download leaves)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)


@pytest.mark.slow
def test_merge_script_takes_a_hub_id_as_base(lora_run, tiny_base, tmp_path):
    cache = tmp_path / "hub"
    hub_cache(cache, "tiny-org/tiny-vicuna", tiny_base.language_model)
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    merged = subprocess.run([sys.executable, "scripts/merge_lora_weights.py", "--model-path", str(lora_run),
                             "--model-base", "tiny-org/tiny-vicuna", "--save-model-path", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    _, from_hub, _, _ = load_pretrained_model(str(out), None, device="cpu")
    _, local, _, _ = load_pretrained_model(str(lora_run), str(tiny_base.language_model), device="cpu")
    want = local.state_dict()
    assert all(torch.equal(tensor, want[key]) for key, tensor in from_hub.state_dict().items())


@pytest.mark.parametrize("change", ["renamed", "incomplete"])
def test_lora_tensors_that_miss_the_model_are_refused(change, lora_run, tiny_base, tmp_path):
    """PEFT only warns when an adapter file's names do not match the model; the layers left out keep
    B = 0, so the model would silently be the base. Both directions are refused, naming a tensor."""
    folder = tmp_path / change
    shutil.copytree(lora_run, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    if change == "renamed":  # as transformers' own Llava names the decoder
        tensors = {k.replace(".model.layers.", ".model.language_model.layers."): v for k, v in tensors.items()}
        pattern = r"match no LoRA layer of the model \(first: base_model\.model\.model\.language_model\.layers\."
    else:
        dropped = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
        del tensors[dropped]
        pattern = rf"not in the file \(first: {dropped}\)"
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=pattern):
        load_pretrained_model(str(folder), str(tiny_base.language_model), device="cpu")


def test_a_run_trained_over_a_quantized_base_loads_as_the_flags_say(lora_run, tiny_base, tmp_path):
    """A --bits run's config.json keeps the training's quantization_config. Without a load flag the base
    is loaded in float32, as from a run trained without quantization; --load-8bit gives 8-bit layers,
    not the 4-bit ones training used."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    folder = tmp_path / "trained_4bit"
    shutil.copytree(lora_run, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    ids = torch.tensor([[1, 5, 9, 12]])
    _, plain, _, _ = load_pretrained_model(str(lora_run), str(tiny_base.language_model), device="cpu")
    _, model, _, _ = load_pretrained_model(str(folder), str(tiny_base.language_model), device="cpu")
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    _, model, _, _ = load_pretrained_model(str(folder), str(tiny_base.language_model), device="cpu", load_8bit=True)
    q_proj = model.get_model().layers[0].self_attn.q_proj
    assert isinstance(q_proj.get_base_layer() if hasattr(q_proj, "get_base_layer") else q_proj, bnb.nn.Linear8bitLt)
    assert type(model.lm_head) is torch.nn.Linear  # the builder's own settings: lm_head stays unquantized
