"""upernet_ref: a readable reference implementation of UPerNet with dilated ResNets.

    upernet_ref/model/       the network of the paper (start here)
    upernet_ref/configs.py   the 12 published configurations as typed dataclasses
    upernet_ref/data/        datasets, demo scenes, the published pipelines
    upernet_ref/training/    losses, poly schedule, the trainer
    upernet_ref/evaluation/  metrics, inference, evaluation
    upernet_ref/perf/        MACs, benchmarks, memory, the fast path, export
    upernet_ref/checkpoints.py  published checkpoints, safe loading, atomic saving
    upernet_ref/hub.py       the Hugging Face folder (safetensors + config.json + model card)
    upernet_ref/cli/         the `upernet` command (every argparse lives here)
"""
from upernet_ref.configs import Config, get_config, list_configs
from upernet_ref.hub import from_pretrained
from upernet_ref.model import UPerNet, build_model, count_parameters

__all__ = ["Config", "UPerNet", "build_model", "count_parameters", "from_pretrained", "get_config",
           "list_configs"]
__version__ = "0.1.0"
