"""EDSR: "Enhanced Deep Residual Networks for Single Image Super-Resolution" (Lim et al., CVPRW
2017, arXiv:1707.02921). Follows the paper's design; the reference implementation is EDSR-PyTorch
(sanghyun-son/EDSR-PyTorch, MIT). Written from the paper, nothing copied.

Defaults are EDSR-baseline (16 blocks, 64 features, no residual scaling); the full EDSR is
`--n-blocks 32 --n-feats 256 --res-scale 0.1`. Images stay in [0, 1] where EDSR-PyTorch works in
[0, 255]. Its released state_dicts (edsr_baseline_x2/x3/x4-*.pt, edsr_x2/x3/x4-*.pt) load all the
same (`load_model(path, model="edsr", scale=s)`): the network is convolutions, ReLUs, scalings and
pixel shuffles, so g(255·x)/255 is the same network with every bias divided by 255, the weights
unchanged (`from_released`; checked against the released code by tests/bench/check_edsr_parity.py).
"""

import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from sr_lib.errors import CheckpointError
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
from sr_lib.weights import load_strict

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
RELEASED_RANGE = 255.0  # EDSR-PyTorch's --rgb_range, the pixel range of its released files
# The released upsampler's (stages, first conv's channels per feature) -> its scale.
RELEASED_TAILS = {(1, 4): 2, (1, 9): 3, (2, 4): 4, (3, 4): 8}


def is_released(state_dict: dict) -> bool:
    """EDSR-PyTorch's layout: its head is a Sequential (`head.0.`), ours one conv (`head.`)."""
    return "head.0.weight" in state_dict


def released_range(state_dict: dict, path) -> float:
    """The pixel range a released file was trained on, read off its mean shift: the 1x1 convs
    `sub_mean` (x - range·mean) and `add_mean` (+ range·mean). A file without them gets the mean
    shift the released code builds (its load_state_dict keeps what a file lacks): range 255. Any
    other mean shift (another mean, a std) is not one srspace computes: refused."""
    if "sub_mean.bias" not in state_dict:
        return RELEASED_RANGE
    mean = torch.tensor(DIV2K_RGB_MEAN, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1)
    sub = {k: state_dict.get(f"sub_mean.{k}") for k in ("weight", "bias")}
    add = {k: state_dict.get(f"add_mean.{k}") for k in ("weight", "bias")}
    try:
        rgb_range = float(-sub["bias"].double()[0] / mean[0])
        ok = rgb_range > 0 and all(
            torch.allclose(t.double(), want, rtol=1e-5, atol=1e-7)
            for t, want in (
                (sub["weight"], eye),
                (add["weight"], eye),
                (sub["bias"], -rgb_range * mean),
                (add["bias"], rgb_range * mean),
            )
        )
    except (AttributeError, RuntimeError, TypeError):  # a key missing, a wrong shape
        ok = False
    if not ok:
        raise CheckpointError(
            f"{path}: its mean shift (sub_mean/add_mean) is not EDSR-PyTorch's DIV2K mean with "
            "std 1; srspace loads only released EDSR files of that mean shift"
        )
    return rgb_range


def released_scale(state_dict: dict) -> int | None:
    """The scale a released upsampler (`tail.0.N`: conv, shuffle per stage) is built for."""
    stages = [k for k in state_dict if k.startswith("tail.0.") and k.endswith(".weight")]
    if not stages or "tail.0.0.weight" not in state_dict or "head.0.weight" not in state_dict:
        return None
    per_feat = state_dict["tail.0.0.weight"].shape[0] // state_dict["head.0.weight"].shape[0]
    return RELEASED_TAILS.get((len(stages), per_feat))


def from_released(state_dict: dict, path) -> dict:
    """Our state_dict of a released EDSR-PyTorch one: `head.0.` -> `head.` (body and tail keys
    are ours already), every bias divided by the file's pixel range (255) and the mean shift
    dropped (ours is the constant DIV2K_RGB_MEAN buffer; `released_range` checks the file's)."""
    rgb_range = released_range(state_dict, path)
    out = {}
    for k, v in state_dict.items():
        if k.startswith(("sub_mean.", "add_mean.")):
            continue
        if k.endswith(".bias"):  # divided in float64: one rounding, to the file's dtype
            v = (v.double() / rgb_range).to(v.dtype)
        out["head." + k[len("head.0.") :] if k.startswith("head.0.") else k] = v
    return out


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
    def raw_config(cls, state_dict: dict, scale: int) -> dict:
        """A released file's depth and width, read off its shapes. The residual scaling is not in
        the file: the released configurations tie it to the width (EDSR-PyTorch's demo.sh: the
        full EDSR, 256 features, --res_scale 0.1; the baseline, 64, its default 1), so 0.1 for
        256 features and 1 otherwise."""
        cfg = super().raw_config(state_dict, scale)
        if not is_released(state_dict):
            return cfg  # our own key names: the default config
        n_feats = state_dict["head.0.weight"].shape[0]
        blocks = {k.split(".")[1] for k in state_dict if re.match(r"body\.\d+\.body\.", k)}
        res_scale = 0.1 if n_feats == 256 else 1.0
        return cfg | dict(n_blocks=len(blocks), n_feats=n_feats, res_scale=res_scale)

    def load_raw_state_dict(self, state_dict: dict, path="state_dict") -> None:
        """Load a released EDSR-PyTorch state_dict (converted to [0, 1] by `from_released`) or one
        with our own key names, strictly."""
        if not is_released(state_dict):
            return super().load_raw_state_dict(state_dict, path)
        held = released_scale(state_dict)
        if held is not None and held != self.scale:
            raise CheckpointError(
                f"{path}: a released EDSR x{held} (its upsampler), not x{self.scale}; pass "
                f"--scale {held} (load_model(path, model='edsr', scale={held}))"
            )
        c = self.cfg
        layout = f"EDSR x{self.scale} ({c.n_blocks} blocks, {c.n_feats} features)"
        load_strict(self, from_released(state_dict, path), f"{path}: not the released {layout}")

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
