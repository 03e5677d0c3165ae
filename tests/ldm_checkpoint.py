"""Test-side writer of single-file (original ldm/sgm key) checkpoints from diffusers/transformers
models, written independently of lycoris_kohya.tools.keymap, and checked against diffusers' own
single-file converters (tests/test_tools_keymap.py): SD1 (HF CLIP under cond_stage_model.transformer),
SD2 (OpenCLIP under cond_stage_model.model, q/k/v fused, one more unused last layer) and SDXL
(conditioner.embedders.0 HF CLIP, conditioner.embedders.1 OpenCLIP with text_projection)."""
import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
SIMPLE = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_key_to_ldm(key, layers_per_block, up_attention):
    """One diffusers U-Net key -> its ldm key (without model.diffusion_model.)."""
    L = layers_per_block
    for hf, ldm in SIMPLE.items():
        if key.startswith(hf + "."):
            return ldm + key[len(hf):]

    def res(rest):
        head, _, tail = rest.partition(".")
        return f"{RESNET[head]}.{tail}"

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * (L + 1) + j
        return f"input_blocks.{n}.0.{res(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (L + 1) + j
        return f"output_blocks.{n}.0.{res(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)
    if m:
        i = int(m[1])
        return f"output_blocks.{i * (L + 1) + L}.{2 if up_attention[i] else 1}.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"middle_block.{2 * int(m[1])}.{res(m[2])}"
    if key.startswith("mid_block.attentions.0."):
        return "middle_block.1." + key[len("mid_block.attentions.0."):]
    raise KeyError(key)


def unet_to_ldm(unet):
    cfg = unet.config
    up_attention = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    return {"model.diffusion_model." + unet_key_to_ldm(k, cfg.layers_per_block, up_attention): v.clone()
            for k, v in unet.state_dict().items()}


def clip_sd(te):
    """transformers CLIP state dict with transformers 4's key names (text_model. kept)."""
    out = {}
    for k, v in te.state_dict().items():
        if not k.startswith(("text_model.", "text_projection")):
            k = "text_model." + k
        if not k.endswith("position_ids"):
            out[k] = v.clone()
    return out


def clip_to_openclip(te, extra_layer=False, seed=0):
    """HF CLIP -> OpenCLIP keys: fused in_proj (q, k, v rows), ln_*, mlp.c_fc/c_proj, text_projection^T.
    ``extra_layer`` appends one more (random) resblock, like SD2 files whose last layer is unused."""
    sd = clip_sd(te)
    out = {}
    n = te.config.num_hidden_layers
    for i in range(n):
        p = f"text_model.encoder.layers.{i}."
        q = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[q + f"attn.out_proj.{kind}"] = sd[p + f"self_attn.out_proj.{kind}"]
            out[q + f"ln_1.{kind}"] = sd[p + f"layer_norm1.{kind}"]
            out[q + f"ln_2.{kind}"] = sd[p + f"layer_norm2.{kind}"]
            out[q + f"mlp.c_fc.{kind}"] = sd[p + f"mlp.fc1.{kind}"]
            out[q + f"mlp.c_proj.{kind}"] = sd[p + f"mlp.fc2.{kind}"]
    if extra_layer:
        g = torch.Generator().manual_seed(seed)
        for k in [k for k in out if k.startswith(f"transformer.resblocks.{n - 1}.")]:
            out[k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = torch.randn(out[k].shape, generator=g)
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    else:
        out["text_projection"] = torch.eye(sd["text_model.final_layer_norm.weight"].shape[0])
    return out


def sd1_single(unet, te):
    sd = unet_to_ldm(unet)
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip_sd(te).items()})
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)  # a VAE stand-in, left untouched
    return sd


def sd2_single(unet, te):
    sd = unet_to_ldm(unet)
    sd.update({"cond_stage_model.model." + k: v for k, v in clip_to_openclip(te, extra_layer=True).items()})
    return sd


def sdxl_single(unet, te1, te2):
    sd = unet_to_ldm(unet)
    sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_sd(te1).items()})
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in clip_to_openclip(te2).items()})
    return sd
