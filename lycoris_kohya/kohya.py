"""The entry points of sd-scripts (``create_network``, ``create_network_from_weights``) and of
kohya-ss/musubi-tuner (``create_arch_network``, ``create_arch_network_from_weights``):
``--network_module=lycoris_kohya`` (or ``lycoris_kohya.kohya``, the drop-in spelling for users of
``lycoris.kohya``) in either trainer."""
from __future__ import annotations

import functools
import logging

from . import specs as sp
from . import targets as tg
from . import weights as wio
from .algos.geometry import LayerGeometry
from .config import ConfigError, parse_bool, parse_config
from .network import LycorisNetwork

logger = logging.getLogger(__name__)


def _pop_train_t5xxl(kwargs) -> bool:
    """sd-scripts' Flux/SD3 network_arg: T5-XXL gets adapters only when it is true. It decides what is
    built, not how, so it is no option of the config (or of a preset)."""
    return parse_bool("train_t5xxl", kwargs.pop("train_t5xxl", False))


def create_network(multiplier, network_dim=None, network_alpha=None, vae=None, text_encoder=None, unet=None, /,
                   neuron_dropout=None, **kwargs):
    """A new network. ``text_encoder``: one module or the trainer's list (SDXL [CLIP-L, CLIP-G], Flux
    [CLIP-L, T5-XXL], SD3 [CLIP-L, CLIP-G, T5-XXL], ...); ``unet``: the U-Net or DiT. ``kwargs`` are
    sd-scripts' --network_args (strings) plus ``dropout``.

    The first six arguments are positional-only, as sd-scripts passes them: a network_arg named
    ``network_dim``/``network_alpha`` then reaches the config (which refuses it with a message)
    instead of failing with Python's "got multiple values for argument"."""
    with tg.calling_trainer(tg.SD_SCRIPTS):
        return _create(multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs)


