"""The 19 corruptions with CIFAR-10-C's constants (Hendrycks & Dietterich, ICLR 2019).

CIFAR-10-C was generated with much milder constants than ImageNet-C (for example Gaussian noise
sigma 0.04-0.10 instead of 0.08-0.38, JPEG quality 80-40 instead of 25-7, a frost texture shrunk
to a fifth). Every one of the 19 corruptions has different constants, so each is written here
with the published CIFAR-10-C values, on top of the helpers of ``imagecorruptions`` (disk
kernel, plasma fractal, clipped zoom, NumPy motion-blur kernel, numba pixel shuffle, frost
textures) so the algorithms match the library's ImageNet-C versions.

Deviations from the original generation script, all deliberate:

* Motion blur (and the streaks of snow) use the library's NumPy motion-blur kernel instead of
  ImageMagick, exactly as ``imagecorruptions`` does for ImageNet-C; same radius and sigma.
* Lengths tied to the 32 px CIFAR size scale with the image side, so 32 px images get the
  original values and other sizes keep the same relative look: frost texture scale
  ``0.2 * side / 32``, fog plasma map size (next power of two of the side), elastic affine
  jitter and displacement (fractions of the side). Blur radii and sigmas stay in pixels.
* Spatter skips the division by the largest liquid value when the liquid layer is empty
  (the original divides by zero and produces NaNs).

Each function takes an RGB uint8 array (H, W, 3) and a severity 1-5 and returns float RGB
values in [0, 255] (or a PIL image for JPEG / pixelate); ``apply`` seeds, dispatches and returns
uint8. Randomness comes from NumPy's global generator (seeded by ``apply``); glass blur and
impulse noise take the seed explicitly because they use other generators (numba's own state and
scikit-image's ``rng``).
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from functools import cache
from io import BytesIO

import cv2
import numpy as np
import skimage as sk
from imagecorruptions.corruptions import (
    _motion_blur,
    _shuffle_pixels_njit_glass_blur,
    clipped_zoom,
    disk,
    next_power_of_2,
    plasma_fractal,
)
from PIL import Image
from scipy.ndimage import map_coordinates
from skimage.filters import gaussian

# Published CIFAR-10-C constants, one entry per severity 1..5.
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # sigma on the 0-1 scale
SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # salt-and-pepper fraction
SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # sigma, px
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, max shift, iterations
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # disk radius, alias blur
MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # radius, sigma
ZOOM_BLUR_MAX = (1.06, 1.11, 1.16, 1.21, 1.26)  # zoom factors 1, 1.01, ... below this
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))  # strength, wibble decay
FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
SNOW = (
    (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),  # loc, scale, zoom, threshold, blur radius, blur sigma, mix
    (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
SPATTER = (
    (0.62, 0.1, 0.7, 0.7, 0.5, 0),  # loc, scale, sigma, threshold, intensity, mode (0 water, 1 mud)
    (0.65, 0.1, 0.8, 0.7, 0.5, 0),
    (0.65, 0.3, 1.0, 0.69, 0.5, 0),
    (0.65, 0.1, 0.7, 0.69, 0.6, 1),
    (0.65, 0.1, 0.5, 0.68, 0.6, 1),
)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))  # gain, offset
JPEG_QUALITY = (80, 65, 58, 50, 40)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
# Elastic: (displacement alpha, displacement sigma, affine jitter), as fractions of the side.
ELASTIC = ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # CIFAR-C drew from the first five
FROST_SCALE = 0.2  # the texture's resize factor at CIFAR's size
CIFAR_SIDE = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) / 255.0


def _to_255(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0) * 255.0


def _centre_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Zoom (H, W, C) about the centre by ``factor`` >= 1 and crop back to (H, W), centred."""
    h, w = img.shape[:2]
    out = clipped_zoom(img, factor)
    top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[top:top + h, left:left + w]


def gaussian_noise(x: np.ndarray, severity: int) -> np.ndarray:
    x = _unit(x)
    return _to_255(x + np.random.normal(size=x.shape, scale=GAUSSIAN_NOISE[severity - 1]))


def shot_noise(x: np.ndarray, severity: int) -> np.ndarray:
    c = SHOT_NOISE[severity - 1]
    return _to_255(np.random.poisson(_unit(x) * c) / float(c))


def impulse_noise(x: np.ndarray, severity: int, seed: int) -> np.ndarray:
    # Third positional argument: ``rng`` in current scikit-image, ``seed`` in older releases.
    return _to_255(sk.util.random_noise(_unit(x), "s&p", seed, amount=IMPULSE_NOISE[severity - 1]))


