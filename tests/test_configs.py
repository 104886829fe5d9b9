"""The 12 published recipes carry the spec's numbers; overrides are type-checked."""
import dataclasses

import pytest

from upernet_ref.config_files import from_dict
from upernet_ref.configs import PUBLISHED, get_config, list_configs, override, to_dict

SPEC_ROWS = {  # dataset: (crop, global batch, epochs, iters/epoch, classes, base scale)
    "voc": ((512, 512), 16, 60, 661, 21, (2048, 512)),
    "ade20k": ((512, 512), 16, 130, 1263, 150, (2048, 512)),
    "cityscapes": ((512, 1024), 8, 220, 372, 19, (2048, 1024)),
}


def test_twelve_published_names():
    names = list_configs(published_only=True)
    expected = {f"upernet_r{d}_os{o}_{ds}" for d in (50, 101) for o in (8, 16)
                for ds in ("voc", "ade20k", "cityscapes")}
    assert set(names) == expected and len(names) == 12
    assert "upernet_small_demo" in list_configs() and "upernet_small_test" in list_configs()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_recipe_numbers(name):
    cfg = get_config(name)
    crop, batch, epochs, ipe, classes, base = SPEC_ROWS[cfg.data.dataset]
    assert cfg.data.crop_size == crop and cfg.test.crop_size == crop
    assert cfg.data.base_scale == base
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.iters_per_epoch) == (batch, epochs, ipe)
    assert cfg.model.num_classes == cfg.data.num_classes == classes
    assert cfg.train.max_iters == epochs * ipe
    t = cfg.train
    assert (t.lr, t.momentum, t.weight_decay, t.nesterov) == (0.01, 0.9, 5e-4, False)
    assert (t.lr_power, t.min_lr, t.warmup_iters) == (0.9, 1e-4, 0)
    assert (t.loss_weight, t.aux_loss_weight) == (1.0, 0.4)
    assert cfg.data.ratio_range == (0.5, 2.0) and cfg.data.cat_max_ratio == 0.75
    assert cfg.data.reduce_zero_label == (cfg.data.dataset == "ade20k")
    assert cfg.model.stem == "deep" and cfg.model.pool_scales == (1, 2, 3, 6)
    assert cfg.model.head_channels == 512 and cfg.model.aux_head
    assert cfg.test.mode == "whole" and cfg.test.scales == (1.0,) and not cfg.test.flip
    assert cfg.reported_miou is not None


def test_iteration_equivalents_from_spec():
    assert get_config("upernet_r50_os8_voc").train.max_iters == 39_660
    assert get_config("upernet_r50_os8_ade20k").train.max_iters == 164_190
    assert get_config("upernet_r50_os8_cityscapes").train.max_iters == 81_840


def test_configs_are_frozen():
    cfg = get_config("upernet_r50_os8_ade20k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as err:
        get_config("upernet_r52_os8_ade20k")
    assert "upernet_r50_os8_ade20k" in str(err.value)


def test_overrides_parse_and_check_types():
    cfg = override(get_config("upernet_r50_os8_ade20k"),
                   ["train.lr=0.02", "model.output_stride=16", "data.crop_size=256x320",
                    "test.flip=true", "test.scales=0.5,1.0,1.5", "data.num_classes=7"])
    assert cfg.train.lr == 0.02 and cfg.model.output_stride == 16
    assert cfg.data.crop_size == (256, 320) and cfg.test.flip is True
    assert cfg.test.scales == (0.5, 1.0, 1.5)
    assert cfg.model.num_classes == 7  # follows data.num_classes
    assert get_config("upernet_r50_os8_ade20k").train.lr == 0.01  # original untouched
    with pytest.raises(ValueError, match="train.lr is a float"):
        override(cfg, ["train.lr=fast"])
    with pytest.raises(ValueError, match="bool"):
        override(cfg, ["test.flip=maybe"])
    with pytest.raises(KeyError, match="valid train keys"):
        override(cfg, ["train.learning_rate=0.1"])
    with pytest.raises(KeyError, match="keys look like"):
        override(cfg, ["optim.lr=0.1"])
    with pytest.raises(TypeError, match="must be int"):
        override(cfg, {"model.output_stride": 8.5})
    assert override(cfg, {"train.lr": 1}).train.lr == 1.0


def test_dict_round_trip():
    cfg = get_config("upernet_r101_os16_cityscapes")
    assert from_dict(to_dict(cfg)) == cfg
