"""Distribution-shift evaluation: class-subset folders, multi-label ("ReaL") labels, second test sets.

Three evaluators, each taking a logits-producing model and either an image folder or uint8
tensors:

* ``evaluate_class_mapped``: a folder whose classes map onto (a subset of) the training classes,
  as ImageNet-R and ImageNet-A use 200 of the 1,000 ImageNet classes. The mapping is JSON
  ``{folder_class_name: training_class_name or index}``; by default the model's logits are
  restricted to all the mapped training classes (whether or not the folder holds images of
  them) before argmax/softmax, as in those benchmarks.
* ``evaluate_real_labels``: multi-label ground truth (ImageNet "ReaL"), matched to images by id
  (``real_label_sets``): an image's id is its path relative to the folder (``"cat/0000.jpg"``),
  the same for a folder and for a test split held in memory. A prediction is right if it is in
  the image's label set (tied scores: the chance a random pick among them is, ``topk_hits``);
  images with an empty set are skipped; ECE is not defined for label sets and is None.
* ``evaluate_folder``: a second test folder with the training classes (ImageNet-V2 style), whose
  class folders are named by training class name or by class index.

Every image, file or tensor, goes through the run's one preprocessing
(``vitsam.data.preprocess.eval_view`` with the run's ``crop_pct``: images already at ``img_size``
as they are, others resized so the shorter side is ``img_size / crop_pct`` and centre-cropped), and
files are decoded as the data layer decodes them (``vitsam.data.decode``, 16-bit greyscale
rescaled). Before anything is scored, every file of a folder is checked as training checks its
folders (``vitsam.data.scan.check_files``): with ``bad_files="error"`` one ``DataError`` names
every bad file (the count, the first few, the full list in ``bad_files_list``); with ``"skip"``
they are left out, with a warning, and counted in the result (``skipped_files``). Broken
symbolic links with an image extension are bad files, as in training.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import scan
from ..data.decode import IMAGE_EXTENSIONS, load_array
from ..data.errors import DataError
from ..data.preprocess import eval_view
from ..data.tensors import ImageFiles, ImageTensors
from ..io import read_json
from ..models.modes import eval_mode
from ..progress import progress_bar
from .metrics import MetricAccumulator, model_logits, preprocess, topk_hits

Source = str | Path | tuple[torch.Tensor, torch.Tensor] | torch.Tensor
RealSource = str | Path | torch.Tensor | ImageTensors | ImageFiles


# ---------------------------------------------------------------- reading

def _is_image(p: Path) -> bool:
    """An image file by name, or a broken link named like one (a bad file, not a missing one)."""
    return (p.is_file() or (p.is_symlink() and not p.exists())) \
        and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout ``root/<class>/**/<image>``: (paths, class indices, sorted class names)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist; pass the folder that holds one sub-folder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class>/<image files>")
    paths: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if _is_image(p))
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise ValueError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, classes


def list_images(root: str | Path) -> tuple[list[Path], list[str]]:
    """Every image file under ``root`` (any depth) and its id, the path relative to ``root`` in
    POSIX form; sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    found = sorted((Path(os.path.relpath(p, root)).as_posix(), p) for p in root.rglob("*") if _is_image(p))
    if not found:
        raise ValueError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [p for _, p in found], [i for i, _ in found]


def decode_for_eval(path: str | Path, img_size: int, in_chans: int = 3, crop_pct: float = 1.0) -> np.ndarray:
    """Decode one file to uint8 (C, img_size, img_size): the data layer's decoding, then
    ``eval_view`` (shorter side to img_size / crop_pct, centre crop; as it is at img_size)."""
    arr = load_array(path, "L" if in_chans == 1 else "RGB")
    return eval_view(torch.from_numpy(arr), img_size, crop_pct).numpy()


def _check_common(img_size: int, batch_size: int, in_chans: int, crop_pct: float) -> None:
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")


