"""What the cloud writes about a secure-aggregation round in progress, and how it comes back.

Only masked material: the roster's public keys and commitments, the sealed share boxes (the cloud
has no key to open them), who sent what (device lists, sha256 of each masked input) and the
running ring sum of the masked inputs, which still carries every survivor's self-mask. Never an
individual input, never a private key or seed, never a revealed share: after a crash in the unmask
stage the cloud re-publishes the same SecAggUnmask and devices reveal the same shares again (a
device refuses any request that would open both secrets of one owner).

Resume rule: a crash before the masked stage restarts the round (new task, fresh keys: devices
keep their keys in memory only for one task); from the masked stage on, `restore` continues it.
The file is safetensors: the masked sum as int64, everything else as JSON metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.messages import ProtocolError, SecAggKeys
from fedpft.shared import secagg_crypto as sc

from .secagg import SecAggConfig, SecAggCoordinator

RESUMABLE = ("masked", "unmask")
_SUM = "secagg.masked_sum"


def snapshot(coord: SecAggCoordinator) -> bytes:
    """Safetensors bytes of the coordinator's state; refused once the sum is unmasked."""
    if coord.stage not in ("keys", "shares", "masked", "unmask", "failed"):
        raise ValueError(f"nothing to persist at stage {coord.stage!r}: the unmasked sum belongs in the checkpoint")
    c = coord.config
    state = {
        "run_id": coord.run_id, "round_id": coord.round_id, "task_id": coord.task_id, "devices": coord.devices,
        "stage": coord.stage, "failure": coord.failure, "threshold": coord.threshold,
        "config": {"layout": {k: list(v) for k, v in c.layout.items()}, "value_bound": c.value_bound,
                   "threshold": c.threshold, "degree": c.degree, "frac_bits": c.frac_bits, "clip": c.clip,
                   "noise_std": c.noise_std},
        "keys": {d: k.model_dump(mode="json") for d, k in coord.keys.items()},
        "boxes": coord.boxes, "survivors_u2": coord.survivors_u2, "masked_sha": coord.masked_sha,
        "dropped": coord.dropped,
    }
    return encode_tensors({_SUM: coord.masked_sum.view(np.int64)}, {"secagg_state": json.dumps(state, sort_keys=True)})


def resumable(coord: SecAggCoordinator) -> bool:
    """True when a restored coordinator can go on; otherwise restart the round under a new task."""
    return coord.stage in RESUMABLE


def restore(data: bytes, signing_key: Ed25519PrivateKey | None = None) -> SecAggCoordinator:
    """The coordinator back from `snapshot`; ProtocolError (one line) if the bytes are not one."""
    tensors, meta = decode_tensors(data)
    try:
        s = json.loads(meta["secagg_state"])
        c = s["config"]
        config = SecAggConfig(layout={k: tuple(v) for k, v in c["layout"].items()}, value_bound=c["value_bound"],
                              threshold=c["threshold"], degree=c["degree"], frac_bits=c["frac_bits"], clip=c["clip"],
                              noise_std=c["noise_std"])
        coord = SecAggCoordinator(s["run_id"], s["round_id"], s["task_id"], s["devices"], config, signing_key)
        coord.stage, coord.failure, coord.threshold = s["stage"], s["failure"], s["threshold"]
        coord.keys = {d: SecAggKeys.model_validate(k) for d, k in s["keys"].items()}
        coord.boxes, coord.survivors_u2 = s["boxes"], s["survivors_u2"]
        coord.masked_sha, coord.dropped = s["masked_sha"], s["dropped"]
        masked_sum = tensors[_SUM]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"not a secagg state file: {type(exc).__name__}: {exc}") from None
    if masked_sum.dtype != np.int64 or masked_sum.shape != (coord.length,):
        raise ProtocolError(f"secagg state: masked sum of shape {masked_sum.shape}, expected ({coord.length},)")
    coord.masked_sum = masked_sum.view(np.uint64).copy()
    if coord.keys:
        coord.graph = sc.neighbours(list(coord.keys), config.degree, coord.ctx)
    return coord


def write(path: Path, coord: SecAggCoordinator) -> None:
    """Atomically (temp + fsync + rename), like every other run file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(snapshot(coord))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read(path: Path, signing_key: Ed25519PrivateKey | None = None) -> SecAggCoordinator:
    return restore(Path(path).read_bytes(), signing_key)
