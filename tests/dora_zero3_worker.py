"""One rank of the two-process DeepSpeed ZeRO-3 (CPU, gloo) DoRA training runs of ``test_dora_zero3.py``.

Launched by the test with ``python -m torch.distributed.run --nproc_per_node 2``. It trains a tiny
LLaMA with ``peft_dora`` through the HF Trainer (``TrainingArguments(deepspeed=...)``: the path the
LLaVA training takes), saves the adapter with ``Trainer.save_model`` (the ZeRO-3 gather-on-save path),
then writes what the test checks against independent expectations.

Two recipes. ``peft`` (the default): the plain Trainer with tiny buckets, so that every parameter goes
through the partition path. ``llava``: ``LLaVATrainer`` with the repository's ``scripts/zero3.json``
resolved as for the 7B (``repo_ds_config``), the seed's loss weighting, SGD without clipping, the
lm_head trained as a stand-in for the projector (a partitioned non-LoRA trainable), checkpoints, and
every save path of the projector; it writes ``llava_record.json`` and the trainables before and
after the first optimizer step (``initial.safetensors``, ``step1.safetensors``).

Both write:

- ``losses.json``: the per-step training losses (rank 0);
- ``rank{R}.safetensors``: every lora_A / lora_B / lora_magnitude_vector gathered with
  ``deepspeed.zero.GatheredParameters`` (keys in the PEFT file format), the gathered W0 of every DoRA
  layer (``<module>.base_weight``), the norm the layer used in the final eval forward under ZeRO-3
  (``<module>.layer_norm``, from its cache) and the one it computes again outside any forward with
  the cache cleared (``<module>.layer_norm_recomputed``, through its own gather), a float64
  reference ||W0 + s B A||_row from the gathered weights (``<module>.ref_norm``), and the logits of
  the fixed probe input from the ZeRO-3 engine in eval mode (``probe_logits``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

VOCAB = 128
SEQ_LEN = 24
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT = 8, 16, 0.05


def synthetic_sequences(n: int, seed: int = 0) -> list[list[int]]:
    """Short token patterns (period 3 to 6) repeated to SEQ_LEN; the same few patterns recur."""
    g = torch.Generator().manual_seed(seed)
    patterns = [torch.randint(3, VOCAB, (int(p),), generator=g).tolist() for p in (3, 4, 5, 6, 3, 4, 5, 6)]
    out = []
    for i in range(n):
        pat = patterns[i % len(patterns)]
        out.append([1] + (pat * SEQ_LEN)[: SEQ_LEN - 1])
    return out


def probe_input() -> torch.Tensor:
    """The fixed input whose logits the test compares (two rows, one seen pattern and a fresh one)."""
    seen = synthetic_sequences(1)[0]
    g = torch.Generator().manual_seed(1234)
    fresh = [1] + torch.randint(3, VOCAB, (SEQ_LEN - 1,), generator=g).tolist()
    return torch.tensor([seen, fresh], dtype=torch.long)


HIDDEN_SIZE_7B = 4096


def repo_ds_config(path: str) -> dict:
    """``scripts/zero3.json`` as the HF integration resolves it for LLaVA-1.5-7B.

    transformers fills the "auto" keys that depend on the model's ``hidden_size``
    (``HfTrainerDeepSpeedConfig.trainer_config_finalize``): reduce_bucket_size h*h,
    stage3_prefetch_bucket_size int(0.9*h*h), stage3_param_persistence_threshold 10*h. The tiny model
    would get tiny values; the 7B's (h = 4096) are written in here. The other "auto" keys (batch
    sizes, accumulation, precision) are left to the Trainer, as in the real run.
    """
    config = json.loads(Path(path).read_text())
    zero = config["zero_optimization"]
    h = HIDDEN_SIZE_7B
    for key, value in (
        ("reduce_bucket_size", h * h),
        ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
        ("stage3_param_persistence_threshold", 10 * h),
    ):
        assert zero[key] == "auto", f"{path}: {key} is {zero[key]!r}, expected 'auto'"
        zero[key] = value
    return config


def ds_config(micro_batch: int) -> dict:
    small = 1000  # elements: tiny buckets so that every parameter really goes through the partition path
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": small,
            "stage3_prefetch_bucket_size": small,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": small * 10,
            "stage3_max_reuse_distance": small * 10,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids = torch.tensor(self.rows[i], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class LabelledDataset(torch.utils.data.Dataset):
    """Rows of ``{"input_ids": [...], "labels": [...]}`` (labels -100 where not supervised)."""

    def __init__(self, path: str) -> None:
        self.rows = json.loads(Path(path).read_text())

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids = torch.tensor(self.rows[i]["input_ids"], dtype=torch.long)
        labels = torch.tensor(self.rows[i]["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def peft_key(name: str) -> str:
    """PeftModel parameter name -> key in the saved adapter file."""
    name = name.replace(".default", "")
    if name.endswith("lora_magnitude_vector.weight"):
        name = name[: -len(".weight")]
    return name


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--recipe", choices=("peft", "llava"), default="peft")
    parser.add_argument("--repo_config", help="llava recipe: the repository's DeepSpeed config")
    parser.add_argument("--data_json", help="llava recipe: the training rows (LabelledDataset)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--gradient_checkpointing", type=int, default=1)
    parser.add_argument("--lora_r", type=int, default=R)
    parser.add_argument("--lora_alpha", type=int, default=ALPHA)
    parser.add_argument("--lora_dropout", type=float, default=DROPOUT)
    return parser.parse_args()


def setup_distributed() -> None:
    import deepspeed.ops
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce op (about 80 s on
    # two cores, once per machine) that ZeRO-3's gathers and reduce-scatters never use; gloo serves.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    # On a machine without CUDA, TrainingArguments(deepspeed=...) lets accelerate call
    # deepspeed.init_distributed with no backend name and then record a world of one process (its
    # backend stays None), so every rank would act as rank 0 of 1. Configure the distributed state
    # for DeepSpeed with the gloo backend first and have the TrainingArguments use it.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    assert state.num_processes == 2 and state.distributed_type == DistributedType.DEEPSPEED, state


def peft_training_args(args: argparse.Namespace, out: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out / "trainer"),
        deepspeed=ds_config(args.micro_batch),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        # Not use_cpu=True: accelerate then turns DeepSpeed off.
        accelerator_config={"use_configured_state": True},
    )


def llava_training_args(args: argparse.Namespace, out: Path):
    """Dora_7b.sh's kind of run: one sample per micro-batch, accumulation 2, a checkpoint every 2 steps.

    SGD without clipping, so that the first update is exactly -lr times the gradient (DeepSpeed 0.19
    clips at 1.0 when the config names no gradient_clipping, as scripts/zero3.json does not).
    """
    from llava.train.train import TrainingArguments

    config = repo_ds_config(args.repo_config)
    config["gradient_clipping"] = "auto"  # filled from max_grad_norm
    return TrainingArguments(
        output_dir=str(out / "trainer"), deepspeed=config, lora_enable=True,
        loss_weighting="micro_batch", per_device_train_batch_size=1, gradient_accumulation_steps=2,
        max_steps=args.steps, optim="sgd", learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, gradient_checkpointing=bool(args.gradient_checkpointing),
        gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="steps", save_steps=2,
        save_total_limit=2, eval_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip


def gathered_trainables(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (a collective: every rank calls it)."""
    import deepspeed

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().clone().contiguous() for n, p in params.items()}