def _path_batches(paths: Sequence[Path], batch_size: int, img_size: int, in_chans: int, crop_pct: float,
                  workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 (B, C, S, S), positions (B,)) over ``paths``, decoded in a thread pool."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for a in range(0, len(paths), batch_size):
            chunk = paths[a:a + batch_size]
            arrs = list(pool.map(lambda p: decode_for_eval(p, img_size, in_chans, crop_pct), chunk))
            yield torch.from_numpy(np.stack(arrs)), torch.arange(a, a + len(chunk))


@dataclass(frozen=True)
class BadFiles:
    """What an evaluator does with files of a folder that do not decode (``screen_files``):
    ``policy`` "error" (one error naming them all) or "skip" (left out, counted); the full list
    goes to ``list_path`` (if given); ``skip_with`` (how to skip them) and ``skipping`` (the
    setting that did) word the messages."""

    policy: str = "error"
    list_path: str | Path | None = None
    skip_with: str = "pass bad_files='skip'"
    skipping: str = "bad_files='skip'"

    def __post_init__(self) -> None:
        if self.policy not in ("error", "skip"):
            raise ValueError(f"bad_files must be one of error, skip, got {self.policy!r}")


def screen_files(paths: Sequence[Path], root: str | Path, in_chans: int,
                 bad_files: str | BadFiles = "error", progress: bool = True) -> list[int]:
    """Indices of the files of ``paths`` (under ``root``) that decode, after every one was
    checked (``scan.check_files``); the bad ones raise one ``DataError`` or are left out, as
    ``bad_files`` says (``scan.enforce``)."""
    how = bad_files if isinstance(bad_files, BadFiles) else BadFiles(bad_files)
    found = scan.check_files([str(p) for p in paths], "L" if in_chans == 1 else "RGB",
                             None if progress else False)
    root = Path(root)
    bad = [(scan.relative(str(paths[i]), root), why) for i, why in sorted(found.items())]
    if bad and len(bad) == len(paths):
        shown = ", ".join(f"{p} ({r})" for p, r in bad[:scan.SHOWN])
        raise DataError(f"none of the {len(paths)} image files in {root} can be read ({shown}); "
                        "check that this is the right folder")
    scan.enforce(bad, len(paths), root, how.policy,
                 None if how.list_path is None else Path(how.list_path), doing="evaluate",
                 skip_with=how.skip_with, skipping=how.skipping, recorded=" (counted in the results)")
    return [i for i in range(len(paths)) if i not in found]


