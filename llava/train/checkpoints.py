"""Which checkpoint a run resumes from: the newest one that holds every file the resume reads.

A long run is killed, preempted or runs out of disk sooner or later. A checkpoint folder that was
not written to the end, or that lost a file, must not be resumed from (the resume would fail half
way, or worse, go on with the initial projector or a fresh optimizer), and must not make the
rotation of ``--save_total_limit`` delete the last good one. Every check here only reads file
headers and directories, so it costs seconds even for a 7B run's optimizer states.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_WEIGHTS = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file."""


@dataclass(frozen=True)
class CheckpointLayout:
    """The files a resume of this run reads from a checkpoint folder.

    ``weights``: "adapter" (LoRA/DoRA), "projector" (stage 1, ``mm_projector.bin``) or "full".
    """

    weights: str
    non_lora_trainables: bool
    deepspeed: bool
    world_size: int
    optimizer_state: bool = True
    scheduler_file: bool = True


def layout_of(args, model) -> CheckpointLayout:
    """What this run writes in (and reads back from) each checkpoint, from its arguments and model."""
    stage1 = bool(getattr(args, "tune_mm_mlp_adapter", False))
    weights = "projector" if stage1 else "adapter" if getattr(args, "lora_enable", False) else "full"
    non_lora = any(p.requires_grad and "lora_" not in name for name, p in model.named_parameters())
    ds_config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    return CheckpointLayout(
        weights=weights,
        non_lora_trainables=weights == "adapter" and non_lora,
        deepspeed=bool(args.deepspeed),
        world_size=args.world_size,
        optimizer_state=not args.save_only_model,
        scheduler_file=not (args.deepspeed and "scheduler" in ds_config),
    )


