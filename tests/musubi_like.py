"""Miniatures of the transformers kohya-ss/musubi-tuner trains, with the class names and module paths of
its model files (src/musubi_tuner/wan/modules/model.py, qwen_image/qwen_image_model.py,
zimage/zimage_model.py, flux_2/flux2_models.py, flux/flux_models.py, hunyuan_model/models.py,
hunyuan_video_1_5/, frame_pack/hunyuan_video_packed.py, kandinsky5/models/dit.py, krea2/krea2_mmdit.py,
ideogram4/ideogram4_model.py, hidream_o1/qwen3_vl_transformers.py). Tiny widths, no forward: the tests
call the adapted layers themselves. musubi-tuner is not imported.

Only names and structure are taken over: every class is built by ``node(class_name, **children)``, an
empty nn.Module of a class of that name holding the children in musubi's order (norms appear where their
path matters). Each builder takes the depth; ``REAL_DEPTH`` holds the released models' depths, and
``build(family, real=True)`` builds one on the meta device.
"""
from typing import Dict

import torch
from torch import nn

H = 8  # hidden width of every miniature; MLPs are 2H

_CLASSES: Dict[str, type] = {}


def node(cls_name: str, **children) -> nn.Module:
    """An nn.Module of class ``cls_name`` (one class per name) with ``children`` in order."""
    cls = _CLASSES.setdefault(cls_name, type(cls_name, (nn.Module,), {}))
    m = cls()
    for name, child in children.items():
        m.add_module(name, child)
    return m


def L(i=H, o=H):
    return nn.Linear(i, o)


def seq(*mods):
    return nn.Sequential(*mods)


def blocks(n, make):
    return nn.ModuleList([make() for _ in range(n)])


def norm(cls="RMSNorm"):
    return node(cls)


# ----- Wan 2.1 / 2.2 (WanModel) ----------------------------------------------------------------------
def wan(layers=2, i2v=False):
    """Per block (WanAttentionBlock): self_attn q/k/v/o, cross_attn q/k/v/o (+ k_img, v_img for Wan 2.1
    I2V), ffn.0, ffn.2: 10 Linear (12). Outside: text_embedding.0/.2, time_embedding.0/.2,
    time_projection.1, head.head (+ img_emb.proj.1/.3 for I2V): 6 (8); patch_embedding is a Conv3d."""
    def attn(cls, extra=()):
        kids = dict(q=L(), k=L(), v=L(), o=L(), norm_q=norm("WanRMSNorm"), norm_k=norm("WanRMSNorm"))
        kids.update({n: L() for n in extra})
        return node(cls, **kids)

    def block():
        cross = attn("WanI2VCrossAttention", ("k_img", "v_img")) if i2v else attn("WanCrossAttention")
        return node("WanAttentionBlock", norm1=norm("WanLayerNorm"), self_attn=attn("WanSelfAttention"),
                    norm3=norm("WanLayerNorm"), cross_attn=cross, norm2=norm("WanLayerNorm"),
                    ffn=seq(L(H, 2 * H), nn.GELU(approximate="tanh"), L(2 * H, H)))

    kids = dict(patch_embedding=nn.Conv3d(4, H, (1, 2, 2), (1, 2, 2)),
                text_embedding=seq(L(6, H), nn.GELU(approximate="tanh"), L()),
                time_embedding=seq(L(4, H), nn.SiLU(), L()), time_projection=seq(nn.SiLU(), L(H, 6 * H)),
                blocks=blocks(layers, block), head=node("Head", norm=norm("WanLayerNorm"), head=L(H, 16)))
    if i2v:
        kids["img_emb"] = node("MLPProj", proj=seq(nn.LayerNorm(6), L(6, 6), nn.GELU(), L(6, H), nn.LayerNorm(H)))
    return node("WanModel", **kids)


# ----- Qwen-Image (QwenImageTransformer2DModel) ------------------------------------------------------
def _diffusers_ff(cls="FeedForward", act="GELU"):
    return node(cls, net=nn.ModuleList([node(act, proj=L(H, 2 * H)), nn.Dropout(0.0), L(2 * H, H)]))


