"""Base checkpoints by our module names: every adaptable layer of the model, and only those, is found
in diffusers folders and in single-file SD1/SD2/SDXL checkpoints, holding the model's own weight
(fused OpenCLIP q/k/v rows and the transposed text_projection included). The test-side single files
are first checked against diffusers' own converters, so they are real ldm files."""
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from lycoris_kohya import targets as tg
from lycoris_kohya.tools import keymap
from lycoris_kohya.tools.checkpoint import Checkpoint
from lycoris_kohya.tools.common import ToolError

import ldm_checkpoint as lc
import tiny_models as tm
from tools_helpers import (_one_thread, sd1_models, sd1_single, sd2_single, sdxl_folder, sdxl_single,  # noqa: F401
                           write_single)


def test_test_side_single_files_are_what_diffusers_reads(tiny_sd):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    te, unet = sd1_models(tiny_sd)
    for u in (unet, tm.sd2_unet(), tm.sdxl_unet()):
        back = convert_ldm_unet_checkpoint(lc.unet_to_ldm(u), dict(u.config))
        sd = u.state_dict()
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    te2 = tm.clip(1, with_projection=True, act="gelu")
    oc = {"conditioner.embedders.1.model." + k: v for k, v in lc.clip_to_openclip(te2).items()}
    back, sd = convert_open_clip_checkpoint(te2, oc, prefix="conditioner.embedders.1.model."), lc.clip_sd(te2)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def _check(ck, layers, family):
    assert ck.family == family
    found = {ck.resolve(n) for n in layers}
    assert None not in found, [n for n in layers if ck.resolve(n) is None][:5]
    assert found == set(ck.names()), sorted(set(ck.names()) - found)[:5]  # nothing else
    for name, t in layers.items():
        assert torch.equal(ck.weight(ck.resolve(name)), t.layer.weight.float()), name


def test_sd1_folder_and_single_file(tiny_sd, sd1_single):
    te, unet = sd1_models(tiny_sd)
    layers = tg.every_layer(te, unet)
    for path in (tiny_sd, sd1_single):
        ck = Checkpoint(path)
        _check(ck, layers, "sd")
        assert set(ck.names()) == set(layers)  # SD1 names are diffusers' paths


def test_sd2_single_file_splits_fused_qkv(sd2_single):
    unet, te = tm.sd2_unet(), tm.clip(2, act="gelu")
    ck = Checkpoint(sd2_single)
    _check(ck, tg.every_layer(te, unet), "sd")
    slot = ck.slots["lora_te_text_model_encoder_layers_1_self_attn_k_proj"]
    assert slot.key == "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" and slot.chunk == (1, 3)
    # the last resblock (unused by SD2, absent from the transformers model) gets no name
    assert not [n for n in ck.names() if "layers_2_" in n]


def test_sdxl_single_file_and_folder(sdxl_single, sdxl_folder):
    te1, te2, unet = tm.sdxl_models()
    layers = tg.every_layer([te1, te2], unet)
    ldm = lc.unet_to_ldm(unet)
    ldm_names = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                 for k, v in ldm.items() if k.endswith(".weight") and v.dim() in (2, 4)}
    for path in (sdxl_single, sdxl_folder):
        ck = Checkpoint(path)
        _check(ck, layers, "sdxl")
        assert {n for n in ck.names() if n.startswith("lora_unet")} == ldm_names  # sd-scripts' SDXL names
    ck = Checkpoint(sdxl_single)
    slot = ck.slots["lora_te2_text_projection"]
    assert slot.transposed and slot.key == "conditioner.embedders.1.model.text_projection"
    assert ck.slots["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"].chunk == (2, 3)


def test_layout_read_from_either_spelling(tiny_sd):
    _, unet = sd1_models(tiny_sd)
    for u in (unet, tm.sd2_unet(), tm.sdxl_unet()):
        a = keymap.UNetLayout.from_diffusers(u.state_dict())
        b = keymap.UNetLayout.from_ldm(k[len("model.diffusion_model."):] for k in lc.unet_to_ldm(u))
        assert a == b
    xl = keymap.UNetLayout.from_diffusers(tm.sdxl_unet().state_dict())
    assert (xl.levels, xl.layers_per_block, xl.down_attention, xl.up_attention) == (2, 2, (False, True), (True, False))


def test_save_writes_back_fused_rows_and_keeps_the_rest(sd2_single, tmp_path):
    ck = Checkpoint(sd2_single)
    name = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    new = torch.full(ck.shape(name), 0.25)
    ck.set_weight(name, new)
    out = str(tmp_path / "o.safetensors")
    ck.save(out, torch.float16)
    before, after = load_file(sd2_single), load_file(out)
    assert before.keys() == after.keys()
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    d = before[key].shape[0] // 3
    assert torch.equal(after[key][2 * d:], new.half())
    assert torch.equal(after[key][:2 * d], before[key][:2 * d].half())
    assert all(after[k].dtype == torch.float16 for k in after)
    mode = stat.S_IMODE(os.stat(out).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


def test_text_projection_is_written_transposed(sdxl_single, tmp_path):
    ck = Checkpoint(sdxl_single)
    w = torch.randn(ck.shape("lora_te2_text_projection"))
    ck.set_weight("lora_te2_text_projection", w)
    ck.save(str(tmp_path / "o.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["conditioner.embedders.1.model.text_projection"], w.T)


def test_folder_output_is_complete_and_refuses_to_overwrite(tiny_sd, tmp_path):
    ck = Checkpoint(tiny_sd)
    out = str(tmp_path / "merged")
    ck.save(out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny_sd))
    assert os.path.isfile(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ToolError, match="already exists"):
        ck.save(out)
    with pytest.raises(ToolError, match="must not be the input"):
        ck.save(tiny_sd)


def test_bad_models_are_named(tmp_path):
    with pytest.raises(ToolError, match="no such file"):
        Checkpoint(str(tmp_path / "nope.safetensors"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ToolError, match="not a diffusers model"):
        Checkpoint(str(tmp_path / "empty"))
    p = write_single({"foo.bar": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ToolError, match="no U-Net or text encoder weights"):
        Checkpoint(p)
