"""The LLaVA model: image splicing, loading every checkpoint kind, merging, and the transformers Llava export.

Expectations are built independently of the code under test: spliced inputs by hand from the text
embeddings and the image features, text-only logits from a plain ``LlamaForCausalLM`` of the same weights,
adapter logits from the unmerged PEFT model, and exported logits from transformers' own Llava model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model

REPO = Path(__file__).resolve().parents[1]
DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What color is the cat?", "Is there a red car on the left of the street near the tree?"]


def model_args(base) -> SimpleNamespace:
    """The model arguments train.py passes to initialize_vision_modules for LLaVA-1.5 stage 2."""
    return SimpleNamespace(
        vision_tower=str(base.vision_tower),
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu",
        pretrain_mm_mlp_adapter=str(base.projector),
        mm_patch_merge_type="flat",
    )


def attach_vision(model: LlavaLlamaForCausalLM, base) -> None:
    model.get_model().initialize_vision_modules(model_args(base))
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = 2048


@pytest.fixture(scope="module")
def tiny(tiny_base, tmp_path_factory):
    """A tiny LLaVA-1.5 (tiny base + pretrained projector), saved as a full model, and its tokenizer."""
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_base.language_model)
    attach_vision(model, tiny_base)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.language_model)
    full_dir = tmp_path_factory.mktemp("llava_full")
    model.save_pretrained(full_dir)
    tokenizer.save_pretrained(full_dir)
    return SimpleNamespace(model=model, tokenizer=tokenizer, base=tiny_base, full_dir=full_dir)


def vicuna_prompt(question: str, image: bool = True) -> str:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], f"<image>\n{question}" if image else question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def random_images(n: int, size: tuple[int, int] = (40, 24), seed: int = 0) -> list[Image.Image]:
    """Non-square images, so the 'pad' preprocessing matters."""
    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=gen) * 255).byte().numpy()) for _ in range(n)]


def pad_batch(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    longest = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (longest - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs])
    return ids, mask


def multimodal_batch(tiny) -> SimpleNamespace:
    """Two vicuna_v1 prompts of different lengths, each with one image."""
    seqs = [tokenizer_image_token(vicuna_prompt(q), tiny.tokenizer) for q in QUESTIONS]
    ids, mask = pad_batch(seqs, pad=0)
    images = process_images(random_images(2), tiny.model.get_vision_tower().image_processor, tiny.model.config)
    return SimpleNamespace(seqs=seqs, input_ids=ids, attention_mask=mask, images=images)


@torch.no_grad()
def llava_logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, images=batch.images).logits


def spliced_mask(model, batch) -> torch.Tensor:
    """Which positions of the spliced (right-padded) sequences are real."""
    n_patches = model.get_vision_tower().num_patches
    lengths = [len(s) - 1 + n_patches for s in batch.seqs]
    return torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]


# --- image splicing ---------------------------------------------------------------------------------------

SPLICE_IDS = [[1, 10, 11, 12, IMAGE_TOKEN_INDEX, 13, 14], [1, IMAGE_TOKEN_INDEX, 20, 21, 22, 23, 24, 25, 26]]


def splice_inputs():
    ids, mask = pad_batch(SPLICE_IDS, pad=0)
    labels = torch.where((ids == IMAGE_TOKEN_INDEX) | (mask == 0), IGNORE_INDEX, ids)
    labels[:, 0] = IGNORE_INDEX
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, mask, labels, images


@torch.no_grad()
def expected_splice(model, ids, mask, labels, images, side: str):
    """Text embeddings, the image's projected features in place of its token, then zero padding on ``side``."""
    features = model.encode_images(images)
    embed = model.get_model().embed_tokens
    embeds, labs = [], []
    for i in range(ids.shape[0]):
        real = ids[i][mask[i].bool()]
        lab = labels[i][mask[i].bool()]
        at = int((real == IMAGE_TOKEN_INDEX).nonzero())
        embeds.append(torch.cat([embed(real[:at]), features[i], embed(real[at + 1 :])]))
        labs.append(torch.cat([lab[:at], torch.full((features.shape[1],), IGNORE_INDEX), lab[at + 1 :]]))
    longest = max(e.shape[0] for e in embeds)
    out_embeds = torch.zeros(len(embeds), longest, embeds[0].shape[1])
    out_labels = torch.full((len(embeds), longest), IGNORE_INDEX)
    out_mask = torch.zeros(len(embeds), longest, dtype=mask.dtype)
    for i, (e, lab) in enumerate(zip(embeds, labs)):
        span = slice(longest - len(e), longest) if side == "left" else slice(0, len(e))
        out_embeds[i, span], out_labels[i, span], out_mask[i, span] = e, lab, 1
    return out_embeds, out_labels, out_mask


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_image_features_are_spliced_in_place_of_the_image_token(tiny, side):
    ids, mask, labels, images = splice_inputs()
    want_embeds, want_labels, want_mask = expected_splice(tiny.model, ids, mask, labels, images, side)
    out = tiny.model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, images, padding_side=None if side == "right" else side
    )
    input_ids, position_ids, attention_mask, _, inputs_embeds, new_labels = out
    assert input_ids is None and position_ids is None
    assert torch.equal(inputs_embeds, want_embeds)
    assert torch.equal(new_labels, want_labels)
    assert torch.equal(attention_mask, want_mask)