def speckle_noise(x: np.ndarray, severity: int) -> np.ndarray:
    x = _unit(x)
    return _to_255(x + x * np.random.normal(size=x.shape, scale=SPECKLE_NOISE[severity - 1]))


def gaussian_blur(x: np.ndarray, severity: int) -> np.ndarray:
    return _to_255(gaussian(_unit(x), sigma=GAUSSIAN_BLUR[severity - 1], channel_axis=-1))


def glass_blur(x: np.ndarray, severity: int, seed: int) -> np.ndarray:
    c = GLASS_BLUR[severity - 1]
    blurred = np.uint8(gaussian(_unit(x), sigma=c[0], channel_axis=-1) * 255)
    # The shuffle runs in numba, whose generator is separate from NumPy's: the kernel seeds it.
    shuffled = _shuffle_pixels_njit_glass_blur(blurred.shape[0], blurred.shape[1], blurred, c, seed)
    return _to_255(gaussian(shuffled / 255.0, sigma=c[0], channel_axis=-1))


def defocus_blur(x: np.ndarray, severity: int) -> np.ndarray:
    radius, alias = DEFOCUS_BLUR[severity - 1]
    x = _unit(x)
    kernel = disk(radius=radius, alias_blur=alias)
    out = np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)], axis=-1)
    return _to_255(out)


def motion_blur(x: np.ndarray, severity: int) -> np.ndarray:
    radius, sigma = MOTION_BLUR[severity - 1]
    out = _motion_blur(np.asarray(x), radius=radius, sigma=sigma, angle=np.random.uniform(-45, 45))
    return np.clip(out, 0, 255)


def zoom_blur(x: np.ndarray, severity: int) -> np.ndarray:
    factors = np.arange(1, ZOOM_BLUR_MAX[severity - 1], 0.01)
    x = _unit(x).astype(np.float32)
    out = np.zeros_like(x)
    for f in factors:
        out += _centre_zoom(x, f)
    return _to_255((x + out) / (len(factors) + 1))


def fog(x: np.ndarray, severity: int) -> np.ndarray:
    strength, decay = FOG[severity - 1]
    h, w = x.shape[:2]
    x = _unit(x)
    peak = x.max()
    x = x + strength * plasma_fractal(mapsize=next_power_of_2(max(h, w)), wibbledecay=decay)[:h, :w, None]
    return _to_255(x * peak / (peak + strength))


@cache
def _frost_texture(name: str) -> np.ndarray:
    ref = importlib.resources.files("imagecorruptions") / "frost" / name
    with importlib.resources.as_file(ref) as path:
        tex = cv2.imread(str(path))
    if tex is None:
        raise ValueError(f"frost texture {name} of imagecorruptions is missing; reinstall imagecorruptions-imaug")
    return tex[..., ::-1]  # BGR -> RGB


def frost(x: np.ndarray, severity: int) -> np.ndarray:
    a, b = FROST[severity - 1]
    h, w = x.shape[:2]
    tex = _frost_texture(FROST_FILES[np.random.randint(len(FROST_FILES))])
    # 0.2 at CIFAR's 32 px, scaled with the image; never smaller than the image itself.
    scale = max(FROST_SCALE * max(h, w) / CIFAR_SIDE, (h + 1) / tex.shape[0], (w + 1) / tex.shape[1])
    tex = cv2.resize(np.ascontiguousarray(tex), (0, 0), fx=scale, fy=scale)
    top = np.random.randint(0, tex.shape[0] - h)
    left = np.random.randint(0, tex.shape[1] - w)
    return np.clip(a * np.asarray(x, dtype=np.float64) + b * tex[top:top + h, left:left + w], 0, 255)


def snow(x: np.ndarray, severity: int) -> np.ndarray:
    loc, scale, zoom, thresh, radius, sigma, mix = SNOW[severity - 1]
    x = _unit(x).astype(np.float32)
    layer = np.random.normal(size=x.shape[:2], loc=loc, scale=scale)
    layer = _centre_zoom(layer[..., None], zoom)[..., 0]
    layer[layer < thresh] = 0
    layer = np.clip(layer, 0, 1)
    layer = _motion_blur(layer, radius=radius, sigma=sigma, angle=np.random.uniform(-135, -45))
    layer = (np.round(layer * 255) / 255.0)[..., None]  # the original went through an 8-bit PNG
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = mix * x + (1 - mix) * np.maximum(x, grey * 1.5 + 0.5)
    return _to_255(x + layer + np.rot90(layer, k=2))


