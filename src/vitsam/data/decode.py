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

Other kinds of file, as a viewer shows them (``load_pil``):

* EXIF orientation (phone photos): applied, so the image is upright; ``probe_image`` reports
  the upright (height, width).
* alpha (``RGBA``, ``LA``, ``PA``, palette or RGB/L images with a transparent colour):
  composited onto white (``ALPHA_BACKGROUND``), not dropped, so transparent areas do not show
  whatever colour happens to be stored under them.
* palette (``P``), CMYK, YCbCr, bilevel (``1``): Pillow's own conversion to RGB (or L).
* 16-bit colour PNGs: Pillow reads them as 8-bit RGB keeping each sample's high byte
  (``v >> 8``), within one level of the greyscale rule above.

Pillow releases the GIL while it decodes, so a thread pool scales over cores without the start-up
cost of worker processes. Every failure becomes a one-line ``DataError`` naming the file;
``decode_images`` can instead collect the failures of many files (``errors``), so a folder's bad
files are reported together (``vitsam.data.scan``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from ..progress import progress_bar
from .errors import DataError
from .preprocess import fit_to

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


ALPHA_BACKGROUND = 255  # transparent pixels are shown on white
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# EXIF orientation -> the transpose that makes the image upright (5-8 also swap height and width)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _unreadable(path: str | Path, err: BaseException) -> DataError:
    why = reason(path, err)
    out = DataError(f"cannot decode {path}: {why}; remove or replace the file")
    out.reason = why  # for reports that name many files (vitsam.data.scan)
    return out


def reason(path: str | Path, err: BaseException) -> str:
    """Why ``path`` cannot be read, in a few words (the first line of the error)."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"broken symbolic link to {os.readlink(path)}"
    if isinstance(err, FileNotFoundError):
        return "the file is gone"
    if isinstance(err, IsADirectoryError):
        return "a folder, not an image file"
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.replace(f" {str(path)!r}", "")  # Pillow repeats the file name


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); an unreadable EXIF block counts as upright."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not make the pixels unusable
        return 1
    return value if value in _ORIENT else 1


def probe_image(path: str | Path) -> tuple[str, tuple[int, int]]:
    """Read only the header: (target mode ``"L"`` or ``"RGB"``, upright (height, width))."""
    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in _GREY_MODES or im.mode.startswith("I;16") else "RGB"
            hw = (im.height, im.width)
            return mode, hw[::-1] if _orientation(im) >= 5 else hw
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


def flatten_alpha(im: Image.Image) -> Image.Image:
    """``im`` composited onto a white background if it has transparency (an opaque RGBA image
    is returned), else ``im`` unchanged."""
    if im.mode not in _ALPHA_MODES and "transparency" not in im.info:
        return im
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
    return Image.alpha_composite(background, rgba)


def load_pil(path: str | Path, mode: str, draft: int | None = None) -> Image.Image:
    """Fully decode ``path`` into an upright PIL image of ``mode`` (``"L"`` or ``"RGB"``).

    ``draft``: let JPEGs decode at a reduced scale (down to about ``draft`` px), which still
    reads every byte of the file; used to check files quickly (``check_image``).
    """
    try:
        with Image.open(path) as im:
            if draft is not None and im.format == "JPEG":
                im.draft(im.mode, (draft, draft))
            im.load()
            turn = _ORIENT.get(_orientation(im))
            out = flatten_alpha(to_8bit(im))
            out = out.convert(mode) if out.mode != mode else out.copy()
            return out.transpose(turn) if turn is not None else out
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err) from None


def check_image(path: str | Path, mode: str) -> None:
    """Raise the ``DataError`` that decoding ``path`` would raise, at a fraction of the cost."""
    load_pil(path, mode, draft=32)


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
    errors: dict[int, DataError] | None = None,
) -> np.ndarray:
    """Decode many files into one uint8 array (N, C, H, W), in order, using a thread pool.

    ``errors``: when given, a file that cannot be decoded is recorded there (index -> its
    ``DataError``) and its slot left zero, and every file is tried; else the first failure is
    raised.
    """
    chans = 1 if mode == "L" else 3
    out = np.zeros((len(paths), chans, size[0], size[1]), dtype=np.uint8)
    chunk = 256

    def work(start: int) -> tuple[int, dict[int, DataError]]:
        stop = min(start + chunk, len(paths))
        failed: dict[int, DataError] = {}
        for i in range(start, stop):
            try:
                out[i] = decode_image(paths[i], mode, size)
            except DataError as err:  # returned, not raised, so the caller can raise it without a pool traceback
                failed[i] = err
                if errors is None:
                    break
        return stop - start, failed

    workers = workers or min(8, os.cpu_count() or 1)
    bar = progress_bar(total=len(paths), desc=desc, unit="img",
                       disable=None if progress is None else not progress)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for done, failed in pool.map(work, range(0, len(paths), chunk)):
            if failed and errors is None:
                pool.shutdown(wait=True, cancel_futures=True)
                raise DataError(str(next(iter(failed.values())))) from None
            if errors is not None:
                errors.update(failed)
            bar.update(done)
    return out
