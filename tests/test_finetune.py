"""`vitsam finetune`: a run (here an imported tiny checkpoint) carried to other data and another
resolution: position embedding resampled (identity at the same size), new classifier for the
new classes, every other weight the source's at step 0; the new run works with the other
commands."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jax_layout import mixer_arrays, randomise, vit_arrays
from vitsam.cli import main
from vitsam.models import create_model
from vitsam.models.transfer import resample_pos_embed
from vitsam.train.checkpoint import load_run
from vitsam.train.engine import Trainer
from vitsam.train.finetune import finetune_config

FAST = ["train.max_steps=2", "train.batch_size=16", "train.train_eval_samples=32",
        "train.log_every_steps=1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def source(tmp_path) -> Path:
    """An imported tiny ViT (1 channel, 8 px, patch 4, 10 classes) evaluated on the digits."""
    model = randomise(create_model("vit-t4", num_classes=10, img_size=8, in_chans=1,
                                   patch_size=4, embed_dim=16, depth=2, num_heads=2))
    np.savez(tmp_path / "src.npz", **vit_arrays(model))
    assert main(["import", str(tmp_path / "src.npz"), "--out", str(tmp_path / "src"),
                 "--data", "digits"]) == 0
    return tmp_path / "src"


def _folder(root: Path, classes: int = 3, mode: str = "L") -> Path:
    """root/{train,val}/c<k>/*.png: tiny 8 px images, 6 training and 2 test images per class."""
    rng = np.random.default_rng(0)
    for k in range(classes):
        for split, n in (("train", 6), ("val", 2)):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (8, 8) if mode == "L" else (8, 8, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    root / split / f"c{k}" / f"{i}.png")
    return root


def test_pos_embed_resampling_is_the_identity_at_the_same_size_and_bicubic_otherwise():
    pos = torch.randn(1, 1 + 9, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resample_pos_embed(pos, (3, 3), 1), pos)
    up = resample_pos_embed(pos, (6, 6), 1)
    assert up.shape == (1, 1 + 36, 8) and torch.equal(up[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 3, 3, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(up[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, 8))
    # A constant table stays constant (bicubic weights sum to one).
    flat = torch.full((1, 1 + 4, 3), 0.25)
    torch.testing.assert_close(resample_pos_embed(flat, (5, 5), 1), torch.full((1, 26, 3), 0.25))


def test_new_data_at_another_size_new_head_resampled_positions_and_the_same_backbone(source, tmp_path):
    data = _folder(tmp_path / "folder")
    cfg = finetune_config(source, "imagefolder", str(data), img_size=16, overrides=FAST)
    tr = Trainer.build(cfg)
    src = load_run(source).model.state_dict()
    got = tr.model.state_dict()
    assert tr.spec["num_classes"] == 3 and tr.model.head.out_features == 3
    assert tr.spec["img_size"] == 16 and got["pos_embed"].shape == (1, 1 + 16, 16)
    for key, value in src.items():
        if key.startswith("head.") or key == "pos_embed":
            continue
        assert torch.equal(got[key], value), key
    assert torch.equal(got["pos_embed"], resample_pos_embed(src["pos_embed"], (4, 4), 1))
    assert tr.init["head"] == "new" and tr.init["pos_embed"] == [2, [4, 4]]


def test_same_size_keeps_every_position_and_same_classes_keep_the_head(source, tmp_path):
    cfg = finetune_config(source, "digits", overrides=FAST)
    assert cfg.optim.name == "sgd" and cfg.optim.weight_decay == 0.0 and not cfg.optim.sam
    tr = Trainer.build(cfg)
    src = load_run(source).model.state_dict()
    for key, value in src.items():  # the imported run records no classes: the head is new
        if not key.startswith("head."):
            assert torch.equal(tr.model.state_dict()[key], value), key
    assert not torch.equal(tr.model.head.weight, src["head.weight"])
    assert tr.init["pos_embed"] is None and tr.init["head"] == "new"
    # A fine-tuned run on the digits, fine-tuned again on the digits: same classes, head kept.
    out = tmp_path / "ft"
    assert main(["finetune", str(source), "--data", "digits", "--out", str(out), "--quiet",
                 "--set", *FAST, "optim.sam=true"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["sam"] is True and final["steps"] == 2 and final["init"]["head"] == "new"
    again = Trainer.build(finetune_config(out, "digits", overrides=FAST))
    assert again.init["head"] == "kept"
    for key, value in load_run(out).model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


def test_the_fine_tuned_run_works_with_analyze_and_eval(source, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(source), "--data", "digits", "--img-size", "16", "--out",
                 str(out), "--quiet", "--set", *FAST]) == 0
    assert "position embedding 2x2 -> 4x4" in capsys.readouterr().out
    assert main(["analyze", str(out), "--hessian", "--quiet", "--batches", "1", "--batch-size",
                 "8", "--set", "hessian.max_iter=3", "hessian.trace_probes=0"]) == 0
    assert main(["eval", str(out), "--quiet"]) == 0
    assert json.loads((out / "eval.json").read_text())["test"]["top1"] >= 0.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["init_from"] == str(source.resolve())
    assert cfg["model"]["init_checkpoint"] == "final"


def test_a_source_with_other_input_channels_has_its_first_convolution_adapted(source, tmp_path):
    data = _folder(tmp_path / "rgb", mode="RGB")
    tr = Trainer.build(finetune_config(source, "imagefolder", str(data), overrides=FAST))
    w_src = load_run(source).model.patch_embed.proj.weight
    w = tr.model.patch_embed.proj.weight
    assert tr.init["in_chans"] == [1, 3] and w.shape[1] == 3
    torch.testing.assert_close(w.sum(dim=1, keepdim=True), w_src)  # grey input: the same output


def test_mixer_at_another_size_and_bad_sources_are_one_line_errors(tmp_path, capsys):
    model = randomise(create_model("mixer-t4", num_classes=10, img_size=8, in_chans=1,
                                   patch_size=4, embed_dim=16, num_blocks=1))
    np.savez(tmp_path / "m.npz", **mixer_arrays(model))
    assert main(["import", str(tmp_path / "m.npz"), "--out", str(tmp_path / "m"), "--data",
                 "digits"]) == 0
    capsys.readouterr()
    for argv, sets, words in (
            ([str(tmp_path / "m"), "--img-size", "16"], [], ["mlp_tokens", "token-mixing"]),
            ([str(tmp_path / "nowhere")], [], ["does not exist"]),
            ([str(tmp_path / "m")], ["model.kwargs.num_blocks=2"], ["blocks.1", "architectures differ"])):
        assert main(["finetune", *argv, "--data", "digits", "--out", str(tmp_path / "ft"),
                     "--quiet", "--set", *FAST, *sets]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_a_run_interrupted_before_its_first_checkpoint_resumes_from_the_source(source, tmp_path,
                                                                               monkeypatch):
    argv = ["--data", "digits", "--img-size", "16", "--quiet", "--set", *FAST]
    assert main(["finetune", str(source), "--out", str(tmp_path / "whole"), *argv]) == 0
    monkeypatch.setenv("VITSAM_FAULT", "enospc_at:ckpt_write")  # the only checkpoint fails
    assert main(["finetune", str(source), "--out", str(tmp_path / "cut"), *argv]) == 2
    assert not list((tmp_path / "cut" / "checkpoints").glob("step-*"))
    monkeypatch.delenv("VITSAM_FAULT")
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    whole, cut = load_run(tmp_path / "whole").model, load_run(tmp_path / "cut").model
    for key, value in whole.state_dict().items():  # started again from the source's weights
        assert torch.equal(cut.state_dict()[key], value), key
    assert json.loads((tmp_path / "cut" / "final.json").read_text())["init"]["pos_embed"] == [2, [4, 4]]


def test_init_from_null_is_the_same_recipe_from_random_weights(source, tmp_path, capsys):
    """The scratch baseline of a transfer result: same architecture, data and optimiser."""
    out = tmp_path / "scratch"
    assert main(["finetune", str(source), "--data", "digits", "--out", str(out), "--quiet",
                 "--set", *FAST, "model.init_from=null"]) == 0
    assert "started from random weights" in capsys.readouterr().out
    final = json.loads((out / "final.json").read_text())
    assert "init" not in final or not final["init"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["init_from"] is None and cfg["optim"]["name"] == "sgd"
    src = load_run(source).model.state_dict()
    scratch = Trainer.build(finetune_config(source, "digits", overrides=[*FAST, "model.init_from=null"]))
    assert not torch.equal(scratch.model.state_dict()["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])
