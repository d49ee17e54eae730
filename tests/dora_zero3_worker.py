"""One rank of the two-process DeepSpeed ZeRO-3 (CPU, gloo) DoRA training run of ``test_dora_zero3.py``.

Launched by the test with ``python -m torch.distributed.run --nproc_per_node 2``. It trains a tiny
LLaMA with ``peft_dora`` through the HF Trainer (``TrainingArguments(deepspeed=...)``: the path the
LLaVA training takes), saves the adapter with ``Trainer.save_model`` (the ZeRO-3 gather-on-save path),
then writes what the test checks against independent expectations:

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


def peft_key(name: str) -> str:
    """PeftModel parameter name -> key in the saved adapter file."""
    name = name.replace(".default", "")
    if name.endswith("lora_magnitude_vector.weight"):
        name = name[: -len(".weight")]
    return name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--gradient_checkpointing", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out_dir)

    import deepspeed
    from accelerate import PartialState
    from accelerate.utils import DistributedType
    import peft
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled

    import peft_dora
    from peft_dora.layer import DoraLinear, weight_norm

    # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce op (about 80 s on
    # two cores, once per machine) that ZeRO-3's gathers and reduce-scatters never use; gloo serves.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    # On a machine without CUDA, TrainingArguments(deepspeed=...) lets accelerate call
    # deepspeed.init_distributed with no backend name and then record a world of one process (its
    # backend stays None), so every rank would act as rank 0 of 1. Configure the distributed state
    # for DeepSpeed with the gloo backend first and have the TrainingArguments use it.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    assert state.num_processes == 2 and state.distributed_type == DistributedType.DEEPSPEED, state

    # The TrainingArguments must exist before from_pretrained: they create the HfDeepSpeedConfig that
    # makes from_pretrained build the model under deepspeed.zero.Init (partitioned at load).
    training_args = TrainingArguments(
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
    assert is_deepspeed_zero3_enabled(), "TrainingArguments(deepspeed=...) did not switch ZeRO-3 on"
    assert training_args.world_size == 2 and training_args.device.type == "cpu"
    assert training_args.hf_deepspeed_config.config["train_batch_size"] == 2 * args.micro_batch
    rank = torch.distributed.get_rank()

    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert hasattr(w, "ds_id") and w.numel() == 0, "from_pretrained did not partition the model (zero.Init)"
    config = peft_dora.DoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    dora_layers = {n: m for n, m in model.named_modules() if isinstance(m, DoraLinear)}
    assert len(dora_layers) == 2 * len(TARGETS), sorted(dora_layers)

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

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{rank}.safetensors"))
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        print(f"dora_zero3_worker: {len(losses)} steps in {t_train:.1f}s, losses {[round(x, 3) for x in losses]}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # an open gloo group can abort the rank at interpreter exit


if __name__ == "__main__":
    main()
