"""Tiny random SD2-like and SDXL-like diffusers models, built in memory (scripts/make_tiny_sd.py
builds the SD1 folder; its SDXL builder is another issue's work). Deterministic per seed.

SD2-like: linear proj_in/out, a CLIP text encoder with gelu (what OpenCLIP-H is in transformers).
SDXL-like: 2 levels, 2 layers per block (3 resnets per up block), attention only on level 1 with 2
transformer blocks, text_time additional embeddings, TE1 CLIPTextModel + TE2
CLIPTextModelWithProjection (OpenCLIP-G in single files), context = concat of both widths.
"""
import torch

TE_WIDTH = 32


def clip(seed, with_projection=False, act="quick_gelu", layers=2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=606, hidden_size=TE_WIDTH, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=TE_WIDTH, hidden_act=act,
                         bos_token_id=604, eos_token_id=605, pad_token_id=605)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval().requires_grad_(False)


def sd2_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=TE_WIDTH,
        norm_num_groups=8, use_linear_projection=True,
    ).eval().requires_grad_(False)


def sdxl_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=2, transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), cross_attention_dim=2 * TE_WIDTH, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TE_WIDTH, norm_num_groups=8,
    ).eval().requires_grad_(False)


def sdxl_models(seed=0):
    """(te1, te2, unet)."""
    return clip(seed), clip(seed + 1, with_projection=True, act="gelu"), sdxl_unet(seed)


def sdxl_pipeline(seed=0):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from make_tiny_sd import _build_tokenizer

    te1, te2, unet = sdxl_models(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    tok, _ = _build_tokenizer()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler())


def sdxl_unet_inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 5, 2 * TE_WIDTH, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, TE_WIDTH, generator=g),
                           "time_ids": torch.randn(batch, 6, generator=g)},
    )
