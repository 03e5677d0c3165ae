"""The tools on a user's first hour: every file a trainer writes works (modules that are exactly zero,
as sd-scripts leaves SDXL's unused last CLIP-L layer, included), no output replaces a file without
--force or ever an input, a written file describes what it now holds (its lycoris_kohya JSON and the
ss_* keys), and every error is one line with a usage (2) or file (1) exit code. Expected numbers come
from the closed forms in oracle.py (reference_delta), from singular values computed here, and from
tensor names and shapes read here (test_metadata.modules_in_file)."""
import hashlib
import io
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

import lycoris_kohya
from lycoris_kohya.tools import cli
from lycoris_kohya.weights import load_metadata, save_weights

import tiny_models as tm
from test_algorithms import build
from test_metadata import modules_in_file
from test_tools_resize import deltas
from tools_helpers import (_one_thread, layer_paths, network, save, sd1_models, sd1_single,  # noqa: F401
                           sdscripts_sdxl_names, write_single)


def run(capsys, *argv):
    capsys.readouterr()  # what building the models printed (transformers' loading bars)
    rc = cli.main([str(a) for a in argv])
    c = capsys.readouterr()
    return rc, c.out, c.err


def run_json(capsys, *argv):
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def truncation_error(d, rank):
    """The optimal relative error of a rank-``rank`` approximation (Eckart-Young), from svdvals here."""
    s = torch.linalg.svdvals(d.reshape(d.shape[0], -1).double())
    return float(torch.sqrt((s[rank:] ** 2).sum()) / torch.sqrt((s ** 2).sum()))


def shapes_of(net):
    return {a.lora_name: tuple(a.layer.weight.shape) for a in net.loras}


def zeroed(sd, names, suffixes):
    """A trained-like file: the factor that starts at zero (lora_up, hada_w2_a, lokr_w2) still zero
    for the modules the training never reached."""
    sd = {k: v.clone() for k, v in sd.items()}
    hit = set()
    for k in sd:
        name, suffix = k.split(".", 1)
        if name in names and suffix in suffixes:
            sd[k].zero_()
            hit.add(name)
    assert hit == set(names)
    return sd


# ----- 1. zero modules ---------------------------------------------------------------------------
ZERO_FACTOR = {"locon": ("lora_up.weight",), "loha": ("hada_w2_a",), "lokr": ("lokr_w2", "lokr_w2_a")}


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_zero_modules_of_any_algorithm_go_through_every_tool(tiny_sd, tmp_path, capsys, algo):
    te, unet = sd1_models(tiny_sd)
    net = network(te, unet, algo=algo)
    shapes = shapes_of(net)
    zero = sorted(n for n in shapes if n.startswith("lora_te_text_model_encoder_layers_1_"))  # the last layer
    src = str(tmp_path / "a.safetensors")
    save_weights(src, zeroed(net.export_state_dict(), zero, ZERO_FACTOR[algo]), {"ss_network_module": "lycoris_kohya"})
    before = deltas(src, shapes)
    assert all(not before[n].any() for n in zero) and all(before[n].any() for n in shapes if n not in zero)

    def check(path, report, exact):
        sd = load_file(str(path))
        assert all(torch.isfinite(v).all() for v in sd.values())
        after = deltas(path, shapes)
        for n in zero:  # a rank-1 LoCon with lora_up = 0: exactly no change
            assert sd[n + ".lora_down.weight"].shape[0] == 1 and not sd[n + ".lora_up.weight"].any(), n
            assert not after[n].any(), n
        for n in shapes:
            if n not in zero:
                want = exact(n)
                got = float((after[n] - before[n]).norm() / before[n].norm())
                assert got == pytest.approx(want, rel=1e-3, abs=1e-5), n
        assert report["summary"]["zero_modules"] == zero

    r = run_json(capsys, "resize", src, "--rank", 2, "--base", tiny_sd, "--out", tmp_path / "r.safetensors")
    check(tmp_path / "r.safetensors", r, lambda n: truncation_error(before[n], 2))
    r = run_json(capsys, "merge", f"{src}:0.5", f"{src}:0.5", "--rank", 2, "--base", tiny_sd,
                 "--out", tmp_path / "m.safetensors")
    check(tmp_path / "m.safetensors", r, lambda n: truncation_error(before[n], 2))
    r = run_json(capsys, "convert", src, "--for", "diffusers", "--base", tiny_sd, "--out", tmp_path / "c.safetensors")
    if algo == "locon":  # plain LoCon is already what diffusers applies: copied as it is
        assert r["summary"]["zero_modules"] == zero
    else:
        check(tmp_path / "c.safetensors", r, lambda n: 0.0)
    s = run_json(capsys, "inspect", src)["summary"]
    assert s["zero_modules"] == zero


