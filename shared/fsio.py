"""Files that are either wholly the old bytes or wholly the new after a crash."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path: Path | str, data: bytes, mode: int = 0o666) -> None:
    """Write `data` to `path` through a temp file in the same folder: fsync the file, rename it
    over `path`, fsync the folder (without the last step the rename itself may not survive a
    power cut). `mode` is subject to the umask, as for open(); 0o600 keeps a secret private
    from the first byte."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique, so two writers of the same file never share (and truncate) one temp file
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path | str) -> None:
    """Make renames and unlinks in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows: folders cannot be opened, and NTFS journals renames itself
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
