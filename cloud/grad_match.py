"""Alignment objective aimed at the quantity FedPFT's convergence bound is about: the adapters' gradient.

Devices train the adapters on the proxy and FedAvg hands the result to the FM, so proxy-trained
adapters serve the FM as well as a step on the proxy is a step on the FM: the paper bounds the
federated FM's convergence by the gap between the two models' gradients with respect to the
adapters. `lora-grad` trains the compressed FFNs to close that gap directly. On an unlabeled public
batch, labelled with the predictions of the FM + the round's adapters, the cross-entropy's gradient
with respect to every adapter tensor the proxy shares with the FM (LoRA A/B of the layers it keeps,
and the head) should be the FM's:

    loss = mean_k ||g_proxy,k - g_FM,k||^2 / ||g_FM,k||^2

The proxy's gradient is a function of its FFN weights, so each step differentiates a gradient: one
forward and backward of the FM, and a forward, a backward with its graph kept and a second backward
through that of the proxy. hidden-mse and logit-kl need one forward of the FM and one forward +
backward of the proxy (BENCHMARKS.md alignment sections: what a step costs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedpft.modeling.adapters import adapter_parameters
from fedpft.modeling.families import encoder_layers, hidden_states
from fedpft.modeling.proxy import ProxySpec

from .device import autocast, model_device, to_device
from .distill import Batch, DistillResult, fit_ffns, hidden_loss, layer_pairs, only_trainable

Pairs = tuple[list[nn.Parameter], list[nn.Parameter]]


def adapter_pairs(teacher: nn.Module, student: nn.Module, spec: ProxySpec) -> Pairs:
    """(FM parameters, proxy parameters) of each adapter tensor both models carry, in one order."""
    t = adapter_parameters(teacher, list(range(len(encoder_layers(teacher)))))
    s = adapter_parameters(student, spec.layer_map)
    keys = sorted(t.keys() & s.keys())
    if not keys:
        raise ValueError("the proxy and the FM share no adapter tensors: add the same adapters to both")
    return [t[k] for k in keys], [s[k] for k in keys]


def relative_grad_gap(fm_grads, proxy_grads) -> torch.Tensor:
    """Mean over adapter tensors of ||g_proxy - g_FM||^2 / ||g_FM||^2, in fp32: 0 when the proxy's step
    is the FM's, 1 when it gives no gradient at all. Per tensor, so each LoRA matrix counts as much as
    the head, whose gradient is orders of magnitude larger; tensors the FM gives no gradient (LoRA A
    while B is still 0, in both models alike) are left out."""
    gaps = []
    for f, p in zip(fm_grads, proxy_grads):
        den = f.float().pow(2).sum()
        if float(den) > 0:
            gaps.append((p.float() - f.float()).pow(2).sum() / den)
    if not gaps:
        return 0 * sum(p.float().sum() for p in proxy_grads)  # still a function of the proxy's weights
    return torch.stack(gaps).mean()


def _adapter_grads(model: nn.Module, params: list[nn.Parameter], batch: Batch,
                   labels: torch.Tensor | None, keep_graph: bool) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Gradients of the cross-entropy w.r.t. `params`, and the labels used: the model's own
    predictions when `labels` is None (the FM labels the public batch)."""
    logits = model(**batch).logits
    if labels is None:
        labels = logits.detach().argmax(-1)
    loss = F.cross_entropy(logits.float(), labels)
    return torch.autograd.grad(loss, params, create_graph=keep_graph), labels


def grad_gap(teacher: nn.Module, student: nn.Module, pairs: Pairs, batch: Batch, keep_graph: bool) -> torch.Tensor:
    """The relative gradient gap on one batch; differentiable w.r.t. the student's weights when `keep_graph`.
    Both models' trainable flags must already allow gradients for their side of `pairs`."""
    fm_params, proxy_params = pairs
    fm_grads, labels = _adapter_grads(teacher, fm_params, batch, None, keep_graph=False)
    proxy_grads, _ = _adapter_grads(student, proxy_params, batch, labels, keep_graph=keep_graph)
    return relative_grad_gap([g.detach() for g in fm_grads], proxy_grads)


def grad_distill(
    teacher: nn.Module,
    student: nn.Module,
    spec: ProxySpec,
    batches: Iterator[Batch],
    steps: int,
    lr: float = 5e-4,
    frozen: dict[int, torch.Tensor] | None = None,
    layer_weight: float = 0.0,
) -> DistillResult:
    """Train the student's compressed FFNs (the parameters of `distill`) to minimise the relative
    gap between its and the teacher's adapter gradients for `steps` public batches; no labels needed.
    frozen: proxy layer -> bool mask (neurons,) of neurons that keep their current weights.
    layer_weight: plus this times the layer loss of `distill` (`hidden-mse+lora-grad` sums the two
    unweighted; on MiniLM the gradient gap is about 8x the layer loss, so the sum is mostly lora-grad
    and left the layer gap where it was, BENCHMARKS.md alignment_mix): lora-grad alone lowered the
    gradient gap at each of a run's alignments while the layer gap it left alone doubled (0.127 ->
    0.278 over 6 alignments, BENCHMARKS.md seeds, fedpft-grad). One more proxy forward per step."""
    pairs, layers = adapter_pairs(teacher, student, spec), layer_pairs(spec)

    def loss_fn(batch: Batch) -> torch.Tensor:
        loss = 0.0
        if layer_weight:
            with torch.no_grad():
                t_hs = hidden_states(teacher, batch)
            loss = layer_weight * hidden_loss(t_hs, hidden_states(student, batch), layers)
        with only_trainable(teacher, pairs[0]):
            return loss + grad_gap(teacher, student, pairs, batch, keep_graph=True)

    return fit_ffns(teacher, student, spec, batches, steps, lr, loss_fn, frozen, differentiable=pairs[1])


def evaluate_grad_gap(teacher: nn.Module, student: nn.Module, spec: ProxySpec, batches: list[Batch]) -> float:
    """Mean relative adapter-gradient gap over fixed batches (before/after comparisons of any objective);
    leaves no gradients behind and every trainable flag as it was."""
    pairs = adapter_pairs(teacher, student, spec)
    teacher.eval()
    student.eval()
    device = model_device(student)
    vals = []
    with only_trainable(teacher, pairs[0]), only_trainable(student, pairs[1]):
        for b in batches:
            b = to_device(b, device)
            with autocast(device, "training"):  # gradients: never fp16
                vals.append(float(grad_gap(teacher, student, pairs, b, keep_graph=False)))
    return sum(vals) / len(vals)
