"""RefVAE: "Variational AutoEncoder for Reference based Image Super-Resolution" (Z.-S. Liu,
W.-C. Siu, L.-W. Wang, NTIRE 2021 workshop, CVPRW 2021).

Written from the paper and the released code (docs/vae.md) (Holmes-Alan/RefVAE
836b8f1, MIT); nothing is copied. A frozen VGG encoder maps the bicubic-upscaled LR and a reference
R (resized to 256×256) to relu4_1 features; a CVAE (feature encoder -> z -> feature decoder) turns
F_R into conditional features C_R that modulate the LR features, F = C_R·(1 + F_σ) + F_μ (§3.2);
an image decoder predicts the residual over the bicubic image. Other references, or other z, give
other SR images. `temperature` scales the ε of z = μ + σ·ε and of the noise references.

Encoder (`encoder`): by default torchvision VGG19 `features` up to relu4_1 with ImageNet input
normalisation and zero padding (manifest entry `vgg19`), which also gives the content and style
losses; `r41` is the code's LinearStyleTransfer encoder (`R41Encoder`, manifest entry `vgg_r41`),
the one the released generators were trained on, with VGG19 for the losses as in the code. The
encoder's weights are loaded at the first step or sample and kept in the state_dict (so an
srspace checkpoint samples without a weights file). A released generator state_dict loads as a raw
state_dict (`raw_config`: encoder r41, torch bicubic). Loss defaults: the paper's weights (Eq. 9)
over the code's sum reductions; the code's other terms are options (docs/vae.md).
"""

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.config import config_flag
from sr_lib.data import list_images, read_image, to_tensor
from sr_lib.errors import CheckpointError, DataError, UsageError
from sr_lib.lpips_net import load_alexnet_trunk, lpips_module
from sr_lib.models.base import (
    WEIGHT,
    LatentSRModel,
    ModelConfig,
    Prepared,
    Recipe,
    conv_radius,
    halo,
    model_tensor,
    option,
    scale_window,
    staged_radius,
)
from sr_lib.models.blocks import conv3x3
from sr_lib.models.losses import (
    frozen_call,
    on_device,
    patch_too_small,
    standard_normal_kl,
    style_stats,
    tv_map,
)
from sr_lib.models.vgg import VGG19_RELU, VGGFeatures
from sr_lib.resize import imresize_torch
from sr_lib.weights import load_state_dict, load_strict, resolve, torchvision_model

VGG_CH = 512  # relu4_1 channels
NOISE_MEAN, NOISE_STD = 0.249, 0.145  # moments of the code's uint8 U{0..127}/255 noise reference
REF_SEED = 0x5EF  # training references of step t: default_rng([REF_SEED, t])
CONTENT_DOWN = ("lr", "pyramid", "none")
STYLE_OFF = "; or --lambda-style 0"  # the way out of a patch too small for the style loss
R41_MIN = 16  # px: the r41 encoder's reflection padding needs 2 positions at 1/8
# Where vgg_r41.pth comes from (the manifest entry has no URL), for the missing-file message
R41_SOURCE = (
    "it is models/vgg_r41.pth of the released RefVAE code (Holmes-Alan/RefVAE, from "
    "LinearStyleTransfer)"
)


