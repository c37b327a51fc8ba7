"""Methods x seeds x partitions at the accuracy benchmark's settings, on virtual clients.

    nice -n 19 python benchmarks/seeds.py --methods fedpft fedot full --partitions dirichlet:0.5 --seeds 0 1 2
    python benchmarks/seeds.py --report        # tables and plot from whatever results exist

Each run is `fedpft-cloud simulate --engine virtual` (the same round loop, strategy, aggregation,
alignment and evaluation as real processes; the devices' own ORT trainer on threads of this
process) with the schedule of benchmarks/accuracy.py. Its result (the FM accuracy after every round,
wall time, load average) goes to benchmarks/results/seeds/<run>.json; a run whose JSON exists is
skipped, so the benchmark resumes across sessions and the tables are always made from the JSON
there is. Bundles are prepared once per proxy (seed 0) and shared by every seed: the seed of a run
still changes its partition, training subsample, evaluation sample, adapter initialisation
(serve redraws the bundle's initial adapters when its seed differs from the bundle's), device
sampling and local shuffling.

Methods: the accuracy benchmark's five, and `fedpft-kl` / `fedpft-grad` / `fedpft-mix` (FedPFT with
`--align-objective logit-kl` / `lora-grad` / `hidden-mse+lora-grad`, on FedPFT's bundle), whose paired difference against
layer-only distillation decides whether that objective may become the default alignment. Rows of a
method no run has finished yet are left out of the tables.

Writes the <!-- seeds --> section of BENCHMARKS.md and benchmarks/results/seeds.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import LABEL as METHOD_LABEL  # noqa: E402
from accuracy import METHODS as BASE_METHODS  # noqa: E402
from accuracy import schedule_args, simulate_config, simulate_run  # noqa: E402
from common import ROOT, command_line, git_commit, machine, write_section  # noqa: E402
from stats import (  # noqa: E402
    CLAIMS, Claim, CONVERGED_POINTS, LAST_ROUNDS, RANGE_OF_3, TREND_ROUNDS, PairedDiff, block_drift, last_rounds_movement, mean_curve,
    paired_difference, summarize, tail_trend, verdict,
)

RESULTS = ROOT / "benchmarks" / "results" / "seeds"
PLOT = ROOT / "benchmarks" / "results" / "seeds.png"
PARTITIONS = ["dirichlet:0.5", "iid"]
# Benchmark methods that are a simulate method with other options: FedPFT whose neuron-level
# alignment minimises the logit KL of FM and proxy (both with the round's adapters) instead of the
# layers' hidden-state MSE - the objective aimed at adapter transfer (issue 15).
VARIANTS = {"fedpft-kl": ("fedpft", {"align_objective": "logit-kl"}),
            "fedpft-grad": ("fedpft", {"align_objective": "lora-grad"}),
            "fedpft-mix": ("fedpft", {"align_objective": "hidden-mse+lora-grad"})}
METHODS = [*BASE_METHODS, *VARIANTS]
# run when asked for (--methods), not part of the plan the report counts: a lora-grad alignment step
# is a double backward, 2.7x a hidden-mse step's CPU (BENCHMARKS.md alignment_grad), added late
OPT_IN = ["fedpft-grad", "fedpft-mix"]
PLANNED = [m for m in METHODS if m not in OPT_IN]
LABEL = {**METHOD_LABEL, "fedpft-kl": "FedPFT, alignment by logit KL (`--align-objective logit-kl`)",
         "fedpft-grad": "FedPFT, alignment by adapter-gradient matching (`--align-objective lora-grad`)",
         "fedpft-mix": "FedPFT, alignment by layer outputs and adapter gradients (`--align-objective hidden-mse+lora-grad`)"}
# the four comparisons, then whether each transfer-aimed alignment pays: (a, b) reads "a - b"
PAIRS = [("fedpft", "fedot"), ("full", "fedpft"), ("fedpft", "layeronly"), ("layeronly", "noalign"),
         ("fedpft-kl", "layeronly"), ("fedpft-kl", "fedpft"), ("fedpft-grad", "layeronly"), ("fedpft-grad", "fedpft"),
         ("fedpft-mix", "layeronly"), ("fedpft-mix", "fedpft")]
# what would make an objective the default alignment (the rule)
RULES = [Claim("logit-kl alignment beats layer-only distillation (the rule for making it the default)", "fedpft-kl", "layeronly", "above"),
         Claim("lora-grad alignment beats layer-only distillation (the rule for making it the default)", "fedpft-grad", "layeronly", "above"),
         Claim("hidden-mse+lora-grad alignment beats layer-only distillation (the rule for making it the default)", "fedpft-mix", "layeronly", "above")]


def simulate_method(method: str) -> tuple[str, dict]:
    """(the simulate --method, further SimulateConfig fields) of a benchmark method."""
    return VARIANTS.get(method, (method, {}))


def method_of(simulate_cfg: dict) -> str:
    """The benchmark method a run folder's simulate_config.json was made for."""
    for name, (base, options) in VARIANTS.items():
        if simulate_cfg["method"] == base and all(simulate_cfg.get(k) == v for k, v in options.items()):
            return name
    return simulate_cfg["method"]
