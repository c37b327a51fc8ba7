"""`fedpft-cloud serve`: the round loop of FedPFT over one Transport.

Network handlers only decode, validate and enqueue; all round state lives in the main loop,
so there are no locks around it. Blob chunks asked for by devices are served straight from the
handler thread (read-only data behind a lock), so downloads proceed while the loop trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpft.cloud.config import ServeConfig
from fedpft.shared import topics
from fedpft.shared.archive import pack_bundle
from fedpft.shared.chunks import BlobSource, Chunk, Reassembler
from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.manifest import BundleManifest, verify_bundle
from fedpft.shared.messages import (
    CLOUD_SENDER,
    MAX_TASK_DEVICES,
    Ack,
    BlobRef,
    BlobRequest,
    EndOfRun,
    Hello,
    Presence,
    ProtocolError,
    Task,
    Update,
    decode,
    encode,
)
from fedpft.shared.signing import key_id, load_private_key, sign
from fedpft.shared.transport import Transport
from fedpft.shared.update import check_binding, split_update

from .aggregate import aggregate, cap_weights, clip_update, norm_bound, sum_stats, update_norm
from .sampling import RoundStatus, RoundTracker, round_rng, sample_devices
from .state import RunState, RunStore

log = logging.getLogger("fedpft.serve")

# What each device topic the cloud subscribes to may carry.
_KIND_TYPES = {topics.HELLO: Hello, topics.PRESENCE: Presence, topics.UPDATE: Update, topics.ACK: Ack, topics.BLOBREQ: BlobRequest}


# Unfinished uploads one device may have at once: its update and one retry under a new blob id.
MAX_UPLOADS_PER_DEVICE = 2


@dataclass
class DeviceInfo:
    online: bool = True
    num_samples: int = 0
    last_seen: float = field(default_factory=time.time)
    bundle_version: str | None = None
    hello: bool = False  # only a Hello that passed the run's checks makes a device eligible for rounds


@dataclass
class Accepted:
    adapters: dict[str, np.ndarray]
    stats: dict[int, tuple[np.ndarray, float]]
    num_samples: int
    mean_loss: float | None
    declared: int | None = None  # num_samples of the device's Hello: its update cannot weigh more
    update_id: str | None = None


@dataclass
class Upload:
    """One device's blob arriving in chunks; `reserved` bytes count against the upload buffer."""

    asm: Reassembler
    reserved: int
    last: float = field(default_factory=time.time)


class BlobServer:
    """Blobs the cloud offers; re-sends the chunks a device asks for on that device's topic."""

    def __init__(self, transport: Transport, run_id: str, chunk_size: int, resend_topic: Callable[[str, str], str] | None = None):
        """resend_topic(device_id, blob_id): where re-sent chunks go; default the run's resend topic."""
        self.t, self.run, self.chunk_size = transport, run_id, chunk_size
        self.resend_topic = resend_topic or (lambda device, blob: topics.resend_topic(run_id, device, blob))
        self._blobs: dict[str, BlobSource] = {}
        self._lock = threading.Lock()
        self.bytes_sent = 0

    def offer(self, blob_id: str, data: bytes) -> BlobRef:
        src = BlobSource(blob_id, data, self.chunk_size)
        with self._lock:
            self._blobs[blob_id] = src
        return src.ref

    def serve(self, req: BlobRequest) -> None:
        with self._lock:
            src = self._blobs.get(req.blob_id)
        if src is None:
            raise ProtocolError(f"device {req.device_id} asked for unknown blob {req.blob_id}")
        topic = self.resend_topic(req.device_id, req.blob_id)
        for payload in src.payloads(req.missing):
            self.t.publish(topic, payload)
            with self._lock:
                self.bytes_sent += len(payload)


