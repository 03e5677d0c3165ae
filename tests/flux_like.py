"""A miniature of sd-scripts' FLUX.1 transformer (library/flux_models.py): the same class names and
module paths, tiny widths, no forward (tests adapt and merge layers one by one). sd-scripts is not a
dependency. Text encoders: transformers' own CLIPTextModel (CLIP-L) and T5EncoderModel (T5-XXL), tiny.

Linear layers (h = hidden 16, mlp 32):
  img_in, txt_in                                     2
  time_in / vector_in / guidance_in (MLPEmbedder)    in_layer, out_layer each: 6
  double_blocks.N (DoubleStreamBlock)                img_mod.lin, img_attn.qkv, img_attn.proj, img_mlp.0,
                                                     img_mlp.2 and the same five txt_*: 10 per block
  single_blocks.N (SingleStreamBlock)                linear1 (qkv + MLP in), linear2, modulation.lin: 3
  final_layer (LastLayer)                            linear, adaLN_modulation.1: 2
"""
import torch
from torch import nn


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads=2, qkv_bias=True):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)


class DoubleStreamBlock(nn.Module):
    def __init__(self, h, mlp):
        super().__init__()
        self.img_mod = Modulation(h, double=True)
        self.img_norm1 = nn.LayerNorm(h, elementwise_affine=False)
        self.img_attn = SelfAttention(h)
        self.img_norm2 = nn.LayerNorm(h, elementwise_affine=False)
        self.img_mlp = nn.Sequential(nn.Linear(h, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, h))
        self.txt_mod = Modulation(h, double=True)
        self.txt_norm1 = nn.LayerNorm(h, elementwise_affine=False)
        self.txt_attn = SelfAttention(h)
        self.txt_norm2 = nn.LayerNorm(h, elementwise_affine=False)
        self.txt_mlp = nn.Sequential(nn.Linear(h, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, h))


class SingleStreamBlock(nn.Module):
    def __init__(self, h, mlp):
        super().__init__()
        self.linear1 = nn.Linear(h, h * 3 + mlp)
        self.linear2 = nn.Linear(h + mlp, h)
        self.norm = QKNorm(h // 2)
        self.pre_norm = nn.LayerNorm(h, elementwise_affine=False)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(h, double=False)


class LastLayer(nn.Module):
    def __init__(self, h, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(h, elementwise_affine=False)
        self.linear = nn.Linear(h, out, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h, bias=True))


class Flux(nn.Module):
    def __init__(self, depth=2, depth_single=2, h=16, mlp=32, in_channels=12, vec_in=8, context_in=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.img_in = nn.Linear(in_channels, h, bias=True)
        self.time_in = MLPEmbedder(32, h)
        self.vector_in = MLPEmbedder(vec_in, h)
        self.guidance_in = MLPEmbedder(32, h)
        self.txt_in = nn.Linear(context_in, h)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(h, mlp) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(h, mlp) for _ in range(depth_single)])
        self.final_layer = LastLayer(h, in_channels)


def clip_l(layers=2, seed=1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def t5xxl(layers=2, seed=2):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_layers=layers, num_heads=2,
                   feed_forward_proj="gated-gelu")
    return T5EncoderModel(cfg).eval().requires_grad_(False)


def flux_models(seed=0):
    """([CLIP-L, T5-XXL], Flux) as flux_train_network.py hands them to create_network."""
    return [clip_l(), t5xxl()], Flux(seed=seed).requires_grad_(False)
