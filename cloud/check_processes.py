"""Update checks in processes of their own (`serve --check-processes N`, issue 13).

The thread pool of cloud/checks.py shares the cloud's one GIL with the MQTT network thread and
the round loop: on a 16-core machine a 1,000-device round got slower with more cores for the
cloud (BENCHMARKS.md scale, session 11). Here each complete upload goes, over a pipe, to one of N
spawned processes, which does what a check thread does - check it (`check_update`), write it
durably (`RunStore.write_update`), measure its change and fold it into the round's running sum -
except that the sum it folds into is its own partial sum. The loop's share of an update is then
its MQTT receipt, the pipe write and the ack.

What stays exactly as with threads:
- An update is acked only once it is on disk: the process replies after its fsync, and the loop
  counts and acks on that reply.
- `--resume` is exact: the cloud persists one running sum, the loop's own (what it restored)
  plus every process's partial sum, each fetched in pipe order, so each names exactly the devices
  it holds; the saver thread merges them (`RoundFold.merge`) and writes the one file it always has.
- At the round's end the loop waits for the checks in flight (as with threads), then fetches and
  merges the partial sums before it aggregates.
- A check process that dies (killed, out of memory) stops the cloud with one line, as a full disk
  does: every update it had accepted is on disk, so `--resume` refolds them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from pathlib import Path

from fedpft.shared.allocator import reuse_large_buffers
from fedpft.shared.codec import decode_tensors, encode_tensors

from .checks import EventQueue
from .fold import Contribution, RoundFold
from .state import RunStore
from .uploads import UpdateLimits, Verdict, check_update

log = logging.getLogger("fedpft.serve")

# How long the loop waits for the processes' partial sums. They answer after the checks queued
# before the request: at the round's end none is (the loop waits for the checks first), mid-round a
# backlog of a few hundred 3 ms checks.
PARTIAL_TIMEOUT = 300.0


class CheckProcessDied(RuntimeError):
    """A check process exited: what it had accepted is on disk, what it had folded is lost with it."""

    def __init__(self, why: str):
        super().__init__(f"{why}; the updates it accepted are on disk: restart the run with --resume")


# Checks one process runs at once. Its durable writes are what a check waits on: one fsynced file
# and a folder fsync each, 7.4 ms per update on this project's 2-core VM when one thread writes them
# in a row, 1.3 ms with 4 threads and 0.8 ms with 8 (the journal commits concurrent fsyncs together).
# One check at a time capped a process at ~135 updates a second, which was the 1,000-device round's
# upload-to-receipt time with 2 processes (BENCHMARKS.md scale, session 14).
PROCESS_CHECK_THREADS = 4


def _serve(conn, limits: UpdateLimits, folder: str) -> None:
    """A check process: requests read in pipe order; checks run on a few threads of its own (their
    fsyncs overlap), and every other request waits for the checks read before it, so a partial sum
    names exactly the updates sent to this process before the request (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the cloud's to handle; the pipe's EOF ends us
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # as the CLI's
    reuse_large_buffers()  # as the cloud's own process: each 0.6 MB payload read from the pipe reuses memory, not fresh zeroed pages
    store = RunStore(Path(folder))
    folds: dict[int, RoundFold] = {}
    pool = ThreadPoolExecutor(PROCESS_CHECK_THREADS, thread_name_prefix="fedpft-check-proc")
    # at most this many checks read and not yet answered: past it the pipe fills and the cloud's
    # sender waits, as it did for one check at a time (the backlog stays in the cloud, counted
    # against its upload buffer, not here)
    slots = threading.BoundedSemaphore(2 * PROCESS_CHECK_THREADS)
    in_flight: set[Future] = set()
    sending = threading.Lock()

    def send(reply: tuple) -> None:
        with sending:
            conn.send(reply)

    def check(job: int, fold: RoundFold, msg, task_id: str, digest: str | None, declared: int | None, data: bytes) -> None:
        try:
            v = check_update(msg, data, task_id, digest, limits)
            rel = c = None
            if v.kind == "accept":
                # on disk before it is folded and answered: an update is acked only once it is durable
                rel = store.write_update(msg.round_id, msg.device_id, data, v.digest)
                c = asdict(fold.take(msg.device_id, v.adapters, v.stats, msg.num_samples, msg.mean_loss, declared, msg.update_id))
            reply = ("checked", job, v.kind, v.reason, c, rel, v.digest)
        except Exception as exc:  # noqa: BLE001 - reported to the loop, which stops the cloud as a thread's error would
            reply = ("error", job, f"{type(exc).__name__}: {exc}")
        try:
            send(reply)
        except (OSError, ValueError):
            pass  # the cloud is gone: the reading loop ends at the pipe's EOF
        except BaseException as exc:  # noqa: BLE001 - a verdict never sent would leave its round waiting forever
            try:
                send(("error", job, f"its verdict could not be sent: {type(exc).__name__}: {exc}"))
            except BaseException:  # noqa: BLE001
                os._exit(1)  # the cloud then sees the pipe's EOF and fails all it waits for on this process
        finally:
            slots.release()

    def settle() -> None:
        """Until every check read so far has been answered."""
        wait(list(in_flight))
        in_flight.clear()

    send(("ready",))
    try:
        while True:
            try:
                req = conn.recv()
            except (EOFError, OSError):
                return  # the cloud is gone (or closed us)
            kind = req[0]
            if kind == "stop":
                settle()
                return
            try:
                if kind == "check":
                    _, job, fid, msg, task_id, digest, declared = req
                    data = conn.recv_bytes()  # first, whatever follows: the pipe stays in step
                    fold = folds[fid]
                    slots.acquire()
                    try:
                        fut = pool.submit(check, job, fold, msg, task_id, digest, declared, data)
                    except BaseException:
                        slots.release()
                        raise
                    in_flight.add(fut)
                    fut.add_done_callback(in_flight.discard)
                    continue
                settle()
                if kind == "fold":
                    _, fid, label, reference, max_client_samples = req
                    folds[fid] = RoundFold(decode_tensors(reference)[0], max_client_samples, label)
                elif kind == "partial":
                    _, fid, drop = req
                    fold = folds.get(fid)
                    send(("partial", fid, fold.to_bytes() if fold is not None and fold.folded else None))
                    if drop:
                        _drop(folds, fid)
                elif kind == "drop":
                    _drop(folds, req[1])
            except Exception as exc:  # noqa: BLE001 - reported to the loop, which stops the cloud as a thread's error would
                job = req[1] if kind == "check" else None
                send(("error", job, f"{type(exc).__name__}: {exc}"))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _drop(folds: dict[int, RoundFold], fid: int) -> None:
    """A round is over: its fold and every earlier one (attempts that missed quorum, skipped rounds) go."""
    for k in [k for k in folds if k <= fid]:
        del folds[k]


class _Worker:
    """One check process, its pipe, and the two threads that keep the loop from ever blocking on it:
    a sender (a pipe write of 0.6 MB waits while the process is busy) and a reader.

    Every job and partial-sum request is registered and queued under `_lock`, after a check that the
    process is alive; `_died` marks it dead and fails what it holds under the same lock. So nothing
    the loop waits for is ever left unanswered, whenever the process dies."""

    def __init__(self, ctx, k: int, limits: UpdateLimits, folder: Path, owner: "CheckProcesses"):
        self.k, self.owner = k, owner
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child, limits, str(folder)), name=f"fedpft-check-{k}", daemon=True)
        self.proc.start()
        child.close()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # (request,) or (request, bytes); None ends the sender
        self.folds: set[int] = set()  # the fold ids this process has been given
        self.in_flight: dict[int, tuple] = {}  # job -> what the loop needs back with its verdict
        self.partials: list[Future] = []  # partial sums asked for, in pipe order
        self.dead: str | None = None
        self.ready = threading.Event()  # set once the process has started (or has died)
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._send, name=f"fedpft-check-{k}-send", daemon=True),
                        threading.Thread(target=self._read, name=f"fedpft-check-{k}-read", daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        while (item := self.outbox.get()) is not None:
            try:
                self.conn.send(item[0])
                if len(item) > 1:
                    self.conn.send_bytes(item[1])
            except BaseException as exc:  # noqa: BLE001 - a pipe we cannot write is a process we cannot use
                self._died(f"check process {self.k} (pid {self.proc.pid}): cannot send to it ({type(exc).__name__}: {exc})")
                return

    def _read(self) -> None:
        try:
            self._replies()
        except BaseException as exc:  # noqa: BLE001 - a reader that stops silently would leave the loop waiting forever
            self._died(f"check process {self.k} (pid {self.proc.pid}): unreadable reply ({type(exc).__name__}: {exc})")

    def _replies(self) -> None:
        while True:
            try:
                reply = self.conn.recv()
            except (EOFError, OSError):
                self._died(f"check process {self.k} (pid {self.proc.pid}) exited")
                return
            if reply[0] == "ready":
                self.ready.set()
            elif reply[0] == "checked":
                self.owner._checked(self, *reply[1:])
            elif reply[0] == "partial":
                with self._lock:
                    fut = self.partials.pop(0) if self.partials else None
                if fut is not None:
                    fut.set_result(reply[2])
            elif reply[1] is not None:  # ("error", job, text): that check failed (e.g. the disk), as a thread's would
                self.owner._failed(self, reply[1], f"check process {self.k}: {reply[2]}")
            else:  # a fold or partial-sum request failed: this process's sums cannot be trusted
                self._died(f"check process {self.k}: {reply[2]}")
                return

    def _died(self, why: str) -> None:
        with self._lock:
            first = self.dead is None
            self.dead = self.dead or why
            jobs, futs, self.partials = list(self.in_flight), self.partials, []
        try:
            if first and self.proc.is_alive():
                self.proc.terminate()  # its pipe is no longer in step with us; the reader then ends too
        except ValueError:
            pass  # already closed by CheckProcesses.close
        self.ready.set()
        for j in jobs:
            self.owner._failed(self, j, why)
        for f in futs:
            f.set_exception(CheckProcessDied(why))
        if first:
            self.owner._lost(why)

    def request(self, msg: tuple, data=None, job: tuple[int, tuple] | None = None, fut: Future | None = None) -> bool:
        """Queue one request (with its job or partial-sum future registered); False if the process is dead."""
        with self._lock:
            if self.dead is not None:
                return False
            if job is not None:
                self.in_flight[job[0]] = job[1]
            if fut is not None:
                self.partials.append(fut)
            self.outbox.put((msg,) if data is None else (msg, data))
            return True


class CheckProcesses:
    """The check processes of one cloud, used by the loop as it uses the check thread pool."""

    def __init__(self, n: int, limits: UpdateLimits, store: RunStore, events: EventQueue):
        self.store, self.events = store, events
        self.closing = False
        ctx = mp.get_context("spawn")  # the cloud has threads (paho's) by now: fork would copy their locks
        self.workers: list[_Worker] = []
        try:
            for k in range(n):
                self.workers.append(_Worker(ctx, k, limits, store.folder, self))
        except BaseException:
            self.close()  # the ones already started
            raise
        self._folds = 0
        self._jobs = 0

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every process has started (its imports: ~0.9 CPU-s each), so that round 0 does not pay for it."""
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.ready.wait(max(0.0, deadline - time.monotonic()))

    def _fid(self, fold: RoundFold) -> int:
        """The number the processes know `fold` by: increasing, so "this one and every earlier one"
        names a round's attempts."""
        fid = getattr(fold, "check_fid", None)
        if fid is None:
            self._folds += 1
            fid = fold.check_fid = self._folds
        return fid

    def submit(self, v: Verdict, task_id: str, fold: RoundFold, declared: int | None, tracker) -> None:
        """Check `v`'s blob on the least busy live process; its verdict comes back as a "checked" event."""
        self.events.begin()
        fid, msg = self._fid(fold), v.msg
        given: tuple | None = None
        while True:
            live = [w for w in self.workers if w.dead is None]
            if not live:
                why = next((w.dead for w in self.workers if w.dead), "no check process")
                self.events.finish("checked", ("error", CheckProcessDied(why)))
                return
            w = min(live, key=lambda w: len(w.in_flight))
            if fid not in w.folds:
                given = given or ("fold", fid, fold.label, encode_tensors(fold.reference), fold.max_client_samples)
                if not w.request(given):
                    continue
                w.folds.add(fid)
            self._jobs += 1
            if w.request(("check", self._jobs, fid, msg, task_id, v.digest, declared), v.data, job=(self._jobs, (msg, fold, tracker))):
                return

    def partials(self, fold: RoundFold, drop: bool = False) -> list[Future]:
        """Each process's partial sum of `fold` (bytes, or None if it folded nothing), in pipe order:
        after every check sent to it before. `drop`: the round is over, every process forgets it
        and any earlier fold it still holds."""
        fid = self._fid(fold)
        futs = []
        for w in self.workers:
            if fid in w.folds:
                fut: Future = Future()
                if not w.request(("partial", fid, drop), fut=fut):
                    fut.set_exception(CheckProcessDied(w.dead or "check process gone"))
                futs.append(fut)
            elif drop and any(f <= fid for f in w.folds):
                w.request(("drop", fid))
            if drop:
                w.folds -= {f for f in w.folds if f <= fid}
        return futs

    def merge_into(self, fold: RoundFold, futs: list[Future], timeout: float = PARTIAL_TIMEOUT) -> None:
        """Merge the partial sums `futs` (from `partials`) into `fold`, waiting at most `timeout` for all."""
        deadline = time.monotonic() + timeout
        for fut in futs:
            try:
                data = fut.result(max(0.0, deadline - time.monotonic()))
            except (FutureTimeout, TimeoutError):  # the same class from Python 3.11 on, not on 3.10
                raise CheckProcessDied(f"the check processes did not return their partial sums within {timeout:.0f}s") from None
            if data is not None:
                fold.merge(data)

    def gather(self, fold: RoundFold, timeout: float = PARTIAL_TIMEOUT) -> None:
        """Merge every process's partial sum of `fold` into it (the round's end: no check in flight)."""
        self.merge_into(fold, self.partials(fold, drop=True), timeout)

    # -- from the sender and reader threads
    def _checked(self, w: _Worker, job: int, kind: str, reason: str | None, contribution: dict | None, rel: str | None,
                 digest: str | None) -> None:
        with w._lock:
            entry = w.in_flight.pop(job, None)
        if entry is None:
            return
        msg, fold, tracker = entry
        try:
            v = Verdict(msg, kind, reason, digest=digest)
            if kind == "accept":
                self.store.record_update(msg.round_id, msg.device_id, rel, digest)
                v.contribution = Contribution(**contribution)
            outcome = ("ok", (v, fold, tracker))
        except Exception as exc:  # noqa: BLE001 - raised on the loop, as a check thread's error is
            outcome = ("error", exc)
        self.events.finish("checked", outcome)

    def _failed(self, w: _Worker, job: int, why: str) -> None:
        with w._lock:
            entry = w.in_flight.pop(job, None)
        if entry is not None:
            self.events.finish("checked", ("error", CheckProcessDied(why)))

    def _lost(self, why: str) -> None:
        """A process died: what it had folded is gone, so the cloud stops now (with nothing in
        flight on it, the loop would hear of it only at the round's end)."""
        if not self.closing:
            self.events.begin()
            self.events.finish("checked", ("error", CheckProcessDied(why)))

    def close(self, timeout: float = 5.0) -> None:
        """Stop every process (asked, then SIGTERM, then SIGKILL: a process stuck in an fsync or
        stopped must not hold the cloud's exit), fail whatever still waits on one, and release their
        threads and pipes; within about `timeout` seconds in all. Safe to call twice."""
        if self.closing:
            return
        self.closing = True
        for w in self.workers:
            w.request(("stop",))
            w.outbox.put(None)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            for stop in (w.proc.terminate, w.proc.kill):
                if w.proc.is_alive():
                    stop()
                    w.proc.join(1.0)
            w._died(f"check process {w.k} closed")  # answers a save still waiting for its partial sum
        for w in self.workers:
            for t in w.threads:  # the reader ends at its pipe's EOF, now that the process is gone
                t.join(max(0.1, deadline - time.monotonic()))
            w.conn.close()
            if not w.proc.is_alive():
                w.proc.close()  # its sentinel fd
