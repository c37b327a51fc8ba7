"""The online device: announce, fetch blobs, train each task it is sent, upload, repeat.

Network handlers only enqueue; the agent's loop does the work, so a long training step never
blocks the MQTT client. Everything the device downloads or produces lives in its cache folder,
so a restarted device resumes downloads where they stopped and never trains a round twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import shutil
import time
from collections import deque
from pathlib import Path

from fedpft.shared import topics
from fedpft.shared.archive import unpack_bundle
from fedpft.shared.chunks import Reassembler
from fedpft.shared.config import AgentConfig
from fedpft.shared.manifest import BundleError, BundleManifest, verify_bundle
from fedpft.shared.messages import (
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
    make_update_id,
)
from fedpft.shared.signing import SignatureError, load_public_key, verify
from fedpft.shared.transport import Transport
from fedpft.shared.update import bind_update

from .blobs import STALL_SECONDS, AgentError, BlobFetcher, enqueue_chunk, take_event  # noqa: F401  (AgentError, STALL_SECONDS re-exported)

log = logging.getLogger("fedpft.agent")


class EdgeAgent:
    def __init__(self, cfg: AgentConfig, transport: Transport, trainer, num_samples: int):
        """trainer(bundle_dir, task, adapters_bytes, ffn_bytes) -> (update_bytes, Update fields dict)."""
        self.cfg = cfg
        self.t = transport
        self.trainer = trainer
        self.num_samples = num_samples
        self.run, self.me = cfg.run_id, cfg.device_id
        self.cache = Path(cfg.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.events: queue.Queue = queue.Queue()
        self.deferred: deque = deque()
        self.fetching: dict[str, Reassembler] = {}
        self.done_file = self.cache / f"done-{self.run}.json"
        self.done: dict[str, str] = json.loads(self.done_file.read_text()) if self.done_file.is_file() else {}
        self.bundle_version: str | None = None
        self.finished = False
        self.blobs = BlobFetcher(self.cache, self._request_chunks, self.next_event, self.deferred.extend, cfg.fetch_timeout)
        # The cloud's public key: unsigned or tampered tasks and bundles are refused.
        self.trusted = load_public_key(cfg.trust_key) if cfg.trust_key is not None else None
        if self.trusted is None:
            log.warning("no --trust-key: unsigned tasks and bundles are accepted (development mode)")

    # ------------------------------------------------------------------ handlers (dispatcher thread)
    def _on_json(self, topic: str, payload: bytes) -> None:
        if not payload:
            # a cleared retained message; on the control topic it is a cloud (re)starting the run,
            # and only a Hello makes this device eligible there: say hello now, not at the next heartbeat
            if topic == topics.control_topic(self.run):
                self.events.put(("cloud",))
            return
        try:
            msg = decode(payload)
            topics.check_sender(topic, msg.run_id, msg.sender)
        except ProtocolError as exc:
            log.warning("ignored message on %s: %s", topic, exc.reason)
            return
        self.events.put(("msg", msg))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        enqueue_chunk(self.events, topic, payload)

    # ------------------------------------------------------------------ wire helpers
    def _pub(self, kind: str, msg) -> None:
        self.t.publish(topics.device_topic(self.run, self.me, kind), encode(msg), retain=kind == topics.PRESENCE)

    def hello(self) -> None:
        self._pub(topics.HELLO, Hello(run_id=self.run, sender=self.me, device_id=self.me, num_samples=self.num_samples,
                                      bundle_version=self.bundle_version, capabilities={"runtime": "onnxruntime-training"}))

    def start(self) -> None:
        self.t.subscribe(topics.round_topic(self.run), self._on_json)
        self.t.subscribe(topics.control_topic(self.run), self._on_json)
        self.t.subscribe(topics.device_topic(self.run, self.me, topics.INBOX), self._on_json)
        self.t.subscribe(topics.resend_pattern(self.run, self.me), self._on_chunk)
        self.t.subscribe(topics.blob_pattern(self.run), self._on_chunk)  # round blobs, broadcast before their Task
        self._pub(topics.PRESENCE, Presence(run_id=self.run, sender=self.me, device_id=self.me, status="online"))
        self.hello()

    def next_event(self, timeout: float):
        return take_event(self.events, self.deferred, timeout)

    # ------------------------------------------------------------------ main loop
    def serve(self) -> int:
        """Run until the cloud ends the run; returns the number of rounds trained."""
        self.start()
        trained = 0
        last_hello = time.time()
        while not self.finished:
            ev = self.next_event(1.0)
            if time.time() - last_hello > self.cfg.heartbeat:
                self.hello()  # heartbeat: also re-announces after a reconnect
                last_hello = time.time()
            if ev is not None and ev[0] == "cloud":
                self.hello()
                last_hello = time.time()
            if ev is not None and ev[0] == "chunk":
                self.blobs.keep(ev[1])  # a broadcast blob ahead of its Task (or a stray re-send)
            if ev is None or ev[0] != "msg":
                continue
            msg = ev[1]
            if isinstance(msg, EndOfRun):
                log.info("run %s ended by the cloud: %s", self.run, msg.reason)
                self.finished = True
            elif isinstance(msg, Task) and self.me in msg.devices:
                trained += self.handle_task(msg)
        return trained

    def handle_task(self, task: Task) -> int:
        key = f"{task.round_id}"
        if time.time() > task.deadline:
            log.warning("task for round %d arrived after its deadline; skipped", task.round_id)
            return 0
        # the ack tells the cloud this device is alive and working on it (devices that never ack
        # are not waited for), so it goes out before anything slow
        self._pub(topics.ACK, Ack(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me, acked="task",
                                      task_id=task.task_id))
        if key in self.done and Path(self.done[key]).is_file():
            log.info("round %d already trained; re-sending the stored update", task.round_id)
            self.upload(task, Path(self.done[key]).read_bytes(), json.loads(Path(self.done[key] + ".json").read_text()))
            return 0
        try:
            self.check_signed(task, f"task for round {task.round_id}")
            bundle_dir = self.ensure_bundle(task.bundle)
            adapters = self.fetch(task.adapters)
            ffn = self.fetch(task.ffn) if task.ffn is not None else None
            update, fields = self.trainer(bundle_dir, task, adapters, ffn)
        except Exception as exc:  # noqa: BLE001 - any failure is this round's, reported; the device stays for the next
            # TrainError (divergence), DataError (no usable sample), bundle/signature/fetch faults
            # are expected and need no traceback; anything else is a bug worth one
            # (their own messages say what failed; the others are named by their type)
            plain = isinstance(exc, (AgentError, BundleError, ProtocolError, SignatureError, ValueError, OSError))
            expected = plain or type(exc).__name__ in ("TrainError", "DataError")
            text = str(getattr(exc, "reason", exc))
            reason = (text if plain else f"{type(exc).__name__}: {text}").splitlines()[0][:500]
            log.error("round %d failed: %s", task.round_id, reason, exc_info=not expected)
            self.report_failure(task, reason)
            return 0
        path = self.cache / "updates" / f"{self.run}-round{task.round_id:04d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(update)
        Path(str(path) + ".json").write_text(json.dumps(fields))
        self.done[key] = str(path)
        self.done_file.write_text(json.dumps(self.done))
        self.upload(task, update, fields)
        return 1

    def report_failure(self, task: Task, reason: str) -> None:
        """An Update carrying the error, so the cloud counts this device out now, not at the deadline."""
        uid = make_update_id(self.run, task.round_id, self.me, task.task_id, None)
        self._pub(topics.UPDATE, Update(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me, error=reason,
                                        task_id=task.task_id, update_id=uid))

    def upload(self, task: Task, data: bytes, fields: dict) -> None:
        from fedpft.shared.chunks import BlobSource

        # bound to the task it answers, inside the blob itself: the same bytes replayed under
        # another round's message are refused by the cloud
        data = bind_update(data, self.run, task.round_id, self.me, task.task_id)
        sha = hashlib.sha256(data).hexdigest()
        src = BlobSource(f"upd-{self.me}-r{task.round_id}-{sha[:10]}", data)
        uid = make_update_id(self.run, task.round_id, self.me, task.task_id, sha)
        msg = Update(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me, blob=src.ref,
                     task_id=task.task_id, update_id=uid, **fields)
        for attempt in range(self.cfg.max_retries + 1):
            # the Update first: the cloud then checks every chunk against its hash and size on arrival
            self._pub(topics.UPDATE, msg)
            for payload in src.payloads():
                self.t.publish(topics.upload_topic(self.run, self.me, src.blob_id), payload)
            ack = self.wait_ack(uid, self.cfg.ack_timeout)
            if ack is not None:
                if ack.ok:
                    log.info("round %d: update %s accepted%s", task.round_id, uid[:12], f" ({ack.reason})" if ack.reason else "")
                else:
                    log.warning("round %d: update %s refused: %s", task.round_id, uid[:12], ack.reason)
                return
            log.warning("round %d: no receipt for update %s after %.0fs (attempt %d)", task.round_id, uid[:12], self.cfg.ack_timeout, attempt + 1)

    def wait_ack(self, update_id: str, timeout: float) -> Ack | None:
        """The cloud's receipt naming this update; receipts about other submissions (a replay
        someone sent in this device's name) are logged and ignored."""
        end = time.time() + timeout
        held = []
        try:
            while time.time() < end:
                ev = self.next_event(min(1.0, max(0.0, end - time.time())))
                if ev is None:
                    continue
                msg = ev[1] if ev[0] == "msg" else None
                if isinstance(msg, Ack) and msg.acked == "update":
                    if msg.update_id == update_id:
                        return msg
                    log.info("ignored a receipt for update %s (not this device's current submission): %s",
                             (msg.update_id or "-")[:12], "ok" if msg.ok else msg.reason)
                    continue
                if ev[0] == "msg":
                    held.append(ev)
                elif ev[0] == "chunk":
                    self.blobs.keep(ev[1])  # the next round's broadcast, if this receipt is late
            return None
        finally:
            self.deferred.extend(held)

    def check_signed(self, record: Task | BundleManifest, what: str) -> None:
        """SignatureError unless signed by the trusted key; everything passes without one."""
        if self.trusted is not None:
            verify(record, self.trusted, what)

    # ------------------------------------------------------------------ blobs
    def fetch(self, ref: BlobRef) -> bytes:
        """Download a blob (resuming from the cache), verifying every chunk and the whole."""
        return self.blobs.fetch(ref)

    def _request_chunks(self, ref: BlobRef, missing: list[int]) -> None:
        self._pub(topics.BLOBREQ, BlobRequest(run_id=self.run, sender=self.me, device_id=self.me, blob_id=ref.blob_id, missing=missing))

    def ensure_bundle(self, ref: BlobRef) -> Path:
        folder = self.cache / "bundles" / ref.sha256[:16]
        if folder.is_dir():
            try:
                m = verify_bundle(folder, device_only=True)
                self.check_signed(m, "cached bundle")
                self.bundle_version = f"{m.bundle_id}:{m.bundle_version}"
                return folder
            except (BundleError, SignatureError) as exc:
                log.warning("cached bundle failed verification (%s); fetching again", exc)
        data = self.fetch(ref)
        m: BundleManifest = unpack_bundle(data, folder)
        (self.cache / "blobs" / ref.sha256).unlink(missing_ok=True)  # the unpacked folder is the cache
        try:
            self.check_signed(m, f"bundle {m.bundle_id[:12]}")
        except SignatureError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.bundle_version = f"{m.bundle_id}:{m.bundle_version}"
        log.info("bundle %s v%d installed", m.bundle_id[:12], m.bundle_version)
        return folder
