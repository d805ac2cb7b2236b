"""Bad input through the command line: exit code 2, one line naming the problem and the fix,
no traceback, and nothing already on disk changed."""
import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitsam.cli import main

SMOKE = ["train", "--preset", "mnist-vit", "--smoke", "--quiet"]
SMALL = ["data.train_fraction=1", "train.batch_size=4"]


def _images(root: Path, classes: str = "ab", n: int = 3, side: int = 16) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.jpg")


def _cifar(root: Path, labels: int = 10, meta: bool = True, skip: str = "") -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name != skip:
            ys = list(rng.integers(0, labels, 8))
            with open(folder / name, "wb") as fh:
                pickle.dump({b"data": rng.integers(0, 255, (8, 3072), dtype=np.uint8),
                             b"labels": ys}, fh)
    names = {b"label_names": [f"c{i}".encode() for i in range(10)]} if meta else {b"x": 1}
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(names, fh)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One trained smoke run, damaged copies of it, and bad data folders."""
    tmp = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITSAM_CACHE", str(tmp / "cache"))
        run = tmp / "run"
        assert main([*SMOKE, "--run-dir", str(run)]) == 0
        yield _build_world(tmp, run)


def _build_world(tmp: Path, run: Path) -> dict[str, str]:
    ckpt = next((run / "checkpoints").glob("step-*"))
    paths = {"run": run, "tmp": tmp}
    for name in ("trunc", "state", "unfinished_trunc"):
        shutil.copytree(run, tmp / name)
        paths[name] = tmp / name
    _truncate(tmp / "trunc" / "checkpoints" / ckpt.name / "model.safetensors")
    (tmp / "state" / "checkpoints" / ckpt.name / "state.json").write_text('{"format": "vit')
    (tmp / "unfinished_trunc" / "final.json").unlink()
    _truncate(tmp / "unfinished_trunc" / "checkpoints" / ckpt.name / "optim.safetensors")

    _images(tmp / "if_corrupt")
    (tmp / "if_corrupt" / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    _images(tmp / "if_empty")
    (tmp / "if_empty" / "train" / "c").mkdir()
    (tmp / "if_empty" / "val" / "c").mkdir()
    _images(tmp / "if_trunc")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    (tmp / "if_trunc" / "train" / "b" / "t.jpg").write_bytes(buf.getvalue()[:100])
    _cifar(tmp / "c10_missing", skip="data_batch_3")
    _cifar(tmp / "c10_nometa", meta=False)
    _cifar(tmp / "c10_badlabels", labels=13)
    _cifar(tmp / "c10")
    for c in ("zero", "one", "seven"):
        (tmp / "mapped" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp / "mapped" / c / "0.png")
    (tmp / "map_name").write_text(json.dumps({"zero": "0", "one": "1", "seven": "cat"}))
    (tmp / "map_index").write_text(json.dumps({"zero": "0", "one": "1", "seven": 77}))
    (tmp / "map_broken").write_text("{zero:")
    (tmp / "notadir").write_text("a file")
    return {k: str(v) for k, v in {**paths, **{p.name: p for p in tmp.iterdir()}}.items()}


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


CASES = [
    # data
    ("if-corrupt-jpeg", [*SMOKE, "data.source=imagefolder", "data.root={if_corrupt}", *SMALL],
     ["cannot decode 1 of 13 image files", "train/a/bad.jpg", "remove or replace the files",
      "data.bad_files=skip"]),
    ("if-truncated-jpeg", [*SMOKE, "data.source=imagefolder", "data.root={if_trunc}", *SMALL],
     ["cannot decode 1 of 13 image files", "train/b/t.jpg", "remove or replace the files"]),
    ("if-empty-class", [*SMOKE, "data.source=imagefolder", "data.root={if_empty}", *SMALL],
     ["2 class folders have no images", "if_empty/train/c, ", "if_empty/val/c",
      "add images or remove those classes from both splits"]),
    ("if-missing-root", [*SMOKE, "data.source=imagefolder", "data.root={tmp}/nowhere"],
     ["does not exist", "set root"]),
    ("cifar-missing-file", [*SMOKE, "data.source=cifar10", "data.root={c10_missing}"],
     ["no cifar10 python-pickle files", "data_batch_3"]),
    ("cifar-damaged-meta", [*SMOKE, "data.source=cifar10", "data.root={c10_nometa}", *SMALL,
                            "data.img_size=28"], ["batches.meta", "label_names", "replace"]),
    ("cifar-bad-labels", [*SMOKE, "data.source=cifar10", "data.root={c10_badlabels}", *SMALL,
                          "data.img_size=28"], ["labels", "names 10 classes", "replace"]),
    # damaged run folders
    ("eval-truncated-weights", ["eval", "{trunc}", "--quiet"],
     ["model.safetensors", "damaged", "train the run again"]),
    ("analyze-truncated-weights", ["analyze", "{trunc}", "--sparsity", "--quiet"],
     ["model.safetensors", "damaged"]),
    ("prune-truncated-weights", ["prune", "{trunc}", "--out", "{tmp}/p1", "--no-speed"],
     ["model.safetensors", "damaged"]),
    ("eval-damaged-state", ["eval", "{state}", "--quiet"], ["state.json", "is damaged", "restore"]),
    ("resume-damaged-optimizer", ["train", "--resume", "{unfinished_trunc}", "--quiet"],
     ["optim.safetensors", "damaged"]),
    ("resume-finished", ["train", "--resume", "{run}"], ["already finished", "new run"]),
    ("resume-missing", ["train", "--resume", "{tmp}/nowhere"], ["does not exist", "printed"]),
    ("resume-with-overrides", ["train", "--resume", "{run}", "train.epochs=3"],
     ["--resume", "drop"]),
    ("train-into-existing-run", [*SMOKE, "--run-dir", "{run}"], ["not empty", "--resume"]),
    ("train-into-a-file", [*SMOKE, "--run-dir", "{notadir}"], ["is a file", "folder"]),
    ("prune-same-names", ["prune", "{run}", "{tmp}/other/run", "--out", "{tmp}/p2"],
     ["several runs are named run", "separate calls"]),
    ("prune-into-existing-run", ["prune", "{run}", "--out", "{trunc}", "--no-speed"],
     ["already holds a training run", "new folder"]),
    # models
    ("unknown-model", [*SMOKE, "model.name=resnet9000"], ["unknown model 'resnet9000'", "vitsam models"]),
    ("timm-model-too-small", [*SMOKE, "model.name=convnext_atto", "model.kwargs={{}}"],
     ["convnext_atto", "cannot take 1-channel 28px images", "data.img_size"]),
    ("heads-do-not-divide", [*SMOKE, "model.kwargs.embed_dim=33"],
     ["cannot build model 'vit-t4'", "divisible by num_heads", "model.kwargs"]),
    ("img-not-divisible", [*SMOKE, "data.img_size=30"], ["not divisible by patch size 7"]),
    # hyper-parameters
    ("negative-lr", [*SMOKE, "optim.lr=-1"], ["optim.lr must be > 0"]),
    ("negative-rho", [*SMOKE, "optim.rho=-0.1"], ["optim.rho must be >= 0"]),
    ("negative-rho-sam", [*SMOKE, "optim.sam=true", "optim.rho=-0.1"], ["optim.rho must be > 0"]),
    ("batch-zero", [*SMOKE, "train.batch_size=0"], ["train.batch_size must be >= 1"]),
    ("micro-batch-too-big", [*SMOKE, "train.micro_batch=64"],
     ["train.micro_batch must be in 1..batch_size (32)"]),
    ("fraction-zero", [*SMOKE, "data.train_fraction=0"], ["data.train_fraction", "(0, 1]"]),
    ("fraction-two", [*SMOKE, "data.train_fraction=2"], ["data.train_fraction", "(0, 1]"]),
    ("ckpt-every-zero", [*SMOKE, "train.ckpt_every_epochs=0"], ["train.ckpt_every_epochs must be > 0"]),
    ("keep-negative", [*SMOKE, "train.keep_checkpoints=-1"], ["train.keep_checkpoints must be >= 0"]),
    ("m-without-sam", [*SMOKE, "optim.m=4"], ["optim.m=4", "needs SAM"]),
    ("beta-above-one", [*SMOKE, "optim.beta1=1.5"], ["optim.beta1 must be in [0, 1)"]),
    ("unknown-device", [*SMOKE, "train.device=tpu"], ["train.device must be auto, cpu, cuda"]),
    ("epochs-infinite", [*SMOKE, "train.epochs=inf"], ["train.epochs must be a finite number"]),
    ("train-eval-samples-zero", [*SMOKE, "train.train_eval_samples=0"],
     ["train.train_eval_samples must be >= 1"]),
    # override syntax
    ("no-equals", [*SMOKE, "train.epochs"], ["not of the form key=value"]),
    ("empty-key", [*SMOKE, "=3"], ["empty key", "section.key=value"]),
    ("not-a-float", [*SMOKE, "train.epochs=abc"], ["train.epochs='abc' is not a valid float"]),
    ("section-as-value", [*SMOKE, "optim=3"], ["optim is a section"]),
    ("unknown-key", [*SMOKE, "train.epoch=3"], ["did you mean train.epochs"]),
    ("override-after-option", ["train", "train.epochs=1", "--preset", "mnist-vit", "--smoke",
                               "optim.lr=-1"], ["optim.lr must be > 0"]),
    # corrupt
    ("corrupt-missing-folder", ["corrupt", "--out", "{tmp}/c1", "--data", "imagefolder",
                                "--root", "{tmp}/nowhere"], ["does not exist"]),
    ("corrupt-unknown-name", ["corrupt", "--out", "{tmp}/c2", "--corruptions", "bogus_noise"],
     ["unknown corruption", "bogus_noise", "choose from"]),
    ("corrupt-severity-range", ["corrupt", "--out", "{tmp}/c3", "--severities", "0,9"],
     ["severities", "1..5"]),
    ("corrupt-severity-text", ["corrupt", "--out", "{tmp}/c4", "--severities", "a"],
     ["--severities 'a'", "integers from 1 to 5"]),
    ("corrupt-limit-zero", ["corrupt", "--out", "{tmp}/c5", "--limit", "0"],
     ["--limit must be a positive"]),
    ("corrupt-out-is-file", ["corrupt", "--out", "{notadir}", "--limit", "2"], ["is a file"]),
    # eval
    ("mapping-unknown-name", ["eval", "{run}", "--quiet", "--mapped-folder", "{mapped}",
                              "--mapping", "{map_name}"],
     ["mapping['seven'] = 'cat' is not a training class", "use a training class name"]),
    ("mapping-index-too-big", ["eval", "{run}", "--quiet", "--mapped-folder", "{mapped}",
                               "--mapping", "{map_index}"], ["mapping['seven'] = 77", "below 10"]),
    ("mapping-broken-json", ["eval", "{run}", "--quiet", "--mapped-folder", "{mapped}",
                             "--mapping", "{map_broken}"], ["is damaged", "fix the JSON"]),
    ("eval-other-channels", ["eval", "{run}", "--quiet", "--data", "cifar10", "--root", "{c10}"],
     ["3-channel images", "takes 1"]),
    ("eval-bad-device", ["eval", "{run}", "--quiet", "--device", "gpu0"],
     ["--device must be auto, cpu, cuda"]),
    # analyze
    ("hessian-k-zero", ["analyze", "{run}", "--hessian", "--quiet", "--batches", "1",
                        "--batch-size", "8", "--set", "hessian.k=0"],
     ["hessian.k=0", "k must be a positive integer"]),
    ("analysis-unknown-key", ["analyze", "{run}", "--hessian", "--set", "hessian.foo=1"],
     ["unknown config key 'hessian.foo'", "hessian.k"]),
    ("analysis-bad-value", ["analyze", "{run}", "--sparsity", "--set", "sparsity.max_batches=0"],
     ["sparsity.max_batches=0", "positive integer"]),
    ("setting-not-requested", ["analyze", "{run}", "--hessian", "--set", "ntk.chunk=2"],
     ["--set names ntk", "add --ntk"]),
    ("setting-syntax", ["analyze", "{run}", "--hessian", "--set", "hessian.k"],
     ["<analysis>.<key>=<value>"]),
]


@pytest.mark.parametrize("argv, words", [(a, w) for _, a, w in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(world, argv, words, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VITSAM_CACHE", str(Path(world["tmp"]) / "cache"))
    monkeypatch.chdir(world["tmp"])  # runs without --run-dir land here, not in the repo
    before = {k: _digest(world[k]) for k in ("run", "trunc")}
    capsys.readouterr()
    assert main([a.format(**world) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitsam: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert {k: _digest(world[k]) for k in before} == before  # nothing written was touched


def test_a_failing_analysis_keeps_the_results_before_it(world, capsys, monkeypatch) -> None:
    run = Path(world["tmp"]) / "analysed"
    shutil.copytree(world["run"], run)
    monkeypatch.setenv("VITSAM_CACHE", str(Path(world["tmp"]) / "cache"))
    # The head index parses as an int (not the text "5") and fails only when the model is seen.
    assert main(["analyze", str(run), "--sparsity", "--attention", "--quiet", "--batches", "1",
                 "--batch-size", "8", "--set", "attention.heads=5"]) == 2
    assert "attention analysis" in capsys.readouterr().err
    saved = json.loads((run / "analysis.json").read_text())
    assert list(saved) == ["sparsity"] and saved["sparsity"]["result"]["layers"]


@pytest.mark.parametrize("argv, words", [
    ([*SMOKE, "model.kwargs=[1,2]"], ["model.kwargs=[1, 2] must be a mapping", "not a list"]),
    ([*SMOKE, "model.kwargs=3"], ["model.kwargs=3 must be a mapping", "not an int"]),
    ([*SMOKE, "model.kwargs.depth=2", "model.kwargs.depth.x=1"],
     ["model.kwargs.depth is a value (2), not a mapping"]),
], ids=["kwargs-list", "kwargs-int", "kwargs-value-as-section"])
def test_mapping_overrides_of_the_wrong_type_exit_2(world, argv, words, capsys,
                                                    monkeypatch) -> None:
    monkeypatch.chdir(world["tmp"])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitsam: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("value, words", [
    ("3", ['train.epochs="3" must be a number, not a string', "config.json", "correct it"]),
    (None, ["train.epochs=null must be a number, not null", "config.json"]),
], ids=["epochs-text", "epochs-null"])
def test_resume_with_a_hand_edited_config_of_the_wrong_type_exits_2(world, value, words,
                                                                    capsys, tmp_path) -> None:
    run = tmp_path / "edited"
    shutil.copytree(world["run"], run)
    (run / "final.json").unlink()
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["epochs"] = value
    (run / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitsam: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


# Every entry point refuses impossible settings before any work: exit 2, one line naming the
# valid choices or range, and no output folder created ({out} must still not exist).
SETTINGS = [
    ("train-precision", [*SMOKE, "--run-dir", "{out}", "train.precision=fp8"],
     ["train.precision must be one of auto, fp32, bf16, fp16"]),
    ("train-bad-files", [*SMOKE, "--run-dir", "{out}", "data.bad_files=ignore"],
     ["bad_files must be one of error, skip"]),
    ("train-val-split-path", [*SMOKE, "--run-dir", "{out}", "data.val_split=../x"],
     ["val_split '../x' must be the name of one folder inside the data root"]),
    ("train-name-escapes", [*SMOKE, "out_dir={out}", "name=../escaped"],
     ["name '../escaped' must be a plain name"]),
    ("train-unknown-option", [*SMOKE, "--run-dir", "{out}", "--epochs", "3"],
     ["unrecognized arguments: --epochs", "see `vitsam --help`"]),
    ("demo-lr", ["demo", "--out", "{out}", "--smoke", "--quiet", "optim.lr=-1"], ["optim.lr must be > 0"]),
    ("demo-workers", ["demo", "--out", "{out}", "--smoke", "--workers", "0"],
     ["--workers must be a positive integer"]),
    ("study-lr", ["study", "main", "--out", "{out}", "--quiet", "optim.lr=-1"], ["optim.lr must be > 0"]),
    ("study-scale", ["study", "main", "--out", "{out}", "--scale", "huge"],
     ["invalid choice: 'huge' (choose from 'smoke', 'cpu', 'gpu', 'paper')"]),
    ("study-name", ["study", "nosuch", "--out", "{out}"], ["unknown study 'nosuch'; choose from main"]),
    ("study-seeds", ["study", "main", "--out", "{out}", "--seeds", "0,0"], ["--seeds must list distinct"]),
    ("eval-batch", ["eval", "{run}", "--quiet", "--batch-size", "0", "--out", "{out}"],
     ["batch_size must be a positive integer"]),
    ("eval-checkpoint", ["eval", "{run}", "--quiet", "--checkpoint", "nosuch", "--out", "{out}"],
     ["checkpoint 'nosuch' not found", "available: step-"]),
    ("eval-foreign-file", ["eval", "{notadir}", "--quiet", "--out", "{out}"],
     ["is a file, not a run folder", "never unpickles a .pt/.pth"]),
    ("analyze-batches", ["analyze", "{run}", "--hessian", "--batches", "0", "--out", "{out}"],
     ["--batches and --batch-size must be positive"]),
    ("analyze-landscape", ["analyze", "{run}", "--landscape", "--quiet", "--set", "landscape.steps=1",
                           "--out", "{out}"], ["landscape.steps=1", "an integer >= 2"]),
    ("prune-ratio", ["prune", "{run}", "--out", "{out}", "--ratio", "1.5"], ["ratio must be in [0, 1]"]),
    ("prune-calib", ["prune", "{run}", "--out", "{out}", "--calib", "0"],
     ["calib must be a positive number"]),
    ("corrupt-params", ["corrupt", "--out", "{out}", "--params", "foo"],
     ["invalid choice: 'foo' (choose from 'imagenet-c', 'cifar-c')"]),
    ("corrupt-severities", ["corrupt", "--out", "{out}", "--severities", "0,9"], ["1..5"]),
    ("corrupt-workers", ["corrupt", "--out", "{out}", "--workers", "-2"],
     ["workers must be a non-negative integer"]),
    ("report-missing", ["report", "{tmp}/nowhere", "--out", "{out}"], ["is not a folder"]),
    ("report-out-is-file", ["report", "{run}", "--out", "{notadir}"], ["is a file; give a folder"]),
]


@pytest.mark.parametrize("argv, words", [(a, w) for _, a, w in SETTINGS], ids=[c[0] for c in SETTINGS])
def test_impossible_settings_exit_2_before_any_work(world, argv, words, capsys, monkeypatch,
                                                    tmp_path) -> None:
    monkeypatch.setenv("VITSAM_CACHE", str(Path(world["tmp"]) / "cache"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    before = _digest(world["run"])
    capsys.readouterr()
    assert main([a.format(out=out, **world) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitsam: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert _digest(world["run"]) == before
