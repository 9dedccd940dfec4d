"""VarSR: "VarSR: Variational Super-Resolution Network for Very Low Resolution Images" (S. Hyun,
J.-P. Heo, ECCV 2020).

No official code is public and the architecture details are in a supplement that is not
available: written from the paper (docs/vae.md: what the paper fixes and what srspace chooses
as design decisions, marked [derived] below). Two stochastic encoders give diagonal Gaussians over a
D-dimensional latent, E_L(I_L) = p(z | LR) and E_H(I_H) = q(z | HR) (Eq. 3); the generator
G(I_L, z) is SRGAN-like (8 residual blocks, the paper's face setting). Training (Eq. 9):
λ_pixel·MSE(G(I_L, z), I_H) with z ~ q(z | HR) (Eq. 6) + λ_KL·KL(q ‖ p) (Eq. 7) + λ_adv·WGAN-GP
(Eq. 8, switched on after `adv_start` of training, as SRGAN) + λ_per·VGG19 loss (§4.2).
Sampling: z ~ p(z | LR) with σ scaled by `temperature` (Eq. 4; 1 = the paper, 0 = μ_L).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.models.base import (
    WEIGHT,
    LatentSRModel,
    ModelConfig,
    Recipe,
    conv_radius,
    halo,
    model_tensor,
    option,
    staged_radius,
)
from sr_lib.models.blocks import conv3x3
from sr_lib.models.losses import (
    PER_OFF,
    VGGLoss,
    frozen_call,
    gaussian_kl,
    gradient_penalty,
    on_device,
    patch_too_small,
    vgg_min_size,
)
from sr_lib.models.vgg import NO_VGG, VGG19_RELU, VGGFeatures
from sr_lib.resize import imresize_torch


@dataclass
class VarSRConfig(ModelConfig):
    z_dim: int = option(256, "latent size D (paper: 256 faces, 64 digits)")
    n_feats: int = option(64, "generator channels")
    n_blocks: int = option(8, "generator residual blocks (paper: 8, as MR-GAN)", range="[0, inf)")
    enc_feats: int = option(64, "encoder widths c, 2c, 4c, 4c (4 stride-2 convs)")
    residual: bool = option(True, "tanh output instead of bicubic(LR) + a learned residual")
    lambda_pixel: float = option(1.0, "λ_pixel, MSE on [-1, 1] (Eq. 6)", range=WEIGHT)
    lambda_kl: float = option(
        0.01, "λ_KL (paper: 0.01 or 0.02 CelebA, 0.01 MNIST, 0.05 plates)", range=WEIGHT
    )
    lambda_adv: float = option(0.001, "λ_adv, WGAN-GP (Eq. 8; 0 = no critic)", range=WEIGHT)
    adv_start: float = option(
        0.5,
        "fraction of training before the adversarial loss is switched on (the paper: a first "
        "phase without it, of unstated length)",
        range="[0, 1]",
    )
    gp_weight: float = option(10.0, "gradient-penalty weight δ (Eq. 8)", range=WEIGHT)
    lambda_per: float = option(
        0.006, "λ_per, VGG19 feature MSE (SRGAN's 1/12.75²; 0 = off)", range=WEIGHT
    )
    per_layer: str = option(
        "relu5_4", "VGG19 tap of the perceptual loss (SRGAN: relu5_4)", choices=tuple(VGG19_RELU)
    )
    pretrained: bool = option(True, "random frozen VGG19 for the perceptual loss (tests only)")
    d_channels: int = option(64, "critic width (SRGAN: 64)")
    d_layers: int = option(
        8, "critic conv layers (SRGAN: 8; paper digits: 5)", choices=(5, 6, 7, 8)
    )


class Encoder(nn.Module):
    """4 stride-2 conv3x3 + LReLU(0.2), global average pool, FC -> μ, log σ² (docs/vae.md)."""

    def __init__(self, ch: int, z_dim: int):
        super().__init__()
        widths, layers = [3, ch, 2 * ch, 4 * ch, 4 * ch], []
        for i, o in zip(widths, widths[1:]):
            layers += [nn.Conv2d(i, o, 3, 2, 1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * ch, 2 * z_dim)  # log σ² rather than σ: a stability choice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.fc(self.body(x).mean(dim=(2, 3))).chunk(2, dim=1)  # (B, D) each
        return mu, logvar


class ResBlock(nn.Module):
    """SRGAN residual block: conv-BN-PReLU-conv-BN + skip."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(ch, ch), nn.BatchNorm2d(ch), nn.PReLU(),
                                  conv3x3(ch, ch), nn.BatchNorm2d(ch))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """G(I_L, z): SRGAN-like; z projected to n_feats channels, tiled over the LR grid and fused
    with the LR features (works for any LR size) [derived]."""

    def __init__(self, c: "VarSRConfig"):
        super().__init__()
        f = c.n_feats
        self.head = nn.Sequential(conv3x3(3, f), nn.PReLU())
        self.z_proj = nn.Linear(c.z_dim, f)
        self.fuse = nn.Conv2d(2 * f, f, 1)
        self.body = nn.Sequential(*[ResBlock(f) for _ in range(c.n_blocks)],
                                  conv3x3(f, f), nn.BatchNorm2d(f))  # fmt: skip
        stages = [3] if c.scale == 3 else [2] * (c.scale.bit_length() - 1)
        up: list[nn.Module] = []
        for r in stages:  # sub-pixel convolution stages (SRGAN)
            up += [conv3x3(f, f * r * r), nn.PixelShuffle(r), nn.PReLU()]
        self.tail = nn.Sequential(*up, conv3x3(f, 3))
        if c.residual:  # zero residual at init: training starts from the bicubic image
            nn.init.zeros_(self.tail[-1].weight)
            nn.init.zeros_(self.tail[-1].bias)

    def radius(self) -> float:
        """Receptive field in LR px (z is global: the same for every tile)."""
        lr_part = conv_radius(self.head) + conv_radius(self.fuse) + conv_radius(self.body)
        return lr_part + staged_radius(self.tail)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.head(x)  # (B, f, h, w)
        zt = self.z_proj(z)[:, :, None, None].expand_as(h)  # (B, f, h, w): z at every LR pixel
        h = self.fuse(torch.cat([h, zt], dim=1))
        return self.tail(h + self.body(h))  # (B, 3, sh, sw)


