"""Corruption benchmarks (ImageNet-C / CIFAR-10-C style) built from any set of images.

``build_corruption_set`` applies the 15 standard corruptions (optionally also the 4 held-out
ones) at severities 1-5 and stores one uint8 ``.npy`` array per (corruption, severity) next to
``labels.npy``, ``clean.npy`` and a ``manifest.json`` with checksums. ``iter_corruption_set``
reads it back for evaluation (``vitsam.eval.robustness``).

Manifest contract: ``parts`` lists only parts whose file exists and matched its checksum when
it was recorded; ``requested`` is every (corruption, severity) any build of the folder asked
for; ``complete`` is true only when every requested part is listed and its file was verified
against its checksum at the end of a build. Several builds may fill one folder at once (say,
disjoint ``corruptions`` in two processes): each records a part by re-reading the manifest,
adding the part and writing it back while holding the folder's lock (``vitsam.io.locked``), so
no build drops another's parts, and the last one to finish sets ``complete``. A build killed
while writing a part leaves a hidden temporary file; the next build removes it (only once its
writer is gone: ``vitsam.io.remove_stale_temporaries``), so a resumed set holds only its files.

Parameter sets: ``"imagenet-c"`` uses the library ``imagecorruptions`` (fork
``imagecorruptions-imaug``) with its defaults; ``"cifar-c"`` uses CIFAR-10-C's milder constants
(``vitsam.data.cifar_c``). ImageNet-C's constants are meant for 224 px images; on 32 px images
most corruptions destroy the content at severity 3 and above, so use ``"cifar-c"`` there.

Determinism: every image is corrupted with its own seed, drawn from
``SeedSequence([seed, corruption number, severity, image index])``, so the result depends
neither on the number of workers nor on the chunking nor on what was built before. The library
draws from NumPy's global generator (seeded before each image), except glass blur, whose pixel
shuffle runs in numba with a generator of its own, and impulse noise, which uses scikit-image's
``rng`` argument: both receive the same per-image seed explicitly (the library's default would
be a fresh unseeded generator, which makes re-runs differ).

Small and greyscale images. The library refuses images under 32 px and works on RGB only:

* greyscale (C=1) images are replicated to three channels, corrupted, and converted back by
  luminance (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B); colourless corruptions therefore
  give back exactly the single-channel result, and coloured ones (frost, spatter) keep their
  brightness.
* an image with a side under 32 px is reflect-padded to 32 px, corrupted, and centre-cropped
  back. Padding keeps the original pixel grid: the clean pixels are not resampled (an up/down
  resize would blur every image, even before any corruption, and confound the blur
  corruptions), and noise, blur radii and JPEG blocks act on native pixels. Corruptions with
  global statistics (contrast mean, fog maximum) see the reflected border too, which for the
  2-4 px of a 28 px image changes them very little.
* ImageNet-C motion blur on images narrower than its kernel (up to 41 px): the library drops the
  shifts that leave the image, which darkens it; such images are edge-padded to the kernel
  width first (exact, since the library's shifts replicate the border) and cropped back.
* ImageNet-C spatter on small images can draw no liquid at all and then divides 0 by 0; those
  images are returned unspattered instead of with undefined (NaN-cast) pixels.
* Left as the library does it: ImageNet-C's elastic transform smooths its displacement field
  with a sigma of 1% of the side but keeps a fixed amplitude, so at 32 px it scrambles pixels
  rather than warping; snow streaks lose a little brightness on images under 42 px. Both are
  reasons to use ``"cifar-c"`` for small images.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing as mp
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import (DamagedFileError, atomic_write_json, atomic_writer, inside, locked,
                  remove_stale_temporaries, save_figure, sha256_file)
from ..progress import progress_bar
from ..runfiles import BOOL, NUM, REL, STR, check
from . import cifar_c

FORMAT = "vitsam-corruptions/1"
MANIFEST = "manifest.json"
PARAM_SETS = ("imagenet-c", "cifar-c")
STANDARD = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = STANDARD + EXTRA
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # the library's smallest accepted side
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
_SEEDED_IN_LIBRARY = ("glass_blur", "impulse_noise")  # library functions with their own generators
_INC_MOTION_RADIUS = (10, 15, 15, 15, 20)  # the library's motion-blur radius per severity
_CHUNK_BYTES = 4 << 20  # images sent to a worker at a time, about 4 MB
SMALL_IMAGE_POLICY = (f"sides under {MIN_SIDE} px reflect-padded to {MIN_SIDE}, corrupted, centre-cropped back "
                      "(ImageNet-C motion blur: edge-padded to the kernel width); greyscale replicated to RGB, "
                      "corrupted, converted back by BT.601 luminance")


class CorruptionSetError(ValueError):
    """A corruption set that cannot be built or read; the message names the problem and the fix."""


def library_version() -> str:
    """Installed version of the corruption library (recorded in manifests and results)."""
    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "imagecorruptions (unknown version)"


def corruption_names(corruptions: Iterable[str] | None = None, extra: bool = False) -> list[str]:
    """Validated corruption names in canonical order (the 15 standard ones by default)."""
    if corruptions is None:
        return list(STANDARD + (EXTRA if extra else ()))
    names = [corruptions] if isinstance(corruptions, str) else list(corruptions)
    unknown = [n for n in names if n not in ALL_CORRUPTIONS]
    if unknown:
        raise CorruptionSetError(f"unknown corruption(s) {', '.join(map(repr, unknown))}; "
                                 f"choose from {', '.join(ALL_CORRUPTIONS)}")
    if extra:
        names += [n for n in EXTRA if n not in names]
    return [n for n in ALL_CORRUPTIONS if n in names]


def _check_params(params: str) -> str:
    if params not in PARAM_SETS:
        raise CorruptionSetError(f"unknown parameter set {params!r}; choose one of {', '.join(PARAM_SETS)}")
    return params


def _check_severities(severities: Iterable[int]) -> list[int]:
    given = list(severities)
    try:
        sev = sorted({int(s) for s in given})
    except (TypeError, ValueError):
        sev = []
    if not sev or any(s not in SEVERITIES for s in sev) or any(float(s) != int(s) for s in sev):
        raise CorruptionSetError(f"severities must be a non-empty subset of 1..5, got {given}")
    return sev


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise CorruptionSetError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The 32-bit seed of image ``index`` under (corruption, severity) for a set seeded ``seed``."""
    ss = np.random.SeedSequence([seed, ALL_CORRUPTIONS.index(corruption), severity, index])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _rgb_corrupt(rgb: np.ndarray, corruption: str, severity: int, params: str, seed: int) -> np.ndarray:
    """Corrupt an RGB uint8 (H, W, 3) image with both sides >= 32; uint8 (H, W, 3)."""
    if params == "cifar-c":
        return cifar_c.apply(rgb, severity, corruption, seed)
    from imagecorruptions import corruption_dict
    from PIL import Image

    np.random.seed(seed)
    kwargs = {"seed": seed} if corruption in _SEEDED_IN_LIBRARY else {}
    # What the library's ``corrupt`` does, minus its checks, plus one fix: spatter divides by the
    # largest liquid value, which is 0 when a small image draws no liquid, and the NaNs would be
    # cast to uint8 in a platform-dependent way. No liquid means no spatter: keep those pixels.
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.asarray(corruption_dict[corruption](Image.fromarray(rgb), severity, **kwargs), dtype=np.float64)
    if np.isnan(out).any():
        out = np.where(np.isnan(out), rgb, out)
    return np.uint8(out)


