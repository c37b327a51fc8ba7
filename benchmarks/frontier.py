"""The frontier: FM accuracy against what a proxy costs the device, for FedPFT and FedOT proxies.

    nice -n 19 python benchmarks/frontier.py                 # cost of every proxy, then the table
    python benchmarks/frontier.py --report                   # table and plot from existing JSON

Proxies: FedPFT at --ffn-keep 0.1 / 0.25 / 0.5 and FedOT at the matching budgets (prepare turns
--ffn-keep into FedOT's layer count: as many full layers as hold the FedPFT proxy's transformer
weights, rounded), plus the full FM for reference. They are the very bundles the seeds benchmark
runs (benchmarks/seeds.py prepares and caches them), so cost and accuracy describe one proxy.

Cost, per proxy, on this machine: the bytes a device downloads (the packed bundle the cloud
serves), and one local step of the device trainer (`fedpft.edge.trainer` on plain onnxruntime,
the worker of benchmarks/edge_speed.py in its own subprocess on the edge venv): median step time
and the process's peak RSS, at the benchmark's batch (16 texts of 64 tokens), one ORT thread as
simulate's devices use. A proxy the seeds benchmark has not prepared yet is measured on an undistilled
build (distillation changes the values of the weights, not their shapes). Each proxy's cost goes to benchmarks/results/frontier/<proxy>.json (skipped
when present); accuracy is joined from benchmarks/results/seeds/*.json where those runs exist.
Writes the <!-- frontier --> section of BENCHMARKS.md and benchmarks/results/frontier.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import schedule_args  # noqa: E402
from common import ROOT, command_line, machine, write_section  # noqa: E402
from edge_speed import proxy_params_m, run_worker  # noqa: E402
from seeds import RESULTS as SEED_RESULTS  # noqa: E402
from seeds import bundle, bundle_key, groups, load_results, write_json  # noqa: E402
from stats import summarize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "frontier"
PLOT = ROOT / "benchmarks" / "results" / "frontier.png"
FLOAT16 = ROOT / "benchmarks" / "results" / "frozen_dtype.json"  # benchmarks/frozen_dtype.py
KEEPS = [0.1, 0.25, 0.5]
PROXIES = [(m, k) for m in ("fedpft", "fedot") for k in KEEPS] + [("full", 1.0)]
SHAPE = {"batch": 16, "labels": 13, "tokens": 64}  # the seeds benchmark's batch and simulate's --max-length
PARTITIONS = ["dirichlet:0.5", "iid"]


def proxy_shape(folder: Path) -> dict:
    """Layers and FFN neurons the proxy keeps, from its spec."""
    from fedpft.modeling.proxy import ProxySpec
    from fedpft.shared.manifest import ROLE_PROXY_SPEC, BundleManifest

    spec = ProxySpec.load(BundleManifest.load(folder).file_path(folder, ROLE_PROXY_SPEC))
    return {"layers": len(spec.layer_map), "fm_layers": spec.num_fm_layers, "layer_map": spec.layer_map, "ffn_sizes": spec.ffn_sizes}


def measure(method: str, keep: float, args) -> dict:
    from fedpft.shared.archive import pack_bundle

    key = bundle_key(method, keep)
    folder = args.work / "bundles" / key  # the seeds benchmark's (distilled) bundle when it exists
    if not (folder / "manifest.json").is_file():
        # distillation changes the proxy's values, not its shapes: the same bytes, step and memory
        folder = bundle(method, keep, argparse.Namespace(**{**vars(args), "distill_steps": 0}), args.work,
                        args.work / "cost-bundles" / key)
    runs = []
    for _ in range(args.repeats):  # a shared machine's noise only adds time: keep the fastest
        try:
            runs.append(run_worker("edge", str(folder), json.dumps(SHAPE), str(args.warmup), str(args.steps), "1", python=args.edge_python))
        except subprocess.TimeoutExpired:  # a worker paused by the machine's other users: the other repeats still count
            print(f"{key}: a worker ran past its time limit; repeat left out", flush=True)
    if not runs:
        raise RuntimeError(f"{key}: no edge worker finished")
    return {"method": method, "bundle": key, "distilled": folder.parent.name == "bundles",
            "bundle_bytes": len(pack_bundle(folder)), "proxy_params_m": proxy_params_m(folder), **proxy_shape(folder),
            "step_s": min(r["step_s"] for r in runs), "step_cpu_s": min(r["step_cpu_s"] for r in runs), "rss_mb": max(r["rss_mb"] for r in runs), "ort": runs[0].get("ort"),
            "shape": SHAPE, "threads": 1, "load": round(os.getloadavg()[0], 2), "command": command_line()}


def accuracy(seed_rows: list[dict], cost: dict, partition: str, rounds: int):
    """Last-round FM accuracy over the seeds run on this proxy (under any --ffn-keep that builds it)."""
    seeds: dict[int, float] = {}
    for keep in cost["ffn_keeps"] or [0.25]:  # the full FM ignores --ffn-keep; its runs say 0.25 or nothing
        for seed, c in groups(seed_rows, rounds, keep).get((partition, cost["method"]), {}).items():
            seeds.setdefault(seed, c[-1])
    return summarize(list(seeds.values()))


def section(costs: list[dict], seed_rows: list[dict], rounds: int, command: str) -> str:
    lines = [
        "## Frontier: FM accuracy against device cost, per proxy",
        "",
        f"Command: `{command}` — {machine()}. Cost from `benchmarks/results/frontier/*.json`: **bundle MB** = the packed "
        "bundle a device downloads once; **step** = median time of one local training step of the device trainer "
        f"(plain onnxruntime, one thread, batch {SHAPE['batch']} x {SHAPE['tokens']} tokens), wall and **CPU** seconds (the "
        "process's CPU time: what contention on a shared machine does not inflate), and **peak RSS** = that "
        "process's VmHWM (session load included), each the best of a few subprocess repeats on this 2-core machine "
        "(1-min load average in the last column: times are inflated when it exceeds 2). Accuracy: "
        f"last-round FM accuracy after {rounds} rounds, mean ± sd over the seeds run by benchmarks/seeds.py "
        "(`-` where none has finished yet). FedOT's layer count comes from --ffn-keep (the FedPFT proxy's weight budget "
        "in whole layers, rounded), so one FedOT row may stand for several --ffn-keep values. **float16 MB** = the same "
        "bundle prepared with `--frozen-dtype float16` (benchmarks/frozen_dtype.py: same step time and peak RSS, the "
        "proxy's predictions compared there; `-` where not measured).",
        "",
        "| proxy | --ffn-keep | layers (of FM) / FFN neurons per layer | params (M) | bundle MB | float16 MB | step s, wall / CPU | peak RSS MB | "
        + " | ".join(f"FM accuracy {p} (%)" for p in PARTITIONS) + " | load |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(PARTITIONS) + "---|",
    ]
    half = {r["bundle"]: r["float16"]["bundle_bytes"] for r in json.loads(FLOAT16.read_text())["rows"]} if FLOAT16.is_file() else {}
    for c in costs:
        keeps = "-" if c["ffn_keeps"] is None else ", ".join(f"{k:g}" for k in c["ffn_keeps"])
        accs = []
        for p in PARTITIONS:
            s = accuracy(seed_rows, c, p, rounds)
            accs.append("-" if s.n == 0 else f"{100 * s.mean:.1f}" + (f" ± {100 * s.sd:.1f}" if s.n > 1 else "") + f" (n={s.n})")
        ffn = "/".join(str(n) for n in c["ffn_sizes"])
        f16 = f"{half[c['bundle']] / 1e6:.1f}" if c["bundle"] in half else "-"
        lines.append(f"| {c['method']} | {keeps} | {c['layers']} of {c['fm_layers']} / {ffn} | "
                     f"{c['proxy_params_m']:.1f} | {c['bundle_bytes'] / 1e6:.1f} | {f16} | {c['step_s']:.3f} / {c['step_cpu_s']:.3f} | {c['rss_mb']:.0f} | "
                     + " | ".join(accs) + f" | {c['load']:.1f} |")
    lines += ["", "Costs measured by: " + ", ".join(f"`{c}`" for c in sorted({c["command"] for c in costs})) + " (with "
              "`FEDPFT_EDGE_PYTHON` a venv of `fedpft[edge]`; proxies not yet prepared by the seeds benchmark measured undistilled: "
              + ", ".join(c["bundle"] for c in costs if not c.get("distilled", True)) + ").",
              ]
    lines += seed0_lines(costs, seed_rows, rounds)
    other = sorted({r["command"] for r in seed_rows if r.get("ffn_keep") not in (None, 0.25) and r.get("command")})
    if other:  # the 0.25 runs are the seeds section's; these exist only for this table
        lines += ["", "Accuracy at the other --ffn-keep values from (under `nice -n 19`, `FEDPFT_EDGE_PYTHON` a venv of `fedpft[edge]`): "
                  + ", ".join(f"`{c}`" for c in other) + "."]
    lines += ["", "![FM accuracy and edge step time against bundle size](benchmarks/results/frontier.png)"]
    return "\n".join(lines)


def keep_tag(cost: dict) -> str:
    """The --ffn-keep values one proxy stands for ("0.1/0.25"; "" for the full FM)."""
    return "" if cost["ffn_keeps"] is None else "/".join(f"{k:g}" for k in cost["ffn_keeps"])


def seed0_lines(costs: list[dict], seed_rows: list[dict], rounds: int, seed: int = 0) -> list[str]:
    """The frontier on one seed (same partition, data and test samples for every proxy): the means
    above mix cells of 3 seeds with cells of 1, and one seed's spread between rounds is 1-2 points."""
    cells = []
    for c in costs:
        for keep in c["ffn_keeps"] or [0.25]:
            curve = groups(seed_rows, rounds, keep).get((PARTITIONS[0], c["method"]), {}).get(seed)
            if curve:
                cells.append(f"{c['method']} {keep_tag(c)}".rstrip() + f": {100 * curve[-1]:.1f} / {100 * sum(curve[-3:]) / len(curve[-3:]):.1f}")
                break
    if not cells:
        return []
    return ["", f"Seed {seed} alone, {PARTITIONS[0]} (the one seed every proxy has; last round / mean of the last 3 rounds, %; "
            f"one round on 800 test samples has a standard error of about 1.4 points): " + "; ".join(cells) + "."]


