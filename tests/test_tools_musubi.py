"""Files for musubi-tuner's own inference merge: ``inspect`` says whether it applies a file as
trained, and ``convert --for musubi`` writes a file it does apply as trained. The merge is musubi's
(``oracle.musubi_merge``, re-stated from its utils/lora_utils.py, networks/loha.py, lokr.py), the
expected weights the SPEC formulas (``oracle.reference_delta``, ``trained_weight``): neither from the
package. The base is a Wan miniature saved as musubi's single DiT file (its state dict keys)."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lycoris_kohya
from lycoris_kohya.tools import convert, inspect

import musubi_like as ml
from conftest import randomize
from oracle import column_norm, musubi_merge, reference_delta, row_norm, trained_weight

M = 0.7
# name -> (network_args, a tensor name the trained file has, musubi applies the file as trained
# before conversion, a tensor name the converted file has); "dim" is the network rank (default 4).
# The miniature's layers are 8 or 16 wide: lokr_w2 is factorised only below rank max(b, d)/2, and
# decompose_both factorises lokr_w1 only below max(a, c)/2 (here: the 16-wide MLP layers at rank 1).
CASES = {
    "locon": ({"algo": "locon"}, "lora_down.weight", True, "lora_down.weight"),
    "loha": ({"algo": "loha"}, "hada_w1_a", True, "hada_w1_a"),
    "lokr": ({"algo": "lokr", "factor": "2", "dim": 1}, "lokr_w2_a", True, "lokr_w2_a"),
    "lokr_full_w2": ({"algo": "lokr", "factor": "4", "full_matrix": "true"}, "lokr_w2", True, "lokr_w2"),
    "lokr_w1_factorised": ({"algo": "lokr", "factor": "4", "decompose_both": "true", "dim": 1}, "lokr_w1_a", False,
                           "lokr_w1"),
    "locon_dora": ({"algo": "locon", "dora_wd": "true"}, "dora_scale", False, "lora_down.weight"),
    "loha_dora_out": ({"algo": "loha", "dora_wd": "true", "wd_on_output": "true"}, "dora_scale", False,
                      "lora_down.weight"),
    "lokr_dora": ({"algo": "lokr", "factor": "4", "dora_wd": "true"}, "dora_scale", False, "lora_down.weight"),
}


def holds(sd, tensor):
    return any(k.endswith("." + tensor) for k in sd)


def linears(model):
    return {p + ".weight": m for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def trained_file(tmp_path, args, seed=2, family="wan"):
    model = ml.build(family)
    args = dict(args)
    net = lycoris_kohya.create_arch_network(1.0, args.pop("dim", 4), 2.0, None, None, model, **args)
    randomize(net, seed=seed, std=0.2)
    with torch.no_grad():
        for a in net.loras:
            if a.dora_axis is not None:  # magnitudes near ||W0||, as after some training
                norm = column_norm(a.layer.weight) if a.dora_axis == "input" else row_norm(a.layer.weight)
                a.dora_scale.copy_(norm * (1 + 0.3 * torch.rand(a.dora_scale.shape)))
    path = str(tmp_path / f"f{seed}.safetensors")
    net.save_weights(path, torch.float32, None)
    return model, path


def base_file(model, tmp_path):
    path = str(tmp_path / "wan.safetensors")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    return path, {k: layer.weight.detach().clone() for k, layer in linears(model).items()}


def expected(w0, sd, m):
    """Each weight as trained: W0 + m*g*dW, or DoRA's W0 + m*(W_d - W0) on the stored axis."""
    want = {}
    for key, w in w0.items():
        name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
        if not any(k.startswith(name + ".") for k in sd):
            want[key] = w
            continue
        g, dw = reference_delta(sd, name, w.shape)
        scale = sd.get(name + ".dora_scale")
        want[key] = w + m * g * dw if scale is None else trained_weight(
            w, g, dw, scale.float(), m, "input" if scale.shape[0] == 1 else "output")
    return want


