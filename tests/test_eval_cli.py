"""sr_eval.py end to end on tiny generated sets, checked against values computed here independently.

LPIPS uses a seeded random-weight state_dict passed as --lpips-weights: the numbers only show that
the CLI and a direct lpips module call agree; they are not real LPIPS values.
"""

import csv
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import imageio.v3 as iio
import lpips
import numpy as np
import png
import pytest
import torch
from conftest import opens_of
from PIL import Image
from test_data import write_tiff

import sr_eval
import sr_lib.metrics
from sr_lib import data
from sr_lib.data import read_image
from sr_lib.resize import imresize

SCALE, N = 4, 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    torch.manual_seed(0)
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, spatial=True, verbose=False)
    path = tmp_path_factory.mktemp("weights") / "lpips_random.pth"
    torch.save(net.state_dict(), path)
    return path


def make_hr(h, w, seed):
    lr = np.random.default_rng(seed).integers(0, 256, (-(-h // 4), -(-w // 4), 3), dtype=np.uint8)
    return imresize(lr, 4)[:h, :w]


def make_set(root, layout="index", n=N, sizes=((48, 64), (53, 70)), names=("0801", "0802")):
    """HR images, LR = imresize(HR, 1/4), samples = imresize(LR, 4) + seeded noise."""
    hr_dir, lr_dir, sr_dir = root / "hr", root / "lr", root / "method_a"
    for d in (hr_dir, lr_dir, sr_dir):
        d.mkdir(parents=True, exist_ok=True)
    for k, (stem, (h, w)) in enumerate(zip(names, sizes)):
        hr = make_hr(h, w, seed=k)
        iio.imwrite(hr_dir / f"{stem}.png", hr)
        lr = imresize(hr[: h // 8 * 8, : w // 8 * 8], 1 / SCALE)
        iio.imwrite(lr_dir / f"{stem}x{SCALE}.png", lr)
        for i in range(n):
            noise = np.random.default_rng(100 * k + i).normal(0, 2 + 3 * i, (*hr.shape[:2], 3))
            up = imresize(imresize(hr, 1 / SCALE), SCALE)[:h, :w]
            sr = np.clip(np.round(up + noise), 0, 255).astype(np.uint8)
            name = {"index": f"{k:06d}_sample{i:05d}", "stem": f"{stem}_sample{i:05d}"}.get(
                layout, f"{k:06d}" if layout == "index1" else stem
            )
            iio.imwrite(sr_dir / f"{name}.png", sr)
    return hr_dir, lr_dir, sr_dir


def long_set(root, n: int, count: int):
    """make_set of `count` 256 x 256 images named 0000, 0001, ...: the first made, the others
    its copies. A run long enough to be signalled while it scores; what the images hold does
    not matter there, and making each cost more than the script's scoring of it."""
    hr_dir, lr_dir, sr_dir = make_set(root, n=n, sizes=((256, 256),), names=("0000",))
    for k in range(1, count):
        shutil.copyfile(hr_dir / "0000.png", hr_dir / f"{k:04d}.png")
        shutil.copyfile(lr_dir / f"0000x{SCALE}.png", lr_dir / f"{k:04d}x{SCALE}.png")
        for i in range(n):
            shutil.copyfile(
                sr_dir / f"000000_sample{i:05d}.png", sr_dir / f"{k:06d}_sample{i:05d}.png"
            )
    return hr_dir, lr_dir, sr_dir


def sample_files(sr_dir, k, stem, n):
    for pat in (f"{k:06d}_sample{{i:05d}}", f"{stem}_sample{{i:05d}}"):
        files = [sr_dir / (pat.format(i=i) + ".png") for i in range(n)]
        if files[0].exists():
            return files
    return [next(p for p in (sr_dir / f"{k:06d}.png", sr_dir / f"{stem}.png") if p.exists())]


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * np.log10(255.0**2 / mse)


def expected(hr_dir, sr_dir, n, lpips_path, lr_dir=None):
    """Every column, straightforwardly: per sample, as the official measure.py loop."""
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, spatial=True, verbose=False)
    net.load_state_dict(torch.load(lpips_path, weights_only=True))
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255 * 2 - 1  # noqa: E731
    rows = []
    for k, hr_path in enumerate(sorted(hr_dir.iterdir())):
        gt = read_image(hr_path)
        h8, w8 = gt.shape[0] // 8 * 8, gt.shape[1] // 8 * 8
        hs, ws = gt.shape[0] // SCALE * SCALE, gt.shape[1] // SCALE * SCALE
        maps, lrp, ps, vs_in = [], [], [], []
        for f in sample_files(sr_dir, k, hr_path.stem, n):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RGBA: alpha dropped (sr_eval reports it)
                sr = read_image(f)
            with torch.no_grad():
                maps.append(net(t(sr[:h8, :w8]), t(gt[:h8, :w8]))[0, 0].numpy())
            lrp.append(psnr(imresize(sr[:h8, :w8], 1 / SCALE), imresize(gt[:h8, :w8], 1 / SCALE)))
            sh = SCALE  # default --shave = scale
            ps.append(psnr(sr[sh : hs - sh, sh : ws - sh], gt[sh : hs - sh, sh : ws - sh]))
            if lr_dir is not None:
                lr = read_image(lr_dir / f"{hr_path.stem}x{SCALE}.png")
                hl, wl = lr.shape[0] * SCALE, lr.shape[1] * SCALE
                vs_in.append(psnr(imresize(sr[:hl, :wl], 1 / SCALE), lr))
        means = [m.mean() for m in maps]
        g, l = min(means), np.stack(maps).min(0).mean()
        row = dict(image=hr_path.stem, LPIPS_mean=np.mean(means), LRPSNR_worst=min(lrp))
        row.update(LRPSNR_mean=np.mean(lrp), score=(g - l) / g * 100, PSNR_mean=np.mean(ps))
        row.update(PSNR_best=max(ps), LRPSNR_vs_input_mean=np.mean(vs_in) if vs_in else None)
        rows.append(row)
    return rows


def check_row(got, want):
    assert got["image"] == want["image"]
    assert got["LPIPS_mean"] == pytest.approx(want["LPIPS_mean"], rel=1e-6)
    assert got["score"] == pytest.approx(want["score"], abs=1e-4)
    for c in ("LRPSNR_worst", "LRPSNR_mean"):
        assert got[c] == pytest.approx(want[c], abs=1e-9)
    for c in ("PSNR_mean", "PSNR_best", "LRPSNR_vs_input_mean"):
        if c in got:
            assert got[c] == pytest.approx(want[c], abs=1e-9)


def run(capsys, *argv):
    code = sr_eval.main([str(a) for a in argv])
    return code, capsys.readouterr()


def fails(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_index_layout_with_lr(tmp_path, capsys, lpips_file):
    hr_dir, lr_dir, sr_dir = make_set(tmp_path)
    out, csv_path = tmp_path / "res.json", tmp_path / "rows.csv"
    code, cap = run(
        capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", N, "--lr", lr_dir,
        "--lpips-weights", lpips_file, "--out", out, "--csv", csv_path, "--device", "cpu",
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert set(res) == {"settings", "mean", "per_image"}
    cols = ["LPIPS_mean", "LRPSNR_worst", "LRPSNR_mean", "score", "PSNR_mean", "PSNR_best"]
    cols += ["SSIM_mean", "LRPSNR_vs_input_mean"]
    assert list(res["mean"]) == cols
    s = res["settings"]
    assert (s["scale"], s["n"], s["color"], s["shave"], s["protocol"]) == (
        4,
        3,
        "rgb",
        4,
        "generic",
    )
    assert s["lpips"]["sha256"] == __import__("hashlib").sha256(lpips_file.read_bytes()).hexdigest()
    assert s["lpips_batch"] == 1  # the CPU default: the lpips module's rounding, bit for bit
    assert s["version"] == __import__("sr_lib").__version__ and "multiple of 8" in s["crop"]
    want = expected(hr_dir, sr_dir, N, lpips_file, lr_dir)
    assert [r["image"] for r in res["per_image"]] == ["0801", "0802"]
    for got, w in zip(res["per_image"], want):
        assert list(got) == ["image", *cols]
        check_row(got, w)
        assert 0 < got["SSIM_mean"] < 1
    # LR made as imresize(mod-8 HR crop): LR-PSNR against the input equals the official one
    for got in res["per_image"]:
        assert got["LRPSNR_vs_input_mean"] == pytest.approx(got["LRPSNR_mean"], abs=1e-9)
    for c in cols:
        assert res["mean"][c] == pytest.approx(np.mean([r[c] for r in res["per_image"]]), rel=1e-12)
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert [(r["method"], r["image"]) for r in rows] == [("method_a", "0801"), ("method_a", "0802")]
    assert float(rows[1]["score"]) == pytest.approx(res["per_image"][1]["score"], rel=1e-12)
    assert "method_a" in cap.out and "LPIPS_mean" in cap.out  # the table
    assert "[2/2] 0802" in cap.out  # plain log lines when stdout is not a TTY
    lines = cap.out.splitlines()
    assert lines[1].startswith("[2/2] 0802") and lines[2].strip()  # no empty line (rich < 15)


def test_the_lpips_weights_file_is_opened_once(tmp_path, lpips_file):
    """--lpips-weights was read three times: loaded to check it before any image is read, loaded
    again for the model and hashed for the results' settings; on a network file system each read
    of a big file costs. One open now gives the check, the model and the sha256. (Counted by the
    interpreter's audit hook, in a process of its own: the hook cannot be removed.)"""
    hr_dir, _, sr_dir = make_set(tmp_path)
    weights, out = tmp_path / "lpips.pth", tmp_path / "r.json"
    shutil.copy(lpips_file, weights)
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", N, "--device", "cpu",
            "--lpips-weights", weights, "--out", out]  # fmt: skip
    code = f"assert sr_eval.main({[str(a) for a in argv]!r}) == 0"
    opens, done = opens_of(weights, "import sr_eval", code)
    assert done.returncode == 0 and opens == 1, done.stderr[-2000:]
    sha256 = __import__("hashlib").sha256(weights.read_bytes()).hexdigest()
    assert json.loads(out.read_text())["settings"]["lpips"]["sha256"] == sha256


def test_ntire_mode_stem_layout(tmp_path, capsys, lpips_file):
    hr_dir, _, sr_dir = make_set(tmp_path, layout="stem")
    out = tmp_path / "res.json"
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", N, "--ntire"]
    code, _ = run(capsys, *args, "--lpips-weights", lpips_file, "--out", out)
    assert code == 0
    res = json.loads(out.read_text())
    assert list(res["mean"]) == ["LPIPS_mean", "LRPSNR_worst", "LRPSNR_mean", "score"]
    assert res["settings"]["protocol"] == "ntire"
    for got, w in zip(res["per_image"], expected(hr_dir, sr_dir, N, lpips_file)):
        assert list(got) == ["image", "LPIPS_mean", "LRPSNR_worst", "LRPSNR_mean", "score"]
        check_row(got, w)
    assert fails(capsys, *args, "--lr", tmp_path / "lr")[0] == 2  # --ntire: official columns only


THREE = dict(sizes=((48, 64), (53, 70), (40, 56)), names=("0801", "0802", "0803"))


def test_ntire_columns_equal_the_official_arithmetic_exactly(tmp_path, capsys, lpips_file):
    """measure.py's arithmetic, step by step (torch means, numpy over Python floats, skimage PSNR):
    --ntire must give the very same floats, not just close ones."""
    from skimage.metrics import peak_signal_noise_ratio

    hr_dir, _, sr_dir = make_set(tmp_path, **THREE)
    out = tmp_path / "res.json"
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", N, "--ntire"]
    assert (
        run(capsys, *args, "--lpips-weights", lpips_file, "--out", out, "--device", "cpu")[0] == 0
    )
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, spatial=True, verbose=False)
    net.load_state_dict(torch.load(lpips_file, weights_only=True))
    t = lambda x: torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)) / 255  # noqa: E731
    for k, got in enumerate(json.loads(out.read_text())["per_image"]):
        gt = read_image(hr_dir / f"{got['image']}.png")
        gt = gt[: gt.shape[0] // 8 * 8, : gt.shape[1] // 8 * 8]
        maps, means, lrpsnrs = [], [], []
        for f in sample_files(sr_dir, k, got["image"], N):
            sr = read_image(f)[: gt.shape[0], : gt.shape[1]]
            with torch.no_grad():
                maps.append(net(2 * t(sr) - 1, 2 * t(gt) - 1))
            means.append(maps[-1].mean().item())
            lrpsnrs.append(peak_signal_noise_ratio(imresize(sr, 1 / 4), imresize(gt, 1 / 4)))
        best = np.min(means)
        local = torch.stack([m[0, 0] for m in maps], dim=2).min(dim=2).values.mean().item()
        assert got["LPIPS_mean"] == np.mean(means)
        assert got["LRPSNR_worst"] == np.min(lrpsnrs) and got["LRPSNR_mean"] == np.mean(lrpsnrs)
        assert got["score"] == (best - local) / best * 100


def test_parallel_decoding_gives_the_sequential_numbers(tmp_path, capsys, lpips_file, monkeypatch):
    hr_dir, lr_dir, sr_dir = make_set(tmp_path, **THREE)
    second = tmp_path / "method_b"  # a second --sr folder: more files per image
    second.mkdir()
    for f in sorted(sr_dir.iterdir()):
        (second / f.name).write_bytes(f.read_bytes())
    args = ["--hr", hr_dir, "--sr", sr_dir, "--sr", second, "--scale", SCALE, "--n", N]
    args += ["--lr", lr_dir, "--lpips-weights", lpips_file, "--device", "cpu"]
    results = {}
    for workers in (1, 4):
        monkeypatch.setattr(data, "cpu_workers", lambda w=workers: w)
        out = tmp_path / f"res{workers}.json"
        assert run(capsys, *args, "--out", out)[0] == 0
        results[workers] = json.loads(out.read_text())["methods"]
    assert results[4] == results[1]  # every column of every image, exactly
    for got, want in zip(
        results[4]["method_a"]["per_image"], expected(hr_dir, sr_dir, N, lpips_file, lr_dir)
    ):
        check_row(got, want)


@pytest.mark.parametrize("workers", [1, 4])
def test_bad_png_midway_is_one_line_after_the_images_before_it(
    tmp_path, capsys, monkeypatch, workers
):
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, **THREE)
    bad = sr_dir / "000001_sample00001.png"  # the second image's second sample
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    monkeypatch.setattr(data, "cpu_workers", lambda: workers)
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in base(hr_dir, sr_dir)])
    out, err = capsys.readouterr()
    assert e.value.code == 3 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("sr_eval.py: error: ") and str(bad) in err
    assert "[1/3] 0801" in out and "[2/3]" not in out  # as the sequential loop: image 1 was scored


def test_n1_stem_layout_no_lpips_and_inf(tmp_path, capsys):
    hr_dir, _, sr_dir = make_set(tmp_path, layout="plain", n=1)
    # make image 0802's only sample the ground truth itself: LR-PSNR and PSNR become +inf
    (sr_dir / "0802.png").write_bytes((hr_dir / "0802.png").read_bytes())
    out = tmp_path / "res.json"
    code, cap = run(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips",
                    "--out", out)  # fmt: skip
    assert code == 0 and "--no-lpips" in cap.out
    text = out.read_text()
    assert "Infinity" not in text and "NaN" not in text
    res = json.loads(text)
    assert res["mean"]["LPIPS_mean"] is None and res["mean"]["score"] is None
    assert res["settings"]["lpips"] is None
    assert res["per_image"][1]["LRPSNR_mean"] == "inf" and res["mean"]["LRPSNR_mean"] == "inf"
    assert res["per_image"][1]["PSNR_best"] == "inf"
    assert res["per_image"][1]["SSIM_mean"] == pytest.approx(1.0)
    assert isinstance(res["per_image"][0]["LRPSNR_mean"], float)


def test_an_odd_sized_hr_with_its_imresize_lr_and_hr_sized_samples(tmp_path, capsys):
    """A 43x41 HR, its LR imresize(HR, 1/2) (22x21: MATLAB rounds up) and SRs of the HR's size:
    the LR was accepted, then the SRs refused ("smaller than the 44x42 ground-truth crop")."""
    hr = make_hr(41, 43, seed=0)
    lr = imresize(hr, 1 / 2)
    assert lr.shape[:2] == (21, 22)
    srs = [np.clip(hr.astype(int) + 3 * i + 2, 0, 255).astype(np.uint8) for i in range(2)]
    for name, img in [
        ("hr/a.png", hr),
        ("lr/a.png", lr),
        *[(f"sr/a_sample{i:05d}.png", srs[i]) for i in range(2)],
    ]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        iio.imwrite(tmp_path / name, img)
    code, _ = run(capsys, "--hr", tmp_path / "hr", "--sr", tmp_path / "sr", "--lr", tmp_path / "lr",
                  "--scale", 2, "--n", 2, "--no-lpips", "--out", tmp_path / "r.json")  # fmt: skip
    assert code == 0
    row = json.loads((tmp_path / "r.json").read_text())["per_image"][0]
    # downscaled whole, as the LR was: every LR pixel compared, and the HR itself would be inf
    expected = np.mean([psnr(imresize(sr, 1 / 2), lr) for sr in srs])
    assert row["LRPSNR_vs_input_mean"] == pytest.approx(expected, abs=1e-9)
    shutil.copy(tmp_path / "hr/a.png", tmp_path / "sr/a_sample00000.png")
    code, _ = run(capsys, "--hr", tmp_path / "hr", "--sr", tmp_path / "sr", "--lr", tmp_path / "lr",
                  "--scale", 2, "--n", 1, "--no-lpips", "--out", tmp_path / "r.json")  # fmt: skip
    assert json.loads((tmp_path / "r.json").read_text())["mean"]["LRPSNR_vs_input_mean"] == "inf"
    # the official columns crop the GT to a multiple of 8 (40x40), as the released script
    official = [psnr(imresize(sr[:40, :40], 1 / 2), imresize(hr[:40, :40], 1 / 2)) for sr in srs]
    assert row["LRPSNR_mean"] == pytest.approx(np.mean(official), abs=1e-9)


