"""A round under secure aggregation on the device: SecAggParticipant's stages over the device link.

    keys      SecAggKeys on device/<id>/secagg, right after the task's ack
    roster    wait for SecAggRoster on the run's secagg topic -> SecAggShares on device/<id>/secagg
    routed    wait for SecAggRouted in the inbox (the peers' sealed shares)
    masked    train (or take the round's stored update), then SecAggMasked + blob on upload/<blob_id>
    unmask    wait for SecAggUnmask on the secagg topic -> SecAggReveal on device/<id>/secagg

Keys come before training so the short stages do not wait on the slowest trainer; only the masked
stage does. The device's secrets live in this object for one task: a new Task for this device
(a retried round) or the end of the run ends it, and the held message is handled next. The plain
update never leaves the device; only its masked form does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from fedpft.shared import topics
from fedpft.shared.chunks import BlobSource
from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.manifest import BundleManifest
from fedpft.shared.messages import EndOfRun, ProtocolError, SecAggRoster, SecAggRouted, SecAggUnmask, Task
from fedpft.shared.update import join_update

from .privacy import clip_l2
from .secagg import SecAggParticipant
from .update import decode_update

log = logging.getLogger("fedpft.agent")


class Superseded(Exception):
    """A newer Task for this device, or the end of the run, arrived while a stage waited."""


def change_of(update: bytes, global_adapters: bytes, manifest: BundleManifest):
    """(change = update minus the Task's global adapters in float64, stats, usable samples, parsed update)."""
    upd = decode_update(update, manifest)
    ref = decode_tensors(global_adapters)[0]
    delta = {k: upd.adapters[k].astype(np.float64) - ref[k].astype(np.float64) for k in upd.adapters}
    return delta, upd.stats, upd.num_samples, upd, ref


def clipped_update(update: bytes, global_adapters: bytes, manifest: BundleManifest, clip: float) -> bytes:
    """Client-level DP in a plain round: the update moved back to global + clip(change, C)."""
    delta, stats, _, upd, ref = change_of(update, global_adapters, manifest)
    clipped, factor = clip_l2(delta, clip)
    if factor == 1.0:
        return update
    log.info("DP: change of L2 norm %.4g clipped to %.4g", clip / factor, clip)
    adapters = {k: (ref[k].astype(np.float64) + clipped[k]).astype(upd.adapters[k].dtype) for k in upd.adapters}
    return encode_tensors(join_update(adapters, stats), upd.metadata)


class SecureTask:
    def __init__(self, agent, task: Task):
        self.agent, self.task, self.link = agent, task, agent.link
        self.part = SecAggParticipant(agent.run, agent.me, self.link.trusted)

    def run(self, trained: Callable[[Task], tuple[bytes, dict, int]]) -> int:
        """All stages; 1 if the round was trained now. A failure of a secure stage is one line and
        the device sits the round out (the cloud recovers its masks if it dropped after its shares);
        a failure of training propagates, for the agent to report as usual."""
        task, link = self.task, self.link
        link.check_signed(task, f"task for round {task.round_id}")
        if not self._stage(self._agree):
            return 0
        update, _, now = trained(task)
        if not self._stage(lambda: self._send_masked(update)) or not self._stage(
                lambda: link.publish(topics.SECAGG, self.part.on_unmask(self._await(SecAggUnmask)))):
            return 0
        log.info("round %d: masked input sent and shares revealed", task.round_id)
        return now

    def _agree(self) -> None:
        link, task = self.link, self.task
        link.publish(topics.SECAGG, self.part.keys(task.round_id, task.task_id))
        link.publish(topics.SECAGG, self.part.on_roster(self._await(SecAggRoster)))
        for warning in self.part.on_routed(self._await(SecAggRouted)):
            log.warning("round %d: %s", task.round_id, warning)

    def _stage(self, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except (ProtocolError, TimeoutError) as exc:
            log.warning("round %d: secure aggregation: %s; sitting the round out", self.task.round_id, getattr(exc, "reason", exc))
        except Superseded as exc:
            log.info("round %d: secure aggregation ended: %s", self.task.round_id, exc)
        return False

    def _send_masked(self, update: bytes) -> None:
        task, link = self.task, self.link
        bundle_dir = self.agent.cache / "bundles" / task.bundle.sha256[:16]
        delta, stats, n, _, _ = change_of(update, link.fetch(task.adapters), BundleManifest.load(bundle_dir))
        msg, blob = self.part.masked_update(delta, n, stats if task.report_stats else None)
        src = BlobSource(msg.blob.blob_id, blob)
        link.publish(topics.SECAGG, msg)  # first: the cloud then checks every chunk against it
        for payload in src.payloads():
            link.t.publish(topics.upload_topic(self.agent.run, self.agent.me, src.blob_id), payload)

    def _await(self, kind: type):
        """The cloud's next message of `kind` for this task; other events are kept for the agent."""
        held, task = [], self.task
        try:
            while time.time() < task.deadline:
                ev = self.link.next_event(min(1.0, max(0.0, task.deadline - time.time())))
                msg = ev[1] if ev is not None and ev[0] == "msg" else None
                if isinstance(msg, kind) and msg.task_id == task.task_id:
                    return msg
                if isinstance(msg, (SecAggRoster, SecAggRouted, SecAggUnmask)):
                    log.debug("ignored %s of task %s (this device's task is %s)", msg.type, msg.task_id, task.task_id)
                    continue
                if ev is not None:
                    held.append(ev)
                if ev is not None and ev[0] == "wake":  # a (re)started cloud restarts the round under a new task
                    raise Superseded("the cloud restarted the run")
                if isinstance(msg, EndOfRun) or (isinstance(msg, Task) and self.agent.me in msg.devices
                                                 and msg.task_id != task.task_id):
                    raise Superseded(f"{msg.type} arrived")
            raise TimeoutError(f"no {kind.__name__} before the round's deadline")
        finally:
            self.link.hold(held)
