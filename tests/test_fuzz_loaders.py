"""Seeded fuzzing of every reader of the files vitsam writes or is given by others: damaged JSON
(truncations, bit flips, values of the wrong type, huge lengths) and damaged safetensors headers
give a one-line vitsam error (or, for a harmless change, a normal result), never a traceback
and never a hang (each case runs under an alarm). A few hundred cases in a few seconds.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from vitsam.config import ConfigError, RunConfig, to_dict
from vitsam.data import DataError, load_data_record
from vitsam.data import cache
from vitsam.data.corruptions import (CorruptionSetError, build_corruption_set, iter_corruption_set,
                                     load_clean_set, load_corruption_set)
from vitsam.data.preprocess import describe
from vitsam.io import DamagedFileError
from vitsam.models import ModelError, create_model, make_spec
from vitsam.train.checkpoint import CheckpointError, load_run, save_checkpoint

VITSAM_ERRORS = (ConfigError, DataError, CheckpointError, CorruptionSetError, ModelError, DamagedFileError)
CASES = 30  # per file kind (about 320 cases in all)
SECONDS = 10  # per case


@contextmanager
def _deadline(seconds: float):
    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _expect_clean(read: Callable[[], Any], must_fail: bool, what: str) -> str:
    """Run ``read``; it may succeed (unless ``must_fail``) or raise a one-line vitsam error."""
    try:
        with _deadline(SECONDS):
            read()
    except VITSAM_ERRORS as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 2000, (what, msg[:300])
        return "error"
    assert not must_fail, what
    return "ok"


# ------------------------------------------------------------------ mutations
def _random_value(rng: random.Random) -> Any:
    return rng.choice([None, True, -1, 0, 2**70, 1e308, float("nan"), "", "x" * 100, [], [1, "a"], {},
                       {"a": [None]}, "../../etc/passwd", "/etc/passwd", -3.5])


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _paths(v, prefix + (i,))
    return out


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = _set(obj[path[0]], path[1:], value)
    return obj


def json_mutations(good: bytes, rng: random.Random, n: int) -> list[tuple[str, bytes, bool]]:
    """(kind, damaged bytes, must the reader fail?) for a JSON file's ``good`` bytes."""
    data = json.loads(good)
    out: list[tuple[str, bytes, bool]] = []
    for i in range(n):
        kind = ("truncate", "flip", "type", "type", "huge")[i % 5]
        if kind == "truncate":
            cut = rng.randrange(0, max(1, len(good.rstrip()) - 1))
            out.append((kind, good[:cut], True))  # every proper prefix of an object is invalid
        elif kind == "flip":
            b = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(len(b))
                b[pos] ^= 1 << rng.randrange(8)
            out.append((kind, bytes(b), False))
        elif kind == "type":
            d = json.loads(good)
            path = rng.choice(_paths(d))
            out.append((kind, json.dumps(_set(d, path, _random_value(rng))).encode(), False))
        else:
            d = json.loads(good)
            path = rng.choice(_paths(d)[1:] or [()])
            huge = rng.choice([["x" * 200_000], "y" * 200_000, list(range(50_000))])
            text = json.dumps(_set(d, path, huge))
            if rng.random() < 0.5:  # and the other kinds of huge: deep nesting, endless digits
                text = rng.choice(["[" * 5_000 + "]" * 5_000, "1" + "0" * 10_000,
                                   '{"format": ' + "[" * 5_000 + "]" * 5_000 + "}"])
            out.append((kind, text.encode(), False))
    del data
    return out


def safetensors_mutations(good: bytes, rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """Damaged safetensors files: the 8-byte length, the JSON header and its fields."""
    hlen = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + hlen])
    body = good[8 + hlen:]
    out = []
    for i in range(n):
        kind = ("truncate", "flip", "length", "field", "field")[i % 5]
        if kind == "truncate":
            out.append((kind, good[:rng.randrange(0, len(good))]))
        elif kind == "flip":
            b = bytearray(good)
            pos = rng.randrange(0, 8 + hlen)
            b[pos] ^= 1 << rng.randrange(8)
            out.append((kind, bytes(b)))
        elif kind == "length":
            n_claim = rng.choice([0, 1, hlen - 1, hlen + 1, len(good), 2**40, 2**63 - 1, 2**64 - 1])
            out.append((kind, struct.pack("<Q", n_claim) + good[8:]))
        else:
            h = json.loads(json.dumps(header))
            name = rng.choice([k for k in h if k != "__metadata__"])
            field = rng.choice(["dtype", "shape", "data_offsets"])
            h[name][field] = rng.choice([5, "F99", [2**62, 2**62], [-1], [0, 2**63], "x", None,
                                         [10**6, 10**6, 10**6], [1, 0]])
            text = json.dumps(h).encode()
            out.append((kind, struct.pack("<Q", len(text)) + text + body))
    return out