def sdxl_trained_like(tmp_path, algo="locon"):
    """A file on the real SDXL layout (sd-scripts' key names, CLIP-L with its 12 layers) whose text
    encoder 1 layer 11 modules were never trained: sd-scripts takes CLIP-L's hidden states after
    layer 10, so their lora_up stays exactly zero."""
    te1, te2, unet = tm.clip(0, layers=12), tm.clip(1, with_projection=True, act="gelu"), tm.sdxl_unet(0)
    net = network([te1, te2], unet, algo=algo)
    names = sdscripts_sdxl_names({a.lora_name + ".x": None for a in net.loras}, net, [te1, te2], unet)
    shapes = {k.split(".")[0]: tuple(a.layer.weight.shape) for k, a in zip(names, net.loras)}
    zero = sorted(n for n in shapes if n.startswith("lora_te1_text_model_encoder_layers_11_"))
    assert len(zero) == 6  # q, k, v, out_proj, fc1, fc2
    sd = zeroed(sdscripts_sdxl_names(net.export_state_dict(), net, [te1, te2], unet), zero, ZERO_FACTOR[algo])
    path = str(tmp_path / "sdxl_locon_r4.safetensors")
    save_weights(path, sd, {"ss_network_module": "lycoris_kohya", "ss_base_model_version": "sdxl_base_v1-0"})
    return path, shapes, zero


def test_sdxl_unused_text_encoder_layer(tmp_path, capsys):
    src, shapes, zero = sdxl_trained_like(tmp_path)
    assert any(n.startswith("lora_unet_input_blocks_") for n in shapes)
    before = deltas(src, shapes)
    for argv in (["resize", src, "--rank", 2], ["merge", src, "--rank", 2]):
        out = tmp_path / f"{argv[0]}.safetensors"
        rc, text, err = run(capsys, *argv, "--out", out)
        assert rc == 0, err
        assert "6 modules are exactly zero" in text and "lora_te1_text_model_encoder_layers_11_" in text
        after = deltas(out, shapes)
        assert all(torch.isfinite(v).all() for v in load_file(str(out)).values())
        for n in shapes:
            if n in zero:
                assert not after[n].any(), n
            else:
                got = float((after[n] - before[n]).norm() / before[n].norm())
                assert got == pytest.approx(truncation_error(before[n], 2), rel=1e-3, abs=1e-6), n


def test_lowrank_fits_of_a_zero_difference_are_finite():
    from lycoris_kohya.tools import lowrank

    for shape, tucker in [((8, 6), False), ((8, 6, 1, 1), False), ((8, 6, 3, 3), False), ((8, 6, 3, 3), True)]:
        f = lowrank.fit(torch.zeros(shape), 4, None, tucker)
        assert all(torch.isfinite(t).all() for t in f.tensors.values()), shape
        up, down = f.tensors["lora_up.weight"], f.tensors["lora_down.weight"]
        assert f.rank == 1 and f.zero and f.relative_error == 0.0 and not up.any() and down.norm() == 1
        assert not (up.flatten(1) @ down.flatten(1)).any()


