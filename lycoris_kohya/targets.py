"""Which layers of a UNet and of the text encoder(s) get adapters, and their canonical key names.

Key of a layer: ``prefix + "_" + path.replace(".", "_")`` with prefixes ``lora_unet``, ``lora_te``
(one text encoder) or ``lora_te1`` / ``lora_te2`` (SDXL). Names are computed canonically:
a CLIP layer is always ``text_model.encoder.layers.{i}...`` whatever the transformers version
(transformers 5 dropped the ``text_model.`` level from ``CLIPTextModel.named_modules()``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from torch import nn

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"

# Module classes whose Linear/Conv2d descendants are adapted by default. The names are shared by
# diffusers' UNet2DConditionModel and sd-scripts' own SD1/2 and SDXL UNets.
UNET_TARGET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")

_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass
class Target:
    name: str  # canonical key, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    path: str  # canonical module path inside its model
    layer: nn.Module
    is_text_encoder: bool

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.layer, nn.Conv2d) and tuple(self.layer.kernel_size) != (1, 1)


def key_name(prefix: str, path: str) -> str:
    return prefix + "_" + path.replace(".", "_")


def te_prefixes(n: int) -> List[str]:
    return [TE_PREFIX] if n == 1 else [f"{TE_PREFIX}{i + 1}" for i in range(n)]


def as_list(text_encoder) -> List[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [t for t in text_encoder if t is not None]
    return [text_encoder]


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def unet_targets(unet: nn.Module, target_classes: Sequence[str] = UNET_TARGET_CLASSES) -> List[Target]:
    """Linear/Conv2d layers inside the target module classes, each at most once."""
    out: List[Target] = []
    seen_layers = set()
    for path, module in unet.named_modules():
        if type(module).__name__ not in target_classes:
            continue
        for child_path, child in module.named_modules():
            if not child_path or not _adaptable(child) or id(child) in seen_layers:
                continue
            seen_layers.add(id(child))
            full = f"{path}.{child_path}" if path else child_path
            out.append(Target(key_name(UNET_PREFIX, full), full, child, False))
    return out


def canonical_te_path(text_encoder: nn.Module, path: str) -> str:
    """Module path as transformers 4 spells it: transformers 5's CLIPTextModel has no
    ``text_model`` level (it *is* the text transformer), so it is put back."""
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


def text_encoder_targets(text_encoder: nn.Module, prefix: str) -> List[Target]:
    """q/k/v/out_proj and fc1/fc2 of every CLIP encoder layer."""
    return [t for t in text_encoder_layers(text_encoder, prefix) if _CLIP_LAYER.search(t.path)]


def unet_layers(unet: nn.Module) -> List[Target]:
    """Every Linear/Conv2d of a UNet under its key."""
    out, seen_layers = [], set()
    for path, module in unet.named_modules():
        if path and _adaptable(module) and id(module) not in seen_layers:
            seen_layers.add(id(module))
            out.append(Target(key_name(UNET_PREFIX, path), path, module, False))
    return out


def every_layer(text_encoder, unet: Optional[nn.Module]) -> dict:
    """name -> Target for every adaptable layer: what a file may refer to."""
    tes = as_list(text_encoder)
    found: List[Target] = []
    for te, prefix in zip(tes, te_prefixes(len(tes))):
        found += text_encoder_layers(te, prefix)
    if unet is not None:
        found += unet_layers(unet)
    return {t.name: t for t in found}


def all_targets(text_encoder, unet: Optional[nn.Module]) -> Tuple[List[Target], List[Target]]:
    """(text encoder targets, unet targets); names are unique or this raises."""
    tes = as_list(text_encoder)
    te_targets: List[Target] = []
    for te, prefix in zip(tes, te_prefixes(len(tes))):
        te_targets += text_encoder_targets(te, prefix)
    u_targets = unet_targets(unet) if unet is not None else []
    check_unique(te_targets + u_targets)
    return te_targets, u_targets


def check_unique(targets: Iterable[Target]) -> None:
    seen = {}
    for t in targets:
        if t.name in seen:
            raise ValueError(f"two layers map to the same key {t.name!r}: {seen[t.name]} and {t.path}")
        seen[t.name] = t.path
