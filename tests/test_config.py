"""Configs: dotted overrides, unknown-key rejection, JSON round trip, presets and smoke sizes."""
import json

import pytest
import torch

from vitsam.config import ConfigError, RunConfig, apply_overrides, from_dict, to_dict, validate
from vitsam.models import create_model
from vitsam.presets import PRESETS, get_preset, paper_rho


def test_overrides_parse_by_declared_type() -> None:
    cfg = apply_overrides(RunConfig(), ["train.epochs=50", "optim.sam=true", "optim.rho=0.2",
                                        "train.clip_norm=none", "model.kwargs.depth=2",
                                        "data.train_fraction=0.25", "optim.m=16"])
    assert cfg.train.epochs == 50.0 and cfg.optim.sam is True and cfg.optim.rho == 0.2
    assert cfg.train.clip_norm is None and cfg.model.kwargs == {"depth": 2}
    assert cfg.data.train_fraction == 0.25 and cfg.optim.m == 16
    assert RunConfig().train.epochs == 10  # the original is untouched (frozen dataclasses)


@pytest.mark.parametrize("override, match", [
    ("train.epoch=5", "did you mean train.epochs"),
    ("trian.epochs=5", "did you mean train"),
    ("train.batch_size=big", "not a valid int"),
    ("optim.sam=maybe", "not a valid bool"),
    ("train=3", "is a section"),
    ("train.epochs", "not of the form key=value"),
])
def test_bad_overrides_are_rejected(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(RunConfig(), [override])


def test_invalid_values_fail_validation() -> None:
    with pytest.raises(ValueError, match="train.micro_batch"):
        validate(apply_overrides(RunConfig(), ["train.micro_batch=1000"]))
    with pytest.raises(ValueError, match="optim.lr must be > 0"):
        validate(apply_overrides(RunConfig(), ["optim.lr=-1"]))
    with pytest.raises(ValueError, match="unknown optimizer"):
        validate(apply_overrides(RunConfig(), ["optim.name=adam"]))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_and_has_a_working_smoke_size(name: str) -> None:
    cfg = get_preset(name)
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    small = get_preset(name, smoke_size=True)
    validate(small)
    assert small.train.max_steps is not None and small.train.max_steps <= 5
    assert small.data.source == "mnist5k"
    model = create_model(small.model.name, 10, small.data.img_size, 1, **small.model.kwargs)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert model(torch.zeros(2, 1, small.data.img_size, small.data.img_size)).shape == (2, 10)


def test_paper_recipes() -> None:
    vit = get_preset("in1k-vit-b16-sam")
    assert (vit.optim.name, vit.optim.lr, vit.optim.weight_decay) == ("adamw", 3e-3, 0.3)
    assert (vit.train.batch_size, vit.train.epochs, vit.train.warmup_steps) == (4096, 300, 10_000)
    assert vit.optim.sam and vit.optim.rho == 0.2 and vit.train.clip_norm == 1.0
    assert paper_rho("mixer-b16") == 0.6 and paper_rho("resnet152") == 0.05
    res = get_preset("in1k-resnet50")
    assert res.optim.name == "sgd" and not res.optim.sam and res.train.epochs == 90
    with pytest.raises(ConfigError, match="did you mean"):
        get_preset("in1k-vit-b16-sma")


def test_union_fields_try_text_last_and_errors_name_the_typed_key() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Settings:
        heads: str | int = "mean"
        limit: int | None = 3

        def __post_init__(self) -> None:
            if self.limit is not None and self.limit < 1:
                raise ValueError(f"limit must be >= 1, got {self.limit}")

    got = apply_overrides(Settings(), ["heads=3", "limit=none"])
    assert got.heads == 3 and got.limit is None
    assert apply_overrides(Settings(), ["heads=mean"]).heads == "mean"
    with pytest.raises(ConfigError, match=r"^attn\.limit=0: limit must be >= 1"):
        apply_overrides(Settings(), ["limit=0"], prefix="attn.")
    with pytest.raises(ConfigError, match="unknown config key 'attn.head'.*did you mean attn.heads"):
        apply_overrides(Settings(), ["head=1"], prefix="attn.")