# ----- 2. outputs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tiny_sd, sd1_single, tmp_path_factory):
    """Inputs the tools read (built once: each test asserts they are left as they were)."""
    tmp_path = tmp_path_factory.mktemp("inputs")
    te, unet = sd1_models(tiny_sd)
    src = save(network(te, unet, algo="locon"), tmp_path / "a.safetensors")
    sd = load_file(sd1_single)
    k = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    sd[k] = sd[k] + 0.01
    single = write_single(load_file(sd1_single), tmp_path / "model.safetensors")
    tuned = write_single(sd, tmp_path / "tuned.safetensors")
    return {"src": src, "model": single, "tuned": tuned}


# tool -> (argv for an output, the input it must never replace)
TOOLS = {
    "resize": (lambda f, out: ["resize", f["src"], "--rank", 2, "--out", out], "src"),
    "convert": (lambda f, out: ["convert", f["src"], "--for", "all", "--out", out], "src"),
    "merge": (lambda f, out: ["merge", f["src"], f"{f['src']}:0.5", "--out", out], "src"),
    "merge --into": (lambda f, out: ["merge", f["src"], "--into", f["model"], "--out", out], "model"),
    "extract": (lambda f, out: ["extract", "--base", f["model"], "--tuned", f["tuned"], "--rank", 1, "--out", out],
                "tuned"),
    "inspect --plot": (lambda f, out: ["inspect", f["src"], "--plot", out], "src"),
}


def _out(tmp_path, tool, name="out"):
    return str(tmp_path / (name + (".png" if tool == "inspect --plot" else ".safetensors")))


def _no_temporary_files(folder):
    assert not [n for n in os.listdir(folder) if n.startswith((".tmp-", ".old-"))]


@pytest.mark.parametrize("tool", list(TOOLS))
def test_an_existing_output_is_replaced_only_with_force(files, tmp_path, capsys, tool):
    if tool == "inspect --plot":
        pytest.importorskip("matplotlib")
    argv, _ = TOOLS[tool]
    out = _out(tmp_path, tool)
    with open(out, "wb") as f:
        f.write(b"an earlier result")
    rc, text, err = run(capsys, *argv(files, out))
    assert rc == 2 and f"{out}: already exists; add --force to replace it" in err and err.count("\n") == 1
    assert open(out, "rb").read() == b"an earlier result"
    rc, text, err = run(capsys, *argv(files, out), "--force")
    assert rc == 0, err
    assert open(out, "rb").read() != b"an earlier result"
    assert text.splitlines()[-1].startswith(f"wrote {out} (")  # every tool says where it wrote
    _no_temporary_files(tmp_path)


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_an_input_is_never_the_output(files, tmp_path, capsys, tool, how):
    argv, which = TOOLS[tool]
    src = files[which]
    out = src
    if how != "same":
        out = str(tmp_path / ("link" + os.path.splitext(_out(tmp_path, tool))[1]))
        (os.symlink if how == "symlink" else os.link)(src, out)
    before = open(src, "rb").read()
    rc, _, err = run(capsys, *argv(files, out), "--force")
    assert rc == 2 and "is the input" in err and "even with --force" in err, err
    assert open(src, "rb").read() == before
    _no_temporary_files(tmp_path)
    _no_temporary_files(os.path.dirname(src))


@pytest.mark.parametrize("tool", list(TOOLS))
def test_a_missing_output_folder_is_an_error_naming_it(files, tmp_path, capsys, tool):
    argv, _ = TOOLS[tool]
    missing = tmp_path / "runs" / "today"
    rc, _, err = run(capsys, *argv(files, _out(missing, tool)))
    assert rc == 2 and f"the folder {missing} does not exist" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_merged_folder_is_replaced_with_force_only_if_it_is_a_model(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    a = save(network(te, unet, seed=1), tmp_path / "a.safetensors")
    out = tmp_path / "merged"
    assert run(capsys, "merge", a, "--into", tiny_sd, "--out", out)[0] == 0
    rc, _, err = run(capsys, "merge", f"{a}:0.5", "--into", tiny_sd, "--out", out)
    assert rc == 2 and "already exists" in err
    assert run(capsys, "merge", f"{a}:0.5", "--into", tiny_sd, "--out", out, "--force")[0] == 0
    te_half, _ = sd1_models(str(out))
    net, _ = lycoris_kohya.create_network_from_weights(0.5, a, None, te, unet)
    paths = layer_paths(net, [te], unet)
    x = next(x for x in net.loras if paths[x.lora_name][0] == "te0")
    got = dict(te_half.named_modules())[paths[x.lora_name][1]].weight
    assert torch.allclose(got, x.merged_weight(0.5), atol=1e-6)  # the 0.5 merge, not the first one
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, "merge", a, "--into", tiny_sd, "--out", other, "--force")
    assert rc == 2 and "not a diffusers model folder" in err and (other / "keep.txt").read_text() == "mine"
    _no_temporary_files(tmp_path)


