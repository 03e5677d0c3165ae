"""Quantised and swapped base layers: musubi-tuner's --fp8_scaled and --blocks_to_swap, and plain
fp8 weights (sd-scripts' and musubi's --fp8_base).

--fp8_scaled (musubi's modules/fp8_optimization_utils.py, restated here, not imported): a Linear's
weight is stored as float8_e4m3fn next to a ``scale_weight`` buffer in the original dtype, per tensor
(``[]``; pre-quantised ComfyUI files give ``[1]``), per output row (``[out, 1]``) or per block of 64
inputs along each row (``[out, in/64, 1]``), and ``forward`` is replaced on the instance by one that
dequantises (``weight.to(scale.dtype) * scale``, block-wise through an ``[out, blocks, 64]`` view)
and calls ``F.linear``. Every adapter over such a layer must behave as over the dequantised weight:

    W = deq(W0) + m*g*dW;   DoRA (SPEC section 3): V = deq(W0) + g*dW, W_d = V * dora_scale/||V||
    (per input column, or per output row), W = deq(W0) + m*(W_d - deq(W0))

the training forward and its gradients, the initial magnitude, merged/effective weights, and
never a fold or a merge into the fp8 tensor. --fp8_base: the fp8 values are the weight, run under
autocast. --blocks_to_swap (modules/custom_offloading_utils.py): the same module objects, their
``.weight.data`` replaced between calls (the storage a block leaves is refilled with the block
coming in), or the Parameter itself rebound (--block_swap_h2d_only); biases and buffers stay.
"""
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lycoris_kohya
from lycoris_kohya.algos import ALGORITHMS, Adapter

import musubi_like as ml
from oracle import adapter_sd, reference_delta

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
BLOCK = 64  # musubi's default block size
IN, OUT = 2 * BLOCK, 40
MODES = ["tensor", "channel", "block"]
ALGOS = ["locon", "loha", "lokr"]
AXES = [None, "input", "output"]
PATHS = ["auto", "fold", "structured"]


# ----- musubi's --fp8_scaled, restated -------------------------------------------------------------
def _fp8_scaled_forward(self, x):
    s = self.scale_weight
    if s.dim() < 3:
        w = self.weight.to(s.dtype) * s
    else:
        out, blocks, _ = s.shape
        w = (self.weight.to(s.dtype).contiguous().view(out, blocks, -1) * s).view(self.weight.shape)
    return F.linear(x, w, self.bias)


