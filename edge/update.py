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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.fsio import atomic_write
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.messages import ProtocolError
from fedpft.shared.update import FORMAT, FORMAT_VERSION, UpdateMeta, join_update, split_update


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
        def num(v: float | None) -> float | None:
            return None if v is None else float(v)  # numpy scalars in, plain floats out

        return UpdateMeta(
            format=FORMAT, format_version=FORMAT_VERSION, bundle_id=self.bundle_id, bundle_version=int(self.bundle_version),
            num_samples=int(self.num_samples), steps=int(self.steps), samples_seen=int(self.samples_seen),
            mean_loss=num(self.mean_loss), acc_before=num(self.acc_before), acc_after=num(self.acc_after),
            holdout_samples=int(self.holdout_samples), skipped=int(self.skipped), skipped_summary=self.skipped_summary,
            seconds=float(self.seconds),
        ).to_metadata()


def encode_update(result: RoundResult) -> bytes:
    return encode_tensors(join_update(result.adapters, result.stats), result.metadata())


def write_update(path: Path, result: RoundResult) -> Path:
    atomic_write(path, encode_update(result))
    return Path(path)


@dataclass
class Update:
    adapters: dict[str, np.ndarray]
    stats: dict[int, tuple[np.ndarray, float]]
    metadata: dict[str, str]  # as the blob carries it
    meta: UpdateMeta  # the same, parsed

    def number(self, key: str) -> float | None:
        v = getattr(self.meta, key)
        return None if v is None else float(v)

    @property
    def num_samples(self) -> int:
        return self.meta.num_samples


def decode_update(data: bytes, manifest: BundleManifest) -> Update:
    """Parse and validate an update against the bundle it was trained from; UpdateError if malformed."""
    try:
        tensors, raw = decode_tensors(data)
        meta = UpdateMeta.parse(raw).check_format()
        expected = {t.key: (t.shape, t.dtype) for t in manifest.trainable}
        adapters, stats = split_update(tensors, expected, {s.layer: s.neurons for s in manifest.stat_outputs})
    except ProtocolError as exc:
        raise UpdateError(str(exc)) from exc
    return Update(adapters, stats, raw, meta)


def read_update(path: Path, manifest: BundleManifest) -> Update:
    return decode_update(Path(path).read_bytes(), manifest)