# ------------------------------------------------------------------ a run folder, built directly
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    cfg = RunConfig(name="fuzz")
    torch.manual_seed(0)
    tiny = {"depth": 1, "embed_dim": 12, "num_heads": 1}
    model = create_model("vit-t4", 10, 28, 1, **tiny)
    spec = make_spec("vit-t4", 10, 28, 1, tiny)
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    (run / "data.json").write_text(json.dumps({
        "format": "vitsam-data/1", "mean": [0.13], "std": [0.31], "in_chans": 1, "img_size": 28,
        "native_size": 28, "classes": [str(i) for i in range(10)], "train_images": 4000,
        "description": "mnist5k", "preprocessing": describe(28, 1.0), "skipped_files": 0}))
    save_checkpoint(run, "step-00000001", model, spec, to_dict(cfg), step=1, epoch=0)
    return run


def _fresh(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


@contextmanager
def _damaged(path: Path, bad: bytes):
    """``path`` holds ``bad`` inside the block, its own bytes again after it."""
    good = path.read_bytes()
    path.write_bytes(bad)
    try:
        yield
    finally:
        path.write_bytes(good)


def test_fuzz_checkpoint_state_json(run_dir, tmp_path):
    rng = random.Random(1)
    state = run_dir / "checkpoints" / "step-00000001" / "state.json"
    outcomes = []
    run = _fresh(run_dir, tmp_path / "r")
    for kind, bad, must in json_mutations(state.read_bytes(), rng, CASES):
        def read() -> None:
            loaded = load_run(run)
            loaded.data_config()  # the config saved in the checkpoint, as every command reads it

        with _damaged(run / "checkpoints" / "step-00000001" / "state.json", bad):
            outcomes.append(_expect_clean(read, must, f"state.json {kind}"))
    assert outcomes.count("error") >= CASES // 2


def test_fuzz_checkpoint_weights(run_dir, tmp_path):
    """With the checksum every damaged byte is caught; without it (a hand-made or foreign
    checkpoint) the safetensors parser and the shape check must still answer in one line."""
    rng = random.Random(2)
    ckpt = run_dir / "checkpoints" / "step-00000001"
    good = (ckpt / "model.safetensors").read_bytes()
    run = _fresh(run_dir, tmp_path / "r")
    c = run / "checkpoints" / "step-00000001"
    for with_sum in (True, False):
        if not with_sum:
            state = json.loads((c / "state.json").read_text())
            state["sha256"] = {}
            (c / "state.json").write_text(json.dumps(state))
        for kind, bad in safetensors_mutations(good, rng, CASES):
            with _damaged(c / "model.safetensors", bad):
                _expect_clean(lambda: load_run(run), with_sum and bad != good, f"weights {kind} sum={with_sum}")


def test_checkpoint_of_an_unknown_model_or_other_shapes_is_refused(run_dir, tmp_path):
    for edit, words in [
        (lambda s: s["model_spec"].update(name="vit-huge-9"), ["cannot be built", "unknown model 'vit-huge-9'"]),
        (lambda s: s["model_spec"].update(num_classes=7), ["do not match the model 'vit-t4'",
                                                            "of another shape or type", "head"]),
        (lambda s: s["model_spec"]["kwargs"].update(depth=2), ["do not match", "missing (e.g. blocks.1."]),
        (lambda s: s["model_spec"]["kwargs"].update(embed_dim=2**20), ["do not match"]),  # nothing allocated
        (lambda s: s["model_spec"]["kwargs"].update(embed_dim=2**40), ["cannot be built"]),
        (lambda s: s["model_spec"].update(img_size="28"), ["model_spec.img_size='28' must be a positive integer"]),
    ]:
        run = _fresh(run_dir, tmp_path / "r")
        path = run / "checkpoints" / "step-00000001" / "state.json"
        state = json.loads(path.read_text())
        edit(state)
        path.write_text(json.dumps(state))
        with _deadline(SECONDS), pytest.raises(CheckpointError) as info:
            load_run(run)
        for w in words:
            assert w in str(info.value), (w, str(info.value))


def test_fuzz_run_config(run_dir, tmp_path):
    from vitsam.train.engine import _saved_config  # the reader `vitsam train --resume` uses

    rng = random.Random(3)
    run = _fresh(run_dir, tmp_path / "r")
    shutil.rmtree(run / "checkpoints")  # no checkpoint copy of the config to fall back to
    for kind, bad, must in json_mutations((run_dir / "config.json").read_bytes(), rng, CASES):
        with _damaged(run / "config.json", bad):
            _expect_clean(lambda: _saved_config(run), must, f"config.json {kind}")


def test_fuzz_data_record(run_dir, tmp_path):
    rng = random.Random(4)
    for kind, bad, must in json_mutations((run_dir / "data.json").read_bytes(), rng, CASES):
        (tmp_path / "data.json").write_bytes(bad)
        _expect_clean(lambda: load_data_record(tmp_path), must, f"data.json {kind}")


# ------------------------------------------------------------------ a corruption set
@pytest.fixture(scope="module")
def corruption_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cset") / "set"
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    build_corruption_set(images, np.array([0, 1, 2]), out, params="cifar-c", corruptions=["gaussian_noise"],
                         severities=[1], workers=0, progress=False)
    return out


def test_fuzz_corruption_manifest(corruption_set, tmp_path):
    rng = random.Random(5)
    good = (corruption_set / "manifest.json").read_bytes()
    (tmp_path / "outside.npy").write_bytes((corruption_set / "labels.npy").read_bytes())
    cases = json_mutations(good, rng, CASES)
    man = json.loads(good)
    man["labels"]["file"] = "../outside.npy"  # a path out of the set folder
    cases.append(("escape", json.dumps(man).encode(), True))
    man["labels"]["file"] = str(tmp_path / "outside.npy")
    cases.append(("absolute", json.dumps(man).encode(), True))
    s = _fresh(corruption_set, tmp_path / "s")

    def read() -> None:
        load_corruption_set(s, complete=True)
        list(iter_corruption_set(s))
        load_clean_set(s)

    for kind, bad, must in cases:
        with _damaged(s / "manifest.json", bad):
            _expect_clean(read, must, f"manifest {kind}")


# ------------------------------------------------------------------ cache entries
def test_fuzz_cache_entries(tmp_path, capsys):
    """A damaged entry is never trusted: it is rebuilt (one warning line) and the result is
    exactly what the builder gives."""
    from vitsam.data.build import _check_entry

    def build() -> dict:
        return {"train_images": torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4),
                "train_labels": torch.tensor([0, 1]), "test_images": torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
                "test_labels": torch.tensor([1]), "classes": ["a", "b"], "test_ids": ["b/0.png"],
                "bad_files": []}

    path = cache.cache_path(tmp_path, "t", "k" * 24)
    cache.load_or_build(tmp_path, "t", "k" * 24, build)
    good = path.read_bytes()
    rng = random.Random(6)
    cases = [(k, b) for k, b in safetensors_mutations(good, rng, CASES)]
    flips = []
    for _ in range(CASES):  # anywhere in the file, tensor bytes and metadata included
        b = bytearray(good)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        flips.append(("flip-anywhere", bytes(b)))
    for kind, bad in cases + flips:
        path.write_bytes(bad)
        capsys.readouterr()
        with _deadline(SECONDS):
            got = cache.load_or_build(tmp_path, "t", "k" * 24, build, check=_check_entry)
        err = capsys.readouterr().err
        want = build()
        assert got.keys() == want.keys(), kind
        assert all(torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v
                   for k, v in want.items()), kind
        assert err.count("\n") == (0 if bad == good else 1), (kind, err)


