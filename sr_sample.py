"""Draw n super-resolved samples per LR image from a checkpoint. Reads top to bottom.

    python sr_sample.py --ckpt runs/srflow_x4/best.pt --input lr/ --n 10 --out samples/
    python sr_sample.py --ckpt best.pt --input DIV2K_valid_HR/ --from-hr --layout ntire --out sub/
    python sr_sample.py --ckpt best.pt --input lr/ --temperature 0 0.5 0.9 1 --out sweep/

Files written to a sample folder (what sr_eval.py reads). NAME is the input's stem, or with
--layout ntire its 0-based position k in the one image order (sr_lib.data.image_order) as
{k:06d} (the NTIRE21 submission names). Each PNG has the input's form: gray for a gray LR (the
model sees it as RGB; each sample is turned back by BT.601 luma, `to_gray`), with the LR's alpha
upscaled (MATLAB bicubic, clipped; --alpha-upsampler model: the model's temperature-0 output of
it as a gray LR, one for every sample, `model_alpha`; --alpha-channel drop: without; a rerun
may change either flag where no input has alpha), 8-bit, or
16-bit with --bit-depth 16 (which also gives the model a 16-bit LR at full precision, not
rounded to 8 bits):
  NAME_sample{i:05d}.png  sample i = 0..n-1; with --n 1 a single-output (deterministic) model,
                          and with --layout ntire any model, writes NAME.png instead (the
                          challenge's measure.py reads 000000.png at N = 1)
  NAME_sigma.png, .npy    --save-uncertainty, models with an uncertainty output: sigma in [0, 1]
                          as a 16-bit gray PNG of round(mean over RGB of sigma * 65535), and the
                          float32 (3, H, W) array as .npy
  NAME_grid.png           --grid: one labelled row [LR enlarged (nearest) | the n samples,
                          at most the first 16 | per-pixel std across all n samples (stochastic
                          models) | sigma], maps normalised to their max (black, red, yellow,
                          white); 8-bit, no alpha, gray (luma) for a gray LR
  NAME_sample{i:05d}.latent.npz
                          --save-latent: sample i's float32 latent, temperature applied (so
                          named also where the sample is NAME.png: sample 0): refvae and varsr
                          its z0 (D,), flows (srflow, srflow_da, ncsr) its fields z0, z1, ...
                          (C, h, w) at the LR's size; and made_by (JSON: model, scale,
                          checkpoint sha256, config); `--latent FILE|DIR` decodes it to the
                          same sample again (a flow's: an LR of that size; another model or
                          scale is refused, another checkpoint of it a warning, wherever the
                          file was copied). An older srspace wrote refvae's and varsr's as a
                          bare (D,) NAME_sample{i:05d}.latent.npy, no made_by: read still (what
                          saved it: its folder's manifest.json, checked so; none: a warning),
                          and a rerun takes it for its sample's latent (--overwrite: replaced)
  manifest.json           the settings that made the folder (checkpoint sha256, model, config,
                          scale, temperature, n, seed, ..., "names": the NAMEs of the inputs of
                          every run there, the sha256 of the control files:
                          --ref FILE|DIR, --latent-from, --latent FILE|DIR, --latent-shift); a
                          rerun with other settings or other control file contents is refused
                          unless --overwrite (not for a flag of no effect, one warning line:
                          --seed and --temperature where a control sets the latents or the model
                          is deterministic, --latent-steps without --latent-shift); another
                          --n is not (sample i is the same whatever n): a larger one adds the
                          samples missing, a smaller one takes the first n there, and n records
                          the largest; refused where n 1 is one NAME.png (a deterministic model,
                          --layout ntire), a control flag sets n, or --grid asks fewer; another
                          srspace version is one warning line, before its first image
                          sampled there (the images complete keep their samples: an upgrade
                          between a preemption and its requeue; "versions" records each that
                          sampled, once it has; where a stop gave up waiting for the manifest's
                          lock, .unrecorded-versions.json keeps it for the next run to record)
  ntire_index.json        --layout ntire: {"scale": s, "000000": STEM, ...} for every input
The sample folder is --out with one --temperature, and --out/T{t} (e.g. T0.9, T1) for each of
several: the LR-only work of the model (its encoder, conditioning) is then done once per image for
all temperatures. --from-hr writes the LR it makes to --out/lr/{stem}.png (HR mod-cropped to a
multiple of 8, of 3 at x3; MATLAB bicubic downscale, of the alpha too; uint8, or float at
--bit-depth 16; written in the samples' form): give it to sr_eval --lr.

Sampling controls (a model without the control stops with a one-line usage error):
  --ref FILE|DIR|noise|lr|prior   refvae: a reference image (n samples); one output per image of
                          a folder (n = their number); noise (default): a Gaussian-noise reference
                          per sample; lr: the LR image itself; prior: z ~ N(0, I), no reference
  --latent-from HR        varsr: the HR encoder's latent of another HR image (one output)
  --latent FILE           decode saved latents, (D,) or (k, D): one output per row (a .npz of
                          z0 and made_by, or a bare .npy; flows: a .npz of fields z0, z1, ...
                          (C, h, w) or (k, C, h, w)); another model's or scale's is refused
                          (as a file of another shape: exit 3, one line naming it and what
                          was expected)
  --latent DIR            decode a whole --save-latent run again: each input NAME from its own
                          files NAME_sample{i:05d}.latent.npz there (refvae, varsr: or .npy,
                          as an older srspace saved them; both of one sample refused; NAME
                          the whole stem, or in a --layout ntire run's folder the number its
                          ntire_index.json gives that stem; there NAME.latent.npy|.npz too, as
                          sample 0: the name of a --layout ntire --n 1 run's files before they were
                          numbered), sample i to NAME_sample{i:05d}.png, the same i (gaps stay
                          gaps; --layout ntire at N = 1: NAME.png), bit for bit the saved sample
                          with the same flags. Refused in one line before any work (exit 2):
                          inputs without files there (how many, which: give --input those with
                          files; a sweep's folder: which DIR/T* to give; numbered files without
                          their ntire_index.json), --latent-shift, --ref, --latent-from,
                          --layout ntire where the numbers are not 0..N-1 of every image, and
                          DIR as --out (its samples would be replaced); exit 3: files of another
                          model's kind, of several samples or of other shapes. A flow's
                          made_by is checked per file (another checkpoint: one warning line
                          for the folder). manifest.json: n = the highest number + 1, and the
                          joint digest of every input's files (of every
                          --shard; input order, then by number; a .npz's: its zip directory's
                          CRC-32s, so a shard reads only its own files whole): each of those
                          (of an image not complete already) is read before the run and again
                          when decoded
  --latent-shift FILE --latent-steps -2,-1,0,1,2
                          refvae, varsr, flows: walk z_k = z_0 + k·direction (one output per
                          step); z_0 = --latent, or the model's temperature-0 latent of the
                          controls given (varsr: μ_L; flows: zeros); a flow's direction is a
                          .npz of fields z0, z1, ... (C, h, w), e.g. two saved latents' difference
Sample i of image `stem` draws from the stream sample_seed(--seed, stem, i), so it depends neither
on file order, --batch, --n, --shard nor on the other temperatures of a sweep (at another
temperature it is the same draw, scaled).

Clusters: --shard I/N samples images I, I+N, I+2N, ... of the order (0 <= I < N; `auto`: shard
(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP of SLURM_ARRAY_TASK_COUNT, MIN
0 and STEP 1 where unset, for an array given as a range MIN-MAX[:STEP], SLURM_ARRAY_TASK_MAX its
check: a list such as --array=1,3,7 is refused). Every file is written atomically (a temporary
name, then a rename), and an image whose files all exist is skipped, so a killed or preempted run
continues where it stopped when rerun (--overwrite redoes everything, first deleting the files
named above of the images it samples, in a folder that has a manifest.json; refused, exit 2, where
that folder holds such files of images not among --input: `refuse_others_kept`, or --out a sample
folder of the other kind: a sweep over a one-temperature run's files, or the reverse, its T*/).
Every task of an array must see the same inputs: an image added to or removed from the input folder
would move the others between the shards, some then sampled by none; so a --shard I/N (N > 1) of
another list than the folder's is refused (--layout stem: manifest.json's inputs, the count and
sha256 of the input names in order; a run of every image, --shard 0/1, records its own list once it
has sampled them all; --layout ntire numbers the images by position: its ntire_index.json refuses
any run of another list). --out may be the --input folder: files there named NAME_sample{i:05d},
NAME_sigma or NAME_grid (NAME another input's stem or a 6-digit NTIRE number) are then samples,
left out of the inputs with a warning; a deterministic model's NAME.png would replace its input
there (--layout ntire: any model's 000000.png of --n 1 would be an input of a rerun), so that run
is refused, as is any run that would write one of its inputs (--input FILE in --out; --from-hr
given OUT/lr).
SIGTERM, SIGUSR1 or SIGHUP stop the run with exit 75 (the files being read or written are finished
first; PNGs are written on threads while the next samples are drawn); Ctrl-C: exit 130 (only the
files begun are finished).

Tiling (--tile PX, LR px; 0 = whole image): the LR is cut into tiles of PX (rounded down to the
model's lr_multiple) and each is computed with --tile-overlap LR px of context on every side,
which is cut away. The model's LR-only work runs on the whole image and is cut per tile, and each
noise field is drawn at whole-image size and cut, so with the default context, the model's
receptive field (`tile_halo`; docs/design.md, "Tiled sampling"), a tiled sample equals the untiled
one up to float rounding (a tile's sums run in another order: now and then a pixel one 8-bit level
off). A CUDA out-of-memory error retries the image with tiles halved, down to 64 px (then one
line, exit 4, names what lowers the memory for this run: out_of_memory_line). A rerun may
change --tile and --tile-overlap while the samples stay one setting's: exact tiles (at least
the default context), or tiles that cut no image (a --tile that holds every image sampled in
the folder whole, told by the samples' sizes, or every input of the run); manifest.json's
tile_context then records the tiles of every sample there (`settle_tiles`); other tiles are
refused. Without --tile, --tile-overlap is unused (a warning): an
out-of-memory retry's tiles take the exact context, as for an image --tile holds whole.
--check-invertibility (flows): instead of writing samples, each is encoded back to its latents
and decoded again, and |x - x'| reported per image (docs/flows.md#invertibility); exit 5 above
the tolerance (an unreadable input skipped, as in sampling: exit 3). --out is then not needed.
Exit codes: 0 ok, 2 bad flag or a folder of other settings, 3 unusable input (unreadable images,
and LRs smaller than the model takes, are reported and skipped, the others written, exit 3 at the
end; so are an --input folder's symbolic links to missing files, which no shard lists; a
--latent or --latent-shift file that cannot be used, or a --latent DIR without the files of an
input or with two of one sample, stops before any work), 4 out
of memory, 5 a NaN sample or a flow that does not invert (--check-invertibility), 6 checkpoint
problem, 7 output cannot be written, 75 stopped by SIGTERM/SIGUSR1/SIGHUP, 130 Ctrl-C.
"""

import os

if os.name != "posix":  # before the imports that need POSIX (fcntl, SIGUSR1): one line, exit 2
    from sr_lib import refuse_non_posix

    refuse_non_posix("sr_sample.py")

import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import math
import re
import signal
import stat
import sys
import threading
import time
import zipfile
from argparse import ArgumentTypeError
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Optional

if __name__ == "__main__":  # before torch's import (seconds): a stop signal then is not lost
    from sr_lib.errors import record_stop_signals, require_packages

    record_stop_signals()
    require_packages("sr_sample.py")

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sr_lib import __version__
from sr_lib.config import (
    amp_emulated,
    asks_json,
    autocast_for,
    given_fields,
    parse,
    pick_device,
    refuse_stdio,
)
from sr_lib.data import (
    EMPTY_DEGRADATION,
    check_out_dir,
    cpu_workers,
    default_mod,
    degradation_flags,
    degradation_of,
    demo_files,
    describe_path,
    encode_png,
    equal_channels,
    first_said,
    header_alpha,
    image_size,
    links_said,
    list_images,
    mod_crop,
    name_max,
    normalise_degradation,
    read_planes,
    refuse_empty,
    shared_stem,
    shell_quote,
    to_tensor,
    to_uint8,
    to_uint16,
    validation_degradation,
    write_encoded_png,
    write_npy,
    write_npz,
    write_png,
    write_text,
)
from sr_lib.errors import (
    PREEMPT_SIGNALS,
    CheckpointError,
    DataError,
    NonFiniteError,
    OutOfMemory,
    OutputError,
    Preempted,
    Stopped,
    Summary,
    UsageError,
    any_of,
    catch,
    exit_on_error,
    host_out_of_memory,
    is_out_of_memory,
    one_line,
    print_out,
    quoted_errors,
    replay_stop_signal,
    said_error,
    say_err,
    stdout_closed,
)
from sr_lib.models import MODELS, load_model, read_checkpoint_hashed
from sr_lib.models.base import (
    LATENT_SOURCE,
    NoiseSource,
    lr_fits,
    option,
    other_checkpoint,
    pad_to_multiple,
    sample_seed,
)
from sr_lib.resize import imresize
from sr_lib.threads import (
    done,
    finish,
    held_here,
    new_pool,
    result,
    signals_held,
    stop_pending,
    stop_pools,
    submit,
    when_not_held,
)
from sr_lib.tiling import DEFAULT_CONTEXT, draw, grid, prepare, upscale
from sr_lib.weights import sha256_file

PROG = "sr_sample.py"
# the line of an out-of-memory error outside the drawing of samples (`out_of_memory_line`'s)
OUT_OF_MEMORY = (
    "out of memory loading the model or reading an image (--device cpu where a GPU "
    "cannot hold the model)"
)
MIN_TILE = 16  # smallest --tile (LR px): below it the context costs many times the tile
OOM_MIN_TILE = 64  # the out-of-memory fallback halves the tile down to this
GRID_SAMPLES = 16  # samples shown on a --grid contact sheet (its std panel: of all n)
MAX_N = 100_000  # sample numbers have five digits
# Flags recorded in manifest.json that a rerun may change: they do not change the files (or what
# they change is compared as its effect: the model, its scale, n, the folder's temperature, ...).
# --tile and --tile-overlap are compared as their effect, tile_context: exact tiles (the model's
# tile_halo of context) equal the untiled samples up to float rounding, so a rerun after an
# out-of-memory may tile.
FREE_FLAGS = ("ckpt", "input", "out", "shard", "device", "batch", "overwrite", "temperature",
              "tile", "tile_overlap", "model", "scale", "from_hr", "n", "quiet",
              "json")  # fmt: skip


# The text flags whose typed "" (an unset shell variable, `--out "$OUT"`) is refused, one line,
# exit 2 (`refuse_empty`), as sr_train.py's: --out "" sampled into the current folder, --input ""
# read its images, --ref "" drew noise references, --latent, --latent-from and --latent-shift ""
# and the degradations' "" were unset, all without a word. (The others' "" is refused by their
# type or choices: --shard, --temperature, --layout, ...)
EMPTY_REFUSED = {
    "ckpt": ("path", "a checkpoint written by sr_train.py or a released weights file"),
    "input": ("path", "an image, a folder of images or demo"),
    "out": ("path", "the folder to write the samples to"),
    "ref": ("value", "a reference image or folder, noise, lr or prior, or leave --ref out "
                     "(noise)"),
    "latent_from": ("path", "an HR image, or leave --latent-from out"),
    "latent": ("path", "a saved latent file or a --save-latent folder, or leave --latent out"),
    "latent_shift": ("path", "a latent direction file, or leave --latent-shift out"),
    "device": ("value", "auto, cpu, cuda or cuda:N, or leave --device out"),
    **EMPTY_DEGRADATION,
}  # fmt: skip


def integer(lo: int, hi: int | None = None, zero: bool = False):
    """An argparse type: an int in [lo, hi] (or 0 when `zero`), else a one-line error."""

    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or not ((zero and v == 0) or (v >= lo and (hi is None or v <= hi))):
            what = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
            raise ArgumentTypeError(f"{text!r}: must be {'0 or ' if zero else ''}{what}")
        return v

    return check


