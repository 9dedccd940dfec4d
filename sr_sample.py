"""Draw n super-resolved samples per LR image from a checkpoint. Reads top to bottom.

    python sr_sample.py --ckpt runs/srflow_x4/best.pt --input lr/ --n 10 --out samples/
    python sr_sample.py --ckpt best.pt --input DIV2K_valid_HR/ --from-hr --layout ntire --out sub/

Files written to --out (what sr_eval.py reads). NAME is the input's stem, or with --layout ntire
its 0-based position k in sorted order as {k:06d} (the NTIRE21 submission names):
  NAME_sample{i:05d}.png  sample i = 0..n-1; a single-output (deterministic) model with --n 1
                          writes NAME.png instead
  lr/{stem}.png           --from-hr: the LR made from the HR input (cropped to a multiple of 8,
                          of 3 at x3; MATLAB bicubic downscale, uint8): give OUT/lr to sr_eval --lr
  NAME_sigma.png, .npy    --save-uncertainty, models with an uncertainty output: sigma in [0, 1]
                          as a 16-bit gray PNG of round(mean over RGB of sigma * 65535), and the
                          float32 (3, H, W) array as .npy
  NAME_grid.png           --grid: one row [LR enlarged (nearest) | the n samples | per-pixel std
                          across samples | sigma], maps normalised to their max (black, red,
                          yellow, white)
  NAME_sample{i:05d}.latent.npy
                          --save-latent, latent models (refvae, varsr): the float32 (D,) latent
                          of sample i; `--latent FILE` decodes it to the same sample again
Sampling controls (a model without the control stops with a one-line usage error):
  --ref FILE|DIR|noise|lr|prior   refvae: a reference image (n samples); one output per image of
                          a folder (n = their number); noise (default): a Gaussian-noise reference
                          per sample; lr: the LR image itself; prior: z ~ N(0, I), no reference
  --latent-from HR        varsr: the HR encoder's latent of another HR image (one output)
  --latent FILE           decode saved latents, (D,) or (k, D): one output per row
  --latent-shift FILE --latent-steps -2,-1,0,1,2
                          walk z_k = z_0 + k·direction (one output per step); z_0 = --latent, or
                          the model's temperature-0 latent of the controls given (varsr: μ_L)
Latent models draw the latent on the whole LR first and decode every tile with it.
Sample i of image `stem` draws from the stream sample_seed(--seed, stem, i), so it does not depend
on file order, --batch or --n. --temperature defaults to the model's default_temperature.

Tiling (--tile PX --tile-overlap PX, both in LR input pixels; 0 = whole image): the LR is reflect-
padded to the model's lr_multiple and cut into tiles whose sizes and positions are multiples of it.
In each overlap the outer quarter next to a tile's edge gets weight 0 (the network's zero padding
makes its output wrong there) and the middle half is a linear crossfade; weights are normalised.
The default overlap, 32, thus ignores 8 LR px at each inner tile edge: this covers the receptive
field of small networks exactly, and for deep ones (EDSR, RRDB) the effect of pixels further away
is below 8-bit precision (measured with random weights); raise it if seams ever show. Stochastic
models draw each sample's noise once at whole-image size and cut it per tile, so a tiled sample
equals the untiled one. A CUDA out-of-memory error retries the image in tiles, halving them down
to 64 px. Exit codes: 0 ok, 2 bad flag, 3 unusable input (unreadable images are reported and
skipped, the others written, exit 3 at the end), 4 out of memory, 6 checkpoint problem.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rich.progress import Progress

from sr_lib.cem import cem
from sr_lib.checkpoint import load_model
from sr_lib.config import parse, pick_device
from sr_lib.data import (
    default_mod,
    demo_files,
    list_images,
    mod_crop,
    read_image,
    to_tensor,
    to_uint8,
    write_png,
)
from sr_lib.errors import DataError, UsageError, exit_on_error
from sr_lib.models import MODELS
from sr_lib.models.base import NoiseSource, pad_to_multiple, sample_seed
from sr_lib.resize import imresize

PROG = "sr_sample.py"
MIN_TILE = 64  # smallest tile (LR px) of the out-of-memory fallback


@dataclass
class SampleArgs:
    ckpt: str = field(default="", metadata=dict(help="checkpoint written by sr_train.py"))
    input: str = field(
        default="",
        metadata=dict(help="LR image or folder (HR with --from-hr); 'demo': the demo val HR"),
    )
    out: str = field(default="", metadata=dict(help="output folder"))
    from_hr: bool = field(
        default=False, metadata=dict(help="inputs are HR: mod-crop, downscale, write OUT/lr/")
    )
    n: int = field(default=10, metadata=dict(help="samples per image (default 10)"))
    temperature: Optional[float] = field(  # noqa: UP045 (argparse-dataclass needs Optional)
        default=None, metadata=dict(help="sampling temperature (default: the model's)")
    )
    seed: int = field(default=0, metadata=dict(help="sample i of image STEM uses (seed, STEM, i)"))
    layout: str = field(
        default="stem",
        metadata=dict(help="stem (default): STEM_sample00000.png; ntire: 000000_sample00000.png"),
    )
    batch: int = field(default=10, metadata=dict(help="samples per model call (default 10)"))
    tile: int = field(default=0, metadata=dict(help="tile size in LR pixels (0 = whole image)"))
    tile_overlap: int = field(
        default=32, metadata=dict(help="tile overlap in LR pixels (default 32)")
    )
    save_uncertainty: bool = field(
        default=False, metadata=dict(help="write NAME_sigma.png (16-bit) + .npy")
    )
    grid: bool = field(default=False, metadata=dict(help="write a contact sheet NAME_grid.png"))
    cem: bool = field(
        default=False,
        metadata=dict(
            help="project every sample onto the HR images whose bicubic downscale is the LR"
        ),
    )
    ref: str = field(
        default="",
        metadata=dict(help="refvae reference: FILE, DIR (one output per image), noise (default), "
                      "lr (the LR itself) or prior (z ~ N(0, I))"),
    )  # fmt: skip
    latent_from: str = field(
        default="", metadata=dict(help="varsr: decode with the latent E_H(HR) of this HR image")
    )
    latent: str = field(
        default="", metadata=dict(help="decode this saved latent .npy, (D,) or (k, D): k outputs")
    )
    latent_shift: str = field(
        default="", metadata=dict(help="walk along this latent direction .npy (D,)")
    )
    latent_steps: str = field(
        default="-2,-1,0,1,2", metadata=dict(help="multiples of --latent-shift, one output each")
    )
    save_latent: bool = field(
        default=False, metadata=dict(help="write NAME_sample{i:05d}.latent.npy per sample")
    )
    device: str = field(default="auto", metadata=dict(help="auto, cpu, cuda, cuda:1, ..."))
    model: str = field(default="", metadata=dict(help="model of a raw state_dict (no metadata)"))
    scale: int = field(default=0, metadata=dict(help="scale of a raw state_dict (no metadata)"))


def main(argv=None) -> int:
    with exit_on_error(PROG):
        return sample(argv)


def sample(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for k, a in enumerate(argv[:-1]):  # argparse reads "-2,-1,0" as a flag: glue it to its flag
        if a == "--latent-steps":
            argv[k : k + 2] = [f"{a}={argv[k + 1]}"]
            break
    args = parse(SampleArgs, argv, PROG)
    for flag, value in (("--ckpt", args.ckpt), ("--input", args.input), ("--out", args.out)):
        if not value:
            raise UsageError(f"{flag} is required")
    if args.n < 1 or args.batch < 1:
        raise UsageError(f"--n {args.n} / --batch {args.batch}: both must be at least 1")
    if args.temperature is not None and not args.temperature >= 0:
        raise UsageError(f"--temperature {args.temperature}: must be >= 0")
    if args.layout not in ("stem", "ntire"):
        raise UsageError(f"--layout {args.layout!r}: choose stem or ntire")
    if args.tile < 0 or args.tile_overlap < 0 or (args.tile and args.tile_overlap >= args.tile):
        raise UsageError(
            f"--tile {args.tile} --tile-overlap {args.tile_overlap}: both must be >= 0 and the "
            "overlap (default 32) smaller than the tile"
        )
    paths = input_paths(Path(args.input))
    args.from_hr = args.from_hr or args.input == "demo"  # the demo images are HR photographs
    device = pick_device(args.device)
    model, ck = load_model(args.ckpt, device, args.model or None, args.scale or None)
    s, m = model.scale, model.lr_multiple
    ctl = controls(args, model, ck["model"], device)  # may set args.n (one output per ref/step)
    temperature = model.default_temperature if args.temperature is None else args.temperature
    draws = args.n if model.stochastic else 1  # a deterministic model runs once per image
    single = not model.stochastic and args.n == 1  # written as NAME.png
    probe = torch.zeros(1, 3, -(-16 // m) * m, -(-16 // m) * m, device=device)
    has_sigma = (args.save_uncertainty or args.grid) and model.uncertainty(probe) is not None
    if args.save_uncertainty and not has_sigma:
        print(f"{PROG}: warning: --save-uncertainty: this {type(model).__name__} model has no "
              "uncertainty output; no sigma maps written", file=sys.stderr, flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tty = sys.stdout.isatty()  # a rich progress bar on a terminal, one line per image otherwise
    failed, n_written, t0 = [], 0, time.time()
    with Progress(disable=not tty) as bar:
        task = bar.add_task("sampling", total=len(paths))
        say = bar.console.print if tty else lambda text: print(text, flush=True)
        for k, path in enumerate(paths):
            t_img, stem = time.time(), path.stem
            name = f"{k:06d}" if args.layout == "ntire" else stem
            files = (
                [f"{name}.png"] if single else [f"{name}_sample{i:05d}.png" for i in range(args.n)]
            )
            bar.update(task, description=path.name)
            try:
                img = read_image(path)
                if args.from_hr:
                    img = mod_crop(img, default_mod(s))
                    if img.size == 0:
                        raise DataError(f"{path}: smaller than {default_mod(s)} px, no LR to make")
                    img = imresize(img, 1 / s)
                    write_png(out / "lr" / f"{stem}.png", img)
            except DataError as e:  # reported, skipped; exit 3 once the others are written
                print(f"{PROG}: error: {e}; skipped", file=sys.stderr, flush=True)
                failed.append(path.name)
                bar.advance(task)
                continue
            lr, tile = to_tensor(img)[None].to(device), args.tile
            while True:  # retried in smaller tiles after a CUDA out-of-memory error
                try:
                    sigma, kept = None, []
                    if has_sigma:
                        sigma = upscale(model, lr, model.uncertainty, tile, args.tile_overlap)
                        sigma = sigma[0].float().cpu().numpy()  # (3, sH, sW)
                    for c0 in range(0, draws, args.batch):  # one model.sample call per chunk
                        idx = range(c0, min(c0 + args.batch, draws))
                        seeds = [sample_seed(args.seed, stem, i) for i in idx]
                        cond = {}
                        if ctl is not None:  # whole-image latents, the same for every tile
                            z = sample_latents(model, lr, seeds, idx, temperature, ctl)
                            cond = {"latent": z[None]}  # (1, len(idx), D)
                            if args.save_latent:  # NAME_sample00003.png -> ....latent.npy
                                for i, zi in zip(idx, z.cpu().numpy().astype(np.float32)):
                                    np.save(out / f"{files[i][:-4]}.latent.npy", zi)
                        srs = to_uint8(draw(model, lr, seeds, temperature, tile,
                                            args.tile_overlap, args.cem, cond))  # fmt: skip
                        for i, sr in zip(idx, srs):
                            for j in [i] if model.stochastic else range(args.n):
                                write_png(out / files[j], sr)
                                kept += [sr] if args.grid else []
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    tile = (tile or max(lr.shape[-2:])) // 2
                    if tile < MIN_TILE:
                        raise MemoryError from None
                    say(f"{name}: CUDA out of memory; retrying with --tile {tile}")
            if sigma is not None and args.save_uncertainty:
                np.save(out / f"{name}_sigma.npy", sigma.astype(np.float32))
                u16 = np.round(np.clip(sigma.mean(0), 0, 1) * 65535).astype(np.uint16)
                write_png(out / f"{name}_sigma.png", u16)
            if args.grid:
                write_png(out / f"{name}_grid.png", contact_sheet(img, kept, sigma, s))
            n_written += args.n
            bar.advance(task)
            if not tty:
                h, w = img.shape[:2]
                print(f"[{k + 1}/{len(paths)}] {path.name} {w}x{h} -> {args.n} x {w * s}x{h * s} "
                      f"in {time.time() - t_img:.1f} s", flush=True)  # fmt: skip
    done = len(paths) - len(failed)
    say(f"done: {done} images, {n_written} samples, {time.time() - t0:.1f} s -> {out}")
    if failed:
        raise DataError(
            f"{len(failed)} of {len(paths)} inputs unreadable ({', '.join(failed[:3])}"
            f"{', ...' if len(failed) > 3 else ''}); the other {done} were written to {out}"
        )
    return 0


def input_paths(path: Path) -> list[Path]:
    """The image files of --input: one file, or a folder's images (not recursive), sorted."""
    if str(path) == "demo":
        return demo_files("val")
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"--input {path}: no such file or folder")
    paths = list_images(path, recursive=False)
    stems = [p.stem for p in paths]
    dup = sorted({t for t in stems if stems.count(t) > 1})
    if dup:
        raise DataError(f"--input {path}: several files share the stem {dup[0]!r}; rename them")
    return paths