def test_n1_index_layout_and_two_methods(tmp_path, capsys, lpips_file):
    hr_dir, _, sr_a = make_set(tmp_path, layout="index1", n=1)
    _, _, sr_b = make_set(tmp_path / "b", layout="index", n=1)
    (sr_b.parent / "method_a").rename(sr_b.parent / "method_b")
    sr_b = sr_b.parent / "method_b"
    out, csv_path = tmp_path / "res.json", tmp_path / "rows.csv"
    code, cap = run(
        capsys, "--hr", hr_dir, "--sr", sr_a, "--sr", sr_b, "--scale", 4, "--n", 1,
        "--lpips-weights", lpips_file, "--out", out, "--csv", csv_path, "--color", "y",
        "--shave", 0,
    )  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert set(res) == {"settings", "methods"} and list(res["methods"]) == ["method_a", "method_b"]
    for m, d in (("method_a", sr_a), ("method_b", sr_b)):
        entry = res["methods"][m]
        assert set(entry) == {
            "sr_dir",
            "temperature",
            "model",
            "checkpoint_sha256",
            "n",
            "mean",
            "per_image",
        }
        assert entry["sr_dir"] == str(d) and entry["n"] == 1 and entry["temperature"] is None
        for got, w in zip(entry["per_image"], expected(hr_dir, d, 1, lpips_file)):
            check_row({k: v for k, v in got.items() if not k.startswith("PSNR")}, w)
            assert got["score"] == 0.0  # one sample: no diversity
    assert len(list(csv.DictReader(csv_path.read_text().splitlines()))) == 4
    assert "method_a" in cap.out and "method_b" in cap.out
    # Y channel, no shave, checked on one image
    gt, sr = read_image(hr_dir / "0801.png"), read_image(sr_a / "000000.png")
    y = lambda x: 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255  # noqa: E731
    want = psnr(y(sr.astype(np.float64)), y(gt.astype(np.float64)))
    assert res["methods"]["method_a"]["per_image"][0]["PSNR_mean"] == pytest.approx(want, abs=1e-9)


def test_uncertainty_maps_of_the_ntire_layout(tmp_path, capsys):
    """sr_sample.py --layout ntire --save-uncertainty names its sigma maps {k:06d}_sigma.npy:
    --uncertainty reads them (the numbers of the same maps named by stem), checks the folder's
    ntire_index.json, and a missing map says what is missing without asking for the flag the
    folder was made with."""
    hr_dir, _, sr_dir = make_set(tmp_path, layout="index1", n=1)
    maps, by_stem = tmp_path / "maps", tmp_path / "by_stem"
    for d in (maps, by_stem):
        d.mkdir()
    for k, (stem, (h, w)) in enumerate(zip(("0801", "0802"), ((48, 64), (53, 70)))):
        sigma = np.random.default_rng(k).uniform(0.01, 0.2, (3, h, w)).astype(np.float32)
        np.save(maps / f"{k:06d}_sigma.npy", sigma)
        np.save(by_stem / f"{stem}_sigma.npy", sigma)
    index = maps / "ntire_index.json"
    index.write_text(json.dumps({"scale": 4, "000000": "0801", "000001": "0802"}))
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips"]
    rows = {}
    for name, folder in (("ntire", maps), ("stem", by_stem)):
        out = tmp_path / f"{name}.json"
        assert run(capsys, *args, "--uncertainty", folder, "--out", out)[0] == 0
        rows[name] = json.loads(out.read_text())["per_image"]
    assert [r["PLL"] for r in rows["ntire"]] == [r["PLL"] for r in rows["stem"]]
    assert all(math.isfinite(r["PLL"]) and math.isfinite(r["PSNR_sigma"]) for r in rows["ntire"])
    # the index is checked as for the samples: maps of other images are not scored
    index.write_text(json.dumps({"scale": 4, "000000": "0802", "000001": "0801"}))
    code, err = fails(capsys, *args, "--uncertainty", maps)
    assert code == 3 and "ntire_index.json" in err and "index 000000" in err
    index.unlink()
    (maps / "000001_sigma.npy").unlink()
    code, err = fails(capsys, *args, "--uncertainty", maps)
    assert code == 3 and err.count("\n") == 1 and "000001_sigma.npy" in err and "0802" in err
    assert "--save-uncertainty" not in err


def test_samples_named_by_the_div2k_lr_file(tmp_path, capsys):
    """sr_sample.py on DIV2K's LR folder (0801x4.png) names its samples 0801x4_sample00000.png
    (0801x4.png at --n 1): scored against the HR 0801.png, as the same files named 0801_...
    Before, "no SR sample for the first HR image 0801", exit 3: every file had to be renamed."""
    hr_dir, _, sr_dir = make_set(tmp_path, layout="stem")
    lr_named, single = tmp_path / "lr_named", tmp_path / "single"
    for d in (lr_named, single):
        d.mkdir()
    for f in sr_dir.iterdir():
        stem, _, rest = f.name.partition("_")
        shutil.copyfile(f, lr_named / f"{stem}x{SCALE}_{rest}")
        if rest == "sample00000.png":
            shutil.copyfile(f, single / f"{stem}x{SCALE}.png")
    args = ["--hr", hr_dir, "--scale", SCALE, "--no-lpips", "--ntire", "--csv", "-"]
    rows = {}
    for name, folder, n in (("stem", sr_dir, N), ("x4", lr_named, N), ("one", single, 1)):
        code, out = run(capsys, *args, "--sr", f"m={folder}", "--n", n)
        assert code == 0, out.err
        rows[name] = out.out
    assert rows["x4"] == rows["stem"] and "m,,3,0802," in rows["x4"]
    code, out = run(capsys, *args, "--sr", f"m={sr_dir}:1", "--n", N)
    assert code == 0 and rows["one"] == out.out and "m,,1,0802," in out.out


def test_hr_0001_and_0001x4_each_take_their_own_lr(tmp_path, capsys):
    """--lr pairs an HR image S with S.png or DIV2K's Sx4.png. With HR 0001.png and 0001x4.png
    (their LR 0001x4.png and 0001x4x4.png, DIV2K's names) both took LR 0001x4.png, without a
    word (the sizes agree): 0001x4's LR-PSNR was against 0001's input. Now the rule of sr_train's
    --lr-data (sr_lib.data.lr_partners): each takes its own. The --sr samples named for both (S
    or Sx4) were paired right already: a folder's one naming layout, the one that finds most."""
    names, sizes = ("0001", "0001x4"), ((48, 64),) * 2
    plain = make_set(tmp_path / "plain", layout="stem", sizes=sizes, names=("p", "q"))
    hr_dir, lr_dir, sr_dir = make_set(tmp_path / "div2k", layout="stem", sizes=sizes, names=names)
    assert sorted(f.name for f in lr_dir.iterdir()) == ["0001x4.png", "0001x4x4.png"]
    by_lr = tmp_path / "by_lr"  # (sr_sample.py on the LR folder: 0001x4_..., 0001x4x4_...)
    by_lr.mkdir()
    for f in sr_dir.iterdir():
        stem, _, rest = f.name.rpartition("_sample")
        shutil.copyfile(f, by_lr / f"{stem}x{SCALE}_sample{rest}")
    args = ["--scale", SCALE, "--n", N, "--no-lpips", "--csv", "-"]
    code, want = run(capsys, "--hr", plain[0], "--sr", f"m={plain[2]}", "--lr", plain[1], *args)
    assert code == 0
    want = want.out.replace(",p,", ",0001,").replace(",q,", ",0001x4,")
    for folder in (sr_dir, by_lr):
        code, got = run(capsys, "--hr", hr_dir, "--sr", f"m={folder}", "--lr", lr_dir, *args)
        assert (code, got.out) == (0, want)
    (lr_dir / "0001x4x4.png").unlink()  # 0001x4.png is 0001x4's own now: 0001 has none
    code, err = fails(capsys, "--hr", hr_dir, "--sr", f"m={sr_dir}", "--lr", lr_dir, *args)
    assert (code, err) == (3, f"sr_eval.py: error: --lr {lr_dir}: no LR image 0001.png or "
                           "0001x4.png (0001x4.png is the LR of HR image 0001x4, which --hr "
                           "holds too)\n")  # fmt: skip


def test_a_sigma_map_that_is_not_the_samples_is_one_line(tmp_path, capsys):
    """--uncertainty with a map cut short (a full disk), of an LR's size or 2-D: one line naming
    the file, exit 3, before any image is scored. Before, the first ended in a traceback and the
    LR-sized one was scored on the top-left corner the two share, exit 0."""
    hr_dir, _, sr_dir = make_set(tmp_path, layout="index1", n=1)
    maps = tmp_path / "maps"
    maps.mkdir()
    good = np.full((3, 48, 64), 0.1, np.float32)
    np.save(maps / "0801_sigma.npy", good)
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips"]
    args += ["--uncertainty", maps, "--out", tmp_path / "out.json"]
    bad = maps / "0802_sigma.npy"
    np.save(bad, np.full((3, 53, 70), 0.1, np.float32))
    whole = bad.read_bytes()
    for what, write in [
        ("cut short", lambda: bad.write_bytes(whole[:-100])),
        ("(3, 13, 17)", lambda: np.save(bad, np.full((3, 13, 17), 0.1, np.float32))),
        ("(53, 70)", lambda: np.save(bad, np.full((53, 70), 0.1, np.float32))),
    ]:
        write()
        code, err = fails(capsys, *args)
        assert code == 3 and err.count("\n") == 1, (what, err)
        assert str(bad) in err, (what, err)
        assert ("not a readable" in err) == (what == "cut short"), (what, err)
        assert ("(3, 53, 70)" in err) == (what != "cut short"), (what, err)
        assert not (tmp_path / "out.json.partial").exists()  # (refused before the first image)
    # the scoring reads the data again: a file cut short since the check is the same line
    bad.write_bytes(whole[:-100])
    with pytest.raises(sr_eval.DataError, match="not a readable .npy array"):
        sr_eval.read_sigma(bad, (53, 70))
    bad.write_bytes(whole)
    assert run(capsys, *args)[0] == 0


def test_n_above_the_manifests_n_is_refused_in_every_sweep_folder(tmp_path, capsys):
    """A sweep folder sampled with --n 3, then its T1 again with --n 2 --overwrite, still holds
    T1's stale samples 2: --n 3 is refused naming T1's manifest.json (it scored the mix); --n 2
    or fewer (a subset) and --sr DIR:N within each folder's n are fine."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=3)
    sweep = tmp_path / "S"
    for t, n in (("0.5", 3), ("1", 2)):
        shutil.copytree(sr_dir, sweep / f"T{t}")
        manifest = {"model": "srflow", "scale": 4, "n": n, "temperature": float(t)}
        (sweep / f"T{t}" / "manifest.json").write_text(json.dumps(manifest))
    args = ["--hr", hr_dir, "--scale", 4, "--no-lpips"]
    code, err = fails(capsys, *args, "--sr", sweep, "--n", 3)
    assert code == 3 and err.count("\n") == 1
    assert str(sweep / "T1" / "manifest.json") in err and "ask for 2 or fewer" in err
    # (runs with other --n may add samples to one folder: n is the most any of them wrote)
    assert "runs that made this folder wrote at most 2 samples per image, not 3" in err
    for n in (2, 1):
        assert run(capsys, *args, "--sr", sweep, "--n", n)[0] == 0
    assert run(capsys, *args, "--sr", sweep / "T0.5", "--sr", f"{sweep / 'T1'}:2", "--n", 3)[0] == 0


def test_sr_larger_than_its_hr_is_an_error_and_ceil_rounding_a_warning(tmp_path, capsys):
    """An SR 16 px taller than its HR cannot come from it (issue 20 item 10); one of scale x
    ceil(H / scale) rows can (an LR rounded up): cropped, with a warning."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=1, sizes=((48, 64), (53, 64)))
    f = sr_dir / "000001_sample00000.png"
    iio.imwrite(f, np.pad(iio.imread(f), ((0, 3), (0, 0), (0, 0))))  # 56 = 4 * ceil(53 / 4)
    code, cap = run(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips")
    assert code == 0 and "warning" in cap.err and str(f) in cap.err
    iio.imwrite(f, np.pad(iio.imread(f), ((0, 16), (0, 0), (0, 0))))
    code, err = fails(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips")
    assert code == 3 and err.count("\n") == 1 and str(f) in err and "64x72" in err


def test_srs_larger_than_their_hr_are_one_warning_per_folder(tmp_path, capsys):
    """SRs of 4 x ceil(H / 4) rows (of LRs rounded up) larger than their HR in every image: one
    warning per --sr folder, which says what is scored for PSNR/SSIM too. Before: a line per
    sample (1,000 at N = 10 for 100 images), each saying only the official crop (64x48) is
    evaluated, where PSNR/SSIM take 68x52."""
    hr_dir, _, sr_dir = make_set(tmp_path, sizes=((53, 70), (53, 70)))
    for f in sr_dir.iterdir():
        iio.imwrite(f, np.pad(iio.imread(f), ((0, 3), (0, 2), (0, 0))))  # 72x56
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", N, "--no-lpips", "--quiet"]
    code, cap = run(capsys, *args, "--csv", tmp_path / "r.csv")
    lines = cap.err.splitlines()
    assert code == 0 and len(lines) == 1, lines
    assert str(sr_dir / "000000_sample00000.png") in lines[0] and f"in {sr_dir} " in lines[0]
    assert "64x48 for the official columns, 68x52 less a 4 px border for PSNR" in lines[0]


def test_16bit_rgba_and_gray_images_are_evaluated(tmp_path, capsys, lpips_file):
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    hr16 = make_hr(48, 64, seed=0).astype(np.uint16) * 257 + 3  # 16-bit HR
    iio.imwrite(hr_dir / "0801.png", hr16[..., 0])  # 16-bit grayscale PNG
    with open(hr_dir / "0802.png", "wb") as f:  # 16-bit RGB PNG
        img = make_hr(53, 70, seed=1).astype(np.uint16) * 257
        png.Writer(70, 53, greyscale=False, bitdepth=16).write(f, img.reshape(53, -1).tolist())
    rgba = np.dstack([read_image(sr_dir / "000000_sample00000.png"), np.full((48, 64), 128)])
    iio.imwrite(sr_dir / "000000_sample00000.png", rgba.astype(np.uint8))  # RGBA sample
    gray = read_image(sr_dir / "000001_sample00001.png")[..., 1]
    iio.imwrite(sr_dir / "000001_sample00001.png", gray)  # grayscale sample
    out = tmp_path / "res.json"
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--lpips-weights", lpips_file]
    code, cap = run(capsys, *args, "--out", out)
    assert code == 0 and "alpha" in cap.err
    res = json.loads(out.read_text())
    for got, w in zip(res["per_image"], expected(hr_dir, sr_dir, 2, lpips_file)):
        check_row(got, w)
    assert read_image(hr_dir / "0801.png").shape == (48, 64, 3)
    # an RGBA sample folder: its dropped alpha is said once, not once per file
    iio.imwrite(sr_dir / "000001_sample00000.png", rgba.astype(np.uint8))
    code, cap = run(capsys, *args, "--out", out)
    said = [line for line in cap.err.splitlines() if "alpha channel dropped" in line]
    assert code == 0 and len(said) == 1 and str(sr_dir) in said[0], cap.err


def test_a_sample_folder_of_formats_not_read_says_so(tmp_path, capsys):
    """An --sr folder of .gif samples said 'no SR sample for the first HR image ... (expected
    000000_sample00000.png or ...)', as for an empty folder: the files there not named. Now its
    line says what it holds and what to do."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    for f in sr_dir.iterdir():
        Image.open(f).save(f.with_suffix(".gif"))
        f.unlink()
    code, err = fails(capsys, *base(hr_dir, sr_dir))
    assert (code, err) == (3, f"sr_eval.py: error: {sr_dir}: no images found, but 4 image(s) of "
                           "a format not read (e.g. 000000_sample00000.gif; read: "
                           "png/jpg/jpeg/bmp/tif/tiff/webp): convert them to PNG\n")  # fmt: skip


def test_an_index_folder_of_more_images_than_hr_is_a_warning(tmp_path, capsys):
    """Samples named by index (the challenge's 000000_sample00000.png) without an
    ntire_index.json are paired with the --hr images in their order: an --hr of some of the
    images they were made from (0801 and 0803 of three) scored 0803 against 0802's samples
    without a word where the sizes agree. Now a warning says the folder holds more images."""
    names = ("0801", "0802", "0803")
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    code, cap = run(capsys, *base(hr_dir, sr_dir, 2, "--quiet"))
    assert (code, cap.err) == (0, "")
    (hr_dir / "0802.png").unlink()
    code, cap = run(capsys, *base(hr_dir, sr_dir, 2, "--quiet"))
    assert (code, cap.err) == (0, f"sr_eval.py: warning: {sr_dir}: holds samples of more images "
                               "than --hr has (2), e.g. 000002_sample00000.png; they are paired "
                               "by index with the --hr images in their order: is --hr the first "
                               "images of the set they were made from?\n")  # fmt: skip


def test_nan_in_a_folder_of_float_samples_is_one_warning_line(tmp_path, capsys):
    """A method's float TIFF samples with NaN (read as 0, with a warning naming the file): a
    line for each file, 1,000 for 100 images at N = 10. Now once per folder and kind, as a
    dropped alpha channel; the other folder's own line is said too."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    other = tmp_path / "other"
    shutil.copytree(sr_dir, other)
    for folder in (sr_dir, other):
        for f in sorted(folder.iterdir()):
            img = read_image(f) / np.float32(255)
            img[0, 0] = np.nan
            write_tiff(f.with_suffix(".tif"), img)
            f.unlink()
    code, cap = run(capsys, *base(hr_dir, sr_dir, 2, "--sr", other, "--quiet"))
    assert code == 0, cap.err
    lines = cap.err.splitlines()  # (the first file decoded: threads decode them)
    assert len(lines) == 2, lines
    for line, folder in zip(sorted(lines), (sr_dir, other)):
        said = re.escape(f"sr_eval.py: warning: {folder}/") + r"00000\d_sample0000\d\.tif: "
        said += re.escape("3 NaN float value(s), read as 0 (NaN, -inf) and 1 (+inf): the image "
                          "is not the one the file holds; check what wrote it; said once per "
                          f"folder: so may be others in {folder}")  # fmt: skip
        assert re.fullmatch(said, line), line


def test_corrupt_exif_in_a_folder_of_samples_is_one_warning_line(tmp_path, capsys):
    """JPEG samples whose EXIF directory is cut short (it counts 40 tags, holds 1): one
    warning line naming the file each (sr_lib.data.ExifCorrupt), 1,000 for 100 images at
    N = 10. Now once per folder, as NaN in float samples."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    exif = Image.Exif()
    exif[0x010E] = "a description"
    for f in sorted(sr_dir.iterdir()):
        Image.open(f).save(f.with_suffix(".jpg"), quality=100, exif=exif.tobytes())
        f.unlink()
        raw = bytearray(f.with_suffix(".jpg").read_bytes())
        ifd = raw.index(b"MM\x00\x2a") + 8  # (Pillow writes big-endian EXIF, IFD0 right after)
        raw[ifd : ifd + 2] = (40).to_bytes(2, "big")
        f.with_suffix(".jpg").write_bytes(bytes(raw))
    code, cap = run(capsys, *base(hr_dir, sr_dir, 2, "--quiet"))
    assert code == 0 and len(cap.err.splitlines()) == 1, cap.err
    said = re.escape(f"sr_eval.py: warning: {sr_dir}/") + r"00000\d_sample0000\d\.jpg: its EXIF "
    said += r"data is corrupt \(Corrupt EXIF data\. .*\); read without the tags that could not "
    said += re.escape(f"be read (an orientation among them is not applied); said once per folder: "
                      f"so may be others in {sr_dir}\n")  # fmt: skip
    assert re.fullmatch(said, cap.err), cap.err


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def tiny_set(tmp_path):
    return make_set(tmp_path, n=2)


def base(hr_dir, sr_dir, n=2, *extra):
    return ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", n, "--no-lpips", *extra]


def test_missing_and_empty_hr_folder(tmp_path, capsys, tiny_set):
    _, _, sr_dir = tiny_set
    code, err = fails(capsys, *base(tmp_path / "nope", sr_dir))
    assert code == 3 and "nope" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, err = fails(capsys, *base(tmp_path / "empty", sr_dir))
    assert code == 3 and "no images" in err


def test_missing_sample_and_wrong_n(capsys, tiny_set):
    hr_dir, _, sr_dir = tiny_set
    (sr_dir / "000001_sample00001.png").unlink()
    code, err = fails(capsys, *base(hr_dir, sr_dir))
    assert code == 3 and "000001_sample00001.png" in err
    code, err = fails(capsys, *base(hr_dir, sr_dir, 5))  # fewer files than --n: first missing
    assert code == 3 and "000000_sample00002.png" in err
    (sr_dir / "000000_sample00001.png").unlink()  # no image has a 2nd sample: what to give
    code, err = fails(capsys, *base(hr_dir, sr_dir, 5))
    assert code == 3 and err.count("\n") == 1
    assert f"{sr_dir}: 1 sample(s) per image, not N = 5 (no 000000_sample00001.png)" in err
    assert f"give --n 1 or --sr {sr_dir}:1" in err


def test_the_suggested_sr_value_of_a_folder_with_spaces_is_quoted_for_a_shell(tmp_path, capsys):
    # A folder named with a space: the --sr DIR:N the line suggests pastes as one argument.
    hr_dir, _, sr_dir = make_set(tmp_path, n=1)
    spaced = sr_dir.rename(tmp_path / "my samples")
    code, err = fails(capsys, *base(hr_dir, spaced, 5))
    assert code == 3 and err.count("\n") == 1
    suggested = err.split("give --n 1 or ")[1].strip()
    assert shlex.split(suggested) == ["--sr", f"{spaced}:1"]


def test_the_suggested_sr_value_keeps_the_name_given(tmp_path, capsys):
    """The --sr DIR:N a line suggests dropped the NAME= the user gave: pasted, the method lost its
    name in every output (and a sweep's suggestion named one temperature's subfolder, dropping
    the others). Now NAME=DIR:N of the value as typed, quoted for a shell as a whole."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=1)
    code, err = fails(capsys, *base(hr_dir, f"my flow={sr_dir}", 5))
    assert code == 3 and err.count("\n") == 1
    suggested = err.split("give --n 1 or ")[1].strip()
    assert shlex.split(suggested) == ["--sr", f"my flow={sr_dir}:1"]
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    sr_dir.rename(sweep / "T0.5")
    code, err = fails(capsys, *base(hr_dir, f"flow={sweep}", 5))
    assert code == 3 and f"give --n 1 or --sr flow={sweep}:1\n" in err
    code, cap = run(capsys, *base(hr_dir, f"flow={sweep}:1", 5))  # (the suggestion, pasted)
    assert code == 0 and "flow@T0.5" in cap.out
    one = tmp_path / "one"  # sr_sample.py's folder of NAME.png (a deterministic model, --n 1)
    make_set(one, layout="stem1", n=1)
    (one / "method_a" / "manifest.json").write_text(json.dumps({"n": 1}))
    code, err = fails(capsys, *base(hr_dir, f"bicubic={one / 'method_a'}"))
    assert code == 3 and f"(--sr bicubic={one / 'method_a'}:1)" in err


def test_the_expected_sample_names_are_quoted_for_a_shell(tmp_path, capsys):
    """'no SR sample for the first HR image ... (expected A or B ...)' listed file names with
    spaces as they are, where a name could not be told from the words between them; so did
    --lr's and --uncertainty's lines. Now each is quoted as other lines quote theirs
    (shlex.quote)."""
    hr_dir, _, _ = make_set(tmp_path, n=1, names=("my photo", "zz"))
    (tmp_path / "other").mkdir()
    iio.imwrite(tmp_path / "other" / "x.png", np.zeros((48, 64, 3), np.uint8))
    code, err = fails(capsys, *base(hr_dir, tmp_path / "other"))
    assert code == 3 and err == (
        f"sr_eval.py: error: {tmp_path / 'other'}: no SR sample for the first HR image my photo "
        "(expected 000000_sample00000.png or 'my photo_sample00000.png' or "
        "'my photox4_sample00000.png')\n"
    )
    # (and --lr's and --uncertainty's lines)
    _, _, sr_dir = make_set(tmp_path, n=2, names=("my photo", "zz"))
    code, err = fails(capsys, *base(hr_dir, sr_dir, 2, "--lr", tmp_path / "other"))
    assert code == 3 and err == (
        f"sr_eval.py: error: --lr {tmp_path / 'other'}: no LR image 'my photo.png' or "
        "'my photox4.png'\n"
    )
    code, err = fails(capsys, *base(hr_dir, sr_dir, 2, "--uncertainty", tmp_path / "other"))
    assert (
        code == 3
        and "(expected 000000_sigma.npy or 'my photo_sigma.npy' or 'my photox4_sigma.npy';" in err
    )


def test_dir_n_of_a_folder_whose_name_holds_an_equals_sign_is_that_folder(tmp_path, capsys):
    # runs/lr=1e-4:1 is DIR:N (the folder exists), not NAME 'runs/lr' of a folder '1e-4'
    hr_dir, _, sr_dir = make_set(tmp_path, n=1)
    folder = sr_dir.rename(tmp_path / "lr=1e-4")
    code, cap = run(capsys, *base(hr_dir, f"{folder}:1", 5))
    assert code == 0 and "lr=1e-4" in cap.out


def test_no_matching_layout(tmp_path, capsys, tiny_set):
    hr_dir, _, _ = tiny_set
    (tmp_path / "other").mkdir()
    iio.imwrite(tmp_path / "other" / "x.png", np.zeros((48, 64, 3), np.uint8))
    code, err = fails(capsys, *base(hr_dir, tmp_path / "other"))
    assert code == 3 and "000000_sample00000.png" in err and "0801_sample00000.png" in err


def test_non_image_and_truncated_png(capsys, tiny_set):
    hr_dir, _, sr_dir = tiny_set
    bad = sr_dir / "000000_sample00001.png"
    data = bad.read_bytes()
    bad.write_text("not an image")
    code, err = fails(capsys, *base(hr_dir, sr_dir))
    assert code == 3 and str(bad) in err and err.count("\n") == 1
    bad.write_bytes(data)
    good = hr_dir / "0802.png"
    good.write_bytes(good.read_bytes()[:200])
    code, err = fails(capsys, *base(hr_dir, sr_dir))
    assert code == 3 and "0802.png" in err


def test_sr_smaller_than_gt(capsys, tiny_set):
    hr_dir, _, sr_dir = tiny_set
    f = sr_dir / "000001_sample00000.png"
    iio.imwrite(f, iio.imread(f)[:40])
    code, err = fails(capsys, *base(hr_dir, sr_dir))
    assert code == 3 and str(f) in err and "smaller" in err


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--n", "0"], "--n"),
        (["--scale", "5"], "--scale"),
        (["--lpips-weights", "w.pth"], "--no-lpips"),
    ],
)
def test_usage_errors(capsys, tiny_set, extra, flag):
    hr_dir, _, sr_dir = tiny_set
    code, err = fails(capsys, *base(hr_dir, sr_dir), *extra)
    assert code == 2 and flag in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--csv", "--out", "--report", "--lr", "--lpips-weights",
                                  "--uncertainty", "--hr", "--sr"])  # fmt: skip
