"""The interface every srspace model implements (docs/design.md, "The model interface").

A model is an `nn.Module` with a flat `Config` dataclass whose defaults are the paper's. `SRModel`
declares every member the scripts and the loaders use, with a default for all but `forward` and
`generate`; nothing else of a model is called from outside its file.

  forward(lr, hr) -> dict            "loss" (scalar to backpropagate) + named parts for logging
  check_inputs(lr, hr)               forward's first line: a wrong input in one line
  generate(lr, n, temperature, noise, **controls)
                                     (B, n, 3, s·H, s·W) on an LR padded to `lr_multiple`
  sample(lr, n, temperature, noise, **controls)   the same, padded, cropped and in [0, 1]
  recipe(scale) -> Recipe            the paper's training recipe (sr_train.py's defaults)
  on_step(step, total)               schedule-dependent behaviour (e.g. a frozen encoder)
  check_files(loaded)                the files the first training step reads, read before the data
  unused_flags(cfg)                  the Config fields without effect given the others (a warning)
  graph_key()                        the host-side switches of a training step (--cuda-graphs),
                                     or None: the step cannot be replayed from one recording
  generator_param_groups(), schedule_position(group, step, total)
                                     the main optimizer's groups and each group's schedule clock
  discriminator, discriminator_loss(lr, hr, out)   optional GAN part with its own optimizer
  prepare(lr) -> Prepared | None     the LR-only work of one image, shared by all its samples
                                     and temperatures and cut per tile (default None: none)
  finish(sr, lr)                     whole-image post-processing after tiles are joined
  tile_halo                          LR px of context that make a tile's output exact, or None
  uncertainty(lr), has_uncertainty   a per-pixel uncertainty map, or None
  mark_initialized()                 weights were loaded: skip data-dependent initialisation
  load_weights(state_dict, path), complete_state_dict(state_dict)   strict loading
  raw_config(state_dict, scale), load_raw_state_dict(state_dict, path)
                                     a released file without srspace metadata
  sample_controls, resolve_controls(controls, n, device), sample_latents(...), latent_file,
  read_latent(path, flag, own)
                                     sr_sample.py's latent controls (`LatentSRModel`; the
                                     flows' latent fields: `SRFlow`)
and the class attributes stochastic, lr_multiple, default_temperature, ddp_find_unused,
compile_regions and oldest_checkpoint_format (documented on SRModel).
Images crossing the boundary are RGB float32 in [0, 1], NCHW. Any other range stays inside.
"""

import contextlib
import hashlib
import io
import itertools
import json
import math
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args, get_origin

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sr_lib.config import check_ranges, config_flag
from sr_lib.data import default_patch, list_images, read_file, read_image, to_tensor
from sr_lib.errors import DataError, UsageError
from sr_lib.weights import load_strict


@dataclass
class ModelConfig:
    scale: int = 4


# The range of a loss weight: far beyond any paper's (RefVAE's code: 1e4), short of what makes a
# float32 loss inf at the first step (1e30 did: then exit 5 after --max-bad-steps).
WEIGHT = "[0, 1e6]"


def option(default, help: str, **kw):
    """A Config field with its command-line help (and e.g. `choices`)."""
    return field(default=default, metadata=dict(help=help, **kw))


def check_choices(cfg) -> None:
    """The choices of a Config's fields (`choices` metadata or a Literal type), also for configs
    built without the command line (build_model, checkpoints): a one-line UsageError naming the
    flag and the key (`config_flag`)."""
    for f in fields(cfg):
        choices = get_args(f.type) if get_origin(f.type) is Literal else f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is not None and value not in choices:
            named = config_flag(f.name, value, repr(value))
            raise UsageError(f"{named}: choose one of {', '.join(map(str, choices))}")


def scale_list(model) -> str:
    """A model's scales in words: "2, 3, 4 or 8"."""
    *first, last = model.scales
    return f"{', '.join(map(str, first))} or {last}" if first else str(last)


@dataclass(frozen=True)
class Recipe:
    """A training recipe; sr_train.py takes the model's for every flag left unset."""

    batch: int = 16
    patch: int = 48  # LR patch side
    steps: int = 300_000
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["multistep", "cosine"] = "multistep"
    milestones: tuple[float, ...] = ()  # multistep: fractions of `steps` where the rate decays
    gamma: float = 0.5  # multistep: the decay factor
    eta_min: float = 0.0  # cosine: the final learning rate
    grad_clip: float = 0.0  # max gradient norm (0 = off)
    warmup: int = 0  # steps of linear learning-rate warm-up (0 = none: every paper's recipe)
    d_learning_rate: float = 1e-4  # the discriminator's optimizer
    d_betas: tuple[float, float] = (0.9, 0.999)
    d_weight_decay: float = 0.0
    # Where the recipe departs from the released training configuration, in words (sr_train.py
    # --model NAME -h prints it under the recipe's flags); "" for none.
    note: str = ""


