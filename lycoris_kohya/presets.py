"""Presets: which layers get adapters, with per-class and per-path overrides. Values, never global state.

Matching rule (one for everything): patterns are shell globs (``fnmatch``: ``*``, ``?``, ``[..]``),
case-sensitive and anchored: a pattern must match the *whole* class name or the *whole* module path
(dots as in ``named_modules()``; text encoder paths in their canonical transformers-4 spelling,
``text_model.encoder.layers.0.self_attn.q_proj``).

A preset is a built-in name or a TOML file (LyCORIS' preset keys):

    enable_conv = true                       # false: Linear layers only
    unet_target_module = ["Transformer2DModel"]      # classes whose Linear/Conv2d descendants are adapted
    unet_target_name = ["conv_in"]           # paths adapted (a layer, or every layer below a module)
    text_encoder_target_module = ["CLIP*Attention*", "CLIPMLP"]
    text_encoder_target_name = []
    exclude_name = ["*.attn2.to_k"]          # paths never adapted
    [module_algo_map.ResnetBlock2D]           # per class (matched against the target class)
    algo = "lokr"
    dim = 8
    [name_algo_map."*.proj_in"]               # per path; wins over the class map
    dim = 16
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Dict, Mapping, Optional, Tuple

from .config import ConfigError, parse_overrides

Overrides = Tuple[Tuple[str, Tuple[Tuple[str, Any], ...]], ...]  # ((pattern, ((key, value), ...)), ...)


@dataclass(frozen=True)
class Preset:
    name: str
    unet_target_module: Tuple[str, ...] = ()
    unet_target_name: Tuple[str, ...] = ()
    text_encoder_target_module: Tuple[str, ...] = ()
    text_encoder_target_name: Tuple[str, ...] = ()
    exclude_name: Tuple[str, ...] = ()
    enable_conv: bool = True
    module_algo_map: Overrides = ()
    name_algo_map: Overrides = ()

    def overrides(self, class_name: Optional[str], path: str):
        """The override tables that apply to one layer, in order of precedence (per class, then per
        path; later ones win): (where, values), where is e.g. ``module_algo_map.'ResnetBlock2D'``."""
        if class_name is not None:
            for pattern, values in self.module_algo_map:
                if fnmatchcase(class_name, pattern):
                    yield f"module_algo_map.{pattern!r}", dict(values)
        for pattern, values in self.name_algo_map:
            if fnmatchcase(path, pattern):
                yield f"name_algo_map.{pattern!r}", dict(values)


def matches(patterns, text: str) -> bool:
    return any(fnmatchcase(text, p) for p in patterns)


_UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
_CLIP = ("CLIP*Attention*", "CLIPMLP")
# conv_in / conv_out / time embedding: diffusers names and sd-scripts' SDXL (SGM) names
_UNET_EXTRA = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
               "input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2")

BUILTIN: Dict[str, Preset] = {
    p.name: p
    for p in (
        # what you get with no preset: the kohya/LyCORIS training targets
        Preset("default", _UNET_BLOCKS, (), _CLIP),
        # also conv_in, conv_out and the time (and SDXL label) embeddings
        Preset("full", _UNET_BLOCKS, _UNET_EXTRA, _CLIP),
        # full, Linear layers only
        Preset("full-lin", _UNET_BLOCKS, _UNET_EXTRA, _CLIP, enable_conv=False),
        # transformer blocks (attention, feed-forward, proj_in/out) and the text encoder
        Preset("attn-mlp", ("Transformer2DModel",), (), _CLIP),
        # attention layers only (diffusers' Attention, sd-scripts' CrossAttention)
        Preset("attn-only", ("Attention", "CrossAttention"), (), ("CLIP*Attention*",)),
        Preset("unet-only", _UNET_BLOCKS),
        Preset("unet-transformer-only", ("Transformer2DModel",)),
        Preset("unet-convblock-only", ("ResnetBlock2D", "Downsample2D", "Upsample2D")),
        # the layers (IA)^3 rescales: attention keys/values and the feed-forward output
        Preset("ia3", (), ("*.attn?.to_k", "*.attn?.to_v", "*.ff.net.2"), (),
               ("*.self_attn.k_proj", "*.self_attn.v_proj", "*.mlp.fc2")),
    )
}


def _dit_presets(blocks, extra, te, modulation=(), attn=((), ()), te_attn=(), exclude=()) -> Dict[str, Preset]:
    """The same preset names for a DiT family. ``blocks``: the classes sd-scripts' own LoRA for the family
    targets (``default``); ``extra``: paths of the embedders and final layer (``full``); ``modulation``:
    paths ``attn-mlp`` leaves out; ``attn``: (classes, paths) of the attention layers (``attn-only``);
    ``exclude``: paths sd-scripts' LoRA leaves out by default."""
    return {p.name: p for p in (
        Preset("default", blocks, (), te, exclude_name=exclude),
        Preset("full", blocks, extra, te),
        Preset("full-lin", blocks, extra, te, enable_conv=False),
        Preset("attn-mlp", blocks, (), te, exclude_name=tuple(exclude) + tuple(modulation)),
        Preset("attn-only", attn[0], attn[1], te_attn),
        Preset("unet-only", blocks, (), exclude_name=exclude),
    )}


