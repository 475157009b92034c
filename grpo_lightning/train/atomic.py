"""Writes that are whole or absent: a temporary file or directory beside the target, then a rename.

A rename within one directory is atomic on POSIX file systems, so a reader (or a resumed run) sees either
the previous file or the complete new one, however the write ends: a crash, SIGKILL, or a full disk.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _beside(path: Path, kind: str) -> Path:
    # a fresh hidden name in the same directory (a rename never crosses file systems). Not mkstemp: its
    # files are private (0600), and the renamed checkpoint or export would keep that mode.
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _fsync_dir(path: Path) -> None:
    # the rename itself lives in the directory: without this a power loss could forget it
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path (not yet created) beside ``path``; when the block ends without error it replaces ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp")
    try:
        yield tmp
        with tmp.open("rb+") as f:  # the bytes on disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; when the block ends it takes ``path``'s place.

    A previous ``path`` is moved aside first and deleted only once the new one is in place, so an
    interruption leaves the previous directory, or none (between the two renames), never half a new one.
    On an error inside the block the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = _beside(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
