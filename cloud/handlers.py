"""The round loop's network side: the handlers the transport calls on its own thread.

They only decode, check the route and enqueue for the loop (`Federation`, which they are part
of); a BlobRequest is answered here by the BlobServer, which has its own sender thread.
"""

from __future__ import annotations

import logging

from fedpft.shared import topics
from fedpft.shared.chunks import Chunk
from fedpft.shared.messages import BlobRequest, ProtocolError, decode
from fedpft.shared.routes import check_route

from .private_rounds import DEVICE_SECAGG

log = logging.getLogger("fedpft.serve")

# The device topics the cloud listens to (what each may carry: shared/routes.py); under --secure-agg
# also each device's secagg topic, which carries only a device's own stage messages.
DEVICE_KINDS = (topics.HELLO, topics.PRESENCE, topics.UPDATE, topics.ACK, topics.BLOBREQ)


class DeviceHandlers:
    """The handlers of `Federation` (its cfg, transport `t`, blobs, events and privacy hooks)."""

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
        if parsed.kind not in DEVICE_KINDS and not (parsed.kind == topics.SECAGG and isinstance(msg, DEVICE_SECAGG)):
            raise ProtocolError(f"a {msg.type} message does not belong on a {parsed.kind} topic")
        check_route(topics.device_topic(parsed.run, parsed.device_id, parsed.kind), msg)  # the shared kind -> message table

    def _on_upload(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse(topic)
            if parsed.kind != topics.UPLOAD or parsed.run != self.cfg.run_id:
                raise ProtocolError(f"not an upload topic of run {self.cfg.run_id!r}")
            # with check processes, an update's one chunk is hashed there (check_update), not here on
            # the dispatcher thread that every message of the fleet waits behind
            chunk = Chunk.from_bytes(payload, view=True, verify=not self.cfg.check_processes)
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
        for kind in DEVICE_KINDS:
            self.t.subscribe(topics.all_devices_pattern(run, kind), self._on_json)
        self.t.subscribe(topics.all_devices_pattern(run, topics.UPLOAD), self._on_upload)
        self.privacy.subscribe()
