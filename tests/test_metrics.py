"""sr_lib.metrics against known values and independent, straightforward implementations.

LPIPS tests use a seeded random-weight trunk (nothing is downloaded); such numbers only check that
two implementations agree, they are not real LPIPS values.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sr_lib import metrics as M
from sr_lib.data import mod_crop
from sr_lib.errors import DataError
from sr_lib.lpips_net import alex_tap_values, lpips_module
from sr_lib.resize import imresize
from sr_lib.weights import sha256_file


def rand_img(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def noisy(img, sigma, seed):
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


def smooth_img(h=48, w=64, seed=0):
    """A natural-ish image: upsampled random LR, so LPIPS/LR-PSNR values are in a sane range."""
    return imresize(rand_img(-(-h // 4), -(-w // 4), seed), 4)[:h, :w]


def random_lpips():
    torch.manual_seed(0)
    return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, spatial=True, verbose=False)


def to_lpips_input(img):  # as measure.py: uint8 -> [0, 1] -> [-1, 1], NCHW, batch 1
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 * 2 - 1


# ----------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_inf():
    img = rand_img()
    assert M.psnr(img, img) == math.inf


def test_psnr_known_mse():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a + 10  # MSE = 100 -> 10 log10(255^2 / 100)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    c = a.copy()
    c[0, 0, 0] = 255  # MSE = 255^2 / 192 -> 10 log10(192)
    assert M.psnr(a, c) == pytest.approx(10 * math.log10(192), abs=1e-12)


def test_psnr_matches_skimage_and_rejects_shape_mismatch():
    a, b = rand_img(seed=1), rand_img(seed=2)
    assert M.psnr(a, b) == peak_signal_noise_ratio(a, b)
    with pytest.raises(ValueError):
        M.psnr(a, b[:40])


def test_psnr_of_float_images_needs_their_peak_and_takes_tensors():
    """A model's sample() gives float tensors in [0, 1]: with a default peak of 255 they read
    48 dB too high, silently (and a tensor gave an AttributeError). uint8 alone has a default."""
    a, b = rand_img(seed=1), rand_img(seed=2)
    want = M.psnr(a, b)
    fa, fb = (torch.from_numpy(x).permute(2, 0, 1).float() / 255 for x in (a, b))  # (3, H, W)
    assert M.psnr(fa, fb, peak=1.0) == pytest.approx(want, abs=1e-5)  # (float32 values)
    assert M.psnr(torch.from_numpy(a), torch.from_numpy(b)) == want  # uint8 tensors: 255
    for x, y in ((fa, fb), (a, b.astype(np.float64))):
        with pytest.raises(ValueError, match=r"need peak= \(1.0 for values in \[0, 1\]"):
            M.psnr(x, y)


def test_lr_psnr_uses_uint8_imresize_of_the_mod8_crop():
    gt = smooth_img(53, 70, seed=3)  # not a multiple of 8: crop to 48 x 64
    sr = noisy(np.pad(gt, ((0, 2), (0, 1), (0, 0)), mode="edge"), 3, seed=4)  # larger SR
    row = M.evaluate_image(gt, [sr], 4, ntire=True, warn=pytest.fail)
    gt8, sr8 = gt[:48, :64], sr[:48, :64]
    d_gt, d_sr = imresize(gt8, 1 / 4), imresize(sr8, 1 / 4)
    assert d_gt.dtype == np.uint8 and d_gt.shape == (12, 16, 3)
    mse = np.mean((d_sr.astype(np.float64) - d_gt) ** 2)
    assert row["LRPSNR_mean"] == row["LRPSNR_worst"] == 10 * np.log10(255**2 / mse)
    assert row["LRPSNR_mean"] == peak_signal_noise_ratio(d_gt, d_sr)
    # a float (unrounded) pipeline would differ: the uint8 rounding is part of the metric
    f_gt, f_sr = imresize(gt8.astype(np.float64), 1 / 4), imresize(sr8.astype(np.float64), 1 / 4)
    assert 10 * np.log10(255**2 / np.mean((f_sr - f_gt) ** 2)) != row["LRPSNR_mean"]


def test_lr_psnr_inf_when_downscales_match():
    gt = smooth_img(seed=5)
    row = M.evaluate_image(gt, [gt, noisy(gt, 5, 6)], 4, ntire=True)
    assert row["LRPSNR_worst"] < 60 and math.isinf(row["LRPSNR_mean"])


# ----------------------------------------------------------------------------- crops


def test_gt_mod8_crop_even_at_x4_and_larger_sr_is_cropped():
    gt = smooth_img(52, 68, seed=7)  # multiple of 4 but not of 8: official crop is 48 x 64
    sr = noisy(gt, 4, seed=8)
    row = M.evaluate_image(gt, [sr], 4, ntire=True)
    expect = M.psnr(imresize(sr[:48, :64], 1 / 4), imresize(gt[:48, :64], 1 / 4))
    assert row["LRPSNR_mean"] == expect
    assert mod_crop(gt, 8).shape == (48, 64, 3)
    big = np.pad(sr, ((0, 20), (0, 0), (0, 0)))  # 20 px taller than the GT: warning, same value
    warned = []
    assert M.evaluate_image(gt, [big], 4, ntire=True, warn=warned.append) == row
    assert len(warned) == 1 and "larger" in warned[0]


def test_sr_smaller_than_crop_is_an_error_naming_the_file():
    gt = smooth_img(seed=9)
    with pytest.raises(DataError, match="x/000000_sample00001.png"):
        M.evaluate_image(gt, [gt, gt[:40]], 4, names=["x/a.png", "x/000000_sample00001.png"])


def test_generic_mode_extras_use_scale_crop_and_shave():
    gt = smooth_img(50, 66, seed=10)
    sr = noisy(gt, 6, seed=11)
    row = M.evaluate_image(gt, [sr, gt], 2, shave=3)
    g, s = gt[3:47, 3:63], sr[3:47, 3:63]  # 50x66 is a multiple of 2; shave 3 px per border
    assert row["PSNR_best"] == math.inf
    assert row["PSNR_mean"] == math.inf
    assert row["SSIM_mean"] == pytest.approx((M.ssim(s, g) + 1) / 2, abs=1e-12)
    row1 = M.evaluate_image(gt, [sr], 2, shave=3, color="y")
    assert row1["PSNR_mean"] == pytest.approx(M.psnr(M.rgb2y(s), M.rgb2y(g), peak=255.0), abs=1e-12)


def test_generic_mode_accepts_sr_of_the_ntire_crop_size():
    gt = smooth_img(52, 68, seed=14)  # x4 "modcrop" is 52 x 68, the NTIRE crop 48 x 64
    sr = noisy(gt[:48, :64], 5, seed=15)  # what a method given the mod-8 LR returns
    row = M.evaluate_image(gt, [sr], 4)
    assert row["PSNR_mean"] == M.psnr(sr[4:44, 4:60], gt[4:44, 4:60])  # common region, shave 4


def test_x3_official_crop_is_a_multiple_of_24():
    assert [M.official_mod(s) for s in (2, 3, 4, 8)] == [8, 24, 8, 8]
    gt = smooth_img(51, 66, seed=16)
    sr = noisy(gt, 4, seed=17)  # the usual x3 SR: 3 x the LR of the mod-3 crop
    row = M.evaluate_image(gt, [sr], 3)
    expect = M.psnr(imresize(sr[:48, :48], 1 / 3), imresize(gt[:48, :48], 1 / 3))
    assert row["LRPSNR_mean"] == expect
    assert row["PSNR_mean"] == M.psnr(sr[3:48, 3:63], gt[3:48, 3:63])


# ----------------------------------------------------------------------------- SSIM, Y


def test_rgb2y_known_values():
    img = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8)
    y = M.rgb2y(img)
    assert y[0, 0] == pytest.approx(235.0, abs=1e-12)
    assert y[0, 1] == pytest.approx(16.0, abs=1e-12)
    assert y[0, 2] == pytest.approx(16 + 65.481, abs=1e-12)


def test_ssim_identical_is_one():
    img = rand_img()
    assert M.ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def ssim_loops(a, b):
    """Straight from Wang et al. 2004: every valid 11x11 window, Gaussian-weighted statistics."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return np.mean(vals)


