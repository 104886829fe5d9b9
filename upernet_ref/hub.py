"""The Hugging Face layout: a model as a folder that travels the way the ecosystem shares models.

    DIR/model.safetensors   the weights (raw tensors, metadata {"format": "pt"}: opening them
                            runs no code)
    DIR/config.json         this project's whole configuration (`configs.to_dict`), plus
                            transformers' `id2label` / `label2id`: the folder alone rebuilds the
                            model, evaluates it, says how it was trained and names its classes
    DIR/README.md           the model card: configuration, datasets, metrics, command, licence

The network (`upernet_ref.model.UPerNet`) is a plain `nn.Module`; this module wraps it:
`save_pretrained(model, DIR)`, `from_pretrained(DIR_or_repo_id)` (also
`upernet_ref.from_pretrained`) and `push_to_hub(model, "user/name")`, which uploads the same
folder, model card and metrics included (`upernet export --format safetensors --push-to-hub`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import typing
from pathlib import Path

from upernet_ref import configs
from upernet_ref.checkpoints import (CONFIG_NAME, SAFETENSORS_NAME, CheckpointError,
                                     download_model_folder, is_hub_id, load_weights,
                                     save_safetensors)
from upernet_ref.config_files import from_dict
from upernet_ref.configs import Config
from upernet_ref.data.info import DATASETS, class_names
from upernet_ref.extras import require
from upernet_ref.model.backbone import STANDARD_BLOCKS
from upernet_ref.model.upernet import UPerNet, build_model

if typing.TYPE_CHECKING:
    from huggingface_hub import ModelCard

PAPER_URL = "https://arxiv.org/abs/1807.10221"
CARD_NAME = "README.md"
LICENSE = "mit"  # the code's licence (LICENSE, pyproject.toml), as the Hub names it


def hub_config(cfg: Config) -> dict:
    """config.json: the whole configuration, and the class names as transformers has them."""
    names = class_names(cfg.data.dataset, cfg.model.num_classes, cfg.data.classes)
    return {**configs.to_dict(cfg), "id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)}}


def training_command(cfg: Config, max_iters: int | None = None) -> str:
    """The `upernet train` command that reproduces `cfg` (the named configuration plus one
    `--section.field=value` per field that differs from it), reconstructed from the config."""
    try:
        base = configs.get_config(cfg.name)
    except KeyError:
        base = None
    parts = ["upernet train", f"--config {cfg.name if base else '<a base configuration>'}"]
    if cfg.data.dataset != "demo":
        parts.append("--data-root DATA")
    if max_iters is not None and max_iters != cfg.train.max_iters:
        parts.append(f"--max-iters {max_iters}")
    ours_all, theirs_all = configs.to_dict(cfg), configs.to_dict(base) if base else None
    for section in ("model", "data", "train", "test"):
        ours = ours_all[section]
        theirs = theirs_all[section] if theirs_all else None
        for name, value in ours.items():
            if theirs is not None and theirs[name] == value:
                continue
            if isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                text = str(value).lower()
            else:
                text = str(value)
            parts.append(f"--{section}.{name}={text}")
    return " \\\n    ".join(parts)


def _metrics_rows(metrics: dict) -> list[str]:
    rows = [f"| mIoU | {100 * metrics['miou']:.2f} |"]
    for key, name in (("macc", "mAcc"), ("aacc", "aAcc")):
        if metrics.get(key) is not None:
            rows.append(f"| {name} | {100 * metrics[key]:.2f} |")
    return ["| metric | % |", "|---|---|"] + rows


def _card_use_and_licence(cfg: Config, command: str | None, max_iters: int | None) -> list[str]:
    """The model card's Training, Use and Licence sections."""
    d, info = cfg.data, DATASETS.get(cfg.data.dataset)
    return [
        "",
        "## Training",
        "",
        "```bash",
        command or training_command(cfg, max_iters),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "import upernet_ref",
        'model = upernet_ref.from_pretrained("DIR or user/repo")  # eval mode',
        'logits = model(images)["out"]  # (B, classes, H, W), images normalised as above',
        "```",
        "",
        "or `upernet eval --checkpoint DIR_OR_REPO`, `upernet predict --checkpoint DIR_OR_REPO "
        "photo.jpg`, `upernet train --weights DIR_OR_REPO [--reinit-classifier]`.",
        "",
        "## Licence",
        "",
        f"The upernet_ref code is under the {LICENSE.upper()} licence (the `license` above). "
        + (f"These weights were trained on {info.licence}" if info else
           f"These weights were trained on your own {d.dataset} data")
        + ("." if d.dataset == "demo" else
           "; weights learned from a dataset are commonly held to carry its terms: check them "
           "before using or redistributing these weights."),
        "",
    ]