def _said_in_one_line(fn):
    """A configuration error is logged as one line the user can act on (the trainer's traceback that
    follows ends with the same line)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            logger.error(f"lycoris_kohya: configuration error: {' '.join(str(e).split())}")
            raise
    return wrapper


@_said_in_one_line
def _create(multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs):
    misplaced = [k for k in ("vae", "text_encoder", "unet") if k in kwargs]
    if misplaced:
        raise TypeError(f"create_network takes (multiplier, network_dim, network_alpha, vae, text_encoder, unet) "
                        f"positionally, as sd-scripts calls it; got {', '.join(misplaced)} by name")
    train_t5xxl = _pop_train_t5xxl(kwargs)
    config = parse_config(network_dim, network_alpha, neuron_dropout, kwargs)
    return LycorisNetwork(text_encoder, unet, config, multiplier=multiplier, train_t5xxl=train_t5xxl)


def _warn_overridden(file, kwargs, config, algos, axes) -> None:
    """Layout options given as network_args are not used when the network is shaped like a file
    (--dim_from_weights, gen_img): say so where they disagree with the file."""
    where = "the state dict" if file is None or not isinstance(file, (str, bytes)) else str(file)
    if "algo" in kwargs and [config.algo] != algos:
        logger.warning(f"lycoris_kohya: network_arg algo={kwargs['algo']} is not used: {where} holds "
                       f"{'/'.join(algos)} modules, and the network takes its layout from the file")
    from_file = {"dora_wd": axes != ["None"], "wd_on_output": axes == ["output"]}
    for key, value in from_file.items():
        if key in kwargs and parse_bool(key, kwargs[key]) != value:
            logger.warning(f"lycoris_kohya: network_arg {key}={kwargs[key]} is not used: the DoRA layout comes from "
                           f"{where} (DoRA axis: {', '.join(a if a != 'None' else 'none' for a in axes)})")


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """A network shaped like the file (algorithm, ranks, alphas, Tucker, DoRA axis inferred from
    tensor names and shapes alone), with the file's weights loaded. Returns (network, weights_sd).
    ``kwargs`` (dropouts, LoRA+ ratios, ...) apply on top; layout options come from the file, and so does
    train_t5xxl (T5-XXL keys present or not)."""
    with tg.calling_trainer(tg.SD_SCRIPTS):
        return _from_weights(LycorisNetwork, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs)


@_said_in_one_line
def _from_weights(cls, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs):
    if weights_sd is None:
        weights_sd = wio.load_state_dict(file)
    _pop_train_t5xxl(kwargs)
    config = parse_config(None, None, None, kwargs)
    layers = tg.every_layer(text_encoder, unet)
    try:
        specs = sp.infer_specs(weights_sd, {n: LayerGeometry.of(t.layer).weight_shape for n, t in layers.items()})
    except ValueError as e:
        if file is None or str(file) in str(e):
            raise
        raise ValueError(f"{file}: {e}") from e
    if not specs:
        raise ValueError(f"{file}: no network weights in the file")
    algos = sorted({s.algo for s in specs.values()})
    _warn_overridden(file, kwargs, config, algos, sorted({str(s.dora_axis) for s in specs.values()}))
    config = config.replace(algo=algos[0] if len(algos) == 1 else config.algo)
    network = cls(text_encoder, unet, config, multiplier=multiplier, specs=specs)
    network.load_state_dict(weights_sd, strict=True)
    if for_inference:
        network.eval()
    return network, weights_sd


# ----- musubi-tuner ------------------------------------------------------------------------------------
class MusubiNetwork(LycorisNetwork):
    """What create_arch_network_from_weights returns: the network, which also unpacks as
    ``(network, weights_sd)``.

    musubi-tuner's trainer uses the one function two ways: ``--base_weights`` takes the result as the
    network (``create_arch_network_from_weights(m, sd, unet=t, for_inference=True).merge_to(None, t, sd,
    dtype, "cpu")``), ``--dim_from_weights`` unpacks it as a pair (``network, _ =
    create_arch_network_from_weights(1, sd, unet=t)``), which fails with musubi's own LoRA modules. A
    tuple subclass cannot be both (``.merge_to`` on a tuple), so the network is iterable: ``iter(network)``
    yields the network, then the state dict it was made from. The dict is not kept: the second item is the
    network's own state dict (its tensors, no copy), which after the strict load holds the file's values
    key for key, in the network's dtype; holding the caller's dict would keep a second copy of the file in
    memory for the whole run. nn.Module defines no ``__iter__`` (only containers such as ModuleList do),
    and neither musubi, accelerate nor torch iterates over a network, so nothing else sees a difference."""

    def __iter__(self):
        yield self
        yield self.state_dict()


def _check_musubi_model(unet, kwargs) -> None:
    if unet is None:
        raise TypeError("create_arch_network: musubi-tuner passes the DiT as the sixth argument (unet); got None")
    for key in ("exclude_patterns", "include_patterns"):
        if key in kwargs:
            raise ConfigError(
                f"network_arg {key} is an option of musubi-tuner's own networks.lora (regexes on module paths); "
                "lycoris_kohya chooses layers with a preset: a built-in one (preset=attn-mlp, attn-only, full) or "
                "a TOML file, --network_args \"preset=/path/to/dit.toml\" with exclude_name = [\"*.ffn.*\"] and/or "
                "unet_target_name = [\"blocks.*.self_attn\"] (globs on the same paths; docs/options.md#presets-preset)")
    if tg.find_family(unet, tg.MUSUBI) is None and "preset" not in kwargs:
        raise ValueError(tg.unknown_model(unet))


def create_arch_network(multiplier, network_dim=None, network_alpha=None, vae=None, text_encoders=None, unet=None, /,
                        neuron_dropout=None, **kwargs):
    """musubi-tuner's entry point: ``create_arch_network(1.0, dim, alpha, vae, None, transformer,
    neuron_dropout=..., **network_args)``. The family comes from the transformer's class (Wan, Qwen-Image,
    Z-Image, FLUX.2, FLUX.1 Kontext, HunyuanVideo, HunyuanVideo 1.5, FramePack, Kandinsky 5, Krea 2, Ideogram 4,
    HiDream-O1) and the default preset targets what musubi's own networks/lora_<family>.py does; text
    encoders are never adapted (musubi trains none). A model of another class needs a preset file."""
    _check_musubi_model(unet, kwargs)
    with tg.calling_trainer(tg.MUSUBI):
        if "preset" not in kwargs:
            preset = tg.default_preset(tg.detect_family(unet), unet)
            if preset != "default":
                kwargs = dict(kwargs, preset=preset)
        return _create(multiplier, network_dim, network_alpha, None, unet, neuron_dropout, kwargs)


def create_arch_network_from_weights(multiplier, weights_sd, text_encoders=None, unet=None, for_inference=False,
                                     **kwargs) -> MusubiNetwork:
    """musubi-tuner's other entry point (``--base_weights``, ``--dim_from_weights``, its merge and
    inference scripts): a network shaped like ``weights_sd`` (a state dict, or a path) with its weights
    loaded; the result unpacks as ``(network, weights_sd)`` too (MusubiNetwork). Any layer of the
    transformer may be in the file, whatever the preset."""
    if unet is None:
        raise TypeError("create_arch_network_from_weights: pass the DiT as unet=, as musubi-tuner does")
    file, sd = (weights_sd, None) if isinstance(weights_sd, (str, bytes)) else (None, weights_sd)
    with tg.calling_trainer(tg.MUSUBI):
        network, _ = _from_weights(MusubiNetwork, multiplier, file, None, unet, sd, for_inference, kwargs)
    return network  # see MusubiNetwork: the caller's dict is not kept