@dataclass
class RefVAEConfig(ModelConfig):
    width: int = option(
        512, "LR-branch / fusion channels (512 = code); the decoder halves it 3×", range="[8, inf)"
    )
    cond_channels: int = option(64, "channels of the CVAE feature maps (code: 64)")
    latent_grid: int = option(16, "CVAE feature grid side (code: 16, i.e. 16·16·64 -> z)")
    z_dim: int = option(256, "latent size D (code: 256)")
    mask_blocks: int = option(3, "residual blocks of the LR branch (code: 3)", range="[0, inf)")
    ref_size: int = option(256, "references are resized to this square (paper: 256)")
    ref_data: str = option("hr", "training references: hr (the HR patch, as the code) or a folder")
    pretrained: bool = option(True, "random frozen VGG19/AlexNet, no ImageNet weights (tests only)")
    encoder: str = option(
        "vgg19",
        "frozen encoder: vgg19 (ImageNet VGG19, zero padding) or r41 (the released code's "
        "vgg_r41.pth: 1x1 conv, reflection padding, no normalisation)",
        choices=("vgg19", "r41"),
    )
    bicubic: str = option(
        "matlab",
        "bicubic of the skip, the Down and LR terms: matlab (imresize) or torch (the code)",
        choices=("matlab", "torch"),
    )
    lambda_content: float = option(1.0, "VGG relu4_1 L1 of Eq. 6 (code: 0.01)", range=WEIGHT)
    lambda_pixel: float = option(1.0, "pixel + Down L1 of Eq. 6 (code: 1)", range=WEIGHT)
    content_down: str = option(
        "lr", "Down of Eq. 6: lr (×1/s), pyramid (×½, ×¼: code), none", choices=CONTENT_DOWN
    )
    lambda_lr: float = option(
        0.0, "L1(Down_s(SR), LR input), the code's LR consistency (code: 100)", range=WEIGHT
    )
    lambda_style: float = option(10.0, "style loss, Eq. 7", range=WEIGHT)
    style_layers: str = option(
        "relu1_2,relu2_2,relu3_4,relu4_1", "VGG19 taps of Eq. 7 (code: relu1_1,relu2_1,...,relu4_1)"
    )
    style_target: str = option(
        "ref",
        "style statistics of: ref (paper text) or hr (Eq. 7 as printed)",
        choices=("ref", "hr"),
    )
    lambda_lpips: float = option(1.0, "LPIPS-alex loss (code: 1e4 on the mean map)", range=WEIGHT)
    lambda_tv: float = option(1.0, "TV loss, Eq. 8 (code: 0)", range=WEIGHT)
    tv_beta: float = option(1.0, "TV exponent β of Eq. 8 (not given by the paper)", range="(0, 10]")
    lambda_kl: float = option(1.0, "KL(q(z|R) ‖ N(0, I)), Eq. 4", range=WEIGHT)
    lambda_adv: float = option(
        1.0, "adversarial loss (not in Eq. 9; code: 1; 0 = no D unless FM)", range=WEIGHT
    )
    adv_loss: str = option(
        "gan", "gan: −log D(SR) (Eq. 5); l1: |D(SR) − 1| (code)", choices=("gan", "l1")
    )
    lambda_fm: float = option(0.0, "discriminator feature matching L1 (code: 0.01)", range=WEIGHT)
    d_channels: int = option(32, "discriminator width (code: 32)")
    reduction: str = option(
        "sum", "reduce every term by sum (code) or mean", choices=("sum", "mean")
    )