def temperature_value(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not (math.isfinite(t) and t >= 0):
        raise ArgumentTypeError(f"{text!r}: must be a finite number >= 0")
    return t + 0.0  # -0 is 0: folder T0 (-0.0 made T-0, and 0 -0 one folder of two temperatures)


def shard_value(text: str) -> str:
    """`I/N` with 0 <= I < N, or `auto`: the SLURM array task's (index from 0)."""
    if text == "auto":
        env = os.environ
        if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ArgumentTypeError(
                "'auto': SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT are not set (not a SLURM job "
                "array); give I/N"
            )

        def number(name: str, default: int | None = None) -> int:
            # (a ValueError here was argparse's "invalid shard_value value: 'auto'")
            value = env.get(name, default)
            try:
                return int(value)
            except ValueError:
                raise ArgumentTypeError(
                    f"'auto': {name}={value!r} is not a whole number; give I/N"
                ) from None

        task, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
        first, step = number("SLURM_ARRAY_TASK_MIN", 0), number("SLURM_ARRAY_TASK_STEP", 1)
        last = number("SLURM_ARRAY_TASK_MAX", first + (count - 1) * step)
        # A list array (--array=1,3,7) has no step that maps its IDs onto 0..COUNT-1: (ID - MIN)
        # // STEP would leave some shards to no task, their images unsampled without a word.
        if step < 1 or last - first != (count - 1) * step or (task - first) % step:
            raise ArgumentTypeError(
                f"'auto': array task {task} of {count} (IDs {first}..{last}, step {step}) is not "
                "a range MIN-MAX[:STEP]; give --shard I/N with I from 0 to N-1 yourself"
            )
        text = f"{(task - first) // step}/{count}"
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise ArgumentTypeError(f"{text!r}: give I/N with 0 <= I < N (e.g. 0/4), or auto")
    return f"{int(i)}/{int(n)}"


@dataclass
class SampleArgs:
    ckpt: str = field(
        metadata=dict(
            help="checkpoint written by sr_train.py (a released file: add --model, --scale)"
        )  # fmt: skip
    )
    input: str = field(
        metadata=dict(help="LR image or folder (HR with --from-hr); 'demo': the demo val HR")
    )
    out: str = field(metadata=dict(help="output folder (T{t} subfolders for several temperatures)"))
    from_hr: bool = field(
        default=False, metadata=dict(help="inputs are HR: mod-crop, downscale, write OUT/lr/")
    )
    # the LR of HR inputs degraded as sr_train.py's validation LR: one draw per image, seeded by
    # its stem (docs/sample.md, `--lr-blur`)
    lr_blur: str = option(
        "",
        "with --from-hr: Gaussian blur of the HR before the downscale, as "
        "sr_train.py's (SIGMA or LO:HI, one draw per image)",
        metavar="SIGMA",
    )
    lr_noise: str = option(
        "",
        "with --from-hr: Gaussian noise on the LR in 8-bit levels, as "
        "sr_train.py's (SIGMA or LO:HI, one draw per image)",
        metavar="SIGMA",
    )
    lr_jpeg: str = option(
        "",
        "with --from-hr: JPEG of the LR at QUALITY, as sr_train.py's "
        "(1-100 or LO:HI, one draw per image)",
        metavar="QUALITY",
    )
    n: int = field(default=10, metadata=dict(type=integer(1, MAX_N), help="samples per image"))
    temperature: Optional[list[float]] = field(  # noqa: UP045 (argparse-dataclass needs Optional)
        default=None,
        metadata=dict(
            nargs="+",
            type=temperature_value,
            help="sampling temperature(s) (default: the model's); several: one subfolder T{t} each",
        ),  # fmt: skip
    )
    seed: int = field(
        default=0,
        metadata=dict(type=integer(0), help="sample i of image STEM uses (seed, STEM, i)"),
    )
    layout: str = field(
        default="stem",
        metadata=dict(choices=("stem", "ntire"),
                      help="stem: STEM_sample00000.png; ntire: 000000_sample00000.png"),
    )  # fmt: skip
    bit_depth: int = field(
        default=8,
        metadata=dict(type=int, choices=(8, 16),
                      help="8: 8-bit PNGs, a 16-bit LR read as 8 bits; 16: the LR at "
                           "its full precision, 16-bit PNGs"),
    )  # fmt: skip
    alpha_channel: str = field(
        default="keep",
        metadata=dict(choices=("keep", "drop"),
                      help="an LR's alpha channel; keep: upscaled onto its outputs "
                           "(--alpha-upsampler); drop: RGB/gray outputs"),
    )  # fmt: skip
    alpha_upsampler: str = field(
        default="bicubic",
        metadata=dict(choices=("bicubic", "model"),
                      help="how a kept alpha channel is upscaled; bicubic: MATLAB "
                           "bicubic; model: super-resolved by the model at temperature 0, one "
                           "alpha for every sample of the image"),
    )  # fmt: skip
    batch: int = field(default=10, metadata=dict(type=integer(1), help="samples per model call"))
    tile: int = field(
        default=0,
        metadata=dict(type=integer(MIN_TILE, zero=True),
                      help=f"tile size in LR px (0 = whole image, else >= {MIN_TILE})"),
    )  # fmt: skip
    tile_overlap: Optional[int] = field(  # noqa: UP045
        default=None,
        metadata=dict(type=integer(0), help="context computed around each --tile tile, LR px "
                      "(default: the model's receptive field: exact); unused without --tile"),
    )  # fmt: skip
    shard: str = field(
        default="0/1",
        metadata=dict(type=shard_value, help="I/N: images I, I+N, ... only; auto: SLURM array"),
    )
    overwrite: bool = field(
        default=False, metadata=dict(help="redo every file, even where a complete one exists")
    )
    amp: str = field(
        default="none",
        metadata=dict(choices=("none", "bf16", "fp16"), help="bf16: bfloat16 autocast (flows "
                      "keep their state float32); fp16: float16 (8x bf16's precision, far less "
                      "range), refused by the flows (their reverse state leaves its range)"),
    )  # fmt: skip
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
        metadata=dict(help="refvae reference: FILE, DIR (one output per image), noise, lr (the LR "
                      "itself) or prior (z ~ N(0, I)) (default: noise)"),
    )  # fmt: skip
    latent_from: str = field(
        default="", metadata=dict(help="varsr: decode with the latent E_H(HR) of this HR image")
    )
    latent: str = field(
        default="",
        metadata=dict(help="decode this saved latent: refvae, varsr: a .latent.npz of z0, or a "
                      ".npy, (D,) or (k, D): k outputs; flows: a .npz of fields z0, z1, ...; "
                      "another model's is refused; or a --save-latent DIR: "
                      "each input NAME from its NAME_sample{i:05d}.latent.* files there, as "
                      "NAME_sample{i:05d}.png (the same i)"),
    )  # fmt: skip
    latent_shift: str = field(
        default="",
        metadata=dict(help="walk along this latent direction .npy (D,) or saved .latent.npz "
                      "(flows: a .npz of fields (C, h, w))"),
    )  # fmt: skip
    latent_steps: str = field(
        default="-2,-1,0,1,2", metadata=dict(help="multiples of --latent-shift, one output each")
    )
    save_latent: bool = field(
        default=False,
        metadata=dict(help="write each sample's latent: NAME_sample{i:05d}.latent.npz, its "
                      "fields z0, ... (refvae, varsr: z0 (D,); flows: (C, h, w)) and the model "
                      "that saved it"),
    )  # fmt: skip
    check_invertibility: bool = field(
        default=False,
        metadata=dict(help="flows: draw the samples, encode each back to z and decode again; "
                      "report |x - x'| per image, exit 5 above the tolerance; writes nothing "
                      "(--out not needed)"),
    )  # fmt: skip
    device: str = field(default="auto", metadata=dict(help="auto, cpu, cuda, cuda:1, ..."))
    quiet: bool = field(
        default=False,
        metadata=dict(help="print warnings, errors and the closing line only (no progress)"),
    )
    json: bool = field(
        default=False,
        metadata=dict(help="the closing line is one JSON object: exit_code, images, sampled, "
                      "skipped... (docs/exit-codes.md)"),
    )  # fmt: skip
    raw_weights: bool = field(
        default=False,
        metadata=dict(help="the weights as trained, not their moving average (sr_train --ema)"),
    )
    model: Optional[str] = field(  # noqa: UP045
        default=None,
        metadata=dict(choices=tuple(MODELS), metavar="MODEL",
                      help=f"model of a raw state_dict (no metadata): {', '.join(MODELS)}"),
    )  # fmt: skip
    scale: Optional[int] = field(  # noqa: UP045
        default=None,
        metadata=dict(choices=(2, 3, 4, 8), help="scale of a raw state_dict (no metadata)"),
    )
    global_skip: Optional[str] = field(  # noqa: UP045
        default=None,
        metadata=dict(choices=("esrgan", "srflow"),
                      help="global skip of a raw rrdb state_dict whose keys do not tell: esrgan "
                           "(ESRGAN's RRDB_*_x4.pth), srflow (SRFlow's RRDB_*.pth)"),
    )  # fmt: skip