# ----- 3. what a written file says about itself -----------------------------------------------------
def _ss_hash(path):
    """sd-scripts' sshs_model_hash: sha256 of the data part of the file written with only ss_* keys."""
    meta = {k: v for k, v in load_metadata(path).items() if k.startswith("ss_")}
    blob = st_save(load_file(path), meta)
    return hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()


def _layout_groups(path):
    """{(algo, rank, layer, alpha): count} read here from the tensors (test_metadata's reading)."""
    sd = load_file(path)
    groups = {}
    for name, (algo, rank, kind, _) in modules_in_file(path).items():
        key = (algo, rank, kind, float(sd[name + ".alpha"]))
        groups[key] = groups.get(key, 0) + 1
    return groups


def test_a_resized_lokr_dora_file_describes_plain_locon(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    net = network(te, unet, algo="lokr", dora_wd=True, factor=4)
    src = str(tmp_path / "a.safetensors")
    trained_args = {"algo": "lokr", "dora_wd": "true", "factor": "4", "conv_dim": "4", "conv_alpha": "1",
                    "dropout": "0.1", "preset": "full"}
    net.save_weights(src, torch.float32, {"ss_network_module": "lycoris_kohya", "ss_network_dim": "4",
                                          "ss_network_alpha": "2.0", "ss_network_args": json.dumps(trained_args),
                                          "ss_output_name": "style"})
    before = json.loads(load_metadata(src)["lycoris_kohya"])
    assert before["algorithms"] == ["lokr"] and before["dora_axis"] == "input"
    out = str(tmp_path / "b.safetensors")
    assert run(capsys, "resize", src, "--rank", 2, "--base", tiny_sd, "--out", out)[0] == 0
    meta = load_metadata(out)
    desc = json.loads(meta["lycoris_kohya"])
    assert desc["algorithms"] == ["locon"] and desc["dora_axis"] is None
    assert desc["tool"]["name"] == "resize"
    assert desc["tool"]["args"] == ["a.safetensors", "--rank", "2", "--base", os.path.basename(tiny_sd)]
    files_modules = modules_in_file(out)
    prefixes = {}
    for _, _, _, p in files_modules.values():
        prefixes[p] = prefixes.get(p, 0) + 1
    assert desc["modules"] == prefixes
    got = {(e["algo"], e["rank"], e["layer"], e["alpha"]): e["modules"] for e in desc["layouts"]}
    assert got == _layout_groups(out)
    assert all(e["dora_axis"] is None for e in desc["layouts"])
    # ss_* agree: every module has alpha = rank (g = 1), the largest Linear/1x1 rank is 2
    assert {k for k, n in got.items() if k[1] != k[3]} == set()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    args = json.loads(meta["ss_network_args"])
    assert args == {"algo": "locon", "conv_dim": "2", "conv_alpha": "2.0", "dropout": "0.1", "preset": "full"}
    assert meta["ss_output_name"] == "style"  # the training record is kept
    assert meta["sshs_model_hash"] == _ss_hash(out)
    # a second tool keeps the first in the history
    out2 = str(tmp_path / "c.safetensors")
    assert run(capsys, "resize", out, "--rank", 1, "--out", out2)[0] == 0
    desc2 = json.loads(load_metadata(out2)["lycoris_kohya"])
    assert desc2["history"] == [desc["tool"]] and desc2["tool"]["args"][:3] == ["b.safetensors", "--rank", "1"]
    assert load_metadata(out2)["ss_network_dim"] == "1"


def test_resize_without_base_keeps_dora_and_says_so(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    src = str(tmp_path / "a.safetensors")
    network(te, unet, algo="locon", dora_wd=True, wd_on_output=True).save_weights(
        src, torch.float32, {"ss_network_args": json.dumps({"algo": "locon", "dora_wd": "true", "wd_on_output": "true",
                                                              "use_scalar": "true"})})
    out = str(tmp_path / "b.safetensors")
    assert run(capsys, "resize", src, "--rank", 2, "--out", out)[0] == 0
    meta = load_metadata(out)
    desc = json.loads(meta["lycoris_kohya"])
    assert desc["dora_axis"] == "output" and all(e["dora_axis"] == "output" for e in desc["layouts"])
    args = json.loads(meta["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_output"] == "True" and "use_scalar" not in args


def test_output_axis_dora_as_diff_drops_dora_from_the_description(tiny_sd, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    src = str(tmp_path / "a.safetensors")
    network(te, unet, algo="loha", dora_wd=True, wd_on_output=True).save_weights(
        src, torch.float32, {"ss_network_dim": "4", "ss_network_args": json.dumps({"algo": "loha", "dora_wd": "true"})})
    out = str(tmp_path / "b.safetensors")
    assert run(capsys, "convert", src, "--for", "a1111", "--base", tiny_sd, "--out", out)[0] == 0
    meta = load_metadata(out)
    desc = json.loads(meta["lycoris_kohya"])
    assert desc["algorithms"] == ["diff"] and desc["dora_axis"] is None
    assert "ss_network_dim" not in meta and "ss_network_args" not in meta  # nothing of them applies to diffs
    assert desc["tool"]["for"] == "a1111"


@pytest.mark.parametrize("layout", ["locon", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_full_matrix",
                                    "lokr_tucker", "lokr_decompose_both"])
def test_the_tools_description_is_the_trainers(layout, tmp_path):
    """common.plugin_description of a trainer's file equals what the trainer wrote
    (LycorisNetwork.plugin_metadata): the tools reproduce the same keys and groups."""
    from lycoris_kohya import specs
    from lycoris_kohya.tools.common import plugin_description

    _, net = build(layout)
    path = str(tmp_path / "n.safetensors")
    net.save_weights(path, torch.float32, {})
    trained = json.loads(load_metadata(path)["lycoris_kohya"])
    assert plugin_description(specs.read_modules(load_file(path), shapes_of(net))) == trained


def test_a_merge_error_names_the_file_that_holds_the_module(tiny_sd, sd1_single, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    a = save(network(te, unet, seed=1, algo="locon"), tmp_path / "first.safetensors")
    b = save(network(te, unet, seed=2, algo="loha"), tmp_path / "second.safetensors")
    rc, _, err = run(capsys, "merge", a, b, "--rank", 2, "--out", tmp_path / "x.safetensors")  # LoHa: needs --base
    assert rc == 1 and err.startswith(f"lycoris-kohya merge: error: {b}: ") and "--base" in err, err
    # a module for a layer of another shape, in the second file only
    sd = load_file(a)
    name = next(k.split(".")[0] for k in sd if k.startswith("lora_te_"))
    sd[name + ".lora_down.weight"] = torch.randn(4, 7)
    c = str(tmp_path / "third.safetensors")
    save_weights(c, sd, {})
    rc, _, err = run(capsys, "merge", a, c, "--out", tmp_path / "x.safetensors")
    assert rc == 1 and err.startswith(f"lycoris-kohya merge: error: {c}: {name}") and "Traceback" not in err, err
    rc, _, err = run(capsys, "merge", a, c, "--into", sd1_single, "--out", tmp_path / "x.safetensors")
    assert rc == 1 and err.startswith(f"lycoris-kohya merge: error: {c}: {name}") and err.count("\n") == 1, err
    assert not (tmp_path / "x.safetensors").exists()


# ----- 4. the command line ------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lycoris_kohya {lycoris_kohya.__version__}\n"


def test_a_folder_for_a_file_lists_what_it_holds(tmp_path, capsys):
    _, net = build("locon")
    save(net, tmp_path / "style.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    rc, _, err = run(capsys, "inspect", tmp_path)
    assert rc == 1 and f"{tmp_path}: is a folder, not a file; it holds style.safetensors" in err
    assert "no such file" not in err and "notes.txt" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, "resize", empty, "--rank", 2, "--out", tmp_path / "o.safetensors")
    assert rc == 1 and "is a folder, not a file, and holds no .safetensors" in err


def test_files_that_are_not_safetensors_say_what_they_are(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("prompt: a lighthouse at dusk\n")
    renamed = tmp_path / "style.safetensors"
    renamed.write_text("prompt: a lighthouse at dusk\n")
    _, net = build("locon")
    good = open(save(net, tmp_path / "good.safetensors"), "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:len(good) // 2])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path, msg in [(text, "is not a safetensors file (it holds text: 'prompt: a lighthouse at dusk')"),
                      (renamed, "is not a safetensors file (it holds text:"),
                      (cut, "not a readable safetensors file (truncated: its header and tensors need"),
                      (empty, "is not a safetensors file (an empty file, 0 bytes)")]:
        rc, _, err = run(capsys, "inspect", path)
        assert rc == 1 and err == f"lycoris-kohya inspect: error: {path}: {msg}" + err.split(msg, 1)[1], err
        # (the path is taken out first: pytest's own temp folders are numbered, e.g. pytest-101)
        bare = err.replace(str(path), "")
        assert err.count("\n") == 1 and "101" not in bare and "ValueError" not in err


def test_nan_in_an_input_is_named(tmp_path, capsys):
    _, net = build("locon")
    sd = {k: v.clone() for k, v in net.export_state_dict().items()}
    key = next(k for k in sd if k.endswith("lora_down.weight"))
    sd[key][0, 0] = float("nan")
    src = str(tmp_path / "a.safetensors")
    from safetensors.torch import save_file

    save_file(sd, src)
    rc, _, err = run(capsys, "resize", src, "--rank", 1, "--out", tmp_path / "b.safetensors")
    assert rc == 1 and f"{src}: {key} holds NaN or Inf" in err
    rc, out, _ = run(capsys, "inspect", src)
    assert rc == 0 and "1 modules hold NaN or Inf" in out


class _ClosedPipe(io.TextIOBase):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_ends_quietly(tmp_path, capsys, monkeypatch):
    _, net = build("locon")
    src = save(net, tmp_path / "a.safetensors")
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(["inspect", src, "--modules"]) == 0
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # a CLI in a subprocess, its stdout closed after one line as `| head -1` does
def test_piping_into_head_prints_no_traceback(tmp_path):
    import subprocess

    _, net = build("locon")
    src = save(net, tmp_path / "a.safetensors")
    p = subprocess.Popen([sys.executable, "-m", "lycoris_kohya", "inspect", src, "--modules"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=os.path.dirname(lycoris_kohya.__path__[0]))
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_summaries_by_default_a_line_per_module_with_verbose(tiny_sd, sd1_single, tmp_path, capsys):
    te, unet = sd1_models(tiny_sd)
    net = network(te, unet, algo="locon")
    src = save(net, tmp_path / "a.safetensors")
    names = [a.lora_name for a in net.loras]
    sd = load_file(sd1_single)
    k = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    sd[k] = sd[k] + 0.01
    tuned = write_single(sd, tmp_path / "tuned.safetensors")
    for i, argv in enumerate([["resize", src, "--rank", 2], ["merge", src, f"{src}:0.5", "--rank", 3],
                              ["convert", src, "--for", "all"],
                              ["extract", "--base", sd1_single, "--tuned", tuned, "--rank", 1]]):
        rc, text, err = run(capsys, *argv, "--out", tmp_path / f"s{i}.safetensors")
        assert rc == 0, err
        lines = text.splitlines()
        assert len(lines) <= 8 and sum(n in text for n in names) <= 2, text  # the worst and a zero module at most
        assert lines[-1].startswith(f"wrote {tmp_path / f's{i}.safetensors'} (")
        rc, text, err = run(capsys, *argv, "--out", tmp_path / f"v{i}.safetensors", "--verbose")
        changed = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        listed = names if argv[0] != "extract" else [changed]
        assert rc == 0 and all(n in text for n in listed), argv
    rc, text, _ = run(capsys, "resize", src, "--rank", 2, "--out", tmp_path / "t.safetensors")
    assert f"{len(names)} modules; ranks 4 -> 2 (x{len(names)})" in text
    assert "relative error ||D - D_r||/||D||: max " in text and ", mean " in text


def test_a_full_matrix_lokr_shows_its_real_rank(tmp_path, capsys):
    _, net = build("lokr_full_matrix")
    src = save(net, tmp_path / "a.safetensors")
    shapes = shapes_of(net)
    # the numerical rank of the fp32 closed form: singular values above fp32 rounding
    real = {n: int(torch.linalg.matrix_rank(d.reshape(d.shape[0], -1).double(), rtol=1e-4))
            for n, d in deltas(src, shapes).items()}
    assert min(real.values()) > 1
    report = run_json(capsys, "inspect", src)
    assert {n: e["rank"] for n, e in report["modules"].items()} == real
    assert report["summary"]["ranks"] == sorted(set(real.values()))
    r = run_json(capsys, "resize", src, "--rank", 1000, "--out", tmp_path / "b.safetensors")
    assert {n: e["rank_in"] for n, e in r["modules"].items()} == real
    assert {n: e["rank"] for n, e in r["modules"].items()} == real  # at full rank: all of it, nothing more


def test_errors_are_one_line_with_usage_and_file_codes(tmp_path, capsys):
    _, net = build("locon")
    src = save(net, tmp_path / "a.safetensors")
    out = str(tmp_path / "o.safetensors")
    missing = str(tmp_path / "missing.safetensors")
    for argv, code, msg in [
        (["resize", src, "--rank", "0", "--out", out], 2, "--rank 0: a rank must be at least 1"),
        (["resize", src, "--rank", "2", "--dynamic", "sv_fro", "x", "--out", out], 2, "--dynamic sv_fro 'x'"),
        (["resize", src, "--rank", "2", "--out", str(tmp_path / "o.txt")], 2, "should end in .safetensors"),
        (["resize", src, "--rank", "2", "--out", str(tmp_path)], 2, "is a folder"),
        (["convert", src, "--for", "all", "--rank", "2", "--out", out], 2, "only used with --allow-lossy"),
        (["merge", f"{src}:x", "--out", out], 2, "FILE:MULTIPLIER"),
        (["merge", src, "--into", src, "--rank", "2", "--out", out], 2, "--rank and --base are for combining"),
        (["extract", "--base", src, "--tuned", src, "--rank", "1", "--conv-rank", "-1", "--out", out], 2,
         "--conv-rank -1"),
        (["resize", missing, "--rank", "2", "--out", out], 1, f"{missing}: no such file"),
        (["merge", src, missing, "--out", out], 1, f"{missing}: no such file"),
        (["convert", src, "--for", "all", "--base", missing, "--out", out], 1, f"{missing}: no such file"),
    ]:
        rc, _, err = run(capsys, *argv)
        assert rc == code and msg in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert not os.path.exists(out)


def test_progress_bars_on_a_terminal_only(monkeypatch):
    pytest.importorskip("tqdm")
    from lycoris_kohya.tools.common import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in [(Terminal(), True), (io.StringIO(), False)]:
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress(range(3), "resize")) == [0, 1, 2]
        assert ("resize" in stream.getvalue()) == shown
