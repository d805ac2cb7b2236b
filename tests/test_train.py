"""Training engine: timeline, end-to-end smoke runs, exact resume, run-folder contents."""
import json

import pytest
import torch

from vitsam.config import TrainConfig, apply_overrides
from vitsam.io import read_jsonl
from vitsam.presets import get_preset
from vitsam.train import engine
from vitsam.train.checkpoint import list_checkpoints, load_run


def test_timeline_converts_every_duration_to_steps() -> None:
    t = TrainConfig(epochs=2.5, warmup_epochs=0.5, eval_every_epochs=1, ckpt_every_epochs=0.5,
                    log_every_steps=7)
    tl = engine.Timeline.from_config(t, steps_per_epoch=10)
    assert (tl.total_steps, tl.warmup_steps, tl.eval_every, tl.ckpt_every, tl.log_every) == \
        (25, 5, 10, 5, 7)
    assert engine.Timeline.from_config(TrainConfig(epochs=3, max_steps=4, warmup_steps=9), 10) \
        .total_steps == 4
    assert [s for s in range(1, 26) if engine.is_time(s, 10, 25)] == [10, 20, 25]


def _tiny(tmp_path, *extra: str):
    cfg = get_preset("mnist-vit-sam", smoke_size=True)
    return apply_overrides(cfg, [f"out_dir={tmp_path}", "train.max_steps=none", "train.epochs=2",
                                 "train.ckpt_every_epochs=0.5", "model.kwargs.drop_rate=0.1",
                                 "train.log_every_steps=2", *extra])


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    cfg = _tiny(tmp_path)
    full = engine.train(cfg, run_dir=tmp_path / "full", progress=False)
    real_step, calls = engine.train_step, {"n": 0}

    def crash_after_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "train_step", real_step)
    assert load_run(tmp_path / "cut").step == 3  # checkpoints every half epoch (3 steps)
    resumed = engine.train(resume=tmp_path / "cut", progress=False)
    a, b = load_run(tmp_path / "full").model, load_run(tmp_path / "cut").model
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert resumed["test_acc"] == full["test_acc"] and resumed["steps"] == full["steps"] == 12
    # The interrupted log is kept aside; the continued log has each step exactly once.
    steps = [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and (tmp_path / "cut" / "metrics.pre-resume-0.jsonl").exists()
    with pytest.raises(ValueError, match="already finished"):
        engine.train(resume=tmp_path / "cut", progress=False)


def test_run_folder_describes_itself(tmp_path) -> None:
    cfg = apply_overrides(get_preset("mnist-resnet-sam", smoke_size=True), [f"out_dir={tmp_path}"])
    final = engine.train(cfg, progress=False)
    run_dir = tmp_path / final["run_dir"].split("/")[-1]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["name"] == "resnet18-c" and saved["optim"]["sam"] is True
    assert 0.0 <= final["test_acc"] <= 1.0 and final["steps"] == 3 and final["params"] > 0
    logs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    for key in ("loss", "acc", "lr", "grad_norm", "eps_norm", "sharpness", "grad_cosine"):
        assert all(key in r for r in logs), key
    assert all(abs(r["eps_norm"] - 0.05) < 1e-4 for r in logs)  # ||eps|| = rho
    assert any("test_acc" in r for r in read_jsonl(run_dir / "metrics.jsonl"))
    run = load_run(run_dir)  # the folder alone rebuilds the model
    assert run.model_spec["in_chans"] == 1 and list_checkpoints(run_dir)
