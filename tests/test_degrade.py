"""Degradations beyond bicubic: sr_train.py --lr-blur, --lr-noise, --lr-jpeg (sr_lib.data's
Degradation, degrade, blur_matrix, jpeg). Every image is made here; tiny and in-process."""

import hashlib
import io
import json
import math
import tracemalloc
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import sr_sample
import sr_train
from sr_lib import metrics
from sr_lib.checkpoint import load_checkpoint, save_checkpoint
from sr_lib.data import (
    Degradation,
    PatchPairs,
    blur_downscale,
    blur_matrix,
    degradation_range,
    degrade,
    dihedral,
    jpeg,
    list_images,
    load_pairs,
    mod_crop,
    read_image,
    train_loader,
    validation_degradation,
    write_png,
)
from sr_lib.errors import UsageError
from sr_lib.models import build_model
from sr_lib.resize import imresize, resize_matrix

ALL = Degradation(blur=(0.5, 2.0), noise=(1.0, 8.0), jpeg=(30, 90))


def smooth(h, w, seed=0):
    """Smooth random content (bicubic-upsampled noise), as a photo at low frequencies."""
    coarse = np.random.default_rng(seed).integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    for i, (h, w) in enumerate([(70, 90), (64, 64), (99, 50)]):
        write_png(folder / f"{i + 1:04d}.png", smooth(h, w, seed=i))
    return folder


def batches_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_blur_of_a_constant_image_is_constant():
    flat = np.full((64, 48, 3), 77, np.uint8)
    for sigma in (0.3, 2.0, 40.0):  # 40: the taps reach past the far side, reflected again
        assert (degrade(flat, 4, blur=sigma) == 77).all()
        assert np.allclose(blur_matrix(48, sigma).sum(1), 1.0)


def test_blur_is_gaussian_with_borders_reflected_without_the_edge_pixel():
    sigma, n = 1.2, 20
    r = math.ceil(3 * sigma)
    g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    g /= g.sum()
    m = blur_matrix(n, sigma)
    assert np.allclose(m[10, 10 - r : 10 + r + 1], g) and m[10, : 10 - r].sum() == 0  # inside
    # row 0: source -d is reflected to +d (numpy "reflect"): tap d counts twice
    assert np.isclose(m[0, 0], g[r]) and np.allclose(m[0, 1 : r + 1], 2 * g[r + 1 :])
    # a blurred impulse's LR: the bicubic of the blurred HR, not the HR's
    hr = np.zeros((32, 32, 3), np.uint8)
    hr[14:18, 14:18] = 255
    assert not np.array_equal(degrade(hr, 4, blur=1.5), degrade(hr, 4))
    # the blur path's downscale (sigma 1e-3: the identity) is imresize's, in float, rounded once
    hr = smooth(64, 48, seed=4)
    once = np.rint(np.clip(imresize(hr.astype(np.float64), 1 / 4), 0, 255))
    assert np.array_equal(degrade(hr, 4, blur=1e-3), once)


def test_a_blur_too_small_to_square_is_no_blur_not_a_black_lr():
    """sigma**2 of 1e-300 is 0: the centre tap was 0 / 0 (NaN) and the LR all zeros."""
    assert np.array_equal(blur_matrix(8, 1e-300), np.eye(8))
    hr = smooth(32, 32)
    tiny = degrade(hr, 2, blur=1e-300)
    assert tiny.max() > 0 and np.array_equal(tiny, degrade(hr, 2, blur=1e-6))


