"""VSpSR: "Explorable Super-Resolution via Variational Sparse Representation" (Zhou, Huang, Gao,
Zhuang, NTIRE 2021 / CVPRW 2021, arXiv:2104.09838).

Written from the paper and the released code (docs/vspsr.md; zzhwfy/VSpSR
c2250ca; that repository has no licence, so nothing is copied). The HR image is x = m + e: m a
deterministic upsampling of the LR y, e a per-LR-pixel sparse combination e_i = z·ω_i of C learned
s×s atoms z (one basis per image and colour channel) with coefficients ω_i ~ N(μ_i, σ_i²) under a
Gamma-ARD sparsity prior (Eq. 1). ω is sampled at train and test time; `temperature` scales the
standard normal ε of ω = μ + σ·ε (0 gives ω = μ; the paper samples at 1). Loss, Eq. 6:
MSE + λ_ω·KL (Eq. 5, code form) + λ_adv·LSGAN + λ_per·VGG19-relu5_4 MSE (with --cem-train no
MSE, as the code's --postprocess). Test-time outputs pass through the exact MATLAB-bicubic CEM
(`sr_lib.cem`); deviations are listed in docs/vspsr.md.
"""

import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.cem import cem
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models.base import (
    WEIGHT,
    ModelConfig,
    Prepared,
    Recipe,
    SRModel,
    conv_radius,
    halo,
    model_tensor,
)
from sr_lib.models.blocks import conv3x3
from sr_lib.models.losses import (
    PER_OFF,
    VGGLoss,
    frozen_call,
    on_device,
    patch_too_small,
    sparse_prior_kl,
    vgg_min_size,
)
from sr_lib.models.vgg import NO_VGG, VGG19_RELU, VGGFeatures
from sr_lib.weights import load_strict

UPSAMPLING = ("bilinear", "bicubic", "none")
SPARSITY_THRESHOLD = 0.05  # |ω| below this counts as "near zero" in the logged sparsity


@dataclass
class VSpSRConfig(ModelConfig):
    n_basis: int = field(default=256, metadata=dict(help="atoms C (Table 1 #5: 64, widths 16)"))
    basis_channels: int = field(default=64, metadata=dict(help="basis blocks: c, 2c, 4c, 8c"))
    coef_channels: int = field(default=64, metadata=dict(help="coefficient convs: c, 2c, 4c, 8c"))
    upsample: str = field(
        default="bilinear",
        metadata=dict(choices=UPSAMPLING, help="m: interpolation (Table 1 #4: none = no m)"),
    )
    refine_m: bool = field(
        default=True, metadata=dict(help="m without the small learned conv U the code adds")
    )
    stochastic_w: bool = field(default=True, metadata=dict(help="ω = μ, not sampled (Table 1 #1)"))
    stochastic_basis: bool = field(
        default=False, metadata=dict(help="sample the basis z too (Table 1 #3)")
    )
    alpha: float = field(
        default=3.0, metadata=dict(help="Gamma prior shape α (Eq. 1)", range="(0, 1e6]")
    )
    beta: float = field(
        default=0.5, metadata=dict(help="Gamma prior rate β (fine-tune: 1.0)", range="(0, 1e6]")
    )
    lambda_w: float = field(
        default=0.1,
        metadata=dict(
            help="λ_ω: weight of the KL (Eq. 6; the paper gives none, the code's kl_weight: 0.1)",
            range=WEIGHT,
        ),
    )
    lambda_adv: float = field(
        default=0.01,
        metadata=dict(help="λ_adv, LSGAN (fine-tune: 0.1; 0 = no discriminator)", range=WEIGHT),
    )
    lambda_per: float = field(
        default=0.01,
        metadata=dict(help="λ_per, VGG19 loss (needs the vgg19 weights; 0 = off)", range=WEIGHT),
    )
    per_layer: str = field(
        default="relu5_4", metadata=dict(choices=tuple(VGG19_RELU), help="VGG19 tap of L_per")
    )
    per_imagenet_norm: bool = field(
        default=False, metadata=dict(help="ImageNet-normalise VGG inputs (the code does not)")
    )
    d_channels: int = field(default=64, metadata=dict(help="discriminator width (64..512)"))
    cem_train: bool = field(
        default=False, metadata=dict(help="apply the CEM in training too (then no MSE term)")
    )
    cem_test: bool = field(
        default=True, metadata=dict(help="samples without the CEM (by default it is applied)")
    )


