"""``load_pretrained_model``: full LLaVA models, projector-only checkpoints, and LoRA / DoRA adapters.

An adapter folder (``adapter_config.json``) is loaded onto ``model_base`` and merged for inference.
Both the upstream PEFT format and the seed's DoRA format are read; DoRA magnitudes are restored
from wherever the checkpoint keeps them (see ``peft_dora.load_dora_adapter``), or, with
``dora_magnitudes="weight_norm"``, set to ||W0|| as the seed's loader did for the paper's DoRA row.

Weights load straight onto the target device (``device_map``) and adapters merge there: an evaluation
process never holds a full CPU copy of the 7B model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llava.checkpoint_kind import adapter_kind, is_adapter
from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_non_lora_trainables(model_path: str) -> dict[str, torch.Tensor]:
    """The trainables saved beside an adapter (projector weights), keys relative to the LLaVA model."""
    folder = Path(model_path)
    if (folder / "non_lora_trainables.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(folder / "non_lora_trainables.safetensors"))
    elif (folder / "non_lora_trainables.bin").exists():
        state = torch.load(folder / "non_lora_trainables.bin", map_location="cpu", weights_only=True)
    else:
        return {}
    stripped = {}
    for key, value in state.items():
        if "weight_m_wdecomp" in key or "lora_magnitude_vector" in key:
            continue  # DoRA magnitudes: restored by the adapter loader
        key = key.removeprefix("base_model.").removeprefix("model.") if key.startswith("base_model.") else key
        stripped[key] = value
    return stripped


def is_hub_id(path: str) -> bool:
    """Whether ``path`` is written as a hub id, exactly "org/name"; anything else (a leading ".", "/" or
    "~", no slash, or two or more) can only be a local path."""
    org, slash, name = path.partition("/")
    return bool(slash and org and name) and "/" not in name and not path.startswith((".", "~"))


def _is_local(path: str) -> bool:
    """A path on disk, as opposed to a hub id ("org/name"): it exists or is written like a path."""
    return os.path.exists(path) or not is_hub_id(path)


def check_model_location(path: str, flag: str) -> None:
    """Refuse a ``--model-path`` / ``--model-base`` that is no folder and cannot be a hub id: transformers
    would take it for a hub id and fail with a message about repo ids that never says the folder is missing."""
    if os.path.isdir(path) or (not os.path.exists(path) and is_hub_id(path)):
        return
    what = "a file, not a folder" if os.path.exists(path) else "no such folder"
    relative = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    raise FileNotFoundError(
        f"{path}: {what} ({flag}). Check the path{relative}, or name a Hugging Face hub model as org/name "
        "(e.g. lmsys/vicuna-7b-v1.5)."
    )


def holds_language_model(folder: Path) -> bool:
    """Whether a folder has language-model weights of its own (a full model, sharded or not)."""
    return any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _tensor_names(path: Path) -> list[str]:
    """The tensor names of a .safetensors file (header only) or a .bin file (loaded, weights only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True))


def _holds_projector(model_base: str) -> bool:
    """Whether a base model's weights include a projector (a LLaVA model does, Vicuna does not)."""
    if not _is_local(model_base):
        return False
    config = Path(model_base, "config.json")
    return config.is_file() and "mm_projector_type" in json.loads(config.read_text())


def has_own_projector(model_path: str, model_base: str | None) -> bool:
    """Whether a checkpoint brings its projector: a full model (loaded without a base) does, an adapter
    if its non-LoRA trainables hold one, a projector-only folder if it has mm_projector.bin."""
    if model_base is None:
        return True
    folder = Path(model_path)
    if is_adapter(model_path):
        files = [folder / name for name in NON_LORA_FILES if (folder / name).is_file()]
        return any("mm_projector" in key for file in files for key in _tensor_names(file))
    return (folder / "mm_projector.bin").is_file()


def check_model_folders(model_path: str, model_base: str | None, mm_projector: str | None = None) -> None:
    """Refuse, before any model is built, checkpoints that would load wrong or not at all.

    A path that is neither a folder nor a hub id, a local folder without config.json, an adapter or
    projector-only folder without a base, an adapter whose weights hold DoRA magnitudes under a plain
    LoRA config (they would be dropped), and an adapter or projector-only folder without the projector
    its base lacks (it would be evaluated with a random projector) each get an error naming the files.
    """
    check_model_location(model_path, "--model-path")
    if model_base is not None:
        check_model_location(model_base, "--model-base")
    if _is_local(model_path) and not Path(model_path, "config.json").is_file():
        raise FileNotFoundError(
            f"{model_path}: no config.json. Expected a LLaVA checkpoint folder: a full model, an adapter "
            "(adapter_config.json, its weights, config.json and non_lora_trainables) or a projector-only folder "
            "(config.json, mm_projector.bin), as training writes them."
        )
    if mm_projector is not None and not os.path.isfile(mm_projector):
        raise FileNotFoundError(f"--mm-projector {mm_projector}: no such file.")
    if model_base is None:
        _refuse_missing_base(model_path)
        return
    folder = Path(model_path)
    if not is_adapter(model_path):
        if mm_projector is None and not has_own_projector(model_path, model_base):
            raise FileNotFoundError(
                f"{model_path}: no mm_projector.bin. With a base model ({model_base}) the folder must be a "
                "projector-only checkpoint (config.json, mm_projector.bin) or an adapter (adapter_config.json)."
            )
        return
    if adapter_kind(model_path) == "lora":
        _refuse_dora_tensors_under_lora(folder)
    if mm_projector is None and not _holds_projector(model_base) and not has_own_projector(model_path, model_base):
        non_lora = [name for name in NON_LORA_FILES if (folder / name).is_file()]
        where = non_lora[0] if non_lora else " or ".join(NON_LORA_FILES)
        raise FileNotFoundError(
            f"{model_path}: no projector weights (mm_projector.*) in {where}, and the base model {model_base} has "
            "none: the model would be evaluated with a random projector. Use a checkpoint that training wrote "
            "completely, or name the projector it was trained with: --mm-projector PATH "
            "(e.g. the stage-1 mm_projector.bin, for a run with a frozen projector)."
        )


