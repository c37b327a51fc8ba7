"""Blob serving: what the cloud offers (bundle, round adapters, re-aligned FFN weights), sent once
to every device on the run's broadcast topic, and the chunks a device asks for again.

Used by the round loop and by rollouts alike. Three rules keep a large fleet cheap:

- A round blob goes out **once** on `fedpft/<run>/blob/<blob_id>` (`broadcast`), before the Task,
  so a subscribed device holds it by the time it reads the Task and asks for nothing. Not
  retained: a retained message holds one payload per topic (one chunk of a multi-chunk blob),
  would stay on the broker after the round, and the ACL gives devices `blob/+` only. A device
  that missed it (subscribed late, lost its session) asks, and gets a unicast re-send.
- Re-sends are merged per (device, blob): a device that asks again before its chunks went out
  adds its missing indexes to the waiting request instead of queueing a second copy, and
  indexes already on their way are not queued again.
- They are published by the server's own sender thread from a bounded table, never on the
  transport's handler thread: a QoS 1 publish waits for its PUBACK, and the handler thread must
  keep reading the fleet's acks and uploads meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource
from fedpft.shared.messages import BlobRef, BlobRequest, ProtocolError
from fedpft.shared.transport import Transport

log = logging.getLogger("fedpft.serve")

MAX_PENDING = 20_000  # (device, blob) re-sends waiting; a few times the largest fleet a Task names
TopicFor = Callable[[str, str], str]


def worth_broadcasting(selected: int, online: int) -> bool:
    """Broadcast a round's blobs when at least half the online devices are in the Task: every
    subscribed device of the run receives a broadcast, so for a small sample of a large fleet
    the unicast re-sends to the selected few cost the broker less."""
    return selected > 0 and 2 * selected >= online


class ResendQueue:
    """(device, blob) -> chunk indexes still to re-send, in order of first request; bounded.

    Pure bookkeeping (no I/O), shared by the handler thread (`add`) and the sender (`take`)."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._pending: OrderedDict[tuple[str, str], set[int]] = OrderedDict()
        self._sending: tuple[tuple[str, str], set[int]] | None = None  # the key being sent, its indexes not yet out
        self._cond = threading.Condition()
        self.merged = 0  # requests folded into one already waiting (for benchmarks and tests)
        self.closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    def add(self, device: str, blob: str, indexes: set[int]) -> bool:
        """Queue these indexes for (device, blob); False if the table is full (the device asks again)."""
        key = (device, blob)
        with self._cond:
            if self._sending is not None and self._sending[0] == key:
                indexes = indexes - self._sending[1]  # still on their way: sending them twice helps no one
                if not indexes:
                    self.merged += 1
                    return True
            if key in self._pending:
                self._pending[key] |= indexes
                self.merged += 1
                return True
            if len(self._pending) >= self.max_pending:
                return False
            self._pending[key] = set(indexes)
            self._cond.notify()
            return True

    def take(self, timeout: float | None = None) -> tuple[tuple[str, str], list[int]] | None:
        """The oldest waiting key and its indexes (now "being sent"); None when closed or on timeout."""
        with self._cond:
            self._sending = None
            if not self._cond.wait_for(lambda: self._pending or self.closed, timeout) or self.closed:
                return None
            key, indexes = self._pending.popitem(last=False)
            self._sending = (key, set(indexes))
            return key, sorted(indexes)

    def sent(self, index: int) -> None:
        with self._cond:
            if self._sending is not None:
                self._sending[1].discard(index)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class BlobServer:
    """Blobs the cloud offers; broadcasts a round's blobs once and re-sends what a device asks for
    on that device's topic, from a sender thread of its own."""

    def __init__(self, transport: Transport, run_id: str, chunk_size: int, resend_topic: TopicFor | None = None,
                 broadcast_topic: Callable[[str], str] | None = None, max_pending: int = MAX_PENDING):
        """resend_topic(device_id, blob_id): where re-sent chunks go, default the run's resend topic;
        broadcast_topic(blob_id): where `broadcast` publishes, default the run's blob topic."""
        self.t, self.run, self.chunk_size = transport, run_id, chunk_size
        self.resend_topic = resend_topic or (lambda device, blob: topics.resend_topic(run_id, device, blob))
        self.broadcast_topic = broadcast_topic or (lambda blob: topics.blob_topic(run_id, blob))
        self._blobs: dict[str, BlobSource] = {}
        self._lock = threading.Lock()
        self.queue = ResendQueue(max_pending)
        self._sender: threading.Thread | None = None
        self.bytes_sent = 0
        self.resent_chunks = 0

    def offer(self, blob_id: str, data: bytes) -> BlobRef:
        src = BlobSource(blob_id, data, self.chunk_size)
        with self._lock:
            self._blobs[blob_id] = src
        return src.ref

    def _source(self, blob_id: str) -> BlobSource | None:
        with self._lock:
            return self._blobs.get(blob_id)

    def broadcast(self, ref: BlobRef) -> None:
        """Every chunk once on the broadcast topic, from the caller's thread: it returns when the
        broker has them all, so a Task published next reaches each device after them."""
        src = self._source(ref.blob_id)
        if src is None:
            raise KeyError(f"blob {ref.blob_id} was never offered")
        topic = self.broadcast_topic(ref.blob_id)
        for payload in src.payloads():
            self.t.publish(topic, payload)
            self._count(len(payload))

    def broadcast_round(self, *refs: BlobRef | None) -> None:
        """Broadcast each blob given (None: the round has no such blob)."""
        for ref in refs:
            if ref is not None:
                self.broadcast(ref)

    def serve(self, req: BlobRequest) -> None:
        """Queue the chunks a device asks for (merged with its waiting request); returns at once.
        ProtocolError for an unknown blob, indexes it does not have, or a full table."""
        src = self._source(req.blob_id)
        if src is None:
            raise ProtocolError(f"device {req.device_id} asked for unknown blob {req.blob_id}")
        wanted = set(req.missing) if req.missing else set(range(src.count))
        bad = sorted(i for i in wanted if not 0 <= i < src.count)
        if bad:
            raise ProtocolError(f"blob {req.blob_id} has chunks 0..{src.count - 1}; {req.device_id} asked for {bad[:5]}")
        if not self.queue.add(req.device_id, req.blob_id, wanted):
            raise ProtocolError(f"re-send table full ({self.queue.max_pending} waiting); {req.device_id} will ask again")
        self._start()

    def close(self) -> None:
        """Stop the sender (what is still waiting is dropped: devices ask again)."""
        self.queue.close()
        if self._sender is not None and self._sender is not threading.current_thread():
            self._sender.join(5.0)

    # ---- the sender thread ---------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._send_loop, name=f"blob-sender-{self.run}", daemon=True)
                self._sender.start()

    def _send_loop(self) -> None:
        while (item := self.queue.take()) is not None:
            (device, blob), indexes = item
            src = self._source(blob)
            try:
                self._resend(src, device, indexes)
            except Exception as exc:  # noqa: BLE001 - a dead link must not stop re-sends to everyone else
                log.warning("re-send of %s to %s stopped: %s: %s (it will ask again)", blob, device, type(exc).__name__, exc)

    def _resend(self, src: BlobSource, device: str, indexes: list[int]) -> None:
        topic = self.resend_topic(device, src.blob_id)
        for i in indexes:
            if self.queue.closed:
                return
            payload = src.chunk(i).to_bytes()
            self.t.publish(topic, payload)
            self.queue.sent(i)
            self._count(len(payload), resent=1)

    def _count(self, n: int, resent: int = 0) -> None:
        with self._lock:
            self.bytes_sent += n
            self.resent_chunks += resent