class Signals:
    """While sampling, SIGINT raises KeyboardInterrupt and SIGTERM/SIGUSR1 (SLURM's preemption
    and time-limit warnings) and SIGHUP (a closed terminal) raise Preempted at once, except
    while a file is read or written (`held`) or a thread pool's lock code runs
    (sr_lib/threads.py): there they wait for its end, since an exception inside an image library
    can leave half-built objects that print tracebacks. Files are written atomically, so
    whatever stops the run, every file written is complete and a rerun continues."""

    def __init__(self):
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, *PREEMPT_SIGNALS):
            # (a SIGINT or SIGHUP ignored at start stays ignored: a background job, nohup)
            self.old[sig] = catch(sig, when_not_held(self.stop))
        return self

    def __exit__(self, kind, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        if kind is Preempted:  # a writer whose `finish` the signal skipped: its writes end
            stop_pools(cancel=False)

    @staticmethod
    def stop(signum, frame):
        rerun = "rerun the same command to continue"
        if signum == signal.SIGINT:  # its line "sr_sample.py: interrupted (...)": what to do too
            raise KeyboardInterrupt(f"(every file written is complete): {rerun}")
        name = signal.Signals(signum).name
        raise Preempted(f"stopped by {name}; every file written is complete: {rerun}", name)


SIGNALS = Signals()


def held(fn):
    """fn with signals held until it returns."""

    def call(*args, **kwargs):
        with signals_held():
            return fn(*args, **kwargs)

    return call


def write_pngs(paths: list[Path], img: np.ndarray) -> None:
    """`img` as a PNG in each of `paths`, encoded once (a deterministic model's n samples)."""
    data = encode_png(img)
    for path in paths:
        write_encoded_png(path, data)


save_png, save_pngs = held(write_png), held(write_pngs)
save_npy, save_npz, save_text = held(write_npy), held(write_npz), held(write_text)


class SampleWriter:
    """Writes the sample PNGs on `threads` threads while the model draws the next ones.

    Encoding one 2040x1352 PNG takes ~0.5 s of a core (Pillow's zlib, which lets other threads
    run): ten samples written one after the other take longer than a GPU takes to draw them. At
    most 2 x threads writes wait, each holding its array. A failed write (a full disk) is raised in
    the main thread at a later write or at the end, the first of the files in the order given.
    What waits on files being written (an image counted as sampled, its progress line) is given
    to `then`, run once they are, in order. Leaving the `with` block finishes the writes given
    (after Ctrl-C, only those begun) and runs `then`'s calls of those written; files are written
    atomically, so a stop leaves complete files only.
    """

    def __init__(self, threads: int):
        self.pool = new_pool(threads, "png") if threads > 1 else None
        self.queue: collections.deque = collections.deque()  # the futures, in the order given
        self.limit = 2 * threads
        self.given = self.written = 0  # writes given, and written (in order)
        self.waiting: collections.deque = collections.deque()  # (writes before it, call)

    def __call__(self, paths: list[Path], img: np.ndarray) -> None:
        """Write `img` as the PNG files `paths` (one, or a deterministic model's n)."""
        if self.pool is None:
            return save_pngs(paths, img)
        while self.queue and (len(self.queue) >= self.limit or done(self.queue[0])):
            self.wrote()  # waits when full; raises a failed write's error
        self.queue.append(submit(self.pool, write_pngs, paths, img))
        self.given += 1

    def wrote(self) -> None:
        """The oldest write waited for (its error raised), and the calls it held run."""
        result(self.queue[0])
        # Signals held: a stop between the count and a call, or within one, would drop the call
        # (taken off `waiting` first), its image neither counted sampled nor its line said
        # though its files are on disk; it then comes after the call.
        with signals_held():
            self.queue.popleft()
            self.written += 1
            while self.waiting and self.waiting[0][0] <= self.written:
                self.waiting.popleft()[1]()

    def then(self, call) -> None:
        """call() once every file given so far is written: now if none waits, else at a later
        write or the end (a failed write: never)."""
        if self.queue:
            self.waiting.append((self.given, call))
        else:
            with signals_held():  # (as in `wrote`: a stop comes after it)
                call()

    def flush(self) -> None:
        """Every file given written, and the calls waiting on them run."""
        while self.queue:
            self.wrote()

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        if self.pool is None:
            return
        cancel = kind is KeyboardInterrupt
        try:
            if kind is None:
                self.flush()
        except KeyboardInterrupt:
            cancel = True
            raise
        finally:
            finish(self.pool, cancel)
            with signals_held():
                self.pool = None  # sr_lib/threads.py: why here
            if kind is not None:  # a stop: the images whose files all got written are counted
                while self.queue and done(self.queue[0]) and not self.queue[0].cancelled():
                    if self.queue[0].exception() is not None:
                        break
                    with contextlib.suppress(Preempted):  # (stdout closed: the stop goes on)
                        self.wrote()


def main(argv=None) -> int:
    with Summary(PROG) as summary:  # --json: its line after the error line, or the return
        return summary.end(run_script(argv, summary))


def run_script(argv, summary: Summary) -> int:
    with exit_on_error(PROG, OUT_OF_MEMORY):
        try:
            with SIGNALS:
                argv = list(sys.argv[1:] if argv is None else argv)
                try:
                    args, given = parse_args(argv)
                except UsageError:  # the --json line after the error line, if asked for
                    summary.json = asks_json(SampleArgs, argv, PROG)
                    raise
                summary.json = args.json
                replay_stop_signal()  # one that came while importing: its --json line too
                return sample(args, given, summary)
        except KeyboardInterrupt:  # --json's `stopped`, as sr_train.py's (exit 130)
            summary.update(stopped="SIGINT")
            raise
        except Preempted as e:  # args: the line, what stopped it (--json's `stopped`)
            summary.update(stopped=e.args[-1] if len(e.args) > 1 else "signal")
            raise Stopped(e.args[0]) from None


def parse_args(argv) -> tuple[SampleArgs, set[str]]:
    """The flags, and the names of those typed (`given_fields`: a default typed counts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for k, a in enumerate(argv[:-1]):  # argparse reads "-2,-1,0" as a flag: glue it to its flag
        if a == "--latent-steps":
            argv[k : k + 2] = [f"{a}={argv[k + 1]}"]
            break
    # --check-invertibility writes nothing: --out may be left out (its required mark stays for
    # every other run); typed there, it is a flag without effect (check_invertibility says so)
    unset = ["--out", "\0"]  # (no path holds a NUL) a --out typed later replaces it
    try:
        check = "check_invertibility" in given_fields(SampleArgs, [*unset, *argv], PROG)
    except UsageError:  # (-h, or --ckpt missing): the parse below says it, not naming --out
        check = any(a.startswith("--check") for a in argv)  # (its only flag so named)
    args = parse(SampleArgs, [*unset, *argv] if check else argv, PROG)
    out_typed = args.out != "\0"
    if not out_typed:
        args.out = ""
    refuse_stdio(args, ("ckpt", "input", "out", "ref", "latent_from", "latent", "latent_shift"))
    if args.tile and args.tile_overlap is not None and args.tile_overlap >= args.tile:
        raise UsageError(
            f"--tile-overlap {args.tile_overlap}: the context around a tile must be smaller than "
            f"the tile (--tile {args.tile}); leave it unset for the model's exact one"
        )
    names = [folder_name(t) for t in args.temperature or []]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise UsageError(f"--temperature: {dup[0][1:]} is given twice")
    steps = args.latent_steps.split(",")
    if not all(temperature_ok(v) for v in steps if v.strip()) or not any(v.strip() for v in steps):
        raise UsageError(f"--latent-steps {args.latent_steps!r}: give numbers like -2,-1,0,1,2")
    given = given_fields(SampleArgs, [*unset, *argv], PROG) - (set() if out_typed else {"out"})
    refuse_empty(args, given, EMPTY_REFUSED)
    if "latent_steps" in given and not args.latent_shift:
        say_err(f"{PROG}: warning: --latent-steps: no effect without --latent-shift; ignored")
    if args.from_hr and args.input == "demo":
        say_err(f"{PROG}: warning: --from-hr: no effect, --input demo is HR already; ignored")
    degrading = normalise_degradation(args)  # (the text as recorded)
    if degrading and not (args.from_hr or args.input == "demo"):
        raise UsageError(f"{degrading[0][0]}: degrades the LR made from HR inputs; give "
                         "--from-hr (the inputs are LR images already)")  # fmt: skip
    if args.alpha_upsampler == "model" and args.alpha_channel == "drop":
        raise UsageError("--alpha-upsampler model: the alpha channel is dropped (--alpha-channel "
                         "drop), there is none to upscale; give one of the two")  # fmt: skip
    if args.bit_depth == 16 and args.layout == "ntire":
        say_err(f"{PROG}: warning: --bit-depth 16 --layout ntire: the challenge's measure.py reads "
                "PNGs as 8-bit (OpenCV keeps the high byte, x >> 8: a level below round(x / 257) "
                "at a quarter of the pixels); submit --bit-depth 8 files")  # fmt: skip
    return args, given


def warn_degraded_consistency(args: SampleArgs, ck: dict, model, from_hr: bool) -> None:
    """One warning line where the samples' bicubic downscale is made to match the LR (VSpSR's
    CEM, --cem) and that LR is degraded beyond bicubic: --from-hr with --lr-blur/--lr-noise/
    --lr-jpeg, or a model trained on such LR (its checkpoint's run flags)."""
    projecting = model.sample_consistency(model.cfg) + (["--cem"] if args.cem else [])
    trained = ck.get("train_args") if isinstance(ck.get("train_args"), dict) else {}
    degraded = " ".join(f"{f} {v}" for f, v in degradation_flags(trained))
    how = f"trained on LR made with {degraded}" if degraded else ""
    given = " ".join(f"{f} {v}" for f, v in degradation_flags(args)) if from_hr else ""
    if given:
        how = f"LR made with {given}" + (f" (the model {how})" if how else "")
    if projecting and how:
        say_err(f"{PROG}: warning: {' and '.join(projecting)}, {how}: each sample's bicubic "
                "downscale is made to match the LR input, which assumes LR = bicubic(HR); the "
                "samples keep the input's blur, noise or JPEG artefacts")  # fmt: skip


def temperature_ok(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def folder_name(temperature: float) -> str:
    """The subfolder of one temperature of a sweep: T0, T0.5, T0.9, T1, ..."""
    return f"T{temperature:g}"


def sample(args: SampleArgs, given: set[str] = frozenset(), summary: Summary | None = None) -> int:
    """The run; `summary` gathers the fields of its closing line (--json) as they become known."""
    summary = summary or Summary(PROG)
    # Every field of the --json line from the start (docs/exit-codes.md, --json), null until
    # known: an error before the folders are claimed, or before the end, left them out
    summary.update(out=args.out, folders=None, images=None, sampled=0, skipped=0, failed=0,
                   seconds=None, stopped=None)  # fmt: skip
    dangling: list[Path] = []  # --input's links to missing files: exit 3 at the end
    paths = input_paths(Path(args.input), dangling)
    # `images` from here (--json): the inputs known, as sr_eval.py's once --hr is listed; null
    # before (a missing --input). This shard's: those left out below are its samples
    part, parts = (int(v) for v in args.shard.split("/"))
    summary.update(images=len(paths[part::parts]))
    from_hr = args.from_hr or args.input == "demo"  # the demo images are HR photographs
    device = pick_device(args.device)
    if said := describe_path(args.ckpt, "file", example="last.pt"):  # (the flag named)
        raise CheckpointError(f"--ckpt {args.ckpt}: {said}")
    ck, ckpt_sha256 = read_checkpoint_hashed(args.ckpt)  # (one read: manifest.json's digest)
    model, ck = load_model(args.ckpt, device, args.model, args.scale,
                           args.raw_weights, args.global_skip, ck)  # fmt: skip
    if "ema_state_dict" in ck:  # which of its two sets of weights the samples come from
        average = (f"the moving average of the weights (sr_train.py --ema {ck['ema_decay']:g}); "
                   "--raw-weights for the weights as trained")  # fmt: skip
        raw = "the weights as trained (--raw-weights)"
        if not args.quiet:
            print_out(f"{args.ckpt}: {raw if args.raw_weights else average}")
    if args.check_invertibility:
        return check_invertibility(args, given, model, ck["model"], paths, from_hr, device,
                                   summary, dangling)  # fmt: skip
    warn_degraded_consistency(args, ck, model, from_hr)
    made_by = latent_source(ck, model, ckpt_sha256)
    unrecorded = []  # check_npy_saver's warnings, said once the files have been read
    if model.old_latent_file:  # (a .npz names its model: read_latent checks; an old .npy not)
        files = {"--latent": args.latent, "--latent-shift": args.latent_shift}
        for flag, file in [(f, v) for f, v in files.items() if v and not Path(v).is_dir()]:
            if flag[2:].replace("-", "_") in model.sample_controls:  # (else: resolve_controls')
                check_npy_saver(flag, Path(file), made_by, unrecorded)
    controls = resolve_controls(args, model, made_by, device)
    for line in unrecorded:
        say_err(line)
    n = controls.n if controls else args.n  # a control may fix it (one output per ref/step)
    setter = controls_setter(args, controls)
    temperatures = args.temperature or [model.default_temperature]
    if len(temperatures) > 1 and setter.startswith("--latent"):
        raise UsageError(f"--temperature: {setter} sets the latents; its samples do not depend "
                         "on the temperature (give one)")  # fmt: skip
    warn_controlled(args, given, setter)
    if len(temperatures) > 1 and not model.stochastic:
        raise UsageError(
            f"--temperature: the {ck['model']} model is deterministic; its samples do not depend "
            "on the temperature (give one)"
        )
    if args.temperature and not model.stochastic:
        say_err(f"{PROG}: warning: --temperature: no effect, the {ck['model']} model is "
                "deterministic; ignored")  # fmt: skip
    if not model.stochastic:  # one output, drawn once and written n times
        for flag in [f for f in ("seed", "batch") if f in given]:
            say_err(f"{PROG}: warning: --{flag}: no effect, the {ck['model']} model is "
                    "deterministic; ignored")  # fmt: skip
    if args.raw_weights and "ema_state_dict" not in ck:
        say_err(f"{PROG}: warning: --raw-weights: no effect, {args.ckpt} keeps no moving average "
                "of its weights; ignored")  # fmt: skip
    if args.amp == "fp16" and not model.fits_float16:
        raise UsageError(f"--amp fp16: the {ck['model']} model's sampling leaves float16's range "
                         "(NaN samples); use --amp bf16")  # fmt: skip
    want_sigma = (args.save_uncertainty or args.grid) and model.has_uncertainty
    if args.save_uncertainty and not model.has_uncertainty:
        # (named by its --model, not its class: EDSR's l1 run is a RegressionSR)
        print(f"{PROG}: warning: --save-uncertainty: this {ck['model']} model has no uncertainty "
              "output (edsr and rrdb have one, trained with sr_train.py --loss le); no sigma maps "
              "written", file=sys.stderr, flush=True)  # fmt: skip
    context = tile_context(args, model)
    out = check_out_dir(args.out)
    folders = {t: out if len(temperatures) == 1 else out / folder_name(t) for t in temperatures}
    latent_dir, numbers = None, None  # --latent DIR: each input's files; their sample numbers
    if controls is not None and args.latent and Path(args.latent).is_dir():
        latent_dir = LatentDir.scan(Path(args.latent), model.latent_file, model.old_latent_file)
        if latent_dir.folder.resolve() == out.resolve():
            raise UsageError(
                f"--latent {args.latent}: the --out folder; decoded there, its samples would "
                "replace those its latents were saved with (and --overwrite delete the "
                "latents); use another --out"
            )
        latent_dir.check_saver(made_by)
        n, numbers, _ = latent_dir.plan(paths, args.layout)
    # One NAME.png per image where one output is all there is: a deterministic model's n copies,
    # and with --layout ntire any --n 1, as the challenge's measure.py reads N = 1 (000000.png)
    single = n == 1 and (not model.stochastic or args.layout == "ntire")
    latents = model.latent_file if args.save_latent and controls is not None else ""
    files = Outputs(n, single, want_sigma and args.save_uncertainty, args.grid, latents, numbers,
                    model.old_latent_file if latents else "")  # fmt: skip
    if Path(args.input).is_dir():
        real = Path(args.input).resolve()
        if out.resolve() == real:
            paths = leave_out_samples(paths, files, args.layout, out, len(folders) > 1)
        elif latent_dir is not None and latent_dir.folder.resolve() == real:
            paths = leave_out_samples(paths, files, args.layout, out, len(folders) > 1,
                                      latent_dir.folder)  # fmt: skip
    if latent_dir is not None:  # (the inputs the same in every --shard: every shard checks all)
        n, files.numbers, missing = latent_dir.plan(paths, args.layout)
        latent_dir.refuse_missing(missing, len(paths), ck["model"])
        files.n, files.single = n, n == 1 and args.layout == "ntire"
    mine = [(k, p) for k, p in enumerate(paths) if k % parts == part]
    summary.update(images=len(mine))
    if latent_dir is not None:
        # (read whole: the files of the images this run decodes, not those complete already)
        todo = {p for k, p in mine if args.overwrite or not files.complete(
            out, f"{k:06d}" if args.layout == "ntire" else p.stem)}  # fmt: skip
        controls.digests["--latent"] = latent_dir.check(model, paths, todo, made_by, from_hr)
        latent_dir.warn_gaps(files.numbers)  # (a folder it decodes)
    elif controls is not None and hasattr(model, "check_controls_fit"):
        # A flow's --latent or --latent-shift file fits one LR size: every input's (of every
        # shard, as a folder's), from its header (one that cannot tell: its pixels), before any
        # sample is written; else found at the first input of another size, the samples of
        # those before it written
        for path in paths:
            size = lr_size(path, model.scale, from_hr, decode=True)
            if size and all(size):  # (an unreadable input: skipped at its turn)
                model.check_controls_fit(controls, size, f"{path.name}'s")
    settings = run_settings(args, ck, ckpt_sha256, model, n, context, from_hr, paths, controls)
    free = no_effect(args, model, setter)  # recorded as given, not compared
    # An out-of-memory retry cuts the image into tiles; with the exact context where the samples
    # are exact otherwise: untiled, exact tiles, or an image that --tile holds whole (`whole`)
    exact_retry = max(context, exact_context(model))
    retry_context = exact_retry if not settings["tile_context"] else context
    whole = grid(model, args.tile, 0)[0]  # (LR px; 0: no --tile)
    inputs = real_paths(paths)
    check_inputs_kept(mine, files, args.layout, folders, out, from_hr, inputs)
    if args.layout == "stem":
        check_name_lengths([p for _, p in mine], files, from_hr, out)
        check_shared_outputs(paths, files, out)
    # whether a --tile holds every input (of every shard) whole: read only where a rerun's tiles
    # differ from the folder's (`claim_folder`), once per tile size
    holds_whole = scanned_unlocked(lambda tile: one_tile(tile, model, paths, from_hr))
    # whether --alpha-channel and --alpha-upsampler change no file: no input (of every shard)
    # has an alpha channel; read only where a rerun's differ from the folder's (`claim_folder`)
    opaque = scanned_unlocked(lambda: not any(map(has_alpha, paths)))
    upgraded = {}  # folder -> the other srspace versions that sampled into it (`claim_folder`)
    said_upgrade = False  # (one line for a sweep's folders)
    # the NAMEs of every input (of every --shard), which manifest.json lists (`claim_folder`)
    names = {f"{k:06d}" if args.layout == "ntire" else p.stem for k, p in enumerate(paths)}
    if args.overwrite:  # (every folder of a sweep, before any file is deleted)
        refuse_others_kept(out, list(folders.values()), names, {p.stem for p in paths}, inputs)
        refuse_other_layout(out, len(folders) > 1, inputs)
    for t, folder in folders.items():
        check_out_dir(folder)
        if args.overwrite and (folder / "manifest.json").is_file():
            remove_old_files(folder, [f"{k:06d}" if args.layout == "ntire" else p.stem
                                      for k, p in mine], inputs, args.layout,
                             {p.stem for p in paths})  # fmt: skip
        while True:
            try:
                with manifest_lock(folder):  # (another shard may write its manifest meanwhile)
                    was = claim_folder(folder, {**settings, "temperature": t}, args.overwrite,
                                       inputs, free, parts > 1, holds_whole,
                                       n_change(args, model, setter), opaque,
                                       names)  # fmt: skip
                break
            except ScanFirst as e:  # the inputs read with the lock free, then claimed again
                e.scan()
        if was:
            upgraded[folder] = was
        if args.layout == "ntire":
            claim_index(folder, paths, model.scale, args.overwrite)
    autocast = autocast_for(args.amp, device)
    emulated = amp_emulated(args.amp, device)
    if emulated:
        print(f"{PROG}: warning: --amp {args.amp}: {emulated}", file=sys.stderr, flush=True)
    failed = no_inputs_skipped()
    skipped, t0 = 0, time.monotonic()
    # A sweep's folders by name, OUT/T{0.5,0.9} (bash expands it; --json: `folders`): OUT/T*
    # would name also the T*/ of other temperatures kept there, which this run did not make.
    # `out` stays the --out folder, one type for every run, so a pipeline reads it as ever.
    # OUT quoted for a shell where it must be (docs/design.md): a space, a comma or a brace in
    # it split the word or its braces, pasted into bash
    swept = ",".join(folder_name(t)[1:] for t in folders)
    where = out if len(folders) == 1 else f"{shell_quote(out)}/T{{{swept}}}"
    summary.update(out=str(out), folders=[str(f) for f in folders.values()])  # (images: above)
    with ProgressLog(len(mine), args.quiet) as bar, SampleWriter(cpu_workers()) as writer:
        for k, path in mine:
            name = f"{k:06d}" if args.layout == "ntire" else path.stem
            todo = [t for t in temperatures
                    if args.overwrite or not files.complete(folders[t], name)]  # fmt: skip
            lr_file = out / "lr" / f"{path.stem}.png"
            if not todo and (not from_hr or is_written_file(lr_file)):  # (as the samples)
                skipped += 1
                summary.update(skipped=skipped)
                writer.flush()  # (the lines of the images before it first)
                bar.skip(path.name)
                continue
            t_img = time.monotonic()
            try:
                img = read_input(path, model.scale, from_hr, lr_file, args)
                check_lr_fits(model, ck["model"], img, path)
            except DataError as e:  # reported, skipped; exit 3 once the others are written
                why = skip_input(e, path, failed, len(mine), summary)
                writer.flush()
                bar.step(f"{path.name}: {why}, skipped")
                continue
            if not todo:  # its samples complete, only --from-hr's LR file was missing: written
                skipped += 1  # again (read_input), and nothing sampled
                summary.update(skipped=skipped)
                writer.flush()
                bar.step(f"{path.name}: samples complete, {lr_file} written again")
                continue
            lr = img.tensor().to(device)
            if controls is not None:  # (named in a message: a --latent of another LR size)
                controls.image = f"{path.name}'s"
            try:
                k_img = n if latent_dir is None else latent_dir.load(model, path.stem, controls,
                                                                     device)  # fmt: skip
            except DataError as e:  # a --latent DIR file changed mid-run: the run stops there
                writer.flush()  # (the images before it written and counted: said how many)
                done = summary.fields["sampled"]
                kept = ("no image was sampled before it" if not done else
                        f"the image sampled before it is kept in {where}" if done == 1 else
                        f"the {done} images sampled before it are kept in {where}")  # fmt: skip
                raise DataError(f"{e}; {kept}") from None
            new = [folders[t] for t in todo if folders[t] in upgraded]
            if new and not said_upgrade:
                said_upgrade = True
                say_err(upgrade_line(new[0], upgraded[new[0]]))
            h, w = img.rgb.shape[:2]
            one = whole and max(h, w) <= whole  # --tile holds it whole: its retry stays exact
            with autocast:
                sample_image(model, lr, img, path.stem, name, k_img, todo, folders, files,
                             (context, exact_retry if one else retry_context), controls,
                             want_sigma, args, bar.say, writer)  # fmt: skip
            for folder in new:  # said no more; recorded once its samples are written
                del upgraded[folder]
            s = model.scale
            temps = f" at {len(todo)} temperatures" if len(todo) > 1 else ""
            line = (f"{path.name} {w}x{h} -> {k_img} x {w * s}x{h * s}{temps} in "
                    f"{time.monotonic() - t_img:.1f} s")  # fmt: skip
            # sampled, and its line, once its PNGs are on disk (written in the background: a
            # full disk fails them later), while the model draws the next image's: the line
            # lags its image by up to 2 x threads writes, said at a later write, at a skip or
            # an unreadable input's line (`flush`: in order), or at the end of the `with`
            # (every write given finished, the last image's line before the closing line; a
            # stop: those written, `SampleWriter.__exit__`)
            writer.then(functools.partial(image_written, line, new, summary, bar))
    lost = lost_inputs(failed, len(mine), model, ck["model"])
    done = len(mine) - sum(map(len, failed.values())) - skipped
    took = time.monotonic() - t0
    summary.line(f"done: {done} images sampled, {skipped} already complete, {took:.1f} s -> "
                 f"{where}", seconds=round(took, 3))  # fmt: skip
    if parts == 1 and "inputs" in settings and not lost:  # every image listed sampled: the list
        for folder in folders.values():  # is the folder's now (links to nothing are not in it)
            record_inputs(folder, settings["inputs"])
    lost += missing_links(dangling)
    if lost:
        rest = (
            f"the others were written to {out}"
            if done
            else f"the others were already complete in {out}"
            if skipped
            else "nothing was written"
        )
        raise DataError(f"{'; '.join(lost)}; {rest}")  # fmt: skip
    return 0


def image_written(line: str, new: list[Path], summary: Summary, bar: "ProgressLog") -> None:
    """An image's files are all written: this version recorded in the folders `new`
    (`record_version`), the image counted as sampled and its progress `line` said."""
    for folder in new:
        record_version(folder)
    summary.update(sampled=summary.fields["sampled"] + 1)
    bar.step(line)


def input_paths(path: Path, dangling: list[Path] | None = None) -> list[Path]:
    """The image files of --input: one file, or a folder's images (not recursive) in the one
    image order (sr_lib.data.image_order): an image's position there is its NTIRE index. Its
    symbolic links to missing files (named like images) are added to `dangling`: not in the
    order, as every script lists the folder, but the run ends with exit 3 (`missing_links`)."""
    if str(path) == "demo":
        return demo_files("val")
    if what := describe_path(path, "either", ("demo",)):  # (a moved dataset: a link to nothing)
        raise DataError(f"--input {shell_quote(str(path))}: {what}")
    if path.is_file():
        return [path]
    paths = list_images(path, recursive=False, dangling=dangling)
    dup = shared_stem(paths)
    if dup is not None:
        raise DataError(f"--input {path}: several files share the stem {dup!r}; rename them")
    return paths


def real_paths(paths) -> set[Path]:
    """The resolved `paths` (symbolic links followed), each folder resolved once and each file
    looked at once (is it a link?): Path.resolve() makes a file system call for every part of the
    path and one more, 100,000 at 20,000 inputs, in every --shard of a run (a network file
    system's metadata server takes them all)."""
    folders, real = {}, set()
    for p in paths:
        if p.parent not in folders:
            folders[p.parent] = p.parent.resolve()
        q = folders[p.parent] / p.name
        real.add(q.resolve() if q.is_symlink() else q)
    return real


SAMPLE_NAME = re.compile(r"(.+)_(sample\d{5}|sigma|grid)")  # the stem of a file this tool writes


def leave_out_samples(paths: list[Path], files: "Outputs", layout: str, out: Path, sweep: bool,
                      latents: Path | None = None) -> list[Path]:  # fmt: skip
    """The inputs without this tool's own outputs, for an --out that is the --input folder: a
    file named NAME_sample{i:05d}, NAME_sigma or NAME_grid where NAME is another input's stem (or
    an NTIRE number) is a sample, not an input, so a rerun does not sample its samples. A name
    rule, not the folder's state: every run of the folder sees the same inputs (and NTIRE
    indices). A deterministic model's NAME.png would replace its input: refused; so is the
    --layout ntire 000000.png of --n 1, which no name rule tells from an input (datasets are
    numbered so too): a rerun took it for one, and stopped, as it would write its own input.
    (A sweep writes into OUT/T*, not listed.) latents: the --latent DIR, where it is the --input
    folder and --out another: the samples there are those of the run that saved its latents."""
    if files.single and not sweep and latents is None:
        what = ("NAME.png, would replace the input of that name" if layout == "stem" else
                "000000.png, ..., would be taken for inputs when the run is repeated")  # fmt: skip
        raise UsageError(
            f"--out {out}: the --input folder; this model's one output per image, {what}; use "
            "another --out"
        )
    stems = {p.stem for p in paths}
    own = [p for p in paths if (m := SAMPLE_NAME.fullmatch(p.stem))
           and (m[1] in stems or re.fullmatch(r"\d{6}", m[1]))]  # fmt: skip
    if own:
        where = f"--out {out}" if latents is None else f"--latent {latents}"
        say_err(f"{PROG}: warning: {where} is the --input folder: {len(own)} files named as "
                f"samples of its images left out of the inputs ({own[0].name}"
                f"{', ...' if len(own) > 1 else ''})")  # fmt: skip
    own_set = set(own)
    return [p for p in paths if p not in own_set]


def check_inputs_kept(mine, files: "Outputs", layout: str, folders: dict, out: Path,
                      from_hr: bool, inputs: set[Path]) -> None:  # fmt: skip
    """Before any work: no file of this run is one of its inputs. A deterministic model's NAME.png
    in the folder of an --input FILE, or --from-hr's OUT/lr/NAME.png given as --input, made the
    input itself look complete (nothing sampled, exit 0), and --overwrite, or the LR written,
    replaced it. (An --out that is the --input folder: leave_out_samples.)"""
    real = {f: f.resolve() for f in [*folders.values(), *([out / "lr"] if from_hr else [])]}
    if not any(p.parent in real.values() for p in inputs):
        return  # the usual case: no input where this run writes
    # Each output's path from its folder's, resolved once: resolving every output file (five
    # file system calls each) cost a million of them at 20,000 inputs in their own folder.
    for k, path in mine:
        name = f"{k:06d}" if layout == "ntire" else path.stem
        written = [(f, x) for f in folders.values() for x in files.all(name)]
        written += [(out / "lr", f"{path.stem}.png")] if from_hr else []
        for f, x in written:
            if real[f] / x in inputs:
                raise UsageError(f"--out {out}: this run would write {f / x}, one of its inputs, "
                                 "and replace it; use another --out")  # fmt: skip


def check_name_lengths(paths: list[Path], files: "Outputs", from_hr: bool, out: Path) -> None:
    """Before any work: every output file name (STEM_sample00009.png, ...) within what the
    output's file system takes. The names are what sr_eval.py looks for, so they are not cut."""
    limit = name_max(out)
    long = []
    for path in paths:
        names = files.all(path.stem) + ([f"{path.stem}.png"] if from_hr else [])
        longest = max(names, key=lambda f: len(os.fsencode(f)))
        if len(os.fsencode(longest)) > limit:
            long.append((path, longest))
    if long:
        path, name = long[0]
        raise DataError(
            f"--input: {len(long)} of {len(paths)} file names too long for their outputs in "
            f"{out} (at most {limit} bytes there): {path.name} makes {name} "
            f"({len(os.fsencode(name))} bytes); use --layout ntire (numbered files) or rename them"
        )


def check_shared_outputs(paths: list[Path], files: "Outputs", out: Path) -> None:
    """Before any work: no two inputs (of every --shard) write one file. Where each image has one
    NAME.png (`files.single`), an input named cat_grid.png (cat_sigma.png) writes the name of
    cat.png's --grid sheet (--save-uncertainty map): the two replaced each other, the last
    written kept, and a rerun took the image whose file it lost as complete. (The other names
    end in _sample{i:05d}, _sigma or _grid and their own ending, so they never meet.)"""
    if not files.single:
        return
    owner = {}
    for path in paths:
        for f in files.all(path.stem):
            other = owner.setdefault(f, path)
            if other is not path:
                raise DataError(
                    f"--input: {other.name} and {path.name} would both write {out / f}, one "
                    "replacing the other; rename one of them, or use --layout ntire (numbered "
                    "files)"
                )


def exact_context(model) -> int:
    """The context that makes the model's tiles exact (its tile_halo), in whole lr_multiples."""
    return grid(model, 0, DEFAULT_CONTEXT if model.tile_halo is None else model.tile_halo)[1]


def tile_context(args: SampleArgs, model) -> int:
    """--tile-overlap, or the model's exact context (its tile_halo); a warning when the context
    costs more than the tile itself. Without --tile, the exact context: every image is sampled
    whole, and recorded so, and the tiles of an out-of-memory retry must not change that; a
    --tile-overlap given there says what it does, in one line (it set that retry's context)."""
    if args.tile_overlap is not None and not args.tile:
        print(f"{PROG}: warning: --tile-overlap {args.tile_overlap} without --tile: each image is "
              "sampled whole; it is the context of --tile's tiles (a CUDA out-of-memory retry's "
              "tiles take the model's exact one)", file=sys.stderr, flush=True)  # fmt: skip
    use_overlap = args.tile and args.tile_overlap is not None
    context = args.tile_overlap if use_overlap else exact_context(model)
    tile, context = grid(model, args.tile, context)
    if tile and context > tile:
        print(f"{PROG}: warning: --tile {args.tile}: each tile is computed with {context} LR px "
              "of context on every side (the model's receptive field, for exact tiles); a "
              "larger --tile is faster", file=sys.stderr, flush=True)  # fmt: skip
    return context


def run_settings(args, ck, ckpt_sha256, model, n, context, from_hr, paths, controls) -> dict:
    """What manifest.json records: every flag as given, and what they made of the run (the
    checkpoint's sha256: ckpt_sha256).
    tile_context: 0 untiled or with exact tiles (at least the model's tile_halo of context:
    docs/design.md, "Tiled sampling"), else [tile, context] (LR px), which change the samples
    of an image larger than the tile. (Which images are: `claim_folder` reads their sizes only
    where a rerun's tiles differ from the folder's; every --shard read every input's header
    here, 20,000 files in each of 100 shards.) control_sha256 (only where a control flag reads
    files): {flag: sha256 of its files' sha256s, in the order used}, as the
    checkpoint's: a --ref folder or --latent file of other contents under the same name makes
    other samples, and a rerun must not mix them with the old ones. inputs (--layout stem): the
    count and the sha256 of the JSON list of the input names of every shard, in the image order,
    which decides the images of each --shard (`claim_folder`)."""
    halo = model.tile_halo
    exact = not args.tile or (halo is not None and context >= exact_context(model))
    settings = {
        "checkpoint_sha256": ckpt_sha256, "model": ck["model"],
        "config": ck["model_cfg"], "scale": model.scale, "n": n, "from_hr": from_hr,
        "tile_context": 0 if exact else [grid(model, args.tile, context)[0], context],
        "version": __version__, "flags": vars(args),
    }  # fmt: skip
    if args.layout == "stem":  # (--layout ntire: ntire_index.json names every input)
        names = json.dumps([p.name for p in paths]).encode()  # (in the order of the shards)
        settings["inputs"] = {
            "count": len(paths),
            "names_sha256": hashlib.sha256(names).hexdigest(),
        }
    if controls is not None and controls.digests:
        settings["control_sha256"] = {k: joint_sha256(v) for k, v in controls.digests.items()}
    return settings


def joint_sha256(digests: list[str]) -> str:
    """One digest of the files of a control flag from the sha256 of each, in the order used (a
    --ref folder: sample i uses its i-th image)."""
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()


def one_tile(tile: int, model, paths: list[Path], from_hr: bool) -> bool:
    """Whether a --tile of `tile` LR px (as recorded, a multiple of lr_multiple) holds the LR of
    every input (of every shard) whole, its size read from the file's header (not where a
    header cannot tell): then no image is cut, and the samples are the untiled ones whatever
    --tile-overlap (`claim_folder`)."""
    for path in paths:
        size = lr_size(path, model.scale, from_hr)
        if size is None or max(size) > tile:
            return False
    return True


def lr_size(path: Path, s: int, from_hr: bool, decode: bool = False) -> tuple[int, int] | None:
    """The (h, w) of the LR that `read_input` makes of an input, from the file's header alone
    (None where the header cannot tell), or with `decode`, there from its pixels (None where
    they cannot be read either: the input is skipped as unreadable at its turn). `decode`: a
    flow's saved latents fit one LR size, which must be known before any sample is written
    (read whole once more when sampled: only where the header cannot tell)."""
    size = image_size(path)
    if size is None and decode:
        with contextlib.suppress(DataError):
            size = held(read_planes)(path).rgb.shape[:2]
    if size is None or not from_hr:
        return size
    m = default_mod(s)  # read_input's LR: the HR cropped to a multiple of m, then downscaled
    return size[0] // m * m // s, size[1] // m * m // s


def has_alpha(path: Path) -> bool:
    """Whether `read_input` finds an alpha channel in an input (its LR's, with --from-hr, is the
    HR's), from the header where it tells (`header_alpha`: a PNG's or JPEG's), else from the
    pixels (`read_planes`; False where they cannot be read either, an image too large
    included: the input is skipped as unreadable at its turn)."""
    said = header_alpha(path)
    if said is not None:
        return said
    with contextlib.suppress(DataError):
        return held(read_planes)(path).alpha is not None
    return False


def no_effect(args: SampleArgs, model, setter: str) -> set[str]:
    """The settings that change none of this run's samples, beyond the FREE_FLAGS (those its
    warnings call 'no effect'): --seed and the temperature where a control sets the latents
    (`controls_setter`) or the model is deterministic, --latent-steps without --latent-shift.
    manifest.json records them as given, and a rerun may change them (`differences`)."""
    drawn = model.stochastic and not setter.startswith("--latent")
    free = set() if drawn else {"seed", "temperature"}
    return free if args.latent_shift else free | {"latent_steps"}


def differences(old: dict, new: dict, free=frozenset()) -> list[tuple[str, object, object]]:
    """(name, old value, new value) of every setting but the FREE_FLAGS and `free` (this run's
    `no_effect`) that differs. (The run's control flags are compared: a folder of the same ones
    had `free` of no effect too.) A control flag whose files' contents both record
    (control_sha256) is compared by them alone, not by its path's text: DIR/, a link to DIR or
    its absolute path name the same files. The srspace version and the inputs are not compared
    here (`claim_folder`)."""
    out = [(k, old.get(k), v) for k, v in new.items()
           if k not in ("flags", "version", "inputs") and k not in free
           and old.get(k) != v]  # fmt: skip
    flags = old.get("flags") if isinstance(old.get("flags"), dict) else {}
    was = old.get("control_sha256") if isinstance(old.get("control_sha256"), dict) else {}
    digested = {f[2:].replace("-", "_") for f in set(was) & set(new.get("control_sha256", {}))}
    defaults = {f.name: f.default for f in fields(SampleArgs) if f.default is not MISSING}
    for k, v in new["flags"].items():
        # a flag newer than the folder's srspace: that run's way was its default
        was = flags[k] if k in flags else defaults.get(k)
        if k not in FREE_FLAGS and k not in free | digested and was != v:
            out.append((f"--{k.replace('_', '-')}", was, v))
    return out


OLD_SAMPLE = re.compile(r"(.+)_sample\d{5}(\.png|\.latent\.npy|\.latent\.npz)")


def remove_old_files(folder: Path, names: list[str], inputs: set[Path], layout: str,
                     stems: set[str] = frozenset()) -> None:  # fmt: skip
    """--overwrite in a folder of this tool (it holds a manifest.json): delete every file it may
    have written for the images `names` (this shard's) with any settings: NAME_sample{i:05d}.png
    and .latent.npy/.npz, NAME_sigma.png and .npy, NAME_grid.png, NAME.png (never an input), and
    with --layout ntire NAME.latent.npy/.npz (its --n 1 latent before it was numbered). Samples
    of an earlier, larger --n would otherwise stay to be scored with the new ones, and a stopped
    --overwrite run would leave old files that its rerun takes as complete. `stems`: every
    input's (of every --shard): a STEM.png is the one output of the input STEM (a deterministic
    model's --n 1), which another shard may have written already, and never deleted here:
    cat_grid.png of an input cat_grid is also the --grid sheet of the input cat, cat_sigma.png
    its σ map, cat_sample00000.png its sample 0."""
    names = set(names)
    ends = ("_sigma.png", "_sigma.npy", "_grid.png", ".png")
    ends += (".latent.npy", ".latent.npz") if layout == "ntire" else ()
    fixed = {f"{x}{end}" for x in names for end in ends}
    others = {f"{x}.png" for x in stems} - {f"{x}.png" for x in names}
    fixed -= {f"{x}.png" for x in names if (m := SAMPLE_NAME.fullmatch(x)) and m[1] in stems}
    real = folder.resolve()  # once: resolving each file made five file system calls
    for entry in os.scandir(folder):
        m = OLD_SAMPLE.fullmatch(entry.name)
        mine = entry.name in fixed or (m and m[1] in names)
        if mine and entry.name not in others and entry.is_file(follow_symlinks=False):
            path = Path(entry.path)
            if real / entry.name in inputs:
                continue
            try:
                with signals_held():
                    path.unlink(missing_ok=True)
            except OSError as e:
                raise OutputError(f"{path}: cannot delete it for --overwrite ({e.strerror or e}); "
                                  "check the output folder's permissions") from None  # fmt: skip


def output_names(filename: str, single: bool = True) -> set[str]:
    """The image NAMEs whose output a file in a sample folder may be (`remove_old_files`' names):
    NAME_sample{i:05d}.png and its latents, NAME_sigma.png and .npy, NAME_grid.png, NAME.latent.npy
    and .npz, and where `single` (a folder of n 1) NAME.png; cat_grid.png is the sheet of cat
    and the one output of cat_grid."""
    end = next((e for e in (".latent.npz", ".latent.npy", ".npy", ".png")
                if filename.endswith(e)), "")  # fmt: skip
    stem = filename[: -len(end)] if end else ""
    if not stem or filename.startswith("."):  # (.NAME.tmp: a write under way)
        return set()
    m = SAMPLE_NAME.fullmatch(stem)
    if end == ".npy":  # NAME_sigma.npy alone
        return {m[1]} if m and m[2] == "sigma" else set()
    return ({stem} if single or end != ".png" else set()) | ({m[1]} if m else set())


def refuse_others_kept(out: Path, folders: list[Path], names: set[str], stems: set[str],
                       inputs: set[Path]) -> None:  # fmt: skip
    """--overwrite redoes the images of --input (of every --shard) alone: in a folder of this
    tool (a manifest.json) the files of other images (inputs dropped from --input or renamed
    since; `names`: the run's NAMEs), and --from-hr's OUT/lr/STEM.png of other `stems`, would
    stay, as if made by this command, under the manifest it writes: the folder then the work of
    two commands. Refused, one line naming them (exit 2), before any file is deleted: they are
    work the command does not name, not deleted for it."""
    others: dict[str, Path] = {}  # an image NAME -> the folder of its files
    ours = [f for f in dict.fromkeys(folders) if (f / "manifest.json").is_file()]
    for folder in ours:
        for name in other_outputs(folder, names, inputs).values():
            others.setdefault(name, folder)
    if ours and not others:  # (its lr/ named by stem: said once the samples are gone)
        for name in outputs_of(out / "lr", stems, inputs, True, lr_stems(out)).values():
            others.setdefault(name, out / "lr")
    if others:
        first = sorted(others)
        said = first_said([f"'{x}'" for x in first])
        raise UsageError(
            f"{others[first[0]]} holds the files of {len(others)} image(s) not among --input "
            f"({said}): --overwrite redoes the images given, and theirs would stay under its "
            "manifest.json as this command's; delete or move them, give their inputs too, or "
            "use another --out (to redo some images with the folder's settings: delete their "
            "files and rerun without --overwrite)"
        )


def other_outputs(folder: Path, own: set[str], inputs: set[Path],
                  single: bool | None = None) -> dict[str, str]:  # fmt: skip
    """{file name: the image NAME it is an output of} of the files in `folder` that are outputs
    (`output_names`) of images not among `own`, never an input's own file; NAME.png counts where
    `single` (default: the folder's manifest.json says n 1; else it is the user's own, not a
    sample, as `remove_old_files` keeps it). Where the manifest lists the NAMEs of the images
    sampled there ("names", `claim_folder`), a file counts only as an output of theirs: at n 1
    the user's notes.png is no image's (a name rule alone took it for the image notes')."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        listed = manifest.get("names")
        single = manifest.get("n") == 1 if single is None else single
    except (OSError, ValueError, AttributeError):
        listed, single = None, True if single is None else single
    listed = listed_names(listed) if isinstance(listed, list) else None
    return outputs_of(folder, own, inputs, single, listed)


def outputs_of(folder: Path, own: set[str], inputs: set[Path], single: bool,
               listed: set[str] | None) -> dict[str, str]:  # fmt: skip
    """`other_outputs` of the images `listed` (None: of any NAME)."""
    found, real = {}, folder.resolve()
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            could = output_names(entry.name, single)
            could = could if listed is None else could & listed
            if (could and not could & own and real / entry.name not in inputs
                    and entry.is_file(follow_symlinks=False)):  # fmt: skip
                found[entry.name] = min(could, key=len)
    return found


def lr_stems(out: Path) -> set[str] | None:
    """The stems of the inputs whose --from-hr LR files OUT/lr/ may hold (OUT/lr/STEM.png): those
    of every run into OUT and its T*/, shared by them (each manifest's "names"; --layout ntire:
    its ntire_index.json, whose NAMEs are numbers), or None (every stem: the name rule) where
    a --from-hr folder's record is missing or unreadable (an older srspace's manifest)."""
    stems = set()
    for folder in [out, *(out / t for t in sweep_folders(out, "manifest.json"))]:
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except FileNotFoundError:  # (a sweep's OUT)
            continue
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("from_hr") is False:  # (no lr/ file)
            continue
        flags = manifest.get("flags") if isinstance(manifest.get("flags"), dict) else {}
        names = manifest.get("names")
        if flags.get("layout") == "ntire":
            names = list(ntire_stems(folder).values()) or None
        if not isinstance(names, list):
            return None
        stems |= listed_names(names)
    return stems


def listed_names(names: list) -> set[str]:
    """The NAMEs of a manifest's "names" (`claim_folder`); an entry that is not one (a manifest
    edited by hand) is left out."""
    return {x for x in names if isinstance(x, str)}


def refuse_other_layout(out: Path, sweep: bool, inputs: set[Path]) -> None:
    """--overwrite redoes the folders it writes: a sweep OUT/T{t}, one temperature OUT itself. A
    sample folder of the other kind in --out (an earlier one-temperature run's files and
    manifest.json at OUT's top under a sweep; a sweep's OUT/T{t}/manifest.json under a
    one-temperature run) would stay beside the new samples, untouched, and sr_eval --sr OUT
    score it as a row of its own (OUT, OUT@T{t}): the folder the work of two commands after a
    command that said it redid it. Refused, one line (exit 2), before any file is deleted; without
    --overwrite both kinds may share --out (each its own manifest.json, its own row)."""
    if sweep:
        if not (out / "manifest.json").is_file():
            return
        kept = sorted(other_outputs(out, set(), inputs))
        what = f"a one-temperature run's manifest.json and {len(kept)} files of its samples"
    else:
        kept = [f"{name}/" for name in sweep_folders(out, "manifest.json")]
        what = "the folders of a --temperature sweep"
    if not kept:
        return
    said = first_said(kept)
    raise UsageError(
        f"--out {out} holds {what} ({said}): --overwrite redoes the "
        f"{'sweep folders T*' if sweep else 'files at its top'}, and those would stay beside "
        "them (sr_eval --sr: a row of their own); delete or move them, or use another --out"
    )


def tiles(context) -> str:
    """A manifest's tile_context in the flags' words."""
    if not context:
        return "no tiles or exact tiles"
    if isinstance(context, list):  # [tile, context]
        return f"--tile {context[0]} --tile-overlap {context[1]} (inexact tiles)"
    return f"--tile-overlap {context} (an older manifest's tiles)"


def cut_tiles(context, fits):
    """A manifest's tile_context, 0 where its tiles are of a size that `fits` (they cut no
    image: exact, whatever their context)."""
    return 0 if isinstance(context, list) and context and fits(context[0]) else context


def settle_tiles(was, now, sampled, inputs):
    """The tile_context a folder records once a run of tiles `now` samples there, where it
    records `was` (other tiles), or None where the two make other samples: refused. A tile size
    `sampled` (`samples_fit`) cuts none of the images sampled there, one `inputs` (`one_tile`)
    none of the run's inputs (a superset of the images it samples). The folder then holds one
    setting's samples: the run's, where they make its samples as the folder's tiles made them
    (a folder begun with tiles that cut no image, rerun untiled with a larger input, is an
    untiled folder now); the folder's, where they make the run's samples (its inputs all within
    a tile; a cut image's samples stay there); else untiled ones (exact), where both are."""
    if cut_tiles(was, sampled) == cut_tiles(now, sampled):
        return now
    if cut_tiles(was, inputs) == cut_tiles(now, inputs):
        return was
    if cut_tiles(was, sampled) == 0 == cut_tiles(now, inputs):
        return 0
    return None


def samples_fit(folder: Path, tile: int, s: int, inputs=()) -> bool:
    """Whether every image sampled in `folder` has an LR within `tile` LR px (a tile of that size
    cut none of them), told by its samples' sizes from their headers (s x the LR's): those of
    inputs no longer given too, not the input files (`one_tile`), which may have changed. One
    file read per image: NAME_sample{i:05d}.png, NAME.png or NAME_sigma.png (not --grid's
    sheets, nor `inputs`, in an --out that is the --input folder); one whose header cannot
    tell does not fit."""
    seen = set()
    real = folder.resolve()
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            m = SAMPLE_NAME.fullmatch(stem)
            if ext != "png" or not dot or (m and m[2] == "grid") or real / entry.name in inputs:
                continue
            name = m[1] if m else stem
            if name in seen or not entry.is_file():
                continue
            seen.add(name)
            size = image_size(entry.path)
            if size is None or max(size) > tile * s:
                return False
    return True


def claim_folder(folder: Path, settings: dict, overwrite: bool, inputs=(),
                 free=frozenset(), sharded: bool = False,
                 holds_whole=lambda tile: False,
                 n_refused=lambda was, now: "",
                 opaque=lambda: False, names=None) -> list | None:  # fmt: skip
    """Write FOLDER/manifest.json, or check a rerun against it: files made with other settings
    are never mixed into one folder (unless --overwrite). Another n is no other setting where
    `n_refused(was, now)` (`n_change`) gives None: sample i is seeded by (--seed, stem, i)
    alone, so a larger n adds samples to the same ones and a smaller one finds its first n
    there; the folder then records the larger (sr_eval.py scores at most that many, and says
    which file is missing where an image has fewer); else the refusal says its reason (a
    string, "" for none). `inputs`: the resolved input paths,
    PNGs there that are not another tool's output (an --out that is the --input folder); `free`:
    the settings of no effect on this run's samples (`no_effect`), not compared; tiles of a
    `holds_whole` size (every input's LR within it: `one_tile`) cut no image, as exact as none,
    whatever their context: the folder's tiles are judged by the images sampled there, the
    run's by its inputs, and the folder then records the tiles of all its samples
    (`settle_tiles`; asked only where the tile_context of the folder and of the run differ).
    Another --alpha-channel or --alpha-upsampler is no other setting where `opaque()` (asked
    only then): no input of the run has an alpha channel, so the flags change no byte of any file
    it writes, and the folder keeps its own values: those of every file they changed (its inputs
    with alpha sampled earlier, dropped from --input since, keep their samples; put back with the
    other value, they are refused again).
    Returns the
    srspace versions that sampled into the folder where this one is not among them (else
    None): a warning, not a refusal, as an upgrade between a preempted job and its requeue
    would otherwise leave only --overwrite, a redo of every image. The run says it and records
    this version once it samples an image there (`upgrade_line`, `record_version`), not here: a
    run that stopped before (another folder of its sweep refused, a stop, an error) left it
    recorded, and its rerun, which sampled, said nothing; a run of images complete adds none.
    The inputs' record (--layout stem; ntire_index.json names them with --layout ntire): a
    --shard I/N (N > 1) of another list of inputs is refused, as images added to or removed from
    the input folder while an array runs move images between its tasks (k % N), some then
    sampled by none; a run of every image (N = 1) records its own list once it has sampled
    every image (`record_inputs`), one into a folder of an older manifest without the record at
    once. `names`: the NAMEs of the run's inputs (of every --shard), added to the manifest's
    "names" (a folder's first run: its list), the images whose outputs the folder may hold
    (`other_outputs`: a file that is none of theirs is the user's); a manifest without the list
    (an older srspace's) gains none, as the images sampled there before are not known."""
    path = folder / "manifest.json"
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UsageError(
                f"{path}: not a readable manifest; pass --overwrite to start over"
            ) from None
        diff = differences(old, settings, free)
        tiled = next(((was, now) for k, was, now in diff if k == "tile_context"), None)
        if tiled is not None:
            sampled = functools.cache(
                lambda tile: samples_fit(folder, tile, settings["scale"], inputs)
            )
            record = settle_tiles(*tiled, sampled, holds_whole)
            diff = [d for d in diff if d[0] != "tile_context" or record is None]
        alpha = ("--alpha-channel", "--alpha-upsampler")
        if any(d[0] in alpha for d in diff) and opaque():  # (no alpha: no effect)
            diff = [d for d in diff if d[0] not in alpha]
        if any(d[0] == "control_sha256" for d in diff):  # n of --latent DIR follows its files:
            diff = [d for d in diff if d[0] != "n"]  # their contents are what changed
        why = next((n_refused(was, now) for k, was, now in diff if k == "n"), None)
        if why is None:  # the same samples, more or fewer of them (`n_change`)
            diff = [d for d in diff if d[0] != "n"]
        # another file named: say that first; n after the flags that set it (`n_change`)
        diff.sort(key=lambda d: (d[0] == "control_sha256", d[0] == "n"))
        if diff:
            k, was, now = diff[0]
            if k == "tile_context":  # what the folder's samples are, and the run's would be
                was, now = tiles(cut_tiles(was, sampled)), tiles(cut_tiles(now, holds_whole))
            elif k == "control_sha256":  # the same flags (compared first), other file contents
                flag = next(f for f in now if (was or {}).get(f) != now[f])
                path = settings["flags"][flag[2:].replace("-", "_")]
                what = ("other contents of" if was else  # (an older manifest: no digests)
                        "an srspace that did not record the contents of")  # fmt: skip
                raise UsageError(
                    f"{folder} holds samples made with {what} {flag} {path}; use another --out, "
                    "or --overwrite to redo them"
                )
            else:
                was, now = f"{k} {json.dumps(was)}", json.dumps(now)
                now += f" ({why})" if k == "n" and why else ""
            raise UsageError(
                f"{folder} holds samples made with {was}, not {now}; use another --out, or "
                "--overwrite to redo them"
            )
        if why is None and settings["n"] > old["n"]:  # the most samples an image may have now

            def larger(m):  # (read again: another shard may have raised it since)
                return {"n": max(settings["n"], m["n"] if type(m.get("n")) is int else 0)}

            amend_manifest(folder, larger)
            old = {**old, "n": settings["n"]}
        if tiled is not None and record != old.get("tile_context"):  # what they are now
            flags = dict(old["flags"]) if isinstance(old.get("flags"), dict) else {}
            if record == tiled[1]:  # the run's own: its flags, as a folder begun with them
                flags.update(tile=settings["flags"]["tile"],
                             tile_overlap=settings["flags"]["tile_overlap"])  # fmt: skip
            old = {**old, "tile_context": record, "flags": flags}
            save_text(path, json.dumps(old, indent=1) + "\n")
        listed = old.get("inputs")
        if "inputs" in settings and listed != settings["inputs"]:
            if sharded and listed is not None:
                then = listed.get("count", "?") if isinstance(listed, dict) else "?"
                raise UsageError(
                    f"{folder} was begun with another list of inputs ({then} images, "
                    f"{settings['inputs']['count']} now: files added to, removed from or renamed "
                    f"in --input {settings['flags']['input']}?): with --shard "
                    f"{settings['flags']['shard']} the images would move between the array's "
                    "tasks, some sampled by none; put the inputs back, or run once with --shard "
                    "0/1 (it samples every image not complete, then records the new list), or "
                    "use another --out"
                )
            if listed is None:  # an older manifest: no list to keep the shards to yet
                old = {**old, "inputs": settings["inputs"]}
                save_text(path, json.dumps(old, indent=1) + "\n")
            # (a run of every image records its list once it has sampled them all:
            # `record_inputs`; killed before, a shard of its list would skip the images that
            # the earlier list gave to the array's tasks already done)
        # The run's NAMEs added to the list, unless its inputs are those the folder records
        # (their NAMEs listed with the record, `record_inputs`): in an array each shard's claim,
        # under the lock, went through the list (200,000 names: 0.1 s of every shard's)
        more = names or frozenset()
        if (isinstance(old.get("names"), list) and listed != settings.get("inputs", {})
                and not more <= listed_names(old["names"])):  # fmt: skip
            amend_manifest(folder, lambda m: {"names": sorted(listed_names(m["names"]) | more)}
                           if isinstance(m.get("names"), list) else {})  # fmt: skip
        versions = folder_versions(record_unrecorded(folder, old))
        return None if settings["version"] in versions else versions
    if not overwrite and not real_paths(folder.glob("*.png")) <= set(inputs):
        raise UsageError(
            f"{folder} holds PNG files but no manifest.json (another tool's output?); use "
            "another --out, or --overwrite"
        )
    listed = {} if names is None else {"names": sorted(names)}
    save_text(path, json.dumps({**settings, **listed, "versions": [settings["version"]]},
                               indent=1) + "\n")  # fmt: skip
    # (the versions of files redone: not this folder's; a folder of the name: said at a claim)
    for name in (UNRECORDED, TAKEN):
        with signals_held(), contextlib.suppress(IsADirectoryError):
            (folder / name).unlink(missing_ok=True)
    return None


def n_change(args: SampleArgs, model, setter: str):
    """`claim_folder`'s n_refused: why a folder of samples made with n `was` cannot serve a run
    of n `now`, or None where it can: sample i of an image is seeded by (--seed, stem, i) and
    named by i alone, whatever n and --batch (docs/design.md, "Sampling reproducibility"). It
    cannot where n changes the files' names (one output per image, NAME.png, at n 1: a
    deterministic model, or any with --layout ntire), where a control flag sets n (`setter`:
    its value differs too), or where --grid asks for fewer (a sheet shows the first samples
    and the std of all: those complete would be of `was`, those sampled now of `now`)."""

    def refused(was, now) -> str | None:
        if not (type(was) is int and type(now) is int):  # (a manifest edited, or not this tool's)
            return ""
        if 1 in (was, now) and (not model.stochastic or args.layout == "ntire"):
            return "at --n 1 each image's one output is NAME.png, else NAME_sample{i:05d}.png"
        if setter:
            return f"{setter} sets the number of outputs"
        if args.grid and now < was:
            return (f"--grid's sheets of the images complete show the std of {was} samples, those "
                    f"sampled now would show {now}")  # fmt: skip
        return None

    return refused


def folder_versions(manifest: dict) -> list:
    """The srspace versions that sampled into a folder: its manifest's "versions", each that
    did (`record_version`); an older manifest's "version", its first, alone (None: none
    recorded)."""
    versions = manifest.get("versions")
    return versions if isinstance(versions, list) else [manifest.get("version")]


def upgrade_line(folder: Path, versions: list) -> str:
    """The warning line said before this run's first sample in a folder that other srspace
    `versions` sampled into (`claim_folder`'s; None: a manifest that records none)."""
    named = [v for v in dict.fromkeys(versions) if isinstance(v, str)]
    was = f"srspace {', '.join(named)}" if named else ""
    if any(not isinstance(v, str) for v in versions):  # (a manifest edited, or not this tool's)
        was += f"{' and ' if named else ''}an srspace that did not record its version"
    return (f"{PROG}: warning: {folder} holds samples made by {was}, this is {__version__}: the "
            "images complete keep them, the others are sampled by this one (a release may change "
            "the samples of the same settings; --overwrite redoes every image)")  # fmt: skip


def record_version(folder: Path) -> None:
    """This srspace version added to FOLDER/manifest.json's "versions" (`folder_versions`;
    read again: another shard may have added its own), once it has sampled an image there:
    said once (`upgrade_line`), not at every rerun. "version" stays the folder's first. Where a
    stop gave up waiting for the manifest's lock (`lock_folder`), said, and kept in a file of
    its own (UNRECORDED, written without the lock) that the next run to claim the folder records
    (`record_unrecorded`): a rerun that finds every image complete samples nothing there, and
    the version that did was never recorded."""
    try:
        amend_manifest(folder, lambda old: {
            "versions": [*dict.fromkeys([*folder_versions(old), __version__])]})  # fmt: skip
    except LockWaitedOut as e:
        kept = folder / UNRECORDED
        try:  # (those another such stop kept there too; a file that cannot be read: replaced)
            try:
                before = unrecorded(kept)
            except ValueError:
                before = []
            save_text(kept, json.dumps([*dict.fromkeys([*before, __version__])]) + "\n")
            later = f"the next run there records it ({kept.name} keeps it meanwhile)"
        except (OSError, OutputError):  # (the folder as the holder leaves it: said)
            later = "a rerun that samples an image there records it"
        say_err(f"{PROG}: warning: {e}: srspace {__version__}, which sampled there, is not "
                f"recorded in its \"versions\" yet; {later}")  # fmt: skip


# The versions that sampled into a folder, not recorded in its manifest.json ("versions") where
# a stop gave up waiting for its lock (`record_version`), a JSON list; one name, so that every
# claim looks for it with one file system call, not a listing of a folder of 200,000 samples.
UNRECORDED = ".unrecorded-versions.json"
# UNRECORDED as a claim takes it (`record_unrecorded`, the manifest's lock held: one claim at a
# time): left where the claim failed, the next claim records it.
TAKEN = f"{UNRECORDED}.taken"


def unrecorded(path: Path) -> list[str]:
    """The versions an UNRECORDED file lists ([]: none there); ValueError (why) where it cannot
    be read or is not a JSON list of them (edited by hand, a disk's fault)."""
    try:
        said = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror or e}") from None
    except ValueError:
        raise ValueError("not JSON") from None
    if not (isinstance(said, list) and all(isinstance(v, str) for v in said)):
        raise ValueError("not a JSON list of srspace versions")
    return said