_T5 = ("T5Attention", "T5DenseGatedActDense")  # T5-XXL (adapted only with train_t5xxl)

#: built-in presets per model family (targets.FAMILIES), from the classes of sd-scripts' library/*_models.py
FAMILY_BUILTIN: Dict[str, Dict[str, Preset]] = {
    "sd": BUILTIN,
    # DoubleStreamBlock: img_/txt_ attn.qkv, attn.proj, mlp.0, mlp.2, mod.lin; SingleStreamBlock: linear1
    # (fused qkv + MLP in), linear2 (attention out + MLP out), modulation.lin
    "flux": _dit_presets(
        ("DoubleStreamBlock", "SingleStreamBlock"),
        ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"),
        _CLIP + _T5, modulation=("*.img_mod.lin", "*.txt_mod.lin", "*.modulation.lin"),
        attn=(("SelfAttention",), ()), te_attn=("CLIP*Attention*", "T5Attention")),
    # MMDiT joint_blocks.N.{context_block,x_block} (SingleDiTBlock): attn(.attn2).qkv/proj, mlp, adaLN_modulation.1
    "sd3": _dit_presets(
        ("SingleDiTBlock",),
        ("x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer"),
        _CLIP + _T5, modulation=("*.adaLN_modulation.1",),
        attn=(("AttentionLinears",), ()), te_attn=("CLIP*Attention*", "T5Attention")),
    # NextDiT layers / noise_refiner / context_refiner (JointTransformerBlock) and FinalLayer
    "lumina": _dit_presets(
        ("JointTransformerBlock", "FinalLayer"), ("x_embedder", "t_embedder", "cap_embedder"),
        ("Gemma2Attention", "Gemma2FlashAttention2", "Gemma2SdpaAttention", "Gemma2MLP"),
        modulation=("*.adaLN_modulation.1", "final_layer.*"),
        attn=(("JointAttention",), ()), te_attn=("Gemma2*Attention*",)),
    # Anima blocks.N (Block): self_attn / cross_attn q_proj, k_proj, v_proj, output_proj, mlp.layer1/2;
    # sd-scripts leaves out adaln_modulation_*, the embedders and the final layer by default
    "anima": _dit_presets(
        ("Block",), ("x_embedder", "t_embedder", "final_layer", "llm_adapter.blocks"),
        ("Qwen3Attention", "Qwen3MLP", "Qwen3SdpaAttention", "Qwen3FlashAttention2"),
        attn=(("Attention",), ()), te_attn=("Qwen3*Attention*",), exclude=("*_modulation*",)),
    # HunyuanImage-2.1 MMDoubleStreamBlock / MMSingleStreamBlock; its text encoders are never adapted
    "hunyuan_image": _dit_presets(
        ("MMDoubleStreamBlock", "MMSingleStreamBlock"),
        ("img_in", "txt_in", "time_in", "guidance_in", "byt5_in", "final_layer"),
        (), modulation=("*.img_mod.linear", "*.txt_mod.linear", "*.modulation.linear"),
        attn=((), ("*.img_attn_qkv", "*.img_attn_proj", "*.txt_attn_qkv", "*.txt_attn_proj"))),
}



