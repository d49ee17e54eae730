"""peft_dora under a real two-process DeepSpeed ZeRO-3 training run (CPU accelerator, gloo).

The parent process saves a tiny LLaMA; ``tests/dora_zero3_worker.py`` (two ranks, launched with
``torch.distributed.run``) loads it through ``from_pretrained`` under ``zero.Init`` (via the HF
Trainer's ``TrainingArguments(deepspeed=...)``), wraps it with ``peft_dora.DoraConfig`` and trains it
with every parameter partitioned. The checks here compare its outputs with independent expectations:
the loss falls, the Trainer's ZeRO-3 save holds the gathered adapter, vanilla PEFT reloads it into a
plain model with the same logits, and the layer's norm matches a float64 reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dora_zero3_worker.py"
STEPS = 30
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_llama(path: Path, hidden_size: int = 64, intermediate_size: int = 128, heads: int = 4, init: float = 0.1) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        # The lm_head stays frozen: at the default 0.02 its logits cannot leave ~+-1.3, which caps how
        # far any adapter can bring the loss down; 0.1 lets the DoRA layers fit the patterns in 30 steps.
        initializer_range=init,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))


def _launch(model_dir: Path, out_dir: Path, *worker_args: str) -> str:
    """Run the two worker ranks; returns their log (the test fails with it if they do)."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="warning",
        PYTHONWARNINGS="ignore::FutureWarning",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", env["MASTER_ADDR"], "--master_port", env["MASTER_PORT"],
        str(WORKER), "--model_dir", str(model_dir), "--out_dir", str(out_dir), *worker_args,
    ]  # fmt: skip
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ZeRO-3 workers timed out after {TIMEOUT_S}s\nSTDOUT:\n{e.stdout}\nSTDERR:\n{e.stderr}")
    elapsed = time.monotonic() - start
    log = f"exit {proc.returncode} after {elapsed:.1f}s\nSTDOUT:\n{proc.stdout[-20000:]}\nSTDERR:\n{proc.stderr[-20000:]}"
    if proc.returncode != 0:
        pytest.fail(f"ZeRO-3 workers failed: {log}")
    return log


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("dora_zero3")
    model_dir, out_dir = base / "tiny_llama", base / "out"
    out_dir.mkdir()
    _tiny_llama(model_dir)
    log = _launch(model_dir, out_dir, "--steps", str(STEPS))
    from safetensors.torch import load_file

    return {
        "model_dir": model_dir,
        "adapter_dir": out_dir / "adapter",
        "losses": json.loads((out_dir / "losses.json").read_text()),
        "ranks": [load_file(str(out_dir / f"rank{r}.safetensors")) for r in (0, 1)],
        "log": log,
    }