def _joint_attention():  # diffusers-style joint attention: image and text projections
    return node("Attention", norm_q=norm(), norm_k=norm(), to_q=L(), to_k=L(), to_v=L(), add_k_proj=L(),
                add_v_proj=L(), add_q_proj=L(), to_out=nn.ModuleList([L(), nn.Dropout(0.0)]), to_add_out=L(),
                norm_added_q=norm(), norm_added_k=norm())


def qwen_image(layers=2):
    """Per block (QwenImageTransformerBlock): img_mod.1, attn (to_q/k/v, add_k/v/q_proj, to_out.0,
    to_add_out: 8), img_mlp.net.0.proj/.net.2, txt_mod.1, txt_mlp.net.0.proj/.net.2: 14 Linear.
    Outside: time_text_embed.timestep_embedder.linear_1/_2, img_in, txt_in, norm_out.linear, proj_out: 6."""
    def block():
        return node("QwenImageTransformerBlock", img_mod=seq(nn.SiLU(), L(H, 6 * H)), img_norm1=nn.LayerNorm(H),
                    attn=_joint_attention(), img_norm2=nn.LayerNorm(H), img_mlp=_diffusers_ff(),
                    txt_mod=seq(nn.SiLU(), L(H, 6 * H)), txt_norm1=nn.LayerNorm(H), txt_norm2=nn.LayerNorm(H),
                    txt_mlp=_diffusers_ff())

    return node("QwenImageTransformer2DModel",
                time_text_embed=node("QwenTimestepProjEmbeddings", time_proj=node("Timesteps"),
                                     timestep_embedder=node("TimestepEmbedding", linear_1=L(4, H), act=nn.SiLU(),
                                                            linear_2=L())),
                txt_norm=norm(), img_in=L(16, H), txt_in=L(6, H), transformer_blocks=blocks(layers, block),
                norm_out=node("AdaLayerNormContinuous", linear=L(H, 2 * H), norm=nn.LayerNorm(H)), proj_out=L(H, 16))


# ----- Z-Image (ZImageTransformer2DModel) ------------------------------------------------------------
def zimage(layers=2, refiners=1):
    """Per block (ZImageTransformerBlock in layers / noise_refiner): attention.to_q/k/v/to_out.0,
    feed_forward.w1/w2/w3 and adaLN_modulation.0: 8 Linear; context_refiner blocks have no modulation (7).
    Outside: all_x_embedder.2-1, all_final_layer.2-1.linear/.adaLN_modulation.1, t_embedder.mlp.0/.2,
    cap_embedder.1: 6."""
    def block(modulation=True):
        kids = dict(attention=node("ZImageAttention", to_q=L(), to_k=L(), to_v=L(), to_out=nn.ModuleList([L()]),
                                   norm_q=norm(), norm_k=norm()),
                    feed_forward=node("FeedForward", w1=L(H, 2 * H), w2=L(2 * H, H), w3=L(H, 2 * H)),
                    attention_norm1=norm(), ffn_norm1=norm())
        if modulation:
            kids["adaLN_modulation"] = nn.ModuleList([L(4, 4 * H)])
        return node("ZImageTransformerBlock", **kids)

    return node("ZImageTransformer2DModel",
                all_x_embedder=nn.ModuleDict({"2-1": L(16, H)}),
                all_final_layer=nn.ModuleDict({"2-1": node("FinalLayer", norm_final=nn.LayerNorm(H), linear=L(H, 16),
                                                           adaLN_modulation=seq(nn.SiLU(), L(4, H)))}),
                noise_refiner=blocks(refiners, block), context_refiner=blocks(refiners, lambda: block(False)),
                t_embedder=node("TimestepEmbedder", mlp=seq(L(4, 4), nn.SiLU(), L(4, 4))),
                cap_embedder=seq(norm(), L(6, H)), layers=blocks(layers, block))


# ----- FLUX.2 (Flux2) and FLUX.1 Kontext (musubi's Flux) --------------------------------------------
def _mlp_embedder(i):
    return node("MLPEmbedder", in_layer=L(i, H), silu=nn.SiLU(), out_layer=L())


