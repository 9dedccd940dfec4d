"""SRFlow: "SRFlow: Learning the Super-Resolution Space with Normalizing Flow" (Lugmayr et al.,
ECCV 2020, arXiv:2006.14200). Follows the released code andreas128/SRFlow (CC BY-NC-SA 4.0) as
checked against it number by number (docs/flows.md); nothing copied. SRFlow-DA and NCSR are
subclasses in srflow_variants.py.

p(HR | LR) is a conditional flow HR -> z on the HR image, conditioned on RRDB encoder features
(docs/flows.md). Deliberate choices (docs/flows.md): the paper's Gaussian dequantisation by default
(the released training code uses none), the encoder frozen for the first half of training (the
paper; the released code never freezes it), and the unused conditioning conv `f` kept only so
official checkpoints load strictly (never called, requires_grad False; `--no-unused-conv` drops it).
"""

import math
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.config import config_flag
from sr_lib.errors import CheckpointError, DataError, UsageError
from sr_lib.models.base import (
    ModelConfig,
    NoiseSource,
    Prepared,
    Recipe,
    SampleControls,
    SRModel,
    conv_radius,
    cut,
    eval_mode,
    halo,
    latent_steps,
    load_latent_fields,
)
from sr_lib.models.flow_layers import (
    ActNorm,
    CondAffine,
    CouplingNet,
    FlowStep,
    Split,
    gaussian_logp,
    squeeze,
    unsqueeze,
)
from sr_lib.models.rrdb import RRDBBlock, RRDBNet, load_official_rrdb
from sr_lib.weights import load_strict

OFFICIAL_F = "flowUpsamplerNet.f."  # the released code's unused conv: ignorable when loading


@dataclass
class SRFlowConfig(ModelConfig):
    nb: int = field(
        default=23,
        metadata=dict(
            help="RRDB blocks of the encoder (released configs: 23; SRFlow CelebA x8: 8)"
        ),
    )
    nf: int = field(default=64, metadata=dict(help="encoder feature channels"))
    gc: int = field(default=32, metadata=dict(help="encoder growth channels"))
    rrdb_blocks: str = field(
        default="",
        metadata=dict(
            help="stacked RRDB blocks, e.g. 1,8,15,22 (default: the paper's, spread over a "
            "smaller --nb)"
        ),
    )
    flow_levels: int = field(
        default=0, metadata=dict(help="L (0: 3 at x4, 4 at x8)", range="[0, inf)")
    )
    flow_steps: int = field(
        default=0, metadata=dict(help="K steps per level (0: 16)", range="[0, inf)")
    )
    transitions: int = field(
        default=2, metadata=dict(help="unconditional steps per level", range="[0, inf)")
    )
    hidden_channels: int = field(default=64, metadata=dict(help="coupling network width"))
    affine_eps: float = field(
        default=1e-4, metadata=dict(help="scale = sigmoid(h + 2) + eps", range="(0, 1]")
    )
    lu: bool = field(default=False, metadata=dict(help="LU-parametrised 1x1 convs (not official)"))
    dequant: Literal["gaussian", "uniform", "none"] = field(
        default="gaussian",
        metadata=dict(help="HR noise in training (paper: gaussian N(0, std); released code: none)"),
    )
    gaussian_std: float = field(
        default=4 / 3**0.5, metadata=dict(help="on the 0-255 scale", range="[0, 255]")
    )
    quant: int = field(default=32, metadata=dict(help="uniform: U(-0.5, 0.5)/quant noise"))
    freeze_encoder: float = field(
        default=0.5,
        metadata=dict(
            help="fraction of steps with the encoder frozen (released code: 0)", range="[0, 1]"
        ),
    )
    unused_conv: bool = field(
        default=True,
        metadata=dict(help="drop the released code's never-called conv f (276,576 params)"),
    )
    rrdb_init: str = field(
        default="",
        metadata=dict(
            help="RRDB weights for the encoder at step 0: official RRDB_*.pth or an rrdb run's .pt"
        ),
    )


def encoder_taps(given: str, paper: str, nb: int) -> tuple[int, ...]:
    """The RRDB blocks whose outputs condition the flow: `given` (--rrdb-blocks), else the paper's
    taps of its 23-block encoder, spread proportionally over a smaller --nb (2 blocks: 0,1)."""
    try:
        blocks = [int(b) for b in (given or paper).split(",")]
    except ValueError:
        named = config_flag("rrdb_blocks", given)
        raise UsageError(f"{named}: give block numbers, e.g. 1,8,15,22") from None
    if not given and max(blocks) >= nb:
        blocks = sorted({round(b * (nb - 1) / 22) for b in blocks})
    if any(not 0 <= b < nb for b in blocks):
        named = config_flag("rrdb_blocks", given)
        raise UsageError(f"{named}: need blocks in 0..{nb - 1}, of --nb {nb} (nb={nb})")
    return tuple(blocks)