def test_ssim_matches_straightforward_and_skimage():
    a = smooth_img(24, 28, seed=12)
    b = noisy(a, 10, seed=13)
    ours = M.ssim(a, b)
    per_channel = np.mean([ssim_loops(a[..., c], b[..., c]) for c in range(3)])
    assert ours == pytest.approx(per_channel, abs=1e-10)
    sk = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
        channel_axis=2,
    )  # fmt: skip
    assert ours == pytest.approx(sk, abs=1e-10)
    ya, yb = M.rgb2y(a), M.rgb2y(b)
    assert M.ssim(ya, yb) == pytest.approx(ssim_loops(ya, yb), abs=1e-10)


def test_ssim_hand_checkable_constant_images():
    # constant images: mu = a, b; variances 0 -> SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = np.full((16, 16), 100.0), np.full((16, 16), 120.0)
    c1 = (0.01 * 255) ** 2
    assert M.ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), abs=1e-12)


def whole_image_metrics(a, b):
    """PSNR, SSIM and MATLAB Y as computed before `metrics.bands`: each map of the whole image
    at once (the same operations per value, so the same floats to the bit are expected)."""
    f, c1, c2 = M._filter_valid, (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, dtype=np.float64)
    x, y = M._chw64(a), M._chw64(b)
    mu_x, mu_y = f(x), f(y)
    num = (mu_x * (2 * mu_y) + c1) * ((f(x * y) - mu_x * mu_y) * 2 + c2)
    den = (f(x * x) - mu_x**2 + (f(y**2) - mu_y**2 + c2)) * (mu_x**2 + (mu_y**2 + c1))
    psnr = math.inf if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    if a.ndim == 2:
        return psnr, float(np.mean(num / den))
    rgb = a.astype(np.float64)
    luma = 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0
    return psnr, float(np.mean(num / den)), luma


