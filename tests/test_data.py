"""Tests of the data layer: splits, sources, the tensor cache, batched augmentation and loaders."""
from __future__ import annotations

import os
import pickle
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from PIL import Image

import vitsam.data.decode as decode_mod
from vitsam.data import (
    DataConfig, DataError, ImageFiles, ImageTensors, build_data, channel_stats, epoch_generator,
    eval_batches, normalise, resolve_cache_dir, steps_per_epoch, stratified_fraction, stratified_split,
    train_batches,
)
from vitsam.data import augment
from vitsam.data.augment import (RANDAUG_BINS, RANDAUG_MAGNITUDE, RANDAUG_OP_NAMES,
                                  RANDAUG_OPS, hflip_where, mixup, pad_crop, rand_augment,
                                  randaug_magnitude)
from vitsam.data.sources import find_shared_cifar10, mnist5k


# ------------------------------------------------------------------ helpers and fixtures
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def mnist(cache_dir):
    return build_data(DataConfig(source="mnist5k", cache_dir=str(cache_dir)))


@pytest.fixture(scope="module")
def digits(cache_dir):
    return build_data(DataConfig(source="digits", cache_dir=str(cache_dir), augment="basic"))


def _rng_state() -> torch.Tensor:
    return torch.random.get_rng_state().clone()


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_folder(root: Path, counts: dict[str, tuple[int, int]], size: int = 8, seed: int = 0) -> dict:
    """Write PNG images root/{train,val}/<class>/<i>.png; return {path: array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls, (n_train, n_val) in counts.items():
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                p = root / split / cls / f"{i:03d}.png"
                _write_png(p, arr)
                written[p] = arr
    return written


def _write_cifar10(root: Path, seed: int = 0) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Five 2-image training batches and a 3-image test batch in the official pickle layout."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 3, 2)]
        xs.append(x)
        ys += y
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"training", b"labels": y, b"data": x, b"filenames": [b"a", b"b"]}, f, 2)
    xt = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    yt = [2, 0, 1]
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing", b"labels": yt, b"data": xt}, f, 2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"cat", b"dog", b"emu"], b"num_vis": 3072}, f, 2)
    return np.concatenate(xs), ys, xt, yt


# ------------------------------------------------------------------ config
def test_config_rejects_bad_values_with_value_errors():
    for kwargs in ({"source": "mnist"}, {"augment": "heavy"}, {"train_fraction": 0.0},
                   {"train_fraction": 1.5}, {"img_size": 0}, {"workers": -1}):
        with pytest.raises(DataError) as info:
            DataConfig(**kwargs)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_cache_dir_env_var_only_replaces_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSAM_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"


# ------------------------------------------------------------------ splits
def test_mnist5k_split_is_stratified_4000_1000_and_seeded():
    _, labels, _ = mnist5k()
    labels = torch.from_numpy(labels)
    tr, te = stratified_split(labels, 1000, seed=0)
    assert len(tr) == 4000 and len(te) == 1000
    assert torch.equal(torch.sort(torch.cat([tr, te])).values, torch.arange(5000))
    assert torch.bincount(labels[te], minlength=10).tolist() == [100] * 10
    assert torch.bincount(labels[tr], minlength=10).tolist() == [400] * 10
    tr2, te2 = stratified_split(labels, 1000, seed=0)
    assert torch.equal(te, te2) and torch.equal(tr, tr2)
    assert not torch.equal(stratified_split(labels, 1000, seed=1)[1], te)


def test_mnist_bundle_uses_the_fixed_split(mnist):
    assert len(mnist.train) == 4000 and len(mnist.test) == 1000
    assert mnist.train.images.shape == (4000, 1, 28, 28) and mnist.train.images.dtype == torch.uint8
    assert torch.bincount(mnist.test.labels).tolist() == [100] * 10
    assert (mnist.in_chans, mnist.native_size, mnist.img_size, mnist.num_classes) == (1, 28, 28, 10)
    assert isinstance(mnist.train, ImageTensors)
    with pytest.raises(DataError, match="uint8"):
        ImageTensors(mnist.train.images.float(), mnist.train.labels)
    assert mnist.hflip is False
    # the 4000 training images are exactly the rows selected by the fixed split
    images, labels, _ = mnist5k()
    tr, _ = stratified_split(torch.from_numpy(labels), 1000, seed=0)
    assert torch.equal(mnist.train.images, torch.from_numpy(images)[tr])


def test_split_total_is_exact_with_uneven_classes():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    # quotas 1.5, 0.9, 0.6 -> floors 1, 0, 0 -> two leftover slots go to classes 1 and 2
    _, te = stratified_split(labels, 3, seed=4)
    assert torch.bincount(labels[te], minlength=3).tolist() == [1, 1, 1]


def test_fraction_keeps_rounded_per_class_counts_and_is_seeded():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 5)[torch.randperm(22, generator=torch.Generator().manual_seed(3))]
    idx = stratified_fraction(labels, 0.5, seed=7)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [5, 4, 3]  # 3.5 and 2.5 round up
    assert torch.equal(idx, stratified_fraction(labels, 0.5, seed=7))
    assert not torch.equal(idx, stratified_fraction(labels, 0.5, seed=8))
    assert len(torch.unique(idx)) == len(idx)
    with pytest.raises(DataError):
        stratified_fraction(labels, 0.0, seed=0)


def test_fraction_counts_are_the_exact_decimal_products():
    """Class c has c + 1 images; every fraction 0.01..0.99 keeps round-half-up(f x n_c) of each,
    computed in decimal (0.35 x 90 = 31.5 -> 32; the float product 31.499999999999996 gave 31)."""
    sizes = torch.arange(1, 121)
    labels = torch.repeat_interleave(torch.arange(120), sizes)
    assert torch.bincount(labels[stratified_fraction(labels, 0.35, seed=0)])[89] == 32
    for f in [i / 100 for i in range(1, 100)]:
        got = torch.bincount(labels[stratified_fraction(labels, f, seed=0)], minlength=120)
        want = [int((Decimal(str(f)) * n).to_integral_value(ROUND_HALF_UP)) for n in sizes.tolist()]
        assert got.tolist() == want, f


def test_bundle_fraction_subset(cache_dir, mnist):
    quarter = build_data(DataConfig(source="mnist5k", cache_dir=str(cache_dir), train_fraction=0.25, seed=3))
    assert torch.bincount(quarter.train.labels).tolist() == [100] * 10
    again = build_data(DataConfig(source="mnist5k", cache_dir=str(cache_dir), train_fraction=0.25, seed=3))
    assert torch.equal(quarter.train.images, again.train.images)
    assert torch.equal(quarter.test.images, mnist.test.images)  # the test set never shrinks


# ------------------------------------------------------------------ augmentation kernels
def test_pad_crop_matches_hand_built_crops():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 2, 5, 6), dtype=torch.uint8)
    pad = 2
    offsets = torch.tensor([[0, 0], [2, 2], [4, 1]])
    out = pad_crop(x, offsets, pad)
    padded = torch.zeros(3, 2, 9, 10, dtype=torch.uint8)
    padded[:, :, 2:7, 2:8] = x
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, top:top + 5, left:left + 6])
    assert torch.equal(out[1], x[1])  # offset (pad, pad) is the identity
    assert out[0, :, :2, :].sum() == 0 and out[0, :, :, :2].sum() == 0  # zero border came in
    with pytest.raises(DataError):
        pad_crop(x, torch.tensor([[0, 0], [5, 0], [0, 0]]), pad)


def test_hflip_where_flips_only_selected_images():
    x = torch.arange(2 * 1 * 2 * 3).view(2, 1, 2, 3)
    out = hflip_where(x, torch.tensor([True, False]))
    assert out[0].tolist() == [[[2, 1, 0], [5, 4, 3]]]
    assert torch.equal(out[1], x[1])


def test_rand_augment_is_per_image_seeded_and_keeps_global_rng():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).repeat(8, 1, 1, 1)
    before = _rng_state()
    a = rand_augment(img, seed=11)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, rand_augment(img, seed=11))
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 8))  # not one op for the whole batch
    grey = rand_augment(torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8), seed=2)
    assert grey.shape == (4, 1, 12, 12) and grey.dtype == torch.uint8


def _torchvision_op(img, op, m):
    """torchvision's own RandAugment op on one image (its private dispatcher: the reference)."""
    ra = v2.RandAugment()
    return ra._apply_image_or_video_transform(img, op, m, interpolation=ra.interpolation,
                                              fill=ra._fill)


