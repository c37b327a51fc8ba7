"""The configs both sides use: the broker options every MQTT command takes, and the device's
round and fleet agents (the cloud's virtual engine builds AgentConfigs too). Pure pydantic:
importable on devices. The cloud's own configs are in fedpft.cloud.config."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BrokerConfig(BaseModel):
    """Broker URL, TLS and credentials, as every MQTT command takes them."""

    model_config = ConfigDict(extra="forbid")

    broker: str = "mqtt://127.0.0.1:1883"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = Field(default=None, exclude=True, description="never written to disk")


class AgentConfig(BrokerConfig):
    """`fedpft-edge train --broker ...`: one device taking part in a federated run."""

    broker: str
    device_id: str
    data: Path
    run_id: str = "default"
    cache: Path = Path(".fedpft-cache")
    holdout: float = Field(default=0.1, ge=0, lt=1)
    threads: int | None = Field(default=None, ge=1, description="ORT intra-op threads; None lets ORT decide")
    providers: tuple[str, ...] = Field(default=("cpu",), min_length=1, description="onnxruntime execution providers in order of preference")
    heartbeat: float = Field(default=10.0, gt=0, description="seconds between Hello heartbeats while idle")
    fetch_timeout: float = Field(default=600.0, gt=0)
    ack_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for an update's receipt before uploading "
                               "it again; doubled with each retry (at most 8x) and drawn from [1, 1.5)x (edge/backoff.py)")
    max_retries: int = Field(default=3, ge=0, description="uploads of one update after the first that got no receipt")
    # Ed25519 public key of the cloud: unsigned or tampered bundles and tasks are refused.
    # None = development mode: everything is accepted (with one warning).
    trust_key: Path | None = None


def safe_id(value: str | None, what: str) -> str | None:
    from .messages import check_id

    return None if value is None else check_id(value, what)  # ProtocolError is a ValueError


class FleetConfig(BrokerConfig):
    """`fedpft-edge fleet`: a device that installs the bundle versions rolled out to its cohort."""

    device_id: str
    cohort: str
    cache: Path = Path(".fedpft-fleet")
    fleet: str = "default"
    heartbeat: float = Field(default=30.0, gt=0, description="seconds between re-published (retained) statuses")
    fetch_timeout: float = Field(default=300.0, gt=0)
    # Ed25519 public key of the cloud: unsigned or tampered rollouts and bundles are refused.
    trust_key: Path | None = None

    @model_validator(mode="after")
    def _ids(self) -> "FleetConfig":
        safe_id(self.device_id, "--device-id"), safe_id(self.cohort, "--cohort"), safe_id(self.fleet, "--fleet")
        return self
