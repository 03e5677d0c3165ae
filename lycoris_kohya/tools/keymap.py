"""Where a module of our files lives in a base model.

Our key names (``targets.py``): ``lora_unet_<path>`` with the diffusers U-Net path for SD1/SD2
(``down_blocks_0_attentions_0_proj_in``) and sd-scripts' own, original (ldm/sgm) path for SDXL
(``input_blocks_4_1_transformer_blocks_0_attn1_to_q``); ``lora_te[1|2]_text_model_encoder_layers_...``
for the CLIP text encoders (transformers' module paths). Checkpoints spell the same weights as:
  diffusers folder   unet/ ``down_blocks.0...weight``; text_encoder[_2]/ ``[text_model.]encoder...weight``
  single file        ``model.diffusion_model.<ldm path>.weight``;
                     SD1 ``cond_stage_model.transformer.<HF CLIP>``, SDXL TE1 ``conditioner.embedders.0.transformer.<HF CLIP>``;
                     OpenCLIP (SD2 ``cond_stage_model.model.``, SDXL TE2 ``conditioner.embedders.1.model.``):
                     ``transformer.resblocks.N.attn.in_proj_weight`` (q, k, v fused as three row blocks),
                     ``attn.out_proj``, ``mlp.c_fc`` (fc1), ``mlp.c_proj`` (fc2), ``text_projection`` (transposed).
The U-Net's ldm <-> diffusers paths follow from its layout (levels, layers per block, which levels
have attention), read off either spelling's key names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from ..targets import key_name

#: (ldm, diffusers) sub-paths of a ResNet block
RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
          ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))
#: (ldm, diffusers) paths outside the blocks
TOP = (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
       ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
       ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))


@dataclass(frozen=True)
class UNetLayout:
    levels: int
    layers_per_block: int
    down_attention: Tuple[bool, ...]
    up_attention: Tuple[bool, ...]

    @staticmethod
    def from_diffusers(paths: Iterable[str]) -> "UNetLayout":
        """From diffusers U-Net key names or module paths."""
        paths = list(paths)
        downs = {int(m.group(1)) for p in paths for m in [re.match(r"down_blocks\.(\d+)\.", p)] if m}
        if not downs:
            raise ValueError("not a diffusers U-Net: no down_blocks")
        levels = max(downs) + 1
        per = {int(m.group(1)) for p in paths for m in [re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p + ".")] if m}
        L = max(per) + 1
        return UNetLayout(
            levels, L,
            tuple(any(p.startswith(f"down_blocks.{i}.attentions.") for p in paths) for i in range(levels)),
            tuple(any(p.startswith(f"up_blocks.{i}.attentions.") for p in paths) for i in range(levels)),
        )

    @staticmethod
    def from_ldm(paths: Iterable[str]) -> "UNetLayout":
        """From ldm U-Net key names (without ``model.diffusion_model.``)."""
        paths = [p + "." for p in paths]
        inputs = {int(m.group(1)) for p in paths for m in [re.match(r"input_blocks\.(\d+)\.", p)] if m}
        ops = {int(m.group(1)) for p in paths for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.", p)] if m}
        if not inputs:
            raise ValueError("not an ldm U-Net: no input_blocks")
        levels = len(ops) + 1
        n = max(inputs) + 1
        if n % levels:
            raise ValueError(f"ldm U-Net with {n} input blocks and {levels} levels: unsupported layout")
        L = n // levels - 1

        def has(prefix: str, exclude: str = "\0") -> bool:
            return any(p.startswith(prefix) and not p.startswith(exclude) for p in paths)

        return UNetLayout(
            levels, L,
            tuple(has(f"input_blocks.{1 + i * (L + 1)}.1.") for i in range(levels)),
            tuple(has(f"output_blocks.{i * (L + 1)}.1.", f"output_blocks.{i * (L + 1)}.1.conv.") for i in range(levels)),
        )

    def prefixes(self) -> List[Tuple[str, str]]:
        """(ldm, diffusers) path prefixes of every block of this layout."""
        L = self.layers_per_block
        out: List[Tuple[str, str]] = list(TOP)

        def resnet(ldm: str, hf: str) -> None:
            out.extend((f"{ldm}.{a}", f"{hf}.{b}") for a, b in RESNET)

        for i in range(self.levels):
            for j in range(L):
                n = 1 + i * (L + 1) + j
                resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}")
                if self.down_attention[i]:
                    out.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}"))
            if i < self.levels - 1:
                out.append((f"input_blocks.{(i + 1) * (L + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
            for j in range(L + 1):
                n = i * (L + 1) + j
                resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}")
                if self.up_attention[i]:
                    out.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}"))
            if i < self.levels - 1:
                k = 2 if self.up_attention[i] else 1
                out.append((f"output_blocks.{i * (L + 1) + L}.{k}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
        resnet("middle_block.0", "mid_block.resnets.0")
        out.append(("middle_block.1", "mid_block.attentions.0"))
        resnet("middle_block.2", "mid_block.resnets.1")
        return out


class PathMap:
    """Longest-prefix translation of dotted module paths, both ways."""

    def __init__(self, pairs: Iterable[Tuple[str, str]]):
        pairs = list(pairs)
        self._fwd: Dict[str, str] = dict(pairs)
        self._back: Dict[str, str] = {b: a for a, b in pairs}

    @staticmethod
    def _convert(path: str, table: Dict[str, str]) -> Optional[str]:
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if head in table:
                return ".".join([table[head]] + parts[n:])
        return None

    def to_diffusers(self, ldm_path: str) -> Optional[str]:
        return self._convert(ldm_path, self._fwd)

    def to_ldm(self, diffusers_path: str) -> Optional[str]:
        return self._convert(diffusers_path, self._back)


def unet_map_from_diffusers(paths: Iterable[str]) -> PathMap:
    return PathMap(UNetLayout.from_diffusers(paths).prefixes())


def unet_map_from_ldm(paths: Iterable[str]) -> PathMap:
    return PathMap(UNetLayout.from_ldm(paths).prefixes())


# ----- text encoders -----------------------------------------------------------------------------
def canonical_clip_key(key: str) -> str:
    """A transformers CLIP state-dict key as transformers 4 spells it (5 drops ``text_model.``
    from CLIPTextModel)."""
    if key.startswith(("text_model.", "text_projection")):
        return key
    return "text_model." + key


_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
_OPENCLIP = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1", "mlp.c_proj.weight": "mlp.fc2"}


def openclip_paths(key: str) -> List[Tuple[str, Optional[Tuple[int, int]], bool]]:
    """The transformers module paths an OpenCLIP key (prefix removed) holds, as
    ``(path, (block, of n row blocks) or None, transposed)``; [] for keys no adapter changes."""
    if key == "text_projection":
        return [("text_projection", None, True)]  # stored as x @ P: the Linear weight is P^T
    m = _RESBLOCK.match(key)
    if not m:
        return []
    layer, rest = m.group(1), m.group(2)
    base = f"text_model.encoder.layers.{layer}"
    if rest == "attn.in_proj_weight":
        return [(f"{base}.self_attn.{p}_proj", (i, 3), False) for i, p in enumerate("qkv")]
    if rest in _OPENCLIP:
        return [(f"{base}.{_OPENCLIP[rest]}", None, False)]
    return []


def lora_name(prefix: str, path: str) -> str:
    return key_name(prefix, path)