# ------------------------------------------------------------------ what the report reads
@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("study")
    grid, cells = [], {}
    for i, method in enumerate(("vanilla", "sam")):
        name = f"vit-{method}-s0"
        grid.append({"name": name, "family": "vit", "method": method, "seed": 0, "fraction": 1.0})
        cells[name] = {"status": "done"}
        c = d / name
        c.mkdir()
        (c / "final.json").write_text(json.dumps({"name": name, "params": 1000, "test_acc": 0.5 + i / 10,
                                                  "train_acc": 0.9, "train_images_per_s": 100.0}))
        (c / "analysis.json").write_text(json.dumps({
            "hessian": {"result": {"lambda_max": 3.0 - i, "loss": 0.1}, "settings": {"k": 1}, "samples": 8},
            "ntk": {"result": {"at_init": {"kappas": [1.0, 2.0]}, "convention": "mean"}},
            "sparsity": {"result": {"layers": {"blocks.0": {"mean_active_pct_per_image": 40.0}}}},
            "attention": {"result": {"supported": True, "entropy_per_block": [1.0, 0.5]}}}))
        (c / "eval.json").write_text(json.dumps({"corruptions": {"mean_corruption_accuracy": 0.4,
                                                                 "params": "cifar-c", "n": 3}}))
        (c / "sharpness.json").write_text(json.dumps({"checkpoints": [{"step": 1, "lambda_max": 2.0,
                                                                      "loss": 0.3}],
                                                     "logged": [{"step": 1, "sharpness": 0.01}]}))
    (d / "study-main.json").write_text(json.dumps({
        "study": "main", "description": "d", "scale": "smoke", "seeds": [0], "grid": grid, "cells": cells,
        "columns": ["params", "lambda_max", "test_acc", "corrupt_acc", "active_pct"], "stages": ["hessian"],
        "command": None}))
    return d