def worst(got, want):
    return max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_tells_and_convert_writes_what_musubi_applies(case, tmp_path):
    args, has, applies, kept = CASES[case]
    model, path = trained_file(tmp_path, args)
    base, w0 = base_file(model, tmp_path)
    sd = load_file(path)
    assert holds(sd, has), sorted(sd)[:6]
    want = expected(w0, sd, M)

    verdict = inspect.summarize(path)["summary"]["compatibility"]["musubi"]
    merged, unused = musubi_merge(w0, sd, M)
    assert verdict["applies_as_trained"] == applies, verdict
    if applies:
        assert worst(merged, want) < 1e-5 and not unused
    else:  # what inspect warns of is real: musubi's merge of this file is not the trained weight
        assert worst(merged, want) > 1e-3 and verdict["issues"]

    out = str(tmp_path / "musubi.safetensors")
    report = convert.convert(path, "musubi", out, base=base)
    converted = load_file(out)
    assert holds(converted, kept), sorted(converted)[:4]
    assert not any(k.endswith((".lokr_w1_a", ".dora_scale")) for k in converted)
    merged, unused = musubi_merge(w0, converted, M)
    assert not unused, sorted(unused)[:4]
    assert worst(merged, want) < 1e-5, report["total_relative_error"]
    assert inspect.summarize(out)["summary"]["compatibility"]["musubi"]["applies_as_trained"]
    # DoRA became plain LoCon (W_d - W0 is linear in m): the same weights at another strength
    merged, _ = musubi_merge(w0, converted, 0.3)
    assert worst(merged, expected(w0, sd, 0.3)) < 1e-5


def test_a_file_of_two_algorithms_becomes_one(tmp_path):
    """musubi reads a file as the algorithm of its first key: a LoKr-attention + LoCon-MLP file
    (two networks' modules in one file) loses one of them there, until convert makes it all LoCon."""
    model, lokr_path = trained_file(tmp_path, {"algo": "lokr", "factor": "4", "preset": "attn-only"}, seed=3)
    _, locon_path = trained_file(tmp_path, {"algo": "locon"}, seed=4)
    a, b = load_file(lokr_path), load_file(locon_path)
    attn = {k.split(".")[0] for k in a}
    sd = {**a, **{k: v for k, v in b.items() if k.split(".")[0] not in attn}}
    assert {"lokr_w1", "lora_down"} <= {k.split(".")[1] for k in sd}
    path = str(tmp_path / "mixed.safetensors")
    save_file(sd, path)
    base, w0 = base_file(model, tmp_path)
    want = expected(w0, sd, M)

    verdict = inspect.summarize(path)["summary"]["compatibility"]["musubi"]
    assert not verdict["applies_as_trained"] and any("left out (the file is read as" in i for i in verdict["issues"])
    merged, unused = musubi_merge(w0, sd, M)
    assert unused and worst(merged, want) > 1e-3

    out = str(tmp_path / "musubi.safetensors")
    convert.convert(path, "musubi", out, base=base)
    converted = load_file(out)
    assert not any("lokr_" in k for k in converted)
    merged, unused = musubi_merge(w0, converted, M)
    assert not unused and worst(merged, want) < 1e-5