def checkpoint_step(folder: Path) -> int | None:
    match = CHECKPOINT_PATTERN.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path} cannot be read as JSON ({error})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file ends exactly where its header says its last tensor ends."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return f"{path} is truncated (its header alone needs {header_len + 8} bytes, the file has {size})"
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path} is not a readable safetensors file ({error})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        return f"{path} is truncated or damaged: {size} bytes where its header describes {8 + header_len + end}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """``torch.save`` writes a zip archive; its directory sits at the end, so a cut file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as error:
        return f"{path} is truncated or not a torch file ({error})"
    return None


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read back, or None."""
    if not path.is_file():
        return f"{path} is missing"
    if path.suffix == ".json":
        return _json_problem(path)
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _torch_file_problem(path)
    return None


def _first_of(folder: Path, names: tuple[str, ...], what: str) -> str | None:
    """The problem of the first of ``names`` present in ``folder`` (or that none is)."""
    for name in names:
        if (folder / name).exists():
            return file_problem(folder / name)
    return f"{folder / names[0]} is missing ({what}; also looked for {', '.join(names[1:])})"


def _sharded_problem(folder: Path, index_name: str) -> str | None:
    problem = file_problem(folder / index_name)
    if problem:
        return problem
    shards = sorted(set(json.loads((folder / index_name).read_text()).get("weight_map", {}).values()))
    return next((p for p in (file_problem(folder / shard) for shard in shards) if p), None)


def _weights_problem(folder: Path, layout: CheckpointLayout) -> str | None:
    if layout.weights == "projector":
        return file_problem(folder / "mm_projector.bin") or file_problem(folder / "config.json")
    if layout.weights == "adapter":
        problem = file_problem(folder / "adapter_config.json") or _first_of(folder, ADAPTER_WEIGHTS, "the adapter weights")
        if not problem and layout.non_lora_trainables:
            problem = _first_of(folder, NON_LORA_WEIGHTS, "the projector weights")
        return problem or file_problem(folder / "config.json")
    if layout.deepspeed:
        return None  # the DeepSpeed folder holds the weights (the 16-bit model file may not be written)
    for name in FULL_WEIGHTS:
        if (folder / name).exists():
            return _sharded_problem(folder, name) if name.endswith(".index.json") else file_problem(folder / name)
    return f"{folder / FULL_WEIGHTS[0]} is missing (the model weights; also looked for {', '.join(FULL_WEIGHTS[1:])})"


def _rank_files(directory: Path, suffix: str) -> dict[int, Path]:
    found = {}
    for path in directory.glob(f"*{suffix}"):
        match = re.search(r"zero_pp_rank_(\d+)_", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _deepspeed_problem(folder: Path, layout: CheckpointLayout) -> str | None:
    """DeepSpeed's engine state: ``latest`` names the tag folder, which holds every rank's files."""
    latest = folder / "latest"
    if not latest.is_file():
        return f"{latest} is missing (DeepSpeed's pointer to its checkpoint folder)"
    tag_dir = folder / latest.read_text().strip()
    if not tag_dir.is_dir():
        return f"{tag_dir} is missing (named by {latest})"
    for suffix, what in (("optim_states.pt", "optimizer states"), ("model_states.pt", "model states")):
        files = _rank_files(tag_dir, suffix)
        if suffix == "model_states.pt" and not files:
            files = {0: tag_dir / "mp_rank_00_model_states.pt"}  # ZeRO-1/2: one file for all ranks
        elif max(files, default=-1) >= layout.world_size:
            return (f"{tag_dir} holds {what} of {max(files) + 1} ranks, this run has {layout.world_size} processes "
                    "(a DeepSpeed checkpoint resumes on as many processes as wrote it)")
        elif len(files) < layout.world_size:
            pattern = next(iter(files.values())).name if files else f"zero_pp_rank_0_mp_rank_00_{suffix}"
            rank = min(set(range(layout.world_size)) - set(files))
            missing = tag_dir / re.sub(r"zero_pp_rank_\d+_", f"zero_pp_rank_{rank}_", pattern)
            return f"{missing} is missing ({what} of {len(files)} of this run's {layout.world_size} processes found)"
        problem = next((p for p in map(file_problem, files.values()) if p), None)
        if problem:
            return problem
    return None


def _state_problem(folder: Path, layout: CheckpointLayout) -> str | None:
    if not layout.optimizer_state:
        return None
    if layout.deepspeed:
        problem = _deepspeed_problem(folder, layout)
    else:
        problem = _first_of(folder, ("optimizer.pt", "optimizer.bin"), "the optimizer state")
    if problem:
        return problem
    if layout.scheduler_file and (problem := file_problem(folder / "scheduler.pt")):
        return problem
    ranks = ["rng_state.pth"] if layout.world_size <= 1 else [f"rng_state_{i}.pth" for i in range(layout.world_size)]
    return next((p for p in (file_problem(folder / name) for name in ranks) if p), None)


def checkpoint_problem(folder: str | Path, layout: CheckpointLayout) -> str | None:
    """Why a resume cannot rely on ``folder``, naming the file; None when it holds everything.

    ``trainer_state.json`` is checked first: the Trainer writes it last, so without it the folder was
    not written to the end.
    """
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return f"{state} is missing: the checkpoint was not written to the end"
    return _json_problem(state) or _weights_problem(folder, layout) or _state_problem(folder, layout)


def require_complete(folder: str | Path, layout: CheckpointLayout) -> None:
    """Raise ``CheckpointError`` naming the file when ``folder`` cannot be resumed from."""
    problem = checkpoint_problem(folder, layout)
    if problem:
        raise CheckpointError(f"Cannot resume from {folder}: {problem}.")


def _move_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint so that neither a resume nor the rotation counts it as a checkpoint."""
    target = folder.with_name(f"damaged-{folder.name}")
    n = 1
    while target.exists():
        target = folder.with_name(f"damaged-{folder.name}.{n}")
        n += 1
    folder.rename(target)
    return target


def latest_complete_checkpoint(output_dir: str | Path, layout: CheckpointLayout, move_damaged: bool = False) -> str | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` that holds every file the resume reads.

    Newer folders that fail the check are logged with the file at fault and, with ``move_damaged``
    (the process that saves), renamed ``damaged-checkpoint-N``: the run then writes its next
    checkpoints into clean folders, and ``--save_total_limit`` never counts a damaged folder among
    the ones it keeps. Raises ``CheckpointError`` when checkpoints exist but none is complete: starting
    over silently would throw away the run's progress.
    """
    folders = sorted((step, p) for p in Path(output_dir).glob("checkpoint-*") if (step := checkpoint_step(p)) is not None)
    damaged: list[tuple[Path, str]] = []
    for _, folder in reversed(folders):
        problem = checkpoint_problem(folder, layout)
        if problem is None:
            for bad, why in damaged:
                where = f"; moved it to {_move_aside(bad).name} (delete it once you have looked at it)" if move_damaged else ""
                logger.warning("Not resuming from %s: %s%s", bad, why, where)
            return str(folder)
        damaged.append((folder, problem))
    if damaged:
        newest, why = damaged[0]
        raise CheckpointError(
            f"Cannot resume from {newest}: {why}, and no earlier checkpoint in {output_dir} is complete "
            f"({len(damaged)} checked). Move or delete the checkpoint-* folders there to start the run from the "
            "beginning, or pass --resume_from_checkpoint with a complete checkpoint."
        )
    return None