@pytest.mark.parametrize("name", ["final.json", "analysis.json", "eval.json", "sharpness.json",
                                  "study-main.json"])
def test_fuzz_report_readers(study, tmp_path, name):
    from vitsam.report.build import _records, _study_view
    from vitsam.study import tables

    rng = random.Random(name)
    where = study / ("vit-sam-s0" if name != "study-main.json" else "") / name
    s = _fresh(study, tmp_path / "s")

    def read() -> None:  # what `vitsam report` does short of drawing figures
        for folder, rec in _records([s]):
            t = tables.study_tables(folder, rec)
            tables.to_markdown(t["agg"], t["diffs"], rec["columns"])
            _study_view(folder, rec, t)

    read()  # the undamaged folder reads
    for kind, bad, must in json_mutations(where.read_bytes(), rng, CASES // 2):
        with _damaged(s / where.relative_to(study), bad):
            _expect_clean(read, must, f"{name} {kind}")


@pytest.mark.parametrize("name, edit, words", [
    ("vit-sam-s0/final.json", lambda d: d.update(test_acc="high"), "test_acc is a string, not a number"),
    ("vit-sam-s0/final.json", lambda d: d.clear(), "lacks 'test_acc'"),
    ("vit-sam-s0/analysis.json", lambda d: d["hessian"]["result"].update(lambda_max=[1]),
     "hessian.result.lambda_max is a list, not a number"),
    ("study-main.json", lambda d: d.update(study=5), "study is an int, not a string"),
    ("study-main.json", lambda d: d.update(grid={}), "grid is an object, not a list"),
    ("study-main.json", lambda d: d["grid"][1].update(method=None), "grid[1].method is null, not a string"),
])
def test_report_readers_name_the_file_and_the_key(study, tmp_path, name, edit, words):
    from vitsam.report.build import _records
    from vitsam.study import tables

    s = _fresh(study, tmp_path / "s")
    data = json.loads((s / name).read_text())
    edit(data)
    (s / name).write_text(json.dumps(data))
    with pytest.raises(DamagedFileError) as info:
        for folder, rec in _records([s]):
            tables.study_tables(folder, rec)
    assert str(info.value).startswith(f"{s / name}") and words in str(info.value)


def test_report_refuses_a_grid_name_that_leaves_the_study(study, tmp_path):
    from vitsam.report.build import _records

    s = _fresh(study, tmp_path / "s")
    rec = json.loads((s / "study-main.json").read_text())
    rec["grid"][0]["name"] = "../../elsewhere"
    (s / "study-main.json").write_text(json.dumps(rec))
    with pytest.raises(DamagedFileError, match=r"names '../../elsewhere', which lies outside"):
        _records([s])


def test_no_reader_unpickles():
    """Source check: run folders, checkpoints and the data cache are safetensors and JSON, so no
    torch.load (a pickle reader) is left; the only unpickler reads user-given CIFAR pickles
    through an allow-list of numpy types; np.load never allows pickles."""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "vitsam"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"torch\.load\(", text), path  # a foreign .pt: weights_only=True only
        assert "allow_pickle=True" not in text, path
        if path.name != "sources.py":
            assert not re.search(r"\bpickle\.(load|loads|Unpickler)\b", text), path
    assert "find_class" in (src / "data" / "sources.py").read_text()  # the allow-list unpickler


@pytest.mark.parametrize("enc", [{"torch": 5}, {"torch": "not base64!"}, {"torch": "AAAA"}, {}])
def test_a_damaged_random_state_is_one_line(enc):
    from vitsam.train.checkpoint import rng_state, set_rng_state

    before = rng_state()
    with pytest.raises(CheckpointError, match="random-generator state is damaged"):
        set_rng_state(enc)
    assert rng_state() == before