class NoiseSource:
    """The random streams of a set of samples: one seeded generator per output sample.

    A model draws every random tensor of sampling from here (always in the same order), so sample
    i of image `stem` depends only on its seed, never on batch size, `--n` or file order. A draw
    is either a `field` over the image (cut per tile when tiling: with `window`, each field is
    drawn once at whole-image size and cut to the tile, so a tiled sample uses exactly the noise
    of the untiled one) or a `vector` that is global to the image (never cut).
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

    def field(self, c: int, h: int, w: int) -> torch.Tensor:
        """(len(seeds), c, h, w) standard normal over the image (h, w at this tile's size and any
        resolution relative to the LR, e.g. LR/2 or HR)."""
        call = self._next()
        if self.window is None:
            return self._draw(call, (c, h, w))
        y0, x0, th, tw, fh, fw = self.window
        fy, fx = h / th, w / tw  # field resolution relative to LR (e.g. 1/2, 2)
        whole = self._draw(call, (c, round(fh * fy), round(fw * fx)))
        oy, ox = round(y0 * fy), round(x0 * fx)
        return whole[..., oy : oy + h, ox : ox + w]

    def vector(self, d: int) -> torch.Tensor:
        """(len(seeds), d) standard normal, global to the image (the same for every tile)."""
        return self._draw(self._next(), (d,))

    def _next(self) -> int:
        self._calls += 1
        return self._calls - 1

    def _draw(self, call: int, shape: tuple[int, ...]) -> torch.Tensor:
        if call not in self._cache:  # cached so every tile of a sample sees the same draw
            z = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
            self._cache[call] = z.to(self.device)
        return self._cache[call]

    def restart(self) -> None:
        """Replay the same streams (used once per tile)."""
        self._calls = 0


class Prepared:
    """What `SRModel.prepare` computed from one LR image alone: shared by all the image's samples
    and temperatures, and cut to each tile when tiling (docs/design.md, "Tiled sampling").

    maps: spatial tensors (..., h·r, w·r) at a resolution r relative to the padded LR (e.g. 1/2,
    1, 2, the scale), cut with the tile; extra: what is global to the image (never cut); memo: what
    a model derives from these on first use and keeps for later calls on the same image (None:
    keep nothing: an image sampled in one call, or a cut, made anew for every call); window: the
    tile this was cut to, (y0, x0, h, w, H, W) in padded LR px as `NoiseSource.window`, or None
    for the whole image.
    """

    def __init__(self, lr_size: tuple[int, int], maps: dict, extra: dict | None = None,
                 window=None):  # fmt: skip
        self.lr_size = tuple(lr_size)  # (h, w) of the LR the maps belong to
        self.maps = maps
        self.extra = extra or {}
        self.memo: dict = {}
        self.window = window

    def crop(self, window) -> "Prepared":
        """The maps cut to window (y0, x0, h, w, H, W) of this (whole-image) LR."""
        y0, x0, h, w, H, W = window
        if (H, W) != self.lr_size:
            raise ValueError(f"Prepared.crop: window of {H}x{W}, prepared for {self.lr_size}")
        maps = {k: cut(t, window) for k, t in self.maps.items()}
        part = Prepared((h, w), maps, self.extra, window)
        part.memo = None
        return part


def scale_window(window, ry: float, rx: float) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of a window (y0, x0, h, w, H, W) at a resolution (ry, rx) relative to it;
    every position must land on a whole pixel (tiles are multiples of `lr_multiple`)."""
    y0, x0, h, w = window[:4]
    out = (y0 * ry, x0 * rx, h * ry, w * rx)
    if any(abs(v - round(v)) > 1e-9 for v in out):
        raise ValueError(f"window {window[:4]} falls between pixels at resolution {ry}x{rx}")
    return tuple(round(v) for v in out)


def cut(t: torch.Tensor, window) -> torch.Tensor:
    """The part of a whole-image map (..., H·r, W·r) inside window (y0, x0, h, w, H, W)."""
    H, W = window[4:]
    y0, x0, h, w = scale_window(window, t.shape[-2] / H, t.shape[-1] / W)
    return t[..., y0 : y0 + h, x0 : x0 + w]


def conv_radius(module: nn.Module) -> int:
    """Sum of the kernel radii of every convolution in `module`: the radius of its receptive field
    (in pixels of its input) when the convolutions form one chain, an upper bound otherwise."""
    r = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            r += max(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
    return r


def staged_radius(layers) -> float:
    """Receptive-field radius, in pixels of its input, of a chain of layers whose resolution grows
    at each nn.PixelShuffle or nn.Upsample: a conv at resolution ×f adds its kernel radius / f, a
    non-nearest upsampling one pixel of its input."""
    r, res = 0.0, 1
    for layer in layers:
        if isinstance(layer, nn.PixelShuffle):
            res *= layer.upscale_factor
        elif isinstance(layer, nn.Upsample):
            r += 0 if layer.mode == "nearest" else 1 / res
            res *= int(layer.scale_factor)
        else:
            r += conv_radius(layer) / res
    return r


def halo(*radii: float) -> int:
    """The tile halo in LR px from receptive-field radii given in LR px (fractions allowed)."""
    return math.ceil(max(radii) - 1e-9)


def sample_seed(seed: int, stem: str, i: int) -> int:
    """The seed of sample i of image `stem`: a pure function of (seed, stem, i).

    A file name that is not UTF-8 (a latin-1 name from an old archive) reaches Python with its
    bytes as surrogates: hashed as those bytes, where a strict encode would raise."""
    h = hashlib.sha256(f"{seed}/{stem}/{i}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    """Reflect-pad the bottom/right of (N, C, H, W) to multiples of m (replicate if too small)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def sample_noise(noise, b: int, n: int, device) -> NoiseSource:
    """`sample`'s noise: the one given (B·n streams), or random seeds (follow torch.manual_seed)."""
    if noise is None:
        noise = NoiseSource(torch.randint(0, 2**62, (b * n,)).tolist(), device)
    if len(noise) != b * n:
        raise ValueError(f"sample: noise has {len(noise)} streams, need B*n = {b * n}")
    return noise


def model_tensor(model: nn.Module) -> torch.Tensor | None:
    """A parameter or buffer of `model`: its device and dtype (None: it holds none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):  # (not next(it, None): a
        return t  # graph break in a compiled forward on torch 2.6, which cannot trace it)
    return None


def check_image(model: "SRModel", x, name: str, check_values: bool) -> torch.Tensor:
    """`x` as the model takes an image: (B, 3, H, W), floating point, on the model's device. A
    float of another precision (a float64 array from numpy) is converted to the model's; what
    cannot be meant as an RGB batch in [0, 1] is a one-line TypeError/ValueError naming `name`
    and what to pass, before any layer sees it (a conv's shape error, a uint8 or [0, 255] image
    turned white). `check_values`: also the value range (a device sync: sample() only; forward()
    is compiled and replayed as a CUDA graph, where the training data is read in [0, 1])."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: a {type(x).__name__}; pass a torch tensor (B, 3, H, W) in [0, 1]")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: a {x.dtype} tensor; pass float in [0, 1] ({name}.float() / 255 for 8-bit)"
        )
    if x.ndim != 4 or x.shape[1] != 3:
        how = {1: f"{name}.expand(-1, 3, -1, -1)", 4: f"{name}[:, :3]"}.get(x.shape[1], "")
        if x.ndim == 3:
            how = f"{name}[None]" if x.shape[0] == 3 else f"{name}.permute(2, 0, 1)[None]"
        how = f" ({how})" if how and x.ndim in (3, 4) else ""
        raise ValueError(f"{name}: shape {tuple(x.shape)}; pass an RGB batch (B, 3, H, W){how}")
    ref = model_tensor(model)
    if ref is not None and x.device != ref.device:
        raise ValueError(
            f"{name}: on {x.device}, the model on {ref.device}; pass {name}.to({str(ref.device)!r})"
        )
    if ref is not None and ref.is_floating_point() and x.dtype != ref.dtype:
        x = x.to(ref.dtype)
    if check_values and x.numel():
        lo, hi = x.aminmax()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError(f"{name}: holds NaN or infinite values; pass an image in [0, 1]")
        if lo < -0.5 or hi > 1.5:  # an overshoot of a resize is fine, [0, 255] or [-1, 1] not
            raise ValueError(
                f"{name}: values in [{lo:.3g}, {hi:.3g}]; pass [0, 1] ({name} / 255 for "
                f"[0, 255], ({name} + 1) / 2 for [-1, 1])"
            )
    return x


