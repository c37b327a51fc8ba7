"""The upload collector: update chunks and Update messages in, one verdict per update out.

Reassembly is bounded (MAX_UPLOADS_PER_DEVICE per device, cfg.max_upload_buffer bytes in all, a
stalled upload expires) and only a device the open round waits for may upload at all. The verdict
is computed here; the round loop acts on it (ack, durable write, fold), so the collector never
publishes and never touches the run folder. Main-loop only, like the rest of the round state.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedpft.shared.chunks import Chunk, Reassembler
from fedpft.shared.codec import decode_tensors
from fedpft.cloud.config import ServeConfig
from fedpft.shared.messages import ProtocolError, Task, Update
from fedpft.shared.update import check_binding, split_update

from .sampling import RoundTracker

if TYPE_CHECKING:
    from .fold import Contribution

log = logging.getLogger("fedpft.serve")

# Unfinished uploads one device may have at once: its update and one retry under a new blob id.
MAX_UPLOADS_PER_DEVICE = 2


@dataclass
class OpenRound:
    """The round the cloud waits on now (round_id -1 and no tracker between rounds)."""

    round_id: int = -1
    task: Task | None = None
    tracker: RoundTracker | None = None


@dataclass
class Upload:
    """One device's blob arriving in chunks; its `reserved` bytes count against the upload buffer."""

    asm: Reassembler
    reserved: int
    last: float = field(default_factory=time.time)


@dataclass
class Verdict:
    """What to do about one Update: check its complete blob (off the loop: `validate`), accept (with
    its validated content), count a failure the device reported, ack a duplicate again, reject with a
    reason the device is told, tell it its update is queued (a retry while the first copy is checked),
    or that the cloud is busy (no room for its bytes now: upload again shortly)."""

    msg: Update
    kind: Literal["check", "accept", "failed", "duplicate", "reject", "queued", "busy"]
    reason: str | None = None
    data: bytes | memoryview = b""  # check/accept: the blob exactly as received (what is stored), a read-only view
    adapters: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[int, tuple[np.ndarray, float]] = field(default_factory=dict)
    contribution: Contribution | None = None  # accept: the scalars the running sum keeps (folded by the check)
    digest: str | None = None  # check/accept: the sha256 `data` was already verified against


@dataclass
class InCheck:
    """A device's complete update on its way through the checks."""

    msg: Update
    blob_id: str
    since: float = field(default_factory=time.time)
    told: bool = False  # its device was sent a "queued" receipt
    parked: list[Update] = field(default_factory=list)  # the device's Updates that came meanwhile
    reserved: int = 0  # its bytes, still counted against the upload buffer


class NoRoom(ProtocolError):
    """An upload refused because the upload buffer is full: its device is told to come back ("busy")."""


