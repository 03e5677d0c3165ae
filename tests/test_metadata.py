"""Every saved file describes itself under the plugin's own metadata key, without touching
sd-scripts' ss_* keys or the sshs hashes A1111 reads (computed over ss_* metadata only)."""
import hashlib
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

import lycoris_kohya

from conftest import randomize
from test_algorithms import ToyUNet


def file_metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def modules_in_file(path):
    """{module: (algo, rank, layer kind, prefix)} read from tensor names and shapes here, from SPEC section 2."""
    sd = load_file(path)
    out = {}
    for name in {k.split(".", 1)[0] for k in sd}:
        t = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
        if "lora_down.weight" in t:
            algo, rank, w = "locon", t["lora_down.weight"].shape[0], t["lora_down.weight"]
            kind = "linear" if w.dim() == 2 else "conv%dx%d" % tuple(t.get("lora_mid.weight", w).shape[2:])
        elif "hada_w1_b" in t:
            algo, rank = "loha", t["hada_w1_b"].shape[0]
            kind = None
        else:
            algo = "lokr"
            rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else 1
            kind = None
        out[name] = (algo, rank, kind, "_".join(name.split("_")[:2]))
    return out


def test_a_created_network_describes_itself(tmp_path):
    unet = ToyUNet()
    p = tmp_path / "mix.toml"
    p.write_text('unet_target_module = ["Transformer2DModel"]\n[name_algo_map."block.conv*"]\nalgo = "loha"\n')
    net = randomize(lycoris_kohya.create_network(1.0, 2, 3.0, None, [], unet, preset=str(p), conv_dim="3"))
    path = str(tmp_path / "n.safetensors")
    meta = {"ss_network_module": "lycoris_kohya", "ss_network_args": json.dumps({"preset": str(p)}), "note": "x"}
    given = dict(meta)
    net.save_weights(path, torch.bfloat16, meta)
    assert meta == given  # the caller's dict (sd-scripts reuses it for every save) is not changed
    got = file_metadata(path)
    assert {k: got[k] for k in given} == given
    desc = json.loads(got["lycoris_kohya"])
    assert desc["plugin_version"] == lycoris_kohya.__version__
    modules = modules_in_file(path)
    assert desc["algorithms"] == sorted({m[0] for m in modules.values()}) == ["locon", "loha"]
    assert desc["dora_axis"] is None
    assert desc["modules"] == {"lora_unet": len(modules)} == {"lora_unet": 5}
    assert sum(e["modules"] for e in desc["layouts"]) == 5
    # per layout group: the file's own modules of that algorithm and rank
    for e in desc["layouts"]:
        same = [m for m in modules.values() if m[0] == e["algo"] and m[1] == e["rank"]]
        assert e["modules"] <= len(same) and e["alpha"] == 3.0, e
    loha = [e for e in desc["layouts"] if e["algo"] == "loha"]
    assert sum(e["modules"] for e in loha) == 2 and {e["layer"] for e in loha} == {"conv3x3"}
    assert {e["rank"] for e in loha} == {3}  # conv_dim for the kxk convs
    locon = {e["layer"]: e for e in desc["layouts"] if e["algo"] == "locon"}
    assert set(locon) == {"linear", "conv1x1"} and locon["linear"]["modules"] == 2


def test_a_network_made_from_a_file_describes_itself_too(tmp_path):
    """sd-scripts --dim_from_weights: create_network_from_weights, then saves with ss_network_args None."""
    _, net = None, randomize(lycoris_kohya.create_network(1.0, 2, 3.0, None, [], ToyUNet(), algo="lokr",
                                                          dora_wd="true", wd_on_output="true"))
    src = str(tmp_path / "src.safetensors")
    net.save_weights(src, torch.float32, {})
    again, _ = lycoris_kohya.create_network_from_weights(1, src, None, [], ToyUNet())
    path = str(tmp_path / "again.safetensors")
    again.save_weights(path, torch.float32, {"ss_network_args": "None"})
    desc = json.loads(file_metadata(path)["lycoris_kohya"])
    assert desc["algorithms"] == ["lokr"] and desc["dora_axis"] == "output"
    assert all(e["dora_axis"] == "output" and e["algo"] == "lokr" for e in desc["layouts"])
    assert sum(e["modules"] for e in desc["layouts"]) == 5
    assert json.loads(file_metadata(src)["lycoris_kohya"]) == desc


class Transformer2DModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.big = torch.nn.Linear(1024, 1024)


def test_plugin_metadata_leaves_the_sshs_hashes_to_ss_keys(tmp_path):
    unet = torch.nn.Module()
    unet.block = Transformer2DModel()
    net = randomize(lycoris_kohya.create_network(1.0, 256, 3.0, None, [], unet))
    path = str(tmp_path / "n.safetensors")
    ss = {"ss_network_module": "lycoris_kohya", "ss_network_dim": "256"}
    net.save_weights(path, torch.float32, dict(ss, lora_adapter_metadata="{}"))
    assert len(open(path, "rb").read()) > 0x110000  # the legacy hash's 64 KiB at 1 MiB are inside the file
    got = file_metadata(path)
    assert "lora_adapter_metadata" not in got and "lycoris_kohya" in got
    blob = st_save(load_file(path), ss)  # sd-scripts: only the ss_* keys enter the hashed bytes
    n = int.from_bytes(blob[:8], "little")
    assert got["sshs_model_hash"] == hashlib.sha256(blob[8 + n:]).hexdigest()
    assert got["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert not any(k.startswith("ss_") and k not in ss for k in got)  # no ss_* key of ours