def check_pair(model: "SRModel", lr, hr) -> tuple[torch.Tensor, torch.Tensor]:
    """forward()'s (lr, hr): images as `check_image` takes them, hr `scale` times lr's size."""
    lr, hr = check_image(model, lr, "lr", False), check_image(model, hr, "hr", False)
    s, (h, w) = model.scale, lr.shape[-2:]
    if hr.shape[0] != lr.shape[0] or hr.shape[-2:] != (h * s, w * s):
        raise ValueError(
            f"hr: shape {tuple(hr.shape)} for lr {tuple(lr.shape)}; pass ({lr.shape[0]}, 3, "
            f"{h * s}, {w * s}): the same images, x{s} larger"
        )
    return lr, hr


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode (BatchNorm's running statistics, no data-dependent
    initialisation), its mode before restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def lr_fits(model: "SRModel", h: int, w: int) -> bool:
    """Whether an LR of h x w px, padded to the model's lr_multiple, has no side under its
    min_lr_size (sample() refuses it; sr_sample.py skips it)."""
    m = model.lr_multiple
    return min(h + (-h) % m, w + (-w) % m) >= model.min_lr_size


def check_sampling(model: "SRModel", lr, n, temperature) -> torch.Tensor:
    """sample()'s arguments: the LR as `check_image` takes it; n and temperature as the model
    can use them (a one-line ValueError otherwise)."""
    lr = check_image(model, lr, "lr", True)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: {n!r}; pass the number of samples per image, an int >= 1")
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature: {temperature!r}; pass a finite number >= 0")
    if not lr_fits(model, *lr.shape[-2:]):
        raise ValueError(
            f"lr: {lr.shape[-2]}x{lr.shape[-1]} px; {type(model).__name__} needs at least "
            f"{model.min_lr_size}x{model.min_lr_size} (pad or upscale the LR first)"
        )
    return lr


