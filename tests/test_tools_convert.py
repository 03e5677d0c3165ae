"""``lycoris-kohya convert``: the converted file's merged weights, computed with the formula the target
applies (SPEC section 3, written in the tests: reference_delta, W0 + m*diff, the LoCon formula),
equal the weights the original was trained to give (trained_weight for DoRA); diffusers itself
(load_lora_weights + fuse_lora) is the oracle for files converted for it. What cannot be written
exactly is refused, or truncated with --allow-lossy and the measured error reported."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lycoris_kohya.tools import cli

from test_algorithms import reference_delta
from test_dora import trained_weight
from tools_helpers import _one_thread, layer_paths, network, save, sd1_models  # noqa: F401


def convert(capsys, *argv):
    assert cli.main(["convert", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def trained(sd, name, w0, m):
    """What the original file's module makes of w0 at multiplier m (SPEC formulas)."""
    g, dw = reference_delta(sd, name, w0.shape)
    if name + ".dora_scale" in sd:
        axis = "input" if sd[name + ".dora_scale"].shape[0] == 1 else "output"
        return trained_weight(w0, g, dw, sd[name + ".dora_scale"], m, axis)
    return w0 + m * g * dw


def target_weight(sd, name, w0, m):
    """What the target computes from the converted module: a diff, or the adapter formula
    (input-axis DoRA included, as ComfyUI and A1111 compute it)."""
    if name + ".diff" in sd:
        return w0 + m * sd[name + ".diff"].float()
    return trained(sd, name, w0, m)


@pytest.fixture
def sd1(tiny_sd):
    te, unet = sd1_models(tiny_sd)
    return tiny_sd, te, unet


def _check_same_weights(net, src, out, tol=2e-5):
    a, b = load_file(src), load_file(str(out))
    for x in net.loras:
        w0 = x.layer.weight.detach()
        for m in (0.5, 1.0):
            want, got = trained(a, x.lora_name, w0, m), target_weight(b, x.lora_name, w0, m)
            assert torch.allclose(got, want, atol=tol, rtol=1e-4), (x.lora_name, m, float((got - want).abs().max()))


@pytest.mark.parametrize("both", [False, True])
def test_comfyui_folds_lokr_t2(sd1, tmp_path, capsys, both):
    _, te, unet = sd1
    net = network(te, unet, algo="lokr", use_tucker=True, decompose_both=both, conv_dim=2, std=0.2)
    src = save(net, tmp_path / "a.safetensors")
    assert any(k.endswith("lokr_t2") for k in load_file(src))
    out = tmp_path / "b.safetensors"
    r = convert(capsys, src, "--for", "comfyui", "--out", out)
    sd = load_file(str(out))
    assert not any(k.endswith("lokr_t2") for k in sd)
    folded = [n for n, e in r["modules"].items() if "lokr_t2 folded" in e["action"]]
    assert folded and all(n + ".lokr_w2" in sd for n in folded)
    if both:  # some folded modules keep a factorised lokr_w1 (their alpha is then rank(lokr_w1_b))
        assert any(n + ".lokr_w1_a" in sd for n in folded)
    _check_same_weights(net, src, out)


