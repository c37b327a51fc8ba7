"""One attempt of a round under --secure-agg, driven from the round loop over its transport.

The stages of cloud/secagg.py (SecAggCoordinator) on the wire, each with its deadline:

    keys     devices' SecAggKeys on device/<id>/secagg          until all selected or --secagg-stage-timeout
    roster   SecAggRoster on the run's secagg topic (signed)
    shares   devices' SecAggShares on device/<id>/secagg        until all in the roster or the stage timeout
    routed   each device's SecAggRouted in its inbox (signed)
    masked   SecAggMasked on device/<id>/secagg + blob on upload/<blob_id>   until all or the round's deadline
    unmask   SecAggUnmask on the secagg topic (signed); SecAggReveal back     until all survivors or the stage timeout

After every stage the coordinator's state, masked material only, is written beside state.json
(cloud/secagg_store.py); the unmasked sum exists only in memory until the strategy writes the
round's adapters. Devices that failed (an error Update), went offline or never acked the task are
not waited for. Nothing here ever sees one device's update in the clear.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from fedpft.shared import topics
from fedpft.shared.chunks import Chunk, Reassembler
from fedpft.shared.messages import ProtocolError, SecAggMasked, Task, encode
from fedpft.shared.secagg_ring import WEIGHT_KEY
from fedpft.shared.update import stat_key

from . import secagg_store
from .secagg import SecAggConfig, SecAggCoordinator, SecAggResult, default_threshold, value_bound
from .secagg_unmask import SecAggAbort

log = logging.getLogger("fedpft.serve")

SECAGG_STATE = "secagg-state.safetensors"
MASKED_PREFIX = "sa-"  # blob ids of masked inputs (edge/secagg.py names them so)
# Without DP the ring only needs a bound no honest device reaches: a change of L2 norm 100 at the
# largest declared weight, and 1e8 counted positions (900 samples x 64 tokens x 2 epochs is 1.2e5).
PLAIN_CLIP = 100.0
MAX_POSITIONS = 1e8
POLL = 0.5


def layout(expected: dict, stat_layers: dict[int, int], report_stats: bool) -> dict[str, tuple[int, ...]]:
    """What every device encodes, by name: its weighted change, its weight, and the counts when asked."""
    out = {k: tuple(int(d) for d in shape) for k, (shape, _) in expected.items()}
    out[WEIGHT_KEY] = (1,)
    if report_stats:
        for layer, neurons in stat_layers.items():
            out[stat_key(layer, "off_counts")], out[stat_key(layer, "positions")] = (int(neurons),), (1,)
    return dict(sorted(out.items()))


def secagg_config(cfg, shape: dict[str, tuple[int, ...]], n_devices: int, max_weight: float) -> SecAggConfig:
    """The round's ring bound, threshold and DP parameters (docs/protocol.md, "Ring, scale, overflow").

    Distributed DP: each device adds std Z*C/sqrt(T), so any T or more survivors carry at least
    the full N(0, (Z*C)^2) on the sum (more survivors over-noise by n/T, never under-noise)."""
    if cfg.dp_clip is None:
        counts = MAX_POSITIONS if any(k.endswith("positions") for k in shape) else 0.0
        return SecAggConfig(shape, value_bound(PLAIN_CLIP, max(max_weight, 1.0), counts), threshold=cfg.secagg_threshold,
                            degree=cfg.secagg_degree)
    noise, threshold = 0.0, cfg.secagg_threshold
    if cfg.dp_mode == "distributed":
        # the fewest survivors the coordinator accepts: its threshold, among d + 1 holders under SecAgg+
        holders = n_devices if cfg.secagg_degree is None else min(n_devices, cfg.secagg_degree + 1)
        # pinned: fewer keys must fail the round, not lower T and leave the sum under-noised
        threshold = cfg.secagg_threshold or default_threshold(holders)
        noise = cfg.dp_noise * cfg.dp_clip / float(np.sqrt(threshold))
    neurons = sum(int(np.prod(s)) for k, s in shape.items() if k.endswith("off_counts"))
    bound = value_bound(cfg.dp_clip, 1.0, 1.0, noise, float(np.sqrt(neurons)))
    return SecAggConfig(shape, bound, threshold=threshold, degree=cfg.secagg_degree, clip=cfg.dp_clip, noise_std=noise)


def state_path(cfg) -> Path:
    return Path(cfg.out) / SECAGG_STATE


class SecureRound:
    """The coordinator of one task plus the masked uploads it waits for."""

    def __init__(self, fed, task: Task, config: SecAggConfig):
        self.fed, self.task, self.cfg = fed, task, fed.cfg
        self.coord = SecAggCoordinator(self.cfg.run_id, task.round_id, task.task_id, list(task.devices), config, fed.signing_key)
        self.uploads: dict[str, Reassembler] = {}  # device -> its masked blob arriving
        self.announced: dict[str, SecAggMasked] = {}
        self.bytes = 0  # secagg messages and masked blobs, both directions
        self.result: SecAggResult | None = None

    # ---- intake (main loop, from Federation._handle)
    def message(self, msg, nbytes: int) -> None:
        self.bytes += nbytes
        c = self.coord
        if isinstance(msg, SecAggMasked) and msg.device_id in c.masked_sha and msg.task_id == c.task_id:
            if c.masked_sha[msg.device_id] != msg.blob.sha256:  # a redelivered copy is no news
                self._refused(msg, "another masked input from this device is already counted (a replay?)")
            return
        if isinstance(msg, SecAggMasked) and (c.stage, msg.task_id, msg.round_id) == ("masked", c.task_id, c.round_id) \
                and msg.device_id in c.survivors_u2:
            self.announced[msg.device_id] = msg
            asm = self.uploads.get(msg.device_id)
            if asm is not None and asm.blob_id == msg.blob.blob_id:
                try:
                    asm.bind(msg.blob.sha256, msg.blob.size)
                except ProtocolError as exc:
                    self.uploads.pop(msg.device_id)
                    return self._refused(msg, f"rejected masked upload: {exc.reason}")
            return self._masked_ready(msg.device_id)
        reason = self.coord.handle(msg)  # a masked input out of place is refused here, with the coordinator's reason
        if reason:
            log.warning("round %d: %s", self.task.round_id, reason)

    def chunk(self, device: str, chunk: Chunk, nbytes: int) -> None:
        if device in self.coord.masked_sha:
            return  # its input counted: chunks of a copy or of a refused second input (refused by its message)
        if self.coord.stage != "masked" or device not in self.coord.survivors_u2:
            raise ProtocolError(f"masked chunk from {device} dropped: the round does not wait for its masked input")
        asm = self.uploads.get(device)
        if asm is None or asm.blob_id != chunk.blob_id:  # a newer blob replaces an unfinished older one
            ref = self.announced.get(device)
            asm = (Reassembler.for_ref(ref.blob, max_bytes=self.cfg.max_update_bytes) if ref is not None and ref.blob.blob_id == chunk.blob_id
                   else Reassembler(chunk.blob_id, max_bytes=self.cfg.max_update_bytes))
            self.uploads[device] = asm
        try:
            if asm.add(chunk):
                self.bytes += nbytes
        except ProtocolError as exc:
            self.uploads.pop(device, None)
            raise ProtocolError(f"rejected masked chunk from {device}: {exc.reason}") from None
        self._masked_ready(device)

    def _masked_ready(self, device: str) -> None:
        msg, asm = self.announced.get(device), self.uploads.get(device)
        if msg is None or asm is None or not asm.done or asm.blob_id != msg.blob.blob_id:
            return
        self.uploads.pop(device)
        reason = self.coord.handle(msg, asm.result())
        if reason:
            log.warning("round %d: %s", self.task.round_id, reason)
        else:
            log.info("round %d: masked input from %s", self.task.round_id, device)

    def _refused(self, msg, reason: str) -> None:
        log.warning("round %d: secagg: %s from %s rejected: %s", self.task.round_id, msg.type, msg.sender, reason)
        self.coord.rejected.append((msg.sender, reason))

    # ---- stages
    def run(self) -> SecAggResult:
        """All stages; SecAggAbort (one line) when the sum cannot be had."""
        c, short = self.coord, self.cfg.secagg_stage_timeout
        try:
            self._wait(lambda: set(c.keys), set(self.task.devices), time.time() + short)
            self._broadcast(c.roster())
            self._wait(lambda: set(c.boxes), set(c.keys), time.time() + short)
            for device, routed in c.routed().items():
                self._send(topics.device_topic(self.cfg.run_id, device, topics.INBOX), encode(routed))
            self._persist()
            self._wait(lambda: set(c.masked_sha), set(c.survivors_u2), self.task.deadline)
            self._broadcast(c.unmask_request())
            self._wait(lambda: set(c.reveals), set(c.masked_sha), time.time() + short)
            self.result = c.result()
            return self.result
        finally:
            state_path(self.cfg).unlink(missing_ok=True)  # masked material of a finished (or failed) task is no use

    def _wait(self, done, among: set[str], deadline: float) -> None:
        tr = self.fed.tracker
        while time.time() < deadline:
            gone = set(tr.failed) | set(tr.given_up) if tr is not None else set()
            if done() >= among - gone:
                return
            self.fed.pump(POLL)
        log.info("round %d: secagg stage %s closed at its deadline (%d of %d devices)", self.task.round_id, self.coord.stage,
                 len(done() & among), len(among))

    def _broadcast(self, msg) -> None:
        self._send(topics.secagg_topic(self.cfg.run_id), encode(msg))
        self._persist()

    def _send(self, topic: str, payload: bytes) -> None:
        self.bytes += len(payload)
        self.fed.t.publish(topic, payload)

    def _persist(self) -> None:
        secagg_store.write(state_path(self.cfg), self.coord)

    def metrics(self) -> dict:
        c = self.coord
        return {"secagg_survivors": len(c.masked_sha), "secagg_dropped": sorted(c.dropped),
                "secagg_rejected": [f"{d}: {r}" for d, r in c.rejected], "secagg_bytes": self.bytes}
