"""What the round agent trains with: a Task and the device's data turned into an update.

`make_trainer(cfg)` is the callable `EdgeAgent` runs per task (the cloud's virtual engine runs the
same one in-process); `rough_sample_count` is what the device announces before it has a bundle.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext
from pathlib import Path

from fedpft.shared.codec import decode_tensors
from fedpft.shared.config import AgentConfig
from fedpft.shared.edge_config import EdgeTrainConfig
from fedpft.shared.messages import Task

log = logging.getLogger("fedpft.agent")


def rough_sample_count(path: Path) -> int:
    """What a device announces before it has the bundle (labels unknown yet); the exact count
    of usable samples travels with each update and is what FedAvg weighs by."""
    path = Path(path)
    if path.is_dir():
        return sum(1 for p in path.rglob("*") if p.is_file())
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return max(0, n - 1) if path.suffix.lower() == ".csv" else n


def dropout_seed(task_seed: int, device_id: str) -> int:
    """The round's dropout seed on this device: fixed by the Task's seed, different per device
    (with the task seed alone, every device would draw the same masks step for step)."""
    digest = hashlib.sha256(f"{task_seed}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_trainer(cfg: AgentConfig, lease=None):
    """trainer(bundle_dir, task, adapters_bytes, ffn_bytes) -> (update bytes, Update fields).

    lease(bundle_dir): a context manager lending an open session of the bundle for the round
    (the virtual engine's pool, `fedpft.sim.pool`); None opens one per round, as a device does."""
    from .trainer import train_round
    from .update import encode_update

    def train(bundle_dir: Path, task: Task, adapters: bytes, ffn: bytes | None):
        tc = EdgeTrainConfig(epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, max_steps=task.max_steps,
                             seed=task.seed, holdout=cfg.holdout, report_stats=task.report_stats, threads=cfg.threads,
                             providers=cfg.providers, dropout_seed=dropout_seed(task.seed, cfg.device_id))
        with lease(bundle_dir) if lease is not None else nullcontext() as session:
            res = train_round(bundle_dir, cfg.data, tc, adapters=decode_tensors(adapters)[0],
                              ffn=decode_tensors(ffn)[0] if ffn is not None else None, session=session)
        log.info("round %d: %d steps on %d samples, loss %.4f, held-out accuracy %s -> %s", task.round_id, res.steps,
                 res.num_samples, res.mean_loss, res.acc_before, res.acc_after)
        fields = {"num_samples": res.num_samples, "steps": res.steps, "mean_loss": res.mean_loss,
                  "acc_before": res.acc_before, "acc_after": res.acc_after}
        return encode_update(res), fields

    return train