def spatter(x: np.ndarray, severity: int) -> np.ndarray:
    loc, scale, sigma, thresh, intensity, mode = SPATTER[severity - 1]
    x = _unit(x).astype(np.float32)
    liquid = gaussian(np.random.normal(size=x.shape[:2], loc=loc, scale=scale), sigma=sigma)
    liquid[liquid < thresh] = 0
    if mode == 0:  # water: turquoise blobs shaded by distance to their edges
        liquid8 = (liquid * 255).astype(np.uint8)
        dist = cv2.distanceTransform(255 - cv2.Canny(liquid8, 50, 150), cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = liquid8 * dist
        if m.max() > 0:
            m = m / m.max()
        colour = np.array([175, 238, 238], dtype=np.float32) / 255.0
        return _to_255(x + (m * intensity)[..., None] * colour)
    m = gaussian((liquid > thresh).astype(np.float32), sigma=intensity)  # mud
    m[m < 0.8] = 0
    colour = np.array([63, 42, 20], dtype=np.float32) / 255.0
    return _to_255(x * (1 - m[..., None]) + m[..., None] * colour)


def contrast(x: np.ndarray, severity: int) -> np.ndarray:
    x = _unit(x)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_255((x - means) * CONTRAST[severity - 1] + means)


def brightness(x: np.ndarray, severity: int) -> np.ndarray:
    hsv = sk.color.rgb2hsv(_unit(x))
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + BRIGHTNESS[severity - 1], 0, 1)
    return _to_255(sk.color.hsv2rgb(hsv))


def saturate(x: np.ndarray, severity: int) -> np.ndarray:
    gain, offset = SATURATE[severity - 1]
    hsv = sk.color.rgb2hsv(_unit(x))
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * gain + offset, 0, 1)
    return _to_255(sk.color.hsv2rgb(hsv))


def jpeg_compression(x: np.ndarray, severity: int) -> Image.Image:
    buf = BytesIO()
    Image.fromarray(np.asarray(x, dtype=np.uint8)).save(buf, "JPEG", quality=JPEG_QUALITY[severity - 1])
    return Image.open(buf)


def pixelate(x: np.ndarray, severity: int) -> Image.Image:
    h, w = x.shape[:2]
    c = PIXELATE[severity - 1]
    img = Image.fromarray(np.asarray(x, dtype=np.uint8))
    return img.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)


def elastic_transform(x: np.ndarray, severity: int) -> np.ndarray:
    h, w = x.shape[:2]
    side = min(h, w)
    alpha, sigma, jitter = (v * side for v in ELASTIC[severity - 1])
    img = _unit(x).astype(np.float32)
    # Random affine of three points around the centre.
    centre = np.float32([h, w]) // 2
    half = side // 3
    src = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + np.random.uniform(-jitter, jitter, size=src.shape).astype(np.float32)
    img = cv2.warpAffine(img, cv2.getAffineTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT_101)
    # Smooth random displacement field.
    dx = (gaussian(np.random.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (gaussian(np.random.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    xs, ys, zs = np.meshgrid(np.arange(w), np.arange(h), np.arange(3))
    coords = ((ys + dy[..., None]).reshape(-1), (xs + dx[..., None]).reshape(-1), zs.reshape(-1))
    return _to_255(map_coordinates(img, coords, order=1, mode="reflect").reshape(img.shape))


CORRUPTIONS: dict[str, Callable[..., np.ndarray | Image.Image]] = {
    f.__name__: f
    for f in (gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur,
              zoom_blur, snow, frost, fog, brightness, contrast, elastic_transform, pixelate,
              jpeg_compression, speckle_noise, gaussian_blur, spatter, saturate)
}
_TAKES_SEED = ("glass_blur", "impulse_noise")


def apply(image: np.ndarray, severity: int, name: str, seed: int) -> np.ndarray:
    """Corrupt one RGB uint8 (H, W, 3) image with CIFAR-10-C constants; uint8 (H, W, 3) out.

    Seeds NumPy's global generator with ``seed`` first (the caller saves and restores its state
    when that matters). Values are truncated to uint8 as in the original generation script.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    np.random.seed(seed)
    fn = CORRUPTIONS[name]
    out = fn(image, severity, seed) if name in _TAKES_SEED else fn(image, severity)
    return np.uint8(np.asarray(out))
