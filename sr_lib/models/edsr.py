"""EDSR: "Enhanced Deep Residual Networks for Single Image Super-Resolution" (Lim et al., CVPRW
2017, arXiv:1707.02921). Follows the paper's design; the reference implementation is EDSR-PyTorch
(sanghyun-son/EDSR-PyTorch, MIT). Written from the paper, nothing copied.

Defaults are EDSR-baseline (16 blocks, 64 features, no residual scaling); the full EDSR is
`--n-blocks 32 --n-feats 256 --res-scale 0.1`. Images stay in [0, 1] (EDSR-PyTorch works in
[0, 255]; the mean shift is scaled accordingly), so released EDSR weights do not load as-is.
"""

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from sr_lib.models.base import Recipe, conv_radius, staged_radius
from sr_lib.models.blocks import (
    RegressionConfig,
    RegressionSR,
    ResBlock,
    Upsampler,
    autocast_dtype,
    conv3x3,
    float32_out,
)

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


@dataclass
class EDSRConfig(RegressionConfig):
    n_blocks: int = field(
        default=16, metadata=dict(help="residual blocks (full EDSR: 32)", range="[0, inf)")
    )
    n_feats: int = field(default=64, metadata=dict(help="feature channels (full EDSR: 256)"))
    res_scale: float = field(
        default=1.0,
        metadata=dict(help="residual scaling in each block (full EDSR: 0.1)", range="[0, 10]"),
    )


class EDSR(RegressionSR):
    """EDSR: head conv, residual body with a global skip, sub-pixel tail."""

    Config = EDSRConfig

    def __init__(self, cfg: EDSRConfig):
        super().__init__(cfg)
        nf = cfg.n_feats
        # MeanShift: a constant, so a buffer (not a frozen conv) and not saved in checkpoints.
        mean = torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1)
        self.register_buffer("rgb_mean", mean, persistent=False)
        self.head = conv3x3(3, nf)
        blocks = [ResBlock(nf, cfg.res_scale) for _ in range(cfg.n_blocks)]
        self.body = nn.Sequential(*blocks, conv3x3(nf, nf))
        self.tail = nn.Sequential(Upsampler(nf, cfg.scale), conv3x3(nf, 3))
        self._add_sigma_branch(nf)

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        # EDSR recipe: LR patches 48, batch 16, Adam 1e-4 halved at 2e5 of 3e5 updates (the base
        # recipe but for the milestone).
        return replace(super().recipe(scale), milestones=(2 / 3,))  # fractions of --steps

    def radii(self) -> tuple[float, float]:
        return conv_radius(self.head) + conv_radius(self.body), staged_radius(self.tail)

    def predict(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The head in float32 under autocast: in bfloat16 it would read the LR pixels and its
        # weights rounded to 8 bits of mantissa, an error every output pixel follows (through the
        # global skip too): 0.09 dB of LR-PSNR when sampling with --amp bf16 (docs/benchmarks.md).
        x = float32_out(self.head, lr - self.rgb_mean)
        fea = x + self.body(autocast_dtype(x))  # global skip around the body; the σ branch input
        return float32_out(self.tail[1], self.tail[0](fea)) + self.rgb_mean, fea
