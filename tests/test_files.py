"""Files: every load error names the path; .pt files (weights_only); resume with load_weights."""
import os

import pytest
import torch

import lycoris_kohya
from lycoris_kohya import weights as wio

from conftest import randomize
from test_algorithms import INPUTS, ToyUNet


def toy_net(**kw):
    unet = ToyUNet()
    net = lycoris_kohya.create_network(1.0, 2, 3.0, None, [], unet, **kw)
    return unet, randomize(net, seed=7, std=0.2)


def saved(tmp_path, name="n.safetensors", **kw):
    unet, net = toy_net(**kw)
    path = str(tmp_path / name)
    net.save_weights(path, torch.float32, {})
    return path


def corrupt_files(tmp_path):
    good = open(saved(tmp_path), "rb").read()
    cases = {
        "truncated.safetensors": good[:-10],  # "incomplete metadata" from safetensors
        "header-only.safetensors": good[:40],
        "garbage.safetensors": os.urandom(200),
        "garbage.pt": os.urandom(200),
        "empty.pt": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"x": torch.zeros(2), "code": ToyUNet}, str(tmp_path / "pickled-class.pt"))  # not weights-only
    torch.save([torch.zeros(2)], str(tmp_path / "a-list.pt"))
    return sorted(cases) + ["pickled-class.pt", "a-list.pt"]


def test_every_broken_file_is_an_error_naming_its_path(tmp_path):
    for name in corrupt_files(tmp_path):
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as e:
            wio.load_state_dict(path)
        assert path in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("name", ["missing.safetensors", "missing.pt"])
def test_a_missing_file_names_its_path(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=name):
        wio.load_state_dict(path)


def test_entry_points_name_the_file_on_load_errors(tmp_path):
    corrupt_files(tmp_path)
    path = str(tmp_path / "truncated.safetensors")
    with pytest.raises(ValueError, match="truncated.safetensors"):
        lycoris_kohya.create_network_from_weights(1.0, path, None, [], ToyUNet())
    _, net = toy_net()
    with pytest.raises(ValueError, match="truncated.safetensors"):
        net.load_weights(path)
    # a file that reads fine but belongs to another network: the error names the file and the key
    other = saved(tmp_path, "loha.safetensors", algo="loha")
    with pytest.raises(ValueError, match="loha.safetensors.*hada_w1_a"):
        net.load_weights(other)
    with pytest.raises(ValueError, match="loha.safetensors"):
        lycoris_kohya.create_network_from_weights(1.0, other, None, [], torch.nn.Module())


# ----- .pt files ------------------------------------------------------------------------------
def test_pt_files_hold_the_same_tensors_and_load_weights_only(tmp_path):
    unet, net = toy_net(algo="lokr", use_scalar="true")
    st, pt = str(tmp_path / "n.safetensors"), str(tmp_path / "n.pt")
    net.save_weights(st, torch.float16, {"ss_x": "1"})
    net.save_weights(pt, torch.float16, {"ss_x": "1"})
    from safetensors.torch import load_file

    a, b = load_file(st), torch.load(pt, map_location="cpu", weights_only=True)  # torch alone reads it
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and b[k].dtype == torch.float16 for k in a)
    loaded, _ = lycoris_kohya.create_network_from_weights(1.0, pt, None, [], ToyUNet())
    assert {x.lora_name: x.algo for x in loaded.loras} == {x.lora_name: "lokr" for x in net.loras}
    for x, y in zip(net.loras, loaded.loras):
        assert torch.allclose(x.merged_weight(1.0), y.merged_weight(1.0), atol=1e-2)  # fp16 file


# ----- resume (sd-scripts --network_weights: create_network, apply_to, load_weights) -------------
RESUME = {"locon_scalar": {"algo": "locon", "use_scalar": "true", "conv_dim": "2"},
          "loha_tucker": {"algo": "loha", "use_tucker": "true"},
          "lokr_dora": {"algo": "lokr", "dora_wd": "true"},
          "locon_dora_out": {"algo": "locon", "dora_wd": "true", "wd_on_output": "true"}}


@pytest.mark.parametrize("layout", list(RESUME))
@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_load_weights_resumes_exactly(tmp_path, layout, ext):
    unet, net = toy_net(**RESUME[layout])
    with torch.no_grad():
        for a in net.loras:
            if a.dora_axis is not None:
                a.dora_scale.mul_(1.1)  # a trained magnitude, not the one recomputed from W0
    net.apply_to([], unet)
    net.eval()
    path = str(tmp_path / f"n{ext}")
    net.save_weights(path, torch.float32, {})

    unet2 = ToyUNet()
    fresh = lycoris_kohya.create_network(1.0, 2, 3.0, None, [], unet2, **RESUME[layout])
    fresh.apply_to([], unet2)
    info = fresh.load_weights(path)
    assert info.missing_keys == [] and info.unexpected_keys == []
    fresh.eval()
    for name, make_x in INPUTS.items():
        x = make_x()
        with torch.no_grad():
            want, got = getattr(unet.block, name)(x), getattr(unet2.block, name)(x)
        if "scalar" in layout:  # the file holds up * scalar (scalar then 1): equal up to fp32 rounding
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (layout, name)
        else:
            assert torch.equal(got, want), (layout, name)
    # and the resumed network writes the same file again
    path2 = str(tmp_path / f"again{ext}")
    fresh.save_weights(path2, torch.float32, {})
    a, b = wio.load_state_dict(path), wio.load_state_dict(path2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_unet_only_from_a_file_with_text_encoder_modules(models, tmp_path, caplog):
    te, unet = models
    net = randomize(lycoris_kohya.create_network(1.0, 4, 1.0, None, te, unet), seed=1)
    path = str(tmp_path / "both.safetensors")
    net.save_weights(path, torch.float32, {})
    again = lycoris_kohya.create_network(1.0, 4, 1.0, None, te, unet)
    again.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)  # --network_train_unet_only
    info = again.load_weights(path)
    assert info.missing_keys == [] and "not loaded" in caplog.text
    want = {k: v for k, v in net.state_dict().items() if k.startswith("lora_unet_")}
    got = again.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # a key of a module that no run of this network has is still an error naming it
    bad = dict(net.state_dict(), **{"lora_unet_nope.lora_down.weight": torch.zeros(1)})
    from safetensors.torch import save_file

    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors.*lora_unet_nope"):
        again.load_weights(str(tmp_path / "bad.safetensors"))
