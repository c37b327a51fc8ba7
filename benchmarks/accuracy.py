"""FedPFT vs full-FM FedLoRA vs FedOT (and two ablations) on a real FM and real data.

Runs `fedpft-cloud simulate` for each method with the same seed, partition and schedule
(MiniLM + debian-sections, Dirichlet non-IID), then writes the <!-- accuracy --> section of
BENCHMARKS.md: FM test accuracy, bytes per client per round, edge step time, wall time.

    python benchmarks/accuracy.py --broker mqtt://127.0.0.1:1883

After each run it also measures the proxy itself (with its last re-aligned FFN weights, if any)
carrying the final adapters on the same test samples: the FM-minus-proxy gap shows how much of the
adapters' value transfers from the model the devices trained to the model the owner deploys.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from common import ROOT, command_line, machine, write_section

METHODS = ["fedpft", "layeronly", "fedot", "noalign", "full"]
SAME_BUNDLE = {"layeronly": "fedpft"}  # same proxy and distillation; only the schedule differs
LABEL = {
    "full": "full-FM FedLoRA (devices get the whole FM; upper bound)",
    "fedpft": "FedPFT (compressed proxy + layer distillation + neuron alignment)",
    "layeronly": "FedPFT without neuron-level alignment",
    "fedot": "FedOT (layer-drop emulator, same budget, distilled)",
    "noalign": "compressed proxy, no distillation at all",
}


def update_stats(run: Path) -> tuple[float, float]:
    """Mean seconds per local step and mean steps per device-round, from the stored updates."""
    from safetensors import safe_open

    per_step, steps = [], []
    for f in sorted((run / "federation" / "updates").rglob("*.safetensors")):
        with safe_open(str(f), "numpy") as s:
            meta = s.metadata() or {}
        if meta.get("steps") and meta.get("seconds"):
            per_step.append(float(meta["seconds"]) / int(meta["steps"]))
            steps.append(int(meta["steps"]))
    return (float(np.median(per_step)) if per_step else float("nan"), float(np.mean(steps)) if steps else float("nan"))


@lru_cache(maxsize=None)
def proxy_accuracy(out: Path) -> float:
    """Accuracy of the run's proxy (+ its last alignment's FFN) with the run's final adapters."""
    import torch
    from safetensors.numpy import load_file

    from fedpft.cloud.bundle_model import load_proxy, set_ffn_state
    from fedpft.cloud.evaluate import evaluate_model
    from fedpft.shared.records import BatchMaker, batches, read_local_data
    from fedpft.modeling.adapters import load_adapter_state
    from fedpft.shared.manifest import verify_bundle

    bundle, fed = out / "bundle", out / "federation"
    state = json.loads((fed / "state.json").read_text())
    proxy, spec = load_proxy(bundle, with_adapters=True)
    if state.get("ffn"):
        set_ffn_state(proxy, {k: torch.from_numpy(v) for k, v in load_file(str(fed / state["ffn"])).items()})
    adapters = {k: torch.from_numpy(v) for k, v in load_file(str(fed / state["adapters"])).items()}
    load_adapter_state(proxy, adapters, spec.layer_map)
    manifest = verify_bundle(bundle)
    data = read_local_data(out / "eval.jsonl", manifest)
    evals = [(b.inputs, b.labels) for b in batches(data.records, BatchMaker(bundle, manifest), 64, data.skips)]
    return evaluate_model(proxy, evals)[0]


def alignments(rows: list[dict]) -> list[dict]:
    return [dict(r["alignment"], round=r["round"]) for r in rows if r.get("alignment")]


def simulate_config(method: str, args, out: Path, **options):
    """The SimulateConfig of one run of `method` with the benchmark's schedule (`args`, see
    schedule_args); `options` are further SimulateConfig fields (privacy flags, engine, data, seed)."""
    from fedpft.cloud.config import SimulateConfig

    fields = dict(out=out, clients=args.clients, rounds=args.rounds, partition=args.partition, method=method,
                  max_samples=args.max_samples, eval_samples=args.eval_samples, distill_steps=args.distill_steps,
                  align_every=args.align_every, align_steps=args.align_steps, lr=args.lr, seed=args.seed,
                  local_epochs=args.local_epochs, batch_size=args.batch_size, broker=args.broker)
    return SimulateConfig(**{**fields, **options})


def simulate_run(method: str, args, out: Path, **options) -> dict:
    """One `simulate` run; its wall time and 1-min load averages (start, end) into wall.json, and returned."""
    import os

    from fedpft.cloud.simulate import simulate

    cfg = simulate_config(method, args, out, **options)
    t0, load0 = time.time(), os.getloadavg()[0]
    simulate(cfg, show_progress=False)
    wall = {"wall": time.time() - t0, "load": os.getloadavg(), "load_start": load0}
    (out / "wall.json").write_text(json.dumps(wall))
    return wall


def run_method(method: str, args, out: Path, **options) -> dict:
    """One `simulate` run of `method` with the benchmark's schedule, read back by `reuse`."""
    simulate_run(method, args, out, **options)
    return reuse(method, out)


def schedule_args(ap: argparse.ArgumentParser, rounds: int = 10) -> None:
    """The accuracy benchmark's schedule (MiniLM + debian-sections), shared by the scripts that repeat it."""
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--max-samples", type=int, default=4000)
    ap.add_argument("--eval-samples", type=int, default=800)
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--align-every", type=int, default=3)
    ap.add_argument("--align-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    schedule_args(ap)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--broker", default=None, help="MQTT broker URL (default: the embedded one)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-accuracy"))
    args = ap.parse_args()
    results = []
    for m in args.methods:
        out = args.work / m
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == args.rounds:
            print(f"{m}: reusing {out}")
        elif (out / "federation").exists():
            shutil.rmtree(out / "federation")  # an unfinished run: start its rounds again (the bundle is kept)
        twin = args.work / SAME_BUNDLE.get(m, m) / "bundle"
        if m in SAME_BUNDLE and (twin / "manifest.json").is_file() and not (out / "bundle").exists():
            shutil.copytree(twin, out / "bundle")  # identical proxy: prepare once
        results.append(reuse(m, out) if (out / "report.md").is_file() and (out / "wall.json").is_file() else run_method(m, args, out))
        r = results[-1]
        print(f"{m}: final {100 * r['final']:.1f}% best {100 * r['best']:.1f}% wall {r['wall']:.0f}s", flush=True)
    lines = [
        "## Accuracy: FedPFT vs full-FM FedLoRA vs FedOT (real FM, real data)",
        "",
        f"Command: `{command_line()}` — {machine()}. all-MiniLM-L6-v2 (BERT, 6 layers) + debian-sections "
        f"(13 classes), {args.clients} real edge processes, partition {args.partition}, {args.max_samples} training samples "
        f"in all, {args.rounds} rounds x {args.local_epochs} local epoch (batch {args.batch_size}, lr {args.lr}), FM evaluated on "
        f"{args.eval_samples} test samples after every round. Proxies: FedPFT keeps layers 0 and 5 and 25% of the FFN "
        f"neurons elsewhere; FedOT keeps layers [0, 1, 4, 5] (same transformer-weight budget); both distilled "
        f"{args.distill_steps} steps on public.txt. Alignment (fedpft only) every {args.align_every} rounds, 50% of neurons frozen, "
        f"{args.align_steps} steps. Seed {args.seed} for all methods.",
        "",
        "| method | FM accuracy, last round | best round | proxy + final adapters | MB up / client / round | MB down / client / round | device round s / step (incl. session load + held-out eval) | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {LABEL[r['method']]} | {100 * r['final']:.1f}% | {100 * r['best']:.1f}% | {100 * r['proxy']:.1f}% | "
                     f"{r['up'] / 1e6:.2f} | {r['down'] / 1e6:.2f} | {r['step']:.3f} | {r['wall'] / 60:.1f} min |")
    lines += ["", "FM accuracy per round (%):", "", "| method | " + " | ".join(str(i + 1) for i in range(args.rounds)) + " |",
              "|---|" + "---|" * args.rounds]
    for r in results:
        lines.append(f"| {r['method']} | " + " | ".join(f"{100 * a:.1f}" for a in r["curve"]) + " |")
    aligned = [(r["method"], a) for r in results for a in r["alignments"]]
    if aligned:
        lines += ["", "What each neuron-level alignment did (layer loss: relative MSE of the compressed layers' outputs, proxy vs FM, "
                  "both carrying that round's aggregated adapters, on 8 held-out public batches; proxy accuracy on the test samples):", "",
                  "| method | after round | layer loss before -> after | proxy accuracy before -> after | mean APoZ of compressed layers |",
                  "|---|---|---|---|---|"]
        for m, a in aligned:
            lines.append(f"| {m} | {a['round'] + 1} | {a['gap_before']:.4f} -> {a['gap_after']:.4f} | "
                         f"{100 * a['proxy_accuracy_before']:.1f}% -> {100 * a['proxy_accuracy_after']:.1f}% | "
                         f"{', '.join(f'{v:.2f}' for v in a['mean_apoz'].values())} |")
    lines += ["", "Bytes down include the one-time bundle download in round 1 (the proxy checkpoint: the full FM's for `full`).",
              "", "![FM accuracy per round, every method on one axis](benchmarks/results/accuracy.png)"]
    write_section("accuracy", "\n".join(lines))
    plot(results, ROOT / "benchmarks" / "results" / "accuracy.png")  # committed beside BENCHMARKS.md
    print("\n".join(lines))


def reuse(method: str, out: Path) -> dict:
    """The figures of a finished run, read back from its folder."""
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    accs = [r["fm_accuracy"] for r in rows if r.get("fm_accuracy") is not None]
    step, steps = update_stats(out)
    n = max(1, sum(r["clients"] for r in rows))
    wall = json.loads((out / "wall.json").read_text())["wall"] if (out / "wall.json").is_file() else float("nan")
    return {"method": method, "final": accs[-1], "best": max(accs), "curve": accs, "up": sum(r["bytes_up"] for r in rows) / n,
            "down": sum(r["bytes_down"] for r in rows) / n, "step": step, "steps": steps, "wall": wall,
            "proxy": safe_proxy_accuracy(out), "alignments": alignments(rows)}


def safe_proxy_accuracy(out: Path) -> float:
    try:
        return proxy_accuracy(out)
    except Exception as exc:  # a diagnostic column must not cost the finished runs
        print(f"{out}: proxy accuracy not measured: {type(exc).__name__}: {exc}", flush=True)
        return float("nan")


def plot(results: list[dict], path: Path) -> None:
    from fedpft.cloud.report import plot_accuracy

    series = {r["method"]: [{"round": i, "fm_accuracy": a} for i, a in enumerate(r["curve"])] for r in results}
    plot_accuracy([], path, "FM test accuracy per round, by method", series)


if __name__ == "__main__":
    main()