def draw(model, lr, seeds, temperature, tile, overlap, consistent=False, cond=None):
    """(len(seeds), 3, sH, sW): the samples with these seeds, one model.sample call (per tile).

    consistent: apply the CEM to the whole (blended) sample, so its MATLAB-bicubic downscale equals
    the LR (exact projection, sr_lib/cem.py), then clamp to [0, 1] again. cond: sampling controls
    passed to model.sample (e.g. {"latent": z})."""
    noise = NoiseSource(seeds, lr.device)
    fn = lambda x: model.sample(x, len(seeds), temperature, noise, **(cond or {}))[0]  # noqa: E731
    sr = upscale(model, lr, fn, tile, overlap, noise)
    return cem(sr, lr, model.scale).clamp(0, 1) if consistent else sr


@dataclass
class Controls:
    """What the sampling-control flags resolved to (see the module docstring)."""

    cond: dict  # passed to model.latents: ref (list of (3, h, w) / "lr" / "prior"), latent_from
    per_sample_refs: bool = False  # --ref DIR: sample i uses reference i
    latent: torch.Tensor | None = None  # --latent: (k, D)
    shift: tuple[torch.Tensor, torch.Tensor] | None = None  # (direction (D,), steps (k,))


def controls(args, model, name: str, device) -> Controls | None:
    """Check the control flags against the model, load their files; None: not a latent model."""
    have = getattr(model, "sample_controls", ())
    asked = {"--ref": ("ref", args.ref), "--latent-from": ("latent_from", args.latent_from),
             "--latent": ("latent", args.latent), "--latent-shift": ("latent", args.latent_shift),
             "--save-latent": ("latent", args.save_latent)}  # fmt: skip
    for flag, (key, value) in asked.items():
        if value and key not in have:
            able = [k for k, c in MODELS.items() if key in getattr(c, "sample_controls", ())]
            raise UsageError(
                f"{flag}: the {name} model does not support it (only: {', '.join(able)})"
            )
    if "latent" not in have:
        return None
    if args.latent and (args.ref or args.latent_from):
        raise UsageError(
            "--latent decodes saved latents: it cannot be combined with --ref/--latent-from"
        )
    ctl, dim = Controls({}), model.cfg.z_dim
    if args.ref in ("lr", "prior"):
        ctl.cond["ref"] = args.ref
    elif args.ref and args.ref != "noise":
        path = Path(args.ref)
        if not path.exists():
            raise DataError(f"--ref {path}: no such file or folder (or noise, lr, prior)")
        files = list_images(path, recursive=False) if path.is_dir() else [path]
        ctl.cond["ref"] = [to_tensor(read_image(f)).to(device) for f in files]
        ctl.per_sample_refs = path.is_dir()
        args.n = len(files) if path.is_dir() else args.n
    if args.latent_from:
        ctl.cond["latent_from"] = to_tensor(read_image(args.latent_from))[None].to(device)
        args.n = 1  # E_H's mean: one output
    if args.latent:
        ctl.latent = load_latent(args.latent, dim, "--latent").view(-1, dim).to(device)
        args.n = len(ctl.latent)
    if args.latent_shift:
        direction = load_latent(args.latent_shift, dim, "--latent-shift").view(-1).to(device)
        try:
            steps = [float(v) for v in args.latent_steps.split(",") if v.strip()]
        except ValueError:
            steps = []
        if (
            not steps
            or direction.numel() != dim
            or (ctl.latent is not None and len(ctl.latent) > 1)
        ):
            raise UsageError(
                f"--latent-shift {args.latent_shift} --latent-steps {args.latent_steps!r}: needs "
                f"a ({dim},) direction, numbers like -2,-1,0,1,2 and at most one --latent row"
            )
        ctl.shift = (direction, torch.tensor(steps, device=device))
        args.n = len(steps)
    return ctl