class Critic(nn.Module):
    """SRGAN's discriminator with Instance Norm and no sigmoid (WGAN-GP needs a raw score); global
    pooling before the dense layers so any size works [derived]. One score per image, (B,)."""

    def __init__(self, ch: int = 64, n_layers: int = 8):
        super().__init__()
        plan = [(ch, 1), (ch, 2), (2 * ch, 1), (2 * ch, 2), (4 * ch, 1), (4 * ch, 2),
                (8 * ch, 1), (8 * ch, 2)][:n_layers]  # fmt: skip
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, 1, 1), nn.LeakyReLU(0.2)]
        for (i, _), (o, stride) in zip(plan, plan[1:]):
            layers += [nn.Conv2d(i, o, 3, stride, 1), nn.InstanceNorm2d(o), nn.LeakyReLU(0.2)]
        last = plan[-1][0]
        # Instance Norm needs > 1 pixel after the last stride-2 conv (k 3, pad 1: ceil(H / 2)).
        self.min_size = 2 ** sum(stride == 2 for _, stride in plan[1:]) + 1
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(last, 16 * ch, 1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(16 * ch, 1, 1))  # SRGAN's dense 1024 and 1  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise patch_too_small("varsr: the critic", self.min_size, x)
        return self.head(self.body(x).mean(dim=(2, 3), keepdim=True)).flatten()


