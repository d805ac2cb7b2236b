"""Label noise: the exact number of replaced labels, their distribution, the clean test split,
and the memorisation of the noisy samples logged by training."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vitsam.config import apply_overrides
from vitsam.data import DataConfig, build_data
from vitsam.data.errors import DataError
from vitsam.data.noise import corrupt_labels
from vitsam.presets import get_preset
from vitsam.train import engine
from vitsam.train.checkpoint import load_run


def test_symmetric_noise_replaces_exactly_the_rate_with_other_classes_uniformly() -> None:
    k, n = 10, 90_000
    labels = torch.arange(n) % k
    new, rec = corrupt_labels(labels, k, 0.3, "symmetric", seed=3)
    changed = (new != labels).nonzero().flatten()
    assert len(changed) == round(0.3 * n) == len(rec.index)  # every drawn label really changes
    assert torch.equal(changed, rec.index)
    assert torch.equal(rec.true, labels[rec.index]) and torch.equal(rec.given, new[rec.index])
    # The offset to the true class is uniform over 1..k-1 (each 1/9 of 27,000 = 3,000).
    offsets = torch.bincount((rec.given - rec.true) % k, minlength=k)
    assert offsets[0] == 0
    assert all(abs(int(c) - 3000) < 200 for c in offsets[1:]), offsets  # ~3.7 sigma
    assert torch.equal(corrupt_labels(labels, k, 0.3, seed=3)[0], new)  # fixed by the seed
    assert not torch.equal(corrupt_labels(labels, k, 0.3, seed=4)[0], new)


def test_pair_noise_moves_to_the_next_class() -> None:
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    new, rec = corrupt_labels(labels, 3, 0.5, "pair", seed=0)
    assert len(rec.index) == 4
    assert torch.equal(rec.given, torch.tensor([(int(t) + 1) % 3 for t in rec.true]))
    keep = torch.ones(8, dtype=torch.bool)
    keep[rec.index] = False
    assert torch.equal(new[keep], labels[keep])


def test_build_data_corrupts_training_labels_only() -> None:
    clean = build_data(DataConfig(source="digits", train_fraction=0.5))
    noisy = build_data(DataConfig(source="digits", train_fraction=0.5, label_noise=0.25))
    assert torch.equal(noisy.train.images, clean.train.images)
    assert torch.equal(noisy.test.labels, clean.test.labels)
    diff = (noisy.train.labels != clean.train.labels).nonzero().flatten()
    assert torch.equal(diff, noisy.noisy.index)
    assert len(diff) == round(0.25 * len(clean.train))
    assert torch.equal(noisy.noisy.true, clean.train.labels[diff])
    assert "training labels replaced: symmetric noise at 0.25" in noisy.description


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "x"])
def test_impossible_noise_rates_are_refused(bad) -> None:
    with pytest.raises(DataError, match="label_noise must be a number in"):
        DataConfig(source="digits", label_noise=bad)
    with pytest.raises(DataError, match="symmetric, pair"):
        DataConfig(source="digits", label_noise=0.1, label_noise_kind="flip")


def test_training_logs_how_many_noisy_labels_the_model_memorised(tmp_path) -> None:
    cfg = apply_overrides(get_preset("mnist-resnet", smoke_size=True),
                          [f"out_dir={tmp_path}", "data.source=digits", "data.img_size=8",
                           "data.label_noise=0.4", "data.label_noise_kind=pair",
                           "train.max_steps=none", "train.epochs=2",
                           "train.eval_every_epochs=1"])
    final = engine.train(cfg, run_dir=tmp_path / "run", progress=False)
    bundle = build_data(cfg.data)
    rec = final["label_noise"]
    assert rec["num_noisy"] == round(0.4 * len(bundle.train)) and rec["kind"] == "pair"
    # Independently: the final model's predictions on the noisy training images.
    model = load_run(tmp_path / "run").model
    m, sd = (torch.tensor(v).view(1, -1, 1, 1) for v in (bundle.mean, bundle.std))
    x = (bundle.train.images[bundle.noisy.index].float() / 255 - m) / sd  # 8x8 as stored
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert rec["noisy_memorised"] == pytest.approx(float((pred == bundle.noisy.given).float().mean()))
    assert rec["noisy_true"] == pytest.approx(float((pred == bundle.noisy.true).float().mean()))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [r for r in logged if "test_acc" in r]
    assert len(evals) == 2 and all("noisy_memorised" in r and "noisy_true" in r for r in evals)
