"""A device's round result, and the one file (safetensors) it travels in.

The tensor layout is the contract in `fedpft.shared.update` (shared with the cloud, which
validates updates with `split_update` there); this module adds the device-side metadata and
the file handling. File format ("fedpft-update", version 1), a plain safetensors file:
- tensors
  - `<PEFT key>`: every trainable adapter tensor (LoRA A/B of query, key, value, attention
    output, and the task head), float32, under the FM's PEFT state-dict keys
    (manifest.trainable[i].key), exactly the shapes the manifest lists.
  - `__stats__.layer.<L>.off_counts`: float32 (neurons,) — over every training forward pass of
    the round, how many unpadded token positions had FFN pre-activation <= 0 in FM layer L
    (one pair per compressed layer; absent when statistics were not asked for). Summed in
    float64 on the device, stored as float32 (exact up to 2**24 positions a round).
  - `__stats__.layer.<L>.positions`: float32 (1,) — the number of positions counted.
    APoZ of neuron j in layer L = off_counts[j] / positions.
- metadata (str -> str): `format` = "fedpft-update", `format_version` = "1", `bundle_id`,
  `bundle_version`, `num_samples` (usable training samples: the FedAvg weight), `steps`,
  `samples_seen`, `mean_loss`, `acc_before`, `acc_after` (on the held-out slice; "null" when
  there was none), `holdout_samples`, `skipped` (count), `skipped_summary` (the one-line
  summary, "" when nothing was skipped), `seconds`. Numbers are decimal text.

Nothing here imports torch.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.messages import ProtocolError
from fedpft.shared.update import join_update, split_update

FORMAT = "fedpft-update"
FORMAT_VERSION = "1"


class UpdateError(ValueError):
    """An update file that does not follow the format above."""


@dataclass
class RoundResult:
    """What one local round produced on a device."""

    adapters: dict[str, np.ndarray]  # PEFT key -> float32 tensor
    stats: dict[int, tuple[np.ndarray, float]]  # FM layer -> (off_counts (neurons,) float64, positions)
    num_samples: int
    steps: int
    samples_seen: int
    mean_loss: float
    acc_before: float | None
    acc_after: float | None
    holdout_samples: int
    bundle_id: str
    bundle_version: int
    skipped: int = 0
    skipped_summary: str | None = None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list, repr=False)

    def metadata(self) -> dict[str, str]:
        def num(v: float | None) -> str:
            return "null" if v is None else repr(float(v))

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bundle_id": self.bundle_id,
            "bundle_version": str(self.bundle_version),
            "num_samples": str(self.num_samples),
            "steps": str(self.steps),
            "samples_seen": str(self.samples_seen),
            "mean_loss": num(self.mean_loss),
            "acc_before": num(self.acc_before),
            "acc_after": num(self.acc_after),
            "holdout_samples": str(self.holdout_samples),
            "skipped": str(self.skipped),
            "skipped_summary": self.skipped_summary or "",
            "seconds": f"{self.seconds:.3f}",
        }


def encode_update(result: RoundResult) -> bytes:
    return encode_tensors(join_update(result.adapters, result.stats), result.metadata())


def write_update(path: Path, result: RoundResult) -> Path:
    """Write atomically: a temp file in the same folder, fsynced, then renamed over `path`."""
    return atomic_write_bytes(Path(path), encode_update(result))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class Update:
    adapters: dict[str, np.ndarray]
    stats: dict[int, tuple[np.ndarray, float]]
    metadata: dict[str, str]

    def number(self, key: str) -> float | None:
        v = self.metadata.get(key)
        return None if v in (None, "null", "") else float(v)

    @property
    def num_samples(self) -> int:
        return int(self.metadata["num_samples"])


def decode_update(data: bytes, manifest: BundleManifest) -> Update:
    """Parse and validate an update against the bundle it was trained from; UpdateError if malformed."""
    try:
        tensors, meta = decode_tensors(data)
        if meta.get("format") != FORMAT:
            raise UpdateError(f"not a {FORMAT} file (metadata format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UpdateError(f"{FORMAT} version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
        expected = {t.key: (t.shape, t.dtype) for t in manifest.trainable}
        adapters, stats = split_update(tensors, expected, {s.layer: s.neurons for s in manifest.stat_outputs})
    except ProtocolError as exc:
        raise UpdateError(str(exc)) from exc
    return Update(adapters, stats, meta)


def read_update(path: Path, manifest: BundleManifest) -> Update:
    return decode_update(Path(path).read_bytes(), manifest)
