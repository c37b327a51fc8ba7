"""The base of every wire message: ids, ProtocolError, the record and message classes.

Split from `messages` so the secure-aggregation messages (`secagg_messages`) build on the same
base without an import cycle; `fedpft.shared.messages` re-exports all of it.
"""

from __future__ import annotations

import re
import time
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.functional_validators import AfterValidator

PROTOCOL_VERSION = 1
# Control messages are small; a bigger payload is a bug or an attack, refused before parsing.
MAX_MESSAGE_BYTES = 256 * 1024
# Ids become MQTT topic levels and folder names: no '/', '+', '#', '$', spaces, nor '.'/'..'.
SAFE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CLOUD_SENDER = "cloud"
# The most devices one round may select (a flood of registered ids cannot make a round unbounded).
# What a device parses stays small whatever this is: the cloud sends a large selection as one Task
# per device, naming only it (cloud/fanout.py), and any message is refused above MAX_MESSAGE_BYTES.
MAX_TASK_DEVICES = 20_000


class ProtocolError(ValueError):
    """Input from the wire that this side refuses; `reason` is one line fit for a log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a safe run/device/blob id, else raise ProtocolError."""
    if not isinstance(value, str) or SAFE_ID_RE.fullmatch(value) is None or set(value) == {"."}:
        raise ProtocolError(f"invalid {what} {value!r}: use 1-64 chars of [A-Za-z0-9_.-], not only dots")
    return value


def _id(value: str) -> str:
    try:
        return check_id(value)
    except ProtocolError as exc:
        raise ValueError(exc.reason) from None


SafeId = Annotated[str, AfterValidator(_id), WithJsonSchema({"type": "string", "pattern": f"^{SAFE_ID_RE.pattern}$"})]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Reason = Annotated[str, Field(max_length=2000)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BlobRef(_Record):
    """Names a blob that travels in chunks; the receiver checks size and sha256 on arrival."""

    blob_id: SafeId
    sha256: Sha256Hex
    size: int = Field(ge=0)


class _Message(_Record):
    protocol: int = PROTOCOL_VERSION
    run_id: SafeId
    round_id: int = Field(default=0, ge=0)
    sender: SafeId
    sent_at: float = Field(default_factory=time.time)

    @field_validator("protocol")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != PROTOCOL_VERSION:
            raise ValueError(f"unsupported protocol version {v} (this side speaks {PROTOCOL_VERSION})")
        return v

    @property
    def key(self) -> tuple[str, str, int, str]:
        """Idempotency key (type, run, round, sender): a redelivered QoS 1 copy has the same key."""
        return (self.type, self.run_id, self.round_id, self.sender)  # type: ignore[attr-defined]


class _FromDevice(_Message):
    """A message a device publishes about itself: sender must be that device."""

    device_id: SafeId

    @model_validator(mode="after")
    def _sender_is_device(self) -> "_FromDevice":
        if self.sender != self.device_id:
            raise ValueError(f"sender {self.sender!r} differs from device_id {self.device_id!r}")
        return self
