"""The Hugging Face layout: a model as a folder that travels the way the ecosystem shares models.

    DIR/model.safetensors   the weights (raw tensors: opening them runs no code)
    DIR/config.json         this project's whole configuration (`configs.to_dict`), so the folder
                            alone rebuilds the model, evaluates it and says how it was trained
    DIR/README.md           the model card: configuration, dataset, metrics, command, licence

`UPerNet` inherits huggingface_hub's `PyTorchModelHubMixin`, so the standard calls work:
`model.save_pretrained(DIR)`, `UPerNet.from_pretrained(DIR_or_repo_id)` (also
`upernet_ref.from_pretrained`) and `model.push_to_hub("user/name")`. This module holds what the
mixin does not know: the full configuration a model was built from, the model card, and the
atomic folder write behind `upernet export --format safetensors`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import typing
from pathlib import Path

from upernet_ref import configs
from upernet_ref.checkpoints import CONFIG_NAME, SAFETENSORS_NAME, CheckpointError, load_weights
from upernet_ref.configs import Config, DataConfig, ModelConfig

if typing.TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from upernet_ref.model.upernet import UPerNet

PAPER_URL = "https://arxiv.org/abs/1807.10221"
CARD_NAME = "README.md"

# What the weights inherit from the data they were trained on (data/README.md has the sources).
DATA_TERMS = {
    "ade20k": "ADE20K (MIT CSAIL), whose images are under the ADE20K terms of use (research, "
              "non-commercial)",
    "cityscapes": "Cityscapes, whose licence allows non-commercial research use only",
    "voc": "PASCAL VOC 2012 (+ SBD), whose images are under Flickr's terms and annotations "
           "under the VOC challenge's",
}


def model_config(model: "UPerNet") -> Config:
    """The full configuration `model` was built from (`build_model` records it); a model built
    from a bare `ModelConfig` gets the default data and recipe sections around it."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, Config):
        return cfg
    mc: ModelConfig = model.cfg
    return Config(name="custom", model=mc, data=DataConfig(num_classes=mc.num_classes))


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


