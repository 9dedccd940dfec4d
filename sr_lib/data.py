"""Images in, images out, and training pairs.

`read_image` is the one entry point for every image the toolkit reads: it always returns uint8 HWC
RGB and raises `ImageError` (a `DataError`, exit code 3) naming the file and the reason otherwise.
`read_planes` is the same reader (sr_sample.py's inputs) keeping what read_image drops: gray,
alpha, 16 bits.

Training batches come from `PatchPairs`, a map-style dataset whose item `step` is the whole batch
of training step `step`, drawn from `np.random.default_rng([seed, rank, step])`. The batch stream is
therefore the same for any number of loader workers, and resuming at step t continues it exactly.
"""

import atexit
import collections
import contextlib
import difflib
import errno
import hashlib
import importlib.util
import io
import math
import multiprocessing.resource_tracker
import multiprocessing.util  # (registers its exit handler before ours, below)
import os
import re
import shlex
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
import zipfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, NoReturn

import imageio.v3 as iio
import numpy as np
import png  # pypng: Pillow truncates 16-bit RGB(A) PNGs to 8 bits (x >> 8) before we can round
import torch
from PIL import Image, TiffImagePlugin, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from sr_lib.config import nearest_choice
from sr_lib.errors import (
    PREEMPT_SIGNALS,
    DataError,
    NodeWarning,
    OutOfMemory,
    OutputError,
    Resumable,
    SRSpaceError,
    UsageError,
    escaped,
    joined_lines,
)
from sr_lib.resize import contributions, imresize
from sr_lib.threads import finish, new_pool, result, signals_held, submit, thread_map

try:  # libpng: plain 8-bit RGB PNGs in half Pillow's time, off the GIL (README, "Dependencies")
    import imagecodecs