class ZeroRecorder:
    """What ZeRO-3 did around the DoRA layers during training, seen through captured parameter objects.

    (Reading a parameter through its module during a forward would make DeepSpeed gather it and
    register it with that forward's module, changing what is measured.)
    - ``inflight_seen``: DoRA weights (A, B, W0 of any layer) found in flight, counted at the start of
      every module's forward: DeepSpeed's prefetch reached them.
    - ``norm_gathers``: the layers' gathers for their norm: during a training step's forward and
      backward (``in_step``) or between steps, after which optimizer step, and whether a parameter
      was in flight.
    """

    def __init__(self, model, dora_layers: dict) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        import peft_dora.layer

        self.inflight = ZeroParamStatus.INFLIGHT
        self.inflight_seen = 0
        self.norm_gathers: list[dict] = []
        self.step = 0
        self.in_step = False
        self.weights = [
            w
            for m in dora_layers.values()
            for w in (m.lora_A["default"].weight, m.lora_B["default"].weight, m.get_base_layer().weight)
        ]
        for module in model.modules():
            module.register_forward_pre_hook(self._module_starts)
        original = peft_dora.layer._gathered

        def recorded(*params):
            self.norm_gathers.append({
                "step": self.step,
                "in_step": self.in_step,
                "inflight": any(getattr(p, "ds_status", None) == self.inflight for p in params),
            })  # fmt: skip
            return original(*params)

        peft_dora.layer._gathered = recorded

    def _module_starts(self, module, inputs) -> None:
        self.inflight_seen += sum(w.ds_status == self.inflight for w in self.weights)

    def watch(self, trainer) -> None:
        """Mark the trainer's training steps (forward and backward of one micro-batch)."""
        training_step = trainer.training_step

        def marked(*args, **kwargs):
            self.in_step = True
            try:
                return training_step(*args, **kwargs)
            finally:
                self.in_step = False

        trainer.training_step = marked


