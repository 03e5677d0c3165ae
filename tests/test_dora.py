"""DoRA (dora_wd=True) on LoCon, LoHa and LoKr, against the formula of SPEC section 3 written here:
V = W0 + g*dW; W_d = V * dora_scale / ||V|| (per input column or output row); W = W0 + m*(W_d - W0)."""
import functools
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lycoris_kohya
from lycoris_kohya.config import ConfigError

from conftest import randomize
from oracle import a1111_weight, apply_layer, column_norm, comfyui_weight, reference_delta, row_norm, trained_weight
from test_algorithms import INPUTS, ToyUNet


ALGOS = {"locon": {"algo": "locon"}, "locon_tucker": {"algo": "locon", "use_tucker": "true"},
         "loha": {"algo": "loha"}, "lokr": {"algo": "lokr"}, "lokr_tucker": {"algo": "lokr", "use_tucker": "true"}}


def build(algo, axis="input", seed=0, **extra):
    unet = ToyUNet()
    args = dict(ALGOS[algo], dora_wd="true", wd_on_output=str(axis == "output"), **extra)
    net = lycoris_kohya.create_network(1.0, 2, 3.0, None, [], unet, **args)
    randomize(net, seed=seed, std=0.2)
    with torch.no_grad():  # magnitudes near ||W0|| but not equal, as after some training
        for a in net.loras:
            a.dora_scale.mul_(0).add_(column_norm(a.layer.weight) if axis == "input" else row_norm(a.layer.weight))
            a.dora_scale.mul_(1 + 0.1 * torch.rand(a.dora_scale.shape))
    return unet, net


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("m", [0.0, 0.5, 1.0])
def test_forward_equals_closed_form(algo, axis, m):
    unet, net = build(algo, axis)
    net.apply_to([], unet)
    net.set_multiplier(m)
    net.eval()
    sd = net.export_state_dict()
    for a in net.loras:
        name = a.lora_name.replace("lora_unet_block_", "")
        layer = getattr(unet.block, name)
        g, dw = reference_delta(sd, a.lora_name, layer.weight.shape)
        w = trained_weight(layer.weight, g, dw, sd[a.lora_name + ".dora_scale"], m, axis)
        x = INPUTS[name]()
        with torch.no_grad():
            got, want = layer(x), apply_layer(layer, w, x)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (algo, axis, m, name, (got - want).abs().max())
            if m == 0:
                assert torch.equal(got, apply_layer(layer, layer.weight, x))


@pytest.mark.parametrize("algo", ["locon", "loha"])
@pytest.mark.parametrize("axis", ["input", "output"])
def test_output_is_linear_in_the_multiplier(algo, axis):
    unet, net = build(algo, axis)
    net.apply_to([], unet)
    net.eval()
    x = INPUTS["conv"]()
    outs = {}
    with torch.no_grad():
        for m in (0.0, 0.5, 1.0, 2.0):
            net.set_multiplier(m)
            outs[m] = unet.block.conv(x)
    assert torch.allclose(outs[0.5], (outs[0.0] + outs[1.0]) / 2, atol=1e-5)
    assert torch.allclose(outs[2.0], 2 * outs[1.0] - outs[0.0], atol=1e-4)