def _as_chw_uint8(image: Any, what: str = "image") -> np.ndarray:
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8:
        raise CorruptionSetError(f"{what} must be uint8 (0-255), got {arr.dtype}; convert with "
                                 "(x * 255).round().to(torch.uint8) or keep the decoded bytes")
    return arr


def corrupt_image(image: np.ndarray | torch.Tensor, corruption: str, severity: int,
                  params: str = "imagenet-c", seed: int = 0) -> np.ndarray:
    """Corrupt one uint8 image (C, H, W), C = 1 or 3, any size; returns uint8 (C, H, W).

    ``seed`` is this image's own seed (``image_seed`` gives the one a set uses). Small and
    greyscale images are handled as described in the module docstring.
    """
    arr = _as_chw_uint8(image)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise CorruptionSetError(f"image must have shape (C, H, W) with C = 1 or 3, got {tuple(arr.shape)}")
    if corruption not in ALL_CORRUPTIONS:
        corruption_names([corruption])  # raises the one-line error
    if severity not in SEVERITIES:
        raise CorruptionSetError(f"severity must be one of 1..5, got {severity!r}")
    _check_params(params)
    c, h, w = arr.shape
    hwc = np.ascontiguousarray(arr.transpose(1, 2, 0))
    rgb = np.repeat(hwc, 3, axis=2) if c == 1 else hwc
    side, mode = MIN_SIDE, "reflect"
    if params == "imagenet-c" and corruption == "motion_blur":
        # The library stops adding shifted copies once a shift leaves the image, so on small
        # images the kernel loses weight and the image darkens (3% at 32 px, severity 5). Its
        # shifts replicate the border, so edge padding to the kernel width is exact.
        side, mode = max(MIN_SIDE, 2 * _INC_MOTION_RADIUS[severity - 1] + 2), "edge"
    ph, pw = max(0, side - h), max(0, side - w)
    if ph or pw:
        rgb = np.pad(rgb, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode=mode)
    out = np.asarray(_rgb_corrupt(rgb, corruption, severity, params, seed))
    out = out[ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
    if c == 1:
        luma = out.astype(np.float64) @ np.array(LUMA)
        out = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.uint8)