def _refuse_missing_base(model_path: str) -> None:
    """An adapter or a projector-only folder holds no language model: without a base there is nothing to
    load it onto (a projector-only folder would otherwise fail on its missing tokenizer)."""
    if is_adapter(model_path):
        raise ValueError(
            f"{model_path} holds an adapter (adapter_config.json) but no --model-base was given: "
            "pass the base language model, e.g. lmsys/vicuna-7b-v1.5."
        )
    folder = Path(model_path)
    if (folder / "mm_projector.bin").is_file() and not holds_language_model(folder):
        raise ValueError(
            f"{model_path} holds only a projector (config.json, mm_projector.bin, no language model weights) but "
            "no --model-base was given: pass the language model it was trained on, e.g. lmsys/vicuna-7b-v1.5."
        )


def _refuse_dora_tensors_under_lora(folder: Path) -> None:
    files = [folder / name for name in (*ADAPTER_FILES, *NON_LORA_FILES) if (folder / name).is_file()]
    for file in files:
        magnitudes = [key for key in _tensor_names(file) if "lora_magnitude_vector" in key or "weight_m_wdecomp" in key]
        if magnitudes:
            raise ValueError(
                f"{file} holds DoRA magnitudes ({magnitudes[0]}, {len(magnitudes)} in all), but "
                f"{folder / 'adapter_config.json'} describes plain LoRA (use_dora is not true): loading it as LoRA "
                "would drop them. Set \"use_dora\": true in adapter_config.json if this is a DoRA run."
            )


def load_pretrained_model(
    model_path: str,
    model_base: str | None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = None,
    device: str | None = None,
    use_flash_attn: bool = False,
    missing_magnitudes: str = "error",
    torch_dtype: torch.dtype | None = None,
    dora_magnitudes: str = "trained",
    mm_projector: str | None = None,
    **kwargs,
):
    """Returns (tokenizer, model, image_processor, context_len), as the original LLaVA builder.

    ``dora_magnitudes="weight_norm"`` evaluates a DoRA checkpoint as the seed's loader did (m = ||W0||
    for every layer, the trained magnitudes ignored): the paper's published DoRA row. ``"trained"``
    (default) restores the trained magnitudes; ``missing_magnitudes="weight_norm"`` then fills in only
    those a checkpoint lacks, which the default refuses. Without ``device_map`` every weight is loaded
    straight onto ``device``. ``mm_projector`` (a file like stage 1's mm_projector.bin) replaces the
    checkpoint's projector; the folders are checked before anything is built (``check_model_folders``).
    """
    device = device or default_device()
    model_path = os.path.expanduser(model_path)
    model_base = None if model_base is None else os.path.expanduser(model_base)
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if dora_magnitudes not in ("trained", "weight_norm"):
        raise ValueError(f"dora_magnitudes must be 'trained' or 'weight_norm', got {dora_magnitudes!r}.")
    check_model_folders(model_path, model_base, mm_projector)
    if dora_magnitudes != "trained" and adapter_kind(model_path) != "dora":
        logger.warning("%s is not a DoRA adapter: dora_magnitudes=%s has no effect", model_path, dora_magnitudes)
    kwargs = {"torch_dtype": torch_dtype, **kwargs}
    kwargs["device_map"] = device_map if device_map is not None else {"": device}
    if load_8bit or load_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_8bit,
            load_in_4bit=load_4bit,
            bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=["model.mm_projector", "lm_head"],  # the projector loads from its own file, unquantized
        )
    if use_flash_attn:
        kwargs["attn_implementation"] = "flash_attention_2"

    if is_adapter(model_path):
        model, tokenizer = _load_adapter_model(model_path, model_base, missing_magnitudes, dora_magnitudes, kwargs)
    elif model_base is not None:
        logger.info("Loading the language model from %s and the projector from %s", model_base, model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_base)
        config = checkpoint_config(model_path)
        model = LlavaLlamaForCausalLM.from_pretrained(model_base, config=config, **kwargs)
        if mm_projector is None:
            _load_projector(model, os.path.join(model_path, "mm_projector.bin"), torch_dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, **kwargs)

    if mm_projector is not None:
        _load_projector(model, mm_projector, torch_dtype)

    if getattr(model.config, "mm_use_im_patch_token", False):
        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    vision_tower = model.get_vision_tower()
    if vision_tower is None:
        raise ValueError(f"{model_path}: the config names no vision tower (mm_vision_tower); is this a LLaVA model?")
    vision_tower.load_model(device_map=kwargs["device_map"])
    if "quantization_config" in kwargs:
        vision_tower.to(device=device, dtype=torch_dtype)  # a quantized model cannot be cast as a whole
    elif device_map is None:
        model.to(device=device, dtype=torch_dtype)
    model.eval()
    context_len = getattr(model.config, "max_sequence_length", 2048)
    return tokenizer, model, vision_tower.image_processor, context_len


