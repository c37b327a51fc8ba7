"""--align-objective logit-kl: KL(FM || proxy) of the classifier outputs (tiny BERT, CPU)."""

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedpft.cloud.alignment import align
from fedpft.cloud.config import ServeConfig, SimulateConfig
from fedpft.cloud.logit_distill import evaluate_logit_kl, logit_distill, logit_kl
from fedpft.modeling.adapters import adapter_state, add_adapters
from fedpft.modeling.families import encoder_layers, ffn_linears, model_from_config
from fedpft.modeling.proxy import build_fedpft

from test_proxy import TINY


def text_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 200, (8, 9), generator=g), "attention_mask": torch.ones(8, 9, dtype=torch.long)}


def stream(seed: int = 0):
    """Endless distinct public-like batches."""
    i = seed
    while True:
        yield text_batch(i)
        i += 1


def models(ffn_keep: float):
    torch.manual_seed(0)
    base = model_from_config(TINY["bert"])
    with torch.no_grad():  # a head that separates the classes (the initial one gives near-uniform outputs)
        base.classifier.weight.normal_(0.0, 5.0)
    proxy, spec = build_fedpft(base, None, ffn_keep)
    return add_adapters(base, 4, 8.0), add_adapters(proxy, 4, 8.0), spec


def test_logit_kl_is_zero_for_the_same_distribution_and_positive_otherwise():
    t = torch.randn(5, 3)
    assert float(logit_kl(t, t + 7.0)) == pytest.approx(0.0, abs=1e-6)  # a shift changes no probability
    assert float(logit_kl(t, torch.randn(5, 3))) > 0
    # the direction matters: teacher first
    a, b = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert float(logit_kl(a, b)) != pytest.approx(float(logit_kl(b, a)))


def test_loss_is_zero_when_the_proxy_is_the_fm():
    fm, proxy, spec = models(1.0)  # every neuron kept: the same function, compressed layers and all
    assert spec.compressed
    assert evaluate_logit_kl(fm, proxy, [text_batch(1), text_batch(2)]) == pytest.approx(0.0, abs=1e-6)
    res = logit_distill(fm, proxy, spec, stream(), steps=1, lr=1e-3)
    assert res.losses[0] == pytest.approx(0.0, abs=1e-6)  # the training loss too, before any step


def test_logit_distillation_lowers_the_held_out_kl():
    fm, proxy, spec = models(0.1)
    held = [text_batch(1000 + i) for i in range(4)]
    before = evaluate_logit_kl(fm, proxy, held)
    res = logit_distill(fm, proxy, spec, stream(), steps=40, lr=1e-3)
    after = evaluate_logit_kl(fm, proxy, held)
    assert len(res.losses) == 40 and before > 0
    assert after < 0.5 * before, (before, after)


def test_frozen_neurons_stay_frozen_and_only_ffns_train():
    fm, proxy, spec = models(0.5)
    layer = encoder_layers(proxy)[spec.compressed[0]]
    w_in, w_out = ffn_linears(layer)
    mask = torch.zeros(w_in.out_features, dtype=torch.bool)
    mask[::2] = True
    before_in, before_out = w_in.weight.detach().clone(), w_out.weight.detach().clone()
    others = {n: p.detach().clone() for n, p in proxy.named_parameters() if "intermediate" not in n and ".output.dense" not in n}
    flags = {n: p.requires_grad for n, p in proxy.named_parameters()}
    logit_distill(fm, proxy, spec, stream(), steps=5, lr=1e-2, frozen={spec.compressed[0]: mask})
    assert torch.equal(w_in.weight[mask], before_in[mask])
    assert torch.equal(w_out.weight[:, mask], before_out[:, mask])
    assert not torch.equal(w_in.weight[~mask], before_in[~mask])
    # attention, embeddings, LoRA and head never move; the trainable flags come back as they were
    assert all(torch.equal(p, others[n]) for n, p in proxy.named_parameters() if n in others)
    assert flags == {n: p.requires_grad for n, p in proxy.named_parameters()}


def test_align_records_its_objective_and_both_gaps():
    fm, proxy, spec = models(0.1)
    adapters = {k: v.numpy() for k, v in adapter_state(fm, list(range(4))).items()}
    stats = {spec.layer_map[p]: (np.arange(spec.ffn_sizes[p], dtype=np.float32), 100.0) for p in spec.compressed}
    res = align(fm, proxy, spec, adapters, stats, stream(), 0.5, steps=20, lr=1e-3, held_out=[text_batch(999)],
                objective="logit-kl")
    info = res.summary()
    assert info["objective"] == "logit-kl" and info["steps"] == 20
    assert np.isfinite(info["gap_after"]) and info["kl_after"] < info["kl_before"]
    with pytest.raises(ValueError, match="hidden-mse, logit-kl, lora-grad"):
        align(fm, copy.deepcopy(proxy), spec, adapters, stats, stream(), 0.5, steps=1, lr=1e-3, objective="kl")


def test_the_option_validates(tmp_path):
    assert ServeConfig(bundle=tmp_path, out=tmp_path).align_objective == "hidden-mse"
    assert SimulateConfig(out=tmp_path, align_objective="logit-kl").align_objective == "logit-kl"
    assert ServeConfig(bundle=tmp_path, out=tmp_path, align_objective="lora-grad").align_objective == "lora-grad"
    for cls, kw in ((ServeConfig, dict(bundle=tmp_path, out=tmp_path)), (SimulateConfig, dict(out=tmp_path))):
        with pytest.raises(ValidationError, match="align_objective"):
            cls(**kw, align_objective="gradient")


def test_simulate_and_serve_offer_the_option():
    from typer.testing import CliRunner

    from fedpft.cloud.cli import app

    runner = CliRunner()
    for command in ("simulate", "serve"):
        out = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--align-objective" in out and "logit-kl" in out
    bad = runner.invoke(app, ["simulate", "--out", "x", "--align-objective", "nope"])
    assert bad.exit_code != 0 and "--align-objective" in bad.output and "logit-kl" in bad.output


def test_report_shows_each_alignments_objective_and_both_gaps():
    from fedpft.cloud.report import alignment_lines

    old = {"frozen": {"1": 10}, "mean_apoz": {"1": 0.5}, "gap_before": 0.2, "gap_after": 0.1}  # before the option existed
    new = {**old, "objective": "logit-kl", "kl_before": 0.0312, "kl_after": 0.0101}
    rows = [{"round": 0, "fm_accuracy": 0.5, "alignment": old}, {"round": 1, "fm_accuracy": 0.6, "alignment": new}]
    table = [l for l in alignment_lines(rows) if l.startswith("| 1") or l.startswith("| 2")]
    assert "| hidden-mse |" in table[0] and "nan -> nan" in table[0]
    assert "| logit-kl |" in table[1] and "0.0312 -> 0.0101" in table[1] and "0.2000 -> 0.1000" in table[1]