def test_an_empty_path_is_a_usage_error_not_a_flag_left_out(tmp_path, capsys, tiny_set, flag):
    """`--csv "$CSV"` with CSV unset gave no CSV and exit 0, `--lpips-weights ""` the default
    weights' numbers, `--hr ""` the current folder: one line, exit 2, before any work."""
    hr_dir, _, sr_dir = tiny_set
    args = {"--hr": hr_dir, "--sr": sr_dir, "--scale": 4, "--n": 2, flag: ""}
    code, err = fails(capsys, *[a for kv in args.items() for a in kv])
    want = f"sr_eval.py: error: {flag} '': an empty path (an unset shell variable?); give one\n"
    assert code == 2 and err == want


def test_missing_lpips_weights(tmp_path, capsys, monkeypatch, tiny_set):
    hr_dir, _, sr_dir = tiny_set
    for var, d in (("SRSPACE_WEIGHTS", "w"), ("TORCH_HOME", "th")):
        (tmp_path / d).mkdir()
        monkeypatch.setenv(var, str(tmp_path / d))
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2]
    code, err = fails(capsys, *args)
    assert code == 6 and err.count("\n") == 1
    assert "alexnet-owt-7be5be79.pth" in err and str(tmp_path / "w") in err and "--no-lpips" in err
    code, err = fails(capsys, *args, "--lpips-weights", tmp_path / "missing.pth")
    assert code == 6 and "missing.pth" in err


def test_missing_lpips_weights_before_any_output(tmp_path, tiny_set, capsys, monkeypatch):
    """AlexNet missing offline was found missing after --out's and --csv's folders and the
    --report folder were made (and every header read): now before, and nothing is made."""
    hr_dir, _, sr_dir = tiny_set
    (tmp_path / "th").mkdir()
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")  # read when the weights are looked for
    monkeypatch.setenv("SRSPACE_WEIGHTS", "")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    new = tmp_path / "new"
    outs = ["--out", new / "a.json", "--csv", new / "b" / "c.csv", "--report", new / "R"]
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", "4", "--n", "2", *outs]
    code, err = fails(capsys, *argv)
    assert code == 6 and len(err.splitlines()) == 1, err
    assert err.startswith("sr_eval.py: error: LPIPS: weights 'alexnet' not found")
    assert err.strip().endswith("--no-lpips to skip LPIPS_mean and score")
    assert not new.exists()
    # --lpips-weights FILE missing, or not a torch file, likewise (it was found after --out)
    (tmp_path / "page.pth").write_text("<html>404</html>")
    for weights, says in [(tmp_path / "none.pth", "no such file"),
                          (tmp_path / "page.pth", "not a torch weights file")]:  # fmt: skip
        code, err = fails(capsys, *argv, "--lpips-weights", weights)
        assert code == 6 and len(err.splitlines()) == 1, err
        flag = "--lpips-weights " if says == "no such file" else "LPIPS: "  # (not read: no LPIPS)
        assert err.startswith(f"sr_eval.py: error: {flag}{weights}: {says}"), err
        assert not new.exists()


# ----------------------------------------------------------------------------- issue 20


def noisy_copies(hr_dir, sr_dir, names, n, layout="index"):
    """Per HR image (in `names` order) n samples = GT + small seeded noise (PSNR ~ 40 dB)."""
    sr_dir.mkdir(parents=True, exist_ok=True)
    for k, stem in enumerate(names):
        gt = read_image(hr_dir / f"{stem}.png")
        for i in range(n):
            noise = np.random.default_rng(10 * k + i).integers(-3, 4, gt.shape)
            name = f"{k:06d}_sample{i:05d}" if layout == "index" else f"{stem}_sample{i:05d}"
            iio.imwrite(sr_dir / f"{name}.png", np.clip(gt + noise, 0, 255).astype(np.uint8))


PREFIXES = ("cat", "cat-2", "photo", "photo (1)")  # the one order: by stem


def test_ntire_index_follows_the_one_order_and_a_wrong_map_is_an_error(tmp_path, capsys):
    """Issue 20 item 2: index k is the k-th HR image in sr_lib.data.image_order (cat before
    cat-2, photo before 'photo (1)', though 'cat-2.png' < 'cat.png' by file name), and an
    ntire_index.json that maps an index to another image stops the run (exit 3, one line)."""
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for k, stem in enumerate(sorted(PREFIXES, key=lambda s: s + ".png")):  # file-name order
        iio.imwrite(hr_dir / f"{stem}.png", make_hr(48, 64, seed=k))
    assert [p.stem for p in data.list_images(hr_dir)] == list(PREFIXES)
    sr_dir = tmp_path / "sub"
    noisy_copies(hr_dir, sr_dir, PREFIXES, 2)
    index = {"scale": 4, **{f"{k:06d}": s for k, s in enumerate(PREFIXES)}}
    (sr_dir / "ntire_index.json").write_text(json.dumps(index))
    out = tmp_path / "r.json"
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    assert run(capsys, *args)[0] == 0
    rows = json.loads(out.read_text())["per_image"]
    assert [r["image"] for r in rows] == list(PREFIXES)
    assert all(r["PSNR_mean"] > 35 for r in rows)  # every sample scored against its own GT
    # the map a file-name order would have written: index 0 is cat-2
    wrong = {
        "scale": 4,
        **{f"{k:06d}": s for k, s in enumerate(sorted(PREFIXES, key=lambda s: s + ".png"))},
    }  # noqa: E501
    (sr_dir / "ntire_index.json").write_text(json.dumps(wrong))
    out.unlink()
    code, err = fails(capsys, *args)
    assert code == 3 and err.count("\n") == 1 and "index 000000" in err and "'cat-2'" in err
    assert not out.exists()
    # DIV2K LR names as sr_sample inputs (0801x4) match their HR stem
    (sr_dir / "ntire_index.json").write_text(
        json.dumps({"scale": 4, **{f"{k:06d}": f"{s}x4" for k, s in enumerate(PREFIXES)}})
    )
    assert run(capsys, *args)[0] == 0