def record_unrecorded(folder: Path, manifest: dict) -> dict:
    """The versions of the folder's UNRECORDED file added to `manifest`'s "versions" (the lock
    held: `claim_folder`), the file deleted; returns the manifest with them. The file is first
    renamed to TAKEN: a stop that writes it anew meanwhile (it takes no lock) writes a file of
    that name again, for the next claim, not one deleted here unread. Signals are held from the
    rename to the deletion; a TAKEN left all the same (the manifest's write failed, a full disk;
    a SIGKILL) is the next claim's to record first, its versions not lost (one name, looked for
    by every claim: it held this process's id, no claim looked for it). One that cannot be read
    (or a folder of that name) is left, as UNRECORDED, said in one warning line: deleted, the
    versions it kept would be lost without a word."""
    kept, taken = folder / UNRECORDED, folder / TAKEN
    with signals_held():
        for leftover in (True, False):
            try:
                if leftover:
                    os.stat(taken)  # (none there: the usual case)
                elif kept.is_dir():
                    raise ValueError("a folder")
                else:
                    os.rename(kept, taken)
            except OSError:
                continue
            except ValueError as e:
                return unread(kept, e, manifest)
            try:
                said = unrecorded(taken)
            except ValueError as e:  # (back under its name, unless a stop wrote one meanwhile:
                try:  # then left as TAKEN, for the next claim to say)
                    os.link(taken, kept)
                except OSError:
                    return unread(taken, e, manifest)
                taken.unlink(missing_ok=True)
                return unread(kept, e, manifest)
            versions = folder_versions(manifest)
            new = [v for v in said if v not in versions]
            if new:  # (the file read again, as every change of it: `amend_manifest`)
                amend_manifest(folder, lambda m, new=new: {
                    "versions": [*dict.fromkeys([*folder_versions(m), *new])]})  # fmt: skip
                manifest = {**manifest, "versions": [*versions, *new]}
            taken.unlink(missing_ok=True)
    return manifest


