"""`fedpft-edge fleet`: a device that installs the bundle versions rolled out to it, and says so.

The device keeps two versions in `cache/versions/<bundle_id>/`: the current one and the one
before it, named by a small pointer file (`cache/fleet.json`, written atomically). A rollout
downloads the bundle through the device link (`edge/link.py`: resumable chunks), unpacks it (sha256 of every device file
checked against the manifest), checks the manifest's signature when the device trusts a key, and
only then moves the pointers; anything wrong leaves the current version current. A rollback
swaps the pointers back. Every state change is published as a retained `DeviceStatus`; a final
one (installed/failed) naming the rollout is the ack the cloud waits for.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedpft.shared import topics
from fedpft.shared.config import FleetConfig
from fedpft.shared.fsio import atomic_write
from fedpft.shared.manifest import BundleError, BundleManifest
from fedpft.shared.messages import BundleVersion, DeviceStatus, ProtocolError, Rollout
from fedpft.shared.routes import check_fleet_route
from fedpft.shared.signing import SignatureError
from fedpft.shared.transport import Transport

from .blobs import AgentError
from .link import Address, DeviceLink, Stopped

log = logging.getLogger("fedpft.fleet")

POINTERS_NAME = "fleet.json"


# ---- version pointers (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Pointers:
    current: BundleVersion | None = None
    previous: BundleVersion | None = None

    def installed(self, new: BundleVersion) -> "Pointers":
        """After installing `new`: it is current, the old current is kept as previous."""
        return self if new == self.current else Pointers(current=new, previous=self.current)

    def rolled_back(self, target: BundleVersion) -> "Pointers":
        """Back to `target`, which must be the kept previous version (or already current)."""
        if target == self.current:
            return self
        if target != self.previous:
            raise AgentError(f"cannot roll back to {target}: this device keeps {self.previous or 'no previous version'}"
                             f" (current {self.current or 'none'})")
        return Pointers(current=self.previous, previous=self.current)

    def kept(self) -> set[str]:
        return {v.bundle_id for v in (self.current, self.previous) if v is not None}


def load_pointers(path: Path) -> Pointers:
    if not Path(path).is_file():
        return Pointers()
    try:
        data = json.loads(Path(path).read_text())
        return Pointers(*(BundleVersion(**data[k]) if data.get(k) else None for k in ("current", "previous")))
    except (ValueError, TypeError, KeyError) as exc:
        raise AgentError(f"{path}: unreadable version pointers ({exc}); remove it to start over") from None


def save_pointers(path: Path, p: Pointers) -> None:
    """Atomically: a crash leaves the old pointers or the new, never half of either."""
    data = {k: v.model_dump() if v is not None else None for k, v in (("current", p.current), ("previous", p.previous))}
    atomic_write(path, json.dumps(data, indent=2).encode())


# ---- the agent ------------------------------------------------------------------------------------


def fleet_address(fleet: str, me: str) -> Address:
    """A fleet's device: rollouts on the fleet's rollout topic, its status and presence retained."""
    return Address(space=fleet, device_id=me, topic=lambda kind: topics.fleet_device_topic(fleet, me, kind),
                   listen=(topics.rollout_topic(fleet),), resend=topics.fleet_resend_pattern(fleet, me), check=check_fleet_route,
                   retained=frozenset({topics.PRESENCE, topics.STATUS}))


class FleetAgent:
    def __init__(self, cfg: FleetConfig, transport: Transport, stop: threading.Event | None = None):
        self.cfg = cfg
        self.fleet, self.me = cfg.fleet, cfg.device_id
        self.link = DeviceLink(transport, fleet_address(self.fleet, self.me), cfg.cache, trust_key=cfg.trust_key,
                               fetch_timeout=cfg.fetch_timeout, signed="rollouts", log=log, stop=stop)
        self.versions = self.link.cache / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)
        self.pointers_file = self.link.cache / POINTERS_NAME
        self.pointers = load_pointers(self.pointers_file)
        self.state = "installed" if self.pointers.current else "idle"
        self.rollout_id: str | None = None
        self.reason: str | None = None

    def status(self) -> DeviceStatus:
        return DeviceStatus(run_id=self.fleet, sender=self.me, device_id=self.me, cohort=self.cfg.cohort, installed=self.pointers.current,
                            previous=self.pointers.previous, state=self.state, rollout_id=self.rollout_id, reason=self.reason)

    def publish_status(self) -> None:
        self.link.publish(topics.STATUS, self.status())

    def serve(self) -> None:
        """Handle rollouts until `stop` is set; re-publish the status every heartbeat."""
        self.link.start()
        self.publish_status()
        try:
            # the status is the heartbeat: it keeps "last seen" fresh and re-announces after a reconnect
            self.link.serve(self.handle, self.publish_status, self.cfg.heartbeat, 0.5)
        except Stopped:
            log.info("stopping")
            if self.state == "installing":
                self.state, self.reason = "failed", "stopped during the install"
                self.publish_status()

    def handle(self, r: Rollout) -> None:
        if not r.addresses(self.me, self.cfg.cohort):
            return
        if r.rollout_id == self.rollout_id:
            return self.publish_status()  # a redelivered rollout: ack again, act once
        if time.time() > r.deadline:
            log.warning("rollout %s arrived after its deadline; ignored", r.rollout_id)
            return
        self.rollout_id, self.reason = r.rollout_id, None
        try:
            self.link.check_signed(r, f"rollout {r.rollout_id}")
            if r.rollback:
                self._set_pointers(self.pointers.rolled_back(r.target))
            else:
                self.state = "installing"
                self.publish_status()
                self._install(r)
            self.state = "installed"
            log.info("rollout %s: %s installed (previous: %s)", r.rollout_id, self.pointers.current, self.pointers.previous or "none")
        except Stopped:
            raise
        except (AgentError, BundleError, ProtocolError, SignatureError, OSError) as exc:
            self.state, self.reason = "failed", str(getattr(exc, "reason", exc)).splitlines()[0]
            log.error("rollout %s failed: %s", r.rollout_id, self.reason)
        self.publish_status()

    def _install(self, r: Rollout) -> None:
        target = r.target
        if target == self.pointers.current:
            return

        def announced(m: BundleManifest) -> None:
            got = BundleVersion(bundle_id=m.bundle_id, bundle_version=m.bundle_version) if m.bundle_id == target.bundle_id else None
            if got != target:
                raise AgentError(f"bundle is {m.bundle_id[:12]} v{m.bundle_version}, the rollout announced {target}")

        # a version kept from before is used as it is: no download
        self.link.install_bundle(r.bundle, self.versions / target.bundle_id, announced)
        self._set_pointers(self.pointers.installed(target))

    def _set_pointers(self, p: Pointers) -> None:
        save_pointers(self.pointers_file, p)
        self.pointers = p
        for d in self.versions.iterdir():  # keep two versions, drop the rest
            if d.is_dir() and d.name not in p.kept():
                shutil.rmtree(d, ignore_errors=True)


def run_fleet(cfg: FleetConfig, stop: threading.Event) -> Pointers:
    """Connect (retained offline presence as the last will), serve rollouts until `stop`, say goodbye."""
    from .connection import connected

    with connected(cfg, fleet_address(cfg.fleet, cfg.device_id), f"fedpft-fleet-{cfg.fleet}-{cfg.device_id}", "stopped") as transport:
        agent = FleetAgent(cfg, transport, stop)
        agent.serve()
        return agent.pointers
