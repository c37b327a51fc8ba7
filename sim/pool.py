"""The virtual engine's cores and ORT sessions, shared by its clients.

A device process opens its bundle on onnxruntime every round and trains on however many cores the
machine gives it. In one process, ten clients each doing that thrash two cores (ten sessions'
working sets, every round's session build and graph check) for no gain: a client's round is a
pure function of the task (global adapters, FFN weights, seed) and its shard, so the order in
which clients train and the session object they train on change nothing in the update. (With
dropout in the graph, only one client may train at a time per process: each round seeds the
process-wide generator its masks come from. So with more than one slot the ORT clients train in
worker processes, `fedpft.sim.workers`, each with a one-slot pool of its own.)

So: `Slots` lets at most `n` clients train at once, the largest shard first (longest-processing-
time first keeps a round's wall time near total work / n; with first-come-first-served the largest
client could start last and run alone at the end), and `SessionPool` keeps one open `EdgeSession`
per slot and bundle, reset to its opened state (bundle weights, fresh AdamW) before each lease.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def cores() -> int:
    """The cores this process may run on (an affinity mask or a container's cpuset counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Slots:
    """At most `n` holders at once; waiters are served heaviest first.

    A round's tasks reach the clients within milliseconds of each other but not at once: when the
    slots are all idle, the first request waits `settle` seconds so that the round's other clients
    queue too and the heaviest, not the quickest to arrive, start first."""

    def __init__(self, n: int, settle: float = 0.5):
        if n < 1:
            raise ValueError(f"slots must be at least 1, not {n}")
        self.n, self.settle = n, settle
        self.free = list(range(n - 1, -1, -1))  # popped from the end: slot 0 first
        self.waiting: list[tuple[float, int]] = []
        self.gate = 0.0
        self.tickets = itertools.count()
        self.cond = threading.Condition()

    @contextmanager
    def hold(self, weight: float = 0.0) -> Iterator[int]:
        """The index of the slot held for the block (0..n-1)."""
        slot = self.acquire(weight)
        try:
            yield slot
        finally:
            self.release(slot)

    def acquire(self, weight: float = 0.0) -> int:
        with self.cond:
            if len(self.free) == self.n and not self.waiting:
                self.gate = time.monotonic() + self.settle
            ticket = (-float(weight), next(self.tickets))
            heapq.heappush(self.waiting, ticket)
            while True:
                delay = self.gate - time.monotonic()
                if delay <= 0 and self.free and self.waiting[0] == ticket:
                    heapq.heappop(self.waiting)
                    slot = self.free.pop()
                    self.cond.notify_all()  # the next heaviest may take another free slot
                    return slot
                self.cond.wait(delay if delay > 0 else None)

    def release(self, slot: int) -> None:
        with self.cond:
            self.free.append(slot)
            self.cond.notify_all()


class SessionPool:
    """One training session per slot and bundle, kept across rounds and lent reset.

    threads: intra-op threads of each session (cores / slots, so the slots fill the cores
    without oversubscribing them); providers: onnxruntime execution providers, as a device's
    `--providers`. `opener(bundle_dir, threads)`: another kind of session with `EdgeSession`'s
    interface (the torch trainer, `fedpft.sim.torch_session`); default the edge's own ORT session.
    settle: see `Slots`."""

    def __init__(self, slots: int, threads: int | None = None, providers: Sequence[str] = ("cpu",),
                 opener: Callable[[Path, int | None], object] | None = None, settle: float = 0.5):
        self.slots = Slots(slots, settle)
        self.threads, self.providers = threads, tuple(providers)
        self.opener = opener
        # per slot: bundle folder name (the bundle blob's content address) -> its open session
        self.sessions: list[dict[str, object]] = [{} for _ in range(slots)]
        self.opened = 0  # sessions built, for the tests and the logs

    @contextmanager
    def lease(self, bundle_dir: Path, weight: float = 0.0):
        """A session of the bundle in `bundle_dir`, in the state a newly opened one has, held (with
        a slot of the cores) for the block. The caller verified the bundle (the agent's link does,
        every round, before training)."""
        with self.slots.hold(weight) as i:
            key = Path(bundle_dir).name
            have = self.sessions[i]
            session = have.get(key)
            if session is None:
                have.clear()  # a new bundle version: the old one's sessions are not trained again
                session = have[key] = self._open(Path(bundle_dir))
                self.opened += 1
            else:
                session.reset()
            yield session

    def trainer(self, cfg, weight: float = 0.0) -> Callable:
        """The agent's trainer (`make_trainer`'s) for the client of AgentConfig `cfg`, training on
        this pool's sessions; `weight`: its place in the queue for a slot (heaviest first)."""
        from fedpft.edge.task_training import make_trainer

        return make_trainer(cfg, lambda bundle_dir: self.lease(bundle_dir, weight))

    def close(self) -> None:
        """Nothing to stop: the sessions go with the pool (`WorkerPool.close` stops processes)."""

    def _open(self, bundle_dir: Path):
        if self.opener is not None:
            return self.opener(bundle_dir, self.threads)
        from fedpft.edge.session import open_session

        return open_session(bundle_dir, None, self.threads, providers=self.providers)