def test_scale_layout_is_a_registered_parameter_initialised_from_w0():
    unet = ToyUNet()
    net = lycoris_kohya.create_network(1.0, 2, 1.0, None, [], unet, algo="locon", dora_wd="true")
    by = {a.lora_name.replace("lora_unet_block_", ""): a for a in net.loras}
    assert tuple(by["lin"].dora_scale.shape) == (1, 64)
    assert tuple(by["conv"].dora_scale.shape) == (1, 32, 1, 1)
    params = {id(p) for p in net.parameters()}
    assert all(id(a.dora_scale) in params for a in net.loras)
    assert torch.allclose(by["conv"].dora_scale, column_norm(unet.block.conv.weight))
    out = lycoris_kohya.create_network(1.0, 2, 1.0, None, [], ToyUNet(), algo="loha", dora_wd="true", wd_on_output="1")
    assert tuple(out.loras[0].dora_scale.shape) == (48, 1)
    # a fresh network (zero delta, magnitude = ||W0||) is the base model
    net.apply_to([], unet)
    x = INPUTS["conv"]()
    assert torch.allclose(unet.block.conv(x), apply_layer(unet.block.conv, unet.block.conv.weight, x), atol=1e-5)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_saved_file_applied_by_ui_formulas_matches_training_on_the_default_axis(algo, tmp_path):
    unet, net = build(algo, "input")
    path = str(tmp_path / "d.safetensors")
    net.save_weights(path, torch.float32, {})
    sd = load_file(path)
    for a in net.loras:
        w0 = a.layer.weight.detach()
        g, dw = reference_delta(sd, a.lora_name, w0.shape)
        scale = sd[a.lora_name + ".dora_scale"]
        for m in (0.5, 1.0):
            trained = a.merged_weight(m)
            assert torch.allclose(comfyui_weight(w0, g, dw, scale, m), trained, atol=1e-5)
            assert torch.allclose(a1111_weight(w0, g, dw, scale, m), trained, atol=1e-5)


def test_output_axis_is_what_comfyui_gets_wrong():
    """Why the default is the input axis: on the output axis ComfyUI's weight differs from training."""
    _, net = build("loha", "output")
    sd = net.export_state_dict()
    a = net.loras[0]
    w0 = a.layer.weight.detach()
    g, dw = reference_delta(sd, a.lora_name, w0.shape)
    comfy = comfyui_weight(w0, g, dw, sd[a.lora_name + ".dora_scale"], 1.0)
    assert not torch.allclose(comfy, a.merged_weight(1.0), atol=1e-3)


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr_tucker"])
def test_reload_is_exact_for_both_axes(algo, axis, tmp_path):
    unet, net = build(algo, axis)
    path = str(tmp_path / "d.safetensors")
    net.save_weights(path, torch.float32, {})
    loaded, _ = lycoris_kohya.create_network_from_weights(0.5, path, None, [], ToyUNet())
    for a, b in zip(net.loras, loaded.loras):
        assert b.dora_axis == axis
        assert torch.equal(a.dora_scale, b.dora_scale)
        assert torch.allclose(a.merged_weight(0.5), b.merged_weight(), atol=1e-6)


def test_merge_to_uses_the_formula(tmp_path):
    unet, net = build("lokr", "input")
    path = str(tmp_path / "d.safetensors")
    net.save_weights(path, torch.float32, {})
    sd = load_file(path)
    target = ToyUNet()
    w0 = target.block.conv.weight.detach().clone()
    merger, weights_sd = lycoris_kohya.create_network_from_weights(0.5, path, None, [], target, for_inference=True)
    merger.merge_to([], target, weights_sd, torch.float32, "cpu")
    g, dw = reference_delta(sd, "lora_unet_block_conv", w0.shape)
    want = trained_weight(w0, g, dw, sd["lora_unet_block_conv.dora_scale"], 0.5, "input")
    assert torch.allclose(target.block.conv.weight, want, atol=1e-5)


@pytest.mark.parametrize("algo", ["locon", "loha"])
def test_bf16_base_and_bf16_network(algo):
    unet, net = build(algo, "input")
    ref_unet = ToyUNet()
    ref_unet.load_state_dict(unet.state_dict())
    unet.to(torch.bfloat16)
    net.to(torch.bfloat16)  # full_bf16: dora_scale moves with the network
    assert all(a.dora_scale.dtype == torch.bfloat16 for a in net.loras)
    net.apply_to([], unet)
    net.eval()
    sd = {k: v.float() for k, v in net.export_state_dict().items()}
    x = INPUTS["conv"]()
    g, dw = reference_delta(sd, "lora_unet_block_conv", unet.block.conv.weight.shape)
    w0 = unet.block.conv.weight.float()
    want = apply_layer(ref_unet.block.conv, trained_weight(w0, g, dw, sd["lora_unet_block_conv.dora_scale"], 1.0, "input"), x)
    with torch.no_grad():
        got = unet.block.conv(x.to(torch.bfloat16)).float()
    assert torch.allclose(got, want, atol=0.05, rtol=0.05)


