"""Float16 storage of frozen weights (`prepare --frozen-dtype float16`): what it saves, what it changes.

    nice -n 19 python benchmarks/frozen_dtype.py --work runs/seeds

For each distilled bundle the seeds benchmark prepared under --work/bundles (float32), build its
float16 twin from the very same proxy (`write_bundle(..., frozen_dtype="float16")`, what `prepare`
does after distillation; same seed, so the same LoRA initialisation, the head rounded with the
proxy), then measure, side by side:

- the packed bundle a device downloads (bytes), both ways;
- one local training step of the device trainer on plain onnxruntime in a subprocess of the edge
  venv (median step time, peak RSS: the upcast on load must not cost memory after it);
- what the proxy predicts with trained adapters - the last global adapters of a finished seeds run
  on that bundle (else the bundle's initial ones) - over the whole test set, through the device's
  own eval graph: accuracy both ways, argmax agreement and the largest logit difference.

Writes benchmarks/results/frozen_dtype.json and the <!-- frozen_dtype --> section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, machine, write_section  # noqa: E402
from edge_speed import run_worker  # noqa: E402
from frontier import SHAPE  # noqa: E402  (the frontier's step shape, so the two tables time the same step)

RESULTS = ROOT / "benchmarks" / "results" / "frozen_dtype.json"


def float16_twin(src: Path, out: Path) -> Path:
    """The bundle `prepare --frozen-dtype float16` would have written from src's proxy."""
    from fedpft.cloud.bundle_model import load_proxy
    from fedpft.cloud.config import load_prepare_config
    from fedpft.export.bundle import write_bundle
    from fedpft.modeling.families import resolve_model_id
    from fedpft.shared.manifest import BundleManifest

    if (out / "manifest.json").is_file():
        return out
    manifest = BundleManifest.load(src)
    prep = load_prepare_config(src, manifest)
    proxy, spec = load_proxy(src, with_adapters=False)
    config = prep.model_dump(mode="json", exclude={"signing_key", "device"}) | {"frozen_dtype": "float16"}
    write_bundle(out, proxy, spec, manifest.labels, fm_id=manifest.fm_id, fm_source=resolve_model_id(prep.model),
                 prepare_config=config, max_length=prep.max_length, lora_rank=prep.lora_rank, lora_alpha=prep.lora_alpha,
                 seed=prep.seed, bundle_version=manifest.bundle_version, frozen_dtype="float16")
    return out


def trained_adapters(work: Path, key: str) -> tuple[Path | None, dict | None]:
    """The last global adapters of a finished seeds run on bundle `key` (None if there is none yet)."""
    from fedpft.edge.session import load_adapters

    for run in sorted((work / "runs").glob("*")):
        cfg = run / "simulate_config.json"
        ckpts = sorted((run / "federation" / "checkpoints").glob("adapters_round_[0-9]*.safetensors"))
        if cfg.is_file() and ckpts and (run / "bundle").resolve().name == key:
            return ckpts[-1], load_adapters(ckpts[-1])
    return None, None


def predictions(bundle: Path, adapters: dict | None, test: Path) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the device's eval graph over the test set."""
    from fedpft.edge.session import open_session
    from fedpft.shared.records import BatchMaker, Skips, batches, read_local_data

    session = open_session(bundle, threads=1)
    if adapters is not None:
        session.set_adapters(adapters)
    data = read_local_data(test, session.manifest)
    maker = BatchMaker(bundle, session.manifest)
    logits, labels = [], []
    for b in batches(data.records, maker, 64, Skips()):
        logits.append(session.predict(b))
        labels.append(b.labels)
    return np.concatenate(logits), np.concatenate(labels)


