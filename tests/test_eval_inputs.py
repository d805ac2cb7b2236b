"""What evaluation feeds a run's model: ids of labelled images, preprocessing, normalisation.

The run-level tests stand in a recording model for the run's network (``load_run`` patched), so
they check exactly the tensors every route hands to the model, and the ReaL labels it is scored
against, without training anything.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vitsam.data import DataConfig, build_data, eval_batches, save_data_record
from vitsam.data import corruptions as C
from vitsam.eval import metrics as M
from vitsam.eval import runner
from vitsam.eval import shifts as S
from vitsam.train.checkpoint import LoadedRun


class Recorder(nn.Module):
    """Records every input; predicts ``table[pixel id]``, the id being the top-left pixel of
    channel 0 on the 0-255 scale (recovered by undoing the normalisation)."""

    def __init__(self, table: torch.Tensor, mean: float, std: float) -> None:
        super().__init__()
        self.table, self.mean, self.std = table, mean, std
        self.seen: list[torch.Tensor] = []
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        ids = torch.round((x[:, 0, 0, 0] * self.std + self.mean) * 255).long().clamp(0, 255)
        return self.table[ids] * self.w

    def take(self) -> torch.Tensor:
        out, self.seen = torch.cat(self.seen), []
        return out


def _fake_run(monkeypatch, run_dir: Path, cfg: DataConfig, img_size: int, table: torch.Tensor) -> Recorder:
    """A run folder whose data.json is written as `vitsam train` writes it, and whose model is a Recorder."""
    bundle = build_data(dataclasses.replace(cfg, img_size=img_size))
    run_dir.mkdir(parents=True)
    save_data_record(run_dir, bundle)
    model = Recorder(table, bundle.mean[0], bundle.std[0])
    spec = {"name": "recorder", "num_classes": table.shape[1], "img_size": img_size,
            "in_chans": bundle.in_chans, "kwargs": {}}
    loaded = LoadedRun(run_dir, model, spec, {"data": dataclasses.asdict(cfg)}, 0, run_dir / "final")
    monkeypatch.setattr(runner, "load_run", lambda *a, **k: loaded)
    return model


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _flat_folder(root: Path, values: dict[str, dict[str, int]], shape=(6, 6, 3)) -> None:
    """root/{train,val}/<class>/<name>: flat images of the given grey value (ids survive any resize)."""
    for split in ("train", "val"):
        for cls, files in values.items():
            for name, v in files.items():
                _write(root / split / cls / name, np.full(shape, v, np.uint8))


# ---------------------------------------------------------------- ReaL ids (issue item 3)

def test_real_labels_match_images_by_relative_path_on_both_routes(tmp_path, monkeypatch):
    # Like the shared CIFAR-10 tree: every class folder repeats the same file names.
    values = {"a": {"000.png": 10, "001.png": 11}, "b": {"000.png": 20, "001.png": 21}}
    _flat_folder(tmp_path / "d", values)
    label = {10: 0, 11: 0, 20: 1, 21: 1}
    table = torch.zeros(256, 2)
    for v, y in label.items():
        table[v, y] = 1.0
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
    _fake_run(monkeypatch, tmp_path / "run", cfg, 6, table)
    rng = np.random.default_rng(0)
    keys = [f"{c}/{n}" for c, files in values.items() for n in files]
    real = {k: [label[values[k[0]][k[2:]]]] for k in rng.permutation(keys).tolist()}  # permuted order
    (tmp_path / "real.json").write_text(json.dumps(real))
    in_memory = runner.evaluate_run(tmp_path / "run", runner.EvalRequest(real=str(tmp_path / "real.json")),
                                    progress=False)["real"]
    folder = runner.evaluate_run(tmp_path / "run", runner.EvalRequest(real=str(tmp_path / "real.json"),
                                                                      real_images=str(tmp_path / "d" / "val")),
                                 progress=False)["real"]
    assert in_memory["top1"] == folder["top1"] == 1.0 and in_memory["n"] == folder["n"] == 4
    # A wrong label for one image costs exactly that image, by either route.
    real["b/001.png"] = [0]
    (tmp_path / "real.json").write_text(json.dumps(real))
    for req in (runner.EvalRequest(real=str(tmp_path / "real.json")),
                runner.EvalRequest(real=str(tmp_path / "real.json"), real_images=str(tmp_path / "d" / "val"))):
        assert runner.evaluate_run(tmp_path / "run", req, progress=False)["real"]["top1"] == 0.75


def test_real_label_list_follows_file_names_on_both_routes(tmp_path, monkeypatch):
    # Class order (a, b) is the reverse of file-name order (p.png, q.png): a list of label sets
    # in file-name order (ImageNet ReaL's layout) must not be read in class-by-class order.
    values = {"a": {"q.png": 10}, "b": {"p.png": 20}}
    _flat_folder(tmp_path / "d", values)
    table = torch.zeros(256, 2)
    table[10, 0] = table[20, 1] = 1.0
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
    _fake_run(monkeypatch, tmp_path / "run", cfg, 6, table)
    (tmp_path / "real.json").write_text(json.dumps([[1], [0]]))  # p.png (class b), q.png (class a)
    for images in (None, str(tmp_path / "d" / "val")):
        req = runner.EvalRequest(real=str(tmp_path / "real.json"), real_images=images)
        assert runner.evaluate_run(tmp_path / "run", req, progress=False)["real"]["top1"] == 1.0


def test_real_labels_reject_duplicate_and_unmatched_ids_with_counts(tmp_path):
    values = {"a": {"000.png": 10, "001.png": 11}, "b": {"000.png": 20, "001.png": 21}}
    _flat_folder(tmp_path / "d", values)
    model = Recorder(torch.eye(256)[:, :4], 0.0, 1.0)
    kw = {"mean": [0.0] * 3, "std": [1.0] * 3, "img_size": 6, "progress": False}
    val = tmp_path / "d" / "val"
    good = {"a/000.png": [0], "a/001.png": [0], "b/000.png": [1], "b/001.png": [1]}
    cases = [
        ({**{k: v for k, v in good.items() if k != "a/000.png"}, "000.png": [0]},
         r"1 ReaL label entries name a file that 2 images share \(first: '000.png'\)"),
        ({**good, "c/000.png": [2], "zzz": [1]}, r"2 of the 6 ReaL label entries match no image"),
        ({k: v for k, v in good.items() if k.startswith("a/")}, r"2 of the 4 images have no entry"),
        ([[0], [0], [1], [1]], r"2 file names occur in several folders"),
    ]
    for real, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            S.evaluate_real_labels(model, val, real, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="1 image ids occur more than once"):
        S.evaluate_real_labels(model, torch.zeros(2, 3, 6, 6, dtype=torch.uint8), [[0], [1]],
                               image_ids=["x.png", "x.png"], **kw)
    with pytest.raises(ValueError, match=r"1 images have more than one ReaL label entry \(first: 'a/x.png'"):
        S.real_label_sets(["a/x.png", "b/y.png"], {"a/x.png": [0], "x": [1], "b/y.png": [2]})
    assert S.real_label_sets(["b/000.png", "a/000.png"], {"a/000.png": [0], "b/000.png": [1]}) == [[1], [0]]
    # Bare names and stems still work where they are unique.
    assert S.real_label_sets(["x/ILSVRC_1.JPEG", "y/ILSVRC_2.JPEG"], {"ILSVRC_2": [5], "ILSVRC_1.JPEG": [7]}) \
        == [[7], [5]]


# ---------------------------------------------------------------- one preprocessing (issue item 6)

def _rows(x: torch.Tensor) -> list[bytes]:
    return sorted(r.numpy().tobytes() for r in x)


@pytest.mark.parametrize("kind", ["in-memory", "files"])
def test_the_same_file_gives_the_same_model_input_on_every_route(tmp_path, monkeypatch, kind):
    rng = np.random.default_rng(1)
    # Non-square images, resized on every route: in memory 12x16 -> 8 px (crop 1.0);
    # large files 70x90 -> 16 px (shorter side to round(16 / 0.875) = 18, then the centre).
    (h, w), img_size = ((12, 16), 8) if kind == "in-memory" else ((70, 90), 16)
    root = tmp_path / "d"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(2):
                _write(root / split / cls / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    cfg = DataConfig(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "c"), workers=0)
    model = _fake_run(monkeypatch, tmp_path / "run", cfg, img_size, torch.zeros(256, 2))
    crop = 1.0 if kind == "in-memory" else 0.875
    assert json.loads((tmp_path / "run" / "data.json").read_text())["preprocessing"]["crop_pct"] == crop
    val = root / "val"
    (tmp_path / "map.json").write_text(json.dumps({"a": "a", "b": "b"}))
    (tmp_path / "real.json").write_text(json.dumps({f"{c}/{i}.png": [0] for c in "ab" for i in range(2)}))
    images, labels, desc = runner.corruption_source("imagefolder", None, str(tmp_path / "run"), None, None, 0)
    cset = C.build_corruption_set(images, labels, tmp_path / "cset", params="cifar-c", corruptions=["contrast"],
                                  severities=[1], workers=0, progress=False, source=desc)

    def inputs(**req) -> torch.Tensor:
        """What the model saw for ``req`` after the test split, which every evaluation scores first."""
        runner.evaluate_run(tmp_path / "run", runner.EvalRequest(**req), progress=False)
        return model.take()[4:]

    runner.evaluate_run(tmp_path / "run", runner.EvalRequest(), progress=False)
    test_split = model.take()
    assert test_split.shape == (4, 3, img_size, img_size)
    routes = {"--folder": inputs(folder=str(val)),
              "--mapped-folder": inputs(mapped_folder=str(val), mapping=str(tmp_path / "map.json")),
              "--real-images": inputs(real=str(tmp_path / "real.json"), real_images=str(val))}
    rec = json.loads((tmp_path / "run" / "data.json").read_text())
    files = sorted(val.rglob("*.png"))
    native = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).copy())
                          for p in files])
    routes["metrics.preprocess"] = M.preprocess(native, rec["mean"], rec["std"], img_size, crop)
    for name, x in routes.items():
        assert _rows(x) == _rows(test_split), name
    # The corruption set's clean images are those very inputs (their corrupted parts differ).
    corrupted = inputs(corruptions=str(cset))
    assert corrupted.shape[0] == 8  # one part, then the clean images
    clean_rows = set(_rows(corrupted[4:]))
    assert clean_rows == set(_rows(test_split)) and not clean_rows & set(_rows(corrupted[:4]))
    # And the input is the eval view of each file, computed here independently in float: shorter
    # side to round(img_size / crop), antialiased bilinear, centre crop; equal up to uint8 rounding.
    side = round(img_size / crop)
    long = int(w * side / h)
    ref = nn.functional.interpolate(native.float(), size=(side, long), mode="bilinear", antialias=True,
                                    align_corners=False)
    top, left = int(round((side - img_size) / 2)), int(round((long - img_size) / 2))
    ref = ref[..., top:top + img_size, left:left + img_size] / 255
    mean, std = torch.tensor(rec["mean"]).view(1, 3, 1, 1), torch.tensor(rec["std"]).view(1, 3, 1, 1)
    assert (test_split * std + mean - ref).abs().max() <= 1.01 / 255  # files sorted = test split order


# ---------------------------------------------------------------- the run's own statistics (issue item 7)

@pytest.fixture(scope="module")
def fraction_run(tmp_path_factory):
    from vitsam.config import apply_overrides
    from vitsam.presets import get_preset
    from vitsam.train import engine

    tmp = tmp_path_factory.mktemp("fraction")
    cfg = apply_overrides(get_preset("mnist-resnet-sam", smoke_size=True),
                          [f"out_dir={tmp}", f"data.cache_dir={tmp / 'c'}", "data.source=digits",
                           "data.img_size=8", "data.train_fraction=0.3", "data.seed=5", "train.max_steps=1",
                           "train.batch_size=16", "train.train_eval_samples=16"])
    engine.train(cfg, run_dir=tmp / "run", progress=False)
    return tmp / "run", cfg


def _fraction_stats(cfg) -> tuple[float, float]:
    """Mean and population std of the digits the run trained on, computed here from scratch."""
    from sklearn.datasets import load_digits

    from vitsam.data.build import DIGITS_TEST_FRACTION, SPLIT_SEED
    from vitsam.data.split import stratified_fraction, stratified_split

    d = load_digits()
    labels = torch.from_numpy(d.target)
    tr, _ = stratified_split(labels, round(DIGITS_TEST_FRACTION * len(labels)), SPLIT_SEED)
    keep = tr[stratified_fraction(labels[tr], cfg.data.train_fraction, cfg.data.seed)]
    pixels = np.clip(np.rint(d.data[keep.numpy()] * 255 / 16), 0, 255) / 255
    return float(pixels.mean()), float(pixels.std())


def test_eval_on_other_data_uses_the_runs_own_statistics(fraction_run, capsys):
    run, cfg = fraction_run
    mean, std = _fraction_stats(cfg)
    rec = json.loads((run / "data.json").read_text())
    assert rec["mean"][0] == pytest.approx(mean, abs=1e-12) and rec["std"][0] == pytest.approx(std, abs=1e-12)
    out = runner.evaluate_run(run, runner.EvalRequest(data="digits"), progress=False)["test"]
    assert out["normalisation"]["mean"][0] == pytest.approx(mean, abs=1e-12)
    assert out["normalisation"]["std"][0] == pytest.approx(std, abs=1e-12)
    full = build_data(DataConfig(source="digits", img_size=8, cache_dir=cfg.data.cache_dir))
    assert abs(full.mean[0] - mean) > 1e-4  # the whole training split has other statistics
    from vitsam.train.checkpoint import load_run

    model = load_run(run).model
    ref = M.evaluate(model, eval_batches(full.test, 256, [mean], [std], 8))
    assert out["nll"] == pytest.approx(ref["nll"], rel=1e-6) and out["top1"] == ref["top1"]
    # A run folder from before data.json: one warning line, the same statistics recomputed.
    (run / "data.json").rename(run / "data.json.bak")
    try:
        capsys.readouterr()
        old = runner.evaluate_run(run, runner.EvalRequest(data="digits"), progress=False)["test"]
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "has no data.json" in err and "warning" in err
        assert old["normalisation"]["mean"][0] == pytest.approx(mean, abs=1e-12)
    finally:
        (run / "data.json.bak").rename(run / "data.json")


def test_eval_data_is_scored_in_the_runs_class_order(tmp_path, monkeypatch):
    # The run's output 0 is class "b", output 1 class "a" (its data.json says so); --data lists
    # the same classes as ("a", "b"), so its labels must be translated, not taken as they are.
    _flat_folder(tmp_path / "d", {"a": {"0.png": 10}, "b": {"0.png": 20}})
    table = torch.zeros(256, 2)
    table[10, 1] = table[20, 0] = 1.0
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
    _fake_run(monkeypatch, tmp_path / "run", cfg, 6, table)
    rec_path = tmp_path / "run" / "data.json"
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "classes": ["b", "a"]}))
    req = runner.EvalRequest(data="imagefolder", root=str(tmp_path / "d"))
    assert runner.evaluate_run(tmp_path / "run", req, progress=False)["test"]["top1"] == 1.0
    rec_path.write_text(json.dumps({**rec, "classes": ["b", "z"]}))
    with pytest.raises(ValueError, match="names classes the run was not trained on"):
        runner.evaluate_run(tmp_path / "run", req, progress=False)


# ---------------------------------------------------------------- bad files in evaluation folders

def _broken_copy(val: Path, root: Path) -> list[str]:
    """A copy of ``val`` in ``root`` with two unreadable files (empty, truncated JPEG) and a
    broken link beside the good images."""
    import io as _io
    import shutil

    shutil.copytree(val, root)
    buf = _io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "b" / "trunc.jpg").write_bytes(buf.getvalue()[:-400])
    (root / "b" / "gone.png").symlink_to(root / "nowhere.png")
    return ["a/zero.jpg", "b/gone.png", "b/trunc.jpg"]


@pytest.mark.parametrize("route", ["--folder", "--mapped-folder", "--real-images"])
def test_eval_folders_name_every_bad_file_at_once_or_skip_them(tmp_path, monkeypatch, capsys, route):
    from vitsam.cli import main

    values = {"a": {"0.png": 10, "1.png": 11}, "b": {"0.png": 20, "1.png": 21}}
    _flat_folder(tmp_path / "d", values)
    table = torch.zeros(256, 2)
    table[[10, 11], 0] = table[[20, 21], 1] = 1.0
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
    _fake_run(monkeypatch, tmp_path / "run", cfg, 6, table)
    val = tmp_path / "shifted"  # the run's own test split stays whole
    bad = _broken_copy(tmp_path / "d" / "val", val)
    (tmp_path / "map.json").write_text(json.dumps({"a": "a", "b": "b"}))
    real = {f"{c}/{n}": [0 if c == "a" else 1] for c, files in values.items() for n in files}
    (tmp_path / "real.json").write_text(json.dumps({**real, **{b: [0] for b in bad}}))
    extra = {"--folder": ["--folder", str(val)],
             "--mapped-folder": ["--mapped-folder", str(val), "--mapping", str(tmp_path / "map.json")],
             "--real-images": ["--real", str(tmp_path / "real.json"), "--real-images", str(val)]}[route]
    argv = ["eval", str(tmp_path / "run"), "--quiet", *extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vitsam: error: cannot decode 3 of 7 image files in {val}: ")
    assert "a/zero.jpg (empty file (0 bytes))" in err and "b/trunc.jpg (image file is truncated" in err
    assert "b/gone.png (broken symbolic link" in err and "pass --bad-files skip to evaluate without them" in err
    kind = route[2:]
    listed = tmp_path / "run" / f"eval-bad-files-{kind}.txt"
    assert [ln.split("\t")[0] for ln in listed.read_text().splitlines()[1:]] == bad
    assert not (tmp_path / "run" / "eval.json").exists()
    # Skipped: the good images are scored (all right), the bad ones counted and listed.
    assert main([*argv, "--bad-files", "skip"]) == 0
    err = capsys.readouterr().err
    assert "vitsam: warning: --bad-files skip leaves out the 3 of 7 image files" in err
    key = {"folder": "folder", "mapped-folder": "class_mapped", "real-images": "real"}[kind]
    res = json.loads((tmp_path / "run" / "eval.json").read_text())[key]
    assert res["top1"] == 1.0 and res["n"] == 4 and res["skipped_files"] == 3
    assert res["bad_files_list"] == str(listed)
