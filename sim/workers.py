"""Virtual clients that train in worker processes, one process per slot of the cores.

Why processes: the lowered training graph's Dropout nodes carry no seed attribute, so onnxruntime
draws their masks from one generator per process, which a client seeds as its round starts (from
the Task's seed and its id, as a device does). Two clients training on threads of one process draw
from that generator in turns, so their masks, and the whole run, depended on the scheduler: a
seeded run repeated only with `--virtual-parallel 1`. A worker process trains one client at a time,
so every client draws exactly the masks a device process would, and a seeded run repeats bit for
bit at any `--virtual-parallel` (tests/test_virtual_workers.py).

The agents stay on the cloud's threads (protocol, blobs, validation are theirs); only the call
`trainer(bundle_dir, task, adapters, ffn)` crosses to the process that holds the caller's slot,
and its update comes back. Each worker keeps its own `SessionPool` of one slot, so a session is
opened once per worker and bundle, as with threads. What crosses the pipe is the agent's config
and the Task as JSON, and the adapters, FFN weights and update as the safetensors bytes the wire
already carries. What a round logs in the worker (the agent's "round N: ..." line, warnings) is
sent back and logged on the calling device's thread, so it lands in that device's agent.log.

A worker that dies (killed, out of memory) fails the round it was training, as a crashed device
would; the slot's next client starts a fresh one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from fedpft.shared.config import AgentConfig
from fedpft.shared.messages import Task, decode, encode

from .pool import Slots

log = logging.getLogger("fedpft.simulate")

# how long close() waits for a worker asked to stop before it is terminated (it may be mid-round)
STOP_TIMEOUT = 5.0


class WorkerDied(RuntimeError):
    """The worker process training this client's round exited before it answered."""


def _error(kind: str, message: str) -> Exception:
    """The worker's exception as the agent would have seen it in-process: the edge's own error
    types keep their type (the agent reports them by their message alone), anything else is named."""
    from fedpft.edge.session import AdapterError, TrainError
    from fedpft.shared.manifest import BundleError
    from fedpft.shared.records import DataError

    known = {c.__name__: c for c in (AdapterError, TrainError, BundleError, DataError, ValueError, OSError)}
    return known[kind](message) if kind in known else RuntimeError(f"{kind}: {message}")


class _Captured(logging.Handler):
    """The records a round logs in the worker, to be logged again on the caller's thread."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _serve(conn, threads: int | None, providers: tuple[str, ...]) -> None:
    """A worker: train the rounds read from the pipe, one at a time, until its EOF or a stop."""
    from fedpft.edge.task_training import make_trainer

    from .pool import SessionPool

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the cloud's to handle; the pipe's EOF ends us
    # no settle: this pool has one holder at a time, the cloud's Slots already ordered the clients
    pool = SessionPool(1, threads, providers, settle=0.0)
    captured = _Captured()
    fedpft_log = logging.getLogger("fedpft")
    fedpft_log.addHandler(captured)
    fedpft_log.setLevel(logging.INFO)
    fedpft_log.propagate = False  # the caller logs them, where its handlers route them
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return  # the cloud is gone (or closed us)
        if req[0] == "stop":
            return
        _, cfg_json, bundle_dir = req
        task, adapters = conn.recv_bytes(), conn.recv_bytes()
        ffn = conn.recv_bytes() if conn.recv() else None
        captured.records = []
        try:
            cfg = AgentConfig.model_validate_json(cfg_json)
            train = make_trainer(cfg, lambda b: pool.lease(b))
            update, fields = train(Path(bundle_dir), decode(task), adapters, ffn)
        except Exception as exc:  # noqa: BLE001 - the round's failure, reported to its agent as in-process
            conn.send(("error", type(exc).__name__, str(exc), traceback.format_exc(), captured.records))
            continue
        conn.send(("ok", fields, captured.records))
        conn.send_bytes(update)


class _Worker:
    """One worker process and its pipe; used by one caller at a time (the holder of its slot)."""

    def __init__(self, ctx, k: int, threads: int | None, providers: tuple[str, ...]):
        self.k = k
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child, threads, providers), name=f"fedpft-client-{k}", daemon=True)
        self.proc.start()
        child.close()

    def train(self, cfg: AgentConfig, bundle_dir: Path, task: Task, adapters: bytes, ffn: bytes | None):
        try:
            self.conn.send(("train", cfg.model_dump_json(), str(bundle_dir)))
            self.conn.send_bytes(encode(task))
            self.conn.send_bytes(adapters)
            self.conn.send(ffn is not None)
            if ffn is not None:
                self.conn.send_bytes(ffn)
            reply = self.conn.recv()
            update = self.conn.recv_bytes() if reply[0] == "ok" else None
        except (EOFError, OSError) as exc:
            self.proc.join(1.0)
            raise WorkerDied(f"virtual client worker {self.k} (pid {self.proc.pid}) exited during round {task.round_id} "
                             f"(exit code {self.proc.exitcode}): {type(exc).__name__}") from None
        for name, level, message in reply[-1]:
            logging.getLogger(name).log(level, "%s", message)
        if reply[0] == "ok":
            return update, reply[1]
        _, kind, message, trace, _ = reply
        if kind not in ("TrainError", "DataError", "AdapterError", "BundleError"):
            log.debug("worker %d: %s", self.k, trace)
        raise _error(kind, message)

    def alive(self) -> bool:
        return self.proc.is_alive()

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.proc.join(STOP_TIMEOUT)
        for stop in (self.proc.terminate, self.proc.kill):
            if self.proc.is_alive():
                stop()
                self.proc.join(1.0)
        self.conn.close()


class WorkerPool:
    """`slots` worker processes; a client's round trains on the one whose slot it holds (heaviest
    client first, as `SessionPool`). threads: onnxruntime intra-op threads per worker; providers:
    its execution providers. Processes start on first use; a dead one is replaced at its next use."""

    def __init__(self, slots: int, threads: int | None = None, providers: Sequence[str] = ("cpu",)):
        self.slots = Slots(slots)
        self.threads, self.providers = threads, tuple(providers)
        self.ctx = mp.get_context("spawn")  # the cloud has threads by now: fork would copy their locks
        self.workers: list[_Worker | None] = [None] * slots
        self.started = 0  # processes started, for the tests and the logs
        self.lock = threading.Lock()
        self.closed = False

    def _worker(self, i: int) -> _Worker:
        with self.lock:
            if self.closed:
                raise WorkerDied("the virtual engine is shutting down")
            w = self.workers[i]
            if w is None or not w.alive():
                if w is not None:
                    w.close()
                    log.warning("virtual client worker %d had exited; starting a new one", i)
                w = self.workers[i] = _Worker(self.ctx, i, self.threads, self.providers)
                self.started += 1
            return w

    def trainer(self, cfg: AgentConfig, weight: float) -> Callable:
        """The agent's trainer (as `make_trainer`'s): the round trains in the worker of the slot it holds."""
        def train(bundle_dir: Path, task: Task, adapters: bytes, ffn: bytes | None):
            with self.slots.hold(weight) as i:
                return self._worker(i).train(cfg, bundle_dir, task, adapters, ffn)

        return train

    def close(self) -> None:
        """Stop every worker (asked, then terminated); a round still training fails with WorkerDied."""
        with self.lock:
            self.closed = True
            workers, self.workers = [w for w in self.workers if w is not None], [None] * len(self.workers)
        for w in workers:
            w.close()
