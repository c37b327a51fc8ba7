"""A lightweight simulated device for scale benchmarks: the real wire protocol, no training.

`SimDevice` speaks to the cloud exactly as `fedpft.edge.agent.EdgeAgent` does, over any
`Transport` (one `MqttTransport` per device, with its own client id):

    connect -> subscribe round, control, inbox, resend/+, blob/+ -> Presence(online, retained) + Hello
    cloud clears the retained control topic -> Hello again (only a Hello makes a device eligible)
    adapters chunks broadcast on blob/<id> (kept) -> Task naming me -> Ack(task)
    -> only if the broadcast did not complete them: BlobRequest(missing) -> chunks on resend/<id>
    -> "train" for a fixed simulated time (no compute) -> Update(blob=..., task_id, update_id)
    -> update chunks (metadata bound to the task) on upload/<id> -> Ack(update naming update_id)

What it skips, on purpose: the bundle download (a fleet device has the bundle cached; the
Task's bundle is never fetched) and the on-disk cache. The update is real: the received
global adapters plus a little per-device noise, joined with `update.join_update` (activation
statistics only when the Task asks for them) and encoded with `codec.encode_tensors`, so the
cloud checks it against the bundle manifest as it would a real one.

Resilience is the agent's: no chunk for `stall_s` -> ask again for the missing ones; no receipt
within `edge.backoff.receipt_wait(ack_timeout, attempt)` -> upload again (at most `max_retries` times). Handlers run on each device's
dispatcher thread; timers and uploads run on one `Scheduler` shared by every device of a process.

`run_worker` hosts a slice of a fleet in one process and talks to the benchmark over a pipe.
"""

from __future__ import annotations

import gc
import heapq
import json
import itertools
import logging
import os
import random
import resource
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from fedpft.edge.backoff import QUEUED_MAX_WAIT, busy_wait, receipt_wait
from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource, Chunk, Reassembler
from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.messages import (
    Ack, BlobRequest, EndOfRun, Hello, Presence, ProtocolError, Task, Update, decode, encode, make_update_id,
)
from fedpft.shared.transport import Transport
from fedpft.shared.update import binding, join_update

log = logging.getLogger("fedpft.simdevice")

# name -> (shape, dtype), as in the bundle manifest's `trainable`
Specs = Mapping[str, tuple[tuple[int, ...], str]]


_NOISE: dict[str, np.ndarray] = {}
# adapters blob sha256 -> (layout, the round's adapters in its byte order, the noise in it)
_ROUND_BASE: dict[str, tuple["UpdateLayout", np.ndarray, np.ndarray]] = {}
_ROUND_BASE_LOCK = threading.Lock()


class UpdateLayout:
    """Where each tensor of this fleet's float32 updates lies in their safetensors bytes, learned
    once from `encode_tensors`. A device's update is then one vectorised op over a flat buffer and
    a JSON header: `encode_tensors` walks 50 tensors in Python (~2 ms per update, half of what the
    simulated fleet cost per device at 1,000 devices, session 14), work a real fleet does on
    1,000 machines, not on the cloud's cores. The bytes decode to the same tensors and metadata
    (tests/test_simdevice.py)."""

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        data = encode_tensors(template, {"k": "v"})
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        self.entries = header
        self.size = len(data) - 8 - n
        self.order = sorted(header, key=lambda k: header[k]["data_offsets"][0])

    def flat(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The tensors as one float32 vector in the bytes' order."""
        return np.concatenate([np.asarray(tensors[k], np.float32).reshape(-1) for k in self.order])

    def encode(self, values: np.ndarray, metadata: Mapping[str, str]) -> bytes:
        head = json.dumps({"__metadata__": dict(metadata), **self.entries}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # safetensors pads its header to 8 bytes
        out = bytearray(8 + len(head) + self.size)
        out[:8] = len(head).to_bytes(8, "little")
        out[8 : 8 + len(head)] = head
        np.frombuffer(out, np.float32, offset=8 + len(head))[:] = values
        return bytes(out)


def _noise(key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in _NOISE or _NOISE[key].shape != shape:
        _NOISE[key] = np.random.default_rng(len(_NOISE)).standard_normal(shape, dtype=np.float32)
    return _NOISE[key]


class Scheduler:
    """One timer thread for a whole fleet slice; due callbacks run on a small thread pool
    (they publish, and a QoS 1 publish blocks until the broker's PUBACK)."""

    def __init__(self, workers: int = 16) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="simdev")
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="simdev-timer", daemon=True)
        self._thread.start()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            self._cond.notify()

    def soon(self, fn: Callable[[], None]) -> None:
        self._pool.submit(_logged, fn)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(2.0)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.time()):
                    self._cond.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.time()))
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            self._pool.submit(_logged, fn)


