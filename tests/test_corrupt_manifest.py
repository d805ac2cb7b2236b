"""A corruption set's manifest lists exactly the verified parts on disk, says complete only when
every requested part is there, survives builds running at once, and evaluation refuses a set
that is not complete with a one-line error."""
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vitsam.cli import error_line
from vitsam.data import corruptions as C
from vitsam.eval import robustness as R

TIMEOUT_S = 120
SEV = (1, 2)
FIRST, SECOND = ["gaussian_noise", "contrast"], ["brightness", "pixelate"]


def _images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 1, 8, 8), dtype=np.uint8), np.array([0, 1, 2])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def _evaluate(set_dir: Path) -> dict:
    return R.evaluate_corruptions(_model(), set_dir, (0.5,), (0.5,), 8, progress=False)


def _synced(barrier):
    """``_corrupt_chunk`` that first waits for the other build: both then hold a copy of the
    manifest from before either recorded a part (what lost parts before the lock)."""
    real, first = C._corrupt_chunk, [True]

    def synced(*args):
        if first[0]:
            first[0] = False
            barrier.wait(TIMEOUT_S)
        return real(*args)

    return synced


def _build_in_step(out: str, corruptions: list[str], barrier) -> None:
    C._corrupt_chunk = _synced(barrier)
    C.build_corruption_set(*_images(), out, params="cifar-c", corruptions=corruptions, severities=SEV,
                           workers=0, progress=False)


@pytest.mark.slow
def test_two_builds_at_once_keep_each_others_parts(tmp_path, monkeypatch):
    # Two processes: this one and one spawned (a second spawned one would only add its start-up).
    out = tmp_path / "set"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    other = ctx.Process(target=_build_in_step, args=(str(out), SECOND, barrier))
    other.start()
    try:
        monkeypatch.setattr(C, "_corrupt_chunk", _synced(barrier))
        C.build_corruption_set(*_images(), out, params="cifar-c", corruptions=FIRST, severities=SEV,
                               workers=0, progress=False)
        monkeypatch.undo()
    finally:
        other.join(TIMEOUT_S)
        if other.is_alive():
            other.kill()
    assert other.exitcode == 0

    everything = C.corruption_names(FIRST + SECOND)
    on_disk = sorted(d.name for d in out.iterdir() if d.is_dir())
    man = C.load_corruption_set(out)
    assert on_disk == sorted(everything)
    assert {(c, int(s)) for c, v in man["parts"].items() for s in v} == {(c, s) for c in everything for s in SEV}
    assert man["corruptions"] == everything and man["severities"] == list(SEV) and man["complete"]
    assert C.requested_parts(man) == {(c, s) for c in everything for s in SEV}

    # The same content as one build of all four in one process.
    ref = C.build_corruption_set(*_images(), tmp_path / "ref", params="cifar-c", corruptions=everything,
                                 severities=SEV, workers=0, progress=False)
    got, want = list(C.iter_corruption_set(out)), list(C.iter_corruption_set(ref))
    assert [x[:2] for x in got] == [x[:2] for x in want]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(got, want))

    res = _evaluate(out)
    assert res["corruptions"] == everything
    assert {c: sorted(v) for c, v in res["accuracy"].items()} == {c: ["1", "2"] for c in everything}
    assert res == _evaluate(ref) | {"corruption_dir": str(out)}


def _interrupt_after(monkeypatch, calls: int) -> None:
    real, seen = C._corrupt_chunk, []

    def interrupted(*args):
        if len(seen) == calls:
            raise KeyboardInterrupt
        seen.append(args[2:4])
        return real(*args)

    monkeypatch.setattr(C, "_corrupt_chunk", interrupted)


def _build(out: Path, names: list[str]) -> Path:
    return C.build_corruption_set(*_images(), out, params="cifar-c", corruptions=names, severities=SEV,
                                  workers=0, progress=False)


