"""Miniatures of the other DiTs sd-scripts trains, with the class names and module paths of
library/lumina_models.py (NextDiT), library/anima_models.py (Anima) and library/hunyuan_image_models.py /
hunyuan_image_modules.py (HYImageDiffusionTransformer); tiny widths, no forward, sd-scripts not imported.
Text encoders: transformers' Gemma2Model (Lumina) and Qwen3Model (Anima), tiny.
"""
import torch
from torch import nn

H = 16


def _mlp(i, o):
    return nn.Sequential(nn.Linear(i, o), nn.SiLU(), nn.Linear(o, o))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


# ----- Lumina 2 (NextDiT) -------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    def __init__(self, h, freq=32):
        super().__init__()
        self.mlp = _mlp(freq, h)


class JointAttention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.out = nn.Linear(h, h, bias=False)
        self.q_norm, self.k_norm = RMSNorm(h // 2), RMSNorm(h // 2)


class FeedForward(nn.Module):
    def __init__(self, h, hidden):
        super().__init__()
        self.w1 = nn.Linear(h, hidden, bias=False)
        self.w2 = nn.Linear(hidden, h, bias=False)
        self.w3 = nn.Linear(h, hidden, bias=False)


class JointTransformerBlock(nn.Module):
    """attention.qkv, attention.out, feed_forward.w1/w2/w3 and, with modulation, adaLN_modulation.1"""

    def __init__(self, h, modulation):
        super().__init__()
        self.attention = JointAttention(h)
        self.feed_forward = FeedForward(h, 2 * h)
        self.attention_norm1, self.ffn_norm1 = RMSNorm(h), RMSNorm(h)
        self.attention_norm2, self.ffn_norm2 = RMSNorm(h), RMSNorm(h)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 4 * h, bias=True))


class LuminaFinalLayer(nn.Module):
    def __init__(self, h, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(h, elementwise_affine=False)
        self.linear = nn.Linear(h, out, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, h, bias=True))


LuminaFinalLayer.__name__ = "FinalLayer"  # sd-scripts' class name (another FinalLayer is Anima's below)


class NextDiT(nn.Module):
    """1 context_refiner (no modulation: 5 Linear), 1 noise_refiner and 2 layers (6 each), final_layer (2),
    x_embedder (1), t_embedder.mlp.0/.2 (2), cap_embedder.1 (1)."""

    def __init__(self, h=H, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.t_embedder = TimestepEmbedder(h)
        self.cap_embedder = nn.Sequential(RMSNorm(12), nn.Linear(12, h, bias=True))
        self.context_refiner = nn.ModuleList([JointTransformerBlock(h, modulation=False)])
        self.x_embedder = nn.Linear(16, h, bias=True)
        self.noise_refiner = nn.ModuleList([JointTransformerBlock(h, modulation=True)])
        self.layers = nn.ModuleList([JointTransformerBlock(h, modulation=True) for _ in range(2)])
        self.final_layer = LuminaFinalLayer(h, 16)


def gemma2(seed=5):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4, max_position_embeddings=32, pad_token_id=0)
    return Gemma2Model(cfg).eval().requires_grad_(False)


# ----- Anima --------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, h, ctx):
        super().__init__()
        self.q_proj = nn.Linear(h, h, bias=False)
        self.q_norm = RMSNorm(h // 2)
        self.k_proj = nn.Linear(ctx, h, bias=False)
        self.k_norm = RMSNorm(h // 2)
        self.v_proj = nn.Linear(ctx, h, bias=False)
        self.v_norm = nn.Identity()
        self.output_proj = nn.Linear(h, h, bias=False)


class GPT2FeedForward(nn.Module):
    def __init__(self, h, hidden):
        super().__init__()
        self.activation = nn.GELU()
        self.layer1 = nn.Linear(h, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, h, bias=False)


def _adaln(h, lora=4):  # use_adaln_lora=True: SiLU, Linear(h, lora), Linear(lora, 3h)
    return nn.Sequential(nn.SiLU(), nn.Linear(h, lora, bias=False), nn.Linear(lora, 3 * h, bias=False))


class Block(nn.Module):
    """self_attn / cross_attn q_proj, k_proj, v_proj, output_proj; mlp.layer1/2: 10 Linear; and
    adaln_modulation_{self_attn,cross_attn,mlp}.1/.2: 6 Linear."""

    def __init__(self, h, ctx):
        super().__init__()
        self.layer_norm_self_attn = nn.LayerNorm(h, elementwise_affine=False)
        self.self_attn = Attention(h, h)
        self.layer_norm_cross_attn = nn.LayerNorm(h, elementwise_affine=False)
        self.cross_attn = Attention(h, ctx)
        self.layer_norm_mlp = nn.LayerNorm(h, elementwise_affine=False)
        self.mlp = GPT2FeedForward(h, 2 * h)
        self.adaln_modulation_self_attn = _adaln(h)
        self.adaln_modulation_cross_attn = _adaln(h)
        self.adaln_modulation_mlp = _adaln(h)


class PatchEmbed(nn.Module):
    def __init__(self, i, h):
        super().__init__()
        self.proj = nn.Sequential(nn.Identity(), nn.Linear(i, h, bias=False))  # Rearrange, Linear


class TimestepEmbedding(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.linear_1 = nn.Linear(h, h, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(h, 3 * h, bias=False)


class AnimaFinalLayer(nn.Module):
    def __init__(self, h, out):
        super().__init__()
        self.layer_norm = nn.LayerNorm(h, elementwise_affine=False)
        self.linear = nn.Linear(h, out, bias=False)
        self.adaln_modulation = _adaln(h)


AnimaFinalLayer.__name__ = "FinalLayer"


class LLMAdapterAttention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)


class LLMAdapterTransformerBlock(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.self_attn = LLMAdapterAttention(h)
        self.cross_attn = LLMAdapterAttention(h)
        self.mlp = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, h))


class LLMAdapter(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.embed = nn.Embedding(32, h)
        self.in_proj = nn.Identity()
        self.blocks = nn.ModuleList([LLMAdapterTransformerBlock(h)])
        self.out_proj = nn.Linear(h, h)


class Anima(nn.Module):
    """2 blocks, x_embedder.proj.1, t_embedder.1.linear_1/_2, final_layer (linear + 2 adaln), llm_adapter."""

    def __init__(self, h=H, ctx=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.x_embedder = PatchEmbed(12, h)
        self.t_embedder = nn.Sequential(nn.Identity(), TimestepEmbedding(h))  # Timesteps, TimestepEmbedding
        self.llm_adapter = LLMAdapter(h)
        self.blocks = nn.ModuleList([Block(h, ctx) for _ in range(2)])
        self.final_layer = AnimaFinalLayer(h, 12)
        self.t_embedding_norm = RMSNorm(h)


def qwen3(seed=6):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4, max_position_embeddings=32)
    return Qwen3Model(cfg).eval().requires_grad_(False)


# ----- HunyuanImage-2.1 ---------------------------------------------------------------------------
class ModulateDiT(nn.Module):
    def __init__(self, h, factor):
        super().__init__()
        self.act = nn.SiLU()
        self.linear = nn.Linear(h, factor * h, bias=True)


class MLP(nn.Module):
    def __init__(self, h, hidden):
        super().__init__()
        self.fc1 = nn.Linear(h, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, h)


class MMDoubleStreamBlock(nn.Module):
    """img_mod.linear, img_attn_qkv, img_attn_proj, img_mlp.fc1/fc2 and the five txt_*: 10 Linear"""

    def __init__(self, h):
        super().__init__()
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", ModulateDiT(h, 6))
            setattr(self, f"{side}_norm1", nn.LayerNorm(h, elementwise_affine=False))
            setattr(self, f"{side}_attn_qkv", nn.Linear(h, 3 * h, bias=True))
            setattr(self, f"{side}_attn_q_norm", RMSNorm(h // 2))
            setattr(self, f"{side}_attn_k_norm", RMSNorm(h // 2))
            setattr(self, f"{side}_attn_proj", nn.Linear(h, h, bias=True))
            setattr(self, f"{side}_norm2", nn.LayerNorm(h, elementwise_affine=False))
            setattr(self, f"{side}_mlp", MLP(h, 2 * h))


class MMSingleStreamBlock(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.linear1 = nn.Linear(h, 3 * h + 2 * h)
        self.linear2 = nn.Linear(h + 2 * h, h)
        self.q_norm, self.k_norm = RMSNorm(h // 2), RMSNorm(h // 2)
        self.pre_norm = nn.LayerNorm(h, elementwise_affine=False)
        self.modulation = ModulateDiT(h, 3)


class PatchEmbed2D(nn.Module):
    def __init__(self, i, h):
        super().__init__()
        self.proj = nn.Conv2d(i, h, 1, 1, bias=True)
        self.norm = nn.Identity()


class HunyuanFinalLayer(nn.Module):
    def __init__(self, h, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(h, elementwise_affine=False)
        self.linear = nn.Linear(h, out, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h, bias=True))


HunyuanFinalLayer.__name__ = "FinalLayer"


class HYImageDiffusionTransformer(nn.Module):
    """2 double (10 Linear each) and 2 single blocks (3 each); byt5_in fc1-3, img_in.proj (1x1 conv),
    txt_in.input_embedder, time_in.mlp.0/.2, final_layer linear + adaLN_modulation.1."""

    def __init__(self, h=H, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.byt5_in = nn.Module()
        self.byt5_in.layernorm = nn.LayerNorm(8)
        self.byt5_in.fc1, self.byt5_in.fc2, self.byt5_in.fc3 = nn.Linear(8, h), nn.Linear(h, h), nn.Linear(h, h)
        self.img_in = PatchEmbed2D(8, h)
        self.txt_in = nn.Module()
        self.txt_in.input_embedder = nn.Linear(8, h)
        self.time_in = TimestepEmbedder(h)
        self.double_blocks = nn.ModuleList([MMDoubleStreamBlock(h) for _ in range(2)])
        self.single_blocks = nn.ModuleList([MMSingleStreamBlock(h) for _ in range(2)])
        self.final_layer = HunyuanFinalLayer(h, 8)