def card_metadata(cfg: Config, metrics: dict | None, base_model: str | None) -> str:
    """The card's YAML header: licence, datasets (Hub ids), base model, model-index (mIoU as
    a fraction, dataset type the Hub id where there is one)."""
    hf = require("huggingface_hub", "hf", "a model card")
    info = DATASETS.get(cfg.data.dataset)
    hub_id = info.hub_id if info else None
    eval_results = None
    if metrics and metrics.get("miou") is not None:
        eval_results = [hf.EvalResult(
            task_type="image-segmentation", dataset_type=hub_id or cfg.data.dataset,
            dataset_name=info.title if info else cfg.data.dataset,
            dataset_split=metrics.get("split"), metric_type="mean_iou",
            metric_name="mIoU (fraction)", metric_value=round(float(metrics["miou"]), 4))]
    return hf.ModelCardData(library_name="upernet_ref", license=LICENSE,
                            pipeline_tag="image-segmentation", model_name=cfg.name,
                            datasets=[hub_id] if hub_id else None, base_model=base_model,
                            tags=["semantic-segmentation", "upernet", "pytorch"],
                            eval_results=eval_results).to_yaml()


def model_card(cfg: Config, metrics: dict | None = None, command: str | None = None,
               iteration: int | None = None, max_iters: int | None = None,
               base_model: str | None = None) -> ModelCard:
    """The model card (README.md) of a model folder, in the form the Hub validates.

    Args:
        cfg: the model's configuration.
        metrics: an `upernet eval` JSON (its mIoU / mAcc / aAcc, protocol, split), if evaluated;
            the model-index gives them as fractions (0..1), as the Hub's metrics are.
        command: the command that trained it (default: reconstructed from `cfg`).
        iteration, max_iters: how far training went, when known (from the checkpoint).
        base_model: the Hub id it was fine-tuned from, if any.
    """
    hf = require("huggingface_hub", "hf", "a model card")
    m, d, t = cfg.model, cfg.data, cfg.train
    info = DATASETS.get(d.dataset)
    hub_id = info.hub_id if info else None
    dataset_title = info.title if info else d.dataset
    blocks = m.blocks or STANDARD_BLOCKS.get(m.depth, ())
    trained = (f"{iteration} of {max_iters} iterations" if iteration is not None and max_iters
               else f"{t.max_iters} iterations (the configuration's schedule)")
    names = class_names(d.dataset, m.num_classes, d.classes)
    lines = [
        f"# {cfg.name}",
        "",
        f"UPerNet ([Xiao et al., ECCV 2018]({PAPER_URL})) with a dilated ResNet-{m.depth} "
        f"backbone at output stride {m.output_stride}, trained with upernet_ref on "
        f"{dataset_title} ({m.num_classes} classes)"
        + (f", fine-tuned from [{base_model}](https://huggingface.co/{base_model})"
           if base_model else "") + ".",
        "",
        "## Configuration",
        "",
        "| | |",
        "|---|---|",
        f"| backbone | ResNet-{m.depth}, {m.stem} stem, blocks {','.join(map(str, blocks))}, "
        f"width {m.base_width}, output stride {m.output_stride} |",
        f"| head | PPM scales {','.join(map(str, m.pool_scales))} + FPN fusion, "
        f"{m.head_channels} channels; auxiliary FCN head: {'yes' if m.aux_head else 'no'} |",
        f"| classes | {m.num_classes}: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''} |",
        f"| data | {d.dataset}: train split `{d.train_split}`, val split `{d.val_split}`, crop "
        f"{d.crop_size[0]}x{d.crop_size[1]}, reduce-zero-label {str(d.reduce_zero_label).lower()}"
        f"{f', Hub dataset `{hub_id}`' if hub_id else ''} |",
        f"| input | RGB, normalised with mean {d.mean} and std {d.std} (0-255 scale) |",
        f"| training | SGD lr {t.lr} (poly, power {t.lr_power}), momentum {t.momentum}, weight "
        f"decay {t.weight_decay}, global batch {t.batch_size}, {trained} |",
        f"| test | {cfg.test.mode}, scales {','.join(map(str, cfg.test.scales))}"
        f"{', flip' if cfg.test.flip else ''} |",
        "",
        f"The whole configuration is `{CONFIG_NAME}` (`upernet_ref.config_files.from_dict`, or "
        f"`upernet train --config {CONFIG_NAME}`), with the class names as `id2label`.",
        "",
        "## Evaluation",
        "",
    ]
    if metrics and metrics.get("miou") is not None:
        lines += _metrics_rows(metrics) + [
            "", f"{metrics.get('dataset', d.dataset)} split `{metrics.get('split', '?')}`, "
            f"{metrics.get('num_images', '?')} images; protocol: {metrics.get('protocol', '?')}."]
    else:
        lines += ["Not evaluated when this folder was written: `upernet eval --checkpoint DIR "
                  "[--data-root DATA]`, then `upernet export ... --eval-json FILE`."]
    lines += _card_use_and_licence(cfg, command, max_iters)
    return hf.ModelCard(f"---\n{card_metadata(cfg, metrics, base_model)}\n---\n\n"
                        + "\n".join(lines))


