"""A cache in a shared folder: entries are readable by the folder's other users (as the umask
allows), and an entry that cannot be loaded is rebuilt with a warning naming it, not silently."""
import os
import stat

import torch

from vitsam.data import cache

from procs import run_together


def test_cache_entry_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        cache.load_or_build(tmp_path, "t", "k" * 24, lambda: {"x": torch.arange(3)})
    finally:
        os.umask(old)
    path = cache.cache_path(tmp_path, "t", "k" * 24)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # others can read it


def test_unreadable_entry_is_rebuilt_with_a_warning(tmp_path, capsys):
    path = cache.cache_path(tmp_path, "t", "k" * 24)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    builds = []

    def build():
        builds.append(1)
        return {"x": torch.arange(3)}

    assert torch.equal(cache.load_or_build(tmp_path, "t", "k" * 24, build)["x"], torch.arange(3))
    err = capsys.readouterr().err
    assert len(builds) == 1 and err.count("\n") == 1
    assert err.startswith("vitsam: warning: cache entry") and str(path) in err and "rebuilding" in err
    # The replacement loads without a warning or another build.
    assert torch.equal(cache.load_or_build(tmp_path, "t", "k" * 24, build)["x"], torch.arange(3))
    assert len(builds) == 1 and capsys.readouterr().err == ""


# -- two processes on a cold cache --------------------------------------------------------------

TIMEOUT_S = 300  # generous: the machine may be busy with other work
WAITING = "waiting for another process to finish building cache entry"


def _image_folder(root) -> None:
    """A tiny ImageFolder tree of 8x8 RGB PNGs (small images: decoded into the tensor cache)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")


def _digest(train_images, train_labels, test_images, test_labels) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in (train_images, train_labels, test_images, test_labels):
        h.update(str((tuple(t.shape), t.dtype)).encode() + t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _build_data(i: int, root: str, cache_dir: str, tmp: str, barrier) -> None:
    """One process of the pair: build the data of ``root`` and write what it loaded."""
    import contextlib
    import json
    import time
    from pathlib import Path

    from vitsam.data import DataConfig, build

    tmp_path = Path(tmp)
    scan_listing = build._scan_listing

    def scan_slowly(*args, **kwargs):
        # Recorded, and held until the other process has seen the entry missing and waits for
        # it, so that both really meet on a cold cache (at most 30 s: without a lock nobody waits).
        with open(tmp_path / "builds.txt", "a") as fh:
            fh.write(f"{i}\n")
        other = tmp_path / f"err{1 - i}.txt"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (other.exists() and WAITING in other.read_text()):
            time.sleep(0.05)
        return scan_listing(*args, **kwargs)

    build._scan_listing = scan_slowly
    with open(tmp_path / f"err{i}.txt", "w", buffering=1) as err, contextlib.redirect_stderr(err):
        barrier.wait(TIMEOUT_S)  # both start on the cold cache together
        bundle = build.build_data(DataConfig(source="imagefolder", root=root, cache_dir=cache_dir))
    digest = _digest(bundle.train.images, bundle.train.labels, bundle.test.images,
                     bundle.test.labels)
    (tmp_path / f"result{i}.json").write_text(json.dumps({"digest": digest,
                                                          "classes": bundle.classes}))


def test_two_processes_on_a_cold_cache_build_it_once_and_load_the_same_entry(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from vitsam.data import build

    root, cache_dir = tmp_path / "images", tmp_path / "cache"
    _image_folder(root)
    run_together(_build_data, [(i, str(root), str(cache_dir), str(tmp_path)) for i in range(2)],
                 TIMEOUT_S)
    # One process decoded the images; the other waited for it and loaded its entry.
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
    errs = [(tmp_path / f"err{i}.txt").read_text() for i in range(2)]
    assert sorted(WAITING in e for e in errs) == [False, True], errs
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    assert results[0] == results[1]
    # The entry is complete, with no temporary file left beside it, and holds the images as an
    # independent decode of the PNGs gives them.
    entries = sorted(p.name for p in (cache_dir / "tensors").iterdir())
    assert len(entries) == 2 and entries[0].startswith(".") and entries[0].endswith(".safetensors.lock")
    entry = cache.read_entry(cache_dir / "tensors" / entries[1])

    def pngs(split: str):
        files = [(lab, f) for lab, c in enumerate("ab") for f in sorted((root / split / c).iterdir())]
        images = np.stack([np.asarray(Image.open(f)).transpose(2, 0, 1) for _, f in files])
        return torch.from_numpy(images), torch.tensor([lab for lab, _ in files])

    assert results[0]["digest"] == _digest(*pngs("train"), *pngs("val"))
    assert results[0]["digest"] == _digest(entry["train_images"], entry["train_labels"],
                                           entry["test_images"], entry["test_labels"])
    assert results[0]["classes"] == ["a", "b"]
    # Loading it again here builds nothing.
    bundle = build.build_data(build.DataConfig(source="imagefolder", root=str(root),
                                               cache_dir=str(cache_dir)))
    assert torch.equal(bundle.train.images, entry["train_images"])


def test_a_build_killed_mid_write_leaves_nothing_the_next_build_keeps(tmp_path):
    """The temporary file of a writer that died is removed by the next build of the entry."""
    import subprocess
    import sys

    from vitsam import io as vio

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    path = cache.cache_path(tmp_path, "t", "k" * 24)
    path.parent.mkdir(parents=True)
    stale = path.with_name(f".{path.name}.{vio._HOST}-{dead}-0123abcd.tmp")
    live = path.with_name(f".{path.name}.{vio._HOST}-{os.getpid()}-0123abcd.tmp")
    other = path.with_name(f".other.safetensors.{vio._HOST}-{dead}-0123abcd.tmp")  # another entry's
    for p in (stale, live, other):
        p.write_bytes(b"half an entry")
    cache.load_or_build(tmp_path, "t", "k" * 24, lambda: {"x": torch.arange(3)})
    assert not stale.exists() and live.exists() and other.exists()
