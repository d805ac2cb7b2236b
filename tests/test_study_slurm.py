"""``vitsam study --launcher slurm`` through submitit's Slurm executor, against a fake Slurm
(tests/fake_slurm.py: sbatch runs each job locally in the background; sacct reports its state)."""
from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import pytest

pytest.importorskip("submitit")

import fake_slurm  # noqa: E402
from submitit.core import core  # noqa: E402

from vitsam.config import ConfigError  # noqa: E402
from vitsam.study import slurm  # noqa: E402
from vitsam.study.presets import get_study  # noqa: E402
from vitsam.study.runner import StudyFailed, run_study  # noqa: E402

pytestmark = pytest.mark.slow

CELLS = ["mnist-vit-s0", "mnist-resnet-s0"]
OPTS = slurm.SlurmOptions(partition="cpu", time_min=90, gpus_per_cell=2, cpus_per_cell=2,
                          account="proj", extra=(("qos", "high"),), poll_s=0.2)
_ids = itertools.count(1000, 1000)  # submitit caches job states by id: no id twice


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The fake Slurm on PATH; a job without a result is seen as such at once."""
    for key, value in fake_slurm.install(tmp_path / "slurm", next(_ids)).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(core.Job, "_results_timeout_s", 0)
    return tmp_path / "slurm"


def _rows(out: Path) -> list[dict[str, str]]:
    """The study's table rows without its timing column (a rate, never the same twice) and
    the cell's status in this run (done, or reused from an earlier run)."""
    rows = list(csv.DictReader(io.StringIO((out / "demo.csv").read_text())))
    return [{k: v for k, v in r.items() if "images_per_s" not in k and k != "status"}
            for r in rows]


def _submitted(cluster: Path) -> list[str]:
    """The job names sbatch was given, in order."""
    names = []
    for jid in sorted(int(p.stem) for p in cluster.glob("*.sh")):
        text = (cluster / f"{jid}.sh").read_text()
        names += [ln.split("=", 1)[1] for ln in text.splitlines()
                  if ln.startswith("#SBATCH --job-name=")]
    return names


def test_cells_as_jobs_lost_job_reported_then_resubmitted_alone(cluster, tmp_path, monkeypatch):
    out = tmp_path / "study"
    monkeypatch.setenv("FAKE_SLURM_LOSE", "vitsam-mnist-resnet-s0:1")  # its first job is lost
    with pytest.raises(StudyFailed, match=r"^1 of 2 cells failed \(mnist-resnet-s0\); "
                                          r"mnist-resnet-s0: slurm job \d+ ended NODE_FAIL"):
        run_study(get_study("demo"), "smoke", out, only=CELLS, launcher="slurm", slurm=OPTS,
                  progress=False)
    rec = json.loads((out / "study-demo.json").read_text())
    assert rec["launcher"] == "slurm"
    assert rec["cells"]["mnist-vit-s0"]["status"] == "done"
    lost = rec["cells"]["mnist-resnet-s0"]
    assert lost["status"] == "failed" and "\n" not in lost["error"]
    assert "has not produced any output" in (out / "_shared" / "mnist-resnet-s0.error.txt").read_text()
    # One job per cell, each its own sbatch script asking for what the options say.
    assert sorted(_submitted(cluster)) == ["vitsam-mnist-resnet-s0", "vitsam-mnist-vit-s0"]
    script = next(p for p in cluster.glob("*.sh")
                  if "vitsam-mnist-vit-s0" in p.read_text()).read_text()
    for line in ("#SBATCH --partition=cpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"):
        assert line in script.splitlines(), line
    command = script.strip().splitlines()[-1]
    assert command.startswith("srun ") and "-m submitit.core._submit" in command
    assert str(out / "_shared" / "slurm") in command

    # The rerun resubmits the failed cell alone, reuses the finished one, and reports as the
    # local launcher does.
    monkeypatch.delenv("FAKE_SLURM_LOSE")
    rec = run_study(get_study("demo"), "smoke", out, only=CELLS, launcher="slurm", slurm=OPTS,
                    progress=False)
    assert rec["cells"]["mnist-vit-s0"] == {"status": "reused"}
    assert rec["cells"]["mnist-resnet-s0"]["status"] == "done"
    assert _submitted(cluster).count("vitsam-mnist-vit-s0") == 1
    assert _submitted(cluster).count("vitsam-mnist-resnet-s0") == 2
    local = tmp_path / "local"
    run_study(get_study("demo"), "smoke", local, only=CELLS, progress=False)
    assert _rows(out) == _rows(local)
    assert len(_rows(out)) == 2


def test_retries_submit_a_lost_job_again_within_the_run(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_LOSE", "vitsam-mnist-vit-s0:1")
    opts = slurm.SlurmOptions(retries=1, poll_s=0.2, cpus_per_cell=1)
    rec = run_study(get_study("demo"), "smoke", tmp_path / "study", only=[CELLS[0]],
                    launcher="slurm", slurm=opts, progress=False)
    entry = rec["cells"][CELLS[0]]
    assert entry["status"] == "done" and entry["attempts"] == 2
    assert _submitted(cluster) == ["vitsam-mnist-vit-s0"] * 2


def test_a_stopped_study_cancels_its_jobs(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_HOLD", "1")  # the jobs stay queued

    def interrupt(seconds):
        raise KeyboardInterrupt  # Ctrl-C while the study waits for its jobs

    monkeypatch.setattr(slurm, "_pause", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_study(get_study("demo"), "smoke", tmp_path / "study", only=CELLS, launcher="slurm",
                  slurm=OPTS, progress=False)
    ids = sorted(p.stem for p in cluster.glob("*.sh"))
    assert len(ids) == 2
    assert sorted(c[1] for c in fake_slurm.calls(cluster, "scancel")) == ids


def test_bad_slurm_options_are_one_line_errors(cluster, tmp_path, monkeypatch):
    study = get_study("demo")
    with pytest.raises(ConfigError, match=r"^--workers is for the local launcher"):
        run_study(study, "smoke", tmp_path / "s", launcher="slurm", workers=2, progress=False)
    with pytest.raises(ConfigError, match=r"^--retries must be 0 or more"):
        run_study(study, "smoke", tmp_path / "s", launcher="slurm",
                  slurm=slurm.SlurmOptions(retries=-1), progress=False)
    with pytest.raises(ConfigError, match=r"^--slurm-extra 'qos' must be key=value"):
        slurm.parse_extra(["qos"])
    assert slurm.parse_extra(["--qos=high", "gres=gpu:2"]) == (("qos", "high"), ("gres", "gpu:2"))
    assert [slurm.parse_time(t) for t in ("90", "1:30:00", "10:30", "2-0", "1-2:3")] == \
        [90, 90, 11, 2880, 1563]
    with pytest.raises(ConfigError, match=r"^--slurm-time 'soon' is not"):
        slurm.parse_time("soon")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match=r"^--launcher slurm: no sbatch/srun on PATH"):
        run_study(study, "smoke", tmp_path / "s", launcher="slurm", progress=False)
    monkeypatch.setitem(__import__("sys").modules, "submitit", None)
    with pytest.raises(ConfigError, match=r"^--launcher slurm needs submitit: pip install submitit$"):
        run_study(study, "smoke", tmp_path / "s", launcher="slurm", progress=False)
    assert not (tmp_path / "s").exists()