DEFAULT_KEEP = 0.25


@dataclass(frozen=True)
class Run:
    method: str
    partition: str
    seed: int
    rounds: int
    ffn_keep: float = DEFAULT_KEEP

    @property
    def name(self) -> str:
        """File stem, without the round count: a longer run's first rounds are a shorter run (the
        schedule does not depend on the total), so one result serves every round count up to its own.
        The full FM has no --ffn-keep (its bundle ignores it)."""
        keep = "" if self.method == "full" else f"_keep{self.ffn_keep:g}"
        return f"{self.method}{keep}_{self.partition.replace(':', '')}_s{self.seed}"


def plan(methods: list[str], partitions: list[str], seeds: list[int], rounds: int, ffn_keep: float = DEFAULT_KEEP) -> list[Run]:
    """Runs in the order they pay off: per partition, all methods for one seed before the next seed,
    so paired differences exist as early as possible."""
    return [Run(m, p, s, rounds, ffn_keep) for p in partitions for s in seeds for m in methods]


def pending(runs: list[Run], results: Path) -> list[Run]:
    """The runs without a result JSON of at least their round count (what a resumed benchmark still has to do)."""
    def done(r: Run) -> bool:
        p = Path(results) / f"{r.name}.json"
        return p.is_file() and len(json.loads(p.read_text())["fm_accuracy"]) >= r.rounds

    return [r for r in runs if not done(r)]


def load_results(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))]


def write_json(path: Path, obj: dict) -> None:
    """Whole or not at all: a benchmark killed mid-write must not leave a JSON that skips its run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


# ---- bundles ------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def fedot_layers(ffn_keep: float, model: str = "minilm") -> int:
    """FedOT's layer budget at this --ffn-keep, as prepare computes it (default kept layers)."""
    from fedpft.modeling.families import load_config, resolve_model_id
    from fedpft.modeling.proxy import default_keep_layers, matching_layer_budget

    c = load_config(resolve_model_id(model), ["a", "b"])
    return matching_layer_budget(c.num_hidden_layers, c.hidden_size, c.intermediate_size, default_keep_layers(c.num_hidden_layers), ffn_keep)


def bundle_key(method: str, ffn_keep: float) -> str:
    """Runs with equal keys run on the same proxy (layeronly is fedpft's bundle, only the schedule
    differs; FedOT at two --ffn-keep with one layer budget is one proxy)."""
    from fedpft.shared.methods import method as row

    m = row(simulate_method(method)[0])
    if m.proxy == "full":
        return "full"
    size = f"L{fedot_layers(ffn_keep)}" if m.proxy == "fedot" else f"keep{ffn_keep:g}"
    return f"{m.proxy}-{'distilled' if m.distill else 'raw'}-{size}"


