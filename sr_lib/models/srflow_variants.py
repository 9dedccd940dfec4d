"""SRFlow-DA and NCSR: SRFlow (srflow.py) with other coupling networks, levels and noise.

- SRFlow-DA: "SRFlow-DA: Super-Resolution Using Normalizing Flow with Deep Convolutional Block"
  (Jo, Yang & Kim, CVPRW 2021, arXiv:2104.08955); released code yhjo09/SRFlow-DA (CC BY-NC-SA 4.0).
- NCSR: "Noise Conditional Flow Model for Learning the Super-Resolution Space" (Kim & Son, CVPRW
  2021, arXiv:2106.04428); released code younggeun-kim/NCSR (CC BY-NC-SA 4.0).
Written from the papers and checked against the released code (docs/flows.md); nothing
copied.
"""

import re
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.config import config_flag
from sr_lib.errors import UsageError
from sr_lib.models.base import Recipe
from sr_lib.models.flow_layers import CondAffine, CouplingNet, ResidualCouplingNet
from sr_lib.models.srflow import SRFlow, SRFlowConfig
from sr_lib.resize import imresize_torch


@dataclass
class SRFlowDAConfig(SRFlowConfig):
    flow_levels: int = field(
        default=0, metadata=dict(help="L (0: 2 at x4, 3 at x8; DA-S: 1)", range="[0, inf)")
    )
    flow_steps: int = field(
        default=0, metadata=dict(help="K (0: 6; DA-S 12/18; DA-D 1)", range="[0, inf)")
    )
    dequant: Literal["gaussian", "uniform", "none"] = field(
        default="gaussian",
        metadata=dict(help="HR noise in training (paper and released code: gaussian N(0, std))"),
    )
    freeze_encoder: float = field(
        default=0.5,
        metadata=dict(
            help="fraction of steps with the encoder frozen (released code: 0.5)", range="[0, 1]"
        ),
    )
    variant: Literal["da", "r", "s", "d"] = field(
        default="da",
        metadata=dict(help="da; r: residual F; s: one level, splits inside; d: 36-conv F"),
    )


class SRFlowDA(SRFlow):
    """SRFlow-DA: 6-conv coupling networks (13x13 receptive field), fewer steps, latent at LR."""

    Config = SRFlowDAConfig

    def __init__(self, cfg: SRFlowDAConfig):
        if cfg.variant == "s" and cfg.flow_levels not in (0, 1):
            raise UsageError(f"{config_flag('variant', 's')} has exactly one level; leave "
                             f"{config_flag('flow_levels')} unset")  # fmt: skip
        self.variant = cfg.variant
        super().__init__(cfg)

    def paper(self, scale: int) -> dict:
        levels = {"s": 1}.get(self.variant, 2 if scale == 4 else 3)
        steps = {"s": 12 if scale == 4 else 18, "d": 1}.get(self.variant, 6)
        return dict(levels=levels, steps=steps, blocks="1,8,15,22")  # x8 too (released configs)

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        return replace(super().recipe(scale), learning_rate=2e-4)  # released configs

    def level_plan(self) -> list[tuple[int, str]]:
        t = "T" * self.cfg.transitions
        if self.variant == "s":  # one squeeze by the full scale, a split after steps 0, 6, 12
            return [
                (self.scale, t + "".join("KS" if k % 6 == 0 else "K" for k in range(self.steps)))
            ]
        # A split after every level but the last: the final latent is at LR resolution.
        return [(2, t + "K" * self.steps + ("S" if l < self.levels else ""))
                for l in range(1, self.levels + 1)]  # fmt: skip

    def make_net(self, cin: int, cout: int) -> nn.Module:
        hidden = self.cfg.hidden_channels
        if self.variant == "r":
            return ResidualCouplingNet(cin, cout, hidden, blocks=1, per_block=4)
        if self.variant == "d":
            return ResidualCouplingNet(cin, cout, hidden, blocks=18, per_block=2)
        return CouplingNet(cin, cout, hidden, deep=4)

    @classmethod
    def raw_config(cls, state_dict: dict, scale: int) -> dict:
        """The variant of a released SRFlow-DA file, read off its keys: -R/-D name their coupling
        networks fAffine1/2/3 (-D nests 18 blocks in fAffine2), -S squeezes by the whole scale."""
        cfg = super().raw_config(state_dict, scale)
        if any(".affine.fAffine1." in k for k in state_dict):
            nested = any(re.search(r"\.fAffine2\.\d+\.\d+\.weight$", k) for k in state_dict)
            cfg["variant"] = "d" if nested else "r"
        else:
            first = state_dict.get("flowUpsamplerNet.layers.1.invconv.weight")
            if first is not None and first.shape[0] == 3 * scale**2:
                cfg["variant"] = "s"
        return cfg

    def official_keys(self) -> dict[str, str]:
        """-R/-D: the released modules are fAffine1 (first conv, ReLU), fAffine2 (the hidden
        convs: one Sequential in -R, a list of 18 two-conv blocks in -D), fAffine3 (zero conv)."""
        keys = super().official_keys()
        if self.variant not in ("r", "d"):
            return keys
        rules = [(r"\.(fAffine|fFeatures)\.fX1\.", r".\g<1>1."),
                 (r"\.(fAffine|fFeatures)\.fX2\.0\." if self.variant == "r"
                  else r"\.(fAffine|fFeatures)\.fX2\.", r".\g<1>2."),
                 (r"\.(fAffine|fFeatures)\.fX3\.", r".\g<1>3.0.")]  # fmt: skip
        for pattern, repl in rules:
            keys = {k: re.sub(pattern, repl, o) for k, o in keys.items()}
        return keys


