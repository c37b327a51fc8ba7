"""`fedpft-cloud serve`: the round loop of FedPFT over one Transport.

The loop only waits, publishes, pumps and commits; its rooms do the rest: the device registry
(cloud/registry.py), the upload collector (cloud/uploads.py: chunks in, a verdict out), the
method's strategy (cloud/strategy.py: configure and aggregate), the streaming running sum
(cloud/fold.py), blob serving (cloud/blobs.py) and the run folder (cloud/state.py).

Network handlers (cloud/handlers.py) only decode, check the route and enqueue; all round state
lives in the main loop, so there are no locks around it. A round's blobs are broadcast once before its Task; the
chunks a device asks for again are queued to the BlobServer's own sender thread.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fedpft.cloud.config import ServeConfig, load_prepare_config
from fedpft.shared import topics
from fedpft.shared.allocator import reuse_large_buffers
from fedpft.shared.archive import pack_bundle
from fedpft.shared.codec import decode_tensors, encode_tensors
from fedpft.shared.manifest import ROLE_FM_CONFIG, ROLE_PREPARE_CONFIG, BundleManifest, verify_bundle
from fedpft.shared.messages import (
    CLOUD_SENDER, Ack, BlobRef, EndOfRun, Hello, Presence, ProtocolError, Task, Update, encode,
)
from fedpft.shared.signing import key_id, load_private_key, sign
from fedpft.shared.transport import Transport

from .blobs import BlobServer, worth_broadcasting
from .check_processes import CheckProcesses
from .checks import BUSY_RETRY_AFTER, QUEUED_RECEIPT_AFTER, EventQueue, check_pool
from .fanout import task_deliveries
from .fold import RoundFold
from .handlers import DeviceHandlers
from .private_rounds import DEVICE_SECAGG, BudgetSpent, PrivateRounds
from .registry import DeviceInfo, DeviceRegistry
from .sampling import RoundStatus, RoundTracker
from .state import RunState, RunStore
from .strategy import Aligner, Evaluator, RoundBlobs, align_due, make_strategy
from .uploads import MAX_UPLOADS_PER_DEVICE, OpenRound, UploadCollector, Verdict

__all__ = ["BlobServer", "DeviceInfo", "Federation", "MAX_UPLOADS_PER_DEVICE", "align_due", "metrics"]

log = logging.getLogger("fedpft.serve")

class Federation(DeviceHandlers):
    def __init__(self, cfg: ServeConfig, transport: Transport, evaluator: Evaluator | None = None, aligner: Aligner | None = None,
                 show_progress: bool = True):
        reuse_large_buffers()  # process-wide, once: uploads' buffers reused, not re-zeroed per update
        self.cfg = cfg
        self.t = transport
        self.manifest: BundleManifest = verify_bundle(cfg.bundle)
        self.store = RunStore(cfg.out)
        self.events = EventQueue()
        self.pool = check_pool(cfg.check_workers)
        self.fold_saver = ThreadPoolExecutor(1, thread_name_prefix="fedpft-fold-saver")
        self._fold_saving: Future | None = None
        self.devices = DeviceRegistry(cfg.max_devices)
        self.blobs = BlobServer(transport, cfg.run_id, cfg.chunk_size)
        self.strategy = make_strategy(self.manifest, cfg, self.store, evaluator, aligner)
        self.open = OpenRound()
        self.collector = UploadCollector(cfg, self.open, self.strategy.expected, self.strategy.stat_layers)
        self.checks: CheckProcesses | None = None  # started last (below)
        self.fold: RoundFold | None = None  # the open round's running sum
        self.privacy = PrivateRounds(self)  # --secure-agg / --dp-*: identity hooks otherwise
        self._next_expiry = 0.0
        self.show_progress = show_progress
        self.signing_key = load_private_key(cfg.signing_key) if cfg.signing_key is not None else None
        if self.signing_key is not None and self.manifest.signer != key_id(self.signing_key.public_key()):
            log.warning("the bundle is not signed by --signing-key; devices with --trust-key will refuse it "
                        "(prepare it with --signing-key)")
        # last, so that nothing above can fail with processes started; ready while the loop waits for devices
        if cfg.check_processes:
            self.checks = CheckProcesses(cfg.check_processes, self.collector.limits, self.store, self.events)

    # the open round and the uploads, as attributes of the loop (tests and benchmarks read them)
    round_id = property(lambda self: self.open.round_id, lambda self, v: setattr(self.open, "round_id", v))
    task = property(lambda self: self.open.task, lambda self, v: setattr(self.open, "task", v))
    uploads = property(lambda self: self.collector.uploads)
    waiting = property(lambda self: self.collector.waiting)
    upload_bytes = property(lambda self: self.collector.upload_bytes)
    bytes_up = property(lambda self: self.collector.bytes_up)

    @property
    def tracker(self) -> RoundTracker | None:
        return self.open.tracker

    @tracker.setter
    def tracker(self, tracker: RoundTracker | None) -> None:
        self.open.tracker, self.fold = tracker, None  # a new round (or attempt) starts a new sum

    # ------------------------------------------------------------------ main loop side
    def _waiting(self) -> bool:
        return self.tracker is None or self.tracker.status(time.time()) is RoundStatus.WAITING

    def pump(self, timeout: float) -> None:
        """Handle queued events for up to `timeout` seconds (returns early once the queue idles)."""
        end = time.time() + timeout
        while (remaining := end - time.time()) > 0:
            self._housekeeping()
            try:
                ev = self.events.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if not self._waiting():
                    return
                continue
            try:
                self._handle(ev)
            except ProtocolError as exc:
                log.warning("%s", exc.reason)
            if not self._waiting():
                return

    def _handle(self, ev) -> None:
        if ev[0] == "chunk":
            if self.privacy.takes(ev[2]):
                return self.privacy.chunk(*ev[1:])
            return self._settle(self.collector.chunk(*ev[1:]))
        if ev[0] == "checked":
            return self._checked(*ev[1])
        msg, tr = ev[1], self.tracker
        busy = tr.selected_set if tr is not None else frozenset()
        if isinstance(msg, Hello):
            self.devices.hello(msg, busy)
        elif isinstance(msg, Presence):
            reason = f"went offline ({msg.reason or 'last will'})"
            if self.devices.presence(msg, busy) and tr is not None and tr.give_up(msg.device_id, reason):
                log.warning("round %d: not waiting for %s: %s", self.round_id, msg.device_id, reason)
        elif isinstance(msg, Update):
            self._settle(self.privacy.screen(msg) or self.collector.update(msg))
        elif isinstance(msg, DEVICE_SECAGG):
            self.privacy.message(msg)
        elif isinstance(msg, Ack):
            self.devices.seen(msg.device_id)
            if msg.acked == "task" and tr is not None and msg.round_id == self.round_id:
                if self.task is not None and msg.task_id == self.task.task_id:
                    tr.ack(msg.device_id)
                else:
                    log.debug("round %d: ack from %s names task %s, not this round's; ignored", self.round_id, msg.device_id, msg.task_id)

    def _settle(self, v: Verdict | None) -> None:
        """Act on the collector's verdict; a complete blob goes to the check pool (`_check`)."""
        if v is None:
            return
        msg = v.msg
        if v.kind == "check":
            declared, fold = self.devices.declared(msg.device_id), self._fold()
            if self.checks is not None:
                return self.checks.submit(v, self.task.task_id, fold, declared, self.tracker)
            return self.events.submit(self.pool, "checked", self._check, v, self.task.task_id, fold, declared, self.tracker)
        if v.kind == "queued":
            return self._reply(msg, True, "queued behind other updates' checks", acked="queued")
        if v.kind == "busy":
            log.warning("round %d: update from %s turned away (%s); told to upload it again in %.0f-%.0fs",
                        msg.round_id, msg.device_id, v.reason, BUSY_RETRY_AFTER, 2 * BUSY_RETRY_AFTER)
            return self._reply(msg, True, v.reason, acked="busy", retry_after=BUSY_RETRY_AFTER)
        if v.kind == "reject":
            log.warning("rejected update from %s for round %d: %s", msg.device_id, msg.round_id, v.reason)
            return self._reply(msg, False, v.reason)
        if v.kind == "duplicate":
            log.info("duplicate update from %s for round %d ignored: already counted", msg.device_id, msg.round_id)
            return self._reply(msg, True, v.reason)
        if v.kind == "failed":
            self.tracker.fail(msg.device_id, v.reason)
            log.warning("device %s failed round %d: %s", msg.device_id, msg.round_id, v.reason)
            return self._reply(msg, True, None)
        raise AssertionError(f"unexpected verdict {v.kind}")

    def _check(self, v: Verdict, task_id: str, fold: RoundFold, declared: int | None, tracker: RoundTracker):
        """On a pool thread: validate, measure, and store an accepted update durably (before it
        counts and before its ack)."""
        msg = v.msg
        out = self.collector.validate(msg, v.data, task_id, v.digest)
        if out.kind == "accept":
            self.store.save_update(msg.round_id, msg.device_id, out.data, out.digest)
            # folded here, once stored, rather than on the loop: the loop then only counts and acks it,
            # and the update's float64 change never waits in memory behind other events
            out.contribution = fold.take(msg.device_id, out.adapters, out.stats, msg.num_samples, msg.mean_loss, declared,
                                         msg.update_id)
        return out, fold, tracker

    def _checked(self, status: str, result) -> None:
        """Back on the loop: count what the pool accepted (and folded), ack it; then the device's
        Updates that came during the check."""
        if status == "error":
            raise result  # as the check would have raised on the loop (a full disk stops the cloud)
        v, fold, tracker = result
        msg = v.msg
        parked = self.collector.checked(msg.device_id)
        if v.kind != "accept":
            self._settle(v)
        elif tracker is not self.tracker:  # an earlier attempt's check (its sum is that attempt's, discarded)
            log.info("round %d: update from %s checked after its round closed; stored, not counted", msg.round_id, msg.device_id)
        else:
            tracker.accept(msg.device_id, v.contribution)
            if fold.due():
                self._persist_fold(msg.round_id, fold)
            self._reply(msg, True, None)
            log.info("round %d: update from %s (%d samples, loss %s)", msg.round_id, msg.device_id, msg.num_samples,
                     f"{msg.mean_loss:.4f}" if msg.mean_loss is not None else "-")
        for m in parked:
            self._settle(self.privacy.screen(m) or self.collector.update(m))

    def _persist_fold(self, round_id: int, fold: RoundFold) -> None:
        """Persist a copy of the running sum on the saver thread (encoding and two fsyncs of 1 MB+
        would stall the loop); one save at a time, so an older sum never overwrites a newer one."""
        if self._fold_saving is not None:
            if not self._fold_saving.done():
                return  # still writing the last one; the sum stays due and goes out with a later update
            self._fold_saving.result()  # a save that failed (a full disk, a dead check process) stops the cloud now
        snap = fold.snapshot()
        # with check processes, what they folded is in their partial sums: each is asked now, in pipe
        # order after the checks sent to it, so each names exactly the devices it holds
        partials = self.checks.partials(fold) if self.checks is not None else []

        def save() -> None:
            if partials:
                self.checks.merge_into(snap, partials)
            self.store.save_fold(round_id, snap.to_bytes())

        self._fold_saving = self.fold_saver.submit(save)

    def _fold_saved(self) -> None:
        """Wait for the running-sum save in flight (before a commit replaces or drops it); its error,
        e.g. a full disk, is raised here as the save would have raised on the loop."""
        saving, self._fold_saving = self._fold_saving, None
        if saving is not None:
            saving.result()

    def _fold(self) -> RoundFold:
        if self.fold is None:  # a round opened without run_round (tests): relative to the bundle's adapters
            self.fold = self.strategy.begin(self.round_id, None)
        return self.fold

    def _reply(self, msg: Update, ok: bool, reason: str | None, acked: str = "update", retry_after: float | None = None) -> None:
        ack = Ack(run_id=self.cfg.run_id, round_id=msg.round_id, sender=CLOUD_SENDER, device_id=msg.device_id, acked=acked, ok=ok,
                  reason=reason, update_id=msg.update_id, retry_after=retry_after)
        # not waiting for the broker: a lost receipt is asked for again (the device uploads again and
        # gets the stored verdict), and 1,000 receipts must not wait for 1,000 round trips on the loop
        self.t.publish(topics.device_topic(self.cfg.run_id, msg.device_id, topics.INBOX), encode(ack), wait=False)

    def _housekeeping(self) -> None:
        """Once a second: drop uploads that stalled, stop waiting for devices that never acked the task."""
        now = time.time()
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        self.collector.expire(now)
        late = self.collector.overdue(now, QUEUED_RECEIPT_AFTER)
        for msg in late:
            self._reply(msg, True, f"queued: its checks have waited {QUEUED_RECEIPT_AFTER:.0f}s behind others", acked="queued")
        if late:
            log.info("round %d: told %d device(s) their updates are queued for checks", self.round_id, len(late))
        if self.tracker is not None:
            silent = self.tracker.expire_acks(now)
            if silent:
                log.warning("round %d: not waiting for %d device(s) that did not ack the task within %.0fs: %s", self.round_id,
                            len(silent), self.cfg.task_ack_timeout, ", ".join(silent[:10]) + (", ..." if len(silent) > 10 else ""))

    def _close_uploads(self, round_id: int) -> None:
        self.collector.close(round_id)

    def _restore_accepted(self, round_id: int, state: RunState) -> None:
        """Count the updates this round accepted before a crash (they are on disk), once."""
        self.fold = self.strategy.resume(round_id, state, self.tracker.selected_set)
        for device, c in sorted(self.fold.folded.items()):
            c.update_id = None  # unknown after a restart, as before: a redelivery of it is acked as a duplicate
            self.tracker.accept(device, c)
            log.info("round %d: update from %s restored from disk (accepted before a restart)", round_id, device)

    # ------------------------------------------------------------------ rounds
    def online(self) -> list[str]:
        """Devices eligible for a round: online, and announced by a Hello that passed the checks."""
        return self.devices.online()

    def wait_for_devices(self, n: int, timeout: float) -> list[str]:
        end = time.time() + timeout
        while len(self.online()) < n and time.time() < end:
            self.pump(min(0.5, max(0.0, end - time.time())))
        return self.online()

    def initial_state(self) -> RunState:
        # RunError (one line) for a missing, foreign or damaged state, or a folder holding another run
        state = self.store.begin(self.cfg.run_id, self.manifest.bundle_id, self.cfg.resume)
        if state is not None:
            log.info("resuming run %s at round %d", state.run_id, state.next_round)
            self.privacy.on_resume()
            return state
        rel = self.store.write_tensors("checkpoints/adapters_round_init.safetensors", self.initial_adapters())
        state = RunState(run_id=self.cfg.run_id, bundle_id=self.manifest.bundle_id, adapters=rel)
        self.store.commit(state)
        (Path(self.cfg.out) / "serve_config.json").write_text(self.cfg.model_dump_json(indent=2, exclude=self.cfg.default_privacy()))
        return state

    def initial_adapters(self) -> dict:
        """The bundle's initial adapters, or, when --seed differs from the seed the bundle was prepared
        with, adapters drawn afresh from --seed: runs sharing one bundle still start from their seed's."""
        bundle = Path(self.cfg.bundle)
        init = decode_tensors((bundle / self.manifest.files["adapters_init"].path).read_bytes())[0]
        if ROLE_PREPARE_CONFIG not in self.manifest.files:  # a bundle not made by prepare (benchmarks' synthetic ones)
            return init
        made_with = load_prepare_config(bundle, self.manifest).seed
        if self.cfg.seed == made_with:
            return init
        from fedpft.modeling.adapters import redraw_adapters

        fm_config = json.loads(self.manifest.file_path(bundle, ROLE_FM_CONFIG).read_text())
        log.info("initial adapters drawn from --seed %d (the bundle's are from seed %d)", self.cfg.seed, made_with)
        return redraw_adapters(init, self.cfg.seed, float(fm_config.get("initializer_range", 0.02)))

    def run(self) -> RunState:
        try:
            return self._run()
        finally:  # also when the run stops on an error: no check process, thread or pipe outlives it
            self.close()

    def close(self) -> None:
        if self.checks is not None:
            self.checks.close()  # first: a save waiting for their partial sums is then answered
        # a run stopped by an error (a full disk) must not leave queued checks writing into its folder
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.fold_saver.shutdown(wait=True)
        self.blobs.close()

    def _run(self) -> RunState:
        from .progress import progress_bar

        state = self.initial_state()
        if self.checks is not None:
            self.checks.wait_ready()  # a process that cannot start stops the run at its first pump, in one line
        self.subscribe()
        # a retained end-of-run from an earlier run on this id would stop devices at once
        self.t.publish(topics.control_topic(self.cfg.run_id), b"", retain=True)
        bundle_ref = self.blobs.offer(f"bundle-{self.manifest.bundle_id[:16]}", pack_bundle(self.cfg.bundle))
        with progress_bar("federated rounds", self.cfg.rounds, self.show_progress) as bar:
            bar.advance(state.next_round)
            reason = None
            while state.next_round < self.cfg.rounds:
                try:
                    record = self.run_round(state, bundle_ref)
                except BudgetSpent as exc:  # raised before the round's Task: the state is the last committed one
                    log.warning("%s", reason := exc.reason)
                    break
                bar.advance(**{k: v for k, v in record.items() if k in ("fm_accuracy", "clients") and v is not None})
        end = EndOfRun(run_id=self.cfg.run_id, round_id=state.next_round, sender=CLOUD_SENDER, reason=reason or "completed")
        self.t.publish(topics.control_topic(self.cfg.run_id), encode(end), retain=True)
        return state

    def run_round(self, state: RunState, bundle_ref: BlobRef) -> dict:
        r, t0 = state.next_round, time.time()
        sent0, up0 = self.blobs.bytes_sent, self.bytes_up
        blobs = self._offer(state, bundle_ref)
        tracker, reason = None, ""
        for attempt in range(self.cfg.max_round_retries + 1):
            tracker, reason = self._attempt(r, attempt, state, blobs)
            if tracker is not None:
                break
        record = {"round": r, "fm_accuracy": None, "fm_loss": None, "clients": 0, "devices": [], "aligned": False}
        if tracker is None:
            record["skipped"] = reason
            log.warning("round %d skipped: %s", r, reason)
        else:
            if tracker.failed or tracker.given_up:
                record["failed"] = {**tracker.given_up, **tracker.failed}
            if self.checks is not None:  # the checks have ended (_attempt): their partial sums join the loop's
                self.checks.gather(self.fold)
            record.update(self.privacy.aggregate(r, self.fold, state))
        self.fold = None
        self._fold_saved()
        record.update(bytes_up=self.bytes_up - up0, bytes_down=self.blobs.bytes_sent - sent0, seconds=round(time.time() - t0, 2))
        state.history.append(record)
        state.next_round = r + 1
        self.store.commit(state)
        self.store.drop_fold(r)
        acc = record["fm_accuracy"]
        log.info("round %d: %d clients, FM accuracy %s, loss %s, up %.2f MB, down %.2f MB, %.1fs%s", r, record["clients"],
                 f"{acc:.4f}" if acc is not None else "-", f"{record['fm_loss']:.4f}" if record["fm_loss"] is not None else "-",
                 record["bytes_up"] / 1e6, record["bytes_down"] / 1e6, record["seconds"], " (aligned)" if record["aligned"] else "")
        return record

    def _offer(self, state: RunState, bundle_ref: BlobRef) -> RoundBlobs:
        r = state.next_round
        adapters = self.store.read_tensors(state.adapters)
        ffn = None
        if state.ffn is not None:
            ffn = self.blobs.offer(f"ffn-a{state.alignments}", (Path(self.cfg.out) / state.ffn).read_bytes())
        return RoundBlobs(bundle_ref, self.blobs.offer(f"adapters-r{r}-{state.alignments}", encode_tensors(adapters, {"round": str(r)})), ffn)

    def _attempt(self, r: int, attempt: int, state: RunState, blobs: RoundBlobs) -> tuple[RoundTracker | None, str]:
        """One try at round r: wait for devices, publish the task, collect; (tracker, "") at quorum,
        (None, why) otherwise."""
        cfg = self.cfg
        online = self.wait_for_devices(cfg.min_clients, cfg.wait_for_clients)
        if len(online) < cfg.min_clients:
            reason = f"only {len(online)} of the {cfg.min_clients} devices needed are online"
            log.warning("round %d attempt %d: %s", r, attempt, reason)
            return None, reason
        task = self.privacy.configure(self.strategy.configure(r, online, state, attempt, blobs), online)
        self.privacy.check_budget(task, state)
        self.round_id, self.task = r, task
        self.tracker = RoundTracker(task.devices, task.deadline, cfg.min_clients, ack_deadline=time.time() + cfg.task_ack_timeout)
        self._restore_accepted(r, state)
        if worth_broadcasting(len(task.devices), len(online)):
            self.blobs.broadcast_round(blobs.adapters, blobs.ffn)  # before the Task: devices hold them when they read it
        self._send_task(task)
        log.info("round %d: task sent to %s", r, _some(task.devices, ", "))
        if self.privacy.secure:
            return self.privacy.attempt(task)
        while self._waiting():
            self.pump(1.0)
        # An update received in time counts, even if its check ends later. Load-bearing too: check
        # workers fold into this attempt's sum before the loop counts an update, so no check may end
        # after the attempt does (its update would be in the sum, not counted, not acked).
        while self.collector.checking:
            self.pump(0.2)
        tracker, self.open.tracker = self.tracker, None
        self._close_uploads(r)
        if tracker.status(time.time()) is not RoundStatus.FAILED:
            return tracker, ""
        missing = sorted(set(tracker.selected) - tracker.answered())
        failed = [f"{d}: {e}" for d, e in tracker.failed.items()]
        reason = (f"{len(tracker.accepted)} of {cfg.min_clients} required updates"
                  f"{'; no answer from ' + _some(missing, ', ') if missing else ''}"
                  f"{'; failed: ' + _some(failed, '; ') if failed else ''}")
        log.warning("round %d attempt %d below quorum: %s", r, attempt, reason)
        return None, reason

    def _send_task(self, task: Task) -> None:
        """The Task on the round topic, or one copy per device on its inbox (cloud/fanout.py), each
        signed when tasks are. Addressed copies are not waited for one PUBACK at a time: QoS 1
        still retries them, and a device that never gets its copy never acks the Task, so the
        round stops waiting for it after --task-ack-timeout, as for any silent device."""
        for topic, copy in task_deliveries(task):
            addressed = copy is not task
            if self.signing_key is not None:
                copy = sign(copy, self.signing_key)
            self.t.publish(topic, encode(copy), wait=not addressed)


def _some(items: list[str], sep: str, n: int = 10) -> str:
    """At most n items joined (a flood of silent devices must not make a line of megabytes)."""
    return sep.join(items[:n]) + (f"{sep}... ({len(items) - n} more)" if len(items) > n else "")


def metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []
