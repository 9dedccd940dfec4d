"""The interface every srspace model implements (style.md §3.2).

A model is an `nn.Module` with a flat `Config` dataclass whose defaults are the paper's, and:
  forward(lr, hr) -> dict        "loss" (scalar to backpropagate) + named parts for logging
  sample(lr, n, temperature)     -> (B, n, 3, s·H, s·W) in [0, 1]
  uncertainty(lr)                -> (B, 3, s·H, s·W) or None (models with an uncertainty output)
  on_step(step, total)           schedule-dependent behaviour (e.g. a frozen encoder)
  discriminator / discriminator_loss(lr, hr, out)   optional GAN part with its own optimizer
Images crossing the boundary are RGB float32 in [0, 1], NCHW. Any other range stays inside.
"""

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    scale: int = 4


class NoiseSource:
    """The random streams of a set of samples: one seeded generator per output sample.

    A model draws every random tensor of sampling through `randn(shape)` (always in the same
    order), so sample i of image `stem` depends only on its seed, never on batch size, `--n` or
    file order. With `window` (tiled sampling) each spatial field is drawn once at whole-image size
    and cut to the tile, so a tiled sample uses exactly the noise of the untiled one.
    """

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu", window=None):
        self.seeds = list(seeds)
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.window = window  # (y0, x0, tile_h, tile_w, full_h, full_w) in (padded) LR pixels
        self._cache: dict[int, torch.Tensor] = {}
        self._calls = 0

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(len(seeds), *shape) standard normal; trailing 2 dims spatial when windowed."""
        call = self._calls
        self._calls += 1
        if self.window is None or len(shape) < 3:
            return self._draw(call, tuple(shape))
        y0, x0, th, tw, fh, fw = self.window
        fy, fx = shape[-2] / th, shape[-1] / tw  # field resolution relative to LR (e.g. 1/2, 2)
        full = (*shape[:-2], round(fh * fy), round(fw * fx))
        field = self._draw(call, full)
        oy, ox = round(y0 * fy), round(x0 * fx)
        return field[..., oy : oy + shape[-2], ox : ox + shape[-1]]

    def _draw(self, call: int, shape: tuple[int, ...]) -> torch.Tensor:
        if call not in self._cache:  # cached so every tile of a sample sees the same field
            z = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
            self._cache[call] = z.to(self.device)
        return self._cache[call]

    def restart(self) -> None:
        """Replay the same streams (used once per tile)."""
        self._calls = 0


def sample_seed(seed: int, stem: str, i: int) -> int:
    """The seed of sample i of image `stem`: a pure function of (seed, stem, i)."""
    h = hashlib.sha256(f"{seed}/{stem}/{i}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    """Reflect-pad the bottom/right of (N, C, H, W) to multiples of m (replicate if too small)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class SRModel(nn.Module):
    """Base class: padding, clamping, noise plumbing and no-op hooks."""

    Config = ModelConfig
    stochastic = False  # False: sample() returns n identical copies and ignores temperature
    lr_multiple = 1  # LR sizes the network needs; sample() pads (reflect) and crops back
    default_temperature = 1.0  # sampling temperature used when the user gives none
    # True if some parameters get no gradient in some steps (e.g. an encoder frozen by on_step):
    # DDP must then look for unused parameters every step.
    ddp_find_unused = False
    # Checkpoints of an older format (sr_lib/checkpoint.py) hold weights of another function
    # (a fixed bug changed the model) and are refused.
    oldest_checkpoint_format = 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.scale

    @staticmethod
    def train_defaults(scale: int) -> dict:
        """The paper's training recipe; sr_train.py uses it for every flag left unset."""
        return dict(
            batch=16, patch=48 if scale != 8 else 32, steps=300_000, learning_rate=1e-4,
            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, milestones=(), gamma=0.5,
            grad_clip=0.0, d_learning_rate=1e-4, d_betas=(0.9, 0.999), d_weight_decay=0.0,
        )  # fmt: skip

    # Subclasses define forward(lr, hr) -> dict and
    # generate(lr, n, temperature, noise) -> (B, n, 3, s·H, s·W) on an LR padded to lr_multiple.

    @torch.no_grad()
    def sample(
        self, lr: torch.Tensor, n: int = 1, temperature: float = 1.0, noise=None, **cond
    ) -> torch.Tensor:
        """n samples per LR image, (B, n, 3, s·H, s·W) in [0, 1].

        temperature scales the standard deviation of every latent draw (0 = deterministic mode);
        `noise` is a NoiseSource with B·n seeds (row b·n + i is sample i of image b);
        `cond`: model-specific sampling controls (e.g. reference images, explicit latents),
        passed to `generate`.
        """
        b, _, h, w = lr.shape
        if noise is None:
            seeds = torch.randint(0, 2**62, (b * n,)).tolist()  # follows torch.manual_seed
            noise = NoiseSource(seeds, lr.device)
        if len(noise) != b * n:
            raise ValueError(f"sample: noise has {len(noise)} streams, need B*n = {b * n}")
        x = pad_to_multiple(lr, self.lr_multiple)
        sr = self.generate(x, n, float(temperature), noise, **cond)
        s = self.scale
        return sr[..., : h * s, : w * s].clamp(0, 1)

    @classmethod
    def raw_config(cls, state_dict: dict, scale: int) -> dict:
        """The config a raw state_dict implies (a released file without srspace metadata, loaded
        by `load_raw_state_dict`), e.g. an encoder depth or a variant read off its keys."""
        return {"scale": scale}

    @torch.no_grad()
    def uncertainty(self, lr: torch.Tensor) -> torch.Tensor | None:
        """Per-pixel uncertainty map (B, 3, s·H, s·W), or None if the model has none."""
        return None

    def on_step(self, step: int, total: int) -> None:
        """Called by the training loop before every step."""

    @property
    def discriminator(self) -> nn.Module | None:
        """The GAN discriminator, if the model assigned one (self.discriminator = Module(...)).

        A property, not a class attribute `= None`: that would shadow the registered submodule.
        """
        return self._modules.get("discriminator")

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters of the main optimizer (everything except the discriminator)."""
        d = set(map(id, self.discriminator.parameters())) if self.discriminator else set()
        return [p for p in self.parameters() if id(p) not in d]

    def generator_param_groups(self) -> list[dict]:
        """Adam parameter groups of the main optimizer (each with its own `schedule_position`)."""
        return [{"params": self.generator_parameters()}]

    def schedule_position(self, group: int, step: int, total: int) -> tuple[float, float]:
        """(step, length) of the learning-rate schedule that parameter group `group` of
        `generator_param_groups()` is at in training step `step` of `total`: by default the run's
        own; a model with phases gives a group the schedule of its phase."""
        return step, total

    # GAN-trained models set self.discriminator and define
    # discriminator_loss(lr, hr, out) -> dict with "loss", given forward()'s output (with "sr").