@pytest.mark.parametrize("max_length", [10, 23])
@torch.no_grad()
def test_sequences_are_truncated_after_splicing(tiny, max_length, monkeypatch):
    ids, mask, labels, images = splice_inputs()
    full = tiny.model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images)
    assert full[4].shape[1] > max_length  # the spliced sequences are longer than the limit
    monkeypatch.setattr(tiny.model.config, "tokenizer_model_max_length", max_length)
    cut = tiny.model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images)
    assert cut[4].shape[1] == cut[5].shape[1] == max_length
    assert torch.equal(cut[4], full[4][:, :max_length])
    assert torch.equal(cut[5], full[5][:, :max_length])
    assert torch.equal(cut[2], full[2][:, :max_length])


def token_splice_inputs():
    """Right- and left-padded rows, two images in one row, supervised tokens on both sides of each image."""
    rows = [[1, 10, 11, IMAGE_TOKEN_INDEX, 12, 13, 14, 15], [1, 20, IMAGE_TOKEN_INDEX, 21, IMAGE_TOKEN_INDEX, 22, 23]]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0, :8], mask[0, :8] = torch.tensor(rows[0]), 1  # right padding
    ids[1, 2:], mask[1, 2:] = torch.tensor(rows[1]), 1  # left padding
    labels = torch.where((ids == IMAGE_TOKEN_INDEX) | (mask == 0), IGNORE_INDEX, ids)
    labels[0, 0] = labels[1, 2] = IGNORE_INDEX  # BOS
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return ids, mask, labels, images


@pytest.mark.parametrize("max_length", [5, 20, 21, 40, 2048])  # in an image, one answer apart, no cut
@torch.no_grad()
def test_labels_within_length_are_the_labels_the_splice_keeps(tiny, max_length, monkeypatch):
    from llava.model.llava_arch import labels_within_length

    ids, mask, labels, images = token_splice_inputs()
    monkeypatch.setattr(tiny.model.config, "tokenizer_model_max_length", max_length)
    spliced = tiny.model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images)[5]
    kept = labels_within_length(ids, labels, mask, tiny.model.get_vision_tower().tokens_per_image, max_length)
    for row in range(ids.shape[0]):
        assert kept[row][kept[row] != IGNORE_INDEX].tolist() == spliced[row][spliced[row] != IGNORE_INDEX].tolist()


def test_token_weighting_counts_only_the_supervised_tokens_the_model_scores(tiny, tmp_path, monkeypatch):
    """transformers counts the collated labels; the model then cuts the spliced sequences shorter."""
    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.train import TrainingArguments

    ids, mask, labels, images = token_splice_inputs()
    max_length = 20  # each image takes 16 positions (32 px, patches of 8): both rows run past 20
    monkeypatch.setattr(tiny.model.config, "tokenizer_model_max_length", max_length)
    with torch.no_grad():
        spliced = tiny.model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images)[5]
    scored = int((spliced[:, 1:] != IGNORE_INDEX).sum())  # the loss shifts: position 0 predicts nothing
    collated = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert scored < collated  # the cut drops supervised tokens, so a count of the collated labels is wrong

    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images}
    counts = {}
    for weighting in ("token", "micro_batch"):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, loss_weighting=weighting, report_to=[])
        trainer = LLaVATrainer(model=tiny.model, args=args)
        counts[weighting] = trainer._get_num_items_in_batch([batch, batch], torch.device("cpu"))
    assert int(counts["token"]) == 2 * scored
    assert counts["micro_batch"] is None  # the seed's weighting passes no count to the model