class VarSR(LatentSRModel):
    """G(I_L, z) with z ~ q(z | HR) in training and z ~ p(z | LR) at test time (paper §3)."""

    Config = VarSRConfig
    sample_controls = ("latent", "latent_shift", "latent_from")  # sr_sample.py --latent*

    def __init__(self, cfg: VarSRConfig):
        super().__init__(cfg)
        self.enc_lr = Encoder(cfg.enc_feats, cfg.z_dim)  # E_L, on bicubic(LR) at HR size
        self.enc_hr = Encoder(cfg.enc_feats, cfg.z_dim)  # E_H
        self.gen = Generator(cfg)
        if cfg.lambda_adv > 0:
            self.discriminator = Critic(cfg.d_channels, cfg.d_layers)
        self._perceptual: list[nn.Module] = []  # a list keeps the frozen VGG out of state_dict
        self._adv_on = False  # set by on_step: phase 2

    @classmethod
    def unused_flags(cls, cfg: VarSRConfig) -> dict[str, str]:
        """The critic's and the perceptual loss's flags when their weight is 0."""
        unused = {}
        if cfg.lambda_adv == 0:
            critic = ("d_channels", "d_layers", "gp_weight", "adv_start")
            unused |= dict.fromkeys(critic, "with --lambda-adv 0 (no critic)")
        if cfg.lambda_per == 0:  # (its VGG19 alone is what --no-pretrained makes random)
            unused |= dict.fromkeys(("per_layer", "pretrained"), "with --lambda-per 0")
        return unused

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        # Paper §4.2: Adam(0.9, 0.99), lr 1e-4 decayed once (when and how much: not given; here
        # ×0.1 for the last quarter), the critic with the same Adam. Batch, steps and patch are
        # not given [derived]: batch 64, 100k steps, the paper's LR sizes (8² at ×8, 6² at ×4).
        return replace(
            super().recipe(scale), batch=64, patch=8 if scale == 8 else 6 if scale == 4 else 16,
            steps=100_000, betas=(0.9, 0.99), milestones=(0.75,), gamma=0.1, d_betas=(0.9, 0.99),
        )  # fmt: skip

    def on_step(self, step: int, total: int) -> None:
        # SRGAN's two phases (paper §4.2): no adversarial loss (no critic steps) before adv_start.
        self._adv_on = self.discriminator is not None and step >= self.cfg.adv_start * total

    def graph_key(self) -> tuple:
        return (self._adv_on,)  # phase 2 adds the adversarial loss and the critic's steps

    def set_adversarial(self, on: bool) -> None:
        """Switch the adversarial phase by hand (tests, fine-tuning scripts)."""
        self._adv_on = on and self.discriminator is not None

    def patch_needs(self) -> list[tuple[str, int, str]]:
        needs = []
        if self.cfg.lambda_per > 0:
            needs.append(("the VGG19 perceptual loss", vgg_min_size(self.cfg.per_layer), PER_OFF))
        if self.discriminator is not None and self.cfg.adv_start < 1:  # (phase 2 comes)
            needs.append(("varsr: the critic", self.discriminator.min_size, ""))
        return needs

    def check_files(self, loaded: bool) -> None:
        if self.cfg.lambda_per > 0:
            self.perceptual_loss()  # the VGG19 weights

    def perceptual_loss(self) -> nn.Module:
        """Frozen VGG19 feature MSE, built on first use (CheckpointError if weights are missing)."""
        if not self._perceptual:
            c = self.cfg
            vgg = VGGFeatures((c.per_layer,), True, pretrained=c.pretrained, missing_hint=NO_VGG)
            self._perceptual.append(VGGLoss(vgg))
        return self._perceptual[0]

    def prior(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z | LR) = E_L(bicubic(LR)): μ, log σ² (B, D) each."""
        return self.enc_lr(2 * imresize_torch(lr, self.scale) - 1)

    def posterior(self, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | HR) = E_H(HR): μ, log σ² (B, D) each."""
        return self.enc_hr(2 * hr - 1)

    def decode(self, lr: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """G(I_L, z) in [0, 1] units (B, 3, sH, sW); internally [-1, 1] (GAN convention)."""
        out = self.gen(2 * lr - 1, z)
        if self.cfg.residual:
            return imresize_torch(lr, self.scale) + 0.5 * out
        return 0.5 * (torch.tanh(out) + 1)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        lr, hr = self.check_inputs(lr, hr)  # one line for a wrong input, not a conv's error
        c = self.cfg
        mu_h, logvar_h = self.posterior(hr)
        mu_l, logvar_l = self.prior(lr)
        z = mu_h + torch.exp(0.5 * logvar_h) * torch.randn_like(mu_h)  # Eq. 6: z ~ q(z | HR)
        sr = self.decode(lr, z)
        pixel = F.mse_loss(2 * sr - 1, 2 * hr - 1)  # Eq. 6, on the [-1, 1] range
        kl = gaussian_kl(mu_h, logvar_h, mu_l, logvar_l).mean()  # Eq. 7: sum over D, batch mean
        loss = c.lambda_pixel * pixel + c.lambda_kl * kl
        parts = {}
        if c.lambda_per > 0:
            per = on_device(self.perceptual_loss(), model_tensor(self))(sr, hr)
            loss = loss + c.lambda_per * per
            parts["per"] = per.detach()
        if self._adv_on:
            adv = -frozen_call(self.discriminator, 2 * sr - 1).mean()  # generator side of Eq. 8
            loss = loss + c.lambda_adv * adv
            parts["adv"] = adv.detach()
        return {"loss": loss, "pixel": pixel.detach(), "kl": kl.detach(), **parts, "sr": sr}

    def discriminator_loss(self, lr: torch.Tensor, hr: torch.Tensor, out: dict) -> dict:
        """WGAN-GP critic loss (Eq. 8): E[D(ŷ)] − E[D(y)] + δ·E[(‖∇D(x̂)‖₂ − 1)²], x̂ on lines
        between real and generated images. Zero (no critic step) before the adversarial phase.
        The training loop makes one critic step per generator step (WGAN-GP used 5)."""
        if not self._adv_on:
            return {"loss": hr.new_zeros(())}
        real, fake = 2 * hr - 1, 2 * out["sr"].detach() - 1
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        gp = gradient_penalty(self.discriminator, real, fake)
        loss = d_fake.mean() - d_real.mean() + self.cfg.gp_weight * gp
        return {"loss": loss, "wasserstein": (d_real.mean() - d_fake.mean()).detach(),
                "gp": gp.detach()}  # fmt: skip

    @torch.no_grad()
    def latents(
        self, lr: torch.Tensor, n: int, temperature: float, noise, latent_from=None,
        latent_from_mu=None,
    ) -> torch.Tensor:  # fmt: skip
        """z (B, n, D): μ_L + temperature·σ_L·ε (Eq. 4), or with `latent_from` (HR images
        (1 or B, 3, H, W) in [0, 1]) the HR encoder's mean μ_H (attribute transfer, Fig. 4b), or
        that mean (1 or B, D) given as `latent_from_mu` (`encode_references`)."""
        b, d = lr.shape[0], self.cfg.z_dim
        if latent_from is not None:
            latent_from_mu = self.posterior(latent_from.to(lr))[0]
        if latent_from_mu is not None:
            return latent_from_mu[:, None].expand(b, n, d)
        mu, logvar = self.prior(lr)
        eps = noise.vector(d).view(b, n, d)  # a global vector: the same for every tile
        return mu[:, None] + temperature * torch.exp(0.5 * logvar)[:, None] * eps

    def encode_references(self, cond: dict, like: torch.Tensor) -> dict:
        """--latent-from HR: its μ_H, the same values `latents` computes from the image."""
        if cond.get("latent_from") is None:
            return cond
        hr = cond["latent_from"]
        rest = {k: v for k, v in cond.items() if k != "latent_from"}
        return {**rest, "latent_from_mu": self.posterior(hr.to(like))[0]}

    @property
    def tile_halo(self) -> int:
        """The generator's receptive field; bicubic(LR) needs 2 LR px (its kernel's radius)."""
        return halo(self.gen.radius(), 2)

    def decode_latents(self, lr: torch.Tensor, z: torch.Tensor, prepared=None) -> torch.Tensor:
        return torch.stack([self.decode(lr, z[:, i]) for i in range(z.shape[1])], dim=1)
