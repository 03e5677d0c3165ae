"""What the subcommands share: errors, reading and writing adapter files (outputs checked before any
work: never an input, never an existing file without --force, never into a missing folder), the
metadata a written file describes itself by, summaries of per-module reports, progress bars."""
from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch

from .. import specs as sp
from .. import weights as wio
from .._version import __version__

T = TypeVar("T")
ADAPTER_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
#: the key the trainer's description of a file lives under (network.METADATA_KEY)
METADATA_KEY = "lycoris_kohya"


class ToolError(Exception):
    """A user-facing error: printed as one line naming the file, module or value (exit code 1)."""

    code = 1


class UsageError(ToolError):
    """The command line itself is wrong: a flag's value or combination, an output that would replace
    a file or an input, or land in a missing folder (exit code 2, as argparse's own errors)."""

    code = 2


def progress(items: Iterable[T], desc: str, total: Optional[int] = None) -> Iterable[T]:
    """tqdm on stderr when it is a terminal (quiet in pipes and tests)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a bare environment still works
        return items
    return tqdm(items, desc=desc, total=total, unit="module", disable=None, file=sys.stderr, leave=False)


def short(path: Optional[str]) -> Optional[str]:
    """A path as the metadata records it: the name without its folders (a shared file does not
    carry the folders of the machine that wrote it)."""
    return None if path is None else os.path.basename(os.path.normpath(str(path)))


# ----- reading ---------------------------------------------------------------------------------
def _what_it_is(path: str) -> Tuple[bool, str]:
    """(whether it is some other kind of file, what it holds) for a file that is not a readable
    adapter file, from its first bytes."""
    size = os.path.getsize(path)
    if size == 0:
        return True, "an empty file, 0 bytes"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"PK\x03\x04":
        return True, "a zip archive: a torch .pt/.ckpt file?"
    if head[:1] == b"\x80":
        return True, "a pickle: a torch file?"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 8 + n > size:
            return False, f"truncated: its header needs {8 + n:,} bytes, the file has {size:,}"
        try:
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return False, "its header is damaged"
        if 8 + n + end > size:
            return False, f"truncated: its header and tensors need {8 + n + end:,} bytes, the file has {size:,}"
        return False, "its header or data is damaged"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        words = " ".join(text.split())
        return True, f"it holds text: {words[:40]!r}{'...' if len(words) > 40 else ''}"
    return False, "binary data of an unknown format, first bytes " + head[:8].hex(" ")


def not_readable(path: str) -> str:
    """The one line saying why ``path`` is not an adapter file."""
    other, what = _what_it_is(path)
    return f"{path}: {'is not a' if other else 'not a readable'} safetensors file ({what})"


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= os.path.getsize(path)


def _folder_hint(path: str) -> str:
    files = sorted(n for n in os.listdir(path) if n.lower().endswith(ADAPTER_EXTENSIONS)
                   and os.path.isfile(os.path.join(path, n)))
    if files:
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        return f"{path}: is a folder, not a file; it holds {shown} (give one of them)"
    return f"{path}: is a folder, not a file, and holds no {'/'.join(ADAPTER_EXTENSIONS)} file"


def check_input(path: str, what: str = "file") -> None:
    """An input path exists and is a file; errors say what it is instead."""
    if os.path.isdir(path):
        raise ToolError(_folder_hint(path))
    if not os.path.exists(path):
        raise ToolError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ToolError(f"{path}: not a regular file")


def load_adapter_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(state dict, metadata) of an adapter file, with errors naming the file and saying what it is."""
    path = os.fspath(path)
    check_input(path)
    try:
        if _is_safetensors(path):
            from safetensors import safe_open
            from safetensors.torch import load_file

            sd = load_file(path)
            with safe_open(path, "pt") as f:
                meta = dict(f.metadata() or {})
        elif path.lower().endswith(".safetensors"):
            raise ToolError(not_readable(path))
        else:
            sd, meta = wio.load_state_dict(path), {}
    except ToolError:
        raise
    except Exception as e:
        other, what = _what_it_is(path)
        if what.startswith(("a zip", "a pickle")):
            text = " ".join(str(e).split(": ", 1)[-1].split())
            raise ToolError(f"{path}: a torch file that is not a plain dict of tensors ({text[:200]})") from None
        raise ToolError(not_readable(path)) from None
    if not sd:
        raise ToolError(f"{path}: holds no tensors")
    return sd, meta


