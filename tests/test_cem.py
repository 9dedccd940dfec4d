"""The exact MATLAB-bicubic CEM (sr_lib/cem.py; docs/cem.md)."""

import pytest
import torch

from sr_lib.cem import cem
from sr_lib.resize import imresize_torch, resize_matrix

SIZES = [(5, 7), (6, 6), (1, 3), (9, 4)]  # LR (H, W): odd, even, a single row, mixed


def down(x: torch.Tensor, scale: int) -> torch.Tensor:
    return imresize_torch(x, 1 / scale)


def pair(scale, h, w, b=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h * scale, w * scale, generator=g, dtype=dtype)
    lr = torch.rand(b, 3, h, w, generator=g, dtype=dtype)
    return x, lr


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
@pytest.mark.parametrize("h, w", SIZES)
def test_projection_is_exact_idempotent_and_keeps_consistent_images(scale, h, w):
    x, lr = pair(scale, h, w)
    xh = cem(x, lr, scale)
    assert xh.shape == x.shape and xh.dtype == torch.float32
    assert (down(xh, scale) - lr).abs().max() <= 1e-5  # every LR pixel, borders included
    assert (cem(xh, lr, scale) - xh).abs().max() <= 1e-5  # idempotent
    assert (cem(x, down(x, scale), scale) - x).abs().max() <= 1e-5  # consistent x unchanged


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_exact_under_autocast_and_for_low_precision_input(amp, x_dtype):
    """sr_sample.py --amp and sr_train.py --amp run the CEM inside autocast: still exact (a
    bfloat16 projection leaves ~2e-4), in float32 also for a bfloat16 model output."""
    x, lr = pair(4, 6, 5)
    with torch.autocast("cpu", amp):
        xh = cem(x.to(x_dtype), lr, 4)
    assert xh.dtype == torch.float32
    assert (down(xh, 4) - lr).abs().max() <= 1e-5
    assert (xh - cem(x.to(x_dtype).float(), lr, 4)).abs().max() == 0  # = the float32 projection


def test_exact_on_a_large_smooth_image_at_every_border():
    g = torch.Generator().manual_seed(3)
    base = torch.rand(1, 3, 9, 13, generator=g)
    x = torch.nn.functional.interpolate(base, size=(200, 312), mode="bicubic", align_corners=False)
    lr = down(torch.rand(1, 3, 200, 312, generator=g), 8)
    err = (down(cem(x, lr, 8), 8) - lr).abs()  # (1, 3, 25, 39)
    assert err.max() <= 1e-5
    for edge in (err[..., 0, :], err[..., -1, :], err[..., :, 0], err[..., :, -1]):
        assert edge.max() <= 1e-5


def test_added_component_lies_in_the_range_of_h_transpose():
    scale, h, w = 2, 3, 4
    x, lr = pair(scale, h, w, b=1, dtype=torch.float64)
    added = (cem(x, lr, scale) - x)[0, 0]  # (6, 8)
    a_h = resize_matrix(h * scale, h, 1 / scale, dtype=torch.float64)  # (3, 6)
    a_w = resize_matrix(w * scale, w, 1 / scale, dtype=torch.float64)  # (4, 8)
    big_h = torch.kron(a_h, a_w)  # H on row-major vectors, (12, 48)
    # added = Hᵀ v for some v: least squares leaves no residual.
    v = torch.linalg.lstsq(big_h.T, added.reshape(-1, 1)).solution
    assert torch.allclose(big_h.T @ v, added.reshape(-1, 1), atol=1e-12)
    # Equivalently it is orthogonal to the null space of H: n = cem(r, 0) = (I − Hᵀ(HHᵀ)⁻¹H) r.
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        r = torch.randn(1, 1, h * scale, w * scale, generator=g, dtype=torch.float64)
        n = cem(r, torch.zeros(1, 1, h, w, dtype=torch.float64), scale)[0, 0]
        assert down(n[None, None], scale).abs().max() < 1e-12
        assert abs((added * n).sum().item()) < 1e-12


@pytest.mark.parametrize("scale, hr", [(4, (8, 12)), (3, (7, 10)), (8, (9, 17)), (2, (5, 3))])
def test_output_is_the_brute_force_closest_consistent_image(scale, hr):
    """x̂ solves min ‖x̂ − x‖² s.t. H x̂ = y, solved here as a dense KKT system with H read off
    imresize applied to every unit image (not from resize_matrix); HR sizes that are not a
    multiple of the scale included (the last LR pixel then sees 1 to s − 1 HR pixels)."""
    n = hr[0] * hr[1]
    h = down(torch.eye(n, dtype=torch.float64).reshape(n, 1, *hr), scale).reshape(n, -1).T
    m = h.shape[0]
    g = torch.Generator().manual_seed(7)
    x, y = (
        torch.rand(n, generator=g, dtype=torch.float64),
        torch.rand(m, generator=g, dtype=torch.float64),
    )
    kkt = torch.zeros(n + m, n + m, dtype=torch.float64)
    kkt[:n, :n], kkt[:n, n:], kkt[n:, :n] = torch.eye(n), h.T, h
    best = torch.linalg.solve(kkt, torch.cat([x, y]))[:n]
    lr_shape = down(torch.zeros(1, 1, *hr), scale).shape
    out = cem(x.reshape(1, 1, *hr), y.reshape(lr_shape), scale).reshape(-1)
    assert (out - best).abs().max() <= 1e-12


@pytest.mark.parametrize("scale, h, w", [(2, 2, 3), (3, 2, 2)])
def test_gradcheck_in_x_and_lr(scale, h, w):
    x, lr = (t.requires_grad_(True) for t in pair(scale, h, w, b=1, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b: cem(a, b, scale), (x, lr))


def test_gradient_reaching_x_is_the_null_space_part():
    x, lr = pair(4, 3, 3, b=1, dtype=torch.float64)
    x.requires_grad_(True)
    g = torch.randn_like(x)
    (cem(x, lr, 4) * g).sum().backward()
    null = cem(g, torch.zeros_like(lr), 4)  # (I − Hᵀ(HHᵀ)⁻¹H) g, the projection is symmetric
    assert torch.allclose(x.grad, null, atol=1e-12)


def test_samples_broadcast_against_one_lr():
    x, lr = pair(4, 5, 6, b=2)
    samples = torch.stack([x, x.flip(-1)], dim=1)  # (B, n, 3, sH, sW)
    out = cem(samples, lr, 4)
    assert out.shape == samples.shape
    assert torch.allclose(out[:, 1], cem(x.flip(-1), lr, 4))


def test_size_mismatch_and_integer_input_fail():
    x, lr = pair(4, 5, 6)
    with pytest.raises(ValueError, match="needs an LR of 5x6"):
        cem(x, lr[..., :4, :], 4)
    with pytest.raises(TypeError):
        cem(x.to(torch.uint8), lr, 4)
