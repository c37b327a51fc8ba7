"""Downloading a cloud blob on a device: ask for missing chunks, collect, verify, cache.

The device link (`edge/link.py`) holds one for both agents. The fetcher owns no connection: it
is handed how to ask for chunks (a BlobRequest on the device's topic) and how to take the next
event, and it hands back every event that is not one of its chunks, so the agent's loop sees
them afterwards, in order.

The cloud broadcasts a round's blobs on `blob/<id>` just before the Task, so their chunks reach
the device before the Task does: the caller hands every chunk that arrives outside a fetch to
`keep`, and `fetch` starts from those, asking only for what is still missing (usually nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fedpft.shared.chunks import Chunk, Reassembler
from fedpft.shared.fsio import atomic_write
from fedpft.shared.messages import BlobRef, ProtocolError

log = logging.getLogger("fedpft.agent")

STALL_SECONDS = 5.0  # no new chunk for this long: ask again for the missing ones
KEEP_BLOBS = 4  # broadcast blobs kept ahead of their Task (adapters and FFN of this round and the next)
KEEP_BYTES = 64 << 20  # and their chunks' bytes at most (a ViT-base FFN blob is ~47 MB): a flood of the topic costs bounded memory


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
        self.kept: dict[str, dict[int, Chunk]] = {}  # blob id -> chunks that came before their fetch
        self.kept_bytes = 0

    def keep(self, chunk: Chunk) -> None:
        """Hold a chunk that arrived outside a fetch (a broadcast ahead of its Task); the oldest
        blobs go first when over KEEP_BLOBS or KEEP_BYTES. Checked against the Task's ref on use."""
        if chunk.total_size > KEEP_BYTES:
            return  # too large to hold in memory: fetched on request when a Task names it
        held = self.kept.setdefault(chunk.blob_id, {})
        if chunk.index in held:
            return
        held[chunk.index] = chunk
        self.kept_bytes += len(chunk.data)
        while len(self.kept) > KEEP_BLOBS or (self.kept_bytes > KEEP_BYTES and len(self.kept) > 1):
            self._drop(next(iter(self.kept)))
        if self.kept_bytes > KEEP_BYTES:  # chunks of one id that lie about their layout
            self._drop(chunk.blob_id)

    def _drop(self, blob_id: str) -> dict[int, Chunk]:
        held = self.kept.pop(blob_id, {})
        self.kept_bytes -= sum(len(c.data) for c in held.values())
        return held

    def _take_kept(self, asm: Reassembler) -> None:
        for chunk in self._drop(asm.blob_id).values():
            try:
                asm.add(chunk)
            except ProtocolError as exc:  # not the blob the Task names (stale or forged): ask for it
                log.warning("ignored a kept chunk: %s", exc.reason)

    def fetch(self, ref: BlobRef) -> bytes:
        done = self.cache / "blobs" / ref.sha256
        if done.is_file():
            return done.read_bytes()
        asm = Reassembler.for_ref(ref, folder=self.cache / "partial")
        self._take_kept(asm)
        deadline = time.time() + self.timeout
        held = []
        try:
            while not asm.done:
                if time.time() > deadline:
                    raise AgentError(f"blob {ref.blob_id}: {asm.received}/{asm.count or '?'} chunks after {self.timeout:.0f}s")
                self.request(ref, asm.missing() or [])
                self._collect(asm, held)
            data = asm.result()
        finally:
            self.hold(held)
        atomic_write(done, data)
        asm.discard()
        return data

    def _collect(self, asm: Reassembler, held: list) -> None:
        """Take events until the blob is done or no new chunk came for STALL_SECONDS; chunks of
        other blobs are kept (the next fetch may want them), other events held for the caller."""
        last = time.time()
        while not asm.done and time.time() - last < STALL_SECONDS:
            ev = self.next_event(0.5)
            if ev is None:
                continue
            if ev[0] != "chunk":
                held.append(ev)
            elif ev[1].blob_id != asm.blob_id:
                self.keep(ev[1])
            else:
                try:
                    if asm.add(ev[1]):
                        last = time.time()
                except ProtocolError as exc:
                    log.warning("%s", exc.reason)

    def forget(self, ref: BlobRef) -> None:
        """Drop the cached blob (once it has been unpacked elsewhere)."""
        (self.cache / "blobs" / ref.sha256).unlink(missing_ok=True)

