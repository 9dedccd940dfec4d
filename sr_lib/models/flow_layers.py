"""Normalizing-flow layers shared by SRFlow, SRFlow-DA and NCSR.

Glow layers ("Glow: Generative Flow with Invertible 1x1 Convolutions", Kingma & Dhariwal, NeurIPS
2018, arXiv:1807.03039) and SRFlow's conditional couplings ("SRFlow: Learning the Super-Resolution
Space with Normalizing Flow", Lugmayr et al., ECCV 2020, arXiv:2006.14200). Written from the
papers and checked against the released code (docs/flows.md); nothing copied from andreas128/SRFlow
or its forks (CC BY-NC-SA 4.0). Parameter names equal the released modules' so official
checkpoints map 1:1 (docs/flows.md, "Key layout").

Convention: `forward` maps HR -> z and adds log|det J| to `logdet` (per sample, (B,)); `reverse`
maps z -> HR and subtracts it. `logdet=None` skips the bookkeeping (sampling). In `reverse`,
conditioning tensors may have batch B while z has batch B·n (n samples per LR image, sample i of
image b at row b·n + i): whatever depends only on the LR is then computed once per image.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def gaussian_logp(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over (C, H, W): (B,)."""
    return -0.5 * (z**2 + LOG_2PI).sum((1, 2, 3))


