"""Every image file of a folder source checked before training, all bad files reported at once.

A folder's files are read in two passes over all of them, in threads (Pillow releases the GIL):

1. headers (``decode.probe_image``): empty files, files that are not images and broken
   symbolic links fail here; the good ones give each file's mode and size, from which the
   folder's mode (RGB if any training image is in colour, else greyscale) and stored size (the
   most common training-image size) are chosen.
2. a full decode (``decode.decode_images`` for small images, which go into the tensor cache
   anyway; ``decode.check_image``, at reduced JPEG scale, for large ones): truncated files fail
   here.

The outcome, bad files included, is cached under the listing's key (``vitsam.data.build``), so
the check costs one pass per version of the folder. Then ``data.bad_files`` decides
(``enforce``): ``error`` stops with one line naming the count, the first ``SHOWN`` files with
their reasons and a text file listing all of them; ``skip`` leaves them out with a one-line
warning, and the run folder lists them (``bad_files.txt``, counted in ``data.json``:
``vitsam.data.record``).

Evaluation folders (``vitsam eval --folder / --mapped-folder / --real-images``) get the same two
passes (``check_files``) before anything is scored, and the same choice (``--bad-files``, by
default the run's own ``data.bad_files``): every bad file named in one error, or left out and
counted in the results.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from ..progress import progress_bar
from . import decode
from .errors import DataError

SHOWN = 3  # bad files named in the one-line message; the rest are in the list file
LIST_FILE = "bad_files.txt"
_CHUNK = 256


def _each(paths: Sequence[str], fn: Callable[[int, str], Any], progress: bool | None,
          desc: str) -> dict[int, str]:
    """Run ``fn(index, path)`` on every path in a thread pool; index -> reason of each that
    raised DataError."""
    def work(start: int) -> dict[int, str]:
        failed = {}
        for i in range(start, min(start + _CHUNK, len(paths))):
            try:
                fn(i, paths[i])
            except DataError as err:
                failed[i] = getattr(err, "reason", str(err))
        return failed

    bad: dict[int, str] = {}
    bar = progress_bar(total=len(paths), desc=desc, unit="img",
                       disable=None if progress is None else not progress)
    with bar, ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start, failed in zip(range(0, len(paths), _CHUNK),
                                 pool.map(work, range(0, len(paths), _CHUNK))):
            bad.update(failed)
            bar.update(min(_CHUNK, len(paths) - start))
    return bad


def probe_all(paths: Sequence[str], progress: bool | None = None
              ) -> tuple[list[tuple[str, tuple[int, int]] | None], dict[int, str]]:
    """Header of every file: (mode, (height, width)) or None, and index -> reason for the bad ones."""
    heads: list[tuple[str, tuple[int, int]] | None] = [None] * len(paths)

    def probe(i: int, path: str) -> None:
        heads[i] = decode.probe_image(path)

    bad = _each(paths, probe, progress, "check headers")
    return heads, bad


def verify_all(paths: Sequence[str], mode: str, progress: bool | None = None) -> dict[int, str]:
    """Decode every file once (JPEGs at reduced scale); index -> reason for the bad ones."""
    return _each(paths, lambda _, p: decode.check_image(p, mode), progress, "check images")


def folder_shape(heads: Sequence[tuple[str, tuple[int, int]] | None]) -> tuple[str, tuple[int, int]]:
    """(mode, (height, width)) for a folder: RGB if any good image is in colour, else L; the
    most common size (the first seen among equally common ones)."""
    good = [h for h in heads if h is not None]
    mode = "RGB" if any(m == "RGB" for m, _ in good) else "L"
    counts = Counter(hw for _, hw in good)
    top = max(counts.values())
    return mode, next(hw for _, hw in good if counts[hw] == top)


def relative(path: str, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or as it is when it lies elsewhere."""
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return str(path)


def write_list(path: str | Path, bad: Sequence[tuple[str, str]], root: str | Path, policy: str,
               what: str | None = None) -> Path:
    """A text file listing ``bad`` ((path relative to ``root``, reason) pairs), one per line;
    ``what``: what becomes of them, for the header line."""
    from ..io import atomic_write_bytes

    what = what or ("left out (data.bad_files=skip)" if policy == "skip"
                    else "that stop the run (data.bad_files=error)")
    lines = [f"# {len(bad)} unreadable image files in {root}, {what}: path<TAB>reason"]
    lines += [f"{p}\t{r}" for p, r in bad]
    path = Path(path)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def check_files(paths: Sequence[str], mode: str, progress: bool | None = None) -> dict[int, str]:
    """Both passes (headers, then a full decode at reduced JPEG scale) over files that are
    decoded later, one batch at a time; index -> reason for the bad ones."""
    _, bad = probe_all(paths, progress)
    good = [i for i in range(len(paths)) if i not in bad]
    found = verify_all([paths[i] for i in good], mode, progress)
    bad.update({good[j]: why for j, why in found.items()})
    return bad


def enforce(bad: Sequence[tuple[str, str]], total: int, root: Path, policy: str,
            list_path: Path | None, doing: str = "train",
            skip_with: str = "set data.bad_files=skip", skipping: str = "data.bad_files=skip",
            recorded: str = f" (and in {LIST_FILE} of the run folder)") -> None:
    """Apply ``data.bad_files`` to the bad files of a folder (see the module docstring).

    The other arguments word the messages for the caller: what the files are read for
    (``doing``), how to skip them (``skip_with``), the setting that skipped them (``skipping``)
    and where a skip is recorded (``recorded``). ``list_path``: where the full list goes (None:
    the messages name the first files only).
    """
    if not bad:
        return
    listed = ""
    if list_path is not None:
        what = None if doing == "train" else (f"left out ({skipping})" if policy == "skip"
                                              else "that stop it: remove or replace them")
        write_list(list_path, bad, root, policy, what)
        listed = f"; full list in {list_path}"
    shown = ", ".join(f"{p} ({r})" for p, r in bad[:SHOWN])
    more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    files = f"{len(bad)} of {total} image files in {root}: {shown}{more}{listed}"
    if policy == "error":
        raise DataError(f"cannot decode {files}; remove or replace the files, or {skip_with} to "
                        f"{doing} without them") from None
    print(f"vitsam: warning: {skipping} leaves out the {files}{recorded}", file=sys.stderr)


def warn_ignored(ignored: Sequence[str], root: Path) -> None:
    """One warning line for files a folder listing left out because they are not images."""
    if not ignored:
        return
    names = ", ".join(relative(p, root) for p in ignored[:SHOWN])
    more = f" and {len(ignored) - SHOWN} more" if len(ignored) > SHOWN else ""
    print(f"vitsam: warning: ignored {len(ignored)} files in {root} whose names do not end in an "
          f"image extension ({', '.join(decode.IMAGE_EXTENSIONS)}): {names}{more}; rename them if "
          "they are images", file=sys.stderr)
