"""``lycoris-kohya inspect``: its numbers are the network's own (||g*dW||_F per module, what
--scale_weight_norms bounds; algo, rank, alpha, DoRA axis), it groups by kohya block, reports which
tools apply the file as trained, checks the stored hash, and names bad files."""
import json

import pytest
import torch

import lycoris_kohya
from lycoris_kohya.tools import cli

from test_algorithms import LAYOUTS, build
from test_dora import build as build_dora
from tools_helpers import _one_thread, network, save, sd1_models  # noqa: F401


def inspect_json(path, capsys):
    assert cli.main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("layout", list(LAYOUTS) + ["dora_input", "dora_output"])
def test_json_numbers_are_the_networks(layout, tmp_path, capsys):
    if layout.startswith("dora"):
        unet, net = build_dora("lokr", layout.split("_")[1])
    else:
        unet, net = build(layout)
    path = save(net, tmp_path / "n.safetensors")
    report = inspect_json(path, capsys)
    assert set(report) == {"modules", "metadata", "summary"}
    assert report["modules"].keys() == {a.lora_name for a in net.loras}
    for a in net.loras:
        e = report["modules"][a.lora_name]
        assert set(e) == {"algo", "rank", "alpha", "dora_axis", "norm"}
        assert e["norm"] == pytest.approx(a.delta_norm(), rel=1e-5)
        assert e["algo"] == a.algo and e["alpha"] == pytest.approx(a._alpha_value)
        assert e["dora_axis"] == a.dora_axis
        if a.algo != "lokr" or a.layout.use_alpha:
            assert e["rank"] == a.rank
    assert report["metadata"]["ss_network_module"] == "lycoris_kohya"
    assert report["summary"]["hash"]["matches_file"] is True


def test_blocks_totals_and_max_norm_agree(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    net = network(te, unet, algo="locon")
    path = save(net, tmp_path / "n.safetensors")
    s = inspect_json(path, capsys)["summary"]
    norms = {a.lora_name: a.delta_norm() for a in net.loras}
    assert s["total_norm"] == pytest.approx(sum(n * n for n in norms.values()) ** 0.5, rel=1e-5)
    assert s["max_norm"] == pytest.approx(max(norms.values()), rel=1e-5)
    _, mean, mx = net.apply_max_norm_regularization(1e9, "cpu")  # the network's own numbers
    assert s["max_norm"] == pytest.approx(mx, rel=1e-5)
    blocks = s["blocks"]
    assert blocks["TE"]["modules"] == 12 and blocks["MID"]["modules"] > 0
    te_norms = [n for k, n in norms.items() if k.startswith("lora_te_")]
    assert blocks["TE"]["norm"] == pytest.approx(sum(n * n for n in te_norms) ** 0.5, rel=1e-5)
    # IN01 = down_blocks.0.(resnets|attentions).0 (kohya's block index)
    in01 = [n for k, n in norms.items() if "down_blocks_0_resnets_0" in k or "down_blocks_0_attentions_0" in k]
    assert blocks["IN01"]["modules"] == len(in01)
    assert sum(b["modules"] for b in blocks.values()) == len(norms)
    assert s["compatibility"]["diffusers"]["applies_as_trained"] is True
    # the text report says the same
    assert cli.main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "IN01" in text and "MID" in text and "applies every module as trained" in text


def test_compatibility_flags(tmp_path, capsys):
    _, tucker = build("lokr_tucker")
    s = inspect_json(save(tucker, tmp_path / "t.safetensors"), capsys)["summary"]["compatibility"]
    assert not s["comfyui"]["applies_as_trained"] and "lokr_t2" in s["comfyui"]["issues"][0]
    assert s["a1111"]["applies_as_trained"] and not s["diffusers"]["applies_as_trained"]
    _, out_axis = build_dora("locon", "output")
    s = inspect_json(save(out_axis, tmp_path / "o.safetensors"), capsys)["summary"]["compatibility"]
    assert not s["a1111"]["applies_as_trained"] and not s["comfyui"]["applies_as_trained"]
    _, in_axis = build_dora("locon", "input")
    s = inspect_json(save(in_axis, tmp_path / "i.safetensors"), capsys)["summary"]["compatibility"]
    assert s["a1111"]["applies_as_trained"] and s["comfyui"]["applies_as_trained"]
    assert not s["diffusers"]["applies_as_trained"]  # drops dora_scale


def test_changed_file_hash_is_reported(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, net = build("locon")
    path = save(net, tmp_path / "n.safetensors")
    from lycoris_kohya.weights import load_metadata

    sd, meta = load_file(path), load_metadata(path)
    k = next(iter(sd))
    sd[k] = sd[k] + 1
    save_file(sd, str(tmp_path / "m.safetensors"), meta)
    assert inspect_json(tmp_path / "m.safetensors", capsys)["summary"]["hash"]["matches_file"] is False


def test_bad_files_are_named(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert cli.main(["inspect", str(missing)]) == 1
    assert f"{missing}: no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    assert cli.main(["inspect", str(junk)]) == 1
    assert "junk.safetensors: not a readable" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 3), "lora_unet_x.lora_up.weight": torch.zeros(4, 3)},
              str(tmp_path / "bad.safetensors"))
    assert cli.main(["inspect", str(tmp_path / "bad.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "bad.safetensors: lora_unet_x:" in err and "lora_up.weight" in err


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, net = build("loha")
    out = tmp_path / "norms.png"
    assert cli.main(["inspect", save(net, tmp_path / "n.safetensors"), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    _, net = build("locon")
    assert cli.main(["inspect", save(net, tmp_path / "n.safetensors"), "--plot", str(tmp_path / "p.png")]) == 1
    assert "lycoris_kohya[plot]" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_every_subcommand_has_help(capsys):
    for cmd in ("inspect", "resize", "merge", "convert", "extract"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        assert f"lycoris-kohya {cmd}" in capsys.readouterr().out


@pytest.mark.slow  # a CLI in a subprocess
def test_python_dash_m_lists_the_subcommands():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lycoris_kohya", "--help"], capture_output=True, text=True,
                       cwd=lycoris_kohya.__path__[0] + "/..")
    assert r.returncode == 0 and "inspect" in r.stdout and "extract" in r.stdout