def _musubi_presets(root: str, blocks, exclude=(), modulation=(), attn=((), ()), full_exclude=(),
                    extra: Optional[Dict[str, Preset]] = None) -> Dict[str, Preset]:
    """Built-in presets of a musubi-tuner family; musubi never adapts a text encoder. ``blocks``: the
    classes musubi's own networks/lora_<family>.py targets; ``exclude``: its default exclude patterns
    (regexes there, the same paths as globs here), together ``default``; ``modulation``: paths that
    ``attn-mlp`` leaves out besides; ``attn``: (classes, paths) of ``attn-only``; ``full``: every Linear of
    the model (the ``root`` class), less ``full_exclude``."""
    presets = {p.name: p for p in (
        Preset("default", blocks, exclude_name=exclude),
        Preset("full", (root,), exclude_name=full_exclude),
        Preset("attn-mlp", blocks, exclude_name=tuple(exclude) + tuple(modulation)),
        Preset("attn-only", attn[0], attn[1], exclude_name=exclude),
    )}
    presets.update(extra or {})
    return presets


_FLUX_EXCLUDE = ("*img_mod.lin*", "*txt_mod.lin*", "*modulation.lin*", "*norm*")  # lora_flux / lora_flux_2
_HIDREAM_T2I = ("Qwen3VLTextDecoderLayer", "BottleneckPatchEmbed", "FinalLayer")
_HIDREAM_EXCLUDE = ("*embed_tokens*", "*lm_head*")

