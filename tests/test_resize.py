"""MATLAB-bicubic imresize against a slow reference written here from the formulas."""

import math

import numpy as np
import pytest
import torch

from sr_lib.resize import (
    _ordered_sum,
    contributions,
    imresize,
    imresize_torch,
    output_size,
    resize_matrix,
)

SCALES = [1 / 2, 1 / 3, 1 / 4, 1 / 8, 2, 3, 4, 8]
SHAPES = [(13, 17), (24, 32, 3), (33, 40, 3)]


def ref_cubic(x: float) -> float:
    ax = abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax  # products, as the port: ** may differ in the last bit
    if ax <= 1:
        return 1.5 * ax3 - 2.5 * ax2 + 1
    if ax <= 2:
        return -0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2
    return 0.0


def ref_taps(in_len: int, j: int, scale: float) -> list[tuple[int, float]]:
    """(input index, weight) pairs of output pixel j (1-based), one scalar at a time.

    Float64 operations are ordered as in the port (distance (u - i) - 1 with i 0-based, np.sum to
    normalise): non-integer factors produce exact ties k + 1/2, where the last bit decides.
    """
    width = 4 / scale if scale < 1 else 4.0  # antialiasing stretches the kernel when downscaling
    u = j / scale + 0.5 * (1 - 1 / scale)  # MATLAB geometry, 1-based input coordinate
    left = math.floor(u - width / 2)
    index, weight = [], []
    for i in range(left - 1, left + math.ceil(width) + 1):  # 0-based tap positions
        dist = (u - i) - 1
        weight.append(scale * ref_cubic(scale * dist) if scale < 1 else ref_cubic(dist))
        m = i % (2 * in_len)  # symmetric mirroring: 0..n-1, n-1..0, repeated
        index.append(m if m < in_len else 2 * in_len - 1 - m)
    total = np.sum(weight)
    return [(i, w / total) for i, w in zip(index, weight)]


def ref_imresize(img: np.ndarray, scale: float, rnd=np.round) -> np.ndarray:
    """Slow and obvious: per output pixel along an axis, a weighted sum over its taps.

    The tap loop runs over whole lines (the other axis and channels) so the test stays fast;
    every weight and index comes from the scalar formulas above.
    """
    x = img.astype(np.float64)
    for axis in (0, 1):  # rows (vertical pass) first
        n = x.shape[axis]
        lines = []
        for j in range(1, math.ceil(n * scale) + 1):
            acc = 0.0
            for i, w in ref_taps(n, j, scale):
                acc = acc + w * np.take(x, i, axis=axis)
            if img.dtype == np.uint8:  # the port quantises after each pass
                acc = rnd(np.clip(acc, 0, 255))
            lines.append(acc)
        x = np.stack(lines, axis=axis)
    return x.astype(np.uint8) if img.dtype == np.uint8 else x


def random_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("scale", SCALES + [0.7, 1.5])  # non-integer: the general path
@pytest.mark.parametrize("shape", SHAPES)
def test_uint8_matches_reference_bit_exact(scale, shape):
    img = random_image(shape)
    assert np.array_equal(imresize(img, scale), ref_imresize(img, scale))


@pytest.mark.parametrize("scale", SCALES)
def test_float_matches_reference(scale):
    img = np.random.default_rng(1).random((24, 33, 3)) * 255
    out = imresize(img, scale)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref_imresize(img, scale), rtol=0, atol=1e-10)


def test_round_half_to_even_between_passes():
    # x2 weights are multiples of 1/128, so exact halves are common; np.round sends them to even.
    img = random_image((24, 32, 3), seed=2)
    out = ref_imresize(img, 2)
    away = ref_imresize(img, 2, rnd=lambda v: np.floor(v + 0.5))  # round half up instead
    assert not np.array_equal(out, away)  # the test image does exercise ties
    assert np.array_equal(imresize(img, 2), out)


def test_hand_computed_ramp_x2():
    # x2 upscale of the 1x2 row [0, 100]. Output j sits at u = j/2 + 1/4 = 0.75, 1.25, 1.75, 2.25
    # (1-based). For j = 1 the taps p = -1..4 (0-based) have distances 1.75, 0.75, -0.25, -1.25
    # (the others weigh 0), weights cubic(d) = -0.0234375, 0.2265625, 0.8671875, -0.0703125 (sum
    # 1), and mirrored indices 1, 0, 0, 1, so out = 100 * (-0.0234375 - 0.0703125) = -9.375.
    # j = 2: weights -0.0703125, 0.8671875, 0.2265625, -0.0234375 on indices 0, 0, 1, 1 -> 20.3125.
    # j = 3, 4 mirror j = 2, 1 around 50. A single row stays itself in the vertical pass.
    expected = np.array([-9.375, 20.3125, 79.6875, 109.375])
    img = np.array([[0, 100]], dtype=np.uint8)
    np.testing.assert_array_equal(imresize(img.astype(np.float64), 2), np.stack([expected] * 2))
    np.testing.assert_array_equal(imresize(img, 2), [[0, 20, 80, 109]] * 2)


