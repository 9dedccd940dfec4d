"""A sweep of everyday mistakes on sr_train.py's command line: each ends in one line on stderr,
`sr_train.py: error: ...` naming the flag or file, with the README's exit code, never a
traceback. Values out of range are refused when the flags are parsed, before anything is done
(the run folder is not even created)."""

import dataclasses
import os
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY

import sr_lib.data
import sr_train
from sr_lib.checkpoint import save_checkpoint
from sr_lib.config import check_ranges
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models import MODELS, build_model
from sr_lib.models.losses import VGGLoss, vgg_min_size
from sr_lib.models.vgg import VGG19_RELU, VGGFeatures

REPO = Path(__file__).resolve().parents[1]

# A tiny EDSR run; each case replaces or adds flags (None: drop the flag, "": a switch).
BASE = {"--model": "edsr", "--n-feats": "8", "--n-blocks": "1", "--scale": "2", "--patch": "8",
        "--batch": "2", "--steps": "1", "--workers": "0", "--val-every": "0", "--data": "{data}",
        "--out": "{out}"}  # fmt: skip

PARSE = "parse"  # refused when the flags are parsed: exit 2, and no run folder
# a tiny RefVAE, for the cases of its patch sizes
TINY_REFVAE = {"--model": "refvae", "--n-feats": None, "--n-blocks": None, "--width": "16",
               "--cond-channels": "4", "--latent-grid": "2", "--z-dim": "8", "--mask-blocks": "1",
               "--ref-size": "16", "--d-channels": "4", "--no-pretrained": ""}  # fmt: skip
# a tiny VSpSR (with its VGG19 perceptual loss at the default weight)
TINY_VSPSR = {"--model": "vspsr", "--n-feats": None, "--n-blocks": None, "--n-basis": "8",
              "--basis-channels": "4", "--coef-channels": "4", "--d-channels": "4"}  # fmt: skip
# a tiny SRFlow x4, for the cases of its levels and patch sizes
TINY_SRFLOW = {"--model": "srflow", "--scale": "4", "--n-feats": None, "--n-blocks": None,
               "--nb": "2", "--nf": "8", "--gc": "4", "--rrdb-blocks": "0,1", "--flow-steps": "2",
               "--hidden-channels": "8"}  # fmt: skip