@pytest.mark.parametrize("band_values", [1, 500, 7001, M.BAND_VALUES])
def test_banded_metrics_equal_whole_image_bitwise(monkeypatch, band_values):
    # bands of one row (+ the window's 10), of a few rows, and the default (one band here)
    monkeypatch.setattr(M, "BAND_VALUES", band_values)
    rng = np.random.default_rng(band_values)
    for h, w in [(37, 53), (61, 29), (101, 23), (11, 11)]:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        b = noisy(a, 20, seed=h)
        psnr, ssim, luma = whole_image_metrics(a, b)
        assert (M.psnr(a, b, peak=255.0), M.SsimReference(b)(a)) == (psnr, ssim)
        assert np.array_equal(M.rgb2y(a), luma)
        ya, yb = M.rgb2y(a), rng.uniform(0, 255, (h, w))  # float (H, W): the --color y path
        assert (M.psnr(ya, yb, peak=255.0), M.ssim(ya, yb)) == whole_image_metrics(ya, yb)


def test_ssim_and_psnr_memory_is_a_few_maps_not_a_dozen(monkeypatch):
    # Scoring one sample held ~13 float64 copies of the image (11 here; 2.9 GB for a 3072x3072
    # RGB sample): now the reference's two maps, the SSIM map and PSNR's squared differences
    # (3 copies at most) plus a band's temporaries (small: bands of 4096 values here).
    import tracemalloc  # numpy reports its arrays to it

    monkeypatch.setattr(M, "BAND_VALUES", 4096)
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 256, (203, 197, 3), dtype=np.uint8)
    samples = [noisy(gt, 10, seed=i) for i in range(2)]
    copy = gt.size * 8  # bytes of one float64 copy of the image
    for color, most in [("rgb", 3), ("y", 2)]:  # (before: 11.1 and 3.7 copies)
        tracemalloc.start()
        try:
            M.evaluate_image(gt, samples, 4, color=color)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < most * copy, (color, peak / copy)


def test_lpips_ground_truth_features_are_freed_before_ssim(monkeypatch):
    # evaluate_image held the GT's LPIPS features (~60 bytes a pixel on a CPU) while PSNR and
    # SSIM computed: at 2048x2048, LPIPS on the CPU, 839 MB at its peak; 693 MB once freed.
    import weakref

    features, alive = [], []
    reference, ssim_reference = M.LpipsMetric.reference, M.SsimReference.__init__

    def keep_track(self, gt):
        ref = reference(self, gt)
        features.extend(weakref.ref(t) for t in ref)
        return ref

    def check(self, img):
        alive.append(sum(f() is not None for f in features))
        ssim_reference(self, img)

    monkeypatch.setattr(M.LpipsMetric, "reference", keep_track)
    monkeypatch.setattr(M.SsimReference, "__init__", check)
    torch.manual_seed(0)
    metric = M.LpipsMetric(lpips_module())
    gt = smooth_img(48, 64, seed=3)
    M.evaluate_image(gt, [noisy(gt, 8, seed=i) for i in range(2)], 4, lpips_metric=metric)
    assert len(features) == 5 and alive == [0]  # 5 trunk taps, none left when SSIM starts


# ----------------------------------------------------------------------------- diversity score


def test_diversity_score_hand_made_maps():
    maps = np.array(
        [[[1.0, 3.0], [2.0, 2.0]], [[3.0, 1.0], [2.0, 2.0]], [[2.0, 2.0], [4.0, 4.0]]], np.float32
    )
    # means 2, 2, 3 -> global best 2; per-pixel min [[1, 1], [2, 2]] -> local best 1.5
    assert M.diversity_score(maps) == pytest.approx((2 - 1.5) / 2 * 100)
    assert M.diversity_score(np.repeat(maps[:1], 4, axis=0)) == 0.0  # identical samples


