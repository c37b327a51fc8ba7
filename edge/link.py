"""One device's link to the cloud: inbox, publishing, blob downloads, trust, heartbeat, bundle install.

The round agent (`edge/agent.py`) and the fleet agent (`edge/fleet.py`) each hold one and keep
only their own logic. An `Address` says where a device speaks and listens (a run's topics or a
fleet's) and which messages it accepts there; everything else is the same for both.

Network handlers only enqueue (paho's thread must never train or raise); the agent's loop takes
events with `next_event` and does the work, so a long step never blocks the MQTT client.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpft.shared import topics
from fedpft.shared.archive import unpack_bundle
from fedpft.shared.chunks import Chunk
from fedpft.shared.manifest import BundleError, BundleManifest, verify_bundle
from fedpft.shared.messages import BlobRef, BlobRequest, Presence, ProtocolError, decode, encode
from fedpft.shared.signing import SignatureError, load_public_key, verify
from fedpft.shared.transport import Transport

from .blobs import AgentError, BlobFetcher


class Stopped(Exception):
    """SIGTERM (or the caller) asked the agent to stop."""


@dataclass(frozen=True)
class Address:
    """Where one device speaks and listens, and what it accepts there.

    space: the run id (or fleet name) every message carries as its run_id.
    topic(kind): this device's own topic of that kind.
    listen: the JSON topics to subscribe; resend: the pattern its blob chunks come on.
    check(topic, msg): ProtocolError unless `msg` may arrive on `topic` (`shared/routes.py`).
    retained: kinds published retained (the cloud reads them on connecting).
    wake: the topic whose cleared retained message means the cloud (re)started the run.
    broadcast: the pattern of blob chunks the cloud sends to every device (a round's blobs, just
    before its Task); they are kept for the fetch that will want them.
    """

    space: str
    device_id: str
    topic: Callable[[str], str]
    listen: tuple[str, ...]
    resend: str
    check: Callable[[str, object], object]
    retained: frozenset[str] = frozenset()
    wake: str | None = None
    broadcast: str | None = None

    def presence(self, status: str, reason: str | None = None) -> Presence:
        return Presence(run_id=self.space, sender=self.device_id, device_id=self.device_id, status=status, reason=reason)


class DeviceLink:
    """A connected transport seen as one device: `start`, `publish`, `next_event`, `fetch`,
    `check_signed`, `install_bundle`, and `serve` (the event loop with its heartbeat).

    Events are ("msg", Message), ("chunk", Chunk) or ("wake",); events a blob download or an
    agent's wait passed over are handed back with `hold` and come out first, in order.
    """

    def __init__(self, transport: Transport, address: Address, cache: Path, *, trust_key: Path | None, fetch_timeout: float,
                 signed: str, log: logging.Logger, stop: threading.Event | None = None) -> None:
        self.t, self.address, self.log = transport, address, log
        self.me = address.device_id
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.stop = stop or threading.Event()
        self.events: queue.Queue = queue.Queue()
        self.deferred: deque = deque()
        self.blobs = BlobFetcher(self.cache, self._request_chunks, self.next_event, self.hold, fetch_timeout)
        # The cloud's public key: unsigned or tampered `signed` things and bundles are refused.
        self.trusted = load_public_key(trust_key) if trust_key is not None else None
        if self.trusted is None:
            log.warning("no --trust-key: unsigned %s and bundles are accepted (development mode)", signed)

    # ------------------------------------------------------------------ handlers (dispatcher thread)
    def _on_json(self, topic: str, payload: bytes) -> None:
        if not payload:
            # a cleared retained message; on the wake topic the cloud is (re)starting the run
            if topic == self.address.wake:
                self.events.put(("wake",))
            return
        try:
            msg = decode(payload)
            self.address.check(topic, msg)
        except ProtocolError as exc:
            self.log.warning("ignored message on %s: %s", topic, exc.reason)
            return
        self.events.put(("msg", msg))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        try:
            self.events.put(("chunk", Chunk.from_bytes(payload)))
        except ProtocolError as exc:
            self.log.warning("ignored chunk on %s: %s", topic, exc.reason)

    # ------------------------------------------------------------------ wire
    def start(self) -> None:
        """Listen, then say (retained, where the address keeps presence) that the device is online."""
        for topic in self.address.listen:
            self.t.subscribe(topic, self._on_json)
        self.t.subscribe(self.address.resend, self._on_chunk)
        if self.address.broadcast is not None:
            self.t.subscribe(self.address.broadcast, self._on_chunk)
        self.publish(topics.PRESENCE, self.address.presence("online"))

    def publish(self, kind: str, msg) -> None:
        self.t.publish(self.address.topic(kind), encode(msg), retain=kind in self.address.retained)

    def next_event(self, timeout: float):
        """The next event (the held-back ones first); None on timeout; Stopped once `stop` is set."""
        if self.stop.is_set():
            raise Stopped()
        if self.deferred:
            return self.deferred.popleft()
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def hold(self, events: list) -> None:
        self.deferred.extend(events)

    def serve(self, handle: Callable[[object], None], beat: Callable[[], None], every: float, poll: float,
              running: Callable[[], bool] = lambda: True) -> None:
        """Hand each message to `handle` while `running()`; `beat()` every `every` seconds (keeps
        the cloud's "last seen" fresh and re-announces after a reconnect) and on a wake."""
        last = time.time()
        while running():
            ev = self.next_event(poll)
            if time.time() - last > every or (ev is not None and ev[0] == "wake"):
                beat()
                last = time.time()
            if ev is not None and ev[0] == "msg":
                handle(ev[1])
            elif ev is not None and ev[0] == "chunk":
                self.blobs.keep(ev[1])  # a broadcast blob ahead of its Task (or a stray re-send)

    # ------------------------------------------------------------------ blobs, trust, bundles
    def _request_chunks(self, ref: BlobRef, missing: list[int]) -> None:
        self.publish(topics.BLOBREQ, BlobRequest(run_id=self.address.space, sender=self.me, device_id=self.me, blob_id=ref.blob_id,
                                                 missing=missing))

    def fetch(self, ref: BlobRef) -> bytes:
        """Download a blob (resuming from the cache), verifying every chunk and the whole."""
        return self.blobs.fetch(ref)

    def check_signed(self, record, what: str) -> None:
        """SignatureError unless signed by the trusted key; everything passes without one."""
        if self.trusted is not None:
            verify(record, self.trusted, what)

    def install_bundle(self, ref: BlobRef | None, folder: Path, expect: Callable[[BundleManifest], None] = lambda m: None) -> BundleManifest:
        """The verified, trusted bundle in `folder`: the one already there if it passes, else `ref`
        downloaded, unpacked (sha256 of every device file checked) and checked aside, then moved in.

        expect(manifest): raises unless it is the bundle the caller was promised. Whatever fails
        leaves nothing half-installed in `folder`'s place.
        """
        if folder.is_dir():
            try:
                return self._trusted(verify_bundle(folder, device_only=True), expect)
            except (BundleError, SignatureError, AgentError) as exc:
                self.log.warning("cached bundle failed verification (%s); fetching again", exc)
        if ref is None:
            raise AgentError(f"bundle {folder.name} is not here and nothing says where to fetch it")
        staging = folder.parent / f".incoming-{folder.name}"
        manifest = unpack_bundle(self.fetch(ref), staging)  # BundleError unless every file matches its sha256
        self.blobs.forget(ref)  # the unpacked folder is the cache
        try:
            self._trusted(manifest, expect)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return manifest

    def _trusted(self, m: BundleManifest, expect: Callable[[BundleManifest], None]) -> BundleManifest:
        expect(m)
        self.check_signed(m, f"bundle {m.bundle_id[:12]}")
        return m
