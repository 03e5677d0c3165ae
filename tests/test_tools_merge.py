"""``lycoris-kohya merge``: files baked into a diffusers folder or a single-file checkpoint give the
same U-Net and text encoder outputs as the network's own forward (several files in order: the first
merged with merge_to, the next applied as hooks on top, as sd-scripts' --network_merge stacks them);
the single files are read back with diffusers' converters. Combining LoCon files is exact; anything
else goes through SVD with the reported error equal to the measured one."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lycoris_kohya
from lycoris_kohya.tools import cli
from lycoris_kohya.tools.merge import combine

import tiny_models as tm
from test_algorithms import reference_delta
from tools_helpers import (_one_thread, close, models_from_single, network, save, sd1_models, sd1_single,  # noqa: F401
                           sd2_single, sdscripts_sdxl_names, sdxl_folder, sdxl_single, te_out, unet_out)
from tools_helpers import layer_paths  # noqa: F401


def reference(te_list, unet, files):
    """The network's outputs: the first file merged by merge_to, the others hooked on top in order."""
    te_arg = te_list if len(te_list) > 1 else te_list[0]
    nets = []
    for i, (path, m, sd) in enumerate(files):
        net, weights = lycoris_kohya.create_network_from_weights(m, path, None, te_arg, unet, weights_sd=sd,
                                                                 for_inference=True)
        if i == 0:
            net.merge_to(te_arg, unet, weights, torch.float32, "cpu")
        else:
            net.apply_to(te_arg, unet)
            nets.append(net)
    outs = [unet_out(unet)] + [te_out(t) for t in te_list]
    for net in nets:
        for a in net.loras:
            a.remove()
    return outs


def run_cli(*argv):
    rc = cli.main([str(a) for a in argv])
    assert rc == 0


@pytest.mark.parametrize("kind", ["folder", "single"])
def test_sd1_merge_two_files_in_order(tiny_sd, sd1_single, tmp_path, kind):
    te, unet = sd1_models(tiny_sd)
    a = save(network(te, unet, seed=1, algo="loha", use_tucker=True), tmp_path / "a.safetensors")
    b = save(network(te, unet, seed=2, algo="lokr", dora_wd=True), tmp_path / "b.safetensors")
    out = tmp_path / ("merged" if kind == "folder" else "merged.safetensors")
    run_cli("merge", f"{a}:0.7", f"{b}:0.5", "--into", tiny_sd if kind == "folder" else sd1_single, "--out", out)
    te_r, unet_r = sd1_models(tiny_sd)
    want = reference([te_r], unet_r, [(a, 0.7, None), (b, 0.5, None)])
    if kind == "folder":
        te_m, unet_m = sd1_models(str(out))
    else:
        (te_m,), unet_m = models_from_single(str(out), unet, [te], "sd1")
    got = [unet_out(unet_m), te_out(te_m)]
    for w, g in zip(want, got):
        ok, err = close(w, g)
        assert ok, err
    # the merge changed the outputs: the test can fail
    assert not close(want[0], unet_out(unet))[0]


