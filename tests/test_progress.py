"""Progress output: one line per interval in a log, a live bar on a terminal, one factory for all."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from vitsam.cli import main
from vitsam.config import ConfigError, apply_overrides
from vitsam.presets import get_preset
from vitsam.progress import ENV, line_interval
from vitsam.train import engine

SRC = Path(__file__).resolve().parents[1] / "src"
INTERVAL = 0.2
# A bar like training's: 30 steps of 40 ms with a postfix set at every step (each set_postfix
# asks tqdm for a redraw), an iterated bar and an inner bar that does not stay.
DRIVER = """
import sys, time
from vitsam.progress import progress_bar
t0 = time.perf_counter()
with progress_bar(total=30, desc="demo", unit="step") as bar:
    for i in range(30):
        time.sleep(0.04)
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
print(time.perf_counter() - t0)
for _ in progress_bar(range(3), desc="iterated"):
    pass
inner = progress_bar(total=2, desc="inner", leave=False)
inner.update(2)
inner.close()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), ENV: str(INTERVAL)}


def test_a_log_gets_one_line_per_interval_and_no_carriage_returns(tmp_path) -> None:
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        done = subprocess.run([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=err,
                              env=_env(), text=True, timeout=60, check=True)
    seconds = float(done.stdout.split()[0])  # the bar's lifetime
    text = log.read_text()
    assert "\r" not in text
    demo = [line for line in text.splitlines() if line.startswith("demo:")]
    assert 3 <= len(demo) <= seconds / INTERVAL + 2, (len(demo), seconds)
    assert demo[0].startswith("demo:   0% 0/30") and demo[-1].startswith("demo: 100% 30/30")
    assert "loss=0.033" in demo[-1]  # the last postfix is in the last line
    assert [line.split()[1] for line in text.splitlines() if line.startswith("iterated:")] == ["0%", "100%"]
    assert not [line for line in text.splitlines() if line.startswith("inner:") and "100%" in line]


def test_a_terminal_still_gets_a_live_bar(tmp_path) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.DEVNULL, stderr=slave,
                            env=_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode()
    redraws = re.findall(r"\rdemo:", text)  # the bar rewriting its own line
    assert len(redraws) >= 3 and re.search(r"\r(?!\n)", text)
    assert "30/30" in text


def test_training_progress_in_a_captured_stream_has_no_redraws(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(ENV, "1000")
    cfg = apply_overrides(get_preset("mnist-vit", smoke_size=True), [f"out_dir={tmp_path}"])
    engine.train(cfg, run_dir=tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mnist-vit-smoke:")]
    assert "\r" not in err and len(lines) == 2  # the start and the end: the run is < 1000 s
    assert lines[-1].startswith("mnist-vit-smoke: 100% 3/3")


def test_every_bar_goes_through_the_factory() -> None:
    users = [p.relative_to(SRC).as_posix() for p in (SRC / "vitsam").rglob("*.py")
             if p.name != "progress.py" and re.search(r"^\s*(from|import) tqdm", p.read_text(), re.M)]
    assert users == []


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_a_bad_interval_is_a_one_line_error_before_any_work(value, monkeypatch, capsys) -> None:
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ConfigError, match=f"{ENV} must be a number of seconds > 0"):
        line_interval()
    assert main(["presets"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"got {value!r}" in err
    monkeypatch.setenv(ENV, "2.5")
    assert line_interval() == 2.5
    monkeypatch.delenv(ENV)
    assert line_interval() == 30.0
