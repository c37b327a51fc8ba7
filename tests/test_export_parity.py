"""The ORT bundle vs the torch proxy it was exported from (rebuilt by cloud.bundle_model).

Eval logits, one and three training steps (ORT's AdamW is HF AdamW: adam_mode 1, eps 1e-6,
no weight decay — the reference below implements that math), the activation statistics, and
weights pushed into the checkpoint state (adapters, re-aligned FFN). Tiny ViT and BERT built
here, and the real MiniLM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedpft.cloud.bundle_model import load_proxy, set_ffn_state
from fedpft.edge.trainer import open_session
from fedpft.export.training import TrainingGraph
from fedpft.modeling.adapters import load_adapter_state, trainable_keys
from fedpft.modeling.families import encoder_layers, ffn_linears
from fedpft.shared.records import Batch, BatchMaker, Record

from conftest import WORDS

# tiny_bert_f16: frozen matrices stored as float16, so the devices' upcast weights must be the
# cloud's rounded proxy exactly (the same tolerances as fp32 bundles)
BUNDLES = ["tiny_vit", "tiny_bert", "tiny_bert_f16", pytest.param("minilm", marks=pytest.mark.slow)]  # the real MiniLM: seconds per test


@pytest.fixture(params=BUNDLES)
def bundle(request):
    return request.getfixturevalue(f"{request.param}_bundle")


def make_batch(bundle, manifest, size: int, seed: int) -> Batch:
    """Random inputs preprocessed as on a device; texts of varied length so padding is exercised."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, manifest.num_labels, size)
    if manifest.input.kind == "text":
        maker = BatchMaker(bundle, manifest)
        recs = [Record(" ".join(rng.choice(WORDS, size=rng.integers(2, 14))), int(y), "-") for y in labels]
        return maker.collate([r.x for r in recs], recs)
    s, c = manifest.input.image_size, manifest.input.num_channels
    return Batch({"pixel_values": rng.standard_normal((size, c, s, s)).astype(np.float32)}, labels.astype(np.int64), [])


def torch_inputs(batch: Batch, names) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(batch.inputs[n]) for n in names)


def random_adapters(manifest, seed: int) -> dict[str, np.ndarray]:
    """Non-zero LoRA B (fresh adapters have B = 0, which would hide half the math)."""
    rng = np.random.default_rng(seed)
    return {t.key: (0.05 * rng.standard_normal(t.shape)).astype(np.float32) for t in manifest.trainable}


def reference(bundle, adapters):
    model, spec = load_proxy(bundle)
    load_adapter_state(model, {k: torch.from_numpy(v) for k, v in adapters.items()}, spec.layer_map)
    graph = TrainingGraph(model, spec.compressed if spec.method == "fedpft" else [])
    return graph, model, spec


class HFAdamW:
    """HF AdamW (ORT adam_mode 1): m, v EMAs; p -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6):
        self.params, self.lr, (self.b1, self.b2), self.eps, self.t = list(params), lr, betas, eps, 0
        self.m = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        size = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad.double()
            m.mul_(self.b1).add_((1 - self.b1) * g)
            v.mul_(self.b2).add_((1 - self.b2) * g * g)
            p.sub_((size * m / (v.sqrt() + self.eps)).to(p.dtype))
            p.grad = None


def test_eval_logits_match_torch(bundle):
    session = open_session(bundle)
    m = session.manifest
    adapters = random_adapters(m, 1)
    session.set_adapters(adapters)
    graph, _, _ = reference(bundle, adapters)
    graph.eval()
    batch = make_batch(bundle, m, 4, seed=2)
    with torch.no_grad():
        want = graph(*torch_inputs(batch, m.input.names))[0].numpy()
    np.testing.assert_allclose(session.predict(batch), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps", [1, 3])
def test_train_steps_match_torch_hf_adamw(bundle, steps):
    lr = 1e-3
    session = open_session(bundle)
    m = session.manifest
    adapters = random_adapters(m, 3)
    session.set_adapters(adapters)
    session.set_learning_rate(lr)
    graph, model, spec = reference(bundle, adapters)
    graph.train()
    keys = trainable_keys(model, spec.layer_map)  # named_parameters name -> PEFT key
    params = dict(model.named_parameters())
    opt = HFAdamW([params[n] for n in keys], lr)
    for k in range(steps):
        batch = make_batch(bundle, m, 4, seed=10 + k)
        out = session.train_step(batch)
        logits = graph(*torch_inputs(batch, m.input.names))[0]
        loss = F.cross_entropy(logits, torch.from_numpy(batch.labels))
        loss.backward()
        opt.step()
        assert out.loss == pytest.approx(loss.item(), abs=1e-4)
    got = session.adapters()
    moved = 0.0
    for name, key in keys.items():
        want = params[name].detach().numpy()
        np.testing.assert_allclose(got[key], want, atol=2e-5 * steps, rtol=0, err_msg=key)
        moved = max(moved, float(np.abs(want - adapters[key]).max()))
    assert moved > 0.5 * lr  # the steps did move the adapters, so the comparison means something


def test_activation_statistics_match_torch_counts(bundle):
    session = open_session(bundle)
    m = session.manifest
    graph, model, spec = reference(bundle, {t.key: session.adapters()[t.key] for t in m.trainable})
    captured = {}
    layers = encoder_layers(model)
    for p in spec.compressed:
        ffn_linears(layers[p])[0].register_forward_hook(lambda _m, _i, out, p=p: captured.__setitem__(p, out.detach()))
    batch = make_batch(bundle, m, 5, seed=4)
    out = session.train_step(batch)  # statistics come from the training graph's forward pass
    with torch.no_grad():
        graph(*torch_inputs(batch, m.input.names))
    mask = batch.inputs.get("attention_mask")
    assert [s.layer for s in m.stat_outputs] == [spec.layer_map[p] for p in spec.compressed] and spec.compressed
    for p in spec.compressed:
        pre = captured[p].numpy()  # (batch, tokens, neurons) pre-activation of intermediate.dense
        mk = np.ones(pre.shape[:2]) if mask is None else mask
        want = ((pre <= 0) * mk[:, :, None]).sum(axis=(0, 1))
        off, positions = out.stats[spec.layer_map[p]]
        assert positions == mk.sum()
        assert 0 < off.sum() < positions * len(off)  # neither all on nor all off: the check has teeth
        assert off.shape == (spec.ffn_sizes[p],)
        # a pre-activation within float noise of 0 may fall either side in ORT and torch
        assert np.abs(off - want).max() <= 1 and np.abs(off - want).sum() <= 3, (off, want)


def test_pushed_ffn_weights_reach_the_graph(bundle):
    """Re-aligned FFN weights set into the checkpoint state change ORT's logits exactly as torch's."""
    session = open_session(bundle)
    m = session.manifest
    rng = np.random.default_rng(5)
    ffn = {t.key: (0.1 * rng.standard_normal(t.shape)).astype(np.float32) for t in m.ffn}
    assert ffn, "a fedpft bundle lists its compressed FFN tensors"
    batch = make_batch(bundle, m, 3, seed=6)
    before = session.predict(batch)
    session.set_ffn(ffn)
    got = session.predict(batch)
    assert np.abs(got - before).max() > 1e-4
    graph, model, _ = reference(bundle, session.adapters())
    set_ffn_state(model, {k: torch.from_numpy(v) for k, v in ffn.items()})
    graph.eval()
    with torch.no_grad():
        want = graph(*torch_inputs(batch, m.input.names))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    for k, v in session.ffn().items():
        np.testing.assert_array_equal(v, ffn[k])