def model_card(cfg: Config, metrics: dict | None = None, command: str | None = None,
               iteration: int | None = None, max_iters: int | None = None) -> "ModelCard":
    """The model card (README.md) of a model folder.

    Args:
        cfg: the model's configuration.
        metrics: an `upernet eval` JSON (its mIoU / mAcc / aAcc, protocol, split), if evaluated.
        command: the command that trained it (default: reconstructed from `cfg`).
        iteration, max_iters: how far training went, when known (from the checkpoint).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    m, d, t = cfg.model, cfg.data, cfg.train
    eval_results = None
    if metrics and metrics.get("miou") is not None:
        eval_results = [EvalResult(task_type="image-segmentation", dataset_type=d.dataset,
                                   dataset_name=metrics.get("dataset", d.dataset),
                                   dataset_split=metrics.get("split"), metric_type="mean_iou",
                                   metric_name="mIoU", metric_value=round(100 * metrics["miou"], 2))]
    data = ModelCardData(library_name="upernet_ref", license="other",
                         pipeline_tag="image-segmentation", model_name=cfg.name,
                         tags=["semantic-segmentation", "upernet", "pytorch_model_hub_mixin",
                               "model_hub_mixin"], eval_results=eval_results)
    from upernet_ref.model.backbone import STANDARD_BLOCKS
    blocks = m.blocks or STANDARD_BLOCKS.get(m.depth, ())
    trained = (f"{iteration} of {max_iters} iterations" if iteration is not None and max_iters
               else f"{t.max_iters} iterations (the configuration's schedule)")
    lines = [
        f"# {cfg.name}",
        "",
        f"UPerNet ([Xiao et al., ECCV 2018]({PAPER_URL})) with a dilated ResNet-{m.depth} "
        f"backbone at output stride {m.output_stride}, trained with upernet_ref on "
        f"{d.dataset} ({d.num_classes} classes).",
        "",
        "## Configuration",
        "",
        "| | |",
        "|---|---|",
        f"| backbone | ResNet-{m.depth}, {m.stem} stem, blocks {','.join(map(str, blocks))}, "
        f"width {m.base_width}, output stride {m.output_stride} |",
        f"| head | PPM scales {','.join(map(str, m.pool_scales))} + FPN fusion, "
        f"{m.head_channels} channels; auxiliary FCN head: {'yes' if m.aux_head else 'no'} |",
        f"| classes | {m.num_classes} |",
        f"| data | {d.dataset}: train split `{d.train_split}`, val split `{d.val_split}`, crop "
        f"{d.crop_size[0]}x{d.crop_size[1]}, reduce-zero-label {str(d.reduce_zero_label).lower()} |",
        f"| training | SGD lr {t.lr} (poly, power {t.lr_power}), momentum {t.momentum}, weight "
        f"decay {t.weight_decay}, global batch {t.batch_size}, {trained} |",
        f"| test | {cfg.test.mode}, scales {','.join(map(str, cfg.test.scales))}"
        f"{', flip' if cfg.test.flip else ''} |",
        "",
        f"The whole configuration is `{CONFIG_NAME}` (`upernet_ref.configs.from_dict`).",
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
    lines += [
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
        'logits = model(images)["out"]  # (B, classes, H, W), images normalised as in config.json',
        "```",
        "",
        "or `upernet eval --checkpoint DIR`, `upernet predict --checkpoint DIR photo.jpg`, "
        "`upernet train --weights DIR [--reinit-classifier]`.",
        "",
        "## Licence",
        "",
        "The upernet_ref code declares no licence of its own. "
        + ("These weights were trained on the embedded procedural demo scenes (generated by "
           "upernet_ref, no third-party data)." if d.dataset == "demo" else
           f"These weights were trained on {DATA_TERMS.get(d.dataset, 'your own ' + d.dataset + ' data')}; "
           "weights learned from a dataset are commonly held to carry its terms: check them "
           "before using or redistributing these weights."),
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_folder(model: "UPerNet", out_dir: str | os.PathLike, metrics: dict | None = None,
                       command: str | None = None, iteration: int | None = None,
                       max_iters: int | None = None) -> Path:
    """`model.save_pretrained` into a temporary folder beside `out_dir`, then each file renamed
    into `out_dir`: a crash leaves the previous files whole, and a README.md from an older export
    is replaced (the mixin itself never overwrites a model card)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, model_card_kwargs=dict(metrics=metrics, command=command,
                                                          iteration=iteration,
                                                          max_iters=max_iters))
        out.mkdir(exist_ok=True)
        for name in (SAFETENSORS_NAME, CONFIG_NAME, CARD_NAME):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_safetensors(model: "UPerNet", out_dir: str | os.PathLike,
                       size: tuple[int, int] = (512, 512), check: bool = True,
                       **card: typing.Any) -> dict[str, typing.Any]:
    """`upernet export --format safetensors`: the model folder (`write_model_folder`, `card`:
    its model card arguments), then, with `check`, the folder read back by `from_pretrained`
    and compared with `model` on one random image of `size`."""
    import torch

    out = write_model_folder(model, out_dir, **card)
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


def load_pretrained(cls: type, model_id: str, config: dict | None, map_location: str = "cpu",
                    **download: typing.Any) -> "UPerNet":
    """`UPerNet._from_pretrained`: the model of `config.json`, with `model.safetensors` loaded
    strictly (our messages), in eval mode. `download`: huggingface_hub's download arguments."""
    from upernet_ref.model.upernet import build_model

    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{model_id}: no {CONFIG_NAME} of upernet_ref (a model folder holds "
                              f"{SAFETENSORS_NAME} and {CONFIG_NAME}; write one with "
                              f"model.save_pretrained or upernet export --format safetensors)")
    cfg = configs.from_dict(config, where=f"{model_id}/{CONFIG_NAME}")
    model = build_model(cfg)
    if os.path.isdir(model_id):
        weights = Path(model_id) / SAFETENSORS_NAME
    else:
        from huggingface_hub import hf_hub_download
        weights = Path(hf_hub_download(repo_id=model_id, filename=SAFETENSORS_NAME, **download))
    load_weights(model, weights, where=str(model_id))
    return model.to(map_location).eval()


def from_pretrained(model_id: str | os.PathLike, **kwargs: typing.Any) -> "UPerNet":
    """The model saved in a folder (`save_pretrained`, `upernet export --format safetensors`)
    or a Hugging Face Hub repository ("user/name"), in eval mode. `kwargs` go to
    `UPerNet.from_pretrained` (revision, cache_dir, token, local_files_only, map_location)."""
    from upernet_ref.model.upernet import UPerNet

    name = str(model_id)
    if not os.path.isdir(name) and (os.path.exists(name) or name.startswith((".", "/", "~"))
                                    or name.count("/") > 1):
        raise CheckpointError(f"{name}: not a model folder (expected a folder with "
                              f"{SAFETENSORS_NAME} and {CONFIG_NAME}, or a Hub id user/name)")
    return UPerNet.from_pretrained(name, **kwargs)


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