@pytest.fixture(scope="module")
def plain_llama(tiny):
    return LlamaForCausalLM.from_pretrained(tiny.base.language_model).eval()


@torch.no_grad()
def test_text_only_sample_in_a_multimodal_batch_matches_the_plain_decoder(tiny, plain_llama):
    with_image = tokenizer_image_token(vicuna_prompt(QUESTIONS[0]), tiny.tokenizer)
    text_only = tokenizer_image_token(vicuna_prompt(QUESTIONS[1], image=False), tiny.tokenizer)
    assert IMAGE_TOKEN_INDEX not in text_only
    ids, mask = pad_batch([with_image, text_only], pad=0)
    real = process_images(random_images(1), tiny.model.get_vision_tower().image_processor, tiny.model.config)
    images = torch.cat([real, torch.zeros_like(real)])  # the data collator's zero image for a text sample
    logits = tiny.model(input_ids=ids, attention_mask=mask, images=images).logits
    want = plain_llama(input_ids=torch.tensor([text_only])).logits[0]
    torch.testing.assert_close(logits[1, : len(text_only)], want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_text_only_batch_without_images_matches_the_plain_decoder(tiny, plain_llama):
    seqs = [tokenizer_image_token(vicuna_prompt(q, image=False), tiny.tokenizer) for q in QUESTIONS]
    ids, mask = pad_batch(seqs, pad=0)
    logits = tiny.model(input_ids=ids, attention_mask=mask, images=None).logits
    for i, seq in enumerate(seqs):
        want = plain_llama(input_ids=torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits[i, : len(seq)], want, rtol=0, atol=1e-5)


# --- export to transformers' Llava --------------------------------------------------------------------------


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args], cwd=REPO, check=True, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "llava-hf"
    result = run_script("convert_to_hf_llava.py", str(tiny.full_dir), str(out))
    assert str(out) in result.stdout and "model.safetensors" in result.stdout
    assert not out.with_name(out.name + ".tmp").exists()
    return out


def expand_image_token(seq: list[int], image_token_id: int, n: int) -> list[int]:
    """transformers' Llava layout: one image token per patch feature."""
    out: list[int] = []
    for token in seq:
        out += [image_token_id] * n if token == IMAGE_TOKEN_INDEX else [token]
    return out


@torch.no_grad()
def hf_logits(hf, batch) -> torch.Tensor:
    """transformers' Llava on the same prompts and pixels, the image token expanded to one per patch."""
    cfg = hf.config
    seqs = [expand_image_token(s, cfg.image_token_index, cfg.image_seq_length) for s in batch.seqs]
    ids, mask = pad_batch(seqs, pad=cfg.text_config.pad_token_id)
    return hf(input_ids=ids, attention_mask=mask, pixel_values=batch.images).logits


@torch.no_grad()
def test_exported_transformers_llava_gives_the_same_logits(tiny, hf_dir):
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    cfg = hf.config
    assert cfg.image_seq_length == tiny.model.get_vision_tower().num_patches
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"

    batch = multimodal_batch(tiny)
    ours = llava_logits(tiny.model, batch)
    theirs = hf_logits(hf, batch)
    vocab = ours.shape[-1]
    real = spliced_mask(tiny.model, batch)
    assert theirs.shape[:2] == ours.shape[:2] and theirs.shape[-1] == vocab + 2  # + <image>, <pad>
    torch.testing.assert_close(theirs[..., :vocab][real], ours[real], rtol=0, atol=1e-4)
    # The new tokens' rows are the mean row: never the most likely token.
    assert (theirs[..., vocab:].max(-1).values < theirs[..., :vocab].max(-1).values)[real].all()
    # The images matter: other images give other logits.
    other = llava_logits(tiny.model, SimpleNamespace(**vars(batch) | {"images": batch.images.flip(0)}))
    assert (other[real] - ours[real]).abs().max() > 1e-3


@torch.no_grad()
def test_exported_processor_and_chat_template_reproduce_our_inputs(tiny, hf_dir):
    processor = AutoProcessor.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == vicuna_prompt(QUESTIONS[0]).replace("<image>\n", "<image> \n")
    image = random_images(1)
    out = processor(text=prompt, images=image, return_tensors="pt")

    ours = tokenizer_image_token(vicuna_prompt(QUESTIONS[0]), tiny.tokenizer)
    n_patches = tiny.model.get_vision_tower().num_patches
    assert out["input_ids"][0].tolist() == expand_image_token(ours, processor.image_token_id, n_patches)
    want_pixels = process_images(image, tiny.model.get_vision_tower().image_processor, tiny.model.config)
    torch.testing.assert_close(out["pixel_values"], want_pixels, rtol=0, atol=1e-6)


