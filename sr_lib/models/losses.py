"""Loss functions the models combine in their `forward` (and `discriminator_loss`).

- `le_loss`, `hard_sample_mask`: ℓ_E (He & Cheng, "Revisiting ℓ1 Loss in Super-Resolution: A
  Probabilistic View and Beyond", arXiv:2201.10084), Eq. 8 + Eq. 10 with the §4.3 hard-sample
  mask. No official code exists; written from the paper (docs/le.md).
- `standard_normal_kl`, `gaussian_kl`: the KL terms of the VAEs (RefVAE Eq. 4, VarSR Eq. 7).
- `sparse_prior_kl`: VSpSR's Gamma-ARD sparsity prior (Eq. 5, the code's form).
- `VGGLoss`, `style_stats`, `tv_map`: perceptual, style (RefVAE Eq. 7) and total-variation
  (RefVAE Eq. 8) terms.
- `frozen_call`, `gradient_penalty`: the generator side of adversarial losses and WGAN-GP.
"""

import contextlib
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.errors import UsageError

MASK_SCOPES = ("batch", "image")
AUX_TARGETS = ("signed", "abs")


def hard_sample_mask(a: torch.Tensor, scope: str = "batch") -> torch.Tensor:
    """Zero the entries of a = |ŷ − μ| below their mean (paper §4.3), batch-wide or per image."""
    if scope == "batch":
        mean = a.mean()
    elif scope == "image":
        mean = a.mean(dim=tuple(range(1, a.dim())), keepdim=True)  # (B, 1, 1, 1)
    else:
        raise UsageError(f"le_mask_scope {scope!r}: choose one of {', '.join(MASK_SCOPES)}")
    return a * (a >= mean)  # the comparison carries no gradient; a keeps its own


