"""LLaVA-1.5 training: full finetuning, LoRA or DoRA, with the seed's command-line arguments.

Read top to bottom: arguments, model, adapter, tokenizer, vision modules, data, trainer, save.
``Dora_7b.sh`` runs this module (through ``train_mem.py``) under DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers.trainer_utils import IntervalStrategy
from peft_dora.config import DORA_DROPOUT_MODES

from llava import conversation as conversation_lib
from llava.model import LlavaLlamaForCausalLM
from llava.train.checkpoints import latest_complete_checkpoint, layout_of, require_complete
from llava.train.count_params import count_parameters
from llava.train.data import DataArguments, make_supervised_data_module, preprocess  # noqa: F401  (seed's public name)
from llava.train.llava_trainer import LOSS_WEIGHTINGS, LLaVATrainer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="facebook/opt-125m")
    version: str = field(default="v0", metadata={"help": "conversation template: v1 (vicuna_v1) or plain (stage 1)"})
    freeze_backbone: bool = field(default=False)
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train the projector only"})
    vision_tower: str | None = field(default=None)
    mm_vision_select_layer: int = field(default=-1)
    pretrain_mm_mlp_adapter: str | None = field(default=None)
    mm_projector_type: str = field(default="linear")
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=True)
    mm_patch_merge_type: str = field(default="flat")
    mm_vision_select_feature: str = field(default="patch")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False)
    model_max_length: int = field(default=512, metadata={"help": "Sequences are right-padded and truncated to this."})
    double_quant: bool = field(default=True)
    quant_type: str = field(default="nf4")
    bits: int = field(default=16, metadata={"help": "4 or 8 for QLoRA-style quantized training (needs bitsandbytes)"})
    lora_enable: bool = field(default=False, metadata={"help": "train an adapter (DoRA by default, see --use_dora)"})
    use_dora: bool = field(default=True, metadata={"help": "with --lora_enable: DoRA (True) or plain LoRA (False)"})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_weight_path: str = field(default="")
    lora_bias: str = field(default="none")
    target_modules: str | None = field(
        default=None,
        metadata={"help": "comma-separated module names for A/B; default: every Linear of the decoder but lm_head"},
    )
    wdecompose_target_modules: str | None = field(
        default=None, metadata={"help": "comma-separated module names that train a DoRA magnitude only"}
    )
    dora_dropout: str = field(
        default="seed",
        metadata={
            "help": "seed (the seed's and the paper's formula): lora_dropout's dropped input also goes through W0; "
            "branch (opt-in, a deviation): dropout on the low-rank branch only, with no second base product"
        },
    )
    mm_projector_lr: float | None = field(default=None)
    group_by_modality_length: bool = field(default=False)
    loss_weighting: str = field(
        default="micro_batch",
        metadata={
            "help": "micro_batch (the seed's): the mean over each micro-batch's supervised tokens, averaged over "
            "accumulation steps and processes; token (transformers 5's): the mean over every supervised token "
            "of the optimizer step, which weights long answers more"
        },
    )
    # The seed's flag names that transformers 5 renamed: accepted and mapped onto the new ones.
    warmup_ratio: float | None = field(default=None, metadata={"help": "alias of --warmup_steps given as a ratio"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "alias of --eval_strategy"})

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            if IntervalStrategy(self.eval_strategy) not in (IntervalStrategy.NO, IntervalStrategy(self.evaluation_strategy)):
                raise ValueError(f"--evaluation_strategy {self.evaluation_strategy} and --eval_strategy "
                                 f"{self.eval_strategy} disagree: give one (--evaluation_strategy is its old name).")
            self.eval_strategy = self.evaluation_strategy
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"--loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.dora_dropout not in DORA_DROPOUT_MODES:
            raise ValueError(f"--dora_dropout must be one of {DORA_DROPOUT_MODES}, got {self.dora_dropout!r}")
        if self.deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _init_cpu_deepspeed_state()
            self.accelerator_config = {**(self.accelerator_config or {}), "use_configured_state": True}
        super().__post_init__()


def _init_cpu_deepspeed_state() -> None:
    """DeepSpeed without CUDA (tests, CPU-only machines): set up the gloo process group first.

    Left to itself, accelerate initialises DeepSpeed's process group without a backend on a CPU and
    then records a world of one process, so every rank would train alone as rank 0.
    """
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def find_all_linear_names(model: nn.Module) -> list[str]:
    """Names of the decoder's Linear layers (not the vision tower, projector or lm_head)."""
    skip = ("mm_projector", "vision_tower", "vision_resampler")
    names = {
        name.split(".")[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(s in name for s in skip)
    }
    names.discard("lm_head")
    return sorted(names)


def _split(arg: str | None) -> list[str] | None:
    return [s.strip() for s in arg.split(",") if s.strip()] if arg else None


def build_adapter_config(model: nn.Module, args: TrainingArguments):
    from peft import LoraConfig

    from peft_dora import DoraConfig

    target_modules = _split(args.target_modules) or find_all_linear_names(model)
    common = dict(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=target_modules,
        lora_dropout=args.lora_dropout,
        bias=args.lora_bias,
        task_type="CAUSAL_LM",
    )
    if args.use_dora:
        return DoraConfig(**common, wdecompose_target_modules=_split(args.wdecompose_target_modules),
                          dora_dropout=args.dora_dropout)
    if args.wdecompose_target_modules:
        raise ValueError("--wdecompose_target_modules needs DoRA (--use_dora True).")
    if args.dora_dropout != "seed":
        raise ValueError(f"--dora_dropout {args.dora_dropout} needs DoRA (--use_dora True).")
    return LoraConfig(**common)


def record_trainable_parameters(model: nn.Module, args: TrainingArguments) -> None:
    """Log the trainable share and keep it beside the outputs: the table's "# Params (%)" column.

    Counted over the assembled model, vision tower included, as the paper did (``count_params``).
    """
    count = count_parameters(model)
    logger.info("# Params: %s", count.describe())
    if args.should_save:
        os.makedirs(args.output_dir, exist_ok=True)
        record = json.dumps(count.record()) + "\n"
        pathlib.Path(args.output_dir, "trainable_parameters.json").write_text(record)


def resume_checkpoint(training_args: TrainingArguments, model: nn.Module) -> str | None:
    """The checkpoint to resume from: the one named by --resume_from_checkpoint, else the newest complete one.

    Either way it must hold every file this run's resume reads (``llava.train.checkpoints``). The
    saving process looks first and moves newer damaged checkpoints aside; the others then see the same.
    """
    layout = layout_of(training_args, model)
    if training_args.resume_from_checkpoint:
        require_complete(training_args.resume_from_checkpoint, layout)
        return training_args.resume_from_checkpoint
    with training_args.main_process_first(desc="checking checkpoints", local=False):
        return latest_complete_checkpoint(training_args.output_dir, layout, move_damaged=training_args.should_save)


def compute_dtype_of(args: TrainingArguments) -> torch.dtype:
    return torch.float16 if args.fp16 else (torch.bfloat16 if args.bf16 else torch.float32)


def prepare_language_model(
    model: nn.Module, model_args: ModelArguments, training_args: TrainingArguments, compute_dtype: torch.dtype
) -> nn.Module:
    """The language model's freezing rules and adapter; returns the model to train.

    Shared with ``count_params`` so that the count and the training decide trainability alike.
    The adapter goes on before the vision tower exists, so CLIP's q/k/v_proj are never targets.
    """
    model.config.use_cache = False
    if model_args.freeze_backbone:
        model.model.requires_grad_(False)
    if training_args.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    if not training_args.lora_enable:
        return model

    from peft import get_peft_model

    adapter_config = build_adapter_config(model, training_args)
    if training_args.bits == 16 and compute_dtype != torch.float32:
        model.to(compute_dtype)
    logger.info("Adding %s adapters (r=%d, alpha=%d) to %s", "DoRA" if training_args.use_dora else "LoRA",
                training_args.lora_r, training_args.lora_alpha, adapter_config.target_modules)
    return get_peft_model(model, adapter_config)


def configure_tokenizer(model: nn.Module, tokenizer, model_args: ModelArguments, mean_resizing: bool = True) -> None:
    """Padding token and conversation template; ``v0`` adds a [PAD] row to the embeddings if needed.

    ``mean_resizing`` only chooses the new row's initial values (``count_params`` has none to average).
    """
    if model_args.version == "v0":
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            model.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
        return
    tokenizer.pad_token = tokenizer.unk_token
    if model_args.version not in conversation_lib.conv_templates:
        raise ValueError(f"--version {model_args.version!r} is not a conversation template: "
                         f"{sorted(conversation_lib.conv_templates)}")
    conversation_lib.default_conversation = conversation_lib.conv_templates[model_args.version]


def attach_vision_modules(
    model: nn.Module,
    model_args: ModelArguments,
    training_args: TrainingArguments,
    compute_dtype: torch.dtype,
    device: torch.device | str,
):
    """Vision tower (always frozen) and projector, with the stage's rules for what trains.

    Stage 1 (``--tune_mm_mlp_adapter``) trains the projector alone; ``--freeze_mm_mlp_adapter`` freezes it.
    Shared with ``count_params``; returns the vision tower.
    """
    model.get_model().initialize_vision_modules(model_args=model_args)
    vision_tower = model.get_vision_tower()
    vision_tower.to(dtype=compute_dtype, device=device)
    projector = model.get_model().mm_projector
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        projector.requires_grad_(True)
    if training_args.freeze_mm_mlp_adapter:
        projector.requires_grad_(False)
    if training_args.bits in (4, 8):
        projector.to(dtype=compute_dtype, device=device)
    return vision_tower


# --report_to names whose package check in transformers is not named is_<name>_available.
_REPORTER_CHECKS = {"comet_ml": "comet", "azure_ml": "azureml", "flyte": "flytekit"}


def check_report_to(report_to: list[str] | None) -> None:
    """Refuse a --report_to whose package is missing now: transformers would say so only when the Trainer
    is built, after the data check and the model load (minutes at 7B under DeepSpeed)."""
    from transformers.integrations import integration_utils

    for name in report_to or []:
        available = getattr(integration_utils, f"is_{_REPORTER_CHECKS.get(name, name)}_available", None)
        if available is not None and not available():
            raise ValueError(f"--report_to {name}: the {name} package is not installed. Install it (pip install "
                             f"{name}) or pass --report_to none (Dora_7b.sh: REPORT_TO=none).")


def train(attn_implementation: str | None = None) -> None:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    check_report_to(training_args.report_to)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING, format="%(message)s")
    # Seed before the adapters are initialised so that a rerun (or a resumed run) is the same run.
    transformers.set_seed(training_args.seed)
    compute_dtype = compute_dtype_of(training_args)
    if model_args.vision_tower is not None and (model_args.mm_use_im_patch_token or model_args.mm_use_im_start_end):
        raise NotImplementedError("LLaVA-1.5 uses neither --mm_use_im_patch_token nor --mm_use_im_start_end.")

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    # The whole data file is checked here, in seconds, before minutes of loading a 7B model; the dataset
    # reads the tokenizer's settings and the image processor only when it makes a sample.
    data_module = make_supervised_data_module(tokenizer=tokenizer, data_args=data_args)

    load_kwargs = {}
    if training_args.bits in (4, 8):
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=training_args.bits == 4,
            load_in_8bit=training_args.bits == 8,
            llm_int8_skip_modules=["model.mm_projector"],  # transformers 5 matches from the module path's start
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=training_args.double_quant,
            bnb_4bit_quant_type=training_args.quant_type,
        )
    logger.info("Loading the language model from %s", model_args.model_name_or_path)
    model = LlavaLlamaForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        attn_implementation=attn_implementation,
        torch_dtype=compute_dtype if training_args.bf16 or training_args.fp16 else None,
        **load_kwargs,
    )
    model = prepare_language_model(model, model_args, training_args, compute_dtype)

    configure_tokenizer(model, tokenizer, model_args)

    if model_args.vision_tower is not None:
        vision_tower = attach_vision_modules(model, model_args, training_args, compute_dtype, training_args.device)
        data_args.image_processor = vision_tower.image_processor
        data_args.is_multimodal = True
        config = model.config
        config.image_aspect_ratio = data_args.image_aspect_ratio
        config.tokenizer_padding_side = tokenizer.padding_side
        config.tokenizer_model_max_length = tokenizer.model_max_length
        config.tune_mm_mlp_adapter = training_args.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
        config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
        config.mm_use_im_start_end = data_args.mm_use_im_start_end = model_args.mm_use_im_start_end
        config.mm_projector_lr = training_args.mm_projector_lr
        config.mm_use_im_patch_token = model_args.mm_use_im_patch_token

    record_trainable_parameters(model, training_args)

    trainer = LLaVATrainer(model=model, processing_class=tokenizer, args=training_args, **data_module)

    resume = resume_checkpoint(training_args, model)
    if resume:
        logger.info("Resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()

    model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    logger.info("Saved the final model to %s", os.path.abspath(training_args.output_dir))
    _close_process_group()


def _close_process_group() -> None:
    """Let every rank finish, then close the process group before the interpreter exits.

    Left open, a gloo group's worker threads can still be running while a rank's interpreter shuts
    down, and that rank then aborts ("terminate called without an active exception") after a run
    that finished and saved, so the launcher reports a failure.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    train()
