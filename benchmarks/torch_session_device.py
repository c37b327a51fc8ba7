"""The virtual engine's torch trainer on a GPU against the edge's own ORT trainer (issue 15).

    python benchmarks/torch_session_device.py make DIR                          # tiny BERT/ViT bundles and data (the tests')
    python benchmarks/torch_session_device.py run DIR --device cuda --json F    # where the GPU is

`--virtual-trainer torch` (sim/torch_session.py) is what `simulate --engine virtual --device cuda`
picks; tests/test_torch_session.py holds it to the ORT path on CPU. This runs the same check on
another device: per bundle, 6 AdamW steps (lr 1e-2) from the same random adapters on the same
batches, by the edge's ORT session (CPU) and by the torch session on --device in fp32 and in bf16.
Printed and written: the largest relative loss difference, the largest adapter difference (the
test's fp32 bound: 2e-5), bf16's adapter difference over how far fp32 moved them (bound 0.4), and
the time per step after the first. `make` needs the cloud install (prepare); `run` needs torch,
transformers and peft (the bundle's proxy) and any onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS, LR = 6, 1e-2
ATOL_FP32, BF16_OF_MOVED = 2e-5, 0.4  # tests/test_torch_session.py


def make(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_bundle, tiny_model_dir, write_image_data, write_text_data

    for family in ("bert", "vit"):
        model = tiny_model_dir(folder / f"model-{family}", family)
        make_bundle(str(model), folder / f"tiny-{family}")
    write_text_data(folder / "text.jsonl", n=40, seed=3)
    write_image_data(folder / "images", per_class=6, seed=3)


def batches_of(bundle: Path, data: Path):
    from fedpft.shared.manifest import verify_bundle
    from fedpft.shared.records import BatchMaker, batches, epoch_order, read_local_data

    manifest = verify_bundle(bundle, device_only=True)
    local = read_local_data(data, manifest, 256 * 1024)
    order = epoch_order(len(local.records), 0, 0)
    return manifest, list(batches(local.records, BatchMaker(bundle, manifest, 8192), 8, local.skips, order))


def train(session, batches, adapters, sync=lambda: None):
    session.set_adapters(adapters)
    session.set_learning_rate(LR)
    outs, times = [], []
    for b in (batches * STEPS)[:STEPS]:
        t0 = time.perf_counter()
        outs.append(session.train_step(b))
        sync()
        times.append(time.perf_counter() - t0)
    return [o.loss for o in outs], session.adapters(), float(np.median(times[1:]))


def run(folder: Path, device: str) -> list[dict]:
    import torch

    from fedpft.edge.session import open_session
    from fedpft.sim.torch_session import TorchSession

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for family, data in (("bert", folder / "text.jsonl"), ("vit", folder / "images")):
        bundle = folder / f"tiny-{family}"
        manifest, batches = batches_of(bundle, data)
        rng = np.random.default_rng(1)  # B != 0, so every LoRA path carries gradient
        start = {t.key: (0.05 * rng.standard_normal(t.shape)).astype(np.float32) for t in manifest.trainable}
        ort_loss, ort_ad, ort_s = train(open_session(bundle, threads=1), batches, start)
        row = {"bundle": f"tiny-{family}", "device": device, "ort_step_s": ort_s}
        moved = max(float(np.abs(ort_ad[k] - start[k]).max()) for k in start)
        for precision in ("fp32", "bf16"):
            loss, ad, s = train(TorchSession(bundle, manifest, device=device, precision=precision, threads=1), batches, start, sync)
            diff = max(float(np.abs(ad[k] - ort_ad[k]).max()) for k in start)
            row[precision] = {"loss_rel_diff": max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(loss, ort_loss)),
                              "adapters_max_diff": diff, "of_moved": diff / moved, "step_s": s}
        row["fp32_within_test_bound"] = row["fp32"]["adapters_max_diff"] <= ATOL_FP32
        row["bf16_within_test_bound"] = row["bf16"]["of_moved"] <= BF16_OF_MOVED
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["make", "run"])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--device", default="cuda", help="torch device of the torch session (the ORT session runs on CPU)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here, with the machine's versions")
    args = ap.parse_args()
    if args.mode == "make":
        make(args.folder)
        return 0
    import onnxruntime
    import torch

    rows = run(args.folder, args.device)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.json:
        args.json.write_text(json.dumps({"machine": meta, "rows": rows}, indent=1))
    return 0 if all(r["fp32_within_test_bound"] and r["bf16_within_test_bound"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
