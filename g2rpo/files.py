"""Writes that a kill cannot leave half done.

A file that a run resumes from (a checkpoint) or that its results are read from (an evaluation's JSON, the
exported policy's directory) is written beside its final name and renamed over it: ``rename`` within one directory is
atomic on POSIX filesystems, so at every moment the name holds either the old complete file or the new one.
The temporary file lives in the target's own directory, never in ``$TMPDIR``: across filesystems a
"move" is a copy, and a kill during the copy leaves the target truncated (Lightning's fsspec writer does
that). A failed write raises, naming the file; nothing here catches it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PARTIAL = ".partial"  # the suffix of a write in progress; a kill leaves it, the next write ignores it


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a new file beside ``path``, flush it to disk, and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    # os.open applies the umask to 0o666, as a plain open() would (mkstemp would make the file 0o600)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _sync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode()))


def replace_directory(source: Path, target: Path) -> None:
    """Put the complete directory ``source`` at ``target``, in place of an old one. The old one is renamed
    aside before the new one is renamed in, then removed: a kill between the renames leaves no directory at
    ``target`` but both whole beside it, never a mix of old and new files."""
    old = partial_path(target) if target.exists() else None
    if old is not None:
        target.rename(old)
    source.rename(target)
    _sync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old)


def _sync_directory(directory: Path) -> None:
    """Persist a rename (the directory entry), as the file's own fsync does not."""
    with contextlib.suppress(OSError):  # some filesystems cannot open a directory for fsync
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