def measure(src: Path, args) -> dict:
    from fedpft.shared.archive import pack_bundle

    twin = float16_twin(src, args.work / "bundles-f16" / src.name)
    row: dict = {"bundle": src.name, "load": round(os.getloadavg()[0], 2)}
    ckpt, adapters = trained_adapters(args.work, src.name)
    row["adapters"] = str(ckpt.relative_to(args.work)) if ckpt else "initial"
    out = {}
    for dtype, folder in (("float32", src), ("float16", twin)):
        step = run_worker("edge", str(folder), json.dumps(SHAPE), "2", str(args.steps), "1", python=args.edge_python)
        out[dtype] = (folder, step, *predictions(folder, adapters, args.work / "data" / "test.jsonl"))
        row[dtype] = {"bundle_bytes": len(pack_bundle(folder)), "step_s": step["step_s"], "step_cpu_s": step["step_cpu_s"],
                      "rss_mb": step["rss_mb"], "accuracy": float((out[dtype][2].argmax(1) == out[dtype][3]).mean())}
    a, b = out["float32"][2], out["float16"][2]
    row["n"] = int(len(a))
    row["agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    row["max_logit_diff"] = float(np.abs(a - b).max())
    row["mean_logit_diff"] = float(np.abs(a - b).mean())
    return row


def section(rows: list[dict], command: str) -> str:
    lines = [
        "## Frozen weights stored as float16 (`prepare --frozen-dtype float16`)",
        "",
        f"Command: `{command}` — {machine()}. Each float16 bundle is built from the same distilled proxy as the "
        "seeds benchmark's float32 one (benchmarks/results/frozen_dtype.json). **MB** = the packed bundle a device "
        "downloads. **step / RSS** = one local step of the device trainer (plain onnxruntime, one thread, batch 16 x 64 "
        "tokens) and that process's peak RSS. **Accuracy** = the proxy's own, through the device's eval graph, over the "
        "whole test set, with the adapters named (the last global adapters of a finished seeds run on that proxy); "
        "**agree** = share of test samples whose predicted class is the same both ways. For a FedPFT proxy the "
        "bundle's FFN weights are used, not the run's re-aligned ones: the comparison is of storage, on one model.",
        "",
        "| proxy | adapters | MB float32 → float16 | step s (CPU) f32 / f16 | peak RSS MB f32 / f16 | proxy accuracy f32 / f16 (%) | agree (%) | max / mean abs logit diff | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, h = r["float32"], r["float16"]
        lines.append(
            f"| {r['bundle']} | {r['adapters']} | {f['bundle_bytes'] / 1e6:.1f} → {h['bundle_bytes'] / 1e6:.1f} "
            f"({h['bundle_bytes'] / f['bundle_bytes']:.2f}x) | {f['step_cpu_s']:.3f} / {h['step_cpu_s']:.3f} | "
            f"{f['rss_mb']:.0f} / {h['rss_mb']:.0f} | {100 * f['accuracy']:.2f} / {100 * h['accuracy']:.2f} (n={r['n']}) | "
            f"{100 * r['agreement']:.2f} | {r['max_logit_diff']:.2g} / {r['mean_logit_diff']:.2g} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "seeds", help="the seeds benchmark's folder (bundles, data, runs)")
    ap.add_argument("--bundles", nargs="*", default=None, help="bundle names under --work/bundles (default: all)")
    ap.add_argument("--steps", type=int, default=5, help="timed device steps per bundle (median)")
    ap.add_argument("--edge-python", default=os.environ.get("FEDPFT_EDGE_PYTHON", sys.executable),
                    help="Python of a device venv (plain onnxruntime); default $FEDPFT_EDGE_PYTHON, else this Python")
    ap.add_argument("--report", action="store_true", help="only write the section from the existing JSON")
    args = ap.parse_args()
    old = {r["bundle"]: r for r in json.loads(RESULTS.read_text())["rows"]} if RESULTS.is_file() else {}
    if not args.report:
        names = args.bundles or sorted(p.name for p in (args.work / "bundles").iterdir() if (p / "manifest.json").is_file())
        for name in names:
            old[name] = measure(args.work / "bundles" / name, args)
            r = old[name]
            print(f"{name}: {r['float32']['bundle_bytes'] / 1e6:.1f} -> {r['float16']['bundle_bytes'] / 1e6:.1f} MB, "
                  f"accuracy {r['float32']['accuracy']:.4f} / {r['float16']['accuracy']:.4f}, agree {r['agreement']:.4f}", flush=True)
        command = command_line()
        RESULTS.write_text(json.dumps({"command": command, "rows": sorted(old.values(), key=lambda r: r["bundle"])}, indent=1) + "\n")
    saved = json.loads(RESULTS.read_text())
    write_section("frozen_dtype", section(saved["rows"], saved["command"]))


if __name__ == "__main__":
    main()
