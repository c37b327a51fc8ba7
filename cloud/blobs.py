"""Blob serving: what the cloud offers (bundle, round adapters, re-aligned FFN weights) and the
chunks a device asks for again. Used by the round loop and by rollouts alike.

Served straight from the transport's handler thread: the blobs are read-only once offered, so a
lock around the table is all it needs, and downloads proceed while the round loop trains.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource
from fedpft.shared.messages import BlobRef, BlobRequest, ProtocolError
from fedpft.shared.transport import Transport


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
