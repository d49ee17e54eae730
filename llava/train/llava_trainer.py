"""``LLaVATrainer``: the HF Trainer with LLaVA's sampler, projector learning rate and checkpoint contents.

Every checkpoint (intermediate or final) of an adapter run holds ``config.json``, the adapter and
``non_lora_trainables.bin`` (the projector), so any checkpoint can be evaluated or resumed.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer_pt_utils import get_parameter_names

logger = logging.getLogger(__name__)

NON_LORA_TRAINABLES = "non_lora_trainables.bin"


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


def non_lora_trainables(named_tensors, trainable_names: set[str]) -> dict[str, torch.Tensor]:
    """The trainable tensors that are not adapter weights (the projector), on CPU."""
    return {
        name: tensor.detach().cpu().clone()
        for name, tensor in named_tensors
        if name in trainable_names and "lora_" not in name
    }


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class LLaVATrainer(Trainer):
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
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        stage1 = getattr(self.args, "tune_mm_mlp_adapter", False)
        if not stage1:
            super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save or not (stage1 or getattr(self.args, "lora_enable", False)):
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        # Under ZeRO-3 `state_dict` is the gathered one; otherwise the parameters are whole already.
        tensors = state_dict.items() if state_dict else model.named_parameters()
        extra = non_lora_trainables(tensors, trainable)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        os.makedirs(output_dir, exist_ok=True)
        base.config.save_pretrained(output_dir)
        # Stage 1 keeps the projector alone, as the seed's mm_projector.bin; adapters keep it beside them.
        name = "mm_projector.bin" if stage1 else NON_LORA_TRAINABLES
        _atomic_torch_save(extra, os.path.join(output_dir, name))
        logger.info("Saved config.json and %d trainable tensors (%s) to %s", len(extra), name, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, NON_LORA_TRAINABLES)
        if self.is_deepspeed_enabled or not os.path.exists(path):
            return  # DeepSpeed restores every parameter from its own engine checkpoint
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(model.named_parameters())
        missing = sorted(set(state) - set(params))
        if missing:
            raise ValueError(f"{path}: tensors not in the model: {missing[:4]}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        logger.info("Restored %d non-LoRA trainable tensors from %s", len(state), path)
