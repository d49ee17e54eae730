"""Convert a LLaVA-1.5 checkpoint of this project to transformers' own ``LlavaForConditionalGeneration``.

    python scripts/convert_to_hf_llava.py MODEL_PATH OUT_DIR [--model-base BASE] [--dtype float32]

MODEL_PATH is anything ``llava.model.builder.load_pretrained_model`` reads: a full model, a projector-only
folder (with ``--model-base``) or a LoRA / DoRA adapter folder (with ``--model-base``; merged first). OUT_DIR
gets the model in the llava-hf layout plus a ``LlavaProcessor``, so that

    LlavaForConditionalGeneration.from_pretrained(OUT_DIR); AutoProcessor.from_pretrained(OUT_DIR)

load it without this project installed (``backend="pil"`` gives exactly our pixel values where torchvision is
installed; transformers picks its torchvision image processor by default then). What changes on the way:
- weights are renamed (``model.layers.*`` -> ``model.language_model.layers.*``, ``model.mm_projector.0/2`` ->
  ``model.multi_modal_projector.linear_1/2``, ``model.vision_tower.vision_tower.*`` -> ``model.vision_tower.*``);
- the vision tower is stored in the checkpoint (ours reloads it from ``mm_vision_tower``);
- the tokenizer gains ``<image>`` (its id is ``image_token_index``) and ``<pad>``, as llava-hf's 1.5
  conversion did; their embedding and lm_head rows are the mean of the existing rows, so a new token never
  gets the highest logit;
- ``<image>`` stands for one image *token per patch* (the processor expands it), where ours uses a single
  IMAGE_TOKEN_INDEX (-200) that the model replaces by all the patch features;
- the processor's chat template writes the image tag as "<image> \\n" so that it yields exactly the trained
  token ids (see VICUNA_V1_CHAT_TEMPLATE);
- nothing truncates to ``tokenizer_model_max_length`` after the image is expanded, and the
  ``image_aspect_ratio`` "pad" preprocessing becomes the image processor's ``do_pad``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from llava.mm_utils import get_model_name_from_path
from llava.model import LlavaConfig
from llava.model.builder import check_model_location, load_pretrained_model
from llava.output_folder import (
    check_output_folder,
    open_safetensors_modes,
    replace_folder,
)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The vicuna_v1 prompt: "SYSTEM USER: <image>\nQUESTION ASSISTANT: ANSWER</s>USER: ... ASSISTANT:".
# The image tag is written "<image> \n": the training code tokenized the text after the tag on its own, which
# starts it with sentencepiece's dummy-prefix "▁" before the "\n" byte; "<image>\n" through the converted
# tokenizer would lose that token. " \n" after the special token gives exactly the trained ids.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + '<image> \\n' * n_images + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' -}}{% generation %}{{- text + '</s>' -}}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Our state-dict prefixes -> transformers' LlavaForConditionalGeneration prefixes, first match wins.
KEY_PREFIXES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path", help="LLaVA model, projector or adapter folder")
    parser.add_argument("out_dir", type=Path, help="where to write the transformers Llava model and processor")
    parser.add_argument("--model-base", default=None, help="base language model (for projector or adapter folders)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=[*DTYPES, "auto"],
        help="dtype of the written weights (auto: the dtype saved with the language model); merging is done in float32",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (never one holding the input)")
    return parser.parse_args(argv)


def saved_dtype(model_path: str, model_base: str | None) -> torch.dtype:
    """The dtype recorded in the config of the folder that holds the language model weights."""
    config = json.loads((Path(model_base or model_path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"{model_base or model_path}/config.json records dtype {name!r}; pass --dtype explicitly.")
    return DTYPES[name]


def check_convertible(config) -> None:
    """Refuse what transformers' Llava cannot express, before any weight is loaded."""
    projector = getattr(config, "mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(
            f"mm_projector_type {projector!r} has no transformers Llava equivalent: its projector is "
            "Linear -> GELU -> Linear, i.e. LLaVA-1.5's 'mlp2x_gelu' only."
        )
    feature = getattr(config, "mm_vision_select_feature", "patch")
    if feature not in SELECT_STRATEGY:
        raise ValueError(f"mm_vision_select_feature {feature!r} is not supported (use 'patch' or 'cls_patch').")
    if getattr(config, "mm_use_im_start_end", False) or getattr(config, "mm_use_im_patch_token", False):
        raise ValueError("mm_use_im_start_end / mm_use_im_patch_token models are not LLaVA-1.5 and are not supported.")
    merge = getattr(config, "mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ValueError(f"mm_patch_merge_type {merge!r} is not supported (LLaVA-1.5 uses 'flat').")
    aspect = getattr(config, "image_aspect_ratio", None)
    if aspect not in (None, "square", "pad"):
        raise ValueError(f"image_aspect_ratio {aspect!r} is not supported (LLaVA-1.5 uses 'pad').")


def add_llava_hf_tokens(tokenizer) -> tuple[int, int]:
    """Add ``<image>`` and ``<pad>`` as llava-hf did; returns their ids."""
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)