def squeeze(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Space-to-depth, channel order c·f² + dy·f + dx (released code == pixel_unshuffle)."""
    return F.pixel_unshuffle(x, factor)  # (B, C·f², H/f, W/f)


def unsqueeze(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return F.pixel_shuffle(x, factor)  # (B, C/f², H·f, W·f)


def per_image(fn, x: torch.Tensor, *per_lr: torch.Tensor) -> torch.Tensor:
    """fn(x, *t) with x of batch B·n and each t of batch B, broadcast over the n samples."""
    n = x.shape[0] // per_lr[0].shape[0]
    out = fn(x.view(-1, n, *x.shape[1:]), *(t.unsqueeze(1) for t in per_lr))  # (B, n, ...)
    return out.flatten(0, 1)


def _add_logdet(logdet, scale: torch.Tensor, sign: float = 1.0, log: bool = True):
    """logdet ± Σ_{C,H,W} log(scale) (or scale itself when log=False), repeated over the n samples
    of each image; nothing is computed when logdet is None (sampling)."""
    if logdet is None:
        return None
    per = (torch.log(scale) if log else scale).flatten(1).sum(1).to(logdet.dtype)
    if per.shape[0] != logdet.shape[0]:
        per = per.repeat_interleave(logdet.shape[0] // per.shape[0])
    return logdet + sign * per


def _flow_dtype(t: torch.Tensor) -> torch.dtype:
    """The flow's state stays float32/float64 even where the networks run in lower precision."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _mark_loaded(module, incompatible_keys) -> None:
    module.initialized = True  # loaded weights are never data-initialised again


class ActNorm(nn.Module):
    """Per-channel affine y = (x + bias)·exp(logs), initialised from the first training batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.initialized = False  # a plain attribute: not in the state_dict, set by loading
        self.register_load_state_dict_post_hook(_mark_loaded)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent init: zero mean, unit std per channel over (N, H, W) of this batch
        (statistics in float32 whatever precision x was computed in)."""
        x = x.float()
        mean = x.mean((0, 2, 3), keepdim=True)
        std = (x - mean).pow(2).mean((0, 2, 3), keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(1 / (std + 1e-6)))
        self.initialized = True

    def forward(self, x: torch.Tensor, logdet=None):
        if self.training and not self.initialized:
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        if logdet is not None:
            logdet = logdet + x.shape[2] * x.shape[3] * self.logs.sum().to(logdet.dtype)
        return y, logdet

    def reverse(self, y: torch.Tensor, logdet=None):
        x = y * torch.exp(-self.logs) - self.bias
        if logdet is not None:
            logdet = logdet - y.shape[2] * y.shape[3] * self.logs.sum().to(logdet.dtype)
        return x, logdet


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution; full matrix (released code) or LU-parametrised (Glow §3.2).

    In eval mode without autograd the matrix, its log|det| and its inverse are cached until a
    parameter changes (keyed on the parameters' version counters), so sampling inverts once.
    """

    def __init__(self, channels: int, lu: bool = False):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]  # random rotation: |det| = 1
        self.lu = lu
        if lu:
            p, lower, upper = torch.linalg.lu(w)
            s = upper.diagonal()
            self.register_buffer("p", p)
            self.register_buffer("sign_s", s.sign())
            self.lower = nn.Parameter(lower.tril(-1))
            self.upper = nn.Parameter(upper.triu(1))
            self.log_s = nn.Parameter(s.abs().log())
        else:
            self.weight = nn.Parameter(w)
        self._cache = None

    def matrix(self) -> torch.Tensor:
        if not self.lu:
            return self.weight
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def _terms(self, inverse: bool):
        """(W, log|det W|, W⁻¹ or None); the inverse is computed in float64 as the released code."""
        frozen = not self.training and not torch.is_grad_enabled()
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self.parameters())
        if (
            frozen
            and self._cache
            and self._cache[0] == key
            and (not inverse or self._cache[3] is not None)
        ):
            return self._cache[1:]  # fmt: skip
        w = self.matrix()
        logabsdet = self.log_s.sum() if self.lu else torch.linalg.slogdet(w)[1]
        inv = torch.linalg.inv(w.double()).to(w.dtype) if inverse else None
        if frozen:
            self._cache = (key, w, logabsdet, inv)
        return w, logabsdet, inv

    def forward(self, x: torch.Tensor, logdet=None):
        w, logabsdet, _ = self._terms(inverse=False)
        with torch.autocast(x.device.type, enabled=False):  # the flow's state stays float32
            y = F.conv2d(x, w[..., None, None])
        if logdet is not None:
            logdet = logdet + x.shape[2] * x.shape[3] * logabsdet.to(logdet.dtype)
        return y, logdet

    def reverse(self, y: torch.Tensor, logdet=None):
        _, logabsdet, inv = self._terms(inverse=True)
        with torch.autocast(y.device.type, enabled=False):  # the flow's state stays float32
            x = F.conv2d(y, inv[..., None, None])
        if logdet is not None:
            logdet = logdet - y.shape[2] * y.shape[3] * logabsdet.to(logdet.dtype)
        return x, logdet


class ConvActNorm(nn.Conv2d):
    """Bias-free conv followed by ActNorm (hidden layers of SRFlow's F; the log-det is unused)."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(cin, cout, kernel, padding=kernel // 2, bias=False)
        nn.init.normal_(self.weight, 0.0, 0.05)
        self.actnorm = ActNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actnorm(super().forward(x))[0]


class ZeroConv2d(nn.Conv2d):
    """3x3 conv that starts at exactly 0, with a learned output gain exp(3·logs)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.logs = nn.Parameter(torch.zeros(cout, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * torch.exp(3 * self.logs)


def coupling_conv(cin: int, cout: int) -> nn.Conv2d:
    """A coupling network's 3x3 conv, 'same' padding: weights N(0, 0.05²), zero bias."""
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.normal_(conv.weight, 0.0, 0.05)
    nn.init.zeros_(conv.bias)
    return conv


class CondInput:
    """For a net whose input is concat[x, cond]: its first conv is linear, so it splits into a
    part on x (per sample) and a part on cond, computed once per LR image (`cond_part`)."""

    head: nn.Conv2d

    def cond_part(self, cond: torch.Tensor) -> torch.Tensor:
        w = self.head.weight[:, self.head.in_channels - cond.shape[1] :]
        return F.conv2d(cond, w, None, padding=self.head.padding)

    def with_cond(self, x: torch.Tensor, *parts: torch.Tensor | None) -> torch.Tensor:
        """Equals self(concat[x, cond]) (up to float rounding) given cond_part(cond) (batch B)."""
        h = F.conv2d(
            x, self.head.weight[:, : x.shape[1]], self.head.bias, padding=self.head.padding
        )
        for part in parts:
            if part is not None:  # None: an all-zero condition (NCSR at inference)
                h = per_image(torch.add, h, part)
        return self.tail(h)


class CouplingNet(CondInput, nn.Sequential):
    """The coupling sub-network F: conv, ReLU, ..., ZeroConv2d.

    deep = 0: SRFlow's F (docs/flows.md, "Coupling networks"): 3x3 conv + ActNorm, ReLU, 1x1 conv
    + ActNorm, ReLU, zero conv (receptive field 5x5). deep = k: SRFlow-DA's F: 3x3 convs with
    bias, no ActNorm, k hidden 3x3 convs (receptive field (2k + 5)²: 13x13 for k = 4). Sequential
    indices as released.
    """

    def __init__(self, cin: int, cout: int, hidden: int = 64, deep: int = 0):
        if deep:
            layers = [coupling_conv(cin, hidden), nn.ReLU()]
            for _ in range(deep):
                layers += [coupling_conv(hidden, hidden), nn.ReLU()]
        else:
            layers = [ConvActNorm(cin, hidden, 3), nn.ReLU(), ConvActNorm(hidden, hidden, 1)]
            layers.append(nn.ReLU())
        super().__init__(*layers, ZeroConv2d(hidden, cout))

    @property
    def head(self) -> nn.Conv2d:
        return self[0]

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after the first conv's linear part."""
        if isinstance(self[0], ConvActNorm):
            h = self[0].actnorm(h)[0]
        for layer in list(self)[1:]:
            h = layer(h)
        return h


class ResidualCouplingNet(CondInput, nn.Module):
    """SRFlow-DA-R / -D sub-network: h = fX1(x); h ← h + block(h) per block; fX3(h).

    DA-R: one block of 4 [conv, ReLU]; DA-D: 18 blocks of 2 [conv, ReLU].
    """

    def __init__(self, cin: int, cout: int, hidden: int, blocks: int, per_block: int):
        super().__init__()
        self.fX1 = nn.Sequential(coupling_conv(cin, hidden), nn.ReLU())
        block = lambda: nn.Sequential(  # noqa: E731
            *[m for _ in range(per_block) for m in (coupling_conv(hidden, hidden), nn.ReLU())]
        )
        self.fX2 = nn.ModuleList([block() for _ in range(blocks)])
        self.fX3 = ZeroConv2d(hidden, cout)

    @property
    def head(self) -> nn.Conv2d:
        return self.fX1[0]

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        h = self.fX1[1](h)
        for block in self.fX2:
            h = h + block(h)
        return self.fX3(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))


class CondAffine(nn.Module):
    """Affine injector + conditional affine coupling (SRFlow's CondAffineSeparatedAndCond),
    optionally with NCSR's noise-conditional coupling between the two (docs/flows.md).

    Scales are sigmoid(raw + 2) + eps (not exp: bounded, no NaNs), outputs are split "cross"
    (even channels shift, odd channels scale) and applied as (z + shift)·scale, as released (the
    papers' Eqs. 7-8 write exp(s)·z + b; the released weights only work with this form).
    """

    def __init__(self, channels: int, cond_channels: int, make_net, noise_channels: int = 0,
                 eps: float = 1e-4):  # fmt: skip
        super().__init__()
        self.c1 = channels // 2  # passive half z1 = z[:, :C/2]
        c2 = channels - self.c1
        self.eps = eps
        self.fFeatures = make_net(cond_channels, 2 * channels)
        self.fAffine = make_net(self.c1 + cond_channels, 2 * c2)
        if noise_channels:
            self.fAffine_std = make_net(self.c1 + noise_channels, 2 * c2)
        self.noise_channels = noise_channels
        self.noise_conditional = False  # NCSR sets it for the steps that use fAffine_std

    def _shift_scale(self, h: torch.Tensor, dtype: torch.dtype):
        h = h.to(dtype)  # float32 scale and log-det even where the nets run in lower precision
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0) + self.eps

    def _noise(self, noise, z1):
        if noise is None:  # NCSR samples with a zero condition
            return z1.new_zeros(z1.shape[0], self.noise_channels, *z1.shape[2:])
        return noise

    def forward(self, z: torch.Tensor, ft: torch.Tensor, logdet=None, noise=None):
        shift, scale = self._shift_scale(self.fFeatures(ft), z.dtype)
        z = (z + shift) * scale  # Eq. 7, injector: all channels, from the LR features only
        logdet = _add_logdet(logdet, scale)
        z1, z2 = z[:, : self.c1], z[:, self.c1 :]
        if self.noise_conditional:
            nz = self._noise(noise, z1)
            h = self.fAffine_std(torch.cat([z1.to(nz.dtype), nz], 1))
            shift, scale = self._shift_scale(h, z.dtype)
            z2 = (z2 + shift) * scale
            logdet = _add_logdet(logdet, scale)
        # z1 in ft's dtype: a bfloat16 ft (autocast) and a float32 z1 would make a float32 concat
        # of all the condition channels, cast back to bfloat16 by the conv (same values, 2x bytes)
        h = self.fAffine(torch.cat([z1.to(ft.dtype), ft], 1))
        shift, scale = self._shift_scale(h, z.dtype)
        z2 = (z2 + shift) * scale  # Eq. 8, coupling: z2 from (z1, LR features)
        logdet = _add_logdet(logdet, scale)
        return torch.cat([z1, z2], 1), logdet

    def prepare(self, ft: torch.Tensor, noise=None) -> tuple:
        """The parts of `reverse` that depend only on the LR (and noise condition): computed once
        per LR image and shared by all its samples."""
        shift, scale = self._shift_scale(self.fFeatures(ft), _flow_dtype(ft))
        aff = self.fAffine.cond_part(ft)
        std = None
        if self.noise_conditional and noise is not None:
            std = self.fAffine_std.cond_part(noise)
        return shift, scale, aff, std

    def reverse(self, z: torch.Tensor, ft: torch.Tensor, logdet=None, noise=None, prepared=None):
        inj_shift, inj_scale, aff, std = prepared or self.prepare(ft, noise)
        z1, z2 = z[:, : self.c1], z[:, self.c1 :]
        shift, scale = self._shift_scale(self.fAffine.with_cond(z1, aff), z.dtype)
        z2 = z2 / scale - shift
        logdet = _add_logdet(logdet, scale, -1.0)
        if self.noise_conditional:
            shift, scale = self._shift_scale(self.fAffine_std.with_cond(z1, std), z.dtype)
            z2 = z2 / scale - shift
            logdet = _add_logdet(logdet, scale, -1.0)
        z = torch.cat([z1, z2], 1)
        z = per_image(lambda a, s, b: a / s - b, z, inj_scale.to(z.dtype), inj_shift.to(z.dtype))
        return z, _add_logdet(logdet, inj_scale, -1.0)


class Split(nn.Module):
    """Split2d with a learned prior (docs/flows.md): z1 = the first C - round(C/2) channels go on;
    z2 leaves the flow as eps = (z2 - mean) / exp(logs), (mean, logs) = ZeroConv2d(z1) "cross".

    As a layer x -> (z1, eps) its log-det is -Σ logs; with log N(eps; 0, I) this is the released
    objective term log N(z2; mean, exp(logs)). The LR features are not used (official configs).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.consume = round(channels * 0.5)
        self.keep = channels - self.consume
        self.conv = ZeroConv2d(self.keep, 2 * self.consume)

    def prior(self, z1: torch.Tensor):
        with torch.autocast(z1.device.type, enabled=False):  # the prior stays float32
            h = self.conv(z1)
        return h[:, 0::2], h[:, 1::2]  # mean, log std

    def forward(self, x: torch.Tensor, logdet=None):
        z1, z2 = x[:, : self.keep], x[:, self.keep :]
        mean, logs = self.prior(z1)
        eps = (z2 - mean) / torch.exp(logs)
        return z1, eps, _add_logdet(logdet, logs, -1.0, log=False)

    def reverse(self, z1: torch.Tensor, eps: torch.Tensor, logdet=None):
        mean, logs = self.prior(z1)
        x = torch.cat([z1, mean + torch.exp(logs) * eps], 1)
        return x, _add_logdet(logdet, logs, log=False)


class FlowStep(nn.Module):
    """ActNorm -> invertible 1x1 conv -> conditional affine (no affine: a transition step)."""

    def __init__(self, channels: int, affine: CondAffine | None = None, lu: bool = False):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels, lu)
        self.affine = affine

    def forward(self, x: torch.Tensor, logdet=None, ft=None, noise=None):
        x, logdet = self.actnorm(x, logdet)
        x, logdet = self.invconv(x, logdet)
        if self.affine is not None:
            x, logdet = self.affine(x, ft, logdet, noise)
        return x, logdet

    def reverse(self, z: torch.Tensor, logdet=None, ft=None, noise=None, prepared=None):
        if self.affine is not None:
            z, logdet = self.affine.reverse(z, ft, logdet, noise, prepared)
        z, logdet = self.invconv.reverse(z, logdet)
        return self.actnorm.reverse(z, logdet)
