"""diffusers' own LoRA loader as an independent oracle for the LoCon files this plugin writes.

A LoCon network (linear, 1x1 conv and 3x3 conv modules in the U-Net, q/k/v/out/fc1/fc2 in the
CLIP text encoder, with a different alpha for the 3x3 convs) gets random weights and is saved
as a .safetensors file. ``StableDiffusionPipeline.load_lora_weights(file)`` +
``fuse_lora(lora_scale=m)`` (diffusers' kohya-key conversion + peft) must then leave, in every
layer we adapt, exactly the weight our ``merged_weight(m)`` computes, must change no other
layer, and the fused pipeline must produce the same U-Net / text encoder outputs as our
forward hooks at multiplier m.

Layers are matched by module identity (the path of ``a.layer`` inside our own copy of the
models), never by turning key names back into paths.
"""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

pytest.importorskip("peft")  # diffusers needs peft to load LoRA weights
pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import lycoris_kohya  # noqa: E402

RANK, ALPHA = 4, 2.0  # linear and 1x1 conv modules: scale 0.5
CONV_DIM, CONV_ALPHA = 4, 1.0  # 3x3 conv modules: scale 0.25
REL_TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one intra-op thread is fastest and avoids OpenMP spin contention
    when other jobs share the CPU (seconds instead of tens of seconds). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def oracle_tiny_sd(tiny_sd):
    """The session's tiny SD folder (conftest.py: build_tiny_sd, seed 0), read only: building a
    second identical one took a second or more."""
    return tiny_sd


