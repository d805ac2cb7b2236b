"""`vitsam import`: tiny checkpoints in the released layouts (never downloaded) round-trip
exactly into run folders that analyze and eval accept; bad files are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jax_layout import mixer_arrays, mixer_forward, randomise, vit_arrays, vit_forward
from vitsam.cli import main
from vitsam.models import create_model
from vitsam.models.released import Released, ReleasedError, read_released
from vitsam.train.checkpoint import load_run
from vitsam.train.importer import zoo_model

# 8 px one-channel images (the sklearn digits' own size), patch 4: 4 patches.
VIT_KW = dict(patch_size=4, embed_dim=16, depth=2, num_heads=2)
MIXER_KW = dict(patch_size=4, embed_dim=16, num_blocks=2)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSAM_CACHE", str(tmp_path / "cache"))


def _vit() -> torch.nn.Module:
    return randomise(create_model("vit-t4", num_classes=10, img_size=8, in_chans=1, **VIT_KW))


def _mixer() -> torch.nn.Module:
    return randomise(create_model("mixer-t4", num_classes=10, img_size=8,
                                  in_chans=1, **MIXER_KW), seed=1)


def _npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", ["vit", "mixer"])
def test_npz_round_trips_exactly_and_matches_the_flax_forward(family, tmp_path, capsys):
    direct = _vit() if family == "vit" else _mixer()
    arrays = vit_arrays(direct) if family == "vit" else mixer_arrays(direct)
    npz = _npz(tmp_path / "ckpt.npz", arrays)
    assert main(["import", str(npz), "--out", str(tmp_path / "run"), "--data", "digits"]) == 0
    assert "run folder ->" in capsys.readouterr().out
    run = load_run(tmp_path / "run")
    assert run.model_spec["num_classes"] == 10 and run.model_spec["img_size"] == 8
    for k, v in direct.state_dict().items():
        assert torch.equal(run.model.state_dict()[k], v), k
    x = _x()
    with torch.no_grad():
        got, want = run.model(x), direct(x)
    assert torch.equal(got, want)
    # ... and both are the checkpoint's own function, computed from the Flax layout in numpy.
    ref = (vit_forward if family == "vit" else mixer_forward)(arrays, x.numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_imported_folder_records_the_checkpoints_input_convention(tmp_path):
    npz = _npz(tmp_path / "ViT-tiny.npz", vit_arrays(_vit()))
    assert main(["import", str(npz), "--out", str(tmp_path / "run"), "--data", "digits",
                 "--set", "optim.sam=true", "optim.rho=0.05"]) == 0
    rec = json.loads((tmp_path / "run" / "data.json").read_text())
    assert rec["mean"] == [0.5] and rec["std"] == [0.5] and rec["preprocessing"]["crop_pct"] == 0.9
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["name"] == "ViT-tiny" and cfg["optim"]["sam"] is True
    assert cfg["data"]["source"] == "digits" and cfg["data"]["img_size"] == 8
    state = json.loads((tmp_path / "run" / "checkpoints" / "final" / "state.json").read_text())
    assert state["extra"]["imported"]["layout"] == "vision_transformer .npz (ViT)"
    assert len(state["extra"]["imported"]["sha256"]) == 64
    # The analyses feed the model as data.json says, not with the digits' own statistics.
    from vitsam.data import build_data
    from vitsam.data.record import feed_of

    bundle = build_data(load_run(tmp_path / "run").data_config())
    assert feed_of(tmp_path / "run", bundle) == ([0.5], [0.5], 0.9)
    assert list(bundle.mean) != [0.5]


def test_analyze_hessian_and_eval_accept_an_imported_folder(tmp_path):
    npz = _npz(tmp_path / "ckpt.npz", vit_arrays(_vit()))
    run = tmp_path / "run"
    assert main(["import", str(npz), "--out", str(run), "--data", "digits"]) == 0
    assert main(["analyze", str(run), "--hessian", "--quiet", "--batches", "1", "--batch-size",
                 "8", "--set", "hessian.max_iter=3", "hessian.trace_probes=0"]) == 0
    hess = json.loads((run / "analysis.json").read_text())["hessian"]
    assert np.isfinite(hess["result"]["lambda_max"]) and hess["samples"] == 8
    assert main(["eval", str(run), "--quiet", "--batch-size", "128"]) == 0
    test = json.loads((run / "eval.json").read_text())["test"]
    assert test["normalisation"] == {"mean": [0.5], "std": [0.5], "from": "data.json"}
    assert 0.0 <= test["top1"] <= 1.0


def test_timm_safetensors_import_and_model_choice(tmp_path):
    direct = randomise(create_model("vit-t4", num_classes=10, img_size=8, in_chans=1,
                                    patch_size=4, embed_dim=64, depth=1, num_heads=1))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in direct.state_dict().items()}, str(path))
    rel = read_released(path)
    assert rel.arch["num_heads"] is None  # timm files do not record it: width / 64
    assert zoo_model(rel) == ("vit-t4", {"embed_dim": 64, "depth": 1, "num_heads": 1})
    assert main(["import", str(path), "--out", str(tmp_path / "run"), "--data", "digits"]) == 0
    with torch.no_grad():
        assert torch.equal(load_run(tmp_path / "run").model(_x()), direct(_x()))


@pytest.mark.parametrize("family,arch,want", [
    ("vit", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0), "vit-b16"),
    ("vit", dict(patch_size=32, embed_dim=768, depth=12, num_heads=None, mlp_ratio=4.0), "vit-b32"),
    ("mixer", dict(patch_size=16, embed_dim=768, num_blocks=12, mlp_ratio=(0.5, 4.0)), "mixer-b16"),
])
def test_the_papers_shapes_map_onto_the_papers_zoo_models(family, arch, want):
    rel = Released(Path("x"), family, "test", {**arch, "num_classes": 1000, "img_size": 224,
                                                "in_chans": 3}, {}, {})
    assert zoo_model(rel) == (want, {})


def _one_line_error(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vitsam: error:"), err
    for w in words:
        assert w in err, err


def test_bad_files_are_one_line_errors_naming_the_key(tmp_path, capsys):
    good = vit_arrays(_vit())
    out = str(tmp_path / "run")
    # another architecture than --model: the key and both shapes
    npz = _npz(tmp_path / "a.npz", good)
    _one_line_error(["import", str(npz), "--out", out, "--model", "vit-s4"], capsys,
                    "'embedding/kernel'", "(16, 1, 4, 4)", "(384, 1, 4, 4)", "vit-s4")
    _one_line_error(["import", str(npz), "--out", out, "--model", "mixer-t4"], capsys,
                    "not a zoo ViT")
    # a representation layer the zoo's ViT does not have
    npz = _npz(tmp_path / "b.npz", {**good, "pre_logits/kernel": np.zeros((16, 16), np.float32)})
    _one_line_error(["import", str(npz), "--out", out], capsys, "'pre_logits/kernel'")
    # a missing tensor
    npz = _npz(tmp_path / "c.npz", {k: v for k, v in good.items()
                                    if k != "Transformer/encoderblock_1/LayerNorm_2/bias"})
    _one_line_error(["import", str(npz), "--out", out], capsys,
                    "'Transformer/encoderblock_1/LayerNorm_2/bias'")
    # an unknown layout
    npz = _npz(tmp_path / "d.npz", {"conv_root/kernel": np.zeros((3, 3, 3, 8), np.float32)})
    _one_line_error(["import", str(npz), "--out", out], capsys, "'conv_root/kernel'")
    # a truncated download, and a format vitsam does not read
    (tmp_path / "e.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:100])
    _one_line_error(["import", str(tmp_path / "e.npz"), "--out", out], capsys, "cannot be read")
    (tmp_path / "f.pth").write_bytes(b"x")
    _one_line_error(["import", str(tmp_path / "f.pth"), "--out", out], capsys, "'.pth'")
    # inconsistent attention shapes
    bad = dict(good)
    bad["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"] = np.zeros((16, 3, 4), np.float32)
    _one_line_error(["import", str(_npz(tmp_path / "g.npz", bad)), "--out", out], capsys,
                    "'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'")
    # integers where weights belong
    bad = {**good, "head/bias": np.arange(10)}
    _one_line_error(["import", str(_npz(tmp_path / "h.npz", bad)), "--out", out], capsys,
                    "'head/bias'", "int")
    assert not Path(out).exists()


def test_import_refuses_to_overwrite_a_training_run_and_model_overrides(tmp_path, capsys):
    npz = _npz(tmp_path / "a.npz", vit_arrays(_vit()))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text("{}\n")
    _one_line_error(["import", str(npz), "--out", str(busy)], capsys, "already holds")
    _one_line_error(["import", str(npz), "--out", str(tmp_path / "r"), "--set", "model.name=x"],
                    capsys, "--model")


def test_without_data_the_folder_asks_for_a_root(tmp_path, capsys):
    npz = _npz(tmp_path / "a.npz", vit_arrays(_vit()))
    run = tmp_path / "run"
    assert main(["import", str(npz), "--out", str(run)]) == 0
    capsys.readouterr()
    _one_line_error(["analyze", str(run), "--hessian", "--quiet"], capsys, "root")


def test_a_timm_file_with_a_missing_block_is_refused_naming_the_block(tmp_path):
    direct = create_model("vit-t4", num_classes=10, img_size=8, in_chans=1, patch_size=4,
                          embed_dim=64, depth=3, num_heads=1)
    state = {k: v.contiguous() for k, v in direct.state_dict().items()
             if not k.startswith("blocks.1.")}
    path = tmp_path / "gap.safetensors"
    save_file(state, str(path))
    with pytest.raises(ReleasedError, match=r"block 1 is missing \(blocks\.1\.\.\.\)"):
        read_released(path)