CASES = {  # id: (flags, exit code, words of the message)
    "learning rate -1": ({"--learning-rate": "-1"}, PARSE, "--learning-rate -1.0: must be"),
    "learning rate nan": ({"--learning-rate": "nan"}, PARSE, "finite number"),
    "discriminator rate inf": ({"--d-learning-rate": "inf"}, PARSE, "--d-learning-rate inf"),
    "learning rate 1e30": (
        {"--learning-rate": "1e30"},
        PARSE,
        "--learning-rate 1e+30: must be a number between 0 and 1",
    ),
    "gaussian std 1e30": (
        {**TINY_SRFLOW, "--gaussian-std": "1e30"},
        PARSE,
        "--gaussian-std 1e+30: must be a number between 0 and 255",
    ),
    "affine eps 1e30": (
        {**TINY_SRFLOW, "--affine-eps": "1e30"},
        PARSE,
        "--affine-eps 1e+30: must be a number > 0 and <= 1",
    ),
    "std max 1e30": (
        {**TINY_SRFLOW, "--model": "ncsr", "--std-max": "1e30"},
        PARSE,
        "--std-max 1e+30: must be a number between -1 and 1",
    ),
    "loss weight 1e30": (
        {**TINY_VSPSR, "--lambda-per": "1e30"},
        PARSE,
        "--lambda-per 1e+30: must be a number between 0 and 1000000",
    ),
    "out -": ({"--out": "-"}, PARSE, "--out -: standard input or output cannot be used here"),
    "val data -": ({"--val-data": "-", "--val-every": "1"}, PARSE, "--val-data -: standard"),
    "resume -": ({"--resume": "-"}, PARSE, "--resume -: standard input or output cannot be"),
    "log every 0": ({"--log-every": "0"}, PARSE, "--log-every 0: must be an integer >= 1"),
    "save every 0": ({"--save-every": "0"}, PARSE, "--save-every 0"),
    "val every -1": ({"--val-every": "-1"}, PARSE, "--val-every -1"),
    "workers -1": ({"--workers": "-1"}, PARSE, "--workers -1: must be an integer >= 0"),
    "steps -5": ({"--steps": "-5"}, PARSE, "--steps -5: must be an integer >= 0"),
    "batch 0": ({"--batch": "0"}, PARSE, "--batch 0: must be an integer >= 1"),
    "patch 0": ({"--patch": "0"}, PARSE, "--patch 0"),
    "gamma -1": ({"--gamma": "-1"}, PARSE, "--gamma -1.0"),
    "milestones 2 3": (
        {"--milestones": ["2", "3"]},
        PARSE,
        "--milestones 2.0 3.0: must be a number between 0 and 1",
    ),  # fmt: skip
    "milestones negative": (
        {"--milestones": ["0.5", "-0.5"]},
        PARSE,
        "--milestones 0.5 -0.5: must be a number between 0 and 1",
    ),  # fmt: skip
    "grad clip -0.5": ({"--grad-clip": "-0.5"}, PARSE, "--grad-clip -0.5"),
    "warmup -1": ({"--warmup": "-1"}, PARSE, "--warmup -1: must be an integer >= 0"),
    "val n 0": ({"--val-n": "0"}, PARSE, "--val-n 0"),
    "val images -1": ({"--val-images": "-1"}, PARSE, "--val-images -1"),
    "val crop -1": ({"--val-crop": "-1"}, PARSE, "--val-crop -1"),
    "val temperature -1": ({"--val-temperature": "-1"}, PARSE, "--val-temperature -1.0"),
    "time budget -1": ({"--time-budget": "-1"}, PARSE, "--time-budget -1.0"),
    "max bad steps 0": ({"--max-bad-steps": "0"}, PARSE, "--max-bad-steps 0"),
    "max rollbacks -1": ({"--max-rollbacks": "-1"}, PARSE, "--max-rollbacks -1"),
    "sync check every -1": ({"--sync-check-every": "-1"}, PARSE, "--sync-check-every -1"),
    "seed -1": ({"--seed": "-1"}, PARSE, "--seed -1: must be an integer between 0 and"),
    "seed 2**40": ({"--seed": str(2**40)}, PARSE, "--seed 1099511627776"),
    "steps not a number": ({"--steps": "many"}, PARSE, "--steps many: must be an integer"),
    "on-nan unknown": (
        {"--on-nan": "retry"},
        PARSE,
        "--on-nan retry: choose one of stop, rollback",
    ),
    "scale 5": ({"--scale": "5"}, PARSE, "--scale 5: choose one of 2, 3, 4, 8"),
    "unknown model": ({"--model": "edsr2"}, PARSE, "--model edsr2: choose one of"),
    "flow at x2": (
        {"--model": "srflow", "--n-feats": None, "--n-blocks": None},
        PARSE,
        "--scale 2: srflow supports 4 or 8",
    ),  # fmt: skip
    "unknown model flag": ({"--n-resblocks": "4"}, PARSE, "unrecognized arguments: --n-resblocks"),
    "n feats 0": ({"--n-feats": "0"}, PARSE, "--n-feats 0: must be an integer >= 1"),
    "n blocks -2": ({"--n-blocks": "-2"}, PARSE, "--n-blocks -2: must be an integer >= 0"),
    "res scale nan": ({"--res-scale": "nan"}, PARSE, "--res-scale nan"),
    "sigma ema 1": (
        {"--loss": "le", "--le-sigma-ema": "1"},
        PARSE,
        "--le-sigma-ema 1.0: must be a number >= 0 and < 1",
    ),  # fmt: skip
    "ema 1": ({"--ema": "1"}, PARSE, "--ema 1.0: must be a number >= 0 and < 1"),
    "vspsr alpha 0": (
        {"--model": "vspsr", "--n-feats": None, "--n-blocks": None, "--alpha": "0"},
        PARSE,
        "--alpha 0.0: must be a number > 0",
    ),  # fmt: skip
    "varsr adv start 2": ({"--model": "varsr", "--adv-start": "2"}, PARSE, "--adv-start 2.0"),
    "flow freeze 1.5": (
        {
            "--model": "srflow",
            "--scale": "4",
            "--n-feats": None,
            "--n-blocks": None,
            "--freeze-encoder": "1.5",
        },
        PARSE,
        "--freeze-encoder 1.5",
    ),  # fmt: skip
    "flow taps not numbers": (
        {
            "--model": "srflow",
            "--scale": "4",
            "--n-feats": None,
            "--n-blocks": None,
            "--rrdb-blocks": "first,last",
        },
        PARSE,
        "--rrdb-blocks first,last (rrdb_blocks='first,last'): give block numbers",
    ),  # fmt: skip
    "flow taps past nb": (
        {
            "--model": "srflow",
            "--scale": "4",
            "--n-feats": None,
            "--n-blocks": None,
            "--nb": "2",
            "--rrdb-blocks": "5",
        },
        PARSE,
        "--rrdb-blocks 5 (rrdb_blocks='5'): need blocks in 0..1, of --nb 2 (nb=2)",
    ),  # fmt: skip
    "refvae width 12": (
        {
            "--model": "refvae",
            "--n-feats": None,
            "--n-blocks": None,
            "--width": "12",
            "--no-pretrained": "",
        },
        PARSE,
        "--width 12 (width=12): must be a multiple of 8",
    ),  # fmt: skip
    "no cuda": ({"--device": "cuda"}, PARSE, "--device cuda: CUDA is not available"),
    "fp16 on cpu": ({"--amp": "fp16", "--device": "cpu"}, PARSE, "--amp fp16 needs a CUDA"),
    # files and folders
    "data missing": (
        {"--data": "{tmp}/no such folder"},
        3,
        "--data {tmp}/no such folder: no such folder",
    ),  # fmt: skip
    "lr data missing": (
        {"--lr-data": "{tmp}/no lr here"},
        3,
        "--lr-data {tmp}/no lr here: no such folder",
    ),  # fmt: skip
    # a typo of the built-in name or of a folder beside it: the name meant, to copy
    "data demo typo": ({"--data": "demoo"}, 3, "--data demoo: no such folder (did you mean demo?)"),
    "data folder typo": (
        {"--data": "{tmp}/photos of mne"},
        3,
        "--data {tmp}/photos of mne: no such folder (did you mean '{tmp}/photos of mine'?)",
    ),
    "data parent folder typo": (  # the first missing part, the rest as given
        {"--data": "{tmp}/sts/x2"},
        3,
        "--data {tmp}/sts/x2: no such folder (did you mean {tmp}/sets/x2?)",
    ),
    "data typo and a second one": ({"--data": "{tmp}/sts/x3"}, 3, "/sts/x3: no such folder"),
    "val data demo typo": (
        {"--val-data": "Demo", "--val-every": "1"},
        3,
        "--val-data Demo: no such folder (did you mean demo?)",
    ),
    "lr data typo": ({"--lr-data": "{tmp}/sets/x22"}, 3, "(did you mean {tmp}/sets/x2?)"),
    "lr data not demo": ({"--lr-data": "demoo"}, 3, "--lr-data demoo: no such folder"),
    # an unset variable, `--data "$DATA"`: the current folder's images were trained on
    "data empty path": ({"--data": "{empty}"}, PARSE, "--data: an empty path; give a folder"),
    "lr data empty path": ({"--lr-data": "{empty}"}, PARSE, "--lr-data: an empty path; give"),
    # (--val-data's: a run that validated nothing, or demo's images, and said "no --val-data")
    "val data empty path": (
        {"--val-data": "{empty}", "--val-every": "1"},
        PARSE,
        "--val-data: an empty path; give a folder of images or demo",
    ),
    # (each other path flag's "" was its default: runs/MODEL_xSCALE, no cache, a new run, no
    # weights, without a word)
    **{
        f"{flag} empty path": ({flag: "{empty}"}, PARSE, f"{flag}: an empty path; give {what}")
        for flag, what in (
            ("--out", "a run folder, or drop --out for runs/MODEL_xSCALE"),
            ("--cache", "a folder for the decoded arrays, or leave --cache out"),
            ("--resume", "auto or a checkpoint, or leave --resume out for a new run"),
            ("--init-from", "a checkpoint, or leave --init-from out"),
        )
    },
    # the other text flags' "" (an unset variable) was their default without a word: no
    # degradation, auto, a resumed run's model; a model's: the current folder's images as
    # references, no RRDB weights, the paper's taps or steps
    **{
        f"{flag} empty {kind}": (
            {**flags, flag: "{empty}"},
            PARSE,
            f"{flag}: an empty {kind}; give {what}",
        )
        for flag, kind, flags, what in (
            ("--lr-blur", "value", {}, "a sigma or LO:HI (0 or none for no blur), or"),
            ("--lr-noise", "value", {}, "a sigma or LO:HI (0 or none for no noise), or"),
            ("--lr-jpeg", "value", {}, "a quality 1..100 or LO:HI (none for no JPEG), or"),
            ("--device", "value", {}, "auto, cpu, cuda or cuda:N, or leave --device out"),
            # (", or" after a list of models read as its last item's continuation)
            ("--model", "value", {}, f"a model name ({', '.join(MODELS)}), or leave --model"),
            ("--ref-data", "path", TINY_REFVAE, "a folder of reference images, or leave"),
            ("--rrdb-init", "path", TINY_SRFLOW, "RRDB weights (RRDB_*.pth or an rrdb run's .pt)"),
            ("--rrdb-blocks", "value", TINY_SRFLOW, "block numbers, e.g. 1,8,15,22, or leave"),
            ("--noise-steps", "value", {**TINY_SRFLOW, "--model": "ncsr"}, "a whole number per"),
        )
    },
    "demo with folders": ({"--data": ["{data}", "demo"]}, 2, "--data demo: the built-in images"),
    # a folder without images: the flag named, before the run folder is made (--val-data's
    # after the training images were decoded)
    "data without images": ({"--data": "{tmp}/sets"}, 3, "--data {tmp}/sets: no images found"),
    "lr data without images": ({"--lr-data": "{tmp}/sets"}, 3, "--lr-data {tmp}/sets: no images"),
    "val data without images": (
        {"--val-data": "{tmp}/sets", "--val-every": "1"},
        3,
        "--val-data {tmp}/sets: no images found",
    ),
    "data a link to nothing": (
        {"--data": "{tmp}/loop"},
        3,
        "loop: a loop of symbolic links (it points to loop); point it at a folder",
    ),
    # its strips (OUT/val/*.png) were read as training images by the next run
    "out inside data": (
        {"--out": "{data}/run"},
        2,
        "--out {data}/run: is inside --data {data}, where its validation strips would be read as "
        "images; give --out a folder outside it",
    ),
    # a process each: --workers 100000 started them until the memory ran out
    "workers 100000": ({"--workers": "100000"}, PARSE, "--workers 100000: more loader processes"),
    "gamma 2": ({"--gamma": "2"}, PARSE, "--gamma 2.0: must be a number between 0 and 1"),
    "device mps": ({"--device": "mps"}, PARSE, "--device mps: srspace runs on cpu or cuda, not"),
    "device meta": ({"--device": "meta"}, PARSE, "--device meta: srspace runs on cpu or cuda"),
    "data is an image": (
        {"--data": "{data}/holiday 0.png"},
        3,
        "holiday 0.png: a file, not a folder; give a folder",
    ),  # fmt: skip
    "val data missing": (
        {"--val-data": "{tmp}/nothing here", "--val-every": "1"},
        3,
        "--val-data {tmp}/nothing here: no such folder",
    ),  # fmt: skip
    # what to do: the largest --patch the model takes that the largest image fits (48 px at x2)
    "patch larger than every image": (
        {"--patch": "64"},
        3,
        "no training images; all 2 are smaller than one 128x128 HR patch (LR patch 64 x scale 2); "
        "use --patch 24 (the largest image's LR is 24 px on its shorter side), or --data with "
        "larger images",
    ),
    "flow patch larger than every image": (
        {**TINY_SRFLOW, "--scale": "8", "--patch": "16"},
        3,
        "use --patch 6 (the largest image's LR is 6 px on its shorter side), or --data with",
    ),
    "lr data count": ({"--lr-data": ["{data}", "{data}"]}, PARSE, "2 folders for 1 --data"),
    "out is a file": ({"--out": "{file}"}, 7, "notes.txt: a file, not a folder; give a folder"),
    # (mkdir's "cannot create it (Not a directory)" of the whole path)
    "out under a file": (
        {"--out": "{file}/run"},
        7,
        "--out {tmp}/notes.txt/run: {tmp}/notes.txt: a file, not a folder; give a folder",
    ),
    # (once the run folder was made, which it left behind)
    "cache is a file": ({"--cache": "{file}"}, 7, "--cache {tmp}/notes.txt: a file, not a folder"),
    "cache under a file": (
        {"--cache": "{file}/c"},
        7,
        "--cache {tmp}/notes.txt/c: {tmp}/notes.txt: a",
    ),
    # mkdir said "cannot create it (File exists)" of both; --out's loop with --data a folder was
    # a traceback (Path.resolve's RuntimeError)
    **{
        f"{flag} a loop of links": (
            {flag: "{tmp}/loop"},
            7,
            f"{flag} {{tmp}}/loop: a loop of symbolic links (it points to loop)",
        )
        for flag in ("--out", "--cache")
    },
    # a link to a folder on a disk not mounted: not made there (a link to a folder not made yet,
    # whose own folder exists, is: test_a_linked_run_folder_is_made_at_its_target)
    **{
        f"{flag} a link into a missing folder": (
            {flag: "{tmp}/unmounted"},
            7,
            f"{flag} {{tmp}}/unmounted: a symbolic link to {{tmp}}/no disk/run, whose folder does "
            "not exist; create that folder, or remove the link",
        )
        for flag in ("--out", "--cache")
    },
    "out under a link into a missing folder": (
        {"--out": "{tmp}/unmounted/run"},
        7,
        "--out {tmp}/unmounted/run: {tmp}/unmounted: a symbolic link to {tmp}/no disk/run, whose",
    ),
    "out under a loop of links": (
        {"--out": "{tmp}/loop/run"},
        7,
        "--out {tmp}/loop/run: {tmp}/loop: a loop of symbolic links (it points to loop)",
    ),
    "resume missing checkpoint": (
        {"--resume": "{tmp}/gone.pt"},
        6,
        "--resume {tmp}/gone.pt: no such file",
    ),
    "resume a run folder": (  # its folder typed for its checkpoint: what to give instead
        {"--resume": "{run}"},
        6,
        "--resume {run}: a folder, not a file; give a file, e.g. {run}/last.pt, or --resume auto "
        "--out {run}",
    ),
    "new run of resume auto without a model": (
        {
            "--resume": "auto",
            "--out": "{tmp}/nothing",
            "--model": None,
            "--n-feats": None,
            "--n-blocks": None,
        },  # fmt: skip
        PARSE,
        "--model: a new run needs one (--resume auto: {tmp}/nothing holds no checkpoint to take "
        "it from); choose one of bicubic",
    ),
    "init from missing file": ({"--init-from": "{tmp}/gone.pt"}, 6, "gone.pt"),
    "init from a text file": ({"--init-from": "{file}"}, 6, "not a torch checkpoint"),
    "init from another scale": (
        {"--init-from": "{run}/last.pt", "--scale": "4"},
        6,
        "--init-from {run}/last.pt: holds edsr x2 weights, and this run is edsr x4; give a "
        "checkpoint of the same model and scale",
    ),
    "init from another width": (
        {"--init-from": "{run}/last.pt", "--n-feats": "16"},
        6,
        "its model flags differ: --n-feats 8 (this run 16)",
    ),
    "run exists, no --resume": ({"--out": "{run}"}, 2, "already holds a run (last.pt)"),
    "resume with fewer steps": (
        {"--out": "{run}", "--resume": "auto"},
        2,
        "is at step 2 already",
    ),  # fmt: skip
    "resume as another model": (
        {
            "--out": "{run}",
            "--resume": "auto",
            "--model": "rrdb",
            "--n-feats": None,
            "--n-blocks": None,
        },
        6,
        "is a run of 'edsr', not 'rrdb'",
    ),  # fmt: skip
    "resume a newer srspace's run": (
        {"--out": "{newer}", "--resume": "auto", "--steps": "3"},
        6,
        "config has fields this srspace does not know ['from_the_future']",
    ),  # fmt: skip
    "resume changing a model flag": (
        {"--out": "{run}", "--resume": "auto", "--steps": "3", "--n-feats": "16"},
        2,
        "{run}/last.pt: a resume cannot change model flags: --n-feats 16 (was 8); drop them "
        "(it takes the run's), or give a new --out",
    ),  # fmt: skip
    "varsr critic patch too small": (
        {
            "--model": "varsr",
            "--n-feats": "8",
            "--n-blocks": "1",
            "--z-dim": "8",
            "--enc-feats": "4",
            "--d-channels": "4",
            "--no-pretrained": "",
            "--patch": "4",
            "--lambda-per": "0",
            "--adv-start": "0",
        },
        2,
        "the critic needs HR patches of at least 17 px",
    ),  # fmt: skip
    "varsr patch too small for the perceptual loss": (
        {
            "--model": "varsr",
            "--z-dim": "8",
            "--enc-feats": "4",
            "--d-channels": "4",
            "--no-pretrained": "",
            "--patch": "7",
        },
        2,
        "--patch 7: the VGG19 perceptual loss needs HR patches of at least 16 px, not 14x14: use "
        "--patch 9 or more (the HR patch is --patch x --scale), or --lambda-per 0",
    ),
    "vspsr critic patch too small": (
        {**TINY_VSPSR, "--lambda-per": "0", "--patch": "3"},
        2,
        "vspsr: the critic needs HR patches of at least 10 px",
    ),
    "refvae discriminator patch too small": (
        {
            **TINY_REFVAE,
            "--patch": "4",
            "--lambda-style": "0",  # (the style loss's own 16 px would be said first)
        },
        2,
        "--patch 4: refvae: the discriminator needs HR patches of at least 16 px, not 8x8: use "
        "--patch 8 or more (the HR patch is --patch x --scale)",
    ),
    # an LR patch that the model's layers cannot halve: refused before any work, not a shape
    # error inside the first step
    "flow patch odd": (
        {**TINY_SRFLOW, "--patch": "5"},
        PARSE,
        "--patch 5: srflow x4 needs an LR patch that is a multiple of 2; use --patch 6",
    ),  # fmt: skip
    # a flow level below LR/2, where the encoder has no features to condition it on
    "flow levels past the encoder": (
        {**TINY_SRFLOW, "--flow-levels": "4"},
        PARSE,
        "--flow-levels 4 (flow_levels=4): SRFlow x4 has at most 3 levels",
    ),  # fmt: skip
    # NCSR: that line, not one asking for 4 --noise-steps, which would only lead to it
    "ncsr flow levels past the encoder": (
        {**TINY_SRFLOW, "--model": "ncsr", "--flow-levels": "4"},
        PARSE,
        "--flow-levels 4 (flow_levels=4): NCSR x4 has at most 3 levels",
    ),  # fmt: skip
    # NCSR's noise-conditional steps: one whole number >= 0 per level
    **{
        f"ncsr noise steps {value}": (
            {**TINY_SRFLOW, "--model": "ncsr", f"--noise-steps={value}": ""},
            PARSE,
            f"--noise-steps {value} (noise_steps={value!r}): need 3 whole numbers >= 0, one per "
            "level",
        )
        for value in ("1,1", "1,x,1", "-5,0,0")
    },
    # no style tap left: the first step's style loss was a plain 0, a traceback
    "refvae style layers empty": (
        {**TINY_REFVAE, "--style-layers": ","},
        PARSE,
        "--style-layers ',' (style_layers=','): VGG19 ReLU taps, e.g. relu4_1 (at least one",
    ),
    # references smaller than VGG19's pools reach (relu4_1: 3 halvings; relu5_1: 4)
    "refvae ref size 7": (
        {**TINY_REFVAE, "--ref-size": "7"},
        PARSE,
        "--ref-size 7 (ref_size=7): the VGG19 encoder (to relu4_1) halves references 3 times; use "
        "--ref-size 8",
    ),
    "refvae ref size 8 with a relu5 tap": (
        {**TINY_REFVAE, "--ref-size": "8", "--style-layers": "relu5_1"},
        PARSE,
        "--ref-size 8 (ref_size=8): the VGG19 encoder (to relu5_1) halves references 4 times; use "
        "--ref-size 16",
    ),
    "refvae patch not a multiple of 4": (
        {
            **TINY_REFVAE,
            "--patch": "10",
        },
        PARSE,
        "--patch 10: refvae x2 needs an LR patch that is a multiple of 4; use --patch 12",
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Training images, a plain file and a finished 2-step run, shared by the cases."""
    tmp = tmp_path_factory.mktemp("world")
    data = tmp / "photos of mine"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.kron(rng.random((6, 6, 3)), np.ones((8, 8, 1)))  # 48 x 48
        iio.imwrite(data / f"holiday {i}.png", (img * 255).astype(np.uint8))
    (tmp / "notes.txt").write_text("not a folder")
    (tmp / "sets" / "x2").mkdir(parents=True)  # (a folder to mistype, without images)
    (tmp / "loop").symlink_to("loop")
    (tmp / "unmounted").symlink_to(tmp / "no disk" / "run")
    argv = argv_of({"--steps": "2", "--out": str(tmp / "run")}, data=data)
    assert sr_train.main(argv) == 0
    # the same run as a newer srspace writes it, its model config holding a field unknown here
    ck = torch.load(tmp / "run" / "last.pt", weights_only=True)
    ck["model_cfg"]["from_the_future"] = 1
    save_checkpoint(tmp / "newer" / "last.pt", ck)
    return {"tmp": tmp, "data": data, "file": tmp / "notes.txt", "run": tmp / "run",
            "newer": tmp / "newer", "empty": ""}  # fmt: skip


def argv_of(flags: dict, **paths) -> list[str]:
    argv = []
    for flag, value in {**BASE, **flags}.items():
        values = value if isinstance(value, list) else [value]
        if value is None:
            continue
        argv += [flag] + [v.format(**paths) for v in values if v != ""]
    return argv


# Each "" refusal whose wording doubled a word: "(0 or none: none)", "(none: none)", "leave --out
# out"; and --ref-data's "(hr)", a value named without what it is.
EMPTY_LINES = {
    "--lr-blur": "value; give a sigma or LO:HI (0 or none for no blur), or leave --lr-blur out",
    "--lr-noise": "value; give a sigma or LO:HI (0 or none for no noise), or leave --lr-noise out",
    "--lr-jpeg": "value; give a quality 1..100 or LO:HI (none for no JPEG), or leave --lr-jpeg out",
    "--out": "path; give a run folder, or drop --out for runs/MODEL_xSCALE",
    "--ref-data": "path; give a folder of reference images, or leave --ref-data out for hr (the "
    "HR patch)",
}


@pytest.mark.parametrize("flag", EMPTY_LINES)
def test_an_empty_value_is_refused_in_plain_words(flag, capsys):
    model = ["--model", "refvae"] if flag == "--ref-data" else ["--model", "edsr"]
    with pytest.raises(SystemExit) as e:
        sr_train.main([*model, "--data", "demo", flag, ""])
    line = f"sr_train.py: error: {flag}: an empty {EMPTY_LINES[flag]}\n"
    assert (e.value.code, capsys.readouterr().err) == (2, line)


@pytest.mark.parametrize("case", CASES)
def test_one_line_and_the_exit_code(case, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    flags, code, words = CASES[case]
    out = tmp_path / "out"
    argv = argv_of(flags, out=out, **world)
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": warning: " not in line]
    assert len(lines) == 1 and lines[0].startswith("sr_train.py: error: "), err
    words = words.format(**world)
    assert e.value.code == (2 if code == PARSE else code) and words in lines[0], (e.value.code, err)
    if code == PARSE:
        assert not out.exists(), "a flag refused at parse time must not start any work"
    if "data" in case or "cache" in case:  # their lines come before the run folder is made
        assert not out.exists() and not (world["data"] / "run").exists()


def test_a_linked_run_folder_is_made_at_its_target(world, tmp_path):
    """--out and --cache, symbolic links to folders not made yet on a scratch disk (or a folder
    on their way: runs/x2): made there, written through the links, which stay (mkdir had said
    "cannot create it (File exists)")."""
    (tmp_path / "scratch").mkdir()
    for name in ("runs", "cache"):
        (tmp_path / name).symlink_to(tmp_path / "scratch" / name)
    flags = {"--out": str(tmp_path / "runs" / "x2"), "--cache": str(tmp_path / "cache")}
    assert sr_train.main(argv_of(flags, **world)) == 0
    assert (tmp_path / "runs").is_symlink() and (tmp_path / "scratch/runs/x2/last.pt").is_file()
    assert (tmp_path / "cache").is_symlink() and list((tmp_path / "scratch/cache").glob("*.npy"))


@pytest.mark.parametrize("cache", [False, True])
def test_a_linked_data_folder_of_odd_names_then_one_deleted_after_its_listing(
    cache, tmp_path, capsys, monkeypatch
):
    """--data and --val-data, a link to a folder whose names hold a space and share a prefix
    (0001, 0001x4: strips and cache files each their own), train. A file deleted between the
    folder's listing and its read (the folder changed as a run starts) was, with --cache, a
    traceback from the stat of its cache key; it is the line without --cache, exit 3."""
    real, link = tmp_path / "real", tmp_path / "data"
    real.mkdir()
    link.symlink_to(real)
    rng = np.random.default_rng(0)
    for name in ("0001.png", "0001x4.png", "a b.png"):
        img = np.kron(rng.random((6, 6, 3)), np.ones((8, 8, 1)))  # 48 x 48
        iio.imwrite(real / name, (img * 255).astype(np.uint8))
    flags = {"--data": str(link), "--val-data": str(link), "--val-every": "1"}
    if cache:
        flags["--cache"] = str(tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (validation images that are training images)
        assert sr_train.main(argv_of({**flags, "--out": str(tmp_path / "run")})) == 0
    assert "data: 3 training images of 3 found" in capsys.readouterr().out
    strips = sorted(p.name for p in (tmp_path / "run" / "val").iterdir())
    assert strips == [f"step0000001_{stem}.png" for stem in ("0001", "0001x4", "a b")]
    if cache:
        assert len(list((tmp_path / "cache").glob("*.npy"))) == 6
    listed = sr_lib.data.list_images

    def deleted_after_listing(*args, **kwargs):
        files = listed(*args, **kwargs)
        for f in files:
            f.unlink()
        return files

    (real / "0001.png").unlink()  # (left to list: "a b.png", deleted once listed)
    (real / "0001x4.png").unlink()
    monkeypatch.setattr(sr_lib.data, "list_images", deleted_after_listing)
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv_of({**flags, "--out": str(tmp_path / "second")}))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and err == f"sr_train.py: error: {link / 'a b.png'}: no such file"


# a tiny VarSR, its critic on from the first step
TINY_VARSR = {"--model": "varsr", "--z-dim": "8", "--enc-feats": "4", "--d-channels": "4",
              "--no-pretrained": "", "--adv-start": "0"}  # fmt: skip
# Each model with a loss or critic that takes a least HR patch: (flags, the least --patch at
# x2, whether a run with it is tried: VSpSR's perceptual loss needs VGG19's weights file)
LEAST_PATCH = {
    "varsr": (TINY_VARSR, 9, True),  # its critic: 17 px (its VGG19 loss at relu5_4: 16)
    "varsr without its critic": (
        {
            **{k: v for k, v in TINY_VARSR.items() if k not in ("--adv-start", "--d-channels")},
            "--lambda-adv": "0",
        },
        8,
        True,
    ),
    "vspsr": ({**TINY_VSPSR, "--lambda-per": "0"}, 5, True),  # its critic: 10 px
    "vspsr with its perceptual loss": (TINY_VSPSR, 8, False),
    "refvae": (TINY_REFVAE, 8, True),  # its discriminator and style loss: 16 px (a multiple of 4)
}


@pytest.mark.parametrize("case", LEAST_PATCH)
def test_a_patch_too_small_for_a_loss_is_refused_before_any_work(case, world, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    """A loss or critic given too small a patch was refused at the first step, after the run
    folder was made and the data decoded (VarSR's critic: at its adversarial phase, half the
    run later), and the --patch suggested for images too small took none of them into account.
    Now the patch below the least is one line before any work, naming the least, with which
    the run trains."""
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    flags, least, runs = LEAST_PATCH[case]
    out = tmp_path / "out"
    small = least - 4 if flags["--model"] == "refvae" else least - 1  # (refvae: its multiple)
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv_of({**flags, "--patch": str(small), "--out": str(out)}, **world))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"--patch {small}: " in err and f"use --patch {least} or more" in err, err
    assert not out.exists()
    if runs:  # each loss takes it: the step runs
        assert sr_train.main(argv_of({**flags, "--patch": str(least), "--out": str(out)},
                                     **world)) == 0  # fmt: skip


# VGG19's layout (torchvision's vgg19.features): a 2x2 max-pool after each block, so a tap of
# block B sees the patch halved B - 1 times and needs 2 ** (B - 1) px of it
VGG_LEAST = {tap: 2 ** (int(tap[4]) - 1) for tap in VGG19_RELU}


@pytest.mark.parametrize("tap", VGG19_RELU)
def test_each_vgg_tap_takes_its_least_patch_and_refuses_one_pixel_less(tap):
    """The least patch of a tap was counted twice, from its name for sr_train.py's --patch check
    and from the module's max-pools for the loss's own: one count now. At it the loss runs forward
    and backward, finite; one pixel less is its one line before VGG19 runs, where torch would
    have stopped at a max-pool with nothing left to pool."""
    loss, need = VGGLoss(VGGFeatures((tap,), pretrained=False)), VGG_LEAST[tap]
    assert loss.min_size == vgg_min_size(tap) == need
    sr = torch.rand(1, 3, need, need + 3, requires_grad=True)  # (its shorter side counts)
    value = loss(sr, torch.rand(1, 3, need, need + 3))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0
    if need > 1:
        hr = torch.rand(1, 3, need - 1, need + 3)
        with pytest.raises(UsageError, match=f"at least {need} px, not {need - 1}x{need + 3}"):
            loss(hr, hr)
        with pytest.raises(RuntimeError):  # (the check refuses what VGG19 itself cannot take)
            loss.vgg(hr)


@pytest.mark.parametrize("tap", VGG19_RELU)
def test_each_vgg_tap_sets_the_least_patch_of_a_run(tap, world, tmp_path, capsys, monkeypatch):
    """VarSR's perceptual loss at each tap (without its critic): the least --patch at x2 is the
    tap's least HR patch halved; one less is docs/train.md's one line, exit 2, before the run folder
    is made (at relu1_x and relu2_x --patch 1 gives enough)."""
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    flags = {**TINY_VARSR, "--adv-start": None, "--d-channels": None, "--lambda-adv": "0",
             "--per-layer": tap}  # fmt: skip
    least = -(-VGG_LEAST[tap] // 2)
    model = build_model("varsr", {"scale": 2, "z_dim": 8, "enc_feats": 4, "lambda_adv": 0.0,
                                  "per_layer": tap, "pretrained": False})  # fmt: skip
    assert sr_train.least_patch(model) == least
    if least == 1:
        return
    out, small = tmp_path / "out", least - 1
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv_of({**flags, "--patch": str(small), "--out": str(out)}, **world))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and not out.exists(), err
    assert err == (
        f"sr_train.py: error: --patch {small}: the VGG19 perceptual loss needs HR patches of at "
        f"least {VGG_LEAST[tap]} px, not {2 * small}x{2 * small}: use --patch {least} or more "
        "(the HR patch is --patch x --scale), or --lambda-per 0 (lambda_per=0)"
    )


def test_a_limit_past_int64_is_no_limit(world, tmp_path):
    """--max-bad-steps 1e23 typed out (a script's "never"): an OverflowError traceback at the
    first step, the count being a tensor; no streak reaches it, so it runs as asked."""
    argv = argv_of({"--max-bad-steps": str(10**23), "--out": str(tmp_path / "o")}, **world)
    assert sr_train.main(argv) == 0


def test_a_changed_model_switch_is_named_as_its_flags():
    """A resume refusing a changed model flag named the Config fields (['unused_conv']); a switch
    is named in the form that was given and the form the run had."""
    srflow = MODELS["srflow"]  # unused_conv: on by default (--no-unused-conv); lu: off (--lu)
    assert sr_train.model_flag(srflow, "unused_conv", False) == "--no-unused-conv"
    assert sr_train.model_flag(srflow, "unused_conv", True, bare=True) == "--unused-conv"
    assert sr_train.model_flag(srflow, "lu", True) == "--lu"
    assert sr_train.model_flag(srflow, "lu", False, bare=True) == "no --lu"
    assert sr_train.model_flag(srflow, "nb", 3) == "--nb 3"
    assert sr_train.model_flag(srflow, "nb", 3, bare=True) == "3"


def test_perceptual_loss_offline_suggests_lambda_per_0(world, tmp_path, capsys, monkeypatch):
    """VSpSR's VGG19 loss without the weights file, offline: exit 6, and the way out."""
    for var, value in (("SRSPACE_OFFLINE", "1"), ("SRSPACE_WEIGHTS", str(tmp_path)),
                       ("TORCH_HOME", str(tmp_path))):  # fmt: skip
        monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv_of({**TINY_VSPSR, "--out": str(tmp_path / "o")}, **world))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 6 and len(err.splitlines()) == 1, err
    assert "vgg19" in err and err.endswith("--lambda-per 0")


# Files a model reads at its first step, each missing: one line naming it, before the data is
# decoded (minutes for DIV2K + Flickr2K): no "data:" line, no cache written.
FIRST_STEP_FILES = {
    "rrdb init": ({**TINY_SRFLOW, "--rrdb-init": "{tmp}/gone.pt"}, 6, "--rrdb-init {tmp}/gone.pt"),
    "vgg19 offline": (TINY_VSPSR, 6, "vgg19"),
    "ref data": ({**TINY_REFVAE, "--ref-data": "{tmp}/no refs"}, 3, "--ref-data {tmp}/no refs"),
}


@pytest.mark.parametrize("case", FIRST_STEP_FILES)
def test_first_step_files_before_the_data(case, world, tmp_path, capsys, monkeypatch):
    for var, value in (("SRSPACE_OFFLINE", "1"), ("SRSPACE_WEIGHTS", str(tmp_path)),
                       ("TORCH_HOME", str(tmp_path))):  # fmt: skip
        monkeypatch.setenv(var, value)
    flags, code, words = FIRST_STEP_FILES[case]
    cache = tmp_path / "cache"
    argv = argv_of({**flags, "--out": str(tmp_path / "o"), "--cache": str(cache)}, **world)
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == code and len(err.strip().splitlines()) == 1, err
    assert err.startswith("sr_train.py: error: ") and words.format(**world) in err, err
    assert "data:" not in out and not cache.exists(), out


def test_tensorboard_missing_is_one_line(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv_of({"--tensorboard": "", "--out": str(tmp_path / "o")}, **world))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (
        "sr_train.py: error: --tensorboard needs the tensorboard package: pip install tensorboard"
    )
    assert os.listdir(tmp_path / "o") == [".lock"]  # nothing else was written


@pytest.mark.parametrize("model", ["vspsr", "varsr", "refvae"])
def test_missing_pretrained_weights_stop_the_run_at_start(model, tmp_path, capsys, monkeypatch):
    """The VGG19 of a perceptual loss (RefVAE: its encoder) missing offline stopped the run at
    its first step, after it had made --out and read all the data; now it is the one line at
    start (the data holds an unreadable image: read first, it would be exit 3)."""
    data = tmp_path / "data"
    data.mkdir()
    iio.imwrite(data / "a.png", np.zeros((48, 48, 3), np.uint8))
    (data / "b.png").write_bytes(b"not a png")
    tiny = {k: v for k, v in TINY[model].items() if k not in ("pretrained", "lambda_per")}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in tiny.items()]
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    for var, value in (("SRSPACE_OFFLINE", "1"), ("SRSPACE_WEIGHTS", ""),
                       ("TORCH_HOME", str(empty))):  # fmt: skip
        monkeypatch.setenv(var, value)  # read when the weights are looked for
    argv = ["--model", model, "--scale", "4", "--data", str(data), "--steps", "1",
            "--val-every", "0", "--out", str(out), *flags]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 6 and len(err.splitlines()) == 1, err
    assert err.startswith("sr_train.py: error: weights 'vgg19' not found"), err
    assert err.strip().endswith("--lambda-per 0") == (model != "refvae")
    assert not out.exists()


def test_refvae_needs_alexnet_and_a_vgg19_not_yet_loaded(tmp_path, monkeypatch):
    """RefVAE's LPIPS loss loads AlexNet (never kept: its line says how to train without it);
    its VGG19 encoder is read for a new run, not where a checkpoint holds it (loaded)."""
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    monkeypatch.setenv("SRSPACE_WEIGHTS", "")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_model("refvae", {**TINY["refvae"], "pretrained": True, "scale": 4})
    with pytest.raises(CheckpointError, match="weights 'vgg19' not found"):
        model.check_files(loaded=False)
    with pytest.raises(CheckpointError, match="weights 'alexnet' not found.*--lambda-lpips 0$"):
        model.check_files(loaded=True)
    model = build_model("refvae", {**TINY["refvae"], "lambda_lpips": 0.0, "pretrained": True,
                                   "scale": 4})  # fmt: skip
    model.check_files(loaded=True)  # neither file is read


# Model flags that have no effect with the other options given: a warning each, never silently
# ignored (docs/train.md); the same flags with the options they need: none.
UNUSED = {  # id: (flags, the warning, flags that make it take effect)
    "le flag without le": ({"--le-beta": "0.1"}, "--le-beta: no effect without --loss le",
                           {"--loss": "le"}),
    "gaussian std without it": (
        {**TINY_SRFLOW, "--dequant": "none", "--gaussian-std": "1"},
        "--gaussian-std: no effect without --dequant gaussian", {"--dequant": "gaussian"}),
    "quant without uniform": ({**TINY_SRFLOW, "--model": "ncsr", "--quant": "64"},
                              "--quant: no effect without --dequant uniform",
                              {"--dequant": "uniform"}),
    "vspsr critic at lambda adv 0": (
        {**TINY_VSPSR, "--lambda-adv": "0", "--d-channels": "8"},
        "--d-channels: no effect with --lambda-adv 0 (no discriminator)", {"--lambda-adv": "1"}),
    "varsr vgg at lambda per 0": (
        {"--model": "varsr", "--n-feats": None, "--n-blocks": None, "--lambda-per": "0",
         "--no-pretrained": ""},
        "--no-pretrained: no effect with --lambda-per 0", {"--lambda-per": "1"}),
    "refvae tv beta at lambda tv 0": ({**TINY_REFVAE, "--lambda-tv": "0", "--tv-beta": "2"},
                                      "--tv-beta: no effect with --lambda-tv 0",
                                      {"--lambda-tv": "1"}),
    "max rollbacks without rollback": ({"--max-rollbacks": "5"},
                                       "--max-rollbacks: no effect without --on-nan rollback",
                                       {"--on-nan": "rollback"}),
    # paired LR folders and a cache for the built-in demo photographs (trained on as before)
    "lr data with demo": ({"--lr-data": "elsewhere_lr"},
                          "--lr-data: no effect with --data demo (its LR is made from its HR, "
                          "and it is held in memory)", {"--data": "elsewhere"}),
    "cache with demo": ({"--cache": "elsewhere_cache"},
                        "--cache: no effect with --data demo (its LR is made from its HR, and it "
                        "is held in memory)", {"--data": "elsewhere"}),
    # run flags of a schedule the recipe does not use (rrdb's is a cosine)
    "milestones with a cosine": (
        {"--model": "rrdb", "--n-feats": None, "--n-blocks": None, "--milestones": "0.5"},
        "--milestones: no effect with the rrdb recipe's cosine learning-rate schedule",
        {"--model": "edsr"}),
    "gamma with a cosine": (
        {"--model": "rrdb", "--n-feats": None, "--n-blocks": None, "--gamma": "0.1"},
        "--gamma: no effect with the rrdb recipe's cosine learning-rate schedule",
        {"--model": "edsr"}),
    "gamma without milestones": ({"--milestones": "", "--gamma": "0.1"},
                                 "--gamma: no effect without --milestones (no decay)",
                                 {"--milestones": "0.5"}),
    # validation flags of a run that validates nothing (BASE: --val-every 0)
    "val flag at val every 0": ({"--val-crop": "64"},
                                "--val-crop: no effect without validation (--val-every 0)",
                                {"--val-every": "10"}),
    "val data at val every 0": ({"--val-data": "demo"},
                                "--val-data: no effect without validation (--val-every 0)",
                                {"--val-every": "10"}),
    "val flag without val data": (
        {"--data": "elsewhere", "--val-every": None, "--val-images": "2"},
        "--val-images: no effect without validation (no --val-data)", {"--val-data": "demo"}),
    "val every without val data": ({"--data": "elsewhere", "--val-every": "10"},
                                   "--val-every: no effect without validation (no --val-data)",
                                   {"--val-data": "demo"}),
    "val temperature of a deterministic model": (
        {"--val-every": "10", "--val-temperature": "0.5"},
        "--val-temperature: no effect with the deterministic edsr model (its samples are "
        "identical)", TINY_SRFLOW),
    "val n of a deterministic model": (
        {"--val-every": "10", "--val-n": "2"},
        "--val-n: no effect with the deterministic edsr model (its samples are identical)",
        TINY_SRFLOW),
    # the optimisation flags of a model without parameters: one line for them all
    "optimisation flags of bicubic": (
        {"--model": "bicubic", "--n-feats": None, "--n-blocks": None, "--ema": "0.999",
         "--learning-rate": "1e-3", "--gamma": "0.5", "--amp": "bf16"},
        "--learning-rate, --gamma, --amp, --ema: no effect, the bicubic model has nothing to "
        "train", {"--model": "edsr"}),
    "warmup of bicubic": ({"--model": "bicubic", "--n-feats": None, "--n-blocks": None,
                           "--warmup": "1"},
                          "--warmup: no effect, the bicubic model has nothing to train",
                          {"--model": "edsr"}),
    "grad clip of bicubic": ({"--model": "bicubic", "--n-feats": None, "--n-blocks": None,
                              "--grad-clip": "1"},
                             "--grad-clip: no effect, the bicubic model has nothing to train",
                             {"--model": "edsr"}),
}  # fmt: skip


@pytest.mark.parametrize("case", UNUSED)
def test_a_flag_without_effect_is_a_warning(case, tmp_path):
    flags, said, needed = UNUSED[case]
    for extra, expected in (({}, [f"{said}; ignored"]), (needed, [])):
        argv = argv_of({**flags, **extra}, data="demo", out=str(tmp_path / "out"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args, rest, given = sr_train.parse_all(argv)
            sr_train.resolve_run(args, rest, given)  # the flags read, nothing built or written
        assert [str(w.message) for w in caught] == expected, extra


def test_a_warmup_longer_than_the_run_is_a_warning(tmp_path):
    """--warmup beyond --steps: trained as asked (a short try of a long run's command line), but
    the learning rate given is never reached: one line saying how much of it is; none where the
    warm-up fits, nor at --steps 0 (nothing trained)."""
    for steps, warmup, expected in (
        ("4", "10", ["--warmup 10: longer than the run (--steps 4); its last step takes 40% of "
                     "the learning rate"]),
        ("4", "4", []),
        ("0", "10", []),
    ):  # fmt: skip
        argv = argv_of({"--steps": steps, "--warmup": warmup}, data="demo", out=str(tmp_path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args, rest, given = sr_train.parse_all(argv)
            sr_train.resolve_run(args, rest, given)
        assert [str(w.message) for w in caught] == expected, (steps, warmup)


def test_a_cache_with_demo_is_ignored_not_made(tmp_path):
    """--data demo takes no --cache (one warning, above): no folder is made for it either
    (it was, and left empty)."""
    argv = argv_of({"--cache": str(tmp_path / "cache"), "--steps": "1"}, data="demo",
                   out=str(tmp_path / "out"))  # fmt: skip
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert sr_train.main(argv) == 0
    assert (tmp_path / "out" / "last.pt").is_file() and not (tmp_path / "cache").exists()


def test_a_resumed_run_warns_by_its_own_config_not_the_flags_repeated(world, tmp_path):
    """A resume takes its model config from the checkpoint: a run of --loss le resumed with its
    --le-beta repeated but not --loss le uses that flag, which the warning said it ignored."""
    out = tmp_path / "out"
    argv = argv_of({"--loss": "le", "--le-beta": "0.1"}, data=world["data"], out=out)
    assert sr_train.main(argv) == 0
    argv = argv_of({"--le-beta": "0.1", "--steps": "2", "--resume": "auto"},
                   data=world["data"], out=out)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args, rest, given = sr_train.parse_all(argv)
        cfg = sr_train.resolve_run(args, rest, given)[3]
    assert cfg["loss"] == "le" and cfg["le_beta"] == 0.1
    assert [str(w.message) for w in caught] == []


def test_a_discriminator_learning_rate_without_a_discriminator_is_a_warning(world, tmp_path):
    argv = argv_of({"--d-learning-rate": "1e-3", "--steps": "0"}, out=tmp_path / "out", **world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sr_train.main(argv) == 0
    said = [str(w.message) for w in caught if "--d-learning-rate" in str(w.message)]
    assert said == ["--d-learning-rate: no effect, this edsr model has no discriminator; ignored"]


@pytest.mark.parametrize(
    "flags, said",
    [
        ({"--sync-check-every": "1"},
         "--sync-check-every: no effect in one process (it compares the replicas of several)"),
        ({"--model": "bicubic", "--n-feats": None, "--n-blocks": None, "--d-learning-rate": "1"},
         "--d-learning-rate: no effect, the bicubic model has nothing to train"),
    ],
)  # fmt: skip
def test_a_flag_without_effect_in_this_run_is_one_warning(world, flags, said, tmp_path):
    """Known once the run is set up (its number of processes, its model built): one line when
    typed, none when not (the last of `flags`)."""
    for k, extra in enumerate((flags, dict(list(flags.items())[:-1]))):
        argv = argv_of({**extra, "--steps": "0"}, out=tmp_path / f"out{k}", **world)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert sr_train.main(argv) == 0
        assert [str(w.message) for w in caught] == ([f"{said}; ignored"] if k == 0 else []), k


FLOATS = [
    k
    for k, m in MODELS.items()
    if any("float" in str(f.type) for f in dataclasses.fields(m.Config))
]


@pytest.mark.parametrize("name", FLOATS)
def test_every_float_model_flag_has_a_finite_bound(name):
    """A float model flag at 1e30 (a typo, an exponent too many) made the loss inf from the first
    step, and the run stopped with exit 5 only after --max-bad-steps: each has a finite bound."""
    cls = MODELS[name].Config
    for f in dataclasses.fields(cls):
        if "float" in str(f.type):
            with pytest.raises(UsageError, match=f"^--{f.name.replace('_', '-')} 1e\\+30: must be"):
                check_ranges(cls(**{f.name: 1e30}))


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize(
    "where, flags, said",
    [  # (faked: the allocation is CUDA's, which a CPU test cannot make fail)
        ("build_model", {"--n-feats": "100000000"},
         "the edsr model does not fit in memory on cpu (--n-feats 100000000): use smaller model "
         "flags"),
        ("train_step", {"--n-feats": "96"},
         "a smaller --batch (this run's: 2), a smaller --patch (this run's: 8) or smaller model "
         "flags (--n-feats 96)"),
        ("train_step", {}, "a smaller --batch (this run's: 2) or a smaller --patch (this run's: "
         "8)"),  # the model at its paper's size
        ("train_step", {"--batch": "1"}, "a smaller --patch (this run's: 8)"),
        ("train_step", {"--batch": "1", "--patch": "1", "--n-feats": "96"},
         "smaller model flags (--n-feats 96)"),
        ("train_step", {"--batch": "1", "--patch": "1"},
         "step 1: out of memory at --batch 1 and --patch 1, the least: the edsr model does not "
         "fit in training on cpu; nothing was saved"),
        # a device that runs bfloat16 natively (faked): --amp bf16 needs less, also where the
        # batch and patch are the least (it was never named)
        ("train_step", {}, "a smaller --batch (this run's: 2), a smaller --patch (this run's: 8) "
         "or --amp bf16 (this run's: none)"),
        ("train_step", {"--batch": "1", "--patch": "1"},
         "step 1: out of memory; nothing was saved: start again with --amp bf16 (this run's: "
         "none)"),
        # --ema (--compile, several processes): the first batch initialises the model before
        # step 1; out of memory there said "use a smaller --batch or --patch", no values
        ("initialize", {"--ema": "0.9"}, "error: step 1: out of memory; nothing was saved: start "
         "again with a smaller --batch (this run's: 2) or a smaller --patch (this run's: 8)"),
    ],
)  # fmt: skip
def test_out_of_memory_names_the_model_flags_that_grew_it(where, flags, said, world, tmp_path,
                                                           capsys, monkeypatch):  # fmt: skip
    monkeypatch.setattr(sr_train, where, out_of_memory)
    monkeypatch.setattr(sr_train, "native_bf16", lambda device: "--amp bf16" in said)
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv_of({**flags, "--device": "cpu"}, out=tmp_path / "out", **world))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 4 and len(err.splitlines()) == 1, err
    assert err.startswith("sr_train.py: error: ") and err.endswith(said), err


@pytest.mark.parametrize("cache", [False, True])
def test_out_of_memory_loading_the_images_names_the_cache(cache, world, tmp_path, capsys,
                                                          monkeypatch):  # fmt: skip
    """A data set whose decoded images do not fit in memory (measured: 60 images of 3000x3000
    under ulimit -v 5000000) said "use a smaller --batch or --patch", which cannot help: the
    images are all held decoded. Now it names --cache (with it, the same run trained). With
    --cache, the line says what a run with more memory can do. (Faked here: numpy's error from
    making an image's LR.)"""

    def resize(*args, **kwargs):
        raise MemoryError("Unable to allocate 103. MiB for an array with shape (3000, 3000, 3)")

    monkeypatch.setattr(sr_lib.data, "imresize", resize)
    flags = {"--cache": str(tmp_path / "cache")} if cache else {}
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv_of(flags, out=tmp_path / "out", **world))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 4 and len(err.splitlines()) == 1, err
    said = ("each is decoded once to a .npy file there and memory-mapped" if not cache else
            f"({sr_lib.data.decode_threads()} at a time, with their LR made); a run with more "
            "memory can make the cache, which later runs read without decoding")  # fmt: skip
    assert err.startswith("sr_train.py: error: --data: out of memory while ") and err.endswith(
        said
    ), err
    assert not (tmp_path / "out" / "last.pt").exists()


def test_a_flag_whose_default_stands_for_the_papers_value_is_not_named_bigger():
    """SRFlow's --flow-steps 16 is its paper's value at x4 (default 0: the paper's): an
    out-of-memory line named it 'above the paper's'."""
    assert sr_train.bigger_flags("srflow", {"flow_steps": 16, "scale": 4}) == ""
    assert sr_train.bigger_flags("edsr", {"n_feats": 96, "scale": 4}) == "--n-feats 96"


@pytest.mark.parametrize("flag", [["--lr", "1e-4"], ["--lr=1e-4"]])
def test_lr_is_refused_as_neither_the_rate_nor_the_lr_images(flag, tmp_path, capsys):
    """argparse took --lr, other tools' learning rate, for an abbreviation of --lr-data: with
    --data demo the run trained at the recipe's rate, --lr-data only warned of as unused."""
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "edsr", "--data", "demo", "--steps", "0", *flag, "--out",
                       str(tmp_path)])  # fmt: skip
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "sr_train.py: error: --lr: give --learning-rate (the rate) or --lr-data (the LR images) "
        "in full; the abbreviation would be --lr-data\n"
    )


def test_a_text_file_given_as_resume_says_it_is_no_torch_file(tmp_path, capsys):
    """--resume notes.txt (the wrong file) said 'not a valid torch file or is truncated (...
    KeyError: 101); copy it again': advice to copy the wrong file again."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    argv = ["--model", "edsr", "--data", "demo", "--steps", "1", "--resume", str(notes),
            "--out", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 6 and len(err) == 1, err
    assert err[0] == (f"sr_train.py: error: {notes}: not a torch file (it begins b'hello\\n'; a "
                      "checkpoint file was expected): give the checkpoint file, or fetch it "
                      "again where this was a download"), err  # fmt: skip