class SRModel(nn.Module):
    """Base class: padding, clamping, noise plumbing and the defaults of every hook."""

    Config = ModelConfig
    stochastic = False  # False: sample() returns n identical copies and ignores temperature
    learns = True  # False: no parameters (bicubic), sr_train.py's optimisation flags unused
    lr_multiple = 1  # LR sizes the network needs; sample() pads (reflect) and crops back
    default_temperature = 1.0  # sampling (and validation) temperature when the user gives none
    # True if some parameters get no gradient in some steps (e.g. an encoder frozen by on_step):
    # DDP must then look for unused parameters every step.
    ddp_find_unused = False
    # sr_train.py --compile: the module classes compiled one by one (regional compilation: a
    # repeated block is compiled once per shape instead of unrolling the whole network into one
    # graph); empty: the whole training forward is compiled.
    compile_regions: tuple[type[nn.Module], ...] = ()
    # Checkpoints of an older format (sr_lib/checkpoint.py) hold weights of another function
    # (a fixed bug changed the model) and are refused.
    oldest_checkpoint_format = 1
    # sr_sample.py's controls this model takes: "latent" (--latent, --save-latent),
    # "latent_shift" (--latent-shift), "ref" (--ref), "latent_from" (--latent-from); see
    # LatentSRModel, and SRFlow for a latent of several fields.
    sample_controls: tuple[str, ...] = ()
    # How --save-latent names sample i's latent: NAME_sample{i:05d}{latent_file}, one .npz of its
    # fields z0, z1, ... (a LatentSRModel's one (D,) z0) and the record of the model that saved
    # it (made_by: `saved_fields`); old_latent_file: what an older srspace wrote instead, still
    # read (a LatentSRModel's bare (D,) .npy, which records no model), "" for none
    latent_file = ".latent.npz"
    old_latent_file = ""
    # The LR px of context around a tile that make `generate` exact there, given the image's
    # `prepare` cut to the tile: the receptive field of the per-tile computation (a property
    # computed from the config in most models). None: unknown (sr_sample.py then uses 32).
    tile_halo: int | None = None
    # The smallest LR side (after padding to lr_multiple) the network takes: sample() refuses a
    # smaller one in one line (RRDB's half-resolution map of a 1 px LR has no pixel).
    min_lr_size = 1
    scales: tuple[int, ...] = (2, 3, 4, 8)  # the scale factors the model is built for
    # False: values that sampling passes between layers can exceed float16's range (65504), so
    # sr_sample.py refuses --amp fp16 (bfloat16 has float32's range).
    fits_float16 = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_choices(cfg)
        check_ranges(cfg, python=True)  # (sr_train.py checked its flags alone before)
        if cfg.scale not in self.scales:
            name = type(self).__name__
            raise UsageError(f"{name}: scale {cfg.scale} not supported; use {scale_list(self)}")
        self.cfg = cfg
        self.scale = cfg.scale

    @classmethod
    def recipe(cls, scale: int) -> Recipe:
        """The paper's training recipe; subclasses `replace` what differs."""
        return Recipe(patch=default_patch(scale))

    @classmethod
    def unused_flags(cls, cfg) -> dict[str, str]:
        """The Config fields that have no effect with the other values of `cfg`, each with the
        options that make it so ("without --loss le"): sr_train.py warns about those given."""
        return {}

    @classmethod
    def input_consistency(cls, cfg) -> list[str]:
        """The options of `cfg` that make each SR's bicubic downscale match the LR input (a CEM,
        an L1 to the LR): they assume LR = bicubic(HR), so sr_train.py warns when its LR is
        degraded beyond that (--lr-blur, --lr-noise, --lr-jpeg)."""
        return []

    @classmethod
    def sample_consistency(cls, cfg) -> list[str]:
        """Those of `input_consistency` that act on samples (sr_sample.py warns where its LR, or
        its checkpoint's training LR, is degraded)."""
        return []

    @classmethod
    def raw_config(cls, state_dict: dict, scale: int) -> dict:
        """The config a raw state_dict implies (a released file without srspace metadata, loaded
        by `load_raw_state_dict`), e.g. an encoder depth or a variant read off its keys."""
        return {"scale": scale}

    # The network and sampling.

    def check_inputs(self, lr, hr) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s first line: (lr, hr) as the model takes them, or a one-line error
        (`check_pair`)."""
        return check_pair(self, lr, hr)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define forward(lr, hr)")

    def generate(self, lr, n: int, temperature: float, noise, **controls) -> torch.Tensor:
        """(B, n, 3, s·H, s·W) on an LR padded to `lr_multiple`, drawing from `noise`."""
        raise NotImplementedError(f"{type(self).__name__} must define generate()")

    def prepare(self, lr: torch.Tensor) -> Prepared | None:
        """The work that depends on one (1, 3, H, W) LR image alone (padded to `lr_multiple`): an
        encoder, conditioning maps. `generate(..., prepared=p)` then uses it instead of computing
        it again, for every temperature and sample of the image, and a tile uses `p.crop(tile)`
        (whole-image maps cut to it, so global operations see the whole image). Default None: the
        model shares nothing and `generate` never receives `prepared`."""
        return None

    def finish(self, sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Whole-image post-processing of `generate`'s output (B, n, 3, s·H, s·W), after tiles are
        joined and before clamping (e.g. a test-time CEM); the default does nothing."""
        return sr

    @torch.no_grad()
    def sample(
        self, lr: torch.Tensor, n: int = 1, temperature: float = 1.0, noise=None, prepared=None,
        **controls,
    ) -> torch.Tensor:  # fmt: skip
        """n samples per LR image, (B, n, 3, s·H, s·W) in [0, 1].

        temperature scales the standard deviation of every latent draw (0 = deterministic mode);
        `noise` is a NoiseSource with B·n seeds (row b·n + i is sample i of image b);
        `prepared`: this (B = 1) image's `prepare` output, reused; `controls`: model-specific
        sampling controls (e.g. explicit latents), passed to `generate`. Run in eval mode (the
        model's mode is restored after): the samples do not depend on train()/eval(), and
        sampling never changes the model (BatchNorm statistics, an ActNorm's initialisation).
        A wrong `lr`, n or temperature is a one-line TypeError/ValueError (`check_image`).
        """
        lr = check_sampling(self, lr, n, temperature)
        noise = sample_noise(noise, lr.shape[0], n, lr.device)
        return self._draw(lr, n, temperature, noise, prepared, **controls)

    def _draw(self, lr, n, temperature, noise, prepared=None, **controls) -> torch.Tensor:
        """`sample` of arguments it has checked (`noise` given)."""
        h, w = lr.shape[-2:]
        x = pad_to_multiple(lr, self.lr_multiple)
        if prepared is not None:
            controls["prepared"] = prepared
        with eval_mode(self):
            sr = self.finish(self.generate(x, n, float(temperature), noise, **controls), x)
        s = self.scale
        return sr[..., : h * s, : w * s].clamp(0, 1)

    @property
    def has_uncertainty(self) -> bool:
        """Whether `uncertainty` returns a map."""
        return False

    @torch.no_grad()
    def uncertainty(self, lr: torch.Tensor) -> torch.Tensor | None:
        """Per-pixel uncertainty map (B, 3, s·H, s·W), or None if the model has none."""
        return None

    def resolve_controls(self, controls: dict, n: int, device) -> "SampleControls | None":
        """sr_sample.py's control flags ({"ref": ..., "latent": FILE, ...}, only those given, and
        "made_by": the run's model, sr_sample.py's latent_source) for images of `n` samples;
        None: this model draws no explicit latents."""
        return None

    def sample_latents(self, lr, seeds, idx, temperature, controls) -> torch.Tensor | None:
        """The explicit latents of samples `idx` of one whole LR image (None: no latents)."""
        return None

    # Training.

    def on_step(self, step: int, total: int) -> None:
        """Called by the training loop before every step."""

    def patch_needs(self) -> list[tuple[str, int, str]]:
        """What its training losses take of an HR patch, as (what, the least side in px, another
        way out, e.g. ", or --lambda-per 0 (lambda_per=0)"): those that `losses.patch_too_small`
        says at a step, which sr_train.py checks --patch against before any work, and takes into
        the smallest --patch it suggests. The default: none."""
        return []

    def check_files(self, loaded: bool) -> None:
        """Read or check now the files a training run's first step would (pretrained loss
        networks, `--rrdb-init`, a `--ref-data` folder), before sr_train.py decodes its data
        (minutes for DIV2K): a missing one is its one-line error at once. `loaded`: the weights
        come from a checkpoint (a resume, --init-from), so a new run's start weights are not
        needed. The default: no such files."""

    def graph_key(self) -> tuple | None:
        """sr_train.py --cuda-graphs records a training step once and replays it: the recording
        holds the kernels launched, not the Python that chose them. So the model names here the
        host-side switches its step depends on (a training phase); the loop records again when
        they, a parameter's requires_grad or the batch shape change. None (the default): the
        step depends on host state that changes every step (e.g. references picked by step
        number), so a replay would silently repeat the first one; --cuda-graphs is refused."""
        return None

    @property
    def discriminator(self) -> nn.Module | None:
        """The GAN discriminator, if the model assigned one (self.discriminator = Module(...)).

        A property, not a class attribute `= None`: that would shadow the registered submodule.
        """
        return self._modules.get("discriminator")

    def discriminator_loss(self, lr: torch.Tensor, hr: torch.Tensor, out: dict) -> dict:
        """The discriminator's loss dict ("loss" + parts), given forward()'s output (with "sr");
        called once per training step of a model with a discriminator."""
        raise NotImplementedError(f"{type(self).__name__} has no discriminator")

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

    # Weights.

    def mark_initialized(self) -> None:
        """Weights were loaded (resume, --init-from): no data-dependent initialisation."""

    def complete_state_dict(self, state_dict: dict) -> dict:
        """Fill in what a state_dict of this model may lack (e.g. a weight average) before the
        strict load; by default nothing."""
        return state_dict

    def load_weights(self, state_dict: dict, path="state_dict", hint: str = "") -> None:
        """Strict load_state_dict with a one-line summary of what does not match (and `hint`:
        what to do)."""
        sd = self.complete_state_dict(state_dict)
        load_strict(self, sd, f"{path}: weights do not match the model", hint)

    def load_raw_state_dict(self, state_dict: dict, path="state_dict") -> None:
        """Load a state_dict without srspace metadata (e.g. a released file); by default it must
        use this model's own key names and its default config (all a raw file tells)."""
        name = type(self).__name__.lower()
        hint = (
            f"a raw state_dict loads only with srspace's key names, as the {name} config of its "
            "scale (load_model, sr_sample.py: the default one; --init-from: the run's model "
            "flags): load a model trained by sr_train.py from its checkpoint (OUT/last.pt or "
            "best.pt)"
        )
        self.load_weights(state_dict, path, hint)