@pytest.mark.parametrize("hw", [(32, 32), (12, 20)])
def test_randaug_magnitudes_are_torchvisions(hw):
    h, w = hw
    for op in RANDAUG_OP_NAMES:
        fn, signed = v2.RandAugment._AUGMENTATION_SPACE[op]
        assert signed == (op in augment._SIGNED), op
        for mag in (0, 9, 15, 30):
            table = fn(RANDAUG_BINS, h, w)
            want = 0.0 if table is None else float(table[mag])
            assert randaug_magnitude(op, mag, h, w) == pytest.approx(want, abs=1e-6), (op, mag)


def test_each_batched_randaug_op_equals_torchvision_image_by_image():
    torch.manual_seed(3)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    for op in RANDAUG_OP_NAMES:
        for sign in ((1, -1) if op in augment._SIGNED else (1,)):
            m = sign * randaug_magnitude(op, RANDAUG_MAGNITUDE, 32, 32)
            got = augment.randaug_op(x, op, m)
            want = torch.stack([_torchvision_op(img, op, m) for img in x])
            assert torch.equal(got, want), (op, sign)


def test_rand_augment_gives_each_image_its_own_draws():
    """Image i gets ops which[r][i] with signs negative[r][i] of the documented draws, applied
    one image at a time by torchvision: the batched grouping changes nothing."""
    torch.manual_seed(4)
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    got = rand_augment(x, seed=21)
    gen = torch.Generator().manual_seed(21)
    draws = [(torch.randint(len(RANDAUG_OP_NAMES), (64,), generator=gen),
              torch.rand(64, generator=gen) <= 0.5) for _ in range(RANDAUG_OPS)]
    assert len({int(k) for which, _ in draws for k in which}) == len(RANDAUG_OP_NAMES)
    for i in range(64):
        img = x[i]
        for which, negative in draws:
            op = RANDAUG_OP_NAMES[int(which[i])]
            m = randaug_magnitude(op, RANDAUG_MAGNITUDE, 16, 16)
            img = _torchvision_op(img, op, -m if op in augment._SIGNED and negative[i] else m)
        assert torch.equal(got[i], img), i


