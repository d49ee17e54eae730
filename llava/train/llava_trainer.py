"""``LLaVATrainer``: the HF Trainer with LLaVA's sampler, projector learning rate, loss and checkpoints.

Every checkpoint (intermediate or final) of an adapter run holds ``config.json``, the adapter and
``non_lora_trainables.safetensors`` (the projector), so any checkpoint can be evaluated or resumed.
The loss is weighted as the seed's (``--loss_weighting``); under ZeRO-3 the DoRA norms are computed
between optimizer steps, outside any forward (``refresh_dora_norms``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import get_parameter_names
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from llava.model.llava_arch import labels_within_length
from llava.output_folder import open_safetensors_modes, umask_file_mode
from llava.train.checkpoints import CheckpointError, checkpoint_problem, layout_of

logger = logging.getLogger(__name__)

NON_LORA_TRAINABLES = "non_lora_trainables.safetensors"
NON_LORA_TRAINABLES_BIN = "non_lora_trainables.bin"  # what earlier runs wrote; still read on resume
STAGE1_PROJECTOR = "mm_projector.bin"  # the seed's stage-1 file, read by --pretrain_mm_mlp_adapter
LOSS_WEIGHTINGS = ("micro_batch", "token")


def split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """Split indices into ``num_chunks`` chunks of equal count and roughly equal total length."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for index in indices:
        shortest = min((i for i in range(num_chunks) if len(chunks[i]) < per_chunk), key=lambda i: totals[i])
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
    return chunks


def get_length_grouped_indices(lengths, batch_size, world_size, generator=None) -> list[int]:
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = world_size * batch_size
    megabatches = [indices[i : i + megabatch_size] for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(mb, key=lambda i: lengths[i], reverse=True) for mb in megabatches]
    megabatches = [split_to_even_chunks(mb, lengths, world_size) for mb in megabatches]
    return [i for mb in megabatches for batch in mb for i in batch]


def get_modality_length_grouped_indices(lengths, batch_size, world_size, generator=None) -> list[int]:
    """Batches hold only image samples (length > 0) or only text samples (length < 0), as the original."""
    if all(length != 0 for length in lengths) and (all(length > 0 for length in lengths) or all(length < 0 for length in lengths)):
        return get_length_grouped_indices([abs(x) for x in lengths], batch_size, world_size, generator)
    if any(length == 0 for length in lengths):
        raise ValueError("Modality lengths must be non-zero: positive for image samples, negative for text-only ones.")
    mm_indices, mm_lengths = zip(*[(i, l) for i, l in enumerate(lengths) if l > 0])
    lang_indices, lang_lengths = zip(*[(i, -l) for i, l in enumerate(lengths) if l < 0])

    mm_shuffle = [mm_indices[i] for i in get_length_grouped_indices(mm_lengths, batch_size, world_size, generator)]
    lang_shuffle = [lang_indices[i] for i in get_length_grouped_indices(lang_lengths, batch_size, world_size, generator)]
    megabatch_size = world_size * batch_size
    mm_megabatches = [mm_shuffle[i : i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
    lang_megabatches = [lang_shuffle[i : i + megabatch_size] for i in range(0, len(lang_shuffle), megabatch_size)]

    last_mm, last_lang = mm_megabatches[-1], lang_megabatches[-1]
    additional = last_mm + last_lang
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    order = torch.randperm(len(megabatches), generator=generator)
    megabatches = [megabatches[i] for i in order]
    if additional:
        megabatches.append(sorted(additional))
    return [i for mb in megabatches for i in mb]


class LengthGroupedSampler(Sampler):
    """Groups samples of similar length (and, optionally, the same modality) into megabatches.

    The order is drawn from a generator seeded by (seed, epoch), so a resumed run sees the same order.
    """

    def __init__(self, batch_size: int, world_size: int, lengths: list[int], seed: int = 0, group_by_modality: bool = False):
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = lengths
        self.seed = seed
        self.epoch = 0
        self.group_by_modality = group_by_modality

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        group = get_modality_length_grouped_indices if self.group_by_modality else get_length_grouped_indices
        return iter(group(self.lengths, self.batch_size, self.world_size, generator=generator))


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered_non_lora_trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors that are not adapter weights (the projector), whole and on CPU.

    Under ZeRO-3 each process holds a slice of them. They are gathered here (a collective: every
    process calls this) instead of taken from the state dict the Trainer hands to ``_save``, which is
    empty when DeepSpeed does not gather 16-bit weights on save. A tensor that still lacks its full
    shape is refused, never written.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    gather = contextlib.nullcontext()
    if any(_is_partitioned(p) for _, p in named):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        missing = [p for _, p in named if _is_partitioned(p) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        gather = deepspeed.zero.GatheredParameters(missing, modifier_rank=None)
    with gather:
        tensors = {name: p.detach().cpu().clone() for name, p in named}
    for name, p in named:
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(tensors[name].shape) != shape:
            raise RuntimeError(f"{name} came out of the ZeRO-3 gather as {tuple(tensors[name].shape)}, not {shape}: "
                               "refusing to save a partitioned projector.")
    return tensors


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``.bin`` file (unpickled tensors-only); errors name the file."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, zip and unpickling errors share no narrower base class
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {error}). The file is damaged: "
                              "resume from an earlier checkpoint.") from error


def _atomic_torch_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)