def test_magnitude_and_factors_train():
    unet, net = build("locon", "input")
    net.apply_to([], unet)
    net.train()
    x = INPUTS["conv"]()
    unet.block.conv(x).square().mean().backward()
    a = [a for a in net.loras if a.lora_name.endswith("_conv")][0]
    assert a.dora_scale.grad is not None and a.dora_scale.grad.abs().sum() > 0
    assert a.lora_up.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("m", [1.0, 0.5])
def test_detached_norm_keeps_the_forward_and_changes_the_gradient_as_documented(algo, axis, m):
    """dora_detach_norm: ||V|| is a constant in backward (DoRA paper section 4.3). Reference: the
    closed form of SPEC section 3 on leaf copies of the stored tensors, with the norm detached here."""
    results = {}
    for detach in (False, True):
        unet, net = build(algo, axis, dora_detach_norm=str(detach))
        net.apply_to([], unet)
        net.set_multiplier(m)
        net.train()
        a = [a for a in net.loras if a.lora_name.endswith("_conv")][0]
        layer, x = unet.block.conv, INPUTS["conv"]()
        y = layer(x)
        y.square().mean().backward()
        got = {k: p.grad.clone() for k, p in a.named_parameters()}

        leaves = {f"{a.lora_name}.{k}": p.detach().clone().requires_grad_(True) for k, p in a.named_parameters()}
        sd = dict(leaves, **{f"{a.lora_name}.alpha": a.alpha.detach()})
        g, dw = reference_delta(sd, a.lora_name, layer.weight.shape)
        w0 = layer.weight.detach()
        v = w0 + g * dw
        norm = column_norm(v) if axis == "input" else row_norm(v)
        if detach:
            norm = norm.detach()
        w = w0 + m * (v * leaves[a.lora_name + ".dora_scale"] / norm - w0)
        y_ref = apply_layer(layer, w, x)
        y_ref.square().mean().backward()
        assert torch.allclose(y, y_ref, atol=1e-5), (algo, axis, m, detach)
        for k, grad in got.items():
            want = leaves[f"{a.lora_name}.{k}"].grad
            assert torch.allclose(grad, want, atol=1e-6, rtol=1e-4), (algo, axis, m, detach, k)
        results[detach] = (y.detach(), got)
    assert torch.equal(results[False][0], results[True][0]) or \
        torch.allclose(results[False][0], results[True][0], atol=1e-6)  # the forward is unchanged
    # and the option does change the gradient of every factor
    for k in results[False][1]:
        if k != "dora_scale":
            assert not torch.allclose(results[False][1][k], results[True][1][k], atol=1e-6, rtol=1e-3), k


def test_bypass_mode_with_dora_is_refused():
    with pytest.raises(ConfigError, match="bypass_mode"):
        lycoris_kohya.create_network(1.0, 2, 1.0, None, [], ToyUNet(), algo="loha", dora_wd="true", bypass_mode="true")


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_bypass_mode_without_dora_is_exact(algo):
    unets = []
    for bypass in ("false", "true"):
        unet = ToyUNet()
        net = lycoris_kohya.create_network(0.7, 2, 3.0, None, [], unet, algo=algo, bypass_mode=bypass)
        randomize(net, seed=4, std=0.2)
        net.apply_to([], unet)
        unets.append(unet)
    assert all(a.bypass for a in net.loras)
    for name, make_x in INPUTS.items():
        x = make_x()
        with torch.no_grad():
            a, b = getattr(unets[0].block, name)(x), getattr(unets[1].block, name)(x)
        assert torch.allclose(a, b, atol=1e-5), name


