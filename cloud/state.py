"""A run's durable state: global adapters, re-aligned FFN weights, metrics, accepted updates.

Every write goes to a temp file that is fsynced and renamed, and state.json (the commit point)
is written last, so a cloud killed at any instant resumes from the last complete round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from fedpft.shared.codec import decode_tensors, encode_tensors

STATE = "state.json"
METRICS = "metrics.jsonl"


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunState(BaseModel):
    run_id: str
    bundle_id: str
    next_round: int = 0
    adapters: str  # file (relative to the run folder) with the current global adapters
    ffn: str | None = None  # file with the current re-aligned FFN weights (ORT names), if any
    alignments: int = 0
    history: list[dict] = Field(default_factory=list)  # one metrics record per finished round


class RunStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    # -- tensors
    def write_tensors(self, rel: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> str:
        atomic_write(self.folder / rel, encode_tensors(tensors, metadata or {}))
        return rel

    def read_tensors(self, rel: str) -> dict[str, np.ndarray]:
        return decode_tensors((self.folder / rel).read_bytes())[0]

    def save_update(self, round_id: int, device: str, payload: bytes) -> Path:
        """Keep every accepted update on disk before it counts (nothing accepted is ever lost)."""
        path = self.folder / "updates" / f"round_{round_id:04d}" / f"{device}.safetensors"
        atomic_write(path, payload)
        return path

    def stored_updates(self, round_id: int) -> list[Path]:
        folder = self.folder / "updates" / f"round_{round_id:04d}"
        return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []

    # -- state
    def load(self) -> RunState | None:
        p = self.folder / STATE
        return RunState.model_validate_json(p.read_text()) if p.is_file() else None

    def commit(self, state: RunState) -> None:
        atomic_write(self.folder / STATE, state.model_dump_json(indent=2).encode())
        self._rewrite_metrics(state.history)

    def _rewrite_metrics(self, history: list[dict]) -> None:
        # metrics.jsonl mirrors the committed history, so a crash never leaves a line for a
        # round that resume will run again
        atomic_write(self.folder / METRICS, "".join(json.dumps(h) + "\n" for h in history).encode())
