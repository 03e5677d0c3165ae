"""What the subcommands share: errors, reading and writing adapter files, progress bars."""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterable, Mapping, Optional, Tuple, TypeVar

import torch

from .. import specs as sp
from .. import weights as wio

T = TypeVar("T")


class ToolError(Exception):
    """A user-facing error: printed as one line naming the file, module or value."""


def progress(items: Iterable[T], desc: str, total: Optional[int] = None) -> Iterable[T]:
    """tqdm on stderr when it is a terminal (quiet in pipes and tests)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bare environment still works
        return items
    return tqdm(items, desc=desc, total=total, unit="module", disable=None, file=sys.stderr, leave=False)


def load_adapter_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(state dict, metadata) of an adapter file, with errors naming the file."""
    if not os.path.isfile(path):
        raise ToolError(f"{path}: no such file")
    try:
        sd = wio.load_state_dict(path)
        meta = wio.load_metadata(path)
    except Exception as e:
        raise ToolError(f"{path}: not a readable .safetensors/.pt file ({type(e).__name__}: {e})") from None
    if not sd:
        raise ToolError(f"{path}: holds no tensors")
    return sd, meta


def read_adapter(path: str, shapes=None) -> Tuple[Dict[str, sp.StoredModule], Dict[str, str]]:
    """The modules (and metadata) of an adapter file; errors name the file and the module."""
    sd, meta = load_adapter_file(path)
    try:
        modules = sp.read_modules(sd, shapes)
    except ValueError as e:
        raise ToolError(f"{path}: {e}") from None
    return modules, meta


def parse_file_multiplier(arg: str) -> Tuple[str, float]:
    """``FILE`` or ``FILE:M`` (a path that itself has a colon works when it exists as given)."""
    if os.path.exists(arg) or ":" not in arg:
        return arg, 1.0
    path, _, m = arg.rpartition(":")
    try:
        return path, float(m)
    except ValueError:
        raise ToolError(f"{arg}: expected FILE or FILE:MULTIPLIER (a number after the colon)") from None


def save_adapter(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Atomic save with kohya's hashes (weights.save_weights)."""
    if not path.endswith((".safetensors", ".pt", ".pth", ".bin")):
        raise ToolError(f"{path}: the output should end in .safetensors")
    if os.path.isdir(path):
        raise ToolError(f"{path}: is a folder")
    wio.save_weights(path, tensors, {k: v for k, v in metadata.items() if not k.startswith("sshs_")})


def check_rank(rank: Optional[int], flag: str = "--rank") -> Optional[int]:
    if rank is not None and rank < 1:
        raise ToolError(f"{flag} {rank}: a rank must be at least 1")
    return rank


def module_tensors(name: str, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for k, v in tensors.items()}