def checkpoint_config(model_path: str) -> LlavaConfig:
    """The checkpoint's config.json for building the model over a base, without the quantization a
    ``--bits`` run was trained over: the load flags (``load_4bit`` / ``load_8bit``) alone decide how
    the base is quantized, and without them it is loaded in floating point."""
    config = LlavaConfig.from_pretrained(model_path)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
        logger.info("%s was trained over a quantized base; the base is loaded as the load flags say", model_path)
    return config


def _check_lora_keys(peft_model, folder: Path) -> None:
    """Every tensor of a plain LoRA adapter file must land on the model, and every LoRA layer get its
    tensors: PEFT only warns about missing keys, and a layer that got none keeps B = 0, so the model
    would silently be the base model."""
    from peft.utils import get_peft_model_state_dict

    file = next((folder / name for name in ADAPTER_FILES if (folder / name).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{folder}: no adapter weights ({' or '.join(ADAPTER_FILES)}) next to adapter_config.json")
    saved = set(_tensor_names(file))
    expected = set(get_peft_model_state_dict(peft_model))
    unknown, missing = sorted(saved - expected), sorted(expected - saved)
    if unknown or missing:
        details = []
        if unknown:
            details.append(f"{len(unknown)} tensor(s) of the file match no LoRA layer of the model (first: {unknown[0]})")
        if missing:
            details.append(f"{len(missing)} tensor(s) the model's LoRA layers need are not in the file (first: {missing[0]})")
        raise ValueError(
            f"{file}: {'; '.join(details)}. The adapter was trained on a model with other module names (for "
            "example transformers' own Llava, model.language_model.*) or the file is incomplete; loading it "
            "would leave those layers at the base model's weights."
        )


def _load_projector(model, path: str, dtype: torch.dtype) -> None:
    """Load a projector file (keys ``model.mm_projector.*``, as stage 1 writes mm_projector.bin)."""
    projector = torch.load(path, map_location="cpu", weights_only=True)
    own = {k for k in model.state_dict() if "mm_projector" in k}
    if set(projector) != own:
        raise ValueError(
            f"{path}: its keys {sorted(projector)[:4]} are not the model's projector {sorted(own)[:4]}: "
            "a projector of another shape or type (mm_projector_type) than this checkpoint's."
        )
    model.load_state_dict({k: v.to(dtype) for k, v in projector.items()}, strict=False)
    logger.info("Loaded the projector from %s", path)


def _load_adapter_model(model_path: str, model_base: str, missing_magnitudes: str, dora_magnitudes: str, kwargs: dict):
    from peft_dora import load_dora_adapter

    logger.info("Loading the base model %s and the adapter %s", model_base, model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_base)
    config = checkpoint_config(model_path)
    model = LlavaLlamaForCausalLM.from_pretrained(model_base, config=config, **kwargs)
    vocab = model.lm_head.out_features
    if vocab != config.vocab_size:
        # The original resized embeddings to the adapter's vocabulary before loading.
        model.resize_token_embeddings(config.vocab_size)

    non_lora = load_non_lora_trainables(model_path)
    if non_lora:
        unknown = sorted(set(non_lora) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"{model_path}: non-LoRA trainables not in the model: {unknown[:4]} ({len(unknown)} keys)")
        dtype = kwargs["torch_dtype"]
        model.load_state_dict({k: v.to(dtype) for k, v in non_lora.items()}, strict=False)
        logger.info("Loaded %d non-LoRA trainable tensors (projector) from %s", len(non_lora), model_path)

    adapter_config = json.loads(Path(model_path, "adapter_config.json").read_text())
    if adapter_config.get("peft_type") == "LORA" and not adapter_config.get("use_dora", False):
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, model_path)
        _check_lora_keys(peft_model, Path(model_path))
    else:
        peft_model, _ = load_dora_adapter(
            model, model_path, missing_magnitudes=missing_magnitudes, magnitudes=dora_magnitudes
        )
    if "quantization_config" in kwargs:
        # Merging into 4/8-bit weights would round the merged weight again; the unmerged layers compute the
        # adapter exactly on top of the quantized base.
        logger.info("Quantized base: the adapter stays unmerged")
        return peft_model.get_base_model(), tokenizer
    model = peft_model.merge_and_unload()
    logger.info("Merged the adapter into the base weights")
    return model, tokenizer
