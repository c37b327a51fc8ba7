"""Control messages of the federation wire: small JSON records validated by pydantic.

Tensors never travel here; a message names a blob (id + sha256 + size) and the blob itself
travels in chunks (`fedpft.shared.chunks`). Every message carries the protocol version, run id,
round id, sender and send time, so a receiver can route, deduplicate and reject without context.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema, field_validator, model_validator,
)
from pydantic.functional_validators import AfterValidator

PROTOCOL_VERSION = 1
# Control messages are small; a bigger payload is a bug or an attack, refused before parsing.
MAX_MESSAGE_BYTES = 256 * 1024
# Ids become MQTT topic levels and folder names: no '/', '+', '#', '$', spaces, nor '.'/'..'.
SAFE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CLOUD_SENDER = "cloud"
# A Task's device list stays well under MAX_MESSAGE_BYTES (66 bytes a 64-char id): a flood of
# registered ids cannot make the Task itself unreadable.
MAX_TASK_DEVICES = 2000


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
    seed: int = Field(default=0, ge=0)  # local shuffling seed: a resumed run trains exactly as an uninterrupted one
    deadline: float = Field(description="unix time after which the cloud stops waiting")
    # Ed25519 over the canonical JSON of this Task without `signature` (fedpft.shared.signing):
    # covers run, round and the sha256 of the adapters and FFN blobs. None: the cloud has no key.
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$", description="key id of the signing key")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @field_validator("devices")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("devices has duplicates")
        return v


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
    acked: Literal["task", "update", "hello"]
    ok: bool = True
    reason: Reason | None = None
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


# ---- secure aggregation (SecAgg / SecAgg+): fedpft.shared.secagg_*, cloud/secagg.py, edge/secagg.py ----
# Stages of one round's task: keys -> roster -> shares -> routed -> masked -> unmask -> reveal.
# Cloud messages carry signer/signature like a Task; a device with a trusted key verifies them.

X25519Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# A roster entry is 250-330 bytes of JSON (by id length): 700 keeps the roster under
# MAX_MESSAGE_BYTES even with 64-character ids (tested); larger rounds run as several cohorts.
MAX_SECAGG_DEVICES = 700
# Boxes / reveal shares per message (~300 bytes each); a SecAgg+ degree bounds a device's holders.
MAX_SECAGG_HOLDERS = 700


class SecAggKeys(_FromDevice):
    """Stage 1 (device -> cloud): fresh X25519 public keys for this task (`enc_key` seals shares,
    `mask_key` agrees pairwise masks) and a commitment to the device's self-mask seed."""

    type: Literal["secagg_keys"] = "secagg_keys"
    task_id: SafeId
    enc_key: X25519Hex
    mask_key: X25519Hex
    seed_commitment: Sha256Hex


class SecAggPeer(_Record):
    device_id: SafeId
    enc_key: X25519Hex
    mask_key: X25519Hex
    seed_commitment: Sha256Hex


class SecAggRoster(_Message):
    """Stage 1 result (cloud -> all): the accepted keys and the round's secure-sum parameters."""

    type: Literal["secagg_roster"] = "secagg_roster"
    task_id: SafeId
    threshold: int = Field(ge=2)
    degree: int | None = Field(default=None, ge=2, description="SecAgg+ neighbours per device; None = complete graph")
    frac_bits: int = Field(ge=0, le=40)
    value_bound: float = Field(gt=0, description="bound on |x| of every encoded coordinate of one device")
    layout_sha256: Sha256Hex
    clip: float | None = Field(default=None, gt=0, description="L2 clip of the weighted update (DP)")
    noise_std: float = Field(default=0.0, ge=0, description="std of the Gaussian noise each device adds (distributed DP)")
    peers: list[SecAggPeer] = Field(min_length=2, max_length=MAX_SECAGG_DEVICES)
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$", description="key id of the signing key")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @model_validator(mode="after")
    def _shape(self) -> "SecAggRoster":
        ids = [p.device_id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ValueError("peers has duplicates")
        if self.threshold > len(ids):
            raise ValueError(f"threshold {self.threshold} exceeds the {len(ids)} peers")
        return self


class SecAggBox(_Record):
    """A Shamir share pair sealed for one peer (base64 of nonce | ChaCha20-Poly1305 ciphertext)."""

    peer: SafeId  # recipient in SecAggShares, sender in SecAggRouted
    box: str = Field(pattern=r"^[A-Za-z0-9+/=]{1,400}$")


class SecAggShares(_FromDevice):
    """Stage 2 (device -> cloud): one sealed box for each of its share holders but itself."""

    type: Literal["secagg_shares"] = "secagg_shares"
    task_id: SafeId
    boxes: list[SecAggBox] = Field(min_length=1, max_length=MAX_SECAGG_HOLDERS)


class SecAggRouted(_Message):
    """Stage 2 result (cloud -> one device's inbox): the boxes sealed for it; their senders are
    the peers it masks with."""

    type: Literal["secagg_routed"] = "secagg_routed"
    task_id: SafeId
    device_id: SafeId
    boxes: list[SecAggBox] = Field(max_length=MAX_SECAGG_HOLDERS)
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$", description="key id of the signing key")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


class SecAggMasked(_FromDevice):
    """Stage 3 (device -> cloud): the masked input, a safetensors blob (uploaded in chunks) bound
    to (run, round, device, task) in its metadata."""

    type: Literal["secagg_masked"] = "secagg_masked"
    task_id: SafeId
    blob: BlobRef


class SecAggUnmask(_Message):
    """Stage 4 (cloud -> all): who sent a masked input (reveal their self-seed shares) and who
    dropped after sending shares (reveal their mask-key shares). Disjoint, by construction."""

    type: Literal["secagg_unmask"] = "secagg_unmask"
    task_id: SafeId
    survivors: list[SafeId] = Field(min_length=1, max_length=MAX_SECAGG_DEVICES)
    dropped: list[SafeId] = Field(default_factory=list, max_length=MAX_SECAGG_DEVICES)
    signer: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$", description="key id of the signing key")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @model_validator(mode="after")
    def _disjoint(self) -> "SecAggUnmask":
        if set(self.survivors) & set(self.dropped):
            raise ValueError("a device is both survivor and dropped")
        if len(set(self.survivors)) != len(self.survivors) or len(set(self.dropped)) != len(self.dropped):
            raise ValueError("survivors or dropped has duplicates")
        return self


class SecAggShare(_Record):
    owner: SafeId
    secret: Literal["mask_key", "self_seed"]
    share: str = Field(pattern=r"^[0-9a-f]{132}$")


class SecAggReveal(_FromDevice):
    """Stage 4 answer (device -> cloud): the shares it holds of the survivors' self-mask seeds and
    of the dropped devices' mask keys, never both for one owner."""

    type: Literal["secagg_reveal"] = "secagg_reveal"
    task_id: SafeId
    shares: list[SecAggShare] = Field(max_length=MAX_SECAGG_HOLDERS + 1)


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