def _logged(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # a timer callback must not kill the pool silently
        log.error("simulated device callback failed: %s: %s", type(exc).__name__, exc)


@dataclass
class DeviceTiming:
    """What one device saw in one run (unix times; None if it never got there)."""

    device_id: str
    connected_at: float = 0.0
    task_at: float | None = None  # Task received
    task_net_at: float | None = None  # on a shared link: the first inbox message reached the process's network thread
    fetched_at: float | None = None  # adapters blob complete and verified
    trained_at: float | None = None  # simulated training over, upload starts
    update_sent_at: float | None = None  # last chunk and Update PUBACKed (on a shared link: handed to the link)
    acked_at: float | None = None  # Ack(update) received
    train_s: float = 0.0  # simulated training time drawn for this device
    ack_ok: bool | None = None
    ack_reason: str | None = None
    error: str | None = None
    blob_requests: int = 0
    uploads: int = 0
    queued: int = 0  # "queued" notices received (the update arrived; its checks wait behind others)
    busy: int = 0  # "busy" notices received (no room at the cloud: uploaded again shortly, as told)
    ended: bool = False  # EndOfRun received
    msgs_out: int = 0
    msgs_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class SimDevice:
    def __init__(
        self,
        transport: Transport,
        run_id: str,
        device_id: str,
        expected: Specs,
        stat_layers: Mapping[int, int],
        scheduler: Scheduler,
        *,
        train_s: float = 2.0,
        jitter_s: float = 0.0,
        num_samples: int = 100,
        seed: int = 0,
        stall_s: float = 5.0,
        ack_timeout: float = 30.0,
        max_retries: int = 3,
        on_finish: Callable[["SimDevice"], None] | None = None,
    ) -> None:
        self.t, self.run, self.me = transport, run_id, device_id
        self.expected, self.stat_layers = dict(expected), dict(stat_layers)
        self._all_float32 = all(np.dtype(d) == np.float32 for _, d in self.expected.values())  # UpdateLayout's fast path
        self.sched = scheduler
        self.rng = np.random.default_rng(seed)
        self.retry_rng = random.Random(seed)
        self.train_s, self.jitter_s, self.num_samples = train_s, jitter_s, num_samples
        self.stall_s, self.ack_timeout, self.max_retries = stall_s, ack_timeout, max_retries
        self.on_finish = on_finish
        self.timing = DeviceTiming(device_id)
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._asm: Reassembler | None = None
        self._last_chunk = 0.0
        self._upload: tuple[BlobSource, Update] | None = None
        self._wait = 0  # which scheduled receipt check is the live one (a "queued" notice reschedules it)
        self._queued_attempt = 0  # the upload a "queued" notice already stretched the wait of
        self._kept: dict[str, list[Chunk]] = {}  # broadcast chunks ahead of their Task, as the agent keeps them

    # ------------------------------------------------------------------ wire
    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.t.publish(topic, payload, retain=retain)
        with self._lock:
            self.timing.msgs_out += 1
            self.timing.bytes_out += len(payload)

    def _pub(self, kind: str, msg) -> None:
        self._publish(topics.device_topic(self.run, self.me, kind), encode(msg), retain=kind == topics.PRESENCE)

    def _count_in(self, payload: bytes) -> None:
        with self._lock:
            self.timing.msgs_in += 1
            self.timing.bytes_in += len(payload)

    def start(self, broadcast: bool = True) -> None:
        """Subscribe as the agent does, then announce: retained presence (a late cloud still sees
        it) and a Hello. `broadcast=False`: the round's broadcast blobs reach this device through
        its process's shared tap (`run_worker`), not its own subscription."""
        for pattern in (topics.round_topic(self.run), topics.control_topic(self.run),
                        topics.device_topic(self.run, self.me, topics.INBOX)):
            self.t.subscribe(pattern, self._on_json)
        self.t.subscribe(topics.resend_pattern(self.run, self.me), self._on_chunk)
        if broadcast:
            self.t.subscribe(topics.blob_pattern(self.run), self._on_chunk)
        self._pub(topics.PRESENCE, Presence(run_id=self.run, sender=self.me, device_id=self.me, status="online"))
        self.hello()
        self.timing.connected_at = time.time()

    def hello(self) -> None:
        self._pub(topics.HELLO, Hello(run_id=self.run, sender=self.me, device_id=self.me, num_samples=self.num_samples,
                                      capabilities={"runtime": "simulated"}))

    def clear_presence(self) -> None:
        """Leave no retained message behind on a shared broker."""
        self.t.publish(topics.device_topic(self.run, self.me, topics.PRESENCE), b"", retain=True)

    # ------------------------------------------------------------------ handlers (dispatcher thread)
    def _on_json(self, topic: str, payload: bytes) -> None:
        if not payload:
            # a cleared retained message; on `control` a cloud starting the run: only a Hello
            # makes a device eligible, so say it now (as the real agent does)
            # (not after EndOfRun: the benchmark clears the retained EndOfRun too, and a Hello then
            # would reach a cloud that stopped listening, and count as lost)
            if topic == topics.control_topic(self.run) and not self.timing.ended:
                self.sched.soon(self.hello)
            return
        self._count_in(payload)
        try:
            msg = decode(payload)
            topics.check_sender(topic, msg.run_id, msg.sender)
        except ProtocolError as exc:
            log.warning("%s ignored message on %s: %s", self.me, topic, exc.reason)
            return
        if isinstance(msg, Task) and self.me in msg.devices:
            self._on_task(msg)
        elif isinstance(msg, Ack) and msg.acked == "update":
            self._on_ack(msg)
        elif isinstance(msg, Ack) and msg.acked == "queued":
            self._on_queued(msg)
        elif isinstance(msg, Ack) and msg.acked == "busy":
            self._on_busy(msg)
        elif isinstance(msg, EndOfRun):
            self.timing.ended = True
            self._finish()
        # BlobRequest in the inbox (missing upload chunks): the current cloud never sends one.

    def _on_task(self, task: Task) -> None:
        with self._lock:
            if self._task is not None and self._task.round_id >= task.round_id:
                return  # QoS 1 redelivery
            self._task = task
            self.timing.task_at = time.time()
            self._asm = asm = Reassembler.for_ref(task.adapters)
            kept = self._kept.pop(asm.blob_id, [])
        self._pub(topics.ACK, Ack(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me, acked="task", task_id=task.task_id))
        for chunk in kept:
            self._add(task, asm, chunk)
        if not asm.done:
            self._request(task)

    def _request(self, task: Task) -> None:
        asm = self._asm
        if asm is None or asm.done or self._task is not task:
            return
        if time.time() > task.deadline:
            return self._fail(task, f"adapters not complete by the deadline ({asm.received}/{asm.count or '?'} chunks)")
        with self._lock:
            self.timing.blob_requests += 1
            self._last_chunk = time.time()
        self._pub(topics.BLOBREQ, BlobRequest(run_id=self.run, sender=self.me, device_id=self.me,
                                              blob_id=task.adapters.blob_id, missing=asm.missing() or []))
        self.sched.at(time.time() + self.stall_s, lambda: self._check_stall(task))

    def _check_stall(self, task: Task) -> None:
        asm = self._asm
        if asm is not None and not asm.done and self._task is task and time.time() - self._last_chunk >= self.stall_s:
            self._request(task)
        elif asm is not None and not asm.done and self._task is task:
            self.sched.at(self._last_chunk + self.stall_s, lambda: self._check_stall(task))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        self._count_in(payload)
        try:
            chunk = Chunk.from_bytes(payload)
        except ProtocolError as exc:
            log.warning("%s: bad chunk: %s", self.me, exc.reason)
            return
        self.on_chunk(chunk)

    def on_chunk(self, chunk: Chunk) -> None:
        with self._lock:
            task, asm = self._task, self._asm
            if asm is None or chunk.blob_id != asm.blob_id:  # ahead of its Task: keep the newest few blobs
                self._kept.setdefault(chunk.blob_id, []).append(chunk)
                while len(self._kept) > 4:
                    self._kept.pop(next(iter(self._kept)))
                return
        self._add(task, asm, chunk)

    def _add(self, task: Task, asm: Reassembler, chunk: Chunk) -> None:
        if asm.done:
            return  # stray chunk of a finished download
        try:
            if not asm.add(chunk):
                return
            self._last_chunk = time.time()
            if not asm.done:
                return
            adapters, _ = decode_tensors(asm.result())
        except ProtocolError as exc:
            log.warning("%s: bad adapters chunk: %s", self.me, exc.reason)
            return
        self.timing.fetched_at = time.time()
        train = max(0.0, self.train_s + (self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0))
        self.timing.train_s = train
        # the update is made at the start of the training window, as a real device's takes shape while
        # it trains: the fleet's encoding work (this machine's CPU, not the federation's) must not be
        # billed to the upload burst at the window's end. On the scheduler's pool, not here: this is
        # the process's one dispatcher thread, and making 250 updates in a row on it held the later
        # devices' Tasks for seconds (their training windows then started up to 5 s late while the
        # Tasks had reached the process in 0.2 s; BENCHMARKS.md scale, session 14). An update not
        # ready when its window ends is sent when it is (`trained_at` is then the real send).
        due = self.timing.fetched_at + train

        def prepare() -> None:
            self._make_update(task, adapters)
            self.sched.at(due, lambda: self._trained(task))

        self.sched.soon(prepare)

    # ------------------------------------------------------------------ "training" and upload (scheduler)
    def _trained(self, task: Task) -> None:
        self.timing.trained_at = time.time()
        self._send_update(task)

    def _base(self, key: str, adapters: dict[str, np.ndarray]) -> np.ndarray:
        shape, dtype = self.expected[key]
        base = adapters.get(key)
        return base if base is not None and tuple(base.shape) == tuple(shape) else np.zeros(shape, dtype=dtype)

    def _make_update(self, task: Task, adapters: dict[str, np.ndarray]) -> None:
        # one noise draw per process, scaled per device: 155k normal draws per device cost the
        # fleet ~2 s of this machine's CPU per 1,000 devices, and the cloud's work does not depend
        # on the values
        scale = np.float32(1e-3 * (1.0 + self.rng.uniform()))
        steps = max(1, self.num_samples // task.batch_size)
        meta = {"num_samples": str(self.num_samples), "steps": str(steps), "mean_loss": "1.0",
                **binding(self.run, task.round_id, self.me, task.task_id)}  # the task it answers, as the agent stamps it
        if not task.report_stats and self._all_float32:
            layout, base, noise = self._round_base(task, adapters)
            data = layout.encode(base + scale * noise, meta)
        else:
            out = {key: (self._base(key, adapters) + scale * _noise(key, tuple(shape))).astype(dtype)
                   for key, (shape, dtype) in self.expected.items()}
            positions = float(self.num_samples * 64)
            stats = ({layer: (self.rng.uniform(0, positions, n).astype(np.float32), positions) for layer, n in self.stat_layers.items()}
                     if task.report_stats else {})
            data = encode_tensors(join_update(out, stats), meta)
        src = BlobSource(f"upd-{self.me}-r{task.round_id}", data)
        src.blob_id = f"{src.blob_id}-{src.sha256[:10]}"  # the id names its content, as before: one hash, not two
        msg = Update(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me, blob=src.ref,
                     num_samples=self.num_samples, steps=steps, mean_loss=1.0, task_id=task.task_id,
                     update_id=make_update_id(self.run, task.round_id, self.me, task.task_id, src.sha256))
        self._upload = (src, msg)

    def _round_base(self, task: Task, adapters: dict[str, np.ndarray]) -> tuple[UpdateLayout, np.ndarray, np.ndarray]:
        """The round's adapters and the process's noise, each one flat vector, made once per process."""
        key = task.adapters.sha256
        with _ROUND_BASE_LOCK:
            if key not in _ROUND_BASE:
                base = {k: self._base(k, adapters) for k in self.expected}
                layout = UpdateLayout(base)
                noise = layout.flat({k: _noise(k, tuple(shape)) for k, (shape, _) in self.expected.items()})
                _ROUND_BASE.clear()  # the round before's
                _ROUND_BASE[key] = (layout, layout.flat(base), noise)
            return _ROUND_BASE[key]

    def _send_update(self, task: Task) -> None:
        if self._upload is None or self.timing.acked_at is not None:
            return
        src, msg = self._upload
        self.timing.uploads += 1
        self._pub(topics.UPDATE, msg)  # first: the cloud checks every chunk against it
        for payload in src.payloads():
            self._publish(topics.upload_topic(self.run, self.me, src.blob_id), payload)
        self.timing.update_sent_at = time.time()
        attempt, self._wait = self.timing.uploads - self.timing.busy, self._wait + 1  # as the agent: busy retries are not attempts
        wait = self._wait
        self.sched.at(time.time() + receipt_wait(self.ack_timeout, attempt - 1, self.retry_rng), lambda: self._check_ack(task, attempt, wait))

    def _on_queued(self, ack: Ack) -> None:
        """As the agent does: the receipt is coming, so wait again (bounded) instead of uploading again."""
        if self._upload is None or ack.update_id != self._upload[1].update_id or self.timing.acked_at is not None:
            return
        self.timing.queued += 1
        if self._queued_attempt == self.timing.uploads:
            return  # this upload already waits the longest it may
        task, sent = self._task, self.timing.update_sent_at or time.time()
        self._queued_attempt = self.timing.uploads
        attempt, self._wait = self.timing.uploads - self.timing.busy, self._wait + 1
        wait = self._wait
        self.sched.at(sent + QUEUED_MAX_WAIT * self.ack_timeout, lambda: self._check_ack(task, attempt, wait))

    def _on_busy(self, ack: Ack) -> None:
        """As the agent does: the cloud dropped the bytes for want of room; upload them again after
        busy_wait, and not as a failed attempt."""
        if self._upload is None or ack.update_id != self._upload[1].update_id or self.timing.acked_at is not None:
            return
        task = self._task
        self.timing.busy += 1
        self._wait += 1  # the pending receipt check is void: this upload has its answer
        delay = busy_wait(ack.retry_after, self.retry_rng)
        if task is None or time.time() + delay >= task.deadline:
            return self._fail(task, "turned away by a busy cloud; the round ends before the update could be sent again", publish=False)
        self.sched.at(time.time() + delay, lambda: self._send_update(task))

    def _check_ack(self, task: Task, attempt: int, wait: int) -> None:
        if self.timing.acked_at is not None or self.timing.uploads - self.timing.busy != attempt or wait != self._wait:
            return
        if attempt > self.max_retries:
            return self._fail(task, f"no receipt for the update after {attempt} uploads", publish=False)
        log.warning("%s: no receipt for the update (attempt %d); uploading again", self.me, attempt)
        self._send_update(task)

    def _fail(self, task: Task, reason: str, publish: bool = True) -> None:
        self.timing.error = reason
        if publish:  # a failed client replies with an error, never silence
            self._pub(topics.UPDATE, Update(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me, error=reason,
                                            task_id=task.task_id, update_id=make_update_id(self.run, task.round_id, self.me, task.task_id, None)))
        self._finish()

    def _on_ack(self, ack: Ack) -> None:
        if self._task is None or ack.round_id != self._task.round_id or self.timing.acked_at is not None:
            return
        if self._upload is not None and ack.update_id != self._upload[1].update_id:
            return  # a receipt for another submission in this device's name
        self.timing.acked_at = time.time()
        self.timing.ack_ok, self.timing.ack_reason = ack.ok, ack.reason
        self._finish()

    def _finish(self) -> None:
        if self.on_finish is not None:
            self.on_finish(self)


# ---- one process hosting a slice of the fleet ----------------------------------------------------


@dataclass
class WorkerSpec:
    broker: str
    run_id: str
    device_ids: list[str]
    expected: dict[str, tuple[tuple[int, ...], str]]
    stat_layers: dict[int, int] = field(default_factory=dict)
    train_s: float = 2.0
    jitter_s: float = 0.0
    seed: int = 0
    session_expiry: int = 120  # keep persistent sessions, but do not leave them on the broker for an hour
    # one subscription per process to the round's broadcast, handed to all its devices: the broker
    # and this machine's CPU then do 1/per_worker of the broadcast's fan-out and parsing
    shared_broadcast: bool = False
    # every device of the process on one MQTT connection (`LinkedDevice`), not one each
    shared_link: bool = False
    nice: int = 0  # added to the worker's nice value: the cloud's threads first when both want a core
    cpus: tuple[int, ...] = ()  # CPUs the worker may run on (empty: any)
    connect_threads: int = 16
    log_level: str = "WARNING"
    ack_timeout: float = 30.0  # the devices' receipt timeout (the agent's default)


class LinkedDevice:
    """One device's `Transport` on a connection it shares with the rest of its process (scale.py
    `--fleet shared-link`).

    1,000 real MQTT clients on the benchmark's 2 cores cost it more CPU than the cloud does (two
    threads per client: 2,000+ threads and their switches, BENCHMARKS.md scale), which no cloud
    with its devices elsewhere pays. Here a process's devices publish and subscribe through one
    `MqttTransport`: each device still has its own topics, subscriptions, messages and protocol
    state, and the cloud sees the same traffic, but the broker holds one connection per process
    (not one per device) and a device's handlers run on its process's one dispatcher thread."""

    def __init__(self, link: Transport, device_id: str) -> None:
        self.link, self.client_id = link, device_id

    def connect(self) -> None:  # the process connects the link once
        pass

    def close(self) -> None:  # the link outlives its devices; the process closes it
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        # Not waiting for the PUBACK in a round: the process's devices share one dispatcher thread,
        # and a device answering its Task would hold up every device after it by a broker round
        # trip (a device's own process waits for its own only). QoS 1 still delivers; a lost
        # message is the protocol's to recover, as on a real link. Retained ones (presence, set at
        # connect and cleared at the end) are waited for, so that none outlives the run on a
        # shared broker when the link disconnects.
        self.link.publish(topic, payload, qos=qos, retain=retain, wait=wait and retain)

    def subscribe(self, pattern: str, handler) -> None:  # type: ignore[no-untyped-def]
        self.link.subscribe(pattern, handler)

    def unsubscribe(self, pattern: str) -> None:
        raise NotImplementedError("a device on a shared link cannot drop a subscription its process shares")

    def __enter__(self) -> "LinkedDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_worker(spec: WorkerSpec, conn) -> None:
    """Connect and start every device of `spec`, say ("ready", info), then wait for ("collect",
    timeout): answer ("results", [DeviceTiming dicts], info) and disconnect cleanly."""
    from fedpft.shared.allocator import reuse_large_buffers
    from fedpft.shared.mqtt import MqttTransport

    # The host of a simulated fleet is the benchmark's machine, not a device: its costs inflate the
    # cloud's round on shared cores. Profiled at 1,000 devices (perf, session 9), page zeroing was
    # 18% of the fleet's CPU (every update buffer a fresh mmap) and the cyclic GC 10% (each
    # collection walking 25 devices' long-lived objects). Cheap to avoid, though the round's
    # overhead did not measurably change with it alone (the shared link is what did).
    reuse_large_buffers()
    if spec.nice:
        os.nice(spec.nice)
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    logging.basicConfig(level=spec.log_level, format="%(levelname)s %(name)s: %(message)s")
    sched = Scheduler()
    finished = threading.Event()
    done: set[str] = set()
    done_lock = threading.Lock()

    def on_finish(dev: SimDevice) -> None:
        with done_lock:
            done.add(dev.me)
            if len(done) == len(devices):
                finished.set()

    devices: list[SimDevice] = []
    link = None
    if spec.shared_link:
        # each device's own window (MqttTransport's default, 20 unacknowledged messages), summed:
        # one shared window of 20 would queue the process's uploads behind each other and spare
        # the cloud the bursts a real fleet sends it
        link = MqttTransport(spec.broker, client_id=f"link-{spec.device_ids[0]}", session_expiry=spec.session_expiry,
                             max_inflight=min(65535, 20 * len(spec.device_ids)))
        link.connect()
        # when each device's first inbox message (its Task) reached the network thread, before the
        # process's one dispatcher queue: tells the broker's delivery apart from this process's backlog
        inbox_net: dict[str, float] = {}
        deliver = link._dispatcher.deliver

        def stamped(topic: str, payload: bytes) -> None:
            if topic.endswith("/" + topics.INBOX):
                inbox_net.setdefault(topic.split("/")[-2], time.time())
            deliver(topic, payload)

        link._dispatcher.deliver = stamped
    for i, did in enumerate(spec.device_ids):
        if link is not None:
            t = LinkedDevice(link, did)
        else:
            t = MqttTransport(spec.broker, client_id=did, session_expiry=spec.session_expiry,
                              will=(topics.device_topic(spec.run_id, did, topics.PRESENCE),
                                    encode(Presence(run_id=spec.run_id, sender=did, device_id=did, status="offline", reason="connection lost"))))
        devices.append(SimDevice(t, spec.run_id, did, spec.expected, spec.stat_layers, sched, train_s=spec.train_s,
                                 jitter_s=spec.jitter_s, num_samples=100 + i % 50, seed=spec.seed * 1_000_003 + i, on_finish=on_finish,
                                 ack_timeout=spec.ack_timeout))
    t0 = time.time()
    cpu0 = _cpu_s()
    errors: list[str] = []

    tap = None
    if spec.shared_broadcast or link is not None:
        # one subscription for the process's devices: a tap of its own, or (on a shared link, where
        # the broadcast arrives once per process anyway) the link itself, so that the chunk is
        # parsed and hashed once, not once per device on the process's one dispatcher thread
        # (250 sha256 of 0.6 MB each held up the Tasks behind them; session 14)
        if link is None:
            tap = MqttTransport(spec.broker, client_id=f"tap-{spec.device_ids[0]}", session_expiry=spec.session_expiry)
            tap.connect()
        else:
            tap = link

        def fan_out(topic: str, payload: bytes) -> None:
            try:
                chunk = Chunk.from_bytes(payload)
            except ProtocolError as exc:
                log.warning("broadcast tap: bad chunk: %s", exc.reason)
                return
            for dev in devices:
                dev.on_chunk(chunk)

        tap.subscribe(topics.blob_pattern(spec.run_id), fan_out)

    def up(dev: SimDevice) -> None:
        try:
            dev.t.connect()
            dev.start(broadcast=tap is None)
        except Exception as exc:
            errors.append(f"{dev.me}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(spec.connect_threads) as pool:
        list(pool.map(up, devices))
    gc.collect()
    gc.freeze()  # what exists now lives for the run: later collections need not walk it
    conn.send(("ready", {"devices": len(devices), "errors": errors[:5], "n_errors": len(errors),
                         "connect_s": time.time() - t0, "rss": _rss_bytes()}))
    try:
        while True:
            cmd, timeout = conn.recv()
            if cmd == "mark":  # the cloud is about to start: count this process's CPU from here
                cpu0 = _cpu_s()
            elif cmd == "collect":
                finished.wait(timeout)
                if link is not None:
                    for d in devices:
                        d.timing.task_net_at = inbox_net.get(d.me)
                conn.send(("results", [asdict(d.timing) for d in devices], {"rss": _rss_bytes(), "cpu_s": _cpu_s() - cpu0}))
            elif cmd == "stop":
                break
    finally:
        def down(dev: SimDevice) -> None:
            try:
                dev.clear_presence()
                dev.t.close()
            except Exception:
                pass

        with ThreadPoolExecutor(spec.connect_threads) as pool:
            list(pool.map(down, devices))
        for t in dict.fromkeys(x for x in (tap, link) if x is not None):  # the tap may be the link
            t.close()
        sched.stop()
        conn.send(("stopped", None))
