"""Proxy construction: saliency picks, full-width parity, layer bookkeeping (tiny ViT and BERT)."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, ViTConfig

from fedpft.modeling.families import encoder_layers, ffn_linears, model_from_config
from fedpft.modeling.proxy import (
    ProxyError,
    build_fedot,
    build_fedpft,
    fedot_layer_choice,
    matching_layer_budget,
    saliency,
    skeleton_from_spec,
    top_neurons,
)

TINY = {
    "bert": BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "vit": ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                     image_size=32, patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def inputs_for(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "bert":
        return {"input_ids": torch.randint(0, 200, (2, 9), generator=g), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


@pytest.fixture(params=sorted(TINY))
def family(request):
    return request.param


def test_full_width_proxy_equals_fm(family):
    fm = model_from_config(TINY[family])
    proxy, spec = build_fedpft(fm, None, 1.0)
    assert spec.compressed == [1, 2]
    with torch.no_grad():
        a = fm(**inputs_for(family)).logits
        b = proxy(**inputs_for(family)).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_compressed_shapes_and_untouched_parts(family):
    fm = model_from_config(TINY[family])
    proxy, spec = build_fedpft(fm, [0, 3], 0.25)
    sizes = [ffn_linears(l)[0].out_features for l in encoder_layers(proxy)]
    assert sizes == [64, 16, 16, 64] == spec.ffn_sizes
    for lf, lp in zip(encoder_layers(fm), encoder_layers(proxy)):
        for (n, a), (_, b) in zip(lf.attention.named_parameters(), lp.attention.named_parameters()):
            assert torch.equal(a, b), n
    # b_out kept whole, b_in/W_in rows and W_out columns of the kept neurons
    idx = torch.tensor(spec.kept_neurons[1])
    wi, wo = ffn_linears(encoder_layers(fm)[1])
    pi, po = ffn_linears(encoder_layers(proxy)[1])
    assert torch.equal(pi.weight, wi.weight[idx]) and torch.equal(pi.bias, wi.bias[idx])
    assert torch.equal(po.weight, wo.weight[:, idx]) and torch.equal(po.bias, wo.bias)


def test_saliency_picks_expected_neurons_on_hand_built_layer():
    w_in = torch.zeros(6, 3)
    w_out = torch.zeros(3, 6)
    w_in[4] = torch.tensor([3.0, 0, 0])   # big incoming row
    w_out[:, 1] = torch.tensor([0, 2.0, 0])  # big outgoing column
    w_in[2] = torch.tensor([1.0, 1.0, 0])  # mid: sqrt(2)
    w_in[0, 0] = 0.1
    s = saliency(w_in, w_out)
    torch.testing.assert_close(s[4], torch.tensor(3.0))
    assert top_neurons(s, 3).tolist() == [1, 2, 4]  # kept in original order
    assert top_neurons(s, 1).tolist() == [4]


def test_saliency_combines_rows_and_columns():
    w_in = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    w_out = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    assert saliency(w_in, w_out).tolist() == [5.0, 0.0]


@pytest.mark.parametrize("keep,bad", [([0, 9], 9), ([-1], -1)])
def test_layer_index_out_of_range(keep, bad):
    fm = model_from_config(TINY["bert"])
    with pytest.raises(ProxyError, match="out of range"):
        build_fedpft(fm, keep, 0.25)


@pytest.mark.parametrize("keep", [0.0, 1.5, -0.1])
def test_ffn_keep_outside_unit_interval(keep):
    with pytest.raises(ProxyError):
        build_fedpft(model_from_config(TINY["bert"]), None, keep)


def test_fedot_layer_choice_and_budget():
    assert fedot_layer_choice(6, 4) == [0, 1, 4, 5]  # STACK.md's reference FedOT for MiniLM
    assert fedot_layer_choice(12, 7)[0] == 0 and fedot_layer_choice(12, 7)[-1] == 11
    assert len(fedot_layer_choice(12, 7)) == 7
    assert matching_layer_budget(12, 768, 3072, [0, 11], 0.25) == 7  # the paper's 7-of-12 emulator
    assert matching_layer_budget(6, 384, 1536, [0, 5], 0.25) == 4


def test_fedot_drops_layers_and_maps_back(family):
    fm = model_from_config(TINY[family])
    proxy, spec = build_fedot(fm, 3)
    assert len(encoder_layers(proxy)) == 3 and spec.layer_map == [0, 2, 3] or spec.layer_map == [0, 1, 3]
    assert spec.compressed == [1]
    with torch.no_grad():
        proxy(**inputs_for(family))  # runs end to end


def test_skeleton_round_trip(family):
    fm = model_from_config(TINY[family])
    for proxy, spec in (build_fedpft(fm, None, 0.5), build_fedot(fm, 3)):
        skel = skeleton_from_spec(proxy.config, spec)
        skel.load_state_dict(proxy.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(skel(**inputs_for(family)).logits, proxy(**inputs_for(family)).logits)