def test_noise_has_the_standard_deviation_asked_for_in_8_bit_levels():
    flat = np.full((256, 256, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    lr = degrade(flat, 2, noise=10.0, rng=rng).astype(np.float64)  # 128x128x3 samples
    assert lr.std() == pytest.approx(10.0, abs=0.25) and lr.mean() == pytest.approx(128, abs=0.2)
    assert (degrade(flat, 2) == 128).all()  # the noise, not the resize, spreads it


def test_jpeg_is_pillows_own_encode_and_decode_at_its_default_4_2_0():
    hr = smooth(96, 80, seed=3)
    clean = imresize(hr, 1 / 2)
    assert np.array_equal(degrade(hr, 2), clean)  # no blur: the bicubic LR of the plain pairs
    for quality in (30, 95, 100):
        buf = io.BytesIO()
        Image.fromarray(clean).save(buf, format="JPEG", quality=quality)  # Pillow's defaults
        assert JpegImagePlugin.get_sampling(Image.open(buf)) == 2  # 4:2:0
        pillow = np.asarray(Image.open(buf).convert("RGB"))
        ours = degrade(hr, 2, quality=quality)
        assert np.array_equal(ours, pillow) and np.array_equal(jpeg(clean, quality), pillow)
        assert not np.array_equal(ours, clean)


def test_a_jpeg_lr_is_writable_and_validation_says_no_torch_warning(hr_dir, tmp_path):
    """A JPEG LR was numpy's read-only view of Pillow's bytes: validation's torch.from_numpy of
    it printed torch's "The given NumPy array is not writable ..." as a warning of the run."""
    assert jpeg(smooth(16, 16), 50).flags.writeable
    assert degrade(smooth(16, 16), 2, quality=50).flags.writeable
    pairs = load_pairs(hr_dir, 4, crop=32, degradation=Degradation(jpeg=(50, 50)))
    assert all(lr.flags.writeable for _, _, lr in pairs)
    args = sr_train.TrainArgs(model="bicubic", scale=4, lr_jpeg="50", val_n=1)
    progress = types.SimpleNamespace(message=lambda _: None)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model = build_model("bicubic", {"scale": 4})
        sr_train.validate(model, pairs, args, torch.device("cpu"), tmp_path, 1, None, progress)
    assert not [str(w.message) for w in said if "writable" in str(w.message)]


def test_draws_are_within_their_ranges_and_a_single_value_is_that_value():
    draws = np.array(ALL.draw(np.random.default_rng(0), 2000), dtype=np.float64)
    for column, (lo, hi) in zip(draws.T, (ALL.blur, ALL.noise, ALL.jpeg)):
        assert lo <= column.min() < lo + 0.05 * (hi - lo)  # uniform over the whole range
        assert hi - 0.05 * (hi - lo) < column.max() <= hi
    assert {30, 90} <= set(draws[:, 2].astype(int))  # both ends of the quality range
    fixed = Degradation(blur=(1.5, 1.5), jpeg=(75, 75)).draw(np.random.default_rng(1), 5)
    assert fixed == [(1.5, 0.0, 75)] * 5


def test_without_degradation_the_pairs_are_the_bicubic_pairs_of_before(hr_dir):
    """Unset, or set to sigma 0 without JPEG, the LR is the whole image's MATLAB-bicubic
    downscale cropped (uint8 per pass, as before the flags existed), bit for bit."""
    assert sr_train.degradation(sr_train.TrainArgs()) is None
    assert not Degradation() and not Degradation(blur=(0.0, 0.0), noise=(0.0, 0.0))
    plain = PatchPairs([hr_dir], 4, 8, 6, seed=2)
    zero = PatchPairs([hr_dir], 4, 8, 6, seed=2, degradation=Degradation((0.0, 0.0), (0.0, 0.0)))
    assert zero.degradation is None
    files = list_images(hr_dir)
    for step in (0, 9):
        assert batches_equal(plain[step], zero[step])
        lr, _ = plain.crops(step)
        for b, (i, y, x, t) in enumerate(zip(*plain.plan(step))):
            whole = imresize(mod_crop(read_image(files[i]), 4), 1 / 4)
            assert np.array_equal(
                lr[b].transpose(1, 2, 0), dihedral(whole[y : y + 8, x : x + 8], t)
            )


def test_the_bicubic_pairs_are_pinned_bit_for_bit(tmp_path):
    """sha256 over six steps' uint8 (LR, HR) batches without a degradation, pinned (measured on
    the code before the blur was made banded): a change to the degradations' code that moved
    the plain pairs, or their crops, fails here. Images made with numpy alone (Pillow's resize
    may change between versions); PNG is lossless."""
    for i, (h, w) in enumerate([(70, 90), (64, 64), (99, 50)]):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.int16)
        img = np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:h, :w] + rng.integers(-6, 7, (h, w, 3))
        write_png(tmp_path / f"{i}.png", np.clip(img, 0, 255).astype(np.uint8))
    ds = PatchPairs([tmp_path], 4, 8, 4, seed=11)
    sha = hashlib.sha256()
    for step in range(6):
        for x in ds.crops(step):
            sha.update(x.tobytes())
    assert sha.hexdigest() == "545410a49d51c4607900b90cc212a20009aa2bce3ee100eca1e41cbe7d5f2d9c"


