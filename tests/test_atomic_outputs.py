"""Outputs written atomically (docs/reliability.md): a figure whose drawing fails midway keeps
the previous figure and leaves no temporary file, and every figure goes through
``vitsam.io.save_figure``; a study's error file of a failed cell is replaced whole or not at all."""
from __future__ import annotations

import errno
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import vitsam  # noqa: E402
from vitsam.analysis.prune import figures as prune_figures  # noqa: E402
from vitsam.io import save_figure  # noqa: E402


def _half_then_full_disk(self, fh, *args, **kwargs) -> None:
    """A ``savefig`` that writes part of a PNG and then meets a full disk."""
    fh.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def _curve() -> dict:
    return {"removed_fraction": [0.0, 0.5], "accuracy": [0.9, 0.6]}


def test_save_figure_writes_the_png_and_closes_the_figure(tmp_path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "sub" / "f.png", dpi=50)
    assert path == tmp_path / "sub" / "f.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]


def test_a_savefig_failing_midway_keeps_the_previous_figure(tmp_path, monkeypatch) -> None:
    (path,) = prune_figures(_curve(), tmp_path)  # the previous, complete figure
    before = path.read_bytes()
    monkeypatch.setattr(Figure, "savefig", _half_then_full_disk)
    open_before = plt.get_fignums()
    with pytest.raises(OSError, match="No space left"):
        prune_figures(_curve(), tmp_path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune_curve.png"]  # no temporary
    assert plt.get_fignums() == open_before  # the failed figure was closed too


def test_a_first_figure_failing_midway_leaves_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Figure, "savefig", _half_then_full_disk)
    fig = plt.figure()
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "f.png")
    assert list(tmp_path.iterdir()) == []


def test_every_figure_goes_through_save_figure() -> None:
    """No module but ``vitsam.io`` calls ``savefig``: a new figure cannot bypass the atomic write."""
    src = Path(vitsam.__file__).parent
    callers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                     if re.search(r"\.savefig\(", p.read_text()))
    assert callers == ["io.py"]


def test_a_study_error_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    import os

    import vitsam.io
    from vitsam.study import runner
    from vitsam.study.presets import get_study

    cell = "vit-vanilla-s0"
    tracebacks = iter(["Traceback A: the first failure\n", "Traceback B: the second\n"])

    def failing(*args, **kwargs):
        return {"status": "failed", "error": "RuntimeError: no", "traceback": next(tracebacks)}

    monkeypatch.setattr(runner, "_worker", failing)
    study = get_study("augment")
    with pytest.raises(runner.StudyFailed, match=cell):
        runner.run_study(study, "smoke", tmp_path, only=[cell], progress=False)
    error = tmp_path / "_shared" / f"{cell}.error.txt"
    assert error.read_text() == "Traceback A: the first failure\n"

    real_replace = os.replace

    def full_disk_at_the_error_file(src, dst):
        if str(dst).endswith(".error.txt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(vitsam.io.os, "replace", full_disk_at_the_error_file)
    with pytest.raises(OSError, match="No space left"):
        runner.run_study(study, "smoke", tmp_path, only=[cell], progress=False)
    assert error.read_text() == "Traceback A: the first failure\n"
    assert [p.name for p in error.parent.iterdir()] == [error.name]  # no temporary file
