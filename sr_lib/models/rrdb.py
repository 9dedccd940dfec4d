"""RRDB network as SRFlow uses it: the ESRGAN RRDBNet ("ESRGAN: Enhanced Super-Resolution Generative
Adversarial Networks", Wang et al., ECCVW 2018, arXiv:1809.00219) with SRFlow's global skip
("SRFlow: Learning the Super-Resolution Space with Normalizing Flow", Lugmayr et al., ECCV 2020,
arXiv:2006.14200; andreas128/SRFlow, CC BY-NC-SA 4.0). Written from the paper (docs/flows.md,
"The RRDB encoder"), nothing copied. Module and parameter names equal the official `RRDBNet`'s,
so `RRDB_*.pth` files load strictly (`load_official_rrdb`) and the flow models reuse `RRDBNet` as
their LR encoder. `global_skip="esrgan"` gives ESRGAN's own global skip (xinntao/ESRGAN), whose
released files load as `--model rrdb` in each of their key layouts (`from_released_rrdb`).
"""

import contextlib
import os
import re
from dataclasses import dataclass, field, replace
from typing import Literal

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
from sr_lib.weights import as_state_dict, load_strict

SCALES = (2, 4, 8)


@dataclass
class RRDBConfig(RegressionConfig):
    nb: int = field(
        default=23,
        metadata=dict(
            help="RRDB blocks in the trunk (released RRDB_*.yml: 23; the encoder of an srflow "
            "--nb 8 run, SRFlow's CelebA ×8, needs 8)",
            range="[0, inf)",
        ),
    )
    nf: int = field(default=64, metadata=dict(help="feature channels"))
    gc: int = field(default=32, metadata=dict(help="growth channels of the dense blocks"))
    global_skip: Literal["srflow", "esrgan"] = field(
        default="srflow",
        metadata=dict(
            help="global skip: srflow T + trunk_conv(T) (SRFlow's RRDB_*.pth), esrgan "
            "conv_first's output + trunk_conv(T) (ESRGAN's RRDB_*_x4.pth)"
        ),
    )


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
    """SRFlow's RRDBNet: RRDB trunk, global skip `T + trunk_conv(T)`, nearest ×2 + conv stages;
    with `global_skip="esrgan"` ESRGAN's: `conv_first(lr) + trunk_conv(T)`, the rest the same."""

    def __init__(
        self, scale: int = 4, nf: int = 64, nb: int = 23, gc: int = 32, global_skip: str = "srflow"
    ):
        super().__init__()
        if scale not in SCALES:
            raise UsageError(f"rrdb: scale {scale} not supported; use 2, 4 or 8")
        if global_skip not in ("srflow", "esrgan"):
            raise UsageError(f"rrdb: skip {global_skip!r} not supported; use srflow or esrgan")
        self.scale = scale
        self.global_skip = global_skip
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
        x = fea = autocast_dtype(float32_out(self.conv_first, lr))
        wanted = set(blocks)
        for i, block in enumerate(self.RRDB_trunk):
            x = block(x)
            if i in wanted:
                out[f"block_{i}"] = x
        # SRFlow's global skip is around trunk_conv only; ESRGAN's adds conv_first's output. The
        # same weights give other images under the other skip (docs/flows.md, "The RRDB encoder").
        x = (x if self.global_skip == "srflow" else fea) + self.trunk_conv(x)
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


# The key layouts of released RRDBNet files, by a key only that layout has: xinntao/ESRGAN's old
# architecture (RRDB_ESRGAN_x4_old_arch.pth: one nn.Sequential), BasicSR's / Real-ESRGAN's RRDBNet
# and ESRGAN's new architecture, which names its modules as SRFlow's RRDBNet (and ours) does.
LAYOUTS = {
    "model.0.weight": "esrgan_old",
    "conv_body.weight": "basicsr",
    "trunk_conv.weight": "plain",
}
# The old Sequential's indices (×4): 0 conv_first, 1 the trunk (its last entry the trunk conv),
# 3 and 6 the upconvs (after an Upsample, then a LeakyReLU), 8 HRconv, 10 conv_last.
OLD_ARCH = {"0": "conv_first", "3": "upconv1", "6": "upconv2", "8": "HRconv", "10": "conv_last"}
BASICSR = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2"}
BASICSR |= {"conv_hr": "HRconv"}
DESCRIBE = {
    "esrgan_old": "an ESRGAN RRDBNet of the old architecture (RRDB_ESRGAN_x4_old_arch.pth)",
    "basicsr": "a BasicSR / Real-ESRGAN RRDBNet",
    "plain": "a released RRDBNet (ESRGAN's RRDB_*_x4.pth or SRFlow's RRDB_*.pth layout)",
}


def rrdb_layout(sd: dict) -> str | None:
    """Which released layout a raw RRDBNet state_dict has (LAYOUTS), or None."""
    return next((layout for key, layout in LAYOUTS.items() if key in sd), None)