def test_a_sigma_of_zero_is_unset_beside_jpeg_too(hr_dir, capsys):
    """--lr-noise 0 with --lr-jpeg drew a noise sigma per patch first, which moved the JPEG
    qualities: other pairs than --lr-jpeg alone, and a resume adding it said a changed flag."""
    jpeg_only = Degradation(jpeg=(30, 90))
    assert Degradation(blur=(0.0, 0.0), noise=(0.0, 0.0), jpeg=(30, 90)) == jpeg_only
    a = PatchPairs([hr_dir], 4, 8, 4, seed=1, degradation=jpeg_only)
    b = PatchPairs([hr_dir], 4, 8, 4, seed=1, degradation=Degradation((0.0, 0.0), (0.0, 0.0),
                                                                     (30, 90)))  # fmt: skip
    assert all(batches_equal(a[step], b[step]) for step in (0, 5))
    for flag, text in (("--lr-noise", "0"), ("--lr-blur", "0:0")):
        assert degradation_range(text, flag) is None
        args, _, _ = sr_train.parse_all(["--model", "bicubic", flag, text])
        assert getattr(args, flag[2:].replace("-", "_")) == ""  # recorded as unset


def test_degraded_lr_is_made_from_the_hr_and_the_crops_stay(hr_dir):
    plain = PatchPairs([hr_dir], 4, 8, 5, seed=2)
    ds = PatchPairs([hr_dir], 4, 8, 5, seed=2, degradation=ALL)
    lr, hr = ds.crops(3)
    assert np.array_equal(hr, plain.crops(3)[1])  # the same patches, flips and rotations
    assert not np.array_equal(lr, plain.crops(3)[0])
    # the step's generator after the crops: the batch's draws, then the noise fields in order;
    # without a blur, noise and JPEG act on the plain pairs' LR (the whole image's bicubic)
    noisy = Degradation(noise=ALL.noise, jpeg=ALL.jpeg)
    lr = PatchPairs([hr_dir], 4, 8, 5, seed=2, degradation=noisy).crops(3)[0]
    rng, *_ = plain._plan(3)
    draws = noisy.draw(rng, 5)
    for b, before in enumerate(plain.crops(3)[0]):
        want = degrade(hr[b].transpose(1, 2, 0), 4, *draws[b], rng, before.transpose(1, 2, 0))
        assert np.array_equal(lr[b], want.transpose(2, 0, 1))
    lr = PatchPairs([hr_dir], 4, 8, 5, seed=2, degradation=Degradation(jpeg=(40, 40))).crops(3)[0]
    for ours, before in zip(lr, plain.crops(3)[0], strict=True):
        assert np.array_equal(ours.transpose(1, 2, 0), jpeg(before.transpose(1, 2, 0), 40))


def test_a_blurred_patchs_lr_is_the_crop_of_its_whole_images_blurred_lr(hr_dir):
    """The blur reflected the patch's own borders (and the downscale mirrored them): its LR's
    edge pixels were not the image's LR there, a seam of the patch's making. The blur and the
    downscale now read the image around the patch, reflected only at the image's borders."""
    sigma, s, p = 2.5, 4, 8
    ds = PatchPairs([hr_dir], s, p, 12, seed=3, degradation=Degradation(blur=(sigma, sigma)))
    wholes = [mod_crop(read_image(f), s) for f in list_images(hr_dir)]
    for step in (0, 1):
        lr, _ = ds.crops(step)
        for b, (i, y, x, t) in enumerate(zip(*ds.plan(step))):
            whole = degrade(wholes[i], s, blur=sigma)  # (uint8: rounded)
            assert np.array_equal(
                lr[b].transpose(1, 2, 0), dihedral(whole[y : y + p, x : x + p], t)
            )
    exact = blur_downscale(wholes[0], s, sigma)  # (17, 22): patches inside and at each corner
    for y, x in ((5, 7), (0, 0), (17 - p, 22 - p), (0, 22 - p), (17 - p, 3)):
        part = blur_downscale(wholes[0], s, sigma, (y, x, p, p))
        assert np.allclose(part, exact[y : y + p, x : x + p], rtol=0, atol=1e-9)