def test_mixup_is_a_convex_pair_with_targets_summing_to_one():
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 3, 3), torch.arange(4)
    xm, ym = mixup(x, y, num_classes=4, seed=5)
    assert torch.allclose(ym.sum(1), torch.ones(4))
    lam = float(ym[0, 0])  # image 0 mixes itself (weight lam) with image 3 (the batch rolled by one)
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(ym[0, 3], torch.tensor(1 - lam))
    assert torch.allclose(xm, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)


# ------------------------------------------------------------------ train / eval batches
def test_train_batches_reproducible_per_epoch_and_global_rng_untouched(digits):
    before = _rng_state()
    a = list(train_batches(digits, 64, epoch=2, seed=1, augment="strong"))
    b = list(train_batches(digits, 64, epoch=2, seed=1, augment="strong"))
    c = list(train_batches(digits, 64, epoch=3, seed=1, augment="strong"))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert len(a) == steps_per_epoch(digits, 64) == len(digits.train) // 64
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    x, y = a[0]
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64, 10) and torch.allclose(y.sum(1), torch.ones(64))
    tail = list(train_batches(digits, 64, epoch=2, seed=1, augment="strong", start_batch=5))
    assert len(tail) == len(a) - 5
    assert all(torch.equal(xt, xa) and torch.equal(yt, ya) for (xt, yt), (xa, ya) in zip(tail, a[5:]))


def test_train_batches_without_augmentation_cover_the_epoch_once(digits):
    xs, ys = zip(*train_batches(digits, 100, epoch=0, seed=0, augment="none", drop_last=False))
    assert sum(len(y) for y in ys) == len(digits.train)
    perm = torch.randperm(len(digits.train), generator=epoch_generator(0, 0))
    assert torch.equal(torch.cat(ys), digits.train.labels[perm])
    expect = normalise(digits.train.images[perm[:100]], digits.mean, digits.std, 8)
    assert torch.allclose(xs[0], expect)


def test_basic_augmentation_of_digits_is_a_pad_crop_without_flip(digits):
    assert digits.hflip is False
    x, _ = next(iter(train_batches(digits, 32, epoch=0, seed=9)))
    perm = torch.randperm(len(digits.train), generator=epoch_generator(9, 0))
    src = digits.train.images[perm[:32]]
    std = torch.tensor(digits.std).view(1, -1, 1, 1)
    mean = torch.tensor(digits.mean).view(1, -1, 1, 1)
    pixels = torch.round((x * std + mean) * 255).to(torch.uint8)
    offsets = [(t, l) for t in range(3) for l in range(3)]  # pad = 8 px / 8 = 1
    n_shifted = 0
    for i in range(32):
        crops = [pad_crop(src[i:i + 1], torch.tensor([o]), 1)[0] for o in offsets]
        hits = [o for o, c in zip(offsets, crops) if torch.equal(c, pixels[i])]
        assert hits, f"image {i} is not a pad-crop of its source"
        n_shifted += (1, 1) not in hits
    assert n_shifted > 0