def test_files_are_listed_as_every_script_lists_them(tmp_path, capsys):
    """Issue 20 item 3: a folder named x.png, '._x.png' (macOS metadata) and a dangling link are
    not images (in --hr the link is refused: test_bad_inputs_eval); a symlinked --hr / --sr folder
    is followed."""
    real_hr, real_sr = tmp_path / "real_hr", tmp_path / "real_sr"
    real_hr.mkdir()
    for k, stem in enumerate(("0801", "0802")):
        iio.imwrite(real_hr / f"{stem}.png", make_hr(48, 64, seed=k))
    noisy_copies(real_hr, real_sr, ("0801", "0802"), 2)
    for d in (real_hr, real_sr):
        (d / "x.png").mkdir()
        (d / "._0801.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (real_sr / "gone.png").symlink_to(tmp_path / "deleted.png")
    (tmp_path / "hr").symlink_to(real_hr)
    (tmp_path / "sr").symlink_to(real_sr)
    assert [p.name for p in data.list_images(tmp_path / "sr", recursive=False)] == [
        "000000_sample00000.png",
        "000000_sample00001.png",
        "000001_sample00000.png",
        "000001_sample00001.png",
    ]
    out = tmp_path / "r.json"
    args = ["--hr", tmp_path / "hr", "--sr", tmp_path / "sr", "--scale", 4, "--n", 2]
    code, _ = run(capsys, *args, "--no-lpips", "--out", out)
    assert code == 0
    assert [r["image"] for r in json.loads(out.read_text())["per_image"]] == ["0801", "0802"]
    # a ground truth of a format not read is not scored, but said (it was skipped silently)
    Image.fromarray(make_hr(48, 64, seed=2)).save(real_hr / "0803.gif")
    code, cap = run(capsys, *args, "--no-lpips", "--out", out)
    assert code == 0 and len(json.loads(out.read_text())["per_image"]) == 2
    assert (f"sr_eval.py: warning: {tmp_path / 'hr'}: skipped 1 image(s) of a format not read "
            "(e.g. 0803.gif; read: png/jpg/jpeg/bmp/tif/tiff/webp); convert them to PNG to "
            "include them\n") in cap.err  # fmt: skip


def test_output_problems_are_found_before_the_work_and_exit_7(tmp_path, capsys, read_only_dir):
    """Issue 20 item 4: --out naming a folder, --csv in a read-only folder: one line, exit 7,
    before any image is scored."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips"]
    (tmp_path / "results").mkdir()
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in [*args, "--out", tmp_path / "results"]])
    cap = capsys.readouterr()
    assert e.value.code == 7 and cap.err.count("\n") == 1 and "a folder, not a file" in cap.err
    assert "[1/2]" not in cap.out and list((tmp_path / "results").iterdir()) == []
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in [*args, "--csv", read_only_dir / "rows.csv"]])
    cap = capsys.readouterr()
    assert e.value.code == 7 and cap.err.count("\n") == 1 and "Permission denied" in cap.err
    assert "[1/2]" not in cap.out and list(read_only_dir.iterdir()) == []


def test_an_output_naming_an_input_file_is_refused_and_the_input_kept(tmp_path, capsys):
    """--csv given an HR image, --out a sample (through a link): the results would replace the
    user's image with text, found only by the next run. One line, exit 2, before any work."""
    hr_dir, lr_dir, sr_dir = make_set(tmp_path, n=2)
    (tmp_path / "link.png").symlink_to(sr_dir / "000001_sample00001.png")
    for flag, path in (("--csv", hr_dir / "0802.png"), ("--out", tmp_path / "link.png"),
                       ("--csv", lr_dir / "0801x4.png")):  # fmt: skip
        before = path.read_bytes()
        code, err = fails(capsys, *base(hr_dir, sr_dir, 2, "--lr", lr_dir, flag, path))
        assert code == 2 and err.count("\n") == 1, err
        assert f"{flag} {path} is one of this run's input files" in err
        assert path.read_bytes() == before
    out = tmp_path / "r.csv"
    out.write_text("an earlier run's\n")  # an existing output that is no input: replaced
    code, _ = run(capsys, *base(hr_dir, sr_dir, 2, "--csv", out))
    assert code == 0 and out.read_text().startswith("method,")


def test_an_output_named_like_an_image_in_an_input_folder_is_refused(tmp_path, capsys):
    """--csv HR/x.png was written there, and the next run listed it as a ground truth and failed
    on it (exit 3); so would a sample folder's, or the LR folder's. One line, exit 2, before any
    work, also through a link to the folder; a .csv there is listed by no run: written."""
    hr_dir, lr_dir, sr_dir = make_set(tmp_path, n=2)
    (tmp_path / "hr_link").symlink_to(hr_dir)
    for flag, path, where in (("--csv", tmp_path / "hr_link" / "x.png", f"--hr {hr_dir}"),
                              ("--out", sr_dir / "r.jpg", f"--sr {sr_dir}"),
                              ("--csv", lr_dir / "r.TIF", f"--lr {lr_dir}")):  # fmt: skip
        code, err = fails(capsys, *base(hr_dir, sr_dir, 2, "--lr", lr_dir, flag, path))
        assert code == 2 and err.count("\n") == 1, err
        assert f"{flag} {path} is named like an image in {where}, whose images" in err
        assert not path.exists()
    argv = base(hr_dir, sr_dir, 2, "--csv", hr_dir / "r.csv")
    assert run(capsys, *argv)[0] == 0 and run(capsys, *argv)[0] == 0


def eval_cmd(*argv):
    return [sys.executable, str(REPO / "sr_eval.py"), *[str(a) for a in argv]]


def test_full_disk_is_one_line_exit_7_and_no_partial_json(tmp_path):
    """Issue 20 item 4: a write that fails half-way (a full disk: here a 1.5 kB file size limit,
    EFBIG as ENOSPC, between the sizes of r.json.partial and r.json) leaves no JSON at all, not
    a 0-byte or truncated one; the scores of the images (r.json.partial, written whole before)
    are kept for a rerun once there is room, and the line says so; an earlier run's r.json is
    not left under this run's name, and the line says where it went."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    out = tmp_path / "res" / "r.json"
    out.parent.mkdir()
    out.write_text("an earlier run's\n")

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1536, 1536))

    cmd = eval_cmd("--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips",
                   "--out", out)  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, preexec_fn=small_files)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 7 and len(err) == 1, p.stderr
    partial = out.parent / "r.json.partial"
    assert err[0] == (
        f"sr_eval.py: error: {out}: cannot write (File too large); check the output path; the "
        f"scores of 2 of 2 images are kept in {partial}: fix that and rerun the same command to "
        f"continue; {out} (an earlier run's) moved to {out}.old"
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json.old", "r.json.partial"]
    assert len(sr_eval.read_partial(partial)[1]) == 2  # (and no temporary file)
    assert (out.parent / "r.json.old").read_text() == "an earlier run's\n"


def test_full_disk_on_the_first_write_of_the_scores_leaves_no_earlier_file_unrecorded(
    tmp_path, capsys, monkeypatch
):
    """An earlier --out was set aside as r.json.old, then OUT.partial written to record it: a
    full disk (ENOSPC) on that write left r.json.old recorded nowhere, and a later run of the
    command that completed left it in place for ever (a run deletes the NAME.old files its
    stopped runs made, as OUT.partial records them). Now the record is written first, then the
    file moved: the full disk leaves the earlier --out where it was, the line names only the
    file that could not be written, and the rerun ends with r.json alone."""
    names = ("0000", "0001")
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 2, names=names)
    out, partial = tmp_path / "r.json", tmp_path / "r.json.partial"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    out.write_text("an earlier run's\n")
    real = data._write_bytes

    def full(path, *args, **kwargs):
        if Path(path) == partial:
            raise data.OutputError(f"{path}: cannot write (No space left on device); check the "
                                   "output path")  # fmt: skip
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "_write_bytes", full)
    code, err = fails(capsys, *argv)
    monkeypatch.undo()
    assert (code, err) == (
        7, f"sr_eval.py: error: {partial}: cannot write (No space left on device); check the "
        "output path\n"
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("r.json*")) == ["r.json"]
    assert out.read_text() == "an earlier run's\n"
    assert run(capsys, *argv)[0] == 0
    assert sorted(p.name for p in tmp_path.glob("r.json*")) == ["r.json"]
    assert json.loads(out.read_text())["settings"]["scale"] == 4


def test_full_disk_while_the_scores_so_far_are_written_counts_those_kept(
    tmp_path, capsys, monkeypatch
):
    """A full disk when OUT.partial is rewritten after the 3rd image (a file size limit of its
    size after the 2nd, EFBIG as ENOSPC): exit 7 and one line, the file as it was, but the --json
    line said scored 3 and that file, which holds 2. Now `kept` is 2 and the line says so too."""
    names = tuple(f"{k:04d}" for k in range(4))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 4, names=names)
    out = tmp_path / "res" / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out,
            "--json"]  # fmt: skip
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv)[0] == 75
    partial = out.parent / "r.json.partial"
    two = partial.read_bytes()  # the file after 2 images, the same in every run
    partial.unlink()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(two), len(two)))

    p = subprocess.run(eval_cmd(*argv), cwd=REPO, capture_output=True, text=True,
                       preexec_fn=small_files)  # fmt: skip
    said = (f"{partial}: cannot write (File too large); check the output path; the scores of "
            f"2 of 4 images are kept in {partial}: fix that and rerun the same command to "
            "continue")  # fmt: skip
    assert (p.returncode, p.stderr) == (7, f"sr_eval.py: error: {said}\n")
    line = json.loads(p.stdout.splitlines()[-1])
    got = (line["error"], line["scored"], line["kept"], line["partial"])
    assert got == (said, 3, 2, str(partial))
    assert partial.read_bytes() == two  # (and no temporary file)
    assert [f.name for f in out.parent.iterdir()] == ["r.json.partial"]
    fields = dict(images=4, scored=3, kept=2, partial=str(partial))  # (a stop cannot come there)
    assert sr_eval.stopped_line("SIGTERM", fields) == (
        f"stopped by SIGTERM after scoring 3 of 4 images, the scores of the first 2 kept in "
        f"{partial}: rerun the same command to continue"
    )


def test_ctrl_c_is_one_line_exit_130_and_no_output(tmp_path):
    """Issue 20 item 8: a real SIGINT to a running sr_eval (read-ahead threads busy)."""
    hr_dir, _, sr_dir = long_set(tmp_path, n=3, count=10)
    out = tmp_path / "res"
    out.mkdir()
    cmd = eval_cmd("--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 3, "--no-lpips",
                   "--out", out / "r.json", "--csv", out / "r.csv")  # fmt: skip
    # SIGINT from within the run as it starts on image 0005 (the next images being read ahead):
    # one sent once its first line was read raced the run to its end on an idle machine
    interrupt_at = (
        "import os, signal, sys\nfrom pathlib import Path\nimport sr_lib.metrics, sr_eval\n"
        "real = sr_lib.metrics.evaluate_image\n"
        "def evaluate(gt, samples, **kwargs):\n"
        "    if Path(kwargs['gt_name']).stem == '0005':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(gt, samples, **kwargs)\n"
        "sr_lib.metrics.evaluate_image = evaluate\n"
        "sys.exit(sr_eval.main(sys.argv[1:]))\n"
    )
    p = subprocess.run([sys.executable, "-c", interrupt_at, *cmd[2:]], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    rest, err = p.stdout, p.stderr
    assert p.returncode == 130, err
    scored = len(rest.splitlines())  # (one progress line an image)
    assert scored == 5, rest
    assert err.strip().splitlines() == [
        f"sr_eval.py: interrupted after scoring {scored} of 10 images, their scores kept in "
        f"{out / 'r.json.partial'}: rerun the same command to continue"
    ]
    assert "[10/10]" not in rest
    assert [p.name for p in out.iterdir()] == ["r.json.partial"]


def test_ctrl_c_right_after_an_images_log_line_counts_that_image(tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    """An image's log line was printed before its scores were recorded: Ctrl-C between the two
    (CI, under load: "[1/40]" read, then "interrupted" alone) said no image was scored and kept
    none, where the log showed one. The scores are recorded and the lines shown as one step
    with signals held; here SIGINT comes as the first line is shown."""
    hr_dir, _, sr_dir = long_set(tmp_path, n=2, count=3)
    out = tmp_path / "res" / "r.json"
    real = sr_eval.show

    def show(text, *args, **kwargs):
        real(text, *args, **kwargs)
        if text.startswith("[1/3]"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(sr_eval, "show", show)
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in ("--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2,
                                       "--no-lpips", "--out", out)])  # fmt: skip
    got = capsys.readouterr()
    assert e.value.code == 130
    assert [line[:5] for line in got.out.splitlines()] == ["[1/3]"]
    assert got.err.splitlines() == [
        f"sr_eval.py: interrupted after scoring 1 of 3 images, their scores kept in "
        f"{out}.partial: rerun the same command to continue"
    ]
    assert len(sr_eval.read_partial(tmp_path / "res" / "r.json.partial")[1]) == 1


def test_ctrl_c_while_scoring_says_where_the_scores_are_kept(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while the images are scored:
    the line said "interrupted" alone, where SIGTERM's says how many images' scores are kept
    where; now it says it too (exit 130), the --json line as well, and a rerun continues."""
    names = tuple(f"{k:04d}" for k in range(8))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((64, 64),) * 8, names=names)
    out = tmp_path / "res" / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    p = subprocess.Popen(eval_cmd(*argv, "--json"), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    lines = [p.stdout.readline() for _ in range(2)]  # the second image is scored (or nearly)
    assert lines[-1].startswith("[2/8]"), "".join(lines) + p.stderr.read()
    os.killpg(p.pid, signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    line = json.loads(rest.splitlines()[-1])
    scored, partial = line["scored"], f"{out}.partial"
    assert 1 <= scored < 8 and (line["kept"], line["partial"]) == (scored, partial)
    said = (f"interrupted after scoring {scored} of 8 images, their scores kept in {partial}: "
            "rerun the same command to continue")  # fmt: skip
    assert (err, line["exit_code"], line["error"]) == (f"sr_eval.py: {said}\n", 130, said)
    kept = sr_eval.read_partial(Path(partial))[1]
    assert [entry["image"] for entry in kept] == list(names[:scored])
    done = subprocess.run(eval_cmd(*argv), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"continuing from {partial}: {scored} of 8 images scored already" in done.stdout


def test_the_scores_so_far_are_appended_and_a_killed_run_continues(tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    """OUT.partial was written whole after each image: every image's scores again (with
    --pairwise its N x N matrices: O(images x N^2) an image). Now a run writes it whole once
    (its first image) and appends each later image's line. SIGKILL while scoring (no handler
    runs), then a last line cut short (a kill inside its write): the rerun takes the complete
    lines, leaves the cut one out, continues after them, and writes the --out of a run never
    stopped."""
    names = tuple(f"{k:04d}" for k in range(8))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((64, 64),) * 8, names=names)
    out = tmp_path / "res" / "r.json"
    partial = out.with_name("r.json.partial")
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    assert run(capsys, *argv)[0] == 0
    whole = out.read_bytes()
    out.unlink()
    real, whole_writes, sizes = sr_eval.write_text, [], []
    monkeypatch.setattr(
        sr_eval,
        "write_text",
        lambda path, text: (whole_writes.append(Path(path)), real(path, text)),
    )
    real_keep = sr_eval.keep_scores

    def keep_scores(*args):
        written = real_keep(*args)
        sizes.append(partial.stat().st_size)
        return written

    monkeypatch.setattr(sr_eval, "keep_scores", keep_scores)
    stop_at_image(monkeypatch, "0004")
    assert fails(capsys, *argv)[0] == 75
    assert whole_writes == [partial]  # (the first image's: whole)
    lines = partial.read_text().splitlines()
    assert [json.loads(x)["image"] for x in lines[1:]] == ["0001", "0002", "0003"]
    assert [b - a for a, b in zip(sizes, sizes[1:])] == [len(x) + 1 for x in lines[1:]]
    monkeypatch.undo()
    partial.unlink()

    # SIGKILL from within the run as it starts on image 0004: a kill sent once its "[2/8]" line
    # was read raced the run to its end (8 such images take ~20 ms; a loaded machine lost it)
    kill_at = (
        "import os, signal, sys\nfrom pathlib import Path\nimport sr_lib.metrics, sr_eval\n"
        "real = sr_lib.metrics.evaluate_image\n"
        "def evaluate(gt, samples, **kwargs):\n"
        "    if Path(kwargs['gt_name']).stem == '0004':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(gt, samples, **kwargs)\n"
        "sr_lib.metrics.evaluate_image = evaluate\n"
        "sys.exit(sr_eval.main(sys.argv[1:]))\n"
    )
    p = subprocess.run([sys.executable, "-c", kill_at, *map(str, argv)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert out.with_name("r.json.lock").exists()  # (no cleanup ran: the rerun is not refused)
    kept = sr_eval.read_partial(partial)[1]
    assert [e["image"] for e in kept] == list(names[:4])
    with open(partial, "a") as f:  # the next image's line, cut short
        f.write(json.dumps({**kept[-1], "image": names[len(kept)]})[:40])
    calls = stop_at_image(monkeypatch, "none")
    code, cap = run(capsys, *argv)
    assert code == 0 and calls == list(names[len(kept) :]) and cap.err == ""
    assert f"continuing from {partial}: {len(kept)} of 8 images scored already" in cap.out
    assert out.read_bytes() == whole and not partial.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_scoring_is_one_line_exit_75_and_no_results(tmp_path, lpips_file, sig):
    """SLURM's SIGTERM (or SIGUSR1; SIGHUP: a closed terminal) to the job's process group while
    the images are scored (LPIPS on, the next image decoded on threads, the report's contact
    sheets written). It ended the run at once: exit -15, no line, and the report's images of
    the images scored left in --report without a page. Now exit 75, one error line saying how
    far it got and to rerun, the --json line, and neither --out, --csv, a report nor a
    temporary file."""
    names = tuple(f"{k:04d}" for k in range(8))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((64, 64),) * 8, names=names)
    res = tmp_path / "res"
    cmd = eval_cmd("--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--lpips-weights",
                   lpips_file, "--out", res / "r.json", "--csv", res / "r.csv", "--report",
                   res / "report", "--json")  # fmt: skip
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    lines = [p.stdout.readline() for _ in range(2)]  # the second image is scored (or nearly)
    assert lines[-1].startswith("[2/8]"), "".join(lines) + p.stderr.read()
    os.killpg(p.pid, sig)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 75, err
    line = json.loads(rest.splitlines()[-1])
    scored = line["scored"]
    assert 1 <= scored < 8 and f"[{scored + 2}/8]" not in rest
    said = (f"stopped by {sig.name} after scoring {scored} of 8 images, their scores kept in "
            f"{res / 'r.json.partial'}: rerun the same command to continue")  # fmt: skip
    assert err.splitlines() == [f"sr_eval.py: error: {said}"]
    assert (line["exit_code"], line["error"], line["images"], line["mean"]) == (75, said, 8, None)
    assert sorted(str(f.relative_to(res)) for f in res.rglob("*")) == [
        "r.json.partial",
        "report",  # (made at start)
    ]


def test_an_identical_warning_is_one_line_a_run(tmp_path, capsys, monkeypatch):
    """sr_eval.py's own showwarning (one_line_warnings) showed a warning again wherever the
    filters changed between (Python's once is forgotten then, as at the end of each header
    read's catch_warnings): it is shown once a run now, as in the other scripts
    (`errors.shown_once`); another text is shown."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=1)
    real = sr_eval.hr_images

    def hr_images(folder):
        for text in ("a library's warning", "a library's warning", "another"):
            warnings.warn(text, UserWarning, stacklevel=1)
            warnings.simplefilter("default")  # (Python's once forgotten)
        return real(folder)

    monkeypatch.setattr(sr_eval, "hr_images", hr_images)
    code, got = run(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips")
    assert code == 0 and got.err == (
        "sr_eval.py: warning: a library's warning\nsr_eval.py: warning: another\n"
    ), got.err


def stop_at_image(monkeypatch, stem: str, sig=signal.SIGTERM) -> list[str]:
    """sr_lib.metrics.evaluate_image, sending this process `sig` when it first starts on image
    `stem`, once; returns the list of the HR files it is called on, method by method."""
    real, calls, fired = sr_lib.metrics.evaluate_image, [], []

    def evaluate(gt, samples, **kwargs):
        calls.append(Path(kwargs["gt_name"]).stem)
        if calls[-1] == stem and not fired:
            fired.append(sig)
            os.kill(os.getpid(), sig)  # (its handler raises here)
        return real(gt, samples, **kwargs)

    monkeypatch.setattr(sr_lib.metrics, "evaluate_image", evaluate)
    return calls


def test_a_rerun_after_a_stop_continues_and_gives_the_uninterrupted_files(
    tmp_path, capsys, monkeypatch, lpips_file
):
    """Preempted at the 4th of 5 images (SIGTERM), the rerun of the same command scores only the
    4th and 5th: --out, --csv and the report's page are the bytes of a run never stopped, and
    the file of the scores so far (--out's name + .partial) is gone once they are written."""
    names = tuple(f"{k:04d}" for k in range(5))
    hr_dir, lr_dir, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 5, names=names)
    res = tmp_path / "res"
    argv = ["--hr", hr_dir, "--sr", f"a={sr_dir}", f"b={sr_dir}:1", "--lr", lr_dir, "--scale", 4,
            "--n", 2, "--lpips-weights", lpips_file, "--out", res / "r.json", "--csv",
            res / "r.csv", "--report", res / "report", "--json"]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    whole = {f: (res / f).read_bytes() for f in ("r.json", "r.csv", "report/index.html")}
    shutil.rmtree(res)

    calls = stop_at_image(monkeypatch, "0003")
    code, err = fails(capsys, *argv)
    partial = res / "r.json.partial"
    said = (f"stopped by SIGTERM after scoring 3 of 5 images, their scores kept in {partial}: "
            "rerun the same command to continue")  # fmt: skip
    assert (code, err.splitlines()) == (75, [f"sr_eval.py: error: {said}"])
    assert sorted(p.name for p in res.iterdir()) == ["r.json.partial", "report"]
    assert not (res / "report" / "images").exists()  # (a report's files are all or none)

    calls.clear()
    code, out = run(capsys, *argv)
    assert code == 0 and calls == ["0003", "0003", "0004", "0004"]  # (two methods)
    assert f"continuing from {partial}: 3 of 5 images scored already" in out.out
    assert {f: (res / f).read_bytes() for f in whole} == whole
    assert sorted(p.name for p in (res / "report" / "images").iterdir()) == [
        f"{k:06d}" for k in range(5)
    ]
    line = json.loads(out.out.splitlines()[-1])
    assert (line["scored"], line["partial"]) == (5, None) and not partial.exists()


def test_an_earlier_out_is_moved_aside_while_the_run_works_and_the_stop_says_so(
    tmp_path, capsys, monkeypatch
):
    """An --out and --csv of an earlier, complete run stayed in place after a stopped (or failed,
    or killed) run: a pipeline that reads the files, not the exit code, took their numbers for
    this run's. Now they are moved to NAME.old (NAME.old2 where that is taken: nothing is
    replaced) when the work starts, and the stop's line says where; a run that completes
    writes its own and deletes only what it replaced; Ctrl-C says it in a warning line."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    out, csv_file, res = tmp_path / "res" / "r.json", tmp_path / "res" / "r.csv", tmp_path / "res"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out,
            "--csv", csv_file]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    earlier = out.read_bytes(), csv_file.read_bytes()
    (res / "r.json.old").write_text("the user's own\n")
    stop_at_image(monkeypatch, "0002")
    code, err = fails(capsys, *argv)
    said = (f"stopped by SIGTERM after scoring 2 of 3 images, their scores kept in "
            f"{res / 'r.json.partial'}: rerun the same command to continue; {out} (an earlier "
            f"run's) moved to {out}.old2; {csv_file} (an earlier run's) moved to "
            f"{csv_file}.old")  # fmt: skip
    assert (code, err) == (75, f"sr_eval.py: error: {said}\n")
    assert sorted(p.name for p in res.iterdir()) == [
        "r.csv.old", "r.json.old", "r.json.old2", "r.json.partial"
    ]  # fmt: skip
    assert ((res / "r.json.old2").read_bytes(), (res / "r.csv.old").read_bytes()) == earlier

    monkeypatch.undo()
    # the rerun continues, and deletes what the stopped run set aside, as it would have: a
    # chain of preempted runs left NAME.old, NAME.old2, ... (one more for each stopped run
    # after a complete one); not the user's own r.json.old
    assert run(capsys, *argv)[0] == 0
    assert (out.read_bytes(), csv_file.read_bytes()) == earlier  # (the same command)
    assert sorted(p.name for p in res.iterdir()) == ["r.csv", "r.json", "r.json.old"]
    assert (res / "r.json.old").read_text() == "the user's own\n"
    stop_at_image(monkeypatch, "0000")  # stopped before any image was scored: the same
    assert fails(capsys, *argv)[0] == 75
    assert sorted(p.name for p in res.iterdir()) == [
        "r.csv.old", "r.json.old", "r.json.old2", "r.json.partial"
    ]  # fmt: skip
    (res / "r.csv.old").write_text("the user's, written over ours\n")
    monkeypatch.undo()
    assert run(capsys, *argv)[0] == 0
    assert sorted(p.name for p in res.iterdir()) == ["r.csv", "r.csv.old", "r.json", "r.json.old"]
    (res / "r.csv.old").unlink()

    stop_at_image(monkeypatch, "0001", signal.SIGINT)
    code, err = fails(capsys, *argv)
    assert (code, err) == (130, f"sr_eval.py: warning: {out} (an earlier run's) moved to "
                           f"{out}.old2; {csv_file} (an earlier run's) moved to {csv_file}.old\n"
                           "sr_eval.py: interrupted after scoring 1 of 3 images, their scores "
                           f"kept in {res / 'r.json.partial'}: rerun the same command to "
                           "continue\n")  # fmt: skip
    assert not out.exists() and (res / "r.json.old2").read_bytes() == earlier[0]


def stopped_and_rerun(tmp_path, capsys, monkeypatch, first: tuple, again: tuple, stray=None):
    """A run with --csv res/r.csv and the flags `first` stopped at the 3rd of 3 images, then
    rerun with --csv and `again` (file names under res), `stray` written in res between:
    (the files in res after the stop, the images the rerun scored, its stdout, res)."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    res = tmp_path / "res"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--csv",
            res / "r.csv"]  # fmt: skip
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv, *(res / a if "." in a else a for a in first))[0] == 75
    if stray:
        (res / stray).write_text('{"key": "another command\'s"}\n')
    stopped = sorted(p.name for p in res.iterdir())
    monkeypatch.undo()
    calls = stop_at_image(monkeypatch, "none")
    code, cap = run(capsys, *argv, *(res / a if "." in a else a for a in again))
    assert code == 0
    return stopped, calls, cap.out, res


def test_a_rerun_that_adds_out_continues_the_scores_kept_beside_csv(tmp_path, capsys, monkeypatch):
    """The scores are kept beside --out, else --csv, and the outputs are no part of the
    command that makes them: a run with --csv alone stopped, then rerun with --out added,
    scored every image again and left r.csv.partial behind for good. Now that run takes them
    (moved beside --out) and continues."""
    stopped, calls, out, res = stopped_and_rerun(
        tmp_path, capsys, monkeypatch, (), ("--out", "r.json")
    )
    assert stopped == ["r.csv.partial"] and calls == ["0002"]
    assert f"continuing from {res / 'r.json.partial'}: 2 of 3 images scored already" in out
    assert sorted(p.name for p in res.iterdir()) == ["r.csv", "r.json"]


def test_a_rerun_that_drops_out_continues_the_scores_kept_beside_it(tmp_path, capsys, monkeypatch):
    """The mirror of the test above: a run with --out and --csv keeps its scores beside --out;
    its rerun with --csv alone could not know that name, so it scored every image again and left
    r.json.partial behind for good. Now it finds them in the folder (their key is this
    command's), moves them beside --csv and continues; another command's is not taken."""
    stopped, calls, out, res = stopped_and_rerun(
        tmp_path, capsys, monkeypatch, ("--out", "r.json"), (), "other.partial"
    )
    assert stopped == ["other.partial", "r.json.partial"] and calls == ["0002"]
    assert f"continuing from {res / 'r.csv.partial'}: 2 of 3 images scored already" in out
    assert sorted(p.name for p in res.iterdir()) == ["other.partial", "r.csv"]


def test_scores_kept_beside_another_out_are_taken_only_for_the_same_settings(
    tmp_path, capsys, monkeypatch
):
    """A rerun with another --out takes the scores kept beside an earlier --out in its folder
    (the outputs are no part of the command), checked for what scores_key holds: those of a run
    with other settings (--color y) are left alone, and every image is scored; those of the
    same settings continue."""
    stopped, calls, out, res = stopped_and_rerun(
        tmp_path, capsys, monkeypatch, ("--out", "a.json", "--color", "y"), ("--out", "b.json")
    )
    assert stopped == ["a.json.partial"] and calls == ["0000", "0001", "0002"]
    assert "continuing" not in out
    assert sorted(p.name for p in res.iterdir()) == ["a.json.partial", "b.json", "r.csv"]
    shutil.rmtree(res)
    stopped, calls, out, res = stopped_and_rerun(
        tmp_path, capsys, monkeypatch, ("--out", "a.json"), ("--out", "b.json")
    )
    assert stopped == ["a.json.partial"] and calls == ["0002"]
    assert f"continuing from {res / 'b.json.partial'}: 2 of 3 images scored already" in out
    assert sorted(p.name for p in res.iterdir()) == ["b.json", "r.csv"]


def stopped_beside_a_json(tmp_path, capsys, monkeypatch) -> tuple[Path, list]:
    """(folder res, the command but its --out): stopped at the 3rd of 3 images with --out
    res/a.json, its scores kept in res/a.json.partial."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    res, argv = tmp_path / "res", ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2]
    argv += ["--no-lpips"]
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv, "--out", res / "a.json")[0] == 75
    monkeypatch.undo()
    return res, argv


def run_while_a_json_is_written(capsys, monkeypatch, res: Path, argv: list):
    """(the images scored, the output) of a run of `argv` with --out res/b.json while a run of
    --out res/a.json holds its lock (here another handle): every image scored, exit 0."""
    holder = os.open(res / "a.json.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        calls = stop_at_image(monkeypatch, "none")
        code, got = run(capsys, *argv, "--out", res / "b.json")
    finally:
        os.close(holder)
    assert code == 0 and calls == ["0000", "0001", "0002"] and "continuing" not in got.out
    return calls, got


def test_scores_kept_beside_an_out_that_a_run_writes_now_are_not_taken(
    tmp_path, capsys, monkeypatch
):
    """A rerun with another --out took the scores kept beside an earlier --out of the same
    command even where a run of that --out was writing them now (its NAME.lock held, here from
    another handle): the two runs then wrote one file of scores. Now a file whose run holds its
    lock is not taken: one warning line naming it and the holder, every image scored, the file
    left to its run, as it was; with the lock free (its run ended), it is taken."""
    res, argv = stopped_beside_a_json(tmp_path, capsys, monkeypatch)
    partial = res / "a.json.partial"
    kept = partial.read_bytes()
    calls, got = run_while_a_json_is_written(capsys, monkeypatch, res, argv)
    assert got.err == (
        f"sr_eval.py: warning: {partial}: the scores this command kept there are not continued "
        f"from: another sr_eval.py (pid {os.getpid()} on {socket.gethostname()}) is writing it "
        "now; this run scores every image\n"
    )
    assert partial.read_bytes() == kept
    (res / "b.json").unlink()
    calls.clear()
    code, got = run(capsys, *argv, "--out", res / "b.json")
    assert code == 0 and calls == ["0002"] and got.err == ""
    assert sorted(p.name for p in res.iterdir()) == ["a.json.lock", "b.json"]


def test_a_link_target_that_a_run_writes_now_is_not_taken_from_beside_another_target(
    tmp_path, capsys, monkeypatch
):
    """A rerun looks beside its OUT.partial link's target for the scores set aside there
    (`keep_others_scores`), but a run of another --out whose OUT.partial links into the same
    folder writes its target there, holding the lock of its own NAME, which the target's name
    does not tell: only the files set aside there (NAME.<12 hex>.partial) are looked at; that
    target is left to its run, found through its link, whose lock is held."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    res, disk = tmp_path / "res", tmp_path / "disk"
    res.mkdir(), disk.mkdir()
    (res / "a.json.partial").symlink_to(disk / "a_kept.partial")
    (res / "b.json.partial").symlink_to(disk / "b_kept.partial")
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips"]
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv, "--out", res / "a.json")[0] == 75
    monkeypatch.undo()
    kept = (disk / "a_kept.partial").read_bytes()
    calls, got = run_while_a_json_is_written(capsys, monkeypatch, res, argv)
    assert f"{res / 'a.json.partial'}: the scores this command kept there are not" in got.err
    assert (disk / "a_kept.partial").read_bytes() == kept
    assert sorted(p.name for p in disk.iterdir()) == ["a_kept.partial"]


def test_scores_kept_beside_an_out_written_now_on_nfs_are_not_taken(tmp_path, capsys,
                                                                    monkeypatch):  # fmt: skip
    """NFS emulates flock with a byte-range lock, which is exclusive on a file open for writing
    only (EBADF else, flock(2)): the other output's lock, opened read-only, was taken for no
    locks at all, and the scores that run was writing were moved. Now the lock is opened for
    writing: held, the file is not taken; another user's, which can be opened read-only alone,
    is not either (whether a run writes it is not known)."""
    res, argv = stopped_beside_a_json(tmp_path, capsys, monkeypatch)
    partial = res / "a.json.partial"
    kept = partial.read_bytes()
    nfs_flock(monkeypatch)
    calls, got = run_while_a_json_is_written(capsys, monkeypatch, res, argv)
    assert f"{partial}: the scores this command kept there are not continued" in got.err
    assert "is writing it now" in got.err and partial.read_bytes() == kept
    (res / "b.json").unlink()
    real_open = os.open

    def another_users(path, flags, *args):
        if Path(path).name == "a.json.lock" and flags & os.O_ACCMODE:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(sr_eval.os, "open", another_users)
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv, "--out", res / "b.json")
    assert code == 0 and calls == ["0000", "0001", "0002"] and partial.read_bytes() == kept
    assert "cannot be taken open read-only, as this file system asks" in got.err, got.err


