"""lycoris_kohya: LoCon, LoHa, LoKr and DoRA for kohya-ss/sd-scripts and musubi-tuner (--network_module=lycoris_kohya)."""
from .config import ConfigError, NetworkConfig, parse_config
from .kohya import create_arch_network, create_arch_network_from_weights, create_network, create_network_from_weights
from ._version import __version__
from .network import LycorisNetwork

__all__ = [
    "ConfigError",
    "__version__",
    "LycorisNetwork",
    "NetworkConfig",
    "create_arch_network",
    "create_arch_network_from_weights",
    "create_network",
    "create_network_from_weights",
    "parse_config",
]
