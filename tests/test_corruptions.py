import json
import os

import numpy as np
import pytest
import torch
from imagecorruptions import corrupt
from PIL import Image

from vitsam.data import cifar_c
from vitsam.data import corruptions as C


def make_image(chans: int, side: int, seed: int = 0) -> np.ndarray:
    """Gradients, a checkerboard and noise: every corruption has something to change."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    base = np.stack([xx * 255 // side, yy * 255 // side, (xx + yy) * 127 // side])[:chans]
    cell = max(1, side // 4)
    base = np.where(((xx // cell) + (yy // cell)) % 2 == 0, base, 255 - base)
    return np.clip(base + g.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def grey_noop(chans: int, name: str, severity: int) -> bool:
    # Saturation of a grey image is zero; severities 1-3 only scale it (no offset): nothing to change.
    return chans == 1 and name == "saturate" and severity <= 3


CASES = [(1, 28, C.SEVERITIES), (3, 32, C.SEVERITIES), (3, 224, C.SEVERITIES)]


@pytest.mark.parametrize("params", C.PARAM_SETS)
@pytest.mark.parametrize("chans,side,severities", CASES, ids=["28px-grey", "32px-rgb", "224px-rgb"])
def test_every_corruption_shape_change_and_rerun(params, chans, side, severities):
    img = make_image(chans, side)
    for name in C.ALL_CORRUPTIONS:
        for s in severities:
            seed = C.image_seed(3, name, s, 0)
            out = C.corrupt_image(img, name, s, params, seed)
            assert out.shape == img.shape and out.dtype == np.uint8, (name, s)
            if grey_noop(chans, name, s):
                assert np.array_equal(out, img)
            else:
                assert not np.array_equal(out, img), (name, s)
            again = C.corrupt_image(torch.from_numpy(img), name, s, params, seed)
            assert np.array_equal(out, again), f"{name} severity {s} differs on a re-run"


@pytest.mark.parametrize("params", C.PARAM_SETS)
def test_seed_changes_random_corruptions(params):
    img = make_image(3, 32)
    for name in ("glass_blur", "impulse_noise", "gaussian_noise", "frost", "elastic_transform"):
        a = C.corrupt_image(img, name, 3, params, 1)
        b = C.corrupt_image(img, name, 3, params, 2)
        assert not np.array_equal(a, b), name


def test_imagenet_c_matches_library_and_pads_small_images():
    img = make_image(3, 28)
    padded = np.pad(img.transpose(1, 2, 0), ((2, 2), (2, 2), (0, 0)), mode="reflect")
    for name in ("contrast", "gaussian_noise"):
        np.random.seed(11)
        ref = corrupt(padded, severity=4, corruption_name=name)[2:30, 2:30].transpose(2, 0, 1)
        assert np.array_equal(C.corrupt_image(img, name, 4, "imagenet-c", 11), ref)
    big = make_image(3, 64)
    np.random.seed(4)
    lib = corrupt(np.ascontiguousarray(big.transpose(1, 2, 0)), severity=2, corruption_name="glass_blur", seed=4)
    assert np.array_equal(C.corrupt_image(big, "glass_blur", 2, "imagenet-c", 4), lib.transpose(2, 0, 1))


def test_imagenet_c_spatter_without_liquid_leaves_image_unchanged():
    from imagecorruptions import corruption_dict

    img = make_image(3, 32)
    hwc = np.ascontiguousarray(img.transpose(1, 2, 0))
    np.random.seed(35)  # at 32 px this seed draws no liquid: the library divides 0 by 0
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.asarray(corruption_dict["spatter"](Image.fromarray(hwc), 1))
    assert np.isnan(raw).all()
    assert np.array_equal(C.corrupt_image(img, "spatter", 1, "imagenet-c", 35), img)


def test_greyscale_is_luminance_of_rgb_result():
    grey = make_image(1, 32)
    rgb = np.repeat(grey, 3, axis=0)
    for params, name in (("cifar-c", "frost"), ("imagenet-c", "spatter"), ("cifar-c", "gaussian_blur")):
        out_grey = C.corrupt_image(grey, name, 3, params, 9)
        out_rgb = C.corrupt_image(rgb, name, 3, params, 9).astype(np.float64)
        luma = np.rint(0.299 * out_rgb[0] + 0.587 * out_rgb[1] + 0.114 * out_rgb[2])
        assert np.array_equal(out_grey[0], luma.astype(np.uint8))


def test_motion_blur_keeps_brightness_on_small_images():
    flat = np.full((3, 32, 32), 128, np.uint8)
    out = C.corrupt_image(flat, "motion_blur", 5, "imagenet-c", 0)
    assert np.abs(out.astype(int) - 127.5).max() <= 1  # the library alone gives about 124 here


def test_cifar_c_constants_by_hand():
    img = make_image(3, 32)
    x = img.transpose(1, 2, 0) / 255.0
    for s, c in zip(C.SEVERITIES, (0.75, 0.5, 0.4, 0.3, 0.15)):  # published CIFAR-10-C contrast
        m = x.mean(axis=(0, 1), keepdims=True)
        expected = np.uint8(np.clip((x - m) * c + m, 0, 1) * 255).transpose(2, 0, 1)
        assert np.array_equal(C.corrupt_image(img, "contrast", s, "cifar-c", 0), expected)
    flat = np.full((3, 32, 32), 128, np.uint8)
    noise_cifar = (C.corrupt_image(flat, "gaussian_noise", 5, "cifar-c", 1).astype(float) - 128) / 255
    noise_inet = (C.corrupt_image(flat, "gaussian_noise", 5, "imagenet-c", 1).astype(float) - 128) / 255
    assert abs(noise_cifar.std() - 0.10) < 0.01  # CIFAR-10-C sigma 0.10 at severity 5
    assert noise_inet.std() > 0.3  # ImageNet-C sigma 0.38 (clipped at 0 and 1)
    buf = __import__("io").BytesIO()
    Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(buf, "JPEG", quality=40)
    expected = np.asarray(Image.open(buf)).transpose(2, 0, 1)
    assert np.array_equal(C.corrupt_image(img, "jpeg_compression", 5, "cifar-c", 0), expected)


def test_build_iterate_and_manifest(tmp_path):
    imgs = np.stack([make_image(3, 32, seed=i) for i in range(3)])
    labels = np.array([2, 0, 1])
    names, sev = ["glass_blur", "fog"], (1, 4)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    out = C.build_corruption_set(imgs, labels, tmp_path / "set", params="cifar-c", corruptions=names,
                                 severities=sev, seed=5, workers=0, progress=False, source="three test images")
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's global RNG is left alone
    man = C.load_corruption_set(out)
    assert man["params"] == "cifar-c" and man["seed"] == 5 and man["complete"]
    assert man["corruptions"] == ["glass_blur", "fog"] and man["severities"] == [1, 4]
    assert man["source"]["description"] == "three test images" and man["image_shape"] == [3, 32, 32]
    assert "imagecorruptions" in man["library"]
    seen = []
    for name, s, images, labs in C.iter_corruption_set(out):
        seen.append((name, s))
        assert images.dtype == torch.uint8 and labs.tolist() == [2, 0, 1]
        for i in range(3):
            ref = C.corrupt_image(imgs[i], name, s, "cifar-c", C.image_seed(5, name, s, i))
            assert np.array_equal(images[i].numpy(), ref)
    assert seen == [("glass_blur", 1), ("glass_blur", 4), ("fog", 1), ("fog", 4)]
    clean, labs = C.load_clean_set(out)
    assert np.array_equal(clean.numpy(), imgs)
    with pytest.raises(C.CorruptionSetError, match="other settings"):
        C.build_corruption_set(imgs, labels, out, params="cifar-c", corruptions=names, seed=6,
                               workers=0, progress=False)
    (out / C.part_file("fog", 4)).write_bytes(b"damaged")
    with pytest.raises(C.CorruptionSetError, match="checksum"):
        list(C.iter_corruption_set(out))


def test_interrupted_build_resumes_without_recomputing(tmp_path, monkeypatch):
    imgs = np.stack([make_image(1, 28, seed=i) for i in range(2)])
    labels = np.array([0, 1])
    names = ["gaussian_noise", "contrast", "pixelate"]
    real = C._corrupt_chunk
    calls = []

    def interrupted(images, start, corruption, severity, params, seed):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append((corruption, severity))
        return real(images, start, corruption, severity, params, seed)

    monkeypatch.setattr(C, "_corrupt_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.build_corruption_set(imgs, labels, tmp_path / "a", corruptions=names, severities=(1, 2),
                               workers=0, progress=False)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert not man["complete"]
    finished = {(c, int(s)) for c, v in man["parts"].items() for s in v}
    assert finished == set(calls)  # one chunk per part here: every call finished its part
    mtimes = {p: os.stat(tmp_path / "a" / C.part_file(*p)).st_mtime_ns for p in finished}

    calls.clear()
    monkeypatch.setattr(C, "_corrupt_chunk", lambda *a: calls.append((a[2], a[3])) or real(*a))
    C.build_corruption_set(imgs, labels, tmp_path / "a", corruptions=names, severities=(1, 2),
                           workers=0, progress=False)
    assert set(calls) == {(c, s) for c in names for s in (1, 2)} - finished
    assert all(os.stat(tmp_path / "a" / C.part_file(*p)).st_mtime_ns == t for p, t in mtimes.items())

    # A damaged finished part is rebuilt; nothing else is.
    (tmp_path / "a" / C.part_file("contrast", 2)).write_bytes(b"x")
    calls.clear()
    C.build_corruption_set(imgs, labels, tmp_path / "a", corruptions=names, severities=(1, 2),
                           workers=0, progress=False)
    assert calls == [("contrast", 2)]

    monkeypatch.setattr(C, "_corrupt_chunk", real)
    C.build_corruption_set(imgs, labels, tmp_path / "b", corruptions=names, severities=(1, 2),
                           workers=0, progress=False)
    a, b = list(C.iter_corruption_set(tmp_path / "a")), list(C.iter_corruption_set(tmp_path / "b"))
    assert [(x[0], x[1]) for x in a] == [(x[0], x[1]) for x in b]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a, b))
    assert C.load_corruption_set(tmp_path / "a")["complete"]


def test_worker_processes_give_the_serial_result(tmp_path):
    imgs = np.stack([make_image(3, 32, seed=i) for i in range(3)])
    kw = {"params": "imagenet-c", "corruptions": ["glass_blur", "impulse_noise"], "severities": (2,), "seed": 1,
          "progress": False}
    C.build_corruption_set(imgs, np.arange(3), tmp_path / "serial", workers=0, **kw)
    C.build_corruption_set(imgs, np.arange(3), tmp_path / "pool", workers=2, **kw)
    for x, y in zip(C.iter_corruption_set(tmp_path / "serial"), C.iter_corruption_set(tmp_path / "pool")):
        assert x[:2] == y[:2] and torch.equal(x[2], y[2])


def test_bad_inputs_raise_one_line_errors(tmp_path):
    img = make_image(3, 32)
    with pytest.raises(C.CorruptionSetError, match="unknown corruption"):
        C.corrupt_image(img, "rain", 1)
    with pytest.raises(C.CorruptionSetError, match="severity"):
        C.corrupt_image(img, "fog", 6)
    with pytest.raises(C.CorruptionSetError, match="parameter set"):
        C.corrupt_image(img, "fog", 1, params="tiny-c")
    with pytest.raises(C.CorruptionSetError, match="uint8"):
        C.corrupt_image(img.astype(np.float32), "fog", 1)
    with pytest.raises(C.CorruptionSetError, match="C = 1 or 3"):
        C.build_corruption_set(np.zeros((2, 4, 32, 32), np.uint8), [0, 1], tmp_path, progress=False)
    with pytest.raises(C.CorruptionSetError, match="labels"):
        C.build_corruption_set(img[None], [0, 1], tmp_path, progress=False)
    with pytest.raises(C.CorruptionSetError, match="no manifest"):
        C.load_corruption_set(tmp_path)


def test_contact_sheet_grid(tmp_path):
    img = make_image(1, 28)
    path = C.contact_sheet(img, tmp_path / "sheet.png", params="cifar-c", corruptions=["fog", "snow"],
                           severities=(1, 3, 5))
    with Image.open(path) as im:
        assert im.size == (round(1.3 * 4 * 100), round(1.3 * 2 * 100))  # (1 clean + 3 severities) x 2 rows


def test_cifar_c_table_lengths():
    for name in cifar_c.CORRUPTIONS:
        assert name in C.ALL_CORRUPTIONS
    for table in (cifar_c.GAUSSIAN_NOISE, cifar_c.SNOW, cifar_c.SPATTER, cifar_c.ELASTIC, cifar_c.FROST):
        assert len(table) == 5


def test_cifar_c_constants_are_the_published_ones():
    # Every constant of Hendrycks & Dietterich's CIFAR-10-C generation script (make_cifar_c.py in
    # github.com/hendrycks/robustness, ImageNet-C/create_c), written out here from that script.
    published = {
        "GAUSSIAN_NOISE": [0.04, 0.06, .08, .09, .10],
        "SHOT_NOISE": [500, 250, 100, 75, 50],
        "IMPULSE_NOISE": [.01, .02, .03, .05, .07],
        "SPECKLE_NOISE": [.06, .1, .12, .16, .2],
        "GAUSSIAN_BLUR": [.4, .6, 0.7, .8, 1],
        "GLASS_BLUR": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "DEFOCUS_BLUR": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "MOTION_BLUR": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "FOG": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "FROST": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        "SNOW": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                 (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                 (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        "SPATTER": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                    (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
        "CONTRAST": [.75, .5, .4, .3, 0.15],
        "BRIGHTNESS": [.05, .1, .15, .2, .3],
        "SATURATE": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "JPEG_QUALITY": [80, 65, 58, 50, 40],
        "PIXELATE": [0.95, 0.9, 0.85, 0.75, 0.65],
        # the script writes IMSIZE * fraction with IMSIZE = 32; the module keeps the fractions
        "ELASTIC": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    }
    for name, values in published.items():
        table = getattr(cifar_c, name)
        assert len(table) == 5, name
        for severity, (got, want) in enumerate(zip(table, values), start=1):
            got_t = tuple(got) if isinstance(got, tuple) else (got,)
            want_t = tuple(want) if isinstance(want, tuple) else (want,)
            assert len(got_t) == len(want_t) and all(g == w for g, w in zip(got_t, want_t)), (name, severity)
    # zoom blur: np.arange(1, top, 0.01) with tops 1.06 ... 1.26
    assert tuple(cifar_c.ZOOM_BLUR_MAX) == (1.06, 1.11, 1.16, 1.21, 1.26)
    # frost: one of the first five textures (np.random.randint(5)), shrunk to 0.2 at 32 px
    assert cifar_c.FROST_FILES == ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
    assert cifar_c.CIFAR_SIDE == 32 and cifar_c.FROST_SCALE == 0.2
    # nothing left unchecked: every table of the module is one of those above
    tables = {n for n, v in vars(cifar_c).items() if n.isupper() and isinstance(v, tuple) and len(v) == 5}
    assert tables == set(published) | {"ZOOM_BLUR_MAX", "FROST_FILES"}
