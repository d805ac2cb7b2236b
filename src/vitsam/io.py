"""Small file helpers: atomic writes (never leave a half-written file behind; figures too, with
``save_figure``), locks, JSON lines.

Atomic writes create their file as ``open()`` would (mode 0o666 less the umask), so files in a
shared folder are as readable as the user's other files. Read-modify-write of a shared file
(``merge_json``, a corruption set's manifest) holds ``locked(path)``: an exclusive ``flock`` on
the sibling file ``.<name>.lock``, which is left in place (removing it would let two processes
lock two different files). ``flock`` is POSIX (Linux, macOS); on network file systems it is only
as good as the server's lock support.

A process killed while writing (SIGKILL, power loss) leaves its temporary file behind: a hidden
``.<name>.<host>-<pid>-<token>.tmp`` next to the target, locked with ``flock`` by its writer.
``remove_stale_temporaries`` deletes those whose writer is gone (a part of a corruption set or a
cache entry can be gigabytes), and never one a live process is still writing.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` only once the block completes.

    Writes go to a temporary file in the same folder, which is fsynced and renamed over
    ``path``; on any error the temporary file is removed and ``path`` is left as it was. The
    file gets mode 0o666 less the umask (``tempfile.mkstemp`` would make it 0o600, unreadable
    to the other users of a shared folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:  # O_EXCL: never reuse another writer's temporary file; the kernel applies the umask
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            try:  # held until the rename: marks the file as being written (see the docstring)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # a file system without flock: the writer's pid still protects the file
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# The writing host in temporary names, so that a process on another machine sharing the
# folder is never judged by this machine's process table.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files ``atomic_writer`` left in ``folder`` when its process died.

    ``name``: only those of the target file ``name``. A temporary file is stale when it was
    written on this host by a process that no longer runs and nobody holds its ``flock`` (a
    writer in another process namespace still does). Returns the paths removed.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no folder yet, or unreadable: nothing of ours to clean
        return removed
    for p in entries:
        m = _TEMP_NAME.fullmatch(p.name)
        if not m or (name is not None and m["name"] != name) or m["host"] != _HOST \
                or _running(int(m["pid"])):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            p.unlink(missing_ok=True)
            removed.append(p)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_writer``)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def _clean(obj: Any) -> Any:
    """Make floats JSON-safe (NaN/inf -> None) and tuples lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    return obj


def save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Draw the matplotlib figure ``fig`` into ``path`` atomically, close it and return ``path``.

    Every figure vitsam writes goes through here. The format follows the suffix (``.png``,
    ``.pdf``, ``.svg``); ``savefig_kwargs`` go to ``fig.savefig`` (``dpi``, ``bbox_inches``). An
    error while drawing (a full disk, a failing artist, Ctrl-C) leaves the previous file at
    ``path`` as it was and no temporary file (``atomic_writer``); the figure is closed either way,
    as pyplot keeps every open figure alive.
    """
    path = Path(path)
    try:
        with atomic_writer(path) as fh:
            fig.savefig(fh, format=path.suffix.lstrip(".").lower() or "png", **savefig_kwargs)
    finally:
        import matplotlib.pyplot as plt  # already imported by whoever drew ``fig``

        plt.close(fig)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2) + "\n").encode())


class DamagedFileError(ValueError):
    """A file vitsam wrote (or reads from others) that does not hold what it should; the
    message names the file and the fix."""


def read_json(path: str | Path, what: str = "file",
              fix: str = "restore it or re-create the run") -> Any:
    """Read JSON with a one-line error naming the file (and ``fix``) when it is missing or damaged
    (``DamagedFileError``: not UTF-8, not JSON, nested too deeply, integers too long)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise DamagedFileError(f"{what} {path} is a folder; give the path of the JSON file") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int limits
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DamagedFileError(f"{what} {path} is damaged ({exc.__class__.__name__}: {text}); "
                               f"{fix}") from None


def inside(folder: str | Path, relative: Any, what: str) -> Path:
    """``folder / relative`` if that path stays inside ``folder`` (no ``..`` escape, no absolute
    path, no link out), else a one-line ``DamagedFileError`` naming ``what`` (the file that gave
    ``relative``)."""
    folder = Path(folder)
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise DamagedFileError(f"{what} names the file {relative!r}, which is not a relative path; "
                               "the file is damaged: build it again")
    path = folder / relative
    base = os.path.realpath(folder)
    if Path(relative).is_absolute() or os.path.commonpath([base, os.path.realpath(path)]) != base:
        raise DamagedFileError(f"{what} names {relative!r}, which lies outside {folder}; the file "
                               "is damaged or not vitsam's: build it again")
    return path


@contextmanager
def locked(path: str | Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock for ``path`` while the block runs (blocks until it is free).

    The lock is an ``flock`` on ``.<name>.lock`` beside ``path``, so every process that updates
    ``path`` through this function takes turns; it is released when the block ends or the
    process dies. Not re-entrant: do not nest two ``locked`` blocks for one path. ``waiting``:
    a line printed on stderr when another process holds the lock (so a long wait is explained).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only is enough for flock and works on a lock file another user created.
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                import sys

                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def merge_json(path: str | Path, entries: dict[str, Any], what: str = "file") -> dict[str, Any]:
    """Update the JSON object in ``path`` with ``entries`` (atomically) and return the result.

    The read, update and write happen under ``locked(path)``, so concurrent writers (two
    evaluations of one run) each keep the other's keys. A damaged or non-object file is never
    lost: it is renamed to ``<stem>.damaged-<k><suffix>`` next to it (with a warning on stderr)
    and a fresh file holds ``entries``, so results just computed are always written.
    """
    import sys

    path = Path(path)
    with locked(path):
        merged: Any = {}
        if path.exists():
            try:
                merged = json.loads(path.read_text())
                reason = "it is not a JSON object"
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                merged, reason = None, f"{exc.__class__.__name__}: {exc}"
            if not isinstance(merged, dict):
                k = 0
                while (aside := path.with_name(f"{path.stem}.damaged-{k}{path.suffix}")).exists():
                    k += 1
                os.replace(path, aside)
                print(f"vitsam: warning: {what} {path} was unreadable ({reason}); kept it as {aside} "
                      "and wrote a new one", file=sys.stderr)
                merged = {}
        merged.update(entries)
        atomic_write_json(path, merged)
    return merged


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON record as a line and flush it to disk."""
    with open(path, "a") as fh:
        fh.write(json.dumps(_clean(record)) + "\n")
        fh.flush()


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a truncated last line (from a crash) is skipped."""
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
