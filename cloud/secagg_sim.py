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

from .secagg import SecAggConfig, SecAggCoordinator, SecAggResult
from .secagg_unmask import SecAggAbort

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


def run_round(contributions: Mapping[str, Mapping[str, np.ndarray]], config: SecAggConfig, run_id: str = "run",
              round_id: int = 1, task_id: str = "task1", drop_before_masked: set[str] = frozenset(),
              drop_before_reveal: set[str] = frozenset(), tamper: Tamper | None = None, signing_key=None,
              trusted_key=None, coordinator: SecAggCoordinator | None = None,
              after_masked: Callable[[SecAggCoordinator], SecAggCoordinator] | None = None) -> SimReport:
    """Drive all four stages; `after_masked` may swap the coordinator (a crash and restore)."""
    ids = sorted(contributions)
    coord = coordinator or SecAggCoordinator(run_id, round_id, task_id, ids, config, signing_key)
    parts = {d: SecAggParticipant(run_id, d, trusted_key) for d in ids}
    rep = SimReport(None, None)
    tamper = tamper or (lambda stage, d, m, b: (m, b))

    def up(stage: str, d: str, msg, blob: bytes | None = None) -> None:
        msg, blob = tamper(stage, d, msg, blob)
        if msg is None:
            return
        msg, size = _wire(msg)
        rep.bytes_up += size + (len(blob) if blob else 0)
        t = time.perf_counter()
        reason = coord.handle(msg, blob)
        rep.cloud_s += time.perf_counter() - t
        if reason:
            rep.log.append(reason)

    def device(d: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        except ProtocolError as exc:
            rep.log.append(f"{d}: {exc.reason}")
            return None
        finally:
            rep.device_s += time.perf_counter() - t

    def cloud(fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            rep.cloud_s += time.perf_counter() - t

    try:
        for d in ids:
            up("keys", d, device(d, parts[d].keys, round_id, task_id))
        roster, size = _wire(cloud(coord.roster))
        rep.bytes_down += size
        for d in ids:
            shares = device(d, parts[d].on_roster, roster)
            if shares is not None:
                up("shares", d, shares)
        routed = cloud(coord.routed)
        for d, msg in routed.items():
            msg, size = _wire(tamper("routed", d, msg, None)[0])
            rep.bytes_down += size
            rep.log.extend(device(d, parts[d].on_routed, msg) or [])
        for d in routed:
            if d in drop_before_masked:
                continue
            out = device(d, parts[d].masked_input, contributions[d])
            if out is not None:
                up("masked", d, *out)
        if after_masked is not None:
            coord = after_masked(coord)
        req, size = _wire(cloud(coord.unmask_request))
        rep.bytes_down += size
        for d in req.survivors:
            if d not in drop_before_reveal:
                reveal = device(d, parts[d].on_unmask, req)
                if reveal is not None:
                    up("reveal", d, reveal)
        rep.result = cloud(coord.result)
    except SecAggAbort as exc:
        rep.failure = exc.reason
    return rep
