"""`prepare`'s model work on a chosen `--device`: FM load, compression, layer distillation, FM evaluation.

    python benchmarks/prepare_device.py --device cuda --json gpu.json     # on a GPU machine
    python benchmarks/prepare_device.py --device cpu --json cpu.json      # here
    python benchmarks/prepare_device.py --table gpu.json cpu.json --write # the <!-- prepare_device --> section

Raw rows of the committed table: benchmarks/results/prepare_device_*.json.

The same code path as `fedpft-cloud prepare --device ...` (cloud/prepare.py's load_fm, build_proxy,
make_public_stream and cloud/distill.py's distill under the device's autocast policy), stopped before
the bundle is written: the ONNX/ORT export always runs on CPU from an fp32 copy, and onnxruntime-training
(cp311 x86_64 wheels only, 299 MB) is not on GPU machines; `prepare_bench.py` times the whole command.
Both models use random weights of the real shapes (no model hub; timings do not depend on the values):
ViTConfig() defaults (ViT-base/16, 224 px) and all-MiniLM-L6-v2's config with its real tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

from common import command_line, vit_base_folder, write_section

MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_shape_folder(folder: Path, source: Path | None) -> str:
    """all-MiniLM-L6-v2's config and tokenizer with random weights (so no 90 MB checkpoint travels)."""
    from transformers import AutoConfig

    from fedpft.modeling.families import model_from_config, offline_minilm_path

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        src = Path(source or offline_minilm_path() or "")
        folder.mkdir(parents=True, exist_ok=True)
        for name in MINILM_FILES:
            if not (folder / name).is_file():
                shutil.copy(src / name, folder / name)
        config = AutoConfig.from_pretrained(str(folder))
        model_from_config(config, seed=0).save_pretrained(str(folder))
    return str(folder)


