"""Virtual clients' device work: a session per client and round (the engine before `fedpft.sim.pool`)
vs the pool (at most one client per core, sessions kept across rounds), and the ORT step floor.

    python benchmarks/virtual_speed.py --bundle runs/x/bundle --shards runs/x/clients

Device side only (no cloud, no FM evaluation, no alignment: those are the same code on both
engines): every client of `--shards` (client*/train.jsonl) trains one round per `--rounds` on its
own thread, from the bundle's initial adapters, as the virtual engine's agents do. CPU seconds are
the process's (all threads; `time.process_time`), which a shared or paused machine inflates less
than wall time. The floor: one session's training steps alone, CPU seconds per step. Prints a
markdown table; BENCHMARKS.md's <!-- virtual_speed --> section quotes it with the profile around it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine  # noqa: E402

from fedpft.edge.session import open_session  # noqa: E402
from fedpft.edge.task_training import rough_sample_count  # noqa: E402
from fedpft.edge.trainer import planned_steps, train_round  # noqa: E402
from fedpft.shared.edge_config import EdgeTrainConfig  # noqa: E402
from fedpft.shared.manifest import BundleManifest  # noqa: E402
from fedpft.shared.records import BatchMaker, batches, epoch_order, read_local_data  # noqa: E402
from fedpft.sim.pool import SessionPool, cores  # noqa: E402


def all_at_once(client, shards: list[Path]) -> tuple[list, float]:
    """(client(i, shard) for every shard, each on its own thread as the virtual engine's agents; wall s)."""
    results, errors = [None] * len(shards), []

    def run(i: int, shard: Path):
        try:
            results[i] = client(i, shard)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(shards)]
    w0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - w0


def one_round(bundle: Path, shards: list[Path], cfg: EdgeTrainConfig, pool: SessionPool | None) -> tuple[int, float, float]:
    """(steps, wall s, CPU s) of every client training one round at once, each on its thread."""
    def client(i: int, shard: Path) -> int:
        lease = pool.lease(bundle, weight=rough_sample_count(shard)) if pool else nullcontext()
        with lease as session:
            return train_round(bundle, shard, cfg, session=session).steps

    c0 = time.process_time()
    steps, wall = all_at_once(client, shards)
    return sum(steps), wall, time.process_time() - c0


def open_trainer(bundle: Path, trainer: str):
    """One session, one thread: "ort" (the devices'), "torch-fp32" or "torch-bf16" (`--virtual-trainer torch`)."""
    if trainer == "ort":
        return open_session(bundle, threads=1)
    import torch

    from fedpft.sim.torch_session import TorchSession

    torch.set_num_threads(1)
    return TorchSession(bundle, BundleManifest.load(bundle), precision=trainer.split("-")[1], threads=1)


