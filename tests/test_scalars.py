"""TensorBoard scalars mirror metrics.jsonl exactly (train.tensorboard=true)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vitsam.config import ConfigError, apply_overrides
from vitsam.presets import get_preset
from vitsam.train.engine import train


def _events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_equal_the_json_log(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = apply_overrides(get_preset("mnist-vit-sam", smoke_size=True),
                          ["train.tensorboard=true", "train.max_steps=4", "train.log_every_steps=2"])
    train(cfg, run_dir=tmp_path / "run", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = _events(tmp_path / "run")
    train_recs = [r for r in recs if "loss" in r]
    assert [s for s, _ in ev["train/loss"]] == [r["step"] for r in train_recs] == [2, 4]
    for r in train_recs:
        for key in ("loss", "lr", "sharpness", "acc"):
            got = dict(ev[f"train/{key}"])[r["step"]]
            assert got == pytest.approx(r[key], rel=1e-6), key  # float32 in the event file
    test_recs = [r for r in recs if "test_acc" in r]
    assert [v for _, v in ev["test/acc"]] == pytest.approx([r["test_acc"] for r in test_recs])
    assert "train/step" not in ev and "train/epoch" not in ev


def test_tensorboard_missing_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    cfg = apply_overrides(get_preset("mnist-vit", smoke_size=True), ["train.tensorboard=true"])
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        train(cfg, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything is written
