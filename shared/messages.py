"""Control messages of the federation wire: small JSON records validated by pydantic.

Tensors never travel here; a message names a blob (id + sha256 + size) and the blob itself
travels in chunks (`fedpft.shared.chunks`). Every message carries the protocol version, run id,
round id, sender and send time, so a receiver can route, deduplicate and reject without context.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_serializer, model_validator

from .message_base import (  # noqa: F401  (re-exported: the one place callers import wire types from)
    CLOUD_SENDER, MAX_MESSAGE_BYTES, MAX_TASK_DEVICES, PROTOCOL_VERSION, SAFE_ID_RE, BlobRef, ProtocolError, Reason, SafeId,
    Sha256Hex, _FromDevice, _id, _Message, _Record, check_id,
)
from .secagg_messages import (  # noqa: F401
    MAX_SECAGG_DEVICES, MAX_SECAGG_HOLDERS, SecAggBox, SecAggKeys, SecAggMasked, SecAggPeer, SecAggReveal, SecAggRoster,
    SecAggRouted, SecAggShare, SecAggShares, SecAggUnmask, TaskPrivacy, X25519Hex,
)


class Hello(_FromDevice):
    """A device announces itself (after every connect) and what it can do."""

    type: Literal["hello"] = "hello"
    num_samples: int = Field(ge=0)
    capabilities: dict[str, str | int | float | bool] = Field(default_factory=dict)
    bundle_version: str | None = Field(default=None, max_length=128)


class Presence(_FromDevice):
    """Online on connect, offline as the MQTT last will (retained, so a late cloud sees it)."""

    type: Literal["presence"] = "presence"
    status: Literal["online", "offline"]
    reason: Reason | None = None


class Task(_Message):
    """One round's work for the selected devices; everything needed is named by blob reference."""

    type: Literal["task"] = "task"
    devices: list[SafeId] = Field(min_length=1, max_length=MAX_TASK_DEVICES)
    # Fresh for every Task (a retried round gets a new one): an Update names the task it answers.
    task_id: SafeId = Field(default_factory=lambda: secrets.token_hex(8))
    bundle: BlobRef
    bundle_version: str = Field(min_length=1, max_length=128)
    adapters: BlobRef  # global adapters + head, safetensors
    ffn: BlobRef | None = None  # re-aligned frozen FFN weights, after an alignment round
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    report_stats: bool = False  # ask for per-neuron activation statistics (alignment rounds)
    # seed of the local shuffles and (mixed with the device id) of the dropout masks: a resumed run
    # trains exactly as an uninterrupted one
    seed: int = Field(default=0, ge=0)
    deadline: float = Field(description="unix time after which the cloud stops waiting")
    # Ed25519 over the canonical JSON of this Task without `signature` (fedpft.shared.signing):
    # covers run, round and the sha256 of the adapters and FFN blobs. None: the cloud has no key.
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$", description="key id of the signing key")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")
    # Secure aggregation / DP (issue 14). Omitted from the JSON when None (the serializer below),
    # so a plain run's Task, and what its signature covers, stay byte for byte as before.
    privacy: TaskPrivacy | None = None

    @field_validator("devices")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("devices has duplicates")
        return v

    @model_serializer(mode="wrap")
    def _omit_plain_privacy(self, handler):
        data = handler(self)
        if data.get("privacy", 0) is None:
            del data["privacy"]
        return data


UpdateId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


def make_update_id(run_id: str, round_id: int, device_id: str, task_id: str, blob_sha256: str | None) -> str:
    """The id of one submission: (run, round, device, task) and the blob's sha256 ("error" for a
    failure report). Not a secret — the update blob's own metadata carries the same binding, so a
    blob replayed under another round's message is recognised (fedpft.shared.update.check_binding)."""
    text = f"{run_id}\n{round_id}\n{device_id}\n{task_id}\n{blob_sha256 or 'error'}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class Update(_FromDevice):
    """A device's round result: either a blob of safetensors update, or an error — never silence."""

    type: Literal["update"] = "update"
    num_samples: int = Field(default=0, ge=0)
    steps: int = Field(default=0, ge=0)
    mean_loss: float | None = None
    acc_before: float | None = Field(default=None, ge=0, le=1)
    acc_after: float | None = Field(default=None, ge=0, le=1)
    blob: BlobRef | None = None
    error: Reason | None = None
    task_id: SafeId | None = None  # the Task this answers; the cloud refuses an update without it
    update_id: UpdateId | None = None  # make_update_id(run, round, device, task, blob sha256)

    @model_validator(mode="after")
    def _content_or_error(self) -> "Update":
        if (self.blob is None) == (self.error is None):
            raise ValueError("an update carries exactly one of blob or error")
        if self.update_id is not None:
            if self.task_id is None:
                raise ValueError("an update_id needs the task_id it is bound to")
            want = make_update_id(self.run_id, self.round_id, self.device_id, self.task_id, self.blob.sha256 if self.blob else None)
            if self.update_id != want:
                raise ValueError("update_id is not bound to this run, round, device, task and blob")
        return self

    @property
    def ok(self) -> bool:
        return self.error is None


