"""The command line end to end on smoke sizes, and its one-line errors."""
import json

import pytest

from vitsam.cli import main


def test_models_lists_names_counts_and_sizes(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vit-b16" in out and "86.6M" in out and "resnet152x2" in out and "236.3M" in out


def test_demo_smoke_trains_four_runs_and_prints_a_table(tmp_path, capsys) -> None:
    assert main(["demo", "--smoke", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    names = ("mnist-vit-s0", "mnist-vit-sam-s0", "mnist-resnet-s0", "mnist-resnet-sam-s0")
    finals = {n: json.loads((tmp_path / n / "final.json").read_text()) for n in names}
    assert [f["sam"] for f in finals.values()] == [False, True, False, True]
    for n in names:
        ana = json.loads((tmp_path / n / "analysis.json").read_text())
        lam = ana["hessian"]["result"]["lambda_max"]
        row = next(line for line in out.splitlines() if line.startswith(n + " "))
        # The table prints each run's own accuracy and lambda_max.
        assert f"{finals[n]['test_acc'] * 100:.2f}%" in row and f"{lam:.4g}" in row
    vit = [json.loads((tmp_path / n / "analysis.json").read_text())["hessian"]["result"]
           ["lambda_max"] for n in names[:2]]
    reading = next(line for line in out.splitlines() if line.startswith("vit: "))
    assert f"{vit[0]:.4g} -> {vit[1]:.4g}" in reading
    gain = next(line for line in out.splitlines() if "help the ViT more" in line)
    assert ("As in the paper" in gain) != ("Unlike the paper" in gain)
    assert sum("flatten" in line and "the paper" in line for line in out.splitlines()) == 1


def test_train_analyze_prune_chain(tmp_path, capsys) -> None:
    run = tmp_path / "vit"
    assert main(["train", "--preset", "mnist-vit-sam", "--smoke", "--quiet", "--run-dir", str(run),
                 "model.kwargs.depth=2"]) == 0
    assert main(["analyze", str(run), "--hessian", "--sparsity", "--attention", "--quiet",
                 "--batches", "1", "--batch-size", "16", "--set", "hessian.trace_probes=0"]) == 0
    result = json.loads((run / "analysis.json").read_text())
    assert result["hessian"]["result"]["lambda_max"] > 0
    assert len(result["sparsity"]["result"]["layers"]) == 2  # one MLP per block, depth 2
    assert len(result["attention"]["result"]["entropy_per_block"]) == 2
    assert (run / "hessian_top_eigenvalues.png").exists() and (run / "sparsity.png").exists()
    out = capsys.readouterr().out
    assert "lambda_max=" in out and "analysis.json" in out
    assert main(["prune", str(run), "--out", str(tmp_path / "pruned"), "--calib", "32",
                 "--no-speed"]) == 0
    assert (tmp_path / "pruned" / "prune.json").exists()
    other = tmp_path / "vit2"
    assert main(["train", "--preset", "mnist-vit", "--smoke", "--quiet", "--run-dir",
                 str(other)]) == 0
    assert main(["prune", str(run), str(other), "--out", str(tmp_path / "both"), "--calib", "16",
                 "--curve", "--no-speed"]) == 0
    assert (tmp_path / "both" / "prune_curve.png").exists()
    assert (tmp_path / "both" / "vit2" / "prune.json").exists()
    assert main(["analyze", str(tmp_path / "pruned"), "--sparsity", "--quiet", "--batches", "1",
                 "--batch-size", "8"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "mnist-vit-sma"], "unknown preset 'mnist-vit-sma' (did you mean"),
    (["train", "--preset", "mnist-vit", "train.epoch=3"], "did you mean train.epochs"),
    (["train", "--preset", "mnist-vit", "model.name=vit-x99"], "unknown model 'vit-x99'"),
    (["train", "--preset", "mnist-vit", "optim.rho=-1", "optim.sam=true"], "optim.rho must be > 0"),
    (["analyze", "/nonexistent/run", "--hessian"], "does not exist"),
    (["analyze", "/tmp", "--set", "hessian.k=2"], "choose at least one analysis"),
])
def test_bad_input_gives_one_line_errors(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_and_eval_chain(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--preset", "mnist-resnet-sam", "--smoke", "--quiet", "--run-dir",
                 str(run)]) == 0
    cset = tmp_path / "mnist-c"
    assert main(["corrupt", "--out", str(cset), "--limit", "12", "--corruptions",
                 "gaussian_noise,pixelate", "--severities", "1,5", "--workers", "1",
                 "--quiet"]) == 0
    assert (cset / "manifest.json").exists() and (cset / "contact_sheet.png").exists()
    # ReaL-style labels that are exactly the true labels must reproduce plain top-1.
    from vitsam.data import DataConfig, build_data

    test_labels = build_data(DataConfig()).test.labels.tolist()
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[y] for y in test_labels]))
    assert main(["eval", str(run), "--corruptions", str(cset), "--baseline", str(run),
                 "--real", str(real), "--throughput", "--batch-size", "64", "--quiet"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["mce"]["mCE"] == pytest.approx(1.0)  # a run against itself (fraction)
    assert set(result["corruptions"]["accuracy"]) == {"gaussian_noise", "pixelate"}
    assert result["real"]["top1"] == pytest.approx(result["test"]["top1"])
    assert result["throughput"]["inference"]["images_per_s"] > 0
    assert (run / "corruption_heatmap.png").exists()
    assert "mCE" in capsys.readouterr().out


def test_help_does_not_import_matplotlib() -> None:
    """The parser (``vitsam --help``, every usage error) leaves matplotlib unimported: figures
    import it when they draw. A fresh interpreter, as the shell starts one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import vitsam

    code = ("import contextlib, io, sys\n"
            "from vitsam.cli import build_parser, main\n"
            "build_parser()\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    rc = main(['--help'])\n"
            "print(rc, 'usage: vitsam' in out.getvalue(), 'matplotlib' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(vitsam.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.stdout.split() == ["0", "True", "False"], res.stderr
