"""The format of a device's round update: one safetensors blob, the contract of both sides.

- adapter tensors under their PEFT state-dict keys (FM layer numbering), exactly the
  manifest's `trainable` keys, shapes and dtypes;
- per compressed FM layer L, activation statistics summed over the round:
  `__stats__.layer.L.off_counts` float32 (neurons,) and `__stats__.layer.L.positions` float32 (1,);
- string metadata: num_samples, steps, mean_loss, acc_before, acc_after (informational), and the
  binding `run_id`, `round_id`, `device_id`, `task_id`: which Task this blob answers. The device
  stamps it when it submits (`bind_update`); the cloud refuses a blob whose binding is not the
  round's task (`check_binding`), so an update replayed under another round's message never counts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .codec import decode_tensors, encode_tensors
from .messages import ProtocolError

FORMAT = "fedpft-update"
FORMAT_VERSION = "1"

STATS_PREFIX = "__stats__."
_STAT = re.compile(r"^__stats__\.layer\.(\d{1,9})\.(off_counts|positions)$")  # int() of 5,000 digits raises


def stat_key(layer: int, what: str) -> str:
    return f"{STATS_PREFIX}layer.{layer}.{what}"


def join_update(adapters: Mapping[str, np.ndarray], stats: Mapping[int, tuple[np.ndarray, float]]) -> dict[str, np.ndarray]:
    out = dict(adapters)
    for layer, (off, pos) in stats.items():
        out[stat_key(layer, "off_counts")] = np.asarray(off, dtype=np.float32)
        out[stat_key(layer, "positions")] = np.asarray([pos], dtype=np.float32)
    return out


@lru_cache(maxsize=None)
def _dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # a name numpy does not know matches no tensor
        return None


def split_update(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    stat_layers: Mapping[int, int],
) -> tuple[dict[str, np.ndarray], dict[int, tuple[np.ndarray, float]]]:
    """Validate an update against the manifest and split it; ProtocolError names the first fault."""
    adapters: dict[str, np.ndarray] = {}
    parts: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = _STAT.match(key)
        if m:
            layer = int(m.group(1))
            if layer not in stat_layers:
                raise ProtocolError(f"statistics for layer {layer}, which is not a compressed layer")
            parts.setdefault(layer, {})[m.group(2)] = arr
            continue
        if key not in expected:
            raise ProtocolError(f"unexpected tensor {key!r} in update")
        shape, dtype = expected[key]
        # dtype objects compared, not their names, and ndarray.all(), not np.all(): this runs for
        # every tensor of every update the cloud receives (50 per MiniLM update), and the string
        # building and Python-level dispatch were most of its cost
        if arr.shape != tuple(shape) or arr.dtype != _dtype(dtype):
            raise ProtocolError(f"tensor {key!r}: got {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}")
        if not np.isfinite(arr).all():
            raise ProtocolError(f"tensor {key!r} holds NaN or Inf")
        adapters[key] = arr
    missing = sorted(set(expected) - set(adapters))
    if missing:
        raise ProtocolError(f"update lacks {len(missing)} adapter tensors, e.g. {missing[0]!r}")
    stats: dict[int, tuple[np.ndarray, float]] = {}
    for layer, p in parts.items():
        off, pos = p.get("off_counts"), p.get("positions")
        if off is None or pos is None:
            raise ProtocolError(f"layer {layer}: statistics need both off_counts and positions")
        if off.shape != (stat_layers[layer],) or pos.size != 1:
            raise ProtocolError(f"layer {layer}: statistics of shape {off.shape}/{pos.shape}, expected ({stat_layers[layer]},)/(1,)")
        posv = float(pos.reshape(-1)[0])
        if not np.all(np.isfinite(off)) or not np.isfinite(posv) or posv < 0 or np.any(off < 0) or np.any(off > posv):
            raise ProtocolError(f"layer {layer}: statistics out of range (counts must lie in [0, positions])")
        stats[layer] = (off.astype(np.float64), posv)
    return adapters, stats


BINDING_KEYS = ("run_id", "round_id", "device_id", "task_id")


def binding(run_id: str, round_id: int, device_id: str, task_id: str) -> dict[str, str]:
    return dict(zip(BINDING_KEYS, (run_id, str(round_id), device_id, task_id)))


def bind_update(data: bytes, run_id: str, round_id: int, device_id: str, task_id: str) -> bytes:
    """The same update, its metadata stamped with the task it answers (re-stamped when a stored
    update is sent again for a retried task)."""
    tensors, meta = decode_tensors(data)
    return encode_tensors(tensors, {**meta, **binding(run_id, round_id, device_id, task_id)})


def check_binding(meta: Mapping[str, str], run_id: str, round_id: int, device_id: str, task_id: str) -> None:
    """ProtocolError unless the blob's metadata binds it to exactly this (run, round, device, task)."""
    want = binding(run_id, round_id, device_id, task_id)
    got = {k: meta.get(k) for k in BINDING_KEYS}
    if got != want:
        diff = ", ".join(f"{k} {got[k]!r}" for k in BINDING_KEYS if got[k] != want[k])
        raise ProtocolError(f"update blob is bound to {diff}, not to this round's task (a replay?)")


class UpdateMeta(BaseModel):
    """An update blob's string metadata, parsed and checked once for both sides.

    Every field may be absent (an older or hand-made blob); numbers travel as decimal text and
    "null" (or "") means the device had nothing to measure. Unknown keys are ignored, so a newer
    device's extra metadata does not make its update unreadable."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: str | None = None
    format_version: str | None = None
    bundle_id: str | None = None
    bundle_version: int | None = None
    num_samples: int = Field(default=0, ge=0)  # the FedAvg weight the device claims
    steps: int | None = Field(default=None, ge=0)
    samples_seen: int | None = Field(default=None, ge=0)
    mean_loss: float | None = None
    acc_before: float | None = None
    acc_after: float | None = None
    holdout_samples: int | None = Field(default=None, ge=0)
    skipped: int | None = Field(default=None, ge=0)
    skipped_summary: str | None = None
    seconds: float | None = None
    # the binding (`bind_update`), compared as text by `check_binding`
    run_id: str | None = None
    round_id: str | None = None
    device_id: str | None = None
    task_id: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _null(cls, v: object) -> object:
        return None if v in ("null", "") else v

    @classmethod
    def parse(cls, meta: Mapping[str, str]) -> "UpdateMeta":
        """The metadata of a blob from the wire or disk; ProtocolError names the first bad field."""
        try:
            return cls.model_validate(dict(meta))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ProtocolError(f"update metadata {field}={meta.get(field)!r}: {err['msg']}") from None

    def check_format(self) -> "UpdateMeta":
        """ProtocolError unless the blob says it is a fedpft update of the version this side reads."""
        if self.format != FORMAT:
            raise ProtocolError(f"not a {FORMAT} file (metadata format={self.format!r})")
        if self.format_version != FORMAT_VERSION:
            raise ProtocolError(f"{FORMAT} version {self.format_version!r} is not supported (expected {FORMAT_VERSION})")
        return self

    def to_metadata(self) -> dict[str, str]:
        """The str -> str map a blob carries, in field order: unmeasured numbers as "null", no
        summary as "", the binding only once stamped."""
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                if name not in BINDING_KEYS:
                    out[name] = "" if name == "skipped_summary" else "null"
            elif name == "seconds":
                out[name] = f"{value:.3f}"
            else:
                out[name] = repr(value) if isinstance(value, float) else str(value)
        return out
