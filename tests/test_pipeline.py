"""lycoris_kohya.pipeline on real diffusers pipelines: the U-Net and text encoder outputs with a file
applied equal those of a copy whose weights were set to the closed-form merged weights (SPEC
formulas written in the tests) for every algorithm and DoRA axis; multipliers change; merge,
unmerge and removal (in any order, several files stacked) leave the pipeline bit-identical; SDXL
files with sd-scripts' key names apply to diffusers' SDXL U-Net."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from lycoris_kohya import targets as tg
from lycoris_kohya import weights as wio
from lycoris_kohya.pipeline import LycorisAdapters

import tiny_models as tm
from test_tools_convert import trained
from tools_helpers import _one_thread, close, network, save, sd1_models, sdscripts_sdxl_names, te_out, unet_out  # noqa: F401


def sd1_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def tes_of(pipe):
    return [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]


def snapshot(pipe):
    return {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in
            [("unet", pipe.unet)] + [(f"te{i}", t) for i, t in enumerate(tes_of(pipe))]}


def identical(pipe, snap):
    now = snapshot(pipe)
    same = all(now[n].keys() == snap[n].keys() and all(torch.equal(now[n][k], snap[n][k]) for k in snap[n])
               for n in snap)
    no_hooks = not any("forward" in m.__dict__ for model in [pipe.unet] + tes_of(pipe) for m in model.modules())
    return same and no_hooks


def expected_models(pipe, files, copy_models=True):
    """Copies of the pipeline's models with every file's closed-form merged weight, in order
    (``files``: [(state dict with the model's names, multiplier)]); copy_models=False writes the
    weights into the pipeline's own models."""
    unet, tes = pipe.unet, tes_of(pipe)
    if copy_models:
        unet, tes = copy.deepcopy(unet), [copy.deepcopy(t) for t in tes]
    layers = tg.every_layer(tes if len(tes) > 1 else tes[0], unet)
    with torch.no_grad():
        for sd, m in files:
            sd = {k: v.float() for k, v in sd.items()}
            for name in {k.split(".")[0] for k in sd}:
                w = layers[name].layer.weight
                w.copy_(trained(sd, name, w.detach().clone(), m))
    return unet, tes


def outputs(unet, tes):
    return [unet_out(unet)] + [te_out(t) for t in tes]


def assert_outputs(got, want, tol=2e-5):
    for g, w in zip(got, want):
        ok, err = close(g, w, tol)
        assert ok, err


CASES = {
    "locon": {"algo": "locon"}, "locon_tucker": {"algo": "locon", "use_tucker": True},
    "loha": {"algo": "loha"}, "loha_tucker": {"algo": "loha", "use_tucker": True},
    "lokr": {"algo": "lokr"}, "lokr_tucker": {"algo": "lokr", "use_tucker": True},
    "lokr_full": {"algo": "lokr", "full_matrix": True},
    "locon_dora_in": {"algo": "locon", "dora_wd": True}, "loha_dora_out": {"algo": "loha", "dora_wd": True,
                                                                           "wd_on_output": True},
    "lokr_dora_in": {"algo": "lokr", "dora_wd": True}, "locon_dora_out": {"algo": "locon", "dora_wd": True,
                                                                          "wd_on_output": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_file_every_layout(tiny_sd, tmp_path, case):
    te, unet = sd1_models(tiny_sd)
    path = save(network(te, unet, seed=3, std=0.1, **CASES[case]), tmp_path / "a.safetensors")
    sd = load_file(path)
    pipe = sd1_pipeline(tiny_sd)
    before = snapshot(pipe)
    base_out = outputs(pipe.unet, tes_of(pipe))
    lyco = LycorisAdapters(pipe)
    h = lyco.load(path, multiplier=0.8)
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), outputs(*expected_models_from(pipe, before, [(sd, 0.8)])))
    assert not close(outputs(pipe.unet, tes_of(pipe))[0], base_out[0])[0]  # it does something
    h.multiplier = 0.3
    unet_w, tes_w = expected_models_from(pipe, before, [(sd, 0.3)])
    want_w = outputs(unet_w, tes_w)
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), want_w)
    h.merge()
    layers = tg.every_layer(tes_of(pipe)[0], pipe.unet)
    want_layers = tg.every_layer(tes_w[0], unet_w)
    for name in layers:  # merged weights are the closed form (fp32 rounding)
        assert torch.allclose(layers[name].layer.weight, want_layers[name].layer.weight, atol=2e-6, rtol=1e-5), name
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), want_w)
    h.multiplier = 0.6  # while merged: re-merged at the new strength
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), outputs(*expected_models_from(pipe, before, [(sd, 0.6)])))
    h.unmerge()
    unmerged = pipe.unet.state_dict()
    assert all(torch.equal(unmerged[k], before["unet"][k]) for k in before["unet"])
    h.remove()
    assert identical(pipe, before)
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), base_out, tol=0)


_COPY = {}  # the pipeline last asked about and a copy of its models: one deep copy per pipeline, not per call


