"""Which layers of a UNet or DiT and of the text encoder(s) get adapters, and their canonical key names.

Key of a layer: ``prefix + "_" + path.replace(".", "_")``. The denoiser is always ``lora_unet`` (sd-scripts'
LoRA for every family writes it so, for ComfyUI). Text encoder prefixes are per model family (FAMILIES):
``lora_te`` (one text encoder) or ``lora_te1`` / ``lora_te2`` (SDXL); Flux: ``lora_te1`` CLIP-L,
``lora_te3`` T5-XXL; SD3: ``lora_te1`` CLIP-L, ``lora_te2`` CLIP-G, ``lora_te3`` T5-XXL.
Names are computed canonically: a CLIP layer is always ``text_model.encoder.layers.{i}...`` whatever the
transformers version (transformers 5 dropped the ``text_model.`` level from ``CLIPTextModel.named_modules()``).

Two trainers hand models over: sd-scripts (``create_network``) and kohya-ss/musubi-tuner
(``create_arch_network``). Each has its own families (FAMILIES, MUSUBI_FAMILIES); a family is found from
the class of the model, first among the calling trainer's families (both name a ``Flux`` class: sd-scripts'
FLUX.1, musubi's FLUX.1 Kontext, whose LoRA leaves the modulation out). The entry point says which trainer
calls (``calling_trainer``).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from torch import nn

from .presets import matches

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"


@dataclass(frozen=True)
class Family:
    """A model family as sd-scripts trains it: which denoiser classes identify it, and the key prefix
    of each text encoder in the order the trainer passes them (None: kohya's SD rule, ``lora_te`` for
    one, ``lora_te1``/``lora_te2`` for two)."""

    name: str
    title: str
    model_classes: Tuple[str, ...]
    te_prefixes: Optional[Tuple[str, ...]] = None
    #: index of the T5-XXL text encoder: adapted only when train_t5xxl is asked (sd-scripts' semantics)
    t5_index: Optional[int] = None
    #: the trainer whose models these are: "sd-scripts" or "musubi"
    trainer: str = "sd-scripts"
    #: the trainer's own LoRA module for the family (what its users pass as --network_module)
    own_lora: str = ""

    @property
    def is_dit(self) -> bool:
        return self.name != "sd"

    @property
    def t5_prefix(self) -> Optional[str]:
        return None if self.t5_index is None else self.te_prefixes[self.t5_index]


# the class of the model each sd-scripts trainer hands to create_network as ``unet`` (library/*_models.py)
FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("sd", "SD1/2/SDXL", ("UNet2DConditionModel", "SdxlUNet2DConditionModel")),
    # flux_train_network.py: [CLIP-L, T5-XXL]; networks/lora_flux.py
    Family("flux", "Flux", ("Flux", "Chroma"), ("lora_te1", "lora_te3"), t5_index=1),
    # sd3_train_network.py: [CLIP-L, CLIP-G, T5-XXL]; networks/lora_sd3.py
    Family("sd3", "SD3", ("MMDiT",), ("lora_te1", "lora_te2", "lora_te3"), t5_index=2),
    # lumina_train_network.py: [Gemma2]; networks/lora_lumina.py
    Family("lumina", "Lumina", ("NextDiT",), ("lora_te",)),
    # anima_train_network.py: [Qwen3]; networks/lora_anima.py
    Family("anima", "Anima", ("Anima",), ("lora_te",)),
    # hunyuan_image_train_network.py: [Qwen2.5-VL, byT5], never adapted by networks/lora_hunyuan_image.py
    Family("hunyuan_image", "HunyuanImage", ("HYImageDiffusionTransformer",), ()),
)}


def _musubi(name: str, title: str, model_class: str, own_lora: str) -> Family:
    # musubi-tuner never trains a text encoder: create_arch_network gets None for them
    return Family(name, title, (model_class,), (), trainer="musubi", own_lora=f"networks.{own_lora}")


#: the class of the model each musubi-tuner trainer hands to create_arch_network as ``unet``
#: (src/musubi_tuner/<family>/..._model(s).py) and musubi's own LoRA module for it (networks/lora_*.py)
MUSUBI_FAMILIES: Dict[str, Family] = {f.name: f for f in (
    _musubi("wan", "Wan 2.1/2.2", "WanModel", "lora_wan"),
    _musubi("qwen_image", "Qwen-Image", "QwenImageTransformer2DModel", "lora_qwen_image"),
    _musubi("zimage", "Z-Image", "ZImageTransformer2DModel", "lora_zimage"),
    _musubi("flux2", "FLUX.2", "Flux2", "lora_flux_2"),
    _musubi("flux_kontext", "FLUX.1 Kontext", "Flux", "lora_flux"),
    _musubi("hunyuan_video", "HunyuanVideo", "HYVideoDiffusionTransformer", "lora"),
    _musubi("hunyuan_video_1_5", "HunyuanVideo 1.5", "HunyuanVideo_1_5_DiffusionTransformer", "lora_hv_1_5"),
    _musubi("framepack", "FramePack", "HunyuanVideoTransformer3DModelPacked", "lora_framepack"),
    _musubi("kandinsky5", "Kandinsky 5", "DiffusionTransformer3D", "lora_kandinsky"),
    _musubi("krea2", "Krea 2", "SingleStreamDiT", "lora_krea2"),
    _musubi("ideogram4", "Ideogram 4", "Ideogram4Transformer", "lora_ideogram4"),
    # HiDream-O1 is a Qwen3-VL model with pixel heads (musubi's hidream_o1/qwen3_vl_transformers.py)
    _musubi("hidream_o1", "HiDream-O1", "Qwen3VLForConditionalGeneration", "lora_hidream_o1"),
)}
#: a musubi model of a class none of the families has, trained with a preset file (no built-in presets)
OTHER_DIT = Family("other_dit", "this", (), (), trainer="musubi")

SD_SCRIPTS, MUSUBI = "sd-scripts", "musubi"
_TRAINER: ContextVar[str] = ContextVar("lycoris_kohya_trainer", default=SD_SCRIPTS)


@contextlib.contextmanager
def calling_trainer(trainer: str) -> Iterator[None]:
    """Within it, families are looked up as ``trainer`` ("sd-scripts" or "musubi") names them: the
    entry points set it, so that the network (which detects the family itself) sees who is calling."""
    token = _TRAINER.set(trainer)
    try:
        yield
    finally:
        _TRAINER.reset(token)


def find_family(unet: Optional[nn.Module], trainer: Optional[str] = None) -> Optional[Family]:
    """The family of a model from its class, the trainer's own families first; None if none has it."""
    trainer = trainer or _TRAINER.get()
    cls = type(unet).__name__ if unet is not None else None
    tables = (MUSUBI_FAMILIES, FAMILIES) if trainer == MUSUBI else (FAMILIES, MUSUBI_FAMILIES)
    for table in tables:
        for family in table.values():
            if cls in family.model_classes and not (trainer == MUSUBI and family.name == "sd"):
                return family
    return None


