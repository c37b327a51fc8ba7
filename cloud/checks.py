"""Update checks off the round loop's critical path (issue 13).

A complete upload is checked (sha256, decode, binding, shapes, finite values), written durably
(one fsynced file named by its sha256), then measured (its change norm) and folded into the round's
running sum (`RoundFold.take`) by a small thread pool; the result comes back to the loop as an
event, and only then does the loop count it and ack it. So "nothing accepted is ever lost" holds as
before: an update is acked only once it is on disk.
The loop waits for the checks in flight before it closes a round, so an update received before
the deadline counts even when its check ends after it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, ThreadPoolExecutor

# Durable writes dominate a check and fsync releases the GIL: on this project's 2-core VM, 400
# updates of 0.62 MB (two atomic writes each) took 5.8 s on 1 thread, 1.7 s on 2, 0.63 s on 8 and
# 0.69 s on 16 (the journal commits concurrent fsyncs together). But the checks' Python work
# contends for the GIL, and each worker more is more hand-offs: a 1,000-device round (scale.py
# --fleet shared-link, session 9) made 45-48k context switches with 2 workers, 66-68k with 4 and
# 114-127k with 8, and the round's overhead was 8.7-10.1 s, 7.2-8.3 s and 9.6-10.3 s.
CHECK_WORKERS = 4
# An update whose check has not ended this many seconds after it arrived gets a "queued" receipt:
# well inside a device's default 30 s receipt timeout, so a backlog does not bring every waiting
# device's 0.6 MB back as a re-upload (5,000 devices made 4,937 of them, BENCHMARKS.md scale).
QUEUED_RECEIPT_AFTER = 10.0
# What a "busy" receipt asks a device turned away by a full upload buffer to wait before uploading
# again (it adds up to as much again at random): a few checks' worth of a backlog, not a receipt
# timeout (30 s, doubling: 5,000 devices against a 1 GiB buffer took 153 s that way, BENCHMARKS.md scale).
BUSY_RETRY_AFTER = 2.0


# `serve --check-processes` when not given, on a machine where the cloud may use 2 or more cores. On 2
# cores shared with a simulated 1,000-device fleet, 2 processes made the round 3.26 s longer than the
# slowest device at the median of 5 alternating runs against 4.93 s with threads, in 243-263 MB of
# peak RSS summed against 354-399 MB (BENCHMARKS.md scale, session 14). On one core they would only
# add pipe copies to the same CPU.
DEFAULT_CHECK_PROCESSES = 2


def default_check_processes() -> int:
    """--check-processes' default: DEFAULT_CHECK_PROCESSES where this process may run on 2 or more
    CPUs (its affinity, so `taskset -c 0` counts as one), else 0 (check threads)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return DEFAULT_CHECK_PROCESSES if cpus >= 2 else 0


def check_pool(workers: int = CHECK_WORKERS) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="fedpft-check")


class EventQueue(queue.Queue):
    """The loop's events, counting those a worker is still preparing: `empty()` is False until a
    submitted job's result is queued, so draining until empty also waits for the checks."""

    def __init__(self) -> None:
        super().__init__()
        self._jobs = threading.Lock()
        self.in_flight = 0

    def empty(self) -> bool:
        with self._jobs:
            busy = self.in_flight
        return busy == 0 and super().empty()

    def submit(self, pool: Executor, tag: str, fn: Callable, *args) -> None:
        """Run fn(*args) on `pool`; its outcome is queued as (tag, ("ok", result) | ("error", exception))."""
        self.begin()

        def job() -> None:
            try:
                outcome = ("ok", fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it as a sync call would
                outcome = ("error", exc)
            self.finish(tag, outcome)

        # a check cancelled when the run stops (Federation.close) still ends its count
        pool.submit(job).add_done_callback(lambda f: f.cancelled() and self.finish(tag, ("error", CancelledError())))

    def begin(self) -> None:
        """A job whose outcome `finish` will queue (check threads, check processes)."""
        with self._jobs:
            self.in_flight += 1

    def finish(self, tag: str, outcome: tuple) -> None:
        try:
            self.put((tag, outcome))
        finally:
            with self._jobs:
                self.in_flight -= 1