def test_the_lock_of_scores_kept_is_that_of_their_output(tmp_path):
    """`partial_lock`: NAME.partial's run holds NAME.lock, beside a link NAME's target; a
    NAME.partial whose name was cut to fit (`fit_name`) has no known NAME: None (not taken)."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "r.json").symlink_to(tmp_path / "disk" / "t.json")
    assert sr_eval.partial_lock(tmp_path / "r.json.partial") == tmp_path / "disk" / "t.json.lock"
    assert sr_eval.partial_lock(tmp_path / "a.json.partial") == tmp_path / "a.json.lock"
    limit = data.name_max(tmp_path)
    cut = data.fit_name("r" * limit, len(sr_eval.PARTIAL), limit) + sr_eval.PARTIAL
    assert sr_eval.partial_lock(tmp_path / cut) is None


@pytest.mark.parametrize("disk", ["same", "other"])
def test_scores_taken_from_another_out_go_where_an_out_partial_link_leads(
    tmp_path, capsys, monkeypatch, disk
):
    """OUT.partial a symbolic link (the scores kept on another disk), and the scores of this
    command kept beside another --out: taking them replaced the link with their file, the scores
    then kept beside --out and the link gone at the end. Now they go where the link leads (on
    another file system written there, then deleted), the link stays, the run continues."""
    res, argv = stopped_beside_a_json(tmp_path, capsys, monkeypatch)
    target = tmp_path / "scratch" / "kept.partial"
    target.parent.mkdir()
    (res / "b.json.partial").symlink_to(target)
    real_replace, seen = os.replace, []

    def replace(src, dst, **kwargs):  # (another disk: no rename onto it)
        if disk == "other" and Path(dst).parent == target.parent and Path(src).parent == res:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(src, dst, **kwargs)

    def json_text(*args):  # (the results made: where the scores were kept meanwhile)
        seen.append(((res / "b.json.partial").is_symlink(), target.is_file()))
        return real(*args)

    real = sr_eval.json_text
    monkeypatch.setattr(sr_eval.os, "replace", replace)
    monkeypatch.setattr(sr_eval, "json_text", json_text)
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv, "--out", res / "b.json")
    assert code == 0 and calls == ["0002"] and seen == [(True, True)]
    assert f"continuing from {res / 'b.json.partial'}: 2 of 3 images scored already" in got.out
    assert sorted(p.name for p in res.iterdir()) == ["b.json", "b.json.partial"]
    assert (res / "b.json.partial").is_symlink() and not target.exists()


def test_a_stop_while_scores_are_moved_onto_another_disk_leaves_them_one_file(
    tmp_path, capsys, monkeypatch
):
    """Scores of this command kept beside another --out, taken for an OUT.partial linked onto
    another file system: written there, then deleted. A SIGTERM (a job preempted as it starts)
    while they were written was raised at the write's end, before the deletion: both files
    were left, one of them a stray copy. Now the two are one step, the signal raised at its end:
    one file, where the link leads, and the rerun continues from it."""
    res, argv = stopped_beside_a_json(tmp_path, capsys, monkeypatch)
    target = tmp_path / "scratch" / "kept.partial"
    target.parent.mkdir()
    (res / "b.json.partial").symlink_to(target)
    real_replace, real_write = os.replace, sr_eval.write_text

    def replace(src, dst, **kwargs):  # (another disk: no rename onto it)
        if Path(dst) == target and Path(src).parent == res:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(src, dst, **kwargs)

    def write_text(path, text):  # (the signal comes while the scores are written there)
        if Path(path) == res / "b.json.partial" and not target.exists():
            os.kill(os.getpid(), signal.SIGTERM)
        return real_write(path, text)

    monkeypatch.setattr(sr_eval.os, "replace", replace)
    monkeypatch.setattr(sr_eval, "write_text", write_text)
    code, err = fails(capsys, *argv, "--out", res / "b.json")
    assert code == 75 and "stopped by SIGTERM" in err, err
    assert sorted(p.name for p in res.iterdir()) == ["b.json.partial"] and target.is_file()
    monkeypatch.undo()
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv, "--out", res / "b.json")
    assert code == 0 and calls == ["0002"], got.err
    assert f"continuing from {res / 'b.json.partial'}: 2 of 3 images scored already" in got.out


@pytest.mark.parametrize("why", ["sticky", "unlink"])
def test_scores_that_cannot_be_deleted_after_a_copy_onto_another_disk_are_not_taken(
    tmp_path, capsys, monkeypatch, why
):
    """Scores of this command kept beside another --out, taken for an OUT.partial linked onto
    another file system: written there, then deleted. Where the deletion failed (another user's
    file in a folder with the sticky bit: PermissionError), the error was swallowed and the run
    continued from the copy, the file left beside the other --out, where a rerun of that
    command continued from it too: its images scored twice, a move that was a copy. Now such a
    file is not taken, as a rename of it fails on one file system: never copied where the
    folder does not let it be deleted, the copy deleted where the deletion fails all the same;
    one warning line names it and why, and every image is scored."""
    res, argv = stopped_beside_a_json(tmp_path, capsys, monkeypatch)
    theirs = res / "a.json.partial"
    kept = theirs.read_bytes()
    target = tmp_path / "scratch" / "kept.partial"
    target.parent.mkdir()
    (res / "b.json.partial").symlink_to(target)
    real_replace, real_unlink, copied = os.replace, Path.unlink, []

    def replace(src, dst, **kwargs):  # (another disk: no rename onto it)
        if Path(dst) == target and Path(src).parent == res:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(src, dst, **kwargs)

    def unlink(path, *args, **kwargs):  # (the sticky bit asks more than a folder's mode tells)
        if path == theirs:
            copied.append(target.read_bytes() == kept)
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(sr_eval.os, "replace", replace)
    if why == "sticky":  # (and not its owner, nor the folder's: `unlinkable` says no)
        res.chmod(0o1777)
        monkeypatch.setattr(sr_eval.os, "geteuid", lambda: theirs.stat().st_uid + 1000)
    else:
        monkeypatch.setattr(Path, "unlink", unlink)
    calls = stop_at_image(monkeypatch, "none")
    try:
        code, got = run(capsys, *argv, "--out", res / "b.json")
    finally:
        res.chmod(0o755)
    assert code == 0 and calls == ["0000", "0001", "0002"] and "continuing" not in got.out
    assert got.err == (
        f"sr_eval.py: warning: {theirs}: the scores this command kept there are not continued "
        f"from: they cannot be moved to {res / 'b.json.partial'} (Operation not permitted); "
        "this run scores every image\n"
    )
    assert theirs.read_bytes() == kept and not target.exists()
    assert copied == ([] if why == "sticky" else [True])


@pytest.mark.parametrize("disk", ["same", "other"])
def test_scores_kept_through_a_link_are_moved_from_where_it_leads(tmp_path, capsys, monkeypatch,
                                                                   disk):  # fmt: skip
    """Scores of this command kept through a link beside --csv (CSV.partial linked onto another
    disk), taken by a rerun that adds --out, its OUT.partial a link too: the link itself was
    moved, not the file it leads to. Onto another file system the scores were copied, the link
    deleted, and the file it led to left there, which no run reads or deletes; on one, the
    link was renamed onto OUT.partial's target, and the run's end deleted the file at the end
    of the chain, the renamed link left there, leading nowhere. Now the file where the link
    leads is moved (the link stays, as every output's): no file is left but the two links."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    res, argv = tmp_path / "res", ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2]
    argv += ["--no-lpips", "--csv", res / "a.csv"]
    kept, target = tmp_path / "scratch" / "kept.partial", tmp_path / "disk" / "t.partial"
    for folder in (res, kept.parent, target.parent):
        folder.mkdir()
    (res / "a.csv.partial").symlink_to(kept)
    (res / "b.json.partial").symlink_to(target)
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv)[0] == 75 and kept.is_file()
    monkeypatch.undo()
    real_replace = os.replace

    def replace(src, dst, **kwargs):  # (another disk: no rename onto it)
        if disk == "other" and Path(dst) == target and Path(src).parent != target.parent:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(sr_eval.os, "replace", replace)
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv, "--out", res / "b.json")
    assert code == 0 and calls == ["0002"], got.err
    assert f"continuing from {res / 'b.json.partial'}: 2 of 3 images scored already" in got.out
    assert [p.name for p in (kept.parent, target.parent) for p in p.iterdir()] == []
    assert sorted(p.name for p in res.iterdir()) == [
        "a.csv", "a.csv.partial", "b.json", "b.json.partial"
    ]  # fmt: skip