def from_released_rrdb(key: str, nb: int) -> str:
    """Our RRDBNet's name of a key of a released file (ESRGAN's old architecture or BasicSR's;
    other keys come back unchanged). `nb`: the trunk's blocks (the old trunk conv's index)."""
    m = re.fullmatch(r"model\.1\.sub\.(\d+)\.(RDB\d\.conv\d)\.0\.(weight|bias)", key)
    if m:
        return f"RRDB_trunk.{m[1]}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"model\.(?:1\.sub\.(\d+)|(\d+))\.(weight|bias)", key)
    if m and (m[1] is None or int(m[1]) == nb) and (m[1] is not None or m[2] in OLD_ARCH):
        return f"{'trunk_conv' if m[1] else OLD_ARCH[m[2]]}.{m[3]}"
    m = re.fullmatch(r"body\.(\d+)\.rdb(\d)\.(conv\d\.(?:weight|bias))", key)
    if m:
        return f"RRDB_trunk.{m[1]}.RDB{m[2]}.{m[3]}"
    name, _, rest = key.partition(".")
    return f"{BASICSR[name]}.{rest}" if name in BASICSR else key


def released_trunk_depth(sd: dict) -> int:
    """The RRDB blocks of a released file's trunk (its last block's index + 1)."""
    pattern = r"(?:model\.1\.sub|body|RRDB_trunk)\.(\d+)\.(?:RDB|rdb)"
    return 1 + max((int(m[1]) for k in sd if (m := re.match(pattern, k))), default=-1)


def released_rrdb(state_dict: dict) -> tuple[str, dict, str | None] | None:
    """A released RRDBNet file as (its layout, its state_dict under our key names, the global
    skip the layout tells or None where it does not: ESRGAN's new layout names its keys as
    SRFlow's ×4); None for srspace's own key names."""
    layout = rrdb_layout(state_dict)
    if layout is None:
        return None
    nb = released_trunk_depth(state_dict)
    sd = {from_released_rrdb(k, nb): v for k, v in state_dict.items()}
    # a ×8 file is SRFlow's (ESRGAN released none); the old and BasicSR layouts are ESRGAN's
    told = "srflow" if "upconv3.weight" in sd else None if layout == "plain" else "esrgan"
    return layout, sd, told


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
                f"{path}: a checkpoint of {ck['model']}; give an rrdb run's checkpoint or an "
                "official RRDB_*.pth"
            )
        own = ck["model_cfg"].get("global_skip", "srflow")
        if own != net.global_skip:  # (the same weights compute other features under the other)
            raise CheckpointError(
                f"{path}: an rrdb run with --global-skip {own}, and this RRDBNet (a flow's "
                f"encoder) has the {net.global_skip} skip; pre-train it with --global-skip "
                f"{net.global_skip}"
            )
        # the network only (an `le` run's σ branch is not part of the encoder); its weight
        # average if the run kept one (sr_train.py --ema), as sr_lib.models.load_model loads it
        weights = ck.get("ema_state_dict", ck["state_dict"])
        sd = {k[len("net.") :]: v for k, v in weights.items() if k.startswith("net.")}
    else:
        sd = as_state_dict(ck, path)  # (the file as read above)
    # A file of another scale (its ×2 upconv stages) would be 2 missing or unexpected keys:
    # name the scales instead
    stages = sum(f"upconv{i}.weight" in sd for i in range(1, 4))
    if stages and 2**stages != net.scale:
        raise CheckpointError(
            f"{path}: an RRDBNet of x{2**stages}, and this encoder is x{net.scale}; give an rrdb "
            f"run of --scale {net.scale} (or a released x{net.scale} RRDB_*.pth)"
        )
    # A file of another depth or width (RRDB_CelebA_8X.yml trains 23 blocks where the SRFlow
    # CelebA ×8 encoder has 8) would be hundreds of missing keys: name the flags instead.
    differ = [
        f"--{flag} {theirs} (this encoder: {ours})"
        for flag, theirs, ours in zip(("nb", "nf", "gc"), rrdb_widths(sd), rrdb_widths(net))
        if None not in (theirs, ours) and theirs != ours
    ]
    if differ:
        raise CheckpointError(
            f"{path}: an RRDBNet of {', '.join(differ)}; give the flow those flags, or "
            "pre-train an rrdb with this encoder's"
        )
    load_strict(net, sd, f"{path} does not match this RRDBNet")


def rrdb_widths(sd_or_net: dict | RRDBNet) -> tuple[int | None, int | None, int | None]:
    """(nb, nf, gc) of an RRDBNet or of its state_dict under our key names (None: not there; a
    trunk of 0 blocks, `--nb 0`, has nb 0 and no gc, which it does not use)."""
    sd = sd_or_net.state_dict() if isinstance(sd_or_net, nn.Module) else sd_or_net
    first, dense = sd.get("conv_first.weight"), sd.get("RRDB_trunk.0.RDB1.conv1.weight")
    return (
        released_trunk_depth(sd) if first is not None else None,  # (no conv_first: no RRDBNet)
        first.shape[0] if first is not None else None,
        dense.shape[0] if dense is not None else None,
    )