@dataclass
class SampleControls:
    """What sr_sample.py's control flags resolved to, for a `LatentSRModel`."""

    n: int  # outputs per image (a control may fix it: one per reference, latent row or step)
    cond: dict  # passed to `latents`: ref (list of (3, h, w) / "lr" / "prior"), latent_from
    per_sample_refs: bool = False  # --ref DIR: sample i uses reference i
    latent: torch.Tensor | list | None = None  # --latent: (k, D); a flow: [(k, C, h, w), ...]
    # (direction (D,), steps (k,)); a flow: (direction fields [(1, C, h, w), ...], steps (k,))
    shift: tuple[torch.Tensor | list, torch.Tensor] | None = None
    # flag -> the sha256 of each file it read, in the order used: of the bytes it decoded (each
    # file is read once; a file changed meanwhile is not recorded with the other contents)
    digests: dict = field(default_factory=dict)
    latent_file: str = ""  # --latent's, for messages
    # --latent's files, for messages: after the sizes of an LR they do not fit, what to do
    latent_hint: str = ""
    shift_file: str = ""  # --latent-shift's (a flow's), for messages
    image: str = "this"  # the input being sampled (sr_sample.py sets it), for messages
    encoded: dict | None = None  # `cond` as `encode_references` makes it, on the first image
    made_by: dict | None = None  # this run's model (latent_source): a flow's --save-latent
    warnings: list = field(default_factory=list)  # lines for the user (another checkpoint's file)


NUMPY_HEADERS = (b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06")  # .npy, and .npz (a zip file)


def numpy_trouble(data: bytes | None, e: Exception, writer: str) -> str:
    """Why np.load could not read a file's `data` (None: not read), in words: the system's
    reason (not the path again), or numpy's message, but not where it advises loading
    "unsafely" as a pickle a file that is no NumPy file (text, an image: numpy takes any
    unknown bytes for a pickle) or an array of Python objects."""
    if isinstance(e, OSError):  # (not numpy's: the file could not be read)
        return e.strerror or str(e)
    if data is not None and not data.startswith(NUMPY_HEADERS):
        return f"no NumPy file: it begins {data[:8]!r}, not with {writer}'s header"
    if "pickle" in str(e):
        return f"its array holds Python objects, not numbers: {writer} a float32 array"
    return str(e)


def read_numpy(path: str, flag: str, what: str, writer: str, one: str):
    """A NumPy file's array (a .npy) or arrays (a .npz: {name: array}, read whole), and the
    sha256 of the file (read once). A folder, an empty or unreadable file is a data error (exit
    3) naming `what` it should be (written by `writer`; a folder: give `one` file)."""
    if Path(path).is_dir():  # (--latent DIR is sr_sample.py's: one file of it at a time)
        raise DataError(f"{flag} {path}: a folder; give one {one}")
    data = None
    try:
        data = Path(path).read_bytes()
        if not data:  # (numpy's own error for it differs between versions)
            raise DataError(f"{flag} {path}: not a readable {what} (an empty file, 0 bytes)")
        z = np.load(io.BytesIO(data))
        if not isinstance(z, np.ndarray):  # np.load opens a .npz archive as a lazy NpzFile
            with z:
                z = {k: z[k] for k in z.files}
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{flag} {path}: not a readable {what} "
                        f"({numpy_trouble(data, e, writer)})") from None  # fmt: skip
    return z, hashlib.sha256(data).hexdigest()


