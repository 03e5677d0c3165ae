"""Files: atomic safetensors save with kohya's metadata and A1111's hashes, and loading. What a file's
tensors mean (algorithm, layout, deltas) is lycoris_kohya.specs' business."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Dict, Iterator, Mapping, Optional, Tuple

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
    blob = save(dict(tensors), ss or None)
    model_hash = hashlib.sha256(_data_part(blob)).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


# ----- atomic writes ---------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_target(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; on success it is fsynced and renamed over
    ``path``, on any error removed: a crash or an error never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file gets the usual permissions
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


def save_weights(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
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
    if os.path.splitext(path)[1].lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_metadata(path: str) -> Dict[str, str]:
    """The ``__metadata__`` of a .safetensors file ({} for other formats)."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})
