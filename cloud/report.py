"""Per-run outputs people read: report.md and accuracy.png, made from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def load_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []


def shown_round(r: dict) -> int:
    """Rounds are numbered from 0 on disk (metrics.jsonl, state) and from 1 wherever people read them."""
    return int(r["round"]) + 1


def plot_accuracy(rows: list[dict], path: Path, title: str = "FM test accuracy per round", series: dict[str, list[dict]] | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = series or {"fm": rows}
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    drawn = False
    for name, rs in series.items():
        pts = [(shown_round(r), 100 * r["fm_accuracy"]) for r in rs if r.get("fm_accuracy") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for r in series.get("fm", rows):
        if r.get("aligned"):
            ax.axvline(shown_round(r), color="grey", ls=":", lw=1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_report(run_dir: Path, header: str = "") -> Path:
    run_dir = Path(run_dir)
    rows = load_metrics(run_dir)
    png = plot_accuracy(rows, run_dir / "accuracy.png")
    lines = ["# FedPFT run report", ""]
    if header:
        lines += [header, ""]
    cfg = run_dir / "serve_config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        lines += [f"Bundle `{c['bundle']}`, {c['rounds']} rounds, lr {c['lr']}, local epochs {c['local_epochs']}, "
                  f"alignment every {c['align_every'] or 'never'} rounds.", ""]
    lines += ["| round | clients | FM accuracy | FM loss | train loss | aligned | MB up | MB down | seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['fm_accuracy']:.2f}%" if r.get("fm_accuracy") is not None else "-"
        loss = f"{r['fm_loss']:.4f}" if r.get("fm_loss") is not None else "-"
        tl = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        note = f" (skipped: {r['skipped']})" if r.get("skipped") else ""
        lines.append(f"| {shown_round(r)}{note} | {r['clients']} | {acc} | {loss} | {tl} | {'yes' if r.get('aligned') else ''} | "
                     f"{r.get('bytes_up', 0) / 1e6:.2f} | {r.get('bytes_down', 0) / 1e6:.2f} | {r.get('seconds', 0):.1f} |")
    lines += alignment_lines(rows)
    lines += privacy_lines(rows)
    if png is not None:
        lines += ["", "![FM accuracy per round](accuracy.png)"]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def alignment_lines(rows: list[dict]) -> list[str]:
    """What each neuron-level alignment did: the proxy-vs-FM gap it exists to close."""
    aligned = [r for r in rows if r.get("alignment")]
    if not aligned:
        return []

    def pct(v):
        return f"{100 * v:.1f}%" if v is not None else "-"

    def loss(a, name):
        return f"{a.get(name + '_before', float('nan')):.4f} -> {a.get(name + '_after', float('nan')):.4f}"

    lines = ["", "Neuron-level alignments (objective = what it minimised; layer loss = relative MSE of the compressed "
             "layers' outputs, logit KL = KL(FM || proxy) of the classifier outputs, gradient gap = relative gap between the "
             "two models' gradients w.r.t. the adapters; proxy vs FM, both with the round's adapters, on held-out public "
             "batches):", "",
             "| after round | objective | neurons frozen | mean APoZ | layer loss before -> after | logit KL before -> after "
             "| gradient gap before -> after | proxy accuracy before -> after | FM accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in aligned:
        a = r["alignment"]
        frozen = ", ".join(f"L{k}: {v}" for k, v in a.get("frozen", {}).items())
        apz = ", ".join(f"{v:.2f}" for v in a.get("mean_apoz", {}).values())
        # runs recorded before the objective was a choice all minimised the layer loss
        lines.append(f"| {shown_round(r)} | {a.get('objective', 'hidden-mse')} | {frozen} | {apz} | {loss(a, 'gap')} | {loss(a, 'kl')} | {loss(a, 'grad')} | "
                     f"{pct(a.get('proxy_accuracy_before'))} -> {pct(a.get('proxy_accuracy_after'))} | {pct(r.get('fm_accuracy'))} |")
    return lines


def privacy_lines(rows: list[dict]) -> list[str]:
    """What secure aggregation and DP did per round: survivors and drop-outs, and the privacy spent."""
    rows = [r for r in rows if "secagg_survivors" in r or "dp_clip" in r]
    if not rows:
        return []
    lines = ["", "Privacy (secure aggregation: masked inputs summed, dropped devices recovered; DP: epsilon spent so far "
             "at the given delta, accountant RDP of dp-accounting):", "",
             "| round | secure sum of | dropped | rejected | secagg MB | DP clip | noise Z | q | epsilon | delta |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = f"{r['dp_epsilon']:.3f}" if r.get("dp_epsilon") is not None else "-"
        lines.append(f"| {shown_round(r)} | {r.get('secagg_survivors', '-')} | {', '.join(r.get('secagg_dropped', [])) or '-'} | "
                     f"{len(r.get('secagg_rejected', []))} | {r.get('secagg_bytes', 0) / 1e6:.3f} | {r.get('dp_clip', '-')} | "
                     f"{r.get('dp_noise', '-')} | {r.get('dp_q', '-')} | {eps} | {r.get('dp_delta', '-')} |")
    return lines
