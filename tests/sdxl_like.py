"""A miniature of sd-scripts' SDXL U-Net (library/sdxl_original_unet.py): the same class names and
module paths (input_blocks / middle_block / output_blocks, in_layers / emb_layers / out_layers /
skip_connection, CrossAttention, Downsample2D.op), tiny widths. sd-scripts is not a dependency.

Layers (c = channels):
  time_embed.0/.2, label_emb.0.0/.0.2          4 Linear
  input_blocks.0.0                             conv_in (3x3)
  input_blocks.1.0  ResnetBlock2D c->c         conv 3x3 x2, emb Linear
  input_blocks.2.0/.1  ResnetBlock2D c->2c + Transformer2DModel   convs x2, emb, skip 1x1; 12 Linear
  input_blocks.3.0  Downsample2D               op 3x3
  middle_block.0/.1/.2  Resnet, Transformer, Resnet
  output_blocks.0.0/.1  ResnetBlock2D 4c->2c + Transformer2DModel
  output_blocks.1.0/.1  ResnetBlock2D 4c->2c + Upsample2D (conv 3x3)
  output_blocks.2.0  ResnetBlock2D 3c->c
  out.2                                        conv_out (3x3)
"""
from torch import nn


class ResnetBlock2D(nn.Module):
    def __init__(self, ci, co, t=16):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, ci), nn.SiLU(), nn.Conv2d(ci, co, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(t, co))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, co), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(co, co, 3, padding=1))
        self.skip_connection = nn.Conv2d(ci, co, 1) if ci != co else nn.Identity()


class CrossAttention(nn.Module):
    def __init__(self, c, ctx):
        super().__init__()
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_k = nn.Linear(ctx, c, bias=False)
        self.to_v = nn.Linear(ctx, c, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])


class GEGLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = nn.Linear(c, c * 8)


class FeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(c), nn.Dropout(0.0), nn.Linear(c * 4, c)])


class BasicTransformerBlock(nn.Module):
    def __init__(self, c, ctx):
        super().__init__()
        self.attn1 = CrossAttention(c, c)
        self.attn2 = CrossAttention(c, ctx)
        self.ff = FeedForward(c)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)


class Transformer2DModel(nn.Module):
    def __init__(self, c, ctx=24):
        super().__init__()
        self.norm = nn.GroupNorm(4, c)
        self.proj_in = nn.Linear(c, c)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(c, ctx)])
        self.proj_out = nn.Linear(c, c)


class Downsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)


class SdxlUNet2DConditionModel(nn.Module):
    def __init__(self, c=8, t=16):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(c, t), nn.SiLU(), nn.Linear(t, t))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(12, t), nn.SiLU(), nn.Linear(t, t)))
        self.input_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(4, c, 3, padding=1)]),
            nn.ModuleList([ResnetBlock2D(c, c)]),
            nn.ModuleList([ResnetBlock2D(c, 2 * c), Transformer2DModel(2 * c)]),
            nn.ModuleList([Downsample2D(2 * c)]),
        ])
        self.middle_block = nn.ModuleList([ResnetBlock2D(2 * c, 2 * c), Transformer2DModel(2 * c),
                                           ResnetBlock2D(2 * c, 2 * c)])
        self.output_blocks = nn.ModuleList([
            nn.ModuleList([ResnetBlock2D(4 * c, 2 * c), Transformer2DModel(2 * c)]),
            nn.ModuleList([ResnetBlock2D(4 * c, 2 * c), Upsample2D(2 * c)]),
            nn.ModuleList([ResnetBlock2D(3 * c, c)]),
        ])
        self.out = nn.ModuleList([nn.GroupNorm(4, c), nn.SiLU(), nn.Conv2d(c, 4, 3, padding=1)])