def train_peft(args: argparse.Namespace, out: Path) -> None:
    training_args = peft_training_args(args, out)
    model, dora_layers = load_dora_model(args, training_args)
    from transformers import Trainer

    trainer = Trainer(model=model, args=training_args, train_dataset=ListDataset(synthetic_sequences(256)))
    t0 = time.monotonic()
    trainer.train()
    t_train = time.monotonic() - t0
    assert model.base_model.model.is_gradient_checkpointing == bool(args.gradient_checkpointing)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainer.save_model(str(out / "adapter"))

    # Every trainable parameter really is partitioned (persistence threshold 0).
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert hasattr(p, "ds_id") and p.numel() == 0, f"{name} is not partitioned: {tuple(p.shape)}"
    dump_state(trainer, dora_layers, out)
    if torch.distributed.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        print(f"dora_zero3_worker: {len(losses)} steps in {t_train:.1f}s, losses {[round(x, 3) for x in losses]}")


def train_llava(args: argparse.Namespace, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from llava.train.llava_trainer import LLaVATrainer

    training_args = llava_training_args(args, out)
    model, dora_layers = load_dora_model(args, training_args)
    model.base_model.model.lm_head.weight.requires_grad_(True)  # the projector's stand-in: trainable, not LoRA
    rank = torch.distributed.get_rank()
    recorder = ZeroRecorder(model, dora_layers)
    initial = gathered_trainables(model)
    trainer = LLaVATrainer(model=model, args=training_args, train_dataset=LabelledDataset(args.data_json))
    recorder.watch(trainer)

    class AfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorder.step = state.global_step
            if state.global_step == 1:
                step1 = gathered_trainables(model)
                if rank == 0:
                    save_file(step1, str(out / "step1.safetensors"))

    trainer.add_callback(AfterStep())
    trainer.train()
    engine = trainer.model_wrapped
    zero = engine._config.zero_config
    record = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "zero_config": {
            "prefetch_bucket_size": zero.prefetch_bucket_size,
            "param_persistence_threshold": zero.param_persistence_threshold,
            "reduce_bucket_size": zero.reduce_bucket_size,
            "max_live_parameters": zero.max_live_parameters,
            "max_reuse_distance": zero.max_reuse_distance,
            "gather_16bit_weights_on_model_save": zero.gather_16bit_weights_on_model_save,
        },
        "gradient_clipping": engine.gradient_clipping(),
        "partitioned": sorted(n for n, p in model.named_parameters() if p.requires_grad and not p.ds_persist),
        "persistent": sorted(n for n, p in model.named_parameters() if p.requires_grad and p.ds_persist),
        "inflight_seen": recorder.inflight_seen,
        "norm_gathers": recorder.norm_gathers,
        "checkpoints": sorted(p.name for p in (out / "trainer").glob("checkpoint-*")),
    }
    record["refused"] = save_every_way(trainer, out)
    dump_state(trainer, dora_layers, out)
    if rank == 0:
        save_file(initial, str(out / "initial.safetensors"))
        (out / "llava_record.json").write_text(json.dumps(record))
        print(f"dora_zero3_worker: llava recipe, losses {record['losses']}")