def coefficient_sparsity(
    mu: torch.Tensor, sigma: torch.Tensor, threshold: float = SPARSITY_THRESHOLD
) -> torch.Tensor:
    """Expected fraction of sampled coefficients with |ω| < threshold, ω ~ N(μ, σ²) elementwise.

    σ = 0 gives the plain fraction of |μ| < threshold. Returns a 0-dim tensor in [0, 1].
    """
    sigma = sigma.clamp_min(1e-12)
    inside = torch.special.ndtr((threshold - mu) / sigma) - torch.special.ndtr(
        (-threshold - mu) / sigma
    )
    return inside.mean()


def from_released_key(key: str) -> str:
    """Our name of a key of the released code's state_dicts (zzhwfy/VSpSR): its checkpoints'
    `model` entry (`vspm.*`) and its criterion's discriminator (`Discriminator.layers.*`). The
    layers are the same modules in the same order; only the basis branch's indices shift, since
    ours keeps its pooling/linear/deconvolutions in three parts. Other keys come back unchanged."""
    m = re.match(r"vspm\.kernelbranch\.(\d+)\.(.*)", key)
    if m:  # 0-15 the conv blocks, 16 pool, 17 flatten, 18 linear, 19 unflatten, 20+ the up-convs
        i, rest = int(m[1]), m[2]
        return (
            f"basis.blocks.{i}.{rest}"
            if i < 16
            else ("basis.fc." if i == 18 else f"basis.up.{i - 20}.") + rest
        )
    m = re.match(r"vspm\.weightbranch\.(\d+)\.(.*)", key)
    if m:  # 0-11 conv, GroupNorm, ReLU ×4; 12 the 1×1 head
        return ("coef.head." if int(m[1]) == 12 else f"coef.body.{m[1]}.") + m[2]
    for old, new in RELEASED_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


RELEASED_PREFIXES = (
    ("vspm.upsamplebranch.", "refine."),
    ("vspm.finalbranch.", "final."),
    ("Discriminator.layers.", "discriminator.net."),
)


class BasisBranch(nn.Module):
    """Eqs. 2–3: L = 4 conv-IN-ReLU-pool blocks, global pooling, deconvolutions to C s×s atoms."""

    MIN_SIZE = 16  # four 2×2 max-pools

    def __init__(self, n_basis: int, ch: int, scale: int, stochastic: bool):
        super().__init__()
        widths = [1, ch, 2 * ch, 4 * ch, 8 * ch]
        blocks: list[nn.Module] = []
        for i, o in zip(widths, widths[1:]):
            blocks += [conv3x3(i, o), nn.InstanceNorm2d(o), nn.ReLU(True), nn.MaxPool2d(2)]
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(8 * ch, n_basis)
        c = n_basis
        up: list[nn.Module] = [nn.Conv2d(c, c, 2, padding=1)]  # 1×1 -> 2×2
        if scale == 3:
            up.append(nn.ConvTranspose2d(c, c, 2))  # -> 3×3 (not in the code: ×4 and ×8 only)
        if scale >= 4:
            up.append(nn.ConvTranspose2d(c, c, 3))  # -> 4×4
        if scale == 8:
            up.append(nn.ConvTranspose2d(c, c, 2, stride=2))  # -> 8×8
        up.append(nn.Conv2d(c, 2 * c if stochastic else c, 1))  # (μ_z, log σ_z²) when stochastic
        self.up = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < self.MIN_SIZE or w < self.MIN_SIZE:
            # Inputs under 16 px (tiny tests, tiles) would pool away: replicate-pad this branch
            # only. Its output is a global summary, so the pad changes it slightly, never the size.
            ph, pw = max(0, self.MIN_SIZE - h), max(0, self.MIN_SIZE - w)
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        f = self.blocks(x).mean(dim=(2, 3))  # global average pooling, (B·3, 8c)
        z0 = self.fc(f)[:, :, None, None]  # (B·3, C, 1, 1)
        return self.up(z0)  # (B·3, C or 2C, s, s)