def bundle(method: str, ffn_keep: float, args, work: Path, folder: Path | None = None) -> Path:
    """The method's bundle, prepared once (seed 0) under work/bundles (or `folder`) and shared by every
    seed and partition."""
    from fedpft.cloud.prepare import prepare
    from fedpft.cloud.simulate import bundle_config
    from fedpft.shared.datasets import materialize

    folder = folder or work / "bundles" / bundle_key(method, ffn_keep)
    if (folder / "manifest.json").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished prepare
    base, _ = simulate_method(method)  # a variant's bundle is its base method's
    cfg = simulate_config(base, args, work / "unused", ffn_keep=ffn_keep, seed=0, engine="virtual")
    t0 = time.time()
    prepare(bundle_config(cfg, materialize(work / "data"), folder), show_progress=False)
    print(f"bundle {folder}: prepared in {time.time() - t0:.0f}s (load {os.getloadavg()[0]:.1f})", flush=True)
    return folder


# ---- runs ---------------------------------------------------------------------------------


SCHEDULE = ("clients", "max_samples", "eval_samples", "distill_steps", "align_every", "align_steps", "lr", "local_epochs", "batch_size")


def curve(metrics: Path) -> list[float]:
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.is_file() else []
    return [r["fm_accuracy"] for r in rows if r.get("fm_accuracy") is not None]


def result(run: Run, acc: list[float], schedule: dict, wall_s: float, load_start: float | None, command: str) -> dict:
    """A run's result JSON; `complete` is false for a run read while it was still going (see --harvest)."""
    return {"method": run.method, "partition": run.partition, "seed": run.seed, "rounds": run.rounds,
            "ffn_keep": None if run.method == "full" else run.ffn_keep, "bundle": bundle_key(run.method, run.ffn_keep),
            "fm_accuracy": acc, "complete": len(acc) >= run.rounds, "wall_s": round(wall_s, 1),
            "load_start": None if load_start is None else round(load_start, 2),
            "load_end": [round(x, 2) for x in os.getloadavg()], "engine": "virtual", "schedule": schedule, "command": command,
            "commit": git_commit()}


def run_one(run: Run, args, work: Path, results: Path) -> dict:
    """One run from scratch (an unfinished one is started again), its result JSON written last."""
    out = work / "runs" / run.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "bundle").symlink_to(bundle(run.method, run.ffn_keep, args, work).resolve(), target_is_directory=True)
    base, options = simulate_method(run.method)
    wall = simulate_run(base, args, out, engine="virtual", partition=run.partition, seed=run.seed,
                        ffn_keep=run.ffn_keep, rounds=run.rounds, **options)
    acc = curve(out / "metrics.jsonl")
    if len(acc) != run.rounds:
        raise RuntimeError(f"{run.name}: {len(acc)} evaluated rounds of {run.rounds}; no result written")
    r = result(run, acc, {k: getattr(args, k) for k in SCHEDULE}, wall["wall"], wall["load_start"], command_line())
    write_json(results / f"{run.name}.json", r)
    return r


def harvest(work: Path, results: Path, command: str) -> list[str]:
    """Rounds so far of the runs still going under work/runs, as JSON with complete=false (a JSON that
    pending() does not count as done, so the run is still made in full; its own result replaces this)."""
    written = []
    for out in sorted((work / "runs").glob("*/")):
        cfg_path = out / "simulate_config.json"
        if not cfg_path.is_file():
            continue
        cfg = json.loads(cfg_path.read_text())
        run = Run(method_of(cfg), cfg["partition"], cfg["seed"], cfg["rounds"], cfg["ffn_keep"])
        target = results / f"{run.name}.json"
        acc = curve(out / "federation" / "metrics.jsonl")
        if not acc or (target.is_file() and len(json.loads(target.read_text())["fm_accuracy"]) >= len(acc)):
            continue
        write_json(target, result(run, acc, {k: cfg[k] for k in SCHEDULE}, time.time() - cfg_path.stat().st_mtime, None,
                                  f"{command} (rounds so far of a run still going)"))
        written.append(f"{run.name}: {len(acc)} of {run.rounds} rounds")
    return written


# ---- report -------------------------------------------------------------------------------


def pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.1f}"


def groups(rows: list[dict], rounds: int | None, ffn_keep: float = DEFAULT_KEEP) -> dict[tuple[str, str], dict[int, list[float]]]:
    """(partition, method) -> seed -> accuracy curve of its first `rounds` rounds, for the runs that
    reached them at this proxy size."""
    out: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in rows:
        if len(r["fm_accuracy"]) >= (rounds or 1) and r.get("ffn_keep") in (None, ffn_keep):  # None: every run, uncut
            out.setdefault((r["partition"], r["method"]), {})[r["seed"]] = r["fm_accuracy"][:rounds]
    return out


