"""musubi-tuner's Z-Image and HunyuanVideo 1.5 files for ComfyUI (``convert --for comfyui``): ComfyUI's
models of these families have one fused qkv Linear (q, k, v stacked by rows) where musubi's have three,
and other names for some layers (Z-Image: ``to_out.0`` is ``out``; HunyuanVideo 1.5: ``img_mlp.fc1/fc2``
are ``img_mlp.0/2``, ``img_mod.linear`` is ``img_mod.lin``). The converted file, applied as
ComfyUI applies each module (``oracle.reference_delta``: g = alpha/rank, DoRA via
``oracle.comfyui_weight``, ``diff`` added as it is) to ComfyUI's fused weights, must give the weights
as trained (the SPEC formulas on the original file, per musubi layer, stacked)."""
import re

import pytest
import torch
from safetensors.torch import load_file

from lycoris_kohya.tools import convert

from oracle import comfyui_weight, reference_delta
from test_tools_musubi import base_file, expected, trained_file, worst

M = 0.7
CASES = {
    "locon": ({"algo": "locon"}, "lora_down.weight"),
    "loha": ({"algo": "loha"}, "hada_w1_a"),
    "lokr": ({"algo": "lokr", "factor": "4"}, "lora_down.weight"),
    "locon_dora": ({"algo": "locon", "dora_wd": "true"}, "lora_down.weight"),
    "loha_dora_out": ({"algo": "loha", "dora_wd": "true", "wd_on_output": "true"}, "lora_down.weight"),
}


# musubi path -> ComfyUI path, per family (from musubi-tuner's convert_*_lora_to_comfy.py): the
# q/k/v triples become one fused weight, stacked in that order
FUSED = {"zimage": (r"^(layers\.\d+\.attention)\.to_([qkv])$", r"\1.qkv"),
         "hunyuan_video_1_5": (r"^(double_blocks\.\d+\.(?:img|txt)_attn)_([qkv])$", r"\1_qkv")}
RENAMED = {"zimage": [(r"^(layers\.\d+\.attention)\.to_out\.0$", r"\1.out")],
           "hunyuan_video_1_5": [(r"^(double_blocks\.\d+\.(?:img|txt))_mlp\.fc([12])$",
                                  lambda m: f"{m.group(1)}_mlp.{'0' if m.group(2) == '1' else '2'}"),
                                 (r"^(double_blocks\.\d+\.(?:img|txt))_mod\.linear$", r"\1_mod.lin")]}


def comfy_weights(w0, family):
    """ComfyUI's weights of the family from musubi's (by path, without .weight)."""
    fused_re, fused_to = FUSED[family]
    out, parts = {}, {}
    for key, w in w0.items():
        path = key[:-len(".weight")]
        m = re.match(fused_re, path)
        if m:
            parts.setdefault(re.sub(fused_re, fused_to, path), {})[m.group(2)] = w
            continue
        for pattern, to in RENAMED[family]:
            path = re.sub(pattern, to, path)
        out[path] = w
    for path, qkv in parts.items():
        out[path] = torch.cat([qkv[c] for c in "qkv"])
    return out


def applied_by_comfyui(w0, sd, m):
    """Each ComfyUI weight with the file's module of that name applied (LoCon/LoHa/LoKr: W0 + m*g*dW;
    input-axis DoRA: comfyui_weight; diff: W0 + m*diff)."""
    got = {}
    for path, w in w0.items():
        name = "lora_unet_" + path.replace(".", "_")
        if name + ".diff" in sd:
            got[path] = w + m * sd[name + ".diff"].float()
        elif any(k.startswith(name + ".") for k in sd):
            g, dw = reference_delta(sd, name, w.shape)
            scale = sd.get(name + ".dora_scale")
            got[path] = w + m * g * dw if scale is None else comfyui_weight(w, g, dw, scale.float(), m)
        else:
            got[path] = w
    return got


FAMILIES = {"zimage": ("lora_unet_layers_0_attention_to_q", "lora_unet_layers_0_attention_qkv",
                        "lora_unet_layers_0_attention_out"),
            "hunyuan_video_1_5": ("lora_unet_double_blocks_0_img_attn_q", "lora_unet_double_blocks_0_txt_attn_qkv",
                                  "lora_unet_double_blocks_0_img_mlp_0")}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_gets_fused_qkv_with_the_weights_as_trained(case, family, tmp_path):
    args, qkv_tensor = CASES[case]
    unfused, fused, renamed = FAMILIES[family]
    model, path = trained_file(tmp_path, args, family=family)
    base, w0 = base_file(model, tmp_path)
    sd = load_file(path)
    assert any(k.startswith(unfused + ".") for k in sd)
    want = comfy_weights(expected(w0, sd, M), family)

    out = str(tmp_path / "comfy.safetensors")
    report = convert.convert(path, "comfyui", out, base=base)
    converted = load_file(out)
    names = {k.split(".")[0] for k in converted}
    assert fused in names and renamed in names and unfused not in names, sorted(names)
    assert f"{fused}.{qkv_tensor}" in converted
    got = applied_by_comfyui(comfy_weights(w0, family), converted, M)
    assert set(got) == set(want)
    assert all(k.split(".")[0] in {"lora_unet_" + p.replace(".", "_") for p in got} for k in converted)
    assert worst(got, want) < 1e-5, report["total_relative_error"]
    assert report["modules"][fused]["action"].startswith("q/k/v")


def test_stacked_dora_needs_the_base(tmp_path):
    _, path = trained_file(tmp_path, CASES["locon_dora"][0], family="zimage")
    with pytest.raises(convert.ToolError, match=r"DoRA stacked into qkv depends on the base weight"):
        convert.convert(path, "comfyui", str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_inspect_says_comfyui_misses_the_unfused_attention_until_converted(tmp_path):
    from lycoris_kohya.tools import inspect

    model, path = trained_file(tmp_path, CASES["locon"][0], family="zimage")
    base, _ = base_file(model, tmp_path)
    n = sum(1 for k in load_file(path) if k.endswith(".lora_down.weight") and "_attention_to_" in k)
    verdict = inspect.summarize(path)["summary"]["compatibility"]["comfyui"]
    assert not verdict["applies_as_trained"]
    assert verdict["issues"] == [f"finds no layer for {n} Z-Image modules (its model fuses q/k/v into qkv and "
                                 "names some layers differently)"]
    out = str(tmp_path / "comfy.safetensors")
    convert.convert(path, "comfyui", out, base=base)
    assert inspect.summarize(out)["summary"]["compatibility"]["comfyui"]["applies_as_trained"]
