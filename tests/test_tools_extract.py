"""``lycoris-kohya extract``: a known low-rank difference between two checkpoints (diffusers folders or
single files, either kind each, SD1 / SD2 with fused q/k/v / SDXL) is recovered exactly at its rank;
below it the reported error equals the closed form sqrt(sum of the dropped s_i^2) / ||D|| and the
measured one; unchanged layers get no module; the file loads back into our network and its merged
weights are the tuned model's."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lycoris_kohya
from lycoris_kohya.tools import cli

import ldm_checkpoint as lc
import tiny_models as tm
from test_algorithms import reference_delta
from tools_helpers import _one_thread, sd1_models, sd1_single, sd2_single, sdxl_single, write_single  # noqa: F401

# layers given a known difference: a Linear, a 1x1 conv, a 3x3 conv, text encoder q/k projections
TOUCHED = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "up_blocks.0.resnets.0.conv_shortcut",
           "down_blocks.1.resnets.0.conv1"]
TE_TOUCHED = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.k_proj"]


def low_rank_change(weight, rank, seed):
    g = torch.Generator().manual_seed(seed)
    out = weight.shape[0]
    flat_in = weight[0].numel()
    d = torch.randn(out, rank, generator=g) @ torch.randn(rank, flat_in, generator=g) * 0.01
    return d.reshape(weight.shape)


def tune(te, unet, rank=3):
    """Add a known rank-``rank`` difference to the TOUCHED layers; returns {path: D}."""
    modules = dict(unet.named_modules())
    te_modules = {p.replace("text_model.", ""): m for p, m in te.named_modules()}
    changes = {}
    with torch.no_grad():
        for i, p in enumerate(TOUCHED):
            d = low_rank_change(modules[p].weight, rank, i)
            modules[p].weight += d
            changes["lora_unet_" + p.replace(".", "_")] = d
        for i, p in enumerate(TE_TOUCHED):
            d = low_rank_change(te_modules[p].weight, rank, 10 + i)
            te_modules[p].weight += d
            changes["lora_te_text_model_" + p.replace(".", "_")] = d
    return changes


def extract(capsys, *argv):
    assert cli.main(["extract", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _deltas(path, shapes):
    sd = load_file(str(path))
    out = {}
    for n in {k.split(".")[0] for k in sd}:
        g, dw = reference_delta({k: v.float() for k, v in sd.items()}, n, shapes[n])
        out[n] = g * dw
    return out


@pytest.mark.parametrize("kinds", [("folder", "single"), ("single", "folder")])
def test_known_difference_recovered(tiny_sd, sd1_single, tmp_path, capsys, kinds):
    te, unet = sd1_models(tiny_sd)
    changes = tune(te, unet)
    tuned_folder = str(tmp_path / "tuned")
    unet.save_pretrained(tuned_folder + "/unet")
    te.save_pretrained(tuned_folder + "/text_encoder")
    tuned_single = write_single(lc.sd1_single(unet, te), tmp_path / "tuned.safetensors")
    base = tiny_sd if kinds[0] == "folder" else sd1_single
    tuned = tuned_single if kinds[1] == "single" else tuned_folder
    out = tmp_path / "e.safetensors"
    r = extract(capsys, "--base", base, "--tuned", tuned, "--rank", 3, "--out", out, "--dtype", "fp32")
    assert set(r["modules"]) == set(changes)
    shapes = {n: tuple(d.shape) for n, d in changes.items()}
    got = _deltas(out, shapes)
    for n, d in changes.items():
        assert r["modules"][n]["rank"] == 3
        assert torch.allclose(got[n], d, atol=1e-7, rtol=1e-4), n
    assert r["total_relative_error"] < 1e-5
    # the file loads into our network on the base model and gives the tuned weights
    te0, unet0 = sd1_models(tiny_sd)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, str(out), None, te0, unet0)
    tuned_layers = lycoris_kohya.targets.every_layer(te, unet)
    for a in net.loras:
        assert torch.allclose(a.merged_weight(1.0), tuned_layers[a.lora_name].layer.weight, atol=1e-6), a.lora_name


def test_truncation_error_is_the_closed_form(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    changes = tune(te, unet, rank=4)
    tuned = write_single(lc.sd1_single(unet, te), tmp_path / "tuned.safetensors")
    out = tmp_path / "e.safetensors"
    r = extract(capsys, "--base", tiny_sd, "--tuned", tuned, "--rank", 2, "--out", out, "--dtype", "fp32")
    got = _deltas(out, {n: tuple(d.shape) for n, d in changes.items()})
    err2 = norm2 = 0.0
    for n, d in changes.items():
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1).double())
        closed = float(torch.sqrt((s[2:] ** 2).sum()) / torch.sqrt((s ** 2).sum()))
        measured = float((got[n] - d).norm() / d.norm())
        assert r["modules"][n]["relative_error"] == pytest.approx(closed, rel=1e-4), n
        assert r["modules"][n]["relative_error"] == pytest.approx(measured, rel=1e-4), n
        err2, norm2 = err2 + float((got[n] - d).norm()) ** 2, norm2 + float(d.norm()) ** 2
    assert r["total_relative_error"] == pytest.approx((err2 / norm2) ** 0.5, rel=1e-4)


def test_conv_rank_zero_leaves_kxk_convs_out(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    changes = tune(te, unet)
    tuned = write_single(lc.sd1_single(unet, te), tmp_path / "tuned.safetensors")
    r = extract(capsys, "--base", tiny_sd, "--tuned", tuned, "--rank", 3, "--conv-rank", 0,
                "--out", tmp_path / "e.safetensors")
    assert set(r["modules"]) == set(changes) - {"lora_unet_down_blocks_1_resnets_0_conv1"}
    assert r["left_out_kxk_convs"] == 1


def test_sd2_fused_text_encoder_rows(sd2_single, tmp_path, capsys):
    unet, te = tm.sd2_unet(), tm.clip(2, act="gelu")
    te_modules = {p.replace("text_model.", ""): m for p, m in te.named_modules()}
    d = low_rank_change(te_modules["encoder.layers.1.self_attn.v_proj"].weight, 2, 0)
    with torch.no_grad():
        te_modules["encoder.layers.1.self_attn.v_proj"].weight += d
    tuned = write_single(lc.sd2_single(unet, te), tmp_path / "tuned.safetensors")
    out = tmp_path / "e.safetensors"
    r = extract(capsys, "--base", sd2_single, "--tuned", tuned, "--rank", 2, "--out", out, "--dtype", "fp32")
    # only v of layer 1 changed: q and k rows of the same fused tensor are identical
    assert list(r["modules"]) == ["lora_te_text_model_encoder_layers_1_self_attn_v_proj"]
    got = _deltas(out, {"lora_te_text_model_encoder_layers_1_self_attn_v_proj": tuple(d.shape)})
    assert torch.allclose(got["lora_te_text_model_encoder_layers_1_self_attn_v_proj"], d, atol=1e-7, rtol=1e-4)


def test_sdxl_names_are_sdscripts(sdxl_single, tmp_path, capsys):
    te1, te2, unet = tm.sdxl_models()
    with torch.no_grad():
        unet.down_blocks[1].attentions[0].transformer_blocks[1].attn1.to_q.weight += 0.01
    tuned = write_single(lc.sdxl_single(unet, te1, te2), tmp_path / "tuned.safetensors")
    r = extract(capsys, "--base", sdxl_single, "--tuned", tuned, "--rank", 1, "--out", tmp_path / "e.safetensors",
                "--dtype", "fp32")
    # down_blocks.1.attentions.0 is input_blocks.4.1 (2 layers per block)
    assert list(r["modules"]) == ["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"]
    assert r["total_relative_error"] < 1e-5  # a constant matrix is rank 1


def test_refusals(tiny_sd, sd1_single, sdxl_single, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    for argv, msg, code in [  # 2: the command line is wrong; 1: the models
        (["--base", tiny_sd, "--tuned", sd1_single, "--rank", "2"], "does not differ", 1),
        (["--base", tiny_sd, "--tuned", sdxl_single, "--rank", "2"], "not the same kind of model", 1),
        (["--base", tiny_sd, "--tuned", sd1_single, "--rank", "0"], "at least 1", 2),
        (["--base", str(tmp_path / "nope"), "--tuned", sd1_single, "--rank", "2"], "nope: no such file", 1),
    ]:
        assert cli.main(["extract", *argv, "--out", str(out)]) == code
        assert msg in capsys.readouterr().err, argv
        assert not out.exists()


def test_fast_randomized_svd(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    changes = tune(te, unet, rank=4)
    tuned = write_single(lc.sd1_single(unet, te), tmp_path / "tuned.safetensors")
    shapes = {n: tuple(d.shape) for n, d in changes.items()}
    out = tmp_path / "e.safetensors"
    r = extract(capsys, "--base", tiny_sd, "--tuned", tuned, "--rank", 4, "--fast", "--out", out, "--dtype", "fp32")
    assert r["total_relative_error"] < 1e-5  # the sketch (rank + 8) holds the whole rank-4 difference
    r = extract(capsys, "--base", tiny_sd, "--tuned", tuned, "--rank", 2, "--fast", "--out", out, "--dtype", "fp32",
                "--force")  # replaces the rank-4 file
    got = _deltas(out, shapes)
    for n, d in changes.items():
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1).double())
        optimal = float(torch.sqrt((s[2:] ** 2).sum()) / torch.sqrt((s ** 2).sum()))
        measured = float((got[n] - d).norm() / d.norm())
        assert r["modules"][n]["relative_error"] == pytest.approx(measured, rel=1e-4), n
        assert optimal * (1 - 1e-6) <= measured <= optimal * 1.05, (n, optimal, measured)
    assert cli.main(["extract", "--base", tiny_sd, "--tuned", tuned, "--rank", "2", "--fast", "--dynamic", "sv_fro",
                     "0.9", "--out", str(tmp_path / "x.safetensors")]) == 2  # a usage error
    assert "needs the whole spectrum" in capsys.readouterr().err