#: modules of an SD U-Net, where a LoHa/LoKr module may be a convolution the file does not tell apart
SD_UNET = re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|conv_|"
                     r"time_emb|label_emb|add_embedding)")
#: modules inside a DiT's transformer blocks (sd-scripts' Flux/SD3/Lumina/..., musubi's families): Linears only
DIT_BLOCK = re.compile(r"^lora_unet_(double_blocks|single_blocks|joint_blocks|blocks|layers|transformer_blocks|"
                       r"single_transformer_blocks|noise_refiner|context_refiner|visual_transformer_blocks|"
                       r"text_transformer_blocks)_\d+_")


def linear_where_certain(modules: Mapping[str, sp.StoredModule]) -> Dict[str, sp.StoredModule]:
    """Modules whose layer the file leaves open (plain LoHa, LoKr with a factorised lokr_w2: Linear or
    convolution is not stored) shaped as Linears where that is certain: text-encoder modules (CLIP
    and T5 are adapted in their Linears only) and, in a file with no SD U-Net module, modules inside
    a DiT's transformer blocks. Others stay open (a base model tells their shape)."""
    dit = not any(SD_UNET.match(n) for n in modules)
    return {n: m.fit(m.flat) if m.weight_shape is None and m.algo != sp.DIFF and (
        n.startswith("lora_te") or (dit and DIT_BLOCK.match(n))) else m for n, m in modules.items()}


def read_adapter(path: str, shapes=None, finite: bool = True) -> Tuple[Dict[str, sp.StoredModule], Dict[str, str]]:
    """The modules (and metadata) of an adapter file, Linears shaped where certain
    (``linear_where_certain``); errors name the file and the module. With ``finite`` a tensor
    holding NaN or Inf is an error (a tool would only carry it into its output)."""
    sd, meta = load_adapter_file(path)
    if finite:
        bad = wio.non_finite(sd)
        if bad:
            more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
            raise ToolError(f"{path}: {bad[0]} holds NaN or Inf{more}; the file is damaged (a diverged training?)")
    try:
        modules = linear_where_certain(sp.read_modules(sd, shapes))
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
        raise UsageError(f"{arg}: expected FILE or FILE:MULTIPLIER (a number after the colon)") from None


# ----- writing ---------------------------------------------------------------------------------
def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_output(out: str, inputs: Sequence[Optional[str]] = (), force: bool = False, flag: str = "--out",
                 kind: str = "adapter") -> None:
    """Before any work: ``out`` is none of the inputs (nor a file inside an input folder), whatever
    --force says; it does not exist unless ``force``; its folder exists (a missing folder is an
    error, not created: a typo in it is caught). ``kind``: "adapter" (an adapter file), "file" (any
    file), "model" (a single file or a diffusers folder: an existing folder is replaced with --force
    only if it is a diffusers model)."""
    out = os.fspath(out)
    for p in inputs:
        if p is None or not os.path.exists(p):
            continue
        if _same(out, p):
            raise UsageError(f"{flag} {out}: is the input {p}; write to another file "
                             f"(an input is never replaced, even with --force)")
        if os.path.isdir(p) and os.path.lexists(out) and _inside(out, p):
            raise UsageError(f"{flag} {out}: is inside the input {p}; write outside it "
                             f"(an input is never replaced, even with --force)")
    if os.path.isdir(out) and kind != "model":
        raise UsageError(f"{flag} {out}: is a folder; give a file name")
    if kind == "adapter" and not out.lower().endswith(ADAPTER_EXTENSIONS[:4]):
        raise UsageError(f"{flag} {out}: the output should end in .safetensors")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        shown = os.path.dirname(out) or folder
        raise UsageError(f"{flag} {out}: the folder {shown} does not exist (create it first)")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{flag} {out}: already exists; add --force to replace it")


