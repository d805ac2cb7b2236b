"""`vitsam analyze` on real (smoke) run folders: several runs and families in one call, settings
checked before any work, not-applicable results, and the at-initialisation NTK."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vitsam.cli import main

SMALL = ["--quiet", "--batches", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke BatchNorm ResNet run and a smoke ViT run, trained once."""
    tmp = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITSAM_CACHE", str(tmp / "cache"))
        for name, preset in (("resnet", "mnist-resnet"), ("vit", "mnist-vit")):
            assert main(["train", "--preset", preset, "--smoke", "--quiet", "--run-dir",
                         str(tmp / name)]) == 0
    return tmp


@pytest.fixture
def runs(trained, tmp_path, monkeypatch):
    """Fresh copies of both runs (so each test sees its own analysis.json)."""
    monkeypatch.setenv("VITSAM_CACHE", str(trained / "cache"))
    for name in ("resnet", "vit"):
        shutil.copytree(trained / name, tmp_path / name)
    return tmp_path / "resnet", tmp_path / "vit"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_attention_on_a_resnet_and_a_vit_analyses_both(runs, tmp_path, capsys):
    resnet, vit = runs
    assert main(["analyze", str(resnet), str(vit), "--attention", *SMALL,
                 "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((resnet / "analysis.json").read_text())["attention"]["result"]
    assert res["supported"] is False and "no attention layers" in res["reason"]
    got = json.loads((vit / "analysis.json").read_text())["attention"]["result"]
    assert got["supported"] is True and len(got["entropy_per_block"]) == 1
    assert (vit / "attention_last.png").exists() and not list(resnet.glob("attention_*.png"))
    assert (tmp_path / "cmp" / "attention_entropy.png").exists()
    out = capsys.readouterr().out
    assert "not applicable" in out and "class-token entropy per block" in out


def test_ntk_at_init_is_the_zoos_fresh_build_for_both_families(runs, tmp_path):
    from vitsam.analysis.ntk import ntk_condition_number
    from vitsam.analysis.runner import sample_batches
    from vitsam.data import build_data
    from vitsam.models import build_from_spec
    from vitsam.train.checkpoint import load_run

    resnet, vit = runs
    assert main(["analyze", str(resnet), str(vit), "--ntk", *SMALL, "--out", str(tmp_path / "c"),
                 "--set", "ntk.seeds=[0]", "ntk.num_inputs=4"]) == 0
    for run in (resnet, vit):
        saved = json.loads((run / "analysis.json").read_text())
        # The at-init kappa is that of the zoo's model built under the seed, nothing trained.
        loaded = load_run(run)
        bundle = build_data(loaded.data_config())
        x = sample_batches(bundle.train, bundle.mean, bundle.std, bundle.img_size, 8, 8, 0,
                           "cpu")[0][0][:4]
        torch.manual_seed(0)
        fresh = build_from_spec(loaded.model_spec)
        want = ntk_condition_number(fresh, x).kappa
        at_init = saved["ntk"]["result"]["at_init"]
        np.testing.assert_allclose(at_init["kappas"], [want], rtol=1e-6)
        assert saved["ntk"]["settings"]["model_spec"] == loaded.model_spec


def test_attention_without_rollout_summarises(runs, capsys):
    _, vit = runs
    assert main(["analyze", str(vit), "--attention", *SMALL,
                 "--set", "attention.rollout=false"]) == 0
    result = json.loads((vit / "analysis.json").read_text())["attention"]["result"]
    assert result["entropy_rollout"] is None and "rollout" not in result["maps"]
    line = next(ln for ln in capsys.readouterr().out.splitlines()
                if ln.strip().startswith("attention"))
    assert "class-token entropy per block" in line and "rollout" not in line
    assert (vit / "attention_last.png").exists() and not (vit / "attention_rollout.png").exists()


QUICK_HESSIAN = ["hessian.max_iter=3", "hessian.trace_probes=0"]


# Analyses run in the order hessian, ntk, landscape, sparsity, attention: each bad setting
# below belongs to an analysis (or a part of one) that comes after work that could be done.
@pytest.mark.parametrize("analyses, settings, words", [
    (["--hessian", "--ntk"], [*QUICK_HESSIAN, "ntk.convention=foo"],
     ["ntk.convention=foo", "unknown NTK convention 'foo'"]),
    (["--hessian", "--ntk"], [*QUICK_HESSIAN, "ntk.num_inputs=1"],
     ["ntk.num_inputs=1", "num_inputs must be an integer >= 2"]),
    (["--hessian", "--ntk"], [*QUICK_HESSIAN, "ntk.chunk=0"], ["ntk.chunk=0", "chunk must be"]),
    (["--hessian"], ["hessian.max_iter=3", "hessian.density=true", "hessian.density_steps=1"],
     ["hessian.density_steps=1", "steps must be an integer >= 2"]),
    (["--hessian"], ["hessian.trace_probes=1"],
     ["hessian.trace_probes=1", "0 (skip) or an integer >= 2"]),
    (["--hessian"], ["hessian.backend=jax"], ["hessian.backend=jax", "unknown HVP backend"]),
])
def test_a_bad_setting_of_a_later_analysis_writes_nothing(runs, capsys, monkeypatch, analyses,
                                                          settings, words):
    from vitsam.analysis import runner

    _, vit = runs
    assert main(["analyze", str(vit), "--sparsity", *SMALL]) == 0  # an earlier result on disk
    before = _digest(vit)
    loaded = []
    real_load = runner.load_run
    monkeypatch.setattr(runner, "load_run", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    capsys.readouterr()
    assert main(["analyze", str(vit), *analyses, *SMALL, "--set", *settings]) == 2
    assert _digest(vit) == before  # no analysis ran: analysis.json and figures unchanged
    assert not loaded  # refused before the run and its data were even loaded
    err = capsys.readouterr().err
    assert err.startswith("vitsam: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
