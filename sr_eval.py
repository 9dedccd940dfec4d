"""Evaluate SR samples with the NTIRE 2021 "Learning the SR Space" metrics (plus PSNR/SSIM).

    python sr_eval.py --hr HR_DIR --sr SR_DIR [--sr SR_DIR2 ...] --scale 4 --n 10 [--ntire]
                      [--lr LR_DIR] [--lpips-weights FILE | --no-lpips] [--out results.json]

Columns: LPIPS_mean, LRPSNR_worst, LRPSNR_mean, score are always the official ones
(sr_lib/metrics.py; in both modes the GT is cropped top-left to a multiple of 8 for them, 24 at
x3). --ntire reports only those four, exactly as the challenge. Otherwise PSNR_mean, PSNR_best,
SSIM_mean (GT cropped to a multiple of --scale and to the SR size, --shave px off each border,
--color rgb|y) and, with --lr, LRPSNR_vs_input_mean follow.

SR file names, per HR image k (0-based in sorted order) with stem S and sample i:
{k:06d}_sample{i:05d}.png (the challenge's) or {S}_sample{i:05d}.png; with --n 1 also {k:06d}.png
or {S}.png. The layout is detected per SR folder. LR files (--lr): {S}.png or {S}x{scale}.png.

--out JSON: {"settings": {...}, "mean": {col: v}, "per_image": [{"image": S, col: v, ...}]} for one
--sr folder; with several: {"settings": {...}, "methods": {name: {"sr_dir", "mean", "per_image"}}}.
+inf (an SR whose downscale equals the GT's exactly; it makes the mean inf too, as the reference)
is written as the string "inf" so that the file is strict JSON; a column that was not computed
(--no-lpips) is null. --csv: one row per method and image.
"""

import csv
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import sr_lib
from sr_lib import metrics
from sr_lib.config import parse, pick_device
from sr_lib.data import IMAGE_EXTENSIONS, demo_files, mod_crop, read_ahead
from sr_lib.errors import CheckpointError, DataError, UsageError, exit_on_error

PROG = "sr_eval.py"
HELP_LR = "folder of LR inputs ({stem}.png or {stem}x{scale}.png): adds LRPSNR_vs_input_mean"
HELP_WEIGHTS = "complete lpips.LPIPS(net='alex') state_dict file (default: ImageNet AlexNet trunk)"
HELP_BATCH = "samples per LPIPS pass (default: 1 on CPU, equal to the lpips module; 4 on CUDA)"
HELP_SIGMA = (
    "folder of {stem}_sigma.npy maps (sr_sample.py --save-uncertainty): adds PLL and PSNR_sigma"
    " (Table 7 of 'Revisiting l1 loss'), with the first sample of the first --sr as mu"
)
HELP_SHAVE = "pixels removed from each border for PSNR/SSIM (default: the scale)"


@dataclass
class EvalArgs:
    hr: str = field(metadata=dict(help="folder of ground-truth HR images (sorted, non-recursive)"))
    sr: list[str] = field(metadata=dict(nargs="+", help="SR sample folder(s); repeat to compare"))
    scale: int = field(metadata=dict(help="upscaling factor: 2, 3, 4 or 8"))
    n: int = field(metadata=dict(help="samples per image (10 in the challenge)"))
    ntire: bool = field(default=False, metadata=dict(help="only the 4 official columns"))
    lr: str | None = field(default=None, metadata=dict(type=str, help=HELP_LR))
    lpips_weights: str | None = field(default=None, metadata=dict(type=str, help=HELP_WEIGHTS))
    no_lpips: bool = field(default=False, metadata=dict(help="skip LPIPS_mean and score"))
    color: Literal["rgb", "y"] = field(default="rgb", metadata=dict(help="PSNR/SSIM channels"))
    shave: int | None = field(default=None, metadata=dict(type=int, help=HELP_SHAVE))
    out: str | None = field(default=None, metadata=dict(type=str, help="write results JSON"))
    csv: str | None = field(default=None, metadata=dict(type=str, help="write per-image CSV"))
    device: str = field(default="auto", metadata=dict(help="auto, cpu or cuda"))
    lpips_batch: int | None = field(default=None, metadata=dict(type=int, help=HELP_BATCH))
    uncertainty: str | None = field(default=None, metadata=dict(type=str, help=HELP_SIGMA))