def test_blur_downscale_is_the_blur_and_bicubic_matrices_product():
    """Banded: the same linear map as the dense (n/s, n) @ (n, n) products it replaced."""
    rng = np.random.default_rng(7)
    for h, w, s, sigma in (
        (64, 48, 4, 0.7),
        (36, 60, 3, 2.0),
        (32, 32, 4, 40.0),
        (16, 8, 2, 100.0),
    ):
        hr = rng.integers(0, 256, (h, w, 3), np.uint8)
        rows, cols = (
            resize_matrix(n, n // s, 1 / s, dtype=torch.float64).numpy() @ blur_matrix(n, sigma)
            for n in (h, w)
        )
        dense = np.einsum("ih,jw,hwc->ijc", rows, cols, hr.astype(np.float64))
        assert np.allclose(blur_downscale(hr, s, sigma), dense, rtol=0, atol=1e-9)
        box = (1, 2, h // s - 2, w // s - 3)
        part = dense[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
        assert np.allclose(blur_downscale(hr, s, sigma, box), part, rtol=0, atol=1e-9)


def test_blur_downscale_makes_no_matrix_of_the_image_side():
    """One (n, n) float64 blur matrix per axis: a 4096-pixel strip 16 wide (192 KiB) made 128
    MiB of it (161 MiB of numpy arrays at the peak), 619 MB more at 4096² (docs/benchmarks.md).
    Its memory is now of the order of the image's in float64."""
    hr = np.random.default_rng(0).integers(0, 256, (4096, 16, 3), np.uint8)
    tracemalloc.start()
    try:
        lr = blur_downscale(hr, 4, 2.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lr.shape == (1024, 4, 3) and peak < 4 * hr.size * 8, peak


def test_degraded_batches_do_not_depend_on_workers_or_resume_or_cache(hr_dir, tmp_path):
    ds = PatchPairs([hr_dir], 4, 8, 3, seed=5, degradation=ALL)
    serial = list(train_loader(ds, 2, 6, workers=0))
    parallel = list(train_loader(ds, 2, 6, workers=2))
    resumed = list(train_loader(ds, 4, 6, workers=0))
    assert all(batches_equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert all(batches_equal(a, b) for a, b in zip(serial[2:], resumed, strict=True))
    again = PatchPairs([hr_dir], 4, 8, 3, seed=5, degradation=ALL)
    assert batches_equal(ds[7], again[7]) and not torch.equal(ds[7][0], ds[8][0])
    for other in (dict(seed=6), dict(rank=1)):
        assert not torch.equal(
            ds[7][0], PatchPairs([hr_dir], 4, 8, 3, **other, degradation=ALL)[7][0]
        )
    # --cache: the HR cached as before, the degradation made on the fly (the same pairs)
    cached = PatchPairs([hr_dir], 4, 8, 3, seed=5, degradation=ALL, cache=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.hr.npy"))) == 3
    assert batches_equal(cached[7], ds[7]) and batches_equal(cached[8], ds[8])


def test_validation_lr_is_one_fixed_draw_per_image(hr_dir):
    first = load_pairs(hr_dir, 4, crop=32, degradation=ALL)
    second = load_pairs(hr_dir, 4, crop=32, degradation=ALL)
    plain = load_pairs(hr_dir, 4, crop=32)
    for (_, hr, lr), (_, _, lr2), (_, hr0, bicubic) in zip(first, second, plain, strict=True):
        assert np.array_equal(lr, lr2) and np.array_equal(hr, hr0)
        assert lr.shape == bicubic.shape and not np.array_equal(lr, bicubic)
    # each image its own draw, by its name: one image under two names differs
    hr = first[0][1]
    a, b = (validation_degradation(hr, 4, ALL, stem) for stem in ("a", "b"))
    assert not np.array_equal(a, b) and np.array_equal(a, validation_degradation(hr, 4, ALL, "a"))


def test_validation_lr_psnr_compares_with_the_hr_bicubic_not_the_degraded_input(hr_dir, tmp_path):
    args = sr_train.TrainArgs(model="bicubic", scale=4, lr_jpeg="10", val_n=1)
    pairs = load_pairs(hr_dir, 4, crop=32, degradation=sr_train.degradation(args))
    said = []
    progress = types.SimpleNamespace(message=said.append)
    model = build_model("bicubic", {"scale": 4})
    sr_train.validate(model, pairs, args, torch.device("cpu"), tmp_path, 1, None, progress)
    srs = [model.sample(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255, 1)[0, 0]
           for _, _, lr in pairs]  # fmt: skip
    srs = [np.rint(s.clamp(0, 1).mul(255).permute(1, 2, 0).numpy()).astype(np.uint8) for s in srs]
    clean = np.mean(
        [metrics.lr_psnr(sr, imresize(hr, 1 / 4), 4) for sr, (_, hr, _) in zip(srs, pairs)]
    )
    input_ = np.mean([metrics.lr_psnr(sr, lr, 4) for sr, (_, _, lr) in zip(srs, pairs)])
    assert abs(clean - input_) > 0.01  # (the two measures differ here)
    assert f"val_lrpsnr {clean:.3f}" in said[0]


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--lr-blur", "-1", "sigma must be >= 0"),
        ("--lr-noise", "abc", "must be a sigma >= 0 or a range LO:HI"),
        ("--lr-noise", "nan", "must be finite"),
        ("--lr-blur", "0:inf", "must be finite"),
        # none, which turns a degradation off (a resumed run's too), was not among what it takes
        ("--lr-noise", "abc", "drawn uniformly (e.g. 0.5:3); 0 or none for no noise"),
        ("--lr-blur", "0:inf", "of them; 0 or none for no blur"),
        ("--lr-jpeg", "good", "drawn uniformly (e.g. 30:95); none for no JPEG"),
        ("--lr-blur", "3:1", "LO 3 is above HI 1"),
        ("--lr-blur", "1:2:3", "or a range LO:HI"),
        ("--lr-blur", "0.5:1e12", "sigma must be <= 100 HR pixels"),
        ("--lr-noise", "0:300", "sigma must be <= 255 8-bit levels"),
        ("--lr-noise", "1e300", "sigma must be <= 255 8-bit levels"),
        ("--lr-jpeg", "0", "whole number 1..100"),
        ("--lr-jpeg", "101", "whole number 1..100"),
        ("--lr-jpeg", "50.5", "whole number 1..100"),
        ("--lr-jpeg", "90:30", "LO 90 is above HI 30"),
    ],
)
def test_a_bad_degradation_value_is_one_line_exit_2(flag, value, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "bicubic", "--out", str(tmp_path / "o"), f"{flag}={value}"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"sr_train.py: error: {flag} {value}: ") and says in err[0], err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError):
        degradation_range(value, flag)


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--lr-blur", "abc", "must be a sigma >= 0 or a range LO:HI of them, drawn uniformly (e.g. "
         "0.5:3); 0 or none for no blur"),
        ("--lr-jpeg", "90:30", "LO 90 is above HI 30; give 30:90"),
    ],
)  # fmt: skip
def test_a_bad_degradation_line_is_true_of_sampling_too(flag, value, says, capsys, tmp_path):
    """sr_sample.py draws once per image, where the line said "drawn uniformly per patch"; a range
    the wrong way round was told "give LO:HI", as it was given."""
    argv = ["--ckpt", "c.pt", "--input", str(tmp_path), "--from-hr", f"{flag}={value}"]
    with pytest.raises(SystemExit) as e:
        sr_sample.main([*argv, "--out", str(tmp_path / "o")])
    line = f"sr_sample.py: error: {flag} {value}: {says}\n"
    assert (e.value.code, capsys.readouterr().err) == (2, line)


def test_degradation_with_lr_data_is_refused(hr_dir, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "bicubic", "--data", str(hr_dir), "--lr-data", str(hr_dir),
                       "--lr-noise", "2", "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "--lr-noise: makes the LR from the HR, but --lr-data gives the LR images" in err[0]


def run(out, images, *extra):
    argv = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--data", str(images),
            "--scale", "2", "--patch", "8", "--batch", "2", "--workers", "0", "--val-every", "0",
            "--log-every", "1", "--out", str(out), *extra]  # fmt: skip
    return sr_train.main(argv)


def test_the_flags_are_recorded_and_a_resume_continues_exactly(hr_dir, tmp_path, capsys):
    flags = ["--lr-blur", "0.5:1.5", "--lr-noise", "2", "--lr-jpeg", "60:90"]
    assert run(tmp_path / "a", hr_dir, *flags, "--steps", "4") == 0
    assert run(tmp_path / "b", hr_dir, *flags, "--steps", "2") == 0
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    said = {k: ck["train_args"][k] for k in sr_train.DEGRADATION_FLAGS}
    assert said == {"lr_blur": "0.5:1.5", "lr_noise": "2.0", "lr_jpeg": "60:90"}
    resume = ["--resume", "auto", "--out", str(tmp_path / "b")]
    assert sr_train.main([*resume, "--steps", "4"]) == 0  # the flags from the checkpoint
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in Path(tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    plain = tmp_path / "plain"
    assert run(plain, hr_dir, "--steps", "1") == 0  # other LR: another first loss
    first = [json.loads(x) for x in (plain / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if r.get("step") == 1] != [
        r["loss"] for r in first if r.get("step") == 1
    ]
    capsys.readouterr()
    assert sr_train.main([*resume, "--steps", "5", "--lr-jpeg", "75"]) == 0  # as other flags
    assert "--lr-jpeg 75 (was 60:90)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sr_train.main([*resume, "--steps", "6", "--lr-data", str(hr_dir)])
    assert e.value.code == 2 and "but --lr-data gives the LR images" in capsys.readouterr().err


def test_a_resume_with_other_degradation_does_not_keep_the_old_best_psnr(hr_dir, tmp_path, capsys):
    """Its validation LR is another input: the checkpoint's best PSNR does not compare."""
    flags = ["--val-data", str(hr_dir), "--val-every", "2", "--val-images", "1", "--lr-noise", "2"]
    assert run(tmp_path, hr_dir, *flags, "--steps", "2") == 0
    best = load_checkpoint(tmp_path / "best.pt")["best"]
    capsys.readouterr()
    assert run(tmp_path, hr_dir, *flags[:-1], "4", "--steps", "4", "--resume", "auto") == 0
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("best.pt:")]
    assert said == [f"best.pt: the best PSNR so far ({best:.3f}) was validated with other "
                    "--lr-noise; it is not compared with this run's, whose next validation "
                    "writes best.pt"]  # fmt: skip
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 4


def test_a_checkpoint_from_before_the_flags_ran_without_them(hr_dir, tmp_path, capsys):
    """A run saved before these flags existed had the bicubic pairs: a resume given one says it
    among the changed flags and does not keep the old best PSNR (its LR inputs differ)."""
    flags = ["--val-data", str(hr_dir), "--val-every", "2", "--val-images", "1"]
    assert run(tmp_path, hr_dir, *flags, "--steps", "2") == 0
    for name in ("last.pt", "best.pt"):
        ck = load_checkpoint(tmp_path / name)
        for k in sr_train.DEGRADATION_FLAGS:
            del ck["train_args"][k]
        save_checkpoint(tmp_path / name, ck)
    capsys.readouterr()
    assert run(tmp_path, hr_dir, *flags, "--steps", "4", "--lr-jpeg", "50", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "changed flags: --lr-jpeg 50 (was unset)" in out
    assert "was validated with other --lr-jpeg; it is not compared" in out
    assert load_checkpoint(tmp_path / "last.pt")["train_args"]["lr_jpeg"] == "50"


def test_a_resume_given_none_drops_the_checkpoints_degradation(hr_dir, tmp_path, capsys):
    """A resumed run takes its checkpoint's --lr-jpeg where not given, and JPEG has no quality
    that means none: --lr-jpeg "" did, until "" was refused (an unset variable); now none."""
    assert run(tmp_path, hr_dir, "--steps", "2", "--lr-jpeg", "50", "--lr-noise", "2") == 0
    capsys.readouterr()
    flags = ["--steps", "4", "--resume", "auto", "--lr-jpeg", "none", "--lr-noise", "none"]
    assert run(tmp_path, hr_dir, *flags) == 0
    assert "--lr-jpeg unset (was 50)" in capsys.readouterr().out
    train_args = load_checkpoint(tmp_path / "last.pt")["train_args"]
    assert (train_args["lr_jpeg"], train_args["lr_noise"]) == ("", "")  # recorded as unset
    assert degradation_range("none", "--lr-blur") is None


@pytest.mark.parametrize(
    "model, flags, says",
    [
        ("vspsr", ["--lambda-per", "0"], "--lr-noise with the CEM on samples"),
        ("vspsr", ["--lambda-per", "0", "--cem-train"], "--lr-noise with --cem-train and the CEM"),
        ("vspsr", ["--lambda-per", "0", "--no-cem-test"], None),
        ("refvae", ["--lambda-lr", "100"], "--lr-noise with --lambda-lr:"),
        ("refvae", [], None),
        ("edsr", [], None),
    ],
)
def test_a_degraded_lr_with_an_lr_consistency_is_one_warning(model, flags, says, tmp_path):
    """The CEM and RefVAE's L1 to the LR input make each SR's bicubic downscale match the input,
    which a degraded input is not: the run trains as asked, with one warning line saying so."""
    argv = ["--model", model, "--scale", "4", "--data", "demo", "--steps", "0", "--workers", "0",
            "--val-every", "0", "--lr-noise", "5", *flags,
            "--out", str(tmp_path / "run")]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:  # (pytest's own capture or none)
        warnings.simplefilter("always")
        assert sr_train.main(argv) == 0
    lines = [str(w.message) for w in caught if "LR = bicubic(HR)" in str(w.message)]
    assert len(lines) == (says is not None)
    if says:
        assert lines[0].startswith(says)


def test_sample_from_hr_degrades_the_lr_as_training_validation(tmp_path, capsys):
    """sr_sample.py --from-hr with --lr-blur/--lr-noise/--lr-jpeg: each HR input's LR is its
    mod-crop degraded as sr_train.py's validation LR (one draw seeded by the stem), written to
    OUT/lr/; without --from-hr the flags are refused; a rerun with other values is refused, and
    a folder of an srspace before these flags (no such key in its manifest) continues."""
    import sr_sample

    ckpt = tmp_path / "bicubic"
    assert sr_train.main(["--model", "bicubic", "--steps", "0", "--val-every", "0",
                          "--out", str(ckpt)]) == 0  # fmt: skip
    hr = {"cat": smooth(37, 45, seed=1), "cat 2": smooth(40, 32, seed=2)}
    inp = tmp_path / "hr"
    inp.mkdir()
    for stem, img in hr.items():
        write_png(inp / f"{stem}.png", img)
    out = tmp_path / "out"
    argv = ["--ckpt", str(ckpt / "last.pt"), "--input", str(inp), "--from-hr", "--n", "1",
            "--lr-noise", "3", "--lr-jpeg", "40:60", "--out", str(out)]  # fmt: skip
    assert sr_sample.main(argv) == 0
    deg = Degradation(noise=(3.0, 3.0), jpeg=(40, 60))
    for stem, img in hr.items():
        want = validation_degradation(mod_crop(img, 8), 4, deg, stem)
        got = read_image(out / "lr" / f"{stem}.png")
        assert np.array_equal(got, want), stem
        assert not np.array_equal(got, imresize(mod_crop(img, 8), 1 / 4))
    flags = json.loads((out / "manifest.json").read_text())["flags"]
    assert (flags["lr_noise"], flags["lr_jpeg"], flags["lr_blur"]) == ("3.0", "40:60", "")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sr_sample.main([*argv[:-2], "--lr-noise", "4", "--out", str(out)])
    assert e.value.code == 2 and "--lr-noise" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["--ckpt", str(ckpt / "last.pt"), "--input", str(inp), "--lr-jpeg", "50",
                        "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.endswith(
        "--lr-jpeg: degrades the LR made from HR inputs; "
        "give --from-hr (the inputs are LR images already)"
    )
    plain = tmp_path / "plain"  # an older srspace's folder: no degradation keys in its flags
    base = ["--ckpt", str(ckpt / "last.pt"), "--input", str(inp), "--from-hr", "--n", "1"]
    assert sr_sample.main([*base, "--out", str(plain)]) == 0
    manifest = json.loads((plain / "manifest.json").read_text())
    for k in ("lr_blur", "lr_noise", "lr_jpeg"):
        del manifest["flags"][k]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    assert sr_sample.main([*base, "--out", str(plain)]) == 0


def test_sampling_with_a_cem_on_degraded_lr_is_one_warning(tmp_path, capsys):
    """sr_sample.py: VSpSR's CEM on its samples (or --cem) makes each sample's downscale match
    the LR input; where that LR is degraded (--from-hr with --lr-*, or a model trained on
    degraded LR), one warning line says so; bicubic LR and no projection: none."""
    import sr_sample

    bicubic, vspsr = tmp_path / "bicubic", tmp_path / "vspsr"
    assert sr_train.main(["--model", "bicubic", "--steps", "0", "--val-every", "0",
                          "--out", str(bicubic)]) == 0  # fmt: skip
    assert sr_train.main(["--model", "vspsr", "--scale", "4", "--data", "demo", "--steps", "0",
                          "--workers", "0", "--val-every", "0", "--lambda-per", "0",
                          "--lr-noise", "5", "--n-basis", "8",
                          "--out", str(vspsr)]) == 0  # fmt: skip
    inp = tmp_path / "in"
    inp.mkdir()
    write_png(inp / "cat.png", smooth(32, 32))
    said = "LR = bicubic(HR)"

    def warned(ckpt, *flags):
        capsys.readouterr()
        argv = [
            "--ckpt",
            str(ckpt / "last.pt"),
            "--input",
            str(inp),
            "--n",
            "1",
            *flags,
            "--out",
            str(tmp_path / "out" / f"{ckpt.name}{len(list(tmp_path.glob('out/*')))}"),
        ]
        assert sr_sample.main(argv) == 0
        return [line for line in capsys.readouterr().err.splitlines() if said in line]

    (line,) = warned(bicubic, "--from-hr", "--lr-noise", "3", "--cem")
    assert line.startswith("sr_sample.py: warning: --cem, LR made with --lr-noise 3.0: each ")
    assert warned(bicubic, "--from-hr", "--lr-noise", "3") == []
    assert warned(bicubic, "--from-hr", "--cem") == []
    (line,) = warned(vspsr)
    assert line.startswith(
        "sr_sample.py: warning: the CEM on its samples (trained without "
        "--no-cem-test), trained on LR made with --lr-noise 5.0: "
    )


def test_sample_from_a_gray_hr_adds_gray_noise(tmp_path):
    """A gray HR's LR stays gray under --lr-noise: one noise field for the three channels the
    model sees, so OUT/lr/NAME.png (written gray) is the LR it was given. Noise per channel
    made it colour (a channel spread of ~5 levels at sigma 5), and the gray file written was
    not what the model saw."""
    import sr_sample

    ckpt = tmp_path / "bicubic"
    assert sr_train.main(["--model", "bicubic", "--steps", "0", "--val-every", "0",
                          "--out", str(ckpt)]) == 0  # fmt: skip
    inp = tmp_path / "hr"
    inp.mkdir()
    gray = smooth(40, 48)[..., 0]
    Image.fromarray(gray).save(inp / "g.png")  # (mode L)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    write_png(inp / "rgb.png", rgb)  # a gray picture in an RGB file: as training's, gray too
    argv = ["--ckpt", str(ckpt / "last.pt"), "--input", str(inp), "--from-hr", "--n", "1",
            "--lr-noise", "5", "--out", str(tmp_path / "out")]  # fmt: skip
    assert sr_sample.main(argv) == 0
    noise = Degradation(noise=(5.0, 5.0))
    seen = validation_degradation(rgb, 4, noise, "g", gray=True)
    assert (seen == seen[..., :1]).all()  # the three channels equal
    written = np.asarray(Image.open(tmp_path / "out" / "lr" / "g.png"))
    assert written.ndim == 2 and np.array_equal(written, seen[..., 0])
    assert np.abs(seen[..., 0].astype(int) - imresize(gray, 1 / 4).astype(int)).std() > 2
    written = read_image(tmp_path / "out" / "lr" / "rgb.png")
    assert np.array_equal(written, validation_degradation(rgb, 4, noise, "rgb", gray=True))
    (stem, _, val_lr), *_ = load_pairs(inp, 4, degradation=noise)  # sr_train.py's validation LR
    assert stem == "g" and np.array_equal(val_lr, seen)


def test_a_gray_training_image_gets_one_noise_field_and_stays_gray(tmp_path):
    """Training read a gray image as RGB and drew noise per channel: its LR patches were colour
    (channels up to 20 levels apart at sigma 5), unlike sr_sample.py's and the image. A patch
    whose channels are equal now gets one noise field; a colour image's, one per channel."""
    Image.fromarray(smooth(64, 64, seed=5)[..., 0]).save(tmp_path / "gray.png")  # (mode L)
    noise = Degradation(noise=(5.0, 5.0), jpeg=(90, 90))
    ds = PatchPairs([tmp_path], 4, 8, 4, seed=0, degradation=noise)
    for step in (0, 1):
        lr, hr = ds.crops(step)
        assert (hr == hr[:, :1]).all() and (lr == lr[:, :1]).all()
        plain = PatchPairs([tmp_path], 4, 8, 4, seed=0).crops(step)[0]
        assert np.abs(lr.astype(int) - plain).std() > 2  # (noise there is)
    colour = tmp_path / "colour"
    write_png(colour / "c.png", smooth(64, 64, seed=5))
    lr, _ = PatchPairs([colour], 4, 8, 4, seed=0, degradation=Degradation(noise=(5.0, 5.0))).crops(
        0
    )
    assert (np.ptp(lr.astype(int), axis=1) > 4).mean() > 0.1
