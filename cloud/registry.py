"""The devices the cloud knows: who is online, what each declared, bounded in size.

Main-loop only (the round loop owns it; handlers never touch it), so it needs no lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from dataclasses import dataclass, field

from fedpft.shared.messages import Hello, Presence, ProtocolError

log = logging.getLogger("fedpft.serve")


@dataclass
class DeviceInfo:
    online: bool = True
    num_samples: int = 0
    last_seen: float = field(default_factory=time.time)
    bundle_version: str | None = None
    hello: bool = False  # only a Hello that passed the run's checks makes a device eligible for rounds


class DeviceRegistry(dict[str, DeviceInfo]):
    """device id -> DeviceInfo, at most `limit` entries: hellos from arbitrary ids must not grow
    the cloud's memory. When full, the offline device seen longest ago makes room; with every
    device online (or in the open round), a newcomer is refused."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def register(self, device_id: str, busy: Container[str] = ()) -> DeviceInfo:
        """The device's entry, made on its first Hello (or retained online presence); `busy`
        devices (selected for the open round) are never evicted."""
        info = self.get(device_id)
        if info is not None:
            return info
        if len(self) >= self.limit:
            offline = [d for d, i in self.items() if not i.online and d not in busy]
            if not offline:
                raise ProtocolError(f"device registry full ({self.limit} online devices, --max-devices); "
                                    f"hello from {device_id} ignored")
            del self[min(offline, key=lambda d: self[d].last_seen)]
        info = self[device_id] = DeviceInfo()
        return info

    def hello(self, msg: Hello, busy: Container[str] = ()) -> None:
        if msg.num_samples < 1:
            raise ProtocolError(f"hello from {msg.device_id} declares no training samples; not eligible for rounds")
        info = self.register(msg.device_id, busy)
        info.online, info.num_samples, info.last_seen, info.bundle_version = True, msg.num_samples, time.time(), msg.bundle_version
        info.hello = True
        log.debug("device %s online (%d samples)", msg.device_id, msg.num_samples)

    def presence(self, msg: Presence, busy: Container[str] = ()) -> bool:
        """Record a presence; True when it says a known device went offline."""
        # a retained "online" tells a cloud that started late about a device (its next Hello
        # heartbeat makes it eligible); "offline" from a device never seen tells nothing
        info = self.register(msg.device_id, busy) if msg.status == "online" else self.get(msg.device_id)
        if info is None:
            return False
        info.online, info.last_seen = msg.status == "online", time.time()
        if not info.online:
            log.info("device %s went offline%s", msg.device_id, f" ({msg.reason})" if msg.reason else "")
        return not info.online

    def seen(self, device_id: str) -> None:
        if device_id in self:
            self[device_id].last_seen = time.time()

    def declared(self, device_id: str) -> int | None:
        """num_samples of the device's accepted Hello: its update cannot weigh more."""
        info = self.get(device_id)
        return info.num_samples if info is not None and info.hello else None

    def online(self) -> list[str]:
        """Devices eligible for a round: online, and announced by a Hello that passed the checks."""
        return sorted(d for d, i in self.items() if i.online and i.hello)