def plot(costs: list[dict], seed_rows: list[dict], rounds: int, path: Path) -> Path:
    """Left: FM accuracy (dirichlet:0.5, mean ± sd) against bundle MB; right: step time against bundle MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=120)
    colors = {"fedpft": "C0", "fedot": "C1", "full": "C2"}
    for method in colors:
        cs = sorted((c for c in costs if c["method"] == method), key=lambda c: c["bundle_bytes"])
        if not cs:
            continue
        mb = [c["bundle_bytes"] / 1e6 for c in cs]
        right.plot(mb, [c["step_cpu_s"] for c in cs], marker="o", color=colors[method], label=method)
        pts = [(m, accuracy(seed_rows, c, PARTITIONS[0], rounds), c) for m, c in zip(mb, cs)]
        pts = [(m, s, c) for m, s, c in pts if s.n > 0]
        if pts:
            left.errorbar([m for m, _, _ in pts], [100 * s.mean for _, s, _ in pts],
                          yerr=[0 if math.isnan(s.sd) else 100 * s.sd for _, s, _ in pts], marker="o", capsize=3,
                          color=colors[method], label=method)
            for m, st, c in pts:  # how many seeds each point stands for (one seed has no bar)
                left.annotate(", ".join(filter(None, [keep_tag(c), f"n={st.n}"])), (m, 100 * st.mean), fontsize=7, xytext=(4, -10), textcoords="offset points")
        for m, c in zip(mb, cs):
            right.annotate(f"{keep_tag(c)} {c['rss_mb']:.0f} MB", (m, c["step_cpu_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if not left.get_legend_handles_labels()[0]:
        left.text(0.5, 0.5, f"no seed run has reached round {rounds} yet", ha="center", va="center", transform=left.transAxes)
    left.set_title(f"FM accuracy, {PARTITIONS[0]}, round {rounds} (mean ± sd over n seeds)")
    left.set_xlabel("bundle MB (download to device)")
    left.set_ylabel("accuracy (%)")
    right.set_title("edge step, CPU seconds (label: --ffn-keep, peak RSS)")
    right.set_xlabel("bundle MB (download to device)")
    right.set_ylabel("CPU seconds per step")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def proxies() -> dict[str, tuple[str, list[float]]]:
    """bundle key -> (method, the --ffn-keep values that give that proxy)."""
    out: dict[str, tuple[str, list[float]]] = {}
    for method, keep in PROXIES:
        out.setdefault(bundle_key(method, keep), (method, []))[1].append(keep)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    schedule_args(ap, rounds=20)
    ap.add_argument("--broker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--repeats", type=int, default=2, help="subprocess repeats per proxy; fastest step, highest RSS kept")
    ap.add_argument("--edge-python", default=os.environ.get("FEDPFT_EDGE_PYTHON", sys.executable),
                    help="Python of a device venv (plain onnxruntime); default $FEDPFT_EDGE_PYTHON, else this Python")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "seeds", help="bundle cache shared with benchmarks/seeds.py")
    ap.add_argument("--report", action="store_true", help="only write the section and plot from the existing JSON")
    args = ap.parse_args()
    costs = []
    for key, (method, keeps) in proxies().items():
        path = RESULTS / f"{key}.json"
        if not path.is_file() and not args.report:
            c = measure(method, keeps[0], args)
            write_json(path, c)
            print(f"{key}: {c['bundle_bytes'] / 1e6:.1f} MB, step {c['step_s']:.3f}s, RSS {c['rss_mb']:.0f} MB "
                  f"(load {c['load']:.1f})", flush=True)
        if path.is_file():
            costs.append(dict(json.loads(path.read_text()), ffn_keeps=None if method == "full" else keeps))
    seed_rows = load_results(SEED_RESULTS)
    write_section("frontier", section(costs, seed_rows, args.rounds, command_line()))
    plot(costs, seed_rows, args.rounds, PLOT)


if __name__ == "__main__":
    main()