# ---------------------------------------------------------------- workers

_WORKER_IMAGES: np.ndarray | None = None


def _init_worker(clean_path: str) -> None:
    """Pool initialiser: memory-map the clean images; one thread per process (no oversubscription)."""
    global _WORKER_IMAGES
    import cv2

    cv2.setNumThreads(1)
    _WORKER_IMAGES = np.load(clean_path, mmap_mode="r")


def _corrupt_chunk(images: np.ndarray, start: int, corruption: str, severity: int,
                   params: str, seed: int) -> np.ndarray:
    """Corrupt ``images`` (n, C, H, W), which sit at ``start`` in the set; uint8 (n, C, H, W)."""
    out = np.empty(images.shape, dtype=np.uint8)
    for i in range(images.shape[0]):
        out[i] = corrupt_image(images[i], corruption, severity, params,
                               image_seed(seed, corruption, severity, start + i))
    return out


def _worker_task(task: tuple[str, int, int, int, str, int]) -> tuple[str, int, int, np.ndarray]:
    corruption, severity, start, stop, params, seed = task
    assert _WORKER_IMAGES is not None
    return corruption, severity, start, _corrupt_chunk(
        np.asarray(_WORKER_IMAGES[start:stop]), start, corruption, severity, params, seed)


def _can_spawn() -> bool:
    """Whether spawned workers can re-import ``__main__`` (not when it was read from stdin)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is None or Path(main_file).exists():
        return True
    warnings.warn(f"the main module {main_file!r} is not a file, so worker processes cannot start; "
                  "corrupting in this process instead", RuntimeWarning, stacklevel=3)
    return False


# ---------------------------------------------------------------- files

def _save_npy_atomic(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy atomically; returns its sha256."""
    with atomic_writer(path) as fh:
        np.save(fh, arr)
    return sha256_file(path)


def part_file(corruption: str, severity: int) -> str:
    """Relative path of one (corruption, severity) array inside a set folder."""
    return f"{corruption}/{severity}.npy"


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(images.shape), str(images.dtype)]).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptionSetError(f"{path} is damaged; delete the folder {out_dir} and build again") from None
    except (ValueError, RecursionError) as exc:  # numbers too long, nesting too deep
        raise CorruptionSetError(f"{path} is damaged ({type(exc).__name__}); delete the folder "
                                 f"{out_dir} and build again") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        fmt = man.get("format") if isinstance(man, dict) else None
        fmt = repr(fmt) if len(repr(fmt)) <= 60 else repr(fmt)[:57] + "..."
        raise CorruptionSetError(f"{out_dir} is not a vitsam corruption set (format {fmt}); "
                                 "choose another out_dir")
    try:
        check(man, _MANIFEST_SCHEMA, path)
        sevs = {s for v in man["parts"].values() for s in v}
        if not sevs <= {str(s) for s in SEVERITIES}:
            raise DamagedFileError(f"{path}: parts hold severities {sorted(sevs)}, not 1-5")
        requested_parts(man)
    except (DamagedFileError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).split("; the file is damaged")[0] if str(exc) else type(exc).__name__
        raise CorruptionSetError(f"{first}; the manifest is damaged: delete the folder {out_dir} "
                                 "and build again") from None
    return man


