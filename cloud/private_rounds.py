"""The round loop's privacy hooks (issue 14): secure aggregation and client-level DP in a live run.

Federation calls these at fixed points and knows nothing else of them: `configure` (the Task's
privacy field and the round's sampling rate), `check_budget` (before a Task goes out),
`attempt` (the secure stages instead of collecting plain updates), `message`/`chunk` (secagg
traffic), `screen` (plain updates refused under --secure-agg), `aggregate` (central noise, the
secure sum, DP and secagg metrics) and `on_resume`. With neither --secure-agg nor a --dp-* flag
every hook is the identity: the plain round loop runs exactly as before.
"""

from __future__ import annotations

import logging

import numpy as np

from fedpft.shared import topics
from fedpft.shared.chunks import Chunk
from fedpft.shared.messages import SecAggKeys, SecAggMasked, SecAggReveal, SecAggShares, Task, TaskPrivacy, Update, encode

from . import dp, secagg_store
from .secagg_unmask import SecAggAbort, average
from .secure_round import MASKED_PREFIX, SecureRound, layout, secagg_config, state_path
from .uploads import Verdict

log = logging.getLogger("fedpft.serve")

# What a device's secagg topic may carry (the run's broadcast secagg topic is the cloud's).
DEVICE_SECAGG = (SecAggKeys, SecAggShares, SecAggMasked, SecAggReveal)
FALLBACK_WEIGHT = 100_000  # ring bound on a weight when no device of the round declared one


