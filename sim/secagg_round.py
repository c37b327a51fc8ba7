"""One secure-aggregation round in-process: a coordinator and n edge participants exchanging the
real messages as encoded bytes (what MQTT would carry), with optional drop-outs and a hook that
lets a test tamper with any message. Used by the tests and benchmarks/secagg.py; the live round
loop drives the same two state machines over its transport instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedpft.edge.secagg import SecAggParticipant
from fedpft.shared.messages import ProtocolError, decode, encode

from fedpft.cloud.secagg import SecAggConfig, SecAggCoordinator, SecAggResult
from fedpft.cloud.secagg_unmask import SecAggAbort

# tamper(stage, device, message, blob) -> (message, blob): a test's man in the middle.
Tamper = Callable[[str, str, object, bytes | None], tuple[object, bytes | None]]


@dataclass
class SimReport:
    result: SecAggResult | None
    failure: str | None
    bytes_up: int = 0  # device -> cloud, per round, all devices
    bytes_down: int = 0  # cloud -> devices (a broadcast counted once)
    cloud_s: float = 0.0
    device_s: float = 0.0  # summed over devices
    log: list[str] = field(default_factory=list)


def _wire(msg) -> tuple[object, int]:
    data = encode(msg)
    return decode(data), len(data)


class _Wire:
    """Carries messages between the participants and the coordinator, timing each side."""

    def __init__(self, coord: SecAggCoordinator, tamper: Tamper | None):
        self.coord, self.rep = coord, SimReport(None, None)
        self.tamper = tamper or (lambda stage, d, m, b: (m, b))

    def up(self, stage: str, d: str, msg, blob: bytes | None = None) -> None:
        if msg is None:  # the device refused the stage (its reason is logged)
            return
        msg, blob = self.tamper(stage, d, msg, blob)
        if msg is None:  # a tamper that drops the message
            return
        msg, size = _wire(msg)
        self.rep.bytes_up += size + (len(blob) if blob else 0)
        reason = self.cloud(lambda: self.coord.handle(msg, blob))
        if reason:
            self.rep.log.append(reason)

    def down(self, msg, stage: str = "", d: str = ""):
        msg, size = _wire(self.tamper(stage, d, msg, None)[0] if stage else msg)
        self.rep.bytes_down += size
        return msg

    def device(self, d: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        except ProtocolError as exc:
            self.rep.log.append(f"{d}: {exc.reason}")
            return None
        finally:
            self.rep.device_s += time.perf_counter() - t

    def cloud(self, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.rep.cloud_s += time.perf_counter() - t


def run_round(contributions: Mapping[str, Mapping[str, np.ndarray]], config: SecAggConfig, run_id: str = "run",
              round_id: int = 1, task_id: str = "task1", drop_before_masked: set[str] = frozenset(),
              drop_before_reveal: set[str] = frozenset(), tamper: Tamper | None = None, signing_key=None,
              trusted_key=None, coordinator: SecAggCoordinator | None = None,
              after_masked: Callable[[SecAggCoordinator], SecAggCoordinator] | None = None) -> SimReport:
    """Drive all four stages; `after_masked` may swap the coordinator (a crash and restore)."""
    ids = sorted(contributions)
    w = _Wire(coordinator or SecAggCoordinator(run_id, round_id, task_id, ids, config, signing_key), tamper)
    parts = {d: SecAggParticipant(run_id, d, trusted_key) for d in ids}
    try:
        for d in ids:
            w.up("keys", d, w.device(d, parts[d].keys, round_id, task_id))
        roster = w.down(w.cloud(w.coord.roster))
        for d in ids:
            w.up("shares", d, w.device(d, parts[d].on_roster, roster))
        routed = w.cloud(w.coord.routed)
        for d, msg in routed.items():
            w.rep.log.extend(w.device(d, parts[d].on_routed, w.down(msg, "routed", d)) or [])
        for d in sorted(set(routed) - set(drop_before_masked)):
            out = w.device(d, parts[d].masked_input, contributions[d])
            if out is not None:
                w.up("masked", d, *out)
        if after_masked is not None:
            w.coord = after_masked(w.coord)
        req = w.down(w.cloud(w.coord.unmask_request))
        for d in sorted(set(req.survivors) - set(drop_before_reveal)):
            w.up("reveal", d, w.device(d, parts[d].on_unmask, req))
        w.rep.result = w.cloud(w.coord.result)
    except SecAggAbort as exc:
        w.rep.failure = exc.reason
    return w.rep