def test_eval_batches_normalise_with_training_stats(mnist):
    x = torch.cat([xb for xb, _ in eval_batches(mnist.train, 1000, mnist.mean, mnist.std, 28)])
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    first, y = next(iter(eval_batches(mnist.test, 7, mnist.mean, mnist.std, 28)))
    manual = (mnist.test.images[:7].double() / 255 - mnist.mean[0]) / mnist.std[0]
    assert torch.allclose(first.double(), manual, atol=1e-5) and torch.equal(y, mnist.test.labels[:7])
    up, _ = next(iter(eval_batches(mnist.test, 5, mnist.mean, mnist.std, 32)))
    assert up.shape == (5, 1, 32, 32)


def test_channel_stats_match_direct_computation():
    torch.manual_seed(1)
    x = torch.randint(0, 256, (6, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert np.allclose(mean, ref.mean(1).numpy()) and np.allclose(std, ref.std(1, unbiased=False).numpy())


def test_steps_per_epoch_and_oversized_batch(digits):
    n = len(digits.train)
    assert steps_per_epoch(digits, 100) == n // 100
    assert steps_per_epoch(digits, 100, drop_last=False) == -(-n // 100)
    with pytest.raises(DataError, match="batch_size"):
        steps_per_epoch(digits, n + 1)


# ------------------------------------------------------------------ ImageFolder and the cache
def test_imagefolder_loads_png_and_jpeg(tmp_path):
    written = _make_folder(tmp_path / "data", {"cat": (3, 1), "dog": (2, 1)})
    jpg = tmp_path / "data" / "train" / "dog" / "zz.jpg"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(jpg, quality=95)
    b = build_data(DataConfig(source="imagefolder", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "c")))
    assert b.classes == ["cat", "dog"] and b.train.images.shape == (6, 3, 8, 8)
    assert b.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and b.test.labels.tolist() == [0, 1]
    first = written[tmp_path / "data" / "train" / "cat" / "000.png"]
    assert torch.equal(b.train.images[0], torch.from_numpy(first).permute(2, 0, 1))
    assert (b.train.images[5].int() - 200).abs().max() <= 3  # the lossy JPEG of a flat grey
    assert b.hflip is True and b.in_chans == 3 and b.img_size == 8


def test_corrupt_jpeg_names_the_file_in_one_line(tmp_path):
    _make_folder(tmp_path / "data", {"a": (2, 1), "b": (2, 1)})
    bad = tmp_path / "data" / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError) as info:
        build_data(DataConfig(source="imagefolder", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "c")))
    msg = str(info.value)
    assert f"in {tmp_path / 'data'}: train/b/broken.jpg" in msg and "remove or replace" in msg
    assert "\n" not in msg and info.value.__cause__ is None and info.value.__suppress_context__