def _fresh_models(path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval().requires_grad_(False)
    return te, unet


def _pipeline(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def _network(te, unet, seed=0, std=0.1, **extra):
    net = lycoris_kohya.create_network(
        1.0, RANK, ALPHA, None, te, unet, conv_dim=str(CONV_DIM), conv_alpha=str(CONV_ALPHA), **extra
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # lora_up starts at zero: make every delta non-zero
            p.copy_(torch.randn(p.shape, generator=g) * std)
    net.eval()
    return net


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in _layers(model).items()}


def _kind(layer):
    if isinstance(layer, nn.Linear):
        return "linear"
    return "conv1x1" if tuple(layer.kernel_size) == (1, 1) else "conv3x3"


def _paths(net, te, unet):
    """lora_name -> ("te" | "unet", module path), by identity of the adapted layer."""
    te_ids = {id(m): n for n, m in te.named_modules()}
    unet_ids = {id(m): n for n, m in unet.named_modules()}
    out = {}
    for a in net.text_encoder_loras:
        out[a.lora_name] = ("te", te_ids[id(a.layer)])
    for a in net.unet_loras:
        out[a.lora_name] = ("unet", unet_ids[id(a.layer)])
    return out


def _save(net, tmp_path):
    file = str(tmp_path / "locon_ref.safetensors")
    net.save_weights(file, torch.float32, {"ss_network_module": "lycoris_kohya"})
    return file


@pytest.fixture
def oracle(oracle_tiny_sd, tmp_path):
    """(pipe, te, unet, net, file): a fresh pipeline, our own fresh copies, a random network saved."""
    te, unet = _fresh_models(oracle_tiny_sd)
    net = _network(te, unet)
    file = _save(net, tmp_path)
    pipe = _pipeline(oracle_tiny_sd)
    return pipe, te, unet, net, file


def _load_and_fuse(pipe, file, m):
    from peft.tuners.lora import LoraLayer

    # a state dict, not a path: diffusers 0.3x in offline mode insists on a weight_name for paths
    pipe.load_lora_weights(load_file(file))
    injected = {
        "unet": sorted(n for n, mod in pipe.unet.named_modules() if isinstance(mod, LoraLayer)),
        "te": sorted(n for n, mod in pipe.text_encoder.named_modules() if isinstance(mod, LoraLayer)),
    }
    pipe.fuse_lora(lora_scale=m)
    pipe.unload_lora_weights()  # keeps the fused weights, removes the peft wrappers
    for model in (pipe.unet, pipe.text_encoder):
        assert not any(isinstance(mod, LoraLayer) for mod in model.named_modules()), "peft layers left"
    return injected


def test_network_covers_every_layer_kind(oracle_tiny_sd, tmp_path):
    """The file exercises linear, 1x1 and 3x3 conv U-Net modules and text encoder modules."""
    te, unet = _fresh_models(oracle_tiny_sd)
    net = _network(te, unet)
    file = _save(net, tmp_path)
    kinds = {_kind(a.layer) for a in net.unet_loras}
    assert kinds == {"linear", "conv1x1", "conv3x3"}
    assert len(net.text_encoder_loras) == 12  # 2 CLIP layers x (q, k, v, out, fc1, fc2)
    from safetensors.torch import load_file

    sd = load_file(file)
    assert len(sd) == 3 * len(net.loras)
    conv3 = [a for a in net.unet_loras if _kind(a.layer) == "conv3x3"]
    assert conv3 and all(float(sd[a.lora_name + ".alpha"]) == CONV_ALPHA for a in conv3)
    assert all(tuple(sd[a.lora_name + ".lora_up.weight"].shape[2:]) == (1, 1) for a in conv3)


@pytest.mark.parametrize("m", [1.0, 0.5])
def test_diffusers_fused_pipeline_equals_our_network(oracle, m):
    """load_lora_weights + fuse_lora(lora_scale=m): every adapted layer's fused weight equals our
    merged_weight(m), no other layer changes, and U-Net / text encoder outputs equal our hooks."""
    pipe, te, unet, net, file = oracle
    paths = _paths(net, te, unet)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, te.config.vocab_size, (2, 16), generator=g)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])

    before = {"unet": _weights(pipe.unet), "te": _weights(pipe.text_encoder)}
    # our copies and the pipeline start from the same checkpoint
    for a in net.loras:
        where, path = paths[a.lora_name]
        assert torch.equal(before[where][path], a.layer.weight)
    with torch.no_grad():
        base_h = te(ids).last_hidden_state
        base_eps = unet(sample, t, encoder_hidden_states=base_h).sample

    injected = _load_and_fuse(pipe, file, m)
    # peft wrapped exactly our layers: nothing dropped, nothing extra
    assert injected["unet"] == sorted(p for w, p in paths.values() if w == "unet")
    assert injected["te"] == sorted(p for w, p in paths.values() if w == "te")

    # ----- weights ------------------------------------------------------------------------
    after = {"unet": _weights(pipe.unet), "te": _weights(pipe.text_encoder)}
    changed = {
        (where, n) for where in ("unet", "te") for n in after[where]
        if not torch.equal(after[where][n], before[where][n])
    }
    assert changed == set(paths.values()), (
        f"diffusers changed {len(changed)} layers, the network has {len(net.loras)} modules; "
        f"missing {sorted(set(paths.values()) - changed)[:5]}, extra {sorted(changed - set(paths.values()))[:5]}"
    )

    worst = {}
    for a in net.loras:
        where, path = paths[a.lora_name]
        theirs = after[where][path].float()
        with torch.no_grad():
            ours = a.merged_weight(m)
            base = a.layer.weight.float()
            tol = REL_TOL * float(ours.abs().max())
            diff = float((theirs - ours).abs().max())
            assert diff <= tol, f"{a.lora_name} ({_kind(a.layer)}): max |diffusers - ours| = {diff:.3g} > {tol:.3g}"
            # honesty: a wrong scale (e.g. the linear alpha on a 3x3 conv: 2x, or alpha/rank
            # halved) or a wrong multiplier is far outside the tolerance
            d = a.delta().float()
            for wrong in (base + m * d * 2.0, base + m * d * 0.5, base + d * (m + 0.25)):
                assert float((theirs - wrong).abs().max()) > 100 * tol
        k = "te" if where == "te" else _kind(a.layer)
        worst[k] = max(worst.get(k, 0.0), diff / (tol / REL_TOL))
    assert set(worst) == {"te", "linear", "conv1x1", "conv3x3"}
    print(f"m={m}: max |diffusers - ours| / max|W| by kind: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(worst.items())))

    # ----- outputs: diffusers-fused pipeline vs our forward hooks ------------------------------
    with torch.no_grad():
        theirs_h = pipe.text_encoder(ids).last_hidden_state
        theirs_eps = pipe.unet(sample, t, encoder_hidden_states=theirs_h).sample
        net.apply_to(te, unet)
        net.set_multiplier(m)
        ours_h = te(ids).last_hidden_state
        ours_eps = unet(sample, t, encoder_hidden_states=ours_h).sample

    for name, ours, theirs, base in (("text encoder", ours_h, theirs_h, base_h), ("unet", ours_eps, theirs_eps, base_eps)):
        scale = float(ours.abs().max())
        diff = float((ours - theirs).abs().max())
        effect = float((ours - base).abs().max())
        assert effect > 1e-2 * scale, f"{name}: the network barely changes the output ({effect:.3g})"
        assert diff <= 1e-4 * scale, f"{name}: max |ours - diffusers| = {diff:.3g} (output scale {scale:.3g})"
        print(f"m={m} {name}: max |ours - diffusers| = {diff:.2e}, LoRA effect {effect:.2e}, scale {scale:.2e}")


def test_wrong_conv_alpha_would_be_caught(oracle_tiny_sd, tmp_path):
    """A file whose 3x3 alphas differ from what our network computes with must not match: the
    oracle really reads the per-module alpha (diffusers' alpha_pattern), it is not ignored."""
    te, unet = _fresh_models(oracle_tiny_sd)
    net = _network(te, unet)
    from safetensors.torch import load_file, save_file

    file = str(tmp_path / "wrong_alpha.safetensors")
    sd = load_file(_save(net, tmp_path))
    conv3 = {a.lora_name for a in net.unet_loras if _kind(a.layer) == "conv3x3"}
    for name in conv3:
        sd[name + ".alpha"] = torch.tensor(ALPHA)  # as if conv_alpha had been dropped
    save_file(sd, file)
    pipe = _pipeline(oracle_tiny_sd)
    paths = _paths(net, te, unet)
    _load_and_fuse(pipe, file, 1.0)
    after = {"unet": _weights(pipe.unet), "te": _weights(pipe.text_encoder)}
    for a in net.loras:
        where, path = paths[a.lora_name]
        with torch.no_grad():
            ours = a.merged_weight(1.0)
        diff = float((after[where][path] - ours).abs().max())
        tol = REL_TOL * float(ours.abs().max())
        if a.lora_name in conv3:
            assert diff > 100 * tol, a.lora_name
        else:
            assert diff <= tol, a.lora_name


def test_tucker_locon_is_refused_by_diffusers_not_misread(oracle_tiny_sd, tmp_path):
    """Fact check (not a plugin requirement): diffusers' kohya converter has no lora_mid support,
    so a Tucker LoCon file must be refused loudly rather than loaded with lora_mid ignored."""
    te, unet = _fresh_models(oracle_tiny_sd)
    net = _network(te, unet, use_tucker="true")
    assert any(a.lora_mid is not None for a in net.unet_loras)
    file = _save(net, tmp_path)
    pipe = _pipeline(oracle_tiny_sd)
    before = _weights(pipe.unet)
    with pytest.raises(Exception, match="lora_mid"):
        pipe.load_lora_weights(load_file(file))
    assert all(torch.equal(w, before[n]) for n, w in _weights(pipe.unet).items())
