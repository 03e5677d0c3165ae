"""Z-Image files for ComfyUI (``convert --for comfyui``): ComfyUI's Z-Image has one fused qkv Linear
(q, k, v stacked by rows) and names the output projection ``out``. The converted file, applied as
ComfyUI applies each module (``oracle.reference_delta``: g = alpha/rank, DoRA via
``oracle.comfyui_weight``, ``diff`` added as it is) to ComfyUI's fused weights, must give the weights
as trained (the SPEC formulas on the original file, per musubi layer, stacked)."""
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


def comfy_weights(w0):
    """ComfyUI's Z-Image weights from musubi's: the main blocks' q, k, v stacked into qkv, to_out.0 as out."""
    out = {}
    for key, w in w0.items():
        path = key[:-len(".weight")]
        if path.startswith("layers.") and ".attention.to_" in path:
            head, leaf = path.rsplit(".attention.", 1)
            if leaf in ("to_k", "to_v"):
                continue
            if leaf == "to_q":
                out[head + ".attention.qkv"] = torch.cat([w0[f"{head}.attention.to_{c}.weight"] for c in "qkv"])
                continue
            if leaf == "to_out.0":
                out[head + ".attention.out"] = w
                continue
        out[path] = w
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


@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_gets_fused_qkv_with_the_weights_as_trained(case, tmp_path):
    args, qkv_tensor = CASES[case]
    model, path = trained_file(tmp_path, args, family="zimage")
    base, w0 = base_file(model, tmp_path)
    sd = load_file(path)
    assert any(k.startswith("lora_unet_layers_0_attention_to_q.") for k in sd)
    want = comfy_weights(expected(w0, sd, M))

    out = str(tmp_path / "comfy.safetensors")
    report = convert.convert(path, "comfyui", out, base=base)
    converted = load_file(out)
    names = {k.split(".")[0] for k in converted}
    assert "lora_unet_layers_0_attention_qkv" in names and "lora_unet_layers_0_attention_out" in names
    assert not any("_attention_to_" in n for n in names if n.startswith("lora_unet_layers_")), sorted(names)
    assert f"lora_unet_layers_0_attention_qkv.{qkv_tensor}" in converted
    got = applied_by_comfyui(comfy_weights(w0), converted, M)
    assert set(got) == set(want)
    assert worst(got, want) < 1e-5, report["total_relative_error"]
    assert report["modules"]["lora_unet_layers_0_attention_qkv"]["action"].startswith("to_q/to_k/to_v")


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
    assert verdict["issues"] == [f"finds no layer for {n} Z-Image attention modules (its Z-Image fuses "
                                 "to_q/to_k/to_v into qkv and names to_out.0 out)"]
    out = str(tmp_path / "comfy.safetensors")
    convert.convert(path, "comfyui", out, base=base)
    assert inspect.summarize(out)["summary"]["compatibility"]["comfyui"]["applies_as_trained"]