def _self_attention():
    return node("SelfAttention", qkv=L(H, 3 * H), norm=node("QKNorm", query_norm=norm(), key_norm=norm()), proj=L())


def _last_layer():
    return node("LastLayer", norm_final=nn.LayerNorm(H), linear=L(H, 16), adaLN_modulation=seq(nn.SiLU(), L(H, 2 * H)))


def flux2(double=2, single=2):
    """Per double block: img_/txt_ attn.qkv, attn.proj, mlp.0, mlp.2: 8 Linear; per single block:
    linear1, linear2: 2 (the modulation lives outside the blocks). Outside: img_in, time_in.in/out_layer,
    txt_in, guidance_in.in/out_layer, double_stream_modulation_img/txt.lin, single_stream_modulation.lin,
    final_layer.linear/.adaLN_modulation.1: 11."""
    def dbl():
        kids = {}
        for side in ("img", "txt"):
            kids.update({f"{side}_norm1": nn.LayerNorm(H), f"{side}_attn": _self_attention(),
                         f"{side}_norm2": nn.LayerNorm(H),
                         f"{side}_mlp": seq(L(H, 4 * H), node("SiLUActivation"), L(2 * H, H))})
        return node("DoubleStreamBlock", **kids)

    def sgl():
        return node("SingleStreamBlock", linear1=L(H, 3 * H + 4 * H), linear2=L(H + 2 * H, H),
                    norm=node("QKNorm", query_norm=norm(), key_norm=norm()), pre_norm=nn.LayerNorm(H))

    def mod(k):
        return node("Modulation", lin=L(H, k * H))

    return node("Flux2", img_in=L(16, H), time_in=_mlp_embedder(4), txt_in=L(6, H), guidance_in=_mlp_embedder(4),
                double_blocks=blocks(double, dbl), single_blocks=blocks(single, sgl),
                double_stream_modulation_img=mod(6), double_stream_modulation_txt=mod(6), single_stream_modulation=mod(3),
                final_layer=_last_layer())


def flux_kontext(double=2, single=2):
    """sd-scripts' FLUX.1 paths (tests/flux_like.py): per double block img_/txt_ mod.lin, attn.qkv,
    attn.proj, mlp.0, mlp.2: 10 Linear; per single block linear1, linear2, modulation.lin: 3. Outside:
    img_in, time_in/vector_in/guidance_in in/out_layer, txt_in, final_layer linear/adaLN_modulation.1: 10."""
    def dbl():
        kids = {}
        for side in ("img", "txt"):
            kids.update({f"{side}_mod": node("Modulation", lin=L(H, 6 * H)), f"{side}_norm1": nn.LayerNorm(H),
                         f"{side}_attn": _self_attention(), f"{side}_norm2": nn.LayerNorm(H),
                         f"{side}_mlp": seq(L(H, 2 * H), nn.GELU(approximate="tanh"), L(2 * H, H))})
        return node("DoubleStreamBlock", **kids)

    def sgl():
        return node("SingleStreamBlock", linear1=L(H, 3 * H + 2 * H), linear2=L(H + 2 * H, H),
                    norm=node("QKNorm", query_norm=norm(), key_norm=norm()), pre_norm=nn.LayerNorm(H),
                    modulation=node("Modulation", lin=L(H, 3 * H)))

    return node("Flux", img_in=L(16, H), time_in=_mlp_embedder(4), vector_in=_mlp_embedder(6),
                guidance_in=_mlp_embedder(4), txt_in=L(6, H), double_blocks=blocks(double, dbl),
                single_blocks=blocks(single, sgl), final_layer=_last_layer())


# ----- HunyuanVideo (HYVideoDiffusionTransformer) and HunyuanVideo 1.5 ------------------------------
def _modulate(k):
    return node("ModulateDiT", act=nn.SiLU(), linear=L(H, k * H))


def _hv_mlp():
    return node("MLP", fc1=L(H, 2 * H), act=nn.GELU(approximate="tanh"), fc2=L(2 * H, H))


def _timestep_embedder():
    return node("TimestepEmbedder", mlp=seq(L(4, H), nn.SiLU(), L()))


