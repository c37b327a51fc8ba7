"""Files that are either wholly the old bytes or wholly the new after a crash."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path


def atomic_write(path: Path | str, data: bytes, mode: int = 0o666, sync_folder: bool = True) -> None:
    """Write `data` to `path` through a temp file in the same folder: fsync the file, rename it
    over `path`, fsync the folder (without the last step the rename itself may not survive a
    power cut). `mode` is subject to the umask, as for open(); 0o600 keeps a secret private
    from the first byte. `sync_folder=False` leaves the folder's fsync to the caller (a
    `FolderSync` shared by many writers)."""
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
    if sync_folder:
        fsync_dir(path.parent)


class FolderSync:
    """Group commit of renames: a writer calls `sync(folder)` after its rename and returns once a
    folder fsync that began after that rename has ended. Concurrent writers share one fsync
    instead of queueing one each (the round's updates land in one folder, from a pool of writers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._asked: dict[str, int] = {}  # folder -> number of the latest request
        self._done: dict[str, int] = {}  # folder -> every request up to this one is durable
        self._running: set[str] = set()

    def sync(self, folder: Path | str) -> None:
        key = os.fspath(folder)
        with self._cond:
            mine = self._asked[key] = self._asked.get(key, 0) + 1
            while self._done.get(key, 0) < mine:
                if key in self._running:
                    self._cond.wait()
                    continue
                self._running.add(key)
                covers = self._asked[key]  # every rename asked for so far happened before this fsync
                self._cond.release()
                try:
                    fsync_dir(key)
                finally:
                    self._cond.acquire()
                    self._running.discard(key)
                    self._cond.notify_all()
                self._done[key] = max(self._done.get(key, 0), covers)


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