def le_loss(
    mu: torch.Tensor,
    hr: torch.Tensor,
    sigma: torch.Tensor,
    beta: float = 0.01,
    mask_scope: str = "batch",
    aux_target: str = "signed",
    z: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ℓ_E = Eq. 8 (masked, one z sample, mean reduction) + β · Eq. 10 (μ detached).

    Args:
        mu: the SR image (B, 3, H, W); hr: the target; sigma: the σ branch output (B, 3, H, W).
        z: the N(0, 1) draw of Eq. 8; None draws a fresh one from the global generator.
    Returns:
        {"loss", "le" (Eq. 8), "sigma_aux" (β · Eq. 10), "l1" (plain mean |ŷ − μ|, detached)}.
    """
    if aux_target not in AUX_TARGETS:
        raise UsageError(f"le_aux_target {aux_target!r}: choose one of {', '.join(AUX_TARGETS)}")
    r = hr - mu
    # Eq. 8: σ := |ŷ − μ| stays in the graph, so sign(∂ℓ_E/∂μ) == sign(∂|ŷ − μ|/∂μ) for every z
    # (Eq. 9); detaching it would be Noise2Noise with gradient flips (paper §3.3).
    a = hard_sample_mask(r.abs(), mask_scope)
    if z is None:
        z = torch.randn_like(r)
    le = (r - a * z).abs().mean()
    # Eq. 10 on the unmasked residual with μ detached: σ learns the error, μ is not pulled to σ.
    target = hr - mu.detach()
    if aux_target == "abs":
        target = target.abs()  # the form σ is evaluated against (paper §4.6; docs/le.md)
    aux = beta * (target - sigma).abs().mean()
    return {"loss": le + aux, "le": le, "sigma_aux": aux, "l1": r.detach().abs().mean()}


def standard_normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) per element: ½(μ² + σ² − log σ² − 1)."""
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) of diagonal Gaussians, summed over the last dim:
    Σ_d ½[log σ_p² − log σ_q² + (σ_q² + (μ_q − μ_p)²)/σ_p² − 1] (Eq. 7 with q = E_H, p = E_L)."""
    ratio = (logvar_q.exp() + (mu_q - mu_p).square()) / logvar_p.exp()
    return 0.5 * (logvar_p - logvar_q + ratio - 1).sum(dim=-1)


def sparse_prior_kl(mu: torch.Tensor, logvar: torch.Tensor, alpha: float, beta: float):
    """Per-coefficient KL term of VSpSR's Eq. 5 in the code's form: E[ρ]·(μ² + σ²) − log σ².

    That is 2× the Eq. 5 summand without its constant. E[ρ] = (α + ½)/(β + ½(μ² + σ²)) is the
    mean of the variational Gamma posterior of ρ (Eq. 5's μ_ρ) and is detached, as in the code.
    """
    second_moment = mu.square() + logvar.exp()  # E_q[ω²]
    rho = ((alpha + 0.5) / (beta + 0.5 * second_moment)).detach()
    return rho * second_moment - logvar


def patch_too_small(what: str, need: int, hr: torch.Tensor, way_out: str = "") -> UsageError:
    """The one-line error of a loss or critic given HR patches smaller than `need` px. Named for
    both callers: sr_train.py's user sets the patch by flag, a Python caller by the hr it passes
    to the model's forward; `way_out`: another way, e.g. without this loss."""
    h, w = hr.shape[-2:]
    return UsageError(
        f"{what} needs HR patches of at least {need} px, not {h}x{w}: use a larger --patch (the "
        f"HR patch is --patch x --scale; in Python, a larger hr){way_out}"
    )


# The way out of a patch too small for the VGG19 perceptual loss: without it
PER_OFF = ", or --lambda-per 0 (lambda_per=0)"


def vgg_min_size(*taps: str) -> int:
    """The least side of a patch that VGG19 takes down to the deepest of `taps` (reluB_C): each
    of the B - 1 2x2 max-pools before it halves the patch, and a smaller one reaches 0 px, a
    shape error deep inside torch. The one count of it: `VGGLoss` checks each batch against it,
    a model's `patch_needs` (sr_train.py's --patch, before any work) by the tap of its flag."""
    return 2 ** max(int(t[len("relu")]) - 1 for t in taps)


class VGGLoss(nn.Module):
    """Mean over the taps of `vgg` (a frozen `VGGFeatures`) of MSE(vgg(sr), vgg(hr)); gradients
    flow to `sr` only."""

    def __init__(self, vgg: nn.Module):
        super().__init__()
        self.vgg = vgg
        self.min_size = vgg_min_size(*vgg.layers)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if min(hr.shape[-2:]) < self.min_size:
            raise patch_too_small("the VGG19 perceptual loss", self.min_size, hr, PER_OFF)
        with torch.no_grad():
            target = self.vgg(hr)
        feats = self.vgg(sr)
        return sum(F.mse_loss(feats[t], target[t]) for t in self.vgg.layers) / len(self.vgg.layers)


def style_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std = sqrt(var + 1e-5) over space, var unbiased (n − 1), as RefVAE's
    code (calc_mean_std): the style loss compares these, so the code's weight 10 means the same."""
    return f.mean(dim=(2, 3)), (f.var(dim=(2, 3)) + 1e-5).sqrt()


def tv_map(x: torch.Tensor, beta: float) -> torch.Tensor:
    """RefVAE Eq. 8 summand ((Ŷ_{i,j−1} − Ŷ_{i,j})² + (Ŷ_{i−1,j} − Ŷ_{i,j})²)^β,
    (B, C, H−1, W−1)."""
    s = (x[..., 1:, 1:] - x[..., 1:, :-1]).square() + (x[..., 1:, 1:] - x[..., :-1, 1:]).square()
    return s if beta == 1 else (s + 1e-8) ** beta  # eps: finite gradient at 0 for β < 1


def frozen_call(module: nn.Module, *inputs: torch.Tensor):
    """module(*inputs) with its parameters detached: the generator's adversarial loss trains the
    generator only; the discriminator learns from its own loss."""
    params = {k: p.detach() for k, p in module.named_parameters()}
    return torch.func.functional_call(module, params, inputs)


def on_device(module: nn.Module, like: torch.Tensor) -> nn.Module:
    """A frozen loss network kept out of state_dict (VGG, LPIPS), moved to the device and dtype of
    `like` (a tensor of the model, `model_tensor`: `model.double()` does not reach it) only when it
    is elsewhere. Inside a compiled forward, torch 2.11's dynamo traces a `.to()` that moves
    nothing into Module._apply, whose Parameter constructor breaks the graph at every step. Under
    autocast the model's weights, and so the network's, stay float32."""
    # Its first tensor's device, by a loop: next(it, None) breaks the graph in torch 2.6's dynamo
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device != like.device or t.dtype != like.dtype:
            module.to(like.device, like.dtype)
        break
    return module


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's E[(‖∇D(x̂)‖₂ − 1)²], x̂ on random lines between real and generated images.

    Under float16 autocast it is computed in float32: its backward differentiates the critic
    twice, and the second derivative of an instance norm grows as 1/σ³ of a channel's spread,
    past float16's 65504 for near-flat channels at any loss scale (VarSR's critic: every
    critic step non-finite from a few dozen steps on). bfloat16 has float32's range. A model in
    float64 keeps float64: a float32 x̂ would not match its critic's weights."""
    device = real.device.type
    half = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    dtype = torch.promote_types(real.dtype, torch.float32)  # float32, or float64 as given
    with torch.autocast(device, enabled=False) if half else contextlib.nullcontext():
        t = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        x = (t * real.to(dtype) + (1 - t) * fake.to(dtype)).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).square().mean()
