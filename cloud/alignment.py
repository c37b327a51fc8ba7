"""Neuron-level alignment during FL (DESIGN.md §4).

Sum the devices' activation counts, freeze the neurons they use most (lowest APoZ), and
re-distil the rest with teacher = FM + aggregated adapters, student = proxy + the same adapters.
The result is the compressed layers' FFN tensors, shipped to devices under their ORT names.

Objectives (`--align-objective`): hidden-mse, the relative MSE of the compressed layers' outputs
(the paper's; cloud/distill.py), logit-kl, KL(FM || proxy) of the classifier outputs
(cloud/logit_distill.py), and lora-grad, the relative gap between the two models' gradients with
respect to the adapters (cloud/grad_match.py), and hidden-mse+lora-grad, their sum. All three
measures are taken on held-out public batches before and after, whichever one is optimised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from fedpft.modeling.adapters import load_adapter_state
from fedpft.modeling.families import encoder_layers, ffn_linears
from fedpft.modeling.proxy import ProxySpec

from .aggregate import apoz, most_used
from .config import ALIGN_OBJECTIVES
from .distill import DistillResult, distill, evaluate_layer_loss
from .grad_match import evaluate_grad_gap, grad_distill
from .logit_distill import evaluate_logit_kl, logit_distill

log = logging.getLogger("fedpft.alignment")

# --align-objective -> what trains the unfrozen FFN neurons (same signature, same parameters)
TRAIN = {"hidden-mse": distill, "logit-kl": logit_distill, "lora-grad": grad_distill,
         "hidden-mse+lora-grad": partial(grad_distill, layer_weight=1.0)}


@dataclass
class AlignmentResult:
    ffn: dict[str, np.ndarray]  # proxy state-dict key -> tensor, every compressed layer
    frozen: dict[int, int]  # FM layer -> neurons frozen
    distill: DistillResult
    mean_apoz: dict[int, float]
    # proxy-vs-FM layer loss on held-out public batches, both carrying the aggregated adapters:
    # what alignment exists to reduce (NaN when no held-out batches were given)
    gap_before: float = float("nan")
    gap_after: float = float("nan")
    score_before: float | None = None  # `score(proxy)` before and after, when given (e.g. test accuracy)
    score_after: float | None = None
    objective: str = "hidden-mse"
    # KL(FM || proxy) of the classifier outputs on the same held-out batches (NaN without them)
    kl_before: float = float("nan")
    kl_after: float = float("nan")
    # relative gap between proxy and FM gradients w.r.t. the shared adapters, same batches (cloud/grad_match.py)
    grad_before: float = float("nan")
    grad_after: float = float("nan")

    def summary(self) -> dict:
        """JSON-ready facts for the round's metrics record."""
        return {
            "frozen": {str(k): v for k, v in self.frozen.items()},
            "mean_apoz": {str(k): round(v, 4) for k, v in self.mean_apoz.items()},
            "steps": len(self.distill.losses), "loss_first": self.distill.first, "loss_last": self.distill.last,
            "objective": self.objective, "gap_before": self.gap_before, "gap_after": self.gap_after,
            "kl_before": self.kl_before, "kl_after": self.kl_after,
            "grad_before": self.grad_before, "grad_after": self.grad_after,
            "proxy_accuracy_before": self.score_before, "proxy_accuracy_after": self.score_after,
        }


def frozen_masks(stats: dict[int, tuple[np.ndarray, float]], spec: ProxySpec, fraction: float) -> dict[int, torch.Tensor]:
    """FM layer -> (off, positions) sums  ->  proxy layer -> bool mask of neurons to keep fixed."""
    inverse = {fm: p for p, fm in enumerate(spec.layer_map)}
    masks = {}
    for fm_layer, (off, pos) in stats.items():
        p = inverse[fm_layer]
        if off.shape != (spec.ffn_sizes[p],):
            raise ValueError(f"layer {fm_layer}: statistics for {off.shape} neurons, proxy has {spec.ffn_sizes[p]}")
        masks[p] = torch.from_numpy(most_used(apoz(off, pos), fraction))
    return masks


def ffn_state(proxy: torch.nn.Module, spec: ProxySpec) -> dict[str, np.ndarray]:
    """The compressed layers' FFN tensors keyed as in the plain proxy's state dict."""
    from fedpft.modeling.families import unwrap

    base = unwrap(proxy)
    names = {id(m): n for n, m in base.named_modules()}
    out = {}
    for p in spec.compressed:
        for lin in ffn_linears(encoder_layers(base)[p]):
            for pname, t in lin.named_parameters():
                out[f"{names[id(lin)]}.{pname}"] = t.detach().cpu().numpy().copy()
    return out


def align(
    fm: torch.nn.Module,
    proxy: torch.nn.Module,
    spec: ProxySpec,
    adapters: dict[str, np.ndarray],
    stats: dict[int, tuple[np.ndarray, float]],
    public: Iterator[dict[str, torch.Tensor]],
    fraction: float,
    steps: int,
    lr: float,
    held_out: list[dict[str, torch.Tensor]] | None = None,
    score: Callable[[torch.nn.Module], float | None] | None = None,
    objective: str = "hidden-mse",
) -> AlignmentResult:
    """fm and proxy are PEFT-wrapped with the same LoRA config, on one torch device; both get `adapters`
    first. The returned FFN tensors are CPU fp32 arrays, whatever the device.
    held_out: fixed public batches on which the proxy-vs-FM layer loss is measured before and after.
    score: a measure of the proxy itself (with the adapters), taken before and after.
    objective: what the unfrozen neurons are trained to minimise (ALIGN_OBJECTIVES)."""
    if objective not in ALIGN_OBJECTIVES:
        raise ValueError(f"alignment objective {objective!r}: expected one of {', '.join(ALIGN_OBJECTIVES)}")
    as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in adapters.items()}
    load_adapter_state(fm, as_torch)
    load_adapter_state(proxy, as_torch, spec.layer_map)
    masks = frozen_masks(stats, spec, fraction)
    gap = (lambda: evaluate_layer_loss(fm, proxy, spec, held_out)) if held_out else (lambda: float("nan"))
    kl = (lambda: evaluate_logit_kl(fm, proxy, held_out)) if held_out else (lambda: float("nan"))
    grad = (lambda: evaluate_grad_gap(fm, proxy, spec, held_out)) if held_out else (lambda: float("nan"))
    before, kl_before, grad_before, score_before = gap(), kl(), grad(), score(proxy) if score else None
    result = TRAIN[objective](fm, proxy, spec, public, steps, lr=lr, frozen=masks)
    after, kl_after, grad_after, score_after = gap(), kl(), grad(), score(proxy) if score else None
    mean = {spec.layer_map[p]: float(apoz(*stats[spec.layer_map[p]]).mean()) for p in masks}
    log.info(
        "alignment (%s): froze %s neurons, %d steps (loss %.4f -> %.4f; held-out layer loss %.4f -> %.4f, "
        "logit KL %.4f -> %.4f, adapter-gradient gap %.4f -> %.4f), mean APoZ %s", objective,
        {spec.layer_map[p]: int(m.sum()) for p, m in masks.items()}, len(result.losses), result.first, result.last,
        before, after, kl_before, kl_after, grad_before, grad_after, {k: round(v, 3) for k, v in mean.items()},
    )
    frozen = {spec.layer_map[p]: int(m.sum()) for p, m in masks.items()}
    return AlignmentResult(ffn_state(proxy, spec), frozen, result, mean, before, after, score_before, score_after,
                           objective, kl_before, kl_after, grad_before, grad_after)
