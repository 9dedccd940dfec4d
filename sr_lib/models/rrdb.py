"""RRDB network as SRFlow uses it: the ESRGAN RRDBNet ("ESRGAN: Enhanced Super-Resolution Generative
Adversarial Networks", Wang et al., ECCVW 2018, arXiv:1809.00219) with SRFlow's global skip
("SRFlow: Learning the Super-Resolution Space with Normalizing Flow", Lugmayr et al., ECCV 2020,
arXiv:2006.14200; andreas128/SRFlow, CC BY-NC-SA 4.0). Written from the paper (docs/flows.md,
"The RRDB encoder"), nothing copied. Module and parameter names equal the official `RRDBNet`'s,
so `RRDB_*.pth` files load strictly (`load_official_rrdb`) and the flow models reuse `RRDBNet` as
their LR encoder.
"""

import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.checkpoint import is_srspace_checkpoint, load_checkpoint
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models.base import Recipe, conv_radius
from sr_lib.models.blocks import (
    RegressionConfig,
    RegressionSR,
    autocast_dtype,
    conv3x3,
    float32_out,
)
from sr_lib.weights import load_state_dict, load_strict

SCALES = (2, 4, 8)


@dataclass
class RRDBConfig(RegressionConfig):
    nb: int = field(
        default=23, metadata=dict(help="RRDB blocks in the trunk (CelebA ×8: 8)", range="[0, inf)")
    )
    nf: int = field(default=64, metadata=dict(help="feature channels"))
    gc: int = field(default=32, metadata=dict(help="growth channels of the dense blocks"))


