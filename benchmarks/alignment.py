"""Does neuron-level alignment make proxy-trained adapters transfer better to the FM?

A paired, controlled test on a finished `simulate --method fedpft` run (e.g. the accuracy
benchmark's). Starting point: the run's aggregated adapters after round R and the activation
statistics its devices reported that round — exactly what the cloud's alignment saw. For each
variant of the proxy (as prepared; the run's own alignment; re-aligned here with other settings),
the same adapters are trained further on that proxy for --steps steps, on the same pooled training
batches in the same order with the same dropout seed, then plugged into the FM and evaluated on the
whole test split. The variants differ only in the proxy's FFN weights, so what differs in the
FM's accuracy is the alignment's doing (plus the noise of one training order: --orders repeats
the whole comparison with other orders). `fm` trains the adapters on the FM itself: the bound.

    python benchmarks/alignment.py --run runs/bench-accuracy/fedpft
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from common import command_line, machine, write_section

VARIANTS = ["prepared", "run", "align300", "alignall300", "kl", "kl300", "klall300", "grad", "mix", "fm"]
LABEL = {
    "prepared": "proxy as prepared (layer-level distillation only)",
    "run": "the run's own alignment (its objective, 50% most-used neurons frozen, run's steps)",
    "align300": "re-aligned, hidden-mse: 50% frozen, 300 steps",
    "alignall300": "re-aligned, hidden-mse: nothing frozen, 300 steps",
    "kl": "re-aligned, logit-kl: 50% frozen, the run's steps",
    "kl300": "re-aligned, logit-kl: 50% frozen, 300 steps",
    "klall300": "re-aligned, logit-kl: nothing frozen, 300 steps",
    "grad": "re-aligned, lora-grad: 50% frozen, the run's steps",
    "mix": "re-aligned, hidden-mse+lora-grad: 50% frozen, the run's steps",
    "fm": "adapters trained on the FM itself (bound)",
}
# re-alignments done here: variant -> (objective, share frozen, steps; None = the run's --align-steps)
REALIGN = {
    "align300": ("hidden-mse", 0.5, 300), "alignall300": ("hidden-mse", 0.0, 300),
    "kl": ("logit-kl", 0.5, None), "grad": ("lora-grad", 0.5, None), "mix": ("hidden-mse+lora-grad", 0.5, None), "kl300": ("logit-kl", 0.5, 300), "klall300": ("logit-kl", 0.0, 300),
}


def load_run(run: Path, round_id: int | None):
    """(metrics rows, aligned round, its alignment index, adapters, summed statistics)."""
    from safetensors.numpy import load_file

    from fedpft.cloud.aggregate import sum_stats
    from fedpft.shared.update import STATS_PREFIX

    fed = run / "federation"
    rows = [json.loads(l) for l in (fed / "metrics.jsonl").read_text().splitlines() if l.strip()]
    aligned = [r["round"] for r in rows if r.get("aligned")]
    if not aligned:
        raise SystemExit(f"{run}: no alignment happened in this run; give a fedpft run with --align-every")
    r = aligned[0] if round_id is None else round_id
    if r not in aligned:
        raise SystemExit(f"{run}: round {r} was not an alignment round (those were {aligned})")
    adapters = load_file(str(fed / "checkpoints" / f"adapters_round_{r:04d}.safetensors"))
    per_device = []
    for f in sorted((fed / "updates" / f"round_{r:04d}").glob("*.safetensors")):
        t = load_file(str(f))
        layers = {int(k.split(".")[2]) for k in t if k.startswith(STATS_PREFIX)}
        per_device.append({l: (t[f"{STATS_PREFIX}layer.{l}.off_counts"].astype(np.float64),
                               float(t[f"{STATS_PREFIX}layer.{l}.positions"][0])) for l in layers})
    return rows, r, aligned.index(r) + 1, adapters, sum_stats([s for s in per_device if s])


def encoded(path: Path, bundle: Path, manifest, batch_size: int, order_seed: int | None = None):
    """Batches (inputs, labels) as the devices build them; shuffled when order_seed is given."""
    from fedpft.shared.records import BatchMaker, batches, read_local_data

    data = read_local_data(path, manifest)
    records = data.records
    if order_seed is not None:
        records = [records[i] for i in np.random.default_rng(order_seed).permutation(len(records))]
    return [(b.inputs, b.labels) for b in batches(records, BatchMaker(bundle, manifest), batch_size, data.skips)]


def as_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def train_adapters(model, train: list, steps: int, lr: float, seed: int) -> list[float]:
    """AdamW on the model's trainable parameters (LoRA + head), HF-style eps as ORT's on devices."""
    torch.manual_seed(seed)  # dropout masks: the same for every variant
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, eps=1e-6, weight_decay=0.0)
    model.train()
    losses = []
    for i in range(steps):
        inputs, labels = train[i % len(train)]
        logits = model(**as_torch(inputs)).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished `simulate --method fedpft` run folder")
    ap.add_argument("--round", type=int, default=None, help="alignment round to start from (default: the run's first)")
    ap.add_argument("--steps", type=int, default=150, help="adapter training steps after the alignment")
    ap.add_argument("--lr", type=float, default=None, help="adapter learning rate (default: the run's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--orders", type=int, default=1, help="repeat with this many training orders")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--section", default="alignment", help="BENCHMARKS.md section to write (one per proxy size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fedpft.cloud.alignment import align, ffn_state
    from fedpft.cloud.bundle_model import load_proxy, set_ffn_state
    from fedpft.cloud.distill import evaluate_layer_loss
    from fedpft.cloud.evaluate import PluggedFM, evaluate_model
    from fedpft.cloud.grad_match import evaluate_grad_gap
    from fedpft.cloud.logit_distill import evaluate_logit_kl
    from fedpft.modeling.families import encoder_layers, resolve_model_id
    from fedpft.cloud.public_data import batch_stream, hold_out, list_public_samples, make_encoder
    from fedpft.modeling.adapters import adapter_state, load_adapter_state
    from fedpft.shared.manifest import verify_bundle

    run, bundle = args.run, args.run / "bundle"
    manifest = verify_bundle(bundle)
    pc = json.loads((bundle / "prepare_config.json").read_text())
    sc = json.loads((run / "federation" / "serve_config.json").read_text())
    lr = args.lr or sc["lr"]
    rows, r, k, adapters, stats = load_run(run, args.round)
    fm = PluggedFM(resolve_model_id(pc["model"]), manifest.labels, pc["lora_rank"], pc["lora_alpha"], pc["seed"])
    test = encoded(run / "data" / "test.jsonl", bundle, manifest, 64)
    small = encoded(run / "eval.jsonl", bundle, manifest, 64)  # the run's own evaluation samples
    pooled = run / "pooled_train.jsonl"
    pooled.write_text("".join(p.read_text() for p in sorted((run / "clients").glob("*/train.jsonl"))))
    public_file = run / "data" / "public.txt" if (run / "data" / "public.txt").is_file() else Path(sc["public_data"])
    enc = make_encoder("text", manifest.input, bundle)
    align_pool, held_chunks = hold_out(list_public_samples(public_file, "text"), pc.get("batch_size", 16))  # as serve does
    held = [as_torch(enc(c)) for c in held_chunks]

    fm.plug(adapters)
    start_acc = fm.evaluate(test)[0]
    print(f"round {r + 1} adapters on the FM: {100 * start_acc:.1f}% ({len(rows)} rounds in the run)", flush=True)

    align_seconds: dict[str, tuple[float, float]] = {}  # variant -> (wall, CPU) s of its re-alignment here, held-out measures included
    aligned_ffn: dict[str, dict] = {}  # variant -> FFN tensors, so each alignment runs once for all orders

    def proxy_variant(v: str):
        proxy, spec = load_proxy(bundle, with_adapters=True)
        load_adapter_state(proxy, as_torch(adapters), spec.layer_map)
        if v in aligned_ffn:
            set_ffn_state(proxy, aligned_ffn[v])
        elif v == "run":
            from safetensors.torch import load_file

            set_ffn_state(proxy, load_file(str(run / "federation" / "checkpoints" / f"ffn_align_{k:03d}.safetensors")))
        elif v in REALIGN:
            objective, fraction, steps = REALIGN[v]
            fm.plug(adapters)
            stream = batch_stream(align_pool, enc, 16, 7919 * sc["seed"] + r)  # the run's own alignment batches
            t0, c0 = time.time(), time.process_time()
            align(fm.model, proxy, spec, adapters, stats, stream, fraction, steps or sc["align_steps"], sc["align_lr"],
                  objective=objective)
            align_seconds[v] = (time.time() - t0, time.process_time() - c0)
            print(f"{v}: aligned in {align_seconds[v][0]:.0f}s, {align_seconds[v][1]:.0f} CPU s (load {os.getloadavg()[0]:.1f})", flush=True)
            aligned_ffn[v] = {n: torch.from_numpy(t) for n, t in ffn_state(proxy, spec).items()}
        gap = evaluate_layer_loss(fm.model, proxy, spec, held) if spec.compressed else 0.0
        return proxy, spec, gap, evaluate_logit_kl(fm.model, proxy, held), evaluate_grad_gap(fm.model, proxy, spec, held)

    def write(done: list[str]) -> None:
        """The section for the variants finished so far (written after each, so a cut-short run still reports)."""
        lines = [
            f"## Alignment, isolated ({pc['ffn_keep']:.0%}-FFN proxy): does an aligned proxy train adapters that transfer better to the FM?",
            "",
            f"Command: `{command_line()}` — {machine()}. Proxy: {pc['ffn_keep']:.0%} of the FFN neurons kept in compressed "
            f"layers. Start: the run's aggregated adapters after round {r + 1} "
            f"and the activation statistics its {len(list((run / 'federation' / 'updates' / f'round_{r:04d}').glob('*.safetensors')))} "
            f"devices reported that round; FM with these adapters: {100 * start_acc:.1f}%. Each variant then trains the same "
            f"adapters {args.steps} steps (batch {args.batch_size}, AdamW lr {lr}) on the pooled client data in the same order "
            f"with the same dropout seed; FM accuracy on all {sum(len(b[1]) for b in test)} test samples. Layer gap = relative "
            "MSE of the compressed layers' outputs, logit KL = KL(FM || proxy) of the classifier outputs, gradient gap = mean "
            "over adapter tensors of the relative squared gap between proxy and FM gradients of the cross-entropy on FM-labelled "
            "batches (cloud/grad_match.py); all proxy vs FM "
            f"with the starting adapters, on {len(held)} held-out public batches. The run aligned with "
            f"{sc.get('align_objective', 'hidden-mse')}. Δ = FM accuracy minus that of the layer-only proxy trained in the "
            "same order (paired): its spread over orders is the noise a difference must beat.",
            "",
            f"| proxy the adapters were trained on | layer gap | logit KL | gradient gap | alignment s, wall / CPU | FM accuracy after training, per order | mean "
            f"| Δ vs layer-only, per order (mean) | that model's own accuracy ({sum(len(b[1]) for b in small)} of the test samples) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = {x["order"]: x["fm"] for x in results if x["variant"] == "prepared"}
        for v in done:
            rs = [x for x in results if x["variant"] == v]
            fm_accs = ", ".join(f"{100 * x['fm']:.1f}" for x in rs)
            own = ", ".join(f"{100 * x['own']:.1f}" for x in rs)
            deltas = [100 * (x["fm"] - base[x["order"]]) for x in rs if x["order"] in base]
            delta = f"{', '.join(f'{d:+.1f}' for d in deltas)} ({np.mean(deltas):+.1f})" if deltas and v != "prepared" else "-"
            secs = f"{align_seconds[v][0]:.0f} / {align_seconds[v][1]:.0f}" if v in align_seconds else "-"
            lines.append(f"| {LABEL[v]} | {rs[0]['gap']:.4f} | {rs[0]['kl']:.4f} | {rs[0]['grad']:.4f} | {secs} | {fm_accs}% | {100 * np.mean([x['fm'] for x in rs]):.1f}% "
                         f"| {delta} | {own}% |")
        write_section(args.section, "\n".join(lines))
        print("\n".join(lines))

    results = []
    for v in args.variants:
        for order in range(args.orders):
            t0 = time.time()
            train = encoded(pooled, bundle, manifest, args.batch_size, order_seed=1000 + order)
            if v == "fm":
                fm.plug(adapters)
                model, spec, gap, kl, grad = fm.model, None, 0.0, 0.0, 0.0
            else:
                fm.plug(adapters)
                model, spec, gap, kl, grad = proxy_variant(v)
            losses = train_adapters(model, train, args.steps, lr, seed=order)
            layer_map = spec.layer_map if spec else list(range(len(encoder_layers(model))))
            trained = {kk: vv.numpy() for kk, vv in adapter_state(model, layer_map).items()}
            own = evaluate_model(model, small)[0]
            fm.plug(trained)
            acc = fm.evaluate(test)[0]
            results.append({"variant": v, "order": order, "gap": gap, "kl": kl, "grad": grad, "fm": acc, "own": own, "loss": float(np.mean(losses[-20:])),
                            "seconds": time.time() - t0})
            print(f"{v} order {order}: layer gap {gap:.4f}, logit KL {kl:.4f}, gradient gap {grad:.4f}, FM {100 * acc:.1f}%, own {100 * own:.1f}%, "
                  f"final loss {results[-1]['loss']:.3f} ({results[-1]['seconds']:.0f}s)", flush=True)
        write(args.variants[: args.variants.index(v) + 1])


if __name__ == "__main__":
    main()
