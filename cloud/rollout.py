"""`fedpft-cloud rollout` and `status`: bundle versions to a fleet of devices, and back.

A fleet sits beside runs under `fedpft/fleet/<fleet>/`. Devices (`fedpft-edge fleet`) keep a
retained `DeviceStatus` (cohort, installed and previous version, install state) and a retained
presence, so the fleet is readable even when devices are offline. A rollout:

1. reads the retained statuses and picks its targets: the devices that declared the cohort, or
   a deterministic fraction of the known devices (`select_fraction`, by seed);
2. serves the bundle's chunks on each asking device's resend topic (a `BlobServer`), for as long
   as the command waits;
3. publishes the `Rollout` and waits for each target's final status naming it (the ack);
4. records the rollout, and the version the group had before it, in `--state` — which is what
   `--rollback` returns the group to.

Selection, the group state and the summary are pure functions; only `Fleet` touches the wire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedpft.cloud.config import RolloutConfig
from fedpft.shared import topics
from fedpft.shared.archive import pack_bundle
from fedpft.shared.config import BrokerConfig
from fedpft.shared.fsio import atomic_write
from fedpft.shared.manifest import BundleManifest, verify_bundle
from fedpft.shared.messages import (
    CLOUD_SENDER, BlobRequest, BundleVersion, DeviceStatus, Presence, ProtocolError, Rollout, decode, encode,
)
from fedpft.shared.routes import check_fleet_route
from fedpft.shared.transport import Transport

from .blobs import BlobServer

log = logging.getLogger("fedpft.rollout")

FINAL_STATES = ("installed", "failed")


class RolloutError(Exception):
    """A rollout that cannot be started; one line for the user."""


# ---- pure logic -----------------------------------------------------------------------------------


def select_fraction(devices: list[str], fraction: float, seed: int) -> list[str]:
    """ceil(fraction * n) devices (at least one), ranked by sha256(seed:device): the same seed
    picks the same devices, and a device's rank does not depend on which others exist."""
    if not devices:
        return []
    k = max(1, math.ceil(fraction * len(devices) - 1e-9))
    ranked = sorted(set(devices), key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    return sorted(ranked[:k])


def group_key(cohort: str | None, fraction: float | None, seed: int) -> str:
    """What the state remembers versions by: a cohort, or one fraction selection."""
    return f"cohort:{cohort}" if cohort is not None else f"fraction:{fraction:g}:seed{seed}"


def prevailing(versions: list[BundleVersion | None], exclude: BundleVersion) -> BundleVersion | None:
    """The version most of the targets run (other than the one being installed): what to return to."""
    counts = Counter(v for v in versions if v is not None and v != exclude)
    return counts.most_common(1)[0][0] if counts else None


@dataclass
class GroupRecord:
    current: BundleVersion | None = None
    previous: BundleVersion | None = None
    devices: list[str] = field(default_factory=list)


class FleetState:
    """`--state DIR`: rollouts.jsonl (history, appended) and groups.json (written atomically)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.groups_file = self.folder / "groups.json"
        self.history_file = self.folder / "rollouts.jsonl"

    def groups(self) -> dict[str, GroupRecord]:
        if not self.groups_file.is_file():
            return {}
        raw = json.loads(self.groups_file.read_text())
        return {k: GroupRecord(*(BundleVersion(**v[n]) if v.get(n) else None for n in ("current", "previous")), v.get("devices", []))
                for k, v in raw.items()}

    def save_group(self, key: str, rec: GroupRecord) -> None:
        raw = json.loads(self.groups_file.read_text()) if self.groups_file.is_file() else {}
        raw[key] = {"current": rec.current and rec.current.model_dump(), "previous": rec.previous and rec.previous.model_dump(),
                    "devices": rec.devices}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.groups_file, json.dumps(raw, indent=2).encode())

    def append(self, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.history_file, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def history(self) -> list[dict]:
        f = self.history_file
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


@dataclass
class DeviceView:
    """What the fleet's retained messages say about one device."""

    device_id: str
    status: DeviceStatus | None = None
    presence: Presence | None = None

    @property
    def online(self) -> bool:
        return self.presence is not None and self.presence.status == "online"

    @property
    def last_seen(self) -> float | None:
        times = [m.sent_at for m in (self.status, self.presence) if m is not None]
        return max(times) if times else None


def outcome(view: DeviceView | None, rollout_id: str) -> str:
    """One device's line in a rollout summary."""
    st = view.status if view is not None else None
    if st is None or st.rollout_id != rollout_id or st.state not in FINAL_STATES:
        return "no answer" + (" (offline)" if view is not None and view.presence is not None and not view.online else "")
    return f"installed {st.installed}" if st.state == "installed" else f"failed: {st.reason}"


# ---- the wire ---------------------------------------------------------------------------------------


class Fleet:
    """A live view of one fleet's devices (retained statuses and presences) and the blobs served to them."""

    def __init__(self, transport: Transport, fleet: str, chunk_size: int = 1 << 20):
        self.t, self.fleet = transport, fleet
        self.views: dict[str, DeviceView] = {}
        self._cond = threading.Condition()
        self.blobs = BlobServer(transport, fleet, chunk_size, lambda d, b: topics.fleet_resend_topic(fleet, d, b))

    def watch(self, settle: float) -> dict[str, DeviceView]:
        """Subscribe to the fleet; retained messages arrive within `settle` seconds."""
        for kind in (topics.STATUS, topics.PRESENCE, topics.BLOBREQ):
            self.t.subscribe(topics.fleet_devices_pattern(self.fleet, kind), self._on_json)
        time.sleep(settle)
        return self.snapshot()

    def snapshot(self) -> dict[str, DeviceView]:
        with self._cond:
            return {d: DeviceView(d, v.status, v.presence) for d, v in self.views.items()}

    def _on_json(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        msg = decode(payload)  # ProtocolError: logged as one line by the dispatcher
        check_fleet_route(topic, msg)
        if isinstance(msg, BlobRequest):
            return self.blobs.serve(msg)
        with self._cond:
            view = self.views.setdefault(msg.device_id, DeviceView(msg.device_id))
            if isinstance(msg, DeviceStatus):
                view.status = msg
            else:
                view.presence = msg
            self._cond.notify_all()

    def wait_acks(self, rollout_id: str, targets: set[str], timeout: float) -> dict[str, DeviceView]:
        """Until every target acked (a final status naming the rollout), or timeout."""

        def answered() -> bool:
            acked = {d for d, v in self.views.items() if v.status and v.status.rollout_id == rollout_id and v.status.state in FINAL_STATES}
            return targets <= acked

        with self._cond:
            self._cond.wait_for(answered, timeout)
        return self.snapshot()


@dataclass
class RolloutReport:
    rollout: Rollout
    group: str
    results: dict[str, str]  # device -> "installed v2 (...)" | "failed: ..." | "no answer"

    @property
    def installed(self) -> list[str]:
        return sorted(d for d, r in self.results.items() if r.startswith("installed"))


def _connect(cfg: BrokerConfig, client: str):
    from fedpft.shared.mqtt import MqttTransport

    return MqttTransport.from_config(cfg, f"fedpft-{client}-{uuid.uuid4().hex[:8]}", clean_start=True)


def load_bundle(folder: Path) -> tuple[BundleManifest, bytes]:
    """The manifest (every file checked) and the archive devices receive."""
    m = verify_bundle(folder)
    return m, pack_bundle(folder)


def rollout(cfg: RolloutConfig, transport: Transport | None = None, bundle: tuple[BundleManifest, bytes] | None = None) -> RolloutReport:
    """Publish a bundle version (or a rollback) and wait for the devices' acks; see the module doc.

    `bundle` overrides `cfg.bundle` with a (manifest, archive) pair — tests push a tampered archive."""
    state = FleetState(cfg.state)
    key = group_key(cfg.cohort, cfg.fraction, cfg.seed)
    record = state.groups().get(key, GroupRecord())
    if cfg.rollback and record.previous is None:
        raise RolloutError(f"{key} has no previous version to return to in {cfg.state}")
    if not cfg.rollback and bundle is None:
        assert cfg.bundle is not None
        bundle = load_bundle(cfg.bundle)
    signing = None
    if cfg.signing_key is not None:
        from fedpft.shared.signing import load_private_key

        signing = load_private_key(cfg.signing_key)
    t = transport or _connect(cfg, f"rollout-{cfg.fleet}")
    if transport is None:
        t.connect()
    fleet = Fleet(t, cfg.fleet, cfg.chunk_size)
    try:
        views = fleet.watch(cfg.settle)
        targets = _targets(cfg, views, record)
        rollout_id = f"ro-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if cfg.rollback:
            target, ref = record.previous, None
        else:
            manifest, data = bundle  # type: ignore[misc]
            target = BundleVersion(bundle_id=manifest.bundle_id, bundle_version=manifest.bundle_version)
            ref = fleet.blobs.offer(f"bundle-{manifest.bundle_id[:16]}-v{manifest.bundle_version}", data)
        msg = Rollout(run_id=cfg.fleet, sender=CLOUD_SENDER, rollout_id=rollout_id, target=target, bundle=ref, rollback=cfg.rollback,
                      cohort=cfg.cohort, devices=None if cfg.cohort is not None else targets, deadline=time.time() + cfg.timeout)
        if signing is not None:
            from fedpft.shared.signing import sign

            msg = sign(msg, signing)
        before = [views[d].status.installed if d in views and views[d].status else None for d in targets]
        log.info("rollout %s: %s %s to %s (%d devices known)", rollout_id, "rollback" if cfg.rollback else "install", target, key, len(targets))
        t.publish(topics.rollout_topic(cfg.fleet), encode(msg))
        after = fleet.wait_acks(rollout_id, set(targets), cfg.timeout)
    finally:
        fleet.blobs.close()  # before the link goes: re-sends still waiting are moot once the rollout is over
        if transport is None:
            t.close()
    answered = {d for d, v in after.items() if v.status and v.status.rollout_id == rollout_id}
    results = {d: outcome(after.get(d), rollout_id) for d in sorted(set(targets) | answered)}
    report = RolloutReport(msg, key, results)
    _remember(state, cfg, record, report, before)
    return report


def _targets(cfg: RolloutConfig, views: dict[str, DeviceView], record: GroupRecord) -> list[str]:
    """The devices a rollout addresses: the cohort's, the group's last ones for a rollback, or a seeded fraction."""
    if cfg.cohort is not None:
        targets = sorted(d for d, v in views.items() if v.status is not None and v.status.cohort == cfg.cohort)
    elif cfg.rollback:
        targets = record.devices
    else:
        targets = select_fraction([d for d, v in views.items() if v.status is not None], cfg.fraction or 1.0, cfg.seed)
    if not targets:
        who = f"has declared cohort {cfg.cohort!r}" if cfg.cohort is not None else "has published a status"
        raise RolloutError(f"no device of fleet {cfg.fleet!r} {who}; nothing to roll out to")
    return targets


def _remember(state: FleetState, cfg: RolloutConfig, record: GroupRecord, report: RolloutReport, before: list) -> None:
    """Move the group's current/previous versions when anyone installed, and log the rollout in the history."""
    target, rollout_id = report.rollout.target, report.rollout.rollout_id
    if report.installed:
        if cfg.rollback:
            new = GroupRecord(current=target, previous=record.current, devices=record.devices)
        else:
            was = prevailing(before, target) or (record.current if record.current != target else record.previous)
            new = GroupRecord(current=target, previous=was, devices=sorted(report.results))
        state.save_group(report.group, new)
    state.append({"rollout_id": rollout_id, "at": time.time(), "fleet": cfg.fleet, "group": report.group, "rollback": cfg.rollback,
                  "target": target.model_dump(), "results": report.results})


def read_fleet(cfg: BrokerConfig, fleet: str, settle: float = 0.5) -> list[DeviceView]:
    """The fleet as its retained messages tell it (`fedpft-cloud status`)."""
    topics.rollout_topic(fleet)  # ProtocolError for a bad fleet name, before connecting
    with _connect(cfg, f"status-{fleet}") as t:
        views = Fleet(t, fleet).watch(settle)
    return [views[d] for d in sorted(views)]


def status_table(views: list[DeviceView], fleet: str, now: float | None = None):
    from rich.table import Table

    now = time.time() if now is None else now
    table = Table(title=f"fleet {fleet}: {len(views)} devices")
    for col in ("device", "cohort", "presence", "state", "installed", "previous", "last seen", "reason"):
        table.add_column(col)
    for v in views:
        st = v.status
        seen = v.last_seen
        table.add_row(
            v.device_id, st.cohort if st else "-", "online" if v.online else "offline",
            st.state if st else "-", str(st.installed) if st and st.installed else "-", str(st.previous) if st and st.previous else "-",
            f"{max(0.0, now - seen):.0f}s ago" if seen else "-",
            (st.reason if st and st.state == "failed" else None) or (v.presence.reason if v.presence and not v.online else None) or "",
        )
    return table