class RRDB(RegressionSR):
    """RRDB trained on its own (SRFlow's RRDB pre-training, or ESRGAN's PSNR-oriented stage)."""

    Config = RRDBConfig
    scales = SCALES
    min_lr_size = 2  # RRDBNet's half-resolution map (fea_up0) of a 1 px LR has no pixel

    def __init__(self, cfg: RRDBConfig):
        super().__init__(cfg)
        self.net = RRDBNet(cfg.scale, cfg.nf, cfg.nb, cfg.gc, cfg.global_skip)
        self._add_sigma_branch(cfg.nf)

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        # SRFlow RRDB pre-training (docs/flows.md, "Training"): L1, Adam 2e-4, betas (0.9, 0.99),
        # batch 16, HR patch 160. The official schedule restarts a cosine every 50k steps, four
        # times; one cosine over the run is the closest the training loop offers, over those
        # 200k steps (RRDB_DF2K_8X.yml's niter; RRDB_DF2K_4X.yml's is 1M).
        longer = ("the released RRDB_DF2K_4X.yml trains 1M steps, 5x this recipe's 200k (which "
                  "is RRDB_DF2K_8X.yml's); --steps 1000000 trains as long, with one cosine, not "
                  "its restarts (docs/flows.md, \"Training\")")  # fmt: skip
        return replace(
            super().recipe(scale), patch=160 // scale, steps=200_000, learning_rate=2e-4,
            betas=(0.9, 0.99), schedule="cosine", eta_min=1e-7, note=longer if scale == 4 else "",
        )  # fmt: skip

    @classmethod
    def raw_config(cls, state_dict: dict, scale: int, global_skip: str | None = None) -> dict:
        """The config of a released RRDBNet file: depth and widths off its keys and shapes, and
        its global skip: ESRGAN's for the layouts only ESRGAN writes (its old architecture,
        BasicSR's), SRFlow's for a ×8 file (ESRGAN released none); ESRGAN's new layout is
        SRFlow's too, so there `global_skip` (sr_sample.py --global-skip) must say which. One the
        keys contradict, or none where they do not tell, is a one-line CheckpointError."""
        cfg = super().raw_config(state_dict, scale)
        released = released_rrdb(state_dict)
        if released is None:  # srspace's own key names (or none we know: the strict load says)
            return cfg | ({"global_skip": global_skip} if global_skip else {})
        layout, sd, told = released
        cfg["nb"] = released_trunk_depth(state_dict)
        with contextlib.suppress(KeyError):  # (a missing key: load_raw_state_dict names it)
            cfg["nf"] = sd["conv_first.weight"].shape[0]
            cfg["gc"] = sd["RRDB_trunk.0.RDB1.conv1.weight"].shape[0]
        if told and global_skip and global_skip != told:
            raise CheckpointError(
                f"holds {DESCRIBE[layout]}, whose global skip is {told}, not --global-skip "
                f"{global_skip}: drop --global-skip"
            )
        if not (told or global_skip):
            raise CheckpointError(
                "RRDBNet keys as both ESRGAN's files (RRDB_ESRGAN_x4.pth, RRDB_PSNR_x4.pth) and "
                "SRFlow's (RRDB_DF2K_4X.pth) name them, and their global skips differ: say whose "
                "it is, --global-skip esrgan or --global-skip srflow "
                "(load_model(..., global_skip=...))"
            )
        return cfg | {"global_skip": told or global_skip}

    def load_raw_state_dict(self, state_dict: dict, path="state_dict") -> None:
        """Load a released RRDBNet file (ESRGAN's old or new layout, BasicSR's, SRFlow's
        RRDB_*.pth) or one with our own key names, strictly."""
        released = released_rrdb(state_dict)
        if released is None:
            return super().load_raw_state_dict(state_dict, path)
        layout, sd, told = released
        first = sd.get("conv_first.weight")
        if first is not None and first.shape[1] != 3:
            raise CheckpointError(
                f"{path}: its conv_first takes {first.shape[1]} channels, a BasicSR RRDBNet "
                "with pixel-unshuffled input (Real-ESRGAN ×2, ×1), which srspace does not build"
            )
        ups = sum(f"upconv{i}.weight" in sd for i in (1, 2, 3))
        if ups != self.net.n_up:
            raise CheckpointError(f"{path}: holds a ×{2**ups} RRDBNet, not ×{self.scale}")
        if told and told != self.cfg.global_skip:  # (--init-from: the run's --global-skip)
            raise CheckpointError(f"{path}: holds {DESCRIBE[layout]}: give --global-skip {told}")
        c = self.cfg
        what = f"{path}: does not match {DESCRIBE[layout]} (x{c.scale}, nb {c.nb}, "
        what += f"global skip {c.global_skip})"
        load_strict(self.net, sd, what)

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