def load_latent(path: str, dim: int, flag: str) -> torch.Tensor:
    try:
        z = torch.from_numpy(np.load(path).astype(np.float32))
    except (OSError, ValueError) as e:
        raise DataError(f"{flag} {path}: not a readable .npy array ({e})") from None
    if z.ndim not in (1, 2) or z.shape[-1] != dim:
        raise UsageError(f"{flag} {path}: shape {tuple(z.shape)}, expected ({dim},) or (k, {dim})")
    return z


def sample_latents(model, lr, seeds, idx, temperature, ctl: Controls) -> torch.Tensor:
    """(len(idx), D): the latents of samples idx of the whole (1, 3, h, w) LR image."""
    cond = dict(ctl.cond)
    if ctl.shift is not None:
        if ctl.latent is not None:
            base = ctl.latent[0]
        else:  # the temperature-0 latent of the given controls (varsr: μ_L; --ref DIR: its first)
            if ctl.per_sample_refs:
                cond["ref"] = cond["ref"][:1]
            base = model.latents(lr, 1, 0.0, NoiseSource(seeds[:1], lr.device), **cond)[0, 0]
        direction, steps = ctl.shift
        return base + steps[list(idx), None] * direction
    if ctl.latent is not None:
        return ctl.latent[list(idx)]
    if ctl.per_sample_refs:
        cond["ref"] = [cond["ref"][i] for i in idx]
    return model.latents(lr, len(idx), temperature, NoiseSource(seeds, lr.device), **cond)[0]