class CoefficientBranch(nn.Module):
    """4 × (conv3x3, layer norm = GroupNorm(1, ·), ReLU) at LR size, then a 1×1 head: μ, log σ²."""

    def __init__(self, n_basis: int, ch: int):
        super().__init__()
        widths = [1, ch, 2 * ch, 4 * ch, 8 * ch]
        layers: list[nn.Module] = []
        for i, o in zip(widths, widths[1:]):
            layers += [conv3x3(i, o), nn.GroupNorm(1, o), nn.ReLU(True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(8 * ch, 2 * n_basis, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)  # (B·3, C, h, w) each
        return mu, logvar


class Discriminator(nn.Module):
    """LSGAN discriminator of the code (docs/vspsr.md): one sigmoid score per image, (B,)."""

    def __init__(self, ch: int = 64):
        super().__init__()

        def block(i, o, k, stride):
            return [nn.Conv2d(i, o, k, stride), nn.BatchNorm2d(o), nn.LeakyReLU(0.01, True)]

        self.net = nn.Sequential(
            *block(3, ch, 4, 2), *block(ch, 2 * ch, 4, 2), *block(2 * ch, 4 * ch, 1, 1),
            *block(4 * ch, 8 * ch, 1, 1), nn.Conv2d(8 * ch, 1, 1), nn.Sigmoid(),
        )  # fmt: skip

    # Two unpadded 4x4 convolutions of stride 2 leave a pixel of a patch of at least 10 px.
    min_size = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise patch_too_small("vspsr: the critic", self.min_size, x)
        return self.net(x).mean(dim=(1, 2, 3))


class VSpSR(SRModel):
    """m + final(e), e from the VSpM (basis × sampled coefficients), RGB channels in parallel."""

    Config = VSpSRConfig
    stochastic = True
    default_temperature = 1.0

    def __init__(self, cfg: VSpSRConfig):
        super().__init__(cfg)
        self.refine = None
        if cfg.upsample != "none" and cfg.refine_m:  # U: conv-ReLU-conv on the interpolation
            self.refine = nn.Sequential(conv3x3(3, 16), nn.ReLU(True), conv3x3(16, 3))
        self.basis = BasisBranch(cfg.n_basis, cfg.basis_channels, cfg.scale, cfg.stochastic_basis)
        self.coef = CoefficientBranch(cfg.n_basis, cfg.coef_channels)
        self.final = nn.Sequential(  # colour mixing, absent from the paper's x = m + e
            conv3x3(3, 16), nn.ReLU(True), conv3x3(16, 16), nn.ReLU(True), conv3x3(16, 3)
        )
        if cfg.lambda_adv > 0:  # no discriminator (and no second optimizer) at λ_adv = 0
            self.discriminator = Discriminator(cfg.d_channels)  # nn.Module registers it
        self._perceptual: list[nn.Module] = []  # a list keeps the frozen VGG out of state_dict

    @classmethod
    def input_consistency(cls, cfg: VSpSRConfig) -> list[str]:
        return (["--cem-train"] if cfg.cem_train else []) + (
            ["the CEM on samples (the default; --no-cem-test)"] if cfg.cem_test else []
        )

    @classmethod
    def sample_consistency(cls, cfg: VSpSRConfig) -> list[str]:
        return ["the CEM on its samples (trained without --no-cem-test)"] if cfg.cem_test else []

    @classmethod
    def unused_flags(cls, cfg: VSpSRConfig) -> dict[str, str]:
        """The ω prior's flags without a sampled ω, the discriminator's and the perceptual loss's
        when their weight is 0."""
        unused = {}
        if not cfg.stochastic_w:  # no ω term; λ_ω still weights the basis term of #3
            no_kl = ("alpha", "beta") + (() if cfg.stochastic_basis else ("lambda_w",))
            unused |= dict.fromkeys(no_kl, "with --no-stochastic-w (ω = μ: no KL term for ω)")
        if cfg.lambda_adv == 0:
            unused["d_channels"] = "with --lambda-adv 0 (no discriminator)"
        if cfg.lambda_per == 0:
            unused |= dict.fromkeys(("per_layer", "per_imagenet_norm"), "with --lambda-per 0")
        return unused

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        # Paper §4.2 + code: Adam(0.9, 0.999, 1e-8), weight decay 1e-4, lr 1e-4 ×0.1 every 100 of
        # 300 epochs; 800 images / batch 4 = 200 steps per epoch -> 60k steps; clip 0.1 (G and D).
        return replace(
            super().recipe(scale), batch=4, steps=60_000, weight_decay=1e-4,
            milestones=(1 / 3, 2 / 3), gamma=0.1, grad_clip=0.1, d_weight_decay=1e-4,
        )  # fmt: skip

    @classmethod
    def raw_config(cls, state_dict: dict, scale: int) -> dict:
        """The config of a released state_dict (`vspm.*` keys): widths and atoms off the shapes;
        m is present iff the file has U. The interpolation is not in the file: the released
        commands' (×8 bicubic, else bilinear). No discriminator keys: λ_adv = 0 (none built)."""
        cfg = super().raw_config(state_dict, scale)
        if not any(k.startswith("vspm.") for k in state_dict):
            return cfg  # our own key names: the default config
        shape = {k: tuple(v.shape) for k, v in state_dict.items()}
        try:
            n_basis = shape["vspm.kernelbranch.8.weight"][0]  # the code ties widths to C
            cfg |= dict(
                n_basis=n_basis,
                basis_channels=shape["vspm.kernelbranch.0.weight"][0],
                coef_channels=shape["vspm.weightbranch.0.weight"][0],
            )
        except KeyError:
            pass  # not the released layout after all: load_raw_state_dict names the keys
        if not any(k.startswith("vspm.upsamplebranch.") for k in state_dict):
            cfg["upsample"] = "none"
        elif scale == 8:
            cfg["upsample"] = "bicubic"
        if not any(k.startswith("Discriminator.") for k in state_dict):
            cfg["lambda_adv"] = 0.0
        return cfg

    def load_raw_state_dict(self, state_dict: dict, path="state_dict") -> None:
        """Load a released state_dict (`vspm.*`, the `model` entry of a released checkpoint) or
        one with our own key names, strictly."""
        if not any(k.startswith("vspm.") for k in state_dict):
            return super().load_raw_state_dict(state_dict, path)
        n = self.cfg.n_basis
        shape = {k: tuple(v.shape[:1]) for k, v in state_dict.items()}
        if shape.get("vspm.weightbranch.12.weight") == (n,) or shape.get(
            "vspm.kernelbranch.18.weight"
        ) == (2 * n,):
            raise CheckpointError(
                f"{path}: a released VSpSR trained without --variational_w or with "
                "--variational_z, a layout srspace does not build; only the released configs load"
            )
        sd = {from_released_key(k): v for k, v in state_dict.items()}
        c = self.cfg
        layout = f"vspsr x{self.scale} (C={c.n_basis}, upsample {c.upsample})"
        load_strict(self, sd, f"{path}: does not match the released {layout}")

    def patch_needs(self) -> list[tuple[str, int, str]]:
        needs = []
        if self.cfg.lambda_per > 0:
            needs.append(("the VGG19 perceptual loss", vgg_min_size(self.cfg.per_layer), PER_OFF))
        if self.discriminator is not None:
            needs.append(("vspsr: the critic", self.discriminator.min_size, ""))
        return needs

    def check_files(self, loaded: bool) -> None:
        if self.cfg.cem_train:  # (sr_train.py: before the data is read, as a missing file)
            self.check_cem_train()
        if self.cfg.lambda_per > 0:
            self.perceptual_loss()  # the VGG19 weights

    def check_cem_train(self) -> None:
        """--cem-train drops the MSE (as the released --postprocess): the image then learns from
        the adversarial and perceptual terms alone, so one of them must be on."""
        if self.cfg.lambda_adv == 0 and self.cfg.lambda_per == 0:
            raise UsageError(
                "--cem-train (cem_train=True) trains the image by --lambda-adv and --lambda-per "
                "alone (no MSE after the CEM, as the released code), and both are 0: give one "
                "of them a weight > 0, or drop --cem-train"
            )

    def set_perceptual_loss(self, loss: nn.Module) -> None:
        """Use this (sr, hr) -> loss module for L_per instead of building the VGG19 one."""
        self._perceptual[:] = [loss]

    def perceptual_loss(self) -> nn.Module:
        """The frozen VGG19 loss, built on first use (CheckpointError if the file is missing)."""
        if not self._perceptual:
            c = self.cfg
            vgg = VGGFeatures((c.per_layer,), c.per_imagenet_norm, missing_hint=NO_VGG)
            self._perceptual.append(VGGLoss(vgg))
        return self._perceptual[0]

    def deterministic_part(self, lr: torch.Tensor) -> torch.Tensor | None:
        """m = U(interp(y)), (B, 3, sH, sW); None for --upsample none (Table 1 #4)."""
        if self.cfg.upsample == "none":
            return None
        m = F.interpolate(lr, scale_factor=self.scale, mode=self.cfg.upsample, align_corners=False)
        return m if self.refine is None else self.refine(m)

    def distributions(self, lr: torch.Tensor):
        """Basis (B·3, C or 2C, s, s) and coefficient μ, log σ² (B·3, C, h, w) of an LR batch."""
        b, c, h, w = lr.shape
        x = lr.reshape(b * c, 1, h, w)  # paper §3.2: R, G, B as separate grey images, one network
        mu, logvar = self.coef(x)
        return self.basis(x), mu, logvar

    def synthesize(self, basis: torch.Tensor, w: torch.Tensor, b: int) -> torch.Tensor:
        """e_i = z·ω_i for every LR pixel i (paper §3.1), patches laid out by PixelShuffle."""
        bc, n_basis, h, wd = w.shape
        s = self.scale
        z = basis.reshape(bc, n_basis, s * s).transpose(1, 2)  # (B·3, s², C), row-major atoms
        e = torch.bmm(z, w.reshape(bc, n_basis, h * wd))  # (B·3, s², h·w)
        e = F.pixel_shuffle(e.view(bc, s * s, h, wd), s)  # (B·3, 1, sh, sw): atom index = sub-pixel
        return e.view(b, bc // b, h * s, wd * s)  # (B, 3, sh, sw)

    def decode(self, e: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        out = self.final(e)
        return out if m is None else out + m  # out of place (the code's in-place add aliases)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        lr, hr = self.check_inputs(lr, hr)  # one line for a wrong input, not a conv's error
        c = self.cfg
        basis, mu, logvar = self.distributions(lr)
        std = torch.exp(0.5 * logvar)
        w = mu + std * torch.randn_like(mu) if c.stochastic_w else mu  # sampled in training too
        # The KL terms, weighted together by λ_ω. ω = μ (Table 1 #1) has no distribution to
        # restrict: no ω term then, as the code adds KL_w only with --variational_w.
        kls = [sparse_prior_kl(mu, logvar, c.alpha, c.beta).mean()] if c.stochastic_w else []
        parts = {}  # (the ω term: a mean where Eq. 5 sums)
        if c.stochastic_basis:
            z_mu, z_logvar = basis.chunk(2, dim=1)
            basis = z_mu + torch.exp(0.5 * z_logvar) * torch.randn_like(z_mu)
            # N(0, I) prior on the atoms (ablation #3; the paper gives none), in the released
            # code's form: μ_z² + σ_z² − log σ_z² = 2·KL + 1, averaged, weighted by λ_ω as ω's.
            kl_z = (z_mu.square() + z_logvar.exp() - z_logvar).mean()
            parts["kl_z"] = kl_z.detach()
            kls.append(kl_z)
        sr = self.decode(self.synthesize(basis, w, lr.shape[0]), self.deterministic_part(lr))
        if c.cem_train:
            self.check_cem_train()
            sr = cem(sr, lr, self.scale)
        mse = F.mse_loss(sr, hr)  # Eq. 4 with 1/(2σ₀²) absorbed into the λs
        # --cem-train trains without it, as the released code's --postprocess (its criterion's
        # losses start empty there): logged only.
        loss = torch.zeros_like(mse) if c.cem_train else mse
        if kls:
            kl = sum(kls)  # (0 + a + b: the same bits as a + b)
            loss = loss + c.lambda_w * kl
            parts = {"kl": kl.detach(), **parts}
        if self.discriminator is not None:
            score = frozen_call(self.discriminator, sr)
            # ones of the score's dtype: torch 2.6's backward refuses a float32 target in float64
            adv = F.mse_loss(score, torch.ones_like(score))
            loss = loss + c.lambda_adv * adv
            parts["adv"] = adv.detach()
        if c.lambda_per > 0:
            per = on_device(self.perceptual_loss(), model_tensor(self))(sr, hr)
            loss = loss + c.lambda_per * per
            parts["per"] = per.detach()
        sigma = std.detach() if c.stochastic_w else torch.zeros_like(mu)  # ω = μ: σ unused
        sparsity = coefficient_sparsity(mu.detach(), sigma)
        return {
            "loss": loss, "mse": mse.detach(), **parts,
            "sparsity": sparsity, "sr": sr,
        }  # fmt: skip

    def graph_key(self) -> tuple:
        return ()  # no phases: every step runs the same kernels

    def discriminator_loss(self, lr: torch.Tensor, hr: torch.Tensor, out: dict) -> dict:
        """LSGAN: ½·MSE(D(ŷ), 0) + ½·MSE(D(y), 1), ŷ detached (docs/vspsr.md, "Losses")."""
        # Real first, as the released criterion: each training-mode call moves the BatchNorm
        # running statistics, and their order decides them (the eval-mode scores).
        real = self.discriminator(hr)
        fake = self.discriminator(out["sr"].detach())
        loss = 0.5 * F.mse_loss(fake, torch.zeros_like(fake)) + 0.5 * F.mse_loss(
            real, torch.ones_like(real)
        )
        return {"loss": loss, "real": real.mean().detach(), "fake": fake.mean().detach()}

    def prepare(self, lr: torch.Tensor) -> Prepared:
        """Basis, coefficient distributions and m: everything but ω's draw depends on the LR alone.
        Computed on the whole image (the basis pools globally, the coefficient branch's layer
        norm takes whole-image statistics), so tiles cut them instead of seeing only themselves."""
        basis, mu, logvar = self.distributions(lr)
        m = self.deterministic_part(lr)
        maps = {"mu": mu, "logvar": logvar} | ({} if m is None else {"m": m})
        return Prepared(lr.shape[-2:], maps, {"basis": basis})

    @property
    def tile_halo(self) -> int:
        """Given `prepare`, a tile computes e (per LR pixel) and the HR convs of `final`."""
        return halo(conv_radius(self.final) / self.scale)

    def finish(self, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """The test-time CEM, on the whole image (it is a global projection)."""
        return cem(sr, lr, self.scale) if self.cfg.cem_test else sr

    def generate(self, lr: torch.Tensor, n: int, temperature: float, noise, prepared=None):
        """n samples before the test-time CEM (`finish`); `prepared` as `prepare(lr)` (or cut)."""
        c = self.cfg
        b, ch, h, w = lr.shape
        p = self.prepare(lr) if prepared is None else prepared
        basis, mu, logvar, m = p.extra["basis"], p.maps["mu"], p.maps["logvar"], p.maps.get("m")
        random_w = c.stochastic_w and temperature > 0  # temperature 0: ω = μ (and z = μ_z)
        random_z = c.stochastic_basis and temperature > 0
        if random_w:  # a spatial field: tiled sampling cuts it from the whole-image draw
            std = torch.exp(0.5 * logvar) * temperature
            eps = noise.field(ch * c.n_basis, h, w).reshape(b, n, ch * c.n_basis, h, w)
        if c.stochastic_basis:
            basis, z_logvar = basis.chunk(2, dim=1)  # μ_z, log σ_z²
        if random_z:
            z_std = torch.exp(0.5 * z_logvar) * temperature
            eps_z = noise.vector(ch * c.n_basis * self.scale**2).view(b, n, -1)  # global atoms
        out = []
        for i in range(n):  # one sample at a time: ω alone is C× the size of the LR
            wi = mu + std * eps[:, i].reshape_as(mu) if random_w else mu
            zi = basis + z_std * eps_z[:, i].reshape_as(basis) if random_z else basis
            out.append(self.decode(self.synthesize(zi, wi, b), m))
        return torch.stack(out, dim=1)  # (B, n, 3, sH, sW); sample() applies finish, clamps