def unread(path: Path, why: ValueError, manifest: dict) -> dict:
    """`record_unrecorded`'s warning line for an UNRECORDED file it cannot read; `manifest`."""
    say_err(f"{PROG}: warning: {path}: {why}; the srspace versions it keeps are not recorded in "
            "its folder's manifest.json (\"versions\"); correct or delete it")  # fmt: skip
    return manifest


def record_inputs(folder: Path, inputs: dict) -> None:
    """FOLDER/manifest.json's record of the inputs (`claim_folder`) made this run's, where it is
    another list: a run of every image (--shard 0/1, --layout stem) once it has sampled them
    all. A manifest that cannot be read keeps its record (its shards are then refused)."""
    amend_manifest(folder, lambda old: {"inputs": inputs})


def amend_manifest(folder: Path, change) -> None:
    """FOLDER/manifest.json with the fields `change(manifest)` gives, where they are other
    values (the file read now, under `manifest_lock`; one that cannot be read is left as it is)."""
    path = folder / "manifest.json"
    with manifest_lock(folder):
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        new = change(old)
        if any(old.get(k) != v for k, v in new.items()):
            save_text(path, json.dumps({**old, **new}, indent=1) + "\n")


class ScanFirst(Exception):
    """A scan of the inputs (`scanned_unlocked`) asked for under `manifest_lock`: `scan()` it
    with the lock let go, then claim the folder again (its manifest read anew)."""

    def __init__(self, scan):
        super().__init__()
        self.scan = scan


def scanned_unlocked(fn):
    """fn, cached by its arguments, never run under `manifest_lock`: there a result not known
    yet raises ScanFirst. Reading every input (has_alpha decodes a TIFF's pixels: minutes for a
    folder of large ones) under the lock held the other shards' claims and version records all
    that while, and a stop of theirs with it where their wait has signals held (`image_written`).
    The claim asks before it writes anything, so it is begun again, on the manifest as it is
    then."""
    known = {}

    def call(*args):
        if args not in known:
            if getattr(_LOCKED, "folders", None):
                raise ScanFirst(functools.partial(call, *args))
            known[args] = fn(*args)
        return known[args]

    return call


_LOCKED = threading.local()  # .folders: those whose manifest_lock this thread holds
_NOT_LOCKED: set[str] = set()  # folders that could not be locked, said so (`manifest_lock`)


@contextlib.contextmanager
def manifest_lock(folder: Path):
    """FOLDER/manifest.json read, changed and written (renamed over) by one process at a time:
    the shards of an array that raise its n (a rerun with a larger --n), record their version or
    begin the folder in the same instant each read it, and the later rename would drop the
    other's change (its samples then beyond the n sr_eval.py reads). An exclusive flock on the
    folder itself (the manifest is replaced, not written in place: a lock on it would be on the
    old file; no lock file is left, as sr_lib/report.py's `locked`), waited for; the kernel drops
    it when the process ends, however it ends. Re-entrant in a thread (`claim_folder`'s
    `amend_manifest`). Where the folder cannot be opened or locked (a file system without
    locks) the manifest is written as without it: the latter with one warning line a folder,
    as the other scripts' locks say theirs."""
    folders = _LOCKED.__dict__.setdefault("folders", set())
    key = os.path.abspath(folder)
    if key in folders:
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # (a folder that cannot be opened cannot take the manifest: said there)
        yield
        return
    try:
        try:
            lock_folder(fd, folder)
        except OSError as e:  # ENOLCK, EOPNOTSUPP: no locks there (said once a folder)
            if key not in _NOT_LOCKED:
                _NOT_LOCKED.add(key)
                say_err(f"{PROG}: warning: {folder}: cannot lock it ({e.strerror or e}); two "
                        "shards changing its manifest.json at once could lose one's change "
                        "(a raised n, a version)")  # fmt: skip
        folders.add(key)
        yield
    finally:
        folders.discard(key)
        os.close(fd)


STOP_WAIT = 10.0  # s a stop waits for manifest_lock with signals held (SLURM's KillWait: 30)


class LockWaitedOut(Exception):
    """manifest_lock not taken within STOP_WAIT s of a stop that waits for it (`lock_folder`)."""


def lock_folder(fd: int, folder: Path) -> None:
    """The flock of `manifest_lock`, waited for. With signals held in the main thread (an image's
    version record, `image_written`) a stop that comes meanwhile waits for the end of the wait:
    a holder that never lets go (a shard stopped by SIGSTOP, a hung network file system) kept
    the stop waiting until SLURM's SIGKILL, the image's count and line lost with the rest. So
    it is polled there, and given up STOP_WAIT s after the stop: LockWaitedOut (its record then
    said not made, `record_version`). Elsewhere a stop ends the wait at once (Preempted), and
    in a thread none comes."""
    if not held_here():
        return fcntl.flock(fd, fcntl.LOCK_EX)
    since, pause = None, 0.001
    while True:
        try:
            return fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        if stop_pending():
            since = since or time.monotonic()
            if time.monotonic() - since >= STOP_WAIT:
                raise LockWaitedOut(
                    f"{folder}: its manifest.json still locked by another process {STOP_WAIT:g} "
                    "s after the stop (a shard stopped or hung, a file system not answering)"
                )
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def claim_index(folder: Path, paths: list[Path], scale: int, overwrite: bool) -> None:
    """FOLDER/ntire_index.json: which input stem each NTIRE index is, for sr_eval.py to check."""
    index = {"scale": scale, **{f"{k:06d}": p.stem for k, p in enumerate(paths)}}
    path = folder / "ntire_index.json"
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old != index:
            raise UsageError(
                f"{path}: the NTIRE indices of this folder belong to other inputs (images were "
                "added, removed or renamed); use another --out, or --overwrite to redo them"
            )
        return
    save_text(path, json.dumps(index, indent=1) + "\n")