def _adapter_keys(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"))}


@pytest.mark.slow
def test_zero3_loss_decreases(zero3_run: dict) -> None:
    losses = zero3_run["losses"]
    assert len(losses) == STEPS, zero3_run["log"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Observed: 5.28 -> 1.04 per step, last-5 / first-5 = 0.25 (identical to a single-process run).
    assert last < 0.5 * first, f"loss did not fall enough: first-5 {first:.3f}, last-5 {last:.3f}: {losses}"


@pytest.mark.slow
def test_zero3_ranks_agree(zero3_run: dict) -> None:
    r0, r1 = zero3_run["ranks"]
    assert r0.keys() == r1.keys()
    for k in r0:
        torch.testing.assert_close(r1[k], r0[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_zero3_saved_adapter_is_gathered(zero3_run: dict) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(zero3_run["adapter_dir"] / "adapter_model.safetensors"))
    gathered = _adapter_keys(zero3_run["ranks"][0])
    assert len(gathered) == 2 * 7 * 3
    assert saved.keys() == gathered.keys()
    for k, v in gathered.items():
        assert saved[k].numel() > 0 and saved[k].shape == v.shape, (k, tuple(saved[k].shape), tuple(v.shape))
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
    # Training moved every factor away from its initialisation (B starts at zero, m at ||W0||).
    assert all(v.abs().max() > 0 for k, v in gathered.items() if k.endswith("lora_B.weight"))
    config = json.loads((zero3_run["adapter_dir"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True


@pytest.mark.slow
def test_zero3_adapter_reloads_with_vanilla_peft(zero3_run: dict) -> None:
    from peft import PeftModel
    from peft.tuners.lora.dora import DoraLinearLayer
    from transformers import LlamaForCausalLM

    probe_input = _worker().probe_input

    base = LlamaForCausalLM.from_pretrained(str(zero3_run["model_dir"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(zero3_run["adapter_dir"])).eval()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_magnitude_vector["default"], DoraLinearLayer)  # upstream DoRA, not peft_dora
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    torch.testing.assert_close(logits, zero3_run["ranks"][0]["probe_logits"], rtol=1e-5, atol=1e-5)  # seen: 2e-6


@pytest.mark.slow
def test_zero3_norm_matches_float64_reference(zero3_run: dict) -> None:
    _check_norms(zero3_run["ranks"][0], zero3_run["model_dir"], scaling=16 / 8)


def _check_norms(tensors: dict, model_dir: Path, scaling: float) -> None:
    from safetensors.torch import load_file

    base = load_file(str(model_dir / "model.safetensors"))
    modules = sorted(k[: -len(".layer_norm")] for k in tensors if k.endswith(".layer_norm"))
    assert len(modules) == 14
    for mod in modules:
        w0 = base[mod.removeprefix("base_model.model.") + ".weight"].double()
        # W0 gathered in the workers is the frozen checkpoint weight, bit for bit.
        torch.testing.assert_close(tensors[f"{mod}.base_weight"].double(), w0, rtol=0, atol=0)
        a, b = tensors[f"{mod}.lora_A.weight"].double(), tensors[f"{mod}.lora_B.weight"].double()
        ref = torch.linalg.vector_norm(w0 + scaling * b @ a, dim=1)
        torch.testing.assert_close(tensors[f"{mod}.ref_norm"], ref, rtol=1e-12, atol=0)
        # m starts at ||W0||_row; training moved it.
        moved = (tensors[f"{mod}.lora_magnitude_vector"].double() - torch.linalg.vector_norm(w0, dim=1)).abs().max()
        assert moved > 1e-4, f"{mod}: magnitude never trained ({moved:.2e})"
        # The norm of the last eval forward: the cache was invalidated by the last optimizer step.
        torch.testing.assert_close(tensors[f"{mod}.layer_norm"].double(), ref, rtol=1e-5, atol=0, msg=mod)
        # The norm computed outside any forward, through the layer's own ZeRO-3 gather.
        torch.testing.assert_close(tensors[f"{mod}.layer_norm_recomputed"].double(), ref, rtol=1e-5, atol=0, msg=mod)


# The repository's zero3.json as the 7B run resolves it, on a model wide enough that its DoRA weights
# are partitioned as the 7B's are: lora_A, lora_B (r 128 x 512 or 1024 > 40960 elements) and W0 above
# the persistence threshold, the magnitudes (512 or 1024) below it; the 7B's prefetch bucket
# (15.1M elements) holds this whole model.
WIDE = {"hidden_size": 512, "intermediate_size": 1024, "heads": 8, "init": 0.05}
R_7B, ALPHA_7B = 128, 256  # Dora_7b.sh
LLAVA_STEPS, LLAVA_LR = 3, 0.1
SUPERVISED = (1, 9, 3, 6)  # supervised tokens of the four samples of each step (2 ranks x 2 micro-batches)
SEQ = 24


def _worker():
    spec = importlib.util.spec_from_file_location("dora_zero3_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def _labelled_rows(model_dir: Path) -> list[dict]:
    """Four sequences; the first supervises one token the untrained model finds hardest, the others the
    easiest ones (at init the DoRA model is the base model), so that the two weightings differ widely."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(3)
    rows = []
    for i, count in enumerate(SUPERVISED):
        ids = [1] + torch.randint(3, 128, (SEQ - 1,), generator=g).tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        pick = torch.argmin if i == 0 else torch.argmax
        labels = [-100] * SEQ
        for t in range(SEQ - count, SEQ):
            labels[t] = int(pick(logits[t - 1]))  # position t is predicted from the logits at t - 1
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _token_losses(model, row: dict) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
    positions = [t for t in range(1, SEQ) if row["labels"][t] != -100]
    rows = logits[[t - 1 for t in positions]]
    targets = torch.tensor([row["labels"][t] for t in positions])
    return torch.logsumexp(rows, dim=-1) - rows.gather(1, targets[:, None]).squeeze(1)


def _hand_losses(model, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the seed's mean of per-sample token means, the mean over every supervised token), in float64."""
    per_sample = [_token_losses(model, row) for row in rows]
    seed = sum(x.mean() for x in per_sample) / len(per_sample)
    token = torch.cat(per_sample).sum() / sum(len(x) for x in per_sample)
    return seed, token


def _reference_model(model_dir: Path, initial: dict):
    """The workers' model before its first step, in float64 on one process."""
    import peft
    from transformers import LlamaForCausalLM

    import peft_dora

    base = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    config = peft_dora.DoraConfig(r=R_7B, lora_alpha=ALPHA_7B, lora_dropout=0.0, target_modules=_worker().TARGETS)
    model = peft.get_peft_model(base, config).double()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == set(initial)
    with torch.no_grad():
        for name, tensor in initial.items():
            params[name].copy_(tensor.double())
    return model


@pytest.fixture(scope="module")
def llava_zero3_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from safetensors.torch import load_file

    base = tmp_path_factory.mktemp("llava_zero3")
    model_dir, out_dir = base / "wide_llama", base / "out"
    out_dir.mkdir()
    _tiny_llama(model_dir, **WIDE)
    rows = _labelled_rows(model_dir)
    (base / "rows.json").write_text(json.dumps(rows))
    log = _launch(
        model_dir, out_dir, "--recipe", "llava", "--repo_config", str(ROOT / "scripts" / "zero3.json"),
        "--data_json", str(base / "rows.json"), "--steps", str(LLAVA_STEPS), "--lr", str(LLAVA_LR),
        "--lora_r", str(R_7B), "--lora_alpha", str(ALPHA_7B), "--lora_dropout", "0",
    )  # fmt: skip
    return {
        "model_dir": model_dir,
        "out_dir": out_dir,
        "rows": rows,
        "record": json.loads((out_dir / "llava_record.json").read_text()),
        "rank0": load_file(str(out_dir / "rank0.safetensors")),
        "initial": load_file(str(out_dir / "initial.safetensors")),
        "step1": load_file(str(out_dir / "step1.safetensors")),
        "log": log,
    }


@pytest.mark.slow
def test_repo_zero3_values_partition_dora_weights_as_for_the_7b(llava_zero3_run: dict) -> None:
    record = llava_zero3_run["record"]
    assert record["zero_config"] == {
        "prefetch_bucket_size": 15099494,  # int(0.9 * 4096 * 4096)
        "param_persistence_threshold": 40960,  # 10 * 4096
        "reduce_bucket_size": 16777216,  # 4096 * 4096
        "max_live_parameters": 10**9,
        "max_reuse_distance": 10**9,
        "gather_16bit_weights_on_model_save": True,
    }
    assert record["gradient_clipping"] == 0.0  # set here for the SGD check; the repository's file names none
    factors = [n for n in llava_zero3_run["initial"] if ".lora_A." in n or ".lora_B." in n]
    magnitudes = [n for n in llava_zero3_run["initial"] if "lora_magnitude_vector" in n]
    assert len(factors) == 28 and len(magnitudes) == 14
    assert set(record["partitioned"]) == {*factors, "base_model.model.lm_head.weight"}
    assert set(record["persistent"]) == set(magnitudes)


@pytest.mark.slow
def test_repo_zero3_prefetches_dora_weights_and_the_norm_never_meets_one_in_flight(llava_zero3_run: dict) -> None:
    record = llava_zero3_run["record"]
    # DeepSpeed had DoRA weights in flight during forwards: its prefetch reached them.
    assert record["inflight_seen"] > 0, llava_zero3_run["log"]
    gathers = record["norm_gathers"]
    assert not [g for g in gathers if g["inflight"]]
    # No forward or backward gathers for a norm: each is computed between optimizer steps (14 layers,
    # after each of the 3 updates at least) and read from the layer's cache.
    assert not [g for g in gathers if g["in_step"]], gathers
    assert sum(g["step"] >= 1 for g in gathers) >= 14 * LLAVA_STEPS
    _check_norms(llava_zero3_run["rank0"], llava_zero3_run["model_dir"], scaling=ALPHA_7B / R_7B)


@pytest.mark.slow
def test_repo_zero3_first_step_is_the_seeds_mean_of_micro_batch_means(llava_zero3_run: dict) -> None:
    run = llava_zero3_run
    model = _reference_model(run["model_dir"], run["initial"])
    seed, token = _hand_losses(model, run["rows"])
    assert abs(seed.item() - token.item()) > 0.5, (seed.item(), token.item())
    assert run["record"]["losses"][0] == pytest.approx(seed.item(), rel=1e-5)
    seed.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    scale = max(g.abs().max().item() for g in grads.values())
    for name, grad in grads.items():
        update = (run["initial"][name].double() - run["step1"][name].double()) / LLAVA_LR
        torch.testing.assert_close(update, grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.slow
def test_projector_saved_whole_on_every_zero3_save_path(llava_zero3_run: dict) -> None:
    from safetensors.torch import load_file

    out, final = llava_zero3_run["out_dir"], llava_zero3_run["rank0"]["lm_head.weight"]
    key = "base_model.model.lm_head.weight"
    saved = {
        "gathered": load_file(str(out / "saved_gathered" / "non_lora_trainables.safetensors")),
        "not_gathered": load_file(str(out / "saved_not_gathered" / "non_lora_trainables.safetensors")),
        "stage1_empty_state_dict": torch.load(out / "saved_stage1" / "mm_projector.bin", weights_only=True),
    }
    for path, tensors in saved.items():
        assert list(tensors) == [key], path
        torch.testing.assert_close(tensors[key], final, rtol=0, atol=0, msg=path)
    adapters = [load_file(str(out / d / "adapter_model.safetensors")) for d in ("saved_gathered", "saved_not_gathered")]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 42
    for name, tensor in adapters[0].items():
        assert tensor.numel() > 0, name
        torch.testing.assert_close(adapters[1][name], tensor, rtol=0, atol=0, msg=name)
    assert "stage3_gather_16bit_weights_on_model_save" in llava_zero3_run["record"]["refused"]
    assert not (out / "saved_refused" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_zero3_checkpoints_hold_what_a_resume_reads(llava_zero3_run: dict) -> None:
    from llava.train.checkpoints import CheckpointLayout, checkpoint_problem

    trainer_dir = llava_zero3_run["out_dir"] / "trainer"
    assert llava_zero3_run["record"]["checkpoints"], llava_zero3_run["log"]
    for name in llava_zero3_run["record"]["checkpoints"]:
        folder = trainer_dir / name
        step = name.removeprefix("checkpoint-")
        assert (folder / "latest").read_text().strip() == f"global_step{step}"
        for rank in (0, 1):
            assert (folder / f"rng_state_{rank}.pth").is_file()
            assert (folder / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
            assert list((folder / f"global_step{step}").glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        layout = CheckpointLayout(weights="adapter", non_lora_trainables=True, deepspeed=True, world_size=2)
        assert checkpoint_problem(folder, layout) is None