#: built-in presets per musubi-tuner family (targets.MUSUBI_FAMILIES), from musubi's networks/lora_*.py
#: (target classes, default exclude patterns) and the classes of its model files
MUSUBI_BUILTIN: Dict[str, Dict[str, Preset]] = {
    # WanAttentionBlock: self_attn / cross_attn q, k, v, o (Wan 2.1 I2V: also cross_attn.k_img, v_img), ffn.0, ffn.2;
    # its modulation is a Parameter, not a layer
    "wan": _musubi_presets(
        "WanModel", ("WanAttentionBlock",),
        ("*patch_embedding*", "*text_embedding*", "*time_embedding*", "*time_projection*", "*norm*", "*head*"),
        attn=(("WanSelfAttention", "WanCrossAttention", "WanI2VCrossAttention"), ())),
    # QwenImageTransformerBlock: attn (to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out), img_/txt_mlp, img_/txt_mod.1.
    # lora_qwen_image's exclude ".*(_mod_).*" matches no path (they read img_mod.1), so its default keeps the modulation
    "qwen_image": _musubi_presets(
        "QwenImageTransformer2DModel", ("QwenImageTransformerBlock",), ("*_mod_*",),
        modulation=("*.img_mod.*", "*.txt_mod.*"), attn=(("Attention",), ())),
    # ZImageTransformerBlock in layers (not noise_refiner / context_refiner): attention.to_q/k/v/to_out.0,
    # feed_forward.w1/w2/w3; adaLN_modulation left out
    "zimage": _musubi_presets(
        "ZImageTransformer2DModel", ("ZImageTransformerBlock",), ("*_modulation*", "*_refiner*"),
        attn=(("ZImageAttention",), ())),
    # FLUX.2: the modulation lives outside the blocks (double_stream_modulation_img/txt, single_stream_modulation)
    "flux2": _musubi_presets("Flux2", ("DoubleStreamBlock", "SingleStreamBlock"), _FLUX_EXCLUDE,
                             attn=(("SelfAttention",), ())),
    # FLUX.1 Kontext (musubi's flux_models.Flux): sd-scripts' FLUX.1 paths, without img_/txt_mod.lin, modulation.lin
    "flux_kontext": _musubi_presets("Flux", ("DoubleStreamBlock", "SingleStreamBlock"), _FLUX_EXCLUDE,
                                    attn=(("SelfAttention",), ())),
    # HunyuanVideo (networks/lora.py): MMDoubleStreamBlock img_/txt_ attn_qkv, attn_proj, mlp.fc1/fc2;
    # MMSingleStreamBlock linear1, linear2; the *_mod.linear / modulation.linear left out
    "hunyuan_video": _musubi_presets(
        "HYVideoDiffusionTransformer", ("MMDoubleStreamBlock", "MMSingleStreamBlock"),
        ("*img_mod*", "*txt_mod*", "*modulation*"),
        attn=((), ("*.img_attn_qkv", "*.img_attn_proj", "*.txt_attn_qkv", "*.txt_attn_proj"))),
    # HunyuanVideo 1.5: MMDoubleStreamBlock only, img_/txt_ attn_q/k/v/proj, mlp.fc1/fc2 and mod.linear
    # (lora_hv_1_5's exclude ".*(_in).*" matches nothing inside the blocks)
    "hunyuan_video_1_5": _musubi_presets(
        "HunyuanVideo_1_5_DiffusionTransformer", ("MMDoubleStreamBlock",), ("*_in*",),
        modulation=("*.img_mod.*", "*.txt_mod.*"),
        attn=((), ("double_blocks.*.img_attn_*", "double_blocks.*.txt_attn_*"))),
    # FramePack: HunyuanVideoTransformerBlock (attn, ff, ff_context) and HunyuanVideoSingleTransformerBlock
    # (attn.to_q/k/v, proj_mlp, proj_out); their norm*.linear (AdaLayerNormZero modulation) left out
    "framepack": _musubi_presets(
        "HunyuanVideoTransformer3DModelPacked", ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"),
        ("*norm*",), attn=((), ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"))),
    # Kandinsky 5: text_/visual_transformer_blocks self_attention / cross_attention to_query/key/value,
    # out_layer, feed_forward in/out_layer; *_modulation left out (lora_kandinsky's include patterns only
    # take back excluded layers, and name none of the modulation)
    "kandinsky5": _musubi_presets(
        "DiffusionTransformer3D", ("TransformerEncoderBlock", "TransformerDecoderBlock"), ("*modulation*",),
        attn=(("MultiheadSelfAttentionEnc", "MultiheadSelfAttentionDec", "MultiheadCrossAttention"), ())),
    # Krea 2: lora_krea2 adapts every Linear of the model (its modulation and norms are Parameters);
    # attn-mlp: the DiT blocks' attention and SwiGLU; attn-only: their attention (the authors' long-run set)
    "krea2": _musubi_presets("SingleStreamDiT", ("SingleStreamDiT",), attn=((), ("blocks.*.attn",)),
                             extra={"attn-mlp": Preset("attn-mlp", ("SingleStreamBlock",))}),
    # Ideogram 4: Ideogram4TransformerBlock attention.qkv/o, feed_forward.w1/w2/w3; adaln_modulation left out
    "ideogram4": _musubi_presets("Ideogram4Transformer", ("Ideogram4TransformerBlock",), ("*adaln_modulation*",),
                                 attn=(("Ideogram4Attention",), ())),
    # HiDream-O1: the Qwen3-VL decoder layers and the pixel patch embedder / final layer (text-to-image);
    # default-i2i (chosen when the trainer tags the model hidream_o1_task="i2i") adds the vision tower
    "hidream_o1": _musubi_presets(
        "Qwen3VLForConditionalGeneration", _HIDREAM_T2I, _HIDREAM_EXCLUDE, attn=(("Qwen3VLTextAttention",), ()),
        full_exclude=_HIDREAM_EXCLUDE,
        extra={"default-i2i": Preset("default-i2i", _HIDREAM_T2I + (
            "Qwen3VLVisionPatchEmbed", "Qwen3VLVisionBlock", "Qwen3VLVisionPatchMerger"), exclude_name=_HIDREAM_EXCLUDE),
            "attn-mlp": Preset("attn-mlp", ("Qwen3VLTextDecoderLayer",), exclude_name=_HIDREAM_EXCLUDE)}),
    # a musubi model of a class no family has: preset files only
    "other_dit": {},
}
FAMILY_BUILTIN.update(MUSUBI_BUILTIN)

_KEYS = ("enable_conv", "unet_target_module", "unet_target_name", "text_encoder_target_module",
         "text_encoder_target_name", "exclude_name", "module_algo_map", "name_algo_map", "use_fnmatch")
#: preset files shipped inside the package (package data), usable by name: preset=style-no-cross-attn
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preset_files")


def shipped_names() -> Tuple[str, ...]:
    """Names of the preset files in PRESET_DIR (without .toml)."""
    if not os.path.isdir(PRESET_DIR):
        return ()
    return tuple(sorted(f[:-len(".toml")] for f in os.listdir(PRESET_DIR) if f.endswith(".toml")))


def _strings(where: str, v: Any) -> Tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where} must be a list of strings, got {v!r}")
    return tuple(v)


def _overrides(where: str, v: Any) -> Overrides:
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where} must be a table of tables, got {v!r}")
    return tuple((pattern, tuple(parse_overrides(f"{where}.{pattern!r}", opts).items())) for pattern, opts in v.items())