@dataclass
class Outputs:
    """The files of one image in one sample folder."""

    n: int
    single: bool  # one NAME.png (n = 1: a deterministic model, or any with --layout ntire)
    sigma: bool
    grid: bool
    latents: str  # the ending of the --save-latent files (model.latent_file), "" for none
    numbers: dict | None = None  # --latent DIR: name -> its sample numbers; None: 0..n-1
    # model.old_latent_file: a latent an older srspace saved so (a RefVAE/VarSR .npy, the same
    # sample's, with the same settings: manifest.json) counts as written, so a rerun neither
    # samples its image again nor writes a second latent of the sample beside it
    old_latents: str = ""

    def samples(self, name: str) -> list[str]:
        if self.single:
            return [f"{name}.png"]
        numbers = range(self.n) if self.numbers is None else self.numbers[name]
        return [f"{name}_sample{i:05d}.png" for i in numbers]

    def written(self, folder: Path, name: str, j: int) -> bool:
        """Whether the j-th of samples(name) is there as `complete` counts it, with its
        --save-latent file."""
        files = [self.samples(name)[j]] + ([self.latent_names(name)[j]] if self.latents else [])
        return all(is_written_file(folder / f) or self.old_latent(folder / f) for f in files)

    def latent_names(self, name: str) -> list[str]:
        """The --save-latent files of samples(name), in its order: NAME_sample{i:05d}{latents}
        also where the sample is NAME.png (--layout ntire --n 1), as --latent DIR reads them."""
        numbers = range(self.n) if self.numbers is None else self.numbers[name]
        return [f"{name}_sample{i:05d}{self.latents}" for i in numbers]

    def all(self, name: str) -> list[str]:
        names = self.samples(name)
        names += [f"{name}_sigma.png", f"{name}_sigma.npy"] if self.sigma else []
        names += [f"{name}_grid.png"] if self.grid else []
        names += self.latent_names(name) if self.latents else []
        return names

    def complete(self, folder: Path, name: str) -> bool:
        """Every file there as this script writes it: a regular file, not a symbolic link (one to
        an input image passed for a sample, and the image was never sampled), and not empty; a
        latent also as an older srspace wrote it (`old_latents`)."""
        return all(
            is_written_file(folder / f) or self.old_latent(folder / f) for f in self.all(name)
        )

    def old_latent(self, path: Path) -> Path | None:
        """The latent an older srspace saved in place of the --save-latent file `path` (a
        RefVAE/VarSR NAME_sample{i:05d}.latent.npy), where written; else None."""
        if not self.old_latents or not path.name.endswith(self.latents):
            return None
        old = path.with_name(path.name.removesuffix(self.latents) + self.old_latents)
        return old if is_written_file(old) else None


def is_written_file(path: Path) -> bool:
    """A regular file, the link itself not followed, of at least one byte (one lstat, as
    is_file's one stat). The files are renamed into place whole but not fsync'd (an fsync per
    sample would cost a network file system a round trip each): a node that crashes (power,
    kernel) soon after can leave them empty, which a rerun took as complete, and sr_eval.py
    then refused as unreadable."""
    try:
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_size > 0
    except OSError as e:  # the errors Path.is_file takes for "no"; others (EACCES) propagate
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return False
        raise


def no_inputs_skipped() -> dict:
    """`skip_input`'s record, empty: the names of the inputs skipped, by why, in the order the
    end's line (`lost_inputs`) gives them."""
    return {"unreadable": [], "too small": [], "too small for the model": []}


def skip_input(e: DataError, path: Path, failed: dict, total: int, summary: Summary) -> str:
    """An input that cannot be read or is too small (`e`): one line, and it is skipped (kept in
    `failed` under why, returned, for the end's one line and exit 3), or where it is the only
    input, `e` itself."""
    if total == 1:
        raise e
    say_err(f"{PROG}: error: {said_error(e)}; skipped", quoted_errors(e))  # (as exit_on_error)
    why = ("too small for the model" if isinstance(e, LrTooSmall) else
           "too small" if isinstance(e, TooSmall) else "unreadable")  # fmt: skip
    failed[why].append(path.name)
    summary.update(failed=sum(map(len, failed.values())))
    return why


def missing_links(dangling: list[Path]) -> list[str]:
    """--input's symbolic links to missing files (`input_paths`), in words: [] or one phrase.
    Left out of the images with one warning at the start (sr_lib.data.list_images), they end
    the run with exit 3 once the others are written, as an unreadable input does: exit 0 told a
    pipeline that every image of the folder was sampled. Every --shard says them (they are in
    none: the folder lists them as no image)."""
    if not dangling:
        return []
    return [f"{len(dangling)} symbolic link(s) to missing files in --input, not sampled "
            f"({links_said(dangling)}): restore their targets and rerun, or remove the "
            "links"]  # fmt: skip


def lost_inputs(failed: dict, total: int, model, name: str) -> list[str]:
    """The inputs `skip_input` skipped, in words: one phrase per why."""
    said = {"too small": f"too small to downscale (under {default_mod(model.scale)} px)",
            "too small for the model": f"too small for the {name} model (an LR under "
                                       f"{model.min_lr_size} px)"}  # fmt: skip
    return [f"{len(names)} of {total} inputs {said.get(why, why)} "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for why, names in failed.items() if names]  # fmt: skip


class TooSmall(DataError):
    """An input smaller than --from-hr's crop (the end summary counts these apart)."""


class LrTooSmall(DataError):
    """An LR smaller than the model takes (`check_lr_fits`; the end summary counts these apart)."""


def check_lr_fits(model, name: str, img: "LowRes", path: Path) -> None:
    """An LR with a side under the model's min_lr_size once padded to its lr_multiple (RRDB's and
    SRFlow-DA's of 1 px, whose half-resolution map has no pixel; RefVAE's r41 encoder's under 16
    px at its bicubic size) stopped the run with a RuntimeError traceback from inside the
    network: one line naming it now, the image skipped as an unreadable one (exit 3 at the end),
    as the library's `sample` refuses it (`check_sampling`)."""
    h, w = img.rgb.shape[:2]
    if not lr_fits(model, h, w):
        least = model.min_lr_size
        raise LrTooSmall(f"{path}: an LR of {w}x{h} px; the {name} model takes at least "
                         f"{least}x{least} px (upscale it, or leave it out)")  # fmt: skip


