"""lycoris_kohya: LoCon, LoHa, LoKr and DoRA for kohya-ss/sd-scripts (--network_module=lycoris_kohya)."""
from .config import ConfigError, NetworkConfig, parse_config
from .kohya import create_network, create_network_from_weights
from .network import LycorisNetwork

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "LycorisNetwork",
    "NetworkConfig",
    "create_network",
    "create_network_from_weights",
    "parse_config",
]
