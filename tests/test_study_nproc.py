"""``vitsam study --nproc N``: each cell's training a torchrun job of N real gloo processes.

The reference is the same cell trained by one process: with ``optim.sync_perturbation=true``
two ranks on half-batches do the one-process step up to float32 rounding (tests/
test_distributed.py measures it: ATOL).
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from vitsam.cli import main
from vitsam.config import ConfigError
from vitsam.study import launchers
from vitsam.study.presets import get_study
from vitsam.study.runner import StudyFailed, run_study
from vitsam.train.checkpoint import resolve_checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")]

ATOL = 2e-5  # as tests/test_distributed.py: two half-batch means against one whole-batch mean
CELL = "mnist-vit-sam-s0"
SYNC = ("optim.sync_perturbation=true",)


def _weights(run_dir: Path) -> dict:
    return load_file(str(resolve_checkpoint(run_dir, "last") / "model.safetensors"))


def _record(out: Path) -> dict:
    return json.loads((out / "study-demo.json").read_text())


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nproc")
    run_study(get_study("demo"), "smoke", tmp / "two", only=[CELL], overrides=SYNC, nproc=2,
              progress=False)
    run_study(get_study("demo"), "smoke", tmp / "one", only=[CELL], overrides=SYNC,
              progress=False)
    return tmp


def test_two_process_cell_equals_the_one_process_cell(studies):
    two, one = studies / "two" / CELL, studies / "one" / CELL
    assert json.loads((two / "final.json").read_text())["processes"] == 2
    assert json.loads((one / "final.json").read_text())["processes"] == 1
    w2, w1 = _weights(two), _weights(one)
    assert w2.keys() == w1.keys()
    assert max(float((w2[k] - w1[k]).abs().max()) for k in w2) < ATOL
    # The torchrun job as documented, and its stages run after it (in one process).
    log = (studies / "two" / "_shared" / "launch" / f"{CELL}.torchrun.log").read_text()
    first = log.splitlines()[0]
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m vitsam train" in first
    assert f"--run-dir {two}" in first
    rec = _record(studies / "two")
    assert rec["nproc"] == 2 and rec["cells"][CELL]["status"] == "done"
    assert rec["cells"][CELL]["ran"] == ["train", "hessian"]
    # The same table: the accuracies (sharded evaluation, every image once) are equal.
    t2 = (studies / "two" / "demo.csv").read_text().splitlines()
    t1 = (studies / "one" / "demo.csv").read_text().splitlines()
    head = t1[0].split(",")
    acc = [i for i, h in enumerate(head) if h.startswith(("test_acc", "train_acc"))]
    assert acc and [t2[1].split(",")[i] for i in acc] == [t1[1].split(",")[i] for i in acc]


def test_finished_cell_is_reused_without_a_new_job(studies):
    log = studies / "two" / "_shared" / "launch" / f"{CELL}.torchrun.log"
    before = log.stat().st_mtime_ns
    rec = run_study(get_study("demo"), "smoke", studies / "two", only=[CELL], overrides=SYNC,
                    nproc=2, progress=False)
    assert rec["cells"][CELL] == {"status": "reused"}
    assert log.stat().st_mtime_ns == before


def test_a_failing_rank_fails_the_cell_with_one_line(tmp_path, monkeypatch):
    """Rank 1 dies at start-up (exit status 7): torchrun stops rank 0, the cell fails, the
    error names the rank, its status and the log."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('RANK') == '1' and os.environ.get('VITSAM_TEST_DIE'):\n"
        "    os._exit(7)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("VITSAM_TEST_DIE", "1")
    out = tmp_path / "study"
    with pytest.raises(StudyFailed, match=f"1 of 1 cells failed \\({CELL}\\)"):
        run_study(get_study("demo"), "smoke", out, only=[CELL], nproc=2, progress=False)
    log = out / "_shared" / "launch" / f"{CELL}.torchrun.log"
    err = _record(out)["cells"][CELL]["error"]
    assert err == (f"CellTrainingFailed: training on 2 processes failed: rank 1 exited with "
                   f"status 7 (log: {log})")
    assert "\n" not in err
    assert (out / "_shared" / f"{CELL}.error.txt").read_text().startswith("Traceback")


