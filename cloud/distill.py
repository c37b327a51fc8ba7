"""Layer-level distillation of the proxy from the FM (DESIGN.md §2), also used for neuron-level
alignment (§4) with a mask of neurons that must not move.

Loss = mean over distilled layers of relative MSE of layer outputs
     + alpha * mean relative MSE of the W_out·W_in products (trainable here, unlike the paper's code).
Only the distilled layers' FFN weights receive gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fedpft.modeling.families import encoder_layers, ffn_linears, hidden_states
from fedpft.modeling.proxy import ProxySpec

from .device import autocast, model_device, to_device

Batch = dict[str, torch.Tensor]


def relative_mse(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """mean((T - S)^2) / mean(T^2): scale-free, so layers of any norm weigh the same."""
    return (teacher - student).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


def layer_pairs(spec: ProxySpec) -> list[tuple[int, int]]:
    """(student hidden-state index, teacher hidden-state index) for each distilled layer."""
    return [(p + 1, spec.layer_map[p] + 1) for p in spec.compressed]


def ffn_product(layer: nn.Module) -> torch.Tensor:
    w_in, w_out = ffn_linears(layer)
    return w_out.weight @ w_in.weight  # (hidden, hidden)


def hidden_loss(teacher_hs, student_hs, pairs: list[tuple[int, int]]) -> torch.Tensor:
    # fp32 loss even when the forward ran under autocast (a no-op on fp32 states)
    return torch.stack([relative_mse(teacher_hs[t].float(), student_hs[s].float()) for s, t in pairs]).mean()


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)

    @property
    def first(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def last(self) -> float:
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[-k:]) / k if self.losses else float("nan")


def distill_params(student: nn.Module, spec: ProxySpec) -> list[nn.Parameter]:
    layers = encoder_layers(student)
    return [p for i in spec.compressed for lin in ffn_linears(layers[i]) for p in lin.parameters()]


@contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]):
    """Gradients for `params` only while inside (backward skips every other weight's gradient);
    the flags come back as they were."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def _restore_frozen(student: nn.Module, frozen: dict[int, torch.Tensor], snapshot: dict[int, tuple]) -> None:
    """Put frozen neurons (rows of W_in/b_in, columns of W_out) back to their snapshot values."""
    layers = encoder_layers(student)
    with torch.no_grad():
        for p, mask in frozen.items():
            w_in, w_out = ffn_linears(layers[p])
            wi, bi, wo = snapshot[p]
            w_in.weight[mask] = wi[mask]
            if w_in.bias is not None:
                w_in.bias[mask] = bi[mask]
            w_out.weight[:, mask] = wo[:, mask]


def fit_ffns(
    teacher: nn.Module,
    student: nn.Module,
    spec: ProxySpec,
    batches: Iterator[Batch],
    steps: int,
    lr: float,
    loss_fn: Callable[[Batch], torch.Tensor],
    frozen: dict[int, torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    differentiable: list[nn.Parameter] = (),
) -> DistillResult:
    """Train the student's compressed FFNs to minimise `loss_fn(batch)` (run under the device's
    "training" autocast, batch already on the device) for `steps` batches; the objectives of
    `distill` and of cloud/logit_distill.py.

    frozen: proxy layer -> bool mask (neurons,) of neurons that keep their current weights.
    Teacher and student must be on one device; batches may be anywhere (they are moved there).
    Parameters stay fp32; both models run in eval mode (deterministic outputs to match).
    differentiable: student parameters `loss_fn` differentiates with respect to (the adapters, for
    a gradient-matching loss) without training them.
    """
    result = DistillResult()
    if steps <= 0 or not spec.compressed:
        return result
    device = model_device(student)
    if model_device(teacher) != device:
        raise ValueError(f"teacher on {model_device(teacher)} and student on {device}: put both on one device")
    frozen = {p: m.to(device) for p, m in frozen.items()} if frozen else frozen
    params = distill_params(student, spec)
    s_layers = encoder_layers(student)
    snapshot = {}
    if frozen:
        for p in frozen:
            w_in, w_out = ffn_linears(s_layers[p])
            b = w_in.bias.detach().clone() if w_in.bias is not None else None
            snapshot[p] = (w_in.weight.detach().clone(), b, w_out.weight.detach().clone())
    teacher.eval()
    student.eval()  # no dropout: distillation matches deterministic outputs
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with only_trainable(student, [*params, *differentiable]):
        for step in range(steps):
            batch = to_device(next(batches), device)
            with autocast(device, "training"):
                loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)  # the FFNs only, whatever else the loss depends on
            opt.step()
            if frozen:
                _restore_frozen(student, frozen, snapshot)
            result.losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, result.losses[-1])
    return result


def distill(
    teacher: nn.Module,
    student: nn.Module,
    spec: ProxySpec,
    batches: Iterator[Batch],
    steps: int,
    lr: float = 5e-4,
    alpha: float = 0.0,
    frozen: dict[int, torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> DistillResult:
    """Train the student's distilled FFNs to match the teacher's layer outputs for `steps` batches
    (`fit_ffns` with the layer loss, plus alpha x the W_out·W_in product term)."""
    pairs = layer_pairs(spec)
    t_layers, s_layers = encoder_layers(teacher), encoder_layers(student)
    with torch.no_grad():
        t_products = {p: ffn_product(t_layers[spec.layer_map[p]]) for p in spec.compressed} if alpha > 0 and steps > 0 else {}

    def loss_fn(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            t_hs = hidden_states(teacher, batch)
        loss = hidden_loss(t_hs, hidden_states(student, batch), pairs)
        if alpha > 0:
            prod = torch.stack([relative_mse(t_products[p], ffn_product(s_layers[p]).float()) for p in spec.compressed])
            loss = loss + alpha * prod.mean()
        return loss

    return fit_ffns(teacher, student, spec, batches, steps, lr, loss_fn, frozen, on_step)


@torch.no_grad()
def mean_over_batches(teacher: nn.Module, student: nn.Module, batches: list[Batch],
                      measure: Callable[[Batch], torch.Tensor]) -> float:
    """Mean of `measure(batch)` over fixed batches, both models in eval mode on the student's device
    under its "inference" autocast: the before/after comparisons of an objective."""
    teacher.eval()
    student.eval()
    device = model_device(student)
    vals = []
    for b in batches:
        b = to_device(b, device)
        with autocast(device, "inference"):
            vals.append(float(measure(b)))
    return sum(vals) / len(vals)


def evaluate_layer_loss(teacher: nn.Module, student: nn.Module, spec: ProxySpec, batches: list[Batch]) -> float:
    """Mean hidden-state relative MSE over fixed batches (for before/after comparisons)."""
    if not spec.compressed:
        return 0.0
    pairs = layer_pairs(spec)
    return mean_over_batches(teacher, student, batches,
                             lambda b: hidden_loss(hidden_states(teacher, b), hidden_states(student, b), pairs))