def test_converter_refuses_projectors_transformers_llava_cannot_express():
    spec = importlib.util.spec_from_file_location("convert_to_hf_llava", REPO / "scripts/convert_to_hf_llava.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        module.check_convertible(SimpleNamespace(mm_projector_type="linear"))


# --- load_pretrained_model and merge_lora_weights ------------------------------------------------------------


def projector_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_model().mm_projector.state_dict().items()}


def assert_same_projector(model, want: dict[str, torch.Tensor]) -> None:
    got = projector_state(model)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@torch.no_grad()
def test_load_full_model(tiny):
    tokenizer, model, image_processor, context_len = load_pretrained_model(str(tiny.full_dir), None, device="cpu")
    batch = multimodal_batch(tiny)
    torch.testing.assert_close(llava_logits(model, batch), llava_logits(tiny.model, batch), rtol=0, atol=1e-6)
    assert_same_projector(model, projector_state(tiny.model))
    assert tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids
    assert image_processor.crop_size == tiny.model.get_vision_tower().image_processor.crop_size
    assert context_len == 2048


@torch.no_grad()
def test_load_projector_only_checkpoint_onto_the_base(tiny, tmp_path):
    tiny.model.config.save_pretrained(tmp_path)
    projector = torch.load(tiny.base.projector, weights_only=True)
    torch.save(projector, tmp_path / "mm_projector.bin")
    _, model, _, _ = load_pretrained_model(str(tmp_path), str(tiny.base.language_model), device="cpu")
    assert_same_projector(model, {k.removeprefix("model.mm_projector."): v for k, v in projector.items()})
    batch = multimodal_batch(tiny)
    torch.testing.assert_close(llava_logits(model, batch), llava_logits(tiny.model, batch), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def dora_checkpoint(tiny, tmp_path_factory):
    """A DoRA run's output as train.py writes it: adapter, config.json, non_lora_trainables.bin (projector)."""
    from peft_dora import DoraConfig

    from peft import get_peft_model

    torch.manual_seed(0)
    base = LlavaLlamaForCausalLM.from_pretrained(tiny.base.language_model)
    peft_model = get_peft_model(
        base, DoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=DECODER_LINEARS, task_type="CAUSAL_LM")
    )
    attach_vision(peft_model.get_base_model(), tiny.base)  # after get_peft_model, as train.py does
    with torch.no_grad():  # stand-in for training: move B, the magnitudes and the projector
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name or "mm_projector" in name:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.eval()

    out = tmp_path_factory.mktemp("dora_run")
    peft_model.save_pretrained(out)
    peft_model.get_base_model().config.save_pretrained(out)
    projector = projector_state(peft_model.get_base_model())
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.items()},
               out / "non_lora_trainables.bin")
    return SimpleNamespace(path=out, model=peft_model, projector=projector)