def expected_models_from(pipe, snap, files):
    """expected_models on a copy of the pipeline restored to ``snap`` (the pipeline itself is not
    touched). The copy is made once per pipeline and restored from ``snap`` on every call, so the
    models one call returns hold its weights until the next call."""
    if _COPY.get("pipe") is not pipe:
        unet, tes = copy.deepcopy(pipe.unet), [copy.deepcopy(t) for t in tes_of(pipe)]
        for model in [unet] + tes:
            for m in model.modules():
                m.__dict__.pop("forward", None)
        holder = type("P", (), {})()
        holder.unet, holder.text_encoder = unet, tes[0]
        holder.text_encoder_2 = tes[1] if len(tes) > 1 else None
        _COPY.clear()
        _COPY.update(pipe=pipe, holder=holder)
    holder = _COPY["holder"]
    holder.unet.load_state_dict(snap["unet"])
    for i, t in enumerate(tes_of(holder)):
        t.load_state_dict(snap[f"te{i}"])
    return expected_models(holder, files, copy_models=False)


def test_several_files_any_removal_order(tiny_sd, tmp_path):
    te, unet = sd1_models(tiny_sd)
    a = save(network(te, unet, seed=1, std=0.1, algo="lokr", use_tucker=True), tmp_path / "a.safetensors")
    b = save(network(te, unet, seed=2, std=0.1, algo="locon"), tmp_path / "b.safetensors")
    c = save(network(te, unet, seed=5, std=0.1, algo="locon", use_tucker=True), tmp_path / "c.safetensors")
    sa, sb, sc = load_file(a), load_file(b), load_file(c)
    pipe = sd1_pipeline(tiny_sd)
    before = snapshot(pipe)
    lyco = LycorisAdapters(pipe)
    ha, hb, _ = lyco.load(a, 0.7), lyco.load(b, 0.5), lyco.load(c, -0.4)
    # non-DoRA files add up: W0 + 0.7 dA + 0.5 dB - 0.4 dC (the order does not matter)
    want = outputs(*expected_models_from(pipe, before, [(sa, 0.7), (sb, 0.5), (sc, -0.4)]))
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), want)
    # merge two of them, unmerge the first merged: the other stays merged exactly
    ha.merge()
    hb.merge()
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), want)
    ha.unmerge()
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), want)
    unet_b, tes_b = expected_models_from(pipe, before, [(sb, 0.5)])
    layers = tg.every_layer(pipe.text_encoder, pipe.unet)
    want_b = tg.every_layer(tes_b[0], unet_b)
    for name in layers:
        assert torch.allclose(layers[name].layer.weight, want_b[name].layer.weight, atol=2e-6, rtol=1e-5), name
    # remove the middle one, then the first: the last keeps working
    hb.remove()
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), outputs(*expected_models_from(pipe, before, [(sa, 0.7), (sc, -0.4)])))
    ha.remove()
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), outputs(*expected_models_from(pipe, before, [(sc, -0.4)])))
    assert len(lyco) == 1
    lyco.remove_all()
    assert identical(pipe, before)


def test_sdxl_pipeline_with_sdscripts_names(tmp_path):
    pipe = tm.sdxl_pipeline()
    te1, te2, unet = pipe.text_encoder, pipe.text_encoder_2, pipe.unet
    net = network([te1, te2], unet, seed=7, std=0.1, algo="lokr", dora_wd=True, wd_on_output=True)
    own = {k: v.clone() for k, v in net.export_state_dict().items()}
    file_sd = sdscripts_sdxl_names(own, net, [te1, te2], unet)
    assert any(k.startswith("lora_unet_input_blocks_") for k in file_sd)
    assert any(k.startswith("lora_te2_") for k in file_sd)
    path = str(tmp_path / "xl.safetensors")
    wio.save_weights(path, file_sd, {"ss_base_model_version": "sdxl_base_v1-0"})
    before = snapshot(pipe)
    lyco = LycorisAdapters(pipe)
    h = lyco.load(path, multiplier=0.9)
    assert len(h.network.loras) == len({k.split(".")[0] for k in file_sd})
    want = outputs(*expected_models_from(pipe, before, [(own, 0.9)]))
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), want)
    h.merge()
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), want)
    h.remove()
    assert identical(pipe, before)


def test_a_file_for_another_model_is_named(tiny_sd, tmp_path):
    te, unet = sd1_models(tiny_sd)
    path = save(network(te, unet, seed=1), tmp_path / "sd1.safetensors")
    pipe = tm.sdxl_pipeline()
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=r"sd1.safetensors: .*no layer for module 'lora_"):
        LycorisAdapters(pipe).load(path)
    assert identical(pipe, before)


def test_loha_stacked_over_locon_adds_up(tiny_sd, tmp_path):
    te, unet = sd1_models(tiny_sd)
    a = save(network(te, unet, seed=1, std=0.1, algo="locon"), tmp_path / "a.safetensors")
    b = save(network(te, unet, seed=2, std=0.1, algo="loha"), tmp_path / "b.safetensors")
    pipe = sd1_pipeline(tiny_sd)
    before = snapshot(pipe)
    lyco = LycorisAdapters(pipe)
    lyco.load(a, 0.7)
    lyco.load(b, 0.5)
    want = outputs(*expected_models_from(pipe, before, [(load_file(a), 0.7), (load_file(b), 0.5)]))
    assert_outputs(outputs(pipe.unet, tes_of(pipe)), want)