class Ack(_Message):
    """Receipt for a task (device -> cloud) or an update (cloud -> device inbox)."""

    type: Literal["ack"] = "ack"
    device_id: SafeId
    # "queued" (cloud -> device, with update_id): that update arrived whole and waits for its checks
    # behind others; its receipt ("update") follows. Not a verdict: it tells the device not to upload
    # the same bytes again meanwhile (at fleet scale those re-uploads are what keep the cloud behind).
    # "busy" (cloud -> device, with update_id): the cloud had no room to take that update's bytes
    # (its upload buffer was full) and dropped them; not a verdict: the device uploads the same update
    # again after about `retry_after` seconds, instead of waiting out its receipt timeout.
    acked: Literal["task", "update", "hello", "queued", "busy"]
    ok: bool = True
    reason: Reason | None = None
    retry_after: float | None = Field(default=None, ge=0, le=3600)  # acked="busy": seconds before uploading again
    # For acked="update": the Update.update_id this receipt is about; a device acts only on its own.
    update_id: UpdateId | None = None
    # For acked="task": the Task.task_id acknowledged. The cloud counts only an ack of the task it
    # is waiting on (a resumed cloud re-issues a round under a new task id; a late ack of the
    # killed cloud's task, or a forged one, must not keep the round waiting for that device).
    task_id: SafeId | None = None


class BlobRequest(_Message):
    """Ask the blob's publisher to re-publish the listed chunk indexes (resume after a gap)."""

    type: Literal["blobreq"] = "blobreq"
    device_id: SafeId  # who asks, hence where to re-send
    blob_id: SafeId
    # Empty = everything: a device that has no chunk yet does not know the count.
    missing: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=100_000)


class EndOfRun(_Message):
    """The cloud ends the run; devices disconnect cleanly."""

    type: Literal["end"] = "end"
    reason: Reason = "completed"


# ---- fleet rollouts: on fedpft/fleet/<fleet>/..., `run_id` holds the fleet name ----------------


class BundleVersion(_Record):
    """One installable version of a bundle: the manifest's bundle_id and bundle_version."""

    bundle_id: SafeId
    bundle_version: int = Field(ge=1)

    def __str__(self) -> str:
        return f"v{self.bundle_version} ({self.bundle_id[:8]})"


class Rollout(_Message):
    """Install `target` (fetched as `bundle`) on a cohort or on listed devices; or, with
    `rollback`, switch back to `target`, which the devices kept as their previous version."""

    type: Literal["rollout"] = "rollout"
    rollout_id: SafeId
    target: BundleVersion
    bundle: BlobRef | None = None  # None exactly for a rollback: nothing to download
    rollback: bool = False
    cohort: SafeId | None = None
    devices: list[SafeId] | None = Field(default=None, min_length=1)
    deadline: float = Field(description="unix time after which devices ignore this rollout (the cloud stopped serving it)")
    # Ed25519 over the canonical JSON without `signature`, as for a Task (fedpft.shared.signing).
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$", description="key id of the signing key")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @model_validator(mode="after")
    def _shape(self) -> "Rollout":
        if (self.cohort is None) == (self.devices is None):
            raise ValueError("a rollout names exactly one of cohort or devices")
        if self.devices is not None and len(set(self.devices)) != len(self.devices):
            raise ValueError("devices has duplicates")
        if self.rollback == (self.bundle is not None):
            raise ValueError("a rollout carries a bundle; a rollback carries none")
        return self

    def addresses(self, device_id: str, cohort: str) -> bool:
        return self.cohort == cohort if self.cohort is not None else device_id in (self.devices or ())


class DeviceStatus(_FromDevice):
    """A fleet device's versions and install state, retained so the fleet is readable while
    devices are offline. Naming a `rollout_id` in a final state (installed/failed) acks it."""

    type: Literal["status"] = "status"
    cohort: SafeId
    installed: BundleVersion | None = None
    previous: BundleVersion | None = None
    state: Literal["idle", "installing", "installed", "failed"]
    rollout_id: SafeId | None = None
    reason: Reason | None = None


SECAGG_MODELS = (SecAggKeys, SecAggRoster, SecAggShares, SecAggRouted, SecAggMasked, SecAggUnmask, SecAggReveal)

Message = Annotated[
    Union[Hello, Presence, Task, Update, Ack, BlobRequest, EndOfRun, Rollout, DeviceStatus,
          SecAggKeys, SecAggRoster, SecAggShares, SecAggRouted, SecAggMasked, SecAggUnmask, SecAggReveal],
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)
MESSAGE_MODELS: tuple[type[_Message], ...] = (Hello, Presence, Task, Update, Ack, BlobRequest, EndOfRun, Rollout, DeviceStatus, *SECAGG_MODELS)
MESSAGE_TYPES = tuple(m.model_fields["type"].default for m in MESSAGE_MODELS)


def encode(msg: _Message) -> bytes:
    return msg.model_dump_json().encode("utf-8")


def decode(payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one message; any fault becomes a single ProtocolError line."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(data).__name__}")
    # Check the version first: a newer peer's message should say so, not list schema errors.
    if data.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {data.get('protocol')!r} (this side speaks {PROTOCOL_VERSION})")
    if data.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {data.get('type')!r}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(f"invalid {data['type']} message: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    err = errors[0]
    # The discriminated union prefixes the tag to each location; drop it so the path reads naturally.
    loc = [str(p) for p in err["loc"]]
    if loc and loc[0] in MESSAGE_TYPES:
        loc = loc[1:]
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{'.'.join(loc) or '<message>'}: {err['msg'].removeprefix('Value error, ')}{more}"
