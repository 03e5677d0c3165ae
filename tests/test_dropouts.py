"""What the training dropouts do, per algorithm (README, option table):
- rank_dropout: one mask per sample over the rank components, survivors scaled by 1/(1-p)
  (kohya's networks.lora semantics). The components are written here from the README: LoCon the
  columns of lora_up, LoHa the rows of hada_w2_b, LoKr the rows of lokr_w2_b (lokr_w2 when full).
  With DoRA one mask per step (the norm is of one weight).
- dropout: elementwise on the rank activation, scaled by 1/(1-p); deterministic in eval.
- module_dropout: the whole module sits a call out.
None of them acts in eval mode, in max-norm or in merges."""
import functools
import itertools

import pytest
import torch
from torch import nn

import lycoris_kohya

from conftest import randomize
from oracle import adapter_sd, reference_delta

COMPONENT = {"locon": ("lora_up.weight", 1), "loha": ("hada_w2_b", 0), "lokr": ("lokr_w2_b", 0),
             "lokr_full": ("lokr_w2", 0)}


def adapter(kind, layer, rank=2, **kw):
    algo = "lokr" if kind.startswith("lokr") else kind
    extra = {"full_matrix": True} if kind == "lokr_full" else {}
    cls = functools.partial(lycoris_kohya.algos.Adapter, algorithm=lycoris_kohya.algos.ALGORITHMS[algo])
    a = cls("lora_x", layer, rank=rank, alpha=2.0, forward_path="structured", **extra, **kw)
    randomize(a, seed=3, std=0.3)
    a.apply_to()
    return a


def subset_outputs(a, layer, x, kind, p):
    """{kept components: the layer's output when only those components act, scaled by 1/(1-p)}."""
    key, dim = COMPONENT[kind]
    sd = {k: v.detach() for k, v in adapter_sd(a).items()}
    n = sd[f"lora_x.{key}"].shape[dim]
    out = {}
    for keep in itertools.product([0.0, 1.0], repeat=n):
        masked = dict(sd)
        shape = [1] * masked[f"lora_x.{key}"].dim()
        shape[dim] = n
        masked[f"lora_x.{key}"] = masked[f"lora_x.{key}"] * torch.tensor(keep).reshape(shape)
        g, dw = reference_delta(masked, "lora_x", layer.weight.shape)
        w = layer.weight.detach() + g * dw / (1 - p)
        out[keep] = nn.functional.linear(x, w, layer.bias) if isinstance(layer, nn.Linear) else \
            nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding)
    return out


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "lokr_full"])
@pytest.mark.parametrize("conv", [False, True])
def test_rank_dropout_drops_components_per_sample(kind, conv):
    torch.manual_seed(0)
    # LoKr: out 24 = 4 x 6 and in 32 = 4 x 8 leave w2 low-rank at rank 2; a full w2 of out 4 = 2 x 2
    # has 2 rows, so few subsets to enumerate
    n_in, n_out = {"locon": (8, 6), "loha": (8, 6), "lokr": (32, 24), "lokr_full": (8, 4)}[kind]
    layer = nn.Conv2d(n_in, n_out, 3, padding=1) if conv else nn.Linear(n_in, n_out)
    a = adapter(kind, layer, rank_dropout=0.5)
    assert kind != "lokr" or a.layout.w2_lowrank
    a.train()
    one = torch.randn(1, n_in, 5, 5) if conv else torch.randn(1, 3, n_in)
    x = one.repeat(16, *([1] * (one.dim() - 1)))  # 16 copies of one sample
    with torch.no_grad():
        y = layer(x)
    options = subset_outputs(a, layer, one, kind, 0.5)
    seen = set()
    for i in range(x.shape[0]):
        match = [k for k, v in options.items() if torch.allclose(y[i:i + 1], v, atol=1e-5)]
        assert match, f"sample {i}: not the output of any subset of components"
        seen.add(match[0])
    assert len(seen) > 1, "every sample got the same mask: not per sample"
    a.eval()
    with torch.no_grad():
        assert torch.allclose(layer(one), subset_outputs(a, layer, one, kind, 0.0)[(1.0,) * len(next(iter(options)))], atol=1e-5)


def test_loha_rank_dropout_per_sample_on_its_few_token_path():
    """LoHa at no more tokens than its rank (1 token per sample, 4 samples, rank 4) takes the path
    without Khatri-Rao factors; rank dropout there is still one mask per sample."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    a = adapter("loha", layer, rank=4, rank_dropout=0.5)
    a.train()
    one = torch.randn(1, 1, 8)
    options = subset_outputs(a, layer, one, "loha", 0.5)
    seen = set()
    for _ in range(8):
        x = one.repeat(4, 1, 1)  # 4 tokens in all: <= r2 = 4
        with torch.no_grad():
            y = layer(x)
        for i in range(4):
            match = [k for k, v in options.items() if torch.allclose(y[i:i + 1], v, atol=1e-5)]
            assert match, f"sample {i}: not the output of any subset of components"
            seen.add(match[0])
    assert len(seen) > 4, "samples did not get masks of their own"


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_rank_dropout_with_dora_is_one_mask_per_step(kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    a = adapter(kind, layer, rank_dropout=0.5, dora_axis="input")
    a.train()
    one = torch.randn(1, 3, 16)
    x = one.repeat(8, 1, 1)
    outs = []
    for _ in range(20):
        with torch.no_grad():
            y = layer(x)
        assert all(torch.allclose(y[i], y[0], atol=1e-6) for i in range(8)), "masks differ between samples"
        outs.append(y[0])
    assert any(not torch.allclose(o, outs[0], atol=1e-6) for o in outs), "the mask never changed between steps"


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr"])
def test_neuron_dropout_is_random_in_training_unbiased_and_off_in_eval(kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    a = adapter(kind, layer, dropout=0.5)
    x = torch.randn(4, 16)
    a.eval()
    with torch.no_grad():
        ref = layer(x)
        assert torch.equal(layer(x), ref)
        base = nn.functional.linear(x, layer.weight, layer.bias)
        a.train()
        draws = torch.stack([layer(x) for _ in range(4000)])
    assert not torch.allclose(draws[0], draws[1])
    # E[y] = the no-dropout output (dropout rescales by 1/(1-p)); the delta is what varies
    err = (draws.mean(0) - ref).abs().max() / (ref - base).abs().max()
    assert err < 0.05, err


def test_module_dropout_skips_whole_calls():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    a = adapter("loha", layer, module_dropout=0.5)
    x = torch.randn(4, 16)
    with torch.no_grad():
        a.eval()
        full = layer(x)
        base = nn.functional.linear(x, layer.weight, layer.bias)
        a.train()
        outs = [layer(x) for _ in range(40)]
    skipped = sum(torch.equal(o, base) for o in outs)
    kept = sum(torch.allclose(o, full, atol=1e-6) for o in outs)
    assert skipped + kept == 40 and 5 < skipped < 35


def test_max_norm_and_merge_ignore_dropouts():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    a = adapter("loha", layer, rank_dropout=0.75, dropout=0.5, module_dropout=0.5)
    a.train()
    g, dw = reference_delta({k: v.detach() for k, v in adapter_sd(a).items()}, "lora_x", layer.weight.shape)
    assert a.delta_norm() == pytest.approx(float((g * dw).norm()), rel=1e-5)
    assert torch.allclose(a.merged_weight(1.0), layer.weight + g * dw, atol=1e-6)