class BudgetSpent(Exception):
    """The next round would take epsilon past --dp-max-epsilon; `reason` is the run's last line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PrivateRounds:
    def __init__(self, fed):
        self.fed, self.cfg = fed, fed.cfg
        self.secure = bool(self.cfg.secure_agg)
        self.active: SecureRound | None = None  # the secure attempt in progress
        self.done: SecureRound | None = None  # the attempt whose sum the round aggregates
        self.q: float | None = None
        self.report_stats = False
        # fresh entropy, never the run's seed: noise anyone could regenerate protects nothing
        self.rng = np.random.default_rng()

    @property
    def enabled(self) -> bool:
        return self.secure or self.cfg.dp_clip is not None

    def subscribe(self) -> None:
        if self.secure:
            self.fed.t.subscribe(topics.all_devices_pattern(self.cfg.run_id, topics.SECAGG), self.fed._on_json)

    def on_resume(self) -> None:
        """A secure round cut by a crash restarts under a new task: the devices' secrets for the old
        one lived in their memory only, and what is on disk is masked material that opens nothing."""
        path = state_path(self.cfg)
        if not path.is_file():
            return
        try:
            c = secagg_store.read(path)
            what = f"round {c.round_id} (task {c.task_id}, stage {c.stage})"
        except Exception as exc:  # noqa: BLE001 - a damaged file is deleted all the same
            what = f"an unreadable state ({type(exc).__name__})"
        log.warning("secure aggregation of %s was cut by a restart; the round restarts under a new task", what)
        path.unlink()

    # ---- before the Task goes out
    def configure(self, task: Task, online: list[str]) -> Task:
        self.q = len(task.devices) / max(len(online), len(task.devices))
        self.report_stats = task.report_stats  # counts released too: the round costs more (dp.effective_multiplier)
        if not self.enabled:
            return task
        return task.model_copy(update={"privacy": TaskPrivacy(secure_agg=self.secure, clip=self.cfg.dp_clip)})

    def _multiplier(self, report_stats: bool) -> float:
        return dp.effective_multiplier(self.cfg.dp_noise, report_stats and self.secure)

    def _spent(self, state) -> list[tuple[float, float]]:
        return [(h["dp_q"], h["dp_multiplier"]) for h in state.history if h.get("dp_multiplier")]

    def check_budget(self, task: Task, state) -> None:
        cfg = self.cfg
        if cfg.dp_max_epsilon is None:
            return
        over, eps = dp.next_round_exceeds(self._spent(state), (self.q, self._multiplier(task.report_stats)), cfg.dp_delta,
                                          cfg.dp_max_epsilon)
        if over:
            raise BudgetSpent(f"privacy budget reached: round {task.round_id} would bring epsilon to {eps:.3g} "
                              f"> --dp-max-epsilon {cfg.dp_max_epsilon:g} (delta {cfg.dp_delta:g}); ending the run")

    # ---- during the round
    def screen(self, msg: Update) -> Verdict | None:
        """Under --secure-agg a plain update is refused unread (it would put one device's update on disk)."""
        if self.secure and msg.blob is not None:
            self.fed.collector.forget(msg)
            return Verdict(msg, "reject", "this run uses secure aggregation: send a masked input, not a plain update")
        return None

    def message(self, msg) -> None:
        if self.active is None:
            log.debug("secagg %s from %s outside a secure round; ignored", msg.type, msg.sender)
            return
        self.active.message(msg, len(encode(msg)))

    def takes(self, chunk: Chunk) -> bool:
        return self.secure and chunk.blob_id.startswith(MASKED_PREFIX)

    def chunk(self, device: str, chunk: Chunk, nbytes: int) -> None:
        if self.active is None:
            log.debug("masked chunk from %s outside a secure round; ignored", device)
            return
        self.active.chunk(device, chunk, nbytes)

    def attempt(self, task: Task):
        """The secure stages of one attempt: (tracker, "") with the sum in hand, else (None, why)."""
        fed, cfg = self.fed, self.cfg
        declared = [fed.devices.declared(d) or 0 for d in task.devices]
        shape = layout(fed.strategy.expected, fed.strategy.stat_layers, task.report_stats)
        self.active = SecureRound(fed, task, secagg_config(cfg, shape, len(task.devices), max(declared) or FALLBACK_WEIGHT))
        try:
            result = self.active.run()
        except SecAggAbort as exc:
            result, reason = None, f"secure aggregation failed: {exc.reason}"
        finally:
            self.done, self.active = self.active, None
            tracker, fed.open.tracker = fed.tracker, None
            fed._close_uploads(task.round_id)
        if result is not None:
            for d in result.survivors:
                tracker.accept(d, None)
            if len(result.survivors) >= cfg.min_clients:
                return tracker, ""
            reason = f"{len(result.survivors)} of {cfg.min_clients} required masked inputs"
        log.warning("round %d: %s", task.round_id, reason)
        return None, reason

    # ---- after the round
    def aggregate(self, rnd: int, fold, state) -> dict:
        cfg, strategy = self.cfg, self.fed.strategy
        central = cfg.dp_noise is not None and cfg.dp_mode == "central"
        if not self.secure:
            record = strategy.aggregate(rnd, fold, state, noise=self._noise_mean if central else None)
        else:
            record = self._secure_aggregate(rnd, state, central)
            record.update(self.done.metrics())
            self.done = None
        record.update(self._dp_record(record, state))
        return record

    def _noise_mean(self, adapters: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Central DP on a plain round's mean: (sum + N(0, (Z*C)^2)) / n."""
        noise = dp.central_noise({k: np.zeros(v.shape) for k, v in adapters.items()}, self.cfg.dp_noise, self.cfg.dp_clip, self.rng)
        return {k: (v.astype(np.float64) + noise[k] / n).astype(v.dtype) for k, v in adapters.items()}

    def _secure_aggregate(self, rnd: int, state, central: bool) -> dict:
        values = self.done.result.values
        if central:
            values = dp.central_noise(values, self.cfg.dp_noise, self.cfg.dp_clip, self.rng)
        deltas, stats, wsum = average(values)
        ref = self.fed.store.read_tensors(state.adapters)
        adapters = {k: (ref[k].astype(np.float64) + deltas[k]).astype(ref[k].dtype) for k in ref}
        survivors = self.done.result.survivors
        record = dict(clients=len(survivors), devices=survivors, aggregator="fedavg (secure sum)", weight_sum=wsum, train_loss=None)
        record.update(self.fed.strategy.finish_round(rnd, adapters, stats, state))
        return record

    def _dp_record(self, record: dict, state) -> dict:
        cfg = self.cfg
        if cfg.dp_clip is None:
            return {}
        out = {"dp_clip": cfg.dp_clip}
        if cfg.dp_noise is None or not record.get("clients"):
            return out
        mult = self._multiplier(self.report_stats)
        eps = dp.epsilon([*self._spent(state), (self.q, mult)], cfg.dp_delta)
        out.update(dp_noise=cfg.dp_noise, dp_mode=cfg.dp_mode, dp_delta=cfg.dp_delta, dp_q=self.q, dp_multiplier=mult, dp_epsilon=eps)
        return out