class ResidualDenseBlock(nn.Module):
    """Five densely connected convs; conv5's output is scaled by 0.2 and added to the input."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = conv3x3(nf, gc)
        self.conv2 = conv3x3(nf + gc, gc)
        self.conv3 = conv3x3(nf + 2 * gc, gc)
        self.conv4 = conv3x3(nf + 3 * gc, gc)
        self.conv5 = conv3x3(nf + 4 * gc, nf)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            # Small init (×0.1) keeps the deep residual trunk close to identity at the start.
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))  # (B, nf + k·gc, H, W)
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDBBlock(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled by 0.2, plus the input."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """SRFlow's RRDBNet: RRDB trunk, global skip `T + trunk_conv(T)`, nearest ×2 + conv stages."""

    def __init__(self, scale: int = 4, nf: int = 64, nb: int = 23, gc: int = 32):
        super().__init__()
        if scale not in SCALES:
            raise UsageError(f"rrdb: scale {scale} not supported; use 2, 4 or 8")
        self.scale = scale
        self.n_up = scale.bit_length() - 1  # number of nearest ×2 + conv stages
        self.conv_first = conv3x3(3, nf)
        self.RRDB_trunk = nn.Sequential(*[RRDBBlock(nf, gc) for _ in range(nb)])
        self.trunk_conv = conv3x3(nf, nf)
        for i in range(1, self.n_up + 1):
            setattr(self, f"upconv{i}", conv3x3(nf, nf))
        self.HRconv = conv3x3(nf, nf)
        self.conv_last = conv3x3(nf, 3)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """SR image (B, 3, s·H, s·W) from LR (B, 3, H, W), both in [0, 1] (not clamped)."""
        return self.features(lr)["out"]

    def features(
        self,
        lr: torch.Tensor,
        blocks: tuple[int, ...] = (),
        maps: bool = True,
        up_to: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The encoder features SRFlow conditions on (docs/flows.md, "The RRDB encoder").

        Args:
            blocks: trunk positions (0-based) whose outputs are returned as "block_<i>".
            maps: also return "fea_up0" (bilinear ×0.5), "fea_up1" and the upconv stages after
                their LeakyReLU, "fea_up2", "fea_up4" (, "fea_up8"); False stops after
                "last_lr_fea".
            up_to: the largest fea_up factor to compute, e.g. 2 at ×4 skips the HR-resolution
                map and the output branch; None computes every map and "out" (the SR image).
        Returns:
            dict of (B, nf, H·f, W·f) maps (f = 0.5 for fea_up0) and, with up_to None, "out".
        """
        if any(not 0 <= b < len(self.RRDB_trunk) for b in blocks):
            raise UsageError(
                f"rrdb features: blocks {blocks} outside 0..{len(self.RRDB_trunk) - 1}"
            )
        if up_to is not None and up_to not in [2**k for k in range(self.n_up + 1)]:
            raise UsageError(f"rrdb features: up_to {up_to} must be a power of 2 ≤ {self.scale}")
        out: dict[str, torch.Tensor] = {}
        # conv_first reads the image in float32 under autocast: in bfloat16 the LR pixels and its
        # weights would be rounded to 8 bits of mantissa (a small SRFlow's bf16 samples moved
        # LR-PSNR by 0.020 dB, not 0.002; docs/design.md "Numerics"); the trunk gets one copy in
        # autocast's dtype.
        x = autocast_dtype(float32_out(self.conv_first, lr))
        wanted = set(blocks)
        for i, block in enumerate(self.RRDB_trunk):
            x = block(x)
            if i in wanted:
                out[f"block_{i}"] = x
        # SRFlow's global skip is around trunk_conv only (ESRGAN adds conv_first's output instead).
        x = x + self.trunk_conv(x)
        out["last_lr_fea"] = x
        if not maps:
            return out
        out["fea_up1"] = x
        out["fea_up0"] = F.interpolate(
            x, scale_factor=0.5, mode="bilinear", align_corners=False, recompute_scale_factor=True
        )  # (B, nf, H/2, W/2); equals avg_pool2d(x, 2) for even sizes
        last = self.n_up if up_to is None else up_to.bit_length() - 1
        for i in range(1, last + 1):
            x = getattr(self, f"upconv{i}")(F.interpolate(x, scale_factor=2, mode="nearest"))
            x = F.leaky_relu(x, 0.2)
            # After the activation: the released RRDBNet applies an in-place LeakyReLU to the
            # upconv output it returns, so the maps the flow conditions on are post-activation
            # (docs/flows.md, "Verified against the released code").
            out[f"fea_up{2**i}"] = x
        if up_to is None:
            out["out"] = float32_out(self.conv_last, F.leaky_relu(self.HRconv(x), 0.2))
        return out


def load_official_rrdb(model_or_net: nn.Module, path: str | os.PathLike) -> None:
    """Load an official SRFlow `RRDB_*.pth` (a plain RRDBNet state_dict), or the network of an
    srspace `rrdb` checkpoint (our own L1 pre-training, the step the official configs start
    from), strictly.

    `model_or_net` is an `RRDBNet` or an `RRDB` model (its network `.net` is loaded).
    Raises CheckpointError (one line) on missing, unexpected or wrongly shaped keys.
    """
    net = model_or_net.net if isinstance(model_or_net, RRDB) else model_or_net
    if not isinstance(net, RRDBNet):
        got = type(model_or_net).__name__
        raise TypeError(f"load_official_rrdb: need an RRDBNet or an rrdb model, got {got}")
    ck = load_checkpoint(path)
    if is_srspace_checkpoint(ck):
        if ck["model"] != "rrdb":
            raise CheckpointError(
                f"{path}: a {ck['model']} checkpoint; give an rrdb run's checkpoint or an "
                "official RRDB_*.pth"
            )
        # the network only (an `le` run's σ branch is not part of the encoder); its weight
        # average if the run kept one (sr_train.py --ema), as sr_lib.models.load_model loads it
        weights = ck.get("ema_state_dict", ck["state_dict"])
        sd = {k[len("net.") :]: v for k, v in weights.items() if k.startswith("net.")}
    else:
        sd = load_state_dict(path)
    load_strict(net, sd, f"{path} does not match this RRDBNet")


class RRDB(RegressionSR):
    """RRDB trained on its own (SRFlow's RRDB pre-training, or ESRGAN's PSNR-oriented stage)."""

    Config = RRDBConfig
    scales = SCALES
    min_lr_size = 2  # RRDBNet's half-resolution map (fea_up0) of a 1 px LR has no pixel

    def __init__(self, cfg: RRDBConfig):
        super().__init__(cfg)
        self.net = RRDBNet(cfg.scale, cfg.nf, cfg.nb, cfg.gc)
        self._add_sigma_branch(cfg.nf)

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        # SRFlow RRDB pre-training (docs/flows.md, "Training"): L1, Adam 2e-4, betas (0.9, 0.99),
        # batch 16, HR patch 160. The official schedule restarts a cosine every 50k steps; one
        # cosine over the run is the closest the training loop offers.
        return replace(
            super().recipe(scale), patch=160 // scale, steps=200_000, learning_rate=2e-4,
            betas=(0.9, 0.99), schedule="cosine", eta_min=1e-7,
        )  # fmt: skip

    def radii(self) -> tuple[float, float]:
        """Trunk at LR, each upconv (after a nearest ×2) at 2, 4, ... × LR, the last two at HR."""
        net = self.net
        fea = (
            conv_radius(net.conv_first) + conv_radius(net.RRDB_trunk) + conv_radius(net.trunk_conv)
        )
        ups = sum(conv_radius(getattr(net, f"upconv{i}")) / 2**i for i in range(1, net.n_up + 1))
        return fea, ups + (conv_radius(net.HRconv) + conv_radius(net.conv_last)) / self.scale

    def predict(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.features(lr)
        return f["out"], f["last_lr_fea"]