def fp8_scaled(layer, mode, block=BLOCK, tensor_shape=()):
    """Quantise ``layer`` in place as musubi's quantize_weight + apply_fp8_monkey_patch do."""
    w = layer.weight.detach()
    w32, (out, n_in) = w.float(), w.shape
    if mode == "block" and n_in % block:
        mode = "channel"  # musubi falls back to per row where the block does not divide in
    if mode == "block":
        v = w32.reshape(out, n_in // block, block)
        s = v.abs().amax(dim=2, keepdim=True) / FP8_MAX
    elif mode == "channel":
        v, s = w32, w32.abs().amax(dim=1, keepdim=True) / FP8_MAX
    else:
        v, s = w32, (w32.abs().max() / FP8_MAX).reshape(tensor_shape)
    s = s.clamp(min=1e-8)
    q = (v / s).nan_to_num(0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(out, n_in)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.register_buffer("scale_weight", s.to(w.dtype))
    layer.forward = types.MethodType(_fp8_scaled_forward, layer)
    return layer


def deq(layer):
    """The test's own dequantisation, fp32: the fp8 values times the scale."""
    q, s = layer.weight.detach().float(), layer.scale_weight.detach().float()
    if s.dim() == 3:
        return (q.reshape(s.shape[0], s.shape[1], -1) * s).reshape(q.shape)
    return q * s


def fp8_bits(t):
    return t.detach().view(torch.uint8).clone()


# ----- the reference ---------------------------------------------------------------------------------
def norm_on(v, axis):
    return v.norm(dim=0, keepdim=True) if axis == "input" else v.norm(dim=1, keepdim=True)


def reference_weight(a, w0, m=None):
    """The closed form over the base weight ``w0`` (differentiable in the adapter's tensors)."""
    m = a.multiplier if m is None else m
    g, dw = reference_delta(adapter_sd(a), a.lora_name, w0.shape)
    if a.dora_axis is None:
        return w0 + m * g * dw
    v = w0 + g * dw
    n = norm_on(v, a.dora_axis)
    return w0 + m * (v * a.dora_scale.reshape(n.shape) / n - w0)


def make_adapter(layer, algo, axis, path="auto", m=0.7, seed=1, name="lora_unet_x"):
    a = Adapter(name, layer, ALGORITHMS[algo], rank=4, alpha=2.0, multiplier=m, dora_axis=axis,
                forward_path=path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n == "dora_scale":
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    a.apply_to()
    return a


def close(got, want, tol, what=""):
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-12
    assert err <= tol * scale, f"{what}: max error {err:.3g} against max {scale:.3g}"


def check_step(layer, a, w0, x, tol=2e-5, gtol=2e-5):
    """One training forward and backward of ``layer`` against F.linear with the closed-form weight
    over ``w0``: the output, and the gradients of the input and of every adapter tensor."""
    x = x.detach().requires_grad_(True)
    params = [p for p in a.parameters() if p.requires_grad]
    y = layer(x)
    with torch.autocast("cpu", enabled=False):  # the reference in fp32, whatever the step runs under
        want = F.linear(x.float(), reference_weight(a, w0), None if layer.bias is None else layer.bias.float())
    close(y, want, tol, "output")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(y.dtype)
    got = torch.autograd.grad(y, [x, *params], gy)
    ref = torch.autograd.grad(want, [x, *params], gy.float())
    for name, g, r in zip(["x"] + [n for n, p in a.named_parameters() if p.requires_grad], got, ref):
        close(g, r, gtol, f"grad {name}")


def no_fold(monkeypatch):
    def folded(*_, **__):
        raise AssertionError("folded into a quantised layer")
    monkeypatch.setattr(Adapter, "folded", folded)


def inputs(seed=0, shape=(3, 5, IN)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def fp8_scaled_layer(mode, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return fp8_scaled(nn.Linear(IN, OUT).to(dtype).requires_grad_(False), mode, **kw)


# ----- --fp8_scaled ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [0.7, 1.0])
def test_fp8_scaled_training_step_is_the_closed_form_over_the_dequantised_weight(mode, axis, algo, path, m,
                                                                                 monkeypatch):
    no_fold(monkeypatch)
    layer = fp8_scaled_layer(mode)
    stored = fp8_bits(layer.weight)
    a = make_adapter(layer, algo, axis, path, m=m)
    a.train()
    assert not a.folds(inputs(), (), {}) and not a.folds(inputs(), (), {}, dora=True)
    check_step(layer, a, deq(layer), inputs())
    assert layer.weight.dtype == FP8 and torch.equal(fp8_bits(layer.weight), stored)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("algo", ALGOS)
def test_fp8_scaled_weights_read_are_the_dequantised_ones(mode, axis, algo):
    layer = fp8_scaled_layer(mode)
    w0 = deq(layer)
    a = Adapter("lora_unet_x", layer, ALGORITHMS[algo], rank=4, alpha=2.0, multiplier=0.7, dora_axis=axis)
    if axis is not None:  # the initial magnitude is ||deq(W0)||, so that the adapter starts as the layer
        close(a.dora_scale.detach(), norm_on(w0, axis), 1e-6, "initial dora_scale")
    close(a.weight_below(), w0, 1e-7, "weight below, not installed")
    a = make_adapter(layer, algo, axis, m=0.7)
    close(a.weight_below(), w0, 1e-7, "weight below")
    want = reference_weight(a, w0).detach()
    close(a.effective_weight(), want, 1e-6, "effective weight")
    close(a.merged_weight(), want, 1e-6, "merged weight")
    close(a.merged_weight(0.3), reference_weight(a, w0, m=0.3).detach(), 1e-6, "merged weight at 0.3")
    a.eval()
    with torch.no_grad():
        close(layer(inputs()), F.linear(inputs(), want, layer.bias), 2e-5, "eval output")


@pytest.mark.parametrize("shape", [(), (1,)])
def test_fp8_scaled_per_tensor_scale_of_either_shape(shape):
    layer = fp8_scaled_layer("tensor", tensor_shape=shape)
    assert tuple(layer.scale_weight.shape) == shape
    a = make_adapter(layer, "locon", "output")
    a.train()
    check_step(layer, a, deq(layer), inputs())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algo,axis", [("locon", None), ("loha", "input"), ("lokr", "output")])
def test_fp8_scaled_in_bf16_under_autocast(mode, algo, axis):
    """musubi's usual setting: bf16 original weights (so a bf16 scale), bf16 activations, autocast."""
    layer = fp8_scaled_layer(mode, dtype=torch.bfloat16)
    w0 = deq(layer)
    a = make_adapter(layer, algo, axis)
    a.train()
    with torch.autocast("cpu", torch.bfloat16):
        check_step(layer, a, w0, inputs().bfloat16(), tol=3e-2, gtol=5e-2)


def test_a_scale_of_an_unknown_layout_is_an_error_not_a_weight():
    layer = fp8_scaled_layer("channel")
    layer.scale_weight = torch.ones(3, 2)  # neither per tensor, per row nor block-wise
    with pytest.raises(ValueError, match="scale_weight"):
        Adapter("lora_unet_x", layer, ALGORITHMS["locon"], rank=4, alpha=2.0, dora_axis="input")


@pytest.mark.parametrize("second", [("locon", None), ("loha", "input"), ("lokr", "output")])
def test_networks_stacked_over_an_fp8_scaled_layer(second):
    layer = fp8_scaled_layer("block")
    first = make_adapter(layer, "loha", "output", m=0.8, seed=2, name="lora_unet_first")
    b = make_adapter(layer, *second, m=0.6, seed=3, name="lora_unet_second")
    w_first = reference_weight(first, deq(layer)).detach()
    close(b.weight_below(), w_first, 1e-6, "weight below the second")
    b.train()
    first.eval()
    check_step(layer, b, w_first, inputs(), gtol=5e-5)


class InputHook(nn.Module):
    """A hook that is not a weight change (ControlNet-LLLite-like: it shifts the input, then calls
    the forward below it), installed over the fp8 forward."""

    def __init__(self, layer):
        super().__init__()
        self.cond = torch.randn(layer.in_features, generator=torch.Generator().manual_seed(3))
        self.org_forward = layer.forward
        layer.forward = self.forward

    def forward(self, x):
        return self.org_forward(x + self.cond)


@pytest.mark.parametrize("algo,axis", [("locon", None), ("locon", "input"), ("loha", "output"), ("lokr", "input")])
def test_over_an_unknown_hook_over_an_fp8_scaled_layer(algo, axis):
    """The hook's output is kept; the adapter adds m*(W - W0)x with W0 the dequantised weight."""
    layer = fp8_scaled_layer("block")
    hook = InputHook(layer)
    w0 = deq(layer)
    a = make_adapter(layer, algo, axis)
    a.train()
    assert a.weight_below() is None
    x = inputs().requires_grad_(True)
    params = [p for p in a.parameters() if p.requires_grad]
    y = layer(x)
    want = F.linear(x + hook.cond, w0, layer.bias) + F.linear(x, reference_weight(a, w0) - w0)
    close(y, want, 2e-5, "output")
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11))
    for i, (g, r) in enumerate(zip(torch.autograd.grad(y, [x, *params], gy), torch.autograd.grad(want, [x, *params], gy))):
        close(g, r, 2e-5, f"grad {i}")


def test_merging_into_an_fp8_scaled_layer_is_refused():
    layer = fp8_scaled_layer("block")
    stored, scale = fp8_bits(layer.weight), layer.scale_weight.clone()
    a = make_adapter(layer, "locon", "input")
    with pytest.raises(ValueError, match="fp8_scaled"):
        a.merge_into_layer()
    with pytest.raises(ValueError, match="fp8_scaled"):
        a.merged_weight(base=layer.weight.detach())  # what network.merge_to passes
    assert torch.equal(fp8_bits(layer.weight), stored) and torch.equal(layer.scale_weight, scale)


def quantise_model(model, mode):
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.requires_grad_(False)
            fp8_scaled(m, mode, block=4)


@pytest.mark.parametrize("mode", ["channel", "block"])
def test_a_musubi_network_over_an_fp8_scaled_transformer(mode):
    """create_arch_network over a Wan miniature loaded with --fp8_scaled (every Linear quantised
    before the network is built, as musubi does): each adapted layer trains as the closed form over
    its dequantised weight; --base_weights / merge_to into the quantised model is an error, with
    nothing written."""
    torch.manual_seed(0)
    model = ml.build("wan")
    quantise_model(model, mode)
    net = lycoris_kohya.create_arch_network(1.0, 4, 2.0, None, None, model, algo="lokr", dora_wd="true")
    for a in net.unet_loras:  # initial magnitude ||deq(W0)||: the adapter starts as the layer
        close(a.dora_scale.detach(), norm_on(deq(a.layer), a.dora_axis), 1e-6, a.lora_name)
    net.apply_to(None, model, apply_text_encoder=False, apply_unet=True)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("dora_scale"):
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    net.train()
    assert net.unet_loras
    for a in net.unet_loras:
        check_step(a.layer, a, deq(a.layer), inputs(shape=(2, 3, a.layer.in_features)), gtol=5e-5)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    stored = {a.lora_name: fp8_bits(a.layer.weight) for a in net.unet_loras}
    target = ml.build("wan")
    quantise_model(target, mode)
    before = {n: fp8_bits(m.weight) for n, m in target.named_modules() if isinstance(m, nn.Linear)}
    merger = lycoris_kohya.create_arch_network_from_weights(1.0, sd, unet=target, for_inference=True)
    with pytest.raises(ValueError, match="fp8_scaled"):
        merger.merge_to(None, target, sd, torch.bfloat16, "cpu")
    assert all(torch.equal(fp8_bits(m.weight), before[n]) for n, m in target.named_modules() if isinstance(m, nn.Linear))
    assert all(torch.equal(fp8_bits(a.layer.weight), stored[a.lora_name]) for a in net.unet_loras)


# ----- plain fp8 (--fp8_base) ------------------------------------------------------------------------
def fp8_base_layer(seed=0):
    """sd-scripts' --fp8_base on Flux / SD3 (and musubi's without --fp8_scaled): the model cast to
    float8_e4m3fn, bias included, run under autocast."""
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT).requires_grad_(False).to(FP8)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("path", PATHS)
def test_fp8_base_under_bf16_autocast(axis, algo, path):
    layer = fp8_base_layer()
    w0 = layer.weight.detach().float()  # the fp8 values are the weight
    a = make_adapter(layer, algo, axis, path)
    if axis is not None:
        fresh = Adapter("lora_unet_y", fp8_base_layer(), ALGORITHMS[algo], rank=4, alpha=2.0, dora_axis=axis)
        close(fresh.dora_scale.detach(), norm_on(w0, axis), 1e-6, "initial dora_scale")
    close(a.merged_weight(), reference_weight(a, w0).detach(), 1e-6, "merged weight")
    assert a.merged_weight().dtype == torch.float32
    a.train()
    # bf16 rounding measures at most 6e-3 of the largest output here; a merged weight rounded to fp8
    # (the base's dtype) before the op measures 1.3e-2 and more
    for x in (inputs(), inputs().bfloat16()):
        with torch.autocast("cpu", torch.bfloat16):
            check_step(layer, a, w0, x, tol=1e-2, gtol=5e-2)


@pytest.mark.parametrize("axis", AXES)
def test_merging_into_a_plain_fp8_layer_rounds_the_merged_weight_to_fp8(axis):
    layer = fp8_base_layer()
    w0 = layer.weight.detach().float()
    a = make_adapter(layer, "locon", axis)
    want = reference_weight(a, w0).detach()
    a.merge_into_layer()
    assert layer.weight.dtype == FP8
    # within half an fp8 (e4m3) step of the merged weight: 2^-4 relative, 2^-10 at the subnormals
    err = (layer.weight.float() - want).abs()
    assert bool((err <= want.abs() * 2 ** -4 + 2 ** -10).all()), err.max()


# ----- block swap ----------------------------------------------------------------------------------
def offload_swap(to_cpu, to_cuda):
    """ModelOffloader.swap_weight_devices, on the CPU: the weight leaving gets a new tensor (the copy to
    the host), and the one coming in is copied into the storage it leaves and takes it over (the
    storage pointer is kept, its values change). Biases and buffers (scale_weight) stay."""
    cuda_view, cpu_view = to_cpu.weight.data, to_cuda.weight.data
    to_cpu.weight.data = cuda_view.clone()
    cuda_view.copy_(cpu_view)
    to_cuda.weight.data = cuda_view


def swapped_pair(kind, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(IN, OUT).requires_grad_(False) for _ in range(2)]
    if kind == "fp8_scaled":
        for layer in layers:
            fp8_scaled(layer, "block")
    return layers


def held_weight(layer):
    return deq(layer) if hasattr(layer, "scale_weight") else layer.weight.detach().float().clone()


@pytest.mark.parametrize("kind", ["fp8_scaled", "plain"])
@pytest.mark.parametrize("algo,axis", [("locon", None), ("loha", "output"), ("lokr", "input"),
                                       ("locon", "input"), ("loha", None)])
@pytest.mark.parametrize("path", ["auto", "fold", "structured"])
def test_block_swap_between_calls(kind, algo, axis, path):
    """Each call matches the closed form over the weight the layer holds at that call: after
    ModelOffloader's swaps (storage moved, then reused), after the values under an unchanged storage
    pointer change (a swap into a reused buffer; Krea 2's external base swap), and after the
    Parameter itself is rebound (LoRAStreamOffloader)."""
    a_layer, b_layer = swapped_pair(kind)
    adapters = [make_adapter(layer, algo, axis, path, seed=5 + i, name=f"lora_unet_{i}")
                for i, layer in enumerate((a_layer, b_layer))]
    for a in adapters:
        a.train()
    x = inputs()

    def step():
        for layer, a in zip((a_layer, b_layer), adapters):
            check_step(layer, a, held_weight(layer), x)

    step()
    offload_swap(a_layer, b_layer)
    step()
    offload_swap(b_layer, a_layer)
    step()
    before = held_weight(a_layer)
    # new values in the same storage: a's weight (and scale) become b's
    ptr = a_layer.weight.data_ptr()
    a_layer.weight.data.copy_(b_layer.weight.data)
    if kind == "fp8_scaled":
        a_layer.scale_weight.copy_(b_layer.scale_weight)
    assert a_layer.weight.data_ptr() == ptr and not torch.equal(held_weight(a_layer), before)
    step()
    # the Parameter rebound to another tensor
    a_layer.weight = nn.Parameter(torch.flip(a_layer.weight.detach().float(), [0]).to(a_layer.weight.dtype),
                                  requires_grad=False)
    if kind == "fp8_scaled":
        a_layer.scale_weight.copy_(torch.flip(a_layer.scale_weight, [0]))
    step()


@pytest.mark.parametrize("kind", ["fp8_scaled", "plain"])
@pytest.mark.parametrize("algo,axis", [("locon", None), ("loha", "output"), ("lokr", "input"), ("locon", "output")])
@pytest.mark.parametrize("path", ["fold", "structured"])
def test_block_swap_between_forward_and_backward(kind, algo, axis, path):
    """ModelOffloader in training: after a block's forward its weight leaves and the storage it used
    is refilled with another block's weight before that block's backward. An fp8_scaled layer's
    forward saves a dequantised copy, so nothing saved reads the storage and the gradients are the
    forward-time ones. A plain layer's own F.linear saves a view of its weight, stale after the swap
    whatever the adapter does: it takes --gradient_checkpointing, whose recompute reads the weight
    the layer holds in backward (the block's own, moved back)."""
    a_layer, b_layer = swapped_pair(kind)
    a = make_adapter(a_layer, algo, axis, path)
    a.train()
    w0 = held_weight(a_layer)
    x = inputs().requires_grad_(True)
    params = [p for p in a.parameters() if p.requires_grad]
    if kind == "plain":
        from torch.utils.checkpoint import checkpoint
        y = checkpoint(a_layer, x, use_reentrant=False)
    else:
        y = a_layer(x)
    want = F.linear(x, reference_weight(a, w0), a_layer.bias)
    close(y, want, 2e-5, "output")
    # a leaves: its forward-time storage now holds b's weight; a's own values live elsewhere
    old = a_layer.weight.data
    a_layer.weight.data = old.clone()
    old.copy_(b_layer.weight.data)
    b_layer.weight.data = old
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11))
    got = torch.autograd.grad(y, [x, *params], gy)
    ref = torch.autograd.grad(want, [x, *params], gy)
    for i, (g, r) in enumerate(zip(got, ref)):
        close(g, r, 2e-5, f"grad {i}")


def test_a_merge_into_a_partly_quantised_model_writes_nothing():
    """Only some adapted layers quantised (the first block's kept in full precision): merge_to
    refuses before it writes any layer, so the model is never left half merged."""
    torch.manual_seed(0)
    model = ml.build("wan")
    net = lycoris_kohya.create_arch_network(1.0, 4, 2.0, None, None, model, algo="locon")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    target = ml.build("wan")
    linears = [(n, m) for n, m in target.named_modules() if isinstance(m, nn.Linear)]
    for n, m in linears:
        if not n.startswith("blocks.0."):
            m.requires_grad_(False)
            fp8_scaled(m, "channel", block=4)
    assert any(n.startswith("blocks.0.") for n, _ in linears)
    before = {n: m.weight.detach().clone() for n, m in linears}
    merger = lycoris_kohya.create_arch_network_from_weights(1.0, sd, unet=target, for_inference=True)
    with pytest.raises(ValueError, match="Nothing was merged"):
        merger.merge_to(None, target, sd, torch.float32, "cpu")
    for n, m in linears:
        assert torch.equal(fp8_bits(m.weight) if m.weight.dtype == FP8 else m.weight, fp8_bits(before[n])
                           if before[n].dtype == FP8 else before[n]), n