class Federation:
    def __init__(self, cfg: ServeConfig, transport: Transport, evaluator=None, aligner=None, show_progress: bool = True):
        self.cfg = cfg
        self.t = transport
        self.manifest: BundleManifest = verify_bundle(cfg.bundle)
        self.store = RunStore(cfg.out)
        self.events: queue.Queue = queue.Queue()
        self.devices: dict[str, DeviceInfo] = {}
        self.blobs = BlobServer(transport, cfg.run_id, cfg.chunk_size)
        self.uploads: dict[tuple[str, str], Upload] = {}
        self.upload_bytes = 0  # reserved by unfinished uploads, at most cfg.max_upload_buffer
        self._next_expiry = 0.0
        self.task: Task | None = None
        self.waiting: dict[tuple[str, str], Update] = {}  # update messages whose blob is still arriving
        self.bytes_up = 0
        self.evaluator = evaluator  # callable(adapters) -> (accuracy, loss) | None
        # callable(adapters, stats, current ffn | None, round) -> ({manifest.ffn key: array}, JSON-ready facts)
        self.aligner = aligner
        self.show_progress = show_progress
        self.expected = {t.key: (tuple(t.shape), t.dtype) for t in self.manifest.trainable}
        self.stat_layers = {s.layer: s.neurons for s in self.manifest.stat_outputs}
        self.tracker: RoundTracker | None = None
        self.round_id = -1
        self.signing_key = load_private_key(cfg.signing_key) if cfg.signing_key is not None else None
        if self.signing_key is not None and self.manifest.signer != key_id(self.signing_key.public_key()):
            log.warning("the bundle is not signed by --signing-key; devices with --trust-key will refuse it "
                        "(prepare it with --signing-key)")

    # ------------------------------------------------------------------ network side (handler thread)
    def _on_json(self, topic: str, payload: bytes) -> None:
        if not payload and topic.endswith(f"/{topics.PRESENCE}"):
            # clearing a retained presence delivers an empty payload: housekeeping, not an attack
            log.debug("ignored empty payload on %s", topic)
            return
        try:
            msg = decode(payload)
            self._check_route(topics.check_sender(topic, msg.run_id, msg.sender), msg)
        except ProtocolError as exc:
            log.warning("rejected message on %s: %s", topic, exc.reason)
            return
        if isinstance(msg, BlobRequest):
            try:
                self.blobs.serve(msg)
            except ProtocolError as exc:
                log.warning("rejected blob request from %s: %s", msg.device_id, exc.reason)
            return
        self.events.put(("msg", msg))

    def _check_route(self, parsed: topics.Topic, msg) -> None:
        """The message must be of the kind its topic carries, about the device the topic names
        (a BlobRequest naming another device would have the cloud re-send chunks to that one)."""
        if parsed.run != self.cfg.run_id:
            raise ProtocolError(f"message for run {parsed.run!r}; this cloud serves {self.cfg.run_id!r}")
        if _KIND_TYPES.get(parsed.kind) is not type(msg):
            raise ProtocolError(f"a {msg.type} message does not belong on a {parsed.kind} topic")
        if msg.device_id != parsed.device_id:
            raise ProtocolError(f"message about device {msg.device_id!r} on device {parsed.device_id!r}'s topic")

    def _on_upload(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse(topic)
            if parsed.kind != topics.UPLOAD or parsed.run != self.cfg.run_id:
                raise ProtocolError(f"not an upload topic of run {self.cfg.run_id!r}")
            chunk = Chunk.from_bytes(payload)
            if chunk.blob_id != topics.blob_id_of(topic):
                raise ProtocolError(f"chunk of blob {chunk.blob_id} on topic for {topics.blob_id_of(topic)}")
        except ProtocolError as exc:
            log.warning("rejected chunk on %s: %s", topic, exc.reason)
            return
        self.events.put(("chunk", parsed.device_id, chunk, len(payload)))

    def subscribe(self) -> None:
        """Listen to every device of the run (idempotent: callers may subscribe before run())."""
        if getattr(self, "_subscribed", False):
            return
        self._subscribed = True
        run = self.cfg.run_id
        for kind in (topics.HELLO, topics.PRESENCE, topics.UPDATE, topics.ACK, topics.BLOBREQ):
            self.t.subscribe(topics.all_devices_pattern(run, kind), self._on_json)
        self.t.subscribe(topics.all_devices_pattern(run, topics.UPLOAD), self._on_upload)

    # ------------------------------------------------------------------ main loop side
    def pump(self, timeout: float) -> None:
        """Handle queued events for up to `timeout` seconds (returns early once the queue idles)."""
        end = time.time() + timeout
        while True:
            remaining = end - time.time()
            if remaining <= 0:
                return
            self._housekeeping()
            try:
                ev = self.events.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.tracker is not None and self.tracker.status(time.time()) is not RoundStatus.WAITING:
                    return
                continue
            try:
                self._handle(ev)
            except ProtocolError as exc:
                log.warning("%s", exc.reason)
            if self.tracker is not None and self.tracker.status(time.time()) is not RoundStatus.WAITING:
                return

    def _handle(self, ev) -> None:
        if ev[0] == "chunk":
            _, device, chunk, nbytes = ev
            self._on_chunk(device, chunk, nbytes)
            return
        msg = ev[1]
        if isinstance(msg, Hello):
            if msg.num_samples < 1:
                raise ProtocolError(f"hello from {msg.device_id} declares no training samples; not eligible for rounds")
            info = self._register(msg.device_id)
            info.online, info.num_samples, info.last_seen, info.bundle_version = True, msg.num_samples, time.time(), msg.bundle_version
            info.hello = True
            log.debug("device %s online (%d samples)", msg.device_id, msg.num_samples)
        elif isinstance(msg, Presence):
            # a retained "online" tells a cloud that started late about a device (its next Hello
            # heartbeat makes it eligible); "offline" from a device never seen tells nothing
            info = self._register(msg.device_id) if msg.status == "online" else self.devices.get(msg.device_id)
            if info is not None:
                info.online, info.last_seen = msg.status == "online", time.time()
                if not info.online:
                    log.info("device %s went offline%s", msg.device_id, f" ({msg.reason})" if msg.reason else "")
                    reason = f"went offline ({msg.reason or 'last will'})"
                    if self.tracker is not None and self.tracker.give_up(msg.device_id, reason):
                        log.warning("round %d: not waiting for %s: %s", self.round_id, msg.device_id, reason)
        elif isinstance(msg, Update):
            self._on_update(msg)
        elif isinstance(msg, Ack):
            if msg.device_id in self.devices:
                self.devices[msg.device_id].last_seen = time.time()
            if msg.acked == "task" and self.tracker is not None and msg.round_id == self.round_id:
                if self.task is not None and msg.task_id == self.task.task_id:
                    self.tracker.ack(msg.device_id)
                else:
                    log.debug("round %d: ack from %s names task %s, not this round's; ignored", self.round_id, msg.device_id, msg.task_id)

    def _register(self, device_id: str) -> DeviceInfo:
        """The device's entry, made on its first Hello (or retained online presence). The registry is bounded (hellos from
        arbitrary ids must not grow the cloud's memory): when full, the offline device seen
        longest ago makes room; with every device online, the newcomer is refused."""
        info = self.devices.get(device_id)
        if info is not None:
            return info
        if len(self.devices) >= self.cfg.max_devices:
            offline = [d for d, i in self.devices.items() if not i.online and (self.tracker is None or d not in self.tracker.selected)]
            if not offline:
                raise ProtocolError(f"device registry full ({self.cfg.max_devices} online devices, --max-devices); "
                                    f"hello from {device_id} ignored")
            del self.devices[min(offline, key=lambda d: self.devices[d].last_seen)]
        info = self.devices[device_id] = DeviceInfo()
        return info

    def _on_chunk(self, device: str, chunk: Chunk, nbytes: int) -> None:
        key = (device, chunk.blob_id)
        up = self.uploads.get(key)
        if up is None:
            up = self._start_upload(device, chunk)
            if up is None:
                return
        try:
            new = up.asm.add(chunk)
        except ProtocolError as exc:
            waiting = self.waiting.get(key)
            self._drop(key, exc.reason, quiet=True)
            if waiting is not None:  # its Update came first: refuse that, so the device hears why
                return self._reject(waiting, f"rejected chunk: {exc.reason}")
            raise ProtocolError(f"rejected chunk from {device}: {exc.reason}") from None
        if new:
            self.bytes_up += nbytes
            up.last = time.time()
        if up.asm.done and key in self.waiting:
            self._on_update(self.waiting.pop(key))

    def _start_upload(self, device: str, chunk: Chunk) -> Upload | None:
        """Room for a new upload, within the bounds: only a device the open round waits for, at most
        MAX_UPLOADS_PER_DEVICE at once (the oldest gives way), at most cfg.max_upload_buffer bytes
        reserved in total. The Update, when it came first, fixes the blob's hash and size."""
        tr = self.tracker
        if tr is None or device not in tr.selected or device in tr.answered():
            if tr is not None and device in tr.answered():
                return None  # a retry's chunks after its update counted: harmless
            raise ProtocolError(f"upload chunk from {device} dropped: no open round waits for its update")
        if chunk.total_size > self.cfg.max_update_bytes:
            raise ProtocolError(f"upload from {device}: blob of {chunk.total_size} bytes exceeds the {self.cfg.max_update_bytes}-byte limit")
        mine = sorted((k for k in self.uploads if k[0] == device), key=lambda k: self.uploads[k].last)
        for k in mine[: max(0, len(mine) - MAX_UPLOADS_PER_DEVICE + 1)]:
            self._drop(k, f"{device} started another upload ({chunk.blob_id})")
        if self.upload_bytes + chunk.total_size > self.cfg.max_upload_buffer:
            raise ProtocolError(f"upload from {device} dropped: unfinished uploads hold {self.upload_bytes} bytes, "
                                f"the buffer is {self.cfg.max_upload_buffer} bytes")
        key = (device, chunk.blob_id)
        waiting = self.waiting.get(key)
        asm = (Reassembler.for_ref(waiting.blob, max_bytes=self.cfg.max_update_bytes) if waiting is not None and waiting.blob
               else Reassembler(chunk.blob_id, max_bytes=self.cfg.max_update_bytes))
        self.upload_bytes += chunk.total_size
        up = self.uploads[key] = Upload(asm, chunk.total_size)
        return up

    def _drop(self, key: tuple[str, str], why: str, quiet: bool = False) -> None:
        """Forget an unfinished upload (and the Update waiting for it), with one log line unless the caller logs."""
        up = self.uploads.pop(key, None)
        msg = self.waiting.pop(key, None)
        if up is not None:
            self.upload_bytes -= up.reserved
        if not quiet and (up is not None or msg is not None):
            got, count = (up.asm.received, up.asm.count or "?") if up is not None else (0, "?")
            log.warning("dropped upload %s from %s (%d/%s chunks): %s", key[1], key[0], got, count, why)

    def _housekeeping(self) -> None:
        """Once a second: drop uploads that stalled, stop waiting for devices that never acked the task."""
        now = time.time()
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        for key, up in list(self.uploads.items()):
            if now - up.last > self.cfg.upload_timeout:
                self._drop(key, f"no chunk for {self.cfg.upload_timeout:.0f}s (--upload-timeout)")
        if self.tracker is not None:
            silent = self.tracker.expire_acks(now)
            if silent:
                log.warning("round %d: not waiting for %d device(s) that did not ack the task within %.0fs: %s", self.round_id,
                            len(silent), self.cfg.task_ack_timeout, ", ".join(silent[:10]) + (", ..." if len(silent) > 10 else ""))

    def _reply(self, msg: Update, ok: bool, reason: str | None) -> None:
        ack = Ack(run_id=self.cfg.run_id, round_id=msg.round_id, sender=CLOUD_SENDER, device_id=msg.device_id, acked="update", ok=ok,
                  reason=reason, update_id=msg.update_id)
        self.t.publish(topics.device_topic(self.cfg.run_id, msg.device_id, topics.INBOX), encode(ack))

    def _reject(self, msg: Update, reason: str) -> None:
        log.warning("rejected update from %s for round %d: %s", msg.device_id, msg.round_id, reason)
        self._reply(msg, False, reason)

    def _on_update(self, msg: Update) -> None:
        tr = self.tracker
        if tr is None or msg.round_id != self.round_id:
            self._drop_upload(msg)
            return self._reject(msg, f"stale: round {msg.round_id} is not the current round {self.round_id}")
        if msg.device_id not in tr.selected:
            self._drop_upload(msg)
            return self._reject(msg, "device was not selected for this round")
        if msg.device_id in tr.answered():
            self._drop_upload(msg)
            counted = tr.accepted.get(msg.device_id)
            if counted is not None and getattr(counted, "update_id", None) not in (None, msg.update_id):
                return self._reject(msg, f"another update ({counted.update_id}) from {msg.device_id} already counted for this round")
            log.info("duplicate update from %s for round %d ignored: already counted", msg.device_id, msg.round_id)
            return self._reply(msg, True, "duplicate (already counted)")  # QoS 1 redelivery: ack again, count once
        task_id = self.task.task_id if self.task is not None else None
        if task_id is None or msg.task_id != task_id or msg.update_id is None:
            self._drop_upload(msg)
            return self._reject(msg, f"answers task {msg.task_id}, not this round's task {task_id}" if msg.task_id
                                else "carries no task_id/update_id binding it to this round's task")
        if msg.error is not None:
            tr.fail(msg.device_id, msg.error)
            log.warning("device %s failed round %d: %s", msg.device_id, msg.round_id, msg.error)
            return self._reply(msg, True, None)
        ref = msg.blob
        assert ref is not None
        if ref.size > self.cfg.max_update_bytes:
            return self._reject(msg, f"update of {ref.size} bytes exceeds the {self.cfg.max_update_bytes}-byte cap")
        key = (msg.device_id, ref.blob_id)
        up = self.uploads.get(key)
        if up is not None and not up.asm.done:
            try:  # chunks came first: what they declared must agree with the Update now, not at the end
                up.asm.bind(ref.sha256, ref.size)
            except ProtocolError as exc:
                self._drop(key, exc.reason, quiet=True)
                return self._reject(msg, exc.reason)
        if up is None or not up.asm.done:
            # bounded like the uploads: a device's older announced-but-unfinished updates give way
            mine = [k for k in self.waiting if k[0] == msg.device_id and k != key]
            for k in mine[: max(0, len(mine) - MAX_UPLOADS_PER_DEVICE + 1)]:
                self._drop(k, f"{msg.device_id} announced another update ({ref.blob_id})")
            self.waiting[key] = msg
            return
        self.uploads.pop(key)
        self.upload_bytes -= up.reserved
        try:
            data = up.asm.result()
            if data and hashlib.sha256(data).hexdigest() != ref.sha256:
                raise ProtocolError("update blob sha256 does not match the update message")
            tensors, meta = decode_tensors(data, self.cfg.max_update_bytes)
            check_binding(meta, self.cfg.run_id, msg.round_id, msg.device_id, task_id)
            adapters, stats = split_update(tensors, self.expected, self.stat_layers)
        except ProtocolError as exc:
            return self._reject(msg, exc.reason)
        self.store.save_update(msg.round_id, msg.device_id, data)
        info = self.devices.get(msg.device_id)
        declared = info.num_samples if info is not None and info.hello else None
        tr.accept(msg.device_id, Accepted(adapters, stats, msg.num_samples, msg.mean_loss, declared, msg.update_id))
        self._reply(msg, True, None)
        log.info("round %d: update from %s (%d samples, loss %s)", msg.round_id, msg.device_id, msg.num_samples,
                 f"{msg.mean_loss:.4f}" if msg.mean_loss is not None else "-")

    def _restore_accepted(self, round_id: int) -> None:
        """Count updates this round already accepted before a crash (they are on disk), once."""
        assert self.tracker is not None
        for path in self.store.stored_updates(round_id):
            device = path.stem
            if device not in self.tracker.selected:
                continue
            try:
                tensors, meta = decode_tensors(path.read_bytes(), self.cfg.max_update_bytes)
                adapters, stats = split_update(tensors, self.expected, self.stat_layers)
                n = int(meta.get("num_samples", "0"))
                mean_loss = float(meta["mean_loss"]) if meta.get("mean_loss") not in (None, "null", "") else None
            except (ProtocolError, ValueError) as exc:
                log.warning("stored update %s unusable (%s); the device will be asked again", path, exc)
                continue
            self.tracker.accept(device, Accepted(adapters, stats, n, mean_loss))
            log.info("round %d: update from %s restored from disk (accepted before a restart)", round_id, device)

    def _drop_upload(self, msg: Update) -> None:
        if msg.blob is not None and (msg.device_id, msg.blob.blob_id) in self.uploads:
            up = self.uploads.pop((msg.device_id, msg.blob.blob_id))
            self.upload_bytes -= up.reserved

    def _close_uploads(self, round_id: int) -> None:
        """At a round's end no upload can count any more: free them, each with a log line."""
        for key in {*self.uploads, *self.waiting}:
            self._drop(key, f"round {round_id} ended")

    def _bounded(self, r: int, names: list[str], accepted: list[Accepted], current: dict[str, np.ndarray],
                 history: list[dict], record: dict) -> tuple[list[dict[str, np.ndarray]], list[float]]:
        """The round's updates with each change clipped to the norm bound, and their capped FedAvg
        weights; every bounded update and capped weight is logged and recorded in the round's metrics."""
        cfg = self.cfg
        updates = [a.adapters for a in accepted]
        norms = [update_norm(u, current) for u in updates]
        previous = next((h["typical_norm"] for h in reversed(history) if h.get("typical_norm") is not None), None)
        bound, typical = norm_bound(norms, cfg.norm_bound_factor, cfg.max_update_norm, previous)
        bounded = {}
        if bound is not None:
            for i, (d, n) in enumerate(zip(names, norms)):
                if n > bound:
                    updates[i] = clip_update(updates[i], current, bound)
                    bounded[d] = n
                    log.warning("round %d: bounded update from %s: its change has L2 norm %.4g > bound %.4g; scaled by %.3g",
                                r, d, n, bound, bound / n)
        # what a device may claim: its Hello's count and the run's maximum; then relative to the round
        claimed = [max(a.num_samples, 1) for a in accepted]
        limits = [min(c, a.declared or c, cfg.max_client_samples or c) for c, a in zip(claimed, accepted)]
        weights = cap_weights(limits, cfg.weight_cap_factor)
        capped = {d: c for d, c, w in zip(names, claimed, weights) if w < c}
        for d, c, w, a in zip(names, claimed, weights, accepted):
            if w < c:
                log.warning("round %d: capped the weight of %s: claims %d samples, counted as %d (Hello: %s, --max-client-samples: %s, "
                            "%.3g x typical)", r, d, c, w, a.declared if a.declared is not None else "-", cfg.max_client_samples or "-",
                            cfg.weight_cap_factor)
        record.update(typical_norm=typical, norm_bound=bound, bounded=bounded, weights=dict(zip(names, weights)), capped=capped)
        return updates, weights

    # ------------------------------------------------------------------ rounds
    def online(self) -> list[str]:
        """Devices eligible for a round: online, and announced by a Hello that passed the checks."""
        return sorted(d for d, i in self.devices.items() if i.online and i.hello)

    def wait_for_devices(self, n: int, timeout: float) -> list[str]:
        end = time.time() + timeout
        while len(self.online()) < n and time.time() < end:
            self.pump(min(0.5, max(0.0, end - time.time())))
        return self.online()

    def initial_state(self) -> RunState:
        # RunError (one line) for a missing, foreign or damaged state, or a folder holding another run
        state = self.store.begin(self.cfg.run_id, self.manifest.bundle_id, self.cfg.resume)
        if state is not None:
            log.info("resuming run %s at round %d", state.run_id, state.next_round)
            return state
        init = decode_tensors((Path(self.cfg.bundle) / self.manifest.files["adapters_init"].path).read_bytes())[0]
        rel = self.store.write_tensors("checkpoints/adapters_round_init.safetensors", init)
        state = RunState(run_id=self.cfg.run_id, bundle_id=self.manifest.bundle_id, adapters=rel)
        self.store.commit(state)
        (Path(self.cfg.out) / "serve_config.json").write_text(self.cfg.model_dump_json(indent=2))
        return state

    def run(self) -> RunState:
        from .progress import progress_bar

        state = self.initial_state()
        self.subscribe()
        # a retained end-of-run from an earlier run on this id would stop devices at once
        self.t.publish(topics.control_topic(self.cfg.run_id), b"", retain=True)
        bundle_ref = self.blobs.offer(f"bundle-{self.manifest.bundle_id[:16]}", pack_bundle(self.cfg.bundle))
        with progress_bar("federated rounds", self.cfg.rounds, self.show_progress) as bar:
            bar.advance(state.next_round)
            while state.next_round < self.cfg.rounds:
                record = self.run_round(state, bundle_ref)
                bar.advance(**{k: v for k, v in record.items() if k in ("fm_accuracy", "clients") and v is not None})
        end = EndOfRun(run_id=self.cfg.run_id, round_id=state.next_round, sender=CLOUD_SENDER)
        self.t.publish(topics.control_topic(self.cfg.run_id), encode(end), retain=True)
        return state

    def run_round(self, state: RunState, bundle_ref: BlobRef) -> dict:
        cfg = self.cfg
        r = state.next_round
        t0 = time.time()
        sent0, up0 = self.blobs.bytes_sent, self.bytes_up
        adapters = self.store.read_tensors(state.adapters)
        adapters_ref = self.blobs.offer(f"adapters-r{r}-{state.alignments}", encode_tensors(adapters, {"round": str(r)}))
        ffn_ref = None
        if state.ffn is not None:
            ffn_ref = self.blobs.offer(f"ffn-a{state.alignments}", (Path(cfg.out) / state.ffn).read_bytes())
        align_now = align_due(r, cfg.rounds, cfg.align_every) and bool(self.stat_layers) and self.aligner is not None
        tracker, reason = None, ""
        for attempt in range(cfg.max_round_retries + 1):
            online = self.wait_for_devices(cfg.min_clients, cfg.wait_for_clients)
            if len(online) < cfg.min_clients:
                reason = f"only {len(online)} of the {cfg.min_clients} devices needed are online"
                log.warning("round %d attempt %d: %s", r, attempt, reason)
                continue
            selected = sample_devices(online, round_rng(cfg.seed, r, attempt), cfg.clients_per_round, cfg.fraction, MAX_TASK_DEVICES)
            deadline = time.time() + cfg.round_timeout
            task = Task(
                run_id=cfg.run_id, round_id=r, sender=CLOUD_SENDER, devices=selected, bundle=bundle_ref,
                bundle_version=f"{self.manifest.bundle_id}:{self.manifest.bundle_version}", adapters=adapters_ref,
                ffn=ffn_ref, epochs=cfg.local_epochs, lr=cfg.lr, batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                report_stats=align_now, deadline=deadline, seed=cfg.seed * 100003 + r,
            )
            if self.signing_key is not None:
                task = sign(task, self.signing_key)
            self.round_id, self.task = r, task
            self.tracker = RoundTracker(selected, deadline, cfg.min_clients, ack_deadline=time.time() + cfg.task_ack_timeout)
            self._restore_accepted(r)
            self.t.publish(topics.round_topic(cfg.run_id), encode(task))
            log.info("round %d: task sent to %s", r, ", ".join(selected))
            while self.tracker.status(time.time()) is RoundStatus.WAITING:
                self.pump(1.0)
            tracker, self.tracker = self.tracker, None
            self._close_uploads(r)
            if tracker.status(time.time()) is not RoundStatus.FAILED:
                break
            missing = sorted(set(tracker.selected) - tracker.answered())
            failed = [f"{d}: {e}" for d, e in tracker.failed.items()]
            reason = (f"{len(tracker.accepted)} of {cfg.min_clients} required updates"
                      f"{'; no answer from ' + _some(missing, ', ') if missing else ''}"
                      f"{'; failed: ' + _some(failed, '; ') if failed else ''}")
            log.warning("round %d attempt %d below quorum: %s", r, attempt, reason)
            tracker = None
        record = {"round": r, "fm_accuracy": None, "fm_loss": None, "clients": 0, "devices": [], "aligned": False}
        if tracker is not None and (tracker.failed or tracker.given_up):
            record["failed"] = {**tracker.given_up, **tracker.failed}
        if tracker is None:
            record["skipped"] = reason
            log.warning("round %d skipped: %s", r, reason)
        else:
            names = sorted(tracker.accepted)
            accepted = [tracker.accepted[d] for d in names]
            updates, weights = self._bounded(r, names, accepted, adapters, state.history, record)
            adapters = aggregate(updates, weights, cfg.aggregator, cfg.trim_fraction)
            record.update(clients=len(accepted), devices=names, aggregator=cfg.aggregator,
                          train_loss=float(np.average([a.mean_loss or 0.0 for a in accepted], weights=weights)))
            state.adapters = self.store.write_tensors(f"checkpoints/adapters_round_{r:04d}.safetensors", adapters)
            stats = [a.stats for a in accepted if a.stats]
            if align_now and stats:
                ffn, info = self.aligner(adapters, sum_stats(stats), self.store.read_tensors(state.ffn) if state.ffn else None, r)
                record["alignment"] = info
                state.alignments += 1
                state.ffn = self.store.write_tensors(f"checkpoints/ffn_align_{state.alignments:03d}.safetensors", ffn)
                record["aligned"] = True
            if self.evaluator is not None:
                acc, loss = self.evaluator(adapters)
                record.update(fm_accuracy=acc, fm_loss=loss)
        record.update(bytes_up=self.bytes_up - up0, bytes_down=self.blobs.bytes_sent - sent0, seconds=round(time.time() - t0, 2))
        state.history.append(record)
        state.next_round = r + 1
        self.store.commit(state)
        acc = record["fm_accuracy"]
        log.info("round %d: %d clients, FM accuracy %s, loss %s, up %.2f MB, down %.2f MB, %.1fs%s", r, record["clients"],
                 f"{acc:.4f}" if acc is not None else "-", f"{record['fm_loss']:.4f}" if record["fm_loss"] is not None else "-",
                 record["bytes_up"] / 1e6, record["bytes_down"] / 1e6, record["seconds"], " (aligned)" if record["aligned"] else "")
        return record


def _some(items: list[str], sep: str, n: int = 10) -> str:
    """At most n items joined (a flood of silent devices must not make a line of megabytes)."""
    return sep.join(items[:n]) + (f"{sep}... ({len(items) - n} more)" if len(items) > n else "")


def align_due(round_id: int, rounds: int, every: int | None) -> bool:
    """Align after every `every`-th round, but never after the last one: no device would ever
    train on that proxy in this run, and its cost would be wasted."""
    return bool(every) and (round_id + 1) % every == 0 and round_id + 1 < rounds


def metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []
