"""FM accuracy under secure aggregation and client-level DP (issue 14), on the accuracy benchmark's task.

Runs `fedpft-cloud simulate` (real MiniLM + debian-sections, Dirichlet non-IID, one prepared bundle
reused by every run) plain, with --secure-agg, and with --secure-agg + DP at each --noise
multiplier, then writes the <!-- privacy_accuracy --> section of BENCHMARKS.md:

    python benchmarks/privacy_accuracy.py --data /work/shared/data/debian-sections

The DP clip C is, unless --clip is given, the median over rounds of the plain run's typical
change norm (the lower median of the devices' adapter-change L2 norms, `typical_norm` in its
metrics.jsonl): about half of the devices are clipped, the usual choice (Andrew et al. 2021).
Epsilon is the run's own (`dp_epsilon` at --dp-delta, q = devices per round / fleet = 1 here);
the same Z and rounds at 1,000 devices per round of a 10,000-device fleet (q = 0.1) comes from
the accountant in cloud/dp.py without a run, charging alignment rounds at the run's multiplier.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import reuse, run_method  # noqa: E402
from common import command_line, machine, write_section  # noqa: E402

SECTION = "privacy_accuracy"


def variants(noises: list[float], repeat_plain: bool) -> list[tuple[str, dict]]:
    """(name, privacy options without the clip) in run order: plain first (it sets the clip); a
    second plain run, same seed, shows the run-to-run spread (the devices' dropout is not seeded)."""
    out = [("plain", {}), ("secagg", {"secure_agg": True})]
    out += [(f"dp-z{z:g}", {"secure_agg": True, "dp_noise": z}) for z in noises]
    return out + ([("plain-again", {})] if repeat_plain else [])


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def clip_from(plain: Path) -> float:
    norms = [r["typical_norm"] for r in rows_of(plain) if r.get("typical_norm") is not None]
    if not norms:
        raise SystemExit(f"{plain}: no typical_norm in metrics.jsonl; give --clip")
    return float(np.median(norms))


def coordinates(run: Path) -> int:
    from safetensors.numpy import load_file

    state = json.loads((run / "federation" / "state.json").read_text())
    return sum(v.size for v in load_file(str(run / "federation" / state["adapters"])).values())


def finished(out: Path, rounds: int) -> bool:
    return (out / "wall.json").is_file() and (out / "report.md").is_file() and len(rows_of(out)) == rounds


def run_all(args) -> tuple[list[dict], float]:
    shared_bundle = args.work / "plain" / "bundle"
    results, clip = [], args.clip
    for name, opts in variants(args.noise, args.repeat_plain):
        out = args.work / name
        if "dp_noise" in opts:
            clip = clip if clip is not None else clip_from(args.work / "plain")
            opts = dict(opts, dp_clip=clip, dp_mode=args.dp_mode, dp_delta=args.delta)
        if not finished(out, args.rounds):
            if out.exists():
                shutil.rmtree(out)  # an unfinished run starts again (simulate refuses a used --out)
            if (shared_bundle / "manifest.json").is_file() and name != "plain":
                shutil.copytree(shared_bundle, out / "bundle")  # same proxy for every run: prepare once
            run_method("fedpft", args, out, engine=args.engine, data=args.data, **opts)
        else:
            print(f"{name}: reusing {out}", flush=True)
        r = dict(reuse("fedpft", out), name=name, opts=opts, rows=rows_of(out),
                 load=json.loads((out / "wall.json").read_text()).get("load"))
        results.append(r)
        print(f"{name}: final {100 * r['final']:.1f}% best {100 * r['best']:.1f}% wall {r['wall']:.0f}s", flush=True)
    return results, clip


def epsilons(r: dict, delta: float, large_q: float, scale: float) -> tuple[float, float, float, float] | None:
    """(epsilon the run reports, its q, epsilon of the same rounds at q = large_q, and at q = large_q
    with every multiplier x scale: the same noise std on the mean update), or None without DP."""
    from fedpft.cloud import dp

    dp_rows = [x for x in r["rows"] if x.get("dp_epsilon") is not None]
    if not dp_rows:
        return None
    mults = [x["dp_multiplier"] for x in dp_rows]
    return (dp_rows[-1]["dp_epsilon"], dp_rows[-1]["dp_q"], dp.epsilon([(large_q, z) for z in mults], delta),
            dp.epsilon([(large_q, z * scale) for z in mults], delta))


def table(results: list[dict], clip: float | None, args) -> list[str]:
    large_q, scale = args.large_per_round / args.large_fleet, args.large_per_round / args.clients
    lines = [
        f"| run | FM accuracy, last round | best round | epsilon at delta {args.delta:g} after the run | q | Z | C | "
        f"noise std on the mean update, per coordinate | epsilon, same Z and rounds at {args.large_per_round:,}/round of "
        f"{args.large_fleet:,} (q = {large_q:g}) | Z at {args.large_per_round:,}/round with this run's noise std on the mean "
        f"(Z x {scale:g}) -> its epsilon | wall time | load average (1/5/15 min) at the end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        z = r["opts"].get("dp_noise")
        c = r["opts"].get("dp_clip")
        eps = epsilons(r, args.delta, large_q, scale)
        if eps:
            e_run, q, e_large, e_same_std = (_eps(eps[0]), f"{eps[1]:g}", _eps(eps[2]), f"{z * scale:g} -> {_eps(eps[3])}")
        else:
            e_run, q, e_large, e_same_std = "- (no DP)", "-", "-", "-"
        std = f"{z * c / args.clients:.3g}" if z else "0"
        load = "/".join(f"{v:.1f}" for v in r["load"]) if r.get("load") else "-"
        mode = f" ({args.dp_mode} DP)" if z else ""
        lines.append(f"| {r['name']}{mode} | {100 * r['final']:.1f}% | {100 * r['best']:.1f}% | {e_run} | {q} | "
                     f"{z if z else '-'} | {f'{c:.3g}' if c else '-'} | {std} | {e_large} | {e_same_std} | "
                     f"{r['wall'] / 60:.1f} min | {load} |")
    lines += ["", "FM accuracy per round (%):", "", "| run | " + " | ".join(str(i + 1) for i in range(args.rounds)) + " |",
              "|---|" + "---|" * args.rounds]
    lines += [f"| {r['name']} | " + " | ".join(f"{100 * a:.1f}" for a in r["curve"]) + " |" for r in results]
    return lines


def _eps(e: float) -> str:
    # under ~0.01 the RDP bound is set by its largest order, not by the noise (as in dp_budget.py)
    return "< 0.01" if e < 0.01 else f"{e:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--max-samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=400)
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--align-every", type=int, default=None, help="default: simulate's (halfway through the run)")
    ap.add_argument("--align-steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0], help="DP noise multipliers Z")
    ap.add_argument("--repeat-plain", action="store_true", help="a second plain run last: the run-to-run spread")
    ap.add_argument("--clip", type=float, default=None, help="DP clip C (default: the plain run's median typical norm)")
    ap.add_argument("--dp-mode", default="distributed", choices=["central", "distributed"])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--large-per-round", type=int, default=1000)
    ap.add_argument("--large-fleet", type=int, default=10_000)
    ap.add_argument("--engine", default="virtual", choices=["processes", "virtual"])
    ap.add_argument("--broker", default=None, help="MQTT broker URL (--engine processes; default: the embedded one)")
    ap.add_argument("--data", type=Path, default=None, help="default: the shipped debian-sections")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-privacy"))
    args = ap.parse_args()
    results, clip = run_all(args)
    text = "\n".join([
        "## Accuracy under secure aggregation and differential privacy (real FM, real data)", "",
        f"Command: `{command_line()}` — {machine()}. all-MiniLM-L6-v2 + debian-sections, method fedpft (alignment "
        f"halfway unless --align-every; {args.align_steps} steps), {args.clients} clients on the {args.engine} engine, "
        f"partition {args.partition}, {args.max_samples} training samples, {args.rounds} rounds x {args.local_epochs} local "
        f"epoch (batch {args.batch_size}, lr {args.lr}), FM evaluated on {args.eval_samples} test samples after every round, "
        f"proxy distilled {args.distill_steps} steps, one bundle for all runs, seed {args.seed}. DP runs: --secure-agg "
        f"--dp-mode {args.dp_mode} (each device adds its share of the noise under the masks), clip C = "
        f"{f'{clip:.3g}' if clip else '-'} ({'given' if args.clip else 'median over rounds of the plain run’s typical change norm'}); "
        f"devices then weigh 1. Epsilon: RDP accountant of cloud/dp.py; alignment rounds are charged at Z/sqrt(2). "
        f"The plain run's wall time includes preparing the bundle; the others copy it. The adapters have {coordinates(args.work / 'plain'):,} "
        "coordinates: the noise's L2 norm on the mean update is the per-coordinate std x their square root, against a "
        "clipped mean of norm at most C. Plain and secagg runs can differ by more than the fixed-point error: the training "
        "graph's Dropout nodes carry no seed, so two runs with the same seed train differently (--repeat-plain measures that spread).", "",
        *table(results, clip, args),
    ])
    write_section(SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