@dataclass
class NCSRConfig(SRFlowConfig):
    flow_steps: int = field(
        default=0, metadata=dict(help="K (0: 16 at x4, 20 at x8)", range="[0, inf)")
    )
    dequant: Literal["gaussian", "uniform", "none"] = field(
        default="none", metadata=dict(help="HR dequantisation noise (NCSR's released code: none)")
    )
    noise_steps: str = field(
        default="",
        metadata=dict(
            help="per level, comma-separated, how many last steps are noise-conditional "
            "(default: the paper's, 0,16,16 at x4 and 0,0,16,16 at x8)"
        ),
    )
    std_max: float = field(
        default=-1.0,
        metadata=dict(
            help="noise level ~ U(0, std_max) (negative: 0.05 x4, 0.03 x8)", range="[-1, 1]"
        ),
    )
    lr_noise: bool = field(
        default=True,
        metadata=dict(help="noise on the HR only, not also (bicubic-downscaled) on the LR"),
    )


class NCSR(SRFlow):
    """NCSR: SRFlow trained on noisy HR/LR pairs, with a noise-conditional coupling."""

    Config = NCSRConfig

    def __init__(self, cfg: NCSRConfig):
        paper = self.paper(cfg.scale)
        noise_steps = cfg.noise_steps or paper["noise_steps"]
        levels = cfg.flow_levels or paper["levels"]
        try:
            steps = [int(s) for s in noise_steps.split(",")]
        except ValueError:
            steps = []
        ok = len(steps) == levels and min(steps) >= 0
        # The levels read one number each as they are built; built first, so that more levels
        # than the scale allows is said as such (the line for too few numbers led only to it).
        self.noise_steps = steps if ok else [0] * levels
        super().__init__(cfg)
        if not ok:
            given = (
                config_flag("noise_steps", cfg.noise_steps)
                if cfg.noise_steps
                else f"{config_flag('noise_steps')} unset, the paper's {noise_steps} (for "
                f"{paper['levels']} levels)"
            )
            raise UsageError(
                f"{given}: need {levels} whole numbers >= 0, one per level, comma-separated"
            )
        self.std_max = cfg.std_max if cfg.std_max >= 0 else paper["std_max"]

    def paper(self, scale: int) -> dict:
        return {
            **SRFlow.paper(self, scale), "steps": 16 if scale == 4 else 20,
            "blocks": "1,8,15,22",  # both scales (released confs/8X.yml; SRFlow x8 uses 1,3,5,7)
            "noise_steps": "0,16,16" if scale == 4 else "0,0,16,16",
            "std_max": 0.05 if scale == 4 else 0.03,  # released configs (the paper: 0.1)
        }  # fmt: skip

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        return replace(
            super().recipe(scale), batch=18 if scale == 4 else 16, learning_rate=2e-4,
            steps=220_000 if scale == 4 else 250_000,
        )  # fmt: skip

    def make_affine(self, channels: int, level: int, k: int) -> CondAffine:
        affine = CondAffine(channels, self.cond_channels, self.make_net, noise_channels=3,
                            eps=self.cfg.affine_eps)  # fmt: skip
        # The last S[level] steps of a level are noise-conditional; the others keep an unused
        # fAffine_std (it is in the released checkpoints), frozen.
        affine.noise_conditional = self.noise_steps[level - 1] >= self.steps - k
        affine.fAffine_std.requires_grad_(affine.noise_conditional)
        return affine

    def level_noise(self, noise, x: torch.Tensor):
        if noise is None:  # inference: the zero condition ("clean" sampling)
            return None
        return F.interpolate(noise, size=x.shape[-2:], mode="bicubic", align_corners=False)

    def perturb(self, lr: torch.Tensor, hr: torch.Tensor):
        """Per-sample σ ~ U(0, std_max), eps = σ·N(0, I) added to HR, its MATLAB-bicubic downscale
        to LR; the condition is the noise field itself (`std_channels: 3`)."""
        lr, hr, _ = super().perturb(lr, hr)
        sigma = torch.rand(hr.shape[0], 1, 1, 1, device=hr.device, dtype=hr.dtype) * self.std_max
        eps = sigma * torch.randn_like(hr)
        if self.cfg.lr_noise:
            lr = lr + imresize_torch(eps, 1 / self.scale)
        return lr, hr + eps, eps