class ResBlock(nn.Module):
    """conv-LReLU-conv + skip, then LReLU(0.01) (docs/vae.md, "Architecture")."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(ch, ch), nn.LeakyReLU(0.01), conv3x3(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.body(x), 0.01)


class Generator(nn.Module):
    """The code's VAE_v3 (docs/vae.md): CVAE over F_R, LR branch, fusion, image decoder."""

    def __init__(self, c: RefVAEConfig):
        super().__init__()
        w, k, self.grid = c.width, c.cond_channels, c.latent_grid
        self.init_feat = nn.Sequential(
            nn.Conv2d(VGG_CH, k, 1), nn.BatchNorm2d(k), nn.LeakyReLU(0.01),
            conv3x3(k, k), nn.BatchNorm2d(k), nn.LeakyReLU(0.01),
        )  # fmt: skip
        self.feat_enc = nn.Linear(k * self.grid**2, 2 * c.z_dim)  # -> (μ, log σ²)
        self.feat_dec = nn.Linear(c.z_dim, k * self.grid**2)
        self.cond = nn.Sequential(nn.Conv2d(k, w, 1), ResBlock(w))
        mask = [nn.Conv2d(VGG_CH, w, 1), *[ResBlock(w) for _ in range(c.mask_blocks)]]
        self.mask = nn.Sequential(*mask, nn.Conv2d(w, 2 * w, 1))
        dec: list[nn.Module] = []
        for i, o in ((w, w // 2), (w // 2, w // 4), (w // 4, w // 8)):  # r41 is at 1/8: ×8 back
            dec += [nn.Upsample(scale_factor=2, mode="bilinear"), conv3x3(i, o), nn.LeakyReLU(0.01)]
        dec += [nn.Conv2d(w // 8, w // 8, 1), nn.LeakyReLU(0.01), conv3x3(w // 8, 3)]
        self.decoder = nn.Sequential(*dec)
        # [derived] zero residual at init: training starts from the bicubic image (the code
        # initialises this conv randomly, which starts ~14 dB below bicubic)
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def encode(self, f_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature encoder: F_R (N, 512, h, w) -> μ, log σ² (N, D) each."""
        h = F.interpolate(self.init_feat(f_r), size=(self.grid, self.grid), mode="bilinear")
        mu, logvar = self.feat_enc(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    def modulation(self, f_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F_μ, F_σ (B, width, h, w) of the LR features F_X (B, 512, h, w): the code's order."""
        f_mu, f_sigma = self.mask(f_x).chunk(2, dim=1)
        return f_mu, f_sigma

    def decode(self, f_mu: torch.Tensor, f_sigma: torch.Tensor, z: torch.Tensor,
               window=None) -> torch.Tensor:  # fmt: skip
        """Residual (B, 3, 8h, 8w) from the modulation (B, width, h, w) and z (B, D). window: the
        tile (y0, x0, h, w, H, W) of a whole (H, W) feature map these are cut to: the latent grid
        is stretched over the whole image and cut, as without tiles."""
        c_r = self.feat_dec(z).view(z.shape[0], -1, self.grid, self.grid)  # (B, k, g, g)
        if window is None:
            c_r = F.interpolate(c_r, size=f_mu.shape[-2:], mode="bilinear")
        else:
            y0, x0, h, w = window[:4]
            c_r = F.interpolate(c_r, size=window[4:], mode="bilinear")[
                ..., y0 : y0 + h, x0 : x0 + w
            ]
        return self.decoder(self.cond(c_r) * (1 + f_sigma) + f_mu)  # C_R; paper §3.2 fusion

    def radius(self) -> float:
        """Receptive field of `decode` in pixels of its input (HR/8): C_R's convs, then the
        decoder's bilinear ×2 steps and convs at 1/4, 1/2 and 1 of HR."""
        return conv_radius(self.cond) + staged_radius(self.decoder)


class R41Encoder(nn.Module):
    """The code's encoder (LinearStyleTransfer's `encoder4`, vgg_r41.pth): a 1×1 conv 3 -> 3, then
    VGG19's 3×3 convs to relu4_1 with reflection padding; input in [0, 1], not normalised. The
    parameter names are the file's (conv1 ... conv10), so vgg_r41.pth loads as it is."""

    CHANNELS = (3, 64, 64, 128, 128, 256, 256, 256, 256, 512)  # conv2 ... conv10: in -> out
    POOL_AFTER = (3, 5, 9)  # max-pool 2×2 after conv3, conv5, conv9 (relu1_2, relu2_2, relu3_4)

    def __init__(self):
        super().__init__()
        # The same random weights every time (pretrained=False: tests), drawn from their own seed
        # so building the model does not move the run's generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(3, 3, 1)
            for i, (a, b) in enumerate(zip(self.CHANNELS, self.CHANNELS[1:]), 2):
                setattr(self, f"conv{i}", nn.Conv2d(a, b, 3, padding=1, padding_mode="reflect"))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> relu4_1 (N, 512, H/8, W/8)."""
        x = self.conv1(x)
        for i in range(2, 11):
            x = F.relu(getattr(self, f"conv{i}")(x))
            if i in self.POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return x


def released_key(key: str) -> str:
    """A released VAE_v3 / discriminator_v2 state_dict key -> srspace's RefVAE key (KeyError for
    another)."""
    gen = {"VAE_encoder.0.": "feat_enc.", "VAE_decoder.0.": "feat_dec.", "dec_feat.": "cond."}
    gen |= {p: p for p in ("init_feat.", "mask.", "decoder.")}
    for a, b in gen.items():
        if key.startswith(a):  # ResnetBlock's conv1, conv2 are ResBlock's body.0, body.2
            rest = key[len(a) :].replace(".conv1.", ".body.0.").replace(".conv2.", ".body.2.")
            return "gen." + b + rest
    disc = {"input_conv.": "0.0.", "conv1.": "1.0.", "conv2.": "2.0.", "conv3.": "3.0."}
    disc["weight."] = "4."
    for a, b in disc.items():
        if key.startswith(a):
            return "discriminator.layers." + b + key[len(a) :]
    raise KeyError(key)


def is_released(sd: dict) -> bool:
    """A released generator (or discriminator) state_dict: the code's names, not srspace's."""
    return any(k.startswith(("VAE_encoder.", "dec_feat.", "input_conv.")) for k in sd)


def load_r41(encoder: R41Encoder) -> None:
    """vgg_r41.pth (manifest entry `vgg_r41`) into `encoder` (one line if missing)."""
    try:
        file = resolve("vgg_r41")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {R41_SOURCE}") from None
    load_strict(encoder, load_state_dict(file), f"{file}: not the r41 encoder (vgg_r41.pth)")


class Discriminator(nn.Module):
    """The code's discriminator_v2: one PatchGAN applied at 3 scales (weights shared, docs/vae.md).

    forward(x) -> (logits (B, N) of all scales, [flattened intermediate activations])."""

    MIN_SIZE = 16  # three stride-2 convs, InstanceNorm needs >= 2x2 left: smaller scales skipped

    def __init__(self, ch: int = 32):
        super().__init__()

        def down(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 4, 2, 1), nn.InstanceNorm2d(o), nn.LeakyReLU(0.2))

        first = nn.Sequential(nn.Conv2d(3, ch, 3, 1, 1), nn.LeakyReLU(0.2))
        last = nn.Conv2d(8 * ch, 1, 3, 1, 1)
        self.layers = nn.ModuleList(
            [first, down(ch, 2 * ch), down(2 * ch, 4 * ch), down(4 * ch, 8 * ch), last]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, feats = [], []
        for k in range(3):
            x = F.max_pool2d(x, 3, 2, 1) if k else x
            if min(x.shape[-2:]) < self.MIN_SIZE:
                break
            h = x
            for layer in self.layers:
                h = layer(h)
                feats.append(h.flatten(1))
            logits.append(feats.pop())
        if not logits:
            raise patch_too_small("refvae: the discriminator", self.MIN_SIZE, x)
        return torch.cat(logits, dim=1), feats


def resize_ref(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, h, w) -> (N, 3, size, size): antialiased bicubic, like the code's PIL resize."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, (size, size), mode="bicubic", antialias=True).clamp(0, 1)


@lru_cache(maxsize=512)  # ~100 MB of 256² references: a folder is read once per reuse, not per step
def _ref_image(path: str, size: int) -> torch.Tensor:
    return resize_ref(to_tensor(read_image(path))[None], size)[0]


class RefVAE(LatentSRModel):
    """bicubic(LR) + decoder(C_R(z)·(1 + F_σ) + F_μ), z ~ q(z | reference) (paper §3)."""

    Config = RefVAEConfig
    sample_controls = ("ref", "latent", "latent_shift")  # sr_sample.py --ref, --latent*
    scales = (2, 4, 8)

    def __init__(self, cfg: RefVAEConfig):
        super().__init__(cfg)
        self.style_layers = tuple(t for t in cfg.style_layers.split(",") if t)
        if not self.style_layers or any(t not in VGG19_RELU for t in self.style_layers):
            raise UsageError(
                f"{config_flag('style_layers', cfg.style_layers, repr(cfg.style_layers))}: VGG19 "
                "ReLU taps, e.g. relu4_1 (at least one; --lambda-style 0 turns the style loss off)"
            )
        if cfg.width % 8:
            raise UsageError(f"{config_flag('width', cfg.width)}: must be a multiple of 8")
        self.lr_multiple = 8 // cfg.scale  # bicubic(LR) must be a multiple of 8 (its decoder)
        taps = tuple(dict.fromkeys(("relu4_1", *self.style_layers)))
        self.vgg = VGGFeatures(taps, imagenet_norm=True, pretrained=False)  # see _load_weights
        # r41: F_X and F_R from the code's encoder, VGG19 for the losses only (as the code)
        self.encoder = R41Encoder() if cfg.encoder == "r41" else None
        # A reference goes through VGG19's max-pools down to its deepest tap: each halves it.
        need = 2 ** sum(isinstance(m, nn.MaxPool2d) for m in self.vgg.features)
        if self.encoder is not None:  # its reflection padding needs 2 positions at relu4_1
            need = max(need, R41_MIN)
            self.min_lr_size = R41_MIN // cfg.scale  # bicubic(LR) of 16 px
        if cfg.ref_size < need:
            deepest = max(taps, key=VGG19_RELU.get)
            why = (
                "the r41 encoder's reflection padding needs 2 positions at 1/8"
                if need == R41_MIN and self.encoder is not None
                else f"the VGG19 encoder (to {deepest}) halves references "
                f"{need.bit_length() - 1} times"
            )
            raise UsageError(
                f"{config_flag('ref_size', cfg.ref_size)}: {why}; use --ref-size {need} or more"
            )
        # Max-pools before the deepest style tap: the style loss's std needs 2 positions there.
        self.style_pools = max(int(t[len("relu")]) - 1 for t in self.style_layers)  # reluB_C
        self.register_buffer("vgg_loaded", torch.tensor(False))  # True once ImageNet weights are in
        if self.encoder is not None:  # (only then: the vgg19 encoder's checkpoints keep their keys)
            self.register_buffer("encoder_loaded", torch.tensor(False))  # vgg_r41.pth is in
        self._encoder_ready = False
        self.gen = Generator(cfg)
        if cfg.lambda_adv > 0 or cfg.lambda_fm > 0:
            self.discriminator = Discriminator(cfg.d_channels)
        self._lpips: list[nn.Module] = []  # a list keeps the frozen LPIPS out of state_dict
        self._ref_files = None
        self._step = 0
        self._vgg_ready = False  # vgg_loaded as the host last read it (not read every step)

    @classmethod
    def input_consistency(cls, cfg: RefVAEConfig) -> list[str]:
        return ["--lambda-lr"] if cfg.lambda_lr > 0 else []  # (Eq. 6's Down compares with D(HR))

    @classmethod
    def unused_flags(cls, cfg: RefVAEConfig) -> dict[str, str]:
        """The discriminator's flags without one (its feature matching needs it too), the style
        loss's and the TV loss's when their weight is 0."""
        unused = {}
        if cfg.lambda_adv == 0 and cfg.lambda_fm == 0:
            no_d = "with --lambda-adv 0 and --lambda-fm 0 (no discriminator)"
            unused |= dict.fromkeys(("d_channels", "adv_loss"), no_d)
        if cfg.lambda_style == 0:
            unused |= dict.fromkeys(("style_layers", "style_target"), "with --lambda-style 0")
        if cfg.lambda_tv == 0:
            unused["tv_beta"] = "with --lambda-tv 0"
        return unused

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        # Paper §4.1: Adam lr 1e-4 (β1 0.9), weight decay 1e-4, batch 16, 5e4 iterations, LR 32²
        # at ×8 (HR 256²); ×4: LR 64² (the code's default, HR 256² too). One optimisation setting,
        # so the discriminator's Adam is G's. The code: Adam(1e-4, (0.9, 0.999), 1e-8) for both,
        # no weight decay for either, and G's lr divided by 10 at epochs 250 and 500 of 500 (D's
        # never); the paper gives no decay (gamma 0.1 if milestones are given).
        return replace(
            super().recipe(scale), patch=256 // scale, steps=50_000, weight_decay=1e-4,
            d_weight_decay=1e-4, gamma=0.1,
        )  # fmt: skip

    @classmethod
    def raw_config(cls, state_dict: dict, scale: int) -> dict:
        """A released generator state_dict (ConVAE_4x.pth, ConVAE_8x.pth: the code's key names)
        was trained on the r41 encoder with torch bicubic; without discriminator keys, none is
        built."""
        cfg = super().raw_config(state_dict, scale)
        if not is_released(state_dict):
            return cfg  # our own key names: the default config
        cfg |= dict(encoder="r41", bicubic="torch")
        if not any(k.startswith("input_conv.") for k in state_dict):
            cfg |= dict(lambda_adv=0.0, lambda_fm=0.0)
        return cfg

    def load_raw_state_dict(self, state_dict: dict, path="state_dict") -> None:
        """Load a released VAE_v3 (and discriminator_v2) state_dict, keys mapped by
        `released_key`, or one with our own key names, strictly; the frozen networks' weights
        are not in a released file (they are loaded from the manifest on first use)."""
        if not is_released(state_dict):
            return super().load_raw_state_dict(state_dict, path)
        if self.encoder is None:
            raise CheckpointError(
                f"{path}: a released RefVAE generator, trained on the r41 encoder's features: "
                "use --encoder r41 (load_model / sr_sample.py choose it for such a file)"
            )
        sd = {}
        for k, v in state_dict.items():
            try:
                sd[released_key(k)] = v
            except KeyError:
                if not k.startswith("bn."):  # (VAE_v3's BatchNorm1d is never used)
                    sd[k] = v  # named as unexpected by load_strict
        optional = ("vgg", "encoder") + (() if "discriminator.layers.0.0.weight" in sd else
                                         ("discriminator.",))  # fmt: skip
        load_strict(self, sd, f"{path}: not the released RefVAE VAE_v3 layout", optional=optional)

    def on_step(self, step: int, total: int) -> None:
        self._step = step  # picks the training references of --ref-data DIR
        # Before the step keeps the buffers it puts back if it is skipped as non-finite: its
        # vgg_loaded then stays True with the weights it describes.
        self._load_weights(losses=True)

    def patch_needs(self) -> list[tuple[str, int, str]]:
        # (the r41 encoder's 16 px: its min_lr_size. The content loss and LPIPS need none: the
        # least HR patch, 8 px, gives relu4_1 1x1, and LPIPS pads to AlexNet's 32 px; a tiny
        # random-weight model's step is finite at every scale, tests/test_refvae.py)
        needs = []
        if self.discriminator is not None:
            needs.append(("refvae: the discriminator", self.discriminator.MIN_SIZE, ""))
        if self.cfg.lambda_style > 0:  # its deepest tap's map needs 2 positions (`forward`)
            needs.append(("refvae: the style loss", 2 << self.style_pools, STYLE_OFF))
        return needs

    def check_files(self, loaded: bool) -> None:
        if not loaded:
            self._load_weights(losses=True)  # the encoder's, VGG19's (a checkpoint holds them)
        if self.cfg.lambda_lpips > 0:
            self.lpips()  # the AlexNet trunk's
        if self.cfg.ref_data != "hr":
            self.reference_files()

    def _load_weights(self, losses: bool = False) -> None:
        """The frozen networks' weights, once (CheckpointError with a staging hint): the r41
        encoder's, and ImageNet VGG19's when it is the encoder or `losses` (training) needs it.

        Called by every forward: a buffer is read on the host only until it says True (a read
        of a GPU tensor waits for the GPU's queue to drain), and again after a state_dict load."""
        if not self.cfg.pretrained:
            return
        if self.encoder is not None and not self._encoder_ready:
            if not bool(self.encoder_loaded):
                load_r41(self.encoder)
                self.encoder_loaded.fill_(True)
            self._encoder_ready = True
        c = self.cfg
        losses &= c.lambda_content > 0 or c.lambda_style > 0  # (sampling never needs them)
        if self._vgg_ready or (self.encoder is not None and not losses):
            return
        if not bool(self.vgg_loaded):
            resolve("vgg19")  # fail before allocating the 548 MB model
            features = torchvision_model("vgg19", pretrained=True).features
            self.vgg.features.load_state_dict(features[: len(self.vgg.features)].state_dict())
            self.vgg_loaded.fill_(True)
        self._vgg_ready = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._vgg_ready = self._encoder_ready = False  # the loaded buffers are read again

    def lpips(self) -> nn.Module:
        """Frozen LPIPS v0.1 alex, spatial; AlexNet trunk from the manifest (random if not
        pretrained: tests)."""
        if not self._lpips:
            net = lpips_module()
            if self.cfg.pretrained:
                try:
                    load_alexnet_trunk(net)
                except CheckpointError as e:
                    raise CheckpointError(f"{e}; or train without the LPIPS loss: "
                                          "--lambda-lpips 0") from None  # fmt: skip
            self._lpips.append(net.eval().requires_grad_(False))
        return on_device(self._lpips[0], model_tensor(self))

    def training_refs(self, hr: torch.Tensor) -> torch.Tensor:
        """(B, 3, r, r) references of this step: the HR patch, or images of --ref-data DIR drawn
        from default_rng([REF_SEED, step]) (the same on every rank and after a resume)."""
        c = self.cfg
        if c.ref_data == "hr":
            return resize_ref(hr, c.ref_size)
        files = self.reference_files()
        pick = np.random.default_rng([REF_SEED, self._step]).integers(len(files), size=len(hr))
        refs = torch.stack([_ref_image(files[i], c.ref_size) for i in pick])
        # from pinned memory without blocking, as the batches (a pageable copy waits for the GPU)
        return (refs.pin_memory() if hr.is_cuda else refs).to(hr, non_blocking=True)

    def reference_files(self) -> list[str]:
        """The images of --ref-data DIR, listed once."""
        if self._ref_files is None:
            try:
                self._ref_files = [str(p) for p in list_images(self.cfg.ref_data)]
            except DataError as e:  # "refs: no images found" alone reads as a --data folder's
                raise DataError(f"--ref-data {e}") from None
        return self._ref_files

    def reference(self, img: torch.Tensor) -> torch.Tensor:
        """(3, ref_size, ref_size): what `encode_refs` makes of it (it resizes no more)."""
        return resize_ref(img[None], self.cfg.ref_size)[0]

    def encode_refs(self, refs) -> tuple[torch.Tensor, torch.Tensor]:
        """μ, log σ² (N, D) of N references ((N, 3, h, w) or a list of (3, h, w) in [0, 1]),
        one at a time, so a reference's latent never depends on what it is batched with."""
        out = [self.gen.encode(self.features(resize_ref(r[None], self.cfg.ref_size)))
               for r in refs]  # fmt: skip
        return torch.cat([m for m, _ in out]), torch.cat([v for _, v in out])

    @torch.no_grad()
    def latents(
        self, lr: torch.Tensor, n: int, temperature: float, noise, ref=None
    ) -> torch.Tensor:
        """z (B, n, D) of n samples. ref: None = one Gaussian-noise reference per sample, "lr" =
        each LR image, "prior" = z ~ N(0, I) (paper §3.2), or references (k, 3, h, w) / a list, k in
        {1, n}: sample i uses reference i; a list may hold their `encode_refs` (μ, log σ²) (1, D)
        instead (`encode_references`)."""
        self._load_weights()
        b, d, r = lr.shape[0], self.cfg.z_dim, self.cfg.ref_size
        if isinstance(ref, str) and ref == "prior":
            return temperature * noise.vector(d).view(b, n, d)
        if ref is None:  # the reference is no field of the LR: one vector, never cut by tiling
            refs = NOISE_MEAN + temperature * NOISE_STD * noise.vector(3 * r * r)
            mu, logvar = (
                t.view(b, n, d) for t in self.encode_refs(refs.view(-1, 3, r, r).clamp(0, 1))
            )
        elif isinstance(ref, str) and ref == "lr":
            mu, logvar = (t[:, None] for t in self.encode_refs(lr))
        else:
            if len(ref) not in (1, n):
                raise UsageError(f"refvae: {len(ref)} references for {n} samples (give 1 or n)")
            stats = [x if isinstance(x, tuple) else self.encode_refs([x.to(lr)]) for x in ref]
            mu, logvar = (torch.cat(t)[None] for t in zip(*stats))
        eps = noise.vector(d).view(b, n, d)
        return (mu + temperature * torch.exp(0.5 * logvar) * eps).expand(b, n, d)

    def encode_references(self, cond: dict, like: torch.Tensor) -> dict:
        """--ref FILE|DIR: each reference as its (μ, log σ²), the same values `latents` computes
        from the image (references are encoded one at a time)."""
        ref = cond.get("ref")
        if not isinstance(ref, list):
            return cond
        return {**cond, "ref": [self.encode_refs([x.to(like)]) for x in ref]}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's relu4_1 (N, 512, H/8, W/8) of images in [0, 1]."""
        return self.vgg(x)["relu4_1"] if self.encoder is None else self.encoder(x)

    def bicubic(self, x: torch.Tensor, s: float) -> torch.Tensor:
        """x resized by s: MATLAB bicubic (the NTIRE degradation) or, as the code, torch's."""
        if self.cfg.bicubic == "torch":
            return F.interpolate(x, scale_factor=s, mode="bicubic")
        return imresize_torch(x, s)

    def prepare(self, lr: torch.Tensor) -> Prepared:
        """bicubic(LR), and the VGG features of it and their modulation F_μ, F_σ: the LR-only part
        of decoding, on the whole image."""
        self._load_weights()
        up = self.bicubic(lr, self.scale)
        f_mu, f_sigma = self.gen.modulation(self.features(up))  # (B, width, sH/8, sW/8)
        return Prepared(lr.shape[-2:], {"up": up, "f_mu": f_mu, "f_sigma": f_sigma})

    @property
    def tile_halo(self) -> int:
        """Given `prepare`, a tile runs C_R's convs and the decoder (`Generator.radius`)."""
        return halo(self.gen.radius() * 8 / self.scale)

    def decode_latents(self, lr: torch.Tensor, z: torch.Tensor, prepared=None) -> torch.Tensor:
        p = self.prepare(lr) if prepared is None else prepared
        f_mu, f_sigma = p.maps["f_mu"], p.maps["f_sigma"]
        window = None
        if p.window is not None:  # the tile at the feature maps' resolution (sH/8)
            r = self.scale / 8
            window = (*scale_window(p.window, r, r), *(round(v * r) for v in p.window[4:]))
        out = [self.gen.decode(f_mu, f_sigma, z[:, i], window) for i in range(z.shape[1])]
        return p.maps["up"][:, None] + torch.stack(out, dim=1)  # (B, n, 3, sH, sW)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        lr, hr = self.check_inputs(lr, hr)  # one line for a wrong input, not a conv's error
        c, s = self.cfg, self.scale
        self._load_weights(losses=True)
        red = torch.sum if c.reduction == "sum" else torch.mean
        l1 = lambda a, b: red((a - b).abs())  # noqa: E731
        if self.encoder is not None and min(hr.shape[-2:]) < R41_MIN:
            raise patch_too_small("refvae: the r41 encoder", R41_MIN, hr)
        up = self.bicubic(lr, s)  # (B, 3, sH, sW)
        ref = self.training_refs(hr)
        perceptual = c.lambda_content > 0 or c.lambda_style > 0
        with torch.no_grad():  # frozen encoder, constant inputs
            f_x = self.features(up)
            # VGG19's taps of the reference: F_R with the vgg19 encoder, else the style target
            by_vgg = self.encoder is None or (c.lambda_style > 0 and c.style_target == "ref")
            f_ref = self.vgg(ref) if by_vgg else None
            f_hr = f_ref if ref is hr and by_vgg else self.vgg(hr) if perceptual else None
            f_r = f_ref["relu4_1"] if self.encoder is None else self.encoder(ref)
        mu, logvar = self.gen.encode(f_r)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # paper §3.2 reparameterisation
        sr = up + self.gen.decode(*self.gen.modulation(f_x), z)
        down = {"lr": (s,), "pyramid": (2, 4), "none": ()}[c.content_down]
        pixel = l1(sr, hr) + sum(l1(self.bicubic(sr, 1 / a), self.bicubic(hr, 1 / a)) for a in down)
        kl = red(standard_normal_kl(mu, logvar))  # Eq. 4, KL to N(0, I)
        parts = {"pixel": pixel, "kl": kl}
        weights = {"pixel": c.lambda_pixel, "kl": c.lambda_kl}
        if perceptual:
            f_sr = self.vgg(sr)
        if c.lambda_content > 0:
            parts["content"] = l1(f_sr["relu4_1"], f_hr["relu4_1"])  # Eq. 6, W = relu4_1
            weights["content"] = c.lambda_content
        if c.lambda_style > 0:  # (a term of weight 0 still carried its NaN or inf into the loss)
            # The std divides by n - 1 over space (Eq. 7 as the code computes it): the deepest
            # tap needs 2 positions; a 1x1 map gave NaN and every step was skipped.
            h, w = (n >> self.style_pools for n in hr.shape[-2:])  # the deepest tap's map
            need, off = 2 << self.style_pools, STYLE_OFF
            if h * w < 2:
                raise patch_too_small("refvae: the style loss", need, hr, off)
            if c.style_target == "ref" and c.ref_size < need:
                raise UsageError(
                    f"{config_flag('ref_size', c.ref_size)}: the style loss needs references of "
                    f"at least {need} px{off}"
                )
            target = f_ref if c.style_target == "ref" else f_hr
            stats = [(style_stats(f_sr[t]), style_stats(target[t])) for t in self.style_layers]
            parts["style"] = sum(l1(a, b) for x, y in stats for a, b in zip(x, y))  # Eq. 7
            weights["style"] = c.lambda_style
        if c.lambda_lr > 0:
            parts["lr"], weights["lr"] = l1(self.bicubic(sr, 1 / s), lr), c.lambda_lr
        if c.lambda_lpips > 0:  # on [-1, 1]; patches under 32 px (tests) are padded for AlexNet
            pad = [0, max(0, 32 - sr.shape[-1]), 0, max(0, 32 - sr.shape[-2])]
            a, b = (F.pad(2 * x - 1, pad, mode="replicate") for x in (sr, hr))
            parts["lpips"], weights["lpips"] = red(self.lpips()(a, b)), c.lambda_lpips
        if c.lambda_tv > 0:
            parts["tv"], weights["tv"] = red(tv_map(sr, c.tv_beta)), c.lambda_tv
        if self.discriminator is not None:
            logits, feats = frozen_call(self.discriminator, sr)
            # Eq. 5's log[1 − D(Ŷ)] in its non-saturating form −log D(Ŷ); the code: L1 to 1
            gan = F.softplus(-logits) if c.adv_loss == "gan" else (logits - 1).abs()
            parts["adv"], weights["adv"] = red(gan), c.lambda_adv
            if c.lambda_fm > 0:
                with torch.no_grad():
                    real = self.discriminator(hr)[1]
                parts["fm"], weights["fm"] = sum(l1(a, b) for a, b in zip(feats, real)), c.lambda_fm
        loss = sum(weights[k] * v for k, v in parts.items())  # Eq. 9 (+ adversarial, code terms)
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}, "sr": sr}

    def discriminator_loss(self, lr: torch.Tensor, hr: torch.Tensor, out: dict) -> dict:
        """gan: −log D(y) − log(1 − D(ŷ)); l1 (code): ½[|D(y) − U(0.7, 1.2)| + |D(ŷ) − U(0, 0.3)|]
        with one random label per step. One D step per G step, as the code."""
        red = torch.sum if self.cfg.reduction == "sum" else torch.mean
        fake, real = self.discriminator(out["sr"].detach())[0], self.discriminator(hr)[0]
        if self.cfg.adv_loss == "gan":
            loss = red(F.softplus(-real)) + red(F.softplus(fake))
        else:
            u = torch.rand(2, device=real.device)  # drawn on the device: never read by the host
            hi, lo = 0.7 + 0.5 * u[0], 0.3 * u[1]
            loss = 0.5 * (red((real - hi).abs()) + red((fake - lo).abs()))
        return {"loss": loss, "real": real.mean().detach(), "fake": fake.mean().detach()}
