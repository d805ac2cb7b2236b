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


def _saved(section: str, key: str, value) -> dict:
    data = json.loads(json.dumps(to_dict(RunConfig())))
    data[section][key] = value
    return data


@pytest.mark.parametrize("section, key, value, words", [
    ("train", "epochs", "3", ['train.epochs="3"', "must be a number", "not a string"]),
    ("train", "epochs", None, ["train.epochs=null", "must be a number", "not null"]),
    ("train", "batch_size", True, ["train.batch_size=true", "must be an int", "not a boolean"]),
    ("train", "batch_size", 3.0, ["train.batch_size=3.0", "must be an int", "not a float"]),
    ("train", "max_steps", "5", ["train.max_steps=\"5\"", "an int or null"]),
    ("optim", "sam", 1, ["optim.sam=1", "true or false", "not an int"]),
    ("model", "kwargs", [1, 2], ["model.kwargs=[1, 2]", "must be a mapping", "not a list"]),
    ("model", "kwargs", 3, ["model.kwargs=3", "must be a mapping", "not an int"]),
    ("data", "img_size", "28", ['data.img_size="28"', "an int or null"]),
    ("data", "root", 7, ["data.root=7", "a string or null"]),
])
def test_loaded_configs_are_type_checked(section, key, value, words) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, _saved(section, key, value))
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_loaded_configs_accept_what_the_types_allow() -> None:
    cfg = from_dict(RunConfig, _saved("train", "epochs", 3))  # an int where a float is declared
    assert cfg.train.epochs == 3
    assert from_dict(RunConfig, _saved("train", "clip_norm", None)).train.clip_norm is None
    with pytest.raises(ConfigError, match="train is a section and must be a mapping"):
        from_dict(RunConfig, {"train": 3})


def test_overrides_are_type_checked_and_tuples_checked_per_item() -> None:
    from dataclasses import dataclass

    for text in ("model.kwargs=[1,2]", "model.kwargs=3", "model.kwargs=\"depth\""):
        with pytest.raises(ConfigError, match=r"^model\.kwargs=.* must be a mapping"):
            apply_overrides(RunConfig(), [text])
    assert apply_overrides(RunConfig(), ['model.kwargs={"depth": 2}']).model.kwargs == {"depth": 2}
    with pytest.raises(ConfigError, match=r"model\.kwargs\.depth is a value \(2\), not a mapping"):
        apply_overrides(RunConfig(), ["model.kwargs.depth=2", "model.kwargs.depth.x=3"])

    @dataclass(frozen=True)
    class Span:
        span: tuple[float, float] = (-1.0, 1.0)
        mean: tuple[float, ...] | None = None

    assert apply_overrides(Span(), ["span=[0, 2.5]", "mean=(0.5,)"]) == Span((0, 2.5), (0.5,))
    with pytest.raises(ConfigError, match=r"span=\(1, 'a'\) must be a list of 2 values"):
        apply_overrides(Span(), ["span=(1, 'a')"])
    with pytest.raises(ConfigError, match=r"span=\(1, 2, 3\) must be a list of 2 values"):
        apply_overrides(Span(), ["span=(1, 2, 3)"])
    with pytest.raises(ConfigError, match=r"mean=\(True,\) must be a list of numbers or null"):
        apply_overrides(Span(), ["mean=(True,)"])