# ITU-R BT.601 luma weights of R, G, B: gray outputs (`to_gray`), as Pillow's convert("L") and
# OpenCV's RGB2GRAY weigh them (docs/sample.md: "Gray, alpha and 16-bit inputs").
LUMA = (0.299, 0.587, 0.114)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float RGB -> (..., 1, H, W): the BT.601 luma of each pixel (LUMA)."""
    w = torch.tensor(LUMA, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() * w).sum(-3, keepdim=True)


@dataclass
class LowRes:
    """An input as the model sees it (rgb) and how its outputs are written (gray, alpha, bits)."""

    rgb: np.ndarray  # (h, w, 3): uint8; float32 in [0, 1] with --bit-depth 16
    gray: bool  # a gray file: its outputs are written gray (to_gray)
    alpha: np.ndarray | None  # (h, w) float32 in [0, 1], put on the outputs; None: opaque
    bits: int  # of the PNGs written: 8 or 16 (--bit-depth)

    def tensor(self) -> torch.Tensor:
        return to_tensor(self.rgb)[None]

    def alpha_at(self, scale: int) -> np.ndarray | None:
        """The alpha of the outputs, scale x the LR's size, (H, W, 1) at `bits`: the MATLAB
        bicubic upscale (sr_lib.resize) clipped to [0, 1]; None: opaque."""
        if self.alpha is None:
            return None
        a = self.alpha if scale == 1 else np.clip(imresize(self.alpha, scale), 0, 1)
        return self.pixels(torch.from_numpy(a.astype(np.float32))[None, None], gray=False)[0]

    def pixels(self, x: torch.Tensor, alpha: np.ndarray | None = None, gray: bool | None = None,
               bits: int | None = None) -> np.ndarray:  # fmt: skip
        """Float (N, C, H, W) images as written, (N, H, W, C'): gray (`to_gray`) for a gray
        input, rounded to `bits` (default: the input's --bit-depth), `alpha` (alpha_at) added."""
        x = to_gray(x) if (self.gray if gray is None else gray) else x
        out = (to_uint16 if (bits or self.bits) == 16 else to_uint8)(x)
        if alpha is None:
            return out
        return np.concatenate([out, np.broadcast_to(alpha, (*out.shape[:-1], 1))], axis=-1)


def read_input(path: Path, s: int, from_hr: bool, lr_file: Path | None,
               args: SampleArgs) -> LowRes:  # fmt: skip
    """The LR of an input file (its colour at --bit-depth's precision; its alpha unless
    --alpha-channel drop); --from-hr makes it, alpha included (and writes it to lr_file, unless
    None, as the outputs are written: gray, alpha, --bit-depth)."""
    planes = held(read_planes)(path, wide=args.bit_depth == 16)
    img, alpha = planes.rgb, planes.alpha if args.alpha_channel == "keep" else None
    degradation = degradation_of(args)
    if from_hr:
        m = default_mod(s)
        img = mod_crop(img, m)
        if img.size == 0:
            raise TooSmall(f"{path}: smaller than {m} px, no LR to make")
        if degradation:  # 8-bit, as in training (the noise is in 8-bit levels, JPEG is 8-bit)
            if img.dtype != np.uint8:  # (--bit-depth 16: x / 65535, rounded as round(x / 257))
                img = np.rint(img * 255).astype(np.uint8)
            gray = equal_channels(img)  # (a gray file's; an RGB one's too, as sr_train.py's)
            img = validation_degradation(img, s, degradation, path.stem, gray=gray)
        else:
            img = imresize(img, 1 / s)  # uint8 stays uint8 (bit-exact with NTIRE's); float: float64
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 1).astype(np.float32)
        if alpha is not None:
            alpha = np.clip(imresize(mod_crop(alpha, m), 1 / s), 0, 1).astype(np.float32)
    lr = LowRes(img, planes.gray, alpha, args.bit_depth)
    if from_hr and lr_file is not None:
        save_png(lr_file, lr.pixels(lr.tensor(), lr.alpha_at(1))[0])
    return lr


# --check-invertibility: the largest |x - x'| (pixels in [0, 1]) of a sample decoded, encoded
# and decoded again that passes: half an 8-bit level, so a round trip that passes moves no
# written pixel by more than one level. Measured in float32 (docs/flows.md#invertibility):
# 5e-6 to 2e-5 for tiny flows of random weights, 1e-6 for a small SRFlow trained on the demo
# images, 5e-4 at the most for random weights well above the usual scale; a broken inverse or a
# NaN is far above it.
INVERT_TOLERANCE = 0.5 / 255
# The flags of writing samples: with --check-invertibility, which writes none, without effect.
CHECK_UNUSED = ("out", "layout", "tile", "tile_overlap", "overwrite", "save_uncertainty", "grid",
                "cem", "ref", "latent_from", "latent", "latent_shift", "latent_steps",
                "save_latent", "alpha_channel", "alpha_upsampler")  # fmt: skip


class NotInvertible(NonFiniteError):
    """--check-invertibility: a flow's samples do not come back through its inverse (exit 5, the
    numerical failures' code, as a NaN sample's)."""


def check_invertibility(args: SampleArgs, given: set[str], model, name: str, paths: list[Path],
                        from_hr: bool, device, summary: Summary,
                        dangling: list[Path] = ()) -> int:  # fmt: skip
    """--check-invertibility: the samples of each input, drawn as sampling draws them (the same
    seeds, temperatures, --batch), each encoded back to its latents z' and decoded again to x'
    (`round_trip`): one line per image with the max and mean |x - x'| (pixels in [0, 1]) and
    the max |z - z'| (not with --quiet), then a summary, the closing line (--json: its fields
    images, samples, max_error); exit 0 where every max |x - x'| is within INVERT_TOLERANCE, else
    exit 5 naming the worst image. Nothing is written."""
    if not callable(getattr(model, "round_trip", None)):
        flows = [k for k, c in MODELS.items() if callable(getattr(c, "round_trip", None))]
        raise UsageError(f"--check-invertibility: the {name} model is not a flow, it has no "
                         f"inverse to check (only: {', '.join(flows)})")  # fmt: skip
    unused = [f"--{k.replace('_', '-')}" for k in CHECK_UNUSED if k in given]
    if unused:
        say_err(f"{PROG}: warning: {', '.join(unused)}: no effect with --check-invertibility "
                "(nothing is written; each image is checked whole); ignored")  # fmt: skip
    temperatures = args.temperature or [model.default_temperature]
    part, parts = (int(v) for v in args.shard.split("/"))
    mine = [(k, p) for k, p in enumerate(paths) if k % parts == part]
    summary.update(out=None, images=len(mine), samples=args.n, max_error=None)
    autocast, s = autocast_for(args.amp, device), model.scale
    worst = []  # (max |x - x'|, line) per image
    failed = no_inputs_skipped()
    for _, path in mine:
        try:
            img = read_input(path, s, from_hr, None, args)
            check_lr_fits(model, name, img, path)
        except DataError as e:  # skipped as sampling skips it: exit 3 once the others are checked
            skip_input(e, path, failed, len(mine), summary)
            continue
        lr = img.tensor().to(device)
        h, w = lr.shape[-2:]
        x_lr = pad_to_multiple(lr, model.lr_multiple)
        top, total, count, z_max, at = -1.0, 0.0, 0, 0.0, ""
        for t in temperatures:
            for c0 in range(0, args.n, args.batch):
                idx = range(c0, min(c0 + args.batch, args.n))
                noise = NoiseSource([sample_seed(args.seed, path.stem, i) for i in idx], device)
                try:
                    with autocast:
                        x, x2, dz = model.round_trip(x_lr, len(idx), float(t), noise)
                except (MemoryError, RuntimeError) as e:  # (torch's are RuntimeErrors)
                    if not is_out_of_memory(e):
                        raise
                    line = out_of_memory_line(e, model, lr, args.n, args, None)
                    raise OutOfMemory(line) from None
                diff = (x - x2)[..., : h * s, : w * s].float().abs().flatten(1)
                total, count = total + float(diff.double().sum()), count + diff.numel()
                z = float(dz.float().max())
                z_max = z if not z <= z_max else z_max  # (NaN compares false: kept)
                k = int(diff.amax(1).nan_to_num(math.inf).argmax())  # NaN: the worst
                if not float(diff[k].max()) <= top:  # (NaN compares false: taken)
                    top, at = float(diff[k].max()), f"sample {idx[k]} at temperature {t:g}"
        line = (f"{path.name}: max |x - x'| {top:.2e} ({at}), mean {total / count:.2e}, "
                f"max |z - z'| {z_max:.2e}")  # fmt: skip
        if not args.quiet:
            print_out(line)
        worst.append((top, path.name, at))
        was = summary.fields["max_error"]
        summary.update(max_error=top if was is None or not top <= was else was)  # NaN: kept
    bad = [w for w in worst if not w[0] <= INVERT_TOLERANCE]  # NaN fails
    samples = f"{len(worst)} images x {args.n} samples at temperature " + ", ".join(
        f"{t:g}" for t in temperatures
    )
    lost = "; ".join(lost_inputs(failed, len(mine), model, name) + missing_links(dangling))
    if bad:  # (exit 5 before the skipped inputs' 3: the checkpoint is what is checked)
        top, img, at = max(bad, key=lambda w: math.inf if math.isnan(w[0]) else w[0])
        more = f" (and {len(bad) - 1} more of {len(worst)} images)" if len(bad) > 1 else ""
        raise NotInvertible(
            f"{img}: the flow does not invert: max |x - x'| "
            + ("is NaN" if math.isnan(top) else f"{top:.2e}")
            + f" ({at}){'' if math.isnan(top) else f' is above {INVERT_TOLERANCE:g}'}{more}; "
            "its weights are numerically broken "
            "(docs/flows.md#invertibility)" + (f"; not checked: {lost}" if lost else "")
        )
    top = max((w[0] for w in worst), default=0.0)
    if worst:
        summary.line(f"invertible: {samples}: max |x - x'| {top:.2e} <= {INVERT_TOLERANCE:g}")
    if lost:
        rest = "the others are invertible" if worst else "no image was checked"
        raise DataError(f"{lost}; {rest}")
    return 0


def latent_source(ck: dict, model, ckpt_sha256: str) -> dict:
    """What made this run's latents, as a flow's --save-latent records it in each .latent.npz
    (its made_by entry, JSON) and `--latent` checks it (sr_lib.models.base.check_latent_source):
    the model, its scale, the checkpoint's sha256 and config (as JSON has them: lists)."""
    made_by = {"model": ck["model"], "scale": model.scale, "checkpoint_sha256": ckpt_sha256,
               "config": ck["model_cfg"], "version": __version__}  # fmt: skip
    return json.loads(json.dumps(made_by, sort_keys=True))


def resolve_controls(args: SampleArgs, model, made_by: dict, device):
    """The sampling-control flags as the model's controls; a flag the model does not take is a
    usage error naming the models that do. None: the model draws no explicit latents.
    made_by: the run's `latent_source`, which a saved latent must name (one warning line for
    another checkpoint of the model), and which --save-latent writes."""
    name = made_by["model"]
    asked = {"--ref": ("ref", args.ref), "--latent-from": ("latent_from", args.latent_from),
             "--latent": ("latent", args.latent),
             "--latent-shift": ("latent_shift", args.latent_shift),
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
    if args.latent and Path(args.latent).is_dir():  # LatentDir: its files are read per input
        other = [f for f, (k, v) in asked.items() if v and k in ("ref", "latent_from",
                                                                   "latent_shift")]  # fmt: skip
        if other:
            raise UsageError(
                f"--latent {args.latent}: a folder, each input decoded from its own saved "
                f"latents; it cannot be combined with {other[0]} (give --latent one FILE)"
            )
        del given["latent"]
    if args.latent_shift:
        given["latent_steps"] = args.latent_steps
    controls = model.resolve_controls({**given, "made_by": made_by}, args.n, device)
    if controls is None:
        return None
    for line in controls.warnings:
        say_err(f"{PROG}: warning: {line}")
    controls.made_by = made_by
    return controls


def controls_setter(args: SampleArgs, controls) -> str:
    """The control flag that sets the number of outputs ("" where --n does), as the model's
    `resolve_controls` decides it: the last of --ref DIR, --latent-from, --latent and
    --latent-shift."""
    if controls is None:
        return ""
    return ("--latent-shift" if args.latent_shift else "--latent" if args.latent
            else "--latent-from" if args.latent_from
            else "--ref DIR" if controls.per_sample_refs else "")  # fmt: skip


# A --save-latent file: NAME_sample{i:05d}.latent.npy|.npz (the whole name: NAME is all before
# _sample, so the files of "a" and of "a_b" never mix); or NAME.latent.npy|.npz, sample 0
# without a number, as a --layout ntire --n 1 folder may hold it (read where NAME is {k:06d})
LATENT_NAME = re.compile(r"(.+?)(?:_sample(\d{5}))?(\.latent\.npy|\.latent\.npz)")


@dataclass
class LatentDir:
    """--latent DIR: a folder of --save-latent files, each input decoded from its own: the files
    NAME_sample{i:05d}{ending} (ending: the model's latent_file, or its old_latent_file: a
    RefVAE/VarSR .npy an older srspace saved, read still), one output each, written as
    NAME_sample{i:05d}.png with the same i. NAME is the input's stem; in the folder of a
    --layout ntire run, its number k ({k:06d}) is the stem its ntire_index.json names."""

    folder: Path
    endings: tuple  # the model's latent_file, and its old_latent_file where it has one
    files: dict  # input stem -> {i: path} of files of `endings`
    others: dict  # input stem -> another ending, where it has files of that only
    broken: dict  # input stem -> the first name of `endings` there that is no file
    digests: dict = field(default_factory=dict)  # path -> sha256 of its contents, as first read
    own: dict | None = None  # the run's latent_source (`check`'s)
    saved: dict = field(default_factory=dict)  # its manifest.json ({}: none readable)
    unrecorded: list = field(default_factory=list)  # `check_npy_saver`'s lines, said by `check`

    @classmethod
    def scan(cls, folder: Path, ending: str, old: str = "") -> "LatentDir":
        """The folder's latent files, listed once (other files, the PNGs among them, ignored)."""
        endings = (ending, old) if old else (ending,)
        numbers = ntire_stems(folder)
        files, others, broken = {}, {}, {}
        try:
            named = [(e, m) for e in os.scandir(folder) if (m := LATENT_NAME.fullmatch(e.name))]
        except OSError as e:
            raise DataError(f"--latent {folder}: cannot list it ({e.strerror or e})") from None
        for entry, m in sorted(named, key=lambda x: x[0].name):
            if m[2] is None and m[1] not in numbers:  # NAME.latent.*: only an NTIRE number's
                continue
            stem, i = numbers.get(m[1], m[1]), int(m[2] or 0)
            if m[3] not in endings:
                others[stem] = m[3]
                continue
            if not entry.is_file():  # (a link to a file: a file) said where its input is given
                broken.setdefault(stem, entry.name)
                continue
            mine = files.setdefault(stem, {})
            if i in mine:  # its number's file and its stem's, or sample 0's two names
                was = LATENT_NAME.fullmatch(mine[i].name)
                why = (f"ntire_index.json names {m[1]} so" if was[1] != m[1] else
                       "the older and the numbered name of sample 0" if was[2] != m[2] else
                       f"its latent as an older srspace saved it, {was[3]}, and as now, "
                       f"{m[3]}")  # fmt: skip
                raise DataError(  # (the folder's contents, as any unusable file: exit 3)
                    f"--latent {folder}: {mine[i].name} and {entry.name} are both sample {i} of "
                    f"{stem} ({why}); remove one"
                )
            mine[i] = Path(entry.path)
        files = {stem: dict(sorted(v.items())) for stem, v in files.items()}  # by sample number
        others = {k: v for k, v in others.items() if k not in files}
        return cls(folder, endings, files, others, broken)

    def check_saver(self, own: dict) -> None:
        """What saved the folder's latents, which an older srspace's .npy records nothing of (a
        .npz names it in each file, checked per file), against `own` (the run's latent_source):
        its manifest.json (`check_npy_saver`), where it holds such files; else the manifest is
        read only for what the inputs were (`warn_other_inputs`)."""
        every = [f for v in self.files.values() for f in v.values()]
        old = [f for f in every if f.name.endswith(".npy")]
        if old:
            self.saved = check_npy_saver("--latent", self.folder, own, self.unrecorded,
                                         (len(old), len(every)))  # fmt: skip
            return
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads((self.folder / "manifest.json").read_text())
            self.saved = saved if isinstance(saved, dict) else {}

    def plan(self, paths: list[Path], layout: str) -> tuple[int, dict | None, list[Path]]:
        """(n, the sample numbers of each input stem, the inputs without files) for `paths`:
        n = the highest sample number + 1 (manifest.json's n: sr_eval.py reads at most so
        many). --layout ntire numbers the samples 0..N-1 of every image alike: numbers of
        `paths` that are not that are refused, and None is returned for the numbers (range(n))."""
        bad = [self.broken[p.stem] for p in paths if p.stem in self.broken]
        if bad:  # (not a sample left out without a word: a gap, or a smaller n)
            raise DataError(
                f"--latent {self.folder}: {bad[0]} is no file (a link to nothing, or a folder); "
                "put the file back, or remove the name to decode the others"
            )
        numbers = {p.stem: sorted(self.files[p.stem]) for p in paths if p.stem in self.files}
        missing = [p for p in paths if p.stem not in numbers]
        n = max((v[-1] + 1 for v in numbers.values()), default=1)
        if layout != "ntire":
            return n, numbers, missing
        for stem, got in numbers.items():
            if got != list(range(n)):
                said = ", ".join(map(str, got[:5])) + (", ..." if len(got) > 5 else "")
                raise UsageError(
                    f"--layout ntire: the challenge reads samples 0..N-1 of every image, but "
                    f"--latent {self.folder} holds samples {said} of {stem}, not 0..{n - 1}; use "
                    "--layout stem, which keeps the sample numbers"
                )
        return n, None, missing

    def warn_gaps(self, numbers: dict | None) -> None:
        """One warning line where an input's sample numbers have a gap (samples 0, 1, 3; kept,
        so the folders line up): sr_eval.py scores samples 0..N-1 of every image, so the
        samples above the gap cannot be scored with those below it, and its line (no
        NAME_sample00002.png) does not say why there is none."""
        gaps = {stem: got for stem, got in (numbers or {}).items() if got != list(range(len(got)))}
        if not gaps:
            return
        stem, got = next(iter(gaps.items()))
        said = ", ".join(map(str, got[:5])) + (", ..." if len(got) > 5 else "")
        first = min(next(i for i, k in enumerate(v + [-1]) if i != k) for v in numbers.values())
        most = f"--n {first} at most here" if first else "no N here (an image has no sample 0)"
        say_err(f"{PROG}: warning: --latent {self.folder}: the sample numbers of {stem} have a "
                f"gap ({said}; {len(gaps)} of {len(numbers)} inputs have one), kept in the "
                f"samples' names; sr_eval.py scores samples 0..N-1 of every image: {most}; to "
                "score them all, decode a copy of the folder with each image's files numbered "
                "0, 1, ...")  # fmt: skip

    def refuse_missing(self, missing: list[Path], total: int, model: str) -> None:
        """One line, before any work, where inputs have no file of this model's kind: a decode
        of fewer images than given is not what was asked (a wrong --input or DIR, or the
        latents of another model), and its folder would not line up with the saved one."""
        if not missing:
            return
        # (exit 3, as an input missing: the folder lacks the files its inputs need)
        sweep = [] if self.files or self.others else sweep_folders(self.folder)
        if sweep:
            raise DataError(
                f"--latent {self.folder}: a --temperature sweep's folder, its latents in its "
                f"subfolders {', '.join(sweep)}: give one of them (--latent "
                f"{self.folder / sweep[0]})"
            )
        numbered = sorted(k for k in self.files if re.fullmatch(r"\d{6}", k))
        if len(missing) == total and numbered and len(numbered) == len(self.files):
            index = self.folder / "ntire_index.json"
            state = "is not the index that run writes" if index.exists() else "is missing"
            raise DataError(
                f"--latent {self.folder}: its files are named by number "
                f"({next(iter(self.files[numbered[0]].values())).name}, ...), as a --layout "
                f"ntire run names them, and its ntire_index.json, which maps the numbers to the "
                f"inputs, {state}: copy it there from that run's --out"
            )
        other = [p.stem for p in missing if p.stem in self.others]
        if other:
            end = self.others[other[0]]
            able = [k for k, c in MODELS.items() if "latent" in c.sample_controls
                    and end in (c.latent_file, c.old_latent_file)]  # fmt: skip
            raise DataError(
                f"--latent {self.folder}: its latents of {other[0]} are {end} files (saved by "
                f"{', '.join(able)}), not the {self.endings[0]} files this {model} model "
                "decodes; decode them with the model that saved them"
            )
        names = ", ".join(p.name for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"--latent {self.folder}: {len(missing)} of {total} inputs have no saved latents "
            f"there (no NAME_sample{{i:05d}}{self.endings[0]}): {names}; give --input only the "
            "images whose latents it holds"
        )

    def check(self, model, paths: list[Path], mine: set[Path], own: dict,
              from_hr: bool) -> list[str]:  # fmt: skip
        """Before any work: the `latent_fingerprint` of every file of every input (of every
        --shard, read cheaply: the folder's manifest.json records their joint digest, in the
        input order, then by sample number), and the files of the inputs this run decodes
        (`mine`: this shard's, but those complete already, whose files a rerun after a
        preemption read whole for nothing, 0.2 s a DIV2K x4 flow sample) read as the model
        reads them (the sha256 of their contents kept for `load`): one sample each, of one shape
        per input, the flows' made_by checked (another model refused); returns the fingerprints
        in that order and says each other checkpoint's files in one warning line. A flow's
        fields must fit their input's LR, its size and theirs read from the headers (an image's
        pixels where its header cannot tell; of every input, as the fingerprints: every shard
        refuses the folder, before any sample is written, not the one shard that decodes the
        file once the others are done)."""
        digests, warned, count = [], {}, 0
        self.own = own  # (for `load`, of a file not read here)
        fits = getattr(model, "check_latent_size", None)  # (a flow's: fields of one LR size)
        for path in paths:
            shapes, size = None, lr_size(path, model.scale, from_hr, True) if fits else None
            for file in self.files[path.stem].values():  # (by sample number)
                digest = None
                if path in mine:
                    z, digest, lines = held(model.read_latent)(str(file), "--latent", own)
                    self.digests[file] = digest
                    shapes = self.one_sample(file, z, shapes)
                    count += 1
                    for line in lines:  # (per file; said once per checkpoint, with a count)
                        said = line.removeprefix(f"--latent {file}: ")
                        warned[said] = warned.get(said, 0) + 1
                # (after the read: a file changed since is refused by `load`, which reads again)
                fingerprint, fields = held(latent_fingerprint)(file, digest)
                digests.append(fingerprint)
                if size and all(size) and fields:  # (unreadable: skipped at its turn)
                    fits(f"--latent {file}", fields, size, f"{path.name}'s", self.hint(path.stem))
        for line in self.unrecorded:  # (once no file is refused: they are latents)
            say_err(line)
        for line, k in warned.items():
            say_err(f"{PROG}: warning: --latent {self.folder}: {k} of {count} files {line}")
        if not fits:  # (a flow's fields fit one LR size: checked above)
            self.warn_other_inputs([p for p in paths if p in mine], model.scale, from_hr)
        return digests

    def warn_other_inputs(self, paths: list[Path], s: int, from_hr: bool) -> None:
        """One warning line where inputs are not the LR the latents were saved from (a RefVAE
        or VarSR latent decodes with any LR): the HR given without --from-hr, the reverse, or
        another image of the name. Told by the LR sizes, from the headers: this run's LR and
        the saving run's, its sample's (NAME_sample{i:05d}.png beside the file, or {k:06d}.png of
        a --layout ntire --n 1 run: s x its LR), or else the LR a --from-hr run wrote
        (DIR/lr/NAME.png); the manifest's from_hr says which
        flag to give. --input DIR/lr of a --from-hr run, without it, is that run's LR: no
        warning. (Another image of the name of the same size cannot be told.)"""
        other = []
        for path in paths:
            file = next(iter(self.files[path.stem].values()))
            name = LATENT_NAME.fullmatch(file.name)
            made = image_size(file.with_name(file.name.removesuffix(name[3]) + ".png"))
            number = name[1]
            if made is None and number != path.stem:  # --layout ntire --n 1: {k:06d}.png
                made = image_size(file.with_name(f"{number}.png"))
            was, what = None, ""
            if made and not made[0] % s and not made[1] % s:
                was, what = (made[0] // s, made[1] // s), f"its samples there are x{s} of"
            elif self.saved.get("from_hr"):
                was, what = image_size(self.folder / "lr" / f"{path.stem}.png"), "its lr/ holds"
            size = lr_size(path, s, from_hr)
            if was and size and all(size) and was != size:
                other.append((path, size, was, what))
        if not other:
            return
        path, (h, w), (h0, w0), what = other[0]
        was_hr = self.saved.get("from_hr")
        hint = ("give each input as it was sampled (with --from-hr where it was made so)"
                if was_hr is None or was_hr == from_hr else  # fmt: skip
                "it was saved with --from-hr (its manifest.json): give the HR images with "
                f"--from-hr, or the LR it wrote ({self.folder / 'lr'})"
                if was_hr else  # fmt: skip
                "it was saved from LR inputs, without --from-hr (its manifest.json): give "
                "those LR images without --from-hr")  # fmt: skip
        say_err(f"{PROG}: warning: --latent {self.folder}: {len(other)} of {len(paths)} inputs "
                f"are not the LR their latents were saved from ({path.name}: an LR of {w}x{h} "
                f"px; {what} an LR of {w0}x{h0} px): their samples are not the saved ones; "
                f"{hint}")  # fmt: skip

    @staticmethod
    def one_sample(file: Path, z, shapes):
        """The shapes of a file's latent of one sample, which must be those of the input's
        other files (`shapes`, or None for its first)."""
        fields = [z] if torch.is_tensor(z) else z
        if len(fields[0]) != 1:
            raise DataError(
                f"--latent {file}: holds {len(fields[0])} samples; a --latent folder's "
                "NAME_sample{i:05d} file holds one, sample i (--save-latent writes them so)"
            )
        got = [tuple(f.shape[1:]) for f in fields]
        if shapes is not None and got != shapes:
            say = lambda v: ", ".join(f"z{k} {x}" for k, x in enumerate(v))  # noqa: E731
            raise DataError(
                f"--latent {file}: fields {say(got)}, not those of the other files of its image "
                f"({say(shapes)}); the latents of one image fit its one LR size"
            )
        return got

    def load(self, model, stem: str, controls, device) -> int:
        """The latents of input `stem` into `controls` (its files read again: contents other
        than those first read, which manifest.json records, are refused); its number of
        outputs."""
        rows = []
        for file in self.files[stem].values():
            # (a file not read by `check`: its image was complete then, and is no longer)
            first = file not in self.digests
            z, digest, _ = held(model.read_latent)(
                str(file), "--latent", self.own if first else None
            )
            if not first and digest != self.digests[file]:
                # The run stops here (exit 3), not skips the image: something writes the folder
                # now (a --save-latent run, a copy under way), so its other files may change
                # too, and manifest.json records the contents first read, so a rerun is refused
                # (other contents of --latent) unless they come back: the work after it would be
                # spent on a folder its rerun refuses. Said by `sample` with the images kept.
                raise DataError(  # (the file's contents, not a flag: exit 3)
                    f"--latent {file}: changed while this run read the folder (other contents "
                    "than manifest.json records, which a rerun refuses): put its contents back "
                    "and rerun, or, the change meant, rerun with --overwrite once nothing "
                    "writes there"
                )
            rows.append(z)
        if torch.is_tensor(rows[0]):
            controls.latent = torch.cat(rows).to(device)
        else:  # a flow's fields [(1, C, h, w), ...] per file
            controls.latent = [torch.cat(f).to(device) for f in zip(*rows)]
        first = next(iter(self.files[stem].values()))
        controls.latent_file, controls.n = str(first), len(rows)
        controls.latent_hint = self.hint(stem)
        return len(rows)

    @staticmethod
    def hint(stem: str) -> str:
        """What to do about the files of input `stem` that do not fit its LR."""
        return (
            f"a --latent folder's files of {stem} are the latents of the input {stem} as it was "
            "sampled: give that input (with --from-hr if it was made so)"
        )


def check_npy_saver(flag: str, path: Path, own: dict, unrecorded: list,
                    count: tuple = (1, 1)) -> dict:  # fmt: skip
    """What saved an older srspace's RefVAE/VarSR .npy latent (a bare array, naming nothing;
    --save-latent's .npz names its model, `saved_fields`), for `path` a
    --save-latent folder or one file of it (named as --save-latent names them), against `own`
    (the run's latent_source): the folder's manifest.json, written by the --save-latent run.
    Another model or scale is refused (its latents decode to other images here), another
    checkpoint of the model is one warning line; without a readable manifest.json (latents
    copied alone) nothing can be checked: one warning line says so, as a latent of another model
    of the same D decodes to other images without an error (one of another D is refused by its
    shape: `load_latent`), added to `unrecorded` for the caller to say once the files are read
    (not before a line that refuses them). A file not named so (np.save's array, named by hand:
    the user's own, a direction say) is not looked at, as a .npz named by hand without made_by
    (base.saved_fields). Returns the manifest ({}). count: of a folder, its .npy files and all
    its files (.npz too, each naming its model, checked per file: the warning is the .npy
    files')."""
    whole = path.is_dir()
    name = None if whole else LATENT_NAME.fullmatch(path.name)
    if not whole and (name is None or name[3] != ".latent.npy" or not path.is_file()):
        return {}  # (a file that is not there: load_latent says so)
    try:
        folder = path if whole else path.resolve().parent  # (a link: where the file was saved)
        saved = json.loads((folder / "manifest.json").read_text())
        model, scale = saved["model"], saved["scale"]
    except (OSError, ValueError, KeyError, TypeError):
        npy, files = count
        said = (("there", "its latents", "latents of the same size decode to other images",
                 "their --save-latent folder there", "them") if whole else  # fmt: skip
                ("in its folder", "it", "latent of the same size decodes to another image",
                 "its --save-latent folder beside it", "it"))  # fmt: skip
        why = "a .npy holds the array alone"
        if whole and npy < files:  # (the .npz files name their model, checked each: not these)
            said = ("there", f"its .npy latents, {npy} of {files} files", *said[2:])
            why += "; its .npz files name theirs, checked each"
        unrecorded.append(
            f"{PROG}: warning: {flag} {path}: no manifest.json {said[0]} names the model "
            f"that saved {said[1]} ({why}): decoded as this "
            f"x{own['scale']} {own['model']}'s; another model's {said[2]} without an error "
            f"(copy the manifest.json of {said[3]} to have {said[4]} checked)"
        )
        return {}
    where = "its manifest.json" if whole else "the manifest.json of its folder"
    if (model, scale) != (own["model"], own["scale"]):
        they = (("its latents were", "they decode to other images", "them") if whole else
                ("it was", "it decodes to another image", "it"))  # fmt: skip
        raise DataError(
            f"{flag} {path}: {they[0]} saved by an x{scale} {model} model ({where}), not this "
            f"x{own['scale']} {own['model']}: {they[1]} here; decode {they[2]} with an x{scale} "
            f"{model} checkpoint"
        )
    if saved.get("checkpoint_sha256") != own["checkpoint_sha256"]:
        say_err(f"{PROG}: warning: {flag} {path}: saved by another {model} checkpoint ({where}: "
                f"sha256 {other_checkpoint(saved, own)}): decoded with this one, its samples are "
                "not the saved ones")  # fmt: skip
    return saved


def sweep_folders(folder: Path, holding: str = "") -> list[str]:
    """The subfolders T{t} of a --temperature sweep's folder that hold --save-latent files (or
    the file `holding`: a manifest.json), by temperature ([]: none; a folder that cannot be
    listed has none)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not (re.fullmatch(r"T.+", entry.name) and temperature_ok(entry.name[1:])):
                continue
            with contextlib.suppress(OSError):
                if not entry.is_dir():
                    continue
                # (`holding`: one stat, not a listing of the folder's 200,000 samples)
                if (os.path.isfile(os.path.join(entry.path, holding)) if holding else
                        any(map(LATENT_NAME.fullmatch, os.listdir(entry)))):  # fmt: skip
                    found.append(entry.name)
    return sorted(found, key=lambda name: float(name[1:]))


def ntire_stems(folder: Path) -> dict:
    """{"000000": stem, ...} of a --layout ntire folder's ntire_index.json ({} without one)."""
    try:
        index = json.loads((folder / "ntire_index.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(index, dict):
        return {}
    return {k: v for k, v in index.items() if re.fullmatch(r"\d{6}", k) and isinstance(v, str)}


def latent_fingerprint(path: Path, digest: str | None = None) -> tuple[str, list[tuple]]:
    """What manifest.json records of a --latent DIR file, the same for every --shard: of a
    .npz (a flow's fields, ~33 MB a sample of a DIV2K x4 image; a RefVAE/VarSR latent, small,
    alike), the sha256 of its zip directory, each member's name, size and CRC-32 (zip's
    checksum of its contents, which reading the member checks), read from the archive's end
    without the contents, so that a shard reads only its own inputs' files whole; of an older
    srspace's .npy (a (D,) latent), the sha256 of the contents (`digest`: that of the contents
    read already, where read). A .npz without a readable directory (cut short) is refused by
    every shard, not only the one that decodes it: the others' manifest.json would record a
    digest that the file, put back, no longer has.
    With it, the (C, h, w) of the .npz's fields z0, z1, ... from their headers (`npz_fields`)."""
    if path.name.endswith(".npz"):
        try:
            with zipfile.ZipFile(path) as archive:
                members = [(m.filename, m.file_size, m.CRC) for m in archive.infolist()]
                fields = npz_fields(archive)
            return hashlib.sha256(json.dumps(members).encode()).hexdigest(), fields
        except (zipfile.BadZipFile, ValueError) as e:
            raise DataError(f"--latent {path}: not a readable .npz archive ({e})") from None
        except OSError:
            pass  # (file_sha256 says why it cannot be read)
    return digest or file_sha256(path), []


def npz_fields(archive: zipfile.ZipFile) -> list[tuple]:
    """The (C, h, w) of an open .npz's arrays z0, z1, ... (the last three of each shape) from
    their .npy headers, the first bytes of each member; [] where they are not that (the file is
    refused, saying why, where it is read whole)."""
    names = set(archive.namelist())
    fields = []
    while f"z{len(fields)}.npy" in names:
        try:
            with archive.open(f"z{len(fields)}.npy") as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)  # fmt: skip
                shape = read(f)[0] if read else ()
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return []
        if len(shape) not in (3, 4):
            return []
        fields.append(tuple(shape[-3:]))
    return fields


def file_sha256(path: Path) -> str:
    """The sha256 of a file's contents (one that cannot be read: a one-line data error)."""
    try:
        return sha256_file(path)  # (hashlib.file_digest is Python 3.11's)
    except OSError as e:
        raise DataError(f"--latent {path}: cannot read it ({e.strerror or e})") from None


def warn_controlled(args: SampleArgs, given: set[str], setter: str) -> None:
    """One warning line for each flag typed that a sampling control overrides: --n where the
    control gives the number of outputs, --temperature and --seed where it gives the latents
    themselves (--latent-shift walks from a temperature-0 latent: no draw either)."""
    unused = ["n"] if setter else []
    unused += ["temperature", "seed"] if setter.startswith("--latent") else []
    for flag in [f for f in unused if f in given]:
        what = "the number of outputs" if flag == "n" else "the latents"
        say_err(f"{PROG}: warning: --{flag}: no effect, {setter} sets {what}; ignored")


def sample_image(model, lr, img, stem, name, n, todo, folders, files, contexts, controls,
                 want_sigma, args, say, writer) -> None:  # fmt: skip
    """Every file of one (1, 3, h, w) LR image at the temperatures `todo`, the LR-only work of
    the model done once; a CUDA out-of-memory error retries what is left in smaller tiles.
    contexts: the tiles' context, and that of a retry's tiles."""
    (context, retry_context), tile, prepared, sigma = contexts, args.tile, None, None
    # the same alpha on every output of the image; --alpha-upsampler model's is drawn below, in
    # tiles as the samples are (an out-of-memory retry too)
    alpha = img.alpha_at(model.scale) if args.alpha_upsampler == "bicubic" else None
    chunks = math.ceil(n / args.batch) if model.stochastic else 1
    todo = list(todo)
    while todo:
        try:
            if alpha is None and img.alpha is not None:
                alpha = model_alpha(model, img, lr.device, tile, context, name, args)
            if prepared is None:
                prepared = prepare(model, lr)
                if prepared is not None and (tile or len(todo) * chunks == 1):
                    prepared.memo = None  # used once (or cut per tile): nothing worth keeping
            if want_sigma and sigma is None:
                sigma = uncertainty_map(model, lr, tile, context, name)
            t = todo[0]
            folder = folders[t]
            shown = write_samples(model, lr, img, alpha, stem, name, n, t, folder, files, tile,
                                  context, controls, prepared, args, writer)  # fmt: skip
            if sigma is not None and args.save_uncertainty:
                write_sigma(folder / f"{name}_sigma", sigma)
            if args.grid:
                numbers = None if files.numbers is None else files.numbers[name]
                sheet = contact_sheet(img.pixels(img.tensor(), gray=False, bits=8)[0], *shown,
                                      sigma, model, numbers)  # fmt: skip
                save_png(folder / f"{name}_grid.png",
                         img.pixels(to_tensor(sheet), bits=8) if img.gray else sheet)  # fmt: skip
            todo.pop(0)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            tried, context = tile, retry_context
            tile = (tile or max(lr.shape[-2:])) // 2
            if tile < OOM_MIN_TILE:
                raise OutOfMemory(out_of_memory_line(e, model, lr, n, args, tried, tried)) from None
            say(f"{name}: CUDA out of memory; retrying with --tile {tile}")
        except (MemoryError, RuntimeError) as e:  # the host's memory: no retry
            if not is_out_of_memory(e):
                raise
            raise OutOfMemory(out_of_memory_line(e, model, lr, n, args, tile)) from None


def model_alpha(model, img: LowRes, device, tile: int, context: int, name: str,
                args) -> np.ndarray:  # fmt: skip
    """--alpha-upsampler model: the alpha of the outputs, (H, W, 1) at the input's bits (as
    `LowRes.alpha_at`), super-resolved by the model: the LR's alpha repeated to RGB, as a gray
    LR's colour is, drawn at temperature 0 (every model's deterministic mode: one alpha for all
    the samples and temperatures of the image; a random alpha per sample would make outlines
    that differ where only the colour is meant to), without the sampling controls (--ref,
    --latent, ...: they choose the colour), with --cem as the samples, and turned back to one
    channel by BT.601 luma (`to_gray`, a gray input's rule), clipped to [0, 1]."""
    a = torch.from_numpy(img.alpha)[None, None].repeat(1, 3, 1, 1).to(device)
    x = draw(model, a, [0], 0.0, tile, context, args.cem)  # (temperature 0: the seed unused)
    check_finite(x, f"{name}'s alpha (--alpha-upsampler model)", range(1), None, args.amp)
    return img.pixels(x, gray=True)[0]


def out_of_memory_line(e, model, lr, n: int, args, tile: int | None, tried: int = 0) -> str:
    """The line of out-of-memory error `e` drawing `n` samples of the LR `lr` (1, 3, h, w): it
    names only what lowers the memory that ran out, with this run's values. A smaller --batch
    where samples are drawn together (a stochastic model: --batch, at most n). A GPU's memory:
    --device cpu; a smaller --tile is not named, `sample_image` retried in tiles halved down to
    OOM_MIN_TILE (`tried`: the last, 0 where the image was whole); nor --amp, whose autocast
    raised the peak memory on a CPU (float32 copies of its casts: SRFlow x3.2, EDSR x1.2 at a
    256 px LR) and is not measured on a GPU. The host's memory (a
    MemoryError, torch's "can't allocate memory"): on a CPU run, a halved --tile where it stays
    at least MIN_TILE (`tile`: this run's, 0 whole, None where no tiles are cut:
    --check-invertibility)."""
    device, (h, w) = lr.device, lr.shape[-2:]
    host = host_out_of_memory(e, device)
    batch = min(args.batch, n) if model.stochastic else 1
    helps = []
    if batch > 1:
        mine = args.batch == batch
        helps.append(f"a smaller --batch (this run's: {batch})" if mine else f"a --batch below {n}")
    if tile is not None and device.type == "cpu":
        whole = max(h, w) if not tile else min(tile, max(h, w))
        half = grid(model, whole // 2, 0)[0]
        if MIN_TILE <= half < whole:
            helps.append(f"--tile {half}" + (f" (this run's: {tile})" if tile else ""))
    if device.type != "cpu" and not host:
        helps.append("--device cpu")
    if not helps:
        cut = tile or tried
        tiles = f" in tiles of {cut} LR px" if cut and cut < max(h, w) else ""
        where = "this machine" if host else str(device)
        return (f"out of memory drawing one sample at a time{tiles}: this {w}x{h} LR image needs "
                f"more memory than {where} has")  # fmt: skip
    also = "" if host else f" on {device}" + (f", also in tiles of {tried} LR px" if tried else "")
    return f"out of memory{also}; use {any_of(helps)}"


def write_samples(model, lr, img, alpha, stem, name, n, temperature, folder, files, tile, context,
                  controls, prepared, args, writer) -> list:  # fmt: skip
    """Draw and write (with `writer`, a SampleWriter) the n samples of one (1, 3, h, w) LR image
    `img` (a LowRes: how they are written, with `alpha`, its alpha_at) at one temperature, in
    chunks of --batch; returns what --grid shows: the first GRID_SAMPLES samples as uint8 RGB
    (gray ones gray) and the per-pixel std (H, W) of all n (None: one output), summed as they
    come, so memory does not grow with --n.
    Latent models draw the latents on the whole LR first and decode every tile with them
    (--save-latent writes them)."""
    names, latent_names = files.samples(name), files.latent_names(name)
    kept, sums = [], None  # sums: of x and x² over the samples drawn (float64: exact enough)
    draws = n if model.stochastic else 1  # a deterministic model: one output, written n times
    # A rerun of a larger --n draws only the samples not there (each seeded by its own number:
    # `n_change`); --grid's sheet needs them all, and --overwrite redoes them
    kept_there = model.stochastic and not (args.grid or args.overwrite)
    todo = [i for i in range(draws) if not (kept_there and files.written(folder, name, i))]
    for c0 in range(0, len(todo), args.batch):
        idx = todo[c0 : c0 + args.batch]
        seeds = [sample_seed(args.seed, stem, i) for i in idx]
        # (len(idx), D), a flow's fields [(len(idx), C, h, w), ...], or None
        z = model.sample_latents(lr, seeds, idx, temperature, controls)
        if z is not None and args.save_latent:  # sample 3: NAME_sample00003.latent.npz
            paths = [folder / latent_names[i] for i in idx]
            save_latents(paths, z, controls.made_by, files)
        cond = {} if z is None else {"latent": z[None] if torch.is_tensor(z) else z}
        x = draw(model, lr, seeds, temperature, tile, context, args.cem, cond, prepared)
        check_finite(x, name, idx, temperature if model.stochastic else None, args.amp,
                     args.latent_steps if args.latent_shift else None)  # fmt: skip
        srs = img.pixels(x, alpha)
        panels = srs  # --grid's: uint8 RGB (gray samples as gray), no alpha
        if args.grid and (srs.shape[-1] != 3 or srs.dtype != np.uint8):
            panels = img.pixels(to_gray(x).expand(-1, 3, -1, -1) if img.gray else x, gray=False,
                                bits=8)  # fmt: skip
        for i, sr, panel in zip(idx, srs, panels):
            copies = [i] if model.stochastic else range(n)
            writer([folder / names[j] for j in copies], sr)
            if args.grid:
                kept += [panel] * min(len(copies), GRID_SAMPLES - len(kept))
                x = panel.astype(np.float64)
                sums = (x, x * x) if sums is None else (sums[0] + x, sums[1] + x * x)
    if not args.grid or not model.stochastic or draws == 1:
        return kept, None
    mean, square = sums[0] / draws, sums[1] / draws
    return kept, np.sqrt(np.maximum(square - mean * mean, 0)).mean(-1)


def save_latents(paths: list[Path], z, made_by: dict, files: Outputs) -> None:
    """--save-latent: sample j's latent in paths[j], one .npz for every model: row j of each of
    its fields as float32 arrays z0, z1, ... (a flow's fields [(k, C, h, w), ...]; a RefVAE/VarSR
    latent (k, D): one field, z0 (D,)), with made_by (`latent_source`) as a JSON string, which
    --latent checks (`saved_fields`). The sample's latent as an older srspace saved it (a .npy,
    `Outputs.old_latent`: an image sampled again, not complete) is removed once this is written:
    one latent a sample, not two for --latent DIR to choose from."""
    fields = [f.float().cpu().numpy() for f in ([z] if torch.is_tensor(z) else z)]
    record = np.array(json.dumps(made_by, sort_keys=True))
    for j, path in enumerate(paths):
        save_npz(path, {**{f"z{k}": f[j] for k, f in enumerate(fields)}, LATENT_SOURCE: record})
        old = files.old_latent(path)
        if old is not None:
            with signals_held():
                old.unlink(missing_ok=True)


def check_finite(x: torch.Tensor, name: str, idx: range, temperature, amp: str,
                 steps: str | None = None) -> None:  # fmt: skip
    """Stop with one line when a sample holds NaN (a PNG would show it as black: garbage).
    temperature: the stochastic model's, or None for a deterministic one; steps: the
    --latent-steps of a --latent-shift walk (a step far along it overflows, not the weights)."""
    bad = torch.isnan(x).flatten(1).any(1).nonzero()  # (k, 1): the NaN samples of this chunk
    if not len(bad):
        return
    what = "the output" if temperature is None else (
        f"sample {idx[int(bad[0])]} at temperature {temperature:g}")  # fmt: skip
    hint = "float16 overflowed: use --amp bf16 (float32's range) or none" if amp == "fp16" else (
        "the checkpoint's weights give NaN: use another checkpoint"
        + ("" if temperature is None else " or a lower --temperature"))  # fmt: skip
    if steps is not None and amp != "fp16":
        hint = (f"the --latent-shift walk left the model's range at --latent-steps {steps}: use "
                "smaller steps or a shorter direction")  # fmt: skip
    raise NonFiniteError(f"{name}: {what} has NaN pixels, not written; {hint}")


def uncertainty_map(model, lr, tile: int, context: int, name: str) -> np.ndarray:
    """The model's float32 (3, sH, sW) uncertainty of one (1, 3, h, w) LR, tiled like samples;
    NaN stops (it would be a black pixel of NAME_sigma.png)."""
    h, w, s = *lr.shape[-2:], model.scale
    x = pad_to_multiple(lr, model.lr_multiple)
    sigma = upscale(model, x, lambda part, p: model.uncertainty(part), tile, context)
    sigma = sigma[0, :, : h * s, : w * s].float().cpu().numpy()
    if np.isnan(sigma).any():
        raise NonFiniteError(f"{name}: the uncertainty map has NaN pixels, not written; the "
                             "checkpoint's σ branch gives NaN")  # fmt: skip
    return sigma


def write_sigma(base: Path, sigma: np.ndarray) -> None:
    """BASE.npy (float32 (3, H, W)) and BASE.png (16-bit gray: the mean over RGB in [0, 1])."""
    save_npy(base.with_name(base.name + ".npy"), sigma.astype(np.float32))
    u16 = np.round(np.clip(sigma.mean(0), 0, 1) * 65535).astype(np.uint16)
    save_png(base.with_name(base.name + ".png"), u16)


def heat(v: np.ndarray) -> np.ndarray:
    """(H, W) map -> uint8 RGB heat map normalised to its max: black, red, yellow, white."""
    v = v / v.max() if v.max() > 0 else v
    return np.round(np.clip(3 * v[..., None] - np.arange(3), 0, 1) * 255).astype(np.uint8)


LABEL_HEIGHT = 14  # px of the label strip above each panel of a contact sheet


def labelled(panel: np.ndarray, *texts: str) -> np.ndarray:
    """The panel under a black strip with a label in white: the first of `texts` that fits."""
    font = ImageFont.load_default()
    text = next((t for t in texts if font.getlength(t) <= panel.shape[1] - 3), texts[-1])
    strip = Image.new("RGB", (panel.shape[1], LABEL_HEIGHT))
    ImageDraw.Draw(strip).text((2, 1), text, fill=(255, 255, 255), font=font)
    return np.concatenate([np.asarray(strip), panel])


def contact_sheet(lr: np.ndarray, srs: list[np.ndarray], std, sigma, model,
                  numbers: list[int] | None = None) -> np.ndarray:  # fmt: skip
    """One labelled row: LR enlarged (nearest), the samples shown, the per-pixel standard
    deviation `std` of all samples (stochastic models with several) and sigma if any.
    numbers: the samples' numbers (--latent DIR's, which may have gaps); default 0, 1, ..."""
    s = model.scale
    panels = [(np.repeat(np.repeat(lr, s, 0), s, 1), ["LR"])]
    numbers = range(len(srs)) if numbers is None else numbers
    panels += [(sr, [f"sample {i}", f"#{i}", str(i)]) for i, sr in zip(numbers, srs)]
    if std is not None:
        panels.append((heat(std), ["std"]))
    if sigma is not None:
        panels.append((heat(sigma.mean(0)), ["sigma", "sig"]))
    return np.concatenate([labelled(p, *texts) for p, texts in panels], axis=1)


class ProgressLog(contextlib.AbstractContextManager):
    """Images done / total with the time left: a rich bar on a terminal, a plain line per image
    otherwise (SLURM logs), where a run of images already complete is one line (a requeued job
    of 20,000 images printed 20,000 "complete, skipped" lines) and the time left counts the
    images sampled only (skipping one takes no time)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.t0, self.quiet = total, 0, time.monotonic(), quiet
        self.skipped, self.n_skipped = [], 0  # (the run of skips not shown yet; all skips)
        self.skip_time, self.last = 0.0, self.t0
        self.tty = sys.stdout.isatty() and not quiet  # --quiet: no bar, no lines
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), disable=not self.tty)  # fmt: skip
        self.task = self.bar.add_task("sampling", total=total)

    def __enter__(self):
        if self.tty:  # a disabled bar is never started: rich before 15 prints an empty line
            self.bar.__enter__()  # when it stops
        return self

    def __exit__(self, *exc):
        self.show_skipped()
        return self.bar.__exit__(*exc) if self.tty else None

    def say(self, text: str) -> None:
        self.show_skipped()
        if self.tty:  # (not rich markup: an image a[b].png; one line, as print_out's)
            self.bar.console.print(one_line(text), markup=False)
        elif not self.quiet:
            print_out(text)  # where stdout cannot be written: dropped, and `step` stops the run

    def skip(self, name: str) -> None:
        """An image whose files are all there: shown with the run of such images it ends."""
        now = time.monotonic()
        self.skip_time, self.last = self.skip_time + now - self.last, now
        self.skipped.append(name)
        self.n_skipped += 1
        self.advance()

    def show_skipped(self) -> None:
        if self.skipped and not self.tty and not self.quiet:
            k, names = len(self.skipped), self.skipped[0]
            names += f" .. {self.skipped[-1]}" if k > 1 else ""
            print_out(f"[{self.done}/{self.total}] {k} complete, skipped ({names})")
        self.skipped = []

    def step(self, text: str) -> None:
        self.show_skipped()
        self.last = time.monotonic()
        if not self.tty and not self.quiet:
            worked, left = self.done + 1 - self.n_skipped, self.total - self.done - 1
            eta = (self.last - self.t0 - self.skip_time) / worked * left
            print_out(f"[{self.done + 1}/{self.total}] {text}, ETA {eta:.0f} s")
        self.advance()

    def advance(self) -> None:
        self.done += 1
        self.bar.advance(self.task)
        if self.done < self.total and stdout_closed():  # `... | head` has its lines; disk full
            lost = f"standard output {stdout_closed()}"  # (`stopped`: sr_train.py's words)
            raise Preempted(
                f"{lost}; every file written is complete: rerun the same command to continue", lost
            )


if __name__ == "__main__":
    raise SystemExit(main())
