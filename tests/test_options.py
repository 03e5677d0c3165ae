"""Options whose effect had no test: rs_lora storage, alpha=0, use_scalar on LoKr (with max-norm),
LoRA+ on LoHa/LoKr, merge_to with one side's weights only, grouped convolutions. Expected values
are written from SPEC/README or computed by the closed forms of test_algorithms, never by the code
under test."""
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lycoris_kohya

from conftest import randomize
from test_algorithms import INPUTS, ToyUNet, apply_layer, reference_delta


def forward_matches_file(net, unet, path, m=1.0):
    """The trained forward equals W0 + m*g*dW computed from the file alone, for every layer."""
    sd = load_file(path)
    net.apply_to([], unet)
    net.eval()
    for a in net.loras:
        name = a.lora_name.replace("lora_unet_block_", "")
        layer = getattr(unet.block, name)
        g, dw = reference_delta(sd, a.lora_name, layer.weight.shape)
        x = INPUTS[name]()
        with torch.no_grad():
            assert torch.allclose(layer(x), apply_layer(layer, layer.weight + m * g * dw, x), atol=1e-5), name
    return sd


# ----- alpha ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_rs_lora_stores_an_alpha_every_reader_turns_into_alpha_over_sqrt_r(algo, tmp_path):
    """README: rs_lora scales by alpha/sqrt(r) and stores alpha*sqrt(r). r = 9, alpha = 2:
    the file holds 6 and a reader's 6/9 is 2/3 = 2/sqrt(9)."""
    unet = ToyUNet()
    extra = {"factor": "2"} if algo == "lokr" else {}  # small w1, so that w2 [b, d] is low-rank at rank 9
    net = randomize(lycoris_kohya.create_network(1.0, 9, 2.0, None, [], unet, algo=algo, rs_lora="true", **extra),
                    std=0.1)
    path = str(tmp_path / "rs.safetensors")
    net.save_weights(path, torch.bfloat16, {})
    sd = load_file(path)
    checked = 0
    for a in net.loras:
        if algo == "lokr" and not a.layout.w2_lowrank:
            continue  # both factors full: alpha is a label only (g = 1)
        assert float(sd[a.lora_name + ".alpha"]) == 6.0
        g, _ = reference_delta(sd, a.lora_name, a.layer.weight.shape)
        assert g == pytest.approx(2 / math.sqrt(9)), a.lora_name
        checked += 1
    assert checked >= (1 if algo == "lokr" else 5)  # LoKr at rank 9: only the 48x64 Linear keeps w2 low-rank
    net.save_weights(path, torch.float32, {})
    forward_matches_file(net, unet, path)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_alpha_zero_means_alpha_equals_rank(algo, tmp_path):
    """kohya's rule (README option table): alpha 0 means alpha = rank, so g = 1."""
    unet = ToyUNet()
    net = randomize(lycoris_kohya.create_network(1.0, 2, 0, None, [], unet, algo=algo, conv_dim="3"), std=0.1)
    path = str(tmp_path / "a0.safetensors")
    net.save_weights(path, torch.float32, {})
    sd = forward_matches_file(net, unet, path)
    checked = 0
    for a in net.loras:
        rank = 3 if a.geometry.is_kxk else 2
        if algo == "lokr" and not a.layout.w2_lowrank:
            continue
        assert float(sd[a.lora_name + ".alpha"]) == rank, a.lora_name
        assert reference_delta(sd, a.lora_name, a.layer.weight.shape)[0] == 1.0
        checked += 1
    assert checked >= 3


# ----- use_scalar on LoKr, and max-norm with a scalar ---------------------------------------------
@pytest.mark.parametrize("layout", [{}, {"full_matrix": "true"}, {"use_tucker": "true"}])
def test_use_scalar_on_lokr(layout, tmp_path):
    unet = ToyUNet()
    net = lycoris_kohya.create_network(1.0, 2, 3.0, None, [], unet, algo="lokr", use_scalar="true", **layout)
    net.apply_to([], unet)
    x = INPUTS["conv"]()
    conv = unet.block.conv
    with torch.no_grad():  # the scalar starts at 0: a fresh network is the base model ...
        assert torch.equal(conv(x), apply_layer(conv, conv.weight, x))
    # ... while every stored factor is random, so the first step trains all of them
    for a in net.loras:
        assert all(t.abs().sum() > 0 for t in a.tensors().values()), a.lora_name
        assert a.scalar is not None and float(a.scalar.detach()) == 0.0
    with torch.no_grad():
        for a in net.loras:
            a.scalar.fill_(0.37)
    path = str(tmp_path / "s.safetensors")
    net.save_weights(path, torch.float32, {})
    assert not any(k.endswith("scalar") for k in load_file(path))  # folded: files stay standard
    forward_matches_file(net, unet, path)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_max_norm_with_a_scalar_bounds_the_scaled_update(algo):
    unet = ToyUNet()
    net = randomize(lycoris_kohya.create_network(1.0, 2, 3.0, None, [], unet, algo=algo, use_scalar="true"), std=0.3)
    with torch.no_grad():
        for a in net.loras:
            a.scalar.fill_(2.5)  # the scalar is part of the update and of what is bounded

    def norms():
        sd = net.export_state_dict()  # scalar folded into the zero-init factor
        return {a.lora_name: float(g * dw.norm()) for a in net.loras
                for g, dw in [reference_delta(sd, a.lora_name, a.layer.weight.shape)]}

    before = norms()
    limit = min(before.values()) / 3
    scalars = {a.lora_name: float(a.scalar.detach()) for a in net.loras}
    scaled, _, mx = net.apply_max_norm_regularization(limit, "cpu")
    assert scaled == len(net.loras)
    after = norms()
    assert all(v == pytest.approx(limit, rel=1e-4) for v in after.values()), after
    assert mx == pytest.approx(limit, rel=1e-4)
    # README: with use_scalar the scalar is one of the rescaled factors
    assert all(float(a.scalar.detach()) < scalars[a.lora_name] for a in net.loras)