def _tensor_batches(images: torch.Tensor, positions: torch.Tensor,
                    batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for a in range(0, positions.numel(), batch_size):
        pos = positions[a:a + batch_size]
        yield images[pos], pos


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {got}")
    return images


def _load_json(obj: Any, what: str) -> Any:
    return read_json(obj, f"{what} file", "fix the JSON") if isinstance(obj, (str, Path)) else obj


def _train_index(value: Any, train_classes: Sequence[str] | None, key: str) -> int:
    """A mapping value (training class name, index, or digit string) -> training class index."""
    if isinstance(value, bool):
        raise ValueError(f"mapping[{key!r}] = {value!r} is neither a class name nor an index")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ValueError(f"mapping[{key!r}] = {value} is not a class index (must be >= 0)")
        return _in_range(int(value), value, train_classes, key)
    if isinstance(value, str):
        if train_classes is not None and value in train_classes:
            return list(train_classes).index(value)
        if value.strip().isdigit():
            return _in_range(int(value), value, train_classes, key)
        hint = (f"; use a training class name ({_some(train_classes)}) or index"
                if train_classes is not None else "; pass train_classes to map by name")
        raise ValueError(f"mapping[{key!r}] = {value!r} is not a training class{hint}")
    raise ValueError(f"mapping[{key!r}] = {value!r} is neither a class name nor an index")


def _some(names: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(map(str, list(names)[:n]))
    return shown + (f", ... {len(names)} in all" if len(names) > n else "")


def _in_range(index: int, value: Any, train_classes: Sequence[str] | None, key: str) -> int:
    if train_classes is not None and index >= len(train_classes):
        raise ValueError(f"mapping[{key!r}] = {value!r} is neither a training class name nor an "
                         f"index below {len(train_classes)}; use one of {_some(train_classes)}")
    return index


# ---------------------------------------------------------------- evaluators

def _settings(source: Source, img_size: int, batch_size: int, mean: Sequence[float], std: Sequence[float],
              crop_pct: float) -> dict[str, Any]:
    where = str(source) if isinstance(source, (str, Path)) else "tensors"
    return {"source": where, "img_size": img_size, "batch_size": batch_size, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "crop_pct": crop_pct}


@torch.no_grad()
def evaluate_class_mapped(
    model: nn.Module,
    source: Source,
    mapping: Mapping[str, Any] | str | Path,
    train_classes: Sequence[str] | None = None,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    source_classes: Sequence[str] | None = None,
    restrict: bool = True,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    in_chans: int = 3,
    crop_pct: float = 1.0,
    workers: int = 4,
    progress: bool = True,
    bad_files: str | BadFiles = "error",
) -> dict[str, Any]:
    """Top-1, top-5, ECE, NLL on images whose classes map onto training classes.

    ``source``: an ImageFolder path, or ``(images uint8 (N, C, H, W), labels int64 (N,))`` where
    labels index ``source_classes`` (or, without it, are the mapping keys themselves as
    integers). ``mapping``: dict or JSON file ``{source class: training class name or index}``;
    every source class with images must be mapped. ``restrict=True`` scores only the training
    classes the mapping names, all of them, also those without images here (logits of the other
    classes are dropped before argmax and softmax). ``bad_files``: what to do with folder files
    that do not decode (``screen_files``); those left out are counted in ``skipped_files``.
    """
    _check_common(img_size, batch_size, in_chans, crop_pct)
    mapping = _load_json(mapping, "class mapping")
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError("mapping must be a non-empty JSON object {source class: training class name or index}")
    mapping = {str(k): v for k, v in mapping.items()}
    if isinstance(source, (str, Path)):
        paths, labels_list, classes = list_image_folder(source)
        labels = torch.tensor(labels_list)
        images = None
    else:
        if not isinstance(source, tuple) or len(source) != 2:
            raise ValueError("source must be an image folder path or a tuple (images, labels)")
        images, labels = _check_images(source[0]), torch.as_tensor(source[1]).long()
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        classes = ([str(c) for c in source_classes] if source_classes is not None
                   else [str(i) for i in range(int(labels.max()) + 1 if labels.numel() else 0)])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(f"labels must index source_classes (0..{len(classes) - 1})")
        paths = []
    present = sorted(set(labels.tolist()))
    unmapped = [classes[i] for i in present if classes[i] not in mapping]
    if unmapped:
        raise ValueError(f"{len(unmapped)} source class(es) are not in the mapping (first: {unmapped[:5]}); "
                         "add them to the mapping JSON")
    target_of = torch.full((len(classes),), -1, dtype=torch.long)
    for i, name in enumerate(classes):
        if name in mapping:
            target_of[i] = _train_index(mapping[name], train_classes, name)
    # Every mapped training class competes, not only those with images in this folder.
    scored = sorted({_train_index(v, train_classes, k) for k, v in mapping.items()})
    skipped = 0
    if images is None:  # every file checked before any is scored (the settings above are cheap)
        good = screen_files(paths, source, in_chans, bad_files, progress)
        skipped = len(paths) - len(good)
        paths, labels = [paths[i] for i in good], labels[good]
    total = labels.numel()
    batches = (_path_batches(paths, batch_size, img_size, in_chans, crop_pct, workers) if images is None
               else _tensor_batches(images, torch.arange(total), batch_size))
    acc = MetricAccumulator()
    subset = torch.tensor(scored)
    with eval_mode(model):
        with progress_bar(total=total, desc="evaluate", unit="img", disable=not progress) as bar:
            for x_u8, pos in batches:
                logits = model_logits(model, preprocess(x_u8, mean, std, img_size, crop_pct).to(device)).cpu()
                if scored[-1] >= logits.shape[1]:
                    raise ValueError(f"the mapping names training class {scored[-1]} but the model has "
                                     f"{logits.shape[1]} outputs; check the mapping or the model")
                target = target_of[labels[pos]]
                if restrict:
                    logits = logits[:, subset]
                    target = torch.searchsorted(subset, target)
                acc.update(logits, target)
                bar.update(pos.numel())
    out: dict[str, Any] = {"kind": "class_mapped", **acc.result(), "restricted": restrict,
                           "n_classes_scored": len(scored) if restrict else None,
                           "skipped_files": skipped}
    out["settings"] = _settings(source, img_size, batch_size, mean, std, crop_pct)
    return out


def evaluate_folder(
    model: nn.Module,
    source: Source,
    train_classes: Sequence[str] | None = None,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    source_classes: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    in_chans: int = 3,
    crop_pct: float = 1.0,
    workers: int = 4,
    progress: bool = True,
    bad_files: str | BadFiles = "error",
) -> dict[str, Any]:
    """Top-1, top-5, ECE, NLL on a second test set of the training classes (ImageNet-V2 style).

    Folder classes are matched to ``train_classes`` by name, or read as class indices when they
    are numbers (ImageNet-V2 names its folders 0..999). All logits are scored.
    """
    if isinstance(source, (str, Path)):
        names = list_image_folder(source)[2]
    elif source_classes is not None:
        names = [str(c) for c in source_classes]
    else:
        labels = torch.as_tensor(source[1]) if isinstance(source, tuple) else torch.zeros(0)
        names = [str(i) for i in range(int(labels.max()) + 1 if labels.numel() else 0)]
    known = set(train_classes or ())
    unknown = [n for n in names if n not in known and not n.isdigit()]
    if unknown:
        raise ValueError(f"folder classes {unknown[:5]} are neither training class names nor indices; "
                         "rename them, or map them with --mapped-folder and --mapping (evaluate_class_mapped)")
    out = evaluate_class_mapped(model, source, {n: n for n in names}, train_classes, mean=mean, std=std,
                                img_size=img_size, source_classes=source_classes, restrict=False,
                                batch_size=batch_size, device=device, in_chans=in_chans, crop_pct=crop_pct,
                                workers=workers, progress=progress, bad_files=bad_files)
    out["kind"] = "test_folder"
    return out


def _dupes(names: Sequence[str]) -> list[tuple[str, int]]:
    """(name, count) of every name occurring more than once, most frequent first."""
    return [(n, c) for n, c in Counter(names).most_common() if c > 1]


def _numeric(ids: Sequence[str]) -> bool:
    return all(i.isdigit() for i in ids)


def real_label_sets(ids: Sequence[str], real: Any) -> list[Any]:
    """The label set of each image (in the order of ``ids``) from ReaL-style labels ``real``.

    ``ids``: unique image ids (paths relative to the folder, ``"cat/0000.jpg"``, or indices
    ``"0"``, ``"1"``, ... for images without files). ``real`` is either

    * an object ``{id: [labels]}``; a key may also be an image's bare file name or file stem
      when exactly one image has it. Every image needs exactly one entry and every entry one image;
      a key that matches no image, a name shared by several images, or two keys for one image is
      a one-line error with the count;
    * a list with one entry per image, in the images' canonical order: by index for index ids,
      else by file name (as ImageNet's ReaL list, in the order of the validation file names),
      which must then be unique.
    """
    ids = [str(i) for i in ids]
    dup = _dupes(ids)
    if dup:
        raise ValueError(f"{len(dup)} image ids occur more than once (first: {dup[0][0]!r}, {dup[0][1]} times); "
                         "image ids must be unique paths relative to the folder")
    names = [i.rsplit("/", 1)[-1] for i in ids]
    if isinstance(real, Mapping):
        index = {i: k for k, i in enumerate(ids)}
        by_name: dict[str, list[int]] = {}
        for k, n in enumerate(names):
            by_name.setdefault(n, []).append(k)
            stem = n.rsplit(".", 1)[0] if "." in n else n
            if stem != n:
                by_name.setdefault(stem, []).append(k)
        owner: dict[int, Any] = {}
        unmatched, ambiguous, twice = [], [], []
        for key in real:
            key_s = str(key)
            if key_s in index:
                k = index[key_s]
            elif len(by_name.get(key_s, [])) == 1:
                k = by_name[key_s][0]
            elif key_s in by_name:
                ambiguous.append((key_s, len(by_name[key_s])))
                continue
            else:
                unmatched.append(key_s)
                continue
            if k in owner:
                twice.append((ids[k], str(owner[k]), key_s))
            owner[k] = key
        if ambiguous:
            name, n_img = ambiguous[0]
            raise ValueError(f"{len(ambiguous)} ReaL label entries name a file that {n_img} images share "
                             f"(first: {name!r}); key them by the path relative to the folder, e.g. "
                             f"{ids[by_name[name][0]]!r}")
        if unmatched:
            raise ValueError(f"{len(unmatched)} of the {len(real)} ReaL label entries match no image "
                             f"(first: {unmatched[0]!r}); key them by the image's path relative to the "
                             f"folder, e.g. {ids[0]!r}")
        if twice:
            i, a, b = twice[0]
            raise ValueError(f"{len(twice)} images have more than one ReaL label entry (first: {i!r}, by "
                             f"{a!r} and {b!r}); keep one entry per image")
        missing = [i for k, i in enumerate(ids) if k not in owner]
        if missing:
            raise ValueError(f"{len(missing)} of the {len(ids)} images have no entry in the ReaL labels "
                             f"(first: {missing[0]!r}); give every image a (possibly empty) list")
        return [real[owner[k]] for k in range(len(ids))]
    if isinstance(real, Sequence) and not isinstance(real, (str, bytes)):
        if len(real) != len(ids):
            raise ValueError(f"real_labels lists {len(real)} images but the source has {len(ids)}")
        if _numeric(ids):
            order = sorted(range(len(ids)), key=lambda k: int(ids[k]))
        else:
            shared = _dupes(names)
            if shared:
                raise ValueError(f"a ReaL label list follows the file names, but {len(shared)} file names "
                                 f"occur in several folders (first: {shared[0][0]!r}, {shared[0][1]} times); "
                                 "give an object {path relative to the folder: [labels]} instead")
            order = sorted(range(len(ids)), key=lambda k: names[k])
        sets: list[Any] = [None] * len(ids)
        for entry, k in zip(real, order):
            sets[k] = entry
        return sets
    raise ValueError("real_labels must be a JSON list of label lists or an object {image id: [labels]}")


def _real_source(source: RealSource, image_ids: Sequence[str] | None
                 ) -> tuple[list[str], list[Path] | None, torch.Tensor | None]:
    """(ids, file paths or None, uint8 images or None) of a ReaL source."""
    if isinstance(source, (str, Path)):
        paths, ids = list_images(source)
        return ids, paths, None
    if isinstance(source, ImageFiles):
        paths = [Path(p) for p in source.paths]
        own = source.ids
        images = None
    else:
        images = _check_images(source.images if isinstance(source, ImageTensors) else source)
        own = source.ids if isinstance(source, ImageTensors) else None
        paths = None
    n = len(paths) if paths is not None else images.shape[0]
    ids = [str(i) for i in (image_ids if image_ids is not None else own if own is not None else range(n))]
    if len(ids) != n:
        raise ValueError(f"image_ids has {len(ids)} entries for {n} images")
    return ids, paths, images


@torch.no_grad()
def evaluate_real_labels(
    model: nn.Module,
    source: RealSource,
    real_labels: Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    image_ids: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    in_chans: int = 3,
    crop_pct: float = 1.0,
    workers: int = 4,
    progress: bool = True,
    bad_files: str | BadFiles = "error",
) -> dict[str, Any]:
    """Multi-label ("ReaL") top-1 and top-5: right if the prediction is in the image's label set.

    ``source``: a folder (every image file below it; ids are paths relative to it), a data split
    (``ImageTensors`` / ``ImageFiles``, ids as the data layer gives them: for a folder source the
    same relative paths), or uint8 images (N, C, H, W) (ids ``image_ids`` or "0".."N-1").
    ``real_labels``: JSON object or list, matched as ``real_label_sets`` says. Images with an
    empty label set are skipped (counted in ``n_skipped``). ECE is None (undefined for sets).
    ``bad_files``: what to do with folder files that do not decode (``screen_files``); labels
    are still matched against every file, and those left out are counted in ``skipped_files``.
    """
    _check_common(img_size, batch_size, in_chans, crop_pct)
    real = _load_json(real_labels, "ReaL labels")
    ids, paths, images = _real_source(source, image_ids)
    if not ids:
        raise ValueError("the ReaL source holds no images; nothing to score")
    sets = real_label_sets(ids, real)
    try:
        label_sets = [sorted({int(c) for c in s}) for s in sets]
    except (TypeError, ValueError):
        raise ValueError("every ReaL label set must be a list of integer class indices") from None
    readable = set(range(len(ids)))
    if paths is not None and isinstance(source, (str, Path)):  # a data split was checked when built
        readable = set(screen_files(paths, source, in_chans, bad_files, progress))
    keep = torch.tensor([i for i, s in enumerate(label_sets) if s and i in readable], dtype=torch.long)
    if keep.numel() == 0:
        which = "image" if len(readable) == len(ids) else "image that can be read"
        raise ValueError(f"every {which} has an empty ReaL label set; nothing to score")
    batches = (_path_batches([paths[int(i)] for i in keep], batch_size, img_size, in_chans, crop_pct, workers)
               if images is None else _tensor_batches(images, keep, batch_size))
    top1 = top5 = 0.0
    n = 0
    with eval_mode(model):
        with progress_bar(total=keep.numel(), desc="evaluate ReaL", unit="img", disable=not progress) as bar:
            for x_u8, pos in batches:
                logits = model_logits(model, preprocess(x_u8, mean, std, img_size, crop_pct).to(device)).cpu()
                index = keep[pos] if images is None else pos  # folder batches count kept images
                mask = torch.zeros(logits.shape, dtype=torch.bool)  # (B, C): each image's label set
                for r, i in enumerate(index.tolist()):
                    s = label_sets[i]
                    if s[-1] >= logits.shape[1] or s[0] < 0:
                        raise ValueError(f"ReaL label {s[-1]} of image {ids[i]!r} is outside the model's "
                                         f"{logits.shape[1]} classes")
                    mask[r, s] = True
                top1 += float(topk_hits(logits, mask, 1).sum())
                top5 += float(topk_hits(logits, mask, 5).sum())
                n += logits.shape[0]
                bar.update(pos.numel())
    where = source if isinstance(source, (str, Path)) else "tensors"
    unread = len(ids) - len(readable)
    return {"kind": "real_labels", "top1": top1 / n, "top5": top5 / n, "ece": None, "n": n,
            "n_skipped": len(ids) - unread - n, "skipped_files": unread, "settings": _settings(where, img_size, batch_size, mean, std, crop_pct)}