def noise_images(folder: Path, n: int, size: int = 224) -> Path:
    """Public images for ViT distillation: random RGB PNGs (content does not change the cost)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(name: str, model: str, public: Path, steps: int, eval_batches: int, cfg_kw: dict, device_name: str) -> dict:
    import numpy as np
    import torch

    from fedpft.cloud import prepare as P
    from fedpft.cloud.evaluate import evaluate_model
    from fedpft.shared.config import PrepareConfig

    with tempfile.TemporaryDirectory() as scratch:
        cfg = PrepareConfig(model=model, out=Path(scratch) / "out", public_data=public, distill_steps=steps,
                            device=device_name, **cfg_kw)
        device = P.resolve_device(cfg.device)
        config = P.validate(cfg)
        kind = P.family_of(config).kind
        t = {}
        t0 = time.perf_counter()
        fm = P.load_fm(P.resolve_model_id(cfg.model), cfg.resolved_labels(), cfg.dropout, cfg.seed)
        t["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        proxy, spec = P.build_proxy(fm, cfg)
        t["compress_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fm.to(device), proxy.to(device)
        sync(device)
        t["to_device_s"] = time.perf_counter() - t0
        stream = P.make_public_stream(cfg, kind, config, Path(scratch))
        marks: list[float] = []

        def on_step(i, loss):
            sync(device)
            marks.append(time.perf_counter())

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        res = P.distill(fm, proxy, spec, stream, cfg.distill_steps, cfg.distill_lr, cfg.distill_alpha, on_step=on_step)
        t["distill_s"] = time.perf_counter() - t0
        t["first_step_s"] = marks[0] - t0
        t["step_s"] = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
        t["distill_loss"] = f"{res.first:.3f} -> {res.last:.3f}"
        # FM evaluation (serve's per-round cost): forward passes under the "inference" autocast
        batches = [next(stream) for _ in range(eval_batches)]
        labels = np.zeros(cfg.batch_size, dtype=np.int64)
        feed = [({k: v.numpy() for k, v in b.items()}, labels[: len(next(iter(b.values())))]) for b in batches]
        evaluate_model(fm, feed[:1])  # warm-up (kernels, autotuning)
        sync(device)
        t0 = time.perf_counter()
        evaluate_model(fm, feed)
        sync(device)
        t["eval_samples_per_s"] = eval_batches * cfg.batch_size / (time.perf_counter() - t0)
        t["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
        return {"model": name, "device": device_name, "hardware": hw, "steps": steps, "batch": cfg.batch_size,
                "load_avg": os.getloadavg()[0], "torch": torch.__version__, "python": platform.python_version(), **t}


def measure(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from fedpft.shared.datasets import materialize

        text = materialize(tmp / "data") / "public.txt"
        images = noise_images(tmp / "images", 4 * args.batch)
        common = {"batch_size": args.batch, "seed": 0}
        vit = vit_base_folder(tmp / "vit-base")
        rows.append(time_model("ViT-base shape", vit, images, args.vit_steps, args.eval_batches,
                               {"num_labels": 10, **common}, args.device))
        print(json.dumps(rows[-1]), flush=True)
        minilm = minilm_shape_folder(args.minilm_folder or tmp / "minilm", args.minilm_source)
        rows.append(time_model("MiniLM shape", minilm, text, args.minilm_steps, args.eval_batches,
                               {"num_labels": 13, "max_length": 64, **common}, args.device))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(paths: list[Path]) -> str:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())]
    lines = [
        "## `prepare` on a GPU vs this machine's CPU: FM load, compression, layer distillation, FM evaluation",
        "",
        f"Command: `{command_line()}`, from JSON written by `python benchmarks/prepare_device.py --device DEVICE --json F` "
        "on each machine. Same code path as `prepare --device`, stopped before the bundle is written (the ONNX/ORT "
        "export is CPU-only by design: `prepare_bench.py` times the whole command). Random weights of the real shapes: "
        "ViTConfig() (ViT-base/16 at 224 px) and all-MiniLM-L6-v2's config with its tokenizer (64 tokens). "
        "Distillation under the device's autocast policy (bf16 on CUDA, fp32 master weights; fp32 on CPU).",
        "",
        "| model | device | torch | load avg | load FM s | compress s | to device s | distill steps x batch | first step s | s / step | distill total s | FM eval samples/s | GPU peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['gpu_peak_mb']:.0f}" if r.get("gpu_peak_mb") else "-"
        lines.append(
            f"| {r['model']} | {r['hardware']} | {r['torch']} | {r['load_avg']:.1f} | {r['load_s']:.1f} | {r['compress_s']:.2f} | "
            f"{r['to_device_s']:.2f} | {r['steps']} x {r['batch']} | {r['first_step_s']:.2f} | {r['step_s']:.3f} | "
            f"{r['distill_s']:.1f} | {r['eval_samples_per_s']:.0f} | {peak} |"
        )
    lines.append("")
    for cpu in (r for r in rows if r["device"] == "cpu"):
        gpu = next((g for g in rows if g["model"] == cpu["model"] and g["device"].startswith("cuda") and g["steps"] == cpu["steps"]), None)
        if gpu is None:
            continue
        cores = int(re.search(r"(\d+) cores", cpu["hardware"]).group(1))
        shared = (f" The CPU row ran while the machine was shared (1-min load average {cpu['load_avg']:.1f} on {cores} cores): "
                  "its times are inflated and these ratios overstate the GPU's lead.") if cpu["load_avg"] > cores else ""
        lines.append(f"- {cpu['model']}, same {cpu['steps']} steps: a distillation step {cpu['step_s'] / gpu['step_s']:.0f}x faster "
                     f"on the GPU, FM evaluation {gpu['eval_samples_per_s'] / cpu['eval_samples_per_s']:.0f}x.{shared}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps")
    ap.add_argument("--vit-steps", type=int, default=20, help="ViT-base distillation steps")
    ap.add_argument("--minilm-steps", type=int, default=100, help="MiniLM distillation steps")
    ap.add_argument("--batch", type=int, default=16, help="distillation and evaluation batch size")
    ap.add_argument("--eval-batches", type=int, default=8, help="FM evaluation batches timed")
    ap.add_argument("--minilm-source", type=Path, default=None, help="folder with all-MiniLM-L6-v2's config + tokenizer")
    ap.add_argument("--minilm-folder", type=Path, default=None, help="where the random-weight MiniLM-shape model is kept")
    ap.add_argument("--json", type=Path, help="write the measured rows here")
    ap.add_argument("--table", type=Path, nargs="+", help="JSON files to render instead of measuring")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    if args.table:
        text = table(args.table)
        print(text)
        if args.write:
            write_section("prepare_device", text)
        return
    rows = measure(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
