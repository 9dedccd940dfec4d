"""Evaluate SR samples with the NTIRE 2021 "Learning the SR Space" metrics (plus PSNR/SSIM).

    python sr_eval.py --hr HR_DIR --sr SR_DIR [--sr SR_DIR2 ...] --scale 4 --n 10 [--ntire]
                      [--lr LR_DIR] [--lpips-weights FILE | --no-lpips] [--out results.json]
                      [--report REPORT_DIR]

--sr takes a folder, NAME=DIR (the method's name in every output; default: the folder's name)
and DIR:N or NAME=DIR:N (this folder's samples per image, instead of --n: a deterministic
baseline at N = 1 next to N = 10 methods). A temperature sweep of sr_sample.py (subfolders T0,
T0.5, T1, ...) gives one method per temperature, named NAME@T0.5; each carries its temperature
in the table (a T column, where some row's is known), the JSON, the CSV and the report (a
single folder: the temperature of its manifest.json; none for a deterministic model, which
ignores it, nor where sr_sample.py's --latent, --latent-from or --latent-shift set the
latents, which no temperature drew).

Columns: LPIPS_mean, LRPSNR_worst, LRPSNR_mean, score are always the official ones
(sr_lib/metrics.py; in both modes the GT is cropped top-left to a multiple of 8 for them, 24 at
x3). --ntire reports only those four, exactly as the challenge. Otherwise PSNR_mean, PSNR_best,
SSIM_mean (GT cropped to a multiple of --scale and to the SR size, --shave px off each border,
--color rgb|y), with --lr-blur LRPSNR_blur_worst and LRPSNR_blur_mean and, with --lr,
LRPSNR_vs_input_mean follow. --lr-blur SIGMA or LO:HI (not with --ntire): LR-PSNR with the blur +
bicubic downscale of sr_sample.py --from-hr --lr-blur's LR (sr_lib.data.degrade), each image's
sigma drawn as there by the stem of the input its samples were made from
(sr_lib.data.validation_blur, sampled_stems), in those columns, the official ones bicubic as
ever; --lr-noise and --lr-jpeg are refused (random, no function of the SR); a folder whose
manifest.json records another blur is one warning naming the flag to give.
--pairwise adds LPIPS_pairwise (both modes, last): the mean LPIPS between the N samples of each
image (the lpips package's default, non-spatial call, from the features of their LPIPS passes: no
trunk pass more), with its N x N matrix in --out's per-image rows as LPIPS_pairwise_matrix; rows of
N = 1 leave both empty (one warning); where the features of all N samples would not fit in the free
memory, in blocks of samples (the others' computed again: the same numbers), refused before any
work (exit 4) only where one --lpips-batch of samples' do not fit.

SR file names, per HR image k (0-based in the one image order of the toolkit,
sr_lib.data.image_order: by stem) with stem S and sample i: {k:06d}_sample{i:05d}.png (the
challenge's) or {S}_sample{i:05d}.png; with --n 1 also {k:06d}.png or {S}.png; S may carry DIV2K's
LR suffix x{scale} (0801x4_sample00000.png: sr_sample.py run on DIV2K_valid_LR_bicubic/X4). The
layout is detected per SR folder; an ntire_index.json there (sr_sample.py --layout ntire) must name
the HR image of every index (without one, samples by index of more images than --hr has: a
warning). Images are listed as by every script (sr_lib.data.list_images, not recursive; a link
to a missing file in --hr is refused). LR files (--lr): {S}x{scale}.png, else {S}.png (as
sr_train.py's --lr-data: `lr_inputs`). Sizes are checked: an SR is at most HR-sized (HR rounded
up to a multiple of --scale), an LR is HR/scale (rounded down or up), a sigma map (--uncertainty)
float (3, H, W) of its samples' size, and the crops are large enough for LPIPS and SSIM; for
every image from its files' headers before any is scored (check_headers), and again once
decoded. A folder's manifest.json (sr_sample.py) must record --scale and at least N samples per
image (files beyond its n are of no run it records: sr_sample.py --overwrite deletes
every sample of the images it redoes).

--out JSON: {"settings": {...}, "mean": {col: v}, "per_image": [{"image": S, col: v, ...}]} for one
--sr folder ("settings" has its n, temperature, model and checkpoint_sha256; in every layout
the device, device_name: the GPU model that ran LPIPS, null elsewhere, and threads,
cpu_capability and cpu_kernels (the CPU's features and the oneDNN and MKL environment variables
set: `cpu_kernels`): LPIPS's on the CPU, null elsewhere); with several:
{"settings": {...}, "methods": {name: {"sr_dir", "temperature", "model", "checkpoint_sha256",
"n", "mean", "per_image"}}} (settings' n: the rows' N where they share one, else null). The
model and the sha256 of the checkpoint that made the samples come from the folder's
manifest.json (sr_sample.py; null for another tool's folder).
+inf (an SR whose downscale equals the GT's exactly; it makes the mean inf too, as the reference)
is written as the string "inf" so that the file is strict JSON; a column that was not computed
(--no-lpips) is null. --csv: one row per method and image (method, temperature, n, image, ...).
Files are written atomically, and their folders are checked writable before any work starts;
--out or --csv naming a file the run reads (an image, a manifest, the LPIPS weights) is refused,
and so is one named like an image in a folder of --hr, --sr or --lr (the next run would read it).
--out - or --csv - (not both) writes that JSON or CSV to stdout, and nothing else: the progress
lines and the table go to stderr then (`sr_eval.py ... --out - | jq .mean`). --out and --csv are
locked while a run writes them (a flock on NAME.lock beside each, deleted at the end; the kernel
drops it with its process, so one left by a kill blocks nothing): a second run on one at once is
one line naming the first's pid where it is known (`lock_holder`), exit 2.

--report DIR: DIR/index.html, self-contained (sr_lib/report.py): the table, the NTIRE trade-off
plots and per image a contact sheet (LR, GT, each method's samples and their per-pixel std).
DIR is the report's: --out and --csv may not lie inside it, nor any input in DIR/index.html,
DIR/plots or DIR/images (--hr data/images --report data), refused before any work, and so is
a DIR/images or DIR/plots without DIR/index.html (not a report's), and a DIR/index.html
that is not a page of sr_eval.py (report.is_report_page: the user's own); the half report of a run
killed before its page (its mark DIR/.sr_eval_unfinished there) is deleted when the scoring starts.
DIR is locked while a run writes it (a second run into it at once: one line, exit 2).

A run stopped before its end keeps the scores of the images done in OUT.partial (written whole at
a run's first image, then a line appended per image; a last line cut short by a kill is left out)
beside --out (else --csv; a rerun that adds, drops or renames --out finds them in its outputs'
folders, the newest of the same command that no run is writing now; without either, nothing is
kept; a folder or a loop of
links there refused before any work, a link written through: `check_partial`): the same command
run again continues after them, and its files are those of a run never stopped. They are taken only
where every flag but the outputs', the LPIPS weights' sha256, the device (on CUDA its model, on the
CPU LPIPS's threads, instruction set and its kernels' CPU features and environment variables;
with --no-lpips, which runs nothing there, neither --device nor --lpips-batch) and the versions
are the same (an earlier srspace's: `legacy_keys`), and
for the first images whose files (name in its folder, size, modification time) are unchanged, the
folders' paths no part of the command where the first image's files are the same (data staged to
a node's $TMPDIR: `adopt_key`); another command's
OUT.partial is moved aside to OUT.<its key>.partial (a link's target beside itself, the link
kept; a line says where), where a rerun of that
command finds it, never replaced; the file is deleted once the results are written (one warning
where it cannot be: the results stand). An error after
images were scored says in its line how many images' scores are kept there (the --json line's kept).
An --out or --csv already there (an
earlier run's) is renamed NAME.old (NAME.old2, ... where taken) when the scoring starts, and an
earlier report in --report DIR (its index.html, plots/ and images/) moved into a new folder DIR/old
(old2, ...; DIR alone must be writable; a DIR/index.html that is a link stays one, the earlier
page's bytes moved, its target written), so that a run that ends without its results (a stop, an
error, Ctrl-C, a kill) leaves no earlier numbers under its name and loses no earlier result; its
line says where they went; a run that completes deletes the NAME.old (DIR/old) it made, and the
NAME.old that runs of the same command stopped before it made (kept in OUT.partial, written
before the move: a full disk there leaves NAME where it was; only files unchanged since) and
the DIR/old, old2, ... of stopped runs (their mark .sr_eval_earlier_report in them), so that
a chain of preempted runs ends with what a run never stopped leaves.

Exit codes: 0 ok, 2 bad flag, 3 unusable data (missing, unreadable or wrongly sized images, an
index that names other images), 4 out of memory, 6 LPIPS weights, 7 output, 75 stopped by
SIGTERM, SIGUSR1 (SLURM's preemption and time-limit warning) or SIGHUP, one line saying how many
images were scored and where they are kept (no result is written: rerun the same command to
continue), 130 Ctrl-C (the scores kept as well, and its line says so).
"""

import os

if os.name != "posix":  # before the imports that need POSIX (fcntl, SIGUSR1): one line, exit 2
    from sr_lib import refuse_non_posix

    refuse_non_posix("sr_eval.py")

import csv
import dataclasses
import errno
import fcntl
import hashlib
import io
import itertools
import json
import math
import platform
import re
import shutil
import signal
import socket
import stat
import struct
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if __name__ == "__main__":  # before torch's import (seconds): a stop signal then is not lost
    from sr_lib.errors import record_stop_signals, require_packages

    record_stop_signals()
    # scipy.ndimage (SSIM's filter) now, not at the first SSIM: loading it starts the OpenBLAS
    # that scipy bundles, which, where its buffers do not fit under a `ulimit -v` (the images
    # decoded by then), spun forever, deaf to SIGTERM and Ctrl-C (seen with 60 MB left under
    # the limit); at the start they fit, and what follows fails as a MemoryError (exit 4).
    require_packages("sr_eval.py", {"scipy.ndimage": "scipy"})

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import sr_lib
from sr_lib import metrics, report
from sr_lib.config import asks_json, given_fields, parse, pick_device
from sr_lib.data import (
    EMPTY_DEGRADATION,
    IMAGE_EXTENSIONS,
    OTHER_IMAGE_EXTENSIONS,
    AlphaDropped,
    Degradation,
    ExifCorrupt,
    FloatClipped,
    FloatNotFinite,
    OnlyOtherFormats,
    check_out_dir,
    check_out_file,
    degradation_range,
    demo_files,
    describe_path,
    fit_name,
    image_size,
    link_to_nothing,
    list_images,
    lr_partners,
    lr_taken,
    mod_crop,
    name_max,
    range_text,
    read_ahead,
    refuse_empty,
    same_files,
    shared_stem,
    shell_quote,
    size_ratio,
    validation_blur,
    write_target,
    write_text,
)
from sr_lib.errors import (
    PREEMPT_SIGNALS,
    CheckpointError,
    DataError,
    OutOfMemory,
    OutputError,
    Preempted,
    SRSpaceError,
    Stopped,
    Summary,
    UsageError,
    any_of,
    catch,
    exit_on_error,
    host_out_of_memory,
    is_out_of_memory,
    one_line,
    printable,
    replay_stop_signal,
    say_err,
    shown_once,
    stdout_closed,
    warning_quotes,
)
from sr_lib.models import MODELS
from sr_lib.threads import signals_held, stop_pools, when_not_held
from sr_lib.weights import read_state_dict, resolve

PROG = "sr_eval.py"
# an out-of-memory error outside the loading of LPIPS and the scoring, where the device and
# the batch are not known (`out_of_memory_line` names what helps the run that ran out)
OUT_OF_MEMORY = (
    "out of memory; use a smaller --lpips-batch (the default is 4 on CUDA, 1 on CPU), "
    "--device cpu, or --no-lpips"
)
FIT = "free memory, or run on a machine with more"
OUT_OF_MEMORY_IMAGES = (
    f"out of memory: one image's ground truth and samples, decoded, do not fit; {FIT}"
)
HELP_QUIET = (
    "print warnings, errors and the --json line only: no progress, no table where --out, --csv, "
    "--report or --json holds the results (without them the table is the result: printed)"
)
HELP_SR = (
    "SR sample folder(s): DIR, NAME=DIR, DIR:N or NAME=DIR:N (N samples per image there); a "
    "sweep folder of sr_sample.py (T0/, T0.5/, ...) gives one method per temperature"
)
HELP_LR = "folder of LR inputs ({stem}x{scale}.png, else {stem}.png): adds LRPSNR_vs_input_mean"
HELP_WEIGHTS = "complete lpips.LPIPS(net='alex') state_dict file (default: ImageNet AlexNet trunk)"
HELP_BATCH = (
    "samples per LPIPS pass (default: 1 on CPU, where the numbers equal the lpips package's to "
    "the bit; 4 on CUDA)"
)
HELP_SIGMA = (
    "folder of sigma maps of sr_sample.py --save-uncertainty ({stem}_sigma.npy, or "
    "{k:06d}_sigma.npy of --layout ntire): adds PLL and PSNR_sigma (Table 7 of 'Revisiting l1 "
    "loss'), with the first sample of the first --sr as mu"
)
HELP_LR_BLUR = (
    "the Gaussian blur (sigma in HR pixels, or LO:HI drawn per image by its stem) of "
    "sr_sample.py --from-hr --lr-blur's LR: adds LRPSNR_blur_worst, LRPSNR_blur_mean with that "
    "blur + bicubic downscale, which LRPSNR_vs_input_mean takes too; not with --ntire"
)
# sr_sample.py's degradations that are no function of the SR: an SR's LR cannot be made with
# them to compare (`refuse_random_degradation`)
RANDOM_DEGRADATIONS = ("--lr-noise", "--lr-jpeg")
HELP_SHAVE = "pixels removed from each border for PSNR/SSIM (default: the scale)"
HELP_REPORT = "write a self-contained HTML report (table, trade-off plots, contact sheets) there"
HELP_PAIRWISE = (
    "add LPIPS_pairwise: the mean LPIPS between the N samples of each image (the lpips package's "
    "default, non-spatial), its N x N matrix in --out's per-image rows"
)
STDOUT = "-"  # --out - / --csv -: the JSON or CSV on standard output
SWEEP_FOLDER = re.compile(r"T(\d+(?:\.\d*)?(?:e[-+]?\d+)?)")  # sr_sample.py's f"T{t:g}"


@dataclass
class EvalArgs:
    hr: str = field(
        metadata=dict(help="folder of ground-truth HR images (non-recursive), or 'demo': the demo "
                      "validation photographs (sr_sample.py --input demo)")
    )  # fmt: skip
    sr: list[str] = field(metadata=dict(nargs="+", help=HELP_SR))
    scale: int = field(metadata=dict(help="upscaling factor: 2, 3, 4 or 8"))
    n: int = field(metadata=dict(help="samples per image (10 in the challenge)"))
    ntire: bool = field(default=False, metadata=dict(help="only the 4 official columns"))
    lr: str | None = field(default=None, metadata=dict(type=str, help=HELP_LR))
    lr_blur: str = field(default="", metadata=dict(type=str, metavar="SIGMA", help=HELP_LR_BLUR))
    lpips_weights: str | None = field(default=None, metadata=dict(type=str, help=HELP_WEIGHTS))
    no_lpips: bool = field(default=False, metadata=dict(help="skip LPIPS_mean and score"))
    pairwise: bool = field(default=False, metadata=dict(help=HELP_PAIRWISE))
    color: Literal["rgb", "y"] = field(default="rgb", metadata=dict(help="PSNR/SSIM channels"))
    shave: int | None = field(default=None, metadata=dict(type=int, help=HELP_SHAVE))
    out: str | None = field(
        default=None, metadata=dict(type=str, help="write results JSON here ('-': to stdout)")
    )
    csv: str | None = field(
        default=None, metadata=dict(type=str, help="write per-image CSV here ('-': to stdout)")
    )
    report: str | None = field(default=None, metadata=dict(type=str, help=HELP_REPORT))
    device: str = field(default="auto", metadata=dict(help="auto, cpu, cuda, cuda:1, ..."))
    lpips_batch: int | None = field(default=None, metadata=dict(type=int, help=HELP_BATCH))
    uncertainty: str | None = field(default=None, metadata=dict(type=str, help=HELP_SIGMA))
    quiet: bool = field(default=False, metadata=dict(help=HELP_QUIET))
    json: bool = field(
        default=False,
        metadata=dict(help="a closing line, one JSON object: exit_code, the mean metrics, the "
                      "--out path... (docs/exit-codes.md)"),
    )  # fmt: skip


@dataclass
class Method:
    """One row of the table: a sample folder, its samples per image and its temperature."""

    name: str
    sr_dir: Path
    n: int
    temperature: float | None
    files: list[list[Path]] = field(default_factory=list)  # per HR image its n sample files
    made_by: dict = field(default_factory=dict)  # `manifest_made_by`, read with the settings
    given: tuple[str | None, Path] | None = None  # its --sr value's NAME (or None) and DIR, typed
    # per HR image the stem of the input its samples were made from (`sampled_stems`)
    sampled: list[str] = field(default_factory=list)


def manifest_made_by(folder: Path) -> dict:
    """The model and checkpoint sha256 that sr_sample.py's manifest.json records (None each for
    a folder of another tool): which weights the numbers of its samples are of."""
    manifest = read_manifest(folder)
    got = {k: manifest.get(k) for k in ("model", "checkpoint_sha256")}
    return {k: v if isinstance(v, str) else None for k, v in got.items()}


def images_by_stem(folder: Path, read_from: bool = True) -> dict[str, Path]:
    """stem -> image file of a folder as every script lists it (sr_lib.data.list_images, not
    recursive); .png wins when two files share a stem. A folder without images gives {}, but
    one of images in formats not read only an error saying so where they are to be read
    (`read_from`; not where a sweep folder is told by its images)."""
    try:
        files = list_images(folder, recursive=False)
    except DataError as e:
        if not folder.is_dir() or (read_from and isinstance(e, OnlyOtherFormats)):
            raise
        files = []  # no images: the caller says which ones it expected
    out: dict[str, Path] = {}
    for p in sorted(files, key=lambda p: p.suffix.lower() != ".png"):
        out.setdefault(p.stem, p)
    return out