class UploadCollector:
    def __init__(self, cfg: ServeConfig, open_round: OpenRound, expected: dict, stat_layers: dict[int, int]):
        self.cfg, self.open = cfg, open_round
        self.limits = UpdateLimits(cfg.run_id, cfg.max_update_bytes, expected, stat_layers)
        self.uploads: dict[tuple[str, str], Upload] = {}
        self.upload_bytes = 0  # reserved by unfinished uploads and those in their checks, at most cfg.max_upload_buffer
        self.waiting: dict[tuple[str, str], Update] = {}  # update messages whose blob is still arriving
        self.bytes_up = 0
        # devices whose complete update is being checked off the loop -> that check (and their Updates that came meanwhile)
        self.checking: dict[str, InCheck] = {}
        # device -> (blob, told): the upload most recently turned away for room, and whether its device
        # has had its "busy" receipt; one per device, cleared when the device uploads it again
        self.turned_away: dict[str, tuple[str, bool]] = {}

    # -- chunks in
    def chunk(self, device: str, chunk: Chunk, nbytes: int) -> Verdict | None:
        key = (device, chunk.blob_id)
        up = self.uploads.get(key)
        if up is None:
            try:
                up = self._start(device, chunk)
            except NoRoom:
                if self.turned_away.get(device) == (chunk.blob_id, True):
                    return None  # the rest of an upload whose device was told to come back: no line each
                waiting = self.waiting.pop(key, None)
                self.turned_away[device] = (chunk.blob_id, waiting is not None)
                if waiting is not None:  # its Update came first: tell the device now
                    return self._busy(waiting)
                raise  # its Update, when it comes, is told (`update`)
            if up is None:
                return None
            if device in self.turned_away and self.turned_away[device][0] == chunk.blob_id:
                del self.turned_away[device]  # there was room this time
        try:
            new = up.asm.add(chunk)
        except ProtocolError as exc:
            waiting = self.waiting.get(key)
            self.drop(key, exc.reason, quiet=True)
            if waiting is not None:  # its Update came first: refuse that, so the device hears why
                return _reject(waiting, f"rejected chunk: {exc.reason}")
            raise ProtocolError(f"rejected chunk from {device}: {exc.reason}") from None
        if new:
            self.bytes_up += nbytes
            up.last = time.time()
        if up.asm.done and key in self.waiting:
            return self.update(self.waiting.pop(key))
        return None

    def _start(self, device: str, chunk: Chunk) -> Upload | None:
        """Room for a new upload, within the bounds: only a device the open round waits for, at most
        MAX_UPLOADS_PER_DEVICE at once (the oldest gives way), at most cfg.max_upload_buffer bytes
        reserved in total. The Update, when it came first, fixes the blob's hash and size."""
        tr, cfg = self.open.tracker, self.cfg
        if device in self.checking and self.checking[device].blob_id == chunk.blob_id:
            return None  # a retry of the very bytes being checked: their verdict answers it too
        if tr is None or not tr.is_selected(device) or tr.has_answered(device):
            if tr is not None and tr.has_answered(device):
                return None  # a retry's chunks after its update counted: harmless
            raise ProtocolError(f"upload chunk from {device} dropped: no open round waits for its update")
        if chunk.total_size > cfg.max_update_bytes:
            raise ProtocolError(f"upload from {device}: blob of {chunk.total_size} bytes exceeds the {cfg.max_update_bytes}-byte limit")
        mine = sorted((k for k in self.uploads if k[0] == device), key=lambda k: self.uploads[k].last)
        for k in mine[: max(0, len(mine) - MAX_UPLOADS_PER_DEVICE + 1)]:
            self.drop(k, f"{device} started another upload ({chunk.blob_id})")
        # An upload's blob is all it holds: its check decodes views of it and folds its change through
        # the worker's own buffer (RoundFold.take), so --max-upload-buffer bounds what uploads cost.
        need = chunk.total_size
        if self.upload_bytes + need > cfg.max_upload_buffer:
            raise NoRoom(f"upload from {device} dropped: unfinished and unchecked uploads hold {self.upload_bytes} "
                         f"bytes, this one needs {need}, the buffer is {cfg.max_upload_buffer} bytes (--max-upload-buffer)")
        key = (device, chunk.blob_id)
        waiting = self.waiting.get(key)
        asm = (Reassembler.for_ref(waiting.blob, max_bytes=cfg.max_update_bytes) if waiting is not None and waiting.blob
               else Reassembler(chunk.blob_id, max_bytes=cfg.max_update_bytes))
        self.upload_bytes += need
        up = self.uploads[key] = Upload(asm, need)
        return up

    # -- updates in, verdicts out
    def update(self, msg: Update) -> Verdict | None:
        """The verdict on `msg`, or None while its blob is still arriving."""
        tr, task = self.open.tracker, self.open.task
        if tr is None or msg.round_id != self.open.round_id:
            return self._refuse(msg, f"stale: round {msg.round_id} is not the current round {self.open.round_id}")
        if not tr.is_selected(msg.device_id):
            return self._refuse(msg, "device was not selected for this round")
        if msg.device_id in self.checking:  # a redelivery, or a retry: decided once the check ends
            self.checking[msg.device_id].parked.append(msg)
            return Verdict(msg, "queued")
        if tr.has_answered(msg.device_id):
            self.forget(msg)
            counted = tr.accepted.get(msg.device_id)
            if counted is not None and getattr(counted, "update_id", None) not in (None, msg.update_id):
                return _reject(msg, f"another update ({counted.update_id}) from {msg.device_id} already counted for this round")
            return Verdict(msg, "duplicate", "duplicate (already counted)")  # QoS 1 redelivery: ack again, count once
        task_id = task.task_id if task is not None else None
        if task_id is None or msg.task_id != task_id or msg.update_id is None:
            return self._refuse(msg, f"answers task {msg.task_id}, not this round's task {task_id}" if msg.task_id
                                else "carries no task_id/update_id binding it to this round's task")
        if msg.error is not None:
            return Verdict(msg, "failed", msg.error)
        ref = msg.blob
        assert ref is not None
        if ref.size > self.cfg.max_update_bytes:
            return _reject(msg, f"update of {ref.size} bytes exceeds the {self.cfg.max_update_bytes}-byte cap")
        key = (msg.device_id, ref.blob_id)
        up = self.uploads.get(key)
        away = self.turned_away.get(msg.device_id)
        if up is None and away is not None and away[0] == ref.blob_id:
            if not away[1]:  # its first chunk was turned away before this Update came
                self.turned_away[msg.device_id] = (ref.blob_id, True)
                return self._busy(msg)
            del self.turned_away[msg.device_id]  # the device uploads it again, as told
        if up is not None and not up.asm.done:
            try:  # chunks came first: what they declared must agree with the Update now, not at the end
                up.asm.bind(ref.sha256, ref.size)
            except ProtocolError as exc:
                self.drop(key, exc.reason, quiet=True)
                return _reject(msg, exc.reason)
        if up is None or not up.asm.done:
            # bounded like the uploads: a device's older announced-but-unfinished updates give way
            mine = [k for k in self.waiting if k[0] == msg.device_id and k != key]
            for k in mine[: max(0, len(mine) - MAX_UPLOADS_PER_DEVICE + 1)]:
                self.drop(k, f"{msg.device_id} announced another update ({ref.blob_id})")
            self.waiting[key] = msg
            return None
        try:
            # the received payload itself: checked, decoded and stored without a copy (and, with check
            # processes, hashed there: verified_sha256 is then None and check_update hashes it)
            data = up.asm.result(view=True, verify=not self.cfg.check_processes)
        except ProtocolError as exc:  # chunks that each match their own hash, not the blob's: refused now
            self.drop(key, exc.reason, quiet=True)
            return _reject(msg, exc.reason)
        self.uploads.pop(key)
        # the bytes stay reserved until the check ends: a cloud whose checks fall behind a flood of
        # uploads otherwise held every waiting blob (1.7 GB at 5,000 devices, BENCHMARKS.md scale)
        self.checking[msg.device_id] = InCheck(msg, ref.blob_id, reserved=up.reserved)
        return Verdict(msg, "check", data=data, digest=up.asm.verified_sha256)

    def _busy(self, msg: Update) -> Verdict:
        return Verdict(msg, "busy", f"no room for the update's bytes now: the upload buffer holds {self.upload_bytes} of "
                                    f"{self.cfg.max_upload_buffer} bytes (--max-upload-buffer); upload it again shortly")

    def checked(self, device: str) -> list[Update]:
        """The check of `device`'s update ended: the Updates it sent meanwhile, to handle now."""
        c = self.checking.pop(device, None)
        if c is None:
            return []
        self.upload_bytes -= c.reserved
        return c.parked

    def overdue(self, now: float, after: float) -> list[Update]:
        """Updates whose check has waited `after` seconds or more (behind others), each returned once:
        their devices are told they are queued before their own receipt timeout makes them upload again."""
        late = [c for c in self.checking.values() if not c.told and now - c.since >= after]
        for c in late:
            c.told = True
        return [c.msg for c in late]

    def validate(self, msg: Update, data: bytes, task_id: str, digest: str | None = None) -> Verdict:
        """Accept or reject a complete blob (`check_update` with this run's limits and expectations)."""
        return check_update(msg, data, task_id, digest, self.limits)

    def _refuse(self, msg: Update, reason: str) -> Verdict:
        self.forget(msg)
        return _reject(msg, reason)

    # -- bounds
    def forget(self, msg: Update) -> None:
        """Free the upload of an Update that will not count."""
        if msg.blob is not None and (msg.device_id, msg.blob.blob_id) in self.uploads:
            up = self.uploads.pop((msg.device_id, msg.blob.blob_id))
            self.upload_bytes -= up.reserved

    def drop(self, key: tuple[str, str], why: str, quiet: bool = False) -> None:
        """Forget an unfinished upload (and the Update waiting for it), with one log line unless the caller logs."""
        up = self.uploads.pop(key, None)
        msg = self.waiting.pop(key, None)
        if up is not None:
            self.upload_bytes -= up.reserved
        if not quiet and (up is not None or msg is not None):
            got, count = (up.asm.received, up.asm.count or "?") if up is not None else (0, "?")
            log.warning("dropped upload %s from %s (%d/%s chunks): %s", key[1], key[0], got, count, why)

    def expire(self, now: float) -> None:
        for key, up in list(self.uploads.items()):
            if now - up.last > self.cfg.upload_timeout:
                self.drop(key, f"no chunk for {self.cfg.upload_timeout:.0f}s (--upload-timeout)")

    def close(self, round_id: int) -> None:
        """At a round's end no upload can count any more: free them, each with a log line."""
        for key in {*self.uploads, *self.waiting}:
            self.drop(key, f"round {round_id} ended")
        self.turned_away.clear()