def _token_refiner(n=1):
    """txt_in (SingleTokenRefiner): input_embedder, t_embedder.mlp.0/.2, c_embedder.linear_1/_2 and per
    refiner block self_attn_qkv, self_attn_proj, mlp.fc1/fc2, adaLN_modulation.1: 5 + 5n Linear."""
    def block():
        return node("IndividualTokenRefinerBlock", norm1=nn.LayerNorm(H), self_attn_qkv=L(H, 3 * H),
                    self_attn_proj=L(), norm2=nn.LayerNorm(H), mlp=_hv_mlp(), adaLN_modulation=seq(nn.SiLU(), L(H, 2 * H)))

    return node("SingleTokenRefiner", input_embedder=L(6, H), t_embedder=_timestep_embedder(),
                c_embedder=node("TextProjection", linear_1=L(6, H), act_1=nn.SiLU(), linear_2=L()),
                individual_token_refiner=node("IndividualTokenRefiner", blocks=blocks(n, block)))


def _final_layer():
    return node("FinalLayer", norm_final=nn.LayerNorm(H), linear=L(H, 16), adaLN_modulation=seq(nn.SiLU(), L(H, 2 * H)))


def hunyuan_video(double=2, single=2, refiners=1):
    """Per MMDoubleStreamBlock: img_/txt_ mod.linear, attn_qkv, attn_proj, mlp.fc1/fc2: 10 Linear; per
    MMSingleStreamBlock: linear1, linear2, modulation.linear: 3. Outside: txt_in (5 + 5 per refiner block),
    time_in.mlp.0/.2, vector_in.in/out_layer, guidance_in.mlp.0/.2, final_layer linear/adaLN_modulation.1:
    18 with one refiner block; img_in.proj is a Conv3d."""
    def dbl():
        kids = {}
        for side in ("img", "txt"):
            kids.update({f"{side}_mod": _modulate(6), f"{side}_norm1": nn.LayerNorm(H), f"{side}_attn_qkv": L(H, 3 * H),
                         f"{side}_attn_q_norm": norm(), f"{side}_attn_k_norm": norm(), f"{side}_attn_proj": L(),
                         f"{side}_norm2": nn.LayerNorm(H), f"{side}_mlp": _hv_mlp()})
        return node("MMDoubleStreamBlock", **kids)

    def sgl():
        return node("MMSingleStreamBlock", linear1=L(H, 3 * H + 2 * H), linear2=L(H + 2 * H, H), q_norm=norm(),
                    k_norm=norm(), pre_norm=nn.LayerNorm(H), mlp_act=nn.GELU(), modulation=_modulate(3))

    return node("HYVideoDiffusionTransformer", img_in=node("PatchEmbed", proj=nn.Conv3d(4, H, (1, 2, 2), (1, 2, 2))),
                txt_in=_token_refiner(refiners), time_in=_timestep_embedder(),
                vector_in=node("MLPEmbedder", in_layer=L(6, H), silu=nn.SiLU(), out_layer=L()),
                guidance_in=_timestep_embedder(), double_blocks=blocks(double, dbl), single_blocks=blocks(single, sgl),
                final_layer=_final_layer())


def hunyuan_video_1_5(double=2, refiners=1):
    """Per MMDoubleStreamBlock: img_/txt_ mod.linear, attn_q, attn_k, attn_v, attn_proj, mlp.fc1/fc2:
    14 Linear (no single blocks). Outside: byt5_in.fc1-3, vision_in.proj.1/.3, txt_in (5 + 5 per refiner
    block), time_in.mlp.0/.2, final_layer linear/adaLN_modulation.1: 19 with one refiner block; img_in.proj
    is a Conv3d."""
    def dbl():
        kids = {}
        for side in ("img", "txt"):
            kids.update({f"{side}_mod": _modulate(6), f"{side}_norm1": nn.LayerNorm(H), f"{side}_attn_q": L(),
                         f"{side}_attn_k": L(), f"{side}_attn_v": L(), f"{side}_attn_q_norm": norm(),
                         f"{side}_attn_k_norm": norm(), f"{side}_attn_proj": L(), f"{side}_norm2": nn.LayerNorm(H),
                         f"{side}_mlp": _hv_mlp()})
        return node("MMDoubleStreamBlock", **kids)

    return node("HunyuanVideo_1_5_DiffusionTransformer",
                byt5_in=node("ByT5Mapper", layernorm=nn.LayerNorm(6), fc1=L(6, H), fc2=L(), fc3=L()),
                img_in=node("PatchEmbed", proj=nn.Conv3d(5, H, 1)),
                vision_in=node("VisionProjection", proj=seq(nn.LayerNorm(6), L(6, 6), nn.GELU(), L(6, H), nn.LayerNorm(H))),
                txt_in=_token_refiner(refiners), time_in=_timestep_embedder(), double_blocks=blocks(double, dbl),
                final_layer=_final_layer())


