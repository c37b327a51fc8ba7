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
import queue
import signal
import threading
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path

from fedpft.shared.codec import decode_tensors, encode_tensors

from .checks import EventQueue
from .fold import Contribution, RoundFold
from .state import RunStore
from .uploads import UpdateLimits, Verdict, check_update

log = logging.getLogger("fedpft.serve")


class CheckProcessDied(RuntimeError):
    """A check process exited: what it had accepted is on disk, what it had folded is lost with it."""

    def __init__(self, why: str):
        super().__init__(f"{why}; the updates it accepted are on disk: restart the run with --resume")


def _serve(conn, limits: UpdateLimits, folder: str) -> None:
    """A check process: requests in pipe order, one at a time (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the cloud's to handle; the pipe's EOF ends us
    store = RunStore(Path(folder))
    folds: dict[int, RoundFold] = {}
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return  # the cloud is gone (or closed us)
        kind = req[0]
        if kind == "stop":
            return
        try:
            if kind == "fold":
                _, fid, label, reference, max_client_samples = req
                folds[fid] = RoundFold(decode_tensors(reference)[0], max_client_samples, label)
            elif kind == "check":
                _, job, fid, msg, task_id, digest, declared = req
                data = conn.recv_bytes()
                v = check_update(msg, data, task_id, digest, limits)
                rel = c = None
                if v.kind == "accept":
                    rel = store.write_update(msg.round_id, msg.device_id, data, v.digest)
                    c = asdict(folds[fid].take(msg.device_id, v.adapters, v.stats, msg.num_samples, msg.mean_loss, declared,
                                               msg.update_id))
                conn.send(("checked", job, v.kind, v.reason, c, rel, v.digest))
            elif kind == "partial":
                _, fid, drop = req
                fold = folds.get(fid)
                conn.send(("partial", fid, fold.to_bytes() if fold is not None and fold.folded else None))
                if drop:  # this fold's and every earlier one's (an attempt that missed quorum) are done
                    for k in [k for k in folds if k <= fid]:
                        del folds[k]
        except Exception as exc:  # noqa: BLE001 - reported to the loop, which stops the cloud as a thread's error would
            job = req[1] if kind == "check" else None
            conn.send(("error", job, f"{type(exc).__name__}: {exc}"))


class _Worker:
    """One check process, its pipe, and the two threads that keep the loop from ever blocking on it:
    a sender (a pipe write of 0.6 MB waits while the process is busy) and a reader."""

    def __init__(self, ctx, k: int, limits: UpdateLimits, folder: Path, owner: "CheckProcesses"):
        self.k, self.owner = k, owner
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child, limits, str(folder)), name=f"fedpft-check-{k}", daemon=True)
        self.proc.start()
        child.close()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.folds: set[int] = set()  # the fold ids this process has been given
        self.in_flight: dict[int, tuple] = {}  # job -> what the loop needs back with its verdict
        self.partials: list[Future] = []  # partial sums asked for, in pipe order
        self.dead: str | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._send, name=f"fedpft-check-{k}-send", daemon=True).start()
        threading.Thread(target=self._read, name=f"fedpft-check-{k}-read", daemon=True).start()

    def _send(self) -> None:
        while True:
            item = self.outbox.get()
            if item is None:
                return
            try:
                self.conn.send(item[0])
                if len(item) > 1:
                    self.conn.send_bytes(item[1])
            except (OSError, ValueError):
                return  # the reader sees the process gone and fails what it had

    def _read(self) -> None:
        while True:
            try:
                reply = self.conn.recv()
            except (EOFError, OSError):
                self._died(f"check process {self.k} (pid {self.proc.pid}) exited")
                return
            if reply[0] == "checked":
                self.owner._checked(self, *reply[1:])
            elif reply[0] == "partial":
                with self._lock:
                    fut = self.partials.pop(0)
                fut.set_result(reply[2])
            else:  # ("error", job, text): a fault of the process, not of the update
                self._died(f"check process {self.k}: {reply[2]}", job=reply[1])
                if reply[1] is None:  # a partial sum's request failed: its fold cannot be trusted
                    return

    def _died(self, why: str, job: int | None = None) -> None:
        with self._lock:
            if job is None:
                self.dead = why
                jobs, futs, self.partials = list(self.in_flight), self.partials, []
            else:
                jobs, futs = [job], []
        for j in jobs:
            self.owner._failed(self, j, why)
        for f in futs:
            f.set_exception(CheckProcessDied(why))

    def put(self, *item) -> None:
        self.outbox.put(item)


class CheckProcesses:
    """The check processes of one cloud, used by the loop as it uses the check thread pool."""

    def __init__(self, n: int, limits: UpdateLimits, store: RunStore, events: EventQueue):
        self.store, self.events = store, events
        ctx = mp.get_context("spawn")  # the cloud has threads (paho's) by now: fork would copy their locks
        self.workers = [_Worker(ctx, k, limits, store.folder, self) for k in range(n)]
        self._folds = 0
        self._jobs = 0

    def _fid(self, fold: RoundFold) -> int:
        """The number the processes know `fold` by: increasing, so "this one and every earlier one"
        names a round's attempts."""
        fid = getattr(fold, "check_fid", None)
        if fid is None:
            self._folds += 1
            fid = fold.check_fid = self._folds
        return fid

    def submit(self, v: Verdict, task_id: str, fold: RoundFold, declared: int | None, tracker) -> None:
        """Check `v`'s blob on the least busy process; its verdict comes back as a "checked" event."""
        w = min((w for w in self.workers if w.dead is None), key=lambda w: len(w.in_flight), default=None)
        self.events.begin()
        if w is None:
            self.events.finish("checked", ("error", CheckProcessDied(self.workers[0].dead or "no check process")))
            return
        fid, msg = self._fid(fold), v.msg
        if fid not in w.folds:
            w.folds.add(fid)
            w.put(("fold", fid, fold.label, encode_tensors(fold.reference), fold.max_client_samples))
        self._jobs += 1
        with w._lock:
            w.in_flight[self._jobs] = (msg, fold, tracker)
        w.put(("check", self._jobs, fid, msg, task_id, v.digest, declared), v.data)

    def partials(self, fold: RoundFold, drop: bool = False) -> list[Future]:
        """Each process's partial sum of `fold` (bytes, or None if it folded nothing), in pipe order:
        after every check sent to it before. `drop`: the round is over, the processes forget it."""
        fid = self._fid(fold)
        futs = []
        for w in self.workers:
            if fid not in w.folds:
                continue
            fut: Future = Future()
            with w._lock:
                if w.dead is not None:
                    fut.set_exception(CheckProcessDied(w.dead))
                else:
                    w.partials.append(fut)
                    w.put(("partial", fid, drop))
            futs.append(fut)
            if drop:
                w.folds -= {f for f in w.folds if f <= fid}
        return futs

    def gather(self, fold: RoundFold, timeout: float = 600.0) -> None:
        """Merge every process's partial sum of `fold` into it (the round's end: no check in flight)."""
        for fut in self.partials(fold, drop=True):
            data = fut.result(timeout)
            if data is not None:
                fold.merge(data)

    # -- from the reader threads
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

    def close(self) -> None:
        for w in self.workers:
            w.put(("stop",))
            w.put(None)
        for w in self.workers:
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.terminate()
            w.conn.close()