_PART = {"file!": REL, "sha256": STR}
# The fields readers use (``vitsam.runfiles.check``); every file named must lie inside the set.
_MANIFEST_SCHEMA = {"format!": STR, "params": STR, "seed": NUM, "library": STR, "n": NUM,
                    "source": {"description": STR, "sha256": STR}, "clean!": _PART,
                    "labels!": _PART, "parts!": {"*": {"*": _PART}}, "requested": {"*": [(NUM, STR)]},
                    "complete": BOOL}


def _part_done(out_dir: Path, man: dict[str, Any], corruption: str, severity: int) -> bool:
    entry = man["parts"].get(corruption, {}).get(str(severity))
    path = out_dir / part_file(corruption, severity)
    return bool(entry) and path.exists() and sha256_file(path) == entry["sha256"]


def _drop_part(man: dict[str, Any], corruption: str, severity: int) -> None:
    sevs = man["parts"].get(corruption, {})
    sevs.pop(str(severity), None)
    if not sevs:
        man["parts"].pop(corruption, None)


def requested_parts(man: dict[str, Any]) -> set[tuple[str, int]]:
    """Every (corruption, severity) that a build of this set asked for."""
    req = man.get("requested")
    if req is None:  # a manifest without a record of requests: what it lists is what was wanted
        return {(c, int(s)) for c, v in man["parts"].items() for s in v}
    if set(req) == {"corruptions", "severities"}:  # written before requests were merged
        return {(c, int(s)) for c in req["corruptions"] for s in req["severities"]}
    return {(c, int(s)) for c, v in req.items() for s in v}


def missing_parts(man: dict[str, Any]) -> list[tuple[str, int]]:
    """Requested parts the manifest does not list, in canonical order."""
    have = {(c, int(s)) for c, v in man["parts"].items() for s in v}
    order = {c: i for i, c in enumerate(ALL_CORRUPTIONS)}
    return sorted(requested_parts(man) - have, key=lambda p: (order.get(p[0], len(order)), p[1]))


def _write_manifest(out_dir: Path, man: dict[str, Any], complete: bool) -> None:
    """Write ``man`` with summary keys derived from its parts; call holding ``locked``.

    ``complete`` is stored only if no requested part is missing: a manifest never claims more
    than it lists, and it lists only verified files.
    """
    done = {c: sorted(int(s) for s in man["parts"][c]) for c in ALL_CORRUPTIONS if man["parts"].get(c)}
    man["corruptions"] = list(done)
    man["severities"] = sorted({s for v in done.values() for s in v})
    man["complete"] = bool(complete and done and not missing_parts(man))
    atomic_write_json(out_dir / MANIFEST, man)