@pytest.mark.parametrize("target", ["comfyui", "a1111"])
def test_output_axis_dora_as_diff(sd1, tmp_path, capsys, target):
    base, te, unet = sd1
    net = network(te, unet, algo="loha", dora_wd=True, wd_on_output=True)
    src = save(net, tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    assert cli.main(["convert", src, "--for", target, "--out", str(out)]) == 1
    assert "give the base model (--base)" in capsys.readouterr().err and not out.exists()
    convert(capsys, src, "--for", target, "--out", out, "--base", base)
    sd = load_file(str(out))
    assert {k.split(".")[1] for k in sd} == {"diff"}
    _check_same_weights(net, src, out)


@pytest.mark.parametrize("target", ["comfyui", "a1111"])
def test_input_axis_dora_is_left_as_it_is(sd1, tmp_path, capsys, target):
    _, te, unet = sd1
    src = save(network(te, unet, algo="locon", dora_wd=True), tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    r = convert(capsys, src, "--for", target, "--out", out)
    a, b = load_file(src), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {e["action"] for e in r["modules"].values()} == {"unchanged"}


@pytest.mark.parametrize("algo,extra", [("loha", {}), ("lokr", {}), ("locon", {"use_tucker": True}),
                                        ("loha", {"use_tucker": True}), ("lokr", {"dora_wd": True}),
                                        ("locon", {"dora_wd": True, "wd_on_output": True})])
def test_diffusers_gets_plain_locon_with_the_same_weights(sd1, tmp_path, capsys, algo, extra):
    base, te, unet = sd1
    net = network(te, unet, algo=algo, **extra)
    src = save(net, tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    r = convert(capsys, src, "--for", "diffusers", "--out", out, "--base", base)
    sd = load_file(str(out))
    assert {k.split(".", 1)[1] for k in sd} == {"lora_down.weight", "lora_up.weight", "alpha"}
    _check_same_weights(net, src, out)
    assert r["total_relative_error"] < 1e-5


def test_diffusers_itself_applies_a_converted_loha_as_trained(sd1, tmp_path, capsys):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    base, te, unet = sd1
    net = network(te, unet, algo="loha", use_tucker=True, std=0.1)
    src = save(net, tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    convert(capsys, src, "--for", "diffusers", "--out", out, "--base", base)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    with pytest.raises(Exception):  # the original is refused by diffusers
        pipe.load_lora_weights(load_file(src))
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(load_file(str(out)))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    assert not any(isinstance(mod, LoraLayer) for mod in pipe.unet.modules())
    paths = layer_paths(net, [te], unet)
    models = {"unet": dict(pipe.unet.named_modules()), "te0": dict(pipe.text_encoder.named_modules())}
    orig = load_file(src)
    for a in net.loras:
        where, path = paths[a.lora_name]
        w0 = a.layer.weight.detach()
        want = trained(orig, a.lora_name, w0, 0.7)
        got = models[where][path].weight.detach()
        assert torch.allclose(got, want, atol=1e-5 * (1 + float(want.abs().max())), rtol=1e-4), a.lora_name
        assert not torch.allclose(got, w0, atol=1e-6)


def test_lossy_only_when_asked(sd1, tmp_path, capsys):
    base, te, unet = sd1
    net = network(te, unet, algo="loha")
    src = save(net, tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    assert cli.main(["convert", src, "--for", "diffusers", "--out", str(out)]) == 1
    assert "give the base model (--base)" in capsys.readouterr().err  # LoHa: kernel not in the file
    assert cli.main(["convert", src, "--for", "diffusers", "--out", str(out), "--rank", "2"]) == 2  # a usage error
    assert "only used with --allow-lossy" in capsys.readouterr().err
    assert cli.main(["convert", src, "--for", "all", "--base", base, "--out", str(out), "--rank", "2",
                     "--allow-lossy", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    a, b = load_file(src), load_file(str(out))
    for x in net.loras:
        w0 = x.layer.weight.detach()
        d_in = trained(a, x.lora_name, w0, 1.0) - w0
        d_out = trained(b, x.lora_name, w0, 1.0) - w0
        measured = float((d_out - d_in).norm() / d_in.norm())
        assert r["modules"][x.lora_name]["relative_error"] == pytest.approx(measured, rel=1e-3, abs=1e-8)
    assert r["total_relative_error"] > 1e-3


def test_full_factor_lokr_alpha_means_the_same_to_every_reader(tmp_path):
    """LoKr with both factors full has g = 1 whatever alpha is. New files store alpha 1; a file
    written the old way (alpha = network_alpha) still loads with g = 1, and convert rewrites its
    alpha to 1, so a reader that ignores alpha there (ComfyUI today) and one that applies it
    (ComfyUI #15114) compute the same weight."""
    from safetensors.torch import save_file

    from lycoris_kohya.tools import convert as convert_tool

    import lycoris_kohya
    import musubi_like as ml
    from conftest import randomize

    model = ml.build("wan")
    net = lycoris_kohya.create_arch_network(1.0, 4, 8.0, None, None, model, algo="lokr", factor="4",
                                            full_matrix="true")
    randomize(net, seed=1, std=0.2)
    path = str(tmp_path / "new.safetensors")
    net.save_weights(path, torch.float32, None)
    sd = load_file(path)
    alphas = {k: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {1.0}
    old = {k: (torch.tensor(8.0) if k.endswith(".alpha") else v) for k, v in sd.items()}  # the old way
    old_path = str(tmp_path / "old.safetensors")
    save_file(old, old_path)

    def readings(sd):  # (alpha ignored, alpha applied) per module: kron(w1, w2) [* alpha]
        out = {}
        for name in {k.split(".")[0] for k in sd}:
            d = torch.kron(sd[name + ".lokr_w1"].float(), sd[name + ".lokr_w2"].float())
            out[name] = (d, d * float(sd[name + ".alpha"]))
        return out

    reloaded = lycoris_kohya.create_arch_network_from_weights(1.0, old_path, unet=ml.build("wan"))
    for a in reloaded.loras:
        ignored, applied = readings(sd)[a.lora_name]
        assert torch.allclose(a.delta(), ignored, atol=1e-6)
    assert any(not torch.allclose(i, a) for i, a in readings(old).values())  # the old file: two readings
    out = str(tmp_path / "comfy.safetensors")
    r = convert_tool.convert(old_path, "comfyui", out)
    assert {e["action"] for e in r["modules"].values()} == {"alpha 8 -> 1 (both LoKr factors full)"}
    for name, (ignored, applied) in readings(load_file(out)).items():
        assert torch.equal(ignored, applied) and torch.allclose(ignored, readings(sd)[name][0])


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_dit_and_text_encoder_files_need_no_base_for_locon(algo, tmp_path):
    """A plain LoHa, or a LoKr with a factorised lokr_w2, stores [out, in*k*k] without saying Linear
    or convolution. Text encoders and a DiT's transformer blocks adapt Linears only: a Flux file
    (CLIP-L, T5, double and single blocks) converts to LoCon without --base, exactly."""
    import lycoris_kohya
    import flux_like as fl
    from conftest import randomize
    from lycoris_kohya.tools import convert as convert_tool

    tes, flux = fl.flux_models()
    extra = {"factor": "4", "dim": 2} if algo == "lokr" else {}
    dim = extra.pop("dim", 4)
    net = lycoris_kohya.create_network(1.0, dim, 2.0, None, tes, flux, algo=algo, train_t5xxl="true", **extra)
    randomize(net, seed=3, std=0.2)
    path = str(tmp_path / "flux.safetensors")
    net.save_weights(path, torch.float32, None)
    sd = load_file(path)
    assert any(k.startswith("lora_te3_") for k in sd) and any(k.startswith("lora_unet_single_blocks_") for k in sd)
    out = str(tmp_path / "locon.safetensors")
    r = convert_tool.convert(path, "all", out)
    got = load_file(out)
    assert not any(k.endswith((".hada_w1_a", ".lokr_w1")) for k in got)
    for name in {k.split(".")[0] for k in sd}:
        g, dw = reference_delta(sd, name, _flat_shape(sd, name, algo))
        g2, dw2 = reference_delta(got, name, tuple(dw.shape))
        assert torch.allclose(g2 * dw2, g * dw, atol=1e-5, rtol=1e-4), name
    assert r["total_relative_error"] < 1e-6


def _flat_shape(sd, name, algo):
    """[out, in] of a Linear module from its factors (LoHa: w1_a rows, w1_b columns; LoKr: w1 x w2)."""
    if algo == "loha":
        return (sd[name + ".hada_w1_a"].shape[0], sd[name + ".hada_w1_b"].shape[1])
    w1 = sd[name + ".lokr_w1"] if name + ".lokr_w1" in sd else sd[name + ".lokr_w1_a"] @ sd[name + ".lokr_w1_b"]
    w2 = sd[name + ".lokr_w2"] if name + ".lokr_w2" in sd else sd[name + ".lokr_w2_a"] @ sd[name + ".lokr_w2_b"]
    return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
