"""Block-wise ranks, alphas and learning-rate weights, as kohya's networks.lora defines them.

SD1/2: 25 blocks: 0 (IN00, conv_in: never adapted), 1-11 down (IN01-IN11, ``3*i + j + 1`` for
``down_blocks_{i}_(resnets|attentions)_{j}``, downsamplers at ``3*i + 3``), 12 mid, 13-24 up.
SDXL (sd-scripts' own UNet): 23 blocks: 0 time/label embedding, 1-9 ``input_blocks_{n}``,
10-12 ``middle_block_{n}``, 13-21 ``output_blocks_{n}``, 22 ``out``.
``down_lr_weight`` / ``up_lr_weight`` have 12 (SDXL: 9) entries, ``mid_lr_weight`` 1 (SDXL: 3).
DiT models (Flux, SD3, ...) have no down/mid/up blocks: these options are refused there (refuse_on_dit);
a preset's ``name_algo_map`` / ``exclude_name`` set ranks per block path instead.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, List, Optional, Tuple, Union

from .config import ConfigError, NetworkConfig

_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def n_blocks(is_sdxl: bool) -> int:
    return 23 if is_sdxl else 25


def is_sdxl_layout(names: Iterable[str]) -> bool:
    return any(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for n in names)


def block_index(name: str, is_sdxl: bool) -> int:
    """The block a U-Net module belongs to, or -1 (not in any block)."""
    if not is_sdxl:
        m = _UPDOWN.search(name)
        if m:
            kind, i, sub, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if sub in ("upsamplers", "downsamplers") else j)
            return 1 + idx if kind == "down" else 13 + idx
        return 12 if "mid_block_" in name else -1
    if not name.startswith("lora_unet_"):
        return -1
    rest = name[len("lora_unet_"):]
    if rest.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if rest.startswith(prefix):
            return base + int(rest[len(prefix):].split("_")[0])
    return 22 if rest.startswith("out_") else -1


def _curve(name: str, n: int) -> List[float]:
    base, _, offset = name.partition("+")
    off = float(offset) if offset else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    curves = {
        "cosine": [math.sin(math.pi * r / 2) + off for r in reversed(ramp)],
        "sine": [math.sin(math.pi * r / 2) + off for r in ramp],
        "linear": [r + off for r in ramp],
        "reverse_linear": [r + off for r in reversed(ramp)],
        "zeros": [off] * n,
    }
    return curves[base]


def _fit(key: str, values: Optional[Union[str, Tuple[float, ...]]], n: int) -> List[float]:
    if values is None:
        return [1.0] * n
    values = _curve(values, n) if isinstance(values, str) else list(values)
    if len(values) > n:
        raise ConfigError(f"network_arg {key} has {len(values)} entries; this model has {n} such blocks")
    return values + [1.0] * (n - len(values))  # kohya fills missing entries with 1


def lr_weights(cfg: NetworkConfig, is_sdxl: bool) -> Optional[List[float]]:
    """The learning-rate weight of every block, or None when no lr weight is set."""
    if cfg.down_lr_weight is None and cfg.mid_lr_weight is None and cfg.up_lr_weight is None:
        return None
    n_side, n_mid = (9, 3) if is_sdxl else (12, 1)
    weights = (_fit("down_lr_weight", cfg.down_lr_weight, n_side) + _fit("mid_lr_weight", cfg.mid_lr_weight, n_mid)
               + _fit("up_lr_weight", cfg.up_lr_weight, n_side))
    weights = [w if w > cfg.block_lr_zero_threshold else 0.0 for w in weights]
    return [1.0] + weights + [1.0] if is_sdxl else weights


BLOCKWISE = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
             "mid_lr_weight", "up_lr_weight")


def refuse_on_dit(cfg: NetworkConfig, family_title: str) -> None:
    """U-Net block options mean nothing on a DiT: an error naming the option and what to use instead."""
    for key in BLOCKWISE:
        if getattr(cfg, key) is not None:
            raise ConfigError(
                f"network_arg {key} applies to the down/mid/up blocks of SD1/2 and SDXL U-Nets; {family_title} is a "
                f"DiT without them. Set ranks per block path with a preset instead, e.g. "
                f"[name_algo_map.\"double_blocks.1?.*\"] dim = 8, or leave blocks out with exclude_name")


def check_lengths(cfg: NetworkConfig, is_sdxl: bool) -> None:
    n = n_blocks(is_sdxl)
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        v = getattr(cfg, key)
        if v is not None and len(v) != n:
            raise ConfigError(f"network_arg {key} has {len(v)} entries; {'SDXL' if is_sdxl else 'SD1/2'} "
                              f"U-Nets have {n} blocks")


def block_config(cfg: NetworkConfig, idx: int) -> NetworkConfig:
    """The config of one block: its dims/alphas from the block lists (kohya: block_dims for Linear
    and 1x1, conv_block_dims for kxk convs; without conv_block_dims kxk convs keep conv_dim)."""
    if idx < 0 or cfg.block_dims is None and cfg.conv_block_dims is None:
        return cfg
    kw = {}
    if cfg.block_dims is not None:
        kw["dim"] = cfg.block_dims[idx]
        kw["alpha"] = cfg.block_alphas[idx] if cfg.block_alphas is not None else cfg.alpha
    if cfg.conv_block_dims is not None:
        kw["conv_dim"] = cfg.conv_block_dims[idx]
        kw["conv_alpha"] = cfg.conv_block_alphas[idx] if cfg.conv_block_alphas is not None else cfg.effective_conv_alpha
    elif cfg.block_dims is not None:
        kw["conv_dim"], kw["conv_alpha"] = cfg.effective_conv_dim, cfg.effective_conv_alpha
    return cfg.replace(**kw)
