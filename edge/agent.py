"""The round agent: announce, train each task it is sent, upload, repeat, until the cloud ends the run.

Its link (`edge/link.py`) does the wire, the downloads, the trust checks and the bundle install;
this module holds what a round needs: the Hello, the task's ack, training, the upload and its
receipt. Everything the device produces lives in its cache folder, so a restarted device resumes
downloads where they stopped and never trains a round twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path

from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource
from fedpft.shared.config import AgentConfig
from fedpft.shared.fsio import atomic_write
from fedpft.shared.manifest import BundleError, BundleManifest
from fedpft.shared.messages import (
    Ack, EndOfRun, Hello, ProtocolError, Task, Update, make_update_id,
)
from fedpft.shared.routes import check_route
from fedpft.shared.signing import SignatureError
from fedpft.shared.transport import Transport
from fedpft.shared.update import bind_update

from .backoff import QUEUED_MAX_WAIT, busy_wait, receipt_wait
from .blobs import AgentError
from .link import Address, DeviceLink
from .secure_task import SecureTask, clipped_update

log = logging.getLogger("fedpft.agent")


def run_address(run: str, me: str) -> Address:
    """A run's device: tasks on the round topic, EndOfRun on the control topic (whose clearing
    means a cloud is (re)starting the run), receipts in its inbox."""
    return Address(space=run, device_id=me, topic=lambda kind: topics.device_topic(run, me, kind),
                   listen=(topics.round_topic(run), topics.control_topic(run), topics.device_topic(run, me, topics.INBOX),
                           topics.secagg_topic(run)),
                   resend=topics.resend_pattern(run, me), check=check_route, retained=frozenset({topics.PRESENCE}),
                   wake=topics.control_topic(run), broadcast=topics.blob_pattern(run))


class EdgeAgent:
    def __init__(self, cfg: AgentConfig, transport: Transport, trainer, num_samples: int):
        """trainer(bundle_dir, task, adapters_bytes, ffn_bytes) -> (update_bytes, Update fields dict)."""
        self.cfg = cfg
        self.trainer = trainer
        self.num_samples = num_samples
        self.run, self.me = cfg.run_id, cfg.device_id
        self.link = DeviceLink(transport, run_address(self.run, self.me), cfg.cache, trust_key=cfg.trust_key,
                               fetch_timeout=cfg.fetch_timeout, signed="tasks", log=log)
        self.cache = self.link.cache
        self.done_file = self.cache / f"done-{self.run}.json"
        self.done: dict[str, str] = json.loads(self.done_file.read_text()) if self.done_file.is_file() else {}
        self.bundle_version: str | None = None
        self.finished = False
        self.trained = 0
        self._retry_rng = random.Random()  # each device its own draws: the point is that they differ

    def hello(self) -> None:
        self.link.publish(topics.HELLO, Hello(run_id=self.run, sender=self.me, device_id=self.me, num_samples=self.num_samples,
                                              bundle_version=self.bundle_version, capabilities={"runtime": "onnxruntime-training"}))

    def serve(self) -> int:
        """Run until the cloud ends the run; returns the number of rounds trained."""
        self.link.start()
        self.hello()
        # the Hello is the heartbeat: it also re-announces after a reconnect, and a restarting
        # cloud (its wake) counts only devices that said hello since
        self.link.serve(self.handle, self.hello, self.cfg.heartbeat, 1.0, running=lambda: not self.finished)
        return self.trained

    def handle(self, msg) -> None:
        if isinstance(msg, EndOfRun):
            log.info("run %s ended by the cloud: %s", self.run, msg.reason)
            self.finished = True
        elif isinstance(msg, Task) and self.me in msg.devices:
            self.trained += self.handle_task(msg)

    def handle_task(self, task: Task) -> int:
        """Train the task (or re-send the update already trained for its round); 1 if trained now."""
        if time.time() > task.deadline:
            log.warning("task for round %d arrived after its deadline; skipped", task.round_id)
            return 0
        # the ack tells the cloud this device is alive and working on it (devices that never ack
        # are not waited for), so it goes out before anything slow
        self.link.publish(topics.ACK, Ack(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me, acked="task",
                                          task_id=task.task_id))
        try:
            if task.privacy is not None and task.privacy.secure_agg:
                return SecureTask(self, task).run(self._trained)
            update, fields, trained = self._trained(task)
            if task.privacy is not None and task.privacy.clip is not None:
                update = self._clipped(task, update, task.privacy.clip)
        except Exception as exc:  # noqa: BLE001 - any failure is this round's, reported; the device stays for the next
            self.report_failure(task, _failure_line(task, exc))
            return 0
        self.upload(task, update, fields)
        return trained

    def _trained(self, task: Task) -> tuple[bytes, dict, int]:
        """(update, its Update fields, 1 if trained now): the round's stored update when there is one."""
        key = f"{task.round_id}"
        if key in self.done and Path(self.done[key]).is_file():
            log.info("round %d already trained; re-sending the stored update", task.round_id)
            return Path(self.done[key]).read_bytes(), json.loads(Path(self.done[key] + ".json").read_text()), 0
        update, fields = self._train(task)
        path = self.cache / "updates" / f"{self.run}-round{task.round_id:04d}.safetensors"
        # the update and its fields before the done file that names them: a crash in between
        # trains the round again rather than re-sending half an update
        atomic_write(path, update)
        atomic_write(Path(str(path) + ".json"), json.dumps(fields).encode())
        self.done[key] = str(path)
        atomic_write(self.done_file, json.dumps(self.done).encode())
        return update, fields, 1

    def _clipped(self, task: Task, update: bytes, clip: float) -> bytes:
        bundle_dir = self.cache / "bundles" / task.bundle.sha256[:16]
        return clipped_update(update, self.link.fetch(task.adapters), BundleManifest.load(bundle_dir), clip)

    def _train(self, task: Task) -> tuple[bytes, dict]:
        self.link.check_signed(task, f"task for round {task.round_id}")
        bundle_dir = self.cache / "bundles" / task.bundle.sha256[:16]
        m = self.link.install_bundle(task.bundle, bundle_dir)
        if self.bundle_version != (version := f"{m.bundle_id}:{m.bundle_version}"):
            log.info("bundle %s v%d installed", m.bundle_id[:12], m.bundle_version)
            self.bundle_version = version
        adapters = self.link.fetch(task.adapters)
        ffn = self.link.fetch(task.ffn) if task.ffn is not None else None
        return self.trainer(bundle_dir, task, adapters, ffn)

    def report_failure(self, task: Task, reason: str) -> None:
        """An Update carrying the error, so the cloud counts this device out now, not at the deadline."""
        uid = make_update_id(self.run, task.round_id, self.me, task.task_id, None)
        self.link.publish(topics.UPDATE, Update(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me,
                                                error=reason, task_id=task.task_id, update_id=uid))

    def upload(self, task: Task, data: bytes, fields: dict) -> None:
        # bound to the task it answers, inside the blob itself: the same bytes replayed under
        # another round's message are refused by the cloud
        data = bind_update(data, self.run, task.round_id, self.me, task.task_id)
        sha = hashlib.sha256(data).hexdigest()
        src = BlobSource(f"upd-{self.me}-r{task.round_id}-{sha[:10]}", data)
        uid = make_update_id(self.run, task.round_id, self.me, task.task_id, sha)
        msg = Update(run_id=self.run, round_id=task.round_id, sender=self.me, device_id=self.me, blob=src.ref,
                     task_id=task.task_id, update_id=uid, **fields)
        attempt = 0
        while attempt <= self.cfg.max_retries:
            # the Update first: the cloud then checks every chunk against its hash and size on arrival
            self.link.publish(topics.UPDATE, msg)
            for payload in src.payloads():
                self.link.t.publish(topics.upload_topic(self.run, self.me, src.blob_id), payload)
            wait = receipt_wait(self.cfg.ack_timeout, attempt, self._retry_rng)
            ack = self.wait_ack(uid, wait)
            if ack is not None and ack.acked == "busy":
                # the cloud dropped the bytes for want of room and asks for them again soon: not a
                # failed attempt, so it costs no retry; the round's deadline bounds how often
                delay = busy_wait(ack.retry_after, self._retry_rng)
                if time.time() + delay >= task.deadline:
                    log.warning("round %d: update %s turned away by a busy cloud, and the round ends before it could "
                                "be sent again (%s)", task.round_id, uid[:12], ack.reason)
                    return
                log.info("round %d: update %s turned away by a busy cloud; uploading it again in %.1fs",
                         task.round_id, uid[:12], delay)
                time.sleep(delay)
                continue
            if ack is not None:
                if ack.ok:
                    log.info("round %d: update %s accepted%s", task.round_id, uid[:12], f" ({ack.reason})" if ack.reason else "")
                else:
                    log.warning("round %d: update %s refused: %s", task.round_id, uid[:12], ack.reason)
                return
            log.warning("round %d: no receipt for update %s after %.0fs (attempt %d)", task.round_id, uid[:12], wait, attempt + 1)
            attempt += 1

    def wait_ack(self, update_id: str, timeout: float) -> Ack | None:
        """The cloud's receipt naming this update, or its "busy" notice (upload it again soon);
        receipts about other submissions (a replay someone sent in this device's name) are logged
        and ignored. A "queued" notice for this
        update (it arrived whole; its checks wait behind others) stretches the wait to QUEUED_MAX_WAIT
        times `timeout`: the receipt is on its way, and uploading the same bytes again would only
        lengthen the queue; the cap keeps a cloud that never answers from holding the device."""
        start = time.time()
        end = start + timeout
        held = []
        try:
            while time.time() < end:
                ev = self.link.next_event(min(1.0, max(0.0, end - time.time())))
                msg = ev[1] if ev is not None and ev[0] == "msg" else None
                if isinstance(msg, Ack) and msg.acked == "queued":
                    if msg.update_id == update_id and end < start + QUEUED_MAX_WAIT * timeout:
                        end = start + QUEUED_MAX_WAIT * timeout
                        log.info("update %s queued at the cloud (%s); waiting up to %.0fs for its receipt",
                                 update_id[:12], msg.reason or "-", end - start)
                elif isinstance(msg, Ack) and msg.acked in ("update", "busy"):
                    if msg.update_id == update_id:
                        return msg
                    log.info("ignored a receipt for update %s (not this device's current submission): %s",
                             (msg.update_id or "-")[:12], "ok" if msg.ok else msg.reason)
                elif msg is not None:
                    held.append(ev)
                elif ev is not None and ev[0] == "chunk":
                    self.link.blobs.keep(ev[1])  # the next round's broadcast, if this receipt is late
            return None
        finally:
            self.link.hold(held)


def _failure_line(task: Task, exc: Exception) -> str:
    """The one line a failed round is reported with, logged (with a traceback only for a bug)."""
    # TrainError (divergence), DataError (no usable sample), bundle/signature/fetch faults are
    # expected and their own messages say what failed; anything else is named by its type
    plain = isinstance(exc, (AgentError, BundleError, ProtocolError, SignatureError, ValueError, OSError))
    expected = plain or type(exc).__name__ in ("TrainError", "DataError")
    text = str(getattr(exc, "reason", exc))
    reason = (text if plain else f"{type(exc).__name__}: {text}").splitlines()[0][:500]
    log.error("round %d failed: %s", task.round_id, reason, exc_info=not expected)
    return reason


def run_online(cfg: AgentConfig) -> int:
    """`fedpft-edge train --broker ...`: connect, serve the run's tasks, say goodbye; rounds trained."""
    from .connection import connected
    from .task_training import make_trainer, rough_sample_count

    with connected(cfg, run_address(cfg.run_id, cfg.device_id), f"fedpft-{cfg.run_id}-{cfg.device_id}", "run ended") as transport:
        return EdgeAgent(cfg, transport, make_trainer(cfg), rough_sample_count(cfg.data)).serve()
