"""LoCon, LoHa and LoKr in every layout, through the network: the forward equals the merged-weight
formula written here from SPEC section 3 (independently of the package), for m in {0, 0.5, 1};
save -> create_network_from_weights reproduces every layout exactly; merge_to at 0.5 equals
W0 + 0.5*g*dW; peft's LoHa/LoKr layers agree on dW where peft's layout matches."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lycoris_kohya

from conftest import randomize
from oracle import apply_layer, reference_delta  # noqa: F401  (re-exported for other tests)


class Transformer2DModel(nn.Module):  # the class name is what the default targets look for
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 48)
        self.lin_odd = nn.Linear(30, 7)
        self.pw = nn.Conv2d(32, 24, 1)
        self.conv = nn.Conv2d(32, 24, 3, padding=1)
        self.conv_s2 = nn.Conv2d(16, 36, 3, stride=2, padding=1)


class ToyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = Transformer2DModel()


INPUTS = {
    "lin": lambda: torch.randn(3, 5, 64), "lin_odd": lambda: torch.randn(4, 30), "pw": lambda: torch.randn(2, 32, 6, 6),
    "conv": lambda: torch.randn(2, 32, 6, 6), "conv_s2": lambda: torch.randn(2, 16, 7, 7),
}


LAYOUTS = {
    "locon": {"algo": "locon"},
    "locon_tucker": {"algo": "locon", "use_tucker": "true"},
    "locon_scalar": {"algo": "locon", "use_scalar": "true"},
    "loha": {"algo": "loha"},
    "loha_tucker": {"algo": "loha", "use_tucker": "true"},
    "loha_scalar": {"algo": "loha", "use_scalar": "true"},
    # rank 8: lin_odd's 4 tokens take LoHa's few-token path, lin's 15 the Khatri-Rao one
    "loha_rank8": {"algo": "loha", "dim_override": 8},
    "lokr": {"algo": "lokr"},
    "lokr_decompose_both": {"algo": "lokr", "decompose_both": "true"},
    "lokr_full_matrix": {"algo": "lokr", "full_matrix": "true"},
    "lokr_tucker": {"algo": "lokr", "use_tucker": "true"},
    "lokr_unbalanced": {"algo": "lokr", "unbalanced_factorization": "true"},
    "lokr_factor4": {"algo": "lokr", "factor": "4"},
    "lokr_big_rank": {"algo": "lokr", "dim_override": 16},
}


def build(layout, multiplier=1.0, seed=0):
    args = dict(LAYOUTS[layout])
    dim = args.pop("dim_override", 2)
    unet = ToyUNet()
    net = lycoris_kohya.create_network(multiplier, dim, 3.0, None, [], unet, **args)
    randomize(net, seed=seed, std=0.2)
    return unet, net


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("m", [0.0, 0.5, 1.0])
def test_forward_equals_closed_form_merged_weight(layout, m):
    unet, net = build(layout)
    net.apply_to([], unet)
    net.set_multiplier(m)
    net.eval()
    sd = {k: v for k, v in net.export_state_dict().items()}
    for a in net.loras:
        name = a.lora_name.replace("lora_unet_block_", "")
        layer = getattr(unet.block, name)
        g, dw = reference_delta(sd, a.lora_name, layer.weight.shape)
        x = INPUTS[name]()
        with torch.no_grad():
            want = apply_layer(layer, layer.weight + m * g * dw, x)
            got = layer(x)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (layout, name, (got - want).abs().max())
        if m == 0:
            assert torch.allclose(got, apply_layer(layer, layer.weight, x), atol=1e-6)


def test_layouts_are_what_their_names_say():
    suffixes = {}
    for layout in LAYOUTS:
        _, net = build(layout)
        suffixes[layout] = {k.split(".", 1)[1] for k in net.export_state_dict() if k.startswith("lora_unet_block_conv.")}
    assert suffixes["locon_tucker"] >= {"lora_mid.weight"}
    assert suffixes["loha_tucker"] >= {"hada_t1", "hada_t2"}
    assert suffixes["lokr"] == {"alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert suffixes["lokr_full_matrix"] == {"alpha", "lokr_w1", "lokr_w2"}
    assert suffixes["lokr_tucker"] == {"alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    _, both = build("lokr_decompose_both")
    sd = both.export_state_dict()
    # lin 48x64 -> w1 [6, 8]: rank 2 < 8/2, so w1 is low-rank too; conv 24x32 -> w1 [4, 4]: 2 is not < 2
    assert "lora_unet_block_lin.lokr_w1_a" in sd and "lora_unet_block_conv.lokr_w1" in sd
    _, unb = build("lokr_unbalanced")
    lay = [a.layout for a in unb.loras if a.lora_name.endswith("_lin")][0]
    assert (lay.a, lay.b) == (8, 6)  # 48 = 6*8 balanced -> (6, 8); unbalanced swaps it
    _, f4 = build("lokr_factor4")
    lay = [a.layout for a in f4.loras if a.lora_name.endswith("_lin")][0]
    assert (lay.a, lay.c) == (4, 4)
    assert "scalar" not in " ".join(build("loha_scalar")[1].export_state_dict())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_save_reload_is_exact_for_every_layout(layout, tmp_path):
    unet, net = build(layout)
    path = str(tmp_path / "n.safetensors")
    net.save_weights(path, torch.float32, {})
    unet2 = ToyUNet()
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, path, None, [], unet2)
    assert loaded.config.algo == net.config.algo
    for a, b in zip(net.loras, loaded.loras):
        assert a.lora_name == b.lora_name
        assert torch.allclose(a.delta(), b.delta(), atol=1e-6, rtol=1e-6), layout
    net.apply_to([], unet)
    loaded.apply_to([], unet2)
    net.eval(), loaded.eval()
    for name, make_x in INPUTS.items():
        x = make_x()
        with torch.no_grad():
            assert torch.allclose(getattr(unet.block, name)(x), getattr(unet2.block, name)(x), atol=1e-5)
    # and the reloaded network saves the same file
    path2 = str(tmp_path / "n2.safetensors")
    loaded.save_weights(path2, torch.float32, {})
    a_sd, b_sd = load_file(path), load_file(path2)
    assert a_sd.keys() == b_sd.keys() and all(torch.allclose(a_sd[k], b_sd[k], atol=1e-6) for k in a_sd)


@pytest.mark.parametrize("layout", ["loha", "loha_tucker", "lokr", "lokr_tucker", "lokr_full_matrix", "locon_tucker"])
def test_merge_to_at_half_strength(layout, tmp_path):
    unet, net = build(layout)
    path = str(tmp_path / "n.safetensors")
    net.save_weights(path, torch.float32, {})
    sd = load_file(path)
    target = ToyUNet()
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    merger, weights_sd = lycoris_kohya.create_network_from_weights(0.5, path, None, [], target, for_inference=True)
    merger.merge_to([], target, weights_sd, torch.float32, "cpu")
    for name in INPUTS:
        layer = getattr(target.block, name)
        g, dw = reference_delta(sd, f"lora_unet_block_{name}", layer.weight.shape)
        want = before[f"block.{name}.weight"] + 0.5 * g * dw
        assert torch.allclose(layer.weight, want, atol=1e-5), (layout, name)
        if layout == "lokr_full_matrix":
            assert g == 1.0  # both factors full: alpha is ignored


def _peft_delta(kind, layer, r, alpha, tensors, **cfg):
    pytest.importorskip("peft")
    from peft.tuners.loha import LoHaConfig
    from peft.tuners.loha.layer import Conv2d as HaConv, Linear as HaLinear
    from peft.tuners.lokr import LoKrConfig
    from peft.tuners.lokr.layer import Conv2d as KrConv, Linear as KrLinear

    if kind == "loha":
        config = LoHaConfig(r=r, alpha=alpha, **cfg)
        cls = HaConv if isinstance(layer, nn.Conv2d) else HaLinear
    else:
        config = LoKrConfig(r=r, alpha=alpha, **cfg)
        cls = KrConv if isinstance(layer, nn.Conv2d) else KrLinear
    p = cls(layer, "default", config=config, r=r, alpha=alpha)
    with torch.no_grad():
        for name, value in tensors.items():
            store = getattr(p, name)
            assert "default" in store, f"peft has no {name} in this layout"
            assert store["default"].shape == value.shape, (name, store["default"].shape, value.shape)
            store["default"].copy_(value)
    return p.get_delta_weight("default")


@pytest.mark.parametrize("layout,peft_cfg", [
    ("loha", {}), ("loha_tucker", {"use_effective_conv2d": True}),
    ("lokr", {}), ("lokr_tucker", {"use_effective_conv2d": True}), ("lokr_decompose_both", {"decompose_both": True}),
    ("lokr_factor4", {"decompose_factor": 4}),
])
def test_peft_oracle_agrees_on_delta(layout, peft_cfg):
    unet, net = build(layout)
    checked = 0
    for a in net.loras:
        if a.algo == "lokr" and not a.layout.w2_lowrank:
            continue  # peft scales full factors by alpha/r; readers (and we) use g = 1 there
        layer = a.layer
        ours = a.delta()
        theirs = _peft_delta(a.algo, layer, a.rank, a._alpha_value, dict(a.tensors()), **peft_cfg)
        assert torch.allclose(ours, theirs.reshape(ours.shape), atol=1e-5, rtol=1e-5), (layout, a.lora_name)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("layout", ["loha", "lokr", "loha_tucker", "lokr_decompose_both", "locon_tucker"])
def test_max_norm_bounds_every_layout(layout):
    unet, net = build(layout)
    sd0 = net.export_state_dict()
    norms = {a.lora_name: float(g * dw.norm()) for a in net.loras  # closed form, not the code under test
             for g, dw in [reference_delta(sd0, a.lora_name, a.layer.weight.shape)]}
    ordered = sorted(norms.values())
    limit = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two modules' norms
    sd_before = {k: v.clone() for k, v in net.state_dict().items()}
    scaled, mean, mx = net.apply_max_norm_regularization(limit, "cpu")
    assert scaled == sum(v > limit for v in norms.values())
    sd = net.export_state_dict()
    after = {}
    for a in net.loras:
        g, dw = reference_delta(sd, a.lora_name, a.layer.weight.shape)
        after[a.lora_name] = float((g * dw).norm())
        if norms[a.lora_name] > limit:
            assert after[a.lora_name] == pytest.approx(limit, rel=1e-4)
        else:
            assert all(torch.equal(v, sd_before[k]) for k, v in net.state_dict().items() if k.startswith(a.lora_name + "."))
    assert mx == pytest.approx(max(after.values()), rel=1e-4)
    assert mean == pytest.approx(sum(after.values()) / len(after), rel=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_delta_norm_from_factor_identities_equals_the_closed_form(layout):
    """max-norm and the logged norms read ||g*dW|| from Gram matrices / ||kron|| (no dense dW)."""
    unet, net = build(layout)
    sd = net.export_state_dict()
    for a in net.loras:
        g, dw = reference_delta(sd, a.lora_name, a.layer.weight.shape)
        assert a.delta_norm() == pytest.approx(float((g * dw).double().norm()), rel=1e-5), (layout, a.lora_name)
