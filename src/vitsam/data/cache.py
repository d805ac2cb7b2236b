"""On-disk cache of decoded uint8 image tensors, keyed by the content of the source.

Keys: for files whose bytes are read anyway (CIFAR pickles, the CIFAR-10 tarball) the sha256 of
their bytes; for ImageFolder trees the sha256 of the sorted list of (relative path, size in bytes,
mtime in ns) of every image, which changes whenever a file is added, removed, replaced or touched
without reading 60,000 files. The cache format version and the decode settings are part of the
key, and the entry format version (``ENTRY_VERSION``) is part of each entry's file name: version 2
entries hold the test images' ids (``test_ids``) and rescale 16-bit images instead of clipping
them, so no version 1 entry is ever read for them (the unpacked tarball, keyed by its bytes
alone, is kept). Entries are written to a temporary file and renamed into place, so a crash or a concurrent
writer never leaves a half-written entry.

Many processes at once (study workers, several runs on one cache): an entry is built under an
exclusive ``flock`` of its own (``vitsam.io.locked``), so one process builds it and the others
wait (with a line on stderr saying so) and then load what it wrote instead of decoding the same
images again. A build killed half-way leaves its temporary file behind; the next build of that
entry removes it (``vitsam.io.remove_stale_temporaries``).
"""
from __future__ import annotations

import hashlib
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..io import atomic_writer, locked, remove_stale_temporaries

CACHE_VERSION = 1
ENTRY_VERSION = 2


def file_digest(paths: Sequence[str | Path]) -> str:
    """sha256 (hex) over the names and bytes of ``paths``, in the given order."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def listing_digest(root: str | Path, files: Iterable[str | Path], extra: str = "") -> str:
    """sha256 (hex) over (path relative to ``root``, size, mtime_ns) of each file, sorted by path."""
    root = Path(root)
    h = hashlib.sha256(f"v{CACHE_VERSION}|{extra}".encode())
    for p in sorted(str(f) for f in files):
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, name: str, key: str) -> Path:
    """Where the entry ``name`` with content key ``key`` lives."""
    return Path(cache_dir) / "tensors" / f"{name}-v{ENTRY_VERSION}-{key[:24]}.pt"


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of ``path``, or None when it does not exist: tells a replaced entry."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _load(path: Path) -> dict | None:
    """The entry at ``path``, or None (with a one-line warning) when it cannot be loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"vitsam: warning: cache entry {path} is unreadable ({type(exc).__name__}: "
              f"{first}); rebuilding it", file=sys.stderr)
        return None


def load_or_build(cache_dir: str | Path, name: str, key: str, build: Callable[[], dict]) -> dict:
    """Return the cached dict of tensors/strings for (name, key), building and storing it if absent.

    An unreadable entry (e.g. from an older torch, or another user's file without read
    permission) is rebuilt and replaced rather than trusted, with a one-line warning naming it,
    so that a cache which never works does not go unnoticed. Only one process at a time builds
    an entry; another that finds it missing waits for that build and loads its result.
    """
    path = cache_path(cache_dir, name, key)
    seen = _identity(path)
    if seen is not None and (data := _load(path)) is not None:
        return data
    with ExitStack() as stack:
        try:
            stack.enter_context(locked(path, waiting="vitsam: waiting for another process to "
                                                     f"finish building cache entry {path}"))
        except OSError:
            pass  # a read-only cache folder: no lock, and the write below says why it fails
        now = _identity(path)
        if now is not None and now != seen and (data := _load(path)) is not None:
            return data  # built (or replaced) by another process while this one waited
        remove_stale_temporaries(path.parent, path.name)
        data = build()
        with atomic_writer(path) as fh:
            torch.save(data, fh)
    return data
