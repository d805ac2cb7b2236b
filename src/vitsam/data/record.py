"""What a run folder records about its data: ``data.json``.

Written once per run by the training engine (``save_data_record(run_dir, bundle)``), copied into
runs derived from it (``copy_data_record``, e.g. a pruned model's) and read by every evaluation of
the run, so a model is always fed as it was trained: normalised with the
``mean``/``std`` of the training images it actually saw (after any ``train_fraction`` subset) and
preprocessed with its ``crop_pct`` (``vitsam.data.preprocess``), whatever data it is evaluated on.
Fields::

    format         "vitsam-data/1"
    mean, std      per channel, 0-1 scale
    in_chans, img_size, native_size, classes, train_images, description
    preprocessing  preprocess.describe(img_size, crop_pct)
    skipped_files  how many unreadable image files ``data.bad_files=skip`` left out; when any,
                   ``bad_files.txt`` beside it lists them (path relative to the data root, a tab,
                   the reason), one per line
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes, atomic_write_json, read_json
from .errors import DataError
from .preprocess import check_crop_pct, describe
from .scan import LIST_FILE as BAD_FILES_FILE, write_list
from .tensors import DataBundle

RECORD_FILE = "data.json"
FORMAT = "vitsam-data/1"


def data_record(bundle: DataBundle) -> dict[str, Any]:
    """The JSON record of ``bundle`` (see the module docstring)."""
    return {"format": FORMAT, "mean": [float(v) for v in bundle.mean], "std": [float(v) for v in bundle.std],
            "in_chans": int(bundle.in_chans), "img_size": int(bundle.img_size),
            "native_size": int(bundle.native_size), "classes": list(bundle.classes),
            "train_images": len(bundle.train), "description": bundle.description,
            "preprocessing": describe(bundle.img_size, bundle.crop_pct),
            "skipped_files": len(bundle.skipped)}


def model_record(mean: list[float], std: list[float], img_size: int, crop_pct: float,
                 description: str, classes: list[str] | None = None) -> dict[str, Any]:
    """The record of a model not trained here (an imported checkpoint): the normalisation and
    evaluation crop it was trained and evaluated with, not statistics of any data set here.
    ``classes`` None: the class order is the data's own (e.g. sorted ImageNet synsets)."""
    return {"format": FORMAT, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "in_chans": len(mean), "img_size": int(img_size), "native_size": int(img_size),
            "classes": classes, "train_images": 0, "description": description,
            "preprocessing": describe(img_size, crop_pct), "skipped_files": 0}


def save_data_record(run_dir: str | Path, bundle: DataBundle) -> Path:
    """Write ``run_dir/data.json`` for ``bundle`` (atomically); returns its path."""
    path = Path(run_dir) / RECORD_FILE
    listing = Path(run_dir) / BAD_FILES_FILE
    if bundle.skipped:
        write_list(listing, bundle.skipped, bundle.config.root or "the data root", "skip")
    else:
        listing.unlink(missing_ok=True)
    atomic_write_json(path, data_record(bundle))
    return path


def copy_data_record(src_run: str | Path, dst_run: str | Path) -> Path | None:
    """Give the run derived in ``dst_run`` (e.g. pruned) the checked record of ``src_run``: the
    data and its preprocessing are those of the source. Returns the new path, or None when the
    source has no record (then ``dst_run`` keeps none either, not one of an earlier derivation)."""
    rec = load_data_record(src_run)
    path = Path(dst_run) / RECORD_FILE
    listing, src_listing = Path(dst_run) / BAD_FILES_FILE, Path(src_run) / BAD_FILES_FILE
    if rec is not None and src_listing.is_file():
        atomic_write_bytes(listing, src_listing.read_bytes())
    else:
        listing.unlink(missing_ok=True)
    if rec is None:
        path.unlink(missing_ok=True)
        return None
    atomic_write_json(path, rec)
    return path


def load_data_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The checked record of ``run_dir``, or None if the run predates it (no ``data.json``)."""
    path = Path(run_dir) / RECORD_FILE
    if not path.exists():
        return None
    rec = read_json(path, "data record", "delete it to fall back to statistics recomputed from the run's data")
    try:
        if rec.get("format") != FORMAT:
            raise ValueError(f"format {rec.get('format')!r}")
        n = int(rec["in_chans"])
        mean, std = [float(v) for v in rec["mean"]], [float(v) for v in rec["std"]]
        if len(mean) != n or len(std) != n or any(s <= 0 for s in std):
            raise ValueError("mean/std do not have one positive value per channel")
        check_crop_pct(rec["preprocessing"]["crop_pct"])
    except (AttributeError, KeyError, TypeError, ValueError, DataError) as err:
        why = (str(err).splitlines() or [""])[0][:200] or type(err).__name__
        raise DataError(f"{path} is not a valid {FORMAT} record ({why}); "
                        "delete it to fall back to statistics recomputed from the run's data") from None
    return rec


def feed_of(run_dir: str | Path, bundle: DataBundle) -> tuple[list[float], list[float], float]:
    """(mean, std, crop_pct) the run's model is fed with: its record's when it has one (an
    imported model's own convention, or the training data's statistics), else ``bundle``'s."""
    rec = load_data_record(run_dir)
    if rec is None:
        return list(bundle.mean), list(bundle.std), float(bundle.crop_pct)
    return ([float(v) for v in rec["mean"]], [float(v) for v in rec["std"]],
            float(rec["preprocessing"]["crop_pct"]))

