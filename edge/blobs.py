"""Downloading a cloud blob on a device: ask for missing chunks, collect, verify, cache.

The device link (`edge/link.py`) holds one for both agents. The fetcher owns no connection: it
is handed how to ask for chunks (a BlobRequest on the device's topic) and how to take the next
event, and it hands back every event that is not one of its chunks, so the agent's loop sees
them afterwards, in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fedpft.shared.chunks import Reassembler
from fedpft.shared.fsio import atomic_write
from fedpft.shared.messages import BlobRef, ProtocolError

log = logging.getLogger("fedpft.agent")

STALL_SECONDS = 5.0  # no new chunk for this long: ask again for the missing ones


class AgentError(Exception):
    pass


class BlobFetcher:
    """`fetch(ref)`: the blob's bytes, from `cache/blobs/<sha256>` or downloaded (resumable
    through `cache/partial/`), every chunk and the whole checked against `ref`.

    request(ref, missing): publish a BlobRequest for those indexes (empty = all).
    next_event(timeout): the caller's next event, ("chunk", Chunk) or anything else; None on timeout.
    hold(events): give back the events that were not this blob's chunks.
    """

    def __init__(
        self,
        cache: Path,
        request: Callable[[BlobRef, list[int]], None],
        next_event: Callable[[float], tuple | None],
        hold: Callable[[list], None],
        timeout: float,
    ) -> None:
        self.cache = Path(cache)
        self.request, self.next_event, self.hold, self.timeout = request, next_event, hold, timeout

    def fetch(self, ref: BlobRef) -> bytes:
        done = self.cache / "blobs" / ref.sha256
        if done.is_file():
            return done.read_bytes()
        asm = Reassembler.for_ref(ref, folder=self.cache / "partial")
        deadline = time.time() + self.timeout
        held = []
        try:
            while not asm.done:
                if time.time() > deadline:
                    raise AgentError(f"blob {ref.blob_id}: {asm.received}/{asm.count or '?'} chunks after {self.timeout:.0f}s")
                self.request(ref, asm.missing() or [])
                last = time.time()
                while not asm.done and time.time() - last < STALL_SECONDS:
                    ev = self.next_event(0.5)
                    if ev is None:
                        continue
                    if ev[0] == "chunk":
                        if ev[1].blob_id == ref.blob_id:
                            try:
                                if asm.add(ev[1]):
                                    last = time.time()
                            except ProtocolError as exc:
                                log.warning("%s", exc.reason)
                    else:
                        held.append(ev)
            data = asm.result()
        finally:
            self.hold(held)
        atomic_write(done, data)
        asm.discard()
        return data

    def forget(self, ref: BlobRef) -> None:
        """Drop the cached blob (once it has been unpacked elsewhere)."""
        (self.cache / "blobs" / ref.sha256).unlink(missing_ok=True)