def parse_sr(spec: str, n: int) -> tuple[str | None, Path, int]:
    """(name or None, folder, samples per image) of one --sr value: DIR, NAME=DIR, DIR:N or
    NAME=DIR:N. A value that exists as a path is always a path, and so is the DIR of DIR:N that
    exists (folders may hold '=' or ':': runs/lr=1e-4:1, as the lines suggesting :N write it)."""
    if Path(spec).exists():
        return None, Path(spec), n
    with_n = re.compile(r"(.+):([-+]?\d+)").fullmatch
    name, sep, rest = spec.partition("=")
    if not sep or ((whole := with_n(spec)) and Path(whole.group(1)).exists()):
        name, rest = None, spec
    elif not name.strip() or not rest:
        raise UsageError(f"--sr {spec}: give NAME=DIR with a name and a folder")
    counted = with_n(rest)
    if counted and not Path(rest).exists():
        rest, n = counted.group(1), int(counted.group(2))
        if n < 1:
            raise UsageError(f"--sr {spec}: N = {n}; the samples per image must be at least 1")
    return name, Path(rest), n


def read_manifest(folder: Path) -> dict:
    """sr_sample.py's manifest.json in FOLDER ({} without a readable one: other tools' folders)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# sr_sample.py's flags that set the latents themselves: its temperature draws none of them
LATENT_FLAGS = ("latent", "latent_from", "latent_shift")


def manifest_temperature(folder: Path) -> float | None:
    """The temperature recorded in an sr_sample.py manifest.json (None without one, for a
    deterministic model, which ignores it, and for a folder whose latents --latent, --latent-from
    or --latent-shift set: the manifest records the --temperature given or the default, which
    made none of them)."""
    manifest = read_manifest(folder)
    name = manifest.get("model")
    if isinstance(name, str) and name in MODELS and not MODELS[name].stochastic:
        return None
    flags = manifest.get("flags")
    if isinstance(flags, dict) and any(flags.get(f) for f in LATENT_FLAGS):
        return None
    return number(manifest.get("temperature"))


def sweep_folders(folder: Path) -> list[tuple[float, Path]]:
    """(temperature, subfolder) of a temperature sweep (sr_sample.py's T0, T0.5, ...), by T."""
    found = []
    for p in folder.iterdir():
        m = SWEEP_FOLDER.fullmatch(p.name)
        if m and p.is_dir():
            found.append((float(m.group(1)), p))
    return sorted(found)


def expand_methods(specs: list[str], n: int) -> list[Method]:
    """The table's rows: one per --sr folder, one per temperature of a sweep folder. A row named
    by NAME=DIR keeps its name wherever its --sr comes; one named after its folder that another
    row has gets _1, _2, ... (the order of the --sr flags changes no name a user gave)."""
    rows: list[tuple[str, Path, int, float | None, tuple]] = []  # (name, folder, N, T, given)
    explicit: set[str] = set()
    for spec in specs:
        name, folder, count = parse_sr(spec, n)
        if what := describe_path(folder):
            raise DataError(f"--sr {folder}: {what}")
        # named as typed: `--sr latest`, a link to a run's folder, is 'latest' (not resolved)
        base = name or Path(os.path.abspath(folder)).name or str(folder)
        if name and name in explicit:
            raise UsageError(f"--sr: two folders are named {name!r}; give each its own NAME=DIR")
        explicit |= {name} if name else set()
        sweep = sweep_folders(folder)
        found = [(f"{base}@T{t:g}", sub, t) for t, sub in sweep]
        if not sweep or images_by_stem(folder, read_from=False):
            found.insert(0, (base, folder, manifest_temperature(folder)))
        rows += [(row_name, row_dir, count, t, (name, folder)) for row_name, row_dir, t in found]
    taken: set[str] = set()
    for row_name, *_, (named, _) in rows:
        if named and row_name in taken:
            raise UsageError(f"--sr: the method name {row_name!r} is given twice")
        taken |= {row_name} if named else set()
    methods: list[Method] = []
    for row_name, row_dir, count, t, given in rows:
        if not given[0] and row_name in taken:
            row_name = next(f"{row_name}_{i}" for i in itertools.count(1)
                            if f"{row_name}_{i}" not in taken)  # fmt: skip
        taken.add(row_name)
        methods.append(Method(row_name, row_dir, count, t, made_by=manifest_made_by(row_dir),
                              given=given))  # fmt: skip
    return methods


def sr_value(given: tuple[str | None, Path], n: int) -> str:
    """The `--sr DIR:N` (NAME=DIR:N where the user gave a NAME, which keeps the method's name)
    an error line suggests for the --sr value `given` (NAME or None, and DIR, as typed: a sweep
    folder's, not a temperature's subfolder, so that it replaces the value typed), quoted for a
    shell where it needs it (a folder named with spaces), so the line can be pasted as it
    stands."""
    name, folder = given
    return f"--sr {shell_quote(f'{name}={folder}:{n}' if name else f'{folder}:{n}')}"


def find_samples(sr_dir: Path, stems: list[str], n: int, scale: int,
                 given: tuple[str | None, Path] | None = None) -> list[list[Path]]:  # fmt: skip
    """Per HR image the N sample files, detecting the naming layout (see the module docstring);
    an ntire_index.json in the folder is checked against the HR order. `given`: the --sr value
    the folder came from (`Method.given`; default: the folder itself), for the hints of the
    lines."""
    given = given or (None, sr_dir)
    have = images_by_stem(sr_dir)
    # NAME: the index k (--layout ntire), the stem S, or S with DIV2K's LR suffix x{scale}, as
    # sr_sample.py names the samples of DIV2K_valid_LR_bicubic/X4/0801x4.png (0801x4_sample00000)
    prefixes = [lambda k, s: f"{k:06d}", lambda k, s: s, lambda k, s: f"{s}x{scale}"]
    layouts = [lambda k, s, i, f=f: f"{f(k, s)}_sample{i:05d}" for f in prefixes]
    single = [lambda k, s, i, f=f: f(k, s) for f in prefixes]  # one output per image
    layouts += single if n == 1 else []

    def found(names):
        return best_layout([lambda k, s, f=f: f(k, s, 0) in have for f in names], stems)

    best = found(layouts)
    manifest = read_manifest(sr_dir)
    if best is None and number(manifest.get("n")) == 1 and found(single) is not None:
        one = single[found(single)](0, stems[0], 0)  # sr_sample.py's folder of NAME.png, N > 1
        raise DataError(
            f"{sr_dir}: one output per image ({one}.png: sr_sample.py with a deterministic model "
            f"and --n 1), not {n} samples; add :1 to its --sr value ({sr_value(given, 1)}), or "
            "give --n 1"
        )
    if best is None:
        tried = " or ".join(shell_quote(f(0, stems[0], 0) + ".png") for f in layouts)
        raise DataError(
            f"{sr_dir}: no SR sample for the first HR image {stems[0]} (expected {tried})"
        )
    if best in (0, len(prefixes)):  # (the index layouts)
        check_index(sr_dir, stems, scale)
        beyond = layouts[best](len(stems), "", 0)
        if beyond in have and not (sr_dir / "ntire_index.json").is_file():
            warn(f"{sr_dir}: holds samples of more images than --hr has ({len(stems)}), e.g. "
                 f"{have[beyond].name}; they are paired by index with the --hr images in their "
                 "order: is --hr the first images of the set they were made from?")  # fmt: skip
    made = number(manifest.get("scale"))
    if made is not None and made != scale:  # without --lr, nothing else would notice
        raise DataError(
            f"{sr_dir / 'manifest.json'}: these samples are x{made:g}, not --scale {scale}"
        )
    made = number(manifest.get("n"))
    if made is not None and n > made:  # more are of no run it records (copied in, by hand)
        raise DataError(
            f"{sr_dir / 'manifest.json'}: the sr_sample.py runs that made this folder wrote "
            f"at most {made:g} samples per image, not {n} (--n or --sr DIR:N; any files beyond "
            f"them are of no run it records): ask for {made:g} or fewer"
        )
    name = layouts[best]
    paths = []
    for k, s in enumerate(stems):
        for i in range(n):
            if name(k, s, i) not in have:
                missing = sr_dir / f"{name(k, s, i)}.png"
                if i and not any(name(j, t, i) in have for j, t in enumerate(stems)):
                    # no image has sample i: a folder of fewer samples, not one with a gap
                    raise DataError(
                        f"{sr_dir}: {i} sample(s) per image, not N = {n} (no {missing.name}); "
                        f"give --n {i} or {sr_value(given, i)}"
                    )
                raise DataError(f"missing SR sample {missing} (image {s}, sample {i} of N = {n})")
        paths.append([have[name(k, s, i)] for i in range(n)])
    return paths


def sampled_stems(m: Method, stems: list[str], scale: int) -> list[str]:
    """Per HR image the stem of the input that sr_sample.py made its samples (`m.files`, named by
    `find_samples`) from, which seeded its --from-hr LR's draws (--lr-blur: `validation_blur`):
    the HR's stem, with DIV2K's LR suffix x{scale} where the samples are named so, or the one
    ntire_index.json gives (checked by `check_index`) where they are named by their index."""
    try:
        index = json.loads((m.sr_dir / "ntire_index.json").read_text())
    except (OSError, ValueError):
        index = None
    index = index if isinstance(index, dict) else {}
    sampled = []
    for k, (stem, files) in enumerate(zip(stems, m.files)):
        made = files[0].stem.removesuffix("_sample00000")  # (its name's prefix: sample 0's)
        if made == f"{k:06d}" and isinstance(index.get(made), str):
            sampled.append(index[made])
        else:
            sampled.append(f"{stem}x{scale}" if made == f"{stem}x{scale}" else stem)
    return sampled


def best_layout(found, stems: list[str]) -> int | None:
    """Which naming layout of a folder: the index of the `found(k, stem)` test that finds the
    files of the most HR images (the first wins ties: the challenge's); None where none finds
    any."""
    hits = [sum(bool(f(k, s)) for k, s in enumerate(stems)) for f in found]
    return hits.index(max(hits)) if max(hits) else None


def check_index(sr_dir: Path, stems: list[str], scale: int) -> None:
    """sr_sample.py --layout ntire's ntire_index.json ({"scale": s, "000000": stem, ...}): every
    index k must be the k-th HR image (an LR input may carry the DIV2K suffix x{scale})."""
    path = sr_dir / "ntire_index.json"
    if not path.is_file():
        return
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        raise DataError(f'{path}: not a readable index ({{"000000": stem, ...}}); remove it')
    if index.get("scale", scale) != scale:
        raise DataError(f"{path}: these samples are x{index['scale']}, not --scale {scale}")
    for k, stem in enumerate(stems):
        made_from = index.get(f"{k:06d}")
        if made_from not in (stem, f"{stem}x{scale}"):
            raise DataError(
                f"{path}: index {k:06d} was sampled from {made_from!r}, but the HR image at "
                f"index {k:06d} is {stem!r}; give the --hr folder the samples were made from"
            )
    count = sum(1 for key in index if key.isdigit())
    if count != len(stems):
        raise DataError(
            f"{path}: lists {count} inputs, --hr has {len(stems)} images; give the --hr folder "
            "the samples were made from"
        )


def jsonable(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return None if isinstance(v, float) and math.isnan(v) else v


def main(argv: list[str] | None = None) -> int:
    with Summary(PROG) as summary:  # --json: its line after the error line, or the return
        with exit_on_error(PROG, OUT_OF_MEMORY), warnings.catch_warnings():
            warnings.showwarning = shown_once(one_line_warnings())  # read_image's
            argv = list(sys.argv[1:] if argv is None else argv)
            try:
                refuse_random_degradation(argv)
                args = parse(EvalArgs, argv, PROG)
            except UsageError:  # the --json line after the error line, if asked for
                summary.json = asks_json(EvalArgs, argv, PROG)
                raise
            summary.json = args.json and STDOUT not in (args.out, args.csv)  # (refused)
            try:  # (a signal that came while torch was imported is raised here, --json known)
                with ExitStack() as held:  # (the outputs' locks, until OUT.partial is deleted)
                    with stop_signals():
                        code = run(args, given_fields(EvalArgs, argv, PROG), summary, held)
                    if summary.fields["partial"]:  # (here, where a stop signal stops no more)
                        delete_partial(Path(summary.fields["partial"]))
                        summary.update(partial=None, kept=0)
            except KeyboardInterrupt:  # Ctrl-C: its line says so too, once an image is scored
                summary.update(stopped="SIGINT")  # (--json: as sr_train.py's, exit 130)
                if not summary.fields.get("scored"):
                    raise
                raise KeyboardInterrupt(how_far(summary.fields)) from None
            except Preempted as e:
                if isinstance(e.__context__, SRSpaceError):  # it came while that error unwound
                    raise e.__context__ from None
                summary.update(stopped=e.args[0])  # (--json: the signal, as sr_train.py's)
                also = "".join(f"; {a}" for a in e.args[1:])  # (`said_unfinished`)
                raise Stopped(stopped_line(e.args[0], summary.fields) + also) from None
        return summary.end(code)


def refuse_random_degradation(argv: list[str]) -> None:
    """sr_sample.py's --lr-noise and --lr-jpeg (without this line argparse's own, naming no
    reason): one line, exit 2. They are random draws on the LR, no function of the SR, so no
    SR's LR can be made with them to compare; the blur can (--lr-blur), and --lr compares with
    the LR as made, its noise included (docs/metrics.md "LR-PSNR of a degraded LR")."""
    for a in argv:
        if a == "--":  # (the rest are values)
            return
        if (flag := a.split("=", 1)[0]) in RANDOM_DEGRADATIONS:
            raise UsageError(
                f"{flag}: noise and JPEG are random draws on the LR, not made from the SR, so "
                "LR-PSNR cannot apply them; give --lr-blur alone (--lr compares with the LR "
                "as made, its noise and JPEG included)"
            )


def delete_partial(partial: Path) -> None:
    """OUT.partial deleted once the results are written: a link's target, where the scores went
    (the link stays, as --out's). Where that fails, the run's results stand (exit 0) and one
    warning line says what is left: a link whose target's folder went away while the run worked
    (`write_target`'s error) was that error's line after a finished run, exit 7, its --json line
    saying the scores were kept there; a file that cannot be deleted (a file system gone
    read-only) a traceback."""
    try:
        write_target(partial).unlink(missing_ok=True)
    except (OutputError, OSError) as e:
        why = (str(e).removeprefix(f"{partial}: ") if isinstance(e, OutputError)
               else f"{e.strerror or e}; delete it")  # fmt: skip
        warn(f"the results are written; {partial}, where the scores were kept while the run "
             f"worked, is left: {why}")  # fmt: skip


@contextmanager
def stop_signals():
    """Within, SIGTERM and SIGUSR1 (SLURM's preemption and time-limit warning) and SIGHUP (a
    closed terminal) raise Preempted, at once or, where a file is written or a thread pool's lock
    code runs, at its end (sr_lib/threads.py); one that came while the script imported torch is
    raised at the start. The files are written atomically, the report's removed where it is
    unfinished and an earlier --out, --csv or report set aside (`set_aside`), so a stop leaves no
    result that looks complete, nor an earlier one under this run's name."""

    def stop(signum, frame):
        raise Preempted(signal.Signals(signum).name)

    old = {s: catch(s, when_not_held(stop)) for s in PREEMPT_SIGNALS}  # (nohup's SIGHUP: kept)
    try:
        replay_stop_signal()
        yield
    except Preempted:
        stop_pools()  # the read-ahead threads of a `finally` the signal skipped
        raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def stopped_line(name: str, fields: dict) -> str:
    """The error line of a stop by signal `name`: how far the run got and what to do (`how_far`)."""
    return f"stopped by {name} {how_far(fields)}"


def how_far(fields: dict) -> str:
    """How far a stopped run got (`fields`: the --json line's), what is kept (`kept` of the
    `scored` images, in `partial`) and what to do: the end of a stop's or Ctrl-C's line."""
    images, scored, partial = fields.get("images"), fields.get("scored"), fields.get("partial")
    if not scored:
        return "before any image was scored; rerun the same command"
    if partial:
        kept = fields.get("kept")
        which = "their scores" if kept == scored else f"the scores of the first {kept}"
        return (f"after scoring {scored} of {images} images, {which} kept in {partial}: rerun "
                "the same command to continue")  # fmt: skip
    return (f"after scoring {scored} of {images} images, none kept (only --out or --csv keeps "
            "them): rerun the same command")  # fmt: skip


@dataclass
class ImageNeeds:
    """What the host holds while one image is scored, besides LPIPS (`image_needs`), in bytes."""

    stem: str
    size: tuple[int, int]  # (H, W) of its ground truth
    decoded: int  # its ground truth and the samples of every --sr folder, decoded (uint8 RGB)
    folder: int  # the decoded samples of the --sr folder with the most
    scoring: int  # PSNR's and SSIM's float64 maps (0 with --ntire)
    ahead: bool  # the next image's files are decoded meanwhile (as much again, about)
    pairwise: int = 0  # --pairwise: the features kept for the pairs, on the LPIPS device
    blur: int = 0  # --lr-blur: its blurred downscales, beside PSNR's and SSIM's maps


def image_needs(stem: str, gt_file: Path, samples: list[int], ntire: bool, color: str, ahead,
                pairwise_scale: int | None = None, batch: int = 1,
                pairwise_memory: int | None = None, blur_scale: int | None = None):  # fmt: skip
    """The ImageNeeds of image `stem` with `samples` samples in each --sr folder (`ahead`: not
    the last image), from its ground truth's header (None where it cannot tell): uint8 RGB, 3
    bytes a pixel for each file; and without --ntire 24 bytes a value of the compared region (at
    most the ground truth's: three float64 maps, sr_lib/metrics.py `SsimReference`), 3 values a
    pixel, 1 with --color y. `pairwise_scale`: --pairwise's --scale (`metrics.pairwise_bytes`
    of the folder with the most samples, in LPIPS batches of `batch`, as many at once as fit
    in `pairwise_memory`: `metrics.pairwise_block`). `blur_scale`: --lr-blur's --scale (None:
    no --lr-blur): one blurred downscale at a time (`degrade_bytes`), after PSNR and SSIM with
    their maps still held (`metrics.blurred_lr_psnr`), and the uint8 LRs of the ground truth
    and of the samples of the folder with the most."""
    size = image_size(gt_file)
    if size is None:
        return None
    px = size[0] * size[1]
    scoring = 0 if ntire else 24 * px * (1 if color == "y" else 3)
    decoded, folder = 3 * px * (1 + sum(samples)), 3 * px * max(samples)
    pairs = 0
    if pairwise_scale:
        most = max(samples)
        block = metrics.pairwise_block(size, most, pairwise_scale, batch, pairwise_memory)
        pairs = metrics.pairwise_bytes(size, most, pairwise_scale, block)
    blur = 0
    if blur_scale:
        lrs = 3 * (size[0] // blur_scale) * (size[1] // blur_scale) * (1 + max(samples))
        blur = degrade_bytes(size, blur_scale) + lrs
    return ImageNeeds(stem, size, decoded, folder, scoring, ahead, pairs, blur)


# HR rows of `sr_lib.data.blur_downscale` held at once in float64 beside its rows' pass, as
# measured (`degrade_bytes`): tracemalloc's peak of one `degrade`, less the rows' pass, is
# 14.1-14.5 kB an HR column at 512 to 4096 pixels wide, x2, x4 and x8 (but 4096^2 x2: the
# result's array is larger than the band then)
DEGRADE_BAND_ROWS = 600


def degrade_bytes(size: tuple[int, int], scale: int) -> int:
    """Host bytes that one blurred downscale (--lr-blur's `degrade`) of an image of `size` (H, W)
    takes at its peak: its rows' pass, float64 RGB (H/s, W), beside a band of HR rows
    (DEGRADE_BAND_ROWS at most) in the rows' pass, then beside its result (H/s, W/s) and about
    half such a band in the columns' pass: the larger. tracemalloc's peak against this, sigma
    2: 2040x1352 x4 46 / 46 MB (docs/benchmarks.md: the process grew 56 MB), x2 63 / 64 MB;
    4096^2 x4 159 / 160 MB (174 MB), x2 333 / 332 MB, x8 109 / 109 MB; 512^2 x4 8.6 / 7.9 MB."""
    h, w = size
    rows, band = 24 * (h // scale) * w, 24 * w * min(h, DEGRADE_BAND_ROWS)
    return rows + max(band, 24 * (h // scale) * (w // scale) + band // 2)


def out_of_memory_line(e: BaseException, device, batch: int, lpips: bool, methods: int,
                       image: ImageNeeds | None = None) -> str:  # fmt: skip
    """The line of out-of-memory error `e` of a run on `device` with LPIPS (`lpips`) in batches
    of `batch` samples and `methods` rows, while scoring `image` (None: no image, or its size
    unknown): it names only what lowers the memory that ran out, with this run's values. A
    CUDA device holds LPIPS alone (a batch of samples' feature maps): a smaller --lpips-batch
    where it is over 1, --device cpu, --no-lpips. The host's memory (a MemoryError, torch's
    "can't allocate memory", or any on the CPU) holds the image's files decoded, every --sr
    folder's samples together and as much for the next image (decoded meanwhile): fewer --sr
    folders, each worth its samples; then LPIPS where it runs on the CPU (LPIPS_BYTES): the
    batch (1 by default) and --no-lpips; then PSNR's and SSIM's maps, and beside them
    --lr-blur's downscales: no --lr-blur, --ntire (which refuses --lr-blur), where they take
    more than LPIPS (one after the other: the larger is the peak). The line says what the image
    takes, and each remedy what it saves."""
    host = host_out_of_memory(e, device)
    lpips_host = lpips and device.type == "cpu"
    px = image.size[0] * image.size[1] if host and image else 0
    most = image.folder // (3 * px) if px else batch  # (samples in the largest --sr folder)
    lp = (LPIPS_BYTES[0] + LPIPS_BYTES[1] * min(batch, most)) * px if lpips_host else 0
    scoring = image.scoring if px else 0
    blur = image.blur if px else 0  # (beside PSNR's and SSIM's maps: the later step's peak)
    later = scoring + blur
    # --pairwise's features, held on the LPIPS device while the samples' LPIPS computes
    pairs = image.pairwise if image and host == (device.type == "cpu") else 0
    helps = []
    if lpips and (lpips_host or not host):
        each = f"; ~{gb(LPIPS_BYTES[1] * px)[1:]} a sample" if px else ""
        helps += [f"a smaller --lpips-batch (this run's: {batch}{each})"] if batch > 1 else []
        helps += [] if host else ["--device cpu"]
        helps.append("--no-lpips" + (f" ({gb(lp - later)} less)" if lp > later else ""))
    if later > lp:
        helps += [f"no --lr-blur ({gb(min(blur, later - lp))} less)"] if blur else []
        without = " and no --lr-blur" if blur else ""  # (--ntire refuses it)
        helps.append(f"--ntire{without} (no PSNR/SSIM columns: {gb(later - lp)} less)")
    if pairs:
        helps.append(f"no --pairwise ({gb(pairs)} less)")
    if host and methods > 1:
        each = f" ({gb((1 + image.ahead) * image.folder)} less each)" if px else ""
        helps.append(f"fewer --sr folders per run{each}")
    said = ""
    if px:
        h, w = image.size
        said = (f" scoring {image.stem} ({w}x{h}: its files decoded take {gb(image.decoded)}"
                + (", as much again for the next image's" if image.ahead else "")
                + (f", LPIPS {gb(lp)}" if lp else "")
                + (f", --pairwise's features {gb(pairs)}" if pairs else "")
                + (f", {'then ' if lp else ''}PSNR and SSIM {gb(scoring)}" if scoring else "")
                + (f" and --lr-blur's downscale {gb(blur)}" if blur else "")
                + ")")  # fmt: skip
    if not helps:
        return OUT_OF_MEMORY_IMAGES if not said else f"out of memory{said}; {FIT}"
    return f"out of memory{said}; use {any_of(helps)}"


# Host bytes a pixel of LPIPS on a CPU: the ground truth's features and a pass's own, and each
# sample of a batch more (evaluate_image at 2048x2048 with --ntire, one thread: 179 bytes a
# pixel at --lpips-batch 1, 369 at 4; it frees the features before PSNR and SSIM)
LPIPS_BYTES = (120, 65)


def gb(n: int) -> str:
    """Bytes as "~1.2 GB", "~35 MB" or "~9.2 kB" (an estimate: two significant digits)."""
    value, unit = next((n / u, name) for u, name in BYTE_UNITS if n >= u or u == 1e3)
    return f"~{float(f'{value:.2g}'):g} {unit}"


BYTE_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


@contextmanager
def out_of_memory_said(line):
    """An out-of-memory error inside raised as OutOfMemory(line(error)): one line, exit 4."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:  # (torch's are RuntimeErrors)
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(line(e)) from None


@contextmanager
def said_unfinished(fields: dict, moved: dict[Path, Path], out_of_memory):
    """Around the work: an error inside (a full disk, a bad image, out of memory: its line
    `out_of_memory(error)`) says in its line how many images' scores are kept where (`fields`:
    the --json line's), as a stop's line does; and any end inside (a stop, an error, Ctrl-C)
    says where the earlier --out, --csv or report went (`moved`: by `set_aside`, less those this
    run's file replaced)."""
    try:
        with out_of_memory_said(out_of_memory):
            yield  # (an out-of-memory error's line then says what is kept, as others)
    except BaseException as e:
        went = "; ".join(f"{p} (an earlier run's) moved to {aside}" for p, aside in moved.items())
        kept, images, partial = fields["kept"], fields["images"], fields["partial"]
        if isinstance(e, SRSpaceError):
            said = [str(e)]
            if partial:
                said.append(f"the scores of {kept} of {images} images are kept in {partial}: "
                            "fix that and rerun the same command to continue")  # fmt: skip
            e.args = ("; ".join(said + ([went] if went else [])),)
        elif isinstance(e, Preempted) and went:
            e.args = (*e.args, went)  # (main's stop line)
        elif went:  # Ctrl-C, a bug: before its line or traceback
            warn(went)
        raise


OLD = ".old"  # an earlier --out or --csv set aside while this run works (`set_aside`)
REPORT_OLD = "old"  # the folder in --report DIR that an earlier report waits in (`set_aside`)
# in each such folder: what tells it from a folder of the user's named so (`delete_earlier_reports`)
REPORT_OLD_MARK = ".sr_eval_earlier_report"


def set_aside(planned: dict[Path, Path], moved: dict[Path, Path], report_dir: Path | None = None):
    """Each of the earlier --out and --csv files `planned` (`aside_names`) renamed to its name
    there, NAME.old, or NAME.old2, ... where that is taken (nothing is replaced), into `moved`
    {path: new name}, at the start of the work: a run that ends without writing its own (a stop,
    an error, Ctrl-C, a kill) leaves no earlier numbers under its name for a pipeline that reads
    the file, not the exit code. This run's file, once written, replaces it (`run` deletes
    NAME.old), as before.
    Where NAME is a symbolic link, its target is what is moved (TARGET.old), and written to.
    An earlier report in `report_dir` (its index.html) is moved so too, into a new folder DIR/old
    (old2, ... where taken; REPORT_OLD_MARK in it, for `delete_earlier_reports`): its
    index.html, plots/ and images/ only (DIR may hold other files), inside DIR, which needs only
    DIR writable (its parent may be read-only, DIR a mount point). Where DIR/index.html is a
    symbolic link (to a page served from elsewhere), the link stays, as every output written
    through a link (`write_target`): the earlier page's bytes go to DIR/old/index.html and its
    target is removed (the new page is written through the link).
    `moved` then has {DIR/index.html: DIR/old/index.html}, the page to open."""
    for path, aside in planned.items():
        try:
            write_target(path).rename(aside)  # a link's target: the link stays, for the new
        except OSError as e:
            raise OutputError(f"{path}: cannot move this earlier file aside to {aside} "
                              f"({e.strerror or e}); move or delete it") from None  # fmt: skip
        moved[path] = aside
    if report_dir is None or not (report_dir / "index.html").exists():
        return
    names = (f"{REPORT_OLD}{i}" if i > 1 else REPORT_OLD for i in itertools.count(1))
    aside, done = next(report_dir / n for n in names if not exists(report_dir / n)), []
    page = report_dir / "index.html"
    linked = write_target(page) if page.is_symlink() else None  # (its target: a page)
    try:
        aside.mkdir()
        (aside / REPORT_OLD_MARK).write_text("an earlier report, set aside by sr_eval.py\n")
        for part in report.PARTS:  # index.html first: no page is left to show half its files
            if linked and part == "index.html":
                # the link stays, the new page goes through it; the earlier page waits beside
                # its images and plots, not under the link without them (a copy: the target
                # may be on another file system)
                shutil.copyfile(linked, aside / part)
                done.append(part)
                linked.unlink()
            elif exists(report_dir / part):
                (report_dir / part).rename(aside / part)
                done.append(part)
    except OSError as e:
        for part in reversed(done):  # put back: the earlier report stays whole, where it was
            with suppress(OSError):
                if linked and part == "index.html":
                    if not linked.exists():
                        shutil.copyfile(aside / part, linked)
                    (aside / part).unlink()
                else:
                    (aside / part).rename(report_dir / part)
        with suppress(OSError):
            (aside / REPORT_OLD_MARK).unlink(missing_ok=True)
            aside.rmdir()
        raise OutputError(f"--report {report_dir}: cannot move the earlier report aside to "
                          f"{aside} ({e.strerror or e}); move or delete it") from None  # fmt: skip
    moved[report_dir / "index.html"] = aside / "index.html"


def exists(path: Path) -> bool:
    """A name taken: a file, a folder, or a link (broken or not)."""
    return path.exists() or path.is_symlink()


def aside_names(paths: list[Path]) -> dict[Path, Path]:
    """{path: where `set_aside` moves it} of each of `paths` that exists (an earlier run's --out
    or --csv; a link's target, beside it), known before the move: OUT.partial records them first
    (`aside_record`)."""
    reals = {path: write_target(path) for path in paths}
    return {path: aside_name(real) for path, real in reals.items() if exists(real)}


def aside_name(path: Path) -> Path:
    """The first free name of NAME.old, NAME.old2, ... beside `path` (`set_aside`)."""
    names = names_beside(path.parent, path.name, lambda i: OLD if i == 1 else f"{OLD}{i}")
    return next(aside for aside in names if not exists(aside))


def names_beside(folder: Path, base: str, suffix) -> Iterator[Path]:
    """folder/base + suffix(i) for i = 1, 2, ...: the names a file is moved aside to, base cut
    where the name would pass the file system's limit (`fit_name`)."""
    for i in itertools.count(1):
        end = suffix(i)
        yield folder / (fit_name(base, len(end), name_max(folder)) + end)


def one_line_warnings():
    """A warnings.showwarning: one line each, and a dropped alpha channel, float pixels clipped,
    NaN or infinite ones and corrupt EXIF each once per folder (an RGBA sample folder of 100
    images at N = 10 gave 1,000 lines; so did a method's float TIFFs with NaN, or JPEGs with
    corrupt EXIF)."""
    folders = set()
    also = {AlphaDropped: "so is that of any other file in"}
    also |= dict.fromkeys(
        (FloatClipped, FloatNotFinite, ExifCorrupt), "said once per folder: so may be others in"
    )

    def show(message, category, filename, *args, **kwargs):
        quoted = warning_quotes(message, filename)  # (a library's lines, joined)
        if type(message) in also:
            folder = message.path.parent
            if (type(message), folder) in folders:
                return
            folders.add((type(message), folder))
            message = f"{message}; {also[type(message)]} {folder}"
        say_err(f"{PROG}: warning: {message}", quoted)

    return show


def warn(msg: str) -> None:
    say_err(f"{PROG}: warning: {msg}")  # (dropped where stderr is a closed pipe too)


def manifest_blur(folder: Path) -> str | None:
    """The --lr-blur of the LR that sr_sample.py --from-hr made for the samples in `folder`, as
    its manifest.json records it ("" for none); None where it does not tell (no manifest, not
    --from-hr, another tool's folder, a value not understood)."""
    manifest = read_manifest(folder)
    flags = manifest.get("flags")
    if manifest.get("from_hr") is not True or not isinstance(flags, dict):
        return None
    try:
        return range_text(degradation_range(str(flags.get("lr_blur") or ""), "--lr-blur"))
    except UsageError:
        return None


def warn_other_blur(args: EvalArgs, methods: list[Method]) -> None:
    """One warning line per --lr-blur value that manifest.json files record other than the one
    given (`manifest_blur`), naming the folders and the flag to give: the blur is not taken from
    the manifests (docs/eval.md, "LR-PSNR of a blurred LR"), the command says what is scored."""
    made: dict[str, list[Path]] = {}
    for m in methods:
        blur = manifest_blur(m.sr_dir)
        if blur is not None and blur != args.lr_blur:
            made.setdefault(blur, []).append(m.sr_dir)
    for blur, folders in made.items():
        where = f"--sr {shell_quote(str(folders[0]))}" + (
            f" (and {len(folders) - 1} more)" if len(folders) > 1 else "")  # fmt: skip
        given = f"--lr-blur {args.lr_blur}" if args.lr_blur else "no --lr-blur"
        was = f"--lr-blur {blur}" if blur else "no blur"
        if args.ntire:
            fix = ("the official LR-PSNR is the bicubic one; without --ntire, "
                   f"--lr-blur {blur} adds LR-PSNR with that blur")  # fmt: skip
        else:
            fix = f"give --lr-blur {blur or 'none'} to score LR-PSNR with the blur its LR had"
        warn(f"{where}: its manifest.json says its LR was made by sr_sample.py --from-hr with "
             f"{was}, scored with {given}; {fix}")  # fmt: skip


def warn_unused(args: EvalArgs, given: set[str]) -> None:
    """One warning line for each flag typed that has no effect with the others (not an error: a
    script that switches a metric off may keep its flags)."""
    if args.no_lpips:  # the device runs LPIPS only; PSNR and SSIM are computed on the CPU
        for flag in [f for f in ("lpips_batch", "device") if f in given]:
            warn(f"--{flag.replace('_', '-')}: no effect with --no-lpips; ignored")


def run(args: EvalArgs, given: set[str] = frozenset(), summary: Summary | None = None,
        held: ExitStack | None = None) -> int:  # fmt: skip
    """The run; `summary` gathers the fields of its closing line (--json) as they become known.
    `held`: where the locks of --out and --csv (`outputs_locked`) are kept past the return, so
    that main deletes OUT.partial under them (None: released at the return)."""
    if held is None:
        with ExitStack() as held:
            return run(args, given, summary, held)
    summary = summary or Summary(PROG)
    # results, csv, report: the files this run wrote (null until then: after a stop or an error,
    # the names the flags gave hold no file of this run; an earlier run's is in NAME.old, DIR/old)
    summary.update(results=None, csv=None, report=None, images=None, scored=0)
    summary.update(partial=None, kept=0, mean=None, stopped=None)
    shave, device, batch, lpips_read = check_flags(args, given)
    warn_unused(args, given)  # (after the errors of the flags: an error is the one line)
    held.enter_context(outputs_locked(args))  # (before OUT.partial is read, moved or written)
    hr = hr_images(args.hr)
    stems = list(hr)
    summary.update(images=len(stems))
    methods = expand_methods(args.sr, args.n)
    for m in methods:
        m.files = find_samples(m.sr_dir, stems, m.n, args.scale, m.given)
        m.sampled = sampled_stems(m, stems, args.scale)
    warn_other_blur(args, methods)
    lr_files = lr_inputs(args.lr, stems, args.scale) if args.lr else None
    sigma_files = None
    if args.uncertainty:
        sigma_files = sigma_maps(args.uncertainty, stems, args.scale, args.ntire)
    check_not_inputs(args, hr, methods, lr_files, sigma_files)
    if args.report:
        check_not_in_report(args, hr, methods, lr_files, sigma_files)
        check_no_stray_parts(Path(args.report))
    check_headers(args, shave, hr, methods, lr_files, sigma_files)
    # --pairwise: the memory its features may take (None: no limit; beyond it, in blocks)
    pairwise_memory = check_pairwise(args, hr, methods, device, batch) if args.pairwise else None
    if args.report:
        report.check_matplotlib()
    report_dir = check_out_dir(args.report, "--report") if args.report else None

    def oom(e, image=None):  # the line of an out-of-memory error: what helps this run
        return out_of_memory_line(e, device, batch, not args.no_lpips, len(methods), image)

    def oom_scoring(e):  # (the image being scored: the first not scored yet)
        k = summary.fields["scored"]
        if k >= len(stems):  # (after the scoring: the files or the report)
            return oom(e)
        counts = [len(m.files[k]) for m in methods]
        ahead = k + 1 < len(stems)
        pairs = args.scale if args.pairwise else None
        blurs = args.scale if args.lr_blur else None
        needs = image_needs(stems[k], hr[stems[k]], counts, args.ntire, args.color, ahead, pairs,
                            batch, pairwise_memory, blurs)  # fmt: skip
        return oom(e, needs)

    with out_of_memory_said(oom):
        lpips_metric = (
            None if args.no_lpips else load_lpips(args.lpips_weights, device, batch, lpips_read)
        )
    columns = list(metrics.OFFICIAL_COLUMNS)
    if not args.ntire:
        columns += list(metrics.EXTRA_COLUMNS) + list(metrics.BLUR_COLUMNS if args.lr_blur else ())
        columns += [metrics.LR_INPUT_COLUMN] if args.lr else []
    columns += [metrics.PAIRWISE_COLUMN] if args.pairwise else []

    opts = dict(scale=args.scale, lpips_metric=lpips_metric, ntire=args.ntire, color=args.color)
    opts.update(shave=shave, warn=warn, pairwise=args.pairwise, pairwise_memory=pairwise_memory)
    # --lr-blur: the range each image's sigma is drawn from by its stem (`validation_blur`)
    blur = Degradation(blur=degradation_range(args.lr_blur, "--lr-blur"))
    to_files = bool(args.out or args.csv or report_dir)
    to_stderr = STDOUT in (args.out, args.csv)  # stdout carries the JSON or CSV alone

    # The scores so far, kept beside --out or --csv after each image: a rerun continues from them
    partial = partial_path(args)
    settings = run_settings(args, shave, device, lpips_metric, columns, methods)
    key = scores_key(args, settings)
    roots = data_roots(args, hr, methods)
    prints = [image_print(hr[s], lr_files, sigma_files, methods, k, roots)
              for k, s in enumerate(stems)]  # fmt: skip
    moved_key = scores_key(args, settings, methods)  # (its folders anywhere: `adopt_key`)
    fields = {m.name: {"image", *columns} for m in methods}  # the keys of each method's row
    if args.pairwise:  # (and the matrix, for --out)
        fields = {name: f | {metrics.PAIRWISE_MATRIX} for name, f in fields.items()}
    if sigma_files:
        fields[methods[0].name] |= {"PLL", "PSNR_sigma"}
    if partial:
        adopt_partial(args, key, legacy_keys(args, settings), (moved_key, prints[:1]))
    ns = {m.name: m.n for m in methods}
    kept = kept_scores(partial, key, stems, prints, fields, ns) if partial else []
    # the NAME.old files that a stopped run of this command set aside: deleted once this run
    # writes NAME, as that run would have done (kept in OUT.partial with the scores)
    asides = earlier_asides(partial, key) if partial else []
    summary.update(scored=len(kept), partial=str(partial) if kept else None, kept=len(kept))
    if kept and not args.quiet:
        with unless_stdout_closed(to_files):
            show(f"continuing from {partial}: {len(kept)} of {len(stems)} images scored already",
                 to_stderr)  # fmt: skip

    written = None  # OUT.partial as this run last wrote it (`keep_scores`)

    def scored(k: int, rows: dict) -> None:
        nonlocal written
        summary.update(scored=k + 1)  # (`kept` once the file holds it: a full disk fails here)
        if partial:
            kept[k:] = [{"image": stems[k], "files": prints[k], "rows": rows}]
            written = keep_scores(partial, key, kept, asides, written, moved_key)
            summary.update(partial=str(partial), kept=k + 1)

    # a stop after the report's first file (a full disk, Ctrl-C, a bad image) leaves none of it;
    # an earlier report waits in DIR/old (`set_aside`) until this run's page is written; the
    # report folder is locked the while (a second run refused before it moves or removes a file)
    moved = {}
    locked = report.locked(report_dir) if report_dir else nullcontext()
    with (
        locked,
        said_unfinished(summary.fields, moved, oom_scoring),
        report.removed_if_unfinished(report_dir),
    ):
        with signals_held():  # a stop halfway would leave the earlier report in two places
            outputs = [Path(p) for p in (args.out, args.csv) if p and p != STDOUT]
            planned = aside_names(outputs)
            if partial and planned:  # (a stop before the first image)
                # recorded before they are moved: moved first, a full disk here (or a kill
                # between) would leave a NAME.old that no run deletes; a failed write leaves
                # them where they were
                asides += [aside_record(p, aside) for p, aside in planned.items()]
                written = keep_scores(partial, key, kept, asides, None, moved_key)
            set_aside(planned, moved, report_dir)
            if report_dir:
                report.started(report_dir)
        rows, sheets = score(hr, methods, lr_files, sigma_files, columns, opts, report_dir,
                             to_files, to_stderr, args.quiet, scored,
                             [entry["rows"] for entry in kept], blur)  # fmt: skip

        # Aggregate: mean over images of each column (inf propagates, as the reference).
        columns += ["PLL", "PSNR_sigma"] if sigma_files else []  # (the first --sr folder only)
        means = {
            m: {c: metrics.dataset_mean([r.get(c) for r in rs]) for c in columns}
            for m, rs in rows.items()
        }
        title = table_title(args, methods, len(stems))
        missing = "LPIPS_mean and score not computed (--no-lpips)" if lpips_metric is None else ""
        settings = run_settings(args, shave, device, lpips_metric, columns, methods)
        clean = {m: [{k: jsonable(v) for k, v in r.items()} for r in rs] for m, rs in rows.items()}
        results = []
        if args.out:
            results.append(("--out", args.out, json_text(settings, means, clean, methods)))
        if args.csv:
            results.append(("--csv", args.csv, csv_text(clean, columns, methods)))
        for flag, path, text in results:  # the files first: a closed stdout cannot lose them
            if path != STDOUT:
                with signals_held():  # (a stop's line says what is where)
                    write_text(path, text)
                    summary.update(**{JSON_FIELD[flag]: path})
                    if Path(path) in moved:  # replaced by this run's, as a file written over
                        moved.pop(Path(path)).unlink(missing_ok=True)
                    delete_asides(asides, Path(path))  # (a stopped run's of this command)
        if report_dir:
            table = [(m.name, m.temperature, m.n, means[m.name]) for m in methods]
            with signals_held():  # (as the files: a stop's line says what is where)
                index = report.write_report(report_dir, title, columns, table, sheets, missing)
                summary.update(report=str(index))
                if report_dir / "index.html" in moved:  # replaced by this run's
                    delete_old_report(moved.pop(report_dir / "index.html").parent)
                inputs = run_inputs(args, hr, methods, lr_files, sigma_files)
                delete_earlier_reports(report_dir, [f for *_, fs in inputs for f in fs])
    summary.update(mean=means)
    for flag, path, text in results:
        if path == STDOUT:
            write_stdout(flag, text)
            summary.update(**{JSON_FIELD[flag]: path})
    table = not args.quiet or not (to_files or args.json)  # --quiet: where nothing else has them
    if to_stderr and table:
        err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
        with suppress(OSError):  # (where stderr cannot be written either: `2>&1 | head`)
            print_table(means, columns, title, methods, err)
    with unless_stdout_closed(to_files):
        if not to_stderr and table:
            print_table(means, columns, title, methods)
        if missing and table:
            show(missing, to_stderr)
        if report_dir and not args.quiet:
            show(f"report: {index}", to_stderr)
    return 0


LOCK = ".lock"  # beside --out and --csv: its flock held while a run writes them (`outputs_locked`)


@contextmanager
def outputs_locked(args: EvalArgs):
    """--out and --csv locked while this run writes them: two commands on one --out at once (a
    shared results folder, two array jobs given one name) moved each other's OUT.partial aside
    at their first images, each writing its own scores whole after every image, and the later
    results replaced the earlier (kept in NAME.old, then deleted). A second run is refused at
    once (`lock_output`: one line, exit 2), before it reads, moves or writes a file, not made to
    wait: it would then set aside and delete the first's results. A flock on NAME.lock beside
    the file written (a link's target), deleted at the end: the kernel drops the lock when its
    process ends, however it ends (kill -9, a node lost), so a requeued job whose earlier run
    is dead is never refused, and a NAME.lock left by a kill blocks nothing."""
    with ExitStack() as stack:
        for flag, path in (("--out", args.out), ("--csv", args.csv)):
            if path and path != STDOUT:
                stack.callback(unlock, *lock_output(flag, Path(path)))
        yield


def lock_output(flag: str, path: Path) -> tuple[Path, int]:
    """(NAME.lock of output `path`, the descriptor of its flock: of the file unlocked where the
    file system has no locks, with a warning); UsageError where another process holds it. A
    lock file deleted by the run that ended as this one opened it is opened again (its flock
    would guard nothing), and this run's pid and host written in it, for the line of a run
    refused (`lock_holder`). Another user's, left by a kill (not writable here, opened
    read-only: a local flock needs no write), is replaced by one of this run's where the folder
    lets it be deleted (`unlinkable`), its line naming the run killed; else locked as it is. NFS
    emulates flock with a byte-range lock, which needs a file open for writing (EBADF else):
    there such a file is replaced where no process holds a byte-range lock on it
    (`locked_elsewhere`), refused where one does, and only where neither can be done or told
    does the run go on unlocked, with a warning."""
    lock = lock_name(path)
    while True:
        fd, mine = open_lock(flag, path, lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            why = e.strerror or e
            if e.errno == errno.EBADF and not mine:  # (NFS, another user's lock: read-only)
                held = locked_elsewhere(fd)
                if held is False and unlinkable(lock):  # (a kill's: replaced, as below)
                    with suppress(OSError):
                        lock.unlink()
                    if not same_inode(lock, fd):
                        os.close(fd)
                        continue
                why = ("another user's, open read-only, and this file system locks only files "
                       "open for writing")  # fmt: skip
            if not held:
                # (its file kept open all the same: `unlock` deletes it at the end, as a lock's;
                # closed here, it was left behind by every run on such a file system)
                warn(f"{flag} {path}: cannot lock {lock} ({why}); a second sr_eval.py writing "
                     "there at once would not be noticed")  # fmt: skip
                break
            if not same_inode(lock, fd):  # (replaced meanwhile by its holder: that one's)
                os.close(fd)
                continue
            who = lock_holder(lock, fd)
            os.close(fd)
            raise UsageError(f"{flag} {path}: another sr_eval.py{who} is writing its results "
                             f"there now; wait for it to end, or give {flag} another "
                             "name") from None  # fmt: skip
        if not same_inode(lock, fd):
            os.close(fd)
            continue
        if mine or not unlinkable(lock):
            break
        with suppress(OSError):  # (deleted while held, as `unlock` does: the next is this run's)
            lock.unlink()
        if same_inode(lock, fd):  # (not deleted all the same: locked as it is)
            break
        os.close(fd)
    with suppress(OSError):  # (a lock opened read-only: its line not rewritten, `lock_holder`)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return lock, fd


def locked_elsewhere(fd: int) -> bool | None:
    """Whether another process holds a lock on the file open as `fd` where flock cannot be taken
    on a file open read-only (NFS: its flock is a byte-range lock, on the server too, which
    F_GETLK tests without a write; this machine's holders are in /proc/locks, `flock_pids`);
    None where that cannot be told (not Linux, whose struct flock this packs, or F_GETLK
    failed)."""
    if not sys.platform.startswith("linux"):
        return None
    if flock_pids(fd):
        return True
    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # (the whole file)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError:
        return None
    return struct.unpack_from("h", answer)[0] != fcntl.F_UNLCK


def lock_name(path: Path) -> Path:
    """NAME.lock of output `path`: beside the file written (a link's target: `write_target`)."""
    real = write_target(path)
    return real.with_name(fit_name(real.name, len(LOCK), name_max(real.parent)) + LOCK)


def open_lock(flag: str, path: Path, lock: Path) -> tuple[int, bool]:
    """(`lock` opened, whether for writing): read-only where this user may not write it
    (another user's); a lock that cannot be opened (a folder so named, a loop of links: a
    traceback) is one line, exit 7."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666), True
    except OSError as e:
        error = e
    if isinstance(error, PermissionError):
        with suppress(OSError):
            return os.open(lock, os.O_RDONLY), False
    raise OutputError(f"{flag} {path}: cannot open {lock}, the file that locks it while a run "
                      f"writes it ({error.strerror or error}); move that away")  # fmt: skip


def lock_holder(lock: Path, fd: int) -> str:
    """The " (pid P on HOST)" of the process holding the flock of `lock` (open as `fd`) where
    that is known, else "": the line in the file is its last writer's, and a holder that could not
    rewrite it (another user's, in a folder with the sticky bit: `lock_output`) left the pid
    of a run killed there, which a refused run named as the one writing. This machine's
    holder is read from /proc/locks (`flock_pids`), whatever the file says; a line naming
    another machine (whose locks are not listed here) is taken where its holder could rewrite
    or replace the file: not in a folder with the sticky bit, unless the file is writable to
    all."""
    host, pids = socket.gethostname(), flock_pids(fd)
    if pids:
        return f" (pid {min(pids)} on {host})"
    line = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    said = re.fullmatch(r"pid \d+ on (\S+)", line)
    if not said or (said.group(1) == host and pids is not None):
        return ""  # (this machine's line, but no process here holds it: a killed run's)
    with suppress(OSError):
        sticky = os.stat(lock.parent).st_mode & stat.S_ISVTX
        if not sticky or os.fstat(fd).st_mode & stat.S_IWOTH:
            return f" ({line})"
    return ""


def flock_pids(fd: int) -> set[int] | None:
    """The pids of this machine's processes that hold a flock on the file open as `fd`, as
    /proc/locks lists them ("1: FLOCK  ADVISORY  WRITE 4242 fe:00:2678851 0 EOF": device
    major:minor in hex, inode; a waiter's line has "->" before FLOCK); None where it cannot be
    read (not Linux). A lock taken on another machine (a network file system) is not there."""
    st = os.fstat(fd)
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    fields = (line.split() for line in lines)
    return {int(f[4]) for f in fields if len(f) > 5 and f[1] == "FLOCK" and f[5] == file
            and f[4].isdigit() and int(f[4]) > 0}  # fmt: skip


def same_inode(path: Path, fd: int) -> bool:
    """Whether `path` is still the file open as `fd`."""
    try:
        st, of = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (of.st_dev, of.st_ino)


def unlock(lock: Path, fd: int) -> None:
    """The lock of `lock_output` released, its file deleted first (while held: a run that opened
    it meanwhile opens the next one)."""
    if same_inode(lock, fd):
        with suppress(OSError):
            lock.unlink()
    os.close(fd)


def delete_old_report(aside: Path) -> None:
    """The earlier report that `set_aside` moved to `aside`, deleted once this run's is written;
    one warning where that fails (this run's report is whole all the same)."""
    try:
        shutil.rmtree(aside)
    except OSError as e:
        warn(f"{aside}: cannot delete the earlier report moved there ({e.strerror or e}); "
             "delete it")  # fmt: skip


def delete_earlier_reports(report_dir: Path, inputs: list) -> None:
    """The earlier reports that runs stopped before set aside in `report_dir` (DIR/old, old2, ...
    with their REPORT_OLD_MARK; not a folder of the user's), deleted once this run's page is
    written, as this run deletes the one it set aside: a report rerun after each stop left one
    more. One that holds a file of this run's `inputs` is kept, with a warning."""
    named = re.compile(rf"{REPORT_OLD}\d*")
    try:
        asides = sorted(p for p in report_dir.iterdir() if named.fullmatch(p.name))
    except OSError:  # (not listed: nothing deleted; this run's report is whole)
        return
    for aside in asides:
        if not (aside / REPORT_OLD_MARK).is_file():
            continue  # the user's own folder named so
        real = aside.resolve()
        if any(Path(f).resolve().is_relative_to(real) for f in inputs):
            warn(f"{aside}: an earlier report, kept: this run read files in it; delete it")
            continue
        delete_old_report(aside)


PARTIAL = ".partial"  # the suffix of the file of the scores so far
JSON_FIELD = {"--out": "results", "--csv": "csv"}  # the --json line's field of each file


def partial_path(args: EvalArgs) -> Path | None:
    """Where the scores so far are kept (`kept_scores`): NAME.partial beside --out, else beside
    --csv; None where neither names a file (or that name is another output's)."""
    return next(iter(partial_paths(args)), None)


def partial_paths(args: EvalArgs) -> list[Path]:
    """NAME.partial beside --out, then beside --csv (those that name a file and no output):
    `partial_path` and where a run of the same command with only --csv kept its scores."""
    outputs = [Path(p) for p in (args.out, args.csv) if p and p != STDOUT]
    # (realpath: a --report or an OUT.partial that is a loop of links is one line, not
    # resolve's RuntimeError)
    taken = [Path(os.path.realpath(p)) for p in [*outputs, *([args.report] if args.report else [])]]
    paths = [out.with_name(fit_name(out.name, len(PARTIAL), name_max(out.parent)) + PARTIAL)
             for out in outputs]  # fmt: skip
    return [p for p in paths if Path(os.path.realpath(p)) not in taken]


def adopt_partial(args: EvalArgs, key: str, legacy: set[str] = frozenset(),
                  moved: tuple[str, list] | None = None) -> None:  # fmt: skip
    """The scores kept by a run of this command (`key`) with other outputs, moved to
    `partial_path` beside the --out (else --csv) now given: the outputs are no part of the
    command that makes the scores (`scores_key`), so this run continues them, and no file is left
    behind that no run would read or delete. Looked for beside --csv, then among the other
    NAME.partial files in the folders of the outputs given (a run with --out r.json --csv r.csv
    kept them in r.json.partial, and its rerun with --csv r.csv alone cannot know that name): the
    newest of this command. One of its `legacy` keys (`legacy_keys`) is given `key`, and so is
    the key of this command on its data folders at other paths (`moved`: `adopt_key`), beside
    the --out given only: the other NAME.partial files are told by their first bytes, the key,
    where that would need each one's whole first line (its moved_key follows every image it
    held when written whole: megabytes with --pairwise's matrices, read from every file of a
    shared results folder at every start). A rerun that renames --out and reads its data at
    other paths at once scores every image (docs/eval.md), the scores beside the earlier name left
    for a rerun of their command.
    Not the file of a run of this command that is writing it now (under another --out name:
    `partial_lock`): it was taken, and both runs then wrote one file of scores. That run's lock
    is held while the file is moved (`unless_written`), nor one that cannot be moved (another
    user's: `move_onto`); one warning line names a file not taken where no other is, and every
    image is scored."""
    here, *others = partial_paths(args)
    adopt_key(here, key, legacy, moved)
    if here.exists() and not keep_others_scores(here, key):
        return  # (this command's, or not sr_eval.py's: `kept_scores`)
    heads = [partial_text(k, [], [])[: len('{"key": ""') + len(k)].encode() for k in (key, *legacy)]
    strays, folders = [], {p.parent: f"{re.escape(PARTIAL)}$" for p in (here, *others)}
    for p in (here, *others):
        # and beside a link's target, where `keep_others_scores` moves them: the files set aside
        # there alone (NAME.<12 hex>.partial), as a run writing another link's target there
        # holds the lock of that link's NAME, which this file's name does not tell
        with suppress(OutputError):
            folders.setdefault(write_target(p).parent, ASIDE)
    for folder, names in folders.items():
        with suppress(OSError):
            strays += [p for p in folder.iterdir() if re.search(names, p.name)]
    strays = sorted(set(strays) - {here, *others}, key=mtime, reverse=True)
    busy = None  # (the first file of this command's not taken, and why)
    for other in [*others, *strays]:
        if not starts_with(other, heads):
            continue
        # (beside --csv: this run's own lock)
        with unless_written(other) if other in strays else nullcontext() as writer:
            if writer:
                busy = busy or (other, writer)
                continue
            try:
                move_onto(other, here)
            except PermissionError as e:  # (another user's: `move_onto`; else tried quietly)
                busy = busy or (other, f"they cannot be moved to {here} ({e.strerror or e})")
                continue
            except (OSError, OutputError):
                continue
            with suppress(OSError, OutputError):
                adopt_key(here, key, legacy)
            return
    if busy:
        warn(f"{busy[0]}: the scores this command kept there are not continued from: {busy[1]}; "
             "this run scores every image")  # fmt: skip


def move_onto(other: Path, here: Path) -> None:
    """The file `other` moved to `here`, or where `here` leads, a symbolic link (OUT.partial
    linked onto another disk: the link stays, as every output's, `write_target`); it replaced
    the link, the scores then kept beside --out and the link lost at the end. Where `other` is
    a link, the file it leads to is moved, the link left as it is: the link itself was moved
    (onto another file system copied, then deleted), and the file left where it led, which no
    run read or deleted (or, moved onto `here`'s target, a link left there at the end). Across
    file systems written there whole, atomically (`write_text`), then deleted: one step, a stop
    signal raised at its end (`signals_held`): a SIGTERM during the write left both files. A
    file that cannot be deleted (another user's in a folder with the sticky bit) is not moved,
    PermissionError, as a rename of it fails on one file system: never copied where the folder
    says so (`unlinkable`), the copy deleted where the deletion fails all the same (`here` led
    to no file: `adopt_partial`). Kept, it left the file beside the other output too, which a
    rerun of that command continued from: its images scored twice, by both runs."""
    source = write_target(other)
    try:
        os.replace(source, write_target(here))
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        if not unlinkable(source):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(source)) from None
        with signals_held():
            write_text(here, source.read_bytes().decode("utf-8", "surrogateescape"))
            try:
                source.unlink()
            except OSError:
                with suppress(OSError):
                    write_target(here).unlink()
                raise


def starts_with(path: Path, heads: list[bytes]) -> bool:
    """Whether file `path` begins with one of `heads` (False where it cannot be read: a folder)."""
    with suppress(OSError), open(path, "rb") as f:
        return f.read(len(heads[0])) in heads
    return False


def partial_lock(partial: Path) -> Path | None:
    """The NAME.lock (`lock_name`) that a run holds while it writes the scores so far `partial`
    (NAME.partial beside its --out or --csv NAME: `partial_paths`); None where that cannot be
    told: a NAME.partial whose name was cut to fit the file system's limit (`fit_name`: ~ and 8
    hex digits of the whole name's hash, the whole name not known), or a link NAME that leads
    nowhere."""
    stem = partial.name[: -len(PARTIAL)]
    cut = len(os.fsencode(partial.name)) > name_max(partial.parent) - 4  # (a cut at a character)
    if cut and re.search(r"~[0-9a-f]{8}$", stem):
        return None
    try:
        return lock_name(partial.with_name(stem))
    except OutputError:
        return None


@contextmanager
def unless_written(partial: Path):
    """Within, the scores so far `partial` of a run of this command with another --out or --csv
    are this run's to move (yields None), the flock of that output's NAME.lock (`partial_lock`)
    held the while, so that a run of that output starting meanwhile is refused (`lock_output`)
    rather than robbed; else yields why not: a run writing them now holds it (its pid where
    known: `lock_holder`), or the lock cannot be told or opened. Where this file system has no
    locks (that run's own went unlocked, with a warning), as before: taken."""
    lock = partial_lock(partial)
    if lock is None:
        yield "its name was cut to fit the file system: whether a run writes it now is not known"
        return
    while True:
        try:
            fd = open_lock_file(lock)
        except FileNotFoundError:
            yield None  # (no run of that output since the end of the last)
            return
        except OSError as e:
            yield f"its lock {lock} cannot be opened ({e.strerror or e})"
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except OSError as e:  # (ENOLCK: no locks here, that run's unlocked too: taken)
            if e.errno == errno.EBADF:  # (NFS, another user's lock: open read-only)
                os.close(fd)
                yield (f"its lock {lock} cannot be taken open read-only, as this file system "
                       "asks: whether a run writes it now is not known")  # fmt: skip
                return
            held = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        if held or same_inode(lock, fd):
            break
        os.close(fd)  # (deleted by its holder as it ended, or replaced: the next one's)
    try:
        yield f"another sr_eval.py{lock_holder(lock, fd)} is writing it now" if held else None
    finally:
        os.close(fd)


def open_lock_file(lock: Path) -> int:
    """`lock` opened for writing, else (another user's) read-only. NFS emulates flock with a
    byte-range lock, which is exclusive on a file open for writing only (EBADF else): a lock
    opened read-only there was taken for no locks at all, and the scores of a run writing them
    now were moved (`unless_written`)."""
    try:
        return os.open(lock, os.O_RDWR)
    except PermissionError:
        return os.open(lock, os.O_RDONLY)


# (`scores_key`)
OTHER_COMMAND = (
    "another command (other flags, device, GPU model, LPIPS's CPU threads or instruction set, "
    "or versions)"
)


# the name `keep_others_scores` sets another command's scores aside to (the end of a name)
ASIDE = rf"\.[0-9a-f]{{12}}(\.[0-9]+)?{re.escape(PARTIAL)}$"


def keep_others_scores(here: Path, key: str) -> bool:
    """Where `here` (OUT.partial) holds the scores kept by another command (another `key`:
    `OTHER_COMMAND`), moved aside to OUT.<its key's first 12 hex
    digits>.partial (.2.partial, ... where taken; a link's target beside itself, the link kept
    for this run to write through), one warning line saying where: a rerun of that
    command finds them there (`adopt_partial`) and continues; they were replaced, hours of
    scoring lost to a run that shares the --out name (a shared results folder, a job requeued with
    other flags). True where moved (or moved away since it was read); False where `here` is this
    command's, or no file of sr_eval.py's scores so far (`kept_scores` says so). Never onto a
    file that took the aside name meanwhile (`take_name`). One that cannot be moved (another
    user's in a folder with the sticky bit) is refused, exit 7: this run could not replace it
    either."""
    try:
        other = read_partial(here)[0]["key"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return False
    if other == key or not isinstance(other, str) or not re.fullmatch(r"[0-9a-f]{64}", other):
        return False
    key12 = f".{other[:12]}"
    try:  # (a link's target, beside it, the link kept: it was renamed, the user's link lost)
        real = write_target(here)
    except OutputError:  # (its folder gone since it was read: as a file moved away meanwhile)
        return True
    names = names_beside(real.parent, real.name.removesuffix(PARTIAL),
                         lambda i: f"{key12}{f'.{i}' if i > 1 else ''}{PARTIAL}")  # fmt: skip
    for aside in names:
        try:
            if not exists(aside) and take_name(real, aside):
                break
        except FileNotFoundError:  # moved away since it was read (a run of that command)
            return True
        except OSError as e:  # (a shared folder's sticky bit: another user's; this run could not
            # replace it either, and would fail at its first image)
            raise OutputError(f"{here}: the scores kept by {OTHER_COMMAND} cannot be moved aside "
                              f"to {aside} ({e.strerror or e}); move it away, or give --out or "
                              "--csv another name") from None  # fmt: skip
    warn(f"{here}: the scores kept by {OTHER_COMMAND} moved to {aside}, where a rerun of that "
         "command continues from them")  # fmt: skip
    return True


def take_name(path: Path, new: Path) -> bool:
    """`path` renamed `new` where that name is still free, else False. os.rename (POSIX) replaces
    a file that took the name since it was checked free (a second run moving the same
    command's scores aside): a hard link does not; a file system without them is renamed so.
    `path` is left exactly one name: where it could not be unlinked after the link (another
    user's in a folder with the sticky bit, hard links to it allowed: fs.protected_hardlinks=0)
    the link `new` could not be either (the bit asks who owns the file, not the name), and a
    stray second name was left; such a file is refused (PermissionError) before it is linked,
    and an unlink that fails all the same removes the link again (or names it in the error).
    A stop signal between the link and the unlink (SIGTERM: a job preempted as it starts) left
    both names too, the rerun moving the second aside once more: the two are one step, the
    signal raised at its end (`signals_held`). Ctrl-C waits so too where main's handler is
    SIGINT's (`exit_on_error`), but not under a caller's own handler, nor Python's (main() or
    this called from Python): its KeyboardInterrupt between the two undoes the link."""
    if not unlinkable(path):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
    with signals_held():
        try:
            os.link(path, new)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise  # (ENOENT: `path` gone; EACCES, EROFS: no rename either)
            os.rename(path, new)  # (no hard links here, or not to another user's file)
            return True
        except BaseException:  # (Ctrl-C as the link returned: `new` may be made)
            unlink_second_name(path, new)
            raise
        try:
            os.unlink(path)
        except OSError as e:
            try:
                os.unlink(new)
            except OSError:
                raise OSError(e.errno, f"{e.strerror}; {new} is left a second name of it: "
                              "delete that name") from None  # fmt: skip
            raise
        except BaseException:  # (Ctrl-C not held: before the unlink, or as it returned)
            unlink_second_name(path, new)
            raise
    return True


def unlink_second_name(path: Path, new: Path) -> None:
    """`new` removed where it is a second name of `path` (`take_name` cut short between its link
    and its unlink): the file is left one name, `path`, as before. Nothing where the unlink was
    done (`path` gone) or the link not made (`new` another file, or none)."""
    with suppress(OSError):
        if os.path.samefile(path, new) and not os.path.islink(new):
            os.unlink(new)


def unlinkable(path: Path) -> bool:
    """Whether this process may remove the name `path` as far as its folder's sticky bit tells
    (the owner of the file or of the folder, or root; the folder's write permission is the
    link's and the unlink's alike)."""
    try:
        folder = os.stat(path.parent)
        owner = os.stat(path, follow_symlinks=False).st_uid
    except OSError:
        return True  # (gone meanwhile: os.link says so)
    return not folder.st_mode & stat.S_ISVTX or os.geteuid() in (0, owner, folder.st_uid)


def mtime(path: Path) -> float:
    """`path`'s modification time; 0 where it cannot be read."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def partial_text(key: str, kept: list[dict], asides: list[dict], moved_key: str = "") -> str:
    """OUT.partial as written whole, one line: the settings' `key`, the scores of the images
    done (`kept`), the earlier files this command's runs set aside (`asides`: `aside_record`s)
    and the key without the data folders' paths (`moved_key`: `adopt_key`). The images
    scored after it are lines of their own (`keep_scores`)."""
    head = {"key": key, "images": kept, "aside": asides, "moved_key": moved_key}
    return json.dumps(head) + "\n"


def keep_scores(path: Path, key: str, kept: list[dict], asides: list[dict], written,
                moved_key: str = ""):  # fmt: skip
    """OUT.partial once an image is scored (the last of `kept`): that image's line appended
    where the file is still the one this run wrote (`written`: its inode and size then), so that
    an image costs the writing of its own scores, not of every image's again (the N x N matrices
    of --pairwise made that O(images x N^2) an image); else (this run's first write, a file
    moved or changed since) the file written whole, atomically (`partial_text`). A kill inside
    an append leaves a last line cut short, which `read_partial` leaves out, and a failed one
    (a full disk) is cut off again, so the file holds the images before it. Returns `written`
    for the next call."""
    with suppress(OSError):
        st = os.stat(path)
        if written is not None and (st.st_ino, st.st_size) == written:
            line = (json.dumps(kept[-1]) + "\n").encode("utf-8")
            try:
                with open(path, "ab") as f:
                    f.write(line)
            except OSError as e:
                with suppress(OSError):
                    os.truncate(path, written[1])
                raise OutputError(f"{path}: cannot write ({e.strerror or e}); check the output "
                                  "path") from e  # fmt: skip
            return st.st_ino, written[1] + len(line)
    write_text(path, partial_text(key, kept, asides, moved_key))
    st = os.stat(write_target(path))
    return st.st_ino, st.st_size


def read_partial(path: Path) -> tuple[dict, list]:
    """OUT.partial's first line (`partial_text`) and the images' entries: those in it, then one
    a line (`keep_scores`); a last line without its newline (cut short by a kill or a full
    disk) is left out. ValueError (or OSError, UnicodeDecodeError) where it is no such file."""
    lines = path.read_bytes().decode("utf-8").split("\n")[:-1]  # (the last: "" or cut short)
    if not lines:
        raise ValueError(f"{path}: no complete line")
    head = json.loads(lines[0])
    if not isinstance(head, dict) or not isinstance(head.get("images"), list):
        raise ValueError(f"{path}: not a file of the scores so far")
    return head, head["images"] + [json.loads(line) for line in lines[1:]]


def aside_record(path: Path, aside: Path) -> dict:
    """An earlier --out or --csv `path` that `set_aside` renames `aside`, as OUT.partial keeps it
    (written before the move): absolute paths, and the file's inode, size and modification time,
    which the rename keeps (`delete_asides` deletes only the file it was)."""
    st = write_target(path).stat()
    return {"path": os.path.abspath(path), "aside": os.path.abspath(aside),
            "stat": [st.st_ino, st.st_size, st.st_mtime_ns]}  # fmt: skip


def earlier_asides(path: Path, key: str) -> list[dict]:
    """The `aside_record`s in OUT.partial `path` of a run of this command (`key`) stopped before:
    none where the file is not there, not readable or of other settings."""
    try:
        kept = read_partial(path)[0]
        records = kept.get("aside", []) if kept["key"] == key else []
        return [r for r in records if set(r) == {"path", "aside", "stat"}
                and isinstance(r["path"], str) and isinstance(r["aside"], str)]  # fmt: skip
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return []


def delete_asides(asides: list[dict], path: Path) -> None:
    """The NAME.old files of `path` that runs of this command stopped before set aside, deleted
    now that this run wrote `path`: a run that continues after a stop leaves what one never
    stopped would (it deletes the NAME.old it made), and a chain of preempted runs in a job
    array no NAME.old, NAME.old2, ... Only a file still the one set aside (inode, size,
    modification time: not one the user put there since) is deleted."""
    for record in asides:
        if record["path"] != os.path.abspath(path):
            continue
        with suppress(OSError):
            st = os.stat(record["aside"])
            if [st.st_ino, st.st_size, st.st_mtime_ns] == record["stat"]:
                os.unlink(record["aside"])


def scores_key(args: EvalArgs, settings: dict, methods=None) -> str:
    """sha256 of what makes an image's numbers beyond its files: every flag but the outputs'
    and the settings of --out (the LPIPS weights' sha256, the device and its GPU model, on the
    CPU LPIPS's threads, instruction set and `cpu_kernels`, torch's and srspace's versions, the
    columns). A rerun on another GPU model (a job requeued onto another node) is another
    command, as a rerun on the CPU, or on a CPU of other features (AVX2, AVX-512) or capped by
    ONEDNN_MAX_CPU_ISA, is: it
    scores every image, not a mix of two models' numbers that differ at about 1e-6. With
    --no-lpips, --device and --lpips-batch (LPIPS's alone, ignored) are not in it: a job requeued
    from a GPU node onto a CPU one continues (its numbers are the CPU's on both). With `methods`
    (`adopt_key`'s key) the paths of the data folders are not in it (--hr, --lr,
    --uncertainty, each --sr's DIR), only what the table makes of them: each row's name and N,
    and whether --lr and --uncertainty are given; nor --lpips-weights' path (their sha256 is in
    the settings: weights staged with the data)."""
    unused = ("device", "lpips_batch") if args.no_lpips else ()
    if methods is None:
        return settings_key(settings, typed_flags(args, unused))
    typed = typed_flags(args, (*unused, "hr", "sr", "lr", "uncertainty", "lpips_weights"))
    typed |= {"rows": [[m.name, m.n] for m in methods], "lr": args.lr is not None,
              "uncertainty": args.uncertainty is not None}  # fmt: skip
    return settings_key(settings, typed)


def typed_flags(args: EvalArgs, unused: tuple[str, ...] = ()) -> dict:
    """The flags of `args` that make the numbers: all but the outputs' (and `unused`). --lr-blur
    only where set: the scores of an srspace before it, which had none, are continued."""
    skip = {"out", "csv", "report", "quiet", "json", *unused}
    if not args.lr_blur:
        skip.add("lr_blur")
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in skip}


def legacy_keys(args: EvalArgs, settings: dict) -> set[str]:
    """The keys that earlier srspace versions gave the scores this command kept, where nothing
    those keys lack can differ, so that a job requeued across an upgrade continues (`adopt_key`).
    One rule: scores whose LPIPS settings the key does not tell, where they could differ, are
    another command's (moved aside, kept for a rerun of that srspace, every image scored again):
    on the CPU its instruction set and what picks oneDNN's and MKL's kernels (an AVX2 node's
    LPIPS_mean differs from an AVX-512 node's in its 7th digit: `cpu_kernels`) and its threads
    (1 and 2 in the 8th), on CUDA the GPU model.
    - before --out's cpu_kernels: its settings without it, where it is null (LPIPS on CUDA,
      --no-lpips); not where LPIPS ran on the CPU (ATen's instruction set alone: a node capped
      by ONEDNN_MAX_CPU_ISA, or of other features, had its key);
    - before --out's cpu_capability: its settings without either, where both are null;
    - before --out's device_name (session 28): its settings without device_name (nor threads,
      cpu_capability and cpu_kernels, later still), and every flag typed, with --no-lpips alone
      (its device then ran nothing: the one --device picked, cuda or cpu for auto). Not where
      LPIPS ran: on CUDA that key does not tell the GPU model, on the CPU neither the threads
      nor the instruction set."""
    keys = set()
    if settings["cpu_kernels"] is None:  # (and cpu_capability: LPIPS on CUDA, --no-lpips)
        for later in (("cpu_kernels",), ("cpu_kernels", "cpu_capability")):
            keys.add(scores_key(args, {k: v for k, v in settings.items() if k not in later}))
    if not args.no_lpips:
        return keys
    typed = typed_flags(args)
    devices = ["cpu", "cuda"] if args.device == "auto" else [str(torch.device(args.device))]
    later = ("device_name", "threads", "cpu_capability", "cpu_kernels")
    old = {k: v for k, v in settings.items() if k not in later}
    return keys | {settings_key({**old, "device": d}, typed) for d in devices}


def adopt_key(path: Path, key: str, legacy: set[str], moved: tuple[str, list] | None = None):
    """OUT.partial `path` of this command's scores kept under another key given this run's `key`
    (its first line rewritten, atomically; one read of the file), where it is:
    - under one of its `legacy_keys` (an earlier srspace's), or
    - of this command on its data folders at other paths (`moved`: this run's moved_key,
      `scores_key` without them, and the files of its first image, `image_print`'s names in
      their folders, sizes and modification times): a requeued job that staged its data to a
      node's $TMPDIR (rsync -a, cp -p) or reads it mounted at another path continues, and a
      file changed since is scored again from its image on (`kept_scores`). One whose first
      image's files differ is another command's, on other data, moved aside
      (`keep_others_scores`) as before.
    Another key, a missing or unreadable file (a field missing): left as it is."""
    moved_key, first = moved or ("", None)
    try:
        head, entries = read_partial(path)
        if head["key"] not in legacy and not (
            moved_key and head["key"] != key and head.get("moved_key") == moved_key
            and entries and [entries[0]["files"]] == first
        ):  # fmt: skip
            return
        top, sep, rest = path.read_bytes().decode("utf-8").partition("\n")
        write_text(path, json.dumps({**json.loads(top), "key": key}) + sep + rest)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return


def settings_key(settings: dict, typed: dict) -> str:
    """sha256 of the `settings` of --out but their args, and the flags `typed` (`scores_key`)."""
    what = {k: v for k, v in settings.items() if k != "args"}
    if what.get("lr_blur", "") is None:  # (none, as before --lr-blur: `typed_flags`)
        del what["lr_blur"]
    what["args"] = typed
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def data_roots(args: EvalArgs, hr: dict[str, Path], methods) -> tuple:
    """The folders the files of an image are named from in its `image_print`: --hr (the demo's
    own), --lr, --uncertainty, and per method its --sr DIR as typed (a sweep's temperature
    folder is a part of its files' names)."""
    demo = next(iter(hr.values())).parent if args.hr == "demo" and hr else None
    sr = [m.given[1] if m.given else m.sr_dir for m in methods]
    return demo or Path(args.hr), args.lr, args.uncertainty, sr


def image_print(hr_file: Path, lr_files, sigma_files, methods, k: int, roots: tuple) -> str:
    """sha256 of the name (in its folder of `roots`: `data_roots`), size and modification time
    (ns) of each file of image k (HR, LR, sigma map, every method's samples): a file replaced or
    changed since tells, and a copy that keeps them (rsync -a, cp -p: a job staging its data to a
    node's $TMPDIR, the same data mounted at another path) does not (`adopt_key`). Not
    their contents: their sha256 reads every file before the first image is scored (3.2 ms a
    5.8 MB PNG from the page cache, where its stat takes 3 us, measured on an AMD EPYC;
    docs/eval.md)."""
    hr_root, lr_root, sigma_root, sr_roots = roots
    files = [(hr_root, hr_file)]
    files += [(r, f[k]) for r, f in ((lr_root, lr_files), (sigma_root, sigma_files)) if f]
    files += [(r, p) for r, m in zip(sr_roots, methods) for p in m.files[k]]
    stats = []
    for root, p in files:
        st = p.stat()
        stats.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def kept_scores(path: Path, key: str, stems: list[str], prints: list[str], fields,
                ns: dict[str, int]) -> list[dict]:  # fmt: skip
    """The scores of a run of the same command stopped before ({"image", "files", "rows":
    {method: row}} per image), that `path` holds (`read_partial`): those of the first images
    whose files are still the same (`prints`), where the settings are (`key`) and each row has
    its method's `fields`, numbers (or null) but the image's name, and a --pairwise matrix of
    its method's N (`ns`); else none, with a warning (another command's: moved aside before,
    `keep_others_scores`). A stop of any kind leaves the file (a signal, Ctrl-C, an error); main
    removes it once the results are written. The numbers come back exactly: JSON keeps every
    float."""
    if not path.exists():
        return []
    usable = []
    try:
        head, entries = read_partial(path)
        same = head["key"] == key
        for entry, stem, fp in zip(entries if same else [], stems, prints):
            if (entry["image"], entry["files"], set(entry["rows"])) != (stem, fp, set(fields)):
                break  # changed files: this image and the ones after it are scored again
            if not all(scores_row(entry["rows"][m], stem, f, ns[m]) for m, f in fields.items()):
                same, usable = False, []  # (edited: a row of other fields, a "number" not one)
                break
            usable.append(entry)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        same, usable = False, []
    if not same:
        # (another command's were moved aside: `keep_others_scores`)
        warn(f"{path}: not a file of this command's scores so far (edited, or not "
             "sr_eval.py's); scoring every image, replacing it")  # fmt: skip
    return usable


def scores_row(row, stem: str, fields: set[str], n: int) -> bool:
    """Whether `row`, read back from OUT.partial, is one that `score` makes for image `stem` of
    a method of `n` samples: the `fields`, each a number or null but "image", the stem, and
    --pairwise's matrix, null for n = 1, else n lists of n numbers (one of another size is of
    other samples: scored again, not taken)."""
    if not isinstance(row, dict) or set(row) != fields or row["image"] != stem:
        return False

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    matrix = row.get(metrics.PAIRWISE_MATRIX)  # (--pairwise) null, or N lists of N numbers
    if metrics.PAIRWISE_MATRIX in fields and (matrix is None) != (n == 1):
        return False
    if matrix is not None and not (
        isinstance(matrix, list)
        and len(matrix) == n
        and all(isinstance(r, list) and len(r) == n for r in matrix)
        and all(number(v) for r in matrix for v in r)
    ):
        return False
    return all(v is None or number(v)
               for k, v in row.items() if k not in ("image", metrics.PAIRWISE_MATRIX))  # fmt: skip


def show(text: str, to_stderr: bool) -> None:
    """A line for the user: on stdout, or on stderr where stdout carries --out - or --csv -."""
    if to_stderr:
        say_err(text)
    else:
        print(one_line(text), flush=True)  # (an error at a flush at exit would be a traceback)


def write_stdout(flag: str, text: str) -> None:
    """`flag` - : the JSON or CSV on stdout, the bytes its file would hold. A stdout that cannot
    take it (its reader ended, a full disk) is one line, exit 7: the run's result is lost."""
    try:
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None)  # (None: a text-only stand-in)
        if out is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            out.write(text.encode("utf-8", "surrogateescape"))
            out.flush()
    except OSError as e:
        if not stdout_closed(e):
            raise
        raise OutputError(f"standard output {stdout_closed()}: {flag} - was not written; "
                          f"give {flag} a file name") from None  # fmt: skip


@contextmanager
def unless_stdout_closed(to_files: bool):
    """Lines printed within: where stdout can no longer be written (its reader ended:
    `sr_eval.py ... | head`; a full disk), the run goes on if its results go to files (--out,
    --csv, --report), with a warning; else it stops with one line (exit 7)."""
    try:
        yield
    except OSError as e:
        if not stdout_closed(e):
            raise
        if not to_files:
            raise OutputError(f"standard output {stdout_closed()}; stopped") from None
        warn(f"standard output {stdout_closed()}: the results go to the files of --out, --csv "
             "or --report only")  # fmt: skip


def table_title(args: EvalArgs, methods: list[Method], n_images: int) -> str:
    ns = sorted({m.n for m in methods})
    protocol = " (NTIRE 2021 protocol)" if args.ntire else ""
    n = f"N={ns[0]}" if len(ns) == 1 else "N per method"
    blur = f", LR blur {args.lr_blur}" if args.lr_blur else ""  # (its columns' downscale)
    return f"x{args.scale}, {n}, {n_images} images{blur}{protocol}"


def run_settings(args, shave, device, lpips_metric, columns, methods) -> dict:
    crop = f"official: GT top-left to a multiple of {metrics.official_mod(args.scale)}, SR to it"
    if not args.ntire:
        crop += f"; PSNR/SSIM: GT to a multiple of {args.scale} and to the SR, {shave} px shave"
    settings = {
        "protocol": "ntire" if args.ntire else "generic",
        "scale": args.scale,
        # the N every row was scored with (each --sr DIR:N may set its own): null where they differ
        "n": methods[0].n if len({m.n for m in methods}) == 1 else None,
        "crop": crop,
        "color": "rgb" if args.ntire else args.color,
        "shave": 0 if args.ntire else shave,
        "lpips": lpips_metric.info if lpips_metric else None,
        # samples per LPIPS pass: batches above 1 round the convolutions differently (~1e-6)
        "lpips_batch": lpips_metric.batch if lpips_metric else None,
        "columns": columns,
        # --lr-blur as recorded (`range_text`), null for none: BLUR_COLUMNS and
        # LRPSNR_vs_input_mean downscale with that blur (docs/metrics.md)
        "lr_blur": args.lr_blur or None,
        "inf": 'written as the string "inf"',
        "device": str(device),
        # the GPU model that ran LPIPS: another model's numbers may differ at about 1e-6, so it is
        # part of the command whose scores a rerun continues (`scores_key`), as the device is
        "device_name": device_name(device) if lpips_metric else None,
        # the threads of LPIPS on the CPU: 1 and 2 differ in LPIPS_mean's 8th digit (docs/
        # metrics.md), so a job requeued onto a node of other cores is another command too
        "threads": torch.get_num_threads() if lpips_metric and device.type == "cpu" else None,
        # and the instruction set ATen's kernels take there (`cpu_capability`), and what picks
        # those of oneDNN (the convolutions) and MKL (the GEMMs): the CPU's features and the
        # environment variables that cap or change them (`cpu_kernels`): ONEDNN_MAX_CPU_ISA=AVX2
        # on an AVX-512 CPU, as an AVX2 node, changes LPIPS_mean's 7th digit, not cpu_capability
        "cpu_capability": cpu_capability() if lpips_metric and device.type == "cpu" else None,
        "cpu_kernels": cpu_kernels() if lpips_metric and device.type == "cpu" else None,
        "torch": torch.__version__,
        "version": sr_lib.__version__,
        "args": dataclasses.asdict(args),
    }
    if len(methods) == 1:
        settings["temperature"] = methods[0].temperature
        settings |= methods[0].made_by
    return settings


def cpu_capability() -> str:
    """The instruction set of ATen's CPU kernels ('AVX512', 'AVX2', 'DEFAULT': the machine's,
    or ATEN_CPU_CAPABILITY's). On this AMD EPYC (torch 2.14.1, one thread, random-weight LPIPS,
    docs/benchmarks.md) the AVX2 and AVX-512 paths of ATen alone give the same numbers to the
    bit, and ATen's DEFAULT (no SIMD) differs in LPIPS_mean's 8th digit. The convolutions run in
    oneDNN, whose kernels this does not tell (`cpu_kernels`)."""
    return torch.backends.cpu.get_cpu_capability()


CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo's names of the CPU features that oneDNN and MKL pick their kernels by (x86: the
# levels sse41 ... avx512_core_amx_fp16 of oneDNN's cpu_isa_t, and AVX-VNNI, AMX; Arm: NEON,
# SVE, BF16, I8MM). Only these: the others (a mitigation flag a microcode update adds, md_clear)
# would make two identical nodes two commands.
KERNEL_FEATURES = frozenset(
    "sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma "
    "avx512vbmi avx512_vnni avx512_bf16 avx512_fp16 avx_vnni avx_vnni_int8 avx_ne_convert "
    "amx_tile amx_bf16 amx_int8 amx_fp16 amx_complex "
    "asimd asimdhp asimddp fphp sve sve2 bf16 i8mm svebf16 svei8mm sme sme2".split()
)
# The environment variables that change those kernels' numbers: oneDNN's (ONEDNN_ or DNNL_)
# instruction-set cap (ONEDNN_MAX_CPU_ISA=AVX2: LPIPS_mean's 7th digit, docs/benchmarks.md), its
# ISA hints and its floating-point math mode (BF16 lets it round float32 to bfloat16), and MKL's
# cap and reproducibility branch (MKL_CBWR=COMPATIBLE: LPIPS_mean's 8th digit, measured). Not
# those that change no number (ONEDNN_VERBOSE, JIT_DUMP, caches).
KERNEL_ENV = (
    *(f"{lib}_{name}" for name in ("MAX_CPU_ISA", "CPU_ISA_HINTS", "DEFAULT_FPMATH_MODE")
      for lib in ("ONEDNN", "DNNL")),
    "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
)  # fmt: skip


def cpu_kernels() -> dict:
    """What picks the kernels of LPIPS on the CPU beside ATen's (`cpu_capability`): oneDNN runs
    its convolutions (`onednn`: torch's oneDNN on), MKL the GEMMs of some; both take their
    kernels from the CPU's features (cpuid) and the environment, not from
    ATEN_CPU_CAPABILITY: ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU changes every LPIPS-made
    number of a run (LPIPS_mean's 7th digit), cpu_capability 'AVX512' all the same
    (docs/benchmarks.md). So the key holds the machine, the CPU's vendor (MKL
    takes other paths on other vendors' CPUs), its `KERNEL_FEATURES` and the `KERNEL_ENV`
    variables set: the same on identical nodes (no model name, stepping or microcode), another
    command on a node of other features or capped otherwise. Where the features cannot be read
    (no /proc/cpuinfo: macOS, a BSD; none listed in it: POWER), the machine's name stands for
    them (`host`): a stopped run continues on that machine only."""
    vendor, features = cpu_features()
    kernels = {
        "machine": platform.machine(),
        "vendor": vendor,
        "features": features,
        "onednn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
    }
    return kernels if features is not None else {**kernels, "host": socket.gethostname()}


def cpu_features() -> tuple[str | None, list[str] | None]:
    """(vendor, the sorted `KERNEL_FEATURES` it has) of the first CPU of /proc/cpuinfo (x86:
    vendor_id and flags; Arm: CPU implementer and Features); (None, None) where it cannot be
    read or lists no features."""
    fields = {}
    with suppress(OSError, UnicodeDecodeError), open(CPUINFO, encoding="utf-8") as f:
        for line in f:
            name, sep, value = line.partition(":")
            if not sep:
                if fields:
                    break  # (the first CPU's block ends: the others are the same)
                continue
            fields.setdefault(name.strip(), value.strip())
    listed = fields.get("flags", fields.get("Features"))
    if listed is None:
        return None, None
    vendor = fields.get("vendor_id", fields.get("CPU implementer"))
    return vendor, sorted(KERNEL_FEATURES & set(listed.split()))


def device_name(device) -> str | None:
    """The model of CUDA `device` (torch.cuda.get_device_name: 'NVIDIA H100 80GB HBM3'); None for
    another device."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def check_flags(
    args: EvalArgs, given: set[str] = frozenset()
) -> tuple[int, torch.device, int, tuple | None]:
    """(border shave, device, LPIPS batch, --lpips-weights as read: (state_dict, sha256) or
    None); a one-line usage error for a bad combination. The output files and folder are proved
    writable here, and OUT.partial (`partial_path`) no folder, before any long work. --lr-blur
    is rewritten as its text recorded (`range_text`: 2 and 2.0 one value, 0 and none "")."""
    if args.scale not in (2, 3, 4, 8):
        raise UsageError(f"--scale {args.scale}: choose 2, 3, 4 or 8")
    refuse_empty(args, given, {"lr_blur": EMPTY_DEGRADATION["lr_blur"]})
    args.lr_blur = range_text(degradation_range(args.lr_blur, "--lr-blur"))
    if args.ntire and args.lr_blur:  # (the official LR-PSNR is the bicubic one, to the bit)
        raise UsageError(f"--ntire --lr-blur {args.lr_blur}: the official LR-PSNR downscales by "
                         "bicubic alone; drop --ntire (LRPSNR_blur_* then follow the official "
                         "columns) or --lr-blur")  # fmt: skip
    paths = dict(hr=args.hr, lr=args.lr, lpips_weights=args.lpips_weights, out=args.out,
                 csv=args.csv, report=args.report, uncertainty=args.uncertainty)  # fmt: skip
    for name, path in [*paths.items(), *(("sr", p) for p in args.sr)]:
        if path == "":  # `--csv "$CSV"` with CSV unset: no file
            flag = "--" + name.replace("_", "-")  # (and the default LPIPS weights, silently)
            raise UsageError(f"{flag} {path!r}: an empty path (an unset shell variable?); give one")
    if args.n < 1:
        raise UsageError(f"--n {args.n}: the number of samples per image must be at least 1")
    if args.no_lpips and args.lpips_weights:
        raise UsageError("--no-lpips and --lpips-weights exclude each other; give one")
    if args.no_lpips and args.pairwise:
        raise UsageError("--pairwise is LPIPS between the samples: drop --no-lpips or --pairwise")
    if args.ntire and (args.lr or args.shave is not None or args.color != "rgb"):
        raise UsageError("--ntire reports only the official columns; drop --lr/--shave/--color")
    if args.shave is not None and args.shave < 0:
        raise UsageError(f"--shave {args.shave}: must be >= 0")
    if args.lpips_batch is not None and args.lpips_batch < 1:
        raise UsageError(f"--lpips-batch {args.lpips_batch}: must be >= 1")
    if args.json and STDOUT in (args.out, args.csv):
        flag = "--out" if args.out == STDOUT else "--csv"
        raise UsageError(f"--json and {flag} - would both write to standard output; give {flag} "
                         "a file name, or drop --json")  # fmt: skip
    if args.out == args.csv == STDOUT:
        raise UsageError("--out - and --csv - would both write to standard output; give one of "
                         "them a file name")  # fmt: skip
    # (realpath, not Path.resolve: an output that is a loop of links is its own line below,
    # check_out_file's, not resolve's RuntimeError traceback where another output is given)
    named = (("--out", args.out), ("--csv", args.csv), ("--report", args.report))
    real = {flag: Path(os.path.realpath(p)) if p else None for flag, p in named}
    if args.out and args.csv and real["--out"] == real["--csv"]:
        raise UsageError(f"--out and --csv are the same file {args.out}; give two names")
    for flag, path in (("--out", args.out), ("--csv", args.csv)):
        # the report writes index.html, plots/ and images/ there, and may add names later
        inside = path not in (None, STDOUT) and args.report and real["--report"] in (
            real[flag], *real[flag].parents)  # fmt: skip
        if inside:
            raise UsageError(f"{flag} {path} is inside --report {args.report}, whose files may "
                             f"replace it; give {flag} a path outside that folder")  # fmt: skip
    if args.hr != "demo" and describe_path(args.hr):  # its line before the LPIPS weights'
        hr_images(args.hr)  # (offline, a mistyped --hr was exit 6: the weights not found)
    device = unused_device(args.device) if args.no_lpips else pick_device(args.device)
    lpips_read = None
    if not args.no_lpips:
        if args.lpips_weights and (said := describe_path(args.lpips_weights, "file")):
            raise CheckpointError(f"--lpips-weights {args.lpips_weights}: {said}")
        try:  # LPIPS's weights, found and read before any output is made or any image read
            if args.lpips_weights:  # kept for load_lpips: the file is read once (it may be big)
                lpips_read = read_state_dict(args.lpips_weights)
            else:
                resolve("alexnet")
        except CheckpointError as e:
            raise lpips_error(e, args.lpips_weights) from None
    for flag, path, example in (("--out", args.out, "out.json"), ("--csv", args.csv, "out.csv")):
        if path and path != STDOUT:
            check_out_file(path, flag, example)
    if partial := partial_path(args):
        check_partial(args, partial)
    shave = args.scale if args.shave is None else args.shave
    return shave, device, args.lpips_batch or (4 if device.type == "cuda" else 1), lpips_read


def check_partial(args: EvalArgs, partial: Path) -> None:
    """OUT.partial (`partial_path`), where the scores so far are written after each image,
    checked before any work, as --out and --csv are (`check_out_file`): a folder there, a loop of
    symbolic links or a link into a missing folder (`write_target`) was found at the first
    image's write, the image scored for nothing, and the line named no flag. One line naming
    the flag, exit 7."""
    flag = "--out" if args.out and args.out != STDOUT else "--csv"
    where = (f"{flag} {args.out if flag == '--out' else args.csv}: {partial}, where its scores "
             "so far are kept (a stopped run continues from them), is")  # fmt: skip
    try:
        write_target(partial)
    except OutputError as e:
        raise OutputError(f"{where} {str(e).removeprefix(f'{partial}: ')}") from None
    if partial.exists() and not partial.is_file():
        raise OutputError(f"{where} a folder or another non-file; move it away")


def unused_device(name: str) -> torch.device:
    """--device with --no-lpips, where it runs nothing (LPIPS alone runs there; PSNR and SSIM on
    the CPU, which the settings record): a CUDA GPU this machine lacks is no error (one script
    run on nodes with and without GPUs failed on those without; `warn_unused` says it is
    ignored), but a --device no script takes (mps, a typo) is still refused, as without."""
    try:
        pick_device(name)
    except UsageError:
        if not re.fullmatch(r"cuda(:\d+)?", name):
            raise
    return torch.device("cpu")


def hr_images(hr: str) -> dict[str, Path]:
    """stem -> ground-truth file of --hr in the one image order (a folder, or 'demo': the demo
    validation photographs, as sr_sample.py --input demo)."""
    if hr == "demo":
        return {p.stem: p for p in demo_files("val")}
    hr_dir = Path(hr)
    if what := describe_path(hr_dir, builtins=("demo",)):
        raise DataError(f"--hr {hr_dir}: {what}")
    dangling: list[Path] = []
    try:  # (no warning of the links: the error line below says it all)
        files = list_images(hr_dir, recursive=False, dangling=dangling, say_links=False)
    except DataError:  # ("no images found": a folder of links alone, its dataset moved)
        if not dangling:
            raise
    if dangling:  # the means over fewer images than the dataset, compared as the whole: refused
        link = dangling[0]
        more = f" (and {len(dangling) - 1} more such link(s))" if len(dangling) > 1 else ""
        raise DataError(f"--hr {hr_dir}: {shell_quote(link.name)} is {link_to_nothing(link)}"
                        f"{more}: the scores would leave out its image; restore the link's "
                        "target or remove the link")  # fmt: skip
    dup = shared_stem(files)
    if dup is not None:
        raise DataError(f"--hr {hr_dir}: two images share the stem {dup!r}; rename one")
    return {p.stem: p for p in files}


def check_not_inputs(args: EvalArgs, hr: dict[str, Path], methods, lr_files, sigma_files) -> None:
    """--out and --csv may not name a file this run reads (--csv HR/0801.png, --out given a
    sample's name): writing the results there would replace the user's image with text, found
    only by the next run. Compared as files (links followed), only where an output exists."""
    flags = (("--out", args.out), ("--csv", args.csv))
    outputs = [(flag, Path(p)) for flag, p in flags if p and p != STDOUT]
    there = [(flag, p) for flag, p in outputs if p.exists()]  # a new file replaces nothing
    inputs = [f for _, _, files in run_inputs(args, hr, methods, lr_files, sigma_files)
              for f in files] if there else []  # fmt: skip
    for flag, path in there:
        if same_files([path], inputs):
            raise UsageError(f"{flag} {path} is one of this run's input files, which the results "
                             f"would replace; give {flag} another path")  # fmt: skip
    check_not_listed(args, methods, outputs)


def check_not_listed(args: EvalArgs, methods, outputs: list[tuple[str, Path]]) -> None:
    """--out or --csv named like an image (--csv HR/x.png) in a folder whose images this run
    lists (--hr, --sr and its sweep folders, --lr): the next run would list the results as an
    image and fail on them (exit 3), or make a row of a sweep folder. Refused before any work;
    compared by folder, links followed."""
    folders = [("--hr", args.hr)] if args.hr != "demo" else []
    folders += [("--sr", parse_sr(spec, args.n)[1]) for spec in args.sr]
    folders += [("--sr", m.sr_dir) for m in methods] + ([("--lr", args.lr)] if args.lr else [])
    kinds = IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS
    for flag, path in outputs:
        if path.suffix.lower() not in kinds or path.name.startswith("."):
            continue  # (list_images skips hidden files)
        where = path.parent.resolve()
        for in_flag, folder in folders:
            if Path(folder).resolve() == where:
                raise UsageError(f"{flag} {path} is named like an image in {in_flag} {folder}, "
                                 "whose images this run reads: the next run would read it as "
                                 f"one; give {flag} a path outside that folder")  # fmt: skip


def run_inputs(args: EvalArgs, hr: dict[str, Path], methods, lr_files, sigma_files) -> list:
    """This run's inputs, [(flag, its value, the files read through it)]: the --sr folders'
    manifest.json and ntire_index.json among theirs, --lpips-weights its own file."""
    sr = [("--sr", m.sr_dir, [f for fs in m.files for f in fs]
           + [m.sr_dir / name for name in ("manifest.json", "ntire_index.json")])
          for m in methods]  # fmt: skip
    return [("--hr", args.hr, list(hr.values())), *sr, ("--lr", args.lr, lr_files or []),
            ("--uncertainty", args.uncertainty, sigma_files or []),
            ("--lpips-weights", args.lpips_weights, [args.lpips_weights] if args.lpips_weights
             else [])]  # fmt: skip


def check_not_in_report(args: EvalArgs, hr: dict[str, Path], methods, lr_files, sigma_files):
    """No input may lie in what --report DIR writes: DIR/index.html, DIR/plots, DIR/images (--hr
    DIR/images, a data folder that keeps its images in images/): the report would write its
    panels among them, a run that stops would delete them with its half report, and a rerun would
    move them aside with the earlier report. Compared by path, links followed (a hard link there
    is another name: an earlier report's panels are hard links of this run's inputs)."""
    # (realpath, not Path.resolve: a loop of links there is `write_target`'s line, not a
    # RuntimeError's traceback)
    parts = {part: Path(os.path.realpath(Path(args.report) / part)) for part in report.PARTS}
    for flag, path, files in run_inputs(args, hr, methods, lr_files, sigma_files):
        for name in filter(None, [path, *files]):
            where = Path(os.path.realpath(name))
            part = next((p for p, real in parts.items() if where.is_relative_to(real)), None)
            if part is not None:
                what = f"{flag} {path}" + ("" if name == path else f": its file {name}")
                raise UsageError(f"{what} lies in {Path(args.report) / part}, which --report "
                                 f"{args.report} writes (a rerun moves it aside, a stopped run "
                                 "deletes it); give --report another folder")  # fmt: skip


def check_no_stray_parts(report_dir: Path) -> None:
    """A DIR/index.html that is not a page of sr_eval.py (`report.is_report_page`: the user's
    own, beside their own images/) refused: the run would move it and its images/ and plots/
    into DIR/old and delete them once its page is written.
    DIR/images or DIR/plots without DIR/index.html (the user's own files, or a half report of
    an srspace before report.UNFINISHED) refused: no earlier report is moved aside (`set_aside`
    moves a page's), so the run would write its panels among those files, replacing those of its
    names, and a run that stops would delete both folders whole (report.removed_if_unfinished).
    Whose files they are cannot be told, so the user moves or deletes them. A killed run's half
    report, told by its UNFINISHED mark, is deleted when the scoring starts (report.started).
    A DIR/index.html that is a link the page cannot be written through (to a missing folder, a
    loop: `write_target`) is one line now, not after every image is scored; one to a missing file
    beside DIR/images or DIR/plots is refused as no page, its line naming the link's target."""
    index = report_dir / "index.html"  # (a link that leads nowhere: no page, written through)
    write_target(index)
    if index.exists() and not report.is_report_page(index):
        raise UsageError(f"--report {report_dir}: {index} is not a page of sr_eval.py (no "
                         f"{report.GENERATOR} in its head); the report would move it to "
                         f"{report_dir / REPORT_OLD} and delete it: move it away, or give "
                         "--report another folder")  # fmt: skip
    if index.exists() or report.half_report(report_dir):
        return  # (an earlier report, moved aside; a killed run's half one: `report.started`)
    for part in [p for p in report.PARTS if p != "index.html"]:
        if exists(report_dir / part) and index.is_symlink():  # (its page's file gone: whose?)
            raise UsageError(f"--report {report_dir}: {report_dir / part} is there, but {index} "
                             f"is {link_to_nothing(index)}, so "
                             "no page tells whose files it holds; the report would write among "
                             "them and a stopped run delete them: restore the link's target, "
                             f"move or delete {report_dir / part}, or give --report another "
                             "folder")  # fmt: skip
        if exists(report_dir / part):
            raise UsageError(f"--report {report_dir}: {report_dir / part} is there but no "
                             f"{report_dir / 'index.html'} (files not of a report of sr_eval.py); "
                             "the report would write among them and a stopped "
                             "run delete them: move or delete it, or give --report another "
                             "folder")  # fmt: skip


def lr_inputs(lr: str, stems: list[str], scale: int) -> list[Path]:
    """Per HR image its LR input in --lr: DIV2K's {stem}x{scale}.png, else {stem}.png, as
    sr_train.py's --lr-data pairs them (`lr_partners`: with HR 0001.png and 0001x4.png, their LR
    0001x4.png and 0001x4x4.png, both took 0001x4.png)."""
    if what := describe_path(lr):
        raise DataError(f"--lr {lr}: {what}")
    have = images_by_stem(Path(lr))
    for s, partner in zip(stems, partners := lr_partners(stems, have, scale)):
        if partner is None:
            names = " or ".join(shell_quote(f"{s}{x}.png") for x in ("", f"x{scale}"))
            theirs = lr_taken(stems, have, scale, s).replace("the HR folder", "--hr")
            raise DataError(f"--lr {lr}: no LR image {names}{theirs}")
    return [have[partner] for partner in partners]


def sigma_maps(folder: str, stems: list[str], scale: int, ntire: bool) -> list[Path]:
    """Per HR image its sigma map in --uncertainty (sr_sample.py --save-uncertainty), named as
    the samples: {k:06d}_sigma.npy (--layout ntire; its ntire_index.json is checked),
    {stem}_sigma.npy or {stem}x{scale}_sigma.npy."""
    if ntire:
        raise UsageError("--ntire reports only the official columns; drop --uncertainty")
    sigma_dir = Path(folder)
    if what := describe_path(sigma_dir):
        raise DataError(f"--uncertainty {folder}: {what}")
    layouts = [lambda k, s: f"{k:06d}_sigma.npy", lambda k, s: f"{s}_sigma.npy"]
    layouts.append(lambda k, s: f"{s}x{scale}_sigma.npy")  # (as the samples: find_samples)
    best = best_layout([lambda k, s, f=f: (sigma_dir / f(k, s)).is_file() for f in layouts], stems)
    if best is None:
        tried = " or ".join(shell_quote(f(0, stems[0])) for f in layouts)
        raise DataError(
            f"--uncertainty {folder}: no sigma map for the first HR image {stems[0]} (expected "
            f"{tried}; sr_sample.py --save-uncertainty writes them for a model with an "
            "uncertainty output, e.g. sr_train.py --loss le)"
        )
    if best == 0:
        check_index(sigma_dir, stems, scale)
    files = [sigma_dir / layouts[best](k, s) for k, s in enumerate(stems)]
    for s, f in zip(stems, files):
        if not f.is_file():  # others are there: a run interrupted or sampled from fewer images
            raise DataError(f"--uncertainty: missing {f}, the sigma map of image {s}; rerun the "
                            "sr_sample.py command that made the folder to complete it")  # fmt: skip
    return files


def read_sigma(path: Path, size: tuple[int, int] | None, header: bool = False) -> np.ndarray:
    """The sigma map `path` (--uncertainty) as sr_sample.py --save-uncertainty writes it: a float
    (3, H, W) array (or (H, W, 3)) of the size (H, W) of the samples it is of (`size`: the first
    sample of the first --sr folder, the mu it is scored with; None: unknown, not checked).
    `header`: memory-mapped, the data not read (check_headers). A file that is no such array (cut
    short, another array, another image's map or an LR-sized one) is a DataError naming it: its
    PLL would be a traceback, or numbers of the top-left corner the two share."""
    redo = "rerun the sr_sample.py --save-uncertainty command that made it"
    try:
        sigma = np.load(path, mmap_mode="r" if header else None)  # (no pickles: allow_pickle)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"--uncertainty: {path}: not a readable .npy array ({e}); {redo}") from None
    shape = sigma.shape
    chw = len(shape) == 3 and shape[0] == 3 and shape[-1] != 3  # as metrics.pll reads it
    hw = shape[1:] if chw else shape[:2] if len(shape) == 3 and shape[-1] == 3 else None
    if sigma.dtype.kind != "f" or hw is None or (size is not None and tuple(hw) != tuple(size)):
        want = "(3, H, W)" if size is None else f"(3, {size[0]}, {size[1]})"
        of = "" if size is None else ", the size of the samples it is of"
        raise DataError(f"--uncertainty: {path}: a {sigma.dtype} array of shape {shape}, not a "
                        f"float sigma map {want}{of}; {redo}")  # fmt: skip
    return sigma


def load_lpips(weights: str | None, device, batch: int, read: tuple | None = None):
    """The official LPIPS model (ImageNet AlexNet trunk + the v0.1 heads of the lpips package),
    or that of --lpips-weights `weights` (`read`: its state_dict and sha256, as check_flags read
    them)."""
    try:
        return metrics.LpipsMetric.load(weights, device, batch, read=read)
    except CheckpointError as e:
        raise lpips_error(e, weights) from None


def lpips_error(e: CheckpointError, weights: str | None) -> CheckpointError:
    """`e` of the LPIPS weights (`weights`: --lpips-weights), saying so and how to do without."""
    hint = "" if weights else "; or pass --no-lpips to skip LPIPS_mean and score"
    return CheckpointError(f"LPIPS: {e}{hint}")


def check_sizes(gt, lr, samples, names, gt_name: str, lr_name: str | None, scale: int) -> None:
    """Wrong folders give errors, not numbers: an SR larger than its HR (rounded up to a multiple
    of the scale: an LR of ceil(H / scale) rows) was not made from it, and an LR must be HR/scale
    (between the official crop's and the rounded-up size). Smaller SRs: evaluate_image. gt, lr
    (or None), samples: the shapes, or the (H, W) from the headers (check_headers)."""
    h, w = gt[:2]
    up_h, up_w = -(-h // scale), -(-w // scale)  # ceil(H / scale)
    for (sh, sw, *_), name in zip(samples, names):
        if sh > up_h * scale or sw > up_w * scale:
            raise DataError(
                f"{name}: SR is {sw}x{sh} (WxH), larger than its ground truth {gt_name} ({w}x{h}) "
                f"allows at x{scale}; is --hr the HR folder of these samples?"
            )
    if lr is None:
        return
    mod = metrics.official_mod(scale)
    lo_h, lo_w = h // mod * mod // scale, w // mod * mod // scale
    if not (lo_h <= lr[0] <= up_h and lo_w <= lr[1] <= up_w):
        ratio = size_ratio((h, w), lr, " of it")
        raise DataError(
            f"{lr_name}: LR is {lr[1]}x{lr[0]} (WxH), but {gt_name} ({w}x{h}) at --scale {scale} "
            f"needs about {w // scale}x{h // scale} (this LR is {ratio}); check --lr and --scale"
        )


def check_pairwise(args: EvalArgs, hr: dict[str, Path], methods, device, batch: int):
    """--pairwise: one warning naming the rows of N = 1 (no pairs: LPIPS_pairwise empty, not an
    error), and the bytes that the features kept for the pairs may take: the memory free on the
    LPIPS device (`free_memory`; None where it cannot tell: no limit), returned. An image whose
    samples' features (`metrics.pairwise_bytes`: each sample's AlexNet taps) take more has its
    pairs computed in blocks of samples (`metrics.pairwise_block`: the same numbers, trunk
    passes more). Only where the fewest it keeps at once, one LPIPS batch's (`batch` samples),
    do not fit for the largest image is it refused, before LPIPS is loaded or any image scored:
    one line naming what helps (a smaller --lpips-batch where one fits, else no --pairwise),
    exit 4, not an out-of-memory error images later. The memory free is counted less what the
    scoring of the largest image takes there beside the features (`scoring_reserve`): features
    filling all of it would leave the LPIPS pass itself out of memory."""
    single = [m.name for m in methods if m.n == 1]
    if single:
        warn(f"--pairwise: {', '.join(single)}: one sample per image (N = 1), no pairs; "
             "LPIPS_pairwise is left empty there")  # fmt: skip
    most = max(m.n for m in methods)
    free = free_memory(device) if most > 1 else None
    if free is None:
        return None
    fewest = min(batch, most)  # (samples: one batch, the smallest block)
    sizes = [(stem, size) for stem, size in ((s, image_size(p)) for s, p in hr.items()) if size]
    samples = [m.n for m in methods]
    reserve = max((scoring_reserve(size, device, batch, samples) for _, size in sizes), default=0)
    free = max(0, free - reserve)
    needs = [(metrics.pairwise_bytes(size, most, args.scale, fewest), stem, size)
             for stem, size in sizes]  # fmt: skip
    need, stem, (h, w) = max(needs, default=(0, None, (0, 0)))
    if need > free:
        where = f"on {device}" if device.type == "cuda" else "in this machine's memory"
        fits = max((k for k in range(1, fewest) if metrics.pairwise_bytes((h, w), most,
                    args.scale, k) <= free), default=0)  # fmt: skip
        smaller = f"use --lpips-batch {fits} (this run's: {batch}) or " * (fits > 0)
        one = "one sample" if fewest == 1 else f"{fewest} samples (one --lpips-batch)"
        raise OutOfMemory(
            f"--pairwise: the LPIPS features of {one} of {stem} ({w}x{h}), the fewest it keeps "
            f"at once for the pairs, take {gb(need)}, more than the {gb(free)} free {where} "
            f"beside the scoring's own {gb(reserve)}; {smaller}drop --pairwise"
        )
    return free


def scoring_reserve(size: tuple[int, int], device, batch: int, samples: list[int]) -> int:
    """Bytes that scoring an image of ground-truth `size` (H, W) takes on the LPIPS `device`
    beside --pairwise's features: one LPIPS pass of a batch (LPIPS_BYTES, measured on a CPU; a
    GPU's pass holds the same float32 maps), and in a CPU's memory also the image's files
    decoded, `samples` of each --sr folder, and as much again for the next image's (read
    ahead)."""
    px = size[0] * size[1]
    lpips = (LPIPS_BYTES[0] + LPIPS_BYTES[1] * min(batch, max(samples))) * px
    files = 2 * 3 * px * (1 + sum(samples)) if device.type == "cpu" else 0
    return lpips + files


def free_memory(device) -> int | None:
    """Bytes free on `device`: a CUDA device's, else the host's (Linux's MemAvailable, less where
    a cgroup v2 limit leaves less); None where it cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = []
    with suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        free.append(1024 * int(next(x for x in lines if x.startswith("MemAvailable:")).split()[1]))
    with suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int((cgroup / "memory.current").read_text()))
    return min(free) if free else None


def check_headers(args: EvalArgs, shave: int, hr: dict[str, Path], methods, lr_files,
                  sigma_files=None) -> None:  # fmt: skip
    """Every size check of the scoring (check_sizes, then evaluate_image's), for every image from
    its files' headers (sr_lib.data.image_size: nothing decoded; 0.3 to 1.1 s for 100 PNGs of
    2040x1352 with 10 samples each), before the LPIPS model is loaded: a wrong size in the last
    image stops the run at its start with the error its scoring would give, not after every image
    before it was scored (30 s each on a CPU). An image with a file whose header cannot tell its
    size is left to the scoring, which checks every image again on the decoded pixels. The
    sigma maps (--uncertainty) too, from their .npy headers (`read_sigma`)."""
    lpips = not args.no_lpips
    for k, gt_file in enumerate(hr.values()):
        if sigma_files:
            read_sigma(sigma_files[k], image_size(methods[0].files[k][0]), header=True)
        lr_file = lr_files[k] if lr_files else None
        gt, lr = image_size(gt_file), lr_file and image_size(lr_file)
        if gt is None or (lr_file and lr is None):
            continue
        for m in methods:
            samples = [image_size(p) for p in m.files[k]]
            if None in samples:
                continue
            names, gt_name = [str(p) for p in m.files[k]], str(gt_file)
            check_sizes(gt, lr, samples, names, gt_name, lr_file and str(lr_file), args.scale)
            metrics.check_image_sizes(
                gt, samples, args.scale, lpips, args.ntire, shave, names, gt_name
            )


def score(hr, methods, lr_files, sigma_files, columns, opts, report_dir, to_files=False,
          to_stderr=False, quiet=False, scored=None, done=(),
          blur: Degradation | None = None):  # fmt: skip
    """Per method the rows of every image (`columns`, plus PLL and PSNR_sigma for the first
    method with --uncertainty), and with a report folder the contact sheet of every image; the
    next image's files are decoded on threads meanwhile. `to_files`: the results are written to
    files, so a closed stdout does not stop the run (`unless_stdout_closed`); `to_stderr`: the
    progress is shown on stderr (stdout carries --out - or --csv -); `quiet`: not at all.
    `scored(k, rows)`: called, signals held, once image k is scored (rows: {method: its row}).
    `done`: those rows of the first images, scored by a run stopped before (`kept_scores`):
    taken as they are, the images decoded again only for their contact sheets. `blur`
    (--lr-blur): each image's sigma drawn as sr_sample.py --from-hr's, by the stem of the input
    its samples were made from (`validation_blur`, `Method.sampled`); none where it is false."""
    metrics.keep_freed_memory()  # no page faults for the large per-sample arrays
    stems = list(hr)
    files = [
        (hr[s], lr_files[k] if lr_files else None, {m.name: m.files[k] for m in methods})
        for k, s in enumerate(stems)
    ]

    tty = (sys.stderr if to_stderr else sys.stdout).isatty() and not quiet
    rows: dict[str, list[dict]] = {
        m.name: [by_method[m.name] for by_method in done] for m in methods
    }
    sheets = []
    first = 0 if report_dir else len(done)  # the first image decoded
    said: set[Path] = set()  # the folders whose larger SRs were warned of

    def once_per_folder(folder: Path):
        """evaluate_image's warning (an SR larger than its ground truth, cropped) once per --sr
        folder: SRs of LRs rounded up (scale x ceil(H / scale) rows, MATLAB's imresize of a whole
        HR) can be so in every image, a line each at N = 10 for 100 images: 1,000 lines."""

        def warn_once(message: str) -> None:
            if folder not in said:
                said.add(folder)
                opts["warn"](f"{message}; so is any other SR in {folder} larger than its ground "
                             "truth (this warning once per folder)")  # fmt: skip

        return warn_once

    def sheet(k, stem, gt, lr, samples):
        named = [(m.name, m.files[k], samples[m.name]) for m in methods]
        lr_file = lr_files[k] if lr_files else None
        return report.contact_sheet(
            report_dir, k, stem, hr[stem], gt, lr_file, lr, named, opts["scale"]
        )

    columns_shown = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    columns_shown += (TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    console = Console(stderr=to_stderr)
    bar = Progress(*columns_shown, console=console, disable=not tty, transient=True)
    # closing: an error inside the loop ends the decoding threads here, not at garbage collection.
    # A disabled bar is never started: rich before 15 prints an empty line when it stops.
    with closing(read_ahead(files[first:])) as images, bar if tty else nullcontext():
        task = bar.add_task("evaluating", total=len(stems), completed=len(done))
        for k in range(first, len(stems)):
            stem = stems[k]
            gt, lr, samples = next(images)
            if k < len(done):  # scored already: its contact sheet only
                sheets.append(sheet(k, stem, gt, lr, samples))
                continue
            if k == len(done):  # (the sheets before: not in the ETA)
                start = time.perf_counter()
            lr_name = str(lr_files[k]) if lr_files else None
            lines = []  # its log lines, shown once its scores are recorded
            for m in methods:
                imgs, names = samples[m.name], [str(p) for p in m.files[k]]
                shapes, lr_shape = [img.shape for img in imgs], None if lr is None else lr.shape
                check_sizes(
                    gt.shape, lr_shape, shapes, names, str(hr[stem]), lr_name, opts["scale"]
                )
                row = metrics.evaluate_image(
                    gt, imgs, lr=lr, names=names, gt_name=str(hr[stem]),
                    blur=validation_blur(blur, m.sampled[k]) if blur else None,  # (or false)
                    **{**opts, "warn": once_per_folder(m.sr_dir)},
                )  # fmt: skip
                rows[m.name].append({"image": stem, **{c: row[c] for c in columns}})
                if opts.get("pairwise"):
                    rows[m.name][-1][metrics.PAIRWISE_MATRIX] = row[metrics.PAIRWISE_MATRIX]
                if sigma_files and m is methods[0]:
                    sigma = read_sigma(sigma_files[k], imgs[0].shape[:2])
                    gt_s = mod_crop(gt, opts["scale"])
                    rows[m.name][-1]["PLL"] = metrics.pll(gt_s, imgs[0], sigma)
                    rows[m.name][-1]["PSNR_sigma"] = metrics.sigma_psnr(gt_s, imgs[0], sigma)
                if not (tty or quiet):  # plain log lines for SLURM logs instead of a bar
                    vals = " ".join(f"{c} {report.fmt(row[c], c)}" for c in columns)
                    took = time.perf_counter() - start
                    eta = took / (k + 1 - len(done)) * (len(stems) - k - 1)
                    lines.append(f"[{k + 1}/{len(stems)}] {stem} {m.name}: {vals} "
                                 f"({took:.1f} s, ETA {eta:.0f} s)")  # fmt: skip
            # Recorded and shown as one step: a stop between the two said that fewer images
            # were scored than the log showed (or more)
            with signals_held():
                if scored:
                    scored(k, {m.name: rows[m.name][-1] for m in methods})
                for line in lines:
                    with unless_stdout_closed(to_files):
                        show(line, to_stderr)
            if report_dir:
                sheets.append(sheet(k, stem, gt, lr, samples))
            bar.update(task, advance=1, description=stem)
    return rows, sheets


def table_widths(cells: dict[str, list[str]], headers: list[str]) -> list[int]:
    """Each column's width in a rich box table: its longest cell + 2 padding + 1 border."""
    return [
        max([len(h)] + [len(cs[j]) for cs in cells.values()]) + 3 for j, h in enumerate(headers)
    ]


def comparison_tables(means: dict, columns: list[str], title: str, methods, width: int,
                      encoding: str = "utf-8"):  # fmt: skip
    """The table as one or more rich Tables, each at most `width` columns wide: the metric
    columns are split into stacked tables, each starting with the method (N, T) columns, so
    that no name or number is ever cut. N is shown where the rows' differ (else the title says
    it), T where some row's temperature is known ('-' where not; the report's page: always).
    Names as `encoding` (stdout's) can hold them: an escape written later would shift the
    borders after it."""
    ns = {m.name: m.n for m in methods}
    ts = {m.name: "-" if m.temperature is None else f"{m.temperature:g}" for m in methods}
    shown = {"N": len(set(ns.values())) > 1, "T": any(m.temperature is not None for m in methods)}
    keys = ["method"] + [k for k, on in shown.items() if on]
    cells = {
        m: [printable(one_line(m), encoding)]
        + ([str(ns[m])] if shown["N"] else [])
        + ([ts[m]] if shown["T"] else [])
        for m in means
    }
    cells = {m: cs + [report.fmt(means[m][c], c) for c in columns] for m, cs in cells.items()}
    widths = table_widths(cells, keys + columns)
    fixed = 1 + sum(widths[: len(keys)])
    groups, current, used = [], [], fixed
    for j in range(len(columns)):
        w = widths[len(keys) + j]
        if current and used + w > width:
            groups.append(current)
            current, used = [], fixed
        current.append(j)
        used += w
    groups.append(current)
    tables = []
    for g, group in enumerate(groups):
        part = f" ({g + 1}/{len(groups)})" if len(groups) > 1 else ""
        table = Table(title=title + part)
        for c in keys + [columns[j] for j in group]:
            table.add_column(c, justify="left" if c == "method" else "right", no_wrap=True)
        for cs in cells.values():
            table.add_row(*cs[: len(keys)], *[cs[len(keys) + j] for j in group])
        tables.append(table)
    return tables


class Rendered(io.StringIO):
    """Text rendered for a file of this encoding: rich draws ASCII borders where it is not
    UTF-8 (an ASCII or latin-1 terminal), as it would on that file itself."""

    def __init__(self, encoding: str):
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self) -> str:
        return self._encoding


def print_table(means: dict, columns: list[str], title: str, methods, console=None) -> None:
    """The comparison table on stdout: the terminal's width, 160 columns in a log file. Rendered
    first, then written as text: rich's own write turns a closed pipe into a silent exit 1, where
    `unless_stdout_closed` decides what a closed stdout means for the run."""
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    # (not rich markup: a method named a[b] lost its [b] as bold, the borders their place)
    text = Console(file=Rendered(console.encoding), width=console.width,
                   color_system=console.color_system, markup=False,
                   force_terminal=console.is_terminal)  # fmt: skip
    for table in comparison_tables(means, columns, title, methods, console.width, console.encoding):
        text.print(table)
    console.file.write(text.file.getvalue())
    console.file.flush()


def json_text(settings: dict, means: dict, rows: dict, methods) -> str:
    """--out: the layout of the module docstring (no "methods" level for one --sr folder)."""
    per = {
        m.name: {
            "sr_dir": str(m.sr_dir),
            "temperature": m.temperature,
            **m.made_by,
            "n": m.n,
            "mean": {c: jsonable(v) for c, v in means[m.name].items()},
            "per_image": rows[m.name],
        }
        for m in methods
    }
    if len(per) == 1:
        only = next(iter(per.values()))
        result = {"settings": settings, "mean": only["mean"], "per_image": only["per_image"]}
    else:
        result = {"settings": settings, "methods": per}
    return json.dumps(result, indent=2, allow_nan=False) + "\n"


def csv_text(rows: dict, columns: list[str], methods) -> str:
    """--csv: one row per method and image (the temperature empty where unknown)."""
    f = io.StringIO()
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["method", "temperature", "n", "image", *columns])
    for m in methods:
        t = "" if m.temperature is None else f"{m.temperature:g}"
        for r in rows[m.name]:
            w.writerow(
                [m.name, t, m.n, r["image"], *["" if r.get(c) is None else r[c] for c in columns]]
            )
    return f.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