def upscale(model, lr, fn, tile: int, overlap: int, noise=None) -> torch.Tensor:
    """fn(lr) -> (N, C, s·h, s·w) on the (1, 3, h, w) LR padded to lr_multiple, whole or in
    overlapping tiles blended with feathered weights; `noise` is windowed to each tile, replayed."""
    h, w, s, m = *lr.shape[-2:], model.scale, model.lr_multiple
    x = pad_to_multiple(lr, m)
    H, W = x.shape[-2:]
    if not tile:
        return fn(x)[..., : h * s, : w * s]
    tile = max(m, tile // m * m)
    overlap = min(-(-overlap // m) * m, tile - m)
    th, tw = min(tile, H), min(tile, W)
    ys, xs = tile_starts(H, th, overlap), tile_starts(W, tw, overlap)
    out = weight = None
    for a, y0 in enumerate(ys):
        for b, x0 in enumerate(xs):
            if noise is not None:
                noise.window = (y0, x0, th, tw, H, W)  # the whole-image field, cut to this tile
                noise.restart()
            sr = fn(x[..., y0 : y0 + th, x0 : x0 + tw])  # (N, C, s·th, s·tw)
            wgt = feather(ys, a, th, s, x.device)[:, None] * feather(xs, b, tw, s, x.device)
            if out is None:
                out = sr.new_zeros((*sr.shape[:2], H * s, W * s))
                weight = sr.new_zeros((H * s, W * s))
            out[..., y0 * s : (y0 + th) * s, x0 * s : (x0 + tw) * s] += sr * wgt
            weight[y0 * s : (y0 + th) * s, x0 * s : (x0 + tw) * s] += wgt
    return (out / weight.clamp_min(1e-12))[..., : h * s, : w * s]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile positions along one axis: stride tile - overlap, the last one flush with the end."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def feather(starts: list[int], i: int, length: int, s: int, device) -> torch.Tensor:
    """1-D weights of tile i (length LR px, s·length output px): towards each neighbour, 0 on the
    outer quarter of the overlap, a linear ramp across its middle half, 1 elsewhere."""
    d = torch.arange(length * s, device=device) + 0.5  # output pixel centres
    w = torch.ones_like(d)
    left = (starts[i - 1] + length - starts[i]) * s if i > 0 else 0
    right = (starts[i] + length - starts[i + 1]) * s if i + 1 < len(starts) else 0
    if left:
        w = w * ((d - left / 4) / (left / 2)).clamp(0, 1)
    if right:
        w = w * ((length * s - d - right / 4) / (right / 2)).clamp(0, 1)
    return w


def heat(v: np.ndarray) -> np.ndarray:
    """(H, W) map -> uint8 RGB heat map normalised to its max: black, red, yellow, white."""
    v = v / v.max() if v.max() > 0 else v
    return np.round(np.clip(3 * v[..., None] - np.arange(3), 0, 1) * 255).astype(np.uint8)


def contact_sheet(lr: np.ndarray, srs: list[np.ndarray], sigma, s: int) -> np.ndarray:
    """One row: LR enlarged (nearest), the samples, their per-pixel std, and sigma if any."""
    panels = [np.repeat(np.repeat(lr, s, 0), s, 1), *srs]
    panels.append(heat(np.stack(srs).astype(np.float32).std(0).mean(-1)))
    if sigma is not None:
        panels.append(heat(sigma.mean(0)))
    return np.concatenate(panels, axis=1)


if __name__ == "__main__":
    raise SystemExit(main())
