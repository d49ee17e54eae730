"""Output folders: replaced whole only when that loses nothing, and readable as the user's umask says."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def check_output_folder(out: Path, overwrite: bool, inputs: list[str | None]) -> None:
    """Stop before any work if writing ``out`` would delete something the user did not ask to lose.

    A folder that holds files is replaced only with ``--overwrite``, and never when it is, or holds, one of
    the ``inputs`` (the checkpoint being converted, its base): replacing it would delete the model read.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; name a new folder.")
    target = out.resolve()
    for source in inputs:
        if source and os.path.exists(source):
            source_path = Path(source).resolve()
            if source_path == target or target in source_path.parents:
                raise ValueError(f"{out} holds the input {source}: writing there would delete it; name another folder.")
    if not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (everything in it is deleted).")


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` in place of ``out`` (removing an older ``out``, allowed by ``check_output_folder``)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def umask_file_mode() -> int:
    """The mode a new file gets from ``open()`` under the process's umask (0o644 under umask 022)."""
    current = os.umask(0o077)  # reading the umask means setting it: set a strict one for the instant
    os.umask(current)
    return 0o666 & ~current


def open_safetensors_modes(folder: str | Path) -> None:
    """Give the ``.safetensors`` files in ``folder`` the mode every other file there got.

    safetensors 0.8 writes through a temporary file created 0o600 whatever the umask (safetensors issue
    782), so a checkpoint's weights, unlike its config, would be unreadable to the rest of a team. Only
    files still at 0o600 change, so a mode set on purpose stays.
    """
    mode = umask_file_mode()
    for path in Path(folder).glob("*.safetensors"):
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            path.chmod(mode)