def load_latent(path: str, dim: int, flag: str, own: dict | None = None):
    """A saved latent, (D,) or (k, D), as float32, the sha256 of the file (read once) and the
    warning lines of its made_by record: a --save-latent .npz (its one field z0 and made_by, as
    a flow's fields: `saved_fields`, checked against `own`, the run's latent_source, before the
    shape, so another model's latent is named so), or a bare .npy array (np.save; --save-latent
    before it wrote .npz: no record). A file that cannot be used is a data error (exit 3), as
    any input file that cannot be: not one readable finite array, of another shape or of no
    rows (the file of another model or flag), or another model's."""
    z, digest = read_numpy(path, flag, ".npy array", "np.save", ".npy file (a direction)")
    warnings, records = [], []
    if isinstance(z, dict):
        z, warnings, records = saved_fields(z, flag, path, own)
        if sorted(z) != ["z0"]:
            got = ", ".join(f"{k} {a.shape}" for k, a in z.items()) or "no arrays"
            raise DataError(f"{flag} {path}: a .npz archive of {got}; expected a --save-latent "
                            f"file's one latent z0, ({dim},) or (k, {dim})")  # fmt: skip
        z = z["z0"]
    try:
        z = torch.from_numpy(z.astype(np.float32))
    except (ValueError, TypeError) as e:  # e.g. an array of strings
        raise DataError(f"{flag} {path}: not a readable .npy array ({e})") from None
    if z.ndim not in (1, 2) or z.shape[-1] != dim or z.numel() == 0:
        # (a record names what saved it: here this model of another config, as the checkpoint
        # and scale were checked above)
        whose = (f"those of another {records[0]['model']} checkpoint (sha256 "
                 f"{other_checkpoint(records[0], own)})" if records and own else
                 "another model's or configuration's")  # fmt: skip
        other = (f" ({dim}: this model's latent size D; rows of {z.shape[-1]} are {whose}: "
                 "decode them with the checkpoint that saved them)"
                 if z.ndim in (1, 2) and z.numel() else "")  # fmt: skip
        raise DataError(
            f"{flag} {path}: shape {tuple(z.shape)}, expected ({dim},) or (k, {dim}) with at "
            f"least one row{other}"
        )
    if not torch.isfinite(z).all():  # it would decode to NaN samples, blamed on the checkpoint
        raise DataError(f"{flag} {path}: holds NaN or infinite values; use a finite latent")
    return z, digest, warnings


LATENT_SOURCE = "made_by"  # the .latent.npz entry that names the model of its fields


def latent_sources(array: np.ndarray, flag: str, path: str) -> list[dict]:
    """The records of a .latent.npz's made_by entry, as --save-latent writes it (a JSON string of
    the model, its scale, checkpoint sha256 and config), or a stack of k of them (np.savez of k
    saved files' entries, as of their fields); other contents are a data error (exit 3)."""
    records = None
    if array.dtype.kind == "U" and array.ndim <= 1 and array.size:
        with contextlib.suppress(ValueError):
            records = [json.loads(v) for v in dict.fromkeys(np.atleast_1d(array).tolist())]
    ok = records and all(
        isinstance(r, dict) and isinstance(r.get("model"), str) and type(r.get("scale")) is int
        for r in records
    )
    if not ok:
        raise DataError(
            f"{flag} {path}: its {LATENT_SOURCE} entry is not the record --save-latent writes "
            "(JSON of the model and scale); save the fields without it to decode them anyway"
        )
    return records


def check_latent_source(records: list[dict], own: dict, flag: str, path: str) -> list[str]:
    """The fields' records (`latent_sources`) against `own`, the run's (sr_sample.py's
    latent_source): another model or scale is a data error (exit 3, as any file that does not
    fit the run; the same shapes decode to garbage, not to the saved samples); another
    checkpoint of this model and scale (trained further, say: a fair experiment) a warning
    line, returned."""
    lines = []
    for r in records:
        if (r["model"], r["scale"]) != (own["model"], own["scale"]):
            raise DataError(
                f"{flag} {path}: saved by an x{r['scale']} {r['model']} model, not this "
                f"x{own['scale']} {own['model']} (its latents decode to other images here); decode "
                f"it with an x{r['scale']} {r['model']} checkpoint"
            )
        if r.get("checkpoint_sha256") != own["checkpoint_sha256"]:
            lines.append(
                f"{flag} {path}: saved by another {r['model']} checkpoint (sha256 "
                f"{other_checkpoint(r, own)}): decoded with this one, its samples are not the "
                "saved ones"
            )
    return list(dict.fromkeys(lines))


def other_checkpoint(record: dict, own: dict) -> str:
    """The start of the checkpoint sha256 a record (made_by, a manifest.json) names, and the
    config fields where it differs from `own`'s, in words."""
    a, b = record.get("config"), own["config"]
    keys = sorted(k for k in {**a, **b} if a.get(k) != b.get(k)) if type(a) is dict else []
    config = f"; its config differs in {', '.join(keys)}" if keys else ""
    return f"{str(record.get('checkpoint_sha256'))[:12]}...{config}"


