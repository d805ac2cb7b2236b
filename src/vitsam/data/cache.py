"""On-disk cache of decoded uint8 image tensors, keyed by the content of the source.

Keys: for files whose bytes are read anyway (CIFAR pickles, the CIFAR-10 tarball) the sha256 of
their bytes; for ImageFolder trees the sha256 of the sorted list of (relative path, size in bytes,
mtime in ns) of every image, which changes whenever a file is added, removed, replaced or touched
without reading 60,000 files. The cache format version and the decode settings are part of the
key, and the entry format version (``ENTRY_VERSION``) is part of each entry's file name: version 2
entries hold the test images' ids (``test_ids``) and rescale 16-bit images instead of clipping
them; version 3 entries are safetensors files (the tensors, plus the other values as JSON in the
header's metadata, so nothing is ever unpickled), decode EXIF-rotated and transparent images as
``vitsam.data.decode`` says and record the files that could not be read, so no older entry is
ever read for them (the unpacked tarball, keyed by its bytes alone, is kept). Entries are written
to a temporary file and renamed into place, so a crash or a concurrent writer never leaves a
half-written entry; an entry that cannot be read or fails its reader's check is rebuilt.

Many processes at once (study workers, several runs on one cache): an entry is built under an
exclusive ``flock`` of its own (``vitsam.io.locked``), so one process builds it and the others
wait (with a line on stderr saying so) and then load what it wrote instead of decoding the same
images again. A build killed half-way leaves its temporary file behind; the next build of that
entry removes it (``vitsam.io.remove_stale_temporaries``).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..io import atomic_write_bytes, locked, remove_stale_temporaries

CACHE_VERSION = 1
ENTRY_VERSION = 3
ENTRY_FORMAT = "vitsam-cache/3"


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
        st = os.stat(p) if os.path.exists(p) else os.lstat(p)  # a broken link: the link itself
        h.update(f"{os.path.relpath(p, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, name: str, key: str) -> Path:
    """Where the entry ``name`` with content key ``key`` lives."""
    return Path(cache_dir) / "tensors" / f"{name}-v{ENTRY_VERSION}-{key[:24]}.safetensors"


def _digest(header: dict[str, Any], values: str, data: bytes) -> str:
    """sha256 over an entry's tensor names, dtypes and shapes, its JSON values and its tensor
    bytes: any change to the file (a flipped bit, a swapped shape) changes it."""
    layout = sorted((k, v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__")
    h = hashlib.sha256(json.dumps([layout, values]).encode())
    h.update(data)
    return h.hexdigest()


def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, tensor bytes) of a safetensors file's bytes; ValueError if it is not one."""
    if len(blob) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ValueError(f"its header claims {n} bytes, more than the file holds")
    header = json.loads(blob[8:8 + n])
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ValueError("its header is not a safetensors header with metadata")
    return header, blob[8 + n:]


def write_entry(path: str | Path, data: dict[str, Any]) -> None:
    """Store ``data`` (tensors and JSON values by name) atomically as one safetensors file, with
    a checksum of everything in it (``_digest``) in the header."""
    tensors = {k: v.contiguous() for k, v in data.items() if isinstance(v, torch.Tensor)}
    values = json.dumps({k: v for k, v in data.items() if not isinstance(v, torch.Tensor)})
    meta = {"format": ENTRY_FORMAT, "values": values}
    header, body = _split(save_tensors(tensors, metadata=meta))
    meta["sha256"] = _digest(header, values, body)
    atomic_write_bytes(path, save_tensors(tensors, metadata=meta))


def read_entry(path: str | Path) -> dict[str, Any]:
    """What ``write_entry`` stored; ValueError (or the reader's own error) if it is not that, or
    if it does not match its checksum."""
    blob = Path(path).read_bytes()
    header, body = _split(blob)
    meta = header["__metadata__"]
    if meta.get("format") != ENTRY_FORMAT:
        raise ValueError(f"not a {ENTRY_FORMAT} entry (format {str(meta.get('format'))[:40]!r})")
    if meta.get("sha256") != _digest(header, meta.get("values", ""), body):
        raise ValueError("it does not match its checksum")
    values = json.loads(meta["values"])
    if not isinstance(values, dict):
        raise ValueError("its values are not a JSON object")
    return {**load_tensors(blob), **values}


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of ``path``, or None when it does not exist: tells a replaced entry."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _load(path: Path, check: Callable[[dict], Any] | None) -> dict | None:
    """The entry at ``path``, or None (with a one-line warning) when it cannot be read or
    ``check`` rejects it (by raising)."""
    try:
        data = read_entry(path)
        if check is not None:
            check(data)
        return data
    except BaseException as exc:  # noqa: BLE001 - any unreadable entry is rebuilt
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit; a panic of safetensors' Rust reader is not
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"vitsam: warning: cache entry {path} is unreadable ({type(exc).__name__}: "
              f"{first[:200]}); rebuilding it", file=sys.stderr)
        return None


def load_or_build(cache_dir: str | Path, name: str, key: str, build: Callable[[], dict],
                  check: Callable[[dict], Any] | None = None) -> dict:
    """Return the cached dict of tensors/JSON values for (name, key), building and storing it
    if absent.

    An unreadable entry (damaged, from another program, another user's file without read
    permission) or one that ``check`` rejects (by raising) is rebuilt and replaced rather than
    trusted, with a one-line warning naming it, so that a cache which never works does not go
    unnoticed. Only one process at a time builds an entry; another that finds it missing waits
    for that build and loads its result.
    """
    path = cache_path(cache_dir, name, key)
    seen = _identity(path)
    if seen is not None and (data := _load(path, check)) is not None:
        return data
    with ExitStack() as stack:
        try:
            stack.enter_context(locked(path, waiting="vitsam: waiting for another process to "
                                                     f"finish building cache entry {path}"))
        except OSError:
            pass  # a read-only cache folder: no lock, and the write below says why it fails
        now = _identity(path)
        if now is not None and now != seen and (data := _load(path, check)) is not None:
            return data  # built (or replaced) by another process while this one waited
        remove_stale_temporaries(path.parent, path.name)
        data = build()
        write_entry(path, data)
    return data
