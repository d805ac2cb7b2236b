"""Bad and unusual image folders: every bad file named in one go (``data.bad_files``), and each
kind of odd file decoded as a viewer shows it or rejected in one line naming it and the fix.

References are computed independently of vitsam's decoder: numpy rotations of Pillow's raw
decode, Pillow's own CMYK conversion, palette look-ups and the alpha-over-white formula in numpy.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitsam.data import DataConfig, DataError, ImageFiles, build_data, eval_batches, save_data_record
from vitsam.data.decode import load_pil, probe_image

RNG = np.random.default_rng(0)


def _png(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _folder(root: Path, classes: str = "ab", n: int = 2, side: int = 8, mode: str = "RGB") -> None:
    """root/{train,val}/<class>/<i>.png of random pixels."""
    shape = (side, side, 3) if mode == "RGB" else (side, side)
    for split in ("train", "val"):
        for c in classes:
            for i in range(n):
                _png(root / split / c / f"{i}.png", RNG.integers(0, 256, shape, dtype=np.uint8))


def _build(root: Path, tmp: Path, **kw):
    return build_data(DataConfig(source="imagefolder", root=str(root), cache_dir=str(tmp / "cache"), **kw))


def _jpeg_bytes(side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _image_of(bundle, rel: str, split: str = "test") -> np.ndarray:
    """The stored (H, W, C) pixels of the test image with id ``rel``."""
    data = bundle.test if split == "test" else bundle.train
    i = data.ids.index(rel)
    return data.images[i].permute(1, 2, 0).numpy()


# ------------------------------------------------------------------ every bad file at once
def _broken_tree(root: Path) -> list[str]:
    _folder(root)
    (root / "train" / "a" / "zero.jpg").write_bytes(b"")
    (root / "train" / "b" / "trunc.jpg").write_bytes(_jpeg_bytes(64)[:-400])  # header intact
    (root / "val" / "a" / "text.png").write_text("not an image")
    os.symlink(root / "nowhere.png", root / "val" / "b" / "gone.png")
    return ["train/a/zero.jpg", "train/b/trunc.jpg", "val/a/text.png", "val/b/gone.png"]


def test_every_bad_file_is_named_in_one_error_with_the_full_list_in_a_file(tmp_path):
    bad = _broken_tree(tmp_path / "d")
    with pytest.raises(DataError) as info:
        _build(tmp_path / "d", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"cannot decode 4 of 12 image files in {tmp_path / 'd'}: ")
    assert "train/a/zero.jpg (empty file (0 bytes))" in msg and "train/b/trunc.jpg (image file is truncated" in msg
    assert "val/a/text.png (cannot identify image file)" in msg and "and 1 more" in msg
    assert "data.bad_files=skip" in msg and "remove or replace the files" in msg
    listed = Path(msg.split("full list in ")[1].split(";")[0])
    rows = [line.split("\t") for line in listed.read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == bad
    assert rows[3][1] == f"broken symbolic link to {tmp_path / 'd' / 'nowhere.png'}"


def test_skip_leaves_the_bad_files_out_and_the_run_folder_lists_them(tmp_path, capsys):
    bad = _broken_tree(tmp_path / "d")
    b = _build(tmp_path / "d", tmp_path, bad_files="skip")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitsam: warning: data.bad_files=skip leaves out the 4 of 12")
    assert len(b.train) == 4 and len(b.test) == 4 and b.test.ids == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    assert b.train.labels.tolist() == [0, 0, 1, 1] and [p for p, _ in b.skipped] == bad
    assert "4 unreadable files left out" in b.description
    run = tmp_path / "run"
    run.mkdir()
    save_data_record(run, b)
    assert json.loads((run / "data.json").read_text())["skipped_files"] == 4
    lines = (run / "bad_files.txt").read_text().splitlines()
    assert len(lines) == 5 and [ln.split("\t")[0] for ln in lines[1:]] == bad
    # served from the cache the second time: same outcome, no decoding
    again = _build(tmp_path / "d", tmp_path, bad_files="skip")
    assert torch.equal(again.train.images, b.train.images) and again.skipped == b.skipped


def test_skip_that_empties_a_class_is_an_error(tmp_path):
    _folder(tmp_path / "d", n=1)
    (tmp_path / "d" / "train" / "b" / "0.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"class\(es\) b have no readable images left in the train split"):
        _build(tmp_path / "d", tmp_path, bad_files="skip")


def test_large_images_are_checked_in_full_before_training(tmp_path):
    _folder(tmp_path / "d", side=80)
    (tmp_path / "d" / "train" / "a" / "trunc.jpg").write_bytes(_jpeg_bytes(200)[:2000])
    with pytest.raises(DataError, match=r"cannot decode 1 of 9 image files .*train/a/trunc.jpg \(image file is truncated"):
        _build(tmp_path / "d", tmp_path, workers=0)
    b = _build(tmp_path / "d", tmp_path, workers=0, bad_files="skip")
    assert isinstance(b.train, ImageFiles) and len(b.train) == 4
    assert not any(p.endswith("trunc.jpg") for p in b.train.paths)


def test_bad_files_setting_is_checked():
    with pytest.raises(DataError, match="bad_files must be one of error, skip"):
        DataConfig(bad_files="ignore")
    with pytest.raises(DataError, match="val_split '../x' must be the name of one folder"):
        DataConfig(val_split="../x")


# ------------------------------------------------------------------ kinds of image
def test_exif_orientation_is_applied(tmp_path):
    raw = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    # orientation -> what a viewer does to the stored pixels
    turn = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: np.swapaxes(a, 0, 1),
            6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(np.swapaxes(a, 0, 1), 2),
            8: lambda a: np.rot90(a, 1)}
    for k, f in turn.items():
        exif = Image.Exif()
        exif[0x0112] = k
        p = tmp_path / f"o{k}.jpg"
        Image.fromarray(raw).save(p, exif=exif, quality=95)
        stored = np.asarray(Image.open(p).convert("RGB"))  # Pillow ignores the tag
        got = np.asarray(load_pil(p, "RGB"))
        assert np.array_equal(got, f(stored)), k
        assert probe_image(p) == ("RGB", got.shape[:2]), k


def test_cmyk_palette_and_alpha_become_rgb_as_viewers_show_them(tmp_path):
    rgb = RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=95)
    assert np.array_equal(np.asarray(load_pil(tmp_path / "c.jpg", "RGB")),
                          np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")))
    # palette: the indices looked up in the palette; a transparent index shows white
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    pim = Image.fromarray(idx, mode="P")
    pim.putpalette(palette.reshape(-1).tolist())
    pim.save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(load_pil(tmp_path / "p.png", "RGB")), palette[idx])
    pim.save(tmp_path / "pt.png", transparency=int(idx[0, 0]))
    expect = palette[idx].copy()
    expect[idx == idx[0, 0]] = 255
    assert np.array_equal(np.asarray(load_pil(tmp_path / "pt.png", "RGB")), expect)
    # alpha: composited over white, round(a * rgb + (1 - a) * 255)
    rgba = RNG.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    _png(tmp_path / "a.png", rgba)
    a = rgba[..., 3:] / 255.0
    expect = np.floor(rgba[..., :3] * a + 255 * (1 - a) + 0.5).astype(np.uint8)
    got = np.asarray(load_pil(tmp_path / "a.png", "RGB"))
    assert np.array_equal(got, expect) and got[0, 0].tolist() == [255] * 3
    la = np.stack([rgba[..., 0], rgba[..., 3]], -1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert probe_image(tmp_path / "la.png")[0] == "L"
    g = la[..., 1:] / 255.0
    assert np.array_equal(np.asarray(load_pil(tmp_path / "la.png", "L")),
                          np.floor(la[..., 0] * g[..., 0] + 255 * (1 - g[..., 0]) + 0.5).astype(np.uint8))


def _png16_rgb(path: Path, arr: np.ndarray) -> None:
    """A 16-bit-per-sample RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_colour_png_keeps_the_high_byte(tmp_path):
    arr = RNG.integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    _png16_rgb(tmp_path / "c16.png", arr)
    assert np.array_equal(np.asarray(load_pil(tmp_path / "c16.png", "RGB")), (arr >> 8).astype(np.uint8))


