"""An MQTT broker inside this process (amqtt), so one machine runs a whole federation with no setup.

amqtt is asyncio; it gets its own event loop on a daemon thread, so callers stay synchronous.
amqtt speaks MQTT 3.1.1 only, hence the `?protocol=3.1.1` on the URL `start()` returns.
For fleets and production, point the cloud and devices at Mosquitto or EMQX by URL instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

log = logging.getLogger(__name__)


class AcceptAllAuth(BaseAuthPlugin):
    """Let every client in, as a *named* client.

    amqtt's AnonymousAuthPlugin marks every session anonymous, and amqtt never queues QoS 1
    messages for an offline anonymous session — which would silently break persistent-session
    resume. The embedded broker listens on loopback for one machine, so no check is lost.
    """

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool:
        return True


def _config(host: str, port: int, max_connections: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": max_connections}},
        # Listing plugins replaces amqtt's defaults: no $SYS publisher (a 20 s timer that outlives
        # short runs), no per-packet logger, and AcceptAllAuth instead of anonymous sessions.
        "plugins": {f"{__name__}.AcceptAllAuth": {}},
        "timeout_disconnect_delay": 0,
        # Persistent sessions of devices that never come back must not pile up for ever.
        "session_expiry_interval": 3600,
    }


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = 0, startup_timeout: float = 10.0) -> None:
        self.host = host
        self.port = port  # 0: any free port, known after start()
        self.max_connections = max_connections
        self.startup_timeout = startup_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    def start(self) -> str:
        """Start serving and return the broker URL once a client can actually connect."""
        if self._thread is not None:
            return self.url
        # amqtt's state machines log every transition at INFO through `transitions`: pure noise.
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=f"amqtt-{self.host}:{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.startup_timeout) or self._error is not None:
            err = self._error
            self.stop()
            raise RuntimeError(f"embedded MQTT broker did not start on {self.host}:{self.port}: {err or 'timed out'}")
        _wait_connectable(self.host, self.port, self.startup_timeout)
        log.info("embedded MQTT broker at %s", self.url)
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10.0)
        self._thread, self._loop, self._stop = None, None, None

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        broker = Broker(_config(self.host, self.port, self.max_connections), loop=asyncio.get_running_loop())
        await broker.start()
        try:
            if self.port == 0:
                # amqtt keeps the asyncio server per listener; port 0 means the OS chose one.
                server = broker._servers["default"].instance
                self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await broker.shutdown()


def _wait_connectable(host: str, port: int, timeout: float) -> None:
    """Ready means an MQTT CONNECT gets a CONNACK, not that a socket listens (no paho here)."""
    deadline = time.monotonic() + timeout
    client_id = b"fedpft-ready-probe"
    var = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol 3.1.1, clean session, keepalive 10 s
    body = var + struct.pack("!H", len(client_id)) + client_id
    connect = bytes([0x10, len(body)]) + body
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.sendall(connect)
                if s.recv(4)[:1] == b"\x20":
                    s.sendall(b"\xe0\x00")  # DISCONNECT
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.02)
    raise RuntimeError(f"embedded MQTT broker on {host}:{port} accepts no MQTT connection: {last}")