def from_dict(name: str, raw: Mapping[str, Any]) -> Preset:
    unknown = [k for k in raw if k not in _KEYS]
    if unknown:
        raise ConfigError(f"preset {name}: unknown key {unknown[0]!r}; accepted: {', '.join(_KEYS)}")
    if raw.get("use_fnmatch", True) is not True:
        raise ConfigError(f"preset {name}: use_fnmatch=false (exact names) is not supported; patterns are "
                          "globs, and a name without * ? [ ] already matches exactly")
    enable_conv = raw.get("enable_conv", True)
    if not isinstance(enable_conv, bool):
        raise ConfigError(f"preset {name}: enable_conv must be true or false, got {enable_conv!r}")
    return Preset(
        name,
        _strings(f"preset {name}: unet_target_module", raw.get("unet_target_module", [])),
        _strings(f"preset {name}: unet_target_name", raw.get("unet_target_name", [])),
        _strings(f"preset {name}: text_encoder_target_module", raw.get("text_encoder_target_module", [])),
        _strings(f"preset {name}: text_encoder_target_name", raw.get("text_encoder_target_name", [])),
        _strings(f"preset {name}: exclude_name", raw.get("exclude_name", [])),
        enable_conv,
        _overrides(f"preset {name}: module_algo_map", raw.get("module_algo_map", {})),
        _overrides(f"preset {name}: name_algo_map", raw.get("name_algo_map", {})),
    )


def load(value: str, family: str = "sd") -> Preset:
    """A built-in name (of the model family), a path to a TOML file, or the name of a shipped preset
    file (preset_files/)."""
    builtin = FAMILY_BUILTIN[family]
    if value in builtin:
        return builtin[value]
    if any(value in table for table in FAMILY_BUILTIN.values()):
        raise ConfigError(f"network_arg preset={value!r} is not defined for this model family ({family}); its "
                          f"built-in presets: {', '.join(builtin)}")
    candidates = [value, os.path.join(PRESET_DIR, value), os.path.join(PRESET_DIR, value + ".toml")]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise ConfigError(f"network_arg preset={value!r} is neither a built-in preset ({', '.join(builtin)}), "
                          f"nor a shipped preset file ({', '.join(shipped_names()) or 'none found'}), "
                          "nor the path of a TOML file")
    import toml

    try:
        raw = toml.load(path)
    except Exception as e:  # toml's own errors name the line
        raise ConfigError(f"preset file {path}: {e}") from None
    return from_dict(path, raw)