def last_round(curve: list[float]) -> float:
    return curve[-1]


def tail_mean(curve: list[float]) -> float:
    return sum(curve[-LAST_ROUNDS:]) / len(curve[-LAST_ROUNDS:])


POOLED = "both, pooled"


def paired(g: dict, a: str, b: str, endpoint, partitions: tuple[str, ...]) -> PairedDiff:
    """a − b of `endpoint(curve)` over the (partition, seed) pairs both methods have in `partitions`:
    one partition's seeds, or every partition's at once (pooled: the interval then spans the
    partitions' differences as well as the seeds')."""
    def values(m: str) -> dict:
        return {(p, s): endpoint(c) for p in partitions for s, c in g.get((p, m), {}).items()}

    d = paired_difference(values(a), values(b))
    if {p for p, _ in d.seeds} != set(partitions):
        return paired_difference({}, {})  # pooled only where every partition has a pair
    return d


def columns() -> list[tuple[str, tuple[str, ...]]]:
    return [(p, (p,)) for p in PARTITIONS] + [(POOLED, tuple(PARTITIONS))]


def pair_table(g: dict, endpoint) -> list[str]:
    """Markdown rows of PAIRS' paired differences of `endpoint(curve)`, per partition and pooled."""
    rows = ["| difference | " + " | ".join(name for name, _ in columns()) + " |", "|---|" + "---|" * len(columns())]
    for a, b in PAIRS:
        if not any(m == a for _, m in g):
            continue  # a method without a finished run yet
        cells = []
        for _, parts in columns():
            d = paired(g, a, b, endpoint, parts)
            if d.n == 0:
                cells.append("-")
                continue
            ci = f" [{pct(d.lo)}, {pct(d.hi)}]" if d.n >= 2 else " (one seed: no interval)"
            text = f"{pct(d.mean)}{ci} (n={d.n})"
            cells.append(f"**{text}**" if d.excludes_zero() else text)
        rows.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return rows


def claim_cells(c: Claim, g: dict) -> str:
    """The claim's verdict per partition and pooled, from the last-round accuracies paired by seed."""
    cells = []
    for name, parts in columns():
        d = paired(g, c.a, c.b, last_round, parts)
        if len(parts) == 1 or d.n:
            cells.append(f"{name}: " + verdict(c, d, "pairs" if len(parts) > 1 else "seeds"))
    return "; ".join(cells)


# The commit from which the virtual clients training at once each have a process (fedpft.sim.workers).
WORKERS_COMMIT = "03f306e"


def repeatability(rows: list[dict]) -> str:
    """Which runs a rerun of the same seed reproduces bit for bit."""
    old = sum(not r.get("commit") for r in rows)
    text = (f"A JSON names the commit its run was made on. Runs made before {WORKERS_COMMIT} ({old} of these {len(rows)}: "
            "those without a commit) trained the clients running at once on threads of one process, which drew their "
            "dropout masks from onnxruntime's one generator in scheduling order: such a run repeats only in "
            f"distribution. From {WORKERS_COMMIT} on, each has a worker process and a seed repeats bit for bit.")
    return text if old else f"From {WORKERS_COMMIT} on a seed repeats bit for bit (virtual clients in worker processes)."