# ----- FramePack (HunyuanVideoTransformer3DModelPacked) ----------------------------------------------
def _ts_embedding(i=4):
    return node("TimestepEmbedding", linear_1=L(i, H), act=nn.SiLU(), linear_2=L())


def _text_projection(i=6):
    return node("PixArtAlphaTextProjection", linear_1=L(i, H), act_1=nn.SiLU(), linear_2=L())


def framepack(double=2, single=2, refiners=1):
    """Per HunyuanVideoTransformerBlock: norm1.linear, norm1_context.linear, attn (8), ff.net.0.proj/.2,
    ff_context.net.0.proj/.2: 14 Linear; per HunyuanVideoSingleTransformerBlock: attn.to_q/k/v, norm.linear,
    proj_mlp, proj_out: 6. Outside: context_embedder (time_text_embed 4, proj_in, 7 per refiner block),
    time_text_embed (6), norm_out.linear, proj_out, image_projection.up/down: 10 + 1 + 7r + 2;
    x_embedder.proj and clean_x_embedder.proj/_2x/_4x are Conv3d."""
    def refiner():
        return node("HunyuanVideoIndividualTokenRefinerBlock", norm1=nn.LayerNorm(H),
                    attn=node("Attention", to_q=L(), to_k=L(), to_v=L(), to_out=nn.ModuleList([L(), nn.Dropout(0.0)])),
                    norm2=nn.LayerNorm(H), ff=_diffusers_ff(act="LinearActivation"),
                    norm_out=node("HunyuanVideoAdaNorm", linear=L(H, 2 * H)))

    def dbl():
        return node("HunyuanVideoTransformerBlock", norm1=node("AdaLayerNormZero", linear=L(H, 6 * H)),
                    norm1_context=node("AdaLayerNormZero", linear=L(H, 6 * H)), attn=_joint_attention(),
                    norm2=nn.LayerNorm(H), ff=_diffusers_ff(), norm2_context=nn.LayerNorm(H), ff_context=_diffusers_ff())

    def sgl():
        return node("HunyuanVideoSingleTransformerBlock",
                    attn=node("Attention", norm_q=norm(), norm_k=norm(), to_q=L(), to_k=L(), to_v=L()),
                    norm=node("AdaLayerNormZeroSingle", linear=L(H, 3 * H)), proj_mlp=L(H, 2 * H), act_mlp=nn.GELU(),
                    proj_out=L(3 * H, H))

    return node("HunyuanVideoTransformer3DModelPacked",
                x_embedder=node("HunyuanVideoPatchEmbed", proj=nn.Conv3d(4, H, (1, 2, 2), (1, 2, 2))),
                context_embedder=node("HunyuanVideoTokenRefiner",
                                      time_text_embed=node("CombinedTimestepTextProjEmbeddings", timestep_embedder=_ts_embedding(),
                                                           text_embedder=_text_projection()),
                                      proj_in=L(6, H),
                                      token_refiner=node("HunyuanVideoIndividualTokenRefiner", refiner_blocks=blocks(refiners, refiner))),
                time_text_embed=node("CombinedTimestepGuidanceTextProjEmbeddings", timestep_embedder=_ts_embedding(),
                                     guidance_embedder=_ts_embedding(), text_embedder=_text_projection()),
                rope=node("HunyuanVideoRotaryPosEmbed"), transformer_blocks=blocks(double, dbl),
                single_transformer_blocks=blocks(single, sgl),
                norm_out=node("AdaLayerNormContinuous", linear=L(H, 2 * H)), proj_out=L(H, 16),
                image_projection=node("ClipVisionProjection", up=L(6, 3 * H), down=L(3 * H, H)),
                clean_x_embedder=node("HunyuanVideoPatchEmbedForCleanLatents", proj=nn.Conv3d(4, H, (1, 2, 2), (1, 2, 2)),
                                      proj_2x=nn.Conv3d(4, H, (2, 4, 4), (2, 4, 4)), proj_4x=nn.Conv3d(4, H, (4, 8, 8), (4, 8, 8))))


