"""Folders that a script replaces whole (merged and converted models): refused when that would lose data."""

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