def detect_family(unet: Optional[nn.Module], trainer: Optional[str] = None) -> Family:
    """The family of the model the trainer passed as ``unet``, from its class. Anything else is SD for
    sd-scripts, and OTHER_DIT for musubi-tuner (trainable with a preset file only: see unknown_model)."""
    trainer = trainer or _TRAINER.get()
    family = find_family(unet, trainer)
    if family is not None:
        return family
    return OTHER_DIT if trainer == MUSUBI else FAMILIES["sd"]


def unknown_model(unet: nn.Module) -> str:
    """What to say when musubi-tuner hands over a model of a class no family has."""
    known = "; ".join(f"{f.title} ({f.model_classes[0]})" for f in MUSUBI_FAMILIES.values())
    blocks = sorted({type(m).__name__ for _, m in unet.named_children()})
    return (f"lycoris_kohya does not know the model class {type(unet).__name__} that musubi-tuner passed (its "
            f"top-level children are {', '.join(blocks) or 'none'}). Known musubi-tuner families: {known}. "
            "To train it anyway, name its layers in a preset file: --network_args \"preset=/path/to/dit.toml\" "
            "with, e.g., unet_target_module = [\"<the class of its transformer blocks>\"] and exclude_name = "
            "[\"*modulation*\"] (globs on module paths; docs/families.md, docs/options.md#presets-preset)")


def default_preset(family: Family, unet: Optional[nn.Module]) -> str:
    """The built-in preset a network gets when none is asked for. HiDream-O1: musubi's lora_hidream_o1
    adapts the vision tower too when the trainer tagged the model for image-to-image training."""
    if family.name == "hidream_o1" and getattr(unet, "hidream_o1_task", None) == "i2i":
        return "default-i2i"
    return "default"


def te_prefix_of(name: str) -> str:
    """``lora_te1_text_model_...`` -> ``lora_te1``; ``lora_te3_encoder_block_...`` -> ``lora_te3``."""
    return "_".join(name.split("_", 2)[:2])


@dataclass
class Target:
    name: str  # canonical key, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    path: str  # canonical module path inside its model
    layer: nn.Module
    is_text_encoder: bool
    owner_class: Optional[str] = None  # class of the preset target module it was found under

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.layer, nn.Conv2d) and tuple(self.layer.kernel_size) != (1, 1)


def key_name(prefix: str, path: str) -> str:
    return prefix + "_" + path.replace(".", "_")


def te_prefixes(n: int) -> List[str]:
    """SD1/2 and SDXL: ``lora_te`` for one text encoder, ``lora_te1``, ``lora_te2`` for two."""
    return [TE_PREFIX] if n == 1 else [f"{TE_PREFIX}{i + 1}" for i in range(n)]