def save_every_way(trainer, out: Path) -> str:
    """The projector through each save path; returns the refusal of an adapter save without gathered weights."""
    engine = trainer.model_wrapped
    trainer.save_model(str(out / "saved_gathered"))
    engine._config.zero_config.gather_16bit_weights_on_model_save = False
    trainer.save_model(str(out / "saved_not_gathered"))
    engine._config.zero_config.gather_16bit_weights_on_model_save = True
    # Stage 1's save gets an empty state dict when DeepSpeed does not gather 16-bit weights.
    trainer.args.tune_mm_mlp_adapter = True
    trainer._save(str(out / "saved_stage1"), state_dict={})
    trainer.args.tune_mm_mlp_adapter = False
    try:
        trainer._save(str(out / "saved_refused"), state_dict={})
    except RuntimeError as error:
        return str(error)
    raise AssertionError("an adapter save without gathered weights was not refused")


def load_dora_model(args: argparse.Namespace, training_args):
    """The tiny LLaMA, partitioned at load (zero.Init), with peft_dora's DoRA layers."""
    import peft
    from transformers import LlamaForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    import peft_dora
    from peft_dora.layer import DoraLinear

    # The TrainingArguments must exist before from_pretrained: they create the HfDeepSpeedConfig that
    # makes from_pretrained build the model under deepspeed.zero.Init (partitioned at load).
    assert is_deepspeed_zero3_enabled(), "TrainingArguments(deepspeed=...) did not switch ZeRO-3 on"
    assert training_args.world_size == 2 and training_args.device.type == "cpu"
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    assert training_args.hf_deepspeed_config.config["train_batch_size"] == 2 * batch
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert hasattr(w, "ds_id") and w.numel() == 0, "from_pretrained did not partition the model (zero.Init)"
    config = peft_dora.DoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    dora_layers = {n: m for n, m in model.named_modules() if isinstance(m, DoraLinear)}
    assert len(dora_layers) == 2 * len(TARGETS), sorted(dora_layers)
    return model, dora_layers


def dump_state(trainer, dora_layers: dict, out: Path) -> None:
    """The gathered weights, the layers' norms and the probe logits of this rank (``rank{R}.safetensors``)."""
    import deepspeed
    from safetensors.torch import save_file

    from peft_dora.layer import weight_norm

    # The DoRA model as the workers see it at the end: the engine's eval forward, ZeRO-3 gathering
    # each module's parameters around its forward (as Trainer.evaluate would run it).
    engine = trainer.model_wrapped
    assert isinstance(engine, deepspeed.DeepSpeedEngine), type(engine)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe_input()).logits.float().contiguous()

    tensors = {"probe_logits": logits}
    for name, module in dora_layers.items():
        # The norm the layer uses under ZeRO-3: cached from the eval forward just run; recomputing
        # with the cache cleared (through the layer's own gather) must give the same values.
        key = peft_key(name)
        tensors[f"{key}.layer_norm"] = module._dora_norm_cache["default"][1].clone()
        module._dora_norm_cache.clear()
        tensors[f"{key}.layer_norm_recomputed"] = weight_norm(module, "default").clone()
        base = module.get_base_layer().weight
        a = module.lora_A["default"].weight
        b = module.lora_B["default"].weight
        m = module.lora_magnitude_vector["default"].weight
        with deepspeed.zero.GatheredParameters([base, a, b, m], modifier_rank=None):
            tensors[f"{key}.base_weight"] = base.detach().clone()
            tensors[f"{key}.lora_A.weight"] = a.detach().clone()
            tensors[f"{key}.lora_B.weight"] = b.detach().clone()
            tensors[f"{key}.lora_magnitude_vector"] = m.detach().clone()
            s = module.scaling["default"]
            v = base.detach().double() + s * (b.detach().double() @ a.detach().double())
            tensors[f"{key}.ref_norm"] = torch.linalg.vector_norm(v, dim=1)
    lm_head = engine.module.base_model.model.lm_head.weight
    with deepspeed.zero.GatheredParameters([lm_head], modifier_rank=None):
        tensors["lm_head.weight"] = lm_head.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{torch.distributed.get_rank()}.safetensors"))


def main() -> None:
    args = parse_args()
    out = Path(args.out_dir)
    setup_distributed()
    (train_llava if args.recipe == "llava" else train_peft)(args, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # an open gloo group can abort the rank at interpreter exit


if __name__ == "__main__":
    main()