def test_folder_layout_errors(tmp_path):
    cfg = lambda root, **kw: DataConfig(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "c"), **kw)  # noqa: E731
    with pytest.raises(DataError, match="does not exist"):
        build_data(cfg(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="set data.root"):
        build_data(DataConfig(source="imagefolder"))
    _make_folder(tmp_path / "mis", {"a": (1, 1), "b": (1, 0)})
    (tmp_path / "mis" / "val" / "c").mkdir()
    with pytest.raises(DataError, match="only in train: b; only in val: c"):
        build_data(cfg(tmp_path / "mis"))
    _make_folder(tmp_path / "empty", {"a": (1, 1), "b": (1, 1)})
    (tmp_path / "empty" / "train" / "c").mkdir()
    (tmp_path / "empty" / "val" / "c").mkdir()
    with pytest.raises(DataError, match="2 class folders have no images .*empty/train/c, .*empty/val/c"):
        build_data(cfg(tmp_path / "empty"))
    with pytest.raises(DataError, match="no 'test' folder"):
        build_data(cfg(tmp_path / "empty", val_split="test"))


def test_cache_is_reused_and_invalidated_on_change(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _make_folder(root, {"a": (2, 1), "b": (2, 1)})
    cfg = DataConfig(source="imagefolder", root=str(root), cache_dir=str(tmp_path / "c"))
    first = build_data(cfg)
    real = decode_mod.decode_image

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decode_mod, "decode_image", refuse)
    again = build_data(cfg)  # served from the cache, no decoding
    assert torch.equal(first.train.images, again.train.images)
    changed = root / "train" / "a" / "000.png"
    _write_png(changed, np.zeros((8, 8, 3), np.uint8))
    os.utime(changed, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        build_data(cfg)
    monkeypatch.setattr(decode_mod, "decode_image", real)
    fresh = build_data(cfg)
    assert fresh.train.images[0].sum() == 0 and not torch.equal(fresh.train.images, first.train.images)


def test_large_images_load_lazily_and_reproducibly(tmp_path):
    _make_folder(tmp_path / "big", {"a": (3, 2), "b": (3, 1)}, size=80)
    bad = tmp_path / "big" / "val" / "b" / "zz.jpg"
    b = build_data(DataConfig(source="imagefolder", root=str(tmp_path / "big"), img_size=32, workers=0,
                              cache_dir=str(tmp_path / "c"), augment="strong"))
    assert isinstance(b.train, ImageFiles) and len(b.train) == 6 and b.native_size == 80
    before = _rng_state()
    (x1, y1), = list(train_batches(b, 6, epoch=0, seed=0))
    (x2, y2), = list(train_batches(b, 6, epoch=0, seed=0))
    (x3, _), = list(train_batches(b, 6, epoch=1, seed=0))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert x1.shape == (6, 3, 32, 32) and y1.shape == (6, 2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    xe, ye = next(iter(eval_batches(b.test, 8, b.mean, b.std, 32)))
    assert xe.shape == (3, 3, 32, 32) and ye.tolist() == [0, 0, 1]
    bad.write_bytes(b"garbage")
    b.test.paths.append(str(bad))
    b.test.labels = torch.cat([b.test.labels, torch.tensor([1])])
    with pytest.raises(DataError) as info:
        list(eval_batches(b.test, 8, b.mean, b.std, 32))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ CIFAR pickles
def test_cifar10_pickles_load_in_the_official_layout(tmp_path, monkeypatch):
    xtr, ytr, xte, yte = _write_cifar10(tmp_path / "cifar-10-batches-py")
    cfg = DataConfig(source="cifar10", root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    b = build_data(cfg)
    assert b.classes == ["cat", "dog", "emu"] and b.train.images.shape == (10, 3, 32, 32)
    assert b.train.labels.tolist() == ytr and b.test.labels.tolist() == yte
    assert torch.equal(b.train.images[3, 1], torch.from_numpy(xtr[3, 1024:2048].reshape(32, 32)))  # green plane
    monkeypatch.setattr("vitsam.data.sources.read_cifar_pickles", lambda *a: (_ for _ in ()).throw(AssertionError("reread")))
    assert torch.equal(build_data(cfg).test.images, b.test.images)  # cached
    _write_cifar10(tmp_path / "cifar-10-batches-py", seed=1)
    with pytest.raises(AssertionError, match="reread"):
        build_data(cfg)  # new bytes -> new key


def test_cifar100_pickles_use_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        with open(root / split, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}, f, 2)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"apple", b"bee", b"cup", b"dune"], b"coarse_label_names": [b"x"]}, f, 2)
    b = build_data(DataConfig(source="cifar100", root=str(root), cache_dir=str(tmp_path / "c")))
    assert b.classes == ["apple", "bee", "cup", "dune"] and b.train.labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="no cifar100 python-pickle files"):
        build_data(DataConfig(source="cifar100", root=str(tmp_path / "c"), cache_dir=str(tmp_path / "c")))


