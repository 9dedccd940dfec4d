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
from sr_lib.models import MODELS, load_model
from sr_lib.models.base import sample_seed
from sr_lib.resize import imresize
from sr_lib.tiling import draw, upscale

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
    raw_weights: bool = field(
        default=False,
        metadata=dict(help="the weights as trained, not their moving average (sr_train --ema)"),
    )
    model: str = field(default="", metadata=dict(help="model of a raw state_dict (no metadata)"))
    scale: int = field(default=0, metadata=dict(help="scale of a raw state_dict (no metadata)"))


def main(argv=None) -> int:
    with exit_on_error(PROG):
        return sample(parse_args(argv))


def parse_args(argv) -> SampleArgs:
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
    return args


def sample(args: SampleArgs) -> int:
    paths = input_paths(Path(args.input))
    from_hr = args.from_hr or args.input == "demo"  # the demo images are HR photographs
    device = pick_device(args.device)
    model, ck = load_model(args.ckpt, device, args.model or None, args.scale or None,
                           args.raw_weights)  # fmt: skip
    controls = resolve_controls(args, model, ck["model"], device)
    n = controls.n if controls else args.n  # a control may fix it (one output per ref/step)
    temperature = model.default_temperature if args.temperature is None else args.temperature
    want_sigma = (args.save_uncertainty or args.grid) and model.has_uncertainty
    if args.save_uncertainty and not model.has_uncertainty:
        print(f"{PROG}: warning: --save-uncertainty: this {type(model).__name__} model has no "
              "uncertainty output; no sigma maps written", file=sys.stderr, flush=True)  # fmt: skip
    out, s = Path(args.out), model.scale
    out.mkdir(parents=True, exist_ok=True)
    tty = sys.stdout.isatty()  # a rich progress bar on a terminal, one line per image otherwise
    failed, t0 = [], time.time()
    with Progress(disable=not tty) as bar:
        task = bar.add_task("sampling", total=len(paths))
        say = bar.console.print if tty else lambda text: print(text, flush=True)
        for k, path in enumerate(paths):
            t_img = time.time()
            name = f"{k:06d}" if args.layout == "ntire" else path.stem
            bar.update(task, description=path.name)
            try:
                img = read_input(path, s, from_hr, out)
            except DataError as e:  # reported, skipped; exit 3 once the others are written
                print(f"{PROG}: error: {e}; skipped", file=sys.stderr, flush=True)
                failed.append(path.name)
                bar.advance(task)
                continue
            lr, tile = to_tensor(img)[None].to(device), args.tile
            while True:  # retried in smaller tiles after a CUDA out-of-memory error
                try:
                    sigma = (
                        uncertainty_map(model, lr, tile, args.tile_overlap) if want_sigma else None
                    )
                    srs = write_samples(model, lr, path.stem, name, n, temperature, tile,
                                        controls, args)  # fmt: skip
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    tile = (tile or max(lr.shape[-2:])) // 2
                    if tile < MIN_TILE:
                        raise MemoryError from None
                    say(f"{name}: CUDA out of memory; retrying with --tile {tile}")
            if sigma is not None and args.save_uncertainty:
                write_sigma(out / f"{name}_sigma", sigma)
            if args.grid:
                write_png(out / f"{name}_grid.png", contact_sheet(img, srs, sigma, s))
            bar.advance(task)
            if not tty:
                h, w = img.shape[:2]
                print(f"[{k + 1}/{len(paths)}] {path.name} {w}x{h} -> {n} x {w * s}x{h * s} "
                      f"in {time.time() - t_img:.1f} s", flush=True)  # fmt: skip
    done = len(paths) - len(failed)
    say(f"done: {done} images, {done * n} samples, {time.time() - t0:.1f} s -> {out}")
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


def read_input(path: Path, s: int, from_hr: bool, out: Path) -> np.ndarray:
    """The uint8 LR image of an input file; --from-hr makes it (and writes OUT/lr/STEM.png)."""
    img = read_image(path)
    if from_hr:
        img = mod_crop(img, default_mod(s))
        if img.size == 0:
            raise DataError(f"{path}: smaller than {default_mod(s)} px, no LR to make")
        img = imresize(img, 1 / s)
        write_png(out / "lr" / f"{path.stem}.png", img)
    return img


def resolve_controls(args: SampleArgs, model, name: str, device):
    """The sampling-control flags as the model's controls; a flag the model does not take is a
    usage error naming the models that do. None: the model draws no explicit latents."""
    asked = {"--ref": ("ref", args.ref), "--latent-from": ("latent_from", args.latent_from),
             "--latent": ("latent", args.latent), "--latent-shift": ("latent", args.latent_shift),
             "--save-latent": ("latent", args.save_latent)}  # fmt: skip
    for flag, (key, value) in asked.items():
        if value and key not in model.sample_controls:
            able = [k for k, c in MODELS.items() if key in c.sample_controls]
            raise UsageError(
                f"{flag}: the {name} model does not support it (only: {', '.join(able)})"
            )
    given = dict(ref=args.ref, latent_from=args.latent_from, latent=args.latent,
                 latent_shift=args.latent_shift)  # fmt: skip
    given = {k: v for k, v in given.items() if v}
    if args.latent_shift:
        given["latent_steps"] = args.latent_steps
    return model.resolve_controls(given, args.n, device)


def write_samples(model, lr, stem, name, n, temperature, tile, controls, args) -> list:
    """Draw and write the n samples of one (1, 3, h, w) LR image (files named after `name`), in
    chunks of --batch; returns the uint8 samples if --grid needs them. Latent models draw the
    latents on the whole LR first and decode every tile with them (--save-latent writes them)."""
    out = Path(args.out)
    single = not model.stochastic and n == 1  # written as NAME.png
    files = [f"{name}.png"] if single else [f"{name}_sample{i:05d}.png" for i in range(n)]
    kept = []
    for c0 in range(0, n if model.stochastic else 1, args.batch):  # a deterministic model: once
        idx = range(c0, min(c0 + args.batch, n))
        seeds = [sample_seed(args.seed, stem, i) for i in idx]
        z = model.sample_latents(lr, seeds, idx, temperature, controls)  # (len(idx), D) or None
        if z is not None and args.save_latent:  # NAME_sample00003.png -> ....latent.npy
            for i, zi in zip(idx, z.cpu().numpy().astype(np.float32)):
                np.save(out / f"{files[i][:-4]}.latent.npy", zi)
        cond = {} if z is None else {"latent": z[None]}  # (1, len(idx), D)
        srs = to_uint8(draw(model, lr, seeds, temperature, tile, args.tile_overlap, args.cem,
                            cond))  # fmt: skip
        for i, sr in zip(idx, srs):
            for j in [i] if model.stochastic else range(n):
                write_png(out / files[j], sr)
                kept += [sr] if args.grid else []
    return kept


def uncertainty_map(model, lr, tile: int, overlap: int) -> np.ndarray:
    """The model's float32 (3, sH, sW) uncertainty of one (1, 3, h, w) LR, tiled like samples."""
    sigma = upscale(model, lr, model.uncertainty, tile, overlap)
    return sigma[0].float().cpu().numpy()


def write_sigma(base: Path, sigma: np.ndarray) -> None:
    """BASE.npy (float32 (3, H, W)) and BASE.png (16-bit gray: the mean over RGB in [0, 1])."""
    np.save(base.with_name(base.name + ".npy"), sigma.astype(np.float32))
    u16 = np.round(np.clip(sigma.mean(0), 0, 1) * 65535).astype(np.uint16)
    write_png(base.with_name(base.name + ".png"), u16)


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