def test_max_norm_bounds_the_update_inside_the_normalisation():
    unet, net = build("loha", "input")
    scales = {a.lora_name: a.dora_scale.detach().clone() for a in net.loras}

    def norms():  # ||g*dW|| from the stored tensors and the closed form (SPEC section 3)
        sd = net.export_state_dict()
        return {a.lora_name: float(g * dw.norm()) for a in net.loras
                for g, dw in [reference_delta(sd, a.lora_name, a.layer.weight.shape)]}

    limit = min(norms().values()) / 2
    scaled, mean, mx = net.apply_max_norm_regularization(limit, "cpu")
    assert scaled == len(net.loras)
    for a in net.loras:
        assert norms()[a.lora_name] == pytest.approx(limit, rel=1e-4)
        assert torch.equal(a.dora_scale, scales[a.lora_name])
    assert mx == pytest.approx(limit, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_network_created_on_cpu_follows_a_unet_on_the_gpu():
    """kohya creates the network while the UNet may sit elsewhere, then moves it with .to()."""
    unet, net = build("loha", "input")
    unet.to("cuda")
    net.to("cuda")
    assert all(a.dora_scale.device.type == "cuda" for a in net.loras)
    net.apply_to([], unet)
    with torch.no_grad():
        y = unet.block.conv(INPUTS["conv"]().cuda())
    assert y.device.type == "cuda"


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("mode", ["exact", "detach", "tensor_gain"])
@pytest.mark.parametrize("size", ["small", "wide"])
def test_pair_scale_against_the_dense_norm_in_fp64(axis, group, mode, size):
    """dora.pair_scale (norms from P W and Gram matrices, hand-written backward) against
    magnitude / ||W + g P^T Q|| built densely, values and gradients of every input (W through ||W||^2
    too, as when the base below is another trainable network), in fp64, on a small and a wide W."""
    from lycoris_kohya.algos.dora_norms import pair_scale

    gen = torch.Generator().manual_seed(group)
    out, inn, r = (7, 5, 3) if size == "small" else (520, 516, 3)
    check_pair_scale(pair_scale, gen, out, inn, r, axis, group, mode, gradcheck=size == "small")


def check_pair_scale(pair_scale, gen, out, inn, r, axis, group, mode, gradcheck):
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    p, q, w = rnd(r, out), rnd(r, inn * group), rnd(out, inn * group)
    mag = rnd(inn if axis == "input" else out)
    gain = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if mode == "tensor_gain" else 0.7
    detach = mode == "detach"

    def dense(p, q, w, mag, gain):
        v = (w + gain * (p.T @ q)).reshape(out, inn, group)
        n = v.pow(2).sum((0, 2) if axis == "input" else (1, 2)).sqrt()
        return mag / (n.detach() if detach else n)

    def ours(p, q, w, mag, gain):
        w3 = w.reshape(out, inn, group)
        w_sq = w3.pow(2).sum((0, 2) if axis == "input" else (1, 2))
        return pair_scale(p, q, w, w_sq, mag, axis, gain, detach)

    assert_scale_matches_dense(ours, dense, {"p": p, "q": q, "w": w, "mag": mag, "gain": gain}, gen, detach,
                               gradcheck=mode == "exact" and gradcheck)


def assert_scale_matches_dense(ours, dense, args, gen, detach, gradcheck):
    """ours(*args) against dense(*args) in fp64: values, and the gradients of every tensor argument
    (named by args' keys; the last is the gain, a number or a tensor) under random output weights."""
    values = list(args.values())
    got, want = ours(*values), dense(*values)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    weights = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    named = [(k, v) for k, v in args.items() if isinstance(v, torch.Tensor)]
    params = [v for _, v in named]
    g_got = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((want * weights).sum(), params, allow_unused=True)
    for (name, x), a, b in zip(named, g_got, g_want):
        a, b = (torch.zeros_like(x) if v is None else v for v in (a, b))
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (name, (a - b).abs().max())
        if name == "mag" or not detach:  # a real comparison, not of two zeros
            assert float(b.abs().max()) > 0, name
    if gradcheck:
        assert torch.autograd.gradcheck(lambda *a: ours(*a, 0.7), tuple(values[:-1]))


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 1), (3, 2, 2, 3, 4), (1, 4, 3, 1, 2)])  # a, b, c, d, kernel positions
@pytest.mark.parametrize("mode", ["exact", "detach", "tensor_gain"])
def test_kron_scale_against_the_dense_norm_in_fp64(axis, shape, mode):
    """dora.kron_scale (LoKr's norms from one pass over W, hand-written backward) against
    magnitude / ||W + g kron(w1, w2)|| with torch.kron built densely: values and gradients of w1, w2,
    W, ||W||^2, magnitude and the gain, in fp64; conv-like kernel positions summed per channel."""
    from lycoris_kohya.algos.dora_norms import kron_scale

    a, b, c, d, k = shape
    out, inn = a * b, c * d
    gen = torch.Generator().manual_seed(a * 100 + b * 10 + k)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    w1, w2, w = rnd(a, c), rnd(b, d * k), rnd(out, inn * k)
    mag = rnd(inn if axis == "input" else out)
    gain = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if mode == "tensor_gain" else 0.7
    detach = mode == "detach"
    dims = (0, 2) if axis == "input" else (1, 2)

    def dense(w1, w2, w, mag, gain):
        v = (w + gain * torch.kron(w1, w2)).reshape(out, inn, k)
        n = v.pow(2).sum(dims).sqrt()
        return mag / (n.detach() if detach else n)

    def ours(w1, w2, w, mag, gain):
        w_sq = w.reshape(out, inn, k).pow(2).sum(dims)
        return kron_scale(w1, w2, w, w_sq, mag, axis, gain, detach)

    assert_scale_matches_dense(ours, dense, {"w1": w1, "w2": w2, "w": w, "mag": mag, "gain": gain}, gen, detach,
                               gradcheck=mode == "exact")


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_bf16_base_is_not_held_in_fp32_between_forward_and_backward(algo, axis, kind):
    """Mixed-precision training (bf16 base, fp32 network): the norms read W0 in fp32, but what the
    step keeps for backward must not include an fp32 copy of W0 (on Flux that would be 4 bytes per
    adapted weight on top of the 2 the model has). Every tensor autograd saves is inspected."""
    torch.manual_seed(0)
    layer = nn.Linear(96, 80) if kind == "linear" else nn.Conv2d(24, 20, 3, padding=1)
    layer.requires_grad_(False).to(torch.bfloat16)
    cls = functools.partial(lycoris_kohya.algos.Adapter, algorithm=lycoris_kohya.algos.ALGORITHMS[algo])
    a = cls("lora_x", layer, rank=4, alpha=2.0, dora_axis=axis, forward_path="structured")
    randomize(a, seed=1, std=0.2)
    a.apply_to()
    x = torch.randn((2, 96) if kind == "linear" else (1, 24, 4, 4), dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.float().sum().backward()
    assert a.dora_scale.grad is not None and x.grad is not None
    w_numel = layer.weight.numel()
    assert any(n >= w_numel for _, n in saved)  # W0 itself is saved (bf16): the check sees the weight
    assert not [(d, n) for d, n in saved if d == torch.float32 and n >= w_numel], saved


@pytest.mark.parametrize("shape", [(24, 10), (12, 5, 3, 3), (1, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_norms_over_blocks_of_rows(monkeypatch, shape, dtype):
    """The CPU's column sums over blocks of rows: blocks of 1 to all rows give ||W||^2 per column."""
    from lycoris_kohya.algos import dora_norms

    w = torch.randn(shape).to(dtype)
    for block in (1, 20, 37, 1 << 20):
        monkeypatch.setattr(dora_norms, "_CPU_BLOCK", block)
        for axis, ref in (("input", column_norm), ("output", row_norm)):
            got = dora_norms.weight_sq(w, axis)
            want = ref(w.float()) ** 2
            assert got.dtype == torch.float32 and got.shape == want.shape, (axis, got.shape)
            assert torch.allclose(got, want, rtol=1e-5), (axis, block)
            assert torch.allclose(dora_norms.weight_norm(w, axis), want.sqrt(), rtol=1e-5)