def test_another_commands_scores_kept_through_an_out_partial_link_are_moved_beside_its_target(
    tmp_path, capsys, monkeypatch
):
    """OUT.partial a symbolic link (the scores kept on another disk) holding another command's
    scores: moving them aside renamed the link itself, so the user's link was lost and this run
    kept its scores beside --out. Now the target is moved beside itself, the link kept and
    written through; a rerun of that command finds them there and continues."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    res, disk = tmp_path / "res", tmp_path / "disk"
    res.mkdir(), disk.mkdir()
    link, target = res / "r.json.partial", disk / "kept.partial"
    link.symlink_to(target)
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips"]
    argv += ["--out", res / "r.json"]
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv)[0] == 75 and target.is_file()
    monkeypatch.undo()
    key = json.loads(target.read_text().split("\n", 1)[0])["key"]
    aside = disk / f"kept.{key[:12]}.partial"
    seen = []
    real = sr_eval.json_text

    def json_text(*args):  # (the results made: where this run's scores were kept meanwhile)
        seen.append((link.is_symlink(), target.is_file()))
        return real(*args)

    monkeypatch.setattr(sr_eval, "json_text", json_text)
    calls = stop_at_image(monkeypatch, "0002")
    code, err = fails(capsys, *argv, "--color", "y")  # (another command)
    assert code == 75 and calls == list(names) and link.is_symlink() and target.is_file()
    assert f"moved to {aside}, where a rerun" in err
    assert sorted(p.name for p in res.iterdir()) == ["r.json.partial"]
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv)  # (the first command: continues from the aside)
    assert code == 0 and calls == ["0002"] and seen == [(True, True)], got.err
    assert f"continuing from {link}: 2 of 3 images scored already" in got.out
    assert link.is_symlink() and sorted(p.name for p in res.iterdir()) == ["r.json", link.name]
    (other,) = disk.glob("kept.*.partial")  # (the --color y run's, moved aside beside it)
    assert json.loads(other.read_text().split("\n", 1)[0])["key"] != key
    assert sorted(p.name for p in disk.iterdir()) == [other.name]


def test_a_rerun_on_a_copy_of_the_data_at_another_path_continues(tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    """The scores kept were keyed by the paths of --hr, --sr, --lr (the command's flags) and each
    file's resolved path: a requeued job that staged its data to the node's $TMPDIR (rsync -a,
    which keeps sizes and modification times) or read it mounted at another path scored every
    image again. Now a file is known by its name in its folder, size and mtime: the rerun on a
    copy (shutil.copy2) scores only the rest, its files the bytes of a run on the copy never
    stopped; a file touched since (another mtime) is scored again with every image after it;
    other data of the same names (other mtimes) is another command's: moved aside, not
    replaced."""
    names = tuple(f"{k:04d}" for k in range(4))
    make_set(tmp_path / "home", n=2, sizes=((48, 64),) * 4, names=names)
    shutil.copytree(tmp_path / "home", tmp_path / "staged", copy_function=shutil.copy2)
    make_set(tmp_path / "other", n=2, sizes=((48, 64),) * 4, names=names)
    res = tmp_path / "res"

    def argv(where):
        d = tmp_path / where
        return ["--hr", d / "hr", "--sr", d / "method_a", "--lr", d / "lr", "--scale", 4, "--n",
                2, "--no-lpips", "--out", res / "r.json", "--csv", res / "r.csv"]  # fmt: skip

    assert run(capsys, *argv("staged"))[0] == 0
    whole = {f: (res / f).read_bytes() for f in ("r.json", "r.csv")}
    shutil.rmtree(res)
    partial = res / "r.json.partial"
    for stop, touched, scored in (
        ("0002", None, ["0002", "0003"]),
        ("0003", "000001_sample00001.png", ["0001", "0002", "0003"]),
    ):
        calls = stop_at_image(monkeypatch, stop)
        assert fails(capsys, *argv("home"))[0] == 75 and partial.exists()
        if touched:
            sample = tmp_path / "staged" / "method_a" / touched
            os.utime(sample, ns=(sample.stat().st_atime_ns, sample.stat().st_mtime_ns + 10**9))
        calls.clear()
        code, got = run(capsys, *argv("staged"))
        assert code == 0 and calls == scored and not partial.exists(), got.err
        assert f"continuing from {partial}: {int(scored[0])} of 4" in got.out and not got.err
        assert {f: (res / f).read_bytes() for f in whole} == whole
        shutil.rmtree(res)
        monkeypatch.undo()
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv("home"))[0] == 75
    monkeypatch.undo()
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv("other"))
    assert code == 0 and calls == list(names) and "continuing" not in got.out
    (aside,) = res.glob("r.json.*.partial")  # (the other data's: moved aside, not lost)
    assert f"the scores kept by {sr_eval.OTHER_COMMAND} moved to {aside}" in got.err


def test_a_rerun_scores_again_what_changed_after_the_stop(tmp_path, capsys, monkeypatch):
    """The scores kept are taken only for the same flags and settings, and for the first images
    whose files (size and modification time) did not change: a sample touched since the stop is
    scored again with every image after it; another flag (--color y) starts over, one warning
    line; a stop without --out or --csv keeps nothing, and says so."""
    names = tuple(f"{k:04d}" for k in range(4))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 4, names=names)
    out = tmp_path / "r.csv"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--csv", out]
    calls = stop_at_image(monkeypatch, "0003")
    assert fails(capsys, *argv)[0] == 75
    partial = tmp_path / "r.csv.partial"
    assert partial.exists()
    sample = sr_dir / "000001_sample00001.png"
    os.utime(sample, ns=(sample.stat().st_atime_ns, sample.stat().st_mtime_ns + 10**9))
    calls.clear()
    code, got = run(capsys, *argv)
    assert code == 0 and calls == ["0001", "0002", "0003"] and not partial.exists()
    assert f"continuing from {partial}: 1 of 4 images scored already" in got.out

    monkeypatch.undo()
    calls = stop_at_image(monkeypatch, "0003")
    assert fails(capsys, *argv)[0] == 75
    calls.clear()
    code, got = run(capsys, *argv, "--color", "y")
    assert code == 0 and calls == ["0000", "0001", "0002", "0003"] and not partial.exists()
    (aside,) = tmp_path.glob("r.csv.*.partial")  # (the other command's: moved aside, not lost)
    assert got.err == (
        f"sr_eval.py: warning: {partial}: the scores kept by {sr_eval.OTHER_COMMAND} moved to "
        f"{aside}, where a rerun of that command continues from them\n"
    )
    aside.unlink()

    no_out = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips"]
    monkeypatch.undo()
    stop_at_image(monkeypatch, "0002")
    code, err = fails(capsys, *no_out)
    assert code == 75 and err.strip() == (
        "sr_eval.py: error: stopped by SIGTERM after scoring 2 of 4 images, none kept (only "
        "--out or --csv keeps them): rerun the same command"
    )


def test_the_scores_kept_by_another_command_are_moved_aside_not_lost(tmp_path, capsys, monkeypatch):
    """Two commands with one --out (a shared results folder; a job requeued with other flags):
    the second found the first's OUT.partial, warned and replaced it, and the first command's
    kept scores were lost (its rerun scored every image again). Now the second moves it aside
    to OUT.<its key>.partial (one line saying where) and the first's rerun continues from it,
    and so in turn: each command's scores are kept until its own run completes."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    out = tmp_path / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    other = [*argv, "--color", "y"]
    partial = tmp_path / "r.json.partial"
    for first, second in ((argv, other), (other, argv)):
        stop_at_image(monkeypatch, "0002")
        assert fails(capsys, *first)[0] == 75
        kept = partial.read_bytes()
        monkeypatch.undo()
        stop_at_image(monkeypatch, "0001")  # the other command: stopped too, its own kept
        assert fails(capsys, *second)[0] == 75
        (aside,) = tmp_path.glob("r.json.*.partial")
        assert re.fullmatch(r"r\.json\.[0-9a-f]{12}\.partial", aside.name)
        assert aside.read_bytes() == kept and capsys.readouterr().err == ""
        monkeypatch.undo()
        calls = stop_at_image(monkeypatch, "none")
        code, got = run(capsys, *first)  # the first command continues from its own
        assert code == 0 and calls == ["0002"]
        assert f"continuing from {partial}: 2 of 3 images scored already" in got.out
        (second_aside,) = tmp_path.glob("r.json.*.partial")  # the second's, moved aside in turn
        assert second_aside != aside and len(sr_eval.read_partial(second_aside)[1]) == 1
        assert got.err == (
            f"sr_eval.py: warning: {partial}: the scores kept by {sr_eval.OTHER_COMMAND} moved "
            f"to {second_aside}, where a rerun of that command continues from them\n"
        )
        monkeypatch.undo()
        calls = stop_at_image(monkeypatch, "none")
        code, got = run(capsys, *second)
        assert code == 0 and calls == ["0001", "0002"] and got.err == ""
        assert sorted(p.name for p in tmp_path.glob("r.json*")) == ["r.json"]
        monkeypatch.undo()


def test_scores_kept_by_another_command_that_cannot_be_moved_are_refused(
    tmp_path, capsys, monkeypatch
):
    """Another command's OUT.partial that cannot be moved aside (another user's, in a shared
    folder with the sticky bit) is one line before any work, exit 7: this run could not
    replace it either."""
    names = tuple(f"{k:04d}" for k in range(2))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 2, names=names)
    out = tmp_path / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    stop_at_image(monkeypatch, "0001")
    assert fails(capsys, *argv)[0] == 75
    kept = (tmp_path / "r.json.partial").read_bytes()
    monkeypatch.undo()

    def rename(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(sr_eval.os, "rename", rename)
    monkeypatch.setattr(sr_eval.os, "link", rename)  # (fs.protected_hardlinks: not another's)
    calls = stop_at_image(monkeypatch, "none")
    code, err = fails(capsys, *argv, "--color", "y")
    (aside,) = re.findall(r"aside to (\S+) ", err)
    assert (code, calls) == (7, []) and err == (
        f"sr_eval.py: error: {tmp_path / 'r.json.partial'}: the scores kept by another command "
        "(other flags, device, GPU model, LPIPS's CPU threads or instruction set, or versions) "
        f"cannot be moved aside to {aside} "
        "(Operation not permitted); move it away, or give --out or --csv another name\n"
    )
    assert (tmp_path / "r.json.partial").read_bytes() == kept


def test_moving_another_commands_scores_aside_never_replaces_a_file(tmp_path, capsys, monkeypatch):
    """The aside name is checked free, then taken: os.rename (POSIX) replaces a file that took
    it in between (a second run on the shared --out moving the same command's scores aside), and
    those scores were lost. Now it is taken only where still free (a hard link), else the next
    name; an OUT.partial that such a run moved away first is no error (exit 7 said it could not
    be moved: 'No such file or directory')."""
    here = tmp_path / "r.json.partial"
    ours, theirs = "a" * 64, "b" * 64
    here.write_text(sr_eval.partial_text(theirs, [], []))
    taken = tmp_path / f"r.json.{theirs[:12]}.partial"
    real_exists = sr_eval.exists

    def exists(path):  # free when asked, taken at once by the other run
        free = not real_exists(path)
        if path == taken and free:
            path.write_text("the other run's\n")
        return not free

    monkeypatch.setattr(sr_eval, "exists", exists)
    assert sr_eval.keep_others_scores(here, ours)
    assert taken.read_text() == "the other run's\n" and not here.exists()
    second = tmp_path / f"r.json.{theirs[:12]}.2.partial"
    assert sr_eval.read_partial(second)[0]["key"] == theirs
    assert f"moved to {second}," in capsys.readouterr().err

    monkeypatch.undo()
    here.write_text(sr_eval.partial_text(theirs, [], []))
    read = sr_eval.read_partial

    def moved_meanwhile(path):
        head = read(path)
        os.rename(path, tmp_path / "elsewhere.partial")  # (by the other run)
        return head

    monkeypatch.setattr(sr_eval, "read_partial", moved_meanwhile)
    assert sr_eval.keep_others_scores(here, ours) and capsys.readouterr().err == ""
    assert {p.name for p in tmp_path.iterdir()} == {"elsewhere.partial", taken.name, second.name}


HOLD_AT = (  # sr_eval.py that says "holding" as it starts on image 0001, and waits for stdin
    "import sys\nfrom pathlib import Path\nimport sr_lib.metrics, sr_eval\n"
    "real = sr_lib.metrics.evaluate_image\n"
    "def evaluate(gt, samples, **kwargs):\n"
    "    if Path(kwargs['gt_name']).stem == '0001':\n"
    "        print('holding', flush=True)\n"
    "        sys.stdin.readline()\n"
    "    return real(gt, samples, **kwargs)\n"
    "sr_lib.metrics.evaluate_image = evaluate\n"
    "sys.exit(sr_eval.main(sys.argv[1:]))\n"
)


def test_a_second_command_on_an_out_in_use_is_refused_at_once(tmp_path, capsys):
    """Two commands on one --out at once (a shared results folder, two array jobs given one
    name): each moved the other's OUT.partial aside at its first image and wrote its own whole
    after every image, and the later results replaced the earlier. Now --out (and --csv) is
    locked while a run writes it: a second process is refused at once, one line naming the
    holder's pid and what to do, exit 2, no file touched; the first ends as alone. The lock
    file is deleted at the end, and one left by a killed run (a kill -9 runs no cleanup)
    blocks nothing: the kernel drops a flock with its process."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    out, lock = tmp_path / "r.json", tmp_path / "r.json.lock"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    assert run(capsys, *argv)[0] == 0
    whole = out.read_bytes()
    out.unlink()
    first = subprocess.Popen([sys.executable, "-c", HOLD_AT, *map(str, argv)], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        while (line := first.stdout.readline()) not in ("holding\n", ""):
            pass
        assert line == "holding\n"
        before = {p.name: p.read_bytes() for p in tmp_path.glob("r.json*")}
        assert sorted(before) == ["r.json.lock", "r.json.partial"]
        capsys.readouterr()
        assert fails(capsys, *argv, "--color", "y") == (2, (  # (this process: the second)
            f"sr_eval.py: error: --out {out}: another sr_eval.py (pid {first.pid} on "
            f"{socket.gethostname()}) is writing its results there now; wait for it to end, or "
            "give --out another name\n"
        ))  # fmt: skip
        assert {p.name: p.read_bytes() for p in tmp_path.glob("r.json*")} == before
    finally:
        _, err = first.communicate("\n", timeout=120)
    assert first.returncode == 0, err
    assert out.read_bytes() == whole and sorted(p.name for p in tmp_path.glob("r.json*")) == [
        "r.json"
    ]
    lock.write_text(f"pid {first.pid} on {socket.gethostname()}\n")  # (left by a kill -9)
    assert run(capsys, *argv, "--color", "y")[0] == 0 and not lock.exists()


def test_outputs_on_a_file_system_without_locks_leave_no_lock_file(tmp_path, capsys, monkeypatch):
    """Where flock fails for want of locks (some network mounts: ENOLCK), the run goes on with
    one warning per output, but its NAME.lock was closed and never deleted: every run there left
    r.json.lock and r.csv.lock beside its results. Now they are deleted at the end, as a lock's."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),), names=("0001",))
    out, table = tmp_path / "r.json", tmp_path / "r.csv"

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(sr_eval.fcntl, "flock", flock)
    code, got = run(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips",
                    "--out", out, "--csv", table, "--quiet")  # fmt: skip
    assert code == 0
    assert got.err == "".join(
        f"sr_eval.py: warning: {flag} {path}: cannot lock {path}.lock (No locks available); a "
        "second sr_eval.py writing there at once would not be noticed\n"
        for flag, path in (("--out", out), ("--csv", table))
    )
    assert sorted(p.name for p in tmp_path.glob("r.*")) == ["r.csv", "r.json"]


@pytest.mark.parametrize("sticky", [False, True], ids=["folder", "sticky-folder"])
def test_another_users_lock_file_is_replaced_or_locked_read_only(
    tmp_path, capsys, monkeypatch, sticky
):
    """A NAME.lock that a kill left, of another user (not writable to this one): opened
    read-only and locked all the same (a flock needs no write), but its line, the killed run's
    pid, stayed for the whole run, and a second run refused meanwhile named that pid as the
    one writing. Now the file is replaced by one of this run's (its own line) where the folder
    lets it be deleted; in a folder with the sticky bit it is locked as it is (`lock_holder`
    then trusts no such line). The run is not refused, warns of nothing, and deletes the lock
    at the end."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),), names=("0001",))
    out, lock = tmp_path / "r.json", tmp_path / "r.json.lock"
    theirs = "pid 1 on elsewhere\n"
    lock.write_text(theirs)
    real_open, modes, held = os.open, [], []

    def opened(path, flags, *args):
        if Path(path) == lock:
            modes.append(flags & (os.O_RDWR | os.O_CREAT))
            if flags & os.O_CREAT and lock.exists() and lock.read_text() == theirs:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    if sticky:  # (and not its owner, nor the folder's: `unlinkable` says no)
        tmp_path.chmod(0o1777)
        monkeypatch.setattr(sr_eval.os, "geteuid", lambda: lock.stat().st_uid + 1000)
    real_unlock = sr_eval.unlock
    monkeypatch.setattr(sr_eval.os, "open", opened)
    monkeypatch.setattr(sr_eval, "unlock", lambda *a: held.append(lock.read_text()) or
                        real_unlock(*a))  # fmt: skip
    assert run(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips",
               "--out", out, "--quiet") == (0, ("", ""))  # fmt: skip
    create, read_only = os.O_RDWR | os.O_CREAT, 0
    if sticky:
        assert modes == [create, read_only] and held == [theirs]
    else:
        assert modes == [create, read_only, create]
        assert held == [f"pid {os.getpid()} on {socket.gethostname()}\n"]
    assert sorted(p.name for p in tmp_path.glob("r.*")) == ["r.json"]


def nfs_flock(monkeypatch):
    """fcntl.flock as NFS emulates it, by a byte-range lock: an exclusive one needs the file open
    for writing (EBADF else, flock(2))."""
    real = fcntl.flock

    def flock(fd, operation):
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real(fd, operation)

    monkeypatch.setattr(sr_eval.fcntl, "flock", flock)


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="open file description locks")
@pytest.mark.parametrize(
    "held", ["no", "yes", "sticky"], ids=["left-by-a-kill", "held-elsewhere", "in-a-sticky-folder"]
)
def test_another_users_lock_file_on_nfs_is_replaced_where_no_run_holds_it(
    tmp_path, capsys, monkeypatch, held
):
    """On NFS another user's NAME.lock left by a kill, open read-only (not writable here), could
    not be locked (EBADF: NFS's flock is a byte-range lock, which needs a file open for
    writing): the run went on unlocked, warning that a second run would not be noticed, and
    never tried to replace the file, as it does where flock works; every later run there did
    the same. Now, where no process holds a byte-range lock on it (F_GETLK, which needs no
    write), it is replaced by one of this run's, locked, no warning, deleted at the end; where
    one does (a run on another machine: here an open file description's lock), the run is
    refused, one line, exit 2, the file left as it is; where the folder does not let it be
    deleted (the sticky bit), the warning says why it is not locked."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),), names=("0001",))
    out, lock = tmp_path / "r.json", tmp_path / "r.json.lock"
    theirs = "pid 1 on elsewhere\n"
    lock.write_text(theirs)
    real_open = os.open

    def another_users(path, flags, *args):
        if Path(path) == lock and flags & os.O_ACCMODE and lock.exists():
            if lock.read_text() == theirs:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    holder = real_open(lock, os.O_RDWR)
    try:
        if held == "yes":  # (NFS's flock is a byte-range lock of the whole file on the server)
            whole = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            fcntl.fcntl(holder, fcntl.F_OFD_SETLK, whole)
        monkeypatch.setattr(sr_eval.os, "open", another_users)
        nfs_flock(monkeypatch)
        calls = stop_at_image(monkeypatch, "none")
        argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips"]
        if held == "sticky":  # (and not its owner, nor the folder's: `unlinkable` says no)
            tmp_path.chmod(0o1777)
            monkeypatch.setattr(sr_eval.os, "geteuid", lambda: lock.stat().st_uid + 1000)
            code, got = run(capsys, *argv, "--out", out, "--quiet")
            assert (code, calls) == (0, ["0001"]) and got.err == (
                f"sr_eval.py: warning: --out {out}: cannot lock {lock} (another user's, open "
                "read-only, and this file system locks only files open for writing); a second "
                "sr_eval.py writing there at once would not be noticed\n"
            )
        elif held == "yes":
            code, err = fails(capsys, *argv, "--out", out)
            assert (code, calls) == (2, []) and err == (
                f"sr_eval.py: error: --out {out}: another sr_eval.py (pid 1 on elsewhere) is "
                "writing its results there now; wait for it to end, or give --out another name\n"
            )
            assert lock.read_text() == theirs and not out.exists()
        else:
            assert run(capsys, *argv, "--out", out, "--quiet") == (0, ("", ""))
            assert calls == ["0001"] and sorted(p.name for p in tmp_path.glob("r.*")) == ["r.json"]
    finally:
        os.close(holder)
        tmp_path.chmod(0o755)


@pytest.mark.parametrize("kind", ["folder", "loop"])
def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path, capsys, monkeypatch, kind):
    """NAME.lock a folder or a loop of symbolic links: os.open's IsADirectoryError or ELOOP
    was a traceback, exit 1. Now one line naming the flag and the lock, exit 7, before any
    work."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),), names=("0001",))
    out, lock = tmp_path / "r.json", tmp_path / "r.json.lock"
    lock.mkdir() if kind == "folder" else lock.symlink_to(lock.name)
    calls = stop_at_image(monkeypatch, "none")
    code, err = fails(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2,
                      "--no-lpips", "--out", out)  # fmt: skip
    why = "Is a directory" if kind == "folder" else "Too many levels of symbolic links"
    assert (code, calls) == (7, []) and err == (
        f"sr_eval.py: error: --out {out}: cannot open {lock}, the file that locks it while a run "
        f"writes it ({why}); move that away\n"
    )


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="/proc/locks: Linux")
def test_a_refused_run_names_the_holder_of_the_lock_only_where_it_is_known(tmp_path, monkeypatch):
    """The line of a run refused named the pid in NAME.lock, its last writer's: where the
    holder could not rewrite it (another user's, in a folder with the sticky bit), a killed
    run's pid, not running. Now this machine's holder comes from /proc/locks, whatever the file
    says; a line naming another machine (its locks not listed here) is named only where its
    holder could rewrite or replace the file; a line naming this machine that no process here
    holds, and one in a sticky folder, are not named."""
    out, lock = tmp_path / "r.json", tmp_path / "r.json.lock"
    host = socket.gethostname()
    lock.write_text("pid 1 on elsewhere\n")
    held = os.open(lock, os.O_RDONLY)  # (this test holds it: another open file, refused)

    def named() -> str:
        with pytest.raises(sr_eval.UsageError) as e:
            sr_eval.lock_output("--out", out)
        return re.fullmatch(r"--out \S+: another sr_eval.py(.*) is writing its results there "
                            "now; wait for it to end, or give --out another name",
                            str(e.value)).group(1)  # fmt: skip

    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert named() == f" (pid {os.getpid()} on {host})"  # (this machine's holder)
        monkeypatch.setattr(sr_eval, "flock_pids", lambda fd: set())  # (held on another)
        assert named() == " (pid 1 on elsewhere)"
        lock.write_text(f"pid 1 on {host}\n")
        assert named() == ""
        lock.write_text("pid 1 on elsewhere\n")
        tmp_path.chmod(0o1777)
        assert named() == ""
        lock.chmod(0o666)  # (writable to all: rewritten by any holder)
        assert named() == " (pid 1 on elsewhere)"
    finally:
        os.close(held)
        tmp_path.chmod(0o755)
    assert lock.read_text() == "pid 1 on elsewhere\n"  # (a run refused writes nothing)


@pytest.mark.parametrize("flag", ["--out", "--csv"])
@pytest.mark.parametrize("link", ["loop", "missing-folder"])
def test_an_out_partial_that_is_a_loop_of_links_is_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, flag, link
):
    """OUT.partial a loop of symbolic links (or a link into a missing folder): partial_paths'
    Path.resolve raised RuntimeError, a traceback; then it was one line, but only once the
    first image was scored (its first write), naming no flag. Now checked before any work, as
    --out and --csv are: one line naming the flag, in their words, exit 7."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),), names=("0001",))
    out = tmp_path / ("r.json" if flag == "--out" else "r.csv")
    partial = out.with_name(out.name + ".partial")
    if link == "loop":
        partial.symlink_to("x.partial")
        (tmp_path / "x.partial").symlink_to(partial.name)
        said = "a loop of symbolic links (it points to x.partial); point it at a file"
    else:
        partial.symlink_to(tmp_path / "gone" / "x.partial")
        said = (f"a symbolic link to {tmp_path / 'gone' / 'x.partial'}, whose folder does not "
                "exist; create that folder, or remove the link")  # fmt: skip
    calls = stop_at_image(monkeypatch, "none")  # (no stop: the calls only)
    code, err = fails(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2,
                      "--no-lpips", flag, out, "--quiet")  # fmt: skip
    assert (code, calls) == (7, []) and err == (
        f"sr_eval.py: error: {flag} {out}: {partial}, where its scores so far are kept (a "
        f"stopped run continues from them), is {said}\n"
    )


@pytest.mark.parametrize("loop, other", [("--out", "--csv"), ("--csv", "--out"),
                                         ("--report", "--out"), ("--out", "--report")])  # fmt: skip
def test_an_output_that_is_a_loop_of_links_beside_another_output_is_one_line(
    tmp_path, capsys, monkeypatch, loop, other
):
    """An --out, --csv or --report that is a loop of symbolic links was one line alone, but a
    traceback (Path.resolve's RuntimeError) where another output was given too: check_flags
    compared the outputs' resolved paths first. Now the loop's own line, exit 7, before any
    work."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),), names=("0001",))
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    kind = "folder" if loop == "--report" else "file"
    calls = stop_at_image(monkeypatch, "none")  # (no stop: the calls only)
    named = tmp_path / {"--out": "r.json", "--csv": "r.csv", "--report": "rep"}[other]
    code, err = fails(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2,
                      "--no-lpips", loop, tmp_path / "a", other, named)  # fmt: skip
    assert (code, calls) == (7, []) and err == (
        f"sr_eval.py: error: {loop} {tmp_path / 'a'}: a loop of symbolic links (it points to b); "
        f"point it at a {kind}\n"
    )


def test_an_out_partial_that_is_a_link_has_its_target_deleted_at_the_end(tmp_path, capsys):
    """OUT.partial a symbolic link to a file not made yet (the scores kept on another disk): the
    scores were written through it, as every output, but the run's end deleted the link, not
    its target: the scores so far were left there for ever. Now the target is deleted and the
    link stays, as --out's."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),), names=("0001",))
    partial, target = tmp_path / "r.json.partial", tmp_path / "scratch" / "kept.partial"
    target.parent.mkdir()
    partial.symlink_to(target)
    assert run(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips",
               "--out", tmp_path / "r.json", "--quiet") == (0, ("", ""))  # fmt: skip
    assert partial.is_symlink() and list(target.parent.iterdir()) == []


@pytest.mark.parametrize("end", ["folder gone", "not deletable"])
def test_an_out_partial_not_deleted_at_the_end_leaves_the_results_standing(
    tmp_path, capsys, monkeypatch, end
):
    """OUT.partial a link onto another disk whose folder went away while the run worked (a
    scratch folder cleaned), once every image was scored: its deletion at the end, after the
    results were written, was write_target's error line, exit 7, the --json line saying the
    scores were kept there; a target that cannot be deleted (here a folder put in its place) a
    traceback. Now the run's results stand, exit 0, and one warning line says what is left."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),), names=("0001",))
    partial, target = tmp_path / "r.json.partial", tmp_path / "scratch" / "kept.partial"
    target.parent.mkdir()
    partial.symlink_to(target)
    out = tmp_path / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    real = sr_eval.json_text

    def json_text(*args):  # (the results made: every image scored, its scores kept)
        assert target.is_file()
        if end == "folder gone":
            shutil.rmtree(target.parent)
        else:
            target.unlink()
            (target / "x").mkdir(parents=True)
        return real(*args)

    monkeypatch.setattr(sr_eval, "json_text", json_text)
    code, got = run(capsys, *argv, "--quiet", "--json")
    why = (f"a symbolic link to {target}, whose folder does not exist; create that folder, or "
           "remove the link") if end == "folder gone" else "Is a directory; delete it"  # fmt: skip
    assert code == 0 and got.err == (
        f"sr_eval.py: warning: the results are written; {partial}, where the scores were kept "
        f"while the run worked, is left: {why}\n"
    )
    line = json.loads(got.out)
    assert (line["exit_code"], line["results"], line["partial"]) == (0, str(out), None)
    assert json.loads(out.read_text())["mean"] and partial.is_symlink()


def test_moving_scores_aside_never_leaves_a_second_name(tmp_path, monkeypatch):
    """take_name links the new name, then unlinks the old. Another user's OUT.partial in a
    folder with the sticky bit, where hard links to it are allowed (fs.protected_hardlinks=0),
    is linked, but neither name can then be unlinked (the bit asks who owns the file): a stray
    second name was left. Now such a file is refused before it is linked (PermissionError:
    keep_others_scores' exit 7), and an unlink that fails all the same removes the link again,
    or names it in the error where it cannot."""
    folder = tmp_path / "shared"
    folder.mkdir()
    here, new = folder / "r.json.partial", folder / "r.json.0123456789ab.partial"
    here.write_text("theirs\n")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):  # (as the kernel answers the user who is not the owner)
        if Path(path).parent == folder:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_unlink(path, *args, **kwargs)

    folder.chmod(0o1777)
    monkeypatch.setattr(sr_eval.os, "geteuid", lambda: here.stat().st_uid + 1000)  # not its owner
    monkeypatch.setattr(sr_eval.os, "unlink", unlink)
    with pytest.raises(PermissionError):
        sr_eval.take_name(here, new)
    assert sorted(folder.iterdir()) == [here]

    folder.chmod(0o777)  # no sticky bit, the unlink failing all the same (a test's stand-in)
    with pytest.raises(PermissionError, match=f"; {re.escape(str(new))} is left a second name"):
        sr_eval.take_name(here, new)
    monkeypatch.undo()
    assert sorted(folder.iterdir()) == sorted([here, new])


def test_a_stop_while_scores_are_moved_aside_leaves_one_name(tmp_path, monkeypatch):
    """take_name links the new name, then unlinks the old: a SIGTERM between the two (a job
    preempted as it starts, moving another command's OUT.partial aside) left both names, and
    the rerun moved the second aside once more, a stray copy. Now the two are one step, the
    stop raised at its end."""
    here, new = tmp_path / "r.json.partial", tmp_path / "r.json.0123456789ab.partial"
    here.write_text("theirs\n")
    real_link = os.link

    def link(src, dst, **kwargs):
        real_link(src, dst, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # (its handler raises at the next bytecode)

    monkeypatch.setattr(sr_eval.os, "link", link)
    with pytest.raises(sr_eval.Preempted), sr_eval.stop_signals():
        sr_eval.take_name(here, new)
    assert sorted(tmp_path.iterdir()) == [new] and new.read_text() == "theirs\n"


@pytest.mark.parametrize("handler", ["python's", "main's"])
def test_ctrl_c_while_scores_are_moved_aside_leaves_one_name(tmp_path, monkeypatch, handler):
    """Ctrl-C between take_name's link and unlink left both names (the rerun moving the second
    aside once more) where SIGINT's handler is not held by `signals_held`: Python's own or a
    caller's (main() called from Python). Now its KeyboardInterrupt undoes the link: the file is
    left under its one name. Under main's handler (`exit_on_error`) it waits for the unlink."""
    here, new = tmp_path / "r.json.partial", tmp_path / "r.json.0123456789ab.partial"
    here.write_text("theirs\n")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if Path(path) == here:
            os.kill(os.getpid(), signal.SIGINT)  # (Python's handler raises at the next bytecode)
        return real_unlink(path, *args, **kwargs)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if handler == "main's":
            signal.signal(signal.SIGINT, sr_eval.when_not_held(signal.default_int_handler))
        monkeypatch.setattr(sr_eval.os, "unlink", unlink)
        with pytest.raises(KeyboardInterrupt):
            sr_eval.take_name(here, new)
    finally:
        signal.signal(signal.SIGINT, before)
    left = here if handler == "python's" else new
    assert sorted(tmp_path.iterdir()) == [left] and left.read_text() == "theirs\n"


@pytest.mark.parametrize("lpips", [True, False], ids=["lpips", "no-lpips"])
def test_scores_kept_before_the_key_held_the_gpu_model_are_continued_only_without_lpips(
    tmp_path, capsys, monkeypatch, lpips_file, lpips
):
    """An OUT.partial of an srspace before --out's settings held device_name has the key of
    those settings. With --no-lpips nothing that key lacks can differ: the rerun continues from
    it, and ends as a run never stopped. It was continued with LPIPS on the CPU too, whose
    threads and instruction set that key does not tell (LPIPS_mean's 8th and 7th digits), where
    a later key that holds the threads but not the instruction set is moved aside: one rule now,
    settings unknown where they could differ are another command's, moved aside (kept, named in
    the line) and every image scored again."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    out, partial = tmp_path / "r.json", tmp_path / "r.json.partial"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--out", out]
    argv += ["--lpips-weights", lpips_file] if lpips else ["--no-lpips"]
    assert run(capsys, *argv)[0] == 0
    whole = out.read_bytes()
    out.unlink()
    real, seen = sr_eval.run_settings, []
    monkeypatch.setattr(sr_eval, "run_settings", lambda *a: seen.append(real(*a)) or seen[-1])
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv)[0] == 75
    monkeypatch.undo()
    # the key as that srspace wrote it: its settings (no device_name, nor the threads,
    # cpu_capability and lr_blur added since; the device it picked: the CPU here) and every flag
    # typed but the outputs' (--lr-blur, added since, neither)
    args = sr_eval.EvalArgs(**seen[0]["args"])
    typed = {k: v for k, v in dataclasses.asdict(args).items()
             if k not in ("out", "csv", "report", "quiet", "json", "lr_blur")}  # fmt: skip
    later = ("args", "device_name", "threads", "cpu_capability", "cpu_kernels", "lr_blur")
    old = {k: v for k, v in seen[0].items() if k not in later}
    old_key = hashlib.sha256(json.dumps({**old, "args": typed}, sort_keys=True).encode())
    first, rest = partial.read_text().split("\n", 1)
    head = {k: v for k, v in json.loads(first).items() if k != "moved_key"}  # (none then)
    partial.write_text(json.dumps({**head, "key": old_key.hexdigest()}) + "\n" + rest)
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv)
    assert code == 0 and out.read_bytes() == whole
    left = sorted(p.name for p in tmp_path.glob("r.json*"))
    if not lpips:
        assert (calls, got.err) == (["0002"], "")
        assert f"continuing from {partial}: 2 of 3 images scored already" in got.out
        assert left == ["r.json"]
        return
    aside = tmp_path / f"r.json.{old_key.hexdigest()[:12]}.partial"
    assert calls == ["0000", "0001", "0002"] and "continuing" not in got.out
    assert left == ["r.json", aside.name] and f"moved to {aside}, where a rerun" in got.err
    assert json.loads(aside.read_text().split("\n", 1)[0])["key"] == old_key.hexdigest()


@pytest.mark.parametrize("lpips", [True, False], ids=["lpips", "no-lpips"])
@pytest.mark.parametrize("lacks", [("cpu_kernels",), ("cpu_capability", "cpu_kernels")])
def test_scores_kept_before_the_key_held_the_instruction_set(
    tmp_path, capsys, monkeypatch, lpips_file, lpips, lacks
):
    """An OUT.partial of an srspace before --out's settings held cpu_capability, or
    cpu_kernels: with --no-lpips (null there, as on CUDA) nothing that key lacks can differ,
    and the rerun continues; with LPIPS on the CPU it may come from a node of other CPU
    features or another ONEDNN_MAX_CPU_ISA (LPIPS_mean's 7th digit), so it is moved aside,
    kept, and every image scored."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    out, partial = tmp_path / "r.json", tmp_path / "r.json.partial"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--out", out]
    argv += ["--lpips-weights", lpips_file] if lpips else ["--no-lpips"]
    real, seen = sr_eval.run_settings, []
    monkeypatch.setattr(sr_eval, "run_settings", lambda *a: seen.append(real(*a)) or seen[-1])
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv)[0] == 75
    monkeypatch.undo()
    earlier = {k: v for k, v in seen[0].items() if k not in lacks}  # (its key, moved_key)
    args, methods = sr_eval.EvalArgs(**seen[0]["args"]), sr_eval.expand_methods([sr_dir], 2)
    old = {"key": sr_eval.scores_key(args, earlier)}
    old["moved_key"] = sr_eval.scores_key(args, earlier, methods)
    first, rest = partial.read_text().split("\n", 1)
    partial.write_text(json.dumps({**json.loads(first), **old}) + "\n" + rest)
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv)
    assert code == 0 and calls == (["0000", "0001", "0002"] if lpips else ["0002"])
    aside = sorted(p.name for p in tmp_path.glob("r.json.*.partial"))
    assert aside == ([f"r.json.{old['key'][:12]}.partial"] if lpips else [])
    assert (f"moved to {tmp_path / aside[0]}" in got.err) if lpips else got.err == ""


def test_a_rerun_with_onednn_capped_otherwise_scores_every_image(
    tmp_path, capsys, monkeypatch, lpips_file
):
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU (as a job requeued onto an AVX2 node) changes
    every LPIPS-made number (LPIPS_mean's 7th digit: docs/benchmarks.md), but the key held
    ATen's instruction set alone, the same: the rerun continued from the first's scores, a mix
    of the two. Now the key holds the variables set (`cpu_kernels`): another command's scores,
    moved aside (kept for a rerun of that command, which continues from them), every image
    scored. (oneDNN reads the variable once, at its first use, before it here: the numbers are
    this process's either way; the key is what is tested.)"""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 3, names=names)
    out, partial = tmp_path / "r.json", tmp_path / "r.json.partial"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--out", out]
    argv += ["--lpips-weights", lpips_file]
    stop_at_image(monkeypatch, "0002")
    assert fails(capsys, *argv)[0] == 75
    monkeypatch.undo()
    key = json.loads(partial.read_text().split("\n", 1)[0])["key"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    calls = stop_at_image(monkeypatch, "none")
    code, got = run(capsys, *argv)
    aside = tmp_path / f"r.json.{key[:12]}.partial"
    assert code == 0 and calls == ["0000", "0001", "0002"] and "continuing" not in got.out
    assert f"moved to {aside}, where a rerun" in got.err and aside.is_file()
    settings = json.loads(out.read_text())["settings"]
    assert settings["cpu_kernels"]["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    calls.clear()
    argv[argv.index(out)] = tmp_path / "r2.json"  # (that command's rerun, another --out)
    code, got = run(capsys, *argv)
    assert code == 0 and calls == ["0002"] and not aside.exists()


@pytest.mark.parametrize("flag", ["--out", "--csv"])
def test_a_folder_named_as_the_partial_file_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch, flag
):
    """A folder where OUT.partial belongs (`mkdir r.json.partial`, a tool's output folder) was
    found only once the first image was scored: a warning that it was not this command's scores,
    then exit 7 after the work. Now checked with --out and --csv, before any image is scored:
    one line naming it and what to do, exit 7, the folder and its files left as they were."""
    names = tuple(f"{k:04d}" for k in range(2))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 2, names=names)
    out = tmp_path / ("r.json" if flag == "--out" else "r.csv")
    partial = out.with_name(out.name + ".partial")
    (partial / "kept").mkdir(parents=True)
    calls = stop_at_image(monkeypatch, "none")  # (no stop: the calls only)
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", flag, out]
    code, err = fails(capsys, *argv)
    assert (code, calls) == (7, [])
    assert err == (
        f"sr_eval.py: error: {flag} {out}: {partial}, where its scores so far are kept (a "
        "stopped run continues from them), is a folder or another non-file; move it away\n"
    )
    assert [p.name for p in partial.iterdir()] == ["kept"] and not out.exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda row: "x",
        lambda row: [1, 2],
        lambda row: {**row, "PSNR_mean": "9.5"},
        lambda row: {**row, "SSIM_mean": True},
        lambda row: {"image": row["image"]},
        lambda row: {**row, "image": "0003"},
    ],
    ids=["row-a-string", "row-a-list", "a-number-a-string", "a-bool", "no-columns", "other-image"],
)
def test_an_edited_partial_file_is_scored_again_not_a_traceback(
    tmp_path, capsys, monkeypatch, edit
):
    """An OUT.partial whose first row was edited by hand (or by a tool): a row that is not a
    row, a number that is a string, a row without its columns. The rerun ended in a traceback
    (AttributeError, TypeError from dataset_mean) after scoring everything, or took the empty
    row, its image left out of the means in silence. Now one warning line, every image scored
    again, and --out the one of a run never stopped."""
    names = tuple(f"{k:04d}" for k in range(4))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64),) * 4, names=names)
    out = tmp_path / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--out", out]
    assert run(capsys, *argv)[0] == 0
    whole = out.read_bytes()
    out.unlink()
    calls = stop_at_image(monkeypatch, "0003")
    assert fails(capsys, *argv)[0] == 75
    partial = tmp_path / "r.json.partial"
    kept = json.loads(partial.read_text().splitlines()[0])  # (the images after it: a line each)
    (method,) = kept["images"][0]["rows"]
    kept["images"][0]["rows"][method] = edit(kept["images"][0]["rows"][method])
    partial.write_text(json.dumps(kept) + "\n")
    calls.clear()
    code, got = run(capsys, *argv)
    assert code == 0 and calls == ["0000", "0001", "0002", "0003"] and not partial.exists()
    assert got.err == (
        f"sr_eval.py: warning: {partial}: not a file of this command's scores so far (edited, "
        "or not sr_eval.py's); scoring every image, replacing it\n"
    )
    assert out.read_bytes() == whole


