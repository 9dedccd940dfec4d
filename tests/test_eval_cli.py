"""sr_eval.py end to end on tiny generated sets, checked against values computed here independently.

LPIPS uses a seeded random-weight state_dict passed as --lpips-weights: the numbers only show that
the CLI and a direct lpips module call agree; they are not real LPIPS values.
"""

import csv
import json
import math
import warnings

import imageio.v3 as iio
import lpips
import numpy as np
import png
import pytest
import torch

import sr_eval
from sr_lib import data
from sr_lib.data import read_image
from sr_lib.resize import imresize

SCALE, N = 4, 3


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
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["method"], r["image"]) for r in rows] == [("method_a", "0801"), ("method_a", "0802")]
    assert float(rows[1]["score"]) == pytest.approx(res["per_image"][1]["score"], rel=1e-12)
    assert "method_a" in cap.out and "LPIPS_mean" in cap.out  # the table
    assert "[2/2] 0802" in cap.out  # plain log lines when stdout is not a TTY


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
        assert set(entry) == {"sr_dir", "mean", "per_image"} and entry["sr_dir"] == str(d)
        for got, w in zip(entry["per_image"], expected(hr_dir, d, 1, lpips_file)):
            check_row({k: v for k, v in got.items() if not k.startswith("PSNR")}, w)
            assert got["score"] == 0.0  # one sample: no diversity
    assert len(list(csv.DictReader(csv_path.open()))) == 4
    assert "method_a" in cap.out and "method_b" in cap.out
    # Y channel, no shave, checked on one image
    gt, sr = read_image(hr_dir / "0801.png"), read_image(sr_a / "000000.png")
    y = lambda x: 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255  # noqa: E731
    want = psnr(y(sr.astype(np.float64)), y(gt.astype(np.float64)))
    assert res["methods"]["method_a"]["per_image"][0]["PSNR_mean"] == pytest.approx(want, abs=1e-9)


def test_larger_sr_is_cropped_with_a_warning(tmp_path, capsys):
    hr_dir, _, sr_dir = make_set(tmp_path, n=1, sizes=((48, 64), (48, 64)))
    f = sr_dir / "000001_sample00000.png"
    iio.imwrite(f, np.pad(iio.imread(f), ((0, 16), (0, 0), (0, 0))))
    code, cap = run(capsys, "--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips")
    assert code == 0 and "warning" in cap.err and str(f) in cap.err


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