def test_diversity_streaming_equals_stacked():
    maps = torch.rand(7, 9, 11)
    acc = M.DiversityAccumulator()
    for i in range(0, 7, 3):
        acc.update(maps[i : i + 3])
    g = maps.mean(dim=(1, 2)).min()
    l = maps.min(dim=0).values.mean()
    assert acc.score == pytest.approx(float((g - l) / g * 100), abs=1e-4)
    assert acc.lpips_mean == pytest.approx(float(maps.mean(dim=(1, 2)).mean()), rel=1e-6)
    assert acc.means == [float(m.mean()) for m in maps]  # each map's own float32 mean, exactly
    assert torch.equal(acc.min_map, maps.amin(dim=0))


def test_dataset_score_is_mean_of_ratios():
    img1 = np.array([[[1.0, 3.0]], [[3.0, 1.0]]])  # G = 2, L = 1 -> 50
    img2 = np.array([[[10.0, 10.0]], [[10.0, 12.0]]])  # G = 10, L = 10 -> 0
    s1, s2 = M.diversity_score(img1), M.diversity_score(img2)
    assert (s1, s2) == (50.0, 0.0)
    mean_of_ratios = M.dataset_mean([s1, s2])
    ratio_of_means = ((2 + 10) / 2 - (1 + 10) / 2) / ((2 + 10) / 2) * 100
    assert mean_of_ratios == 25.0 and ratio_of_means == pytest.approx(100 / 12)
    assert mean_of_ratios != pytest.approx(ratio_of_means)


def test_dataset_mean_keeps_inf_and_skips_missing():
    assert M.dataset_mean([40.0, math.inf]) == math.inf
    assert M.dataset_mean([40.0, math.nan, 42.0]) == 41.0  # pandas skipna, as the reference
    assert M.dataset_mean([None, None]) is None


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_pair():
    ref = random_lpips()
    ours = M.LpipsMetric(lpips_module())
    ours.net.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("batch", [1, 3])
def test_batched_lpips_equals_the_lpips_module(lpips_pair, batch):
    ref, ours = lpips_pair
    ours.batch = batch
    gt = smooth_img(64, 96, seed=20)
    # batch 1 runs the very same kernels as the module (equal in practice); batches > 1 differ
    # at float-rounding level, amplified where the sample is very close to the GT
    sigmas = (2, 5, 9, 14, 20) if batch == 1 else (5, 9, 14, 20, 30)
    samples = [noisy(gt, s, seed=21 + s) for s in sigmas]  # 5 samples: an uneven last chunk
    maps = ours.maps(samples, gt)
    assert maps.shape == (5, 64, 96) and maps.dtype == torch.float32
    with torch.no_grad():
        expect = torch.cat([ref(to_lpips_input(s), to_lpips_input(gt))[0] for s in samples])
    if batch == 1:  # the same kernels, op for op: bit for bit
        assert torch.equal(maps, expect)
    for m, e in zip(maps, expect):
        assert float(m.mean()) == pytest.approx(float(e.mean()), rel=1e-6)
        assert torch.allclose(m, e, rtol=1e-4, atol=1e-6 * float(e.abs().max()))
    # through evaluate_image: LPIPS_mean and the score of the stacked reference maps
    row = M.evaluate_image(gt, samples, 4, lpips_metric=ours, ntire=True)
    g = [float(e.mean()) for e in expect]
    local = float(expect.min(dim=0).values.mean())
    assert row["LPIPS_mean"] == pytest.approx(np.mean(g), rel=1e-6)
    assert row["score"] == pytest.approx((min(g) - local) / min(g) * 100, abs=1e-4)
    assert list(row) == list(M.OFFICIAL_COLUMNS)


