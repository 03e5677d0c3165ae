"""Which layers of a UNet and of the text encoder(s) get adapters, and their canonical key names.

Key of a layer: ``prefix + "_" + path.replace(".", "_")`` with prefixes ``lora_unet``, ``lora_te``
(one text encoder) or ``lora_te1`` / ``lora_te2`` (SDXL). Names are computed canonically:
a CLIP layer is always ``text_model.encoder.layers.{i}...`` whatever the transformers version
(transformers 5 dropped the ``text_model.`` level from ``CLIPTextModel.named_modules()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

from torch import nn

from .presets import matches

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"

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
    return [TE_PREFIX] if n == 1 else [f"{TE_PREFIX}{i + 1}" for i in range(n)]


def as_list(text_encoder) -> List[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [t for t in text_encoder if t is not None]
    return [text_encoder]


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


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


def select(text_encoder, unet: Optional[nn.Module], preset) -> Tuple[List[Target], List[Target]]:
    """(text encoder targets, unet targets) chosen by a preset; names are unique or this raises."""
    tes = as_list(text_encoder)
    te_targets: List[Target] = []
    for te, prefix in zip(tes, te_prefixes(len(tes))):
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
