"""`fedpft-edge fleet`: a device that installs the bundle versions rolled out to it, and says so.

The device keeps two versions in `cache/versions/<bundle_id>/`: the current one and the one
before it, named by a small pointer file (`cache/fleet.json`, written atomically). A rollout
downloads the bundle (resumable chunks, `BlobFetcher`), unpacks it (sha256 of every device file
checked against the manifest), checks the manifest's signature when the device trusts a key, and
only then moves the pointers; anything wrong leaves the current version current. A rollback
swaps the pointers back. Every state change is published as a retained `DeviceStatus`; a final
one (installed/failed) naming the rollout is the ack the cloud waits for.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from fedpft.shared import topics
from fedpft.shared.archive import unpack_bundle
from fedpft.shared.config import FleetConfig
from fedpft.shared.manifest import BundleError, BundleManifest, verify_bundle
from fedpft.shared.messages import (
    BlobRef, BlobRequest, BundleVersion, DeviceStatus, Presence, ProtocolError, Rollout, decode, encode,
)
from fedpft.shared.signing import SignatureError, load_public_key, verify
from fedpft.shared.transport import Transport, TransportError

from .blobs import AgentError, BlobFetcher, enqueue_chunk, take_event

log = logging.getLogger("fedpft.fleet")

POINTERS_NAME = "fleet.json"


class Stopped(Exception):
    """SIGTERM (or the caller) asked the agent to stop."""


# ---- version pointers (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Pointers:
    current: BundleVersion | None = None
    previous: BundleVersion | None = None

    def installed(self, new: BundleVersion) -> "Pointers":
        """After installing `new`: it is current, the old current is kept as previous."""
        return self if new == self.current else Pointers(current=new, previous=self.current)

    def rolled_back(self, target: BundleVersion) -> "Pointers":
        """Back to `target`, which must be the kept previous version (or already current)."""
        if target == self.current:
            return self
        if target != self.previous:
            raise AgentError(f"cannot roll back to {target}: this device keeps {self.previous or 'no previous version'}"
                             f" (current {self.current or 'none'})")
        return Pointers(current=self.previous, previous=self.current)

    def kept(self) -> set[str]:
        return {v.bundle_id for v in (self.current, self.previous) if v is not None}


def load_pointers(path: Path) -> Pointers:
    if not Path(path).is_file():
        return Pointers()
    try:
        data = json.loads(Path(path).read_text())
        return Pointers(*(BundleVersion(**data[k]) if data.get(k) else None for k in ("current", "previous")))
    except (ValueError, TypeError, KeyError) as exc:
        raise AgentError(f"{path}: unreadable version pointers ({exc}); remove it to start over") from None


def save_pointers(path: Path, p: Pointers) -> None:
    """temp + fsync + rename: a crash leaves the old pointers or the new, never half of either."""
    data = {k: v.model_dump() if v is not None else None for k, v in (("current", p.current), ("previous", p.previous))}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- the agent ------------------------------------------------------------------------------------


class FleetAgent:
    def __init__(self, cfg: FleetConfig, transport: Transport, stop: threading.Event | None = None):
        self.cfg, self.t = cfg, transport
        self.fleet, self.me = cfg.fleet, cfg.device_id
        self.stop = stop or threading.Event()
        self.cache = Path(cfg.cache)
        self.versions = self.cache / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.pointers_file = self.cache / POINTERS_NAME
        self.pointers = load_pointers(self.pointers_file)
        self.events: queue.Queue = queue.Queue()
        self.deferred: deque = deque()
        self.blobs = BlobFetcher(self.cache, self._request_chunks, self.next_event, self.deferred.extend, cfg.fetch_timeout)
        self.state = "installed" if self.pointers.current else "idle"
        self.rollout_id: str | None = None
        self.reason: str | None = None
        self.trusted = load_public_key(cfg.trust_key) if cfg.trust_key is not None else None
        if self.trusted is None:
            log.warning("no --trust-key: unsigned rollouts and bundles are accepted (development mode)")

    # ------------------------------------------------------------------ handlers (dispatcher thread)
    def _on_json(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            msg = decode(payload)
            topics.check_fleet_sender(topic, msg.run_id, msg.sender)
            if not isinstance(msg, Rollout):
                raise ProtocolError(f"a {msg.type} message does not belong on the rollout topic")
        except ProtocolError as exc:
            log.warning("ignored message on %s: %s", topic, exc.reason)
            return
        self.events.put(("msg", msg))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        enqueue_chunk(self.events, topic, payload)

    # ------------------------------------------------------------------ wire
    def _pub(self, kind: str, msg, retain: bool = False) -> None:
        self.t.publish(topics.fleet_device_topic(self.fleet, self.me, kind), encode(msg), retain=retain)

    def _request_chunks(self, ref: BlobRef, missing: list[int]) -> None:
        self._pub(topics.BLOBREQ, BlobRequest(run_id=self.fleet, sender=self.me, device_id=self.me, blob_id=ref.blob_id, missing=missing))

    def status(self) -> DeviceStatus:
        return DeviceStatus(run_id=self.fleet, sender=self.me, device_id=self.me, cohort=self.cfg.cohort, installed=self.pointers.current,
                            previous=self.pointers.previous, state=self.state, rollout_id=self.rollout_id, reason=self.reason)

    def publish_status(self) -> None:
        self._pub(topics.STATUS, self.status(), retain=True)

    def start(self) -> None:
        self.t.subscribe(topics.rollout_topic(self.fleet), self._on_json)
        self.t.subscribe(topics.fleet_resend_pattern(self.fleet, self.me), self._on_chunk)
        self._pub(topics.PRESENCE, Presence(run_id=self.fleet, sender=self.me, device_id=self.me, status="online"), retain=True)
        self.publish_status()

    def next_event(self, timeout: float):
        if self.stop.is_set():
            raise Stopped()
        return take_event(self.events, self.deferred, timeout)

    # ------------------------------------------------------------------ main loop
    def serve(self) -> None:
        """Handle rollouts until `stop` is set; re-publish the status every heartbeat."""
        self.start()
        last = time.time()
        try:
            while True:
                ev = self.next_event(0.5)
                if time.time() - last > self.cfg.heartbeat:
                    self.publish_status()  # keeps "last seen" fresh; re-announces after a reconnect
                    last = time.time()
                if ev is not None and ev[0] == "msg":
                    self.handle(ev[1])
        except Stopped:
            log.info("stopping")
            if self.state == "installing":
                self.state, self.reason = "failed", "stopped during the install"
                self.publish_status()

    def handle(self, r: Rollout) -> None:
        if not r.addresses(self.me, self.cfg.cohort):
            return
        if r.rollout_id == self.rollout_id:
            return self.publish_status()  # a redelivered rollout: ack again, act once
        if time.time() > r.deadline:
            log.warning("rollout %s arrived after its deadline; ignored", r.rollout_id)
            return
        self.rollout_id, self.reason = r.rollout_id, None
        try:
            if self.trusted is not None:
                verify(r, self.trusted, f"rollout {r.rollout_id}")
            if r.rollback:
                self._set_pointers(self.pointers.rolled_back(r.target))
            else:
                self.state = "installing"
                self.publish_status()
                self._install(r)
            self.state = "installed"
            log.info("rollout %s: %s installed (previous: %s)", r.rollout_id, self.pointers.current, self.pointers.previous or "none")
        except Stopped:
            raise
        except (AgentError, BundleError, ProtocolError, SignatureError, OSError) as exc:
            self.state, self.reason = "failed", str(getattr(exc, "reason", exc)).splitlines()[0]
            log.error("rollout %s failed: %s", r.rollout_id, self.reason)
        self.publish_status()

    def _install(self, r: Rollout) -> None:
        target = r.target
        if target == self.pointers.current:
            return
        folder = self.versions / target.bundle_id
        try:
            self._check(verify_bundle(folder, device_only=True), target)  # kept from before: no download
        except (BundleError, SignatureError, AgentError):
            assert r.bundle is not None
            data = self.blobs.fetch(r.bundle)
            staging = self.versions / f".incoming-{target.bundle_id}"
            manifest = unpack_bundle(data, staging)  # BundleError unless every file matches its sha256
            self.blobs.forget(r.bundle)
            try:
                self._check(manifest, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        self._set_pointers(self.pointers.installed(target))

    def _check(self, m: BundleManifest, target: BundleVersion) -> None:
        got = BundleVersion(bundle_id=m.bundle_id, bundle_version=m.bundle_version) if m.bundle_id == target.bundle_id else None
        if got != target:
            raise AgentError(f"bundle is {m.bundle_id[:12]} v{m.bundle_version}, the rollout announced {target}")
        if self.trusted is not None:
            verify(m, self.trusted, f"bundle {m.bundle_id[:12]}")

    def _set_pointers(self, p: Pointers) -> None:
        save_pointers(self.pointers_file, p)
        self.pointers = p
        for d in self.versions.iterdir():  # keep two versions, drop the rest
            if d.is_dir() and d.name not in p.kept():
                shutil.rmtree(d, ignore_errors=True)


def run_fleet(cfg: FleetConfig, stop: threading.Event) -> Pointers:
    """Connect (retained offline presence as the last will), serve rollouts until `stop`, say goodbye."""
    from .online import connect_with_backoff

    presence_topic = topics.fleet_device_topic(cfg.fleet, cfg.device_id, topics.PRESENCE)

    def offline(reason: str) -> bytes:
        return encode(Presence(run_id=cfg.fleet, sender=cfg.device_id, device_id=cfg.device_id, status="offline", reason=reason))

    will = (presence_topic, offline("connection lost"))
    transport = connect_with_backoff(cfg, client_id=f"fedpft-fleet-{cfg.fleet}-{cfg.device_id}", will=will)
    try:
        agent = FleetAgent(cfg, transport, stop)
        agent.serve()
        return agent.pointers
    finally:
        try:
            transport.publish(presence_topic, offline("stopped"), retain=True)
        except TransportError:
            pass
        transport.close()