# ----- Kandinsky 5 (DiffusionTransformer3D) ----------------------------------------------------------
def kandinsky5(text_blocks=1, visual_blocks=2):
    """Per TransformerEncoderBlock (text_transformer_blocks): text_modulation.out_layer,
    self_attention.to_query/key/value/out_layer, feed_forward.in/out_layer: 7 Linear; per
    TransformerDecoderBlock (visual_transformer_blocks): visual_modulation.out_layer, self_attention (4),
    cross_attention (4), feed_forward (2): 11. Outside: time_embeddings.in/out_layer,
    text_embeddings.in_layer, pooled_text_embeddings.in_layer, visual_embeddings.in_layer,
    out_layer.modulation.out_layer, out_layer.out_layer: 7."""
    def attn(cls):
        return node(cls, to_query=L(), to_key=L(), to_value=L(), query_norm=norm(), key_norm=norm(), out_layer=L())

    def ff():
        return node("FeedForward", in_layer=L(H, 2 * H), activation=nn.GELU(), out_layer=L(2 * H, H))

    def enc():
        return node("TransformerEncoderBlock", text_modulation=node("Modulation", activation=nn.SiLU(), out_layer=L(4, 6 * H)),
                    self_attention_norm=nn.LayerNorm(H), self_attention=attn("MultiheadSelfAttentionEnc"),
                    feed_forward_norm=nn.LayerNorm(H), feed_forward=ff())

    def dec():
        return node("TransformerDecoderBlock", visual_modulation=node("Modulation", activation=nn.SiLU(), out_layer=L(4, 9 * H)),
                    self_attention_norm=nn.LayerNorm(H), self_attention=attn("MultiheadSelfAttentionDec"),
                    cross_attention_norm=nn.LayerNorm(H), cross_attention=attn("MultiheadCrossAttention"),
                    feed_forward_norm=nn.LayerNorm(H), feed_forward=ff())

    return node("DiffusionTransformer3D",
                time_embeddings=node("TimeEmbeddings", in_layer=L(H, 4), activation=nn.SiLU(), out_layer=L(4, 4)),
                text_embeddings=node("TextEmbeddings", in_layer=L(6, H), norm=nn.LayerNorm(H)),
                pooled_text_embeddings=node("TextEmbeddings", in_layer=L(6, 4), norm=nn.LayerNorm(4)),
                visual_embeddings=node("VisualEmbeddings", in_layer=L(16, H)),
                text_rope_embeddings=node("RoPE1D"), text_transformer_blocks=blocks(text_blocks, enc),
                visual_rope_embeddings=node("RoPE3D"), visual_transformer_blocks=blocks(visual_blocks, dec),
                out_layer=node("OutLayer", modulation=node("Modulation", activation=nn.SiLU(), out_layer=L(4, 2 * H)),
                               norm=nn.LayerNorm(H), out_layer=L(H, 16)))