def saved_fields(arrays: dict, flag: str, path: str, own: dict | None):
    """A --save-latent .npz's arrays less its made_by record, the warning lines of that record
    against `own` (the run's latent_source: `check_latent_source`, which refuses another model
    or scale; none given: none), and the records: one way for every model's latents, a flow's
    fields z0, z1, ... and a RefVAE/VarSR latent z0 alike. A file named as --save-latent names
    them (NAME_sample{i:05d}.latent.npz) without the record, a flow's saved by an srspace before
    it wrote one or a file rewritten without it, is one warning line: it is decoded as this
    model's, unchecked, and another model's latent of these shapes decodes to other images
    without an error (as an older RefVAE/VarSR .npy without its folder's manifest.json, said by
    sr_sample.py's check_npy_saver). A file named by hand is the user's own (a direction, an
    interpolation): taken as given, without a word, as a .npy named by hand."""
    made_by = arrays.pop(LATENT_SOURCE, None)
    records = [] if made_by is None else latent_sources(made_by, flag, path)
    warnings = check_latent_source(records, own, flag, path) if records and own else []
    if made_by is None and own and Path(path).name.endswith(".latent.npz"):
        warnings = [  # (read after "--latent DIR: k of n files" too: LatentDir.check)
            f"{flag} {path}: with no record of the model that saved it (an srspace before "
            f"--save-latent recorded it, or rewritten): decoded as this x{own['scale']} "
            f"{own['model']}'s, unchecked; another model's latent of these shapes decodes to "
            "other images without an error"
        ]
    return arrays, warnings, records


def load_latent_fields(path: str, count: int, flag: str, own: dict | None = None):
    """A flow's saved latent: a .npz of `count` float arrays z0, z1, ..., each (C, h, w) (one
    sample) or (k, C, h, w) (k samples, the same k in all), as float32 (k, C, h, w) tensors, the
    sha256 of the file (read once) and the warning lines of `check_latent_source` (given `own`,
    where the file has a made_by entry: files written before it had none). As `load_latent`: a
    file that cannot be used is a data error (exit 3): not a readable archive of finite arrays,
    of other names or dimensions, or the fields of another model; the shapes are checked
    against an LR image later (`SRFlow.sample_latents`)."""
    names = [f"z{k}" for k in range(count)]
    arrays, digest = read_numpy(path, flag, ".npz archive", "np.savez",
                                ".npz file (of a direction's fields z0, z1, ...)")  # fmt: skip
    if isinstance(arrays, np.ndarray):  # np.load reads a .npy as an array, a .npz as an NpzFile
        raise DataError(f"{flag} {path}: a .npy array, not the .npz archive of this "
                        f"model's {count} latent fields {', '.join(names)}")  # fmt: skip
    arrays, warnings, _ = saved_fields(arrays, flag, path, own)
    dims = {a.ndim for a in arrays.values()}
    rows = {len(a) for a in arrays.values() if a.ndim == 4}
    if sorted(arrays) != sorted(names) or len(dims) != 1 or dims - {3, 4} or 0 in rows:
        got = ", ".join(f"{k} {a.shape}" for k, a in arrays.items()) or "no arrays"
        raise DataError(
            f"{flag} {path}: holds {got}; expected this model's {count} latent fields "
            f"{', '.join(names)}, each (C, h, w) or all (k, C, h, w) with the same k >= 1"
        )
    if len(rows) > 1:
        raise DataError(f"{flag} {path}: its fields hold {sorted(rows)} samples; expected one k")
    try:
        z = [torch.from_numpy(arrays[k].astype(np.float32)) for k in names]
    except (ValueError, TypeError) as e:  # e.g. an array of strings
        raise DataError(f"{flag} {path}: not float arrays ({e})") from None
    if not all(torch.isfinite(t).all() for t in z):  # NaN samples, blamed on the checkpoint
        raise DataError(f"{flag} {path}: holds NaN or infinite values; use a finite latent")
    return [t if t.ndim == 4 else t[None] for t in z], digest, warnings