@dataclass(frozen=True)
class UpdateLimits:
    """What an update is checked against: all a check needs, so a check process gets it once."""

    run_id: str
    max_bytes: int
    expected: dict  # adapter name -> (shape, dtype), from the manifest
    stat_layers: dict  # layer -> neuron count of its activation statistics


def check_update(msg: Update, data: bytes, task_id: str, digest: str | None, limits: UpdateLimits) -> Verdict:
    """Accept or reject a complete blob. Pure (no state, no I/O), so it runs on any thread or in a
    check process. `digest`: the sha256 the reassembler already checked `data` against (hashing
    0.6 MB again per update is a second of CPU per 1,000 devices)."""
    try:
        digest = digest or (hashlib.sha256(data).hexdigest() if data else None)
        if data and digest != msg.blob.sha256:
            raise ProtocolError("update blob sha256 does not match the update message")
        tensors, meta = decode_tensors(data, limits.max_bytes)
        check_binding(meta, limits.run_id, msg.round_id, msg.device_id, task_id)
        adapters, stats = split_update(tensors, limits.expected, limits.stat_layers)
    except ProtocolError as exc:
        return _reject(msg, exc.reason)
    except Exception as exc:  # noqa: BLE001 - parsing a device's bytes: a fault we did not foresee
        # is that device's problem, never the cloud's (re-raised, it would stop the run)
        log.error("update from %s: unexpected %s while checking it: %s", msg.device_id, type(exc).__name__, exc)
        return _reject(msg, f"malformed update ({type(exc).__name__})")
    return Verdict(msg, "accept", data=data, adapters=adapters, stats=stats, digest=digest)


def _reject(msg: Update, reason: str) -> Verdict:
    return Verdict(msg, "reject", reason)
