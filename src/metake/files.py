"""Files that appear whole or not at all: files and folders written beside their destination,
flushed to disk and renamed into place, so that an interrupted write never leaves a plausible
half."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk and rename it
    to ``path``: readers see the old file or the whole new one. On any error the temporary file
    is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folder itself) to disk."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_folder_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(folder)`` on a fresh temporary sibling of ``path``, then rename it to
    ``path``; an existing ``path`` is replaced only after the new folder is complete. On any
    error the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.writing-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        fsync_tree(staging)
        if path.exists():
            retired = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(retired, ignore_errors=True)
            os.rename(path, retired)
            os.rename(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def try_lock(path: str | Path) -> FileLock | None:
    """The inter-process lock at ``path``, acquired, or ``None`` when another process holds it."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock
