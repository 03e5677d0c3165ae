"""FLUX.1-dev's adapted Linears at their real widths, for the benchmark's DiT mode: one double block
(img_/txt_ attn.qkv, attn.proj, mlp.0, mlp.2) and one single block (linear1 = q, k, v and the MLP
input fused; linear2 = attention output and MLP output), under sd-scripts' class names and module
paths (library/flux_models.py), so that lycoris_kohya, sd-scripts' networks.lora_flux and
lycoris-lora target the same modules. The modulation Linears are left out (one token each).

The forward runs each Linear on its stream's tokens as the real blocks do, with attention itself
replaced by passing q through (its cost is the same for every adapter): what is timed is the
frozen Linears with or without adapters, at 1024/4096 image tokens and 512 text tokens.
"""
import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, MLP = 3072, 12288


class SelfAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)


class DoubleStreamBlock(nn.Module):
    def __init__(self, h=HIDDEN, mlp=MLP):
        super().__init__()
        self.h = h
        for s in ("img", "txt"):
            setattr(self, f"{s}_attn", SelfAttention(h))
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(h, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, h)))

    def stream(self, s, x):
        attn, mlp = getattr(self, f"{s}_attn"), getattr(self, f"{s}_mlp")
        q = attn.qkv(x)[..., :self.h]
        x = x + attn.proj(q)
        return x + mlp(x)

    def forward(self, img, txt):
        return self.stream("img", img), self.stream("txt", txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, h=HIDDEN, mlp=MLP):
        super().__init__()
        self.h, self.mlp = h, mlp
        self.linear1 = nn.Linear(h, h * 3 + mlp)
        self.linear2 = nn.Linear(h + mlp, h)

    def forward(self, x):
        y = self.linear1(x)
        q, m = y[..., :self.h], y[..., 3 * self.h:]
        return x + self.linear2(torch.cat([q, F.gelu(m, approximate="tanh")], -1))


class Flux(nn.Module):
    """The class name sd-scripts' Flux model has (what the trainers and our family detection see)."""

    def __init__(self, h=HIDDEN, mlp=MLP):
        super().__init__()
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(h, mlp)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(h, mlp)])

    def forward(self, img, txt):
        for b in self.double_blocks:
            img, txt = b(img, txt)
        x = torch.cat([txt, img], 1)
        for b in self.single_blocks:
            x = b(x)
        return x