except ImportError:  # a platform without its wheels: Pillow decodes every file
    imagecodecs = None

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Other image formats, not read: a folder's files of them are skipped with a warning (`list_images`)
OTHER_IMAGE_EXTENSIONS = (
    *(".gif", ".apng", ".jfif", ".jpe", ".jp2", ".j2k", ".jpx", ".jxl", ".heic", ".heif", ".avif"),
    *(".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".tga", ".dib", ".ico", ".psd", ".qoi", ".sgi"),
    *(".pcx", ".exr", ".hdr", ".dng"),
)


def pixel_limit(text: str | None) -> int | None:
    """The value of $SRSPACE_MAX_PIXELS: a positive whole number, also written as 1e9; 2^28 if
    unset; None if it is not such a number (read_image then says so: not a traceback at import)."""
    if text is None:
        return 2**28
    with contextlib.suppress(ValueError):
        n = int(text)  # exact, however large
        return n if n > 0 else None
    with contextlib.suppress(ValueError):
        x = float(text)  # 1e9; inf and nan are no integers
        return int(x) if x > 0 and x.is_integer() else None
    return None


# Refuse images above this many pixels before decoding them (a PNG header can claim 100000x100000).
# 2^28 = 268 Mpx (16384 x 16384): a uint8 RGB copy is 805 MB. Override with $SRSPACE_MAX_PIXELS.
MAX_PIXELS = pixel_limit(os.environ.get("SRSPACE_MAX_PIXELS"))
# Pillow has its own bomb limit (89 Mpx by default); ours is the documented one: use it there too.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS or 2**28


class ImageError(DataError):
    """An image file that cannot be read (missing, empty, truncated, not an image, too large)."""


def _fail(path, reason: str) -> NoReturn:
    # one line: a library's text joined where it is quoted (`joined_lines` of its own text, so
    # that it is cut, or not, as SRSPACE_FULL_ERRORS=1's whole text after the line has it)
    raise ImageError(f"{path}: {joined_lines(reason)}")


def read_image(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Read any supported image as uint8 (H, W, 3) RGB.

    Conversions: gray -> 3 channels; RGBA/LA (and a palette's transparency, or a gray or RGB
    PNG's transparent colour) -> alpha dropped with a warning naming the file; 16-bit ->
    8-bit by round(x / 257); palette, CMYK, YCbCr -> RGB; EXIF orientation applied. Float
    images (rare TIFFs) are assumed to be in [0, 1] (clipped to it, with a warning naming the
    file where that moves a pixel by over half an 8-bit level; NaN and -inf read as 0, +inf as 1,
    with a warning naming the file and how many there are). EXIF (or TIFF) tags cut short are
    read as far as they go, with one ExifCorrupt warning naming the file (once a process; Pillow's
    own named none). 16-bit and float TIFFs are
    decoded by libtiff (imagecodecs); other TIFFs by Pillow. `read_planes`
    reads the same pixels and keeps what this drops (gray, alpha, 16 bits).

    The file is read once, whole, and every reader below (the TIFF tags, Pillow's header, the
    PNG bit depth, the decoder) takes those bytes: each open of a file is a call to a cluster
    file system's metadata server.
    `data`: the file's contents, already read (`read_file`): decoded from them with the same
    checks and errors; `path` then only names it in messages. sr_sample.py's control flags hash
    the very bytes they decode.
    """
    return _to_rgb8(_decode(path, data), path)


@dataclass(frozen=True)
class Planes:
    """An image as `read_planes` gives it."""

    rgb: np.ndarray  # (H, W, 3): uint8, read_image's pixels; `wide`: float32 in [0, 1]
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1] at the file's precision; None: opaque
    gray: bool  # one colour channel in the file (gray, gray + alpha, bilevel)


def read_planes(path: str | os.PathLike, data: bytes | None = None, wide: bool = False) -> Planes:
    """Read an image as `read_image` does, keeping what it drops: whether the file is gray, its
    alpha channel (RGBA, LA, palette transparency, a gray or RGB PNG's transparent colour;
    no warning) and, with `wide`, the colour at the file's precision: float32 x / 65535 of 16-bit
    samples (x / 255 of 8-bit ones, as `to_tensor` divides; float TIFFs clipped to [0, 1])
    instead of round(x / 257) to uint8.
    Gray colour is repeated to 3 channels, as read_image's. A palette image counts as RGB (its
    palette may be all gray: not looked at). Same errors as read_image."""
    arr = _samples(_decode(path, data), path)
    c = arr.shape[2]
    alpha = _unit(arr[:, :, -1]) if c in (2, 4) else None
    colour = arr[:, :, : 3 if c > 2 else 1]
    colour = _unit(colour) if wide else _to_8bit(colour)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return Planes(np.ascontiguousarray(colour), alpha, c <= 2)


def _decode(path: str | os.PathLike, data: bytes | None) -> np.ndarray:
    """The pixels of an image file as decoded (read_image's checks and errors): uint8, 16-bit
    integers, bool or float; (H, W) or (H, W, C)."""
    if MAX_PIXELS is None:
        value = os.environ.get("SRSPACE_MAX_PIXELS")
        raise UsageError(
            f"SRSPACE_MAX_PIXELS={value!r} is not a number of pixels; set it to a positive whole "
            f"number (268435456, 1e9) or unset it for the default 2^28"
        )
    path = Path(path)
    if data is None:
        data = read_file(path)
    elif not data:
        _fail(path, "empty file (0 bytes)")
    too_big = f"exceeds the limit of {MAX_PIXELS} pixels (raise it with SRSPACE_MAX_PIXELS)"
    try:
        # Pillow's EXIF warnings, here and in the decode of a file found broken here: one line
        with _exif_said(path) as broken:
            tags = _tiff_tags(io.BytesIO(data))  # None for other formats
            with Image.open(io.BytesIO(data)) as im:  # reads the header only, allocates nothing
                (w, h), mode, fmt = im.size, im.mode, im.format
                transparent = "transparency" in im.info
                if fmt != "PNG" or "exif" in im.info:  # (a PNG's after its pixels: decoded)
                    im.getexif()  # (the decode turns the image by it)
    except Image.DecompressionBombError:
        _fail(path, f"image size {too_big}")
    except UnidentifiedImageError:
        if tags is None:
            _fail(path, "not an image file (unknown format)")
        (w, h), mode, fmt = (tags.get(256, 0), tags.get(257, 0)), None, "TIFF"  # 16-bit LA, float
        transparent = False
    except Exception as e:  # Pillow raises many types for broken headers
        _fail(path, f"not a readable image ({type(e).__name__}: {joined_lines(str(e))})")
    if w * h > MAX_PIXELS:
        _fail(path, f"{w}x{h} {too_big}")
    with _exif_said(path) if broken else contextlib.nullcontext():
        return _decode_pixels(path, data, tags, (w, h), mode, fmt, transparent)


def _decode_pixels(path: Path, data: bytes, tags, size, mode, fmt, transparent) -> np.ndarray:
    """The pixels of the image file `data` whose header `_decode` read (`tags`: its TIFF tags
    or None; Pillow's `size`, `mode`, `fmt`, and whether it has a transparent colour)."""
    w, h = size
    try:
        # 16-bit gray (I;16) is exact in Pillow, but not with its transparent colour (tRNS)
        if _png_bit_depth(data) == 16 and (mode != "I;16" or transparent):
            arr = _read_png16(data)
        # (16-bit gray without libtiff: Pillow's I;16 is exact)
        elif tags is not None and _tiff_wide(tags) and (imagecodecs or not _i16(mode)):
            arr = _read_tiff(path, data, tags)
        elif _raw_ycbcr(tags) and imagecodecs and _jfif_ycbcr(tags):
            # libtiff converts to RGB itself (within 1 of Pillow's conversion); Pillow before 13
            # opens these files as RGB and then calls them truncated
            arr = _upright(imagecodecs.tiff_decode(data, index=0), tags.get(274, 1))
            if arr.shape[:2] != (h, w) or arr.shape[2:] != (3,):
                _fail(path, f"{_tiff_kind(tags)}: decoded as shape {arr.shape}; convert it to RGB")
        elif mode in (None, "LAB", "HSV") or (
            (mode == "YCbCr" or _raw_ycbcr(tags)) and not _jfif_ycbcr(tags)
        ):
            what = _tiff_kind(tags) if tags is not None else f"{mode} image"
            _fail(path, f"{what} is not supported; convert it to an RGB PNG")
        elif (fmt, mode) != ("PNG", "RGB") or (arr := _read_png_rgb8(data)) is None:
            to = {"P": "RGBA" if transparent else "RGB", "PA": "RGBA", "CMYK": "RGB"}.get(mode)
            # a gray or RGB PNG's transparent colour (tRNS) is an alpha channel too
            to = {"1": "LA", "L": "LA", "RGB": "RGBA"}.get(mode, to) if transparent else to
            to = "RGB" if mode == "YCbCr" else to
            bilevel_key = _bilevel_png_key(data) if (fmt, mode) == ("PNG", "1") else None
            to = "L" if bilevel_key is not None else to  # (its alpha made below)
            # index=0: the first frame of animated files; rotate=True applies EXIF orientation.
            # Truncated data raises unless PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set (we never do).
            arr = _pillow(io.BytesIO(data), "r", "read", index=0, mode=to, rotate=True)
            if bilevel_key is not None:  # 0 where a pixel is the transparent level, else 255
                arr = np.dstack([arr, np.where(arr == bilevel_key * 255, 0, 255).astype(np.uint8)])
    except (MemoryError, ImageError):
        raise
    except Exception as e:  # Pillow: OSError("image file is truncated"); pypng: FormatError
        _fail(path, f"cannot decode, the file may be truncated or corrupt ({joined_lines(str(e))})")
    return arr


def _bilevel_png_key(data: bytes) -> int | None:
    """The transparent level (0 or 1) of a bilevel PNG's tRNS chunk, None without one. Pillow
    11 converted such a file to LA as opaque (its info gave the level 1, not 255; 13 does not)."""
    key = next((c[:2] for k, c in _png_chunks(data) if k == b"tRNS"), b"")
    return int.from_bytes(key, "big") & 1 if len(key) == 2 else None


def read_file(path: str | os.PathLike) -> bytes:
    """The contents of an image file, for `read_image(path, data)`: a path that is missing or no
    file, an empty file or one that cannot be read is an `ImageError` naming it, one line."""
    path = Path(path)
    if not path.is_file():
        _fail(path, "not a file" if path.exists() else "no such file")
    if file_stat(path).st_size == 0:
        _fail(path, "empty file (0 bytes)")
    try:
        return path.read_bytes()
    except OSError as e:  # permission denied, a stale NFS handle
        _fail(path, f"cannot read it ({type(e).__name__}: {e.strerror or e})")


def file_stat(path: Path) -> os.stat_result:
    """path.stat() of an image file listed before: one deleted since (a --data folder changed
    while a run starts) or unreadable is an `ImageError` naming it, one line."""
    try:
        return path.stat()
    except FileNotFoundError:
        _fail(path, "no such file")
    except OSError as e:  # permission denied, a stale NFS handle
        _fail(path, f"cannot read it ({type(e).__name__}: {e.strerror or e})")


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The (H, W) of the image `read_image` returns for this file, from its header alone: no
    pixel is decoded (0.1 to 1 ms a file). EXIF orientation included: a quarter turn swaps them
    (a PNG's from its chunks that may hold one, `_png_orientation`). None where the header cannot
    tell: a file Pillow cannot open or read_image refuses by its size (read_image says why)."""
    try:
        # The file is opened once for both readers: sr_sample.py --tile reads the header of every
        # input in every --shard (`one_tile`), 20,000 files each, where two opens a file were
        # 40,000 calls to a cluster's file system.
        with open(path, "rb") as f:
            with _exif_said(path):  # (Pillow's EXIF warnings: one line naming the file)
                tags = _tiff_tags(f)  # read_image turns TIFFs by their tag 274, as Pillow does
            if tags is not None:
                w, h, orientation = tags[256], tags[257], tags.get(274, 1)
            else:
                f.seek(0)
                with _exif_said(path):
                    with Image.open(f) as im:
                        (w, h), orientation = im.size, 1
                        if im.format != "PNG":
                            orientation = im.getexif().get(0x0112, 1)  # JPEG, WebP: the header
                        else:
                            orientation = _png_orientation(f.fileno())
    except Exception:  # Pillow raises many types for broken headers
        return None
    if MAX_PIXELS is None or w * h > MAX_PIXELS:
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# Pillow's modes of an image with an alpha channel (a transparent colour is in its info)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def header_alpha(path: str | os.PathLike) -> bool | None:
    """Whether `read_planes` finds an alpha channel in this file, from its header alone (a PNG's
    or JPEG's Pillow mode and transparent colour: ~0.1 ms a file); None where the header cannot
    tell: another format (a TIFF's extra samples), a file Pillow cannot open, or one read_image
    refuses by its size, as `image_size`: of 2^28 to 2^29 px (MAX_PIXELS to Pillow's error at
    twice its MAX_IMAGE_PIXELS) Image.open printed Pillow's DecompressionBombWarning, and its
    mode was taken for an image the loader refuses; under `_exif_said`, as the loader's."""
    try:
        with _exif_said(path), Image.open(path) as im:
            (w, h), mode, fmt = im.size, im.mode, im.format
            transparent = "transparency" in im.info
    except Exception:  # Pillow raises many types for broken headers
        return None
    if MAX_PIXELS is None or w * h > MAX_PIXELS:
        return None
    if mode in ALPHA_MODES or transparent:
        return True
    return False if fmt in ("PNG", "JPEG") else None


def _png_bit_depth(data: bytes) -> int | None:
    head = data[:25]  # signature (8), IHDR length + type (8), width, height (8), bit depth
    if len(head) < 25 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


# The chunks an 8-bit RGB PNG may have for libpng to decode it: those that leave its pixels as
# Pillow reads them and of which libpng prints nothing. libpng checks gAMA, cHRM, sRGB, iCCP, sBIT,
# bKGD, tIME and zTXt and prints "PNG warning: ..." on stderr for one it finds wrong (a known
# incorrect sRGB profile: a scikit-image demo photograph with imagecodecs 2024.1), a stray line in
# a run's log; Pillow reads those files silently. So do other chunks (tRNS, eXIf, APNG's acTL, a
# text chunk that may hold an orientation). pHYs: once, 9 bytes, before the image data.
_PLAIN_PNG_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"tEXt", b"pHYs"}


def _libpng_reads_silently(data: bytes) -> bool:
    """Whether the PNG's chunks are all of _PLAIN_PNG_CHUNKS, as libpng takes them without a
    warning, and none may hold an orientation."""
    image_data, phys = False, 0
    for span, kind, start in _png_spans(data):
        if kind not in _PLAIN_PNG_CHUNKS or _may_orient(kind, start):
            return False
        image_data |= kind == b"IDAT"
        if kind == b"pHYs":
            phys += 1
            if phys > 1 or image_data or span.stop - span.start != 9 + 12:  # (length, type, CRC)
                return False
    return True


def _read_png_rgb8(data: bytes) -> np.ndarray | None:
    """An 8-bit RGB PNG (the file's bytes) decoded by libpng (imagecodecs): the pixels Pillow
    gives, in half its time.

    None when the file is not a plain 8-bit RGB PNG (see _PLAIN_PNG_CHUNKS) without interlacing
    (imagecodecs calls png_read_image without turning interlace handling on: right pixels, but
    "PNG warning: Interlace handling should be turned on" on stderr), libpng refuses it
    (truncated, corrupt: Pillow then reads it and its error names what is wrong) or imagecodecs is
    missing. An evaluation of 10 samples decodes 11 PNGs of 2040x1352 per image: 0.73 s of a core
    with Pillow, 0.36 s here; both let other threads decode meanwhile.
    """
    if imagecodecs is None:
        return None
    if data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02":  # bit depth 8, colour type 2 (RGB)
        return None
    if data[28:29] != b"\0":  # Adam7: imagecodecs' libpng prints a warning to stderr for each
        return None
    if not _libpng_reads_silently(data):
        return None
    try:
        img = imagecodecs.png_decode(data)
    except Exception:  # imagecodecs.PngError; Pillow says it better
        return None
    return img if img.dtype == np.uint8 and img.shape[2:] == (3,) else None


def _tiff_tags(file: Path | BinaryIO) -> dict | None:
    """The tags of a TIFF's first image, read by Pillow's parser (also where Pillow cannot decode
    the image: 16-bit gray+alpha, float RGB); None for other files, and for a file that cannot
    be read (Pillow's open then says why). `file`: a path, or a file open for reading."""
    try:
        with open(file, "rb") if isinstance(file, Path) else contextlib.nullcontext(file) as f:
            head = f.read(16)
            if head[:4] not in TiffImagePlugin.PREFIXES:
                return None
            # a BigTIFF's header ("+" in its version) is 16 bytes, a TIFF's 8
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head if b"+" in head[2:4] else head[:8])
            f.seek(ifd.next)
            ifd.load(f)
    except Exception:  # unreadable, or a broken header: Pillow's open says what is wrong
        return None
    return dict(ifd)


def _i16(mode: str | None) -> bool:
    return mode in ("I;16", "I;16B", "I;16L")


def _tiff_wide(tags: dict) -> bool:
    """Whether a TIFF has samples of more than 8 bits or not unsigned integers: Pillow truncates
    16-bit RGB(A) to 8 bits (x >> 8), garbles 16-bit planes stored separately
    (PlanarConfiguration 2) and cannot open 16-bit gray+alpha or float RGB."""
    bits, formats = tags.get(258, (1,)), tags.get(339, (1,))
    return max(bits) > 8 or any(f != 1 for f in formats)


def _raw_ycbcr(tags: dict | None) -> bool:
    """An uncompressed YCbCr TIFF: Pillow reads its samples as they are stored (Pillow 13 as
    mode YCbCr, before it as RGB). A compressed one is converted to RGB by libtiff."""
    return tags is not None and tags.get(262) == 6 and tags.get(259, 1) == 1


def _jfif_ycbcr(tags: dict | None) -> bool:
    """Whether Pillow's YCbCr -> RGB (JPEG's full-range BT.601) is right for an image it reads as
    YCbCr: an uncompressed TIFF with one chroma sample per pixel (YCbCrSubSampling 1, 1; the
    default is 2, 2) and the default ReferenceBlackWhite and YCbCrCoefficients, which Pillow
    ignores. (Compressed YCbCr TIFFs are converted by libtiff and open as RGB.)"""
    if tags is None:
        return True
    coefficients = tags.get(529, (0.299, 0.587, 0.114))
    return (
        tuple(tags.get(530, (2, 2))) == (1, 1)
        and tuple(tags.get(532, (0, 255, 128, 255, 128, 255))) == (0, 255, 128, 255, 128, 255)
        and np.allclose(coefficients, (0.299, 0.587, 0.114), atol=1e-3)
    )


_PHOTOMETRIC = {0: "MinIsWhite", 1: "gray", 2: "RGB", 3: "palette", 5: "CMYK", 6: "YCbCr"}
_PHOTOMETRIC |= {8: "CIELab", 9: "ICCLab", 10: "ITULab", 32844: "LogL", 32845: "LogLuv"}


def _tiff_kind(tags: dict) -> str:
    """What a TIFF holds, for messages: 'TIFF of RGB, 3 samples of 16-bit unsigned integers'."""
    bits, fmt = tags.get(258, (1,))[0], tags.get(339, (1,))[0]
    kind = {1: "unsigned integers", 2: "signed integers", 3: "floats"}.get(fmt, f"format {fmt}")
    colour = _PHOTOMETRIC.get(tags.get(262), f"photometric {tags.get(262)}")
    return f"TIFF of {colour}, {tags.get(277, 1)} samples of {bits}-bit {kind}"


def _read_tiff(path: Path, data: bytes, tags: dict) -> np.ndarray:
    """A gray or RGB(A) TIFF of 16-bit or float samples (see _tiff_wide) as libtiff (imagecodecs)
    decodes it: the exact samples, (H, W) or (H, W, samples), turned by its orientation tag as
    Pillow's images are. Float samples are taken to be in [0, 1]. `data`: the file's bytes;
    `path` names it in messages."""
    kind = _tiff_kind(tags)
    (bits, *_), (fmt, *_) = tags.get(258, (1,)), tags.get(339, (1,))
    if tags.get(262) not in (1, 2) or not (fmt == 3 or (fmt == 1 and bits == 16)):
        _fail(path, f"{kind} is not supported; convert it to an RGB PNG")
    if imagecodecs is None:  # no libtiff: Pillow's pixels would be wrong
        _fail(path, f"{kind}: reading it exactly needs imagecodecs; convert it to a 16-bit PNG")
    arr = imagecodecs.tiff_decode(data, index=0)
    if tags.get(284, 1) == 2 and arr.ndim == 3:  # planes stored separately: (samples, H, W)
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[:2] != (tags.get(257), tags.get(256)):
        _fail(path, f"{kind}: decoded as shape {arr.shape}; convert it to a 16-bit PNG")
    return _upright(arr, tags.get(274, 1))  # 274: Orientation


def _png_chunks(data: bytes | int) -> Iterator[tuple[bytes, bytes]]:
    """(type, start of the payload: at most 80 bytes) of each chunk of a PNG, up to IEND. `data`:
    the file's bytes, or an open file's descriptor, of which only each chunk's first 88 bytes are
    read (`image_size`: 0.2 ms for a PNG of 7 MB in Pillow's 64 KiB chunks, 1 ms in libpng's 8 KiB
    ones; decoding it takes 150 ms)."""
    return ((kind, start) for _, kind, start in _png_spans(data))


def _png_spans(data: bytes | int) -> Iterator[tuple[slice, bytes, bytes]]:
    """`_png_chunks` with where each whole chunk lies in the file (length, type, payload, CRC)."""
    pos = 8  # after the signature
    while True:
        head = data[pos : pos + 88] if isinstance(data, bytes) else os.pread(data, 88, pos)
        if len(head) < 8:
            break
        length, kind = struct.unpack_from(">I4s", head)
        yield slice(pos, pos + 12 + length), kind, head[8 : 8 + min(length, 80)]
        if kind == b"IEND":
            break
        pos += 12 + length


def _png_orientation(fd: int) -> int:
    """The EXIF orientation Pillow gives a PNG once decoded (what read_image turns it by), from
    the file open at `fd` without decoding it. Pillow reads the chunks after the pixel data only
    when it decodes them, and PngImageFile.getexif decodes the image to look there unless an eXIf
    chunk came before them. So the chunks that may hold an orientation (`_may_orient`), from
    anywhere in the file, are copied whole, in their order, behind its IHDR into a PNG without
    pixels, and Pillow's own getexif of the base class reads that: the same chunks, parsed and
    ranked (eXIf, then ImageMagick's exif text, then XMP) as when it decodes the file."""
    spans = list(_png_spans(fd))
    parts = [os.pread(fd, s.stop - s.start, s.start) for s, k, c in spans[1:] if _may_orient(k, c)]
    if not parts:
        return 1
    header = os.pread(fd, spans[0][0].stop, 0)  # the signature and IHDR
    iend = struct.pack(">I4sI", 0, b"IEND", 0xAE426082)  # (its CRC)
    with Image.open(io.BytesIO(b"".join([header, *parts, iend]))) as im:
        return Image.Image.getexif(im).get(0x0112, 1)  # (PngImageFile's would load the pixels)


def _may_orient(kind: bytes, start: bytes) -> bool:
    """Whether a PNG chunk may hold an orientation Pillow applies: eXIf, or a text chunk whose
    keyword (up to 79 bytes, then a zero byte) names EXIF or XMP ("Raw profile type exif",
    ImageMagick's; "XML:com.adobe.xmp")."""
    if kind in (b"tEXt", b"zTXt", b"iTXt"):
        keyword = start.split(b"\0", 1)[0].lower()
        return b"exif" in keyword or b"xmp" in keyword
    return kind == b"eXIf"


def _read_png16(raw: bytes) -> np.ndarray:
    """Any 16-bit PNG (the file's bytes) as uint16 (H, W, planes), raw samples (sBIT is not
    applied), a gray or RGB one's transparent colour (tRNS) as an alpha channel (0 where a pixel
    is that colour, else 65535: as Pillow reads an 8-bit one's), turned upright by its EXIF
    orientation as Pillow reads it (pypng ignores it)."""
    # From bytes read once: a Reader given the file's name opens it and never closes it (a
    # ResourceWarning for each image under `python -W default` or -X dev)
    w, h, rows, info = png.Reader(bytes=raw).read()  # raises on truncated data
    flat = np.concatenate([np.frombuffer(row, dtype=np.uint16) for row in rows])  # array('H')
    arr = flat.reshape(h, w, info["planes"])
    key = info.get("transparent")  # (pypng's read() leaves it to the caller)
    if key is not None and not info["alpha"]:
        opaque = np.any(arr != np.asarray(key, np.uint16), axis=2, keepdims=True)
        arr = np.concatenate([arr, opaque.astype(np.uint16) * np.uint16(65535)], axis=2)
    if not any(_may_orient(k, c) for k, c in _png_chunks(raw)):
        return arr  # Pillow would decode the whole image to look for an eXIf chunk after IDAT
    with Image.open(io.BytesIO(raw)) as im:
        return _upright(arr, im.getexif().get(0x0112, 1))  # 0x0112: Orientation


def _pillow(uri, io_mode: str, op: str, *args, extension: str | None = None, **kwargs):
    """iio.imread or iio.imwrite with plugin="pillow": the `op` ("read", "write") of imageio's
    Pillow plugin on `uri`, the plugin made, closed and let go with the stop signals held
    (sr_lib/threads.py); the decode or encode between is not. A signal raised inside the plugin's
    __init__ left half an object, whose __del__ then printed "Exception ignored in: <function
    PluginV3.__del__ ...> AttributeError: 'PillowPlugin' object has no attribute
    'images_to_write'" under the stop's line (a report's PNG, an input read); one raised in the
    __del__ that closes the plugin once more was printed so and lost; one inside write() left a
    frame to encode at close, which failed ("ValueError: unknown file extension") instead."""
    file = None
    try:
        with signals_held():  # (a signal held here is raised at its end: `file` is made)
            file = iio.imopen(uri, io_mode, legacy_mode=False, plugin="pillow", extension=extension)
        return getattr(file, op)(*args, **kwargs)
    except BaseException as e:  # its traceback's frames (read's self) would keep the plugin
        _clear_frames(e.__traceback__)  # (their lines stay), to a __del__ at any time
        raise
    finally:
        with signals_held():
            if file is not None:
                file.images_to_write.clear()  # written, or a stop inside write(): none to encode
                file.close()
            del file  # its __del__ runs here, held


def _clear_frames(tb) -> None:
    """traceback.clear_frames(tb), and also, before Python 3.13, the dict of a cleared frame's
    variables that its f_locals made (frame.clear() leaves it): on 3.10 a tracer (sys.settrace:
    coverage, a debugger) fills it at each event, on 3.11 and 3.12 a read of f_locals does. It
    kept read's `self`, the plugin, alive to a collection that ran its __del__ outside any held
    block. Read again after the clear, f_locals drops the cleared variables."""
    while tb is not None:
        try:
            tb.tb_frame.clear()
        except RuntimeError:  # still running (_pillow's own): its variables are in use
            pass
        else:
            tb.tb_frame.f_locals  # noqa: B018 (the cleared variables leave the dict)
        tb = tb.tb_next


def _upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, C) turned as EXIF orientation 1..8 says, as imageio's rotate=True turns the images
    Pillow decodes (other values: unchanged)."""
    if orientation in (5, 6, 7, 8):  # a quarter turn: 6 clockwise, 8 counter-clockwise
        arr = np.rot90(arr, 1 if orientation in (7, 8) else 3)
    elif orientation == 3:
        arr = np.rot90(arr, 2)
    if orientation in (2, 5, 7):
        arr = arr[:, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    return arr


class AlphaDropped(NodeWarning):
    """read_image's warning for a file whose alpha channel it drops, naming it (`path`): a
    script reading many such files can say it once per folder (sr_eval.py)."""

    def __init__(self, path):
        # args is (path,), the text made by __str__: a copy, which pickle (or pytest-xdist, which
        # passes warnings between processes) rebuilds as cls(*args), says the text once, not twice
        super().__init__(str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"{self.path}: alpha channel dropped (the image is read as RGB)"


def _to_rgb8(arr: np.ndarray, path) -> np.ndarray:
    arr = _samples(arr, path)
    if arr.shape[2] in (2, 4):
        warnings.warn(AlphaDropped(path), stacklevel=3)
        arr = arr[:, :, :-1]
    arr = _to_8bit(arr)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


class FloatClipped(NodeWarning):
    """read_image's warning for a float image with values outside [0, 1] (a TIFF of 0..255, or
    of a wider range), which it clips: more than half an 8-bit level outside, so the clipped
    picture differs from the one the file holds (0..255 reads as nearly white)."""

    def __init__(self, path, lo: float, hi: float):
        super().__init__(str(path), lo, hi)  # (the text from args, as AlphaDropped's)
        self.path, self.lo, self.hi = Path(path), lo, hi

    def __str__(self) -> str:
        return (
            f"{self.path}: float pixels in [{self.lo:.4g}, {self.hi:.4g}], read as [0, 1] "
            "(clipped): the image is not the one the file holds; save it as an 8- or 16-bit "
            "image, or as floats scaled to [0, 1]"
        )


class FloatNotFinite(NodeWarning):
    """read_image's warning for a float image holding NaN or infinite values (a model's output
    gone wrong), which it reads as 0 (NaN, -inf) and 1 (+inf): no pixel value was stored there."""

    def __init__(self, path, nan: int, inf: int):
        super().__init__(str(path), nan, inf)  # (the text from args, as AlphaDropped's)
        self.path, self.nan, self.inf = Path(path), nan, inf

    def __str__(self) -> str:
        counts = [f"{self.nan} NaN"] * bool(self.nan) + [f"{self.inf} infinite"] * bool(self.inf)
        return (
            f"{self.path}: {' and '.join(counts)} float value(s), read as 0 (NaN, -inf) and 1 "
            "(+inf): the image is not the one the file holds; check what wrote it"
        )


class ExifCorrupt(NodeWarning):
    """A file whose EXIF (or TIFF) tags are broken, which Pillow reads as far as it can: its
    own warning ("Corrupt EXIF data.  Expecting to read 12 bytes but only got 4.") named no
    file and came at each open (twice a read); this one names the file, once a process."""

    def __init__(self, path, said: str):
        super().__init__(str(path), said)  # (the text from args, as AlphaDropped's)
        self.path, self.said = Path(path), said

    def __str__(self) -> str:
        return (
            f"{self.path}: its EXIF data is corrupt ({' '.join(self.said.split())}); read "
            "without the tags that could not be read (an orientation among them is not applied)"
        )


# Pillow's warnings about broken EXIF or TIFF tags (PIL.TiffImagePlugin, PIL.Image), no file named
_PILLOW_EXIF = "|".join(
    (
        r"(Possibly )?[Cc]orrupt EXIF",
        "Truncated File Read",
        "Tag data larger than file",
        "Tag offset",
    )
)
_PILLOW_DIR = os.path.dirname(Image.__file__) + os.sep
_WARNINGS_HELD = threading.RLock()  # catch_warnings is process-wide: one thread at a time
_EXIF_SAID: set[str] = set()  # the files said (ExifCorrupt: once a process)


@contextlib.contextmanager
def _exif_said(path) -> Iterator[list]:
    """Pillow's EXIF warnings raised inside (`_PILLOW_EXIF`) turned into one `ExifCorrupt`
    naming `path` (once a process); its list gets True where there were any. Other warnings are
    shown as they came; Pillow's DecompressionBombWarning is dropped (the size is checked
    against MAX_PIXELS). Held by a lock: the files are decoded on threads, and
    catch_warnings swaps process-wide state. Kept to headers, and to the decodes of files
    found broken there, so that decoding stays parallel."""
    broken: list = []
    try:
        with _WARNINGS_HELD, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("always", _PILLOW_EXIF, UserWarning)  # (not "error", "ignore")
            yield broken
    finally:
        pillow = [w for w in caught if w.filename.startswith(_PILLOW_DIR)]
        exif = [w for w in pillow if re.match(_PILLOW_EXIF, str(w.message))]
        for w in caught:
            if w not in exif:  # (another thread's too, in the while)
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        broken += [True] * bool(exif)
        with _WARNINGS_HELD:
            first = bool(exif) and str(path) not in _EXIF_SAID
            _EXIF_SAID.update([str(path)] if exif else [])
        if first:
            warnings.warn(ExifCorrupt(path, str(exif[0].message)), stacklevel=3)


def _samples(arr: np.ndarray, path) -> np.ndarray:
    """Decoded pixels as (H, W, C), C = 1 to 4 (gray, gray + alpha, RGB, RGBA), of uint8, uint16
    (wider integers clipped) or floats clipped to [0, 1] (NaN and -inf: 0, +inf: 1, with a
    FloatNotFinite warning; values more than half an 8-bit level outside it: a FloatClipped
    warning); bilevel as 0 and 255."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind in "iu" and arr.dtype.itemsize > 1:  # 16-bit (Pillow gives I;16 or I)
        arr = arr if arr.dtype == np.uint16 else np.clip(arr, 0, 65535).astype(np.uint16)
    elif arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            nan = int(np.isnan(arr).sum())
            warnings.warn(FloatNotFinite(path, nan, arr.size - int(finite.sum()) - nan),
                          stacklevel=3)  # fmt: skip
            arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)  # (the range: finite)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < -0.5 / 255 or hi > 1 + 0.5 / 255:
            warnings.warn(FloatClipped(path, lo, hi), stacklevel=3)
        arr = np.clip(arr, 0, 1)
    elif arr.dtype != np.uint8:
        _fail(path, f"unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        _fail(path, f"unsupported image shape {arr.shape}")
    return arr


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """`_samples` as uint8: 16-bit by round(x / 257), floats by round(x * 255)."""
    if arr.dtype == np.uint16:
        # round(x / 257) in integers (x/257 is never exactly .5): 65535 -> 255, 128 -> 0, 129 -> 1
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.dtype.kind == "f":
        return np.round(arr * 255).astype(np.uint8)
    return arr


def _unit(arr: np.ndarray) -> np.ndarray:
    """`_samples` as float32 in [0, 1] at their precision: x / 255 (as `to_tensor`), x / 65535."""
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    return np.divide(arr, np.float32(255 if arr.dtype == np.uint8 else 65535), dtype=np.float32)


def write_target(path: str | os.PathLike, kind: str = "file") -> Path:
    """The file that a write to `path` replaces: `path`, or where the symbolic link `path` leads
    (through links of links), so that the link stays and its target gets the new bytes (an
    output linked onto another disk); the temporary file then goes beside the target, where
    os.replace is atomic. A link to nothing leads to its target's path where that folder
    exists, else it is one line (OutputError); so is a loop of links (`kind`: what to point it
    at, a file or a folder: `check_out_dir`'s). For a checkpoint and a
    text file (a record: JSON, CSV, HTML, the log); an image or array file is one of many a
    folder holds per image, whose link is replaced (`_atomic_open`)."""
    path = Path(path)
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops in a loop of links
        raise OutputError(f"{path}: {describe_path(path, kind)}")  # (its loop, in words)
    if not target.parent.is_dir():
        raise OutputError(f"{path}: a symbolic link to {target}, whose folder does not exist; "
                          "create that folder, or remove the link")  # fmt: skip
    return target


@contextlib.contextmanager
def _atomic_open(path: Path, through_link: bool = False):
    """A binary file that replaces `path` only once fully written: readers never see half a
    file. through_link: where `path` is a symbolic link, its target (`write_target`); else the
    link itself, as for a sample file linked to its input image: that is sampled, and the
    image never written over."""
    path = write_target(path) if through_link else path
    suffix = f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # a name near the limit: cut in tmp
    tmp = path.with_name(f".{fit_name(path.name, len(suffix) + 1, name_max(path.parent))}{suffix}")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def encode_png(img: np.ndarray) -> bytes:
    """A uint8 or uint16 (H, W) / (H, W, C<=4) array as the bytes of an 8- or 16-bit PNG."""
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"encode_png expects uint8 or uint16, got {img.dtype}")
    if not (img.ndim == 2 or (img.ndim == 3 and 1 <= img.shape[2] <= 4)):
        raise ValueError(f"encode_png expects (H, W) or (H, W, C<=4), got shape {img.shape}")
    h, w = img.shape[:2]
    c = 1 if img.ndim == 2 else img.shape[2]
    if img.dtype == np.uint8:
        return _pillow(
            "<bytes>", "w", "write", img.reshape(h, w) if c == 1 else img, extension=".png"
        )
    buf = io.BytesIO()  # pypng writes every colour type at 16 bits; rows as big-endian bytes
    writer = png.Writer(w, h, greyscale=c <= 2, alpha=c in (2, 4), bitdepth=16)
    rows = np.ascontiguousarray(img, ">u2").reshape(h, w * c)  # (any layout: a tensor's movedim)
    writer.write_packed(buf, rows.view(np.uint8))
    return buf.getvalue()


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 or uint16 (H, W) / (H, W, C<=4) array as an 8- or 16-bit PNG, atomically."""
    write_encoded_png(path, encode_png(img))


def write_encoded_png(path: str | os.PathLike, data: bytes) -> None:
    """Write the bytes of `encode_png` to `path` atomically, its folder made if missing."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_open(path) as f:
            f.write(data)
    except OSError as e:
        reason = e.strerror or e
        raise OutputError(f"{path}: cannot write ({reason}); check the output folder") from e


def _write_bytes(path: str | os.PathLike, data: bytes, through_link: bool = False) -> None:
    path = Path(path)
    try:
        with _atomic_open(path, through_link) as f:
            f.write(data)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e}); check the output path") from e


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (JSON, CSV, HTML) atomically: a failed write leaves no file behind; a
    symbolic link stays, its target is written (`write_target`).

    UTF-8; a file name that is not UTF-8 (its bytes held as surrogates) is written as its bytes."""
    _write_bytes(path, text.encode("utf-8", "surrogateescape"), through_link=True)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as a .npy file atomically: a failed write leaves no file behind."""
    buf = io.BytesIO()
    np.save(buf, array)
    _write_bytes(path, buf.getvalue())


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as an uncompressed .npz archive (what np.load reads, as np.savez writes it)
    atomically, its bytes a function of the arrays alone (np.savez stamps each member with the
    time of writing)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.save(member, array)
            archive.writestr(
                zipfile.ZipInfo(f"{name}.npy", (1980, 1, 1, 0, 0, 0)), member.getvalue()
            )
    _write_bytes(path, buf.getvalue())


def _probe(folder: Path, what: str) -> None:
    """Write and remove a small file in `folder`: the only test of writability that holds for
    every user, file system and mount (root ignores permission bits)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".srspace-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{what}: cannot write there ({e.strerror or e})") from None


def refuse_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """`check_out_dir`'s checks, which make nothing (sr_train.py's --cache before the run folder
    is made): `path`, or a folder on its way, that cannot be a folder is one line (OutputError)
    in `describe_path`'s words: a file, a pipe..., a loop of links, a link whose target's folder
    is missing (`write_target`). A file on the way (`--out notes.txt/run`) is named: mkdir said
    "cannot create it (Not a directory)" of the whole path."""
    path = Path(path)
    for part in (*reversed(path.parents), path):  # it or a folder on its way (--out link/run)
        where = f"{flag} {path}: " if part != path else f"{flag} "  # (+ the part, first)
        if part.is_symlink() and not part.exists():  # a link to nothing, or a loop of links
            try:
                write_target(part, "folder")
            except OutputError as e:
                raise OutputError(f"{where}{e}") from None
        elif part.exists() and (said := describe_path(part, "folder")):
            raise OutputError(f"{where}{part}: {said}")
    return path


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """The output folder, created if needed and proved writable before any long work starts. A
    symbolic link to a folder not made yet (a run folder linked onto a scratch disk), it or a
    folder on its way, has its target made, where the target's own folder exists, as an output
    file's link leads to its target (`write_target`); a link whose target's folder is missing
    too (a disk not mounted, a link made on another machine), and a loop of links, are one line
    (mkdir said "File exists"); so is a file on its way (`refuse_out_dir`)."""
    path = refuse_out_dir(path, flag)
    try:  # (mkdir makes no folder through a link: at its target)
        Path(os.path.realpath(path)).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None
    _probe(path, f"{flag} {path}")
    return path


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, the file system of an existing `folder` takes: 255 on
    most, 143 on eCryptfs (an encrypted home folder)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):  # not known there
        return 255


def fit_name(stem: str, room: int, limit: int) -> str:
    """`stem` as the start of a file name that `room` more bytes complete, within `limit` bytes.
    A longer stem is cut at a character and ends in ~ and 8 hex digits of its hash, so two
    long stems with the same start keep two names (a long UTF-8 name: 85 CJK characters)."""
    if len(os.fsencode(stem)) + room <= limit:
        return stem
    digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:8]
    keep = stem
    while keep and len(os.fsencode(keep)) + room + 9 > limit:
        keep = keep[:-1]
    return f"{keep}~{digest}"


def check_out_file(path: str | os.PathLike, flag: str = "--out", example: str = "out.json") -> Path:
    """An output file path whose folder exists (created if needed) and is writable; `example`: a
    file name of the flag's kind, suggested where a folder is given."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: {describe_path(path, 'file', example=example)}")
    try:
        real = write_target(path)  # (a link's target's folder)
    except OutputError as e:
        raise OutputError(f"{flag} {e}") from None
    check_out_dir(real.parent, f"{flag} {path}: its folder")
    return path


def image_order(path: Path) -> tuple:
    """The one order of image files (relative paths) in every script: folder by folder, then by
    stem, then extension, so `cat.png` comes before `cat-2.png` and `photo.png` before
    `photo (1).png`, as their stems sort. An image's position in this order is its NTIRE index
    (`sr_sample.py --layout ntire`, `sr_eval.py`)."""
    return (*path.parent.parts, path.stem, path.suffix.lower(), path.suffix)


def _walk(folder: Path, recursive: bool, dangling: list[Path]):
    """Files under `folder`, following symlinked folders once each (a link back up is skipped);
    hidden entries (".x", "._x.png") are skipped, links to nothing (or in a loop) added to
    `dangling`. An entry that cannot be checked otherwise (EACCES on a link's target, EIO) is a
    DataError where it could hold or be an image (`recursive`, or named like one)."""
    seen = set()
    stack = [folder]
    while stack:
        here = stack.pop()
        try:
            st = here.stat()
            entries = list(os.scandir(here))
        except OSError as e:
            raise DataError(f"{here}: cannot list ({e.strerror or e})") from None
        if (st.st_dev, st.st_ino) in seen:
            continue  # a symlink loop, or two links to one folder
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():  # follows symlinks; a dangling link is neither dir nor file
                    if recursive:
                        stack.append(path)
                elif entry.is_file():
                    yield path
                elif entry.is_symlink():
                    dangling.append(path)
            except OSError as e:
                if entry.is_symlink() and e.errno in (errno.ELOOP, errno.ENOTDIR):
                    dangling.append(path)  # a link in a loop, or through a file: to nothing
                elif recursive or path.suffix.lower() in IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS:
                    # (EACCES, EIO: its images, if any, would be left out without a word)
                    raise DataError(
                        f"{path}: cannot be checked ({e.strerror or e}), so its images would be "
                        f"left out; make it readable or move it out of {shell_quote(folder)}"
                    ) from None


def shell_quote(text: str | os.PathLike) -> str:
    """A path (or a word holding one) as a message shows it: as it is where a shell takes it so,
    else quoted for a shell (shlex.quote: a space); one holding a character that is not
    printable (a newline, \\r, \\t, ESC, a byte that is not UTF-8) in bash's $'...' form, so
    that the message stays one line, shows the character, and can still be pasted into bash:
    shlex.quote kept a newline raw inside its quotes, breaking the line in two."""
    text = os.fspath(text)
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(_ansi_c(c) for c in text) + "'"


_ANSI_C = {"\\": "\\\\", "'": "\\'"}


def _ansi_c(c: str) -> str:
    """One character inside bash's $'...': itself where printable, else its escape (`escaped`:
    \\n, \\xHH, a byte that is not UTF-8 as that byte, \\uHHHH), which bash reads back."""
    if c in _ANSI_C:
        return _ANSI_C[c]
    return c if c.isprintable() else escaped(c)


_NOUN = {"folder": "folder", "file": "file", "either": "file or folder"}


def link_to_nothing(link: str | os.PathLike) -> str:
    """A symbolic link to a missing file or folder, in the words every line about one uses: its
    target as a path from here (a relative target read from the link's folder), quoted for a
    shell where it must be; "a symbolic link to nothing" where it cannot be read (not a link)."""
    try:
        target = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link)))
    except OSError:
        return "a symbolic link to nothing"
    return f"a symbolic link to {shell_quote(target)}, which does not exist"


def describe_path(path: str | os.PathLike, want: str = "folder", builtins: Sequence[str] = (),
                  example: str = "") -> str:  # fmt: skip
    """What `path` is, where a flag asks for a `want` ("folder", "file", or "either") and it is
    none; "" where it is one. The one wording of each fault that every script gives after "FLAG
    PATH: " (the caller's error class keeps its exit code), with what to do:
      no such folder (did you mean X?)       nothing there (`near_path`, `builtins` as there)
      a symbolic link to T, which does ...   a link to nothing (`link_to_nothing`), T its target
      a loop of symbolic links (...)         a link that leads back to itself (or one above it)
      a file, not a folder                   and a folder, not a file (`example`: a file name in
                                             it to suggest), a pipe, a socket, a device
      cannot be checked (Permission denied)  a folder above it that cannot be searched
    Each file system call's error is read once (one stat, one lstat where it fails): "no such
    folder" said of a file or a dangling link sent the user looking for a typo."""
    path, noun = Path(path), _NOUN[want]
    try:
        st = os.stat(path)
    except OSError as e:
        linked = os.path.islink(path)
        if e.errno == errno.ELOOP:  # (it, or a link among the folders above it: not it then)
            if not linked:
                return ("a loop of symbolic links among the folders above it; point that link at "
                        "a folder or remove it")  # fmt: skip
            to = shell_quote(os.readlink(path))
            return f"a loop of symbolic links (it points to {to}); point it at a {noun}"
        if linked and e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{link_to_nothing(path)}; put the {noun} back there or give its new path"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"no such {noun}{near_path(path, builtins)}"
        return (f"cannot be checked ({e.strerror or e}); make it and the folders above it "
                f"readable")  # fmt: skip
    if stat.S_ISDIR(st.st_mode):
        if want != "file":
            return ""
        e_g = f", e.g. {shell_quote(str(path / example))}" if example else ""
        return f"a folder, not a file; give a file{e_g}"
    if stat.S_ISREG(st.st_mode):
        return "" if want != "folder" else "a file, not a folder; give a folder"
    kind = {stat.S_IFIFO: "a pipe", stat.S_IFSOCK: "a socket"}.get(
        stat.S_IFMT(st.st_mode), "a device"
    )
    if want == "folder":
        return f"{kind}, not a folder; give a folder"
    return f"{kind}, not a regular file; save what it gives to a file and give that"


def near_path(path: str | os.PathLike, builtins: Sequence[str] = ()) -> str:
    """The words ' (did you mean X?)' for the line about a `path` that does not exist, where it
    is near in spelling to a built-in name (`builtins`: "demo") or its first missing part to a
    folder beside it (a typo: demoo, DIV2k/DIV2K_train_HR) that makes a path to a folder, else
    "". The suggestion keeps the rest of the path as given, quoted for a shell where it must be.

    A folder's first 5,000 entries are read, in the file system's order: beside a folder of
    200,000 files that took 12 ms, where reading it whole took 0.37 s (warm, on a local disk;
    a network file system's first listing costs more), for an error line that must come at once;
    a folder listed after the first 5,000 entries is then not suggested (docs/benchmarks.md,
    tests/bench/bench_near_path.py)."""
    text = os.fspath(path)
    if os.sep not in text and (near := nearest_choice(text, list(builtins))):
        return near
    parts = Path(text).parts
    for i in range(len(parts) - 1, -1, -1):  # the deepest part that exists: its folders
        parent = Path(*parts[:i]) if i else Path(".")
        if not parent.is_dir():
            continue
        try:  # (a folder of many files: its first 5000 entries, as the docstring measures)
            with os.scandir(parent) as entries:
                names = [e.name for _, e in zip(range(5000), entries) if e.name[:1] != "."]
        except OSError:
            return ""
        for near in difflib.get_close_matches(parts[i], names, n=3):
            fixed = Path(*parts[:i], near, *parts[i + 1 :])  # (a second typo: no guess)
            if fixed.is_dir():  # (a file, a link to nothing: not what is asked for)
                return f" (did you mean {shell_quote(str(fixed))}?)"
        return ""
    return ""


def check_image_folder(folder: str | os.PathLike, builtins: Sequence[str] = ()) -> None:
    """`list_images`' DataError (its `builtins` as there) for a folder that is missing, a file,
    or holds no image (recursively), without its warnings; its folders are listed only up to the
    first that holds an image (a large data set is read once, where it is used)."""
    if Path(folder).is_dir():
        for path in _walk(Path(folder), True, []):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                return
    with warnings.catch_warnings():  # (said where the images are read)
        warnings.simplefilter("ignore")
        list_images(folder, builtins=builtins)  # (raises: its one line)


class OnlyOtherFormats(DataError):
    """`list_images` of a folder whose images are all of formats not read (.gif, ...)."""


def list_images(folder: str | os.PathLike, recursive: bool = True,
                dangling: list[Path] | None = None, say_links: bool = True,
                builtins: Sequence[str] = ()) -> list[Path]:  # fmt: skip
    """Image files in `folder` (by extension, any case) in `image_order`; symlinked files and
    folders are followed, hidden files and folders and folders named like images are skipped,
    and links to missing files named like images too, with one warning (and added to
    `dangling`, where given, in that order: a caller that must not end as if every image were
    read; `say_links=False`: no warning, the caller's own line names them); so are files of
    other image formats (OTHER_IMAGE_EXTENSIONS: .gif, .ppm, .exr, ...), with one warning: a
    folder of ground truths partly in them would be scored on fewer images without a word. An
    entry that cannot be checked (EACCES, EIO; not a loop) where it could
    hold or be an image: DataError. A `folder` that is none (not there, a file, a link to
    nothing): DataError in `describe_path`'s words, with a "did you mean" where a folder beside
    it or one of `builtins` (the names the caller takes instead of a folder: "demo") is near in
    spelling (`near_path`)."""
    folder = Path(folder)
    if what := describe_path(folder, "folder", builtins):
        raise DataError(f"{folder}: {what}")
    walked_links: list[Path] = []
    walked = list(_walk(folder, recursive, walked_links))
    files = [p for p in walked if p.suffix.lower() in IMAGE_EXTENSIONS]
    exts = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
    other = [p for p in walked if p.suffix.lower() in OTHER_IMAGE_EXTENSIONS]
    if other:
        first = min(other, key=lambda p: image_order(p.relative_to(folder)))
        e_g = first.relative_to(folder)
        other_said = f"{len(other)} image(s) of a format not read (e.g. {e_g}; read: {exts})"
        if files:
            warnings.warn(
                f"{folder}: skipped {other_said}; convert them to PNG to include them",
                NodeWarning,
                stacklevel=2,
            )
    links = sorted((p for p in walked_links if p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: image_order(p.relative_to(folder)))  # fmt: skip
    if links and say_links:  # a moved dataset: its images missing from every result, unsaid
        warnings.warn(
            f"{folder}: skipped {len(links)} symbolic link(s) to missing files "
            f"({links_said(links, folder)})",
            NodeWarning,
            stacklevel=2,
        )
    if dangling is not None:
        dangling += links
    if not files and other:
        raise OnlyOtherFormats(f"{folder}: no images found, but {other_said}: convert them to PNG")
    if not files:
        # a dataset given one level too high (DIV2K/ for DIV2K/DIV2K_valid_HR/): say where it is
        deeper = [] if recursive else _walk(folder, True, [])
        first = next((p for p in deeper if p.suffix.lower() in IMAGE_EXTENSIONS), None)
        where = (
            first
            and f"; subfolders are not searched: give the one holding them "
            f"({shell_quote(first.parent)})"
        )
        raise DataError(
            f"{folder}: no images found ({exts}{', recursively' if recursive else ''}){where or ''}"
        )
    return sorted(files, key=lambda p: image_order(p.relative_to(folder)))


def links_said(links: Sequence[Path], folder: str | os.PathLike | None = None) -> str:
    """Symbolic links to missing files in the words of every line that lists them: the first
    three as `NAME -> TARGET`, NAME from `folder` (else the link's name alone) and TARGET as
    the link's own text gives it, each quoted for a shell where it must be (a space), then
    ", and K more"; a link removed since it was listed: its name alone."""
    said = []
    for link in links[:3]:
        name = shell_quote(os.fspath(Path(link).relative_to(folder) if folder else Path(link).name))
        try:
            said.append(f"{name} -> {shell_quote(os.readlink(link))}")
        except OSError:  # (no longer a link)
            said.append(name)
    return first_said(said, len(links))


def first_said(said: Sequence[str], count: int | None = None) -> str:
    """Items of a one-line list: the first three of `said` (of `count` in all, else its
    length), then ", and K more"."""
    count = len(said) if count is None else count
    return ", ".join(said[:3]) + (f", and {count - 3} more" if count > 3 else "")


def shared_stem(paths: Sequence[Path]) -> str | None:
    """The first stem in `paths`' order that several of them have (`cat.png` and `cat.jpg`:
    their outputs and NTIRE index would be one), None where every stem is another. One count of
    all of them: counting each stem in the whole list took seconds at 20,000 images."""
    counts = collections.Counter(p.stem for p in paths)
    return next((p.stem for p in paths if counts[p.stem] > 1), None)


def size_ratio(hr_hw, lr_hw, of: str = "") -> str:
    """How many times an LR fits its HR, e.g. "x4" + `of`, or per dimension where they differ
    ("x4 in width, x4.27 in height": an LR a row short, which the width's ratio alone hid)."""
    x_w, x_h = f"{hr_hw[1] / lr_hw[1]:.3g}", f"{hr_hw[0] / lr_hw[0]:.3g}"
    return f"x{x_w}{of}" + ("" if x_w == x_h else f" in width, x{x_h} in height")


def mod_crop(img: np.ndarray, m: int) -> np.ndarray:
    """Crop (H, W, ...) at the bottom/right to a multiple of m (a view)."""
    h, w = img.shape[:2]
    return img[: h - h % m, : w - w % m]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]; float32 (H, W, 3) in [0, 1] (`read_planes`
    with `wide`) as it is."""
    if img.dtype not in (np.uint8, np.float32) or img.ndim != 3:
        got = f"{img.dtype} {img.shape}"
        raise TypeError(f"to_tensor expects uint8 or float32 (H, W, C), got {got}")
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return x if img.dtype == np.float32 else _as_float(x)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float (C, H, W) -> uint8 (H, W, C), (N, C, H, W) -> (N, H, W, C); clamped, rounded."""
    return _quantize(x, 255, "to_uint8").astype(np.uint8, copy=False)


def to_uint16(x: torch.Tensor) -> np.ndarray:
    """`to_uint8` at 16 bits: round(clip(x, 0, 1) * 65535) as uint16."""
    return _quantize(x, 65535, "to_uint16").astype(np.uint16)


def _quantize(x: torch.Tensor, top: int, name: str) -> np.ndarray:
    """round(clip(x, 0, 1) * top) (NaN: 0), channels last, as an int32 (or uint8) array."""
    if x.ndim not in (3, 4):
        raise ValueError(f"{name} expects (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    x = torch.nan_to_num(x.detach().float(), nan=0.0).clamp_(0, 1).mul_(top).round_()
    return x.to(torch.uint8 if top == 255 else torch.int32).movedim(-3, -1).cpu().numpy()


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], bit-identical on any device (IEEE division by 255)."""
    if x.device.type == "cpu":  # numpy: one thread; torch's pool would fight the loader workers
        return torch.from_numpy(np.divide(x.numpy(), np.float32(255), dtype=np.float32))
    # A divisor given as a Python number is a CPU scalar, which CUDA turns into a multiplication
    # by its reciprocal (one bit off for 126 of the 256 values); a device tensor divides.
    return x.float().div_(torch.full((), 255.0, device=x.device))


def dihedral(img: np.ndarray, t: int) -> np.ndarray:
    """Symmetry t in 0..7 of the square on (H, W, ...), as a view: t % 4 quarter turns
    counter-clockwise, then a left-right flip if t >= 4."""
    img = np.rot90(img, t % 4)
    return img[:, ::-1] if t >= 4 else img


# ---------------------------------------------------------------------------------------------
# Built-in demo data: the colour photographs that ship inside scikit-image (no download needed).
# A demo to try the toolkit end to end in minutes, NOT a benchmark: never report numbers on it.
# Validation: three unrelated scenes (a cat's fur, a cup indoors, an outdoor launch pad); the
# stereo pair motorcycle_left/right stays together in training so no view leaks into validation.
DEMO_TRAIN = ("astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png")
DEMO_TRAIN += ("motorcycle_right.png", "retina.jpg")
DEMO_VAL = ("chelsea.png", "coffee.png", "rocket.jpg")


def demo_files(split: str) -> list[Path]:
    """The files of the demo (not a benchmark) images of `split` ("train" or "val")."""
    if split not in ("train", "val"):
        raise ValueError(f"demo split must be 'train' or 'val', got {split!r}")
    spec = importlib.util.find_spec("skimage")  # its data folder, without importing skimage
    if spec is None or spec.origin is None:
        raise DataError("demo images need scikit-image (pip install scikit-image)")
    folder = Path(spec.origin).parent / "data"
    # Images skimage would have to download are not in the folder: those are skipped.
    files = [folder / f for f in (DEMO_TRAIN if split == "train" else DEMO_VAL)]
    found = [f for f in files if f.is_file()]
    if not found:
        raise DataError(f"demo: no bundled images in {folder}; reinstall scikit-image")
    return found


def demo_images(split: str) -> list[tuple[str, np.ndarray]]:
    """The demo (not a benchmark) images of `split` ("train" or "val"): [(stem, uint8 HR)]."""
    return [(f.stem, read_image(f)) for f in demo_files(split)]


def default_mod(scale: int) -> int:
    """NTIRE rule: crop HR to a multiple of 8 when the scale divides 8, else of the scale."""
    return 8 if 8 % scale == 0 else scale


# ---------------------------------------------------------------------------------------------
# Degradations beyond bicubic (sr_train.py --lr-blur, --lr-noise, --lr-jpeg)


@dataclass(frozen=True)
class Degradation:
    """How LR is made from HR when bicubic is not enough: the first-order degradation of
    Real-ESRGAN (Wang et al. 2021, "Real-ESRGAN: Training Real-World Blind Super-Resolution with
    Pure Synthetic Data", arXiv:2107.10833, Sec. 3.1), in its order: isotropic Gaussian blur of
    the HR, MATLAB-bicubic /scale, Gaussian noise on the LR, clip and round to 8 bits, JPEG.

    Each is a (low, high) range drawn uniformly per patch (low == high: that value), or None:
    not applied. blur: sigma in HR pixels; noise: sigma in 8-bit levels (0-255); jpeg: quality
    1..100 (whole numbers). No range set (the default): false, and the LR is the bicubic
    downscale alone, as without a Degradation. A blur or noise range of zeros is none (None):
    it draws nothing, so that the others' draws are those of a Degradation without it."""

    blur: tuple[float, float] | None = None
    noise: tuple[float, float] | None = None
    jpeg: tuple[int, int] | None = None

    def __post_init__(self):
        for name in ("blur", "noise"):  # (0, 0) drew n values, which moved the JPEG qualities
            r = getattr(self, name)
            if r is not None and r[1] <= 0:
                object.__setattr__(self, name, None)

    def __bool__(self) -> bool:
        return self.jpeg is not None or any(
            r is not None and r[1] > 0 for r in (self.blur, self.noise)
        )

    def draw(self, rng: np.random.Generator, n: int) -> list[tuple[float, float, int | None]]:
        """n draws of (blur sigma, noise sigma, JPEG quality or None), in this order: n blur
        sigmas, n noise sigmas, n qualities (each only where its range is set)."""
        blur = rng.uniform(*self.blur, n) if self.blur else np.zeros(n)
        noise = rng.uniform(*self.noise, n) if self.noise else np.zeros(n)
        quality = rng.integers(self.jpeg[0], self.jpeg[1] + 1, n) if self.jpeg else [None] * n
        return [
            (float(b), float(s), q if q is None else int(q))
            for b, s, q in zip(blur, noise, quality)
        ]

    def apply(
        self,
        hr: np.ndarray,
        scale: int,
        rng: np.random.Generator,
        lr: np.ndarray | None = None,
        gray: bool = False,
    ) -> np.ndarray:
        """One draw of the degradation of a uint8 HWC HR (height and width multiples of the
        scale; `lr`: its bicubic downscale, if known): its uint8 LR (`degrade`). The draws,
        then the noise field, come from `rng`."""
        blur, noise, quality = self.draw(rng, 1)[0]
        return degrade(hr, scale, blur, noise, quality, rng if self.noise else None, lr, gray)


def degrade(
    hr: np.ndarray,
    scale: int,
    blur: float = 0.0,
    noise: float = 0.0,
    quality: int | None = None,
    rng: np.random.Generator | None = None,
    lr: np.ndarray | None = None,
    gray: bool = False,
) -> np.ndarray:
    """uint8 HWC HR (sides multiples of the scale) -> uint8 LR.

    blur 0: the LR acted on is `lr`, the HR's MATLAB-bicubic downscale as the pairs without a
    degradation have it (`imresize`'s uint8, rounded per pass), made from `hr` where not given
    (a float `lr`: a blurred LR made already, `blur_downscale`). blur > 0: `blur_downscale`,
    the HR blurred (standard deviation `blur` HR pixels) and then downscaled by imresize's taps,
    in float64. Then Gaussian noise of standard deviation `noise` levels (drawn from `rng`,
    independently per pixel and channel, where `rng` is given, even at noise 0, so that the
    stream does not depend on the value drawn; `gray`, an image whose channels are equal
    (`equal_channels`): one field for all channels, so that it stays gray), clipped to 0..255 and
    rounded (half to even), then `jpeg` at `quality` (None: none)."""
    if blur > 0:
        x = blur_downscale(hr, scale, blur)
    else:
        x = imresize(hr, 1 / scale) if lr is None else lr
    if rng is not None:
        x = x + rng.standard_normal(x.shape[:2] + (1,) if gray else x.shape) * noise  # float64
    x = np.rint(np.clip(x, 0, 255)).astype(np.uint8) if x.dtype != np.uint8 else x
    return jpeg(x, quality) if quality is not None else np.ascontiguousarray(x)


def equal_channels(img: np.ndarray) -> bool:
    """Whether an HWC image's channels are all equal: a gray image read as RGB (its channels are
    copies), whose degraded LR is made gray too (`degrade`'s `gray`)."""
    row = img[0]  # a colour image's first row nearly always differs: 0.35 ms a patch saved
    return bool((row[..., 1:] == row[..., :1]).all() and (img[..., 1:] == img[..., :1]).all())


def blur_downscale(
    hr: np.ndarray, scale: int, sigma: float, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """float64 (H/s, W/s, C): imresize(Gaussian blur of hr, 1/s), not rounded, the blur's borders
    reflected at the image's (`blur_matrix`). box (y, x, h, w) in LR pixels: that part of it
    only, computed from the HR within the taps' reach of it (a training patch's LR is the crop
    of its whole image's, the image around the patch blurred into it, not the patch reflected).

    Both steps are linear and separable: per axis, each LR pixel is a band of HR pixels, the
    bicubic taps (`contributions`) each spread over the blur's (`_blurred_band`), applied as a
    weighted sum of the HR rows (then columns) in it, so that time and memory are those of the
    image (dense (H, H) matrices per axis took 4.5 s of CPU and 619 MB more at 4096²; now
    0.34 s and 174 MB, docs/benchmarks.md)."""
    (big_h, big_w, c), s = hr.shape, scale
    y, x, h, w = box if box is not None else (0, 0, big_h // s, big_w // s)
    # the bands of 256 HR pixels' LR pixels at a time (a 48² x4 patch's at once): the HR rows
    # they read, in float64, stay a few MB (25 MB of a 4096-pixel-wide image)
    step = max(1, 256 // s)
    cols = [_blurred_band(big_w, s, sigma, j, min(j + step, x + w)) for j in range(x, x + w, step)]
    c0, c1 = min(a for a, _ in cols), max(a + m.shape[1] for a, m in cols)  # HR columns read
    # np.einsum's own loop, one thread: not a matrix product, whose thread pools (torch's,
    # numpy's BLAS: one per process, loader workers too) waited 10-40x longer than each of these
    # small products took for their threads on a loaded machine (512²: 1.5 s against 0.01 s)
    rows = np.empty((h, (c1 - c0) * c))  # the rows' pass
    for j in range(y, y + h, step):
        a, m = _blurred_band(big_h, s, sigma, j, min(j + step, y + h))
        part = np.ascontiguousarray(hr[a : a + m.shape[1], c0:c1], np.float64)
        part = part.reshape(m.shape[1], -1)
        for i, (lo, hi) in enumerate(_spans(m)):
            np.einsum("k,kn->n", m[i, lo:hi], part[lo:hi], out=rows[j - y + i])
    rows = rows.reshape(h, c1 - c0, c)
    out = np.empty((h, w, c))
    for (a, m), j in zip(cols, range(0, w, step)):  # the columns' pass, on the rows'
        for i, (lo, hi) in enumerate(_spans(m)):
            part = rows[:, a - c0 + lo : a - c0 + hi]  # (h, HR columns, C)
            np.einsum("k,hkc->hc", m[i, lo:hi], part, out=out[:, j + i])
    return out


def _spans(m: np.ndarray) -> list[tuple[int, int]]:
    """(first, last + 1) of each row's nonzero taps: a band's row reads only those."""
    nz = m != 0
    return list(zip(nz.argmax(1).tolist(), (m.shape[1] - nz[:, ::-1].argmax(1)).tolist()))


def _blurred_band(n: int, s: int, sigma: float, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """(a, m): LR pixels lo..hi-1 along an axis of n HR pixels (of the HR blurred, then
    downscaled by s) are m @ HR[a : a + m.shape[1]] along that axis. Row j of m: imresize's taps
    of LR pixel j, at HR pixels i (mirrored, `contributions`), each spread over the blur's taps
    around i, reflected at the axis' ends (`_reflect`): the rows lo..hi-1 of (resize matrix) @
    `blur_matrix(n, sigma)`, without making either (n, n)."""
    ind, weights = contributions(n, n // s, 1 / s)
    r = _blur_radius(sigma)
    src = _reflect(ind[lo:hi, :, None] + np.arange(-r, r + 1), n)  # (LR pixels, taps, blur taps)
    a, width = int(src.min()), int(src.max()) + 1 - int(src.min())
    at = np.arange(hi - lo)[:, None, None] * width + (src - a)
    m = np.bincount(at.ravel(), (weights[lo:hi, :, None] * gaussian_taps(sigma)).ravel(),
                    (hi - lo) * width)  # fmt: skip
    return a, m.reshape(hi - lo, width)


def _blur_radius(sigma: float) -> int:
    return max(1, math.ceil(3 * sigma))


def gaussian_taps(sigma: float) -> np.ndarray:
    """The 1-D Gaussian blur's taps at -r..r, r = ceil(3 sigma) (at least 1): exp(-d^2 /
    (2 sigma^2)), normalised to sum 1."""
    r = _blur_radius(sigma)
    # (d / sigma) squared, not d^2 / sigma^2: a sigma below 1e-162 squares to 0, and the centre
    # tap 0 / 0 was NaN, the LR black (--lr-blur 1e-300 trained on it, one numpy warning)
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return taps / taps.sum()


def _reflect(at: np.ndarray, n: int) -> np.ndarray:
    """Pixel positions on an axis of n pixels folded into 0..n-1, reflected without repeating the
    edge pixel (numpy's "reflect", OpenCV's BORDER_REFLECT_101; again and again where they reach
    beyond the other side)."""
    if n == 1:
        return np.zeros_like(at)
    return np.abs((at + n - 1) % (2 * n - 2) - (n - 1))


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """The (n, n) matrix of a 1-D Gaussian blur of standard deviation `sigma` pixels
    (`gaussian_taps`), the borders reflected (`_reflect`): the blur `blur_downscale` applies,
    written out (it is never made there)."""
    r = _blur_radius(sigma)
    at = _reflect(np.arange(n)[:, None] + np.arange(-r, r + 1), n)  # (n, 2r + 1) source pixels
    m = np.zeros((n, n))
    np.add.at(m, (np.arange(n)[:, None].repeat(2 * r + 1, 1), at), gaussian_taps(sigma))
    return m


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """uint8 HWC RGB encoded as a JPEG at `quality` (1..100) by Pillow, in memory, and decoded.
    Chroma is subsampled 4:2:0 at every quality (Pillow's default, and the common setting of
    cameras and the web), baseline, no optimised Huffman tables. A writable array, as the other
    degradations' (numpy's view of Pillow's bytes is read-only, and torch.from_numpy of it, in
    validation, printed torch's "not writable" warning as one of sr_train.py's)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(
        buf, format="JPEG", quality=int(quality), subsampling="4:2:0"
    )
    with Image.open(buf) as decoded:
        return np.array(decoded.convert("RGB"))


MAX_BLUR = 100  # --lr-blur's largest sigma: 0.04 s a 48² ×4 patch; 1e12 asked for 44 TiB, mid-run


def degradation_range(text: str, flag: str) -> tuple[float, float] | tuple[int, int] | None:
    """The range of a degradation flag's text: "" (unset) and "none" None, "V" (V, V), "LO:HI"
    (LO, HI); a blur or noise of 0 ("0", "0:0") None, as unset. ("none" is how a resumed run,
    which takes its checkpoint's degradation, is told to drop one: JPEG has no quality 0.)
    --lr-jpeg takes whole numbers 1..100, --lr-blur numbers 0..MAX_BLUR, --lr-noise numbers
    0..255. Anything else is one
    UsageError line naming the flag."""
    if text in ("", "none"):
        return None
    quality = flag == "--lr-jpeg"
    what = "a quality 1..100" if quality else "a sigma >= 0"
    off = "none for no JPEG" if quality else f"0 or none for no {flag.removeprefix('--lr-')}"
    parts = text.split(":")
    try:
        if len(parts) > 2:
            raise ValueError
        values = [float(p) for p in parts]
    except ValueError:
        example = "30:95" if quality else "0.5:3"
        raise UsageError(f"{flag} {text}: must be {what} or a range LO:HI of them, drawn "
                         f"uniformly (e.g. {example}); {off}") from None  # fmt: skip
    if not all(map(math.isfinite, values)):
        raise UsageError(f"{flag} {text}: must be finite, {what} or a range LO:HI of them; {off}")
    if quality and not all(v.is_integer() and 1 <= v <= 100 for v in values):
        raise UsageError(f"{flag} {text}: JPEG quality must be a whole number 1..100")
    if not quality and min(values) < 0:
        raise UsageError(f"{flag} {text}: sigma must be >= 0")
    if flag == "--lr-blur" and max(values) > MAX_BLUR:  # its taps: 6 sigma + 1 per pixel
        raise UsageError(f"{flag} {text}: sigma must be <= {MAX_BLUR} HR pixels")
    # (1e300 made every LR pixel 0 or 255, silently: README's range, as --gaussian-std's)
    if flag == "--lr-noise" and max(values) > 255:
        raise UsageError(f"{flag} {text}: sigma must be <= 255 8-bit levels")
    lo, hi = values[0], values[-1]
    if lo > hi:
        raise UsageError(f"{flag} {text}: LO {parts[0]} is above HI {parts[1]}; give "
                         f"{parts[1]}:{parts[0]}")  # fmt: skip
    if not quality and hi == 0:  # a sigma of 0: none, recorded as unset (`Degradation`)
        return None
    return (int(lo), int(hi)) if quality else (lo, hi)


DEGRADATION_FLAGS = ("lr_blur", "lr_noise", "lr_jpeg")  # the scripts' fields of a Degradation
# A typed "" of a degradation flag (an unset shell variable, `--lr-blur "$BLUR"`) was no
# degradation without a word: it is refused (`refuse_empty`); none, or 0 for a blur or noise,
# says no degradation. (field -> (kind, what to give), as the scripts' own tables of such flags)
EMPTY_DEGRADATION = {
    "lr_blur": ("value", "a sigma or LO:HI (0 or none for no blur), or leave --lr-blur out"),
    "lr_noise": ("value", "a sigma or LO:HI (0 or none for no noise), or leave --lr-noise out"),
    "lr_jpeg": ("value", "a quality 1..100 or LO:HI (none for no JPEG), or leave --lr-jpeg out"),
}


def refuse_empty(args, given: set[str], table: dict) -> None:
    """One UsageError line for a text flag of `table` (field -> (kind: path or value, what to
    give instead)) typed as "" (in `given`, the fields typed), or a list flag holding "": where
    "" is its default, it was taken for it without a word (the current folder for a path)."""
    for name, (kind, what) in table.items():
        value = getattr(args, name)
        if "" in (value if isinstance(value, list) else [value] * (name in given)):
            raise UsageError(f"--{name.replace('_', '-')}: an empty {kind}; give {what}")


def degradation_of(args) -> Degradation:
    """The Degradation of a script's parsed --lr-blur, --lr-noise, --lr-jpeg (`args`' fields
    named in DEGRADATION_FLAGS, text as `degradation_range` takes it); false where none is set."""
    return Degradation(*(
        degradation_range(getattr(args, k), f"--{k.replace('_', '-')}") for k in DEGRADATION_FLAGS
    ))  # fmt: skip


def normalise_degradation(args) -> list[tuple[str, str]]:
    """Check a script's parsed --lr-blur, --lr-noise, --lr-jpeg (one UsageError line for a bad
    value) and rewrite each as the text recorded (`range_text`: 2 and 2.0 are one value, 0 is
    unset); the (flag, text) of those set (`degradation_flags`)."""
    for k in DEGRADATION_FLAGS:
        setattr(
            args, k, range_text(degradation_range(getattr(args, k), f"--{k.replace('_', '-')}"))
        )
    return degradation_flags(args)


def degradation_flags(values) -> list[tuple[str, str]]:
    """(flag, text) of each degradation set in `values`: a script's parsed args, or a dict of
    them (a checkpoint's train_args; a field it lacks is unset)."""
    get = values.get if isinstance(values, dict) else lambda k: getattr(values, k, "")
    return [(f"--{k.replace('_', '-')}", get(k)) for k in DEGRADATION_FLAGS if get(k)]


def range_text(r: tuple[float, float] | tuple[int, int] | None) -> str:
    """A degradation range as its flag's text, `degradation_range`'s inverse: "", "V", "LO:HI"."""
    if r is None:
        return ""
    return str(r[0]) if r[0] == r[1] else f"{r[0]}:{r[1]}"


def validation_degradation(
    hr: np.ndarray,
    scale: int,
    degradation: Degradation,
    stem: str,
    lr: np.ndarray | None = None,
    gray: bool = False,
) -> np.ndarray:
    """A validation image's degraded LR, the same at every validation and in every run with the
    same flags (independent of --seed): its draws and noise come from a generator seeded by its
    stem. `gray`: the noise one field for all channels, for an image whose channels are equal
    (`equal_channels`), so that its LR stays gray (sr_sample.py --from-hr writes a gray file's
    LR gray)."""
    return degradation.apply(hr, scale, validation_rng(stem), lr, gray)


def validation_rng(stem: str) -> np.random.Generator:
    """The generator of a validation image's draws and noise (`validation_degradation`): seeded
    by its stem, not by --seed."""
    digest = hashlib.sha256(stem.encode("utf-8", "surrogateescape")).digest()
    return np.random.default_rng([VAL_DEGRADE_SEED, int.from_bytes(digest[:8], "little")])


def validation_blur(degradation: Degradation, stem: str) -> float:
    """The blur sigma (0: none) that `validation_degradation` draws for the image `stem`: the
    first of its draws (`Degradation.draw`), so the same whatever its noise and JPEG
    (sr_eval.py --lr-blur: the blur of sr_sample.py --from-hr's LR of that image)."""
    return degradation.draw(validation_rng(stem), 1)[0][0]


VAL_DEGRADE_SEED = 0xDE6  # a tag: validation's draws are no training step's


def load_pairs(
    source: str | os.PathLike,
    scale: int,
    max_images: int | None = None,
    mod: int | None = None,
    crop: int = 0,
    degradation: Degradation | None = None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Validation pairs [(stem, HR, LR)] (uint8 HWC) from an HR folder or "demo" (its val split).

    HR is cropped to a multiple of `mod` (default `default_mod(scale)`), and with `crop` > 0
    centre-cropped to at most crop x crop pixels (a multiple of 8·scale, so validation stays cheap
    on large images); LR = imresize(HR, 1/scale), or with a `degradation` its draw fixed per
    image (`validation_degradation`: the same at every validation; the noise one field for the
    three channels of a gray image, `equal_channels`). Stems of images in
    subfolders keep their relative path ("sub/img"). Images are held in RAM.
    """
    mod = mod or default_mod(scale)
    if mod % scale:
        raise ValueError(f"mod {mod} must be a multiple of the scale {scale}")
    if str(source) == "demo":
        named = [(stem, stem, img) for stem, img in demo_images("val")[:max_images]]
    else:
        files = list_images(source)[:max_images]
        named = [(f.relative_to(source).with_suffix("").as_posix(), f, None) for f in files]
    pairs = []
    for stem, name, img in named:
        hr = mod_crop(read_image(name) if img is None else img, mod)
        if hr.size == 0:
            raise DataError(f"{name}: smaller than {mod}x{mod} pixels, too small to validate on")
        hr = _centre_crop(hr, crop, 8 * scale) if crop > 0 else hr
        lr = imresize(hr, 1 / scale)
        if degradation:  # (a gray image's noise gray, as in training and sr_sample.py)
            lr = validation_degradation(hr, scale, degradation, stem, lr, equal_channels(hr))
        pairs.append((stem, hr, lr))
    return pairs


def _centre_crop(hr: np.ndarray, size: int, m: int) -> np.ndarray:
    """The centre size x size of HR, size rounded down to a multiple of m (at least m)."""
    s = max(size // m * m, m)
    y, x = max(0, hr.shape[0] - s) // 2, max(0, hr.shape[1] - s) // 2
    return hr[y : y + s, x : x + s]


# ---------------------------------------------------------------------------------------------
# Training pairs

CACHE_VERSION = 1  # bump when decoding or LR generation changes, so old cache files are not used


def default_patch(scale: int) -> int:
    """LR patch side of the papers: 48 (x2, x3, x4), 32 for x8."""
    return 32 if scale >= 8 else 48


# numpy parses a .npy header with ast.literal_eval, and CPython's AST constructor is not safe in
# two threads at once (3.11: "SystemError: AST constructor recursion depth mismatch", python/cpython
# issue 106905): the loading threads of a --cache read their headers one at a time.
_NPY_HEADER = threading.Lock()


@lru_cache(maxsize=256)  # bounded: each open memmap holds a file descriptor (ulimit is often 1024)
def _open_npy(path: str) -> np.ndarray:
    with _NPY_HEADER:
        return np.load(path, mmap_mode="r")


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of a cache file, a whole uint8 (H, W, 3) array; None where there is no file, ()
    where it is not whole: its header does not parse or its size is not the header's and the
    data's. Cache files are renamed into place whole but not fsync'd (a cache is rebuilt, not
    kept), so a node that crashed can leave them empty or cut short; the header alone tells."""
    try:
        with open(path, "rb") as f:
            if np.lib.format.read_magic(f) != (1, 0):  # what np.save writes for such arrays
                return ()
            with _NPY_HEADER:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            size = f.tell() + int(np.prod(shape)) * dtype.itemsize
            whole = os.fstat(f.fileno()).st_size == size
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError):  # (an empty file, a header cut short)
        return ()
    ok = whole and dtype == np.uint8 and not fortran and len(shape) == 3 and shape[2] == 3
    return shape if ok else ()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_open(path) as f:  # two processes building the same cache cannot corrupt it
            # What np.save writes, but the data through Python's write: np.save's fwrite says
            # only "N requested and M written" on a full disk, where write keeps the reason.
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        _open_npy.cache_clear()  # a memmap of the file replaced (a damaged one) is stale
    except OSError as e:  # a full disk, a read-only folder: exit 7, as every unwritable output
        raise OutputError(
            f"--cache {path.parent}: cannot write {path.name} ({e.strerror or e}); free space "
            "there or give --cache another folder"
        ) from e


def _sized(pair: tuple[np.ndarray, np.ndarray] | None):
    """(HR, LR, the LR's (H, W)) of a decoded pair; None (smaller than one HR patch) stays None."""
    return None if pair is None else (*pair, pair[1].shape[:2])


def _pair_files(hr_dir: Path, lr_dir: Path | None, scale: int) -> list[tuple[Path, Path | None]]:
    """HR files of a folder with their LR partner: same relative path and stem, or DIV2K's 'x4'."""
    hr_files = list_images(hr_dir)
    if lr_dir is None:
        return [(f, None) for f in hr_files]
    lr_by_key = {f.relative_to(lr_dir).with_suffix("").as_posix(): f for f in list_images(lr_dir)}
    keys = [f.relative_to(hr_dir).with_suffix("").as_posix() for f in hr_files]
    pairs = []
    for f, lr in zip(hr_files, lr_partners(keys, lr_by_key, scale)):
        if lr is None:
            theirs = lr_taken(keys, lr_by_key, scale, key := f.relative_to(hr_dir).with_suffix(""))
            raise DataError(f"{f}: no LR image {key.name}x{scale}.* or {key.name}.* in {lr_dir}"
                            f"{theirs}")  # fmt: skip
        pairs.append((f, lr_by_key[lr]))
    return pairs


def lr_partners(keys: list[str], lr_keys: Collection[str], scale: int) -> list[str | None]:
    """Per HR image (`keys`: its path in its folder without the suffix) the key of its LR image
    among `lr_keys`: DIV2K's '{key}x{scale}', else its own; None where neither (sr_train.py's
    --lr-data, sr_eval.py's --lr). An HR whose DIV2K name is another HR image's, one that pairs
    by its own name (no DIV2K name of its own), takes its same-named LR: HR 0001.png and
    0001x4.png, their LR named alike, took LR 0001x4.png for both at x4, without a word."""
    own = {key for key in keys if f"{key}x{scale}" not in lr_keys}

    def partner(key: str) -> str | None:
        div2k = f"{key}x{scale}"
        if div2k in lr_keys and div2k not in own:
            return div2k
        return key if key in lr_keys else None

    return [partner(key) for key in keys]


def lr_taken(keys: Collection[str], lr_keys: Mapping[str, Path], scale: int, key) -> str:
    """Why the HR image `key` has no LR partner (`lr_partners`) where its DIV2K name is there:
    " (NAME is the LR of HR image KEYxS, which the HR folder holds too)", else ""."""
    div2k = f"{Path(key).as_posix()}x{scale}"
    if div2k not in lr_keys or div2k not in keys:
        return ""
    name = shell_quote(lr_keys[div2k].name)
    return f" ({name} is the LR of HR image {div2k}, which the HR folder holds too)"


def _each_once(files: list[tuple[Path, Path | None]]) -> list[tuple[Path, Path | None]]:
    """Each (HR, LR) pair of files once, the first in order, with one warning naming the others: a
    folder given twice, given with a folder inside it, or reached through a link would be drawn
    twice as often as the other images, without a word."""
    seen, kept, again = {}, [], []
    for pair in files:
        key = tuple(_identity(p) for p in pair if p)
        if key in seen:
            again.append((pair[0], seen[key]))
        else:
            seen[key] = pair[0]
            kept.append(pair)
    if again:
        warnings.warn(
            f"--data: {len(again)} image(s) reached twice (a folder given twice, inside another, "
            f"or linked) are used once, e.g. {again[0][0]} is {again[0][1]}",
            NodeWarning,
            stacklevel=3,
        )
    return kept


def _identity(path: Path) -> tuple | Path:
    """The file itself (links followed): two names of one file are one image. The path where it
    cannot be read (gone since listed: read_image names it)."""
    try:
        st = path.stat()
    except OSError:
        return path
    return st.st_dev, st.st_ino


def same_files(files: Sequence[Path], others: Sequence[str | os.PathLike]) -> list[Path]:
    """The `files` that are one of the `others` under any name (links followed)."""
    keys = {_identity(Path(p)) for p in others}
    return [f for f in files if _identity(f) in keys]


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: taskset, cgroups, SLURM's binding)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_workers() -> int:
    """CPU cores this process may use: its affinity mask, at most $SLURM_CPUS_PER_TASK if set."""
    n = available_cores()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return max(1, min(n, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else n)


def _tree_map(fn, tree):
    """`tree` (nested tuples, lists and dicts) with fn(leaf) at each leaf that is not None."""
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return None if tree is None else fn(tree)


def read_ahead(groups: Sequence, workers: int | None = None) -> Iterator:
    """Yield each group of image files decoded with `read_image`, in order, reading ahead.

    A group is any nesting of tuples, lists and dicts of paths (None stays None); it comes back with
    the uint8 arrays in their place. While the caller works on group k, the files of group k + 1
    are decoded on `workers` threads (default: `cpu_workers()`; Pillow's decoding releases the
    GIL). One worker decodes one file after the other in the caller's thread. Results and errors
    are those of the sequential loop: an unreadable file raises its ImageError when its group is
    reached (the first such file of the group in order); files not yet started are then dropped.
    Close it when stopping early (`contextlib.closing`), so its threads end there and then.
    """
    workers = cpu_workers() if workers is None else max(1, workers)
    if workers == 1:
        for group in groups:
            yield _tree_map(read_image, group)
        return
    pool = new_pool(workers, "read_ahead")
    owner = threading.get_ident()

    def start(path):
        return submit(pool, read_image, path)

    try:
        pending = _tree_map(start, groups[0]) if groups else None
        for k in range(len(groups)):
            current = pending
            if k + 1 < len(groups):  # queued behind group k's files: the pool is FIFO
                pending = _tree_map(start, groups[k + 1])
            yield _tree_map(result, current)
    finally:
        # Joined only in the thread that iterates: an abandoned generator is finalised by the
        # garbage collector in whatever thread it runs, possibly one of these workers holding an
        # import lock the others wait for; joining them there hung (tests/test_data.py).
        finish(pool, wait=threading.get_ident() == owner)
        with signals_held():
            pool = None  # sr_lib/threads.py: why here


def decode_threads() -> int:
    """How many training images are decoded (and their LR made) at once."""
    return min(8, cpu_workers())


def _thread_map(fn, items: list) -> list:
    """[fn(*x) for x in items] on threads: Pillow decoding and numpy resizing release the GIL.
    The first error cancels the images not yet started instead of decoding all of them first."""
    return thread_map(fn, items, decode_threads())


class TooSmall(DataError):
    """PatchPairs' error where every training image is smaller than one HR patch; `lr_side`: the
    largest of their shorter LR sides: the largest LR patch one of them takes (the caller, which
    knows the model's patch sizes, names a --patch that fits)."""

    def __init__(self, message: str, lr_side: int):
        super().__init__(message)
        self.lr_side = lr_side


class PatchPairs(Dataset):
    """Random aligned (LR, HR) patch batches; item `step` is the batch of training step `step`.

    sources: HR folders (searched recursively) or "demo". lr_dirs: optional LR folder per HR folder;
    without them LR = MATLAB-bicubic imresize of each whole HR image cropped to a multiple of the
    scale (how DIV2K's LR was made), computed once per image. Images are sampled uniformly, then a
    uniform crop position and (augment) one of the 8 flips/rotations. Images smaller than one HR
    patch are skipped with one warning. Decoded images are held in RAM (about 7 GB for DIV2K's
    800); with `cache` (a folder) they are stored once as .npy files and memory-mapped instead.
    With a `degradation` (one that is set) each LR patch is degraded after the flip/rotation
    (`degrade`): noise and JPEG act on the LR patch above; a blur makes it from the HR instead,
    as the crop of the whole image's blurred and downscaled LR (`blur_downscale`: the patch's
    LR reads the image around it, reflected only at the image's borders), flipped/rotated as
    the patch. A patch whose channels are equal (every patch of a gray image, read as RGB) gets
    one noise field for the three, so that its LR stays gray. The draws continue the step's
    generator after the crops', so that they too are a function of (seed, rank, step) and the
    crops are those of the same run without a degradation.
    """

    def __init__(
        self,
        sources: str | os.PathLike | Sequence[str | os.PathLike],
        scale: int,
        patch: int | None = None,
        batch: int = 16,
        seed: int = 0,
        rank: int = 0,
        lr_dirs: Sequence[str | os.PathLike] | None = None,
        cache: str | os.PathLike | None = None,
        augment: bool = True,
        degradation: Degradation | None = None,
    ):
        sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        if seed < 0 or rank < 0:
            raise ValueError(f"seed and rank must be >= 0, got {seed}, {rank}")
        self.scale, self.patch, self.batch = scale, patch or default_patch(scale), batch
        self.seed, self.rank, self.augment = seed, rank, augment
        self.degradation = degradation if degradation else None  # (one with nothing set: None)
        self.cache = Path(cache) if cache is not None else None
        self._small: list[int] = []  # the shorter LR side of each image under one patch
        if [str(s) for s in sources] == ["demo"]:  # built-in; small, so no cache and no lr_dirs
            demo = demo_images("train")
            names = [n for n, _ in demo]
            loaded = [_sized(self._pair(hr, None, n, None)) for n, hr in demo]
            files = [None] * len(demo)
        else:
            if lr_dirs is not None and len(lr_dirs) != len(sources):
                raise UsageError(f"got {len(lr_dirs)} LR folders for {len(sources)} HR folders")
            files = []
            for i, src in enumerate(sources):
                files += _pair_files(Path(src), Path(lr_dirs[i]) if lr_dirs else None, scale)
            files = _each_once(files)
            names, loaded = [str(f) for f, _ in files], _thread_map(self._load, files)
        skipped = [name for name, x in zip(names, loaded) if x is None]
        hp = self.scale * self.patch
        if len(skipped) == len(loaded):
            raise TooSmall(
                f"{', '.join(map(str, sources))}: no training images; all {len(loaded)} are "
                f"smaller than one {hp}x{hp} HR patch (LR patch {self.patch} x scale {scale})",
                max(self._small, default=0),
            )
        if skipped:
            warnings.warn(
                f"skipped {len(skipped)} of {len(loaded)} training images smaller than one "
                f"{hp}x{hp} HR patch (e.g. {skipped[0]})",
                NodeWarning,
                stacklevel=2,
            )
        kept = [(name, x, f) for name, x, f in zip(names, loaded, files) if x is not None]
        self.names = [name for name, _, _ in kept]
        self._files = [f for _, _, f in kept]  # (HR, LR) files: a cache file gone is made again
        self.skipped = skipped  # names of the images smaller than one HR patch
        self._hr = [x[0] for _, x, _ in kept]  # uint8 (H, W, 3) arrays, or .npy paths (cache)
        self._lr = [x[1] for _, x, _ in kept]
        self.lr_hw = np.array([x[2] for _, x, _ in kept], np.int64)  # (N, 2)

    def _pair(self, hr, lr, hr_name, lr_name):
        """(HR cropped to a multiple of the scale, LR), or None when smaller than one HR patch."""
        s, (h, w) = self.scale, hr.shape[:2]
        if min(h // s, w // s) < self.patch:
            self._small.append(min(h // s, w // s))  # (from threads: list.append is atomic)
            return None
        hr = np.ascontiguousarray(mod_crop(hr, s))
        if lr is None:
            return hr, imresize(hr, 1 / s)
        # An LR of floor(H / s) rows (made from the HR cropped to a multiple of s, as DIV2K's) or
        # of ceil(H / s) (MATLAB's imresize of the whole HR): their top-left parts are aligned.
        fits = [(n // s, -(-n // s)) for n in (h, w)]
        if lr.shape[0] in fits[0] and lr.shape[1] in fits[1]:
            return hr, np.ascontiguousarray(lr[: h // s, : w // s])
        ceil = f" (or {fits[1][1]}x{fits[0][1]})" if (h % s or w % s) else ""
        raise DataError(
            f"{lr_name}: LR is {lr.shape[1]}x{lr.shape[0]}, but its HR {hr_name} ({w}x{h}) at "
            f"--scale {s} needs {w // s}x{h // s}{ceil}; give --lr-data the LR images of these "
            f"HR images at x{s} (this one is {size_ratio((h, w), lr.shape)}), or leave it out to "
            "make them"
        )

    def _load(self, hr_path: Path, lr_path: Path | None):
        """(HR, LR, the LR's (H, W)): decoded arrays, or with a cache the paths of their .npy
        files; None for an image smaller than one HR patch."""
        if self.cache is not None:
            # The name hashes what the arrays depend on, so an edited image is decoded again.
            # Size and mtime alone miss a file replaced by `cp -p` (same size, its mtime kept):
            # its change time is new, and so is the inode of one renamed into place (rsync).
            # Both are stat's, read without the file's bytes; a copy of the data set (rsync -a,
            # cp -rp to a node's scratch) has new ones too, and is cached again once.
            key = [f"v{CACHE_VERSION}", f"x{self.scale}"]
            for p in (hr_path, lr_path):
                if p is not None:
                    st = file_stat(p)  # (deleted since the listing: its line, not a traceback)
                    key += [str(p.resolve()), str(st.st_size), str(st.st_mtime_ns)]
                    key += [str(st.st_ctime_ns), str(st.st_ino)]
            text = "|".join(key).encode("utf-8", "surrogateescape")  # a non-UTF-8 path: its bytes
            digest = hashlib.sha256(text).hexdigest()[:16]
            stem = fit_name(hr_path.stem, len(f"-{digest}.hr.npy"), name_max(self.cache))
            hr_npy, lr_npy = (self.cache / f"{stem}-{digest}.{k}.npy" for k in ("hr", "lr"))
            hr_shape, lr_shape = _npy_shape(hr_npy), _npy_shape(lr_npy)
            s = self.scale
            if hr_shape and lr_shape and hr_shape[:2] == (s * lr_shape[0], s * lr_shape[1]):
                small = min(lr_shape[:2]) < self.patch
                if small:
                    self._small.append(min(lr_shape[:2]))
                # the size from the header just checked: the file is not opened again to get it
                # (20,000 opens more at each start on a network file system took minutes)
                return None if small else (str(hr_npy), str(lr_npy), lr_shape[:2])
            # Not whole (a crash before the files reached the disk): a traceback at start, or
            # in a loader worker mid-run. Decoded again and rewritten instead.
            bad = [p for p, shape in ((hr_npy, hr_shape), (lr_npy, lr_shape)) if shape == ()]
            bad = [hr_npy, lr_npy] if hr_shape and lr_shape else bad  # not one image's pair
            if bad:
                names = " and ".join(map(str, bad))
                warnings.warn(f"--cache: {names}: cut short or not this image's arrays; "
                              f"decoding {hr_path} again", NodeWarning, 2)  # fmt: skip
        lr = read_image(lr_path) if lr_path is not None else None
        pair = self._pair(read_image(hr_path), lr, hr_path, lr_path)
        if self.cache is None or pair is None:  # too small: not cached, decoded again next time
            return _sized(pair)
        _save_npy(hr_npy, pair[0])
        _save_npy(lr_npy, pair[1])
        return str(hr_npy), str(lr_npy), pair[1].shape[:2]

    @staticmethod
    def _array(x) -> np.ndarray:
        # Opened lazily in each process: a loader worker receives paths, not copies of arrays.
        return _open_npy(x) if isinstance(x, str) else x

    def _arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i's (LR, HR) arrays. A cache file deleted or cut short since the start (a
        scratch folder purged under a running job) is written again from its image, with a
        warning: it stopped the run with a loader worker's traceback, losing the steps since
        the last save. An image gone too, or changed, is a DataError naming it."""
        try:
            return self._array(self._lr[i]), self._array(self._hr[i])
        except (OSError, ValueError):  # (np.memmap of a file cut short: ValueError)
            pass
        hr_path, lr_path = self._files[i]
        warnings.warn(f"--cache: {self._hr[i]} or its .lr.npy is gone or damaged since the "
                      f"start; decoding {hr_path} again", NodeWarning, 2)  # fmt: skip
        try:
            made = self._load(hr_path, lr_path)
        except (OSError, ImageError) as e:  # the image gone too (`file_stat`, `read_file`)
            said = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) else str(e)
            raise DataError(f"{said}, and its --cache file is gone") from None
        if made != (self._hr[i], self._lr[i], tuple(self.lr_hw[i])):
            raise DataError(f"{hr_path}: changed since the run started, and its --cache file "
                            "is gone")  # fmt: skip
        return self._array(self._lr[i]), self._array(self._hr[i])

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Image indices, LR crop rows and columns, and dihedral transforms of a step: (B,) each."""
        return self._plan(step)[1:]

    def _plan(self, step: int):
        """`plan`, after the step's generator, from which the degradation draws continue."""
        rng = np.random.default_rng([self.seed, self.rank, step])
        idx = rng.integers(len(self.lr_hw), size=self.batch)
        hw = self.lr_hw[idx]  # (B, 2)
        ys = rng.integers(0, hw[:, 0] - self.patch + 1)
        xs = rng.integers(0, hw[:, 1] - self.patch + 1)
        ts = rng.integers(0, 8, size=self.batch)
        return rng, idx, ys, xs, ts if self.augment else np.zeros_like(ts)

    def crops(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 patches of a step: lr (B, 3, p, p), hr (B, 3, s*p, s*p)."""
        p, s, deg = self.patch, self.scale, self.degradation
        lr = np.empty((self.batch, 3, p, p), np.uint8)
        hr = np.empty((self.batch, 3, s * p, s * p), np.uint8)
        rng, *plan = self._plan(step)
        draws = deg.draw(rng, self.batch) if deg else None  # (after the crops': they stay)
        for b, (i, y, x, t) in enumerate(zip(*plan)):
            lr_img, hr_img = self._arrays(i)
            hr_crop = dihedral(hr_img[s * y : s * (y + p), s * x : s * (x + p)], t)
            # one copy per patch: crop, flip/rotate and HWC -> CHW are views until this assignment
            hr[b] = hr_crop.transpose(2, 0, 1)
            lr_crop = dihedral(lr_img[y : y + p, x : x + p], t)
            if deg:  # the noise fields in patch order, after all the batch's draws
                blur, noise, quality = draws[b]
                if blur > 0:  # the crop of the whole image's blurred LR (the image around the
                    # patch blurred into it), flipped/rotated as the HR patch, as the LR above
                    lr_crop = dihedral(blur_downscale(hr_img, s, blur, (y, x, p, p)), t)
                # a gray image (its channels copies) gets one noise field, so its LR stays gray
                gray = deg.noise is not None and equal_channels(hr_crop)
                noise_rng = rng if deg.noise else None
                lr_crop = degrade(hr_crop, s, 0.0, noise, quality, noise_rng, lr_crop, gray)
            lr[b] = lr_crop.transpose(2, 0, 1)
        return lr, hr

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr (B, 3, p, p), hr (B, 3, s*p, s*p)), float32 in [0, 1]."""
        lr, hr = self.crops(step)
        return _as_float(torch.from_numpy(lr)), _as_float(torch.from_numpy(hr))


class _Uint8Steps(Dataset):
    """What loader workers compute: uint8 batches. Filling fresh shared memory to hand a batch to
    the main process costs more than cropping it, and uint8 is 4x less to fill than float32."""

    def __init__(self, pairs: PatchPairs):
        self.pairs = pairs

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor] | SRSpaceError:
        try:
            batch = tuple(torch.from_numpy(a) for a in self.pairs.crops(step))
        except (DataError, OutputError) as e:  # torch would add the worker's traceback to it
            return e  # raised by _floats in the main process, as it is
        if torch.utils.data.get_worker_info() is not None:
            try:  # here, not in the queue's feeder thread, which prints a full /dev/shm's error
                for t in batch:  # and drops the batch: the run waited for it until WorkersHung
                    t.share_memory_()
            except RuntimeError as e:
                if "shared memory" not in str(e) and "No space left" not in str(e):
                    raise
                workers = torch.utils.data.get_worker_info().num_workers
                return SharedMemoryFull(shared_memory_full(sum(t.nbytes for t in batch), workers))
        return batch


class _FloatLoader(DataLoader):
    """A DataLoader of uint8 batches that yields float32 in [0, 1], converted on `device`."""

    def __init__(self, *args, device=None, hung_after=0.0, stop_request=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = device
        self.hung_after = hung_after  # no batch for this long (s): the workers hung
        self.stop_request = stop_request  # the run's stop request (a signal's name) or None
        self._stop = None  # stops the workers once: by close(), or when the loader is freed

    def __iter__(self):
        _LIVE_LOADERS.add(self)
        # Not a generator: workers start now (once: they persist), forked with the stop signals
        # blocked, which they unblock once they ignore them (`_worker_init`): a group signal
        # (SLURM's) before that killed a worker (torch's handler of SIGTERM ends it then), and
        # the run, exit 4, was not requeued. This process takes a signal so held right after.
        held = None
        if self.num_workers > 0:
            if (self.multiprocessing_context or multiprocessing).get_start_method() != "fork":
                # (spawn, macOS's): multiprocessing's resource tracker, started with the first
                # worker, unblocks SIGINT and SIGTERM in this thread once started: started first
                multiprocessing.resource_tracker.ensure_running()
            held = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            batches = super().__iter__()
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if self.num_workers > 0 and self._stop is None:
            self._stop = weakref.finalize(self, _stop_workers, batches)
        if getattr(batches, "_worker_pids_set", False):
            # Off torch's SIGCHLD watch, whose handler raises where the main thread happens to
            # be (in a backward, an optimiser step, a save) when a worker dies: a traceback,
            # and the steps since the last save lost. `_next` finds the death instead, within
            # LOADER_SLICE, between steps.
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(batches))
            batches._worker_pids_set = False
        return self._floats(batches)

    def close(self) -> None:
        """Stop the (persistent) workers now."""
        if self._stop is not None:
            self._stop()
            self._stop = None
        self._iterator = None

    def _floats(self, batches):
        while True:
            try:
                batch = self._next(batches)
            except StopIteration:
                return
            if isinstance(batch, SRSpaceError):  # in the worker (_Uint8Steps)
                raise batch
            lr, hr = batch
            if self.device is not None:  # copy uint8 (4x less), convert on the device
                lr = lr.to(self.device, non_blocking=self.pin_memory)
                hr = hr.to(self.device, non_blocking=self.pin_memory)
            yield _as_float(lr), _as_float(hr)

    def _next(self, batches):
        """The next batch, waited for in slices of torch's `timeout` (LOADER_SLICE): at the end
        of each, a stop request or torch's dead pin-memory thread ends the wait, and no batch for
        `hung_after` in all takes the workers for hung. (torch waits for the whole `timeout` in
        one call, and checks its pin-memory thread only without one.)"""
        start = time.monotonic()
        while True:
            try:
                return next(batches)
            except (RuntimeError, OSError, EOFError) as e:  # (RuntimeError: torch's `timeout`)
                if not str(e).startswith("DataLoader timed out"):
                    # torch's "worker (pid(s) ...) exited unexpectedly", or, where the worker
                    # died with a batch in the queue, the socket its tensors' file descriptors
                    # come by reset (ConnectionResetError) before the worker is seen dead
                    wait = 0 if isinstance(e, RuntimeError) else WORKER_REAP_WAIT
                    dead = _dead_worker(batches._workers, wait)
                    if dead is not None:
                        raise WorkerDied(worker_died(dead)) from None
                    raise
            why = self.stop_request() if self.stop_request is not None else None
            if why or time.monotonic() - start >= self.hung_after:
                _kill_workers(batches)  # nothing to wait for: torch's stop would take 10 s each
                self.close()
                if why:
                    raise StopRequested(why)
                raise WorkersHung(
                    f"the data loader's workers gave no batch for {self.hung_after:g} s (a worker "
                    "hung: on Python before 3.12 a worker can hang at its start, CPython "
                    "gh-112275)"
                )
            if batches._pin_memory and not batches._pin_memory_thread.is_alive():
                raise RuntimeError("Pin memory thread exited unexpectedly")  # torch's own check


_LIVE_LOADERS: "weakref.WeakSet[_FloatLoader]" = weakref.WeakSet()

# How long the training loop waits for a batch before it takes a loader worker for hung. On
# Python before 3.12 a forked worker can hang at its start for good (CPython gh-112275: a lock
# that another thread, such as one of torch's, held at the fork stays locked in the child); the
# run waited for its first batch until the job's time limit. A batch takes milliseconds: the
# images are decoded (or cached) before the workers start, which then take seconds; the longest
# legitimate wait, a batch whose purged --cache files are made again from their images, takes
# seconds a file.
LOADER_TIMEOUT = 600.0
# The wait for a batch is made of slices this long (torch's `timeout`), after each of which the
# run's stop request is looked at: SLURM's SIGTERM during a hang stops the run (the steps done
# saved) within seconds, well before its SIGKILL (30 s after by default), not after
# LOADER_TIMEOUT. A batch that comes within a slice is taken at once.
LOADER_SLICE = 2.0


class StopRequested(Exception):
    """The run's stop request (a signal: the message is its name), seen while the training
    loader's workers gave no batch (they are stopped): the loop stops as after the step."""


class SharedMemoryFull(OutOfMemory):
    """A loader worker could not hand a batch to the main process: /dev/shm is full."""


def shared_memory_full(nbytes: int, workers: int) -> str:
    """What to do where /dev/shm cannot take a batch of `nbytes` (a container's is 64 MB): each
    of the `workers` keeps up to PREFETCH batches there (the main process one more), so fewer
    of them help, none most. (A smaller batch helps too: the caller, which knows the model's
    least patch, names what is left of --batch and --patch.)"""
    try:
        st = os.statvfs("/dev/shm")
        mb = st.f_frsize / 2**20
        free = f"{st.f_bavail * mb:.0f} MB free of {st.f_blocks * mb:.0f} MB"
    except OSError:
        free = "its size unknown"
    fewer = (f"fewer --workers (this run's: {workers}; each keeps up to {PREFETCH} batches "
             "there) or " if workers > 1 else "")  # fmt: skip
    return (
        f"the data loader's workers cannot hand over a batch of {nbytes / 2**20:.1f} MB: shared "
        f"memory (/dev/shm, {free}) is full; give the container more (docker run --shm-size "
        f"1g), or use {fewer}--workers 0"
    )


class WorkerDied(OutOfMemory):
    """A training loader's worker died: killed, most likely by the kernel's out-of-memory
    killer (the workers ignore the stop signals)."""


PREFETCH = 4  # batches each loader worker prepares ahead (each in /dev/shm until taken)


def loader_start() -> str:
    """The start method of the loader workers. Forked where the system can (Linux): they share
    the decoded training images with the main process, copy-on-write. Python 3.14 starts them by
    default from a fork server (as macOS does by spawn): each worker then imports torch and the
    scripts again and gets its own copy of the dataset, pickled (measured with 40 decoded
    1000x1000 images, --workers 2: 0.78 -> 1.90 GB proportional memory; DIV2K's 800 images held
    decoded, about 2040x1356x3 bytes each, would be 6.6 GB more per worker). macOS spawns them,
    its default: fork is unsafe with its system libraries. Never Python's default, never the
    fork server, 3.14's on POSIX systems but macOS and a program's that sets it (sr_lib used as
    a library): a server started before the workers' start (`_FloatLoader.__iter__`) forks
    them with its own signal mask, not with the stop signals blocked."""
    return "spawn" if sys.platform == "darwin" else "fork"


WORKER_REAP_WAIT = 5.0  # s: how long a socket reset by a worker waits to see it dead


def _dead_worker(workers, wait: float):
    """A loader worker that exited with an error, looked for up to `wait` seconds (a worker
    SIGKILLed is seen dead only once the kernel has reaped it); None if none did."""
    deadline = time.monotonic() + wait
    while True:
        dead = [w for w in workers if w.exitcode not in (None, 0)]  # (exitcode: a waitpid)
        if dead or time.monotonic() >= deadline:
            return dead[0] if dead else None
        time.sleep(0.05)


def worker_died(worker) -> str:
    """What to say about a loader worker that died (a multiprocessing.Process)."""
    code = worker.exitcode
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += " (most likely by the kernel's out-of-memory killer: dmesg says)"
    else:
        how = f"exited with code {code}"
    return (
        f"a data loader worker (pid {worker.pid}) {how}; without --cache every worker may come "
        "to hold its own copy of the images: use --cache DIR (memory-mapped, shared), fewer "
        "--workers or --workers 0"
    )


class WorkersHung(Resumable):
    """The training loader's workers gave no batch in LOADER_TIMEOUT (they are stopped): a run
    continued from its last save does not meet the hang again (docs/clusters.md)."""


def _kill_workers(batches) -> None:
    """Kill a loader's workers at once (hung ones ignore torch's stop message, and SIGTERM),
    after taking them off torch's SIGCHLD watch, which would take their end for a failure."""
    if batches._worker_pids_set:
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for worker in batches._workers:
        worker.kill()
        worker.join()


def _stop_workers(batches) -> None:
    """Stop a loader's workers, killing any still alive after torch's own stop. The workers
    ignore SIGTERM (`_worker_init`), torch's last resort. A loader freed by the garbage
    collector (one in a reference cycle, like a traceback's frames) lost torch's stop message:
    the collector closed its queues before torch's `__del__` sent it. Its workers lived on, and
    the exit of the process waited for them forever (a failing test hung the test run).

    Called with the loader's iterator held here, so the iterator and its queues are intact."""
    batches._shutdown_workers()
    for worker in batches._workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


def _stop_live_workers() -> None:
    """At exit, stop the workers of loaders still alive (a traceback keeps its frames' loaders
    alive). They ignore SIGTERM (`_worker_init`), so multiprocessing's own exit handler, which
    terminates daemonic children and then joins them, would wait for them forever: a run that
    ended in a traceback hung instead of exiting, and SIGTERM could not end it."""
    for loader in list(_LIVE_LOADERS):
        loader.close()


# atexit calls the last registered first: after multiprocessing's handler (registered when
# multiprocessing.util is imported, above), this one runs before it.
atexit.register(_stop_live_workers)


# The stop signals, which loader workers leave to the main process (`_worker_init`)
WORKER_SIGNALS = (signal.SIGINT, *PREEMPT_SIGNALS)


def _worker_init(worker_id: int) -> None:
    """Loader workers leave SIGTERM, SIGINT, SIGUSR1 and SIGHUP to the main process: SLURM and a
    terminal (also one that closes) signal the whole process group, and a worker killed by one
    would take the run down before the main process could save. They start with these signals
    blocked (`_FloatLoader.__iter__`): one that came since stays pending until ignored here,
    which discards it. One thread each: workers run in parallel already. The socket folder is
    the main process's (`make_socket_folder`), removed by the worker at its exit only if the
    main process is gone."""
    for sig in WORKER_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
    torch.set_num_threads(1)
    # Run by multiprocessing at the worker's end (atexit's handlers are not), after the one that
    # removes the worker's socket (priority 0).
    multiprocessing.util.Finalize(
        None,
        _remove_socket_folder_if_orphaned,
        args=(multiprocessing.util.get_temp_dir(), os.getppid()),
        exitpriority=-100,
    )


SOCKET_PATH_MAX = 107  # bytes of an AF_UNIX socket's path on Linux: sun_path, 108 with its NUL


def check_socket_folder(workers: int) -> None:
    """A worker hands each batch over through a socket in multiprocessing's folder in $TMPDIR
    ($TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX). Where that path is longer than an AF_UNIX path
    can be (a cluster's per-job TMPDIR deep in a scratch file system), the worker's bind failed
    in a thread of its own, printing a traceback, and the run waited LOADER_TIMEOUT for a batch,
    then exited 75 as "worker hung", to be requeued into the same wall."""
    folder = tempfile.gettempdir()
    length = len(os.fsencode(os.path.join(folder, "pymp-12345678", "listener-12345678")))
    if length > SOCKET_PATH_MAX:
        raise UsageError(
            f"--workers {workers}: the temporary folder {folder} ($TMPDIR) is too deep for the "
            f"loader workers' sockets (their paths would be {length} bytes, at most "
            f"{SOCKET_PATH_MAX}): set TMPDIR to a shorter folder (e.g. /tmp) or use --workers 0"
        )


def make_socket_folder(workers: int) -> None:
    """Make multiprocessing's temporary folder ($TMPDIR/pymp-XXXXXXXX), in which each loader
    worker binds the socket it hands batches over through, in this (the main) process before
    the workers start. `multiprocessing.util.get_temp_dir()` makes the folder in the process
    that first calls it and removes it at that process's exit; a process started after that
    (fork, spawn or forkserver) takes its parent's. Made by each worker, as before, it was
    removed at the worker's exit, which a worker SIGKILLed (by the out-of-memory killer, or by
    the run after LOADER_TIMEOUT) never reaches: a pymp-* folder left in $TMPDIR (a node's /tmp,
    shared by its jobs) for every worker killed. The main process removes it now; killed alone,
    it leaves it to its workers (`_remove_socket_folder_if_orphaned`). A process group killed
    whole leaves it: nothing runs then that could remove it. A folder that cannot be made (a
    full or read-only $TMPDIR) made each worker print a traceback, and the run waited
    LOADER_TIMEOUT, then exited 75 as "worker hung", to be requeued into the same wall."""
    try:
        multiprocessing.util.get_temp_dir()
    except OSError as e:
        raise OutputError(
            f"--workers {workers}: cannot make the loader workers' socket folder in the "
            f"temporary folder {tempfile.gettempdir()} ($TMPDIR): {e.strerror or e}; free space "
            "there, set TMPDIR to a folder you can write to, or use --workers 0"
        ) from None


def _remove_socket_folder_if_orphaned(folder: str, main_pid: int) -> None:
    """At a loader worker's exit, after its socket is removed: the socket folder, if the main
    process, which removes it otherwise, is gone (SIGKILLed alone: its workers see it and end
    within seconds) and no other worker's socket is left in it (the last worker to end)."""
    if os.getppid() != main_pid:  # an orphan's parent is init (or a subreaper)
        with contextlib.suppress(OSError):  # not empty, or removed already
            os.rmdir(folder)


def train_loader(
    dataset: PatchPairs,
    start_step: int,
    total_steps: int,
    workers: int = 2,
    pin_memory: bool = False,
    device: str | torch.device | None = None,
    stop_request=None,
) -> DataLoader:
    """Yields `dataset[step]` for step = start_step .. total_steps - 1, in order, identical for any
    number of `workers`; on `device` if given, else CPU. It leaves the global torch RNG alone.
    While it waits for a batch, `stop_request()` (the run's stop request, or None) that is set
    raises StopRequested, and no batch for LOADER_TIMEOUT raises WorkersHung."""
    more = dict(persistent_workers=True, prefetch_factor=PREFETCH) if workers > 0 else {}
    if workers > 0:
        check_socket_folder(workers)
        make_socket_folder(workers)
    return _FloatLoader(
        _Uint8Steps(dataset),
        batch_size=None,  # each item is already a batch
        sampler=range(start_step, total_steps),
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),  # the workers' base seed (unused by us)
        worker_init_fn=_worker_init if workers > 0 else None,
        multiprocessing_context=loader_start() if workers > 0 else None,
        timeout=min(LOADER_SLICE, LOADER_TIMEOUT) if workers > 0 else 0,  # (_next)
        device=device,
        hung_after=LOADER_TIMEOUT,  # (read here: tests set it lower)
        stop_request=stop_request,
        **more,
    )
