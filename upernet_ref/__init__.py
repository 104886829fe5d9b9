"""upernet_ref: a readable reference implementation of UPerNet with dilated ResNets."""
from .configs import Config, get_config, list_configs
from .model import UPerNet, build_model, count_parameters

__all__ = ["Config", "UPerNet", "build_model", "count_parameters", "get_config", "list_configs"]
__version__ = "0.1.0"