def _atomic_safetensors_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.chmod(umask_file_mode())  # safetensors creates it 0o600 (see open_safetensors_modes)
    os.replace(tmp, path)


def refresh_dora_norms(model: torch.nn.Module) -> int:
    """Compute every DoRA layer's norm now, outside any forward; returns how many layers were visited.

    Under ZeRO-3 a layer gathers W0, A and B for its norm, and refuses to while DeepSpeed is still
    prefetching one of them. The norm is cached by the layer until the optimizer steps or ZeRO-3
    rewrites a parameter's partition (a save's gather writes them back), so computed here, where
    nothing is in flight, the forwards that follow read it from the cache and gather nothing for it.
    A layer whose cache holds is not recomputed.
    """
    from peft_dora.layer import DoraLinear, weight_norm

    count = 0
    for module in model.modules():
        if isinstance(module, DoraLinear):
            for adapter in module.lora_magnitude_vector:
                weight_norm(module, adapter)
                count += 1
    return count


class RefreshDoraNorms(TrainerCallback):
    """``refresh_dora_norms`` before each optimizer step's first forward and after its update.

    Added by ``LLaVATrainer`` under ZeRO-3. Before: after a checkpoint save or an evaluation, nothing
    else runs before the forward. After: so that an evaluation right after the step reads the norms too.
    """

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            refresh_dora_norms(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            refresh_dora_norms(model)


class LLaVATrainer(Trainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._set_loss_weighting(getattr(self.args, "loss_weighting", "micro_batch"))
        if is_deepspeed_zero3_enabled():
            self.add_callback(RefreshDoraNorms())

    def _set_loss_weighting(self, weighting: str) -> None:
        """``micro_batch`` (the seed's): each micro-batch's loss is the mean over its own supervised tokens.

        transformers 5 would pass ``num_items_in_batch`` (every supervised token of the optimizer step,
        on all processes) to the model, which then divides its summed loss by it, and multiply the loss
        by the number of processes; here the model gets no such count and returns its micro-batch mean,
        the Trainer divides that by the accumulation steps, and DDP or DeepSpeed average the gradients
        over processes: the seed's mean of micro-batch means. ``token`` keeps transformers' weighting.
        """
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"--loss_weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
        self.model_accepts_loss_kwargs = weighting == "token"
        self.loss_is_scaled_for_ga = None if weighting == "token" else False

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Under ``token`` weighting, the supervised tokens the model's loss will really sum over.

        transformers counts them from the collated labels, but the model cuts each sequence at
        ``tokenizer_model_max_length`` only after every image placeholder became its patch features (575
        more positions at 336 px): a long conversation's last answers are then counted without being
        scored, and the step's loss is divided by too many. The labels are counted as the splice leaves them.
        """
        limits = self._splice_limits() if self.model_accepts_loss_kwargs else None
        if limits is not None:
            batch_samples = [
                dict(batch, labels=labels_within_length(batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                                        *limits))
                if "labels" in batch and "input_ids" in batch and batch.get("images") is not None else batch
                for batch in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)

    def _splice_limits(self) -> tuple[int, int] | None:
        """(positions per image, tokenizer_model_max_length) of a multimodal model; None for a text-only one."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        tower = base.get_vision_tower() if hasattr(base, "get_vision_tower") else None
        max_length = getattr(base.config, "tokenizer_model_max_length", None)
        if tower is None or max_length is None:
            return None
        return tower.tokens_per_image, max_length

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if train_dataset is None or not getattr(self.args, "group_by_modality_length", False):
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(
            self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            lengths=train_dataset.modality_lengths,
            seed=self.args.seed,
            group_by_modality=True,
        )

    def create_optimizer(self, model=None):
        """AdamW with the projector in its own groups at ``mm_projector_lr`` when it is set."""
        if self.optimizer is not None or getattr(self.args, "mm_projector_lr", None) is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(get_parameter_names(opt_model, [torch.nn.LayerNorm]))
        decay = {name for name in decay if "bias" not in name}
        projector = {name for name, _ in opt_model.named_parameters() if "mm_projector" in name}
        params = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if n in decay and n not in projector], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in params if n not in decay and n not in projector], "weight_decay": 0.0},
            {
                "params": [p for n, p in params if n in decay and n in projector],
                "weight_decay": self.args.weight_decay,
                "lr": self.args.mm_projector_lr,
            },
            {
                "params": [p for n, p in params if n not in decay and n in projector],
                "weight_decay": 0.0,
                "lr": self.args.mm_projector_lr,
            },
        ]
        groups = [g for g in groups if g["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save, plus ``config.json`` and the projector (stage 1: the projector alone).

        Every process comes here under DeepSpeed; the projector is gathered on all of them.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        stage1 = bool(getattr(self.args, "tune_mm_mlp_adapter", False))
        adapter = bool(getattr(self.args, "lora_enable", False))
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        projector = gathered_non_lora_trainables(model) if stage1 or adapter else None
        if adapter and not stage1 and state_dict == {} and any(_is_partitioned(p) for p in model.parameters()):
            raise RuntimeError(
                f"Saving {output_dir}: the Trainer passed no gathered weights for the ZeRO-3 adapter, so the adapter "
                "file would hold empty tensors. Set stage3_gather_16bit_weights_on_model_save to true in the "
                "DeepSpeed config."
            )
        if not stage1:
            super()._save(output_dir, state_dict=state_dict)
            if self.args.should_save:
                open_safetensors_modes(output_dir)
        if projector is None or not self.args.should_save:
            return
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        os.makedirs(output_dir, exist_ok=True)
        base.config.save_pretrained(output_dir)
        if stage1:
            _atomic_torch_save(projector, Path(output_dir) / STAGE1_PROJECTOR)
        else:
            _atomic_safetensors_save(projector, Path(output_dir) / NON_LORA_TRAINABLES)
        logger.info("Saved config.json and %d projector tensors to %s", len(projector), output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """Save a checkpoint, check it, and only then let ``--save_total_limit`` delete older ones.

        The Trainer rotates right after writing; a checkpoint that came out damaged would then count as
        one of the kept ones and could leave no resumable checkpoint at all. A damaged one stops the run.
        """
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's files (DeepSpeed partitions, RNG states) are written
        if not self.args.should_save:
            return
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        problem = checkpoint_problem(folder, layout_of(self.args, self.accelerator.unwrap_model(self.model)))
        if problem:
            raise CheckpointError(f"The checkpoint just written cannot be resumed from: {problem}. "
                                  "No older checkpoint was deleted.")
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)  # fmt: skip

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's load, plus the projector: stage 1's ``mm_projector.bin``, or an adapter's non-LoRA trainables.

        Without DeepSpeed only (DeepSpeed's engine restores every trainable parameter itself).
        """
        folder = Path(resume_from_checkpoint)
        target = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        trainable = {n for n, p in target.named_parameters() if p.requires_grad and "lora_" not in n}
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            # A stage-1 checkpoint holds no model file for the Trainer to find: the projector is the model.
            _restore(target, read_tensors(folder / STAGE1_PROJECTOR), folder / STAGE1_PROJECTOR, trainable)
            return
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except Exception as error:  # PEFT's and safetensors' errors do not name the file
            raise CheckpointError(f"The weights in {folder} could not be loaded ({type(error).__name__}: {error}).") from error
        if self.is_deepspeed_enabled or not getattr(self.args, "lora_enable", False) or not trainable:
            return
        path = next((folder / n for n in (NON_LORA_TRAINABLES, NON_LORA_TRAINABLES_BIN) if (folder / n).is_file()), None)
        if path is None:
            raise CheckpointError(
                f"{folder / NON_LORA_TRAINABLES} is missing (and so is {NON_LORA_TRAINABLES_BIN}): resuming would train "
                "on from the initial projector. Resume from a checkpoint that has it."
            )
        _restore(target, read_tensors(path), path, trainable)


def _restore(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, expected: set[str]) -> None:
    """Copy ``state`` into the model's parameters; it must hold exactly the ``expected`` ones."""
    params = dict(model.named_parameters())
    unknown, missing = sorted(set(state) - set(params)), sorted(expected - set(state))
    if unknown or missing:
        raise CheckpointError(f"{path}: tensors not in the model {unknown[:4]}, trainable tensors it lacks {missing[:4]}.")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    logger.info("Restored %d projector tensors from %s", len(state), path)
