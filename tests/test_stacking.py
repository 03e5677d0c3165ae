"""Several networks on the same layers (sd-scripts gen_img.py --network_module A B without
--network_merge, networks.lora beside us, ControlNet-LLLite): every adapter calls the forward that
was installed before it. Non-DoRA: the output equals merging both in order. DoRA: the norm is taken
of the weight below (the layer plus the networks under it), which is what --network_merge computes
when it merges in order, so unmerged and merged agree; over a hook that is not a weight change, the
hook's output is kept and the DoRA module adds m*(W_d - W0)x with W_d from the layer's own weight."""
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lycoris_kohya

from conftest import randomize
from oracle import adapter_sd, column_norm, reference_delta, row_norm, trained_weight


class KohyaLoRAModule(nn.Module):
    """What sd-scripts' networks.lora installs on a layer, restated for the test: the original
    forward plus up(down(x)) * multiplier * scale, hooked by replacing ``layer.forward``."""

    def __init__(self, layer, rank=3, alpha=2.0, multiplier=0.8, seed=7):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        if isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        self.multiplier, self.scale = multiplier, alpha / rank
        self.org_forward = layer.forward
        layer.forward = self.forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale

    def merged(self, w):
        dw = (self.lora_up.weight.flatten(1) @ self.lora_down.weight.flatten(1)).reshape(w.shape)
        return w + self.multiplier * self.scale * dw


class InputHook(nn.Module):
    """A hook that is not a weight change (like ControlNet-LLLite: it adds a conditioning signal
    to the layer's input before calling the original forward)."""

    def __init__(self, layer):
        super().__init__()
        n = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
        self.cond = torch.randn(n, generator=torch.Generator().manual_seed(3))
        self.conv = isinstance(layer, nn.Conv2d)
        self.org_forward = layer.forward
        layer.forward = self.forward

    def forward(self, x):
        return self.org_forward(x + (self.cond.reshape(1, -1, 1, 1) if self.conv else self.cond))


LAYERS = {"linear": lambda: nn.Linear(24, 20), "conv": lambda: nn.Conv2d(12, 10, 3, padding=1)}
X = {"linear": lambda: torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0)),
     "conv": lambda: torch.randn(2, 12, 6, 6, generator=torch.Generator().manual_seed(0))}
OURS = {
    "locon": {"algo": "locon"}, "loha": {"algo": "loha"}, "lokr": {"algo": "lokr"},
    "locon_dora": {"algo": "locon", "dora_axis": "input"}, "loha_dora_out": {"algo": "loha", "dora_axis": "output"},
    "lokr_dora": {"algo": "lokr", "dora_axis": "input"},
}


def ours(layer, kind, m, seed, path="auto"):
    cfg = dict(OURS[kind])
    cls = functools.partial(lycoris_kohya.algos.Adapter, algorithm=lycoris_kohya.algos.ALGORITHMS[cfg.pop("algo")])
    a = cls(f"lora_{kind}", layer, rank=2, alpha=3.0, multiplier=m, forward_path=path, **cfg)
    randomize(a, seed=seed, std=0.2)
    if a.dora_axis is not None:
        with torch.no_grad():
            w = layer.weight
            norm = column_norm(w) if a.dora_axis == "input" else row_norm(w)
            a.dora_scale.copy_(norm * (1 + 0.3 * torch.rand(norm.shape, generator=torch.Generator().manual_seed(seed))))
    a.apply_to()
    a.eval()
    return a


def merged_by_formula(a, w_below):
    """What merging adapter ``a`` over the weight ``w_below`` gives (SPEC section 3, written here)."""
    g, dw = reference_delta({k: v.detach().float() for k, v in adapter_sd(a).items()}, a.lora_name, w_below.shape)
    if a.dora_axis is None:
        return w_below + a.multiplier * g * dw
    scale = a.dora_scale.detach().reshape(column_norm(w_below).shape if a.dora_axis == "input"
                                          else row_norm(w_below).shape)
    return trained_weight(w_below, g, dw, scale, a.multiplier, a.dora_axis)


def op(layer, w, x):
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding)
    return F.linear(x, w, layer.bias)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("first,second", list(itertools.product(list(OURS) + ["kohya"], list(OURS))))
