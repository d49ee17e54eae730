"""Resuming only from checkpoints that hold every file the resume reads.

End to end: a one-process tiny run writes checkpoint-2 and checkpoint-4; the newest is then damaged
(a truncated adapter, a missing projector file) and the same command, run again, must resume from
checkpoint-2, say which file was wrong, and end with the weights of the undamaged run. The checks on
their own: a complete checkpoint folder of each kind of run, written here by hand with the files
the Trainer and DeepSpeed write, loses one file at a time and must be refused naming that file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train_e2e import ROOT, adapter_tensors, env, train_command, write_colour_dataset

from llava.train.checkpoints import CheckpointError, CheckpointLayout, checkpoint_problem, latest_complete_checkpoint
from llava.train.llava_trainer import read_tensors


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_base) -> tuple[Path, list[str]]:
    """Four steps with a checkpoint every two (kept: the last two); returns the folder and the command."""
    root = tmp_path_factory.mktemp("resume")
    data = write_colour_dataset(root / "data", n_images=12, n_text=4)
    out = root / "run"
    flags = ("--max_steps", "4", "--save_steps", "2", "--save_total_limit", "2")
    result = rerun(train_command(tiny_base, data, out, *flags), out)
    assert result.returncode == 0, result.stderr[-5000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return out, train_command(tiny_base, data, out, *flags)


def rerun(cmd: list[str], out: Path) -> subprocess.CompletedProcess:
    """``cmd`` with its output folder replaced by ``out``."""
    cmd = [str(out) if prev == "--output_dir" else arg for prev, arg in zip(["", *cmd], cmd)]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def assert_same_final_weights(out: Path, reference: Path) -> None:
    resumed, uninterrupted = adapter_tensors(out), adapter_tensors(reference)
    assert sorted(resumed) == sorted(uninterrupted)
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_the_previous(first_run, tmp_path) -> None:
    run, cmd = first_run
    out = copy_of(run, tmp_path)
    damaged = out / "checkpoint-4" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = rerun(cmd, out)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"Not resuming from {out / 'checkpoint-4'}: {damaged} is truncated" in result.stderr
    assert f"Resuming from {out / 'checkpoint-2'}" in result.stderr
    # Moved aside, out of the rotation's reach; the run wrote checkpoint-4 again, whole.
    assert (out / "damaged-checkpoint-4" / "adapter_model.safetensors").stat().st_size == 100
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert_same_final_weights(out, run)


@pytest.mark.slow
def test_checkpoint_without_projector_is_not_resumed_and_an_old_bin_projector_is_read(first_run, tmp_path) -> None:
    run, cmd = first_run
    out = copy_of(run, tmp_path)
    missing = out / "checkpoint-4" / "non_lora_trainables.safetensors"
    missing.unlink()
    # checkpoint-2's projector as runs before the safetensors file wrote it.
    older = out / "checkpoint-2" / "non_lora_trainables.safetensors"
    torch.save(load_file(str(older)), older.with_suffix(".bin"))
    older.unlink()
    result = rerun(cmd, out)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"Not resuming from {out / 'checkpoint-4'}: {missing} is missing" in result.stderr
    assert f"Restored 4 projector tensors from {older.with_suffix('.bin')}" in result.stderr
    # Equal final weights: the projector of step 2 was restored, not the initial one.
    assert_same_final_weights(out, run)


def write_complete(folder: Path, layout: CheckpointLayout, zero_stage: int = 3) -> list[str]:
    """A checkpoint folder with every file the Trainer (and DeepSpeed) write for ``layout``; returns their names."""
    tensors = {"w": torch.zeros(2)}
    names = ["trainer_state.json"]
    if layout.weights == "adapter":
        names += ["adapter_config.json", "adapter_model.safetensors", "config.json"]
        names += ["non_lora_trainables.safetensors"] if layout.non_lora_trainables else []
    elif layout.weights == "projector":
        names += ["mm_projector.bin", "config.json"]
    elif not layout.deepspeed:
        names += ["model.safetensors"]
    if layout.deepspeed:
        ranks = range(layout.world_size)
        names += ["latest"]
        if zero_stage == 3:  # ZeRO-3 keeps each rank's slice of the weights; ZeRO-1/2 one file for all
            names += [f"global_step4/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks]
        else:
            names += ["global_step4/mp_rank_00_model_states.pt"]
        names += [f"global_step4/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks]
    else:
        names += ["optimizer.pt"]
    names += ["scheduler.pt"]
    names += ["rng_state.pth"] if layout.world_size == 1 else [f"rng_state_{r}.pth" for r in range(layout.world_size)]
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "latest":
            path.write_text("global_step4")
        elif name.endswith(".json"):
            path.write_text(json.dumps({"global_step": 4}))
        elif name.endswith(".safetensors"):
            save_file(tensors, str(path))
        else:
            torch.save(tensors, path)
    return names


LAYOUTS = {
    "dora": CheckpointLayout(weights="adapter", non_lora_trainables=True, deepspeed=False, world_size=1),
    "dora_zero3_2_ranks": CheckpointLayout(weights="adapter", non_lora_trainables=True, deepspeed=True, world_size=2),
    "stage1": CheckpointLayout(weights="projector", non_lora_trainables=False, deepspeed=False, world_size=1),
    "stage1_zero2_2_ranks": CheckpointLayout(weights="projector", non_lora_trainables=False, deepspeed=True, world_size=2),
    "full": CheckpointLayout(weights="full", non_lora_trainables=False, deepspeed=False, world_size=1),
    "full_zero3_2_ranks": CheckpointLayout(weights="full", non_lora_trainables=False, deepspeed=True, world_size=2),
}


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_each_file_a_resume_reads_is_required(tmp_path, kind: str) -> None:
    layout = LAYOUTS[kind]
    names = write_complete(tmp_path / "complete", layout, zero_stage=2 if "zero2" in kind else 3)
    assert checkpoint_problem(tmp_path / "complete", layout) is None
    for i, name in enumerate(names):
        folder = tmp_path / f"without_{i}"
        shutil.copytree(tmp_path / "complete", folder)
        (folder / name).unlink()
        problem = checkpoint_problem(folder, layout)
        assert problem is not None and str(folder / name) in problem, (name, problem)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "non_lora_trainables.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_cut_file_is_named(tmp_path, name: str) -> None:
    layout = LAYOUTS["dora"]
    write_complete(tmp_path, layout)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-3])
    problem = checkpoint_problem(tmp_path, layout)
    assert problem is not None and str(path) in problem, problem


def test_deepspeed_checkpoint_of_another_world_size_is_refused(tmp_path) -> None:
    write_complete(tmp_path, LAYOUTS["dora_zero3_2_ranks"])
    four_ranks = CheckpointLayout(weights="adapter", non_lora_trainables=True, deepspeed=True, world_size=4)
    problem = checkpoint_problem(tmp_path, four_ranks)
    assert problem is not None and str(tmp_path / "global_step4" / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt") + " is missing" in problem


def test_no_complete_checkpoint_to_fall_back_on_names_the_file(tmp_path) -> None:
    layout = LAYOUTS["dora"]
    for step in (2, 4):
        write_complete(tmp_path / f"checkpoint-{step}", layout)
    (tmp_path / "checkpoint-2" / "rng_state.pth").unlink()
    cut = tmp_path / "checkpoint-4" / "non_lora_trainables.safetensors"
    cut.write_bytes(cut.read_bytes()[:10])
    with pytest.raises(CheckpointError) as error:
        latest_complete_checkpoint(tmp_path, layout, move_damaged=True)
    assert f"Cannot resume from {tmp_path / 'checkpoint-4'}: {cut} is truncated" in str(error.value)
    assert "no earlier checkpoint" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # nothing moved


def test_fallback_moves_only_newer_damaged_checkpoints_aside(tmp_path) -> None:
    layout = LAYOUTS["dora"]
    for step in (1, 2, 4, 6):
        write_complete(tmp_path / f"checkpoint-{step}", layout)
    (tmp_path / "checkpoint-1" / "optimizer.pt").unlink()
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-6" / "adapter_model.safetensors").unlink()
    assert latest_complete_checkpoint(tmp_path, layout, move_damaged=True) == str(tmp_path / "checkpoint-2")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-1", "checkpoint-2", "damaged-checkpoint-4", "damaged-checkpoint-6"]


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_reading_a_cut_tensor_file_names_it(tmp_path, suffix: str) -> None:
    path = tmp_path / f"non_lora_trainables{suffix}"
    tensors = {"base_model.model.model.mm_projector.0.weight": torch.ones(4, 4)}
    save_file(tensors, str(path)) if suffix == ".safetensors" else torch.save(tensors, path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match=str(path)):
        read_tensors(path)
    if suffix == ".bin":
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(path)  # what the folder check relies on: a cut torch file has no zip directory
