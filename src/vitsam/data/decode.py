"""Decoding image files into uint8 arrays, one file or many in parallel threads.

Pillow releases the GIL while it decodes, so a thread pool scales over cores without the start-up
cost of worker processes. Every failure becomes a one-line ``DataError`` naming the file.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable(path: str | Path, err: BaseException) -> DataError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return DataError(f"cannot decode {path}: {msg}; remove or replace the file")


def probe_image(path: str | Path) -> tuple[str, tuple[int, int]]:
    """Read only the header: (target mode ``"L"`` or ``"RGB"``, (height, width))."""
    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in _GREY_MODES else "RGB"
            return mode, (im.height, im.width)
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err) from None


def load_pil(path: str | Path, mode: str) -> Image.Image:
    """Fully decode ``path`` into a PIL image of ``mode`` (``"L"`` or ``"RGB"``)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err) from None


def decode_image(path: str | Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """Decode ``path`` to uint8 (C, H, W) with ``size = (H, W)``; other sizes are resized bilinearly."""
    im = load_pil(path, mode)
    if (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_images(
    paths: Sequence[str | Path],
    mode: str,
    size: tuple[int, int],
    workers: int | None = None,
    progress: bool | None = None,
    desc: str = "decode",
) -> np.ndarray:
    """Decode many files into one uint8 array (N, C, H, W), in order, using a thread pool."""
    chans = 1 if mode == "L" else 3
    out = np.empty((len(paths), chans, size[0], size[1]), dtype=np.uint8)
    chunk = 256

    def work(start: int) -> tuple[int, DataError | None]:
        stop = min(start + chunk, len(paths))
        try:
            for i in range(start, stop):
                out[i] = decode_image(paths[i], mode, size)
        except DataError as err:  # returned, not raised, so the caller can raise it without a pool traceback
            return stop - start, err
        return stop - start, None

    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None if progress is None else not progress)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for done, err in pool.map(work, range(0, len(paths), chunk)):
            if err is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                raise DataError(str(err)) from None
            bar.update(done)
    return out
