"""LoCon adapters against closed-form merged weights written here, independently of the package."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lycoris_kohya.algos import Adapter
from lycoris_kohya.algos.locon import LOCON

from conftest import randomize

LoConAdapter = partial(Adapter, algorithm=LOCON)


def make(kind, use_tucker=False, rank=3, alpha=2.0, **kw):
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(10, 7)
    elif kind == "conv1x1":
        layer = nn.Conv2d(6, 5, 1)
    else:
        layer = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    adapter = LoConAdapter("lora_unet_x", layer, rank=rank, alpha=alpha, use_tucker=use_tucker, **kw)
    randomize(adapter, seed=1, std=0.3)
    adapter.apply_to()
    return layer, adapter


def closed_form_delta(a):
    """dW written out from the definition, element by element for Tucker."""
    up = a.lora_up.weight.detach()
    down = a.lora_down.weight.detach()
    r = down.shape[0]
    if a.lora_mid is None:
        return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(a.layer.weight.shape)
    mid = a.lora_mid.weight.detach()
    out_, in_, kh, kw = a.layer.weight.shape
    dw = torch.zeros(out_, in_, kh, kw)
    for o in range(out_):
        for i in range(in_):
            for p in range(r):
                for q in range(r):
                    dw[o, i] += up[o, p, 0, 0] * mid[p, q] * down[q, i, 0, 0]
    return dw


def expected(layer, a, x, m):
    w = layer.weight.detach() + m * (a._alpha_value / a.rank) * closed_form_delta(a)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding)
    return F.linear(x, w, layer.bias)


CASES = [("linear", False), ("conv1x1", False), ("conv3x3", False), ("conv3x3", True)]


@pytest.mark.parametrize("kind,tucker", CASES)
@pytest.mark.parametrize("m", [0.0, 0.5, 1.0])
def test_forward_equals_merged_weight(kind, tucker, m):
    layer, a = make(kind, tucker)
    a.eval()
    a.multiplier = m
    x = torch.randn(4, 10) if kind == "linear" else torch.randn(2, 6, 9, 9)
    got = layer(x)
    want = expected(layer, a, x, m)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    if m == 0:
        assert torch.equal(got, a.base_forward(x))


@pytest.mark.parametrize("kind,tucker", CASES)
def test_delta_and_merged_weight_match_closed_form(kind, tucker):
    layer, a = make(kind, tucker)
    g = 2.0 / 3
    assert torch.allclose(a.delta(), g * closed_form_delta(a), atol=1e-6)
    assert torch.allclose(a.merged_weight(0.5), layer.weight + 0.5 * g * closed_form_delta(a), atol=1e-6)


def test_tucker_only_on_kxk_and_layouts():
    _, a = make("conv3x3", True)
    assert a.lora_down.weight.shape == (3, 6, 1, 1)
    assert a.lora_mid.weight.shape == (3, 3, 3, 3)
    assert a.lora_up.weight.shape == (5, 3, 1, 1)
    _, b = make("conv1x1", True)  # Tucker has no meaning for 1x1: plain layout
    assert b.lora_mid is None and b.lora_down.weight.shape == (3, 6, 1, 1)
    _, c = make("conv3x3", False)
    assert c.lora_down.weight.shape == (3, 6, 3, 3)
    _, d = make("linear")
    assert d.lora_down.weight.shape == (3, 10) and d.lora_up.weight.shape == (7, 3)


def test_fresh_adapter_is_identity():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 4, 3, padding=1)
    a = LoConAdapter("x", layer, rank=2, alpha=1.0)
    a.apply_to()
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))
    assert a.lora_down.weight.abs().sum() > 0  # kaiming-initialised down, zero up


def test_dropouts_are_training_only_and_unbiased():
    layer, a = make("linear", rank=8, rank_dropout=0.5)
    x = torch.randn(20000, 10)
    a.eval()
    ref = layer(x)
    assert torch.equal(ref, layer(x))
    a.train()
    torch.manual_seed(3)
    out = layer(x)
    assert not torch.allclose(out, ref)
    # one mask per sample, rescaled by 1/(1-p): the mean over samples is unbiased
    diff_mean = (out - ref).mean(0).abs().max()
    assert diff_mean < 0.05 * (ref - a.base_forward(x)).abs().mean() + 0.02


def test_module_dropout_skips_whole_calls():
    layer, a = make("linear", module_dropout=0.5)
    a.train()
    x = torch.randn(3, 10)
    base = a.base_forward(x)
    torch.manual_seed(0)
    skipped = sum(torch.equal(layer(x), base) for _ in range(400))
    assert 150 < skipped < 250
    a.eval()
    assert not torch.equal(layer(x), base)


def test_neuron_dropout_changes_training_output_only():
    layer, a = make("linear", dropout=0.5)
    x = torch.randn(5, 10)
    a.eval()
    ref = layer(x)
    a.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), ref)


def test_disabled_adapter_is_base_layer():
    layer, a = make("conv3x3")
    x = torch.randn(1, 6, 8, 8)
    a.enabled = False
    assert torch.equal(layer(x), a.base_forward(x))


@pytest.mark.parametrize("kind,tucker", CASES)
def test_delta_norm_equals_the_dense_norm(kind, tucker):
    _, a = make(kind, tucker)
    assert a.delta_norm() == pytest.approx(float((a.scale * closed_form_delta(a)).norm()), rel=1e-6)
