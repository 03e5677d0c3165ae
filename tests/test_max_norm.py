"""--scale_weight_norms: apply_max_norm_regularization against norms computed here from the
state dict with the closed-form LoCon delta (kohya's networks.lora semantics, SPEC section 5)."""
import pytest
import torch

import lycoris_kohya

from conftest import randomize


def module_norms(sd):
    """||(alpha/r) * up @ down||_F per module, from the tensors alone."""
    out = {}
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = sd[key].float(), sd[name + ".lora_up.weight"].float()
        r = down.shape[0]
        mid = sd.get(name + ".lora_mid.weight")
        if mid is None:
            dw = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
        else:
            dw = torch.einsum("oa,abhw,bi->oihw", up.reshape(up.shape[0], r), mid.float(), down.reshape(r, -1))
        out[name] = float(dw.norm() * sd[name + ".alpha"].float() / r)
    return out


def network(models, std, **kw):
    te, unet = models
    net = lycoris_kohya.create_network(1.0, 4, 2.0, None, te, unet, conv_dim="4", conv_alpha="1", **kw)
    randomize(net, seed=5, std=std)
    net.apply_to(te, unet)
    return net


def test_returns_python_numbers_over_all_modules_when_nothing_is_scaled(models):
    net = network(models, std=0.01)
    before = module_norms(net.state_dict())
    limit = max(before.values()) * 2
    keys_scaled, mean, mx = net.apply_max_norm_regularization(limit, "cpu")
    assert type(keys_scaled) is int and type(mean) is float and type(mx) is float
    assert keys_scaled == 0
    assert len(before) == len(net.loras) == 91
    assert mean == pytest.approx(sum(before.values()) / len(before), rel=1e-5)
    assert mx == pytest.approx(max(before.values()), rel=1e-5)
    assert mean > 0


def test_rescales_exactly_the_modules_above_the_threshold(models):
    net = network(models, std=0.05)
    sd_before = {k: v.clone() for k, v in net.state_dict().items()}
    before = module_norms(sd_before)
    limit = sorted(before.values())[len(before) // 2]  # the median: about half are above
    above = {n for n, v in before.items() if v > limit}
    keys_scaled, mean, mx = net.apply_max_norm_regularization(limit, "cpu")
    after = module_norms(net.state_dict())
    assert keys_scaled == len(above) > 0
    for name, v in after.items():
        if name in above:
            assert v == pytest.approx(limit, rel=1e-5)
        else:
            for suffix in ("lora_down.weight", "lora_up.weight"):
                assert torch.equal(net.state_dict()[f"{name}.{suffix}"], sd_before[f"{name}.{suffix}"])
    assert max(after.values()) <= limit * (1 + 1e-5)
    assert mx == pytest.approx(max(after.values()), rel=1e-5)
    assert mean == pytest.approx(sum(after.values()) / len(after), rel=1e-5)


def test_measurement_ignores_dropout_masks(models):
    """LyCORIS measures through rank-dropout masks in train mode, so its bound is T/sqrt(1-p)."""
    net = network(models, std=0.05, rank_dropout="0.75", dropout="0.5", module_dropout="0.5")
    net.train()
    before = module_norms(net.state_dict())
    limit = sorted(before.values())[len(before) // 2]
    torch.manual_seed(0)
    net.apply_max_norm_regularization(limit, "cpu")
    after = module_norms(net.state_dict())
    assert max(after.values()) == pytest.approx(limit, rel=1e-5)


def test_tucker_modules_are_bounded_too(models):
    net = network(models, std=0.2, use_tucker="true")
    assert any(a.lora_mid is not None for a in net.loras)
    limit = 0.01
    net.apply_max_norm_regularization(limit, "cpu")
    after = module_norms(net.state_dict())
    assert max(after.values()) <= limit * (1 + 1e-5)
