"""The sd-scripts entry points: ``--network_module=lycoris_kohya`` (or ``lycoris_kohya.kohya``,
the drop-in spelling for users of ``lycoris.kohya``)."""
from __future__ import annotations

import logging

from . import specs as sp
from . import targets as tg
from . import weights as wio
from .algos.geometry import LayerGeometry
from .config import parse_bool, parse_config
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
    for key in ("dora_wd", "wd_on_output"):
        if key in kwargs and parse_bool(key, kwargs[key]) != (key == "dora_wd" and axes != ["None"]
                                                              or key == "wd_on_output" and axes == ["output"]):
            logger.warning(f"lycoris_kohya: network_arg {key}={kwargs[key]} is not used: the DoRA layout comes from "
                           f"{where} (DoRA axis: {', '.join(a if a != 'None' else 'none' for a in axes)})")


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """A network shaped like the file (algorithm, ranks, alphas, Tucker, DoRA axis inferred from
    tensor names and shapes alone), with the file's weights loaded. Returns (network, weights_sd).
    ``kwargs`` (dropouts, LoRA+ ratios, ...) apply on top; layout options come from the file, and so does
    train_t5xxl (T5-XXL keys present or not)."""
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
    network = LycorisNetwork(text_encoder, unet, config, multiplier=multiplier, specs=specs)
    network.load_state_dict(weights_sd, strict=True)
    if for_inference:
        network.eval()
    return network, weights_sd