def floor(bundle: Path, shard: Path, cfg: EdgeTrainConfig, n: int, trainer: str = "ort") -> float:
    """CPU seconds per training step of one session alone, one thread (after one warm-up step)."""
    s = open_trainer(bundle, trainer)
    s.set_learning_rate(cfg.lr)
    data = read_local_data(shard, s.manifest)
    maker = BatchMaker(bundle, s.manifest)
    bs = list(batches(data.records, maker, cfg.batch_size, data.skips, epoch_order(len(data.records), 0, 0)))[: n + 1]
    s.train_step(bs[0])
    c0 = time.process_time()
    for b in bs[1:]:
        s.train_step(b)
    return (time.process_time() - c0) / (len(bs) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--shards", type=Path, required=True, help="folder of client*/train.jsonl (a simulate run's clients/)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-steps", type=int, default=None, help="cap on each client's steps per round (shorter runs; the per-round overheads then weigh more)")
    ap.add_argument("--floor-steps", type=int, default=10)
    ap.add_argument("--workers", type=int, metavar="REPEATS", default=0,
                    help="only compare the pool's clients on threads of this process with the same pool's clients in "
                         "worker processes (fedpft.sim.workers), REPEATS rounds of each in turn; prints a markdown table")
    ap.add_argument("--trainers", type=int, metavar="REPEATS", default=0,
                    help="only compare the virtual clients' trainers (ORT, torch fp32, torch bf16): the floor of each, "
                         "measured REPEATS times in turn in this process; prints a markdown table")
    args = ap.parse_args()
    if args.trainers:
        compare_trainers(args)
        return
    if args.workers:
        compare_workers(args)
        return
    shards = sorted(args.shards.glob("client*/train.jsonl"))
    cfg = EdgeTrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps, threads=1, holdout=0.1)
    manifest = BundleManifest.load(args.bundle)
    full_steps = sum(planned_steps(len(read_local_data(s, manifest).split(0.1, 0)[0]), cfg.model_copy(update={"max_steps": None})) for s in shards)
    load0 = os.getloadavg()
    per_step = floor(args.bundle, shards[0], cfg, args.floor_steps)
    print(f"floor: {per_step:.3f} CPU s / step", flush=True)
    n = cores()
    rows = []
    for label, pool in (("a session per client and round, all clients at once, 1 ORT thread each (before)", None),
                        (f"pool: {n} client(s) at once, 1 ORT thread each, sessions kept (after)", SessionPool(n, threads=1))):
        for r in range(args.rounds):
            steps, wall, cpu = one_round(args.bundle, shards, cfg.model_copy(update={"seed": r}), pool)
            over = (cpu - steps * per_step) / len(shards)
            rows.append((label, r + 1, steps, cpu, wall, over, os.getloadavg()[0]))
            print(f"{label} round {r + 1}: {steps} steps, {cpu:.1f} CPU s, {wall:.1f} s wall, overhead {over:.2f} CPU s / client-round", flush=True)
    lines = [
        "## Virtual engine: device work per round, before and after the session pool",
        "",
        f"Command: `{command_line()}` — {machine()}; 1-min load average {load0[0]:.1f} at the start. {len(shards)} clients "
        f"(the shards of a `simulate` run), batch {args.batch_size}, 1 local epoch, holdout 10%"
        + (f", at most {args.max_steps} steps per client and round" if args.max_steps else "")
        + f". Device side only: the cloud's FM evaluation and alignment are the same code on every engine. "
        f"Floor: one session alone, one ORT thread: **{per_step:.3f} CPU s per training step**. Overhead per client-round = "
        f"(round CPU - steps x floor) / clients: session build, bundle verification, tokenizer, held-out evaluation before and "
        f"after training, contention.",
        "",
        "| virtual clients | round | steps | CPU s | wall s | overhead CPU s / client-round | 1-min load at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {l} | {r} | {s} | {c:.1f} | {w:.1f} | {o:.2f} | {ld:.1f} |" for l, r, s, c, w, o, ld in rows]
    after = [o for l, r, s, c, w, o, ld in rows if "after" in l and r > 1] or [rows[-1][5]]
    per_round = full_steps * per_step + len(shards) * min(after)
    lines += ["", f"At the benchmark's settings these shards make {full_steps} steps a round: device work = {full_steps} x "
              f"{per_step:.3f} + {len(shards)} x {min(after):.2f} = {per_round:.0f} CPU s a round, {per_round / n:.0f} s on "
              f"{n} idle cores."]
    print("\n".join(lines))


def agent_round(bundle: Path, shards: list[Path], train, seed: int, args) -> tuple[int, float]:
    """(steps, wall s) of every client training one round at once through the agent's trainer
    callable (`train(i, shard)` makes client i's: Task and tensors in, update bytes out), each on its thread."""
    from fedpft.shared.codec import encode_tensors
    from fedpft.shared.message_base import BlobRef
    from fedpft.shared.messages import Task

    ref = BlobRef(blob_id="b", sha256="0" * 64, size=1)
    task = Task(run_id="speed", round_id=seed, sender="cloud", devices=[f"client{i:03d}" for i in range(len(shards))],
                bundle=ref, bundle_version="v:1", adapters=ref, epochs=1, lr=args.lr, batch_size=args.batch_size,
                max_steps=args.max_steps, seed=seed, report_stats=True, deadline=time.time() + 3600)
    adapters = encode_tensors(open_session(bundle, threads=1).adapters())
    steps, wall = all_at_once(lambda i, shard: train(i, shard)(bundle, task, adapters, None)[1]["steps"], shards)
    return sum(steps), wall


def compare_workers(args) -> None:
    """The pool's clients on threads of this process vs in worker processes, alternating rounds. CPU
    seconds: this process's, plus the workers' (psutil), so the pipe's cost on both ends counts."""
    import psutil

    from fedpft.shared.config import AgentConfig
    from fedpft.sim.workers import WorkerPool

    shards = sorted(args.shards.glob("client*/train.jsonl"))
    n = cores()
    cfgs = [AgentConfig(broker="memory://", device_id=f"client{i:03d}", data=s, cache=Path("/nonexistent"), run_id="speed",
                        threads=1) for i, s in enumerate(shards)]
    threads_pool, workers = SessionPool(n, threads=1), WorkerPool(n, threads=1)
    modes = {
        f"threads: {n} at once in this process": lambda i, s: threads_pool.trainer(cfgs[i], rough_sample_count(s)),
        f"worker processes: {n} at once": lambda i, s: workers.trainer(cfgs[i], rough_sample_count(s)),
    }

    def procs() -> list:
        return [psutil.Process()] + [psutil.Process(w.proc.pid) for w in workers.workers if w is not None and w.alive()]

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs())

    load0, rows = os.getloadavg()[0], []
    try:
        for r in range(args.workers):
            for label, train in modes.items():
                c0 = cpu()
                steps, wall = agent_round(args.bundle, shards, train, r, args)
                rss = sum(p.memory_info().rss for p in procs()) / 2**20  # the thread mode's sessions stay in this process
                rows.append((label, r + 1, steps, cpu() - c0, wall, rss, os.getloadavg()[0]))
                print(f"{label} round {r + 1}: {steps} steps, {rows[-1][3]:.1f} CPU s, {wall:.1f} s wall", flush=True)
    finally:
        workers.close()
    lines = [
        f"Command: `{command_line()}` — {machine()}; 1-min load average {load0:.1f} at the start. {len(shards)} clients, "
        f"batch {args.batch_size}, 1 local epoch" + (f", at most {args.max_steps} steps per client and round" if args.max_steps else "")
        + ", one ORT thread per client; round 1 of each mode opens its sessions (and starts the workers). RSS: this "
        "process (which holds the thread mode's sessions once opened) plus the live workers, after the round.",
        "",
        "| virtual clients | round | steps | CPU s | wall s | RSS MB, this process + workers | 1-min load at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {l} | {r} | {s} | {c:.1f} | {w:.1f} | {m:.0f} | {ld:.1f} |" for l, r, s, c, w, m, ld in rows]
    print("\n".join(lines))


TRAINERS = ("ort", "torch-fp32", "torch-bf16")


def compare_trainers(args) -> None:
    """The per-step floor of each trainer, alternating, the best of `args.trainers` turns (contention only adds)."""
    shard = sorted(args.shards.glob("client*/train.jsonl"))[0]
    cfg = EdgeTrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, threads=1)
    load0 = os.getloadavg()[0]
    best = {t: float("inf") for t in TRAINERS}
    for turn in range(args.trainers):
        for t in TRAINERS:
            best[t] = min(best[t], floor(args.bundle, shard, cfg, args.floor_steps, t))
            print(f"turn {turn + 1}: {t} {best[t]:.3f} CPU s / step", flush=True)
    lines = [
        f"Command: `{command_line()}` — {machine()}; 1-min load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end. One session alone, one thread, batch {args.batch_size}, "
        f"{args.floor_steps} steps after a warm-up, best of {args.trainers} alternating turns:",
        "",
        "| trainer | CPU s / step | vs ORT |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {best[t]:.3f} | {best['ort'] / best[t]:.2f}x |" for t in TRAINERS]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
