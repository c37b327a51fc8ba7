"""Blobs in chunks: one chunk = one MQTT payload, each self-describing and self-checking.

A chunk payload is a fixed binary header, the blob id, then the data:

    magic "FPC1" | version u8 | id_len u8 | index u32 | count u32 | chunk_size u32 | total u64
    | chunk sha256 (32 bytes) | blob sha256 (32 bytes) | blob id (id_len bytes) | data

Binary rather than JSON+base64 so a 1 MiB chunk costs 1 MiB on the wire. Every chunk carries the
whole layout (count, chunk size, total, blob hash), so a receiver can start from any chunk, in any
order, and knows exactly which indexes it still lacks; a `BlobRequest` names those, and the
publisher re-publishes them from its `BlobSource`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .fsio import atomic_write
from .messages import BlobRef, ProtocolError, check_id

DEFAULT_CHUNK_SIZE = 1 << 20
MAGIC = b"FPC1"
VERSION = 1
_HEAD = struct.Struct("!4sBBIIIQ32s32s")
HEADER_SIZE = _HEAD.size  # without the blob id
_PART_SUFFIX = ".chunk"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_count(total: int, chunk_size: int) -> int:
    # An empty blob is still one (empty) chunk, so it has something to arrive.
    return max(1, -(-total // chunk_size))


@dataclass(frozen=True)
class Chunk:
    blob_id: str
    index: int
    count: int
    chunk_size: int
    total_size: int
    chunk_sha256: str
    blob_sha256: str
    data: bytes | memoryview  # a read-only view of the received payload when parsed with view=True
    # False only for a one-chunk blob parsed with verify=False: whoever takes its data hashes it
    verified: bool = field(default=True, compare=False)

    def to_bytes(self) -> bytes:
        bid = self.blob_id.encode("ascii")
        head = _HEAD.pack(
            MAGIC, VERSION, len(bid), self.index, self.count, self.chunk_size, self.total_size,
            bytes.fromhex(self.chunk_sha256), bytes.fromhex(self.blob_sha256),
        )
        return head + bid + self.data

    @classmethod
    def from_bytes(cls, payload: bytes, view: bool = False, verify: bool = True) -> "Chunk":
        """Parse and check one chunk (layout and its own hash); ProtocolError if it is not sound.
        `view`: `data` is a read-only view into `payload` (when it is immutable bytes), not a copy.
        The cloud parses each update's 0.6 MB this way: the copy was the largest cost its MQTT
        dispatcher paid under the GIL (py-spy --gil, 1,000 devices, BENCHMARKS.md scale).
        `verify=False` leaves the hash of a one-chunk blob (the blob's own hash) to whoever takes the
        blob (`Reassembler.result(verify=False)`): the cloud's check processes hash it off the
        dispatcher thread. A chunk of several is always verified here."""
        if len(payload) < HEADER_SIZE:
            raise ProtocolError(f"chunk of {len(payload)} bytes is shorter than its {HEADER_SIZE}-byte header")
        magic, version, id_len, index, count, chunk_size, total, csha, bsha = _HEAD.unpack_from(payload)
        if magic != MAGIC:
            raise ProtocolError(f"not a chunk: magic {magic!r} != {MAGIC!r}")
        if version != VERSION:
            raise ProtocolError(f"unsupported chunk version {version} (this side speaks {VERSION})")
        try:
            blob_id = check_id(payload[HEADER_SIZE : HEADER_SIZE + id_len].decode("ascii"), "blob id")
        except UnicodeDecodeError:
            raise ProtocolError("chunk blob id is not ASCII") from None
        start = HEADER_SIZE + id_len
        data = memoryview(payload)[start:] if view and isinstance(payload, bytes) else bytes(payload[start:])
        if chunk_size < 1 or count != chunk_count(total, chunk_size):
            raise ProtocolError(f"chunk {blob_id}: count {count} does not fit {total} bytes in {chunk_size}-byte chunks")
        if index >= count:
            raise ProtocolError(f"chunk {blob_id}: index {index} out of range 0..{count - 1}")
        want = min(chunk_size, total - index * chunk_size)
        if len(data) != want:
            raise ProtocolError(f"chunk {blob_id}#{index}: {len(data)} data bytes, expected {want}")
        if not verify and count == 1:
            return cls(blob_id, index, count, chunk_size, total, csha.hex(), bsha.hex(), data, verified=False)
        chunk = cls(blob_id, index, count, chunk_size, total, csha.hex(), bsha.hex(), data)
        if sha256_hex(data) != chunk.chunk_sha256:
            raise ProtocolError(f"chunk {blob_id}#{index}: sha256 mismatch (corrupted in transit)")
        return chunk


class BlobSource:
    """The publishing side of one blob: every chunk, or just the ones a BlobRequest names."""

    def __init__(self, blob_id: str, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.blob_id = check_id(blob_id, "blob id")
        self.data = bytes(data)
        self.chunk_size = chunk_size
        self.sha256 = sha256_hex(self.data)
        self.count = chunk_count(len(self.data), chunk_size)

    @property
    def ref(self) -> BlobRef:
        return BlobRef(blob_id=self.blob_id, sha256=self.sha256, size=len(self.data))

    def chunk(self, index: int) -> Chunk:
        if not 0 <= index < self.count:
            raise ProtocolError(f"blob {self.blob_id} has chunks 0..{self.count - 1}; {index} was asked for")
        data = self.data[index * self.chunk_size : (index + 1) * self.chunk_size]
        # a blob of one chunk (a device's update, as a rule) is its chunk: hash it once, not twice
        digest = self.sha256 if self.count == 1 else sha256_hex(data)
        return Chunk(self.blob_id, index, self.count, self.chunk_size, len(self.data), digest, self.sha256, data)

    def payloads(self, indexes: Iterable[int] | None = None) -> Iterator[bytes]:
        """Chunk payloads in order; `indexes` (from a BlobRequest, empty = all) picks a subset."""
        wanted = sorted(set(indexes)) if indexes else range(self.count)
        bad = [i for i in wanted if not 0 <= i < self.count]
        if bad:  # check all before yielding any, so a bad request sends nothing
            raise ProtocolError(f"blob {self.blob_id} has chunks 0..{self.count - 1}; asked for {bad[:5]}")
        for i in wanted:
            yield self.chunk(i).to_bytes()


def split(blob_id: str, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """All chunk payloads of `data`."""
    return list(BlobSource(blob_id, data, chunk_size).payloads())


class Reassembler:
    """Collects one blob's chunks in any order, idempotently, optionally resumable from a folder.

    With `folder`, each accepted chunk is written (atomically) to `folder/<blob_id>/<index>.chunk`
    and not kept in memory, so a device with little RAM and a flaky link can restart and resume.
    """

    def __init__(
        self,
        blob_id: str,
        *,
        sha256: str | None = None,
        size: int | None = None,
        max_bytes: int = 2 * 1024**3,
        folder: Path | str | None = None,
    ) -> None:
        self.blob_id = check_id(blob_id, "blob id")
        self.sha256 = sha256
        self.size = size
        self.max_bytes = max_bytes
        self.count: int | None = None
        self._layout: tuple[int, int, int, str] | None = None  # count, chunk_size, total, blob sha
        self._whole_sha: str | None = None  # a one-chunk blob: the hash its only chunk was checked against
        self._unverified = False  # a one-chunk blob whose chunk was parsed with verify=False
        self._have: dict[int, bytes | memoryview | None] = {}  # index -> data (None when it lives on disk)
        self._dir = Path(folder) / self.blob_id if folder is not None else None
        if self._dir is not None:
            self._load()

    @classmethod
    def for_ref(cls, ref: BlobRef, *, max_bytes: int = 2 * 1024**3, folder: Path | str | None = None) -> "Reassembler":
        return cls(ref.blob_id, sha256=ref.sha256, size=ref.size, max_bytes=max_bytes, folder=folder)

    # ---- state ---------------------------------------------------------------------------------

    @property
    def received(self) -> int:
        return len(self._have)

    @property
    def done(self) -> bool:
        return self.count is not None and len(self._have) == self.count

    def missing(self) -> list[int] | None:
        """Indexes still lacking; None while no chunk has arrived (the count is unknown: ask for all)."""
        if self.count is None:
            return None
        return [i for i in range(self.count) if i not in self._have]

    # ---- input ---------------------------------------------------------------------------------

    def add(self, chunk: Chunk | bytes) -> bool:
        """Accept one chunk; True if it was new, False for a duplicate. ProtocolError if it does not belong."""
        if not isinstance(chunk, Chunk):
            chunk = Chunk.from_bytes(chunk)
        self._check_belongs(chunk)
        if chunk.index in self._have:
            return False
        if chunk.count == 1:
            # its data was checked against it: the blob, if the hashes agree (unless left unverified)
            self._whole_sha = chunk.chunk_sha256 if chunk.verified else None
            self._unverified = not chunk.verified
        if self._dir is not None:
            self._persist(chunk)
            self._have[chunk.index] = None
        else:
            self._have[chunk.index] = chunk.data
        return True

    def _check_belongs(self, c: Chunk) -> None:
        if c.blob_id != self.blob_id:
            raise ProtocolError(f"chunk of blob {c.blob_id!r} offered to the reassembler of {self.blob_id!r}")
        if self.sha256 is not None and c.blob_sha256 != self.sha256:
            raise ProtocolError(f"chunk {c.blob_id}#{c.index}: blob sha256 {c.blob_sha256[:12]} != expected {self.sha256[:12]}")
        if self.size is not None and c.total_size != self.size:
            raise ProtocolError(f"chunk {c.blob_id}#{c.index}: blob size {c.total_size} != expected {self.size}")
        if c.total_size > self.max_bytes:
            raise ProtocolError(f"blob {c.blob_id} of {c.total_size} bytes exceeds the {self.max_bytes}-byte limit")
        layout = (c.count, c.chunk_size, c.total_size, c.blob_sha256)
        if self._layout is None:
            self._layout, self.count = layout, c.count
        elif layout != self._layout:
            raise ProtocolError(f"chunk {c.blob_id}#{c.index}: layout {layout[:3]} differs from earlier chunks' {self._layout[:3]}")

    @property
    def verified_sha256(self) -> str | None:
        """The blob hash `result()` checks the data against (what the chunks declared); None for a
        one-chunk blob left unverified (`result(verify=False)` hands it over unhashed)."""
        return self._layout[3] if self._layout is not None and not self._unverified else None

    def bind(self, sha256: str, size: int) -> None:
        """Fix the expected blob hash and size after chunks arrived (their announcement came late);
        ProtocolError now if what the chunks declared disagrees, not once the blob is complete."""
        if self._layout is not None and (self._layout[3] != sha256 or self._layout[2] != size):
            raise ProtocolError(f"blob {self.blob_id}: chunks declare sha256 {self._layout[3][:12]} and {self._layout[2]} bytes, "
                                f"the update names {sha256[:12]} and {size} bytes")
        self.sha256, self.size = sha256, size

    # ---- output --------------------------------------------------------------------------------

    def result(self, view: bool = False, verify: bool = True) -> bytes | memoryview:
        """The whole blob, once done and its sha256 verified; a mismatch forgets every chunk.
        `view`: a one-chunk blob parsed with `Chunk.from_bytes(view=True)` comes back as that
        read-only view, uncopied; otherwise (and always for several chunks) as bytes.
        `verify=False`: a one-chunk blob whose chunk was parsed unverified comes back unhashed, and
        the caller must check it against the hash it trusts (`verified_sha256` is then None)."""
        if not self.done:
            raise ProtocolError(f"blob {self.blob_id} incomplete: {self.received}/{self.count or '?'} chunks")
        assert self._layout is not None
        if self.count == 1 and (self._whole_sha == self._layout[3] or (self._unverified and not verify)):
            data = self._data(0)  # one chunk, its hash already checked on arrival, and it is the blob's
            return data if view or isinstance(data, bytes) else bytes(data)
        data = b"".join(self._data(i) for i in range(self.count or 0))
        if sha256_hex(data) != self._layout[3]:
            # Every chunk matched its own hash, so the sender lied about the layout: start over.
            self.reset()
            raise ProtocolError(f"blob {self.blob_id}: whole-blob sha256 mismatch; progress discarded")
        return data

    def reset(self) -> None:
        self._have.clear()
        self._layout, self.count, self._whole_sha, self._unverified = None, None, None, False
        self.discard()

    def discard(self) -> None:
        """Remove the persisted parts (after the blob is used, or to start over)."""
        if self._dir is not None and self._dir.is_dir():
            for p in self._dir.iterdir():
                p.unlink(missing_ok=True)
            self._dir.rmdir()

    # ---- persistence ---------------------------------------------------------------------------

    def _data(self, index: int) -> bytes | memoryview:
        data = self._have[index]
        if data is not None:
            return data
        assert self._dir is not None
        return Chunk.from_bytes((self._dir / f"{index}{_PART_SUFFIX}").read_bytes()).data

    def _persist(self, chunk: Chunk) -> None:
        assert self._dir is not None
        self._dir.mkdir(parents=True, exist_ok=True)
        # a crash leaves either the whole part or none
        atomic_write(self._dir / f"{chunk.index}{_PART_SUFFIX}", chunk.to_bytes())

    def _load(self) -> None:
        assert self._dir is not None
        if not self._dir.is_dir():
            return
        for p in sorted(self._dir.iterdir()):
            if p.suffix != _PART_SUFFIX:
                p.unlink(missing_ok=True)  # half-written .tmp from a crash
                continue
            try:
                chunk = Chunk.from_bytes(p.read_bytes())
                self._check_belongs(chunk)
                if p.name != f"{chunk.index}{_PART_SUFFIX}":
                    raise ProtocolError("part file name does not match its index")
                self._have[chunk.index] = None
            except (ProtocolError, OSError):
                p.unlink(missing_ok=True)  # corrupt or foreign: fetch it again