def test_sd2_single_file_with_fused_text_encoder(sd2_single, tmp_path):
    unet, te = tm.sd2_unet(), tm.clip(2, act="gelu")
    a = save(network(te, unet, seed=3, algo="locon", dora_wd=True, wd_on_output=True), tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    run_cli("merge", a, "--into", sd2_single, "--out", out)
    (te_m,), unet_m = models_from_single(str(out), unet, [te], "sd2")
    want = reference([tm.clip(2, act="gelu")], tm.sd2_unet(), [(a, 1.0, None)])
    for w, g in zip(want, [unet_out(unet_m), te_out(te_m)]):
        assert close(w, g)[0], close(w, g)[1]


@pytest.mark.parametrize("kind", ["folder", "single"])
def test_sdxl_files_with_sdscripts_names(sdxl_single, sdxl_folder, tmp_path, kind):
    te1, te2, unet = tm.sdxl_models()
    net_a = network([te1, te2], unet, seed=4, algo="locon", dora_wd=True)
    net_b = network([te1, te2], unet, seed=5, algo="loha")
    files = []
    for net, name in ((net_a, "a"), (net_b, "b")):
        sd = sdscripts_sdxl_names(net.export_state_dict(), net, [te1, te2], unet)
        assert any(k.startswith("lora_unet_input_blocks_") for k in sd)
        path = str(tmp_path / f"{name}.safetensors")
        lycoris_kohya.weights.save_weights(path, sd, {})
        files.append((path, {k: v for k, v in net.export_state_dict().items()}))
    out = tmp_path / ("m" if kind == "folder" else "m.safetensors")
    run_cli("merge", f"{files[0][0]}:0.8", f"{files[1][0]}:1.5", "--into",
            sdxl_folder if kind == "folder" else sdxl_single, "--out", out)
    r1, r2, ru = tm.sdxl_models()
    want = reference([r1, r2], ru, [(files[0][0], 0.8, files[0][1]), (files[1][0], 1.5, files[1][1])])
    if kind == "folder":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        unet_m = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").eval()
        tes = [CLIPTextModel.from_pretrained(str(out), subfolder="text_encoder").eval(),
               CLIPTextModelWithProjection.from_pretrained(str(out), subfolder="text_encoder_2").eval()]
    else:
        tes, unet_m = models_from_single(str(out), unet, [te1, te2], "sdxl")
    got = [unet_out(unet_m)] + [te_out(t) for t in tes]
    for w, g in zip(want, got):
        assert close(w, g)[0], close(w, g)[1]


def test_merge_dtype_and_wrong_model(tiny_sd, sd1_single, sdxl_single, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    a = save(network(te, unet, seed=1), tmp_path / "a.safetensors")
    run_cli("merge", a, "--into", sd1_single, "--out", tmp_path / "h.safetensors", "--dtype", "fp16")
    assert {v.dtype for v in load_file(str(tmp_path / "h.safetensors")).values()} == {torch.float16}
    out = tmp_path / "x.safetensors"
    assert cli.main(["merge", a, "--into", sdxl_single, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(a) in err and "have no layer in" in err and "lora_" in err
    assert not out.exists()
    assert cli.main(["merge", f"{a}:strong", "--into", sd1_single, "--out", str(out)]) == 2  # a usage error
    assert "FILE:MULTIPLIER" in capsys.readouterr().err
    assert cli.main(["merge", str(tmp_path / "missing.safetensors"), "--into", sd1_single, "--out", str(out)]) == 1
    assert "missing.safetensors: no such file" in capsys.readouterr().err


def _module_deltas(path, shapes):
    sd = load_file(path)
    names = {k.split(".")[0] for k in sd}
    return {n: (lambda gd: gd[0] * gd[1])(reference_delta(sd, n, shapes[n])) for n in names}


def test_combine_locon_files_exactly(tiny_sd, tmp_path):
    te, unet = sd1_models(tiny_sd)
    net_a = network(te, unet, seed=1, algo="locon")
    net_b = network(te, unet, seed=2, algo="locon", use_tucker=True, conv_alpha=2)
    a, b = save(net_a, tmp_path / "a.safetensors"), save(net_b, tmp_path / "b.safetensors")
    shapes = {x.lora_name: tuple(x.layer.weight.shape) for x in net_a.loras}
    out = str(tmp_path / "c.safetensors")
    r = combine([(a, 0.5), (b, -0.3)], out)
    assert r["exact"]
    da, db, dc = _module_deltas(a, shapes), _module_deltas(b, shapes), _module_deltas(out, shapes)
    assert dc.keys() == da.keys()
    for n in dc:
        want = 0.5 * da[n] + (-0.3) * db[n]
        assert torch.allclose(dc[n], want, atol=1e-6, rtol=1e-5), n
    ranks = {k.split(".")[0]: v.shape[0] for k, v in load_file(out).items() if k.endswith("lora_down.weight")}
    assert set(ranks.values()) == {8}  # 4 + 4
    # and our own loader takes the combined file
    lycoris_kohya.create_network_from_weights(1.0, out, None, te, unet)


def test_combine_others_by_svd_reports_the_measured_error(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    net_a = network(te, unet, seed=1, algo="loha")
    net_b = network(te, unet, seed=2, algo="locon", dora_wd=True)
    a, b = save(net_a, tmp_path / "a.safetensors"), save(net_b, tmp_path / "b.safetensors")
    assert cli.main(["merge", a, b, "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "needs --rank R" in capsys.readouterr().err
    assert cli.main(["merge", a, b, "--rank", "3", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "give --base" in capsys.readouterr().err
    out = str(tmp_path / "c.safetensors")
    rc = cli.main(["merge", f"{a}:0.5", b, "--rank", "3", "--base", tiny_sd, "--out", out, "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    shapes = {x.lora_name: tuple(x.layer.weight.shape) for x in net_a.loras}
    da = {x.lora_name: 0.5 * x.delta().detach() for x in net_a.loras}
    got = _module_deltas(out, shapes)
    te2, unet2 = sd1_models(tiny_sd)
    net_b2, _ = lycoris_kohya.create_network_from_weights(1.0, b, None, te2, unet2)
    err2 = norm2 = 0.0
    for x in net_b2.loras:
        w0 = x.layer.weight.detach()
        want = (da[x.lora_name] + (x.merged_weight(1.0, w0) - w0)).detach()
        e, n = float((got[x.lora_name] - want).norm()), float(want.norm())
        assert report["modules"][x.lora_name]["relative_error"] == pytest.approx(e / n, rel=1e-3, abs=1e-7)
        err2, norm2 = err2 + e * e, norm2 + n * n
    assert report["total_relative_error"] == pytest.approx((err2 / norm2) ** 0.5, rel=1e-3)
    assert 0 < report["total_relative_error"] < 1
