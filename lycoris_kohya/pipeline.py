"""Our files in diffusers pipelines: any algorithm and layout, DoRA on either axis, SD1/SD2 and SDXL
(sd-scripts' SDXL key names, which follow the original U-Net, included).

    lycoris = LycorisAdapters(pipe)                      # a StableDiffusion(XL)Pipeline
    style = lycoris.load("style.safetensors", multiplier=0.8)
    image = pipe("a lighthouse").images[0]
    style.multiplier = 0.5; style.merge(); style.unmerge()
    style.remove()                                        # the pipeline is bit-identical to before

Each file becomes a LycorisNetwork (the adapters sd-scripts trains with) hooked into the pipeline's
U-Net and text encoder(s); several files stack as sd-scripts' gen_img.py stacks networks (each
hook wraps the previous one; merging one bakes it into the weights the others then see).
Removing or unmerging one file in the middle of the stack unwinds the later ones and redoes them,
so every file can be removed in any order and the weights come back exactly.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch

from . import targets as tg
from . import weights as wio
from .kohya import create_network_from_weights
from .network import LycorisNetwork
from .tools import keymap


def _text_encoders(pipe) -> List[torch.nn.Module]:
    return [te for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if te is not None]


def unet_aliases(unet: torch.nn.Module) -> Dict[str, str]:
    """sd-scripts' SDXL key names (original U-Net paths) -> our names of the diffusers U-Net's layers."""
    paths = [p for p, _ in unet.named_modules() if p]
    try:
        pmap = keymap.unet_map_from_diffusers(paths)
    except ValueError:
        return {}
    out = {}
    for p, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            ldm = pmap.to_ldm(p)
            if ldm is not None:
                out[tg.key_name(tg.UNET_PREFIX, ldm)] = tg.key_name(tg.UNET_PREFIX, p)
    return out


def rename_for(sd: Mapping[str, torch.Tensor], known: Mapping[str, object], aliases: Mapping[str, str]):
    """Keys renamed to the model's names where the file spells a layer another way."""
    out = {}
    for key, t in sd.items():
        name, _, suffix = key.partition(".")
        if name not in known and name in aliases:
            key = f"{aliases[name]}.{suffix}"
        out[key] = t
    return out


class LoadedFile:
    """One file applied to a pipeline: its multiplier can change, it can be merged into the
    weights and unmerged, and removed."""

    def __init__(self, owner: "LycorisAdapters", file: str, network: LycorisNetwork, multiplier: float):
        self._owner = owner
        self.file = file
        self.network = network
        self._multiplier = float(multiplier)
        self._backup: Optional[List[torch.Tensor]] = None

    # ----- state -----------------------------------------------------------------------------------
    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, m: float) -> None:
        merged = self.merged
        if merged:
            self.unmerge()
        self._multiplier = float(m)
        self.network.set_multiplier(self._multiplier)
        if merged:
            self.merge()

    @property
    def merged(self) -> bool:
        return self._backup is not None

    def merge(self) -> None:
        """Bake this file into the weights at its multiplier (its hooks then pass through)."""
        self._owner._merge(self)

    def unmerge(self) -> None:
        """Restore the weights exactly as before merge() (files merged later are redone on top)."""
        self._owner._unmerge(self)

    def remove(self) -> None:
        self._owner.remove(self)

    # ----- what the owner calls ----------------------------------------------------------------
    @torch.no_grad()
    def _bake(self) -> None:
        self._backup = [a.layer.weight.detach().clone() for a in self.network.loras]
        for a in self.network.loras:
            a.merge_into_layer(self._multiplier)
            a.enabled = False

    @torch.no_grad()
    def _restore(self) -> None:
        for a, w in zip(self.network.loras, self._backup):
            a.layer.weight.copy_(w)
            a.enabled = True
        self._backup = None

    def _hook(self) -> None:
        for a in self.network.loras:
            a.apply_to()

    def _unhook(self) -> None:
        for a in reversed(self.network.loras):
            a.remove()

    def __repr__(self) -> str:
        n = self.network
        return (f"LoadedFile({self.file!r}, multiplier={self._multiplier:g}, merged={self.merged}, "
                f"{len(n.text_encoder_loras)} text encoder + {len(n.unet_loras)} U-Net modules)")


class LycorisAdapters:
    """The files applied to one StableDiffusionPipeline / StableDiffusionXLPipeline (any object
    with ``unet`` and ``text_encoder`` [, ``text_encoder_2``])."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.loaded: List[LoadedFile] = []  # in the order applied (hook order)
        self._merged: List[LoadedFile] = []  # in the order merged

    def load(self, file: str, multiplier: float = 1.0, weights_sd: Optional[Mapping[str, torch.Tensor]] = None
             ) -> LoadedFile:
        """Apply a file (hooks; nothing in the pipeline's weights changes until merge())."""
        unet, tes = self.pipe.unet, _text_encoders(self.pipe)
        sd = dict(wio.load_state_dict(file) if weights_sd is None else weights_sd)
        known = tg.every_layer(tes, unet)
        sd = rename_for(sd, known, unet_aliases(unet))
        try:
            network, _ = create_network_from_weights(multiplier, file, None, tes, unet, weights_sd=sd,
                                                     for_inference=True)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        for a in network.loras:
            a.to(a.layer.weight.device)
        network.requires_grad_(False)
        handle = LoadedFile(self, file, network, multiplier)
        handle._hook()
        self.loaded.append(handle)
        return handle

    def _later(self, order: List[LoadedFile], h: LoadedFile) -> List[LoadedFile]:
        return order[order.index(h) + 1:]

    def _merge(self, h: LoadedFile) -> None:
        if h not in self.loaded:
            raise ValueError(f"{h.file}: was removed")
        if not h.merged:
            h._bake()
            self._merged.append(h)

    def _unmerge(self, h: LoadedFile) -> None:
        if not h.merged:
            return
        later = self._later(self._merged, h)
        for x in reversed(later):
            x._restore()
        h._restore()
        self._merged.remove(h)
        for x in later:
            x._bake()

    def remove(self, h: LoadedFile) -> None:
        """Unmerge (if merged) and unhook one file; the others stay as they were."""
        if h not in self.loaded:
            return
        self._unmerge(h)
        later = self._later(self.loaded, h)
        for x in reversed(later):
            x._unhook()
        h._unhook()
        self.loaded.remove(h)
        for x in later:
            x._hook()

    def remove_all(self) -> None:
        for h in reversed(list(self.loaded)):
            self.remove(h)

    def __iter__(self):
        return iter(list(self.loaded))

    def __len__(self) -> int:
        return len(self.loaded)


__all__ = ["LoadedFile", "LycorisAdapters", "rename_for", "unet_aliases"]
