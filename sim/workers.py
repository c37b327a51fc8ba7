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

import builtins
import importlib
import logging
import multiprocessing as mp
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from fedpft.shared.config import AgentConfig
from fedpft.shared.messages import Task, decode, encode

from .pool import Slots

log = logging.getLogger("fedpft.simulate")

# how long close() waits for the workers asked to stop before it terminates them (one may be mid-round)
STOP_TIMEOUT = 5.0


class WorkerDied(RuntimeError):
    """The worker process training this client's round exited before it answered."""


class RemoteTraceback(Exception):
    """The worker's traceback, as the cause of the exception rebuilt from it."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def _local_class(module: str, name: str) -> type | None:
    """The exception class `module.name` in this process: a builtin or one of fedpft's own."""
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module == "fedpft" or module.startswith("fedpft."):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    else:
        cls = None
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else None


def rebuild_error(mro: list[tuple[str, str]], args: list, message: str, trace: str) -> Exception:
    """The worker's exception as the agent would have seen it in-process, so it reports the round's
    failure with the same line: its own class where this process has it (builtins, fedpft's), else a
    class of the same name over the nearest base it has, made from its arguments (or its message);
    the worker's traceback as its cause."""
    (module, name), exc = mro[0], None
    for k, (m, n) in enumerate(mro):
        base = _local_class(m, n)
        if base is None:
            continue
        cls = base if k == 0 else type(name, (base,), {"__module__": module})
        for given in (args, [message]):
            try:
                exc = cls(*given)
                break
            except TypeError:  # a constructor that wants other arguments
                continue
        if exc is not None:
            break
    if exc is None:
        exc = RuntimeError(f"{name}: {message}")
    exc.__cause__ = RemoteTraceback(trace)
    return exc


def _plain_args(exc: BaseException) -> list:
    """The exception's arguments when they are plain values (what rebuilds its message exactly)."""
    args = list(exc.args)
    if isinstance(exc, OSError) and exc.filename is not None:  # kept apart from args, yet part of the message
        args = [exc.errno, exc.strerror, exc.filename] + ([] if exc.filename2 is None else [None, exc.filename2])
    plain = all(a is None or isinstance(a, (str, int, float, bool)) for a in args)
    return args if plain else [str(exc)]


class _Captured(logging.Handler):
    """The records a round logs in the worker, to be logged again on the caller's thread."""

    def __init__(self, level: int):
        super().__init__(level)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.records.append((record.name, record.levelno, text))


def _serve(conn, threads: int | None, providers: tuple[str, ...], level: int) -> None:
    """A worker: train the rounds read from the pipe, one at a time, until its EOF or a stop."""
    from .pool import SessionPool

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the cloud's to handle; the pipe's EOF ends us
    # no settle: this pool has one holder at a time, the cloud's Slots already ordered the clients
    pool = SessionPool(1, threads, providers, settle=0.0)
    captured = _Captured(level)
    fedpft_log = logging.getLogger("fedpft")
    fedpft_log.addHandler(captured)
    fedpft_log.setLevel(level)
    fedpft_log.propagate = False  # the caller logs them, where its handlers route them
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return  # the cloud is gone (or closed us)
        if req[0] == "stop":
            return
        captured.records = []
        try:
            _, cfg_json, bundle_dir, task, adapters, ffn = req
            train = pool.trainer(AgentConfig.model_validate_json(cfg_json))
            update, fields = train(Path(bundle_dir), decode(task), adapters, ffn)
            reply = ("ok", captured.records, fields, update)
        except Exception as exc:  # noqa: BLE001 - the round's failure, reported to its agent as in-process
            mro = [(c.__module__, c.__qualname__) for c in type(exc).__mro__]
            reply = ("error", captured.records, mro, _plain_args(exc), str(exc), traceback.format_exc())
        conn.send(reply)


class _Worker:
    """One worker process and its pipe, used by one caller at a time (the holder of its slot; `busy`
    says so to `close`). A request and its reply are one message each, so nothing but a dead
    process can leave the pipe out of step; any failure mid-exchange ends the process."""

    def __init__(self, ctx, k: int, threads: int | None, providers: tuple[str, ...], level: int):
        self.k = k
        self.busy = threading.Lock()
        self.conn, child = ctx.Pipe(duplex=True)
        try:
            self.proc = ctx.Process(target=_serve, args=(child, threads, providers, level), name=f"fedpft-client-{k}", daemon=True)
            self.proc.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()
        self.broken = False

    def train(self, cfg: AgentConfig, bundle_dir: Path, task: Task, adapters: bytes, ffn: bytes | None):
        request = ("train", cfg.model_dump_json(), str(bundle_dir), encode(task), bytes(adapters), None if ffn is None else bytes(ffn))
        with self.busy:
            try:
                self.conn.send(request)
                reply = self.conn.recv()
            except BaseException as exc:
                self.broken = True
                self.proc.kill()  # whatever it was doing, the pipe is no longer in step with it
                self.proc.join(5.0)
                if isinstance(exc, (EOFError, OSError, ValueError)):  # ValueError: the pipe closed under us
                    raise WorkerDied(f"virtual client worker {self.k} (pid {self.proc.pid}) exited during round "
                                     f"{task.round_id} (exit code {self.proc.exitcode})") from None
                raise
        for name, level, message in reply[1]:
            logging.getLogger(name).log(level, "%s", message)
        if reply[0] == "ok":
            return reply[3], reply[2]
        raise rebuild_error(*reply[2:])

    def alive(self) -> bool:
        return not self.broken and self.proc.is_alive()

    def ask_to_stop(self) -> None:
        """A stop after the round in progress, if any (the pipe is free only when no caller holds it)."""
        if self.busy.acquire(blocking=False):
            try:
                self.conn.send(("stop",))
            except (OSError, ValueError):
                pass
            finally:
                self.busy.release()

    def end(self, deadline: float) -> None:
        """Until the process has exited (by `deadline`, then terminated, then killed)."""
        self.proc.join(max(0.0, deadline - time.monotonic()))
        for stop in (self.proc.terminate, self.proc.kill):
            if self.proc.is_alive():
                stop()  # a caller blocked on its reply then sees the EOF and fails with WorkerDied
                self.proc.join(1.0)
        if self.busy.acquire(timeout=5.0):  # closed only once no caller is using it
            self.conn.close()
            self.busy.release()


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
                    w.end(time.monotonic())
                    log.warning("virtual client worker %d had exited; starting a new one", i)
                # the agent's round lines are INFO; a cloud at DEBUG gets the workers' DEBUG too
                level = min(logging.INFO, logging.getLogger("fedpft").getEffectiveLevel())
                w = self.workers[i] = _Worker(self.ctx, i, self.threads, self.providers, level)
                self.started += 1
            return w

    def trainer(self, cfg: AgentConfig, weight: float) -> Callable:
        """The agent's trainer (as `make_trainer`'s): the round trains in the worker of the slot it holds."""
        def train(bundle_dir: Path, task: Task, adapters: bytes, ffn: bytes | None):
            with self.slots.hold(weight) as i:
                return self._worker(i).train(cfg, bundle_dir, task, adapters, ffn)

        return train

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every worker within about `timeout` seconds: asked to, then terminated (a round still
        training fails with WorkerDied). Safe to call twice."""
        with self.lock:
            self.closed = True
            workers, self.workers = [w for w in self.workers if w is not None], [None] * len(self.workers)
        for w in workers:
            w.ask_to_stop()
        deadline = time.monotonic() + timeout
        for w in workers:
            w.end(deadline)
