"""Shared pieces of the tools and pipeline tests: tiny models and checkpoints (diffusers folders and
single files), random networks saved as files, sd-scripts' SDXL key names written test-side, and
loading a single-file checkpoint back through diffusers' own converters (the oracle for ldm keys)."""
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lycoris_kohya

import ldm_checkpoint as lc
import tiny_models as tm
from conftest import randomize


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sd1_models(folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval().requires_grad_(False)
    return te, unet


def network(te, unet, seed=0, std=0.05, multiplier=1.0, **args):
    args = {k: str(v) for k, v in args.items()}
    args.setdefault("conv_dim", "4")
    args.setdefault("conv_alpha", "1")
    net = lycoris_kohya.create_network(multiplier, 4, 2.0, None, te, unet, **args)
    randomize(net, seed=seed, std=std)
    if net.loras[0].dora_axis is not None:  # magnitudes near ||W0||, as after some training
        with torch.no_grad():
            for a in net.loras:
                a.dora_scale.mul_(1.0 + 0.1 * torch.rand(a.dora_scale.shape, generator=torch.Generator().manual_seed(seed)))
    return net.eval()


def save(net, path, dtype=torch.float32):
    net.save_weights(str(path), dtype, {"ss_network_module": "lycoris_kohya", "ss_network_dim": "4"})
    return str(path)


def layer_paths(net, te_list, unet):
    """lora name -> ("te{i}" | "unet", module path), by identity of the adapted layer."""
    ids = {id(m): ("unet", p) for p, m in unet.named_modules()}
    for i, te in enumerate(te_list):
        ids.update({id(m): (f"te{i}", p) for p, m in te.named_modules()})
    return {a.lora_name: ids[id(a.layer)] for a in net.loras}


def sdscripts_sdxl_names(sd, net, te_list, unet):
    """A file saved from a network on a diffusers SDXL U-Net, renamed to sd-scripts' SDXL keys
    (original U-Net paths), with the test-side ldm mapping."""
    cfg = unet.config
    up_attention = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    rename = {}
    for name, (where, path) in layer_paths(net, te_list, unet).items():
        if where == "unet":
            ldm = lc.unet_key_to_ldm(path + ".weight", cfg.layers_per_block, up_attention)[:-len(".weight")]
            rename[name] = "lora_unet_" + ldm.replace(".", "_")
    out = {}
    for k, v in sd.items():
        name, _, suffix = k.partition(".")
        out[f"{rename.get(name, name)}.{suffix}"] = v
    return out


# ----- single-file checkpoints ------------------------------------------------------------------
def write_single(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def load_clip_state(te, sd):
    """Load a transformers-4-keyed CLIP state dict into ``te`` (transformers 5 drops text_model.)."""
    own = te.state_dict()
    fixed = {}
    for k, v in sd.items():
        if k not in own and k.startswith("text_model.") and k[len("text_model."):] in own:
            k = k[len("text_model."):]
        if k in own:
            fixed[k] = v
    missing = set(own) - set(fixed) - {k for k in own if k.endswith("position_ids")}
    assert not missing, sorted(missing)[:5]
    te.load_state_dict(fixed, strict=False)


def models_from_single(path, unet, te_list, family):
    """Fresh copies of ``unet`` / ``te_list`` holding the weights of a single-file checkpoint, read
    with diffusers' converters (not with lycoris_kohya)."""
    import copy

    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_open_clip_checkpoint)
    from safetensors.torch import load_file

    sd = load_file(path)
    u = copy.deepcopy(unet)
    u.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet.config)))
    tes = [copy.deepcopy(t) for t in te_list]
    if family == "sd1":
        load_clip_state(tes[0], convert_ldm_clip_checkpoint(sd))
    elif family == "sd2":
        load_clip_state(tes[0], convert_open_clip_checkpoint(tes[0], sd))
    else:
        load_clip_state(tes[0], convert_ldm_clip_checkpoint(sd))
        load_clip_state(tes[1], convert_open_clip_checkpoint(tes[1], sd, prefix="conditioner.embedders.1.model."))
    return tes, u


# ----- outputs ----------------------------------------------------------------------------------
def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        kw = tm.sdxl_unet_inputs(seed)
    else:
        ctx = unet.config.cross_attention_dim
        kw = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(1, 5, ctx, generator=g))
    with torch.no_grad():
        return unet(**kw).sample


def te_out(te, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (1, 7), generator=g)
    with torch.no_grad():
        return te(ids).last_hidden_state


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol), float((a - b).abs().max())


def same_weights(m1: nn.Module, m2: nn.Module):
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


# ----- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sd1_single(tiny_sd, tmp_path_factory):
    te, unet = sd1_models(tiny_sd)
    return write_single(lc.sd1_single(unet, te), tmp_path_factory.mktemp("sd1") / "sd1.safetensors")


@pytest.fixture(scope="session")
def sd2_single(tmp_path_factory):
    unet, te = tm.sd2_unet(), tm.clip(2, act="gelu")
    return write_single(lc.sd2_single(unet, te), tmp_path_factory.mktemp("sd2") / "sd2.safetensors")


@pytest.fixture(scope="session")
def sdxl_single(tmp_path_factory):
    te1, te2, unet = tm.sdxl_models()
    return write_single(lc.sdxl_single(unet, te1, te2), tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    te1, te2, unet = tm.sdxl_models()
    root = tmp_path_factory.mktemp("sdxl-folder")
    unet.save_pretrained(os.path.join(root, "unet"))
    te1.save_pretrained(os.path.join(root, "text_encoder"))
    te2.save_pretrained(os.path.join(root, "text_encoder_2"))
    return str(root)