@pytest.mark.parametrize(
    "hw, plan", [((200, 300), [True] * 5), ((120, 160), [True, True, False, True, False])]
)
def test_lpips_in_onednn_layout_equals_the_lpips_module(lpips_pair, monkeypatch, hw, plan):
    """Where torch runs a trunk convolution with oneDNN, the activations stay in its blocked
    layout and the ReLU after it is applied by the convolution itself (`_conv_relu`); where it
    does not (small inputs), they go back to the module's layout. Both sizes: the maps equal the
    module's to the bit, as with the module's layout throughout and with the ReLU on its own."""
    ref, ours = lpips_pair
    ours.batch = 1
    gt = smooth_img(*hw, seed=60)
    samples = [noisy(gt, s, seed=61 + s) for s in (3, 12)]
    x = to_lpips_input(gt)
    assert ours._onednn_convs(x) == plan  # torch 2.6 to 2.14 pick these: both layouts, both ways
    with torch.no_grad():
        expect = torch.cat([ref(to_lpips_input(s), to_lpips_input(gt))[0] for s in samples])
    assert M._conv_relu_works()  # (its check runs once, on first use: not counted below)
    fused, conv_relu = [], M._conv_relu
    monkeypatch.setattr(M, "_conv_relu", lambda h, conv: fused.append(conv) or conv_relu(h, conv))
    assert torch.equal(ours.maps(samples, gt), expect)
    # per pass (the GT's and each sample's), every convolution in oneDNN's layout: with its ReLU
    assert len(fused) == 3 * sum(plan)

    def other_signature(*args):
        raise TypeError("_select_conv_backend(): incompatible function arguments")

    def module_layout_throughout():
        ours._onednn.clear()
        assert ours._onednn_convs(x) == [False] * 5
        fused.clear()
        assert torch.equal(ours.maps(samples, gt), expect)
        assert not fused

    works = M._conv_relu_works
    monkeypatch.setattr(M, "_conv_relu_works", lambda: False)  # a torch without the fused op
    fused.clear()
    assert torch.equal(ours.maps(samples, gt), expect) and not fused
    monkeypatch.setattr(M, "_conv_relu_works", works)

    monkeypatch.setattr(torch._C, "_select_conv_backend", other_signature)  # another torch's
    module_layout_throughout()
    monkeypatch.delattr(torch._C, "_select_conv_backend")  # a torch without it
    module_layout_throughout()
    ours._onednn.clear()


def test_fused_conv_relu_is_used_only_where_it_gives_the_two_calls_result(monkeypatch):
    """The convolution's ReLU post-op is an internal op of torch: where it fails or returns
    anything but the two calls' tensor in oneDNN's layout, the ReLU runs on its own."""

    def failing(*args):
        raise RuntimeError("mkldnn::_convolution_pointwise: no such overload")

    def dense(x, *args):
        return torch.relu(torch.nn.functional.conv2d(x.to_dense(), *args[:6]))

    try:
        for op in (failing, dense):
            M._conv_relu_works.cache_clear()
            monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", op)
            assert not M._conv_relu_works()
    finally:
        monkeypatch.undo()
        M._conv_relu_works.cache_clear()
    assert M._conv_relu_works() == torch.backends.mkldnn.is_available()


