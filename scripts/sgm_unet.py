"""sd-scripts' SDXL U-Net module paths over a diffusers SDXL U-Net.

sdxl_train_network.py does not train diffusers' UNet2DConditionModel: it converts the weights into
its own U-Net (library/sdxl_original_unet.py), whose module tree keeps the original (LDM/SGM) paths,
so a network's keys read ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, not
``lora_unet_down_blocks_1_attentions_0_...``. ``SgmUNet(unet)`` is a module tree with exactly those
paths and class names whose Linear/Conv2d leaves *are* the diffusers U-Net's layers (shared, not
copied): a network created on it gets sd-scripts' keys and hooks layers that the diffusers U-Net
runs. The forward is the diffusers U-Net's.

The mapping is sd-scripts' diffusers <-> SDXL conversion (library/sdxl_model_util.py), as facts:
  input_blocks.0.0 = conv_in;  input_blocks.{3i+j+1} = down_blocks.i.(resnets.j, attentions.j);
  input_blocks.{3i+3}.0.op = down_blocks.i.downsamplers.0.conv;  middle_block.(0, 1, 2) =
  mid_block.(resnets.0, attentions.0, resnets.1);  output_blocks.{3i+j} = up_blocks.i.(resnets.j,
  attentions.j), output_blocks.{3i+2}.2 = up_blocks.i.upsamplers.0;  time_embed.(0, 2) =
  time_embedding.linear_(1, 2);  label_emb.0.(0, 2) = add_embedding.linear_(1, 2);  out.(0, 2) =
  conv_norm_out, conv_out.  Inside a ResnetBlock2D: in_layers.(0, 2) = norm1, conv1; emb_layers.1 =
  time_emb_proj; out_layers.(0, 3) = norm2, conv2; skip_connection = conv_shortcut. Transformer2DModel
  and Upsample2D have the same inner paths in both.
"""
from __future__ import annotations

from torch import nn


class ResnetBlock2D(nn.Module):
    """sd-scripts' ResnetBlock2D names around a diffusers ResnetBlock2D's layers."""

    def __init__(self, r: nn.Module):
        super().__init__()
        self.in_layers = nn.Sequential(r.norm1, r.nonlinearity, r.conv1)
        self.emb_layers = nn.Sequential(r.nonlinearity, r.time_emb_proj)
        self.out_layers = nn.Sequential(r.norm2, r.nonlinearity, r.dropout, r.conv2)
        self.skip_connection = r.conv_shortcut if r.conv_shortcut is not None else nn.Identity()


class Downsample2D(nn.Module):
    def __init__(self, d: nn.Module):
        super().__init__()
        self.op = d.conv


def _block(*modules) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock2D(m) if type(m).__name__ == "ResnetBlock2D" else m for m in modules])


class SgmUNet(nn.Module):
    """A view of a diffusers SDXL U-Net with sd-scripts' module paths (SdxlUNet2DConditionModel)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        if getattr(unet.config, "addition_embed_type", None) != "text_time" or len(unet.down_blocks) != 3:
            raise ValueError("not an SDXL U-Net (3 levels, addition_embed_type='text_time')")
        self._unet = [unet]  # not a submodule: named_modules() shows only sd-scripts' paths
        self.config = unet.config
        te, ae = unet.time_embedding, unet.add_embedding
        self.time_embed = nn.Sequential(te.linear_1, te.act, te.linear_2)
        self.label_emb = nn.Sequential(nn.Sequential(ae.linear_1, ae.act, ae.linear_2))

        self.input_blocks = nn.ModuleList([nn.ModuleList([unet.conv_in])])
        for down in unet.down_blocks:
            attentions = getattr(down, "attentions", None)
            for j, resnet in enumerate(down.resnets):
                self.input_blocks.append(_block(resnet, *([attentions[j]] if attentions else [])))
            if down.downsamplers:
                self.input_blocks.append(nn.ModuleList([Downsample2D(down.downsamplers[0])]))
        mid = unet.mid_block
        self.middle_block = _block(mid.resnets[0], mid.attentions[0], mid.resnets[1])
        self.output_blocks = nn.ModuleList()
        for up in unet.up_blocks:
            attentions = getattr(up, "attentions", None)
            for j, resnet in enumerate(up.resnets):
                mods = [resnet, *([attentions[j]] if attentions else [])]
                if j == len(up.resnets) - 1 and up.upsamplers:
                    mods.append(up.upsamplers[0])
                self.output_blocks.append(_block(*mods))
        self.out = nn.ModuleList([unet.conv_norm_out, unet.conv_act, unet.conv_out])

        # every layer a network could adapt is reachable under exactly one sd-scripts path
        def layers(m):
            return {id(x) for x in m.modules() if isinstance(x, (nn.Linear, nn.Conv2d))}

        missing = layers(unet) - layers(self)
        if missing:
            names = [n for n, x in unet.named_modules() if id(x) in missing]
            raise ValueError(f"{len(missing)} U-Net layers have no sd-scripts path, e.g. {names[:3]}")

    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        """The diffusers U-Net with SDXL's added conditioning (pooled TE2 output + 6 time ids)."""
        return self.unet(sample, timestep, encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
