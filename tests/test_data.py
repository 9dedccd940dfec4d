"""sr_lib.data: image reading edge cases, writing, folders, and the training-pair dataset.

Every image is generated here and written to tmp_path; nothing is downloaded.
"""

import gc
import json
import multiprocessing
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import PIL
import png
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sr_lib import data
from sr_lib.data import (
    ImageError,
    PatchPairs,
    check_out_dir,
    check_out_file,
    demo_images,
    describe_path,
    dihedral,
    fit_name,
    links_said,
    list_images,
    load_pairs,
    mod_crop,
    read_ahead,
    read_image,
    read_planes,
    shell_quote,
    to_tensor,
    to_uint8,
    to_uint16,
    train_loader,
    write_png,
    write_text,
)
from sr_lib.errors import DataError, OutputError, UsageError
from sr_lib.resize import imresize

REPO = Path(__file__).resolve().parents[1]


def rand_img(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()


def smooth_img(h, w, seed=0):
    """Smooth random content: bicubic-upsampled noise, like a photo at low frequencies."""
    coarse = rand_img(h // 8 + 2, w // 8 + 2, seed=seed)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def write_png16(path, arr):
    """uint16 (H, W) or (H, W, C) -> 16-bit PNG with pypng (Pillow cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c] + ";16"
    png.from_array(arr.reshape(h, w * c), mode).save(str(path))


# ---------------------------------------------------------------------------------------------
# read_image


def test_read_rgb_and_gray(tmp_path):
    rgb, gray = rand_img(20, 30), rand_img(20, 30, c=1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    out = read_image(tmp_path / "rgb.png")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3) and np.array_equal(out, rgb)
    assert np.array_equal(read_image(tmp_path / "rgb.bmp"), rgb)
    g = read_image(str(tmp_path / "gray.png"))
    assert g.shape == (20, 30, 3) and all(np.array_equal(g[..., k], gray) for k in range(3))


def test_alpha_dropped_with_warning_naming_file(tmp_path):
    rgba, la = rand_img(8, 9, c=4), rand_img(8, 9, c=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    with pytest.warns(UserWarning, match="rgba.png: alpha channel dropped") as caught:
        out = read_image(tmp_path / "rgba.png")
    assert np.array_equal(out, rgba[..., :3])
    # a copy says it once: pickle (and pytest-xdist between its processes) rebuilds cls(*args)
    said = f"{tmp_path / 'rgba.png'}: alpha channel dropped (the image is read as RGB)"
    (warning,) = [w.message for w in caught]
    assert str(warning) == str(pickle.loads(pickle.dumps(warning))) == said
    with pytest.warns(UserWarning, match="la.png: alpha"):
        out = read_image(tmp_path / "la.png")
    assert np.array_equal(out, np.repeat(la[..., :1], 3, axis=2))


def test_corrupt_exif_is_one_warning_naming_the_file(tmp_path):
    """A JPEG whose EXIF directory is cut short (it counts 40 tags, holds 2): Pillow warned
    "Corrupt EXIF data.  Expecting to read 12 bytes but only got 4." at each open, twice a read
    and once more for its size, naming no file. Now one warning naming it, once a process; the
    tags read before the break still count (orientation 6: a quarter turn)."""
    exif = Image.Exif()
    exif[0x010E], exif[0x0112] = "a description", 6
    Image.fromarray(rand_img(16, 24)).save(tmp_path / "x.jpg", exif=exif.tobytes())
    raw = bytearray((tmp_path / "x.jpg").read_bytes())
    ifd = raw.index(b"MM\x00\x2a") + 8  # (Pillow writes big-endian EXIF, IFD0 right after)
    raw[ifd : ifd + 2] = struct.pack(">H", 40)
    (tmp_path / "x.jpg").write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_image(tmp_path / "x.jpg").shape == (24, 16, 3)
        assert data.image_size(tmp_path / "x.jpg") == (24, 16)
        assert read_planes(tmp_path / "x.jpg").rgb.shape == (24, 16, 3)
    (said,) = [str(w.message) for w in caught]  # (how many bytes are left: Pillow's padding)
    assert re.fullmatch(
        re.escape(f"{tmp_path / 'x.jpg'}: its EXIF data is corrupt (Corrupt EXIF data. Expecting ")
        + r"to read 12 bytes but only got \d\.\); read without the tags that could not be read "
        r"\(an orientation among them is not applied\)",
        said,
    ), said


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.fromarray(rand_img(12, 16)).quantize(8)
    expected = np.asarray(pal.convert("RGB"))
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "pt.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an opaque palette image reads without warnings
        assert np.array_equal(read_image(tmp_path / "p.png"), expected)
    with pytest.warns(UserWarning, match="pt.png: alpha"):
        assert np.array_equal(read_image(tmp_path / "pt.png"), expected)


def test_16bit_rgb_and_gray_round_to_8bit(tmp_path):
    # every 16-bit value once, including the rounding edges 128 -> 0, 129 -> 1, 65535 -> 255
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.round(ramp / 257).astype(np.uint8)
    assert np.array_equal(expected, (ramp.astype(np.int64) + 128) // 257)
    write_png16(tmp_path / "g16.png", ramp)
    assert np.array_equal(read_image(tmp_path / "g16.png"), np.repeat(expected[..., None], 3, 2))
    rgb = np.stack([ramp, ramp[::-1], ramp.T], axis=-1)
    write_png16(tmp_path / "rgb16.png", rgb)
    out = read_image(tmp_path / "rgb16.png")
    assert np.array_equal(out, np.round(rgb / 257).astype(np.uint8))  # not rgb >> 8
    with pytest.warns(UserWarning, match="rgba16.png: alpha"):
        write_png16(tmp_path / "rgba16.png", np.concatenate([rgb, ramp[..., None]], axis=-1))
        assert np.array_equal(read_image(tmp_path / "rgba16.png"), out)


def test_read_planes_keeps_gray_alpha_and_16_bits(tmp_path):
    """read_planes: read_image's pixels, and what it drops: gray, alpha (without a warning) and,
    with wide, 16-bit colour as x / 65535 (8-bit as to_tensor's x / 255)."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    rgba16 = np.stack([ramp, ramp[::-1], ramp.T, ramp[:, ::-1]], axis=-1)
    rgba8, la8 = rand_img(8, 9, c=4), rand_img(8, 9, c=2)
    write_png16(tmp_path / "rgba16.png", rgba16)
    write_png16(tmp_path / "la16.png", rgba16[..., 2:])
    write_png16(tmp_path / "g16.png", ramp)
    Image.fromarray(rgba8, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(la8, "LA").save(tmp_path / "la.png")
    Image.fromarray(rgba8[..., 0]).save(tmp_path / "l.png")
    Image.fromarray(rgba8[..., :3]).save(tmp_path / "rgb.png")
    pal = Image.fromarray(rand_img(8, 9)).quantize(8)
    pal.save(tmp_path / "pt.png", transparency=0)
    Image.fromarray(np.repeat(rgba8[..., :1], 3, 2)).quantize(8).save(tmp_path / "gray_pal.png")
    channels = {"rgba16": 4, "la16": 2, "g16": 1, "rgba": 4, "la": 2, "l": 1, "rgb": 3, "pt": 4}
    channels["gray_pal"] = 3  # a palette image is RGB, even of a gray palette
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "alpha channel dropped"
        for stem, c in channels.items():
            path = tmp_path / f"{stem}.png"
            narrow, wide = read_planes(path), read_planes(path, wide=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rgb8 = read_image(path)
            assert narrow.rgb.dtype == np.uint8 and np.array_equal(narrow.rgb, rgb8), stem
            assert wide.rgb.dtype == np.float32 and wide.rgb.shape == rgb8.shape, stem
            assert narrow.gray == wide.gray == (c <= 2), stem
            assert (narrow.alpha is None) == (wide.alpha is None) == (c in (1, 3)), stem
            if c in (2, 4):
                assert narrow.alpha.dtype == np.float32 and np.array_equal(narrow.alpha, wide.alpha)
    g16 = read_planes(tmp_path / "g16.png", wide=True)
    assert np.array_equal(g16.rgb, np.repeat((ramp / np.float32(65535))[..., None], 3, 2))
    rgba = read_planes(tmp_path / "rgba16.png", wide=True)
    assert np.array_equal(rgba.rgb, (rgba16[..., :3] / np.float32(65535)).astype(np.float32))
    assert np.array_equal(rgba.alpha, (rgba16[..., 3] / np.float32(65535)).astype(np.float32))
    la = read_planes(tmp_path / "la16.png", wide=True)
    assert np.array_equal(la.rgb[..., 1], rgba16[..., 2] / np.float32(65535))
    assert np.array_equal(la.alpha, rgba16[..., 3] / np.float32(65535))
    rgb = read_planes(tmp_path / "rgba.png", wide=True)  # 8-bit: exactly to_tensor's floats
    assert torch.equal(to_tensor(rgb.rgb), to_tensor(rgba8[..., :3].copy()))
    assert np.array_equal(rgb.alpha, rgba8[..., 3] / np.float32(255))
    assert np.array_equal(read_planes(tmp_path / "la.png").alpha, la8[..., 1] / np.float32(255))
    with pytest.raises(ImageError, match="nothing.png: no such file"):
        read_planes(tmp_path / "nothing.png")


def test_to_uint16_rounds_every_level():
    x = torch.from_numpy(np.arange(65536, dtype=np.float32) / 65535).view(1, 256, 256)
    assert np.array_equal(to_uint16(x)[..., 0], np.arange(65536).reshape(256, 256))
    y = torch.tensor([[[-0.5, 0.5 / 65535 - 1e-7, 1.5, float("nan")]]])
    assert to_uint16(y).ravel().tolist() == [0, 0, 65535, 0]


def test_16bit_pngs_are_read_without_leaving_their_files_open(tmp_path):
    """pypng's Reader, given a file's name, left the file open for the garbage collector: one
    ResourceWarning per 16-bit PNG read (under -W default or -X dev), also for a truncated one."""
    rgb = np.arange(48, dtype=np.uint16).reshape(4, 4, 3) * 1000
    write_png16(tmp_path / "rgb16.png", rgb)
    (tmp_path / "cut16.png").write_bytes((tmp_path / "rgb16.png").read_bytes()[:-30])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert np.array_equal(read_image(tmp_path / "rgb16.png"), np.round(rgb / 257))
        with pytest.raises(DataError, match="cut16.png"):
            read_image(tmp_path / "cut16.png")
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def write_tiff(path, arr, planar=False, orientation=1, **tags):
    """An uncompressed little-endian TIFF of (H, W) or (H, W, C) uint8/uint16/int16/float32,
    written here: any layout and tag (tifffile is no dependency). tags: {"t262": 6} sets tag 262."""
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    planes = list(np.moveaxis(arr.reshape(h, w, c), -1, 0)) if planar else [arr]
    strips = [np.ascontiguousarray(p, arr.dtype.newbyteorder("<")).tobytes() for p in planes]
    starts = np.cumsum([8] + [len(s) for s in strips])[:-1].tolist()
    fields = {256: [w], 257: [h], 258: [arr.dtype.itemsize * 8] * c, 259: [1]}
    fields |= {262: [2 if c >= 3 else 1], 273: starts, 274: [orientation], 277: [c], 278: [h]}
    fields |= {279: [len(s) for s in strips], 284: [2 if planar else 1]}
    fields |= {339: ["uif".index(arr.dtype.kind) + 1] * c, 338: [2] if c in (2, 4) else []}
    fields |= {int(k[1:]): v if isinstance(v, list) else [v] for k, v in tags.items()}
    fields = {k: v for k, v in sorted(fields.items()) if v}
    body = b"".join(strips)
    ifd_at = 8 + len(body) + len(body) % 2
    extra_at = ifd_at + 2 + 12 * len(fields) + 4
    entries, extra = b"", b""
    for tag, values in fields.items():
        kind, fmt = (4, "I") if tag in (273, 279) else (3, "H")
        packed = struct.pack(f"<{len(values)}{fmt}", *values)
        if len(packed) > 4:
            packed, extra = struct.pack("<I", extra_at + len(extra)), extra + packed
        entries += struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
    ifd = struct.pack("<H", len(fields)) + entries + b"\0" * 4
    path.write_bytes(
        b"II*\0" + struct.pack("<I", ifd_at) + body.ljust(ifd_at - 8, b"\0") + ifd + extra
    )


def test_16bit_and_float_tiffs_read_exactly(tmp_path):
    """Pillow truncated 16-bit RGB(A) TIFFs (x >> 8), garbled separate planes, could not open
    16-bit gray+alpha or float RGB: they read as the same picture in a 16-bit PNG does."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)[::4, ::2]  # the rounding edges too
    ramp[0, :3] = [128, 129, 65535]
    rgba = np.stack([ramp, ramp[::-1], ramp[:, ::-1], ramp[::-1, ::-1]], axis=-1)
    write_png16(tmp_path / "rgb16.png", rgba[..., :3])
    expected = read_image(tmp_path / "rgb16.png")
    assert not np.array_equal(expected, (rgba[..., :3] >> 8).astype(np.uint8))
    write_tiff(tmp_path / "rgb.tif", rgba[..., :3])
    write_tiff(tmp_path / "planar.tif", rgba[..., :3], planar=True)
    write_tiff(tmp_path / "rgba.tif", rgba)
    write_tiff(tmp_path / "planar_rgba.tif", rgba, planar=True)
    write_tiff(tmp_path / "float.tif", (rgba[..., :3] / 65535).astype(np.float32))
    write_tiff(tmp_path / "gray_alpha.tif", rgba[..., :2])
    write_tiff(tmp_path / "gray.tif", rgba[..., 0])
    write_tiff(tmp_path / "turned.tif", np.rot90(rgba[..., :3], 1), orientation=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # alpha dropped
        for name in ("rgb", "planar", "rgba", "planar_rgba", "float", "turned"):
            assert np.array_equal(read_image(tmp_path / f"{name}.tif"), expected), name
        for name in ("gray_alpha", "gray"):
            assert np.array_equal(
                read_image(tmp_path / f"{name}.tif"), expected[..., :1].repeat(3, 2)
            )
    write_tiff(tmp_path / "signed.tif", rgba[..., :3].astype(np.int16))
    with pytest.raises(
        ImageError,
        match="signed.tif: TIFF of RGB, 3 samples of 16-bit signed .* not supported; convert",
    ):
        read_image(tmp_path / "signed.tif")
    with mock.patch.object(data, "imagecodecs", None):  # no libtiff: refused, not misread
        with pytest.raises(
            ImageError, match="planar.tif: .* needs imagecodecs; convert it to a 16-bit PNG"
        ):
            read_image(tmp_path / "planar.tif")
        # but 16-bit gray is exact in Pillow (I;16): read as before there was a libtiff path
        gray = read_image(tmp_path / "gray.tif")
        assert np.array_equal(gray, expected[..., :1].repeat(3, 2))


def test_a_pngs_transparent_colour_is_an_alpha_channel(tmp_path):
    """An 8-bit RGB or gray PNG whose tRNS chunk names a transparent colour read as opaque: its
    alpha lost without a word (sr_sample.py wrote opaque samples, read_image warned of nothing).
    It is an alpha channel now, as a palette's transparency is."""
    rgb = np.random.default_rng(0).integers(10, 250, (6, 8, 3), dtype=np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(1, 2, 3))
    gray = rgb[..., 1].copy()
    gray[0, 0] = 7
    Image.fromarray(gray).save(tmp_path / "gray.png", transparency=7)
    alpha = np.ones((6, 8), np.float32)
    alpha[0, 0] = 0
    for name, colour in (("rgb", rgb), ("gray", gray[..., None].repeat(3, 2))):
        planes = read_planes(tmp_path / f"{name}.png")
        assert np.array_equal(planes.alpha, alpha) and np.array_equal(planes.rgb, colour), name
        with pytest.warns(UserWarning, match=f"{name}.png: alpha channel dropped"):
            assert np.array_equal(read_image(tmp_path / f"{name}.png"), colour)


def test_a_float_image_outside_0_1_is_clipped_with_a_warning_naming_it(tmp_path):
    """A float TIFF of 0..255 was clipped to [0, 1] without a word: read as nearly white, its
    SR samples and scores garbage. Now a warning names the file and its range; values within
    half an 8-bit level of [0, 1] (float rounding), which the clip leaves as they round, none."""
    rng = np.random.default_rng(0)
    img = rng.random((6, 8, 3)).astype(np.float32)
    write_tiff(tmp_path / "wide.tif", img * 255)
    clipped = np.clip(img * 255, 0, 1)  # (nearly white)
    for read, want in ((read_image, np.round(clipped * 255)),
                       (lambda p: read_planes(p, wide=True).rgb, clipped)):  # fmt: skip
        with pytest.warns(UserWarning, match=r"wide.tif: float pixels in \[0.\d+, 25\d.\d+\]") as w:
            assert np.array_equal(read(tmp_path / "wide.tif"), want)
        (warning,) = [x.message for x in w]  # a copy (pickle rebuilds cls(*args)) says the same
        assert str(pickle.loads(pickle.dumps(warning))) == str(warning)
    img[0, 0], img[0, 1] = 1 + 0.4 / 255, -0.4 / 255
    write_tiff(tmp_path / "unit.tif", img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(read_image(tmp_path / "unit.tif"), np.round(np.clip(img, 0, 1) * 255))


def test_a_16_bit_or_bilevel_pngs_transparent_colour_is_an_alpha_channel(tmp_path):
    """The 8-bit case's fix (above) left a 16-bit RGB or gray PNG's tRNS colour, and a bilevel
    one's, read as opaque without a word. Now they are an alpha channel too: dropped with the
    AlphaDropped warning by read_image, kept by read_planes, at the file's precision."""
    rgb = np.random.default_rng(1).integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    rgb[0, 0], rgb[2, 3] = (1000, 2000, 3000), (1000, 2000, 3001)  # (one sample off: opaque)
    gray, bits = rgb[..., 1].copy(), np.indices((4, 6)).sum(0).astype(np.uint8) % 2
    files = {
        "rgb16": (rgb, dict(greyscale=False, bitdepth=16, transparent=(1000, 2000, 3000))),
        "gray16": (gray, dict(greyscale=True, bitdepth=16, transparent=2000)),
        "bits": (bits, dict(greyscale=True, bitdepth=1, transparent=1)),
    }
    for name, (img, how) in files.items():
        with open(tmp_path / f"{name}.png", "wb") as f:
            png.Writer(6, 4, **how).write(f, img.reshape(4, -1))
        level = 255 if name == "bits" else 1  # (a bilevel file's 1 is 255)
        colour = (img[..., None].repeat(3, 2) if img.ndim == 2 else img) * level
        opaque = np.any(colour != np.asarray(how["transparent"]) * level, axis=-1)
        planes = read_planes(tmp_path / f"{name}.png", wide=True)
        assert np.array_equal(planes.alpha, opaque) and not opaque.all(), name
        assert np.array_equal(planes.rgb, colour / np.float32(255 if level > 1 else 65535)), name
        with pytest.warns(UserWarning, match=f"{name}.png: alpha channel dropped"):
            rgb8 = read_image(tmp_path / f"{name}.png")
        assert np.array_equal(rgb8, colour if level > 1 else (colour.astype(int) + 128) // 257)
    assert read_planes(tmp_path / "rgb16.png").alpha[2, 3] == 1  # (a colour one level off: opaque)


def test_nan_and_inf_in_a_float_image_are_a_warning_naming_the_file(tmp_path):
    """A float TIFF's NaN pixels read as 0 without a word (a model's broken output scored as
    black), and +-inf gave a FloatClipped warning of the range [-3.403e+38, 3.403e+38], float32's
    largest numbers, not the file's. Now one warning names the file and how many values are NaN
    or infinite; they read as 0 (NaN, -inf) and 1 (+inf), and the range is of the other values."""
    img = np.full((4, 6, 3), 0.5, np.float32)
    img[0, 0, 0], img[1, 1, 1], img[2, 2, 2], img[3, 3] = np.nan, np.inf, -np.inf, np.nan
    write_tiff(tmp_path / "bad.tif", img)
    want = np.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0)
    for read, expect in ((read_image, np.round(want * 255)),
                         (lambda p: read_planes(p, wide=True).rgb, want)):  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert np.array_equal(read(tmp_path / "bad.tif"), expect)
        assert [str(w.message) for w in caught] == [
            f"{tmp_path / 'bad.tif'}: 4 NaN and 2 infinite float value(s), read as 0 (NaN, -inf) "
            "and 1 (+inf): the image is not the one the file holds; check what wrote it"
        ]
    img[0, 0, 0], img[1, 1, 1] = 2.0, np.inf
    write_tiff(tmp_path / "wide.tif", img)
    with pytest.warns(UserWarning) as caught:
        read_image(tmp_path / "wide.tif")
    assert "float pixels in [0, 2]" in str(caught[-1].message)  # (the finite values' range)


def test_an_image_that_cannot_be_opened_is_one_error_naming_it(tmp_path, monkeypatch):
    """Permission denied (a dataset of another group), a stale NFS handle: the file's first read,
    the TIFF tag probe, raised the OSError itself, a traceback."""
    path = tmp_path / "locked.png"
    write_png(path, smooth_img(8, 8))
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    real_read_bytes = Path.read_bytes

    def refusing_read_bytes(self):
        if str(self) == str(path):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr("builtins.open", refusing_open)
    monkeypatch.setattr(Path, "read_bytes", refusing_read_bytes)  # (Python 3.10's opens by io)
    with pytest.raises(ImageError, match="locked.png: .*PermissionError.*Permission denied"):
        read_image(path)


def test_ycbcr_tiffs_converted_and_other_colour_models_refused(tmp_path):
    """A YCbCr or CIELab TIFF is not RGB: it was read as if it were."""
    rgb = smooth_img(16, 24)
    ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr"))
    write_tiff(tmp_path / "ycc.tif", ycc, t262=6, t530=[1, 1])
    out = read_image(tmp_path / "ycc.tif")  # by libtiff (Pillow before 13 cannot read it)
    pillow = np.asarray(Image.fromarray(ycc, "YCbCr").convert("RGB"))
    assert np.abs(out.astype(int) - pillow).max() <= 1  # libtiff's and Pillow's arithmetic
    assert np.abs(out.astype(int) - rgb).max() <= 3  # JPEG's equations, rounded twice
    with mock.patch.object(data, "imagecodecs", None):  # Pillow's, where it can
        try:
            assert np.array_equal(read_image(tmp_path / "ycc.tif"), pillow)
        except ImageError as e:
            assert int(PIL.__version__.split(".")[0]) < 13, e
    write_tiff(tmp_path / "subsampled.tif", ycc, t262=6)  # no tag 530: chroma at half size
    write_tiff(tmp_path / "video.tif", ycc, t262=6, t530=[1, 1], t532=[16, 235, 128, 240, 128, 240])
    write_tiff(tmp_path / "lab.tif", ycc, t262=8)
    write_tiff(tmp_path / "itulab.tif", ycc, t262=10)
    for name, what in [
        ("subsampled", "YCbCr"),
        ("video", "YCbCr"),
        ("lab", "CIELab"),
        ("itulab", "ITULab"),
    ]:
        message = f"{name}.tif: TIFF of {what}, 3 samples of 8-bit .* not supported; convert it to"
        with pytest.raises(ImageError, match=message):
            read_image(tmp_path / f"{name}.tif")


def test_cmyk_jpeg(tmp_path):
    rgb = smooth_img(32, 40)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    out = read_image(tmp_path / "cmyk.jpg")
    assert out.shape == (32, 40, 3) and np.abs(out.astype(int) - rgb).mean() < 3


def test_exif_orientation_applied(tmp_path):
    img = np.zeros((32, 48, 3), np.uint8)
    img[:16, :16] = 255  # a white block top-left; orientation 6 means "rotate 90 deg clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (48, 32, 3)
    assert out[2:14, 18:30].min() > 200 and out[18:, :].max() < 60  # block now top-right


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"just some text\n", "not an image"), (b"\x89PNG\r\n\x1a\n", "image")],
)
def test_unreadable_files(tmp_path, content, reason):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(ImageError, match=f"bad.png: .*{reason}") as e:
        read_image(tmp_path / "bad.png")
    assert "\n" not in str(e.value) and e.value.exit_code == 3
    with pytest.raises(DataError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")


@pytest.mark.parametrize("kind", ["png", "jpg", "png16"])
def test_truncated_files_raise(tmp_path, kind):
    img = rand_img(64, 64)  # noise: the compressed data is spread over the whole file
    path = tmp_path / f"full.{kind[:3]}"
    if kind == "png16":
        write_png16(path, img.astype(np.uint16) * 257)
    else:
        Image.fromarray(img).save(path, quality=90)
    raw = path.read_bytes()
    for frac in (0.5, 0.9, 0.98):
        cut = tmp_path / f"cut.{kind[:3]}"
        cut.write_bytes(raw[: int(len(raw) * frac)])
        with pytest.raises(ImageError, match="cut.*(truncated|corrupt|readable)"):
            read_image(cut)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def test_pixel_limit_refuses_before_allocating(tmp_path, monkeypatch):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # claims 100000 x 100000 RGB
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    bomb += png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + png_chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(bomb)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="bomb.png: .*exceeds the limit"):
        read_image(tmp_path / "bomb.png")
    assert time.perf_counter() - t0 < 1.0
    Image.fromarray(rand_img(20, 20)).save(tmp_path / "small.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="small.png: 20x20 exceeds the limit of 100 pixels"):
        read_image(tmp_path / "small.png")


def with_chunk(path, kind: bytes, payload: bytes) -> None:
    """Insert a chunk into a PNG file right after its IHDR."""
    raw = path.read_bytes()
    path.write_bytes(raw[:33] + png_chunk(kind, payload) + raw[33:])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_at_every_bit_depth(tmp_path, orientation):
    """A 16-bit PNG (read by pypng) turns as its 8-bit copy (read by Pillow) turns: an HR and its
    LR must agree, whatever their bit depths."""
    img = rand_img(6, 10, c=4)
    exif = Image.Exif()
    exif[0x0112] = orientation
    info = PngInfo()  # an orientation in XMP, as Pillow finds it (after IDAT here, as some write)
    info.add_itxt("XML:com.adobe.xmp", f'<rdf:Description tiff:Orientation="{orientation}"/>')
    wide = img.astype(np.uint16) * 257
    for name, planes in {"rgb": 3, "rgba": 4, "gray": 1, "gray_alpha": 2}.items():
        Image.fromarray(img[..., : 1 if planes < 3 else 3].squeeze()).save(
            tmp_path / f"{name}8.png", exif=exif
        )
        expected = read_image(tmp_path / f"{name}8.png")  # Pillow's reading
        assert expected.shape[:2] == ((10, 6) if orientation > 4 else (6, 10))
        path = tmp_path / f"{name}16.png"
        write_png16(path, wide[..., :planes].squeeze())
        raw = path.read_bytes()
        path.write_bytes(raw[:33] + png_chunk(b"eXIf", exif.tobytes()) + raw[33:])  # after IHDR
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # alpha dropped
            assert np.array_equal(read_image(path), expected), name
        path = tmp_path / f"{name}16_xmp.png"
        write_png16(path, wide[..., :planes].squeeze())
        raw = path.read_bytes()
        path.write_bytes(raw[:-12] + png_chunk(*info.chunks[0][:2]) + raw[-12:])  # before IEND
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.array_equal(read_image(path), expected), name


def outcome(read, path: Path, *more):
    """What read(path, *more) (read_image, read_file) does with one file: ("ok", pixels, shape,
    warnings) or ("error", the line, exit code), the file's path written as PATH."""
    name = lambda text: text.replace(str(path), "PATH")  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = read(path, *more)
        except DataError as e:
            return "error", name(str(e)), e.exit_code
    return "ok", img.tobytes(), img.shape, [name(str(w.message)) for w in caught]


def test_read_image_of_the_bytes_read_is_read_image_of_the_file(tmp_path, monkeypatch):
    """read_image(path, data), for sr_sample.py's control flags (each file read once, and the
    bytes decoded are the bytes hashed for the manifest), gives what read_image(path) gives:
    the pixels and warnings, or the same one-line error, for each kind of file and each decoder
    (libpng, Pillow, pypng's 16 bits, libtiff); and it opens nothing, the path given is gone."""
    src = tmp_path / "src"
    src.mkdir()
    rgb, rgba = smooth_img(24, 32), rand_img(6, 10, c=4)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(src / "rgb.png")  # libpng's fast path
    Image.fromarray(rgb).save(src / "rgb.bmp")
    Image.fromarray(rgb).save(src / "turned.jpg", exif=exif)  # Pillow, turned by EXIF
    Image.fromarray(rgb).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(rgba, "RGBA").save(src / "rgba.png")  # alpha dropped: a warning
    Image.fromarray(rgb).quantize(8).save(src / "palette.png", transparency=0)
    write_png16(src / "rgb16.png", rgb.astype(np.uint16) * 257 + 100)  # pypng
    write_png16(src / "gray16.png", rgb[..., 0].astype(np.uint16) * 257)  # Pillow's I;16
    write_png16(src / "turned16.png", rgba.astype(np.uint16) * 257)
    with_chunk(src / "turned16.png", b"eXIf", exif.tobytes())  # pypng, turned by Pillow
    write_tiff(src / "wide.tif", rgb.astype(np.uint16) * 257, orientation=6)  # libtiff
    write_tiff(src / "float.tif", (rgb / 255).astype(np.float32))
    ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr"))
    write_tiff(src / "ycc.tif", ycc, t262=6, t530=[1, 1])
    write_tiff(src / "lab.tif", ycc, t262=8)  # refused
    write_tiff(src / "signed.tif", rgb.astype(np.int16))  # refused
    raw = (src / "rgb16.png").read_bytes()
    (src / "cut16.png").write_bytes(raw[: len(raw) // 2])
    (src / "cut.jpg").write_bytes((src / "turned.jpg").read_bytes()[:300])
    (src / "text.png").write_bytes(b"just some text\n")
    (src / "signature.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (src / "empty.png").write_bytes(b"")
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)  # claims 100000 x 100000 RGB
    bomb += png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + png_chunk(b"IEND", b"")
    (src / "bomb.png").write_bytes(bomb)
    gone = tmp_path / "gone"  # no such folder: a file opened by its path would fail to read
    kinds = set()
    for path in sorted(src.iterdir()):
        expected = outcome(read_image, path)
        contents = path.read_bytes()
        got = outcome(read_image, gone / path.name, contents)
        assert got == expected, path.name
        kinds.add((expected[0], bool(expected[-1])))
    assert kinds == {("ok", False), ("ok", True), ("error", True)}  # pixels, warnings, errors
    monkeypatch.setattr(data, "MAX_PIXELS", 100)  # 24x32: over the limit, from the bytes too
    path = src / "rgb.png"
    expected = outcome(read_image, path)
    assert expected[0] == "error" and "exceeds the limit of 100 pixels" in expected[1]
    assert outcome(read_image, gone / "rgb.png", path.read_bytes()) == expected


# Opens are counted by the interpreter's audit hook, in a process of its own (a hook cannot be
# removed): one process for the two tests that count them (an interpreter that imports torch,
# ~2 CPU-s), on one pytest-xdist worker (pyproject: --dist loadgroup).
OPENS_GROUP = pytest.mark.xdist_group("opens")


@pytest.fixture(scope="module")
def opens_counted(tmp_path_factory) -> SimpleNamespace:
    """What one process opened under each test's folder: `read`, read_image of a PNG (libpng),
    a JPEG (Pillow), a 16-bit PNG (pypng) and a TIFF (libtiff) in "in put"; `start`, a second
    PatchPairs start on hr/ with lr/ and the cache the first start (this process) made. With
    the folders, and `lr_hw`, the LR sizes the second start took."""
    root = tmp_path_factory.mktemp("opens")
    src = root / "in put"
    src.mkdir()
    rgb = smooth_img(24, 32)
    Image.fromarray(rgb).save(src / "rgb.png")  # libpng
    Image.fromarray(rgb).save(src / "rgb.jpg")  # Pillow
    write_png16(src / "rgb16.png", rgb.astype(np.uint16) * 257)  # pypng
    write_tiff(src / "wide.tif", rgb.astype(np.uint16) * 257)  # libtiff
    start = root / "start"
    hr, lr, cache = start / "hr", start / "lr", start / "cache"
    hr.mkdir(parents=True)
    lr.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 40), (36, 32), (44, 48)]):
        write_png(hr / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        write_png(lr / f"{i}x4.png", rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8))
    PatchPairs([hr], 4, 8, lr_dirs=[lr], cache=cache)  # the first start makes the cache
    code = "\n".join([
        "import collections, json, sys",
        "from sr_lib.data import PatchPairs, read_image",
        "opens = {'read': collections.Counter(), 'start': collections.Counter()}",
        "phase = 'read'",
        f"folders = {{'read': {str(src)!r}, 'start': {str(start)!r}}}",
        "sys.addaudithook(lambda e, a: e == 'open' and str(a[0]).startswith(folders[phase])"
        " and opens[phase].update([str(a[0])]))",
        f"for name in {sorted(p.name for p in src.iterdir())!r}:",
        f"    assert read_image({str(src)!r} + '/' + name).shape == (24, 32, 3)",
        "phase = 'start'",
        f"ds = PatchPairs([{str(hr)!r}], 4, 8, lr_dirs=[{str(lr)!r}], cache={str(cache)!r})",
        "print(json.dumps([opens, ds.lr_hw.tolist()]))",
    ])  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    opens, lr_hw = json.loads(run.stdout.splitlines()[-1])
    return SimpleNamespace(src=src, cache=cache, lr_hw=lr_hw, **opens)


@OPENS_GROUP
def test_read_image_opens_each_file_once(opens_counted):
    """read_image opened a file four times (TIFF tags, Pillow's header, the PNG bit depth, the
    decoder): on a cluster's file system each open is a call to its metadata server, 20,000
    images to evaluate, 40,000 samples."""
    assert opens_counted.read == {str(p): 1 for p in opens_counted.src.iterdir()}


def test_read_file_fails_as_read_image_does(tmp_path, monkeypatch):
    """read_file, which reads a control image's bytes for read_image(path, data): a missing
    file, a folder or an empty file is read_image's own one-line error; a file that cannot be
    read (permission denied: root, which runs the tests, ignores modes) one line naming it."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    for name in ("missing.png", "folder.png", "empty.png"):
        path = tmp_path / name
        assert outcome(data.read_file, path) == outcome(read_image, path)
    write_png(tmp_path / "locked.png", smooth_img(8, 8))
    assert data.read_file(tmp_path / "locked.png") == (tmp_path / "locked.png").read_bytes()

    def refused(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(ImageError) as e:
        data.read_file(tmp_path / "locked.png")
    assert str(e.value) == (
        f"{tmp_path / 'locked.png'}: cannot read it (PermissionError: Permission denied)"
    )


@pytest.fixture
def libpng_calls(monkeypatch):
    """The files imagecodecs decoded (read_image's fast path for plain 8-bit RGB PNGs)."""
    calls, decode = [], data.imagecodecs.png_decode
    monkeypatch.setattr(data.imagecodecs, "png_decode", lambda b: calls.append(len(b)) or decode(b))
    return calls


def test_plain_rgb_pngs_take_libpng_and_equal_pillow(tmp_path, libpng_calls):
    """Every way of writing an 8-bit RGB PNG (filters, levels, interlacing, ancillary chunks)."""
    noise, smooth = rand_img(37, 53), smooth_img(64, 72)
    files = {}
    for name, img in (("noise", noise), ("smooth", smooth)):
        for level in (0, 1, 9):
            files[f"{name}{level}"] = (img, dict(compress_level=level))
        files[f"{name}_opt"] = (img, dict(optimize=True))
    info = PngInfo()
    info.add_text("Comment", "made by a test")
    files["text"] = (smooth, dict(pnginfo=info, dpi=(300, 300)))  # tEXt, pHYs
    zipped = PngInfo()
    zipped.add_text("Title", "zipped", zip=True)
    files["ztxt_icc"] = (smooth, dict(pnginfo=zipped, icc_profile=b"\0" * 128))  # Pillow's path
    for name, (img, kw) in files.items():
        Image.fromarray(img).save(tmp_path / f"{name}.png", **kw)
    with open(tmp_path / "pypng.png", "wb") as f:  # pypng: every filter type per row
        png.Writer(72, 64, greyscale=False).write(f, smooth.reshape(64, -1))
    with open(tmp_path / "pypng_gamma.png", "wb") as f:  # gAMA: Pillow's path
        png.Writer(72, 64, greyscale=False, gamma=0.45).write(f, smooth.reshape(64, -1))
    files["pypng"] = files["pypng_gamma"] = (smooth, {})
    for name, (img, _) in files.items():
        path = tmp_path / f"{name}.png"
        with Image.open(path) as im:
            pillow = np.asarray(im.convert("RGB"))
        n = len(libpng_calls)
        out = read_image(path)
        libpng = name not in ("ztxt_icc", "pypng_gamma")  # (chunks libpng checks: Pillow reads)
        assert len(libpng_calls) == n + libpng, f"{name}: decoded by libpng: {not libpng}"
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        assert np.array_equal(out, pillow) and np.array_equal(out, img), name


# PNGs of which libpng complains on stderr (the tests below): each is read by read_image in one
# process shared by those tests, and compared with its pixels. A C library's lines on stderr are
# buffered until the process exits, so only a process of their own shows them: after each file
# that process flushes C's stdio and writes a line of its own, which splits its stderr by file.
ODD_CHUNKS = {
    "invalid sRGB": [(b"sRGB", b"\x09")],  # an invalid rendering intent
    "gAMA not sRGB's": [(b"sRGB", b"\0"), (b"gAMA", (100000).to_bytes(4, "big"))],
    "bKGD": [(b"bKGD", b"\0")],
    "sBIT": [(b"sBIT", b"\x09\x09\x09")],
    "tIME": [(b"tIME", bytes([7, 228, 13, 40, 25, 61, 61]))],
    # (not a short one: Pillow refuses that file, "Truncated pHYs chunk")
    "pHYs twice": [(b"pHYs", bytes(9))] * 2,
}
READ_APART = """import ctypes, os, sys, numpy as np
from sr_lib.data import read_image
libc = ctypes.CDLL(None)
for path in sys.argv[1:]:
    try:
        said = np.array_equal(read_image(path), np.load(path + ".npy"))
    except Exception as e:
        said = repr(e)
    libc.fflush(None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, f"\\n--- {path}: {said}\\n".encode())
"""


@pytest.fixture(scope="module")
def read_apart(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Name -> (what reading the file gave: 'True' for its pixels, else its error; what the
    process wrote on stderr while it read it), for an Adam7 PNG and one of each ODD_CHUNKS."""
    folder = tmp_path_factory.mktemp("read apart")
    img = smooth_img(64, 72)
    with open(folder / "adam7.png", "wb") as f:
        png.Writer(72, 64, greyscale=False, interlace=True).write(f, img.reshape(64, -1))
    files = {"adam7": (folder / "adam7.png", img)}
    img = smooth_img(24, 20)
    Image.fromarray(img).save(folder / "plain.png")
    raw = (folder / "plain.png").read_bytes()
    for i, (name, chunks) in enumerate(ODD_CHUNKS.items()):
        path = folder / f"odd{i}.png"
        path.write_bytes(raw[:33] + b"".join(png_chunk(k, c) for k, c in chunks) + raw[33:])
        files[name] = (path, img)
    for path, expected in files.values():
        np.save(f"{path}.npy", expected)
    args = [sys.executable, "-c", READ_APART, *(str(path) for path, _ in files.values())]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    said, rest = {}, done.stderr
    for name, (path, _) in files.items():
        before, mark, rest = rest.partition(f"\n--- {path}: ")
        if not mark:
            break
        result, _, rest = rest.partition("\n")
        said[name] = (result, before)
    assert done.returncode == 0 and len(said) == len(files) and rest == "", done.stderr
    return said


# the tests of read_apart's one process on one pytest-xdist worker (pyproject: --dist loadgroup),
# which makes it once: spread over two, each made it (an interpreter that imports torch, ~2 CPU-s)
READ_APART_GROUP = pytest.mark.xdist_group("read_apart")


@READ_APART_GROUP
def test_interlaced_pngs_read_without_a_word_on_stderr(read_apart):
    """imagecodecs' libpng printed "PNG warning: Interlace handling should be turned on when
    using png_read_image" for every Adam7 PNG it decoded: from C, buffered until the process
    exits, so only a process of its own shows it."""
    assert read_apart["adam7"] == ("True", "")


@READ_APART_GROUP
@pytest.mark.parametrize("name", ODD_CHUNKS)
def test_a_png_whose_ancillary_chunks_libpng_faults_is_read_without_a_word(read_apart, name):
    """libpng checks gAMA, sRGB, bKGD, sBIT, tIME, pHYs... and prints "PNG warning: ..." on stderr
    for one it finds wrong (with imagecodecs 2024.1, even a scikit-image demo photograph's
    "known incorrect sRGB profile"): a stray line in the log of every run that read it. Pillow
    reads such files, silently, and gives the same pixels."""
    assert read_apart[name] == ("True", "")


def test_without_imagecodecs_pillow_reads_every_png(tmp_path, monkeypatch):
    img = rand_img(21, 34)
    Image.fromarray(img).save(tmp_path / "rgb.png")
    monkeypatch.setattr(data, "imagecodecs", None)
    assert np.array_equal(read_image(tmp_path / "rgb.png"), img)


def test_rgb_pngs_whose_pixels_pillow_could_change_take_pillow(tmp_path, libpng_calls):
    """Transparency and orientations (eXIf, ImageMagick's exif text, XMP) are Pillow's to read."""
    img = np.zeros((32, 48, 3), np.uint8)
    img[:16, :16] = 255  # a white block top-left; orientation 6 turns the image 90 deg clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "exif.png", exif=exif)
    info, raw = PngInfo(), b"Exif\0\0" + exif.tobytes()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}")  # ImageMagick's
    Image.fromarray(img).save(tmp_path / "raw exif.png", pnginfo=info)
    info = PngInfo()  # Pillow finds the orientation in XMP by this attribute
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/>')
    Image.fromarray(img).save(tmp_path / "xmp.png", pnginfo=info)
    for name in ("exif", "raw exif", "xmp"):
        out = read_image(tmp_path / f"{name}.png")
        assert out.shape == (48, 32, 3), name  # turned, as Pillow turns it
        assert out[2:14, 18:30].min() == 255 and out[18:].max() == 0, name
    Image.fromarray(img).save(tmp_path / "trns.png", transparency=(0, 0, 0))
    assert np.array_equal(read_image(tmp_path / "trns.png"), img)
    assert libpng_calls == []


def test_image_size_is_read_images_size_from_the_header(tmp_path, monkeypatch):
    """sr_eval.py checks every file's size before it decodes any (data.image_size): the size
    read_image gives, EXIF orientation included, or None where only decoding could tell. A PNG
    with a chunk that may hold an orientation (eXIf, ImageMagick's exif text, XMP: what cameras,
    exiftool, ImageMagick and Photoshop write) was such a file: its samples were checked only
    once decoded. Its orientation is now read from those chunks, before or after the pixels."""
    img = rand_img(20, 36)
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: read_image gives 36 rows by 20 columns
    big = Image.Exif()  # a JPEG's APP1 of 30 kB before its frame header
    big[0x0112], big[0x010E] = 6, "x" * 30_000
    raw_exif, xmp = PngInfo(), PngInfo()
    raw = b"Exif\0\0" + exif.tobytes()
    raw_exif.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}", zip=True)
    xmp_text = '<x:xmpmeta><rdf:Description tiff:Orientation="6"/>'
    xmp.add_itxt("XML:com.adobe.xmp", xmp_text)
    saves = {
        "turned.jpg": {"exif": exif},
        "turned big exif.jpg": {"exif": big},
        "turned progressive.jpg": {"exif": exif, "progressive": True},
        "progressive.jpg": {"progressive": True},
        "turned.webp": {"exif": exif},
        "plain.bmp": {},
        "plain.png": {},
        "gray.png": {},
        "turned.png": {"exif": exif},
        "turned raw exif.png": {"pnginfo": raw_exif},
        "turned xmp.png": {"pnginfo": xmp},
    }
    for name, turn in saves.items():
        Image.fromarray(img[..., 0] if "gray" in name else img).save(tmp_path / name, **turn)
    write_tiff(tmp_path / "turned.tif", img, orientation=6)
    write_tiff(tmp_path / "float.tif", (img / 255).astype(np.float32))  # Pillow cannot open it
    write_png16(tmp_path / "wide.png", img.astype(np.uint16) * 257)
    itxt = b"XML:com.adobe.xmp\0\0\0\0\0"  # keyword, not compressed, no language
    late = {  # after the pixel data, where Pillow finds them only by decoding them
        "turned late.png": png_chunk(b"eXIf", exif.tobytes()),
        "turned late xmp.png": png_chunk(b"iTXt", itxt + xmp_text.encode()),
        "late xmp of no orientation.png": png_chunk(b"iTXt", itxt + b"<x:xmpmeta/>"),
    }
    for name, chunk in late.items():
        raw = (tmp_path / ("plain.png" if "xmp" in name else "wide.png")).read_bytes()
        (tmp_path / name).write_bytes(raw[:-12] + chunk + raw[-12:])
    for f in sorted(tmp_path.iterdir()):
        want = (36, 20) if "turned" in f.name else (20, 36)
        assert data.image_size(f) == read_image(f).shape[:2] == want, f.name
    # nothing decoded: a PNG whose pixel data are broken has a size (read_image refuses it)
    raw = (tmp_path / "turned.png").read_bytes()
    idat = raw.index(b"IDAT") - 4
    length = struct.unpack(">I", raw[idat : idat + 4])[0]
    broken = png_chunk(b"IDAT", bytes(length))
    (tmp_path / "broken.png").write_bytes(raw[:idat] + broken + raw[idat + 12 + length :])
    assert data.image_size(tmp_path / "broken.png") == (36, 20)
    with pytest.raises(ImageError, match="cannot decode"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert data.image_size(tmp_path / "bad.png") is None
    monkeypatch.setattr(data, "MAX_PIXELS", 100)  # read_image refuses it: its line, not a size
    assert data.image_size(tmp_path / "plain.png") is None


def test_image_size_opens_each_file_once(tmp_path, monkeypatch):
    """sr_sample.py --tile reads the header of every input in every --shard (20,000 files in each
    of 100 shards): image_size opened each file twice (its TIFF check, then Pillow), 40,000 opens
    a shard; now once, whatever the format, and still the size read_image gives."""
    img = rand_img(20, 36)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "a.jpg")
    write_tiff(tmp_path / "a.tif", img, orientation=6)
    opened = []
    real_open = open

    def counting_open(file, *args, **kw):
        opened.append(Path(file).name)
        return real_open(file, *args, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    sizes = [data.image_size(tmp_path / name) for name in ("a.png", "a.jpg", "a.tif")]
    assert sizes == [(20, 36), (20, 36), (36, 20)]
    assert opened == ["a.png", "a.jpg", "a.tif"]


def test_unicode_and_spaces_in_names(tmp_path):
    img = rand_img(10, 12)
    path = tmp_path / "dir with space" / "bild ü 猫.png"
    write_png(path, img)
    assert np.array_equal(read_image(path), img)
    assert list_images(tmp_path) == [path]


# ---------------------------------------------------------------------------------------------
# write_png and small helpers


def test_fit_name_cuts_a_long_stem_at_a_character_and_keeps_names_apart():
    assert fit_name("photo", 20, 255) == "photo"
    a, b = "猫" * 80 + "a", "猫" * 80 + "b"  # 241 bytes each, the same first 240
    cut_a, cut_b = fit_name(a, 20, 255), fit_name(b, 20, 255)
    assert cut_a != cut_b and cut_a.startswith("猫" * 70) and cut_a[-9] == "~"
    for cut in (cut_a, cut_b):
        assert 255 - 20 - 2 <= len(cut.encode()) <= 255 - 20  # whole characters only
    latin1 = os.fsdecode(b"caf\xe9" * 80)  # not UTF-8: its bytes, cut as well
    assert len(os.fsencode(fit_name(latin1, 20, 255))) == 235
    assert data.name_max(Path("/nonexistent/folder")) == 255  # unknown: the usual limit


def test_a_file_name_of_255_bytes_is_written_atomically(tmp_path):
    """The temporary file's name, .NAME.PID-XXXXXXXX.tmp, was 22 bytes longer than the file's:
    a name from 234 bytes on could not be written ("File name too long")."""
    path = tmp_path / ("a" * 251 + ".png")
    write_png(path, rand_img(4, 5))
    write_text(tmp_path / ("b" * 250 + ".json"), "{}")
    assert np.array_equal(read_image(path), rand_img(4, 5))
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [255, 255]  # no temporary left


def test_write_png_round_trips(tmp_path):
    rgb, gray = rand_img(9, 11), rand_img(9, 11, c=1)
    write_png(tmp_path / "rgb.png", rgb)
    write_png(tmp_path / "gray.png", gray)
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    assert np.array_equal(read_image(tmp_path / "gray.png")[..., 1], gray)
    depth = np.random.default_rng(0).integers(0, 65536, (9, 11), dtype=np.uint16)
    write_png(tmp_path / "depth.png", depth)
    w, h, rows, info = png.Reader(bytes=(tmp_path / "depth.png").read_bytes()).read()
    assert info["bitdepth"] == 16 and np.array_equal(np.array(list(rows), np.uint16), depth)
    rgb16 = np.random.default_rng(1).integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    write_png(tmp_path / "rgb16.png", rgb16)
    assert np.array_equal(
        read_image(tmp_path / "rgb16.png"), np.round(rgb16 / 257).astype(np.uint8)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "depth.png",
        "gray.png",
        "rgb.png",
        "rgb16.png",
    ]  # fmt: skip  (no temporary files left behind)
    with pytest.raises(TypeError):
        write_png(tmp_path / "f.png", rgb.astype(np.float32))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        write_png(tmp_path / "file" / "x.png", rgb)


def test_encode_png_takes_a_view_of_any_layout():
    """A uint16 array whose channels are not its last, contiguous axis (a tensor's movedim, a
    slice) raised ValueError in encode_png's .view; every layout encodes as its copy does."""
    planar = np.random.default_rng(2).integers(0, 65536, (3, 5, 7), dtype=np.uint16)
    for img in (planar.transpose(1, 2, 0), planar.transpose(1, 2, 0)[:, ::2], planar[0].T):
        for arr in (img, img.astype(np.uint8)):
            assert not arr.flags.c_contiguous
            assert data.encode_png(arr) == data.encode_png(np.ascontiguousarray(arr))


def test_list_images(tmp_path):
    with pytest.raises(DataError, match="nope: no such folder"):
        list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        list_images(tmp_path)
    for name in ["b.PNG", "a.JpG", "sub/c.webp", ".hidden.png", "._a.png", "sub/d.gif"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.JpG", "b.PNG", "sub/c.webp"]
    assert [str(w.message) for w in caught] == [
        f"{tmp_path}: skipped 1 image(s) of a format not read (e.g. sub/d.gif; read: "
        "png/jpg/jpeg/bmp/tif/tiff/webp); convert them to PNG to include them"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (not searched: nothing skipped)
        assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.JpG", "b.PNG"]


def test_links_in_a_loop_are_said_as_links_to_missing_files(tmp_path):
    """A link named like an image that ends nowhere was skipped with a warning, but links in a
    loop (a.png -> b.png -> a.png, self.png -> self.png: ELOOP) without a word."""
    (tmp_path / "ok.png").write_bytes(b"")
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    (tmp_path / "self.png").symlink_to("self.png")
    with pytest.warns(UserWarning) as caught:
        assert list_images(tmp_path) == [tmp_path / "ok.png"]
    assert [str(w.message) for w in caught] == [
        f"{tmp_path}: skipped 3 symbolic link(s) to missing files (a.png -> b.png, b.png -> "
        "a.png, self.png -> self.png)"
    ]


def test_links_to_missing_files_are_said_as_sr_sample_says_them(tmp_path):
    """list_images' warning named the first link alone, its path and target raw (`X -> T`, a
    space unquoted), where sr_sample.py's closing line lists the first three, quoted for a
    shell, then how many more: one form now (`links_said`), names from the folder."""
    (tmp_path / "ok.png").write_bytes(b"")
    gone = tmp_path / "moved away"
    for name in ("a 1.png", "b.png", "sub/c.png", "sub/d.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).symlink_to(gone / Path(name).name)
    with pytest.warns(UserWarning) as caught:
        assert list_images(tmp_path) == [tmp_path / "ok.png"]
    assert [str(w.message) for w in caught] == [
        f"{tmp_path}: skipped 4 symbolic link(s) to missing files ('a 1.png' -> '{gone}/a 1.png', "
        f"b.png -> '{gone}/b.png', sub/c.png -> '{gone}/c.png', and 1 more)"
    ]
    links = [tmp_path / "b.png", tmp_path / "gone.png"]  # (one removed since it was listed)
    assert links_said(links) == f"b.png -> '{gone}/b.png', gone.png"


def test_an_entry_that_cannot_be_checked_is_an_error_not_skipped(tmp_path, monkeypatch):
    """A link whose check fails otherwise than a loop (EACCES: its target under a folder this
    user may not search; simulated, root passes any chmod) was skipped without a word: an
    evaluation on fewer images. Now one line naming it where it could be or hold an image (a
    folder searched, a name like an image); elsewhere it would not be listed anyway."""
    for name in ["ok.png", "sub", "x.png", "notes"]:
        (tmp_path / name).symlink_to(tmp_path / "nowhere" / name)
    real = os.scandir
    locked = set()

    class Locked:  # a DirEntry whose stat fails with EACCES
        def __init__(self, entry):
            self.name, self.path = entry.name, entry.path

        def is_dir(self):
            raise PermissionError(13, "Permission denied", self.path)

        is_file = is_dir

        def is_symlink(self):
            return True

    def scandir(path):
        return [Locked(e) if e.name in locked else e for e in real(path)]

    monkeypatch.setattr(os, "scandir", scandir)
    (tmp_path / "ok.png").unlink()
    (tmp_path / "ok.png").write_bytes(b"")
    for names, recursive, bad in ((["sub"], True, "sub"), (["x.png"], False, "x.png")):
        locked.clear()
        locked.update(names)
        with pytest.raises(data.DataError) as e:
            list_images(tmp_path, recursive=recursive)
        assert str(e.value).startswith(f"{tmp_path / bad}: cannot be checked (Permission denied)")
    locked.clear()
    locked.update(["sub", "notes"])  # not searched, not named like an image: not listed anyway
    (tmp_path / "x.png").unlink()
    assert list_images(tmp_path, recursive=False) == [tmp_path / "ok.png"]


def test_images_of_formats_not_read_are_said(tmp_path):
    """A folder of ground truths partly in formats not read (.gif, .ppm, .exr, ...) was listed
    without them and without a word: sr_eval.py scored fewer images than the folder holds, and a
    folder of them alone said only 'no images found'. Now a warning names how many and one,
    and the error says what is there; other files (notes, JSON) are no images: nothing said."""
    for name in ["0801.png", "0802.GIF", "0803.ppm", "0804.exr", "notes.txt", "manifest.json"]:
        (tmp_path / name).write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        assert list_images(tmp_path, recursive=False) == [tmp_path / "0801.png"]
    assert [str(w.message) for w in caught] == [
        f"{tmp_path}: skipped 3 image(s) of a format not read (e.g. 0802.GIF; read: "
        "png/jpg/jpeg/bmp/tif/tiff/webp); convert them to PNG to include them"
    ]
    (tmp_path / "0801.png").unlink()
    with pytest.raises(DataError) as e:
        list_images(tmp_path, recursive=False)
    assert str(e.value) == (
        f"{tmp_path}: no images found, but 3 image(s) of a format not read (e.g. 0802.GIF; read: "
        "png/jpg/jpeg/bmp/tif/tiff/webp): convert them to PNG"
    )


def test_a_folder_whose_images_are_one_level_down_says_so(tmp_path):
    """sr_sample.py --input and sr_eval.py --hr/--sr read one folder, not its subfolders: a
    dataset given one level too high (DIV2K/ for DIV2K/DIV2K_valid_HR/) said only 'no images
    found'. The line now names a subfolder that holds them."""
    (tmp_path / "DIV2K" / "DIV2K_valid_HR").mkdir(parents=True)
    (tmp_path / "DIV2K" / "DIV2K_valid_HR" / "0801.png").write_bytes(b"")
    with pytest.raises(DataError) as e:
        list_images(tmp_path / "DIV2K", recursive=False)
    assert str(e.value) == (
        f"{tmp_path / 'DIV2K'}: no images found (png/jpg/jpeg/bmp/tif/tiff/webp); subfolders are "
        f"not searched: give the one holding them ({tmp_path / 'DIV2K' / 'DIV2K_valid_HR'})"
    )
    assert [p.name for p in list_images(tmp_path / "DIV2K")] == ["0801.png"]  # --data: searched


def test_list_images_orders_by_stem_everywhere(tmp_path):
    """cat.png / cat-2.png and photo.png / photo (1).png sort by stem (the NTIRE index order)."""
    for name in ["cat-2.png", "cat.png", "photo (1).png", "photo.png", "b.png"]:
        (tmp_path / name).write_bytes(b"")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["b.png", "cat.png", "cat-2.png", "photo.png", "photo (1).png"]
    assert sorted(names) != names  # a plain name sort would swap them


def test_list_images_follows_symlinks_and_skips_non_images(tmp_path):
    """Datasets are symlinked: linked folders and files are followed (a loop only once); folders
    named like images, links to missing files (one warning) and macOS `._` files are not images."""
    real = tmp_path / "real"
    (real / "deep").mkdir(parents=True)
    (real / "deep" / "x.png").write_bytes(b"")
    (real / "y.png").write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"")
    (data / "linked").symlink_to(real, target_is_directory=True)
    (data / "linked_file.png").symlink_to(real / "y.png")
    (real / "loop").symlink_to(data, target_is_directory=True)  # data/linked/loop -> data
    (data / "dir.png").mkdir()
    (data / "gone.png").symlink_to(tmp_path / "missing.png")
    (data / "._a.png").write_bytes(b"")
    (data / "gone.txt").symlink_to(tmp_path / "missing.txt")  # not named like an image: no word
    warning = re.escape(f"{data}: skipped 1 symbolic link(s) to missing files (gone.png -> ")
    with pytest.warns(
        UserWarning, match=warning + re.escape(f"{tmp_path / 'missing.png'})")
    ) as seen:
        names = [p.relative_to(data).as_posix() for p in list_images(data)]
    assert names == ["a.png", "linked/deep/x.png", "linked/y.png", "linked_file.png"]
    assert len(seen) == 1
    with pytest.warns(UserWarning, match=warning):
        assert [p.name for p in list_images(data, recursive=False)] == ["a.png", "linked_file.png"]


def test_mod_crop_tensor_conversions():
    img = rand_img(37, 50)
    assert mod_crop(img, 8).shape == (32, 48, 3) and np.array_equal(mod_crop(img, 8), img[:32, :48])
    t = to_tensor(img)
    assert t.dtype == torch.float32 and t.shape == (3, 37, 50) and 0 <= t.min() <= t.max() <= 1
    assert np.array_equal(to_uint8(t), img)
    x = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.0, 3.0, float("nan")]).view(1, 1, 1, 7)
    assert to_uint8(x).ravel().tolist() == [0, 0, 0, 1, 255, 255, 0]
    assert to_uint8(torch.rand(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_dihedral_is_the_group_of_8():
    img = rand_img(4, 4)
    outs = {dihedral(img, t).tobytes() for t in range(8)}
    assert len(outs) == 8 and np.array_equal(dihedral(img, 0), img)


# ---------------------------------------------------------------------------------------------
# Training pairs


@pytest.fixture
def hr_dir(tmp_path):
    """Five smooth HR images of different sizes, none a multiple of 4 in both directions."""
    folder = tmp_path / "hr"
    folder.mkdir()
    for i, (h, w) in enumerate([(70, 90), (64, 64), (99, 50), (45, 130), (80, 81)]):
        write_png(folder / f"{i + 1:04d}.png", smooth_img(h, w, seed=i))
    return folder


def test_patch_pairs_shapes_and_alignment(hr_dir):
    ds = PatchPairs([hr_dir], scale=4, patch=8, batch=12, seed=3)
    lr, hr = ds[7]
    assert lr.shape == (12, 3, 8, 8) and hr.shape == (12, 3, 32, 32)
    assert lr.dtype == hr.dtype == torch.float32 and 0 <= lr.min() and hr.max() <= 1
    files = list_images(hr_dir)
    idx, ys, xs, ts = ds.plan(7)
    assert len(set(ts.tolist())) > 1  # flips/rotations are drawn
    for b, (i, y, x, t) in enumerate(zip(idx, ys, xs, ts)):
        whole_hr = mod_crop(read_image(files[i]), 4)
        whole_lr = imresize(whole_hr, 1 / 4)  # LR from the whole image, not from the patch
        assert np.array_equal(to_uint8(lr[b]), dihedral(whole_lr[y : y + 8, x : x + 8], t))
        hr_crop = whole_hr[4 * y : 4 * y + 32, 4 * x : 4 * x + 32]
        assert np.array_equal(to_uint8(hr[b]), dihedral(hr_crop, t))


def test_patch_pairs_is_a_function_of_seed_rank_step(hr_dir):
    ds = PatchPairs([hr_dir], scale=4, patch=8, batch=4, seed=0)
    again = PatchPairs([hr_dir], scale=4, patch=8, batch=4, seed=0)
    for step in (0, 5, 10**6):
        assert all(torch.equal(a, b) for a, b in zip(ds[step], again[step]))
    assert not torch.equal(ds[1][1], ds[2][1])
    assert not torch.equal(ds[1][1], PatchPairs([hr_dir], 4, 8, 4, rank=1)[1][1])
    assert not torch.equal(ds[1][1], PatchPairs([hr_dir], 4, 8, 4, seed=1)[1][1])
    plain = PatchPairs([hr_dir], 4, 8, 4, augment=False)
    assert (plain.plan(3)[3] == 0).all()


def test_train_loader_independent_of_workers_and_resumable(hr_dir):
    ds = PatchPairs([hr_dir], scale=4, patch=8, batch=3, seed=5)
    serial = list(train_loader(ds, 2, 8, workers=0))
    parallel = list(train_loader(ds, 2, 8, workers=2))
    resumed = list(train_loader(ds, 5, 8, workers=0))
    assert len(serial) == len(parallel) == 6
    for (a_lr, a_hr), (b_lr, b_hr), step in zip(serial, parallel, range(2, 8)):
        assert torch.equal(a_lr, b_lr) and torch.equal(a_hr, b_hr)
        assert torch.equal(a_hr, ds[step][1])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(serial[3:], resumed))
    on_cpu = list(train_loader(ds, 2, 4, workers=0, device="cpu"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(serial, on_cpu))
    # the loader leaves the global torch RNG alone, so resuming restores the model's stream
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(train_loader(ds, 0, 2, workers=0)))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork: Linux's loader workers")
def test_loader_workers_are_forked_where_python_would_start_them_from_a_fork_server(hr_dir):
    """Python 3.14 makes the fork server Linux's default start method: each worker would import
    torch again and get its own pickled copy of the decoded images. The workers are forked from
    this process whatever the default (here set to the fork server, as 3.14's is)."""
    ds = PatchPairs([hr_dir], scale=4, patch=8, batch=3, seed=5)
    others = set(multiprocessing.active_children())
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        batches = iter(train_loader(ds, 0, 4, workers=2))
        next(batches)
        workers = [p for p in multiprocessing.active_children() if p not in others]
        parents = [int(Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                   for w in workers]  # fmt: skip
        batches.close()
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert len(workers) == 2 and parents == [os.getpid()] * 2, parents


@pytest.mark.parametrize("platform, start", [("darwin", "spawn"), ("freebsd14", "fork")])
def test_loader_workers_never_start_from_a_fork_server_off_linux(hr_dir, monkeypatch, platform,
                                                                 start):  # fmt: skip
    """Off Linux the loader took Python's default start method: the fork server where it is the
    default (3.14's, on POSIX systems but macOS) or a program sets it (here), which forks the
    workers from a server started before their start, with its signal mask, not the stop
    signals blocked (`_FloatLoader.__iter__`). macOS spawns them (its default), others fork."""
    ds = PatchPairs([hr_dir], scale=4, patch=8, batch=3, seed=5)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        monkeypatch.setattr(sys, "platform", platform)
        loader = train_loader(ds, 0, 4, workers=2)  # (not iterated: no worker started)
        monkeypatch.undo()
        used = (loader.multiprocessing_context or multiprocessing).get_start_method()
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert used == start


def test_a_loader_freed_by_the_garbage_collector_stops_its_workers(hr_dir):
    """The workers ignore SIGTERM. A loader in a reference cycle (a caught traceback's frames:
    a failing test) is freed by the garbage collector, which closed its queues before torch's
    stop message was sent: its workers lived on, and the process's exit waited for them forever
    (a failing test hung the whole test run). In a child process, which must exit."""
    code = f"""if True:
        import gc, multiprocessing, sys
        from sr_lib.data import PatchPairs, train_loader
        loader = train_loader(PatchPairs([{str(hr_dir)!r}], 4, 8, 2), 0, 5, workers=2)
        batches = iter(loader)
        next(batches)
        workers = multiprocessing.active_children()
        cycle = [loader, batches]
        cycle.append(cycle)
        del loader, batches, cycle
        gc.collect()
        print(len(workers), sum(w.is_alive() for w in workers))
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "0"]  # two workers started, none left


def test_small_images_skipped_with_one_warning(hr_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = PatchPairs([hr_dir], scale=4, patch=16, batch=2)  # HR patch 64: 2 of 5 too small
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "skipped 2 of 5 training images smaller than one 64x64" in msgs[0]
    assert len(ds.names) == 3 and ds[0][1].shape == (2, 3, 64, 64)
    with pytest.raises(DataError, match="no training images; all 5 are smaller"):
        PatchPairs([hr_dir], scale=4, patch=40)
    (hr_dir.parent / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images found"):
        PatchPairs([hr_dir.parent / "empty"], scale=4)


def test_an_image_reached_twice_is_drawn_as_often_as_the_others(hr_dir, tmp_path):
    """The same folder given twice, a folder and its parent, a link to a folder or to a file:
    each image is used once (it was drawn twice as often as the others), with one warning."""
    one = PatchPairs([hr_dir], scale=4, patch=8, batch=4)
    parent = hr_dir.parent
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "hr again").symlink_to(hr_dir)
    (hr_dir / "0001 copy.png").symlink_to(hr_dir / "0001.png")  # a link to a file beside it
    os.link(hr_dir / "0002.png", hr_dir / "0002 hard.png")  # a hard link: one file too
    for sources in ([hr_dir], [hr_dir, hr_dir], [hr_dir, parent], [hr_dir, tmp_path / "links"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = PatchPairs(sources, scale=4, patch=8, batch=4)
        assert ds.names == one.names, sources  # the first name of each, in order
        assert all(torch.equal(a, b) for a, b in zip(ds[3], one[3]))  # the same draws
        msgs = [str(w.message) for w in caught]
        twice = 2 + 7 * (len(sources) - 1)  # 7 files in hr_dir now, 5 images
        assert msgs == [
            f"--data: {twice} image(s) reached twice (a folder given twice, inside another, or "
            f"linked) are used once, e.g. {hr_dir / '0001 copy.png'} is {hr_dir / '0001.png'}"
        ], sources


def test_paired_lr_folder_with_div2k_names(hr_dir, tmp_path):
    lr_dir = tmp_path / "X4"
    lr_given = {}
    for f in list_images(hr_dir):
        h, w = read_image(f).shape[:2]
        lr_given[f.stem] = rand_img(h // 4, w // 4, seed=int(f.stem))  # not bicubic: must be used
        write_png(lr_dir / f"{f.stem}x4.png", lr_given[f.stem])
    ds = PatchPairs([hr_dir], scale=4, patch=8, batch=6, lr_dirs=[lr_dir])
    lr, _ = ds[0]
    for b, (i, y, x, t) in enumerate(zip(*ds.plan(0))):
        expected = lr_given[list_images(hr_dir)[i].stem][y : y + 8, x : x + 8]
        assert np.array_equal(to_uint8(lr[b]), dihedral(expected, t))
    # identical stems work too; a wrong LR size names both files
    (lr_dir / "0002x4.png").unlink()
    write_png(lr_dir / "0002.png", rand_img(15, 16))
    wrong = r"0002.png: LR is 16x15, but its HR .*0002.png \(64x64\) at --scale 4 needs 16x16; give"
    with pytest.raises(DataError, match=wrong) as e:
        PatchPairs([hr_dir], scale=4, patch=8, lr_dirs=[lr_dir])
    assert "(this one is x4 in width, x4.27 in height)" in str(e.value)  # not "x4": a row short
    (lr_dir / "0002.png").unlink()
    with pytest.raises(DataError, match="0002.png: no LR image 0002x4"):
        PatchPairs([hr_dir], scale=4, patch=8, lr_dirs=[lr_dir])
    with pytest.raises(UsageError, match="got 2 LR folders for 1 HR folders"):
        PatchPairs([hr_dir], scale=4, patch=8, lr_dirs=[lr_dir, lr_dir])


@pytest.mark.parametrize("div2k", [False, True])
def test_hr_names_that_are_others_div2k_names_pair_each_with_its_own_lr(div2k, tmp_path):
    """HR 0001.png and 0001x4.png (and "a b.png"), their LR named alike: LR 0001x4.png was taken
    for both at x4 (DIV2K's name first), 0001.png's own LR never, without a word. With DIV2K's
    names (0001x4.png, 0001x4x4.png) each takes its own too."""
    rng = np.random.default_rng(0)
    given = {}
    for stem in ("0001", "0001x4", "a b"):
        write_png(tmp_path / "hr" / f"{stem}.png", rand_img(32, 32))
        given[stem] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        write_png(tmp_path / "lr" / f"{stem}{'x4' * div2k}.png", given[stem])
    ds = PatchPairs([tmp_path / "hr"], scale=4, patch=8, lr_dirs=[tmp_path / "lr"])
    assert [Path(name).stem for name in ds.names] == ["0001", "0001x4", "a b"]
    assert all(np.array_equal(ds._lr[i], given[stem]) for i, stem in enumerate(given))


def test_an_hr_whose_div2k_named_lr_is_another_hrs_own_is_told_so(tmp_path):
    """HR 0001.png and 0001x4.png, the LR folder holding 0001x4.png alone: that LR is HR
    0001x4.png's own (`lr_partners`), and 0001.png's line said "no LR image 0001x4.* or 0001.*",
    a file that is there; sr_eval.py's --lr says the same (`lr_taken`)."""
    for stem in ("0001", "0001x4"):
        write_png(tmp_path / "hr" / f"{stem}.png", rand_img(32, 32))
    write_png(tmp_path / "lr" / "0001x4.png", rand_img(8, 8))
    with pytest.raises(DataError) as e:
        PatchPairs([tmp_path / "hr"], scale=4, patch=8, lr_dirs=[tmp_path / "lr"])
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    assert str(e.value) == (
        f"{hr}/0001.png: no LR image 0001x4.* or 0001.* in {lr} (0001x4.png is the LR of HR "
        "image 0001x4, which the HR folder holds too)"
    )


def test_an_odd_sized_hr_pairs_with_its_lr_of_either_rounding(tmp_path):
    """imresize(HR, 1/2) of a 43x41 HR is 22x21 (MATLAB rounds up): it was refused ("pair LR
    images made with this scale"), as only the 21x20 of the HR cropped to even size was taken."""
    hr = smooth_img(41, 43)
    (tmp_path / "hr").mkdir()
    write_png(tmp_path / "hr" / "a.png", hr)
    for name, lr in [("ceil", imresize(hr, 1 / 2)), ("floor", imresize(mod_crop(hr, 2), 1 / 2))]:
        write_png(tmp_path / name / "a.png", lr)
        ds = PatchPairs([tmp_path / "hr"], scale=2, patch=8, lr_dirs=[tmp_path / name])
        assert np.array_equal(ds._hr[0], hr[:40, :42]), name
        assert np.array_equal(ds._lr[0], lr[:20, :21]), name  # the top-left part: aligned
    write_png(tmp_path / "x4" / "a.png", imresize(hr, 1 / 4))
    message = r"a.png: LR is 11x11, but its HR .* \(43x41\) at --scale 2 needs 21x20 \(or 22x21\)"
    with pytest.raises(DataError, match=message + r"; give --lr-data the LR images of these HR"):
        PatchPairs([tmp_path / "hr"], scale=2, patch=8, lr_dirs=[tmp_path / "x4"])


def test_cache_headers_are_read_one_thread_at_a_time(hr_dir, tmp_path, monkeypatch):
    """numpy parses a .npy header with ast.literal_eval, and CPython's AST constructor is not
    safe in two threads at once: a --cache read by the loading threads failed now and then with
    "SystemError: AST constructor recursion depth mismatch" (Python 3.11)."""
    cache = tmp_path / "cache"
    PatchPairs([hr_dir], scale=4, patch=8, batch=5, cache=cache)
    real, guard, inside, most = np.lib.format.read_array_header_1_0, threading.Lock(), [0], [0]

    def slow_header(f):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)  # long enough for another thread to come in
        try:
            return real(f)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", slow_header)
    monkeypatch.setattr(data, "cpu_workers", lambda: 4)  # four loading threads on any machine
    PatchPairs([hr_dir], scale=4, patch=8, batch=5, cache=cache)
    assert most[0] == 1


def test_cache_reads_memmaps_without_decoding(hr_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = PatchPairs([hr_dir], scale=4, patch=8, batch=5, cache=cache)
    assert len(list(cache.glob("*.npy"))) == 10 and not list(cache.glob(".*"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data, "read_image", no_decoding)
    monkeypatch.setattr(data, "imresize", no_decoding)
    second = PatchPairs([hr_dir], scale=4, patch=8, batch=5, cache=cache)
    assert isinstance(second._array(second._hr[0]), np.memmap)
    for step in (0, 1, 99):
        assert all(torch.equal(a, b) for a, b in zip(first[step], second[step]))
    # an edited image is decoded again (its cache name hashes its size and times)
    monkeypatch.undo()
    target = hr_dir / "0001.png"
    write_png(target, smooth_img(72, 92, seed=9))
    os.utime(target, ns=(0, 10**18))
    PatchPairs([hr_dir], scale=4, patch=8, batch=5, cache=cache)
    assert len(list(cache.glob("*.npy"))) == 12


@OPENS_GROUP
def test_a_second_start_takes_the_lr_sizes_from_the_cache_headers_it_checks(opens_counted):
    """At each start every cached .lr.npy was opened again (np.load as a memmap: four opens) only
    to read its size, after its header had been checked: with 20,000 images on a network file
    system, minutes. Now the checked header gives the size: one open per cache file, none of
    the images."""
    files = {str(f): 1 for f in opens_counted.cache.glob("*.npy")}
    assert len(files) == 6 and opens_counted.start == files  # no image; each cache file once
    assert opens_counted.lr_hw == [[8, 10], [9, 8], [11, 12]]


def test_an_image_replaced_by_cp_p_is_decoded_again(tmp_path):
    """`cp -p` over an image keeps its byte size and takes the new file's mtime, which may be
    the old one's (two versions of a data set unpacked from archives of the same date): the
    cache, named by path, size and mtime, kept the old arrays and trained on them. The name now
    also hashes the inode and the change time, which such a replacement sets (and `rsync -a`
    gives a copy: its arrays are made again, never taken from another file's)."""
    folder, cache = tmp_path / "hr", tmp_path / "cache"
    folder.mkdir()
    old, new = folder / "a.png", tmp_path / "new.png"
    for f, seed in ((old, 1), (new, 2)):  # stored, not compressed: the same byte size
        Image.fromarray(smooth_img(48, 40, seed=seed)).save(f, compress_level=0)
        os.utime(f, ns=(0, 10**18))  # the same mtime
    assert old.stat().st_size == new.stat().st_size
    first = PatchPairs([folder], scale=4, patch=8, cache=cache)
    assert np.array_equal(first._array(first._hr[0]), smooth_img(48, 40, seed=1))
    time.sleep(0.05)  # past the coarse clock's tick that stamped the old change time
    subprocess.run(["cp", "-p", str(new), str(old)], check=True)
    assert old.stat().st_mtime_ns == 10**18
    second = PatchPairs([folder], scale=4, patch=8, cache=cache)
    assert np.array_equal(second._array(second._hr[0]), smooth_img(48, 40, seed=2))
    assert len(list(cache.glob("*.npy"))) == 4  # the old pair stays, unused


def test_cache_files_cut_short_are_decoded_again(hr_dir, tmp_path):
    """A node that crashed can leave cache files empty or cut short (they are not fsync'd): an
    EOFError at start (an empty .lr.npy), or a loader worker's ValueError mid-run (an .hr.npy cut
    short: only its header is read at start). Each is checked at start, named in a warning, and
    its image decoded and cached again."""
    cache = tmp_path / "cache"
    first = PatchPairs([hr_dir], scale=4, patch=8, batch=5, cache=cache)
    arrays = {x: np.load(x) for x in first._hr + first._lr}
    batches = [first[step] for step in range(20)]
    empty, short = next(cache.glob("0001-*.lr.npy")), next(cache.glob("0002-*.hr.npy"))
    empty.write_bytes(b"")
    os.truncate(short, 1000)
    with pytest.warns(UserWarning) as caught:
        second = PatchPairs([hr_dir], scale=4, patch=8, batch=5, cache=cache)
    assert sorted(str(w.message) for w in caught) == [
        f"--cache: {empty}: cut short or not this image's arrays; decoding {hr_dir / '0001.png'} "
        "again",
        f"--cache: {short}: cut short or not this image's arrays; decoding {hr_dir / '0002.png'} "
        "again",
    ]
    assert second._hr + second._lr == list(arrays)
    for x, a in arrays.items():
        assert np.array_equal(np.load(x), a)  # whole again, the same arrays
    for step, batch in enumerate(batches):
        assert all(torch.equal(a, b) for a, b in zip(batch, second[step]))


def test_a_cache_file_gone_in_a_loader_worker_is_made_again_or_one_error(hr_dir, tmp_path):
    """Cache files deleted after the start (a purged scratch folder), met in a loader worker:
    made again from their images, the same batches; with the images gone too, the worker's
    DataError reaches the caller as itself (torch would raise it again with the worker's
    traceback in its message), naming the image."""
    cache = tmp_path / "cache"
    ds = PatchPairs([hr_dir], scale=4, patch=8, batch=5, cache=cache)
    expected = [ds[step] for step in range(3)]
    for f in cache.iterdir():
        f.unlink()
    data._open_npy.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (said by the workers)
        got = list(train_loader(ds, 0, 3, workers=2))
    assert all(torch.equal(a, b) for x, y in zip(got, expected) for a, b in zip(x, y))
    assert len(list(cache.iterdir())) == 10
    for f in cache.iterdir():
        f.unlink()
    hr_dir.rename(tmp_path / "away")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError) as e:
            next(iter(train_loader(ds, 0, 3, workers=2)))
    assert re.fullmatch(
        rf"{re.escape(str(hr_dir))}/000\d.png: no such file, and its --cache file "
        r"is gone",
        str(e.value),
    ), str(e.value)


def test_demo_images_split_and_dataset():
    train, val = demo_images("train"), demo_images("val")
    train_names, val_names = [n for n, _ in train], [n for n, _ in val]
    assert len(val) == 3 and len(train) >= 4 and not set(train_names) & set(val_names)
    assert {"motorcycle_left", "motorcycle_right"} <= set(train_names)
    assert all(img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 for _, img in train)
    again = demo_images("val")
    assert [n for n, _ in again] == val_names
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(val, again))
    lr, hr = PatchPairs("demo", scale=8, batch=2)[0]
    assert lr.shape == (2, 3, 32, 32) and hr.shape == (2, 3, 256, 256)


def test_load_pairs(hr_dir):
    pairs = load_pairs(hr_dir, scale=4, max_images=2)
    assert [s for s, _, _ in pairs] == ["0001", "0002"]
    stem, hr, lr = pairs[0]
    assert hr.shape == (64, 88, 3) and lr.shape == (16, 22, 3)  # NTIRE: HR to a multiple of 8
    assert np.array_equal(lr, imresize(hr, 1 / 4))
    _, hr3, lr3 = load_pairs(hr_dir, scale=3)[0]
    assert hr3.shape == (69, 90, 3) and lr3.shape == (23, 30, 3)
    demo = load_pairs("demo", scale=4)
    assert [s for s, _, _ in demo] == [n for n, _ in demo_images("val")]
    assert all(h.shape[0] % 8 == 0 and l.shape[0] * 4 == h.shape[0] for _, h, l in demo)


def test_output_checks(tmp_path, read_only_dir):
    """Output paths are checked before long work: one line (OutputError, exit 7) naming them."""
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError) as e:
        check_out_dir(tmp_path / "file")
    assert str(e.value) == f"--out {tmp_path / 'file'}: {describe_path(tmp_path / 'file')}"
    with pytest.raises(OutputError) as e:
        check_out_file(tmp_path / "new")
    said = describe_path(tmp_path / "new", "file", example="out.json")
    assert str(e.value) == f"--out {tmp_path / 'new'}: {said}"
    assert said.startswith("a folder, not a file; give a file, e.g. ")
    assert check_out_file(tmp_path / "sub" / "r.json") == tmp_path / "sub" / "r.json"
    assert not any(p.name.startswith(".srspace-probe") for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match="ro: cannot write there .Permission denied"):
        check_out_dir(read_only_dir)


def test_write_text_is_atomic_on_a_full_disk(tmp_path):
    """A failed write (here: a full disk) leaves neither a partial file nor a temp file."""
    write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"
    real_open = open

    class FullDisk:  # the temp file is created, then writing to it fails
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    with mock.patch("builtins.open", FullDisk):
        with pytest.raises(OutputError, match="b.json: cannot write .No space left on device"):
            write_text(tmp_path / "b.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# ----------------------------------------------------------------------------- read_ahead


@pytest.fixture
def image_groups(tmp_path):
    """Three groups shaped like sr_eval's: (GT, optional LR, {method: [samples]})."""
    groups = []
    for k in range(3):
        files = [tmp_path / f"img {k} {i}.png" for i in range(4)]  # spaces, shared prefixes
        for i, f in enumerate(files):
            write_png(f, rand_img(6 + k, 5 + i, seed=10 * k + i))
        groups.append((files[0], None, {"a": files[1:3], "b": [files[3]]}))
    return groups


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_read_ahead_equals_reading_one_by_one(image_groups, workers):
    got = list(read_ahead(image_groups, workers=workers))
    assert len(got) == len(image_groups)
    for (gt, lr, samples), (gt_f, _, sample_f) in zip(got, image_groups):
        assert lr is None and list(samples) == ["a", "b"]
        assert np.array_equal(gt, read_image(gt_f))
        for m in sample_f:
            assert len(samples[m]) == len(sample_f[m])
            for img, f in zip(samples[m], sample_f[m]):
                assert img.dtype == np.uint8 and np.array_equal(img, read_image(f))


def test_read_ahead_decodes_in_parallel_and_ahead(image_groups, monkeypatch):
    started = threading.Barrier(2, timeout=10)  # broken (an error) unless two reads overlap
    ahead = threading.Event()
    real = data.read_image

    def reader(path):
        if path == image_groups[0][2]["a"][0]:
            started.wait()
        if path == image_groups[0][2]["a"][1]:
            started.wait()
        if path == image_groups[1][0]:
            ahead.set()
        return real(path)

    monkeypatch.setattr(data, "read_image", reader)
    images = read_ahead(image_groups, workers=2)
    next(images)
    # the caller holds group 0: group 1's files are being decoded meanwhile
    assert ahead.wait(timeout=10)
    assert len(list(images)) == 2


def test_read_ahead_error_names_the_first_bad_file_of_its_group(image_groups):
    bad1, bad2 = image_groups[1][2]["a"][1], image_groups[1][2]["b"][0]
    bad1.write_bytes(b"not an image")
    bad2.write_bytes(bad2.read_bytes()[:60])
    for workers in (1, 3):
        images = read_ahead(image_groups, workers=workers)
        assert np.array_equal(next(images)[0], read_image(image_groups[0][0]))  # group 0 is fine
        with pytest.raises(ImageError) as e:
            next(images)
        assert str(bad1) in str(e.value) and str(bad2) not in str(e.value)
        assert not [t for t in threading.enumerate() if t.name.startswith("read_ahead")]


def test_read_ahead_pool_ends_when_the_caller_stops_early(image_groups):
    images = read_ahead(image_groups, workers=3)
    next(images)
    images.close()  # e.g. the caller's own error on group 0
    assert not [t for t in threading.enumerate() if t.name.startswith("read_ahead")]


def test_read_ahead_finalised_in_another_thread_does_not_wait_for_its_workers(
    image_groups, monkeypatch
):
    """The garbage collector finalises an abandoned read_ahead in whatever thread it runs, once
    one of its own workers importing a module (sr_eval in a test session hung so): closing it
    there must not join workers that wait for a lock that thread holds."""
    lock, real = threading.Lock(), data.read_image
    held, go, blocked, finished = (threading.Event() for _ in range(4))
    later = {f for group in image_groups[1:] for f in [group[0], *group[2]["a"], *group[2]["b"]]}

    def reader(path):
        if path in later:  # group 1 on: wait for the lock, like the import lock held below
            blocked.set()
            with lock:
                pass
        return real(path)

    def finalise_holding_the_lock():
        with lock:
            held.set()
            go.wait(timeout=20)
            images.close()  # what garbage collection does to the suspended generator
        finished.set()

    monkeypatch.setattr(data, "read_image", reader)
    threading.Thread(target=finalise_holding_the_lock, daemon=True).start()
    assert held.wait(timeout=20)
    images = read_ahead(image_groups, workers=2)
    next(images)  # group 0; group 1's files are queued and wait for the lock
    assert blocked.wait(timeout=20)
    go.set()
    assert finished.wait(timeout=20), "closing from another thread waited for the workers"
    for t in [t for t in threading.enumerate() if t.name.startswith("read_ahead")]:
        t.join(timeout=20)  # they end on their own once the lock is free
        assert not t.is_alive()


def test_cpu_workers_follows_affinity_and_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert data.cpu_workers() == cores
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert data.cpu_workers() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4096")  # never more than the cores we may use
    assert data.cpu_workers() == cores
    for junk in ("", "0", "two"):
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", junk)
        assert data.cpu_workers() == cores


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"),
                                   EOFError(), RuntimeError("DataLoader worker (pid(s) 7) "
                                                            "exited unexpectedly")])  # fmt: skip
def test_a_worker_killed_with_a_batch_in_the_queue_is_a_worker_died(error, monkeypatch):
    """A worker SIGKILLed with a batch in the queue: receiving that batch's file descriptors
    meets the worker's reset socket (ConnectionResetError) before the kernel has reaped the
    worker, and torch raises it as it is. The loader waits for the worker to be seen dead and
    says so in one line (WorkerDied, exit 4), as for torch's own "exited unexpectedly"."""
    import types

    monkeypatch.setattr(data, "WORKER_REAP_WAIT", 1.0)
    worker = types.SimpleNamespace(exitcode=None, pid=7)
    if not isinstance(error, RuntimeError):  # reaped 0.2 s later
        threading.Timer(0.2, lambda: setattr(worker, "exitcode", -9)).start()
    else:
        worker.exitcode = -9

    class Batches:
        _workers = [types.SimpleNamespace(exitcode=None, pid=6), worker]

        def __next__(self):
            raise error

    with pytest.raises(data.WorkerDied, match=r"worker \(pid 7\) was killed by SIGKILL"):
        data._FloatLoader._next(types.SimpleNamespace(), Batches())
    worker.exitcode = 0  # a worker that exited cleanly is no death: torch's error as it is
    with pytest.raises(type(error)):
        data._FloatLoader._next(types.SimpleNamespace(), Batches())


def test_a_pillow_error_of_several_lines_is_joined_by_the_rule(tmp_path, monkeypatch):
    """Pillow's text of several lines, in the line of a file it cannot read, was flattened by
    a rule of its own (its words joined by spaces: "header: width 0 height 0", the line breaks
    lost); it is joined as every library's text (`joined_lines`: "header: width 0; height 0")."""
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)

    text = "bad header:\n  width 0\n  height 0"

    def broken(*args, **kwargs):
        raise ValueError(text)

    monkeypatch.setattr(data.Image, "open", broken)
    with pytest.raises(data.ImageError) as e:
        data.read_image(path)
    said = "not a readable image (ValueError: bad header: width 0; height 0)"
    assert str(e.value) == f"{path}: {said}"
    # whole, as SRSPACE_FULL_ERRORS=1 shows none after it: its own length decides, not the line's
    text = f"bad header:\n{'x' * 280}\nend"
    with pytest.raises(data.ImageError) as e:
        data.read_image(path)
    assert str(e.value).endswith(f"(ValueError: bad header: {'x' * 280}; end)")


def test_the_folders_a_listing_suggests_are_quoted_for_a_shell(tmp_path, monkeypatch):
    """The folder a listing's line says to give (its images one level down) or to move an
    unreadable entry out of, in a folder with a space: written bare (two words where pasted);
    quoted (`shell_quote`), as every path srspace suggests."""
    top = tmp_path / "my data"
    (top / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(top / "sub" / "a.png")
    with pytest.raises(DataError) as e:
        list_images(top, recursive=False)
    assert str(e.value).endswith(f"give the one holding them ({shell_quote(top / 'sub')})")
    real = os.scandir

    class Locked:  # a DirEntry whose stat fails with EACCES
        def __init__(self, entry):
            self.name, self.path = entry.name, entry.path

        def is_dir(self):
            raise PermissionError(13, "Permission denied", self.path)

        def is_symlink(self):
            return False

    monkeypatch.setattr(os, "scandir", lambda path: [Locked(e) for e in real(path)])
    with pytest.raises(DataError) as e:
        list_images(top)
    assert str(e.value).endswith(f"move it out of {shell_quote(top)}")