def test_started_in_the_background_ctrl_c_is_not_for_it(tmp_path, popen_in_background):
    """A shell starts `sr_eval.py ... &` in a script with SIGINT ignored (Ctrl-C in its terminal is
    for the job in the foreground): the run keeps it so, and completes."""
    hr_dir, _, sr_dir = long_set(tmp_path, n=3, count=20)
    out = tmp_path / "res"
    cmd = eval_cmd("--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 3, "--no-lpips",
                   "--out", out / "r.json")  # fmt: skip
    p = popen_in_background(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    line = p.stdout.readline()
    assert line.startswith("[1/20]") and p.poll() is None, line + p.stderr.read()
    p.send_signal(signal.SIGINT)  # while it runs: not reaped yet
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "[20/20]" in rest and len(json.loads((out / "r.json").read_text())["per_image"]) == 20


def test_piped_into_head_the_files_are_still_written(tmp_path):
    """`sr_eval.py ... | head -0`: with --out the scores still all reach the file (a warning says
    so, exit 0); with nothing but stdout there is nothing left to do: one line, exit 7. The same
    with stdout on a full disk (/dev/full)."""
    names = tuple(f"{k:04d}" for k in range(3))
    hr_dir, _, sr_dir = make_set(tmp_path, n=2, sizes=((64, 64),) * 3, names=names)
    base = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips"]
    closed, full = "closed (the program reading it ended)", "cannot be written (No space left"
    for k, (argv, lost) in enumerate([(base + ["--out", tmp_path / "r0.json"], closed),
                                      (base, closed),
                                      (base + ["--out", tmp_path / "r2.json"], full),
                                      (base, full)]):  # fmt: skip
        with open("/dev/full", "w") as dev_full:
            out = subprocess.PIPE if lost == closed else dev_full
            p = subprocess.Popen(eval_cmd(*argv), cwd=REPO, stdout=out, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
        if p.stdout:
            p.stdout.close()  # before its first line: the moment does not depend on the machine
        err = p.communicate(timeout=120)[1].strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        if "--out" in argv:
            assert p.returncode == 0 and f"warning: standard output {lost}" in err, err
            rows = json.loads((tmp_path / f"r{k}.json").read_text())["per_image"]
            assert [r["image"] for r in rows] == list(names)
        else:
            assert p.returncode == 7, err
            assert err.startswith(f"sr_eval.py: error: standard output {lost}") and err.endswith(
                "; stopped"
            )


def test_dash_is_standard_output_for_out_and_csv(tmp_path, capfd, monkeypatch):
    """`sr_eval.py ... --out - | jq .mean`: stdout carries the JSON (or CSV) alone, the bytes the
    file would hold; the progress lines and the table go to stderr. No file named '-' is made.
    (Run in this process: stdout is captured, not a terminal, as a pipe; the closed pipe and the
    full disk are the next test's, in processes of their own.)"""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    base = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips"]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    ran = []
    for flags in (["--out", "-", "--csv", tmp_path / "r.csv"],
                  ["--csv", "-", "--out", tmp_path / "r.json"]):  # fmt: skip
        code = sr_eval.main([str(a) for a in [*base, *flags]])
        ran.append(capfd.readouterr())
        assert code == 0, ran[-1].err
    json_out, csv_out = ran[0].out, ran[1].out
    from_file = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(json_out)["per_image"] == from_file["per_image"]
    assert json.loads(json_out)["mean"] == from_file["mean"]
    assert csv_out == (tmp_path / "r.csv").read_bytes().decode()  # the very bytes
    for p in ran:
        assert "[2/2] 0802" in p.err and "x4, N=2, 2 images" in p.err
        assert "LPIPS_mean and score not computed" in p.err and "Traceback" not in p.err
    assert list(work.iterdir()) == []
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in [*base, "--out", "-", "--csv", "-"]])
    out, err = capfd.readouterr()
    both = "--out - and --csv - would both write to standard output; give one of them a file name"
    assert e.value.code == 2 and out == "" and err == f"sr_eval.py: error: {both}\n"