def _locked_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest as it is on disk now (call holding ``locked``), with a one-line error if gone."""
    man = _read_manifest(out_dir)
    if man is None:
        raise CorruptionSetError(f"{out_dir / MANIFEST} disappeared while the set was being built; "
                                 "build it again")
    return man


# ---------------------------------------------------------------- build

def build_corruption_set(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    out_dir: str | Path,
    params: str = "imagenet-c",
    corruptions: Iterable[str] | None = None,
    severities: Iterable[int] = SEVERITIES,
    extra: bool = False,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    source: str | None = None,
) -> Path:
    """Build (or finish) a corruption benchmark of ``images`` uint8 (N, C, H, W) in ``out_dir``.

    Writes ``clean.npy`` (N, C, H, W), ``labels.npy`` int64 (N,), one ``<corruption>/<severity>.npy``
    uint8 (N, C, H, W) per part, and ``manifest.json`` (parameter set, seed, shapes, sha256 per
    file, library version, ``source`` description). Each part is written atomically and recorded
    in the manifest as soon as it is complete, so an interrupted build resumes: a re-run (also one
    asking for more corruptions or severities) skips every part whose file matches its recorded
    checksum. Other builds with the same settings may run on the same folder at the same time
    (see the module docstring); the manifest says ``complete`` once every part any of them
    requested is built and verified. ``workers`` >= 2 corrupts in that many (spawned)
    processes, so a script calling it needs the usual ``if __name__ == "__main__":`` guard;
    0 or 1 works in this process. Returns ``out_dir``.
    """
    params = _check_params(params)
    names = corruption_names(corruptions, extra)
    sev = _check_severities(severities)
    seed = _check_seed(seed)
    if not isinstance(workers, int) or workers < 0:
        raise CorruptionSetError(f"workers must be a non-negative integer, got {workers!r}")
    imgs = _as_chw_uint8(images, "images")
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3) or imgs.shape[0] == 0:
        raise CorruptionSetError(f"images must have shape (N, C, H, W) with N > 0 and C = 1 or 3, "
                                 f"got {tuple(imgs.shape)}")
    labs = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labs.ndim != 1 or labs.shape[0] != imgs.shape[0] or not np.issubdtype(labs.dtype, np.integer):
        raise CorruptionSetError(f"labels must be integers of shape ({imgs.shape[0]},), got "
                                 f"{labs.dtype} {tuple(labs.shape)}")
    labs = labs.astype(np.int64)
    imgs = np.ascontiguousarray(imgs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fingerprint = _fingerprint(imgs, labs)
    # A different library version may corrupt differently: never mix two versions in one set.
    settings = {"params": params, "seed": seed, "library": library_version(), "source_sha256": fingerprint}
    want = [(c_, s) for c_ in names for s in sev]
    checked: set[tuple[str, int]] = set()  # parts found built and verified at the start
    with locked(out / MANIFEST):
        man = _read_manifest(out)
        if man is not None:
            old = {k: man.get(k) for k in ("params", "seed", "library")}
            old["source_sha256"] = man.get("source", {}).get("sha256")
            if old != settings:
                diff = ", ".join(f"{k}: {old[k]!r} there, {settings[k]!r} now" for k in settings if old[k] != settings[k])
                raise CorruptionSetError(f"{out} holds a corruption set built with other settings ({diff}); "
                                         "choose a new out_dir or delete that folder")
        else:
            n, c, h, w = imgs.shape
            man = {
                "format": FORMAT,
                "params": params,
                "seed": seed,
                "library": library_version(),
                "small_image_policy": SMALL_IMAGE_POLICY,
                "source": {"description": source or f"{n} images of shape {c}x{h}x{w}", "sha256": fingerprint},
                "n": n,
                "image_shape": [c, h, w],
                "dtype": "uint8",
                "layout": "NCHW",
                "clean": {"file": "clean.npy"},
                "labels": {"file": "labels.npy"},
                "parts": {},
            }
        for key, arr in (("clean", imgs), ("labels", labs)):
            path = out / man[key]["file"]
            if not (path.exists() and man[key].get("sha256") == sha256_file(path)):
                man[key]["sha256"] = _save_npy_atomic(path, arr)
        # Requests of earlier (perhaps interrupted, perhaps concurrent) builds stay requested.
        req = requested_parts(man) | set(want)
        man["requested"] = {c_: sorted(s for n_, s in req if n_ == c_)
                            for c_ in ALL_CORRUPTIONS if any(n_ == c_ for n_, _ in req)}
        # A damaged, deleted or half-recorded part is no longer listed until it is rebuilt.
        listed = {(c_, int(s)) for c_, v in man["parts"].items() for s in v}
        for c_, s in sorted(req | listed):
            if _part_done(out, man, c_, s):
                checked.add((c_, s))
            else:
                _drop_part(man, c_, s)
        _write_manifest(out, man, complete=False)
        for folder in [out, *(out / c_ for c_ in ALL_CORRUPTIONS)]:
            remove_stale_temporaries(folder)  # left by a build killed mid-write

    todo = [p for p in want if p not in checked]
    n = imgs.shape[0]
    chunk = max(1, min(256, _CHUNK_BYTES // max(1, imgs[0].nbytes)))
    tasks = [(c_, s, a, min(a + chunk, n), params, seed) for c_, s in todo for a in range(0, n, chunk)]
    pending: dict[tuple[str, int], list[Any]] = {}  # part -> [array, images still missing]

    def finish(corruption: str, severity: int, start: int, arr: np.ndarray) -> None:
        slot = pending.setdefault((corruption, severity), [np.empty_like(imgs), n])
        slot[0][start:start + arr.shape[0]] = arr
        slot[1] -= arr.shape[0]
        bar.update(arr.shape[0])
        if slot[1] == 0:
            digest = _save_npy_atomic(out / part_file(corruption, severity), slot[0])
            with locked(out / MANIFEST):  # re-read: other builds may have recorded parts since
                current = _locked_manifest(out)
                current["parts"].setdefault(corruption, {})[str(severity)] = {
                    "file": part_file(corruption, severity), "sha256": digest}
                _write_manifest(out, current, complete=False)
            del pending[(corruption, severity)]

    bar = progress_bar(total=len(todo) * n, desc=f"corrupt ({params})", unit="img", disable=not progress)
    state = np.random.get_state()  # the library seeds NumPy's global generator; leave the caller's alone
    try:
        with bar:
            if tasks and workers >= 2 and _can_spawn():
                # Not fork: OpenCV's and OpenMP's thread pools in this process can hold locks at
                # fork time and leave forked workers waiting forever.
                ctx = mp.get_context("spawn")
                with ctx.Pool(workers, initializer=_init_worker,
                              initargs=(str(out / man["clean"]["file"]),)) as pool:
                    for corruption, severity, start, arr in pool.imap_unordered(_worker_task, tasks):
                        finish(corruption, severity, start, arr)
            else:
                for corruption, severity, start, stop, _, _ in tasks:
                    finish(corruption, severity, start,
                           _corrupt_chunk(imgs[start:stop], start, corruption, severity, params, seed))
    finally:
        np.random.set_state(state)

    # Complete only once every requested part, also those other builds recorded, is verified
    # (again: a file may have been replaced or removed since it was recorded).
    with locked(out / MANIFEST):
        man = _locked_manifest(out)
        for c_, s in sorted(requested_parts(man)):
            if not _part_done(out, man, c_, s):
                _drop_part(man, c_, s)
        _write_manifest(out, man, complete=True)
    return out


# ---------------------------------------------------------------- read

def load_corruption_set(set_dir: str | Path, complete: bool = False) -> dict[str, Any]:
    """The manifest of a corruption set folder (raises a one-line error if it is not one).

    ``complete``: also raise unless the manifest says every requested part is built and
    verified (what an evaluation needs, so that it never silently covers only some parts).
    """
    set_dir = Path(set_dir)
    if not set_dir.is_dir():
        raise CorruptionSetError(f"corruption set folder {set_dir} does not exist; build it with `vitsam corrupt` (build_corruption_set)")
    man = _read_manifest(set_dir)
    if man is None:
        raise CorruptionSetError(f"{set_dir} has no manifest.json, so it is not a corruption set; build one with `vitsam corrupt` (build_corruption_set)")
    if complete and (what := incomplete_reason(man)):
        raise CorruptionSetError(f"corruption set {set_dir} is incomplete: {what}; re-run `vitsam corrupt "
                                 f"--out {set_dir}` with the arguments that built it to finish it (or let a "
                                 "build still running end), then evaluate")
    return man


def incomplete_reason(man: dict[str, Any]) -> str | None:
    """Why the set of manifest ``man`` is not complete (a phrase naming the missing parts), or
    None when the manifest says every requested part is built and verified."""
    if man.get("complete") and man.get("parts"):
        return None
    missing = missing_parts(man)
    if not missing:
        return "its last build ended before verifying the parts"
    listed = ", ".join(f"{c} {s}" for c, s in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return f"{len(missing)} of {len(requested_parts(man))} requested parts are not built yet ({listed})"


def _load_checked(set_dir: Path, entry: dict[str, Any], verify: bool) -> np.ndarray:
    path = inside(set_dir, entry["file"], f"the manifest of {set_dir}")
    if not path.exists():
        raise CorruptionSetError(f"{path} is missing; re-run build_corruption_set on {set_dir} to restore it")
    if verify and sha256_file(path) != entry.get("sha256"):
        raise CorruptionSetError(f"{path} does not match its checksum; re-run build_corruption_set on {set_dir}")
    try:
        return np.load(path)  # allow_pickle stays False: a .npy holding objects is refused
    except (ValueError, OSError, EOFError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CorruptionSetError(f"{path} cannot be read ({why}); re-run build_corruption_set on "
                                 f"{set_dir}") from None


def load_clean_set(set_dir: str | Path, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncorrupted images uint8 (N, C, H, W) and labels int64 (N,) of a set."""
    set_dir = Path(set_dir)
    man = load_corruption_set(set_dir)
    return (torch.from_numpy(_load_checked(set_dir, man["clean"], verify)),
            torch.from_numpy(_load_checked(set_dir, man["labels"], verify)).long())