def test_contributions_quarter():
    # /4: u = 4j - 1.5, so the 16 nonzero taps sit at distances +-0.5, ..., +-7.5 and weigh
    # cubic(d / 4) / 4; the four phases are partitions of unity, so the row already sums to 1.
    ind, w = contributions(16, 4, 1 / 4)
    d = np.arange(7.5, -8, -1)
    np.testing.assert_array_equal(w[1], [ref_cubic(v / 4) / 4 for v in d])
    assert w[1, 7] == 0.25 * (1.5 / 512 - 2.5 / 64 + 1)  # d = 0.5: 1.5|x|^3 - 2.5|x|^2 + 1, x = 1/8
    np.testing.assert_array_equal(ind[0], [5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 3])
@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_constant_image_stays_constant(scale, dtype):
    img = np.full((13, 18, 3), 77, dtype=dtype)
    out = imresize(img, scale)
    np.testing.assert_allclose(out, 77, rtol=0, atol=0 if dtype == np.uint8 else 1e-12)
    assert out.dtype == (np.uint8 if dtype == np.uint8 else np.float64)


@pytest.mark.parametrize("scale", SCALES + [0.7])
def test_output_size_is_ceil(scale):
    for h, w in [(13, 17), (24, 32), (1, 9)]:
        expect = (math.ceil(h * scale), math.ceil(w * scale))
        assert output_size((h, w), scale) == expect
        assert imresize(random_image((h, w, 3)), scale).shape == expect + (3,)
        assert imresize_torch(torch.zeros(1, 3, h, w), scale).shape == (1, 3) + expect


@pytest.mark.parametrize("scale", SCALES + [0.7])
def test_torch_float_matches_numpy(scale):
    img = np.random.default_rng(3).random((2, 3, 17, 24)).astype(np.float32)  # (N, C, H, W)
    out = imresize_torch(torch.from_numpy(img), scale)
    assert out.dtype == torch.float32
    for n in range(2):
        expect = imresize(img[n].transpose(1, 2, 0), scale).transpose(2, 0, 1)
        np.testing.assert_allclose(out[n].numpy(), expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", SCALES + [0.7])
@pytest.mark.parametrize("channels", [1, 3])
def test_torch_uint8_bit_exact_and_batched(scale, channels):
    img = random_image((3, channels, 19, 24), seed=4)  # (N, C, H, W)
    out = imresize_torch(torch.from_numpy(img), scale)
    assert out.dtype == torch.uint8
    for n in range(3):
        expect = imresize(img[n].transpose(1, 2, 0), scale).transpose(2, 0, 1)
        assert np.array_equal(out[n].numpy(), expect)


def test_resize_matrix_is_one_pass():
    img = np.random.default_rng(5).random((13, 20))
    a_h = resize_matrix(13, 4, 1 / 4, dtype=torch.float64)
    a_w = resize_matrix(20, 5, 1 / 4, dtype=torch.float64)
    out = (a_h @ torch.from_numpy(img) @ a_w.T).numpy()
    np.testing.assert_allclose(out, imresize(img, 1 / 4), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1 / 4, 3, 0.7])
def test_gradients_flow(scale):
    x = torch.rand(2, 3, 16, 12, requires_grad=True)
    imresize_torch(x, scale).square().sum().backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    x = torch.rand(1, 2, 8, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: imresize_torch(t, scale), (x,), fast_mode=True)


@pytest.mark.parametrize("n", [3, 8, 13, 16, 34, 300])
def test_ordered_sum_follows_numpy(n):
    # Where the port's trailing axes have size 1 (grey images), np.sum adds the taps pairwise;
    # otherwise it reduces an outer axis, one tap after the other.
    rng = np.random.default_rng(6)
    a = rng.standard_normal((50, n)) * 10.0 ** rng.integers(-8, 9, (50, n))
    assert np.array_equal(_ordered_sum(lambda t: a[:, t], 0, n, True), np.sum(a, axis=1))
    sequential = np.sum(np.ascontiguousarray(a.T), axis=0)
    assert np.array_equal(_ordered_sum(lambda t: a[:, t], 0, n, False), sequential)