def test_indivisible_batch_is_the_one_line_error_before_any_process(tmp_path):
    out = tmp_path / "study"
    msg = (r"^train\.batch_size=31 \(the global batch\) does not divide among 2 processes; "
           r"use a multiple of 2, e\.g\. 30 or 32$")
    with pytest.raises(ConfigError, match=msg):
        run_study(get_study("demo"), "smoke", out, only=[CELL], overrides=["train.batch_size=31"],
                  nproc=2, progress=False)
    assert not out.exists()  # refused before the folder was made
    with pytest.raises(ConfigError, match=r"^train\.batch_size=32 .* among 3 processes; use a "
                                          r"multiple of 3, e\.g\. 30 or 33$"):
        run_study(get_study("demo"), "smoke", out, only=[CELL, "mnist-vit-s0"], nproc=3,
                  progress=False)


@pytest.mark.parametrize("argv, line", [
    (["--nproc", "0"], "vitsam: error: --nproc must be a positive integer (processes per cell), got 0"),
    (["--launcher", "pbs"], "vitsam: error: unknown --launcher 'pbs'; choose from local, slurm"),
    (["--slurm-partition", "gpu"], "vitsam: error: --slurm-partition is for --launcher slurm"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, line):
    code = main(["study", "demo", "--scale", "smoke", "--out", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == line
    assert not (tmp_path / "s").exists()


def test_torchrun_command_and_failure_lines():
    cmd = launchers.torchrun_command(4, Path("out/c"), Path("out/_shared/launch/c.config.json"))
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                       "-m", "vitsam", "train", "--quiet", "--config",
                       "out/_shared/launch/c.config.json", "--run-dir", "out/c"]
    assert launchers.torchrun_command(2, Path("out/c"), None)[-2:] == ["--resume", "out/c"]
    # Rank 0's own line wins over torchrun's summary.
    log = ("vitsam: warning: x\nvitsam: error: data.root /x does not exist\nTraceback\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\nRoot Cause\n"
           "  rank      : 0 (local_rank: 0)\n  exitcode  : 2 (pid: 1)\n")
    assert launchers.failure_line(log, 1, 2) == ("training on 2 processes failed: data.root /x "
                                                 "does not exist")
    summary = ("Traceback (most recent call last):\n  File x\nRuntimeError: boom in rank 1\n"
               "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
               "Failures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : -15 (pid: 5)\n"
               "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n"
               "  exitcode  : {code} (pid: 6)\n")
    assert launchers.failure_line(summary.format(code=1), 1, 2) == (
        "training on 2 processes failed: rank 1 exited with status 1: RuntimeError: boom in rank 1")
    assert launchers.failure_line(summary.format(code=-int(signal.SIGKILL)), 1, 2).startswith(
        "training on 2 processes failed: rank 1 killed by SIGKILL")
    assert launchers.failure_line("", 3, 2) == ("training on 2 processes failed: torchrun "
                                                "exited with status 3")


def test_train_config_file_errors_are_one_line(tmp_path, capsys):
    """``vitsam train --config`` (what a cell's torchrun job runs): a saved config, alone."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"epochs": "three"}}))
    assert main(["train", "--config", str(cfg), "--preset", "mnist-vit"]) == 2
    assert capsys.readouterr().err.strip() == ("vitsam: error: --config gives the whole starting "
                                               "config; drop --preset and --smoke")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitsam: error: train.epochs") and err.endswith(f"(in {cfg}; correct it there)")
    assert main(["train", "--resume", str(tmp_path), "--config", str(cfg)]) == 2
    assert "drop --preset, --smoke, --config" in capsys.readouterr().err
