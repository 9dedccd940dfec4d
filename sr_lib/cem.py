"""Consistency Enforcing Module (CEM): project an SR image onto those whose downscale is the LR.

Y. Bahat, T. Michaeli, "Explorable Super Resolution", CVPR 2020 (arXiv:1912.01839), §3 and its
Fig. 3; written from the paper (docs/cem.md), nothing copied (official code:
YuvalBahat/Explorable-Super-Resolution, Apache-2.0).

    x̂ = x + Hᵀ(HHᵀ)⁻¹(y − Hx)

is the closest image to x (in ℓ2) with H x̂ = y exactly. Here H is the degradation the NTIRE 2021
data and its LR-PSNR use: MATLAB-bicubic `imresize(·, 1/s)` (Keys a = −0.5, antialiased, symmetric
border mirroring). H is separable, H x = A_h x A_wᵀ per channel, with A the dense 1-D pass matrix
of `sr_lib.resize.resize_matrix` (the mirroring folded in), so

    x̂ = x + P_h (y − A_h x A_wᵀ) P_wᵀ,    P = Aᵀ(AAᵀ)⁻¹

(docs/cem.md, "Exact separable form"). Unlike the convolutional CEM of the official code and of
VSpSR (a = −0.75, no border handling), this is exact at the borders too, for any image size and
scale.
P is computed once per (length, scale, device, dtype) in float64 and cached; H x uses the banded
`imresize_torch` pass. Everything is linear, so the layer is differentiable in x and y: the
gradient reaching x is the null-space projection (I − P A) of the incoming one (docs/cem.md).

Apply `clamp(0, 1)` *after* the CEM (models' `sample()` does); clamping and uint8 rounding of the
saved PNG then set the LR-PSNR ceiling (≈ 50–60 dB instead of ∞).
"""

import math

import torch

from sr_lib.resize import device_cache, imresize_torch, resize_matrix


@device_cache(maxsize=32)
def _pinv_rows(n_hr: int, n_lr: int, scale: int, device: torch.device, dtype: torch.dtype):
    """P = Aᵀ(AAᵀ)⁻¹, (n_hr, n_lr), for the 1-D downscale A (n_lr, n_hr). Cached: read only."""
    a = resize_matrix(n_hr, n_lr, 1 / scale, "cpu", torch.float64)
    # AAᵀ is symmetric positive definite and well conditioned (cond ≈ 2; docs/cem.md), so a
    # Cholesky solve in float64 is exact to ~1e-15; solve(AAᵀ, A)ᵀ = Aᵀ(AAᵀ)⁻¹.
    gram = a @ a.T  # (n_lr, n_lr)
    p = torch.cholesky_solve(a, torch.linalg.cholesky(gram)).T  # (n_hr, n_lr)
    return p.to(device=device, dtype=dtype).contiguous()


def _lr_size(n_hr: int, scale: int) -> int:
    return math.ceil(n_hr / scale)  # imresize's output length for the factor 1/scale


def cem(x: torch.Tensor, lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Project SR images onto the set {x̂ : imresize(x̂, 1/scale) = lr} (exact, incl. borders).

    Args:
        x: SR images (..., C, sH, sW), float; e.g. samples (B, n, 3, sH, sW).
        lr: the LR the model was given, (..., C, H, W) with H = ceil(sH / scale); it broadcasts
            against x, and a (B, C, H, W) LR is matched to (B, n, C, sH, sW) samples.
        scale: integer downscale factor (2, 3, 4, 8, ...).
    Returns:
        x̂, the shape of x, not clamped (clamp to [0, 1] afterwards); float32, or x's dtype if
        wider. Autocast is off inside: a bfloat16 projection would leave an LR error of ~1e-4
        (74 dB instead of ~150) where this one is exact.
    """
    scale = int(scale)
    if x.dim() == lr.dim() + 1:
        lr = lr.unsqueeze(-4)  # (B, C, H, W) -> (B, 1, C, H, W): one LR for all n samples
    n_h, n_w = x.shape[-2:]
    want = (_lr_size(n_h, scale), _lr_size(n_w, scale))
    if tuple(lr.shape[-2:]) != want:
        raise ValueError(
            f"cem: SR {n_h}x{n_w} at x{scale} needs an LR of {want[0]}x{want[1]}, "
            f"got {tuple(lr.shape[-2:])}"
        )
    if not x.is_floating_point():
        raise TypeError(f"cem: expected a float SR tensor, got {x.dtype}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x, lr = x.to(dtype), lr.to(dtype)
        residual = lr - imresize_torch(x, 1 / scale)  # y − A_h x A_wᵀ, (..., C, H, W)
        p_h = _pinv_rows(n_h, want[0], scale, x.device, dtype)  # (sH, H)
        p_w = _pinv_rows(n_w, want[1], scale, x.device, dtype)  # (sW, W)
        return x + p_h @ residual @ p_w.T  # (..., C, sH, sW)
