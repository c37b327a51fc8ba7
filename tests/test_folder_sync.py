"""FolderSync: concurrent writers share folder fsyncs, and none returns before an fsync that began
after its own call (its rename) has ended."""

from __future__ import annotations

import threading
import time

from fedpft.shared import fsio
from fedpft.shared.fsio import FolderSync


def test_every_caller_is_covered_by_an_fsync_that_began_after_it(tmp_path, monkeypatch):
    log: list[tuple[str, float]] = []
    lock = threading.Lock()

    def slow_fsync(folder):
        with lock:
            log.append(("start", time.monotonic()))
        time.sleep(0.02)
        with lock:
            log.append(("end", time.monotonic()))

    monkeypatch.setattr(fsio, "fsync_dir", slow_fsync)
    fs = FolderSync()
    calls: list[tuple[float, float]] = []

    def writer() -> None:
        for _ in range(5):
            t0 = time.monotonic()
            fs.sync(tmp_path)
            with lock:
                calls.append((t0, time.monotonic()))

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 40
    spans = [(s, e) for (k1, s), (k2, e) in zip(log[::2], log[1::2]) if k1 == "start" and k2 == "end"]
    assert len(spans) == len(log) // 2  # fsyncs never overlap in one folder
    for called, returned in calls:
        assert any(called <= s and e <= returned for s, e in spans), "returned without an fsync that began after the call"
    assert len(spans) < 40  # shared: fewer fsyncs than calls


def test_an_fsync_error_reaches_the_caller_and_the_next_caller_retries(tmp_path, monkeypatch):
    fails = [True]

    def flaky(folder):
        if fails.pop(0) if fails else False:
            raise OSError(5, "I/O error")

    monkeypatch.setattr(fsio, "fsync_dir", flaky)
    fs = FolderSync()
    try:
        fs.sync(tmp_path)
        raise AssertionError("the error was swallowed")
    except OSError:
        pass
    fs.sync(tmp_path)  # a later write is made durable by its own fsync
