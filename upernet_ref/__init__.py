"""upernet_ref: a readable reference implementation of UPerNet with dilated ResNets.

The reading core (the recipe, top to bottom; it imports nothing of the shell):

    upernet_ref/model/       the network of the paper (start here)
    upernet_ref/configs.py   the 12 published configurations as typed dataclasses
    upernet_ref/data/        datasets on disk, the published pipelines
    upernet_ref/training/    losses, poly schedule, the one training step and the loop
    upernet_ref/evaluation/  metrics, inference, evaluation
    upernet_ref/collectives.py, errors.py

The shell around it:

    upernet_ref/cli/         the `upernet` command (every argparse lives here)
    upernet_ref/runs.py, launch.py, files.py   run folders, torchrun's process group, atomic files
    upernet_ref/checkpoints.py  published checkpoints, safe loading, atomic saving
    upernet_ref/hub.py       the Hugging Face folder (safetensors + config.json + model card)
    upernet_ref/perf/        MACs, benchmarks, memory, the fast path, export
    upernet_ref/sources.py   where a command's data comes from: demo_scenes.py (the embedded
                             scenes), hf_datasets.py (Hugging Face datasets) or data/ (on disk)
    upernet_ref/config_files.py  --config NAME_OR_FILE, JSON / YAML files, stored configurations
    upernet_ref/extras.py, reports.py, prepare.py, predictions.py, course.py
"""
from upernet_ref.config_files import load_config
from upernet_ref.configs import Config, get_config, list_configs
from upernet_ref.hub import from_pretrained
from upernet_ref.model import UPerNet, build_model, count_parameters

__all__ = ["Config", "UPerNet", "build_model", "count_parameters", "from_pretrained", "get_config",
           "list_configs", "load_config"]
__version__ = "0.1.0"