def test_interrupt_before_the_first_part_leaves_a_set_eval_refuses(tmp_path, monkeypatch):
    out = tmp_path / "set"
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        _build(out, FIRST)
    man = json.loads((out / "manifest.json").read_text())
    assert man["parts"] == {} and man["corruptions"] == [] and man["severities"] == []
    assert not man["complete"]
    with pytest.raises(C.CorruptionSetError) as info:
        _evaluate(out)
    line = error_line(info.value)
    assert line == str(info.value)  # one line
    assert str(out) in line and "incomplete" in line and "4 of 4" in line and "vitsam corrupt" in line

    monkeypatch.undo()
    _build(out, FIRST)  # the re-run finishes it
    assert C.load_corruption_set(out)["complete"]
    assert sorted(_evaluate(out)["accuracy"]) == sorted(FIRST)


def test_manifest_never_lists_a_part_that_is_not_there(tmp_path, monkeypatch):
    out = _build(tmp_path / "set", FIRST)
    (out / C.part_file("contrast", 2)).unlink()
    # A later build of other corruptions, interrupted after one part: the manifest drops the
    # deleted part at once and lists the one new part, and eval names what is missing.
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _build(out, SECOND)
    man = C.load_corruption_set(out)
    listed = {(c, int(s)) for c, v in man["parts"].items() for s in v}
    assert listed == {("gaussian_noise", 1), ("gaussian_noise", 2), ("contrast", 1), ("brightness", 1)}
    assert all((out / C.part_file(c, s)).exists() for c, s in listed)
    assert man["corruptions"] == ["gaussian_noise", "brightness", "contrast"] and not man["complete"]
    assert C.missing_parts(man) == [("brightness", 2), ("contrast", 2), ("pixelate", 1), ("pixelate", 2)]
    with pytest.raises(C.CorruptionSetError, match=r"4 of 8 requested parts .*\(brightness 2, contrast 2"):
        _evaluate(out)

    # Finishing one build is not enough: the other's parts are still requested.
    monkeypatch.undo()
    _build(out, SECOND)
    assert C.missing_parts(C.load_corruption_set(out)) == [("contrast", 2)]
    with pytest.raises(C.CorruptionSetError, match="1 of 8"):
        _evaluate(out)
    _build(out, FIRST)
    assert C.load_corruption_set(out, complete=True)["corruptions"] == C.corruption_names(FIRST + SECOND)


def test_a_part_damaged_after_recording_is_caught_at_the_end_of_a_build(tmp_path, monkeypatch):
    # Another build (here: the test) damages a recorded part while this build runs; the final
    # verification drops it instead of declaring the set complete.
    out = tmp_path / "set"
    real = C._corrupt_chunk

    def damage_first_part(images, start, corruption, severity, params, seed):
        if (corruption, severity) == ("contrast", 1) and (out / C.part_file("gaussian_noise", 1)).exists():
            (out / C.part_file("gaussian_noise", 1)).write_bytes(b"damaged")
        return real(images, start, corruption, severity, params, seed)

    monkeypatch.setattr(C, "_corrupt_chunk", damage_first_part)
    _build(out, FIRST)
    man = C.load_corruption_set(out)
    assert not man["complete"] and C.missing_parts(man) == [("gaussian_noise", 1)]
    monkeypatch.undo()
    _build(out, FIRST)
    assert C.load_corruption_set(out, complete=True)["complete"]


def test_corrupt_command_says_when_the_set_is_still_incomplete(tmp_path, monkeypatch, capsys):
    # Another build of this folder asked for gaussian_noise 1 and has not built it (still running,
    # or interrupted): this build finishes its own part, and says the set is not complete yet.
    from vitsam.cli import main

    out = str(tmp_path / "set")
    argv = ["corrupt", "--out", out, "--limit", "3", "--severities", "1", "--params", "cifar-c",
            "--workers", "0", "--quiet", "--corruptions"]
    _interrupt_after(monkeypatch, 0)
    assert main([*argv, "gaussian_noise"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "contrast"]) == 0
    said = capsys.readouterr().out.splitlines()[0]
    assert "incomplete" in said and "1 of 2 requested parts" in said and "(gaussian_noise 1)" in said
    assert "re-run" in said and "another `vitsam corrupt`" in said and not said.endswith(f"-> {out}")
    assert main([*argv, "gaussian_noise"]) == 0  # the re-run completes the set
    said = capsys.readouterr().out.splitlines()[0]
    assert said.endswith(f"-> {out}") and "incomplete" not in said
    assert C.load_corruption_set(out, complete=True)["corruptions"] == ["gaussian_noise", "contrast"]