def iter_corruption_set(
    set_dir: str | Path,
    corruptions: Iterable[str] | None = None,
    severities: Iterable[int] | None = None,
    verify: bool = True,
    manifest: dict[str, Any] | None = None,
) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(corruption, severity, images uint8 (N, C, H, W), labels int64 (N,))`` per built part.

    Parts come in canonical corruption order, severities ascending; ``verify`` checks each
    file's sha256 against the manifest first. ``manifest``: the set's manifest as already read
    (``load_corruption_set``), so that the parts yielded are the ones it lists even if a build
    adds parts meanwhile; read from ``set_dir`` when None.
    """
    set_dir = Path(set_dir)
    man = load_corruption_set(set_dir) if manifest is None else manifest
    wanted = None if corruptions is None else set(corruption_names(corruptions))
    sev_wanted = None if severities is None else set(_check_severities(severities))
    labels = torch.from_numpy(_load_checked(set_dir, man["labels"], verify)).long()
    for corruption in ALL_CORRUPTIONS:
        if corruption not in man["parts"] or (wanted is not None and corruption not in wanted):
            continue
        for severity in sorted(int(s) for s in man["parts"][corruption]):
            if sev_wanted is not None and severity not in sev_wanted:
                continue
            arr = _load_checked(set_dir, man["parts"][corruption][str(severity)], verify)
            yield corruption, severity, torch.from_numpy(arr), labels


# ---------------------------------------------------------------- figure

def contact_sheet(
    image: np.ndarray | torch.Tensor,
    out_path: str | Path,
    params: str = "imagenet-c",
    corruptions: Iterable[str] | None = None,
    severities: Iterable[int] = SEVERITIES,
    extra: bool = False,
    seed: int = 0,
) -> Path:
    """PNG of one uint8 image (C, H, W): clean first, then every corruption (rows) x severity (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = _as_chw_uint8(image)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise CorruptionSetError(f"image must have shape (C, H, W) with C = 1 or 3, got {tuple(arr.shape)}")
    names = corruption_names(corruptions, extra)
    sev = _check_severities(severities)
    _check_params(params)
    grey = arr.shape[0] == 1

    def show(ax: Any, chw: np.ndarray) -> None:
        ax.imshow(chw[0] if grey else chw.transpose(1, 2, 0), cmap="gray" if grey else None,
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])

    fig, axes = plt.subplots(len(names), len(sev) + 1, figsize=(1.3 * (len(sev) + 1), 1.3 * len(names)),
                             squeeze=False)
    state = np.random.get_state()
    try:
        for r, name in enumerate(names):
            show(axes[r, 0], arr)
            axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            for j, s in enumerate(sev):
                show(axes[r, j + 1], corrupt_image(arr, name, s, params, image_seed(seed, name, s, 0)))
                if r == 0:
                    axes[r, j + 1].set_title(f"severity {s}", fontsize=8)
    finally:
        np.random.set_state(state)
    axes[0, 0].set_title("clean", fontsize=8)
    fig.suptitle(f"corruptions ({params})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return save_figure(fig, out_path, dpi=100)