# ------------------------------------------------------------------ shared CIFAR-10 JPEG tarball
def test_tarball_is_unpacked_once_into_the_cache(tmp_path, monkeypatch):
    import tarfile

    src = tmp_path / "src"
    written = _make_folder(src / "cifar10", {"cat": (2, 1), "dog": (1, 1)})
    (src / "cifar10" / "test").mkdir()
    for p in list((src / "cifar10" / "val").rglob("*.png")):  # the tarball names its split "test"
        dest = src / "cifar10" / "test" / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        p.rename(dest)
    tarball = tmp_path / "tiny.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(src / "cifar10", arcname="cifar10")
    cfg = DataConfig(source="cifar10-shared", root=str(tarball), cache_dir=str(tmp_path / "c"))
    b = build_data(cfg)
    assert b.classes == ["cat", "dog"] and b.train.labels.tolist() == [0, 0, 1] and len(b.test) == 2
    first = written[src / "cifar10" / "train" / "cat" / "000.png"]
    assert torch.equal(b.train.images[0], torch.from_numpy(first).permute(2, 0, 1))
    assert len(list((tmp_path / "c").glob("cifar10-jpeg-*/cifar10/train/dog/*.png"))) == 1
    monkeypatch.setattr(decode_mod, "decode_image", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    assert torch.equal(build_data(cfg).test.images, b.test.images)
    with pytest.raises(DataError, match="does not exist"):
        build_data(DataConfig(source="cifar10-shared", root=str(tmp_path / "none.tar.gz")))


def _shared_tarball() -> Path | None:
    try:
        return find_shared_cifar10()
    except DataError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_shared_tarball() is None, reason="../shared/data/cifar10-jpeg.tar.gz is not available")
def test_shared_cifar10_tarball():
    b = build_data(DataConfig(source="cifar10-shared"))  # unpacked and decoded once into the user cache
    assert b.train.images.shape == (50000, 3, 32, 32) and b.test.images.shape == (10000, 3, 32, 32)
    assert b.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(b.train.labels).tolist() == [5000] * 10
    assert torch.bincount(b.test.labels).tolist() == [1000] * 10
    assert np.allclose(b.mean, (0.491, 0.482, 0.447), atol=0.01)  # the well-known CIFAR-10 channel means
    x, y = next(iter(train_batches(b, 256, epoch=0, seed=0)))
    assert x.shape == (256, 3, 32, 32) and y.shape == (256,)


# ------------------------------------------------------------------ 16-bit greyscale, shared-data lookup
def test_16_bit_and_float_greyscale_are_rescaled_not_clipped(tmp_path):
    from vitsam.data.decode import load_pil
    from vitsam.eval.shifts import decode_for_eval

    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)  # 0..65520, the whole 16-bit range
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    Image.fromarray(ramp).save(tmp_path / "ramp16.tif")
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "ramp32.tif")  # mode I
    Image.fromarray(ramp.astype(np.float32) / 65535).save(tmp_path / "unit.tif")  # mode F, 0-1
    Image.fromarray(ramp.astype(np.float32) / 257).save(tmp_path / "f255.tif")  # mode F, 0-255
    expect = np.floor(ramp.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)  # 0..255 ramp
    assert expect.min() == 0 and expect.max() == 255 and len(np.unique(expect)) == 256
    for name in ("ramp16.png", "ramp16.tif", "ramp32.tif", "unit.tif", "f255.tif"):
        got = np.asarray(load_pil(tmp_path / name, "L"))
        assert np.array_equal(got, expect), name
        assert np.array_equal(decode_for_eval(tmp_path / name, 64, in_chans=1)[0], expect), name
        assert np.array_equal(np.asarray(load_pil(tmp_path / name, "RGB")), np.stack([expect] * 3, -1)), name
    # and through a data set held in memory (the decode cache)
    for split in ("train", "val"):
        (tmp_path / "d" / split / "a").mkdir(parents=True)
        Image.fromarray(ramp[:32, :32]).save(tmp_path / "d" / split / "a" / "x.png")
    b = build_data(DataConfig(source="imagefolder", root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c")))
    assert np.array_equal(b.test.images[0, 0].numpy(), expect[:32, :32]) and b.test.ids == ["a/x.png"]


def test_shared_data_is_found_through_the_environment_not_a_fixed_folder(tmp_path, monkeypatch):
    import vitsam.data.sources as src

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(src, "_REPO_ROOT", tmp_path / "checkout")  # no ../shared next to either
    monkeypatch.delenv("VITSAM_DATA", raising=False)
    with pytest.raises(DataError) as info:
        find_shared_cifar10()
    msg = str(info.value)
    assert "VITSAM_DATA" in msg and "data.root" in msg and "\n" not in msg and "/work" not in msg
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "cifar10-jpeg.tar.gz").write_bytes(b"")
    monkeypatch.setenv("VITSAM_DATA", str(tmp_path / "mine"))
    assert find_shared_cifar10() == tmp_path / "mine" / "cifar10-jpeg.tar.gz"
    assert find_shared_cifar10(str(tmp_path / "mine")) == tmp_path / "mine"  # an explicit root comes first