def latent_steps(text: str) -> list[float]:
    """The numbers of --latent-steps, e.g. "-2,-1,0,1,2" ([]: none, or not numbers)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        return []


def control_image(path, flag: str, device) -> tuple[torch.Tensor, str]:
    """The (3, H, W) image a control flag names, and the sha256 of the bytes it was decoded
    from (the file read once); one that cannot be read (a checkpoint, a folder, a broken file)
    is a data error naming the flag, not an unreadable input."""
    try:
        data = read_file(path)
        return to_tensor(read_image(path, data)).to(device), hashlib.sha256(data).hexdigest()
    except DataError as e:
        raise DataError(f"{flag} {e}") from None


class LatentSRModel(SRModel):
    """A model whose sample i is decoded from one global latent z_i (D,) of the whole image, so
    latents can be drawn, saved, decoded again, walked along a direction, or taken from a
    reference: the sampling controls of sr_sample.py. Subclasses define `latents` and
    `decode_latents`; tiled sampling draws the latents once on the whole LR."""

    stochastic = True
    sample_controls = ("latent", "latent_shift")
    old_latent_file = ".latent.npy"  # a bare (D,) array, before --save-latent recorded the model

    @property
    def z_dim(self) -> int:
        return self.cfg.z_dim

    def reference(self, img: torch.Tensor) -> torch.Tensor:
        """A --ref image (3, H, W) as `latents` uses it, kept so for the whole run: a model that
        resizes its references does it here, once, so a folder of large photographs is not held
        at full size (all of them, on the device)."""
        return img

    def latents(self, lr: torch.Tensor, n: int, temperature: float, noise, **cond):
        """z (B, n, D) of n samples per LR image, drawn from `noise` (vectors, never fields)."""
        raise NotImplementedError(f"{type(self).__name__} must define latents()")

    def encode_references(self, cond: dict, like: torch.Tensor) -> dict:
        """`cond` with its reference images replaced by their encodings, which `latents` takes as
        well: sr_sample.py encodes them once per run, not for every image and chunk (a VGG19 or
        an encoder on each). `like`: an LR of the run (device, dtype). Default: unchanged."""
        return cond

    def decode_latents(self, lr: torch.Tensor, z: torch.Tensor, prepared=None) -> torch.Tensor:
        """(B, n, 3, s·H, s·W) from z (B, n, D), one sample at a time (a sample never depends
        on what it is batched with); `prepared`: the image's `prepare` output (maybe cut)."""
        raise NotImplementedError(f"{type(self).__name__} must define decode_latents()")

    @torch.no_grad()
    def sample(self, lr, n=1, temperature=1.0, noise=None, prepared=None, latent=None, **cond):
        """As `SRModel.sample`, with the latents drawn on the LR as given, before it is padded to
        `lr_multiple`: what a reference of the LR itself (RefVAE's ref="lr", paper §3.2) encodes
        is the LR image, not its reflected border; sr_sample.py draws them so too."""
        lr = check_sampling(self, lr, n, temperature)
        noise = sample_noise(noise, lr.shape[0], n, lr.device)
        if latent is None:
            with eval_mode(self):
                latent = self.latents(lr, n, float(temperature), noise, **cond)
        return self._draw(lr, n, temperature, noise, prepared, latent=latent)  # (checked)

    def generate(self, lr, n, temperature, noise, latent=None, prepared=None, **cond):
        """latent: explicit z, (D,), (n, D) or (B, n, D); otherwise drawn by `latents`."""
        if latent is None:
            z = self.latents(lr, n, temperature, noise, **cond)
        else:
            z = latent.to(lr).expand(lr.shape[0], n, self.z_dim)
        return self.decode_latents(lr, z, prepared)

    def resolve_controls(self, controls: dict, n: int, device) -> SampleControls:
        """Load the files of the control flags and check them against this model."""
        ref, latent_from = controls.get("ref", ""), controls.get("latent_from", "")
        if controls.get("latent") and (ref or latent_from):
            raise UsageError(
                "--latent decodes saved latents: it cannot be combined with --ref/--latent-from"
            )
        ctl = SampleControls(n, {})
        if ref in ("lr", "prior"):
            ctl.cond["ref"] = ref
        elif ref and ref != "noise":
            path = Path(ref)
            if not path.exists():
                raise DataError(f"--ref {path}: no such file or folder (or noise, lr, prior)")
            try:
                files = list_images(path, recursive=False) if path.is_dir() else [path]
            except DataError as e:  # an empty folder: say which flag gave it
                raise DataError(f"--ref {e}") from None
            refs = [control_image(f, "--ref", device) for f in files]
            ctl.cond["ref"] = [self.reference(img) for img, _ in refs]
            ctl.digests["--ref"] = [digest for _, digest in refs]
            ctl.per_sample_refs = path.is_dir()
            ctl.n = len(files) if path.is_dir() else ctl.n
        if latent_from:
            img, digest = control_image(latent_from, "--latent-from", device)
            ctl.cond["latent_from"], ctl.digests["--latent-from"] = img[None], [digest]
            ctl.n = 1  # E_H's mean: one output
        own = controls.get("made_by")  # (the record a saved latent must name)
        if controls.get("latent"):
            z, digest, ctl.warnings = self.read_latent(controls["latent"], "--latent", own)
            ctl.latent, ctl.digests["--latent"] = z.to(device), [digest]
            ctl.n = len(ctl.latent)
        if controls.get("latent_shift"):
            ctl.shift = self._shift(controls["latent_shift"], controls["latent_steps"], ctl, device,
                                    own)  # fmt: skip
            ctl.n = len(ctl.shift[1])
        return ctl

    def read_latent(self, path: str, flag: str, own: dict | None = None):
        """A saved latent file as SampleControls.latent holds it, (k, D) float32 (`load_latent`),
        the sha256 of the file and the warning lines of its made_by record against `own` (the
        run's latent_source; an old bare .npy records nothing)."""
        z, digest, warnings = load_latent(path, self.z_dim, flag, own)
        return z.view(-1, self.z_dim), digest, warnings

    def _shift(self, file: str, steps: str, ctl: SampleControls, device, own: dict | None):
        """(direction (D,), steps (k,)) of --latent-shift FILE --latent-steps STEPS (a saved
        latent's made_by record checked against `own`, as --latent's)."""
        dim = self.z_dim
        direction, digest, warnings = load_latent(file, dim, "--latent-shift", own)
        ctl.warnings += warnings
        direction, ctl.digests["--latent-shift"] = direction.view(-1).to(device), [digest]
        if direction.numel() != dim:  # (k, D), k > 1: the file, not the flags (exit 3)
            raise DataError(f"--latent-shift {file}: {len(direction) // dim} rows of ({dim},); "
                            f"expected one direction, ({dim},) or (1, {dim})")  # fmt: skip
        values = latent_steps(steps)
        if not values or (ctl.latent is not None and len(ctl.latent) > 1):
            raise UsageError(
                f"--latent-shift {file} --latent-steps {steps!r}: needs numbers like "
                "-2,-1,0,1,2 and at most one --latent row"
            )
        return direction, torch.tensor(values, device=device)

    def sample_latents(self, lr, seeds, idx, temperature, controls: SampleControls):
        """(len(idx), D): the latents of samples idx of the whole (1, 3, h, w) LR image."""
        if controls.encoded is None:  # on the first image: under the run's autocast, as all
            with torch.no_grad():
                controls.encoded = self.encode_references(controls.cond, lr)
        cond = dict(controls.encoded)
        if controls.shift is not None:
            if controls.latent is not None:
                base = controls.latent[0]
            else:  # the temperature-0 latent of the given controls (varsr: μ_L; --ref DIR: its 1st)
                if controls.per_sample_refs:
                    cond["ref"] = cond["ref"][:1]
                base = self.latents(lr, 1, 0.0, NoiseSource(seeds[:1], lr.device), **cond)[0, 0]
            direction, steps = controls.shift
            return base + steps[list(idx), None] * direction
        if controls.latent is not None:
            return controls.latent[list(idx)]
        if controls.per_sample_refs:
            cond["ref"] = [cond["ref"][i] for i in idx]
        return self.latents(lr, len(idx), temperature, NoiseSource(seeds, lr.device), **cond)[0]
