"""Helper for exact-resume tests: one run uninterrupted, the same run interrupted and resumed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vitsam.config import RunConfig
from vitsam.train import engine
from vitsam.train.checkpoint import load_run


def whole_and_resumed(cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int = 5,
                      resumed_from: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """``final.json`` of ``cfg`` trained in ``tmp_path/whole`` and in ``tmp_path/cut``, the latter
    interrupted (KeyboardInterrupt) as optimiser step ``stop_at`` begins, checked to hold its
    last checkpoint at step ``resumed_from``, then resumed to the end."""
    whole = engine.train(cfg, run_dir=tmp_path / "whole", progress=False)
    real, calls = engine.train_step, {"n": 0}

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "train_step", real)
    assert load_run(tmp_path / "cut").step == resumed_from
    return whole, engine.train(resume=tmp_path / "cut", progress=False)


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    """Two run folders hold bit-equal final weights and the same metrics.jsonl training
    records, images/s aside (the one number that depends on the machine's load)."""
    from vitsam.io import read_jsonl

    a, b = load_run(a_dir).model.state_dict(), load_run(b_dir).model.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = lambda d: [{k: v for k, v in r.items() if k != "images_per_s"}  # noqa: E731
                     for r in read_jsonl(d / "metrics.jsonl") if "loss" in r]
    assert log(a_dir) == log(b_dir)
