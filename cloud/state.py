"""A run's durable state: global adapters, re-aligned FFN weights, metrics, accepted updates.

Every write goes to a temp file that is fsynced and renamed, and state.json (the commit point)
is written last, so a cloud killed at any instant resumes from the last complete round.

Everything on disk is untrusted when it is read back. state.json records the sha256 of every file
it stands on (checkpoints, and one index per finished round of the updates it counted), taken from
the bytes as they were written; resume checks them all, and the tensors it loads for finite values,
and refuses with one line (RunError) on any mismatch. An update of the round in progress is one
file whose name carries the sha256 of its bytes (`<device>.<sha256>.safetensors`), so an altered
one is asked for again rather than counted; runs from before that layout kept the sha256 in a side
file, which is still read. Nothing a commit names is ever written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from fedpft.shared.codec import ProtocolError, check_finite, decode_tensors, encode_tensors
from fedpft.shared.fsio import FolderSync, atomic_write, fsync_dir

log = logging.getLogger(__name__)

STATE = "state.json"
METRICS = "metrics.jsonl"
UPDATES = "updates"
INDEX = "index.json"  # per finished round: update file name -> sha256
SHA_SUFFIX = ".sha256"
FOLD = "running-sum.bin"  # the open round's streaming-aggregation sum (cloud/fold.py); not an update
# what `serve` writes into a run folder; anything else there (a simulation's bundle, shards,
# logs) belongs to someone else and is left alone
RUN_FILES = (STATE, METRICS, "checkpoints", UPDATES, "serve_config.json", "report.md", "secagg-state.safetensors")
SET_ASIDE = "replaced-"


class RunError(RuntimeError):
    """A run folder that cannot be started or resumed as asked; the message is one line for the user."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunState(BaseModel):
    run_id: str
    bundle_id: str
    next_round: int = 0
    adapters: str  # file (relative to the run folder) with the current global adapters
    ffn: str | None = None  # file with the current re-aligned FFN weights (ORT names), if any
    alignments: int = 0
    history: list[dict] = Field(default_factory=list)  # one metrics record per finished round
    # relative path -> sha256 of each file this state stands on, recorded when it was written;
    # empty only in states written before it existed
    files: dict[str, str] = Field(default_factory=dict)


class RunStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.committed: dict[str, str] = {}  # files of the last commit (never written again)
        self.pending: dict[str, str] = {}  # files written or verified since, that the next commit names
        self._folder_sync = FolderSync()  # the check workers' update writes share folder fsyncs
        self._stored: dict[tuple[int, str], str] = {}  # (round, device) -> its update's file
        # round -> device -> its update files in the round's folder: the folder is listed once per
        # round, not per update (a listing per update made 1,000 updates cost O(n^2) directory reads)
        self._on_disk: dict[int, dict[str, set[str]]] = {}
        self._on_disk_lock = threading.Lock()  # the check workers store updates concurrently

    # -- tensors
    def write_tensors(self, rel: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> str:
        self._write(rel, encode_tensors(tensors, metadata or {}))
        return rel

    def read_tensors(self, rel: str) -> dict[str, np.ndarray]:
        """The tensors of `rel`, checked against the sha256 recorded when they were written (when
        one was) and for NaN/Inf; RunError names the file otherwise."""
        path = self.folder / rel
        data = self._read(path)
        want = self.committed.get(rel) or self.pending.get(rel)
        if want is not None and sha256(data) != want:
            raise RunError(f"{path}: sha256 does not match the one recorded when it was written (the file was changed or damaged)")
        try:
            tensors = decode_tensors(data, max(len(data), 1))[0]
            check_finite(tensors)
        except ProtocolError as exc:
            raise RunError(f"{path}: {exc.reason}") from None
        return tensors

    # -- updates
    def save_update(self, round_id: int, device: str, payload: bytes, digest: str | None = None) -> Path:
        """Keep every accepted update on disk before it counts (nothing accepted is ever lost).
        `digest`: the payload's sha256 when the caller has checked it already."""
        digest = digest or sha256(payload)
        files = self._update_files(round_id)  # before this write, so the listing holds only earlier files
        rel = self.write_update(round_id, device, payload, digest)
        self.record_update(round_id, device, rel, digest, files)
        return self.folder / rel

    def write_update(self, round_id: int, device: str, payload: bytes | memoryview, digest: str) -> str:
        """The durable write alone (no bookkeeping, so a check process can do it): the folder-relative
        path it wrote. One file, its sha256 in its name: fsynced under a temp name, then renamed, so
        it is whole under its final name or not there at all. One folder fsync, shared with the other
        check workers' writes (FolderSync), makes the rename durable before the update is acked. (A
        second, side file for the hash cost a new file and an fsync per update: about 1 s of the
        cloud's CPU per 1,000 updates on ext4, BENCHMARKS.md scale.)"""
        rel = f"{_round_folder(round_id)}/{update_name(device, digest)}"
        self._guard(rel)
        path = self.folder / rel
        atomic_write(path, payload, sync_folder=False)
        self._folder_sync.sync(path.parent)
        return rel

    def record_update(self, round_id: int, device: str, rel: str, digest: str, files: dict[str, set[str]] | None = None) -> None:
        """Remember an update written durably (by `write_update`, here or in a check process) as the
        device's one for the round, and retire its older ones. `files`: the round's listing taken
        before the write, when the caller took it."""
        self._guard(rel)
        files = self._update_files(round_id) if files is None else files
        self.pending[rel] = digest
        self._stored[(round_id, device)] = rel
        self._retire_older(files, device, rel)

    def _update_files(self, round_id: int) -> dict[str, set[str]]:
        """device -> update files in the round's folder, listed on first use in this process and
        kept up to date by save_update since."""
        with self._on_disk_lock:
            known = self._on_disk.get(round_id)
            if known is None:
                known = self._on_disk[round_id] = {}
                folder = self.folder / _round_folder(round_id)
                for old in folder.glob("*.safetensors") if folder.is_dir() else []:
                    known.setdefault(parse_update_name(old.name)[0], set()).add(old.relative_to(self.folder).as_posix())
            return known

    def _retire_older(self, files: dict[str, set[str]], device: str, kept_rel: str) -> None:
        """Remove the device's other stored updates of this open round, now that `kept_rel` is
        durable. A device has one accepted update per round, so an older file is one the round
        never counted (resume found it unusable and asked again); left beside the new one, a
        restart could count the wrong one. Should the removal not survive a crash, resume takes
        the newest. `files`: the round's listing (`_update_files`)."""
        with self._on_disk_lock:
            older = files.get(device, set()) - {kept_rel}
            files[device] = {kept_rel}
        for rel in sorted(older):
            old = self.folder / rel
            old.unlink(missing_ok=True)
            old.with_name(old.name + SHA_SUFFIX).unlink(missing_ok=True)
            self.pending.pop(rel, None)
            log.info("stored update %s replaced by %s", old.name, Path(kept_rel).name)

    def read_update(self, round_id: int, device: str) -> bytes:
        """An update this round accepted, checked against the sha256 taken when it was stored."""
        rel = self._stored.get((round_id, device)) or f"{_round_folder(round_id)}/{device}.safetensors"
        data = self._read(self.folder / rel)
        want = self.pending.get(rel)
        if want is not None and sha256(data) != want:
            raise RunError(f"{self.folder / rel}: sha256 does not match the one taken when it was accepted (changed on disk)")
        return data

    def save_fold(self, round_id: int, data: bytes) -> None:
        """Persist the open round's running sum, rewritten as the round goes on; the hash first, so a
        cloud killed between the two writes leaves a pair that does not match (refolded on resume)."""
        rel = f"{_round_folder(round_id)}/{FOLD}"
        self._guard(rel)
        atomic_write(self.folder / (rel + SHA_SUFFIX), (sha256(data) + "\n").encode())
        atomic_write(self.folder / rel, data)

    def load_fold(self, round_id: int) -> bytes | None:
        """The round's persisted running sum if it matches its sha256 side file; None (with a line
        when one was there) otherwise."""
        path = self.folder / _round_folder(round_id) / FOLD
        try:
            data = path.read_bytes()
            want = path.with_name(FOLD + SHA_SUFFIX).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("running sum %s unreadable (%s); refolding the stored updates", path, exc.strerror or exc)
            return None
        if sha256(data) != want:
            log.warning("running sum %s does not match its sha256 side file; refolding the stored updates", path)
            return None
        return data

    def drop_fold(self, round_id: int) -> None:
        """A committed round's checkpoint replaces its running sum (best effort: only disk space)."""
        folder = self.folder / _round_folder(round_id)
        for name in (FOLD, FOLD + SHA_SUFFIX):
            try:
                (folder / name).unlink()
            except OSError:
                pass

    def stored_updates(self, round_id: int) -> dict[str, Path]:
        """device -> file of the round's stored updates whose bytes match the sha256 their name
        (or, in the older layout, their side file) records; any other is logged and left out, so
        its device is asked again."""
        folder = self.folder / _round_folder(round_id)
        good: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            rel = path.relative_to(self.folder).as_posix()
            device, want = parse_update_name(path.name)
            try:
                if want is None:  # the layout before names carried the hash
                    want = (self.folder / (rel + SHA_SUFFIX)).read_text().strip()
                ok = sha256(path.read_bytes()) == want
            except OSError:
                ok = False
            if not ok:
                log.warning("stored update %s does not match the sha256 recorded for it; the device will be asked again", path)
                continue
            if device in good:  # a crash between a newer update's write and the older one's removal
                older, newer = sorted((good[device], path), key=lambda p: (p.stat().st_mtime_ns, p.name))
                log.warning("round %d: device %s has two intact stored updates; counting the newer %s, not %s",
                            round_id, device, newer.name, older.name)
                self.pending.pop(older.relative_to(self.folder).as_posix(), None)
                if newer is good[device]:
                    continue
            self.pending[rel] = want
            self._stored[(round_id, device)] = rel
            good[device] = path
        return good

    # -- state
    def begin(self, run_id: str, bundle_id: str, resume: bool) -> RunState | None:
        """The committed state to continue (`resume`), or None when a new run may start here.

        A new run needs a folder without run files: it never writes over an earlier run (`--fresh`
        moves one aside first, see `set_aside`). Resuming needs a committed state of the same run
        id and bundle whose files all match their recorded sha256."""
        state_path = self.folder / STATE
        if not resume:
            if state_path.exists():
                raise RunError(f"{self.folder} already holds a run (state.json); pass --resume to continue it, "
                               "--fresh to start over (its files are moved aside), or choose another --out")
            if self.run_files():
                raise RunError(f"{self.folder} holds files of an earlier run ({', '.join(self.run_files())}) but no "
                               "committed state.json; pass --fresh to start over (they are moved aside) or choose another --out")
            return None
        if not state_path.is_file():
            raise RunError(f"--resume: {state_path} does not exist, so there is no committed round to continue; "
                           f"pass --fresh instead of --resume to start a new run in {self.folder}")
        state = self.read_state()
        if state.run_id != run_id:
            raise RunError(f"--resume: {self.folder} holds run {state.run_id!r}, not --run-id {run_id!r}")
        if state.bundle_id != bundle_id:
            raise RunError(f"--resume: {self.folder} belongs to bundle {state.bundle_id[:12]}, not {bundle_id[:12]}")
        self.verify(state)
        return state

    def read_state(self) -> RunState:
        path = self.folder / STATE
        data = self._read(path)
        if not data.strip():
            raise RunError(f"{path}: empty (cut short by a crash or a full disk?); the run cannot be resumed from it")
        try:
            return RunState.model_validate_json(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise RunError(f"{path}: not a valid run state ({err['msg']}{f' at {where}' if where else ''}); "
                           "truncated or edited?") from None

    def verify(self, state: RunState) -> None:
        """Every file `state` names matches its recorded sha256, and the tensors a resumed run
        loads are finite; RunError names the first file that does not."""
        if not state.files:
            log.warning("%s predates recorded sha256s: its checkpoints are only checked for readable, finite values",
                        self.folder / STATE)
        named = [state.adapters, *([state.ffn] if state.ffn else [])]
        missing = [rel for rel in named if state.files and rel not in state.files]
        if missing:
            raise RunError(f"{self.folder / STATE}: names {missing[0]} without its sha256 (edited by hand?)")
        for rel, want in sorted(state.files.items()):
            if not _safe_rel(rel):
                raise RunError(f"{self.folder / STATE}: names {rel!r}, which is not a path inside the run folder")
            if sha256(self._read(self.folder / rel)) != want:
                raise RunError(f"{self.folder / rel}: sha256 does not match the one state.json recorded "
                               "(the file was changed or damaged since it was committed)")
        self.committed = dict(state.files)
        for rel in named:
            self.read_tensors(rel)

    def commit(self, state: RunState) -> None:
        files = dict(state.files)
        updates: dict[str, dict[str, str]] = {}
        for rel, digest in self.pending.items():
            folder, _, name = rel.rpartition("/")
            if folder.startswith(f"{UPDATES}/"):
                updates.setdefault(folder, {})[name] = digest
            else:
                files[rel] = digest
        # one index per round keeps state.json small however many devices answered
        for folder, entries in updates.items():
            index = f"{folder}/{INDEX}"
            self._guard(index)
            data = json.dumps(dict(sorted(entries.items())), indent=1).encode()
            atomic_write(self.folder / index, data)
            files[index] = sha256(data)
        state.files = files
        atomic_write(self.folder / STATE, state.model_dump_json(indent=2).encode())
        self.committed, self.pending = dict(files), {}
        self._stored.clear()  # committed rounds are never read back in this process
        with self._on_disk_lock:
            self._on_disk.clear()
        self._rewrite_metrics(state.history)

    def _rewrite_metrics(self, history: list[dict]) -> None:
        # metrics.jsonl mirrors the committed history, so a crash never leaves a line for a
        # round that resume will run again
        atomic_write(self.folder / METRICS, "".join(json.dumps(h) + "\n" for h in history).encode())

    # -- starting over
    def run_files(self) -> list[str]:
        return [name for name in RUN_FILES if (self.folder / name).exists()]

    def set_aside(self) -> Path | None:
        """Move an earlier run's files into `replaced-<time>/` inside the folder (for `--fresh`),
        so starting over never destroys them; None if there were none."""
        names = self.run_files()
        if not names:
            return None
        dest = self.folder / f"{SET_ASIDE}{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{SET_ASIDE}{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        dest.mkdir()
        for name in names:
            os.replace(self.folder / name, dest / name)
        fsync_dir(self.folder)
        return dest

    # -- internals
    def _guard(self, rel: str) -> None:
        folder = rel.rpartition("/")[0]
        if rel in self.committed or f"{folder}/{INDEX}" in self.committed:
            raise RunError(f"{self.folder / rel} belongs to a committed round; refusing to write it again")

    def _write(self, rel: str, data: bytes, digest: str | None = None) -> None:
        self._guard(rel)
        atomic_write(self.folder / rel, data)
        self.pending[rel] = digest or sha256(data)

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise RunError(f"{path}: missing") from None
        except OSError as exc:
            raise RunError(f"{path}: unreadable ({exc.strerror or exc})") from None


def _round_folder(round_id: int) -> str:
    return f"{UPDATES}/round_{round_id:04d}"


def update_name(device: str, digest: str) -> str:
    """A stored update's file name: the device and the sha256 of the file's bytes."""
    return f"{device}.{digest}.safetensors"


def parse_update_name(name: str) -> tuple[str, str | None]:
    """(device, sha256) of a stored update's file name; sha256 None for the older layout,
    `<device>.safetensors` beside a `.sha256` side file."""
    stem = name.removesuffix(".safetensors")
    device, _, digest = stem.rpartition(".")
    if device and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return device, digest
    return stem, None


def _safe_rel(rel: str) -> bool:
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts
