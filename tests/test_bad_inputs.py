"""A sweep of bad and unusual image files through all three scripts.

Every file is either handled as documented (README "Data layout": gray/alpha/16-bit/palette/CMYK/
EXIF conversions; images smaller than a training patch skipped with one counted warning) or
reported in one line naming it, with the documented exit code; never a traceback.
"""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import png
import pytest
from PIL import Image

import sr_eval
import sr_sample
import sr_train
from sr_lib import data
from sr_lib.data import pixel_limit

RNG = np.random.default_rng(0)


def photo(h, w):
    return (
        np.kron(RNG.random((h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w] * 255
    ).astype(np.uint8)


def png_header_only(path: Path, w: int, h: int) -> None:
    """A valid PNG signature + IHDR claiming w x h, with a tiny IDAT (a decompression bomb)."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )


def make_odd(d: Path) -> list[str]:
    """Unusual but valid images (handled by conversion). Returns their stems."""
    d.mkdir(parents=True, exist_ok=True)
    img = photo(64, 72)
    Image.fromarray(img).convert("L").save(d / "gray.png")
    Image.fromarray(img).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(img).convert("LA").save(d / "la.png")
    Image.fromarray(img).convert("P").save(d / "palette.png")
    Image.fromarray(img).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    rot = Image.fromarray(img[:, :64])
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    rot.save(d / "exif rotated.jpg", exif=exif, quality=95)
    rows = (img.astype(np.uint16) * 257).reshape(64, -1)
    with open(d / "sixteen.png", "wb") as f:
        png.Writer(72, 64, bitdepth=16, greyscale=False).write(f, rows)
    Image.fromarray(img).save(d / "ünïcödé name.png")
    return ["gray", "rgba", "la", "palette", "cmyk", "exif rotated", "sixteen", "ünïcödé name"]


def make_bad(d: Path) -> dict[str, str]:
    """Unusable files -> the words their one-line message must contain."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("this is not an image")
    Image.fromarray(photo(64, 64)).save(d / "full.png")
    (d / "cut png.png").write_bytes((d / "full.png").read_bytes()[:300])
    (d / "full.png").unlink()
    Image.fromarray(photo(64, 64)).save(d / "full.jpg", quality=90)
    (d / "cut jpg.jpg").write_bytes((d / "full.jpg").read_bytes()[:400])
    (d / "full.jpg").unlink()
    png_header_only(d / "bomb.png", 100_000, 100_000)
    return {"zero.png": "empty", "text.png": "not", "cut png.png": "trunc", "cut jpg.jpg": "trunc",
            "bomb.png": "exceeds"}  # fmt: skip


def call(main, argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


def test_sr_sample_sweep(tmp_path, capsys):
    ck = tmp_path / "bicubic"
    assert sr_train.main(["--model", "bicubic", "--steps", "0", "--out", str(ck)]) == 0
    inp = tmp_path / "in"
    stems = make_odd(inp)
    bad = make_bad(inp)
    Image.fromarray(photo(1, 1)).save(inp / "one pixel.png")
    code, err = call(sr_sample.main, ["--ckpt", ck / "last.pt", "--input", inp, "--n", 1,
                                      "--out", tmp_path / "out"], capsys)  # fmt: skip
    assert code == 3
    lines = [line for line in err.splitlines() if "skipped" in line]
    for name, words in bad.items():  # one line per bad file, naming it
        hits = [line for line in lines if name in line]
        assert len(hits) == 1 and words in hits[0].lower(), (name, lines)
    for stem in [*stems, "one pixel"]:  # every usable file was written, with its own name
        assert (tmp_path / "out" / f"{stem}.png").is_file(), stem
    assert (tmp_path / "out" / "exif rotated.png").is_file()


def test_sr_train_sweep(tmp_path, capsys):
    data = tmp_path / "data"
    make_odd(data)
    Image.fromarray(photo(1, 1)).save(data / "tiny.png")  # smaller than a patch: skipped, counted
    Image.fromarray(photo(20, 20)).save(data / "small.png")
    argv = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "2", "--patch",
            "16", "--batch", "2", "--steps", "1", "--workers", "0", "--val-every", "0"]  # fmt: skip
    with pytest.warns(UserWarning, match="skipped 2"):
        code, err = call(sr_train.main, [*argv, "--data", data, "--out", tmp_path / "r0"], capsys)
    assert code == 0, err
    for name, words in make_bad(tmp_path / "bad").items():
        one = tmp_path / f"only_{name}"
        make_odd(one)
        (one / name).write_bytes((tmp_path / "bad" / name).read_bytes())
        code, err = call(sr_train.main, [*argv, "--data", one, "--out", tmp_path / name], capsys)
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert code == 3 and len(errors) == 1, (name, err)
        assert name in errors[0] and words in errors[0].lower(), err


def test_sr_eval_sweep(tmp_path, capsys):
    hr = tmp_path / "hr"
    stems = make_odd(hr)
    sr = tmp_path / "sr"
    sr.mkdir()
    from sr_lib.data import read_image

    for stem in stems:  # "samples": the ground truth itself, as 8-bit RGB PNGs
        path = next(p for p in hr.iterdir() if p.stem == stem)
        Image.fromarray(read_image(path)).save(sr / f"{stem}.png")
    argv = ["--hr", hr, "--sr", sr, "--scale", 4, "--n", 1, "--no-lpips",
            "--out", tmp_path / "r.json"]  # fmt: skip
    code, err = call(sr_eval.main, argv, capsys)
    assert code == 0, err
    for name, words in make_bad(tmp_path / "bad").items():
        one = tmp_path / f"hr_{name}"
        one.mkdir()
        (one / name).write_bytes((tmp_path / "bad" / name).read_bytes())
        Image.fromarray(photo(64, 64)).save(sr / f"{Path(name).stem}.png")  # a valid "sample"
        code, err = call(sr_eval.main, ["--hr", one, *argv[2:]], capsys)
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert code == 3 and len(errors) == 1, (name, err)
        assert name in errors[0] and words in errors[0].lower(), err


def test_a_pixel_limit_that_is_no_number_is_one_line(tmp_path, capsys, monkeypatch):
    """SRSPACE_MAX_PIXELS=abc stopped all three scripts at import with a traceback (even -h).
    The variable is read at import: one fresh Python imports the three scripts with it, asks
    sr_train.py and sr_sample.py for -h, then runs sr_eval.py (its stderr: the one line alone)."""
    for d in ("hr", "sr"):
        (tmp_path / d).mkdir()
        Image.fromarray(photo(32, 32)).save(tmp_path / d / "a.png")
    repo = Path(__file__).resolve().parents[1]
    evaluate = ["--hr", tmp_path / "hr", "--sr", tmp_path / "sr", "--scale", "4", "--n", "1"]
    evaluate += ["--no-lpips"]
    scripts = (
        "import sys, sr_train, sr_sample, sr_eval\n"
        "for script in (sr_train, sr_sample):  # no image read: no error\n"
        "    try:\n"
        "        script.main(['-h'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (script.__name__, e.code)\n"
        "    print('help:', script.__name__)\n"
        "sys.exit(sr_eval.main(sys.argv[1:]))"
    )
    env = {**os.environ, "SRSPACE_MAX_PIXELS": "abc"}
    done = subprocess.run([sys.executable, "-c", scripts, *evaluate], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "help: sr_train\n" in done.stdout and "help: sr_sample\n" in done.stdout, done.stderr
    assert done.returncode == 2 and done.stderr == (
        "sr_eval.py: error: SRSPACE_MAX_PIXELS='abc' is not a number of pixels; set it to a "
        "positive whole number (268435456, 1e9) or unset it for the default 2^28\n"
    )
    # an integer in exponent form is a number of pixels (the limit it gives, in this process)
    monkeypatch.setattr(data, "MAX_PIXELS", pixel_limit("1e9"))
    code, err = call(sr_eval.main, evaluate, capsys)
    assert code == 0, err
    assert [pixel_limit(v) for v in ("1000", " 1e3 ", "2.5e3", "1.5", "0", "-1", "inf")] == [
        *(1000, 1000, 2500),
        *(None, None, None, None),
    ]