def prefixed_text_encoders(text_encoder, family: Family, train_t5xxl: bool = True) -> List[Tuple[nn.Module, str]]:
    """(text encoder, key prefix) pairs; positions follow the trainer's list (a None keeps its place, as
    in sd-scripts), and the T5-XXL of Flux/SD3 is left out unless train_t5xxl."""
    if text_encoder is None:
        return []
    tes = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    if family.te_prefixes is None:  # SD: prefixes by the number of text encoders present
        tes = [t for t in tes if t is not None]
        return list(zip(tes, te_prefixes(len(tes))))
    return [(te, prefix) for i, (te, prefix) in enumerate(zip(tes, family.te_prefixes))
            if te is not None and (train_t5xxl or i != family.t5_index)]


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def canonical_te_path(text_encoder: nn.Module, path: str) -> str:
    """Module path as transformers 4 spells it: transformers 5's CLIPTextModel has no
    ``text_model`` level (it *is* the text transformer), so it is put back. Other text encoders
    (T5, Gemma2, Qwen3) keep their paths."""
    if not type(text_encoder).__name__.startswith("CLIP"):
        return path
    if hasattr(text_encoder, "text_model") or path.startswith("text_model."):
        return path
    return "text_model." + path


def text_encoder_layers(text_encoder: nn.Module, prefix: str) -> List[Target]:
    """Every Linear of a text encoder under its canonical key."""
    out: List[Target] = []
    seen_layers = set()
    for path, module in text_encoder.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in seen_layers:
            continue
        seen_layers.add(id(module))
        canonical = canonical_te_path(text_encoder, path)
        out.append(Target(key_name(prefix, canonical), canonical, module, True))
    return out


def unet_layers(unet: nn.Module) -> List[Target]:
    """Every Linear/Conv2d of a UNet under its key."""
    out, seen_layers = [], set()
    for path, module in unet.named_modules():
        if path and _adaptable(module) and id(module) not in seen_layers:
            seen_layers.add(id(module))
            out.append(Target(key_name(UNET_PREFIX, path), path, module, False))
    return out


def every_layer(text_encoder, unet: Optional[nn.Module], family: Optional[Family] = None) -> dict:
    """name -> Target for every adaptable layer (T5-XXL included): what a file may refer to."""
    family = family or detect_family(unet)
    found: List[Target] = []
    for te, prefix in prefixed_text_encoders(text_encoder, family):
        found += text_encoder_layers(te, prefix)
    if unet is not None:
        found += unet_layers(unet)
    return {t.name: t for t in found}


def _select(model: nn.Module, prefix: str, is_te: bool, modules, names, exclude, enable_conv: bool,
            path_of: Callable[[str], str]) -> List[Target]:
    """Adaptable layers under the target classes or at the target paths, each once, in model order."""
    out: List[Target] = []
    seen = set()

    def add(path: str, layer: nn.Module, owner: str) -> None:
        if id(layer) in seen or not _adaptable(layer) or (isinstance(layer, nn.Conv2d) and not enable_conv):
            return
        if matches(exclude, path):
            return
        seen.add(id(layer))
        out.append(Target(key_name(prefix, path), path, layer, is_te, owner))

    for raw_path, module in model.named_modules():
        path = path_of(raw_path)
        cls = type(module).__name__
        if matches(modules, cls) or (raw_path and matches(names, path)):
            for child_path, child in module.named_modules():
                full = path if not child_path else (f"{path}.{child_path}" if path else path_of(child_path))
                add(full, child, cls)
    return out


def select(text_encoder, unet: Optional[nn.Module], preset, family: Optional[Family] = None,
           train_t5xxl: bool = False) -> Tuple[List[Target], List[Target]]:
    """(text encoder targets, unet targets) chosen by a preset; names are unique or this raises.
    The T5-XXL of Flux/SD3 gets targets only with train_t5xxl."""
    family = family or detect_family(unet)
    te_targets: List[Target] = []
    for te, prefix in prefixed_text_encoders(text_encoder, family, train_t5xxl):
        te_targets += _select(te, prefix, True, preset.text_encoder_target_module, preset.text_encoder_target_name,
                              preset.exclude_name, preset.enable_conv, lambda p, te=te: canonical_te_path(te, p) if p else p)
    u_targets: List[Target] = []
    if unet is not None:
        u_targets = _select(unet, UNET_PREFIX, False, preset.unet_target_module, preset.unet_target_name,
                            preset.exclude_name, preset.enable_conv, lambda p: p)
    check_unique(te_targets + u_targets)
    return te_targets, u_targets


def check_unique(targets: Iterable[Target]) -> None:
    seen = {}
    for t in targets:
        if t.name in seen:
            raise ValueError(f"two layers map to the same key {t.name!r}: {seen[t.name]} and {t.path}")
        seen[t.name] = t.path
