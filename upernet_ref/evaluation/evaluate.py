"""`upernet eval`: mIoU of a checkpoint on a split, with the published protocol (docs/SPEC.md, "Test protocol").

    upernet eval --config upernet_r50_os8_ade20k --checkpoint ckpt.pth --data-root data/ade
    upernet eval --checkpoint runs/demo/last.pt            # config stored in the checkpoint
    upernet eval ... --test.mode=slide --test.scales=0.5,0.75,1,1.25,1.5,1.75 --test.flip=true

`evaluate(model, dataset, cfg, ...)` is the programmatic API (the trainer calls it for periodic
validation). Its dataset is in one form, the test pipeline's: items `(image, mask)` with the
image as `test_transform(cfg.data)` gives it (float32, normalised, fitted to the base scale)
and the mask at the image's original size, which is what `build_dataset(cfg, split, root,
test_transform(cfg.data))` makes (the transform then runs in the DataLoader workers). Every
image goes through `inference.predict_labels` with `cfg.test`, the one resolved test protocol,
its prediction is compared with the label at the original size, and one confusion matrix is
accumulated on the device over the whole split. With several processes (torchrun) each rank
evaluates every `world_size`-th image and the matrices are summed before the metrics are
computed.
"""
from __future__ import annotations

import dataclasses
import time
import typing

import torch
from torch import nn

from upernet_ref.collectives import all_gather_object, rank_and_world
from upernet_ref.configs import Config
from upernet_ref.errors import DataError
from upernet_ref.evaluation.inference import predict_labels
from upernet_ref.evaluation.metrics import ConfusionMatrix


def _first(batch: list) -> typing.Any:  # DataLoader collate for batch_size=1, sizes vary
    return batch[0]


@dataclasses.dataclass
class SkippedItem:
    """What `EvalItems` returns for a bad item with `data.on_bad="skip"`."""
    where: str
    problem: str


class EvalItems(torch.utils.data.Dataset):
    """`dataset[i]` for the indices of this process; with `skip`, a bad item (DataError) comes
    back as a `SkippedItem` and is left out of the metrics (not replaced by another image:
    that would count it twice). Through the DataLoader, so its workers' skips are seen too."""

    def __init__(self, dataset: typing.Any, indices: typing.Sequence[int], skip: bool) -> None:
        self.dataset, self.indices, self.skip = dataset, list(indices), skip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> typing.Any:
        i = self.indices[k]
        try:
            return self.dataset[i]
        except DataError as e:
            if not self.skip:
                raise
            describe = getattr(self.dataset, "describe", None)
            return SkippedItem(describe(i) if describe else f"item {i}", str(e))


def check_test_form(image: torch.Tensor) -> None:
    """Refuse an image that did not go through the test pipeline (a raw uint8 one)."""
    if not image.is_floating_point():
        raise ValueError(f"evaluation takes items as test_transform(cfg.data) gives them (a "
                         f"float image, normalised and fitted to the base scale), got a "
                         f"{image.dtype} image: build the dataset with "
                         f"transform=test_transform(cfg.data)")


def describe_protocol(cfg: Config, subset: tuple[int, int] | None = None) -> str:
    """One sentence saying how the numbers were obtained with `cfg.test` (printed and stored
    with them).

    `subset`: (images evaluated, images in the split) when only the first ones were.
    """
    test = cfg.test
    long_side, short_side = cfg.data.base_scale
    how = ("whole-image inference" if test.mode == "whole"
           else f"sliding-window inference (crop {test.crop_size[0]}x{test.crop_size[1]}, "
                f"stride {test.stride[0]}x{test.stride[1]})")
    tta = ("single scale, no flip" if tuple(test.scales) == (1.0,) and not test.flip
           else f"scales {', '.join(f'{s:g}' for s in test.scales)}"
                f"{' + flip' if test.flip else ''}, softmax averaged")
    return (f"{how} on the image fitted to {long_side}x{short_side} (aspect kept), {tta}; "
            f"logits resized to the label size, argmax; one confusion matrix over "
            f"{'the split' if subset is None else f'the first {subset[0]} of {subset[1]} images'}, "
            f"label {cfg.data.ignore_index} ignored; classes absent from prediction and label "
            f"left out of the mean")


def evaluate(model: nn.Module, dataset: typing.Any, cfg: Config,
             device: str | torch.device | None = None, *,
             progress: typing.Callable[[typing.Iterable, int], typing.Iterable] | None = None,
             num_workers: int | None = None, limit: int | None = None) -> dict[str, typing.Any]:
    """mIoU / mAcc / aAcc (fractions) and per-class IoU / Acc of `model` over `dataset`.

    Args:
        dataset: items `(image, mask)` in the test pipeline's form: `image` as
            `test_transform(cfg.data)` gives it (float, normalised, fitted to the base scale),
            `mask` at the original size. A raw uint8 image is refused with a message saying so.
        cfg: the configuration: `cfg.test` is the protocol (mode, scales, flip, crop, stride;
            another one is another configuration, e.g. `configs.override(cfg, {"test.flip":
            True})`), `cfg.data` gives the ignore index, the number of classes and `on_bad`.
        device: where to run (default: the model's device).
        progress: `progress(items, count)` wraps this process's items, e.g. in a progress bar
            (`upernet eval`'s tqdm); rank 0 only.
        limit: evaluate only the first `limit` images (quick checks).

    Returns the `metrics.summarize` dict plus `protocol` (a sentence), `mode`, `scales`, `flip`,
    `crop_size`, `stride`, `num_images` (evaluated), `seconds`, `classes` (when the dataset has
    them), and with `cfg.data.on_bad="skip"` the bad items left out: `skipped` (how many, over
    every worker and rank) and `skipped_samples` ({item's files: problem}). The model's
    train/eval mode and device are restored afterwards.
    """
    test = cfg.test
    param = next(model.parameters(), None)
    model_device = param.device if param is not None else torch.device("cpu")
    device = model_device if device is None else torch.device(device)
    model_was_training = model.training
    model.to(device).eval()

    rank, world = rank_and_world()
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    shard = EvalItems(dataset, range(rank, total, world), skip=cfg.data.on_bad == "skip")
    workers = cfg.data.num_workers if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(shard, batch_size=1, shuffle=False, num_workers=workers,
                                         collate_fn=_first)
    num_classes = cfg.data.num_classes
    cm = ConfusionMatrix(num_classes, cfg.data.ignore_index, device=device)
    start = time.perf_counter()
    skipped: dict[str, str] = {}
    items: typing.Iterable = loader
    if progress and rank == 0:
        items = progress(loader, len(shard))
    try:
        for item in items:
            if isinstance(item, SkippedItem):
                skipped[item.where] = item.problem
                continue
            image, mask = item
            check_test_form(image)
            labels = predict_labels(model, image.to(device), test, out_size=tuple(mask.shape[-2:]))
            cm.update(labels[0], mask.to(device))
    finally:
        model.train(model_was_training).to(model_device)  # the caller's model as it was
    cm.reduce()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = cm.summary()
    skipped = {k: v for part in all_gather_object(skipped) for k, v in part.items()}
    result.update(
        protocol=describe_protocol(cfg, None if total == len(dataset) else (total, len(dataset))),
        mode=test.mode, scales=list(test.scales), flip=bool(test.flip),
        crop_size=list(test.crop_size), stride=list(test.stride),
        num_images=total - len(skipped), seconds=time.perf_counter() - start,
        skipped=len(skipped), skipped_samples=skipped,
    )
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        result["classes"] = list(classes)
    return result
