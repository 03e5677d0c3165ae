"""The sd-scripts entry points: ``--network_module=lycoris_kohya`` (or ``lycoris_kohya.kohya``,
the drop-in spelling for users of ``lycoris.kohya``)."""
from __future__ import annotations

import logging
from typing import Optional

from . import specs as sp
from . import targets as tg
from . import weights as wio
from .algos.base import LayerGeometry
from .config import parse_config
from .network import LycorisNetwork

logger = logging.getLogger(__name__)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """A new network. ``kwargs`` are sd-scripts' --network_args (strings) plus ``dropout``."""
    config = parse_config(network_dim, network_alpha, neuron_dropout, kwargs)
    return LycorisNetwork(text_encoder, unet, config, multiplier=multiplier)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """A network shaped like the file (algorithm, ranks, alphas, Tucker, DoRA axis inferred from
    tensor names and shapes alone), with the file's weights loaded. Returns (network, weights_sd).
    ``kwargs`` (dropouts, LoRA+ ratios, ...) apply on top; layout options come from the file."""
    if weights_sd is None:
        weights_sd = wio.load_state_dict(file)
    config = parse_config(None, None, None, kwargs)
    layers = tg.every_layer(text_encoder, unet)
    specs = sp.infer_specs(weights_sd, {n: LayerGeometry.of(t.layer).weight_shape for n, t in layers.items()})
    if not specs:
        raise ValueError(f"{file}: no network weights in the file")
    algos = sorted({s.algo for s in specs.values()})
    config = config.replace(algo=algos[0] if len(algos) == 1 else config.algo)
    network = LycorisNetwork(text_encoder, unet, config, multiplier=multiplier, specs=specs)
    network.load_state_dict(weights_sd, strict=True)
    if for_inference:
        network.eval()
    return network, weights_sd