def section(rows: list[dict], rounds: int, command: str, planned: int) -> str:
    g = groups(rows, rounds)
    used = [r for r in rows if len(r["fm_accuracy"]) >= rounds and r.get("ffn_keep") in (None, DEFAULT_KEEP)]
    lines = [
        "## Seeds: every method over several seeds, with paired confidence intervals (virtual clients)",
        "",
        f"Command: `{command}` — {machine()}. Results: `benchmarks/results/seeds/*.json` (one per run; the tables are "
        f"made from whatever JSON exists, so this section grows as runs finish). Settings of the accuracy section "
        f"(all-MiniLM-L6-v2 + debian-sections, 10 clients, 4000 training samples, batch 16, lr 3e-3, 1 local epoch, "
        f"800 test samples, FedPFT/FedOT at --ffn-keep {DEFAULT_KEEP}, distilled 200 steps, fedpft aligned every 3 rounds) "
        f"on `simulate --engine virtual`, {rounds} rounds. One bundle per proxy (prepared with seed 0); the run's seed "
        "changes the partition, the training subsample, the 800 test samples, the initial adapters, device sampling and "
        "local shuffling. Runs in: "
        f"**{sum(r.get('complete', True) for r in used if r['method'] not in OPT_IN)} complete of {planned} planned**"
        + "".join(f", and {n} of {m} (opt-in)" for m in OPT_IN if (n := sum(r['method'] == m and r.get('complete', True) for r in used)))
        + (f", and {sum(not r.get('complete', True) for r in used)} still going whose first {rounds} rounds are used "
           "(a run's first rounds do not depend on its length)" if not all(r.get("complete", True) for r in used) else "") + ". "
        + repeatability(used),
        "",
        "FM test accuracy after the last round (%), mean ± sd over seeds (n seeds):",
        "",
        "| method | " + " | ".join(PARTITIONS) + " |",
        "|---|" + "---|" * len(PARTITIONS),
    ]
    for m in METHODS:
        if m in OPT_IN and not any(k[1] == m for k in g):
            continue
        cells = []
        for p in PARTITIONS:
            s = summarize([c[-1] for c in g.get((p, m), {}).values()])
            cells.append("-" if s.n == 0 else f"{pct(s.mean)} ± {pct(s.sd)} (n={s.n})")
        lines.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences of last-round accuracy (points; same seed = same partition, data and test "
              "samples), mean and 95% t confidence interval; **bold** where the interval excludes 0. "
              f"*{POOLED}*: the pairs of both partitions as one sample (the interval then covers how the difference "
              "changes with the partition as well as with the seed; a paper's claim is about both):", ""]
    lines += pair_table(g, last_round)
    lines += ["", f"The same, on the mean accuracy of the last {LAST_ROUNDS} rounds (a secondary endpoint, added when "
              f"only seed 0 was in: one round's accuracy moves by 1-2 points from the next on a plateau, which an "
              f"average of {LAST_ROUNDS} rounds damps):", ""]
    lines += pair_table(g, tail_mean)
    lines += ["", "What the numbers say about the paper's three claims (last-round accuracy, paired by seed; "
              "made from the table above, so it changes as runs land):", ""]
    for c in CLAIMS:
        lines.append(f"- *{c.text}*: {claim_cells(c, g)}.")
    lines += [f"- And ours, *{c.text}*: {claim_cells(c, g)}." for c in RULES if any(m == c.a for _, m in g)]
    short = [r for r in rows if len(r["fm_accuracy"]) < rounds]
    if short:
        lines += ["", f"Runs that have not reached round {rounds} yet (left out above; FM accuracy per round so far, %):", ""]
        lines += [f"- {r['method']} {r['partition']} seed {r['seed']}" + (f" --ffn-keep {r['ffn_keep']:g}" if r.get("ffn_keep") else "")
                  + f": {' '.join(pct(v) for v in r['fm_accuracy'])}" + ("" if r.get("complete", True) else " (still going)") for r in short]
    lines += ["", f"Convergence: how far the seed-mean accuracy moved over the last {LAST_ROUNDS} rounds (max − min, points; "
              f"the criterion is < {CONVERGED_POINTS}), the drift of {LAST_ROUNDS}-round blocks (mean of the last {LAST_ROUNDS} rounds "
              f"minus the mean of the {LAST_ROUNDS} before; a single round's accuracy on 800 test samples has a standard error of "
              "about 1.4 points, which max − min of rounds picks up even on a flat curve, and a block mean damps), and the mean "
              "accuracy per round:", "",
              "| partition | method | seeds | moved | block drift | mean accuracy per round (%) |", "|---|---|---|---|---|---|"]
    moves, drifts, slopes, noise = [], [], [], []
    for p in PARTITIONS:
        for m in METHODS:
            curves = list(g.get((p, m), {}).values())
            if not curves:
                continue
            move = 100 * last_rounds_movement(curves)
            ok = "" if math.isnan(move) else (" (converged)" if move < CONVERGED_POINTS else " (still moving)")
            drift = 100 * block_drift(curves)
            if not math.isnan(move):
                moves.append(move)
                drifts.append(drift)
                slopes.append(100 * tail_trend(mean_curve(curves), TREND_ROUNDS)[0])
                noise += [100 * tail_trend(c, TREND_ROUNDS)[1] for c in curves]
            lines.append(f"| {p} | {m} | {len(curves)} | {'-' if math.isnan(move) else f'{move:.2f}'}{ok} | "
                         f"{'-' if math.isnan(drift) else f'{drift:+.2f}'} | "
                         + " ".join(pct(v) for v in mean_curve(curves)) + " |")
    if moves:
        lines += ["", rounds_verdict(rounds, moves, drifts, slopes, noise)]
    commands = sorted({r["command"] for r in used})
    if commands:
        lines += ["", "The runs were made by (each skips the runs whose JSON exists; under `nice -n 19`, "
                  "`FEDPFT_EDGE_PYTHON=.venv-edge/bin/python`):", ""] + [f"    {c}" for c in commands]
    done = [r for r in rows if r.get("complete", True)]
    walls = [r["wall_s"] / len(r["fm_accuracy"]) for r in done]
    if walls:
        loads = [r["load_start"] for r in done if r.get("load_start") is not None]
        lines += ["", f"Wall time per round of the {len(done)} complete runs: median {sorted(walls)[len(walls) // 2] / 60:.1f} min "
                  f"(min {min(walls) / 60:.1f}, max {max(walls) / 60:.1f}), under `nice -n 19` on a shared machine: 1-min load "
                  f"average at the runs' starts {min(loads):.1f}–{max(loads):.1f} on 2 cores, so these times are inflated."]
        lines += ["", what_it_takes(done, rounds)]
    lines += ["", "![accuracy per round, mean over seeds with a ±1 sd band (runs still going included)](benchmarks/results/seeds.png)"]
    return "\n".join(lines)