def test_dora_for_musubi_needs_the_base(tmp_path):
    _, path = trained_file(tmp_path, CASES["locon_dora"][0])
    with pytest.raises(convert.ToolError, match=r"depends on the base weight; give the base model \(--base\)"):
        convert.convert(path, "musubi", str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_a_factorised_lokr_w1_beside_a_full_lokr_w2_keeps_its_scale(tmp_path):
    """A LyCORIS layout training here does not make on these widths: lokr_w1_a/b with a full
    lokr_w2, where g = alpha/rank(w1) applies; once lokr_w1 is full, readers take g as 1."""
    model, path = trained_file(tmp_path, CASES["lokr_full_w2"][0])
    sd = load_file(path)
    gen = torch.Generator().manual_seed(5)
    for k in [k for k in sd if k.endswith(".lokr_w1")]:
        a, c = sd[k].shape
        name = k[:-len(".lokr_w1")]
        del sd[k]
        sd[name + ".lokr_w1_a"] = torch.randn(a, 1, generator=gen)
        sd[name + ".lokr_w1_b"] = torch.randn(1, c, generator=gen)
        sd[name + ".alpha"] = torch.tensor(0.5)  # g = 0.5/1
    path = str(tmp_path / "w1ab.safetensors")
    save_file(sd, path)
    base, w0 = base_file(model, tmp_path)
    want = expected(w0, sd, M)
    assert not inspect.summarize(path)["summary"]["compatibility"]["musubi"]["applies_as_trained"]
    out = str(tmp_path / "musubi.safetensors")
    convert.convert(path, "musubi", out, base=base)
    converted = load_file(out)
    assert holds(converted, "lokr_w1") and holds(converted, "lokr_w2") and not holds(converted, "lokr_w1_a")
    merged, unused = musubi_merge(w0, converted, M)
    assert not unused and worst(merged, want) < 1e-5


def test_the_file_type_is_the_first_key_safetensors_lists():
    from lycoris_kohya.tools import musubi
    from oracle import musubi_file_type

    keys = ["lora_unet_b.lora_down.weight", "lora_unet_b.lora_up.weight", "lora_unet_a.lokr_w1",
            "lora_unet_a.lokr_w2", "lora_unet_c.hada_w1_a"]
    for order in (keys, keys[::-1]):
        assert musubi.file_type(order) == {"lora": "locon"}.get(musubi_file_type(order), musubi_file_type(order))
    assert musubi.file_type(keys) == "lokr"


# ----- musubi's --lycoris path: lycoris-lora itself as the oracle (where installed) -----------------
LYCORIS_CASES = {"locon": ({"algo": "locon"}, 1.0), "loha": ({"algo": "loha"}, 0.5),
                 "lokr_g2": ({"algo": "lokr", "factor": "2", "dim": 1}, 2.0),
                 "locon_dora_out": ({"algo": "locon", "dora_wd": "true", "wd_on_output": "true"}, 1.0),
                 "locon_dora_in": ({"algo": "locon", "dora_wd": "true"}, None)}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_what_inspect_says_of_musubis_lycoris_path_is_what_lycoris_lora_does(case, tmp_path):
    """musubi's generate scripts with --lycoris call lycoris-lora's create_network_from_weights(
    multiplier=m, file=None, weights_sd=sd, unet=model, ..., for_inference=True).merge_to(None, model,
    sd, dtype=None, device=...). Run that, at m = 0.7, and compare with inspect's line: the change
    it merges is 1/m of the trained one times g where inspect says g is applied twice, and an
    input-axis DoRA file does not load."""
    lyco = pytest.importorskip("lycoris.kohya")
    args, g_twice = LYCORIS_CASES[case]
    model, path = trained_file(tmp_path, args)
    sd = load_file(path)
    _, w0 = base_file(model, tmp_path)
    want = expected(w0, sd, M)
    issues = inspect.summarize(path)["summary"]["compatibility"]["musubi --lycoris"]["issues"]
    assert issues[0] == "merges every module at multiplier 1, whatever --lora_multiplier asks"
    assert any("get g = alpha/rank twice" in i for i in issues) == (g_twice not in (None, 1.0))
    if g_twice is None:
        assert any("fails to load the file" in i for i in issues)
        with pytest.raises(Exception):
            lyco.create_network_from_weights(multiplier=M, file=None, weights_sd=sd, unet=model, text_encoder=None,
                                             vae=None, for_inference=True)[0].merge_to(None, model, sd, dtype=None,
                                                                                       device="cpu")
        return
    net, _ = lyco.create_network_from_weights(multiplier=M, file=None, weights_sd=sd, unet=model, text_encoder=None,
                                              vae=None, for_inference=True)
    net.merge_to(None, model, sd, dtype=None, device="cpu")
    got = {k: layer.weight.detach() for k, layer in linears(model).items()}
    for key in want:  # the change it merges: the trained change at m = 1, times g again for LoHa/LoKr
        if torch.equal(want[key], w0[key]):
            continue
        if "dora" in case:  # at m = 1 its output-axis DoRA is ours
            assert torch.allclose(got[key], expected(w0, sd, 1.0)[key], atol=1e-5), key
        else:
            assert torch.allclose(got[key] - w0[key], (want[key] - w0[key]) / M * g_twice, atol=1e-5), key
