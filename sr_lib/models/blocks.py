"""Building blocks shared by several models, and the σ branch of the ℓ_E loss.

- `conv3x3`, `ResBlock`, `Upsampler`: the EDSR design (Lim et al., "Enhanced Deep Residual Networks
  for Single Image Super-Resolution", CVPRW 2017, arXiv:1707.02921).
- `SigmaBranch`: ℓ_E's σ (He & Cheng, "Revisiting ℓ1 Loss in Super-Resolution: A Probabilistic
  View and Beyond", arXiv:2201.10084, Fig. 3; the loss is `sr_lib.models.losses.le_loss`). No
  official code exists; written from the paper (docs/le.md).
- `RegressionConfig`, `RegressionSR`: the common base of deterministic regression models (EDSR,
  RRDB) trained with `--loss l1` or `--loss le`.
"""

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.errors import UsageError
from sr_lib.models.base import WEIGHT, ModelConfig, SRModel, conv_radius, halo
from sr_lib.models.losses import AUX_TARGETS, MASK_SCOPES, le_loss

LOSSES = ("l1", "le")
SIGMA_INIT_LOGIT = -3.0


def conv3x3(in_ch: int, out_ch: int, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution, stride 1, 'same' padding."""
    return nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)


def float32_out(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer in float32 under autocast (a no-op without it): the one reading the LR image and
    the image-producing one. bfloat16 keeps 8 bits of mantissa: read in it, the LR pixels and the
    weights are rounded, an error every output pixel follows (LR-PSNR sees it first); written in
    it, outputs in [0.5, 1) step by 1/256, about the size of a trained model's residual |y − μ|
    in smooth regions, so ℓ1's gradient sign there was noise (docs/design.md, "Numerics")."""
    with torch.autocast(x.device.type, enabled=False):  # float64 (a model in double) stays
        return conv(x if x.dtype == torch.float64 else x.float())


def autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype while autocast is on (else x as it is): a float32 tensor that feeds a
    low-precision trunk, cast once rather than again by each of its layers."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


class ResBlock(nn.Module):
    """EDSR residual block: conv-ReLU-conv, scaled, plus the identity (no batch norm)."""

    def __init__(self, n_feats: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(n_feats, n_feats), nn.ReLU(True), conv3x3(n_feats, n_feats)
        )
        self.res_scale = res_scale  # 0.1 in the full EDSR keeps 32 wide blocks trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: conv + PixelShuffle(s) once for ×2/×3, ×2 stages for ×4 and ×8."""

    def __init__(self, n_feats: int, scale: int):
        if scale in (2, 3):
            factors = [scale]
        elif scale in (4, 8):
            factors = [2] * (scale.bit_length() - 1)
        else:
            raise UsageError(f"upsampler: scale {scale} not supported; use 2, 3, 4 or 8")
        layers: list[nn.Module] = []
        for f in factors:
            layers += [conv3x3(n_feats, n_feats * f * f), nn.PixelShuffle(f)]  # (B, C, fH, fW)
        super().__init__(*layers)


class SigmaBranch(nn.Module):
    """ℓ_E σ branch (paper Fig. 3): 4 × (conv3x3 + PReLU), then "PixelShuffle coupled with 3×3
    convolution": one conv3x3 to out_ch·s² channels + PixelShuffle(s) (ESPCN-style), sigmoid.

    The sub-pixel conv keeps the branch cheap at HR resolution (the paper reports +38 % training
    cost for ℓ_E, Table 1; a 160-channel EDSR-style upsampler would cost ~3× EDSR-baseline).
    """

    def __init__(self, in_ch: int, scale: int, width: int = 160, out_ch: int = 3):
        super().__init__()
        layers: list[nn.Module] = [conv3x3(in_ch, width), nn.PReLU(width)]
        for _ in range(3):
            layers += [conv3x3(width, width), nn.PReLU(width)]
        self.mapping = nn.Sequential(*layers)  # FSRCNN-style Conv+PReLU mapping (paper §4.3)
        # He init for PReLU (slope 0.25 at init) keeps the signal's variance through the mapping.
        # PyTorch's default shrinks it ~√3× per conv, and the body features are small (std ~0.1),
        # so a default-initialised branch outputs a near-constant map. Measured on a trained μ, a
        # fresh branch then showed no structure (r ≈ 0) for 200 steps; with this init, r was ≈ 0.2
        # after 50. The paper does not describe the initialisation.
        for m in self.mapping:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.25, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        self.upsample = nn.Sequential(conv3x3(width, out_ch * scale**2), nn.PixelShuffle(scale))
        # Start σ near a typical SR error (sigmoid(-3) ≈ 0.047 on the [0, 1] scale) instead of
        # sigmoid(0) = 0.5, so σ does not spend its first steps shrinking everywhere before it
        # can follow the error map. The paper does not describe the initialisation.
        nn.init.constant_(self.upsample[0].bias, SIGMA_INIT_LOGIT)

    def radius(self) -> int:
        """Receptive field in pixels of its input: every conv runs at that resolution."""
        return conv_radius(self.mapping) + conv_radius(self.upsample)

    def forward(self, fea: torch.Tensor) -> torch.Tensor:
        # The sigmoid bounds σ to (0, 1), the range of images here (docs/le.md, "Design decisions").
        return torch.sigmoid(self.upsample(self.mapping(fea)))


class WeightAverage(nn.Module):
    """Exponential moving average of another module's parameters, held as buffers: saved and
    resumed with the model, but neither trained nor counted as parameters. `forward(module, x)`
    runs `module` with the averaged weights."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [name for name, _ in module.named_parameters()]
        for name, p in module.named_parameters():
            self.register_buffer(self._key(name), p.detach().clone())
        # the last step averaged in, so that a repeated on_step(step) call adds nothing twice
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._host_step = 0  # its value on the host (a loaded one is read once), not per step

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None  # a loaded "step" (resume, rollback) is read again

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # buffer names cannot hold dots

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Average in `module`'s weights as they are before training step `step` (> 0)."""
        if self._host_step is None:
            self._host_step = int(self.step)
        n = self._host_step
        if step <= n:
            return
        # Warm-up, as TensorFlow's ExponentialMovingAverage(num_updates): early on the average
        # follows the weights instead of being dominated by their initial values.
        decay = min(self.decay, (1 + n) / (10 + n))
        for name, p in module.named_parameters():
            getattr(self, self._key(name)).lerp_(p.detach(), 1 - decay)
        self.step.fill_(step)
        self._host_step = step

    def initial_state(self, module_state: dict, prefix: str) -> dict:
        """This module's state_dict entries starting the average at the given weights."""
        out = {prefix + self._key(n): module_state[n].detach().clone() for n in self.names}
        return {**out, prefix + "step": torch.zeros((), dtype=torch.long)}

    def forward(self, module: nn.Module, *args):
        params = {name: getattr(self, self._key(name)) for name in self.names}
        return torch.func.functional_call(module, params, args)


@dataclass
class RegressionConfig(ModelConfig):
    loss: str = field(
        default="l1",
        metadata=dict(
            choices=LOSSES,
            help="l1: mean |ŷ − μ|; le: expected-ℓ1 ℓ_E (Eq. 8) + σ branch (Eq. 10)",
        ),
    )
    le_beta: float = field(
        default=0.01, metadata=dict(help="β of the σ auxiliary loss (Eq. 10)", range=WEIGHT)
    )
    le_mask_scope: str = field(
        default="batch",
        metadata=dict(
            choices=MASK_SCOPES,
            help="hard-sample mask threshold: mean over the whole batch or per image",
        ),
    )
    le_aux_target: str = field(
        default="signed",
        metadata=dict(
            choices=AUX_TARGETS,
            help="σ target: signed ŷ − μ (Eq. 10 as printed) or abs |ŷ − μ| (docs/le.md)",
        ),
    )
    le_sigma_feats: int = field(default=160, metadata=dict(help="channels of the σ branch"))
    le_sigma_final_fraction: float = field(
        default=0.0,
        metadata=dict(
            help="train only the σ branch, on the whole batch, for this final fraction of the "
            "steps (μ frozen: no backward through the body); 0 = never (paper), 1 = σ only",
            range="[0, 1]",
        ),
    )
    le_sigma_ema: float = field(
        default=0.0,
        metadata=dict(
            help="keep an exponential moving average of the σ branch's weights with this decay "
            "per step (e.g. 0.99) and use it for the uncertainty map; 0 = off (paper)",
            range="[0, 1)",
        ),
    )


class RegressionSR(SRModel):
    """A deterministic μ = f(lr) trained with ℓ1 or ℓ_E; the σ branch exists only with ℓ_E.

    Subclasses build their network, call `_add_sigma_branch(feature_channels)` last and implement
    `predict(lr) -> (mu, fea)`, fea being the last LR-resolution body features (the σ input).
    """

    Config = RegressionConfig
    sigma: SigmaBranch | None

    def __init__(self, cfg: RegressionConfig):
        super().__init__(cfg)
        # μ's parameters get no gradient in the σ-only phase: DDP must look for unused ones.
        self.ddp_find_unused = cfg.loss == "le" and cfg.le_sigma_final_fraction > 0
        self.sigma = None
        self.sigma_ema = None
        self._sigma_only = False  # set by on_step: the final σ-only phase

    @classmethod
    def unused_flags(cls, cfg: RegressionConfig) -> dict[str, str]:
        """The σ branch and its loss exist only with ℓ_E."""
        le = [f.name for f in fields(RegressionConfig) if f.name.startswith("le_")]
        return {} if cfg.loss == "le" else dict.fromkeys(le, "without --loss le")

    def _add_sigma_branch(self, in_ch: int) -> None:
        if self.cfg.loss == "le":
            self.sigma = SigmaBranch(in_ch, self.scale, self.cfg.le_sigma_feats)
            if self.cfg.le_sigma_ema > 0:
                # A short run's σ map is noisy: its target |ŷ − μ| is one noisy draw per pixel;
                # an average of σ's weights wanders less (docs/benchmarks.md, design decisions).
                self.sigma_ema = WeightAverage(self.sigma, self.cfg.le_sigma_ema)

    def complete_state_dict(self, sd: dict) -> dict:
        """Weights saved without this config's σ average (e.g. for --init-from) start it at their
        σ; an average this config does not keep is dropped."""
        has = any(k.startswith("sigma_ema.") for k in sd)
        if self.sigma_ema is None and has:
            return {k: v for k, v in sd.items() if not k.startswith("sigma_ema.")}
        sigma = {k[len("sigma.") :]: v for k, v in sd.items() if k.startswith("sigma.")}
        if self.sigma_ema is not None and not has and set(self.sigma_ema.names) <= set(sigma):
            return {**sd, **self.sigma_ema.initial_state(sigma, "sigma_ema.")}
        return sd  # anything else is left to the strict check

    def predict(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ (B, 3, sH, sW), the σ branch's input features) of `lr`: the network itself, which
        each subclass (EDSR, RRDB) defines; this base class holds only the loss and σ logic."""
        raise NotImplementedError(f"{type(self).__name__} must define predict()")

    def radii(self) -> tuple[float, float]:
        """Receptive field in LR px of predict's features, and of the rest of μ after them."""
        raise NotImplementedError(f"{type(self).__name__} must define radii()")

    @property
    def tile_halo(self) -> int:
        """The receptive field of μ, and of σ when the model has it."""
        fea, rest = self.radii()
        return halo(fea + rest, fea + (self.sigma.radius() if self.sigma is not None else 0))

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        lr, hr = self.check_inputs(lr, hr)  # one line for a wrong input, not a conv's error
        mu, fea = self.predict(lr)
        if self.sigma is None:
            l1 = F.l1_loss(mu, hr)
            return {"loss": l1, "l1": l1.detach(), "sr": mu}
        c = self.cfg
        out = le_loss(mu, hr, self.sigma(fea), c.le_beta, c.le_mask_scope, c.le_aux_target)
        return {**out, "sr": mu}

    def _split_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(μ's parameters, the σ branch's), from the main optimizer's parameters."""
        sig = set(map(id, self.sigma.parameters()))
        params = self.generator_parameters()
        return [p for p in params if id(p) not in sig], [p for p in params if id(p) in sig]

    def on_step(self, step: int, total: int) -> None:
        """The last --le-sigma-final-fraction of the steps train σ alone: μ is frozen, so a step
        costs the body's forward and σ's forward and backward. σ then fits the error map of the
        final μ instead of chasing a moving one. With --le-sigma-ema, the σ weights as they are
        before each step are averaged in (those after the last step are not)."""
        if self.sigma_ema is not None:
            self.sigma_ema.update(self.sigma, step)
        f = self.cfg.le_sigma_final_fraction
        only = self.sigma is not None and f > 0 and step >= (1 - f) * total
        if only != self._sigma_only:
            for p in self._split_params()[0]:
                p.requires_grad_(not only)
            self._sigma_only = only

    def graph_key(self) -> tuple:
        return ()  # the σ-only phase is μ's parameters' requires_grad

    def _sigma_phase(self) -> bool:
        return self.sigma is not None and self.cfg.le_sigma_final_fraction > 0

    def generator_param_groups(self) -> list[dict]:
        """With a σ-only phase (--le-sigma-final-fraction), μ and σ are two Adam groups, each on
        the schedule of its own phase (`schedule_position`)."""
        if not self._sigma_phase():
            return super().generator_param_groups()
        body, sigma = self._split_params()
        return [{"params": body}, {"params": sigma}]

    def schedule_position(self, group: int, step: int, total: int) -> tuple[float, float]:
        """μ (group 0) runs its whole schedule, milestones included, in the first 1 − f of the
        steps; σ (group 1) keeps the base rate until its phase, then runs the schedule over the
        last f, so it ends at the low rates instead of oscillating at the base rate."""
        if not self._sigma_phase():
            return super().schedule_position(group, step, total)
        start = (1 - self.cfg.le_sigma_final_fraction) * total  # the σ-only phase begins
        if group == 0:
            return min(step, start), start
        return min(max(step - start, 0.0), total - start), total - start

    def generate(self, lr: torch.Tensor, n: int, temperature: float, noise=None) -> torch.Tensor:
        mu, _ = self.predict(lr)
        return mu.unsqueeze(1).expand(-1, n, -1, -1, -1)  # (B, n, 3, sH, sW), temperature unused

    @property
    def has_uncertainty(self) -> bool:
        return self.sigma is not None

    @torch.no_grad()
    def uncertainty(self, lr: torch.Tensor) -> torch.Tensor | None:
        """σ of the ℓ_E branch (B, 3, s·H, s·W) in (0, 1), from the averaged weights with
        --le-sigma-ema; None when trained with plain ℓ1."""
        if self.sigma is None:
            return None
        _, fea = self.predict(lr)
        return self.sigma(fea) if self.sigma_ema is None else self.sigma_ema(self.sigma, fea)