def save_pretrained(model: UPerNet, save_directory: str | os.PathLike, *,
                    metrics: dict | None = None, command: str | None = None,
                    iteration: int | None = None, max_iters: int | None = None,
                    base_model: str | None = None) -> Path:
    """Write the model folder (weights, config.json, model card; the card arguments as in
    `model_card`) into a temporary folder beside `save_directory`, then rename each file into
    it: a crash leaves the previous files whole, and an older README.md is replaced."""
    out = Path(save_directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_safetensors(model.state_dict(), tmp / SAFETENSORS_NAME)  # + digest, umask mode
        (tmp / CONFIG_NAME).write_text(json.dumps(hub_config(model.config), indent=2) + "\n")
        card = model_card(model.config, metrics, command, iteration, max_iters, base_model)
        (tmp / CARD_NAME).write_text(str(card))
        out.mkdir(exist_ok=True)
        for name in (SAFETENSORS_NAME, CONFIG_NAME, CARD_NAME):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def config_from_hub_dict(config: dict, where: str) -> Config:
    """The configuration of a model folder's config.json (`from_dict` reads past id2label)."""
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{where}: no {CONFIG_NAME} of upernet_ref (a model folder holds "
                              f"{SAFETENSORS_NAME} and {CONFIG_NAME}; write one with "
                              f"hub.save_pretrained or upernet export --format safetensors)")
    return from_dict(config, where=f"{where}/{CONFIG_NAME}")


def from_pretrained(model_id: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | None = None, token: str | bool | None = None,
                    local_files_only: bool = False, map_location: str = "cpu") -> UPerNet:
    """The model saved in a folder (`save_pretrained`, `upernet export --format safetensors`)
    or a Hugging Face Hub repository ("user/name", downloaded into the Hub cache), loaded
    strictly, in eval mode."""
    name = str(model_id)
    if os.path.isdir(name):
        folder = Path(name)
    elif is_hub_id(name):
        folder = download_model_folder(name, revision=revision, cache_dir=cache_dir, token=token,
                                       local_files_only=local_files_only)
    else:
        raise CheckpointError(f"{name}: not a model folder (expected a folder with "
                              f"{SAFETENSORS_NAME} and {CONFIG_NAME}, or a Hub id user/name)")
    config_file = folder / CONFIG_NAME
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        config = None
    except ValueError as err:
        raise CheckpointError(f"{config_file}: not valid JSON: {err}") from None
    model = build_model(config_from_hub_dict(config, name))
    load_weights(model, folder / SAFETENSORS_NAME, where=name)
    return model.to(map_location).eval()


def upload_folder(folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None,
                  private: bool | None = None, commit_message: str | None = None) -> str:
    """Upload a model folder as it is (its card and metrics included) to the Hub repository
    `repo_id`, created if needed; returns the commit's URL."""
    api = require("huggingface_hub", "hf", "an upload to the Hub").HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                             commit_message=commit_message or "Upload upernet_ref model")
    return str(getattr(info, "commit_url", info))


def push_to_hub(model: UPerNet, repo_id: str, *, token: str | bool | None = None,
                private: bool | None = None, commit_message: str | None = None,
                **card: typing.Any) -> str:
    """`save_pretrained(model, ..., **card)` into a temporary folder, uploaded to `repo_id`:
    the Hub gets the same three files, the card's metrics included."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", **card)
        return upload_folder(folder, repo_id, token=token, private=private,
                             commit_message=commit_message)


def export_safetensors(model: UPerNet, out_dir: str | os.PathLike,
                       size: tuple[int, int] = (512, 512), check: bool = True,
                       **card: typing.Any) -> dict[str, typing.Any]:
    """`upernet export --format safetensors`: the model folder (`save_pretrained`, `card`:
    its model card arguments), then, with `check`, the folder read back by `from_pretrained`
    and compared with `model` on one random image of `size`."""
    import torch

    out = save_pretrained(model, out_dir, **card)
    report: dict[str, typing.Any] = {"path": f"{out} ({SAFETENSORS_NAME}, {CONFIG_NAME}, "
                                             f"{CARD_NAME})"}
    if check:
        again = from_pretrained(out)
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = model.eval()(x)["out"], again(x)["out"]
        report["max_abs_logit_diff"] = float((a - b).abs().max())
        report["argmax_agreement"] = float((a.argmax(1) == b.argmax(1)).float().mean())
    return report


def read_metrics(path: str | os.PathLike) -> dict:
    """An `upernet eval` results JSON, checked to hold an mIoU."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such eval results file") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not an upernet eval JSON: {err}") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("miou"), (int, float)):
        raise CheckpointError(f"{path}: not an upernet eval JSON (no \"miou\")")
    return metrics