# ----- LoRA+ on LoHa and LoKr ---------------------------------------------------------------------
@pytest.mark.parametrize("args,up", [
    ({"algo": "loha"}, {"hada_w1_a", "hada_w2_a"}),
    ({"algo": "loha", "use_tucker": "true"}, {"hada_w1_a", "hada_w2_a"}),
    ({"algo": "lokr"}, {"lokr_w2_a"}),
    ({"algo": "lokr", "full_matrix": "true"}, {"lokr_w2"}),
    ({"algo": "lokr", "decompose_both": "true"}, {"lokr_w2_a"}),
])
def test_loraplus_puts_the_up_side_in_its_own_group(args, up):
    """README: LoRA+ trains the up side (hada_w1_a/hada_w2_a, lokr_w2/lokr_w2_a) at lr x ratio."""
    net = lycoris_kohya.create_network(1.0, 2, 3.0, None, [], ToyUNet(), loraplus_unet_lr_ratio="16", **args)
    groups, desc = net.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert desc == ["unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1.6e-3])
    names = {id(p): f"{a.lora_name}.{n}" for a in net.loras for n, p in a.named_parameters()}
    plus = {names[id(p)].split(".", 1)[1] for p in groups[1]["params"]}
    plain = {names[id(p)].split(".", 1)[1] for p in groups[0]["params"]}
    assert plus == up and not (plus & plain)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))


# ----- merge_to with one side's weights ------------------------------------------------------------
@pytest.mark.parametrize("side", ["lora_te_", "lora_unet_"])
def test_merge_to_with_text_encoder_only_or_unet_only_weights(models, tiny_sd, tmp_path, side):
    te, unet = models
    full = randomize(lycoris_kohya.create_network(1.0, 4, 2.0, None, te, unet, algo="loha"), seed=5, std=0.1)
    sd = {k: v for k, v in full.export_state_dict().items() if k.startswith(side)}
    before = {**{f"te.{n}": p.detach().clone() for n, p in te.named_parameters()},
              **{f"unet.{n}": p.detach().clone() for n, p in unet.named_parameters()}}
    merger, weights_sd = lycoris_kohya.create_network_from_weights(0.5, None, None, te, unet, weights_sd=sd,
                                                                   for_inference=True)
    merger.merge_to(te, unet, weights_sd, torch.float32, "cpu")
    changed = 0
    for a in full.loras:
        owner = "te." if a.lora_name.startswith("lora_te_") else "unet."
        key = owner + next(n for n, p in (te if owner == "te." else unet).named_parameters() if p is a.layer.weight)
        if a.lora_name.startswith(side):
            g, dw = reference_delta(sd, a.lora_name, a.layer.weight.shape)
            assert torch.allclose(a.layer.weight, before[key] + 0.5 * g * dw, atol=1e-6), a.lora_name
            changed += 1
        else:
            assert torch.equal(a.layer.weight, before[key]), a.lora_name  # the other side is untouched
    assert changed == (12 if side == "lora_te_" else 79)


# ----- grouped convolutions -----------------------------------------------------------------------
class Transformer2DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)


def grouped_unet():
    unet = nn.Module()
    unet.block = Transformer2DModel()
    return unet


def test_grouped_convolutions_are_left_out_and_files_for_them_refused_by_name(tmp_path):
    net = lycoris_kohya.create_network(1.0, 2, 1.0, None, [], grouped_unet(), conv_dim="2")
    assert [a.lora_name for a in net.loras] == ["lora_unet_block_lin"]
    sd = dict(net.export_state_dict())
    sd["lora_unet_block_grouped.lora_down.weight"] = torch.zeros(2, 4, 3, 3)
    sd["lora_unet_block_grouped.lora_up.weight"] = torch.zeros(8, 2, 1, 1)
    with pytest.raises(ValueError, match="lora_unet_block_grouped"):
        lycoris_kohya.create_network_from_weights(1.0, None, None, [], grouped_unet(), weights_sd=sd)
