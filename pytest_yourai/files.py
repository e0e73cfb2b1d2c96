"""Files the run writes besides the log: output paths checked before anything runs, and
whole-file writes that a crash cannot leave half done."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_yourai.errors import YouraiUsageError


def prepare_output(path: Path, source: str, *, directory: bool = False) -> None:
    """Make an output path usable before anything runs, the way --junitxml does: create its
    parent directories (or the directory itself), and fail now, naming the option and the
    path, when it cannot be written. Creates no file: a run that writes nothing leaves
    nothing behind."""
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise YouraiUsageError(f"{source}: {path} is a directory")
    if directory and path.exists() and not path.is_dir():
        raise YouraiUsageError(f"{source}: {path} is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise YouraiUsageError(f"{source}: cannot create {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise YouraiUsageError(f"{source}: {folder} is not writable")
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise YouraiUsageError(f"{source}: {path} is not writable")


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