def rename_key(key: str) -> str:
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return new + key.removeprefix(old)
    raise ValueError(f"No transformers Llava name for weight {key!r}.")


def extend_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean row (computed in float32): new tokens never outscore all old ones."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


def hf_state_dict(model, vocab_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, embeddings and lm_head grown to ``vocab_size`` rows."""
    state = {rename_key(k): v.to(dtype) for k, v in model.state_dict().items()}
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        state[key] = extend_rows(state[key], vocab_size)
    return state


def hf_config(model, vocab_size: int, image_token_id: int, pad_token_id: int):
    """transformers' LlavaConfig with the same decoder, vision tower and feature selection as ``model``."""
    from transformers import LlamaConfig
    from transformers import LlavaConfig as HFLlavaConfig

    known = {k for k in LlamaConfig().to_dict() if not k.startswith("_")}
    known -= {"model_type", "architectures", "transformers_version"}
    text = {k: v for k, v in model.config.to_dict().items() if k in known}
    text.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    tower = model.get_vision_tower()
    strategy = SELECT_STRATEGY[getattr(model.config, "mm_vision_select_feature", "patch")]
    vision = {k: v for k, v in tower.config.to_dict().items() if not k.startswith("_") and k != "architectures"}
    return HFLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=tower.num_patches + (1 if strategy == "full" else 0),
        projector_hidden_act="gelu",
        vision_feature_layer=model.config.mm_vision_select_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def hf_image_processor(image_processor, image_aspect_ratio: str | None):
    """The vision tower's CLIP processor; with 'pad', llava-hf's processor that pads to a mean-colour square first."""
    if image_aspect_ratio != "pad":
        return image_processor
    from transformers import LlavaImageProcessorPil

    settings = {
        key: getattr(image_processor, key)
        for key in ("size", "crop_size", "resample", "image_mean", "image_std", "rescale_factor", "do_convert_rgb")
    }
    return LlavaImageProcessorPil(do_pad=True, **settings)


def build_processor(tokenizer, image_processor, config, hf_cfg):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=hf_image_processor(image_processor, getattr(config, "image_aspect_ratio", None)),
        tokenizer=tokenizer,
        patch_size=hf_cfg.vision_config.patch_size,
        vision_feature_select_strategy=hf_cfg.vision_feature_select_strategy,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS; "default" drops it again
    )


def write_hf_model(state: dict[str, torch.Tensor], hf_cfg, generation_config, out_dir: Path) -> None:
    """Build the model on the meta device and assign our tensors, so no second copy of the weights is made."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(hf_cfg)
    expected = set(hf_model.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"Weight names do not match transformers' Llava: missing {sorted(expected - set(state))[:4]}, "
            f"unexpected {sorted(set(state) - expected)[:4]}."
        )
    hf_model.load_state_dict(state, strict=True, assign=True)
    hf_model.generation_config = generation_config
    hf_model.save_pretrained(out_dir)


def convert(model_path: str, out_dir: Path, model_base: str | None = None, dtype: str = "float32",
            overwrite: bool = False) -> list[Path]:
    """Write ``out_dir`` (through ``out_dir.tmp``, renamed at the end); returns the files written."""
    out_dir = Path(out_dir)
    check_model_location(model_path, "MODEL_PATH")
    if model_base is not None:
        check_model_location(model_base, "--model-base")
    check_output_folder(out_dir, overwrite, [model_path, model_base])
    out_dtype = saved_dtype(model_path, model_base) if dtype == "auto" else DTYPES[dtype]
    check_convertible(LlavaConfig.from_pretrained(model_path))
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, model_base, get_model_name_from_path(model_path), device="cpu", torch_dtype=torch.float32
    )

    rows = model.get_input_embeddings().weight.shape[0]
    image_token_id, pad_token_id = add_llava_hf_tokens(tokenizer)
    vocab_size = max(rows, len(tokenizer))
    cfg = hf_config(model, vocab_size, image_token_id, pad_token_id)
    state = hf_state_dict(model, vocab_size, out_dtype)
    generation_config = model.generation_config
    generation_config.pad_token_id = pad_token_id

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_model(state, cfg, generation_config, tmp)
    build_processor(tokenizer, image_processor, model.config, cfg).save_pretrained(tmp)
    open_safetensors_modes(tmp)
    replace_folder(tmp, out_dir)

    print(f"Wrote transformers LlavaForConditionalGeneration ({out_dtype}) to {out_dir}:")
    print(f"  vocab {rows} -> {vocab_size} rows: '{IMAGE_TOKEN}' = {image_token_id}, '{PAD_TOKEN}' = {pad_token_id}")
    print(f"  image_seq_length {cfg.image_seq_length}, vision_feature_layer {cfg.vision_feature_layer}, "
          f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    for path in files:
        print(f"  {path.relative_to(out_dir)}")
    return files


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        convert(args.model_path, args.out_dir, args.model_base, args.dtype, args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"convert_to_hf_llava: {error}") from error


if __name__ == "__main__":
    main()
