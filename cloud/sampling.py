"""Who trains in a round, and when a round is over: pure, deterministic logic."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import Enum


def round_rng(seed: int, round_id: int, attempt: int = 0) -> random.Random:
    """One RNG per (seed, round, attempt), so a resumed run samples exactly as an uninterrupted one."""
    return random.Random(f"{seed}:{round_id}:{attempt}")


def sample_devices(online: list[str], rng: random.Random, k: int | None = None, fraction: float | None = None,
                   limit: int | None = None) -> list[str]:
    """Sample k (or ceil(fraction * online)) devices, sorted, from the online ones (all if fewer),
    never more than `limit` (a flood of registered ids cannot make a round unbounded)."""
    pool = sorted(set(online))
    if k is None:
        k = len(pool) if fraction is None else max(1, math.ceil(fraction * len(pool)))
    if limit is not None:
        k = min(k, limit)
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
    ack_deadline: float | None = None  # selected devices that have not acked the task by then are given up on
    accepted: dict[str, object] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # devices that reported a failure
    # devices not waited for any more (last will arrived, no task ack): their update still counts if it comes
    given_up: dict[str, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        # every event of a round asks these; at 1,000 devices, list scans and set rebuilds per event
        # were a measurable share of the round loop
        self._selected = frozenset(self.selected)

    def answered(self) -> set[str]:
        """Devices whose answer is final: an accepted update or a reported failure."""
        return set(self.accepted) | set(self.failed)

    def has_answered(self, device: str) -> bool:
        return device in self.accepted or device in self.failed

    def is_selected(self, device: str) -> bool:
        return device in self._selected

    @property
    def selected_set(self) -> frozenset[str]:
        return self._selected

    def accept(self, device: str, update: object) -> bool:
        """Record an update; False if the device was not selected or already answered (idempotent)."""
        if not self.is_selected(device) or self.has_answered(device):
            return False
        self.given_up.pop(device, None)
        self.accepted[device] = update
        return True

    def fail(self, device: str, reason: str) -> bool:
        if not self.is_selected(device) or self.has_answered(device):
            return False
        self.given_up.pop(device, None)
        self.failed[device] = reason
        return True

    def give_up(self, device: str, reason: str) -> bool:
        """Stop waiting for a device (False if it answered already or was never selected)."""
        if not self.is_selected(device) or self.has_answered(device) or device in self.given_up:
            return False
        self.given_up[device] = reason
        return True

    def ack(self, device: str) -> None:
        if self.is_selected(device):
            self.acked.add(device)

    def expire_acks(self, now: float) -> list[str]:
        """Give up on the selected devices that have not acked the task by the ack deadline."""
        if self.ack_deadline is None or now < self.ack_deadline:
            return []
        silent = [d for d in self.selected if d not in self.acked and not self.has_answered(d) and d not in self.given_up]
        for d in silent:
            self.given_up[d] = "no task ack before the ack deadline"
        return silent

    def status(self, now: float) -> RoundStatus:
        # accepted, failed and given_up hold selected devices only, and never the same one twice
        if len(self.accepted) + len(self.failed) + len(self.given_up) >= len(self._selected):
            return RoundStatus.COMPLETE if len(self.accepted) >= self.min_clients else RoundStatus.FAILED
        if now < self.deadline:
            return RoundStatus.WAITING
        return RoundStatus.DEADLINE if len(self.accepted) >= self.min_clients else RoundStatus.FAILED
