"""A cache in a shared folder: entries are readable by the folder's other users (as the umask
allows), and an entry that cannot be loaded is rebuilt with a warning naming it, not silently."""
import os
import stat

import torch

from vitsam.data import cache


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
