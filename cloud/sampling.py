"""Who trains in a round, and when a round is over: pure, deterministic logic."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import Enum


def round_rng(seed: int, round_id: int, attempt: int = 0) -> random.Random:
    """One RNG per (seed, round, attempt), so a resumed run samples exactly as an uninterrupted one."""
    return random.Random(f"{seed}:{round_id}:{attempt}")


def sample_devices(online: list[str], rng: random.Random, k: int | None = None, fraction: float | None = None) -> list[str]:
    """Sample k (or ceil(fraction * online)) devices, sorted, from the online ones (all if fewer)."""
    pool = sorted(set(online))
    if k is None:
        k = len(pool) if fraction is None else max(1, math.ceil(fraction * len(pool)))
    if k >= len(pool):
        return pool
    return sorted(rng.sample(pool, k))


class RoundStatus(str, Enum):
    WAITING = "waiting"
    COMPLETE = "complete"  # every selected device answered
    DEADLINE = "deadline"  # deadline passed with quorum
    FAILED = "failed"  # deadline passed below quorum


@dataclass
class RoundTracker:
    """Collects one round's answers; `status(now)` says whether to keep waiting."""

    selected: list[str]
    deadline: float
    min_clients: int
    accepted: dict[str, object] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def answered(self) -> set[str]:
        return set(self.accepted) | set(self.failed)

    def accept(self, device: str, update: object) -> bool:
        """Record an update; False if the device was not selected or already answered (idempotent)."""
        if device not in self.selected or device in self.answered():
            return False
        self.accepted[device] = update
        return True

    def fail(self, device: str, reason: str) -> bool:
        if device not in self.selected or device in self.answered():
            return False
        self.failed[device] = reason
        return True

    def status(self, now: float) -> RoundStatus:
        if self.answered() >= set(self.selected):
            return RoundStatus.COMPLETE if len(self.accepted) >= self.min_clients else RoundStatus.FAILED
        if now < self.deadline:
            return RoundStatus.WAITING
        return RoundStatus.DEADLINE if len(self.accepted) >= self.min_clients else RoundStatus.FAILED
