"""A base model's weights as our modules see them: lora name -> weight, read from and written to a
diffusers folder (``unet/``, ``text_encoder/``, ``text_encoder_2/``; other parts are copied) or a
single-file SD1/SD2/SDXL checkpoint with original (ldm/sgm) keys, or a DiT's single file (Flux, SD3,
musubi-tuner's families). See keymap.py for the names."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from .. import weights as wio
from ..targets import TE_PREFIX, UNET_PREFIX
from . import keymap
from .common import ToolError, UsageError, not_readable

LDM_UNET = "model.diffusion_model."
SINGLE = "model"  # the one store of a single-file checkpoint
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
               "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Slot:
    """Where one module's base weight lives."""

    store: str  # "unet" / "text_encoder" / "text_encoder_2", or SINGLE
    key: str
    chunk: Optional[Tuple[int, int]] = None  # (i, n): the i-th of n equal row blocks (fused q/k/v)
    transposed: bool = False


def _read(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with training objects
        raise ToolError(f"{path}: cannot be read as plain tensors ({type(e).__name__}: {e}); "
                        f"convert it to .safetensors first") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


class Store:
    """Tensors by key. safetensors files are read only when a tensor is asked for (shapes come from
    their headers); tensors that were set are held in memory."""

    def __init__(self):
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._where: Dict[str, object] = {}  # key -> open safetensors handle
        self._held: Dict[str, torch.Tensor] = {}

    def add_file(self, path: str) -> List[str]:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                handle = safe_open(path, "pt")
            except Exception:
                raise ToolError(not_readable(path)) from None
            keys = list(handle.keys())
            for k in keys:
                self._where[k] = handle
                self._shapes[k] = tuple(handle.get_slice(k).get_shape())
            return keys
        sd = _read(path)
        for k, v in sd.items():
            self[k] = v
        return list(sd)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._held:
            return self._held[key]
        return self._where[key].get_tensor(key)

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._held[key] = value
        self._shapes[key] = tuple(value.shape)

    def dim(self, key: str) -> int:
        return len(self._shapes[key])

    def held(self, key: str) -> bool:
        return key in self._held


def _write(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Atomic write of a safetensors or torch file."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with wio.atomic_target(path) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(tensors, tmp, dict(metadata) if metadata else None)
        else:
            torch.save(tensors, tmp)


def _component_files(folder: str) -> List[str]:
    for name in INDEX_FILES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    for name in WEIGHT_FILES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return [p]
    raise ToolError(f"{folder}: no weights file ({', '.join(WEIGHT_FILES[:2])}, ...)")


def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isdir(os.path.join(path, "unet"))
                                    or os.path.isdir(os.path.join(path, "text_encoder")))


class Checkpoint:
    """Base weights by our module names; ``weight``/``set_weight`` in fp32, ``save`` atomically."""

    def __init__(self, path: str):
        self.path = path
        self.stores: Dict[str, Store] = {}
        self.files: Dict[str, List[Tuple[str, List[str]]]] = {}  # store -> [(file, its keys)]
        self.metadata: Dict[str, str] = {}
        if is_diffusers_folder(path):
            self.kind = "diffusers"
            self._load_folder()
        elif os.path.isfile(path):
            self.kind = "single"
            self._load_single()
        elif os.path.isdir(path):
            raise ToolError(f"{path}: a folder without unet/ or text_encoder/ (not a diffusers model)")
        else:
            raise ToolError(f"{path}: no such file or folder")
        self.slots: Dict[str, Slot] = {}
        self.aliases: Dict[str, str] = {}  # other spellings of a name -> the name
        self._owned: set = set()  # (store, key) of tensors already copied for in-place row writes
        if self.kind == "diffusers":
            self._map_folder()
        else:
            self._map_single()
        if not self.slots:
            raise ToolError(f"{path}: no U-Net or text encoder weights found")

    # ----- loading -------------------------------------------------------------------------------
    def _load_folder(self) -> None:
        for comp in COMPONENTS:
            folder = os.path.join(self.path, comp)
            if not os.path.isdir(folder):
                continue
            sd = Store()
            self.files[comp] = [(f, sd.add_file(f)) for f in _component_files(folder)]
            self.stores[comp] = sd

    def _load_single(self) -> None:
        sd = self.stores[SINGLE] = Store()
        self.files[SINGLE] = [(self.path, sd.add_file(self.path))]
        if self.path.endswith(".safetensors"):
            self.metadata = wio.load_metadata(self.path)

    # ----- names ---------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """"sdxl", "sd" (SD1/SD2: the same key conventions) or "dit" (a DiT's single file)."""
        return self._family

    def _add(self, name: str, slot: Slot, *aliases: Optional[str]) -> None:
        self.slots[name] = slot
        for a in aliases:
            if a and a != name:
                self.aliases[a] = name

    def _add_unet(self, store: str, keys: Store, strip: str, diffusers: bool) -> None:
        paths = [k[len(strip):-len(".weight")] for k in keys
                 if k.startswith(strip) and k.endswith(".weight") and keys.dim(k) in (2, 4)]
        if not paths:
            return
        all_paths = [k[len(strip):] for k in keys if k.startswith(strip)]
        pmap = (keymap.unet_map_from_diffusers if diffusers else keymap.unet_map_from_ldm)(all_paths)
        for p in paths:
            ldm, hf = (pmap.to_ldm(p), p) if diffusers else (p, pmap.to_diffusers(p))
            ldm_name = ldm and keymap.lora_name(UNET_PREFIX, ldm)
            hf_name = hf and keymap.lora_name(UNET_PREFIX, hf)
            # SDXL files use sd-scripts' ldm paths, SD1/SD2 files diffusers' paths; accept both
            first, second = (ldm_name, hf_name) if self._family == "sdxl" else (hf_name, ldm_name)
            self._add(first or second, Slot(store, strip + p + ".weight"), second)

    def _add_clip(self, store: str, keys: Store, strip: str, prefix: str) -> None:
        for k in keys:
            if not (k.startswith(strip) and k.endswith(".weight") and keys.dim(k) == 2) or "embeddings." in k:
                continue
            path = keymap.canonical_clip_key(k[len(strip):])[:-len(".weight")]
            self._add(keymap.lora_name(prefix, path), Slot(store, k))

    def _add_openclip(self, keys: Store, strip: str, prefix: str, drop_last: bool) -> None:
        layers = {int(k[len(strip):].split(".")[2]) for k in keys if k.startswith(strip + "transformer.resblocks.")}
        last = max(layers) if layers else -1
        for k in keys:
            if not k.startswith(strip):
                continue
            rest = k[len(strip):]
            if drop_last and (rest == "text_projection" or rest.startswith(f"transformer.resblocks.{last}.")):
                continue  # SD2 uses the penultimate layer: the transformers model has neither
            for path, chunk, transposed in keymap.openclip_paths(rest):
                self._add(keymap.lora_name(prefix, path), Slot(SINGLE, k, chunk, transposed))

    def _map_folder(self) -> None:
        unet = self.stores.get("unet", Store())
        self._family = "sdxl" if ("text_encoder_2" in self.stores or "add_embedding.linear_1.weight" in unet) else "sd"
        self._add_unet("unet", unet, "", diffusers=True)
        tes = [c for c in ("text_encoder", "text_encoder_2") if c in self.stores]
        prefixes = {"text_encoder": TE_PREFIX + ("1" if self._family == "sdxl" else ""), "text_encoder_2": TE_PREFIX + "2"}
        for comp in tes:
            self._add_clip(comp, self.stores[comp], "", prefixes[comp])

    def _map_dit(self, keys: Store) -> None:
        """A DiT's single file (musubi-tuner's, sd-scripts' Flux/SD3, with or without ComfyUI's
        model.diffusion_model. prefix): every 2-D or 4-D weight, named as musubi's and sd-scripts'
        LoRAs name them, lora_unet_ + its key path with dots as underscores."""
        strip = LDM_UNET if any(k.startswith(LDM_UNET) for k in keys) else ""
        for k in keys:
            if k.startswith(strip) and k.endswith(".weight") and keys.dim(k) in (2, 4):
                self._add(keymap.lora_name(UNET_PREFIX, k[len(strip):-len(".weight")]), Slot(SINGLE, k))

    def _map_single(self) -> None:
        sd = self.stores[SINGLE]
        if not any(k.startswith((LDM_UNET + "input_blocks.", "cond_stage_model.", "conditioner.")) for k in sd):
            self._family = "dit"
            self._map_dit(sd)
            return
        sdxl = any(k.startswith(("conditioner.embedders.1.", LDM_UNET + "label_emb.")) for k in sd)
        self._family = "sdxl" if sdxl else "sd"
        self._add_unet(SINGLE, sd, LDM_UNET, diffusers=False)
        if sdxl:
            self._add_clip(SINGLE, sd, "conditioner.embedders.0.transformer.", TE_PREFIX + "1")
            self._add_openclip(sd, "conditioner.embedders.1.model.", TE_PREFIX + "2", drop_last=False)
        else:
            self._add_clip(SINGLE, sd, "cond_stage_model.transformer.", TE_PREFIX)
            self._add_openclip(sd, "cond_stage_model.model.", TE_PREFIX, drop_last=True)

    def resolve(self, name: str) -> Optional[str]:
        """Our name for a module name in either spelling, or None if the model has no such layer."""
        if name in self.slots:
            return name
        return self.aliases.get(name)

    def names(self) -> List[str]:
        return list(self.slots)

    # ----- weights -------------------------------------------------------------------------------
    def _stored(self, name: str) -> torch.Tensor:
        s = self.slots[name]
        t = self.stores[s.store][s.key]
        if s.chunk is not None:
            i, n = s.chunk
            rows = t.shape[0] // n
            t = t[i * rows:(i + 1) * rows]
        return t.T if s.transposed else t

    def shape(self, name: str) -> Tuple[int, ...]:
        """The weight's shape, from the file header (nothing is read)."""
        s = self.slots[name]
        shape = list(self.stores[s.store]._shapes[s.key])
        if s.chunk is not None:
            shape[0] //= s.chunk[1]
        return tuple(reversed(shape)) if s.transposed else tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._stored(name).dtype

    def weight(self, name: str) -> torch.Tensor:
        """The current weight, in fp32."""
        return self._stored(name).float()

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        """Replace a weight (stored at once in the tensor's own dtype: to round once, do every
        change of a layer in fp32 first, as merge does)."""
        if tuple(w.shape) != self.shape(name):
            raise ValueError(f"{name}: new weight {list(w.shape)} for a weight of {list(self.shape(name))}")
        s = self.slots[name]
        store = self.stores[s.store]
        t = store[s.key]
        v = (w.T if s.transposed else w).detach().to("cpu", t.dtype)
        if s.chunk is None:
            store[s.key] = v.contiguous()
            return
        if (s.store, s.key) not in self._owned:
            t = t.clone()
            store[s.key] = t
            self._owned.add((s.store, s.key))
        i, n = s.chunk
        rows = t.shape[0] // n
        t[i * rows:(i + 1) * rows] = v

    def _tensors(self, store: str, keys: List[str], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        out = {}
        for k in keys:
            t = self.stores[store][k]
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    # ----- saving --------------------------------------------------------------------------------
    def save(self, out: str, dtype: Optional[torch.dtype] = None, metadata: Optional[Mapping[str, str]] = None,
             force: bool = False) -> None:
        """Write the model with every set_weight applied (floating tensors cast to ``dtype`` if
        given), in the input's form: a single file, or a new diffusers folder (the other parts
        copied). Atomic: a file is renamed into place; a folder is built beside ``out`` and renamed.
        An existing ``out`` is replaced only with ``force`` (a folder only if it is a diffusers model),
        and never when it is the input."""
        if os.path.exists(out) and os.path.exists(self.path) and os.path.samefile(out, self.path):
            raise UsageError(f"--out {out}: the output must not be the input model")
        if os.path.lexists(out) and not force:
            raise UsageError(f"--out {out}: already exists; add --force to replace it")
        if self.kind == "single":
            if os.path.isdir(out):
                raise UsageError(f"--out {out}: is a folder; the input is a single file, give a file name")
            meta = dict(self.metadata)
            meta.update(metadata or {})
            _write(out, self._tensors(SINGLE, list(self.stores[SINGLE]), dtype),
                   meta if out.endswith(".safetensors") else None)
            return
        if os.path.lexists(out) and not is_diffusers_folder(out):
            raise UsageError(f"--out {out}: exists and is not a diffusers model folder; "
                             f"not replaced, even with --force")
        parent = os.path.dirname(os.path.abspath(out))
        tmp = tempfile.mkdtemp(prefix=".tmp-", suffix=os.path.basename(out), dir=parent)
        try:
            shutil.rmtree(tmp)
            shutil.copytree(self.path, tmp, ignore=self._ignore_weights)
            for store, parts in self.files.items():
                for file, keys in parts:
                    rel = os.path.relpath(file, self.path)
                    _write(os.path.join(tmp, rel), self._tensors(store, keys, dtype))
            if os.path.lexists(out):  # --force: the old folder goes only once the new one is complete
                old = tempfile.mkdtemp(prefix=".old-", suffix=os.path.basename(out), dir=parent)
                os.rmdir(old)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _ignore_weights(self, folder: str, names: List[str]) -> List[str]:
        written = {os.path.abspath(f) for parts in self.files.values() for f, _ in parts}
        return [n for n in names if os.path.abspath(os.path.join(folder, n)) in written]

    def items(self) -> Iterator[Tuple[str, Slot]]:
        return iter(self.slots.items())


def parse_dtype(value: Optional[str]) -> Optional[torch.dtype]:
    if value is None:
        return None
    if value not in DTYPES:
        raise UsageError(f"--dtype {value!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[value]


def dtype_name(dtype: torch.dtype) -> str:
    """--dtype's name of a dtype (fp16, bf16, fp32)."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).replace("torch.", ""))
