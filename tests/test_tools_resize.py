"""``lycoris-kohya resize``: at full rank the merged weights come back (LoCon bit-exact, others
within fp32), the reported relative errors equal the ones measured on the written file (deltas
from the closed forms in test_algorithms / test_dora), DoRA either baked with the base (W_d - W0,
exact at every multiplier) or kept, Tucker stays Tucker, dynamic ranks follow the spectrum, and
impossible requests are refused with the reason."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lycoris_kohya.tools import cli
from lycoris_kohya.weights import load_metadata

from test_algorithms import reference_delta
from test_dora import trained_weight
from tools_helpers import _one_thread, network, save, sd1_models  # noqa: F401


def resize(capsys, *argv):
    assert cli.main(["resize", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def deltas(path, shapes):
    sd = load_file(str(path))
    out = {}
    for n in {k.split(".")[0] for k in sd}:
        g, dw = reference_delta(sd, n, shapes[n])
        out[n] = g * dw
    return out


@pytest.fixture
def sd1(tiny_sd):
    te, unet = sd1_models(tiny_sd)
    return tiny_sd, te, unet


def _shapes(net):
    return {a.lora_name: tuple(a.layer.weight.shape) for a in net.loras}


def test_locon_at_its_rank_is_bit_exact(sd1, tmp_path, capsys):
    _, te, unet = sd1
    net = network(te, unet, algo="locon")
    src = save(net, tmp_path / "a.safetensors")
    r = resize(capsys, src, "--rank", 4, "--out", tmp_path / "b.safetensors")
    a, b = load_file(src), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert r["total_relative_error"] == 0.0


@pytest.mark.parametrize("algo,extra", [("loha", {}), ("lokr", {}), ("loha", {"use_tucker": True}),
                                        ("lokr", {"use_tucker": True}), ("locon", {"use_tucker": True})])
def test_full_rank_reproduces_merged_weights(sd1, tmp_path, capsys, algo, extra):
    base, te, unet = sd1
    net = network(te, unet, algo=algo, **extra)
    src = save(net, tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    r = resize(capsys, src, "--rank", 4096, "--base", base, "--out", out)
    shapes = _shapes(net)
    before, after = deltas(src, shapes), deltas(out, shapes)
    for n, d in before.items():
        assert torch.allclose(after[n], d, atol=1e-6 * (1 + float(d.abs().max())), rtol=1e-4), n
    assert r["total_relative_error"] < 1e-5
    sd = load_file(str(out))
    assert not [k for k in sd if "hada" in k or "lokr" in k]
    mids = {k.split(".")[0] for k in sd if k.endswith("lora_mid.weight")}
    if extra.get("use_tucker"):  # Tucker kxk convolutions stay Tucker
        assert mids and all(len(shapes[n]) == 4 and shapes[n][2:] != (1, 1) for n in mids)
    else:
        assert not mids


@pytest.mark.parametrize("algo,rank", [("loha", 2), ("lokr", 2), ("locon", 2), ("loha", 4096)])
def test_reported_error_is_the_measured_one(sd1, tmp_path, capsys, algo, rank):
    """At rank 2 the truncation dominates; at full rank only fp16 rounding of the written factors."""
    base, te, unet = sd1
    net = network(te, unet, algo=algo)
    src = save(net, tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    r = resize(capsys, src, "--rank", rank, "--base", base, "--out", out, "--dtype", "fp16")
    shapes = _shapes(net)
    before, after = deltas(src, shapes), deltas(out, shapes)
    err2 = norm2 = 0.0
    for n, d in before.items():
        e, nn_ = float((after[n] - d).norm()), float(d.norm())
        assert r["modules"][n]["relative_error"] == pytest.approx(e / nn_, rel=1e-4, abs=1e-9), n
        assert r["modules"][n]["rank"] <= rank
        err2, norm2 = err2 + e * e, norm2 + nn_ * nn_
    assert r["total_relative_error"] == pytest.approx((err2 / norm2) ** 0.5, rel=1e-4)
    if rank == 2:
        assert r["total_relative_error"] > 1e-3  # rank 2 < 4 (locon) or r^2 (loha): a real truncation
    else:
        assert 1e-5 < r["total_relative_error"] < 1e-2  # fp16 rounding, measured
    assert {v.dtype for v in load_file(str(out)).values()} == {torch.float16}


@pytest.mark.parametrize("axis", ["input", "output"])
def test_dora_baked_with_base_is_exact_at_every_multiplier(sd1, tmp_path, capsys, axis):
    base, te, unet = sd1
    net = network(te, unet, algo="lokr", dora_wd=True, wd_on_output=(axis == "output"))
    src = save(net, tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    r = resize(capsys, src, "--rank", 4096, "--base", base, "--out", out)
    assert "W_d - W0" in r["dora"]
    sd_in = load_file(src)
    shapes = _shapes(net)
    after = deltas(out, shapes)
    assert not [k for k in load_file(str(out)) if k.endswith("dora_scale")]
    for a in net.loras:
        n, w0 = a.lora_name, a.layer.weight.detach()
        g, dw = reference_delta(sd_in, n, shapes[n])
        for m in (0.5, 1.0, 1.3):
            want = trained_weight(w0, g, dw, sd_in[n + ".dora_scale"], m, axis)
            assert torch.allclose(w0 + m * after[n], want, atol=2e-5, rtol=1e-4), (n, m)


def test_dora_without_base_keeps_the_magnitude(sd1, tmp_path, capsys):
    _, te, unet = sd1
    net = network(te, unet, algo="locon", dora_wd=True)
    src = save(net, tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    r = resize(capsys, src, "--rank", 2, "--out", out)
    assert "dora_scale kept" in r["dora"]
    a, b = load_file(src), load_file(str(out))
    for k in a:
        if k.endswith("dora_scale"):
            assert torch.equal(a[k], b[k])


def test_dynamic_ranks_follow_the_spectrum(sd1, tmp_path, capsys):
    _, te, unet = sd1
    net = network(te, unet, algo="locon", std=0.2)
    src = save(net, tmp_path / "a.safetensors")
    r = resize(capsys, src, "--rank", 3, "--dynamic", "sv_fro", 0.8, "--out", tmp_path / "b.safetensors")
    for a in net.loras:
        s = torch.linalg.svdvals(a.delta().detach().reshape(a.delta().shape[0], -1).double())
        frac = torch.sqrt(torch.cumsum(s * s, 0) / (s * s).sum())
        want = min(3, int((frac < 0.8).sum()) + 1)
        assert r["modules"][a.lora_name]["rank"] == want, a.lora_name
    meta = load_metadata(str(tmp_path / "b.safetensors"))
    assert json.loads(meta["lycoris_kohya"])["tool"]["dynamic"] == ["sv_fro", 0.8]
    assert meta["ss_network_dim"] == "Dynamic"


def test_refusals_name_the_reason(sd1, tmp_path, capsys):
    _, te, unet = sd1
    src = save(network(te, unet, algo="loha"), tmp_path / "a.safetensors")
    out = tmp_path / "b.safetensors"
    for argv, msg, code in [  # 2: the command line is wrong; 1: the file needs something
        (["--rank", "0"], "--rank 0: a rank must be at least 1", 2),
        (["--rank", "2"], "give the base model (--base)", 1),
        (["--rank", "2", "--dynamic", "sv_fro", "1.5"], "a fraction in (0, 1]", 2),
        (["--rank", "2", "--dynamic", "sv_ratio", "0.5"], "must be >= 1", 2),
        (["--rank", "2", "--dynamic", "sv_max", "2"], "expected one of sv_ratio", 2),
    ]:
        assert cli.main(["resize", src, *argv, "--out", str(out)]) == code
        err = capsys.readouterr().err
        assert msg in err, (argv, err)
        assert not out.exists()
