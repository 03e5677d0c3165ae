"""The forward paths of the LoKr layouts tests/test_option_paths.py's generator does not build
(decompose_both, unbalanced_factorization, factor=4, a rank that forces w2 full), with and without
DoRA, against the merged-weight reference of tests/oracle.py: outputs and gradients (input, factors,
magnitude) in fp32. The paths are forced with forward_path=fold|structured; 'auto' picks one of them
per call, so it is covered by these two plus the cost-model test below. Every other layout (LoCon,
LoHa, LoKr, Tucker, use_scalar, full_matrix, LoHa's few-token path), the multiplier 0.5, bf16 and
bf16 autocast are the generator's (every path, the same closed form, tighter tolerances); here
remain m = 0 (exactly the base), the cost model and the structured paths' promise not to build dW."""
import functools
import pytest
import torch
from torch import nn

import lycoris_kohya
from lycoris_kohya.algos.geometry import LayerGeometry

from conftest import randomize
from oracle import adapter_sd, apply_layer, column_norm, reference_delta, row_norm, trained_weight
from test_algorithms import INPUTS, LAYOUTS, ToyUNet

DORA = {"none": {}, "input": {"dora_wd": "true"}, "output": {"dora_wd": "true", "wd_on_output": "true"}}


def build(layout, path, dora, m=1.0, dtype=torch.float32, seed=0):
    args = dict(LAYOUTS[layout])
    dim = args.pop("dim_override", 2)
    unet = ToyUNet()
    net = lycoris_kohya.create_network(m, dim, 3.0, None, [], unet, forward_path=path, **args, **DORA[dora])
    randomize(net, seed=seed, std=0.2)
    if dora != "none":  # magnitudes away from ||W0||, as after training
        with torch.no_grad():
            for a in net.loras:
                w = a.layer.weight
                a.dora_scale.copy_((column_norm(w) if dora == "input" else row_norm(w)) * (1 + 0.2 * torch.rand(a.dora_scale.shape)))
    unet.to(dtype)
    net.to(dtype)
    net.apply_to([], unet)
    net.train()  # gradients wanted (no dropouts are set, so training mode is deterministic)
    return unet, net


def reference(a, x, m, dora):
    """The layer's output with the merged weight written from SPEC, differentiable in a's tensors."""
    layer = a.layer
    w0 = layer.weight.float()
    g, dw = reference_delta({k: v.float() for k, v in adapter_sd(a).items()}, a.lora_name, w0.shape)
    if dora == "none":
        w = w0 + m * g * dw
    else:
        w = trained_weight(w0, g, dw, a.dora_scale.float().reshape(column_norm(w0).shape if dora == "input"
                                                                    else row_norm(w0).shape), m, dora)
    bias = None if layer.bias is None else layer.bias.float()
    if isinstance(layer, nn.Conv2d):
        return torch.nn.functional.conv2d(x.float(), w, bias, layer.stride, layer.padding)
    return torch.nn.functional.linear(x.float(), w, bias)


def rel(got, want):
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def outputs_and_grads(a, x, run, m):
    """run(x) and the gradients of <run(x), R> for x and every parameter of the adapter."""
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in a.parameters()]
    y = run(x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    grads = torch.autograd.grad((y * r).sum(), [x] + params, allow_unused=True)
    return y, grads, [n for n, _ in a.named_parameters()]


def check(layout, path, dora, m, dtype, tol_out, tol_grad, autocast=False):
    unet, net = build(layout, path, dora, m, dtype)
    for a in net.loras:
        name = a.lora_name.replace("lora_unet_block_", "")
        layer = getattr(unet.block, name)
        x = INPUTS[name]().to(dtype)
        if autocast:
            def ours(x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return layer(x)
        else:
            ours = layer
        got, g_got, names = outputs_and_grads(a, x, ours, m)
        want, g_want, _ = outputs_and_grads(a, x, lambda x: reference(a, x, m, dora), m)
        assert rel(got, want) < tol_out, (layout, path, dora, name, rel(got, want))
        for n, gg, gw in zip(["x"] + names, g_got, g_want):
            if gw is None or float(gw.float().norm()) == 0:
                assert gg is None or float(gg.float().norm()) == 0, (name, n)
                continue
            assert gg is not None, (layout, path, dora, name, n)
            assert rel(gg, gw) < tol_grad, (layout, path, dora, name, n, rel(gg, gw))


# the layouts the generator of tests/test_option_paths.py has no option for
OTHER_LAYOUTS = ["lokr_decompose_both", "lokr_unbalanced", "lokr_factor4", "lokr_big_rank"]


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
@pytest.mark.parametrize("path", ["fold", "structured"])
@pytest.mark.parametrize("dora", list(DORA))
def test_fp32_outputs_and_gradients(layout, path, dora):
    check(layout, path, dora, 1.0, torch.float32, 1e-5, 1e-4)


def test_multiplier_zero_is_the_base_exactly():
    for dora in DORA:
        for path in ("fold", "structured"):
            unet, net = build("loha", path, dora, m=0.0)
            x = INPUTS["conv"]()
            assert torch.equal(unet.block.conv(x), apply_layer(unet.block.conv, unet.block.conv.weight, x))


def test_cost_model_folds_many_tokens_and_keeps_few_structured():
    """SD1.5-wide layers: a training step at latent 8 (4 tokens) runs the structured path; gen_img at
    latent 64 (4096 tokens, no grad) folds; the override wins either way."""
    lin = nn.Linear(1280, 1280)
    a = functools.partial(lycoris_kohya.algos.Adapter, algorithm=lycoris_kohya.algos.ALGORITHMS["loha"])("x", lin, rank=8, alpha=4.0)
    a.apply_to()
    few, many = torch.randn(1, 4, 1280), torch.randn(1, 4096, 1280)
    a.train()
    assert not a.folds(few, (), {})
    with torch.no_grad():
        assert a.folds(many, (), {})
    a.forward_path = "fold"
    assert a.folds(few, (), {})
    a.forward_path = "structured"
    with torch.no_grad():
        assert not a.folds(many, (), {})
    # and never fold over a forward that someone else installed
    a.forward_path = "fold"
    a.remove()
    lin.forward = lambda x, f=lin.forward: f(x)
    a.apply_to()
    assert not a.folds(many, (), {})


def test_structured_paths_do_not_build_the_dense_delta(monkeypatch):
    """The point of the structured paths: dW is never formed (delta() is not called)."""
    for layout in ("locon", "loha", "lokr", "lokr_tucker", "loha_tucker", "locon_tucker"):
        unet, net = build(layout, "structured", "none")
        for a in net.loras:
            monkeypatch.setattr(a.algorithm, "delta", lambda *args: pytest.fail(f"{layout}: dense delta built"))
            name = a.lora_name.replace("lora_unet_block_", "")
            getattr(unet.block, name)(INPUTS[name]()).sum().backward()
            monkeypatch.undo()


def test_positions_of_a_strided_conv():
    g = LayerGeometry.of(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert g.positions(torch.randn(2, 4, 8, 8)) == 2 * 4 * 4
    assert LayerGeometry.of(nn.Linear(4, 4)).positions(torch.randn(3, 5, 4)) == 15