def test_lpips_in_onednn_layout_is_exact_with_avx2_kernels_too():
    """oneDNN's layout and kernels depend on the CPU (AVX2 laptops: 8 channels interleaved, not
    16): the test above, with oneDNN and torch held to AVX2."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" not in flags:
        pytest.skip("no AVX2 on this CPU")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    env["ONEDNN_VERBOSE"] = "1"  # prints each kernel that runs: it must be an AVX2 one
    test = f"{__file__}::test_lpips_in_onednn_layout_equals_the_lpips_module"
    cmd = [sys.executable, "-m", "pytest", test, "-s", "-v", "-n", "0", "-p", "no:cacheprovider"]
    root = Path(__file__).resolve().parents[1]  # `python -m` imports sr_lib from the cwd
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-2000:]
    lines = [line.split(",") for line in done.stdout.splitlines() if ",convolution," in line]
    kernels = {f[f.index("convolution") + 1] for f in lines}  # the field after it, in any version
    # the direct kernels in the 8-channel layout, and im2col + GEMM for the 3-channel input
    assert "jit:avx2" in kernels and all("avx2" in k or "gemm" in k for k in kernels), kernels


def test_equal_samples_are_scored_once_with_the_numbers_of_scoring_each(lpips_pair, monkeypatch):
    """A deterministic model's n samples (one image n times) cost one LPIPS pass, not n, and every
    column equals scoring each sample, to the bit, in any order of the equal ones."""
    _, ours = lpips_pair
    ours.batch = 1
    gt = smooth_img(64, 96, seed=50)
    a, b = noisy(gt, 6, seed=51), noisy(gt, 12, seed=52)
    near_a = a.copy()
    near_a[1, 1] = 255 - near_a[1, 1]  # off the probe grid: equal to a there, yet not equal
    samples = [a, b, a.copy(), near_a, b.copy(), a.copy()]
    assert M.first_equal(samples) == [0, 1, 0, 3, 1, 0]
    lr = np.asarray(M.downscale(gt, 4))
    scored, maps = [], ours.maps
    monkeypatch.setattr(ours, "maps", lambda s, ref: scored.append(len(s)) or maps(s, ref))
    row = M.evaluate_image(gt, samples, 4, lpips_metric=ours, lr=lr)
    assert sum(scored) == 3
    monkeypatch.setattr(M, "first_equal", lambda s: list(range(len(s))))  # score every sample
    assert M.evaluate_image(gt, samples, 4, lpips_metric=ours, lr=lr) == row
    assert sum(scored) == 3 + 6
    assert row["PSNR_best"] == max(M.psnr(M.shave_border(s, 4), M.shave_border(gt, 4))
                                   for s in samples)  # fmt: skip


def test_finding_equal_samples_is_one_pass(monkeypatch):
    """Distinct samples are told apart by their grid's bytes as dict keys: each was compared with
    every distinct one before it, N^2 / 2 comparisons per image (0.1 s at N = 100 on 2K images)."""
    rng = np.random.default_rng(0)
    distinct = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(60)]
    samples = distinct + [distinct[7].copy(), distinct[0].copy()]
    compared, array_equal = [], np.array_equal
    monkeypatch.setattr(np, "array_equal", lambda a, b: compared.append(1) or array_equal(a, b))
    assert M.first_equal(samples) == [*range(60), 7, 0]
    assert len(compared) <= 2  # one whole comparison per equal sample; 1,770 before


def test_lpips_reused_buffers_leave_no_trace(lpips_pair):
    """Scratch buffers are kept from call to call: results must not depend on earlier calls."""
    ref, ours = lpips_pair
    ours.batch = 1
    gt = smooth_img(64, 96, seed=40)
    samples = [noisy(gt, s, seed=41 + s) for s in (3, 8, 15)]
    gt_features = ours.reference(gt)
    kept = [f.clone() for f in gt_features]
    first = ours.maps(samples, gt_features)
    assert all(torch.equal(a, b) for a, b in zip(gt_features, kept))  # samples' taps are not these
    other = smooth_img(48, 64, seed=42)  # another size: the buffers are replaced
    ours.maps([noisy(other, 5, seed=43)], other)
    again = ours.maps(samples[::-1], gt)
    assert torch.equal(again.flip(0), first)
    with torch.no_grad():
        alone = ref(to_lpips_input(samples[2]), to_lpips_input(gt))[0]
    assert torch.equal(again[0:1], alone)


@pytest.fixture(scope="module")
def default_lpips(lpips_pair):
    """The lpips package's default call, lpips.LPIPS(net="alex", version="0.1") (spatial=False),
    with the seeded random weights of `lpips_pair`."""
    net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    net.load_state_dict(lpips_pair[0].state_dict(), strict=True)
    return net.eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_pairwise_lpips_equals_the_lpips_packages_default_call(lpips_pair, default_lpips, batch):
    """evaluate_image(pairwise=True): entry (i, j) is lpips.LPIPS(net="alex", version="0.1")(x_i,
    x_j) of the samples' official crops, from the features of their LPIPS pass (no trunk pass
    more): symmetric, zero diagonal, and LPIPS_pairwise the mean of the N(N - 1)/2 pairs. Batch 1
    runs the module's kernels: equal to the bit. Batches > 1 round the trunk's convolutions
    otherwise: 1.2e-6 relative at most measured here (48x64 and 64x96), so 5e-6."""
    ref, ours = lpips_pair
    ours.batch = batch
    gt = smooth_img(53, 70, seed=40)  # official crop 48x64: the samples are cropped to it too
    samples = [noisy(gt, s, seed=41 + s) for s in (3, 6, 10, 15)]
    crops = [to_lpips_input(s[:48, :64]) for s in samples]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    with torch.no_grad():  # the lpips package, pair by pair
        expect = torch.tensor([float(default_lpips(crops[i], crops[j])) for i, j in pairs])
        spatial = torch.tensor([float(ref(crops[i], crops[j]).mean()) for i, j in pairs])
    row = M.evaluate_image(gt, samples, 4, lpips_metric=ours, ntire=True, pairwise=True)
    got = torch.tensor(row[M.PAIRWISE_MATRIX], dtype=torch.float32)
    assert got.shape == (4, 4) and torch.equal(got, got.T) and not got.diagonal().any()
    upper = torch.stack([got[i, j] for i, j in pairs])
    if batch == 1:
        assert torch.equal(upper, expect)
    assert torch.allclose(upper, expect, rtol=5e-6, atol=0)
    assert row[M.PAIRWISE_COLUMN] == pytest.approx(float(expect.double().mean()), rel=5e-6)
    # the spatial mode (srspace's LPIPS_mean, the challenge's) gives other numbers
    assert not torch.allclose(spatial, expect, rtol=1e-6, atol=0)
    # the official columns are those of a run without --pairwise
    plain = M.evaluate_image(gt, samples, 4, lpips_metric=ours, ntire=True)
    assert {c: row[c] for c in M.OFFICIAL_COLUMNS} == plain
    ours.batch = 1


def test_pairwise_lpips_of_equal_samples_is_zero_and_needs_no_trunk_pass(lpips_pair, monkeypatch):
    """A sample equal to another (scored once) is 0 from it and has its row; N = 1 has no pairs
    (None, not an error); the pairs add no trunk pass (`_layers`: the GT's and one per distinct
    sample, as without them)."""
    _, ours = lpips_pair
    gt = smooth_img(seed=50)
    a, b = noisy(gt, 5, seed=51), noisy(gt, 12, seed=52)
    passes, layers = [], ours._layers
    monkeypatch.setattr(ours, "_layers", lambda x, **kw: passes.append(len(x)) or layers(x, **kw))
    row = M.evaluate_image(gt, [a, b, a.copy()], 4, lpips_metric=ours, ntire=True, pairwise=True)
    assert passes == [1, 1, 1]  # the GT, a, b
    m = row[M.PAIRWISE_MATRIX]
    assert m[0][2] == m[2][0] == 0 and m[2] == [m[0][2], m[0][1], 0] and m[0][1] > 0
    assert row[M.PAIRWISE_COLUMN] == pytest.approx((2 * m[0][1] + 0) / 3, rel=1e-12)
    same = M.evaluate_image(gt, [a, a.copy()], 4, lpips_metric=ours, ntire=True, pairwise=True)
    assert same[M.PAIRWISE_MATRIX] == [[0, 0], [0, 0]] and same[M.PAIRWISE_COLUMN] == 0
    one = M.evaluate_image(gt, [a], 4, lpips_metric=ours, pairwise=True)
    assert one[M.PAIRWISE_COLUMN] is None and one[M.PAIRWISE_MATRIX] is None
    assert M.PAIRWISE_COLUMN not in M.evaluate_image(gt, [a, b], 4, lpips_metric=ours)


@pytest.mark.parametrize("hw", [(48, 64), (1352, 2040), (61, 93)])
def test_pairwise_bytes_are_the_taps_kept(lpips_pair, hw):
    """lpips_net.alex_tap_values is the values of the 5 taps of lpips' AlexNet (shapes from the
    module on the meta device), and pairwise_bytes N of them of the official crop in float32
    plus the scratch of the largest: 114 MB a sample at 2040x1352."""
    ref, _ = lpips_pair
    h, w = hw
    with torch.device("meta"):
        taps = ref.net(torch.empty(1, 3, h, w))
    assert alex_tap_values(h, w) == sum(t.numel() for t in taps)
    h8, w8 = h // 8 * 8, w // 8 * 8
    assert M.pairwise_bytes(hw, 10, 4) == 4 * (10 * alex_tap_values(h8, w8) + (
        64 * ((h8 - 7) // 4 + 1) * ((w8 - 7) // 4 + 1)))  # fmt: skip
    assert M.pairwise_bytes(hw, 1, 4) == 0
    if hw == (1352, 2040):
        assert round(alex_tap_values(h, w) * 4 / 1e6) == 114


def test_lut_lookup_of_other_devices_equals_the_cpu_table(lpips_pair):
    _, ours = lpips_pair
    imgs = np.random.default_rng(5).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = torch.from_numpy(imgs)
    looked_up = M.lut_lookup(ours._lut, x)  # the path of non-CPU devices, here on CPU
    assert looked_up.is_contiguous() and looked_up.shape == (2, 3, 5, 7)
    assert torch.equal(looked_up, ours._trunk_input(imgs))
    with torch.no_grad():
        assert torch.equal(looked_up, ours.net.scaling_layer(M.to_lpips_range(x)))


def test_lpips_computes_without_tf32_and_leaves_the_callers_setting(lpips_pair, monkeypatch):
    _, ours = lpips_pair
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before, seen = flags(), []
    # (not the shape-only pass on meta tensors that plans the oneDNN layout of a shape not seen
    # before: whether it runs here depended on which test used the fixture first)
    record = lambda _m, _i, out: out.is_meta or seen.append(flags())  # noqa: E731
    conv, conv_relu = ours.slices[0][0], M._conv_relu
    hook = conv.register_forward_hook(record)

    def fused(h, c):  # the first convolution where oneDNN runs it with its ReLU
        seen.extend([flags()] if c is conv else [])
        return conv_relu(h, c)

    monkeypatch.setattr(M, "_conv_relu", fused)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        gt = smooth_img(64, 96, seed=60)
        ours.maps([noisy(gt, 5, seed=61)], gt)
        ours.maps([noisy(gt, 5, seed=61)], ours.reference(gt))
        assert flags() == (True, True)
    finally:
        hook.remove()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen == [(False, False)] * 4  # GT and sample, twice


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU CI skips it)")
def test_cuda_lpips_equals_cpu_without_a_host_sync_per_sample(lpips_pair):
    _, ours = lpips_pair
    gpu = M.LpipsMetric(lpips_module(), "cuda", batch=2)
    gpu.net.load_state_dict(ours.net.state_dict())
    assert torch.equal(gpu._lut.cpu(), ours._lut)  # the trunk's inputs are the CPU path's
    gt = smooth_img(64, 96, seed=50)
    samples = [noisy(gt, s, seed=51 + s) for s in (4, 9, 16)]
    torch.cuda.set_sync_debug_mode("error")  # raises on .item(), blocking copies, synchronize
    try:
        features, acc = gpu.reference(gt), M.DiversityAccumulator()
        for i in range(0, len(samples), gpu.batch):
            acc.update(gpu.maps(samples[i : i + gpu.batch], features))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_row = M.evaluate_image(gt, samples, 4, lpips_metric=ours, ntire=True)
    gpu_row = M.evaluate_image(gt, samples, 4, lpips_metric=gpu, ntire=True)
    assert gpu_row["LPIPS_mean"] == pytest.approx(acc.lpips_mean, rel=1e-6)
    assert gpu_row["LRPSNR_worst"] == cpu_row["LRPSNR_worst"]  # CPU-side in both
    assert gpu_row["LRPSNR_mean"] == cpu_row["LRPSNR_mean"]
    assert gpu_row["LPIPS_mean"] == pytest.approx(cpu_row["LPIPS_mean"], rel=1e-5)
    assert gpu_row["score"] == pytest.approx(cpu_row["score"], abs=1e-3)
    # --pairwise: the pairs' heads on the GPU, the matrix copied to the host once
    cpu_pairs = M.evaluate_image(gt, samples, 4, lpips_metric=ours, ntire=True, pairwise=True)
    gpu_pairs = M.evaluate_image(gt, samples, 4, lpips_metric=gpu, ntire=True, pairwise=True)
    got, want = (np.array(r[M.PAIRWISE_MATRIX]) for r in (gpu_pairs, cpu_pairs))
    assert got.shape == (3, 3) and np.allclose(got, want, rtol=1e-5, atol=0)


def test_keep_freed_memory_is_accepted_by_glibc():
    import platform

    applied = M.keep_freed_memory()
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert applied is True  # mallopt returned 1 for both settings


def test_lpips_input_must_be_uint8_hwc(lpips_pair):
    _, ours = lpips_pair
    with pytest.raises(ValueError, match="uint8"):
        ours.maps(np.zeros((1, 48, 64, 3), np.float32), rand_img())


def test_alexnet_state_dict_maps_onto_the_lpips_trunk(lpips_pair, tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(3)
    alex = torchvision.models.alexnet(weights=None)
    f = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(alex.state_dict(), f)
    import sr_lib.weights as W

    monkeypatch.setattr(W, "resolve", lambda name, path=None, offline=None: f)
    m = M.LpipsMetric.load()
    x = to_lpips_input(smooth_img(seed=30))
    with torch.no_grad():
        want = alex.features[:12](m.net.scaling_layer(x))
        got = m.net.net.slice5(
            m.net.net.slice4(
                m.net.net.slice3(m.net.net.slice2(m.net.net.slice1(m.net.scaling_layer(x))))
            )
        )
    assert torch.equal(want, got)
    assert m.info["backbone_sha256"] == sha256_file(f)
    assert "lpips package" in m.info["heads"]
    # the heads are the v0.1 ones shipped with lpips
    assert torch.equal(m.net.lin0.model[1].weight, lpips_pair[0].lin0.model[1].weight)


def test_tiny_image_too_small_for_lpips(lpips_pair):
    gt = rand_img(24, 64)
    with pytest.raises(DataError, match="too small for LPIPS"):
        M.evaluate_image(gt, [gt], 4, lpips_metric=lpips_pair[1], gt_name="hr/a.png")


@pytest.mark.parametrize("built", ["lpips from a file", "random vgg"])
def test_networks_built_on_the_meta_device_in_a_fresh_process(tmp_path, built):
    """`sr_eval.py --lpips-weights FILE` and a random VGG (RefVAE's encoder before its weights,
    the learning checks) build their network under `torch.device("meta")`: where that was the
    process's first import of torchvision (on torch 2.6, torch._dynamo's), the import failed,
    a traceback ("Tensor.item() cannot be called on meta tensors")."""
    weights = tmp_path / "lpips.pth"
    torch.save(lpips_module().state_dict(), weights)
    code = {
        "lpips from a file": "from sr_lib import metrics; "
        f"metrics.LpipsMetric.load({str(weights)!r}, 'cpu', 1)",
        "random vgg": "from sr_lib.models.vgg import VGGFeatures; "
        "VGGFeatures(('relu1_1',), pretrained=False)",
    }[built]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