def images_by_stem(folder: Path) -> dict[str, Path]:
    """stem -> image file (non-recursive; .png wins when two files share a stem)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    out: dict[str, Path] = {}
    for p in sorted(files, key=lambda p: p.suffix.lower() != ".png"):
        out.setdefault(p.stem, p)
    return out


def find_samples(sr_dir: Path, stems: list[str], n: int) -> list[list[Path]]:
    """Per HR image the N sample files, detecting the naming layout (see the module docstring)."""
    if not sr_dir.is_dir():
        raise DataError(f"--sr {sr_dir}: no such folder")
    have = images_by_stem(sr_dir)
    layouts = [lambda k, s, i: f"{k:06d}_sample{i:05d}", lambda k, s, i: f"{s}_sample{i:05d}"]
    if n == 1:
        layouts += [lambda k, s, i: f"{k:06d}", lambda k, s, i: s]
    hits = [sum(f(k, s, 0) in have for k, s in enumerate(stems)) for f in layouts]
    if max(hits) == 0:
        tried = " or ".join(f(0, stems[0], 0) + ".png" for f in layouts)
        raise DataError(
            f"{sr_dir}: no SR sample for the first HR image {stems[0]} (expected {tried})"
        )
    name = layouts[hits.index(max(hits))]  # the first layout wins ties: the challenge's
    paths = []
    for k, s in enumerate(stems):
        for i in range(n):
            if name(k, s, i) not in have:
                missing = sr_dir / f"{name(k, s, i)}.png"
                raise DataError(f"missing SR sample {missing} (image {s}, sample {i} of --n {n})")
        paths.append([have[name(k, s, i)] for i in range(n)])
    return paths


def fmt(v: float | None, col: str) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.4f}" if col.startswith(("LPIPS", "SSIM")) else f"{v:.2f}"


def jsonable(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return None if isinstance(v, float) and math.isnan(v) else v


def main(argv: list[str] | None = None) -> int:
    with exit_on_error(PROG), warnings.catch_warnings():
        warnings.showwarning = lambda msg, *a, **k: warn(str(msg))  # read_image's, one line each
        return run(parse(EvalArgs, argv, PROG))


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)


def run(args: EvalArgs) -> int:
    shave, device, batch = check_flags(args)
    hr = hr_images(args.hr)
    stems = sorted(hr)
    methods: dict[str, list[list[Path]]] = {}  # method name -> per image its n sample files
    for d in args.sr:
        name = Path(d).resolve().name or d
        name = name if name not in methods else f"{name}_{len(methods)}"
        methods[name] = find_samples(Path(d), stems, args.n)
    lr_files = lr_inputs(args.lr, stems, args.scale) if args.lr else None
    sigma_files = sigma_maps(args.uncertainty, stems, args.ntire) if args.uncertainty else None
    lpips_metric = None if args.no_lpips else load_lpips(args.lpips_weights, device, batch)
    columns = list(metrics.OFFICIAL_COLUMNS)
    if not args.ntire:
        columns += list(metrics.EXTRA_COLUMNS) + ([metrics.LR_INPUT_COLUMN] if args.lr else [])

    opts = dict(scale=args.scale, lpips_metric=lpips_metric, ntire=args.ntire, color=args.color)
    opts.update(shave=shave, warn=warn)
    rows = score(hr, stems, methods, lr_files, sigma_files, columns, opts)

    # Aggregate: mean over images of each column (inf propagates, as the reference).
    columns += ["PLL", "PSNR_sigma"] if sigma_files else []  # (the first --sr folder only)
    means = {
        m: {c: metrics.dataset_mean([r.get(c) for r in rs]) for c in columns}
        for m, rs in rows.items()
    }
    print_table(means, columns, args, len(stems))
    if lpips_metric is None:
        print("LPIPS_mean and score not computed (--no-lpips)")
    crop = f"official: GT top-left to a multiple of {metrics.official_mod(args.scale)}, SR to it"
    if not args.ntire:
        crop += f"; PSNR/SSIM: GT to a multiple of {args.scale} and to the SR, {shave} px shave"
    settings = {
        "protocol": "ntire" if args.ntire else "generic",
        "scale": args.scale,
        "n": args.n,
        "crop": crop,
        "color": "rgb" if args.ntire else args.color,
        "shave": 0 if args.ntire else shave,
        "lpips": lpips_metric.info if lpips_metric else None,
        "columns": columns,
        "inf": 'written as the string "inf"',
        "device": str(device),
        "torch": torch.__version__,
        "version": sr_lib.__version__,
        "args": dataclasses.asdict(args),
    }
    clean = {m: [{k: jsonable(v) for k, v in r.items()} for r in rs] for m, rs in rows.items()}
    if args.out:
        write_json(args.out, settings, means, clean, dict(zip(methods, args.sr)))
    if args.csv:
        write_csv(args.csv, clean, columns)
    return 0


def check_flags(args: EvalArgs) -> tuple[int, torch.device, int]:
    """(border shave, device, LPIPS batch); a one-line usage error for a bad combination."""
    if args.scale not in (2, 3, 4, 8):
        raise UsageError(f"--scale {args.scale}: choose 2, 3, 4 or 8")
    if args.n < 1:
        raise UsageError(f"--n {args.n}: the number of samples per image must be at least 1")
    if args.no_lpips and args.lpips_weights:
        raise UsageError("--no-lpips and --lpips-weights exclude each other; give one")
    if args.ntire and (args.lr or args.shave is not None or args.color != "rgb"):
        raise UsageError("--ntire reports only the official columns; drop --lr/--shave/--color")
    if (args.shave is not None and args.shave < 0) or (args.lpips_batch or 1) < 1:
        raise UsageError("--shave must be >= 0 and --lpips-batch >= 1")
    device = pick_device(args.device)
    shave = args.scale if args.shave is None else args.shave
    return shave, device, args.lpips_batch or (4 if device.type == "cuda" else 1)


def hr_images(hr: str) -> dict[str, Path]:
    """stem -> ground-truth file of --hr (a folder, or 'demo': the demo validation photographs,
    as sr_sample.py --input demo)."""
    if hr == "demo":
        return {p.stem: p for p in demo_files("val")}
    hr_dir = Path(hr)
    if not hr_dir.is_dir():
        raise DataError(f"--hr {hr_dir}: no such folder")
    found = images_by_stem(hr_dir)
    if not found:
        raise DataError(f"--hr {hr_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    if len(found) != len([p for p in hr_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]):
        raise DataError(f"--hr {hr_dir}: two images share a file stem; SR names would be ambiguous")
    return found


def lr_inputs(lr: str, stems: list[str], scale: int) -> list[Path]:
    """Per HR image its LR input in --lr: {stem}.png or {stem}x{scale}.png."""
    if not Path(lr).is_dir():
        raise DataError(f"--lr {lr}: no such folder")
    have = images_by_stem(Path(lr))
    files = [have.get(s) or have.get(f"{s}x{scale}") for s in stems]
    for s, f in zip(stems, files):
        if f is None:
            raise DataError(f"--lr {lr}: no LR image {s}.png or {s}x{scale}.png")
    return files


def sigma_maps(folder: str, stems: list[str], ntire: bool) -> list[Path]:
    """Per HR image its {stem}_sigma.npy in --uncertainty (sr_sample.py --save-uncertainty)."""
    if ntire:
        raise UsageError("--ntire reports only the official columns; drop --uncertainty")
    files = [Path(folder) / f"{s}_sigma.npy" for s in stems]
    for f in files:
        if not f.is_file():
            raise DataError(f"--uncertainty: missing {f} (sr_sample.py --save-uncertainty)")
    return files


def load_lpips(weights: str | None, device, batch: int):
    """The official LPIPS model (ImageNet AlexNet trunk + the v0.1 heads of the lpips package)."""
    try:
        return metrics.LpipsMetric.load(weights, device, batch)
    except CheckpointError as e:
        hint = "" if weights else "; or pass --no-lpips to skip LPIPS_mean and score"
        raise CheckpointError(f"LPIPS: {e}{hint}") from None


def score(hr, stems, methods, lr_files, sigma_files, columns, opts) -> dict[str, list[dict]]:
    """Per method the rows of every image (`columns`, plus PLL and PSNR_sigma for the first
    method with --uncertainty); the next image's files are decoded on threads meanwhile."""
    metrics.keep_freed_memory()  # no page faults for the large per-sample arrays
    files = [
        (hr[s], lr_files[k] if lr_files else None, {m: paths[k] for m, paths in methods.items()})
        for k, s in enumerate(stems)
    ]
    images = read_ahead(files)

    tty = sys.stdout.isatty()
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    start = time.perf_counter()
    with Progress(disable=not tty, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(stems))
        for k, stem in enumerate(stems):
            gt, lr, samples = next(images)
            for m, imgs in samples.items():
                names = [str(p) for p in methods[m][k]]
                row = metrics.evaluate_image(
                    gt, imgs, lr=lr, names=names, gt_name=str(hr[stem]), **opts
                )
                rows[m].append({"image": stem, **{c: row[c] for c in columns}})
                if sigma_files and m == next(iter(methods)):
                    sigma = np.load(sigma_files[k])
                    gt_s = mod_crop(gt, opts["scale"])
                    rows[m][-1]["PLL"] = metrics.pll(gt_s, imgs[0], sigma)
                    rows[m][-1]["PSNR_sigma"] = metrics.sigma_psnr(gt_s, imgs[0], sigma)
                if not tty:  # plain log lines for SLURM logs instead of a progress bar
                    vals = " ".join(f"{c} {fmt(row[c], c)}" for c in columns)
                    took = time.perf_counter() - start
                    print(f"[{k + 1}/{len(stems)}] {stem} {m}: {vals} ({took:.1f} s)", flush=True)
            bar.update(task, advance=1, description=stem)
    return rows


