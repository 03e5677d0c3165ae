"""Files: atomic safetensors save with kohya's metadata and A1111's hashes, and loading. What a file's
tensors mean (algorithm, layout, deltas) is lycoris_kohya.specs' business."""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch

DATA_HASH_BLOCK = 1024 * 1024
FORBIDDEN_METADATA = ("lora_adapter_metadata",)  # makes diffusers treat the file as a peft adapter


# ----- hashes (as sd-scripts' library/train_util.precalculate_safetensors_hashes) -----------------
def _data_part(blob: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    return blob[8 + n:]


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash): sha256 of the data part of the file serialised with
    only the ``ss_*`` metadata, and sha256 of 64 KiB at offset 1 MiB of those bytes (first 8 hex)."""
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save(dict(tensors), ss)  # an empty dict, not None, as sd-scripts passes: it changes the header
    model_hash = hashlib.sha256(_data_part(blob)).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


# ----- atomic writes ---------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask. Read from /proc where it exists (Linux): os.umask can only be read by
    setting it, which briefly changes it for every thread of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_target(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; on success it is fsynced, given the mode an
    ordinary ``open(path, "w")`` would give it (0o666 minus the umask: 0644 under umask 022) or the
    mode of the file it replaces (mkstemp's own 0600 would hide the file from a UI running as
    another user), and renamed over ``path``; on any error removed: a crash or an error never
    leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see atomic_target)."""
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def non_finite(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """Keys of the tensors holding a NaN or an Inf, in order (one device sync per device)."""
    by_device: Dict[torch.device, List[str]] = {}
    for k, t in tensors.items():
        by_device.setdefault(t.device, []).append(k)
    bad = set()
    for keys in by_device.values():
        ok = torch.stack([torch.isfinite(tensors[k]).all() for k in keys]).cpu()
        bad.update(k for k, good in zip(keys, ok.tolist()) if not good)
    return [k for k in tensors if k in bad]


def save_weights(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write tensors (and, for .safetensors, metadata with the sshs hashes) atomically. A tensor
    holding NaN or Inf is refused before anything is written: the previous file stays as it was."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    bad = non_finite(tensors)
    if bad:
        raise ValueError(f"refusing to write {path}: {bad[0]} holds NaN or Inf"
                         + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                         + "; the previous file, if any, is unchanged")
    if os.path.splitext(path)[1].lower() != ".safetensors":
        import io

        buf = io.BytesIO()
        torch.save(tensors, buf)
        write_atomic(path, buf.getvalue())
        return
    from safetensors.torch import save

    meta: Dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if k in FORBIDDEN_METADATA:
            continue
        meta[str(k)] = v if isinstance(v, str) else str(v)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
    write_atomic(path, save(tensors, meta))


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of any other file as a weights-only torch file
    (``torch.load(weights_only=True)``: tensors only, no code). Every error names the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if os.path.splitext(path)[1].lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors' errors do not say which file
            raise ValueError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message first advises weights_only=False (running the file's code); keep its reason
        text = str(e)
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        first = " ".join(text.split()) or type(e).__name__
        raise ValueError(f"{path}: cannot be loaded as a weights-only torch file (tensors only, "
                         f"torch.load(weights_only=True)): {first}") from e
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return dict(sd)


def load_metadata(path: str) -> Dict[str, str]:
    """The ``__metadata__`` of a .safetensors file ({} for other formats)."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})