def rounds_verdict(rounds: int, moves: list[float], drifts: list[float],
                   slopes: list[float] = (), noise: list[float] = ()) -> str:
    """The issue's "say how many rounds": how many method x partition rows meet the < 0.5 point
    criterion at this run length, by either measure of the table above, and why not where not:
    the seed-mean curves' slope over their last TREND_ROUNDS rounds and single runs' round-to-round
    noise about that line (all in points)."""
    n = len(moves)
    still = sum(not (m < CONVERGED_POINTS) for m in moves)
    flat = sum(abs(d) < CONVERGED_POINTS for d in drifts)
    text = (f"How many rounds: {rounds}. At {rounds} rounds the seed-mean moved by less than {CONVERGED_POINTS} points over "
            f"the last {LAST_ROUNDS} rounds in {n - still} of {n} method x partition rows; its {LAST_ROUNDS}-round block drift "
            f"is under {CONVERGED_POINTS} points in {flat} of {n}. ")
    if still == 0:
        return text + "Every row meets the criterion."
    text += f"The criterion is not met everywhere at {rounds} rounds. "
    slopes = sorted(v for v in slopes if not math.isnan(v))
    noise = sorted(v for v in noise if not math.isnan(v))
    if slopes and noise:
        text += (f"Why not: over rounds {rounds - TREND_ROUNDS + 1}-{rounds} the seed-mean curves still rose by "
                 f"{slopes[len(slopes) // 2]:+.2f} points per round at the median ({slopes[0]:+.2f} to {slopes[-1]:+.2f}), "
                 f"which alone moves {LAST_ROUNDS} rounds by about {(LAST_ROUNDS - 1) * slopes[len(slopes) // 2]:.1f}; and one "
                 f"run's accuracy scatters about that line by {noise[len(noise) // 2]:.2f} points (sd, median over runs), so "
                 f"even a flat mean of 3 seeds would span about {RANGE_OF_3 * noise[len(noise) // 2] / math.sqrt(3):.1f} points over "
                 f"{LAST_ROUNDS} rounds (the expected range of 3 normal draws is {RANGE_OF_3:.2f} sd). ")
    return text + ("Read the last-round tables with the block drift beside them (a row still drifting upward favours the "
                   f"methods that converge later), and the mean of the last {LAST_ROUNDS} rounds as the steadier endpoint.")


