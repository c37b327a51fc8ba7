"""Secure-aggregation messages (SecAgg / SecAgg+: fedpft.shared.secagg_*, cloud/secagg.py,
edge/secagg.py) and the privacy settings a Task carries; re-exported by `fedpft.shared.messages`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .message_base import BlobRef, SafeId, Sha256Hex, _FromDevice, _Message, _Record

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


class TaskPrivacy(_Record):
    """What a Task asks of a device beyond training (issue 14); part of the signed Task.

    secure_agg: answer through the secure-aggregation stages (keys on its `secagg` topic, a masked
    input instead of the plain update). clip: client-level DP is on: clip the change to L2 norm
    `clip` and weigh 1 (the noise is the cloud's, or the roster's `noise_std` under masks).
    """

    secure_agg: bool = False
    clip: float | None = Field(default=None, gt=0, description="L2 clip of the device's change (DP)")