@pytest.mark.parametrize("path", ["fold", "structured"])
def test_second_network_composes_with_the_first(kind, first, second, path):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    w0 = layer.weight.detach().clone()
    a = KohyaLoRAModule(layer) if first == "kohya" else ours(layer, first, 0.7, seed=1, path=path)
    b = ours(layer, second, 0.9, seed=2, path=path)
    w_a = a.merged(w0) if first == "kohya" else merged_by_formula(a, w0)
    w_ab = merged_by_formula(b, w_a)
    x = X[kind]()
    with torch.no_grad():
        got = layer(x)
    want = op(layer, w_ab, x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (first, second, (got - want).abs().max())
    # and the first network is really there: without it the output differs
    alone = op(layer, merged_by_formula(b, w0), x)
    assert not torch.allclose(got, alone, atol=1e-3)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("second", list(OURS))
def test_over_a_hook_that_is_not_a_weight(kind, second):
    layer = LAYERS[kind]()
    w0 = layer.weight.detach().clone()
    hook = InputHook(layer)
    b = ours(layer, second, 0.9, seed=2)
    x = X[kind]()
    with torch.no_grad():
        got = layer(x)
        below = op(layer, w0, x + (hook.cond.reshape(1, -1, 1, 1) if kind == "conv" else hook.cond))
    want = below + op(layer, merged_by_formula(b, w0), x) - op(layer, w0, x)
    assert torch.allclose(got, want, atol=1e-5), (second, (got - want).abs().max())


@pytest.mark.parametrize("first", list(OURS))
def test_under_a_hook_installed_later(first):
    layer = LAYERS["linear"]()
    w0 = layer.weight.detach().clone()
    a = ours(layer, first, 0.7, seed=1)
    hook = InputHook(layer)
    x = X["linear"]()
    with torch.no_grad():
        assert torch.allclose(layer(x), op(layer, merged_by_formula(a, w0), x + hook.cond), atol=1e-5)


def test_removing_the_lower_adapter_keeps_the_upper_one_working():
    layer = LAYERS["linear"]()
    w0 = layer.weight.detach().clone()
    a = ours(layer, "loha", 0.7, seed=1)
    b = ours(layer, "locon", 0.9, seed=2)
    x = X["linear"]()
    a.remove()  # b still calls a, which now only passes through
    with torch.no_grad():
        assert torch.allclose(layer(x), op(layer, merged_by_formula(b, w0), x), atol=1e-5)
    b.remove()
    with torch.no_grad():
        assert torch.allclose(layer(x), op(layer, w0, x), atol=1e-6)


def test_networks_on_a_unet_unmerged_equal_merged_in_order(models, tiny_sd, tmp_path):
    """gen_img with two networks: hooks (no --network_merge) against merge_to in order
    (--network_merge), on the tiny SD checkpoint, for a DoRA network over a LoHa one."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    te, unet = models
    files = []
    for i, args in enumerate(({"algo": "loha", "conv_dim": "4"}, {"algo": "locon", "dora_wd": "true", "conv_dim": "4"})):
        net = lycoris_kohya.create_network(0.8, 4, 2.0, None, te, unet, **args)
        randomize(net, seed=10 + i, std=0.05)
        net.apply_to(te, unet)
        net.eval()
        files.append(str(tmp_path / f"n{i}.safetensors"))
        net.save_weights(files[-1], torch.float32, {})
    g = torch.Generator().manual_seed(0)
    x, t, enc = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 77, 32, generator=g)
    fresh = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    fresh_te = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval()
    with torch.no_grad():
        hooked = unet(x, t, enc).sample
        base = fresh(x, t, enc).sample
        for f in files:
            merger, sd = lycoris_kohya.create_network_from_weights(0.8, f, None, fresh_te, fresh, for_inference=True)
            merger.merge_to(fresh_te, fresh, sd, torch.float32, "cpu")
        merged = fresh(x, t, enc).sample
    assert torch.allclose(hooked, merged, atol=1e-4), (hooked - merged).abs().max()
    assert (hooked - base).abs().max() > 1e-2