def test_grey_and_colour_folders(tmp_path):
    _folder(tmp_path / "grey", mode="L")
    b = _build(tmp_path / "grey", tmp_path)
    assert b.in_chans == 1
    assert np.array_equal(_image_of(b, "a/0.png")[..., 0], np.asarray(Image.open(tmp_path / "grey/val/a/0.png")))
    # one colour image in the training split makes the folder RGB; grey images are replicated
    _folder(tmp_path / "mixed", mode="L")
    _png(tmp_path / "mixed" / "train" / "b" / "9.png", RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    m = _build(tmp_path / "mixed", tmp_path)
    grey = np.asarray(Image.open(tmp_path / "mixed/val/a/0.png"))
    assert m.in_chans == 3 and np.array_equal(_image_of(m, "a/0.png"), np.stack([grey] * 3, -1))


def test_images_of_other_sizes_are_fitted_to_the_most_common_size(tmp_path):
    _folder(tmp_path / "d", side=16)
    # the first file in listing order is small; the folder's size is still 16
    flat = np.full((4, 4, 3), 77, np.uint8)
    _png(tmp_path / "d" / "train" / "a" / "-small.png", flat)
    _png(tmp_path / "d" / "val" / "a" / "-small.png", flat)
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8)[None, :, None], (8, 1, 3))  # 8x8 ramp
    _png(tmp_path / "d" / "val" / "b" / "00-ramp.png", ramp)
    b = _build(tmp_path / "d", tmp_path)
    assert b.train.images.shape[1:] == (3, 16, 16) and b.native_size == 16
    assert (_image_of(b, "a/-small.png") == 77).all()  # upscaled, not padded or cropped
    ref = torch.nn.functional.interpolate(torch.from_numpy(ramp).permute(2, 0, 1)[None].float(), size=(16, 16),
                                          mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    assert (torch.from_numpy(_image_of(b, "b/00-ramp.png").astype(np.float32)) - ref).abs().max() <= 1
    # large images: an image smaller than the training size is scaled up by the evaluation view
    _folder(tmp_path / "big", side=80)
    _png(tmp_path / "big" / "val" / "a" / "-small.png", np.full((20, 30, 3), 200, np.uint8))
    lb = _build(tmp_path / "big", tmp_path, workers=0, img_size=64)
    small = lb.test.subset(torch.tensor([lb.test.ids.index("a/-small.png")]))
    x, _ = next(iter(eval_batches(small, 1, (0.0, 0.0, 0.0), (1 / 255,) * 3, 64)))
    assert x.shape == (1, 3, 64, 64) and (x == 200).all()


def test_empty_class_folders_are_all_named(tmp_path):
    _folder(tmp_path / "d")
    for split in ("train", "val"):
        (tmp_path / "d" / split / "c").mkdir()
        (tmp_path / "d" / split / "c" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        _build(tmp_path / "d", tmp_path)
    msg = str(info.value)
    assert msg.startswith("2 class folders have no images") and "\n" not in msg
    assert f"{tmp_path / 'd' / 'train' / 'c'}, {tmp_path / 'd' / 'val' / 'c'}" in msg
    assert "remove those classes from both splits" in msg


def test_stray_files_are_ignored_with_one_warning(tmp_path, capsys):
    _folder(tmp_path / "d")
    for name in ("train/a/notes.txt", "train/labels.csv", "train/a/.DS_Store", "val/b/Thumbs.db"):
        (tmp_path / "d" / name).write_text("x")
    (tmp_path / "d" / "train" / "a" / "sub").mkdir()
    _png(tmp_path / "d" / "train" / "a" / "sub" / "deep.png", RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    b = _build(tmp_path / "d", tmp_path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitsam: warning: ignored 2 files in ")
    assert "train/a/notes.txt" in err and "train/labels.csv" in err and "Thumbs" not in err
    assert len(b.train) == 5  # the image in a sub-folder counts, as in torchvision's ImageFolder


def test_train_and_val_with_other_classes_are_rejected(tmp_path):
    _folder(tmp_path / "d")
    (tmp_path / "d" / "val" / "b").rename(tmp_path / "d" / "val" / "c")
    with pytest.raises(DataError, match="only in train: b; only in val: c; make both splits hold the same"):
        _build(tmp_path / "d", tmp_path)


def test_symbolic_links_are_followed_once(tmp_path):
    _folder(tmp_path / "elsewhere", classes="x", n=1)
    _folder(tmp_path / "d")
    target = tmp_path / "elsewhere" / "val" / "x" / "0.png"
    os.symlink(target, tmp_path / "d" / "val" / "a" / "link.png")
    os.symlink(tmp_path / "d" / "train" / "a", tmp_path / "d" / "train" / "a" / "loop")  # a cycle
    os.symlink(tmp_path / "elsewhere" / "train" / "x", tmp_path / "d" / "train" / "c")  # a linked class
    os.symlink(tmp_path / "elsewhere" / "val" / "x", tmp_path / "d" / "val" / "c")
    b = _build(tmp_path / "d", tmp_path)
    assert b.classes == ["a", "b", "c"] and len(b.train) == 5 and len(b.test) == 6
    assert np.array_equal(_image_of(b, "a/link.png"), np.asarray(Image.open(target)))
    os.symlink(tmp_path / "missing", tmp_path / "d" / "train" / "z")
    with pytest.raises(DataError, match=r"train/z is a broken symbolic link .*; point it at the class folder or remove it"):
        _build(tmp_path / "d", tmp_path)


def test_cache_entries_are_safetensors_not_pickles(tmp_path):
    _folder(tmp_path / "d")
    _build(tmp_path / "d", tmp_path)
    # Beside each entry: the hidden lock file its build held (``vitsam.io.locked``).
    entries = [p for p in (tmp_path / "cache" / "tensors").iterdir() if not p.name.endswith(".lock")]
    assert entries and all(p.suffix == ".safetensors" for p in entries)
    head = entries[0].read_bytes()
    n = struct.unpack("<Q", head[:8])[0]
    meta = json.loads(head[8:8 + n])["__metadata__"]
    assert meta["format"] == "vitsam-cache/3" and json.loads(meta["values"])["classes"] == ["a", "b"]


def test_train_names_every_bad_file_then_skips_them_into_the_run_folder(tmp_path, capsys, monkeypatch):
    """The reported case: a zero-byte and a truncated JPEG are named together by one `vitsam
    train`, and `data.bad_files=skip` trains without them, listing them in the run folder."""
    from vitsam.cli import main

    monkeypatch.setenv("VITSAM_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "d", n=3, side=16)
    (tmp_path / "d" / "train" / "a" / "zero.jpg").write_bytes(b"")
    (tmp_path / "d" / "train" / "b" / "trunc.jpg").write_bytes(_jpeg_bytes(64)[:-400])
    argv = ["train", "--preset", "mnist-vit", "--smoke", "--quiet", "data.source=imagefolder",
            f"data.root={tmp_path / 'd'}", "data.img_size=28", "data.train_fraction=1", "train.batch_size=4"]
    assert main([*argv, "--run-dir", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot decode 2 of 14 image files" in err
    assert "train/a/zero.jpg" in err and "train/b/trunc.jpg" in err and not (tmp_path / "r1").exists()
    assert main([*argv, "--run-dir", str(tmp_path / "r2"), "data.bad_files=skip"]) == 0
    rec = json.loads((tmp_path / "r2" / "data.json").read_text())
    assert rec["skipped_files"] == 2 and rec["train_images"] == 6
    listed = (tmp_path / "r2" / "bad_files.txt").read_text().splitlines()[1:]
    assert [ln.split("\t")[0] for ln in listed] == ["train/a/zero.jpg", "train/b/trunc.jpg"]
