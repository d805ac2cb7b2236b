"""Decoding image files into uint8 arrays, one file or many in parallel threads.

Every reader of image files (the data layer's cache and lazy loader, and every evaluator) decodes
through ``load_pil`` here, so a file gives the same pixels everywhere. High bit-depth greyscale is
rescaled to 8 bits, never clipped (``to_8bit``):

* ``I;16`` (and ``I;16B``/``I;16L``/``I;16N``): 16-bit samples, 0-65535 -> 0-255 as
  ``round(v / 257)`` (exact: ``v / 257`` never falls on a half).
* ``I`` (32-bit integers): read as 16-bit samples the same way, values outside 0-65535 clipped;
  older Pillow releases open 16-bit PNGs in this mode.
* ``F`` (32-bit floats): taken as 0-1 intensities (``round(255 v)``) when every value is at most
  1, else as 0-255 values (rounded); both clipped to 0-255, NaN read as 0.

Pillow releases the GIL while it decodes, so a thread pool scales over cores without the start-up
cost of worker processes. Every failure becomes a one-line ``DataError`` naming the file.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..progress import progress_bar
from .errors import DataError
from .preprocess import fit_to

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
            mode = "L" if im.mode in _GREY_MODES or im.mode.startswith("I;16") else "RGB"
            return mode, (im.height, im.width)
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err) from None


def to_8bit(im: Image.Image) -> Image.Image:
    """An ``L`` image for the high bit-depth greyscale modes (``I;16*``, ``I``, ``F``), rescaled
    as the module docstring says; any other image unchanged."""
    if im.mode.startswith("I;16") or im.mode == "I":
        v = np.clip(np.asarray(im).astype(np.float64), 0, 65535)
        return Image.fromarray(np.rint(v / 257.0).astype(np.uint8), mode="L")
    if im.mode == "F":
        v = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0)
        scale = 255.0 if v.size and v.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(v * scale), 0, 255).astype(np.uint8), mode="L")
    return im


def load_pil(path: str | Path, mode: str) -> Image.Image:
    """Fully decode ``path`` into a PIL image of ``mode`` (``"L"`` or ``"RGB"``)."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_8bit(im).convert(mode)
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err) from None


def load_array(path: str | Path, mode: str) -> np.ndarray:
    """Decode ``path`` at its own size: uint8 (C, H, W), C = 1 for ``"L"``, 3 for ``"RGB"``."""
    arr = np.array(load_pil(path, mode), dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def decode_image(path: str | Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """Decode ``path`` to uint8 (C, H, W) with ``size = (H, W)``; other sizes are resized to
    cover it and centre-cropped (``preprocess.fit_to``), never squashed."""
    arr = load_array(path, mode)
    if arr.shape[1:] != tuple(size):
        arr = fit_to(torch.from_numpy(arr), size).numpy()
    return arr


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
    bar = progress_bar(total=len(paths), desc=desc, unit="img",
                       disable=None if progress is None else not progress)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for done, err in pool.map(work, range(0, len(paths), chunk)):
            if err is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                raise DataError(str(err)) from None
            bar.update(done)
    return out