@torch.no_grad()
def test_load_dora_adapter_merges_to_the_unmerged_outputs(tiny, dora_checkpoint):
    _, model, _, _ = load_pretrained_model(str(dora_checkpoint.path), str(tiny.base.language_model), device="cpu")
    assert not hasattr(model, "peft_config")
    assert_same_projector(model, dora_checkpoint.projector)
    batch = multimodal_batch(tiny)
    want = llava_logits(dora_checkpoint.model, batch)
    assert (want - llava_logits(tiny.model, batch)).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(llava_logits(model, batch), want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_merge_lora_weights_writes_a_full_model(tiny, dora_checkpoint, tmp_path):
    out = tmp_path / "merged"
    run_script("merge_lora_weights.py", "--model-path", str(dora_checkpoint.path),
               "--model-base", str(tiny.base.language_model), "--save-model-path", str(out))
    assert not (out / "adapter_config.json").exists()
    _, model, _, _ = load_pretrained_model(str(out), None, device="cpu")
    assert_same_projector(model, dora_checkpoint.projector)
    batch = multimodal_batch(tiny)
    want = llava_logits(dora_checkpoint.model, batch)
    torch.testing.assert_close(llava_logits(model, batch), want, rtol=0, atol=1e-5)


def script_module(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), REPO / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_args(script: str, checkpoint: Path | str, base: Path | str, out: Path) -> list[str]:
    if script == "merge_lora_weights.py":
        return ["--model-path", str(checkpoint), "--model-base", str(base), "--save-model-path", str(out)]
    return [str(checkpoint), str(out), "--model-base", str(base)]


@pytest.mark.parametrize("script", ["merge_lora_weights.py", "convert_to_hf_llava.py"])
def test_scripts_never_delete_a_folder_they_were_not_told_to_replace(script, tiny, dora_checkpoint, tmp_path):
    """Both replace their output folder whole: a folder holding files needs --overwrite, and one holding the
    checkpoint being read is refused even then. Nothing is deleted, and the refusal comes before loading."""
    main = script_module(script).main
    base = tiny.base.language_model
    checkpoint = tmp_path / "runs" / "dora"
    shutil.copytree(dora_checkpoint.path, checkpoint)
    (tmp_path / "runs" / "notes.txt").write_text("keep")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(SystemExit, match="pass --overwrite"):
        main(script_args(script, checkpoint, base, tmp_path / "other"))
    for target, flags in ((tmp_path / "runs", []), (tmp_path / "runs", ["--overwrite"]), (checkpoint, ["--overwrite"])):
        with pytest.raises(SystemExit, match="would delete it"):
            main(script_args(script, checkpoint, base, target) + flags)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

    old = tmp_path / "old"
    old.mkdir()
    (old / "stale.txt").write_text("an earlier export")
    done = subprocess.run([sys.executable, f"scripts/{script}", *script_args(script, checkpoint, base, old), "--overwrite"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (old / "stale.txt").exists() and (old / "config.json").is_file()
    # Weights as readable as the config beside them (safetensors alone would write them 0o600).
    modes = {path.name: path.stat().st_mode & 0o777 for path in old.iterdir() if path.is_file()}
    assert {mode for name, mode in modes.items() if name.endswith(".safetensors")} == {modes["config.json"]}, modes


def test_an_empty_output_folder_is_taken_and_a_file_is_not(tmp_path):
    from llava.output_folder import check_output_folder

    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", overwrite=False, inputs=[str(tmp_path / "elsewhere")])
    check_output_folder(tmp_path / "new", overwrite=False, inputs=[])
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_output_folder(tmp_path / "file", overwrite=True, inputs=[])


@torch.no_grad()
def test_exported_dora_run_gives_the_unmerged_logits(tiny, dora_checkpoint, tmp_path):
    out = tmp_path / "llava-hf"
    run_script("convert_to_hf_llava.py", str(dora_checkpoint.path), str(out),
               "--model-base", str(tiny.base.language_model))
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    batch = multimodal_batch(tiny)
    want = llava_logits(dora_checkpoint.model, batch)
    real = spliced_mask(tiny.model, batch)
    torch.testing.assert_close(hf_logits(hf, batch)[..., : want.shape[-1]][real], want[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("script, wrong, flag", [
    ("merge_lora_weights.py", "checkpoint", "--model-path"), ("merge_lora_weights.py", "base", "--model-base"),
    ("convert_to_hf_llava.py", "checkpoint", "MODEL_PATH"), ("convert_to_hf_llava.py", "base", "--model-base"),
])
def test_scripts_name_a_mistyped_folder(script, wrong, flag, tiny, dora_checkpoint, tmp_path):
    """Not transformers' message about repo ids: the path, that it is no folder, and which argument."""
    missing = "runs/demo/dorra" if wrong == "checkpoint" else "bases/demo/vicuna-tinyX"
    checkpoint = missing if wrong == "checkpoint" else dora_checkpoint.path
    base = missing if wrong == "base" else tiny.base.language_model
    with pytest.raises(SystemExit, match=rf"{missing}: no such folder \({flag}\)"):
        script_module(script).main(script_args(script, checkpoint, base, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_safetensors_files_get_the_umask_mode_and_chosen_modes_stay(tmp_path):
    from safetensors.torch import save_file

    from llava.output_folder import open_safetensors_modes

    umask = os.umask(0o027)
    try:
        save_file({"w": torch.zeros(2)}, str(tmp_path / "written.safetensors"))
        assert (tmp_path / "written.safetensors").stat().st_mode & 0o777 == 0o600  # safetensors' own mode
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "kept.safetensors").write_bytes(b"")
        (tmp_path / "kept.safetensors").chmod(0o400)
        open_safetensors_modes(tmp_path)
    finally:
        os.umask(umask)
    assert (tmp_path / "written.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "kept.safetensors").stat().st_mode & 0o777 == 0o400