class FlowLevel(nn.Module):
    """One level: a squeeze by `factor`, then transitions, conditional steps and splits in order."""

    def __init__(self, factor: int, down: int, layers: list[nn.Module]):
        super().__init__()
        self.factor = factor
        self.down = down  # the level lives at HR / down
        self.layers = nn.ModuleList(layers)


class SRFlow(SRModel):
    """RRDB encoder + conditional flow on the HR image; NLL training, sampling by temperature."""

    Config = SRFlowConfig
    stochastic = True
    default_temperature = 0.9  # the challenge submissions' heat
    sample_controls = ("latent", "latent_shift")  # sr_sample.py --latent, --save-latent, ...
    ddp_find_unused = True  # the encoder is frozen for part of training (on_step)
    compile_regions = (FlowStep, Split, RRDBBlock)  # --compile: each block once per level shape
    oldest_checkpoint_format = 2  # format 1 conditioned on pre-activation maps (docs/flows.md)
    scales = (4, 8)
    min_lr_size = 2  # RRDBNet's half-resolution map (fea_up0) of a 1 px LR has no pixel
    # The reverse flow divides by coupling scales down to affine_eps: at T = 0.9 a few pixels'
    # float32 state reaches 1e7 (a small SRFlow, docs/benchmarks.md; saturated in the output),
    # which cast into a float16 coupling network is inf, then NaN.
    fits_float16 = False

    def __init__(self, cfg: SRFlowConfig):
        super().__init__(cfg)
        paper = self.paper(cfg.scale)
        self.levels = cfg.flow_levels or paper["levels"]
        self.steps = cfg.flow_steps or paper["steps"]
        self.blocks = encoder_taps(cfg.rrdb_blocks, paper["blocks"], cfg.nb)
        self.cond_channels = cfg.nf * (1 + len(self.blocks))  # 64 + 4·64 = 320
        flow = self._build_flow()  # first: the encoder skips what the levels do not use
        self._build_encoder(cfg.nb)
        self.flow = nn.ModuleList(flow)
        if cfg.unused_conv:  # never called; present so official checkpoints load (docs/flows.md)
            self.f = nn.Sequential(nn.Conv2d(self.cond_channels, 96, 3, padding=1))
            self.f.requires_grad_(False)
        self._rrdb_init_done = False
        self._low_encoder: list = []  # (key, RRDBNet): the frozen encoder in bfloat16 (encoder())

    def paper(self, scale: int) -> dict:
        """Per-scale defaults of the official configs (docs/flows.md, "Training")."""
        return dict(levels=3 if scale == 4 else 4, steps=16,
                    blocks="1,8,15,22" if scale == 4 else "1,3,5,7")  # fmt: skip

    @classmethod
    def unused_flags(cls, cfg: SRFlowConfig) -> dict[str, str]:
        """Each dequantisation's own parameter."""
        unused = {"gaussian_std": "gaussian", "quant": "uniform"}
        return {k: f"without --dequant {v}" for k, v in unused.items() if cfg.dequant != v}

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        # SRFlow_DF2K_{4,8}X.yml: Adam (effective betas 0.9, 0.999), lr halved at
        # 50/75/90/95 % of 200k steps, HR patch 160, no clipping; validation at temperature 0.9
        # (default_temperature).
        return replace(
            super().recipe(scale), batch=12 if scale == 4 else 16, patch=160 // scale,
            steps=200_000, learning_rate=2.5e-4 if scale == 4 else 5e-4,
            milestones=(0.5, 0.75, 0.9, 0.95),
        )  # fmt: skip

    # Architecture: overridden by the variants.

    def level_plan(self) -> list[tuple[int, str]]:
        """(squeeze factor, ops) per level; ops: T transition, K conditional step, S split.
        Released code: a split after level l only if l < L - 1 (`correct_splits: false`)."""
        t, k = "T" * self.cfg.transitions, "K" * self.steps
        return [
            (2, t + k + ("S" if l < self.levels - 1 else "")) for l in range(1, self.levels + 1)
        ]

    def make_net(self, cin: int, cout: int) -> nn.Module:
        return CouplingNet(cin, cout, self.cfg.hidden_channels)

    def make_affine(self, channels: int, level: int, k: int) -> CondAffine:
        return CondAffine(channels, self.cond_channels, self.make_net, eps=self.cfg.affine_eps)

    def _build_flow(self) -> list[FlowLevel]:
        levels, c, down = [], 3, 1
        self.cond_keys = []
        for level, (factor, ops) in enumerate(self.level_plan(), 1):
            c, down, k, layers = c * factor**2, down * factor, 0, []
            if down > 2 * self.scale:  # the encoder's coarsest features are at LR/2
                most = level - 1
                raise UsageError(
                    f"{config_flag('flow_levels', self.levels)}: {type(self).__name__} "
                    f"x{self.scale} has at most {most} levels (the encoder conditions none below "
                    f"LR/2); use --flow-levels {most} or fewer"
                )
            for op in ops:
                if op == "S":
                    layers.append(Split(c))
                    c = layers[-1].keep
                else:
                    affine = self.make_affine(c, level, k) if op == "K" else None
                    layers.append(FlowStep(c, affine, self.cfg.lu))
                    k += op == "K"
            levels.append(FlowLevel(factor, down, layers))
            up = self.scale // down  # the level lives at HR/down = LR·up; up 0 means LR/2
            self.cond_keys.append(f"fea_up{up}")
        self.latent_channels, self.latent_down = c, down
        self.lr_multiple = max(1, down // self.scale)  # the final latent needs whole pixels
        return levels

    def _build_encoder(self, nb: int) -> None:
        cfg = self.cfg
        self.RRDB = RRDBNet(cfg.scale, cfg.nf, nb, cfg.gc)
        self.up_to = max(1, *(int(k.removeprefix("fea_up")) for k in self.cond_keys))
        # The HR-resolution map and the image-output branch never reach the flow: skipped, and
        # frozen so every trainable parameter gets a gradient.
        n_up = self.scale.bit_length() - 1
        unused = ["HRconv.", "conv_last."]
        unused += [f"upconv{i}." for i in range(1, n_up + 1) if 2**i > self.up_to]
        self._encoder_params = []
        for name, p in self.RRDB.named_parameters():
            if name.startswith(tuple(unused)):
                p.requires_grad_(False)
            else:
                self._encoder_params.append(p)

    def encoder(self, lr: torch.Tensor) -> RRDBNet:
        """The RRDB encoder to run on `lr`: while it is frozen (`on_step`) and autocast is on, a
        copy in the autocast dtype, made once and kept until a weight changes. Autocast keeps a
        cast weight only within one autocast region and only for weights that require gradients,
        so the frozen encoder's ~700 weights would be cast again at every step; the copy holds
        exactly those casts, so the features are bit-identical. Not with --compile (compiled
        encoder blocks, which cast in their graph)."""
        device, compiled = lr.device.type, self.RRDB.RRDB_trunk[0]._compiled_call_impl
        if self._encoder_params[0].requires_grad or compiled is not None:
            self._low_encoder.clear()
            return self.RRDB
        if not torch.is_autocast_enabled(device):
            return self.RRDB
        dtype = torch.get_autocast_dtype(device)
        key = (dtype, lr.device, *(p._version for p in self.RRDB.parameters()))
        if not self._low_encoder or self._low_encoder[0] != key:
            cfg = self.cfg
            low = RRDBNet(cfg.scale, cfg.nf, cfg.nb, cfg.gc)
            low.load_state_dict(self.RRDB.state_dict())
            low = low.to(lr.device).requires_grad_(False)
            if self.RRDB.conv_first.weight.is_contiguous(memory_format=torch.channels_last):
                low = low.to(memory_format=torch.channels_last)  # as a channels-last model
            for name, part in low.named_children():
                if name != "conv_first":  # float32 under autocast too (RRDBNet.features)
                    part.to(dtype)
            self._low_encoder[:] = [key, low]
        return self._low_encoder[1]

    # Encoder and conditioning.

    def conditions(self, lr: torch.Tensor) -> list[torch.Tensor]:
        """Per-level conditioning maps (B, nf·(1 + blocks), h_l, w_l) (docs/flows.md)."""
        feats = self.encoder(lr).features(lr, self.blocks, up_to=self.up_to)
        stack = torch.cat([feats[f"block_{b}"] for b in self.blocks], 1)  # (B, 256, h, w)
        out = []
        for key in self.cond_keys:
            m = feats[key]
            s = F.interpolate(stack, size=m.shape[-2:], mode="nearest")  # released: default mode
            out.append(torch.cat([m, s], 1))  # (B, 320, h_l, w_l)
        return out

    def prepare(self, lr: torch.Tensor) -> Prepared:
        """The encoder's conditioning maps of one LR image (docs/flows.md), computed once for all
        its samples and temperatures; `decode` keeps each step's LR-only part in `memo`."""
        conds = self.conditions(lr)
        return Prepared(lr.shape[-2:], {f"cond{k}": c for k, c in enumerate(conds)})

    @property
    def tile_halo(self) -> int:
        """Receptive field of the flow's inverse given whole-image conditioning (docs/design.md,
        "Tiled sampling"): from the coarsest level out, each conditional step widens it by its
        coupling networks' radius, each split by its prior conv's, each unsqueeze by its factor."""
        r = 0  # in pixels of the current level
        for level in reversed(self.flow):
            for layer in reversed(level.layers):
                if isinstance(layer, Split):
                    r += conv_radius(layer.conv)
                elif layer.affine is not None:
                    a = layer.affine
                    nets = [
                        a.fFeatures,
                        a.fAffine,
                        *([a.fAffine_std] if a.noise_conditional else []),
                    ]
                    r += max(conv_radius(net) for net in nets)
            r = r * level.factor + level.factor - 1  # one level finer
        return halo(r / self.scale)

    def level_noise(self, noise, x: torch.Tensor):
        """The noise condition at a level's resolution (NCSR); SRFlow has none."""
        return None

    def perturb(self, lr: torch.Tensor, hr: torch.Tensor):
        """Training-time input noise: (lr, hr, noise condition). Dequantisation: docs/flows.md."""
        if self.cfg.dequant == "gaussian":  # the paper: N(0, (4/√3)²) on the 0-255 scale
            hr = hr + torch.randn_like(hr) * (self.cfg.gaussian_std / 255)
        elif self.cfg.dequant == "uniform":
            hr = hr + (torch.rand_like(hr) - 0.5) / self.cfg.quant
        return lr, hr, None

    # Flow in both directions.

    def encode(self, lr: torch.Tensor, hr: torch.Tensor, noise=None, conds=None):
        """HR -> ([split eps ..., z_L], log|det J| (B,)); latents ~ N(0, I) under the model."""
        conds = self.conditions(lr) if conds is None else conds
        x, logdet, latents = hr, hr.new_zeros(hr.shape[0]), []
        for level, ft in zip(self.flow, conds):
            x = squeeze(x, level.factor)  # (B, C·f², H/f, W/f)
            nz = self.level_noise(noise, x)
            for layer in level.layers:
                if isinstance(layer, Split):
                    x, eps, logdet = layer(x, logdet)
                    latents.append(eps)
                else:
                    x, logdet = layer(x, logdet, ft, nz)
        return latents + [x], logdet

    def decode(self, conds: list[torch.Tensor], latents: list[torch.Tensor], noise=None,
               logdet=None, memo: dict | None = None):  # fmt: skip
        """[eps ..., z_L] of n samples of ONE LR image (conds: batch 1) -> (HR (n, ...), logdet).

        Each step's LR-only part runs once (`prepare`), and is kept in `memo` (a Prepared's) for
        later calls on the same image; the per-sample part runs row by row, so a sample is
        bit-identical however many are drawn together.
        """
        eps, xs = list(latents[:-1]), list(latents[-1].split(1))
        lds = [None] * len(xs) if logdet is None else list(logdet.split(1))
        keep = memo is not None and noise is None  # a training noise condition: nothing kept
        for level, ft in zip(reversed(self.flow), reversed(conds)):
            nz = self.level_noise(noise, xs[0])
            for layer in reversed(level.layers):
                if isinstance(layer, Split):
                    e = eps.pop().split(1)
                    for j, x in enumerate(xs):
                        xs[j], lds[j] = layer.reverse(x, e[j], lds[j])
                    continue
                prep = memo.get(id(layer)) if keep else None
                if prep is None and layer.affine is not None:
                    prep = layer.affine.prepare(ft, nz)
                    if keep:
                        memo[id(layer)] = prep
                for j, x in enumerate(xs):
                    xs[j], lds[j] = layer.reverse(x, lds[j], ft, nz, prep)
            xs = [unsqueeze(x, level.factor) for x in xs]  # (1, C/f², H·f, W·f)
        return torch.cat(xs), None if logdet is None else torch.cat(lds)

    def reconstruct(self, lr: torch.Tensor, latents: list[torch.Tensor], noise=None):
        """Decode explicit latents [eps ..., z_L] (as `encode` returns them): (HR, logdet)."""
        out, lds = [], []
        for b in range(lr.shape[0]):
            one = [z[b : b + 1] for z in latents]
            nz = None if noise is None else noise[b : b + 1]
            x, ld = self.decode(self.conditions(lr[b : b + 1]), one, nz, one[-1].new_zeros(1))
            out.append(x)
            lds.append(ld)
        return torch.cat(out), torch.cat(lds)

    def log_likelihood_terms(self, lr: torch.Tensor, hr: torch.Tensor, noise=None):
        """(log|det J|, log N(latents; 0, I)) in nats (B,) each, J the Jacobian of HR -> the
        standard-normal latents (each split prior's scale in it): log p(HR | LR) is their sum."""
        latents, logdet = self.encode(lr, hr, noise)
        return logdet, sum(gaussian_logp(z) for z in latents)

    def log_likelihood(self, lr: torch.Tensor, hr: torch.Tensor, noise=None) -> torch.Tensor:
        """log p(HR | LR) in nats (B,), Eq. 4-6 (+ the uniform dequantisation constant)."""
        return self.objective(hr, *self.log_likelihood_terms(lr, hr, noise))

    def objective(self, hr: torch.Tensor, logdet: torch.Tensor, logp: torch.Tensor):
        objective = logdet + logp
        if self.cfg.dequant == "uniform":  # released code: -ln(quant)·H·W (not 3·H·W)
            objective = objective - math.log(self.cfg.quant) * hr.shape[2] * hr.shape[3]
        return objective

    def nll(self, lr: torch.Tensor, hr: torch.Tensor, noise=None) -> torch.Tensor:
        """Negative log-likelihood in bits per HR pixel (summed over RGB; can be negative): (B,)."""
        return -self.log_likelihood(lr, hr, noise) / (math.log(2) * hr.shape[2] * hr.shape[3])

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        lr, hr = self.check_inputs(lr, hr)  # one line for a wrong input, not a conv's error
        noise = None
        if self.training:
            lr, hr, noise = self.perturb(lr, hr)
        logdet, logp = self.log_likelihood_terms(lr, hr, noise)
        bits = math.log(2) * hr.shape[2] * hr.shape[3]  # nats per image -> bits per HR pixel
        nll = -self.objective(hr, logdet, logp) / bits  # (as self.nll, from the same terms)
        # Logged apart (docs/flows.md#units-the-nll-is-in-bits-per-hr-pixel): which one moves
        # when the NLL bounces or turns non-finite.
        return {
            "loss": nll.mean(),
            "nll": nll.detach().mean(),
            "logdet": (logdet.detach() / bits).mean(),
            "logp": (logp.detach() / bits).mean(),
        }

    def latent_fields(self) -> list[tuple[int, int]]:
        """(C, down) of each latent field in `encode`'s order [eps of each split, first split
        first, ..., z_L]: field k is (C, s·h / down, s·w / down) for an h × w (padded) LR."""
        eps = [(m.consume, level.down) for level in self.flow for m in level.layers
               if isinstance(m, Split)]  # fmt: skip
        return eps + [(self.latent_channels, self.latent_down)]

    def draw_latents(self, rows: int, H: int, W: int, temperature: float, noise, like):
        """The latent fields (rows, C, H/down, W/down) of an HR of H × W, in `encode`'s order:
        temperature · N(0, I) from `noise` (spatial fields, so tiles can cut them from the
        whole), drawn z_L first, then each split's eps from the last level back."""

        def draw(c, down):
            if temperature == 0:
                return like.new_zeros(rows, c, H // down, W // down)
            return temperature * noise.field(c, H // down, W // down).to(like.device, like.dtype)

        return [draw(c, down) for c, down in reversed(self.latent_fields())][::-1]

    def generate(self, lr: torch.Tensor, n: int, temperature: float, noise, prepared=None,
                 latent=None):  # fmt: skip
        """temperature = std of every latent draw (final prior and splits); 0: all means.
        prepared: `prepare(lr)` of this one image (B = 1), reused instead of the encoder.
        latent: explicit fields [(B·n, C, H/down, W/down), ...] in `encode`'s order (the
        latents `draw_latents` draws, temperature applied; temperature is then unused), at the
        whole image's size: a tile (`noise.window`) cuts them as it cuts drawn noise."""
        b, _, h, w = lr.shape
        if prepared is not None and b != 1:
            raise ValueError(f"generate: prepared is for one image, got a batch of {b}")
        H, W = h * self.scale, w * self.scale
        if latent is None:
            latents = self.draw_latents(b * n, H, W, temperature, noise, lr)
        else:
            latents = self.cut_latents(latent, b * n, H, W, getattr(noise, "window", None), lr)
        out = []
        for i in range(b):  # the encoder per image: shared by its n samples
            rows = [z[i * n : (i + 1) * n] for z in latents]
            p = self.prepare(lr[i : i + 1]) if prepared is None else prepared
            conds = [p.maps[f"cond{k}"] for k in range(len(self.flow))]
            out.append(self.decode(conds, rows, memo=None if prepared is None else p.memo)[0])
        return torch.stack(out)  # (B, n, 3, H, W)

    @torch.no_grad()
    def round_trip(self, lr: torch.Tensor, n: int, temperature: float, noise):
        """sr_sample.py --check-invertibility: the n samples x of ONE (1, 3, h, w) LR image,
        padded to `lr_multiple`, drawn as `sample` draws them (the same latents z from `noise`),
        each encoded back to z' and z' decoded again to x' (in eval mode). Returns (x, x', the max
        |z − z'| of each sample (n,)), x and x' unclamped, in [0, 1] pixel units. In exact
        arithmetic x' = x and z' = z: the flow is a bijection (docs/flows.md#invertibility)."""
        with eval_mode(self):
            conds = self.conditions(lr)
            _, _, h, w = lr.shape
            z = self.draw_latents(n, h * self.scale, w * self.scale, temperature, noise, lr)
            x = self.decode(conds, z)[0]
            z2, _ = self.encode(lr.expand(n, -1, -1, -1), x,
                                conds=[c.expand(n, -1, -1, -1) for c in conds])  # fmt: skip
            x2 = self.decode(conds, z2)[0]
        err = torch.stack([(a - b).abs().flatten(1).amax(1) for a, b in zip(z, z2)]).amax(0)
        return x, x2, err

    def cut_latents(self, latent, rows: int, H: int, W: int, window, like) -> list:
        """Explicit whole-image latent fields cut to the tile `window` (None: the whole image),
        checked against the fields of an H × W HR (a ValueError in one line)."""
        want = [(rows, c, H // down, W // down) for c, down in self.latent_fields()]
        out = list(latent)
        if len(out) == len(want) and window is not None:
            out = [cut(z, window) for z in out]
        if [tuple(z.shape) for z in out] != want:
            raise ValueError(f"generate: latent fields {[tuple(z.shape) for z in out]}, need "
                             f"{want}")  # fmt: skip
        return [z.to(like) for z in out]

    # sr_sample.py's latent controls: --latent FILE, --latent-shift FILE, --save-latent
    # (docs/flows.md, "Saved latents").

    def resolve_controls(self, controls: dict, n: int, device) -> SampleControls:
        """--latent FILE: a .npz of this model's latent fields (load_latent_fields), k samples;
        --latent-shift FILE --latent-steps S: a .npz of one direction's fields, one output per
        step (z_0 + step · direction, z_0 the --latent row or the temperature-0 latent: zeros).
        controls["made_by"]: the run's model (sr_sample.py's latent_source), which a file's
        made_by entry must name (`check_latent_source`)."""
        ctl, count, own = SampleControls(n, {}), len(self.latent_fields()), controls.get("made_by")
        if controls.get("latent"):
            fields, digest, ctl.warnings = self.read_latent(controls["latent"], "--latent", own)
            ctl.latent, ctl.latent_file = [z.to(device) for z in fields], controls["latent"]
            ctl.n = len(ctl.latent[0])
            ctl.digests["--latent"] = [digest]
        if controls.get("latent_shift"):
            file, text = controls["latent_shift"], controls["latent_steps"]
            fields, digest, warnings = load_latent_fields(file, count, "--latent-shift", own)
            ctl.warnings += warnings
            if len(fields[0]) > 1:  # the file, not the flags (exit 3)
                raise DataError(f"--latent-shift {file}: holds {len(fields[0])} samples; expected "
                                "one direction, fields (C, h, w)")  # fmt: skip
            steps, rows = latent_steps(text), 1 if ctl.latent is None else len(ctl.latent[0])
            if not steps or rows > 1:
                raise UsageError(
                    f"--latent-shift {file} --latent-steps {text!r}: needs numbers like "
                    f"-2,-1,0,1,2 and at most one --latent row (given: {rows})"
                )
            ctl.shift = ([z.to(device) for z in fields], torch.tensor(steps, device=device))
            ctl.digests["--latent-shift"], ctl.shift_file = [digest], file
            ctl.n = len(steps)
        return ctl

    def read_latent(self, path: str, flag: str, own: dict | None = None):
        """A saved .latent.npz as SampleControls.latent holds it, fields [(k, C, h, w), ...]
        (`load_latent_fields`), the sha256 of the file and the warning lines of its made_by entry
        against `own` (the run's latent_source)."""
        return load_latent_fields(path, len(self.latent_fields()), flag, own)

    def fields_lr(self, shapes: list[tuple]) -> str:
        """The LR that latent fields of these (C, h, w) shapes fit, in words (for messages)."""
        sizes = {(w * down // self.scale, h * down // self.scale)
                 for (_, h, w), (_, down) in zip(shapes, self.latent_fields())}  # fmt: skip
        exact = all(h * down % self.scale == 0 == w * down % self.scale
                    for (_, h, w), (_, down) in zip(shapes, self.latent_fields()))  # fmt: skip
        if len(sizes) != 1 or not exact or len(shapes) != len(self.latent_fields()):
            return "no LR of this model"
        w, h = sizes.pop()
        return f"an LR of {w}x{h} px"

    def check_latent_size(self, file: str, got: list[tuple], size: tuple, image: str,
                          hint: str) -> None:  # fmt: skip
        """Latent fields of the (C, h, w) shapes `got` (of `file`: the flag and its path) against
        an LR of `size` (h, w), of the input `image` ("r0.png's"): other shapes are a data error
        (exit 3, as any file that does not fit the run) naming the file, the LR its fields fit,
        the LR's size and fields, and `hint` (what to do)."""
        m, s = self.lr_multiple, self.scale
        h, w = size
        H, W = -(-h // m) * m * s, -(-w // m) * m * s
        want = [(c, H // down, W // down) for c, down in self.latent_fields()]
        if got == want:
            return
        shapes = lambda z: ", ".join(f"z{k} {v}" for k, v in enumerate(z))  # noqa: E731
        pad = f", which pads the LR to a multiple of {m}" if m > 1 else ""
        raise DataError(
            f"{file}: fields {shapes(got)}, the latents of {self.fields_lr(got)}, not of {image} "
            f"LR of {w}x{h} px ({shapes(want)} in this x{s} {type(self).__name__}{pad}); {hint}"
        )

    def check_controls_fit(self, controls: SampleControls, size: tuple, image: str) -> None:
        """The --latent and --latent-shift files' fields against an LR of `size` (h, w) of the
        input `image` ("r0.png's"): `check_latent_size`, with what to do about each."""
        files = [("--latent", controls.latent_file, controls.latent)]
        if controls.shift is not None:
            files.append(("--latent-shift", controls.shift_file, controls.shift[0]))
        for flag, file, fields in files:
            if fields is None:
                continue
            hint = f"a {flag} file fits one LR size: give --input only images of that size"
            if flag == "--latent":  # (a --latent DIR's files: its own hint)
                hint = controls.latent_hint or (
                    f"{hint}, or --latent DIR, a folder written by --save-latent (each input "
                    "decoded from its own files there)"
                )
            else:
                hint += f", or each image its own {flag} file"
            got = [tuple(z.shape[1:]) for z in fields]
            self.check_latent_size(f"{flag} {file}", got, size, image, hint)

    def sample_latents(self, lr, seeds, idx, temperature, controls: SampleControls) -> list:
        """The latent fields [(len(idx), C, h, w), ...] of samples idx of the whole (1, 3, h, w)
        LR, at its size padded to lr_multiple: drawn as `generate` draws them (the same bits),
        the --latent file's rows, or --latent-shift's z_0 + step · direction (z_0: the --latent
        row, else zeros, the temperature-0 latent); a file's shapes must be this LR's
        (`check_latent_size`)."""
        m, s = self.lr_multiple, self.scale
        h, w = lr.shape[-2:]
        if controls.latent is None and controls.shift is None:
            noise = NoiseSource(seeds, lr.device)
            H, W = -(-h // m) * m * s, -(-w // m) * m * s
            return self.draw_latents(len(idx), H, W, float(temperature), noise, lr)
        self.check_controls_fit(controls, (h, w), controls.image)
        if controls.shift is None:
            return [z[list(idx)] for z in controls.latent]
        direction, steps = controls.shift
        base = controls.latent or [z.new_zeros(z.shape) for z in direction]
        k = steps[list(idx)].view(-1, 1, 1, 1).to(direction[0])
        return [z0[:1] + k * d for z0, d in zip(base, direction)]

    # Training schedule and weights.

    def on_step(self, step: int, total: int) -> None:
        self._load_rrdb_init()
        frozen = step < self.cfg.freeze_encoder * total  # the paper: frozen for the first half
        for p in self._encoder_params:
            p.requires_grad_(not frozen)

    def check_files(self, loaded: bool) -> None:
        if not loaded:
            self._load_rrdb_init()
        if not loaded and not self.cfg.rrdb_init and self.cfg.freeze_encoder > 0:
            # The papers' encoder is a pre-trained RRDB, frozen for the first half (SRFlow §4):
            # a random one frozen that long conditions half the run on random features.
            warnings.warn(
                f"--freeze-encoder {self.cfg.freeze_encoder:g}: the encoder stays frozen for the "
                f"first {self.cfg.freeze_encoder:.0%} of the steps, and without --rrdb-init it is "
                "random; give --rrdb-init FILE (a released RRDB_*.pth or an rrdb run's last.pt), "
                "or --freeze-encoder 0 to train it from the start",
                stacklevel=2,
            )

    def _load_rrdb_init(self) -> None:
        """--rrdb-init's encoder weights, once (the official configs start here)."""
        if self.cfg.rrdb_init and not self._rrdb_init_done:
            try:
                load_official_rrdb(self.RRDB, self.cfg.rrdb_init)
            except CheckpointError as e:
                raise CheckpointError(f"--rrdb-init {e}") from None
            self._rrdb_init_done = True

    def graph_key(self) -> tuple:
        return ()  # the one switch, the frozen encoder, is its parameters' requires_grad

    def mark_initialized(self) -> None:
        """Weights were loaded: no ActNorm data init and no --rrdb-init load."""
        for m in self.modules():
            if isinstance(m, ActNorm):
                m.initialized = True
        self._rrdb_init_done = True

    def official_keys(self) -> dict[str, str]:
        """Our state_dict key -> the released code's key (docs/flows.md, "Key layout")."""
        keys, offset = {}, 0
        prefix = {}
        for l, level in enumerate(self.flow):
            for j in range(len(level.layers)):  # the squeeze takes index `offset`
                prefix[f"flow.{l}.layers.{j}."] = f"flowUpsamplerNet.layers.{offset + 1 + j}."
            offset += 1 + len(level.layers)
        for k in self.state_dict():
            if k.startswith("flow."):
                p = re.match(r"flow\.\d+\.layers\.\d+\.", k).group(0)
                keys[k] = prefix[p] + k[len(p) :]
            else:
                keys[k] = "flowUpsamplerNet." + k if k.startswith("f.") else k
        return keys

    def export_official_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under the released code's key names (a loadable official .pth)."""
        self._check_official_layout()
        sd = self.state_dict()
        return {o: sd[k] for k, o in self.official_keys().items()}

    def _check_official_layout(self) -> None:
        if self.cfg.lu:
            raise UsageError(f"{config_flag('lu', True)} models have no official key layout")

    def load_raw_state_dict(self, sd: dict[str, torch.Tensor], path="state_dict") -> None:
        """Load a released checkpoint (official keys or our own) strictly: only the
        unused conv `flowUpsamplerNet.f.*` may be absent or extra. Marks ActNorms initialised."""
        if any(k.startswith("conv_first.") for k in sd):
            raise CheckpointError(
                f"{path}: an RRDB encoder file, not a flow; train with --rrdb-init {path}"
            )
        hint = ""
        if not any(k.startswith("flow.") for k in sd):  # the released layout
            hint = f"the file looks like {_looks_like(sd)}"
            sd = self._from_official(sd)
        layout = f"{type(self).__name__} x{self.scale} (L={self.levels}, K={self.steps})"
        load_strict(self, sd, f"{path}: does not match {layout}", hint, optional=("f.", OFFICIAL_F))
        self.mark_initialized()

    @classmethod
    def raw_config(cls, state_dict: dict, scale: int) -> dict:
        """The encoder depth of a released file (SRFlow_CelebA_8X.pth: 8 RRDB blocks)."""
        cfg = super().raw_config(state_dict, scale)
        trunk = {int(m[1]) for k in state_dict if (m := re.match(r"RRDB\.RRDB_trunk\.(\d+)\.", k))}
        if trunk:
            cfg["nb"] = max(trunk) + 1
        return cfg

    def _from_official(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_official_layout()
        to_ours = {o: k for k, o in self.official_keys().items()}
        return {to_ours.get(k, k): v for k, v in sd.items()}


def _looks_like(sd: dict) -> str:
    """Which model and scale an official state_dict seems to hold (for error messages)."""
    if any(".fAffine_std." in k for k in sd):
        model = "ncsr"
    elif any(".fAffine.10." in k or ".fAffine1." in k for k in sd):
        model = "srflow_da"
    else:
        model = "srflow"
    scale = 8 if "RRDB.upconv3.weight" in sd else 4
    return f"--model {model} --scale {scale} (load_model(path, model={model!r}, scale={scale}))"
