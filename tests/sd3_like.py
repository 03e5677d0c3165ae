"""A miniature of sd-scripts' SD3 MMDiT (library/sd3_models.py): the same class names and module paths,
tiny widths, no forward. sd-scripts is not a dependency. Text encoders: transformers'
CLIPTextModelWithProjection (CLIP-L, CLIP-G) and T5EncoderModel (T5-XXL), tiny.

Layers (h = hidden 16), depth 3, the last context_block "pre_only", joint block 0 with SD3.5's attn2:
  x_embedder.proj (PatchEmbed)                       Conv2d 2x2, stride 2
  t_embedder.mlp.0/.2, y_embedder.mlp.0/.2           4 Linear
  context_embedder                                   Linear
  joint_blocks.N.{context_block,x_block} (SingleDiTBlock):
      attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1          5
      x_block of block 0 also attn2.qkv, attn2.proj                      +2
      context_block of the last block (pre_only): attn.qkv, adaLN_modulation.1 only   2
  final_layer (UnPatch): linear, adaLN_modulation.1                      2
"""
import torch
from torch import nn

from flux_like import t5xxl


class PatchEmbed(nn.Module):
    def __init__(self, in_channels, h, patch=2):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, h, patch, patch, bias=True)
        self.norm = nn.Identity()


class TimestepEmbedding(nn.Module):
    def __init__(self, h, freq=32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, h), nn.SiLU(), nn.Linear(h, h))


class Embedder(nn.Module):
    def __init__(self, input_dim, h):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, h), nn.SiLU(), nn.Linear(h, h))


class AttentionLinears(nn.Module):
    def __init__(self, dim, pre_only=False):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)


class MLP(nn.Module):
    def __init__(self, h, hidden):
        super().__init__()
        self.fc1 = nn.Linear(h, hidden)
        self.fc2 = nn.Linear(hidden, h)
        self.act = nn.GELU(approximate="tanh")
        self.norm = nn.Identity()


class SingleDiTBlock(nn.Module):
    def __init__(self, h, pre_only=False, x_block_self_attn=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False)
        self.attn = AttentionLinears(h, pre_only=pre_only)
        if x_block_self_attn:
            self.attn2 = AttentionLinears(h)
        if not pre_only:
            self.norm2 = nn.LayerNorm(h, elementwise_affine=False)
            self.mlp = MLP(h, 2 * h)
        n_mods = 9 if x_block_self_attn else (6 if not pre_only else 2)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, n_mods * h))


class MMDiTBlock(nn.Module):
    def __init__(self, h, pre_only, x_block_self_attn):
        super().__init__()
        self.context_block = SingleDiTBlock(h, pre_only=pre_only)
        self.x_block = SingleDiTBlock(h, x_block_self_attn=x_block_self_attn)


class UnPatch(nn.Module):
    def __init__(self, h, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(h, elementwise_affine=False)
        self.linear = nn.Linear(h, patch ** 2 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))


class MMDiT(nn.Module):
    def __init__(self, depth=3, h=16, in_channels=4, adm_in=12, context_in=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.x_embedder = PatchEmbed(in_channels, h)
        self.t_embedder = TimestepEmbedding(h)
        self.y_embedder = Embedder(adm_in, h)
        self.context_embedder = nn.Linear(context_in, h)
        self.joint_blocks = nn.ModuleList(
            [MMDiTBlock(h, pre_only=i == depth - 1, x_block_self_attn=i == 0) for i in range(depth)])
        self.final_layer = UnPatch(h, 2, in_channels)


def clip(hidden, layers=2, seed=3):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg).eval().requires_grad_(False)


def sd3_models(seed=0):
    """([CLIP-L, CLIP-G, T5-XXL], MMDiT) as sd3_train_network.py hands them to create_network."""
    return [clip(8), clip(12, seed=4), t5xxl()], MMDiT(seed=seed).requires_grad_(False)