def print_table(means: dict, columns: list[str], args: EvalArgs, n_images: int) -> None:
    protocol = " (NTIRE 2021 protocol)" if args.ntire else ""
    table = Table(title=f"x{args.scale}, N={args.n}, {n_images} images{protocol}")
    for c in ["method", *columns]:
        table.add_column(c, justify="left" if c == "method" else "right")
    for m, mean in means.items():
        table.add_row(m, *[fmt(mean[c], c) for c in columns])
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def write_json(path: str, settings: dict, means: dict, rows: dict, sr_dirs: dict) -> None:
    """--out: the layout of the module docstring (no "methods" level for one --sr folder)."""
    per = {
        m: {
            "sr_dir": d,
            "mean": {c: jsonable(v) for c, v in means[m].items()},
            "per_image": rows[m],
        }
        for m, d in sr_dirs.items()
    }
    if len(per) == 1:
        only = next(iter(per.values()))
        result = {"settings": settings, "mean": only["mean"], "per_image": only["per_image"]}
    else:
        result = {"settings": settings, "methods": per}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")


def write_csv(path: str, rows: dict, columns: list[str]) -> None:
    """--csv: one row per method and image."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "image", *columns])
        for m, rs in rows.items():
            for r in rs:
                w.writerow([m, r["image"], *["" if r.get(c) is None else r[c] for c in columns]])


if __name__ == "__main__":
    raise SystemExit(main())