def what_it_takes(done: list[dict], rounds: int, seeds: int = 3) -> str:
    """The issue's "say what it takes": the five methods x `seeds` seeds of one partition, from each
    method's fastest complete run (the least disturbed by the machine's other work)."""
    fastest = {m: min((r["wall_s"] * rounds / len(r["fm_accuracy"]) for r in done if r["method"] == m), default=None)
               for m in BASE_METHODS}
    timed = {m: t for m, t in fastest.items() if t is not None}
    if not timed:
        return ""
    each = ", ".join(f"{m} {t / 60:.0f} min" for m, t in timed.items())
    untimed = [m for m in BASE_METHODS if m not in timed]
    total = seeds * sum(timed.values()) / 3600
    return (f"What it takes: the fastest complete run of each method here ({rounds} rounds): {each}. So {len(timed)} "
            f"method(s) x {seeds} seeds of one partition take {total:.1f} h of this 2-core machine"
            + (f", plus {', '.join(untimed)} (no complete run yet; full trains the whole FM, about twice a proxy's step)" if untimed else "")
            + ". Each partition is the same again.")


def plot(rows: list[dict], rounds: int, path: Path) -> Path | None:
    """FM accuracy per round, every method on one axis (one panel per partition): seed mean, ±1 sd band,
    over the rounds all of a method's runs have reached (runs still going included: the plot shows progress)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    g = groups(rows, None)
    parts = [p for p in PARTITIONS if any((p, m) in g for m in METHODS)]
    if not parts:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 3.8), dpi=120, squeeze=False, sharey=True)
    for ax, p in zip(axes[0], parts):
        for m in METHODS:
            curves = list(g.get((p, m), {}).values())
            if not curves:
                continue
            mean = mean_curve(curves)
            x = list(range(1, len(mean) + 1))  # rounds counted from 1, as report.md does
            ax.plot(x, [100 * v for v in mean], marker="o", ms=3, label=f"{m} (n={len(curves)})")
            if len(curves) > 1:
                sd = [summarize([c[i] for c in curves]).sd for i in range(len(mean))]
                ax.fill_between(x, [100 * (v - s) for v, s in zip(mean, sd)], [100 * (v + s) for v, s in zip(mean, sd)], alpha=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{p}: FM test accuracy, mean over seeds ± sd")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def report(args, planned: int) -> None:
    rows = load_results(args.results)
    write_section("seeds", section(rows, args.rounds, command_line(), planned))
    plot(rows, args.rounds, PLOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    schedule_args(ap, rounds=20)
    ap.add_argument("--methods", nargs="+", default=PLANNED, choices=METHODS,
                    help=f"methods to run, in this order (default: all but {', '.join(OPT_IN)})")
    ap.add_argument("--partitions", nargs="+", default=PARTITIONS, choices=PARTITIONS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ffn-keep", type=float, default=DEFAULT_KEEP, help="proxy size of fedpft/layeronly/noalign/fedot runs")
    ap.add_argument("--broker", default=None, help=argparse.SUPPRESS)  # virtual clients need none
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "seeds", help="bundles and run folders (not committed)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="one JSON per finished run (committed)")
    ap.add_argument("--report", action="store_true", help="only write the section and plot from the existing JSON")
    ap.add_argument("--harvest", action="store_true", help="first save the rounds so far of runs still going under --work "
                    "(complete=false; they are run in full later), then as --report")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.harvest:
        print("\n".join(harvest(args.work, args.results, command_line())) or "no run in progress has new rounds", flush=True)
        args.report = True
    runs = plan(args.methods, args.partitions, args.seeds, args.rounds, args.ffn_keep)
    todo = [] if args.report else pending(runs, args.results)
    if not args.report:
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already have results; {len(todo)} to run", flush=True)
    planned = len(plan(PLANNED, PARTITIONS, args.seeds, args.rounds))
    for run in todo:
        t0 = time.time()
        r = run_one(run, args, args.work, args.results)
        print(f"{run.name}: final {100 * r['fm_accuracy'][-1]:.1f}% in {(time.time() - t0) / 60:.1f} min "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        report(args, planned)
    report(args, planned)


if __name__ == "__main__":
    main()