def save_adapter(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Atomic save with kohya's hashes (weights.save_weights; sshs_* are recomputed there). The
    output was checked (check_output) before the work began."""
    if not path.lower().endswith(ADAPTER_EXTENSIONS[:4]):
        raise UsageError(f"--out {path}: the output should end in .safetensors")
    if os.path.isdir(path):
        raise UsageError(f"--out {path}: is a folder; give a file name")
    wio.save_weights(path, tensors, {k: v for k, v in metadata.items() if not k.startswith("sshs_")})


def written(path: str) -> str:
    """The line every tool ends with: where it wrote and how much."""
    if os.path.isdir(path):
        return f"wrote {path} (a folder)"
    size = os.path.getsize(path)
    return f"wrote {path} ({size / 2 ** 20:.1f} MiB)" if size >= 2 ** 20 else f"wrote {path} ({size:,} bytes)"


def check_rank(rank: Optional[int], flag: str = "--rank") -> Optional[int]:
    if rank is not None and rank < 1:
        raise UsageError(f"{flag} {rank}: a rank must be at least 1")
    return rank


def module_tensors(name: str, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for k, v in tensors.items()}


def true_rank(m: sp.StoredModule) -> int:
    """The rank g*dW can have: the layout's bound (LoHa r1*r2, LoKr rank(w1)*rank(w2)), at most the
    layer's [out, in*k] (a full-matrix LoKr's stored "rank" is 1: alpha is ignored there)."""
    bound = m.rank_bound
    return min(m.flat) if bound is None else min(bound, *m.flat)


# ----- what a written file says about itself -----------------------------------------------------
#: network_args that describe the layout of the modules (recomputed or removed by a tool); the others
#: (preset, dropouts, learning-rate options, ...) say how the file was trained and are kept
_LAYOUT_ARGS = ("algo", "conv_dim", "conv_alpha", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp",
                "dora_wd", "wd_on_output", "dora_detach_norm")
_LOKR_ARGS = ("factor", "decompose_both", "full_matrix", "unbalanced_factorization")
#: true of the trained tensors only: gone once a tool refactorises a module
_TRAINED_ARGS = ("use_scalar", "rs_lora", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def layer_kind(m: sp.StoredModule) -> Optional[str]:
    """"linear", "conv1x1", "conv3x3", ... as the trainer's metadata names layers; None when the file
    does not say (a LoHa/LoKr module stored as [out, in*k*k])."""
    s = m.weight_shape
    if s is None:
        return None
    return "linear" if len(s) == 2 else "conv" + "x".join(map(str, s[2:]))


def plugin_description(modules: Mapping[str, sp.StoredModule]) -> Dict[str, object]:
    """LycorisNetwork.plugin_metadata's description, from a file's modules (the same keys)."""
    groups: Dict[str, Dict[str, object]] = {}
    prefixes: Dict[str, int] = {}
    for name, m in modules.items():
        if m.algo == sp.DIFF:
            entry = {"algo": m.algo, "layer": layer_kind(m), "dora_axis": None}
        else:
            alpha = m.alpha if m.alpha is not None else float(m.rank)
            entry = {"algo": m.algo, "layer": layer_kind(m), "rank": int(m.rank), "alpha": float(alpha),
                     "dora_axis": m.dora_axis, **m.layout.flags()}
        key = json.dumps(entry, sort_keys=True)
        groups.setdefault(key, dict(entry, modules=0))["modules"] += 1
        prefix = "_".join(name.split("_")[:2])
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
    axes = sorted({m.dora_axis for m in modules.values() if m.dora_axis is not None})
    return {
        "plugin_version": __version__,
        "algorithms": sorted({m.algo for m in modules.values()}),
        "dora_axis": None if not axes else axes[0] if len(axes) == 1 else axes,
        "modules": prefixes,
        "layouts": sorted(groups.values(), key=lambda e: (-e["modules"], json.dumps(e, sort_keys=True))),
    }


def _dim_alpha(mods: List[sp.StoredModule]) -> Optional[Tuple[str, str]]:
    """(network dim, network alpha) of modules: the largest rank, and alpha = g * dim when every
    module has the same g = alpha/rank ("Dynamic" otherwise)."""
    if not mods:
        return None
    dim = max(m.rank for m in mods)
    g0 = mods[0].scale
    if all(math.isclose(m.scale, g0, rel_tol=1e-6) for m in mods):
        return str(dim), str(float(round(g0 * dim, 6)))
    return str(dim), "Dynamic"


def _args_of(meta: Mapping[str, str]) -> Dict[str, object]:
    raw = meta.get("ss_network_args")
    try:
        args = json.loads(raw) if raw else None
    except ValueError:
        args = None
    return dict(args) if isinstance(args, dict) else {}


def tool_metadata(modules: Mapping[str, sp.StoredModule], source: Mapping[str, str], tool: str,
                  args: Sequence[object], refactorised: bool = True, dynamic: bool = False,
                  extra: Optional[Mapping[str, object]] = None) -> Dict[str, str]:
    """The metadata of a file a tool writes, describing what it now holds: the source file's keys
    (sd-scripts' ss_* training record, modelspec.*) with

    - ``lycoris_kohya``: the trainer's description (plugin_description) of the written modules, plus
      ``"tool": {"name", "args", ...}`` (paths without folders) and the ``history`` of earlier tools;
    - ``ss_network_dim`` / ``ss_network_alpha``: the largest rank of the Linear and 1x1 modules and
      alpha = g*dim (g = alpha/rank, one for all; "Dynamic" when ranks were chosen per module or g
      differs); removed when no module has a rank (only full differences);
    - ``ss_network_args``: algo, conv_dim/conv_alpha (kxk convolutions), use_tucker, dora_wd,
      wd_on_output as the modules now are (removed when they no longer apply); LoKr's options kept
      only while LoKr modules remain; use_scalar, rs_lora and per-block dims removed once a module
      was refactorised (``refactorised``); every other network_arg kept.

    sshs_* hashes are dropped here and recomputed by the save; stale tool keys (lycoris_kohya_*) go.
    """
    meta = {k: v for k, v in source.items()
            if not k.startswith(("sshs_", METADATA_KEY + "_")) and k not in (METADATA_KEY, "modelspec.hash_sha256")}
    history: List[object] = []
    try:
        old = json.loads(source.get(METADATA_KEY) or "null")
    except ValueError:
        old = None
    if isinstance(old, dict):
        history = list(old.get("history") or []) + ([old["tool"]] if old.get("tool") else [])
    desc = plugin_description(modules)
    desc["tool"] = {"name": tool, "args": [str(a) for a in args], **dict(extra or {})}
    if history:
        desc["history"] = history
    meta[METADATA_KEY] = json.dumps(desc, sort_keys=True)

    trainable = [m for m in modules.values() if m.algo != sp.DIFF]
    unknown = any(layer_kind(m) is None for m in trainable)
    with_rank = [m for m in trainable if m.layout.use_alpha]  # a full-matrix LoKr has no rank alpha divides
    kxk = [m for m in with_rank if layer_kind(m) not in (None, "linear", "conv1x1")]
    plain = [m for m in with_rank if layer_kind(m) in ("linear", "conv1x1")]
    if not unknown:  # a module the file does not say the kind of is one the tool left as it was
        for key in ("ss_network_dim", "ss_network_alpha"):
            meta.pop(key, None)
        da = _dim_alpha(plain or kxk)
        if da is not None:
            meta["ss_network_dim"], meta["ss_network_alpha"] = ("Dynamic", "Dynamic") if dynamic else da

    net_args = _args_of(source)
    for key in _LAYOUT_ARGS + (() if any(m.algo == "lokr" for m in trainable) else _LOKR_ARGS) \
            + (_TRAINED_ARGS if refactorised else ()):
        if key in ("conv_dim", "conv_alpha") and unknown:
            continue
        net_args.pop(key, None)
    algos = Counter(m.algo for m in trainable)
    if algos:
        old_algo = _args_of(source).get("algo")
        net_args["algo"] = (old_algo if len(algos) > 1 and old_algo in algos else algos.most_common(1)[0][0])
    if not unknown and kxk:
        conv = _dim_alpha(kxk)
        net_args["conv_dim"], net_args["conv_alpha"] = ("Dynamic", "Dynamic") if dynamic else conv
    if any(m.tucker for m in trainable):
        net_args["use_tucker"] = "True"
    if any(m.dora_axis for m in trainable):
        net_args["dora_wd"] = "True"
        if any(m.dora_axis == "output" for m in trainable):
            net_args["wd_on_output"] = "True"
        if "dora_detach_norm" in _args_of(source):
            net_args["dora_detach_norm"] = _args_of(source)["dora_detach_norm"]
    if net_args:
        meta["ss_network_args"] = json.dumps(net_args)
    else:
        meta.pop("ss_network_args", None)
    return meta


# ----- reports ---------------------------------------------------------------------------------
def summary(report: Mapping[str, Mapping[str, object]]) -> Dict[str, object]:
    """What a per-module report adds up to: ranks before -> after (with counts), the largest and the
    mean relative error (over modules that change something), and the exactly-zero modules."""
    pairs = Counter((e.get("rank_in"), e.get("rank")) for e in report.values())
    changing = {n: e for n, e in report.items() if not e.get("zero")}
    errors = [float(e.get("relative_error") or 0.0) for e in changing.values()]
    worst = max(changing.items(), key=lambda kv: float(kv[1].get("relative_error") or 0.0), default=(None, {}))
    return {
        "modules": len(report),
        "ranks": {f"{'-' if a is None else a} -> {'-' if b is None else b}": n for (a, b), n in pairs.most_common()},
        "max_relative_error": float(worst[1].get("relative_error") or 0.0),
        "worst_module": worst[0],
        "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
        "zero_modules": sorted(n for n, e in report.items() if e.get("zero")),
    }


def summary_lines(s: Mapping[str, object], zero_how: str) -> List[str]:
    ranks = list(s["ranks"].items())
    shown = ", ".join(f"{k} (x{n})" for k, n in ranks[:6]) + (f", {len(ranks) - 6} more" if len(ranks) > 6 else "")
    lines = [f"{s['modules']} modules; ranks {shown}",
             f"relative error ||D - D_r||/||D||: max {s['max_relative_error']:.3e}"
             + (f" ({s['worst_module']})" if s["worst_module"] and s["max_relative_error"] > 0 else "")
             + f", mean {s['mean_relative_error']:.3e}"]
    zero = s["zero_modules"]
    if zero:
        lines.append(f"{len(zero)} modules are exactly zero (g*dW = 0, layers the training never changed, e.g. "
                     f"{zero[0]}): {zero_how}")
    return lines


def over_base(path: str, name: str, m: sp.StoredModule, ckpt, base: str):
    """(the module checked against its layer in the base checkpoint, that layer's weight); errors
    name the file, the module and the base."""
    target = ckpt.resolve(name)
    if target is None:
        raise ToolError(f"{path}: module {name} has no layer in {base}")
    w0 = ckpt.weight(target)
    try:
        return m.fit(w0.shape), w0
    except ValueError as e:
        raise ToolError(f"{path}: {e} (the layer in {base} is {list(w0.shape)})") from None