def test_dash_into_a_closed_pipe_or_full_disk_is_one_line_exit_7(tmp_path):
    """--out -, its reader gone (`| head -0`) or stdout on a full disk: the result is lost, so
    one error line (after the progress lines on stderr), exit 7; --csv's file is written first."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    base = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips"]
    closed, full = "closed (the program reading it ended)", "cannot be written (No space left"
    for k, lost in enumerate((closed, full)):
        argv = [*base, "--out", "-", "--csv", tmp_path / f"r{k}.csv"]
        with open("/dev/full", "w") as dev_full:
            out = subprocess.PIPE if lost == closed else dev_full
            p = subprocess.Popen(eval_cmd(*argv), cwd=tmp_path, stdout=out, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
        if p.stdout:
            p.stdout.close()
        err = p.communicate(timeout=120)[1].strip().splitlines()
        assert p.returncode == 7 and [x for x in err if "error" in x] == err[-1:], err
        assert err[-1].startswith(f"sr_eval.py: error: standard output {lost}")
        assert err[-1].endswith(": --out - was not written; give --out a file name")
        assert "Traceback" not in "".join(err) and (tmp_path / f"r{k}.csv").exists()


def test_wrong_folders_give_errors_not_numbers(tmp_path, capsys, monkeypatch):
    """Issue 20 item 10: --hr given the LR folder (the samples are 4x its size) and --scale 4
    with an x8 LR folder: one line naming the file and both sizes, exit 3. Checked here as the
    scoring checks the decoded images (the headers unread: as for a file that changed since)."""
    monkeypatch.setattr(sr_eval, "image_size", lambda path: None)
    hr_dir, lr_dir, sr_dir = make_set(tmp_path, n=2, sizes=((48, 64), (48, 64)))
    for f in lr_dir.iterdir():  # LR files named as their HR, the usual LR folder
        f.rename(lr_dir / f.name.replace("x4", ""))
    code, err = fails(capsys, "--hr", lr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips")
    assert code == 3 and err.count("\n") == 1
    assert "000000_sample00000.png: SR is 64x48" in err and "0801.png (16x12)" in err
    # the error inside the scoring loop ended the decoding threads there (left to the garbage
    # collector, they were once joined from one of their own, mid-import: a hang)
    assert not [t for t in threading.enumerate() if t.name.startswith("read_ahead")]
    lr8 = tmp_path / "lr8"
    lr8.mkdir()
    for f in sorted(hr_dir.iterdir()):
        iio.imwrite(lr8 / f.name, imresize(read_image(f), 1 / 8))
    args = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2, "--no-lpips", "--lr", lr8]
    code, err = fails(capsys, *args)
    assert code == 3 and err.count("\n") == 1
    assert "0801.png: LR is 8x6" in err and "(64x48) at --scale 4" in err and "x8" in err
    assert run(capsys, *args[:-1], lr_dir)[0] == 0  # the right LR folder


def last_hr(h, w, text):
    """The last image (HR and samples) h x w: at 15 x 90 its mod-8 crop 88x8 is too small for
    LPIPS; at 16 x 64 the 4 px shave on each border leaves 8 rows, under SSIM's 11."""

    def setup(hr_dir, lr_dir, sr_dir):
        hr = make_hr(h, w, seed=2)
        iio.imwrite(hr_dir / "0803.png", hr)
        for f in sr_dir.glob("000002_*"):
            iio.imwrite(f, hr)
        return hr_dir / "0803.png", text

    return setup


def last_sample_resized(rows):
    def setup(hr_dir, lr_dir, sr_dir):
        f = sr_dir / "000002_sample00001.png"
        img = iio.imread(f)
        iio.imwrite(f, np.pad(img, ((0, 16), (0, 0), (0, 0))) if rows > 0 else img[:rows])
        return f, "larger than its ground truth" if rows > 0 else "smaller than the 56x40"

    return setup


def lr_of_another_scale(hr_dir, lr_dir, sr_dir):
    f = lr_dir / "0803x4.png"
    iio.imwrite(f, imresize(read_image(hr_dir / "0803.png"), 1 / 8))
    return f, "LR is 7x5 (WxH)"


@pytest.mark.parametrize(
    "setup, extra",
    [
        (last_hr(15, 90, "the 88x8 crop is too small for LPIPS"), ["--lpips-weights", "LPIPS"]),
        (last_sample_resized(16), ["--no-lpips"]),
        (last_sample_resized(-8), ["--no-lpips"]),
        (lr_of_another_scale, ["--no-lpips", "--lr", "LR"]),
        (last_hr(16, 64, "64x16 minus a 4 px shave is too small for SSIM"), ["--no-lpips"]),
    ],
    ids=["hr-too-small-for-lpips", "sample-too-large", "sample-too-small", "lr-x8", "ssim"],
)
def test_a_wrong_size_in_the_last_image_stops_the_run_before_the_first_is_scored(
    tmp_path, capsys, monkeypatch, lpips_file, setup, extra
):
    """Every size check of the scoring is made from the files' headers first: a wrong size in
    image 57 of 100 stopped the run only when it was reached, after half an hour of scoring on a
    CPU, all of it lost. Now the same line comes before any image is decoded or the LPIPS model
    is loaded; the scoring checks the decoded images again (a file could change)."""
    hr_dir, lr_dir, sr_dir = make_set(tmp_path, n=2, **THREE)
    bad, text = setup(hr_dir, lr_dir, sr_dir)
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 2]
    argv += [] if "--no-lpips" in extra else ["--device", "cpu"]  # (else a warning line)
    argv += [{"LPIPS": lpips_file, "LR": lr_dir}.get(a, a) for a in extra]
    argv += ["--out", tmp_path / "r.json", "--report", tmp_path / "R"]
    decoded, loaded = [], []
    read, load = data.read_image, sr_eval.load_lpips
    monkeypatch.setattr(data, "read_image", lambda p: decoded.append(p) or read(p))
    monkeypatch.setattr(sr_eval, "load_lpips", lambda *a: loaded.append(a) or load(*a))
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 3 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"sr_eval.py: error: {bad}: ") and text in err, err
    assert "[1/3]" not in out and decoded == [] and loaded == []
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "R").exists()
    # the line the scoring's own check gives (headers unread), after the images before it, and
    # where their scores are kept
    monkeypatch.setattr(sr_eval, "image_size", lambda p: None, raising=False)
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv])
    late = capsys.readouterr()
    kept = (f"; the scores of 2 of 3 images are kept in {tmp_path / 'r.json.partial'}: fix that "
            "and rerun the same command to continue\n")  # fmt: skip
    assert e.value.code == 3 and late.err == err[:-1] + kept and "[2/3] 0802" in late.out


def test_an_hr_turned_by_its_exif_orientation_is_checked_upright(tmp_path, capsys):
    """A JPEG's header holds its size before its EXIF orientation turns it: 48 rows by 64
    columns stored as 64 by 48. Checked as stored, the samples would be 'larger' than it."""
    hr_dir, _, sr_dir = make_set(tmp_path, n=2)
    hr = read_image(hr_dir / "0801.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise on display: store it turned the other way
    Image.fromarray(np.rot90(hr)).save(hr_dir / "0801.jpg", exif=exif, quality=100)
    (hr_dir / "0801.png").unlink()
    with Image.open(hr_dir / "0801.jpg") as im:
        assert im.size == (48, 64)  # (W, H) as stored
    code, cap = run(capsys, *base(hr_dir, sr_dir))
    assert code == 0 and cap.err == ""
