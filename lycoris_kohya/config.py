"""network_args -> a typed, validated NetworkConfig.

sd-scripts hands ``--network_args "k=v" ...`` over as strings (``{"dora_wd": "True"}``), and a few
native values (``dropout`` may be None or a float). Both parse here, once, at the door; an unknown
key or a bad value is an error that names the key and what is accepted.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .algos import ALGORITHMS
from .algos.paths import FORWARD_PATHS

logger = logging.getLogger(__name__)

ALGOS = tuple(ALGORITHMS)
ALGO_ALIASES = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr"}

_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f"}
_NONE = {"none", "null", ""}


class ConfigError(ValueError):
    """A network_arg that cannot be used; the message names it."""


def _named(key: str, v: Any) -> str:
    """How a value is named in a message: as the user wrote it, a trainer flag (``--network_dim 0``)
    or a network_arg (``network_arg factor=0``)."""
    return f"{key} {v!r}" if key.startswith("--") else f"network_arg {key}={v!r}"


def parse_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise ConfigError(f"{_named(key, v)} is not a boolean; use one of true/false, 1/0, yes/no")


def _is_none(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in _NONE)


def parse_number(key: str, v: Any, kind: type, minimum: Optional[float] = None, below: Optional[float] = None,
                 optional: bool = False):
    if optional and _is_none(v):
        return None
    try:
        if isinstance(v, bool):
            raise ValueError
        x = float(v)
        if kind is int:
            if x != int(x):
                raise ValueError
            x = int(x)
    except (TypeError, ValueError):
        raise ConfigError(f"{_named(key, v)} is not {'an integer' if kind is int else 'a number'}") from None
    if minimum is not None and x < minimum:
        raise ConfigError(f"{_named(key, v)} must be >= {minimum:g}")
    if below is not None and not x < below:
        raise ConfigError(f"{_named(key, v)} must be < {below:g}")
    return x


@dataclass(frozen=True)
class NetworkConfig:
    """Every option of the network, typed. Field metadata says which algorithms it applies to."""

    algo: str = "locon"
    dim: int = 4
    alpha: float = 1.0
    conv_dim: Optional[int] = None  # None: same as dim; 0: kxk convs get no adapter
    conv_alpha: Optional[float] = None  # None: same as alpha
    dropout: Optional[float] = None
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    use_tucker: bool = False
    use_scalar: bool = False
    rs_lora: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    unbalanced_factorization: bool = False
    dora_wd: bool = False
    wd_on_output: bool = False
    dora_detach_norm: bool = False
    bypass_mode: bool = False
    forward_path: str = "auto"  # auto (cost model per layer and call), fold, structured
    train_norm: bool = False
    loraplus_lr_ratio: Optional[float] = None
    loraplus_unet_lr_ratio: Optional[float] = None
    loraplus_text_encoder_lr_ratio: Optional[float] = None
    preset: str = "default"
    # block-wise control, as kohya's networks.lora (25 blocks for SD1/2, 23 for SDXL)
    block_dims: Optional[Tuple[int, ...]] = None
    block_alphas: Optional[Tuple[float, ...]] = None
    conv_block_dims: Optional[Tuple[int, ...]] = None
    conv_block_alphas: Optional[Tuple[float, ...]] = None
    down_lr_weight: Optional[Union[str, Tuple[float, ...]]] = None
    mid_lr_weight: Optional[Tuple[float, ...]] = None
    up_lr_weight: Optional[Union[str, Tuple[float, ...]]] = None
    block_lr_zero_threshold: float = 0.0

    @property
    def effective_conv_dim(self) -> int:
        return self.dim if self.conv_dim is None else self.conv_dim

    @property
    def effective_conv_alpha(self) -> float:
        return self.alpha if self.conv_alpha is None else self.conv_alpha

    @property
    def dora_axis(self) -> Optional[str]:
        if not self.dora_wd:
            return None
        return "output" if self.wd_on_output else "input"

    def replace(self, **kw) -> "NetworkConfig":
        return dataclasses.replace(self, **kw)


# aliases: key -> (canonical key, value transform)
_ALIASES = {
    "use_cp": ("use_tucker", None),
    "use_conv_cp": ("use_tucker", None),
    "disable_conv_cp": ("use_tucker", lambda b: not b),  # True disables Tucker
}
# create_network's own arguments, which sd-scripts fills from its options: as network_args they would
# make the network disagree with what sd-scripts records (ss_network_dim, ss_network_alpha)
_OWN_ARGUMENTS = {"network_dim": "--network_dim", "network_alpha": "--network_alpha", "dim": "--network_dim",
                  "alpha": "--network_alpha", "neuron_dropout": "--network_dropout (or network_args dropout=)"}
#: in a preset override these name the override's own dim/alpha/dropout (nothing to disagree with)
_OVERRIDE_ALIASES = {"network_dim": ("dim", None), "network_alpha": ("alpha", None),
                     "neuron_dropout": ("dropout", None)}

_BOOL = {f.name for f in fields(NetworkConfig) if f.type in ("bool", bool)}
_DROPOUTS = ("dropout", "rank_dropout", "module_dropout")
_RATIOS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
ACCEPTED = sorted(({f.name for f in fields(NetworkConfig)} | set(_ALIASES)) - set(_OWN_ARGUMENTS))


def _parse_one(key: str, v: Any, label: Optional[str] = None) -> Any:
    label = label or key
    if key in _BOOL:
        return parse_bool(label, v)
    if key == "algo":
        s = str(v).strip().lower()
        if s not in ALGO_ALIASES:
            raise ConfigError(f"network_arg {label}={v!r} is not supported; accepted: {', '.join(sorted(ALGO_ALIASES))}")
        return ALGO_ALIASES[s]
    if key == "dim":
        return parse_number(label, v, int, minimum=1)
    if key == "conv_dim":
        return parse_number(label, v, int, minimum=0, optional=True)
    if key == "alpha":
        return parse_number(label, v, float, minimum=0)
    if key == "conv_alpha":
        return parse_number(label, v, float, minimum=0, optional=True)
    if key in _DROPOUTS:
        x = parse_number(label, v, float, minimum=0, below=1, optional=True)
        return None if not x else x
    if key in _RATIOS:
        return parse_number(label, v, float, minimum=0, optional=True)
    if key == "factor":
        x = parse_number(label, v, int)
        if x == 0 or x < -1:
            raise ConfigError(f"network_arg {label}={v!r} must be -1 (most balanced) or a positive integer")
        return x
    if key == "preset":
        return str(v)
    if key == "forward_path":
        s = str(v).strip().lower()
        if s not in FORWARD_PATHS:
            raise ConfigError(f"network_arg {label}={v!r}; accepted: {', '.join(FORWARD_PATHS)}")
        return s
    if key in ("block_dims", "conv_block_dims"):
        return _parse_list(label, v, int, 0)
    if key in ("block_alphas", "conv_block_alphas", "mid_lr_weight"):
        return _parse_list(label, v, float, 0)
    if key in ("down_lr_weight", "up_lr_weight"):
        if isinstance(v, str) and "," not in v:
            name = v.split("+")[0].strip()
            if name not in LR_WEIGHT_CURVES:
                raise ConfigError(f"network_arg {label}={v!r}: use a comma-separated list or one of "
                                  f"{', '.join(LR_WEIGHT_CURVES)} (optionally +offset, e.g. sine+0.1)")
            if "+" in v:
                parse_number(label, v.split("+", 1)[1], float)
            return v.strip()
        return _parse_list(label, v, float, 0)
    if key == "block_lr_zero_threshold":
        return parse_number(label, v, float, minimum=0)
    raise ConfigError(f"unknown network_arg {key!r}")  # pragma: no cover - guarded by caller


LR_WEIGHT_CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def _parse_list(label: str, v: Any, kind: type, minimum: float) -> Optional[tuple]:
    """A comma-separated string ("4,4,8") or a TOML list; empty entries are 0, as kohya reads them."""
    if _is_none(v):
        return None
    items = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else [v]
    out = []
    for i, item in enumerate(items):
        item = 0 if isinstance(item, str) and not item.strip() else item
        out.append(parse_number(f"{label}[{i}]", item, kind, minimum=minimum))
    return tuple(out)


def did_you_mean(key: str, accepted) -> str:
    """' (did you mean 'factor'?)' for a close key, else ''."""
    close = difflib.get_close_matches(str(key), list(accepted), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_config(
    network_dim: Any = None,
    network_alpha: Any = None,
    neuron_dropout: Any = None,
    kwargs: Optional[Mapping[str, Any]] = None,
) -> NetworkConfig:
    """Build the config from create_network's arguments. Positional dim/alpha may be None
    (sd-scripts' defaults then apply: dim 4, alpha 1)."""
    values: Dict[str, Any] = {}
    if not _is_none(network_dim):
        values["dim"] = _parse_one("dim", network_dim, "--network_dim")
    if not _is_none(network_alpha):
        values["alpha"] = _parse_one("alpha", network_alpha, "--network_alpha")
    if not _is_none(neuron_dropout):
        values["dropout"] = _parse_one("dropout", neuron_dropout, "--network_dropout")

    seen_from: Dict[str, str] = {}
    for raw_key, v in (kwargs or {}).items():
        if raw_key in _OWN_ARGUMENTS:
            raise ConfigError(f"network_arg {raw_key}={v!r} is not accepted: it is sd-scripts' own option; use "
                              f"{_OWN_ARGUMENTS[raw_key]} instead (as a network_arg it would disagree with the "
                              "value sd-scripts records in the file's metadata)")
        key, transform = _ALIASES.get(raw_key, (raw_key, None))
        if key not in {f.name for f in fields(NetworkConfig)}:
            raise ConfigError(f"unknown network_arg {raw_key!r}{did_you_mean(raw_key, ACCEPTED)}; "
                              f"accepted: {', '.join(ACCEPTED)}")
        if key == "dropout" and _is_none(v):
            continue  # sd-scripts always passes dropout=<--network_dropout>, often None
        x = _parse_one(key, v, raw_key)
        if transform is not None:
            x = transform(x)
        if key in seen_from and values.get(key) != x and seen_from[key] != raw_key:
            raise ConfigError(f"network_args {seen_from[key]!r} and {raw_key!r} disagree")
        seen_from[key] = raw_key
        values[key] = x
    cfg = NetworkConfig(**values)
    validate(cfg, given=set(values))
    return cfg


#: options that mean something for some algorithms only
ALGO_ONLY = {"factor": ("lokr",), "decompose_both": ("lokr",), "full_matrix": ("lokr",),
             "unbalanced_factorization": ("lokr",)}
#: what a preset's per-class / per-path override may set
OVERRIDABLE = ("algo", "dim", "alpha", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
               "use_tucker", "use_scalar", "rs_lora", "factor", "decompose_both", "full_matrix",
               "unbalanced_factorization", "dora_wd", "wd_on_output")


def parse_overrides(where: str, raw: Mapping[str, Any]) -> Dict[str, Any]:
    """A preset's override table ({"algo": "lokr", "dim": 8, ...}) -> typed values. In an override,
    dim/alpha apply to the matched layers whatever their kind (also kxk convs)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table of options, got {raw!r}")
    out: Dict[str, Any] = {}
    for raw_key, v in raw.items():
        key, transform = {**_ALIASES, **_OVERRIDE_ALIASES}.get(raw_key, (raw_key, None))
        if key not in OVERRIDABLE:
            raise ConfigError(f"{where}: option {raw_key!r} cannot be set per module"
                              f"{did_you_mean(raw_key, OVERRIDABLE)}; accepted: {', '.join(OVERRIDABLE)}")
        x = _parse_one(key, v, f"{where}.{raw_key}")
        out[key] = transform(x) if transform else x
    if "algo" in out:  # an override that names its algorithm is checked now, matched or not
        validate(NetworkConfig(algo=out["algo"]), given=set(out) & set(ALGO_ONLY), where=where)
    if "dim" in out and "conv_dim" not in out:
        out["conv_dim"] = out["dim"]
    if "alpha" in out and "conv_alpha" not in out:
        out["conv_alpha"] = out["alpha"]
    return out


def validate(cfg: NetworkConfig, given=(), where: str = "") -> None:
    """The rules every config obeys; ``given``: the keys set explicitly (only those can be misplaced).
    ``where`` names a preset override (file and pattern): its effective config is checked with the
    same rules and messages, prefixed by it."""
    def error(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}" if where else msg)

    if cfg.algo not in ALGOS:
        raise error(f"network_arg algo={cfg.algo!r}; accepted: {', '.join(ALGOS)}")
    for key, algos in ALGO_ONLY.items():
        if key in given and cfg.algo not in algos:
            raise error(f"network_arg {key} applies to algo={'/'.join(algos)} only, not algo={cfg.algo}")
    for key in ("wd_on_output", "dora_detach_norm"):
        if key in given and getattr(cfg, key) and not cfg.dora_wd:
            logger.warning(f"{where + ': ' if where else ''}network_arg {key} has no effect without dora_wd=True")
    if (cfg.block_alphas is not None and cfg.block_dims is None) or \
            (cfg.conv_block_alphas is not None and cfg.conv_block_dims is None):
        raise error("network_args block_alphas / conv_block_alphas need block_dims / conv_block_dims")
    if cfg.bypass_mode and cfg.dora_wd:
        raise error("network_args bypass_mode and dora_wd cannot be combined: DoRA normalises the merged "
                          "weight W0 + g*dW, which bypass mode never forms; drop one of them")
    if cfg.train_norm:
        raise error("network_arg train_norm is not supported: it trains norm layers as full-rank "
                          "w_norm/b_norm tensors, a different algorithm this plugin does not provide")