# ----- Krea 2 (SingleStreamDiT) ----------------------------------------------------------------------
def _krea_block(cls):
    return node(cls, attn=node("Attention", wq=L(), wk=L(H, H // 2), wv=L(H, H // 2), gate=L(), wo=L(),
                               qknorm=node("QKNorm")),
                mlp=node("SwiGLU", gate=L(H, 2 * H), up=L(H, 2 * H), down=L(2 * H, H)), mod=node("SimpleModulation"))


def krea2(layers=2, txt_layers=1):
    """Per SingleStreamBlock (blocks.N): attn.wq/wk/wv/gate/wo, mlp.gate/up/down: 8 Linear (the
    modulation is a Parameter); txtfusion (TextFusionTransformer): 8 per TextFusionBlock in
    layerwise_blocks and refiner_blocks, and projector (12 -> 1). Outside: first, tmlp.0/.2, txtmlp.1/.3,
    last.linear, tproj.1: 7."""
    return node("SingleStreamDiT", first=L(16, H), tmlp=seq(L(4, H), nn.SiLU(), L()),
                txtfusion=node("TextFusionTransformer", layerwise_blocks=blocks(txt_layers, lambda: _krea_block("TextFusionBlock")),
                               projector=L(12, 1), refiner_blocks=blocks(txt_layers, lambda: _krea_block("TextFusionBlock"))),
                txtmlp=seq(norm(), L(6, H), nn.SiLU(), L()), blocks=blocks(layers, lambda: _krea_block("SingleStreamBlock")),
                last=node("LastLayer", norm=norm(), linear=L(H, 16)), tproj=seq(nn.SiLU(), L(H, 6 * H)))


# ----- Ideogram 4 (Ideogram4Transformer) -------------------------------------------------------------
def ideogram4(layers=2):
    """Per Ideogram4TransformerBlock (layers.N): attention.qkv/o, feed_forward.w1/w2/w3, adaln_modulation:
    6 Linear. Outside: input_proj, llm_cond_proj, t_embedding.mlp_in/mlp_out, adaln_proj,
    final_layer.linear/.adaln_modulation: 7."""
    def block():
        return node("Ideogram4TransformerBlock",
                    attention=node("Ideogram4Attention", qkv=L(H, 3 * H), o=L(), q_norm=norm("Ideogram4RMSNorm"),
                                   k_norm=norm("Ideogram4RMSNorm")),
                    feed_forward=node("Ideogram4MLP", w1=L(H, 2 * H), w2=L(2 * H, H), w3=L(H, 2 * H)),
                    attention_norm1=norm("Ideogram4RMSNorm"), ffn_norm1=norm("Ideogram4RMSNorm"),
                    attention_norm2=norm("Ideogram4RMSNorm"), ffn_norm2=norm("Ideogram4RMSNorm"), adaln_modulation=L(4, 4 * H))

    return node("Ideogram4Transformer", input_proj=L(16, H), llm_cond_proj=L(6, H),
                t_embedding=node("Ideogram4EmbedScalar", mlp_in=L(), mlp_out=L()), adaln_proj=L(H, 4),
                rope=node("Ideogram4MRoPE"), layers=blocks(layers, block),
                final_layer=node("Ideogram4FinalLayer", norm=norm("Ideogram4RMSNorm"), linear=L(H, 16), adaln_modulation=L(4, H)))


# ----- HiDream-O1 (musubi's Qwen3VLForConditionalGeneration) -----------------------------------------
def hidream_o1(layers=2, vision_blocks=1, task="t2i"):
    """model.language_model.layers.N (Qwen3VLTextDecoderLayer): self_attn.q/k/v/o_proj, mlp.gate/up/down_proj:
    7 Linear; model.visual.blocks.N (Qwen3VLVisionBlock): attn.qkv/proj, mlp.linear_fc1/fc2: 4, and
    model.visual.merger.linear_fc1/fc2 (Qwen3VLVisionPatchMerger); model.x_embedder.proj1/proj2
    (BottleneckPatchEmbed), model.final_layer2.linear (FinalLayer), model.t_embedder1.mlp.0/.2, lm_head
    (a Linear when loaded with from_pretrained; musubi's lora leaves it out). model.visual.patch_embed.proj
    is a Conv3d. ``task``: what musubi's trainer tags the model with (hidream_o1_task)."""
    def decoder():
        return node("Qwen3VLTextDecoderLayer",
                    self_attn=node("Qwen3VLTextAttention", q_proj=L(), k_proj=L(), v_proj=L(), o_proj=L(),
                                   q_norm=norm("Qwen3VLTextRMSNorm"), k_norm=norm("Qwen3VLTextRMSNorm")),
                    mlp=node("Qwen3VLTextMLP", gate_proj=L(H, 2 * H), up_proj=L(H, 2 * H), down_proj=L(2 * H, H)),
                    input_layernorm=norm("Qwen3VLTextRMSNorm"), post_attention_layernorm=norm("Qwen3VLTextRMSNorm"))

    def vision_block():
        return node("Qwen3VLVisionBlock", norm1=nn.LayerNorm(6), norm2=nn.LayerNorm(6),
                    attn=node("Qwen3VLVisionAttention", qkv=L(6, 18), proj=L(6, 6)),
                    mlp=node("Qwen3VLVisionMLP", linear_fc1=L(6, 12), linear_fc2=L(12, 6)))

    visual = node("Qwen3VLVisionModel", patch_embed=node("Qwen3VLVisionPatchEmbed", proj=nn.Conv3d(3, 6, (2, 4, 4), (2, 4, 4))),
                  blocks=blocks(vision_blocks, vision_block),
                  merger=node("Qwen3VLVisionPatchMerger", norm=nn.LayerNorm(6), linear_fc1=L(6, 6), linear_fc2=L(6, H)))
    language = node("Qwen3VLTextModel", embed_tokens=node("Embedding"), layers=blocks(layers, decoder),
                    norm=norm("Qwen3VLTextRMSNorm"))
    model = node("Qwen3VLForConditionalGeneration",
                 model=node("Qwen3VLModel", visual=visual, language_model=language,
                            t_embedder1=node("TimestepEmbedder", mlp=seq(L(4, H), nn.SiLU(), L())),
                            x_embedder=node("BottleneckPatchEmbed", proj1=L(12, 6), proj2=L(6, H)),
                            final_layer2=node("FinalLayer", linear=L(H, 12))),
                 lm_head=L(H, 16))
    model.hidream_o1_task = task
    return model


BUILDERS = {
    "wan": wan, "wan_i2v": lambda **kw: wan(i2v=True, **kw), "qwen_image": qwen_image, "zimage": zimage,
    "flux2": flux2, "flux_kontext": flux_kontext, "hunyuan_video": hunyuan_video,
    "hunyuan_video_1_5": hunyuan_video_1_5, "framepack": framepack, "kandinsky5": kandinsky5, "krea2": krea2,
    "ideogram4": ideogram4, "hidream_o1": hidream_o1, "hidream_o1_i2i": lambda **kw: hidream_o1(task="i2i", **kw),
}

#: the depths of the released models (musubi's configs): Wan 2.1/2.2 14B (1.3B: 30 layers), Qwen-Image,
#: Z-Image, FLUX.2 dev, FLUX.1 Kontext dev, HunyuanVideo, HunyuanVideo 1.5, FramePack, Kandinsky 5 Lite
#: T2I HD (2 text + 50 visual blocks), Krea 2, Ideogram 4, HiDream-O1 (transformers'
#: default Qwen3-VL config: 32 decoder layers, 27 vision blocks)
REAL_DEPTH = {
    "wan": dict(layers=40), "wan_i2v": dict(layers=40), "qwen_image": dict(layers=60), "zimage": dict(layers=30, refiners=2),
    "flux2": dict(double=8, single=48), "flux_kontext": dict(double=19, single=38),
    "hunyuan_video": dict(double=20, single=40, refiners=2), "hunyuan_video_1_5": dict(double=54, refiners=2),
    "framepack": dict(double=20, single=40, refiners=2), "kandinsky5": dict(text_blocks=2, visual_blocks=50),
    "krea2": dict(layers=28, txt_layers=2), "ideogram4": dict(layers=34),
    "hidream_o1": dict(layers=32, vision_blocks=27), "hidream_o1_i2i": dict(layers=32, vision_blocks=27),
}


def build(name: str, real: bool = False, seed: int = 0) -> nn.Module:
    """A fresh miniature (frozen, eval mode); ``real``: at the released depth, on the meta device."""
    if real:
        with torch.device("meta"):
            return BUILDERS[name](**REAL_DEPTH[name])
    torch.manual_seed(seed)
    return BUILDERS[name]().eval().requires_grad_(False)
