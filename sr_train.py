"""Train one srspace model. Reads top to bottom: args -> data -> model -> optimizer -> loop.

    python sr_train.py --model edsr --scale 4 --data demo --steps 2000 --out runs/edsr_x4
    python sr_train.py --model edsr -h          # run flags and the model's own Config flags

Every flag left unset takes the model's paper recipe (`Model.recipe(scale)`). The loop is counted
in steps; the batch of step t is a pure function of (seed, rank, t), so `--resume auto` continues
exactly. Exit codes: README "Exit codes" (75 = stopped by a signal, resume with --resume auto).
"""

import os

if os.name != "posix":  # before the imports that need POSIX (fcntl, SIGUSR1): one line, exit 2
    from sr_lib import refuse_non_posix

    refuse_non_posix("sr_train.py")

import contextlib
import errno
import fcntl
import glob
import json
import logging
import math
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

if __name__ == "__main__":  # before torch's import (seconds): a stop signal then is not lost
    from sr_lib.errors import record_stop_signals, require_packages

    record_stop_signals()
    require_packages("sr_train.py")

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sr_lib import __version__, distributed, metrics
from sr_lib.checkpoint import is_srspace_checkpoint, save_checkpoint
from sr_lib.config import (
    amp_emulated,
    asks_json,
    autocast_for,
    check_ranges,
    compile_blocker,
    given_fields,
    help_parser,
    nearest_choice,
    parse,
    pick_device,
    refuse_stdio,
)
from sr_lib.data import (
    DEGRADATION_FLAGS,
    EMPTY_DEGRADATION,
    Degradation,
    PatchPairs,
    SharedMemoryFull,
    StopRequested,
    TooSmall,
    WorkerDied,
    WorkersHung,
    available_cores,
    check_image_folder,
    check_out_dir,
    cpu_workers,
    decode_threads,
    degradation_flags,
    degradation_of,
    describe_path,
    fit_name,
    list_images,
    load_pairs,
    name_max,
    normalise_degradation,
    refuse_empty,
    refuse_out_dir,
    same_files,
    shell_quote,
    to_uint8,
    train_loader,
    write_png,
    write_target,
    write_text,
)
from sr_lib.ema import EMA
from sr_lib.errors import (
    EXIT_NONFINITE,
    EXIT_OUTPUT,
    EXIT_PREEMPTED,
    PREEMPT_SIGNALS,
    CheckpointError,
    DataError,
    NonFiniteError,
    OutOfMemory,
    OutputError,
    Preempted,
    Resumable,
    SRSpaceError,
    Stopped,
    Summary,
    UsageError,
    any_of,
    catch,
    exit_on_error,
    is_out_of_memory,
    joined_lines,
    one_line,
    print_out,
    printable,
    replay_stop_signal,
    said_error,
    say_err,
    stdout_closed,
)
from sr_lib.models import MODELS, build_model, checkpoint_config, read_checkpoint
from sr_lib.models.base import NoiseSource, Recipe, option, sample_seed, scale_list
from sr_lib.resize import cached_tensors
from sr_lib.threads import signals_held, when_not_held
from sr_lib.weights import as_state_dict, is_tensor_dict

PROG = "sr_train.py"
OUT_OF_MEMORY = "out of memory; use a smaller --batch or --patch"  # (no --tile, as sr_sample.py)
WORKERS_PER_CORE = 4  # --workers' limit, per core this process may use (data.cpu_workers)
GRAPH_DEVICES = ("cuda",)  # --cuda-graphs (tests add "cpu", with `capture` replaced)
FP16_DEVICES = ("cuda",)  # --amp fp16 training (tests add "cpu": GradScaler("cpu") stands in)


@dataclass
class TrainArgs:
    model: str = field(default="", metadata=dict(help=f"one of: {', '.join(MODELS)}"))
    scale: int = field(
        default=4,
        metadata=dict(choices=[2, 3, 4, 8], help="upscaling factor (--model NAME -h: its scales)"),
    )
    data: list[str] = field(
        default_factory=lambda: ["demo"],
        metadata=dict(nargs="+", help="HR image folders (recursive), or 'demo'"),
    )
    lr_data: list[str] = field(
        default_factory=list, metadata=dict(nargs="+", help="paired LR folders, one per --data")
    )
    # LR made from HR beyond bicubic (Real-ESRGAN's first-order degradation, in its order), each
    # SIGMA or LO:HI drawn per patch; validation's LR: one fixed draw per image (docs/train.md)
    lr_blur: str = option("", "without --lr-data: Gaussian blur of the HR before the bicubic "
                          "downscale, sigma in HR pixels: SIGMA or LO:HI, drawn per patch",
                          metavar="SIGMA")  # fmt: skip
    lr_noise: str = option("", "without --lr-data: Gaussian noise on the LR, sigma in 8-bit "
                           "levels (0-255): SIGMA or LO:HI, drawn per patch",
                           metavar="SIGMA")  # fmt: skip
    lr_jpeg: str = option("", "without --lr-data: JPEG-compress the LR (Pillow, 4:2:0) at "
                          "QUALITY (1-100) or LO:HI, drawn per patch (none for no JPEG, e.g. to "
                          "drop a resumed run's); validation's NTIRE LR-PSNR "
                          "still compares the SR's bicubic downscale with the HR's, not with "
                          "this LR", metavar="QUALITY")  # fmt: skip
    val_data: str = field(
        default="",
        metadata=dict(help="validation HR folder or 'demo' (default: demo when training on demo)"),
    )
    val_images: int = field(
        default=3,
        metadata=dict(help="the first N images, in name order (0 = all)", range="[0, inf)"),
    )
    val_crop: int = field(
        default=384, metadata=dict(help="centre-crop val HR to this (0 = off)", range="[0, inf)")
    )
    val_n: int = field(
        default=3, metadata=dict(help="samples per validation image (a deterministic model: 1)")
    )
    val_temperature: float | None = field(
        default=None,
        metadata=dict(type=float, help="sampling temperature of validation (default: the model's)"),
    )
    cache: str = field(
        default="",
        metadata=dict(help="folder for the decoded images as memory-mapped .npy (else in RAM)"),
    )
    # Unset (None): the model's recipe.
    steps: int | None = field(
        default=None,
        metadata=dict(type=int, help="total steps (default: the paper's)", range="[0, inf)"),
    )
    batch: int | None = field(
        default=None, metadata=dict(type=int, help="per-process batch (default: the paper's)")
    )
    patch: int | None = field(
        default=None, metadata=dict(type=int, help="LR patch size (default: the paper's)")
    )
    learning_rate: float | None = field(  # (above 1 an Adam step is bigger than any weight)
        default=None,
        metadata=dict(type=float, help="learning rate (default: the paper's)", range="[0, 1]"),
    )
    d_learning_rate: float | None = field(
        default=None,
        metadata=dict(type=float, help="discriminator learning rate (default: the paper's)",
                      range="[0, 1]"),
    )  # fmt: skip
    milestones: list[float] | None = field(
        default=None,
        metadata=dict(
            nargs="*", type=float, range="[0, 1]",
            help="multistep decay points as fractions of --steps (the flag alone: no decay; "
            "default: the paper's)",
        ),
    )  # fmt: skip
    gamma: float | None = field(  # (above 1 the rate grew at each milestone: 1e30, past any)
        default=None,
        metadata=dict(type=float, help="multistep decay factor (default: the paper's)",
                      range="[0, 1]"),
    )  # fmt: skip
    grad_clip: float | None = field(
        default=None,
        metadata=dict(type=float, help="max grad norm (0 = off; default: the paper's)"),
    )
    warmup: int = field(
        default=0,
        metadata=dict(help="learning-rate warm-up: step t of the first WARMUP takes t/WARMUP of "
                      "the schedule's rate (0 = none, the papers' recipe)", range="[0, inf)"),
    )  # fmt: skip
    init_from: str = field(
        default="",
        metadata=dict(help="fine-tune: a new run starts from the weights of this checkpoint (its "
                      "--ema average where kept) or released file, with a fresh optimizer"),
    )  # fmt: skip
    out: str = field(default="", metadata=dict(help="run folder (default: runs/MODEL_xSCALE)"))
    resume: str = field(
        default="", metadata=dict(help="'auto' (OUT/last.pt, else OUT/best.pt) or a checkpoint")
    )
    seed: int = field(
        default=0,
        metadata=dict(help="random seed of the initial weights, the batches, the training noise "
                      "(each rank its own) and the validation samples",
                      range="[0, 4294967295]"),
    )  # fmt: skip
    device: str = field(default="auto", metadata=dict(help="auto, cpu, cuda, cuda:1, ..."))
    workers: int = field(
        default=2, metadata=dict(help="data loader processes (0 = inline)", range="[0, inf)")
    )
    log_every: int = field(default=100, metadata=dict(help="steps between log lines"))
    val_every: int = field(
        default=1000, metadata=dict(help="steps between validations (0 = none)", range="[0, inf)")
    )
    keep_strips: int = field(
        default=5,
        metadata=dict(help="OUT/val/ keeps the strips of the last K validations and of best.pt's, "
                      "deleting older ones (0 = keep all)", range="[0, inf)", metavar="K"),
    )  # fmt: skip
    save_every: int = field(default=1000, metadata=dict(help="steps between saves of last.pt"))
    max_bad_steps: int = field(
        default=20,
        metadata=dict(help="consecutive non-finite steps before --on-nan acts (checked at log, "
                      "validation and save steps)"),
    )  # fmt: skip
    on_nan: str = field(
        default="stop",
        metadata=dict(
            choices=["stop", "rollback"],
            help="after --max-bad-steps: stop (exit 5), or reload last.pt, halve the learning "
            "rates and continue",
        ),
    )
    max_rollbacks: int = field(
        default=3,
        metadata=dict(help="--on-nan rollback: at most this many, then exit 5", range="[0, inf)"),
    )
    time_budget: float = field(
        default=0.0,
        metadata=dict(
            help="stop cleanly (save, exit 0) after this many seconds of training, "
            "the start-up not counted (0 = no limit)"
        ),
    )
    tensorboard: bool = field(
        default=False,
        metadata=dict(help="also write the log and validation strips to OUT/tb/ (the strips: a "
                      "file per validation in OUT/tb/val/, kept as --keep-strips keeps the PNGs)"),
    )  # fmt: skip
    quiet: bool = field(
        default=False,
        metadata=dict(help="print warnings, errors and the closing line only (no progress; "
                      "log.jsonl and OUT/tb/ are written as usual)"),
    )  # fmt: skip
    json: bool = field(
        default=False,
        metadata=dict(help="the closing line is one JSON object: exit_code, step, loss, "
                      "checkpoint... (docs/exit-codes.md)"),
    )  # fmt: skip
    amp: str = field(
        default="none",
        metadata=dict(
            choices=["none", "bf16", "fp16"],
            help="mixed precision: bf16 (fast on a GPU from Ampere on and on a CPU with native "
            "bf16; elsewhere emulated and slower, with a warning) or fp16 (CUDA only, with a "
            "loss scaler)",
        ),
    )
    compile: bool = field(
        default=False,
        metadata=dict(help="torch.compile the training forward (flows: each repeated block)"),
    )
    cuda_graphs: bool = field(
        default=False,
        metadata=dict(help="record the training step once as a CUDA graph and replay it: no "
                      "per-kernel launch cost (one CUDA process, --amp none or bf16)"),
    )  # fmt: skip
    ema: float = field(
        default=0.0,
        metadata=dict(
            help="keep an exponential moving average of the weights with this decay, e.g. 0.999 "
            "(0 = off): validation, best.pt and sr_sample.py use it",
            range="[0, 1)",
        ),
    )
    deterministic: bool = field(
        default=False,
        metadata=dict(help="deterministic algorithms only; slower on a GPU (docs/design.md)"),
    )
    sync_check_every: int = field(
        default=0,
        metadata=dict(help="multi-process: verify replicas agree every K steps (0 = never)",
                      range="[0, inf)"),
    )  # fmt: skip
    requeue: bool = field(
        default=True,
        metadata=dict(help="under SLURM, do not requeue the job after SIGUSR1/SIGTERM (default: "
                      "requeue; the job then continues with --resume auto)"),
    )  # fmt: skip


def recipe_help(name: str, scale: int) -> str:
    """The run flags a model's paper recipe at `scale` sets (what unset flags take), as flags
    to copy: --model NAME -h shows them, the numbers being otherwise only in the docs."""
    model = MODELS[name]
    if scale not in model.scales:
        return f"{name} has no recipe at --scale {scale} (its scales: {scale_list(model)})"
    if not model.learns:
        return f"{name} has nothing to train: no recipe"

    def num(x: float) -> str:  # short where exact: 2/3 stays 0.6666666666666666
        return f"{x:g}" if float(f"{x:g}") == x else repr(x)

    r = model.recipe(scale)
    flags = [f"--batch {r.batch}", f"--patch {r.patch}", f"--steps {r.steps}",
             f"--learning-rate {num(r.learning_rate)}"]  # fmt: skip
    if any(f.name == "d_channels" for f in fields(model.Config)):  # (its discriminator's)
        flags.append(f"--d-learning-rate {num(r.d_learning_rate)}")
    if r.schedule == "multistep" and r.milestones:
        flags += [f"--milestones {' '.join(map(num, r.milestones))}", f"--gamma {num(r.gamma)}"]
    flags += [f"--grad-clip {num(r.grad_clip)}"] * (r.grad_clip > 0)
    flags += [f"--warmup {r.warmup}"] * (r.warmup > 0)
    schedule = {
        "cosine": f", one cosine of the rate down to {num(r.eta_min)} over the run",
        "multistep": "" if r.milestones else ", a constant rate",
    }[r.schedule]
    about = (
        f"{name} paper recipe at --scale {scale}, which the run flags left unset take (Adam betas "
        f"{num(r.betas[0])}, {num(r.betas[1])}, weight decay {num(r.weight_decay)}{schedule}):"
    )
    width = max(40, shutil.get_terminal_size().columns - 2)  # as argparse wraps its help
    # the flags on one line of their own, never wrapped: copied and pasted as one command line
    text = f"{textwrap.fill(about, width, break_on_hyphens=False)}\n  {' '.join(flags)}"
    note = f"Unlike the released code: {r.note}." if r.note else ""
    return f"{text}\n{textwrap.fill(note, width, break_on_hyphens=False)}" if note else text


# The run's text flags whose typed "" is refused (`parse_all`): a path or a value, and what to
# give instead. Their "" was their default without a word (no degradation is typed none, or 0
# for a blur or noise; a resumed run takes its checkpoint's otherwise).
EMPTY_REFUSED = {
    "data": ("path", "a folder of images or demo"),
    "lr_data": ("path", "a folder of images"),
    "val_data": ("path", "a folder of images or demo"),
    "out": ("path", "a run folder, or drop --out for runs/MODEL_xSCALE"),
    "cache": ("path", "a folder for the decoded arrays, or leave --cache out"),
    "resume": ("path", "auto or a checkpoint, or leave --resume out for a new run"),
    "init_from": ("path", "a checkpoint, or leave --init-from out"),
    "model": ("value", f"a model name ({', '.join(MODELS)}), or leave --model out with --resume"),
    **EMPTY_DEGRADATION,  # (as sr_sample.py --from-hr's)
    "device": ("value", "auto, cpu, cuda or cuda:N, or leave --device out"),
}
# The models' text flags, as EMPTY_REFUSED (`resolve_run`): --ref-data "" read the current
# folder's images as references, --rrdb-init "" trained without the weights meant.
MODEL_EMPTY_REFUSED = {
    "ref_data": ("path", "a folder of reference images, or leave --ref-data out for hr (the HR "
                          "patch)"),
    "rrdb_init": ("path", "RRDB weights (RRDB_*.pth or an rrdb run's .pt), or leave --rrdb-init "
                          "out"),
    "rrdb_blocks": ("value", "block numbers, e.g. 1,8,15,22, or leave --rrdb-blocks out for the "
                             "paper's"),
    "noise_steps": ("value", "a whole number per level, e.g. 0,16,16, or leave --noise-steps out "
                             "for the paper's"),
}  # fmt: skip


def parse_all(argv):
    """Two-stage parsing: run flags, then the chosen model's Config flags (resolve_run). Every
    number is checked here, before any work: one line and exit 2 for a value out of range."""
    argv = list(sys.argv[1:] if argv is None else argv)
    want_help = "-h" in argv or "--help" in argv
    argv = [a for a in argv if a not in ("-h", "--help")]
    if any(a.split("=")[0] == "--lr" for a in argv):  # other tools' --lr is the rate; here
        # argparse took it for --lr-data: `--lr 1e-4 --data demo` trained at the recipe's rate
        raise UsageError(
            "--lr: give --learning-rate (the rate) or --lr-data (the LR images) "
            "in full; the abbreviation would be --lr-data"
        )
    args, rest = parse(TrainArgs, argv, PROG, known=True, add_help=False)
    if args.model and args.model not in MODELS:  # before -h: its help is not the run's
        raise unknown_model(args.model)
    if want_help:
        epilog = (
            "Unset run flags take the model's paper recipe. python sr_train.py --model NAME -h "
            "also lists the model's own flags and scales."
        )
        help_parser(TrainArgs, PROG, epilog).print_help()
        if args.model in MODELS:
            model = MODELS[args.model]
            own = [f for f in fields(model.Config) if f.name != "scale"]  # --scale: the run's
            print(f"\n{recipe_help(args.model, args.scale)}")
            print(f"\n{args.model} model options (--scale {scale_list(model)}):"
                  + ("" if own else " none of its own"))  # fmt: skip
            if own:  # (-h is the run's too, listed above)
                help_parser(model.Config, f"{PROG} --model {args.model}", hide=("scale",),
                            add_help=False).print_help()  # fmt: skip
        raise SystemExit(0)
    check_ranges(args)
    # (an unset shell variable, `--data "$DATA"`: the path "" is the current folder, whose
    # images, if any, were trained on without a word; --val-data's, --out's, --cache's,
    # --resume's and --init-from's "" is their default: no validation or demo's, runs/MODEL_xSCALE,
    # no cache, a new run, no weights, taken without a word where a path was meant; so were
    # --model's, --device's and the degradations' "": a resumed run's model, auto, none)
    given = given_fields(TrainArgs, argv, PROG)
    refuse_empty(args, given, EMPTY_REFUSED)
    # Each loader worker is a process of its own (hundreds of MB): --workers 100000 started
    # them until the machine's memory ran out. Beyond a few per core none loads faster.
    if args.workers > (most := WORKERS_PER_CORE * cpu_workers()):
        raise UsageError(f"--workers {args.workers}: more loader processes than "
                         f"{WORKERS_PER_CORE} per core this process may use ({cpu_workers()}); "
                         f"give at most {most}")  # fmt: skip
    normalise_degradation(args)  # (the text as it will be recorded)
    refuse_stdio(args, ("data", "lr_data", "val_data", "cache", "init_from", "out", "resume"))
    return args, rest, given


def main(argv=None) -> int:
    with Summary(PROG) as result:  # --json: its line after the error line, or the return
        return result.end(run_script(argv, result))


def run_script(argv, result: Summary) -> int:
    with exit_on_error(PROG, OUT_OF_MEMORY), warnings.catch_warnings():
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            distributed.warn_once()  # (a malformed RANK, WORLD_SIZE...: a usage error too)
            args, rest, given = parse_all(argv)
        except UsageError:  # the --json line after the error line, if asked for
            result.json = asks_json(TrainArgs, argv, PROG) and first_rank()
            raise
        result.json = args.json and first_rank()  # rank 0 says it
        try:
            with contextlib.ExitStack() as cleanup:
                stop = catch_signals(cleanup)  # first: from here on a signal stops the run
                return train(args, rest, given, cleanup, stop, result)
        except KeyboardInterrupt:  # Ctrl-C before the loop (exit 130): --json's `stopped` too
            result.update(stopped="SIGINT")
            raise
        except Resumable as e:  # exit 75 of a rank lost or workers hung: `stopped` says so too
            hung = isinstance(e, WorkersHung)
            result.update(stopped=result.fields.get("stopped") or
                          ("workers hung" if hung else "lost contact"))  # fmt: skip
            raise
        except Preempted as e:  # before the first step: nothing to save
            if isinstance(e.__context__, SRSpaceError):  # it came while that error unwound
                raise e.__context__ from None
            result.update(stopped=e.args[0])  # --json's `stopped`, as after a stop in the loop
            raise stopped_before_training(e.args[0], args) from None


def unknown_model(name: str) -> UsageError:
    """--model NAME not one of MODELS: in the words of argparse's choices (`OneLineParser`)."""
    return UsageError(f"--model {shell_quote(name)}: choose one of {', '.join(MODELS)}"
                      + nearest_choice(name, list(MODELS)))  # fmt: skip


def first_rank() -> bool:
    """Whether this process is rank 0, or the only one (from the environment: before the
    processes meet). A malformed RANK, WORLD_SIZE... (a usage error): each process says it."""
    try:
        return (distributed.env_ranks() or (0,))[0] == 0
    except UsageError:
        return True


def train(args: TrainArgs, rest: list[str], given: set[str], cleanup: contextlib.ExitStack,
          stop: dict, result: Summary | None = None) -> int:  # fmt: skip
    """The run; `result` gathers the fields of its closing line (--json), as they become known."""
    result = result or Summary(PROG)
    out, ckpt_path, resumed, cfg, named, recipe = resolve_run(args, rest, given)
    result.update(out=str(out), step=resumed["step"] if resumed else 0, steps=recipe.steps,
                  skipped=resumed["skipped"] if resumed else 0, loss=None, loss_step=None,
                  checkpoint=str(ckpt_path) if resumed else None,
                  checkpoint_step=resumed["step"] if resumed else None, stopped=None)  # fmt: skip
    dd, device = setup_process(args, cleanup)
    check_same_run(args, cfg, resumed, dd)
    if "sync_check_every" in given and not dd.on:  # (known once the processes have met)
        warnings.warn("--sync-check-every: no effect in one process (it compares the replicas "
                      "of several); ignored", stacklevel=2)  # fmt: skip
    say = say_out if dd.main and not args.quiet else (lambda text: None)  # --quiet: none
    model = training_model(args, cfg, named, recipe, resumed, device, say)
    if recipe.steps > result.fields["step"]:  # (a finished run reads no image)
        check_run_data(args, out, recipe.steps, dd)
    run_log = cleanup.enter_context(  # rank 0
        open_run_folder(out, args.tensorboard, dd, resumed["step"] if resumed else None)
    )
    folder = run_folder_id(out) if dd.main else None  # the folder this run locked

    start, skipped, best = (
        (resumed["step"], resumed["skipped"], resumed["best"]) if resumed else (0, 0, -math.inf)
    )
    meta = dict(model=args.model, model_cfg=cfg, train_args=asdict(args),  # in every checkpoint
                rollbacks=resumed.get("rollbacks", 0) if resumed else 0,
                best_step=best_pt_step(out, resumed, best) if dd.main else None)  # fmt: skip
    recipe = scaled_rates(recipe, 0.5 ** meta["rollbacks"])  # --on-nan rollback halved them
    # the step OUT/last.pt holds, as written or read by this run (None: none of its own yet)
    saved = start if resumed is not None and ckpt_path == out / "last.pt" else None
    step = start
    # Another rank lost (killed, its node down, silent past the timeout) fails the next
    # collective here: one line and exit 75. (A closure: `step` and `saved` as they are then.)
    before = (f"{ckpt_path} still holds step {start}: resume it again" if resumed is not None
              else "nothing was saved: start again")  # fmt: skip
    cleanup.push(lambda kind, e, tb: lost_contact(e, dd, step, saved, out / "last.pt", before))

    # Data: batch t of rank r is drawn from rng(seed, r, t): workers and resume do not matter.
    steps = recipe.steps
    # A finished run resumed again (a requeued job, a script rerun): nothing to train, so no
    # image is decoded (DIV2K's 800 took minutes and 7 GB to say "done")
    # (a last validation stopped by a signal is not finished: done on resume, `validation`)
    pending = (
        resumed is not None
        and resumed.get("val_stopped") == start
        and not no_validation(args, steps)
    )
    finished = resumed is not None and start >= steps and not pending
    dataset = training_data(args, recipe, model, dd, say) if steps > 0 and not finished else None
    check_same_data(dataset, dd)
    # After the data check: torch's optimizers import torch._dynamo (~1.4 CPU-s), which a rank
    # refused for its copy of the images made the user wait for. (Their first rates are the
    # schedule's: set_learning_rates sets them every step, a resumed state loads its own.)
    optimizers = build_optimizers(model, recipe)
    # A model with nothing to learn (bicubic) scales no loss, and GradScaler.update() refuses
    # to run then.
    fp16 = args.amp == "fp16" and bool(optimizers)
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    val_pairs = [] if finished else validation_pairs(args, steps, dd, say, dataset)
    # Every rank takes part in saving best.pt (its RNG state is gathered): all must know when.
    val_every = args.val_every if distributed.agree(bool(val_pairs), dd, all_ranks=False) else 0
    # The run's stop request, read by the loader while it waits for a batch. Not with several
    # processes: a rank that stopped on its own while waiting (a slow batch, not a hung worker)
    # would leave the others in a collective and their steps since the last save lost; it waits
    # for its batch and stops with the others after the step (a hang: LOADER_TIMEOUT).
    stopping = None if dd.on else (lambda: stop["signal"])
    # It draws from no global RNG (its workers' seed has its own generator), so the RNG states
    # restored below are the run's as they were. On CUDA: from pinned memory, copied without
    # blocking, converted on the device.
    loader = train_loader(dataset, start, steps, args.workers, device.type == "cuda", device,
                          stopping)  # fmt: skip
    with signals_held():  # a signal's Preempted waits until the workers have started
        batches = iter(loader) if steps > start else None
    if dd.rank:  # model-internal noise (dequantisation, latents) differs per rank, like the data
        torch.manual_seed(args.seed * 100_003 + dd.rank)

    def first_batch_too_big() -> OutOfMemory:  # (its initialisation's forward: step 1's batch)
        state = held_steps(dd, saved, out / "last.pt", ckpt_path, start, resumed)
        return step_out_of_memory(start, args, cfg, recipe, model, device, *state)

    ema = start_model(args, model, optimizers, scaler, resumed, ckpt_path, dataset, steps, dd,
                      device, say, first_batch_too_big)  # fmt: skip
    if finished:  # (after `start_model`'s "resumed ..."; bicubic, without weights, has
        more = " (a larger --steps goes on)" * MODELS[args.model].learns  # nothing to go on with)
        say(f"{ckpt_path} is at step {start}, the run's --steps: nothing to train{more}")
    # (after the resume's changed flags are said)
    changed = validation_changes(args, resumed) if resumed and best > -math.inf else []
    # its record would stand against another measure (none: a run that validates no more)
    if changed and not (no_validation(args, steps) or finished):
        say(f"best.pt: the best PSNR so far ({best:.3f}) was validated with other "
            f"{', '.join(changed)}; it is not compared with this run's, whose next validation "
            "writes best.pt")  # fmt: skip
        best, meta["best_step"] = -math.inf, None
    later = dd.main and resumed and not finished  # (rank 0's `best` alone decides)
    newer = later_best(out, ckpt_path, start, args) if later else None
    if newer is not None and newer[1] > best:
        best, meta["best_step"] = newer[1], newer[0]
        say(f"best.pt: holds step {newer[0]} (PSNR {best:.3f}), after {ckpt_path}'s step "
            f"{start} (the run stopped without saving it): a validation replaces it only if "
            "better")  # fmt: skip
    if resumed and not finished:
        moved = schedule_moved(args, recipe, resumed, start)
        if moved:
            say(moved)
    forward = wrap(model, dd, device, args.compile)
    graph = StepGraph(model, device) if args.cuda_graphs else None
    stop["at_once"] = False  # from here on a signal stops the loop, which saves
    if run_log is not None:
        run_log.stop = stop  # a log.jsonl that cannot be written stops the run (then exit 7)
    say(summary(args, model, start, recipe, dd, device, out))
    autocast = autocast_for(args.amp, device)
    if distributed.agree(bool(stdout_closed()), dd, all_ranks=False):  # (rank 0's) all stop
        raise OutputError(f"standard output {stdout_closed() or 'of rank 0 lost'}; stopped "
                          "before training")  # fmt: skip
    progress = cleanup.enter_context(Progress(steps, start, stop, args.quiet)) if dd.main else None
    bad_steps = BadSteps(device, args.max_bad_steps, skipped)
    stopped, t0, t_start, logged = None, time.monotonic(), time.monotonic(), start
    lost_image = None  # the loader's DataError or OutputError: said after saving the steps done
    hung = None  # the loader's WorkersHung: the same
    # A rollback needs a last.pt of this run: also one resumed from a checkpoint elsewhere saves
    # its first good step into OUT.
    unsaved = args.on_nan == "rollback" and saved is None

    def validation(step: int, best: float) -> float:
        """Validate at `step`: best.pt where it beats `best` (the best returned), the old strips
        pruned (--keep-strips). (A closure: `skipped` as it is then.)"""
        net = ema.module if ema is not None else model  # with --ema, the averaged weights
        compiled = compile_count() if args.compile else None
        try:
            score = validate(net, val_pairs, args, device, out, step, run_log, progress,
                             stop)  # fmt: skip
        except (RuntimeError, MemoryError) as e:
            no_memory = is_out_of_memory(e)
            # (a flow validates through its compiled blocks) a signal also ended --compile's
            # compiler: no score, and the loop stops at its top, as after the step
            if not (no_memory or stopped_compiling(e, stop, args, compiled)):
                raise
            if not no_memory:
                said_stopped(e, stop, f"validation at step {step}", step, run_log)
            score = -math.inf  # this validation never makes best.pt
            if no_memory:  # training goes on
                print(f"{PROG}: warning: validation at step {step}: out of memory; skipped "
                      "(a smaller --val-crop or --val-n needs less)", file=sys.stderr,
                      flush=True)  # fmt: skip
        check_run_folder(out, folder, step)  # (a validation can take minutes)
        # stopped by a signal before its end (last.pt is saved at this step next): the resumed
        # run validates this step first, as the run never stopped did (best.pt, the strips)
        meta["val_stopped"] = step if score == -math.inf and stop["signal"] else None
        if distributed.agree(score > best, dd, all_ranks=False):  # rank 0's verdict
            was = best, meta["best_step"]
            best, meta["best_step"] = score, step
            if not save(out / "best.pt", step, skipped, best, model, optimizers, scaler, dd, meta,
                        ema):  # fmt: skip
                best, meta["best_step"] = was  # declined (not finite): best.pt's stays the best
        # (rank 0, which validates) after best.pt: a new best frees the old best's strips
        if val_pairs and args.keep_strips:
            prune_strips(out, [stem for stem, _, _ in val_pairs], step, args.keep_strips,
                         meta["best_step"])  # fmt: skip
        return best

    # The resumed last.pt was saved after a signal stopped its step's validation: that validation
    # first, before the next step (best.pt and the strips as a run never stopped makes them)
    if pending:
        best = validation(step, best)

    while step < steps:
        over_budget = bool(args.time_budget) and time.monotonic() - t_start > args.time_budget
        # Why every rank stops, agreed: 2 a signal (exit 75), 1 the time budget (exit 0). Each
        # rank reads its own clock: one under its budget still stops for the budget, not as if
        # signalled (exit 75 beside rank 0's 0, which srun reports as the job's code).
        why = distributed.most(2 if stop["signal"] else int(over_budget), dd)
        if why:
            stopped = stop["signal"] or ("time budget" if why == 1 else "signal (other rank)")
            break
        # --compile: the random generators before the step, which a step cut short by its
        # compilation's end may have drawn from (SRFlow's dequantisation noise is drawn eagerly
        # before its first compiled block): put back for last.pt
        before_step = torch_rng_state() if args.compile and not dd.on else None
        compiled = compile_count() if args.compile else None
        try:
            out_g, ok = train_step(model, forward, optimizers, batches, step, recipe, dd, scaler,
                                   autocast, graph)  # fmt: skip
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if stopped_compiling(e, stop, args, compiled):
                # A signal to the process group (SLURM, Ctrl-C) also ends the compilers that
                # --compile runs in this step (g++ for inductor): the compilation fails, in the
                # forward or backward, before any weight changed. A stop: as after the step,
                # save the steps done and exit 75 (several processes: the others may wait in a
                # collective, so no save: one line naming the last one and the error).
                sig, error = said_stopped(e, stop, f"step {step + 1}", step, run_log, not dd.on)
                if dd.on:
                    result.update(stopped=sig)  # (--json: the signal, not a rank lost)
                    raise Resumable(f"{sig}: stopped in step {step + 1}, whose "
                                    f"compilation raised {error}, {STOPPED_COMPILING}; "
                                    f"{last_save(dd, saved, out / 'last.pt', before)}"
                                    ) from None  # fmt: skip
                set_torch_rng_state(before_step)  # last.pt as a stop at the step's top saves it
                stopped = stop["signal"]
                break
            if not is_out_of_memory(e):
                raise
            if dd.on:  # (other ranks wait in a collective: no save) this rank's flags, values
                kept = held_steps(dd, saved, out / "last.pt", ckpt_path, start, resumed)
                raise step_out_of_memory(step, args, cfg, recipe, model, device, *kept) from None
            stopped = "out of memory"  # save the steps done since the last save, then exit 4
            break
        except WorkersHung as e:  # docs/clusters.md: save the steps done, then exit 75
            if dd.on:  # (the other ranks wait in a collective: no save)
                raise WorkersHung(
                    f"step {step + 1}: {e}; {last_save(dd, saved, out / 'last.pt', before)}"
                ) from None
            stopped, hung = "workers hung", e
            break
        except StopRequested:  # (one process) a signal while the loader gave no batch
            stopped = stop["signal"]  # as after the step: save the steps done, exit 75
            break
        except (DataError, OutputError, SharedMemoryFull, WorkerDied) as e:  # an image and its
            # --cache file deleted mid-run; a full /dev/shm; a loader worker killed
            if isinstance(e, SharedMemoryFull):  # a smaller batch helps too: named here, where
                helps = smaller_batches(recipe, model)  # the model's least patch is known
                e = SharedMemoryFull(f"{e}, or {' or '.join(helps)}" if helps else str(e))
            if dd.on or step == start:  # (the other ranks wait in a collective: no save; no
                raise e from None  # step done: nothing to save, e.g. an empty --ref-data)
            stopped, lost_image = "data", e  # save the steps done, then exit 3 (7: disk full;
            # 4: /dev/shm full, a worker killed)
            break
        # (GradScaler.get_scale() would wait for the device: its tensor instead)
        bad_steps.count(ok, step, scaler._get_scale_async() if scaler is not None else None)
        if ema is not None:
            ema.update(ok)  # a skipped step leaves the average as it is
        step += 1
        result.update(step=step)
        logs, saves = step % args.log_every == 0 or step == steps, step % args.save_every == 0
        validates = bool(val_every) and (step % val_every == 0 or step == steps)
        if not (logs or saves or validates or unsaved):  # the same steps on every rank
            continue  # the device counts bad steps; the host reads them only at the steps below
        check_run_folder(out, folder, step)  # before this step writes there
        bad, skipped, tripped = bad_steps.read()
        if tripped >= 0:  # --max-bad-steps consecutive non-finite steps: stop, or roll back
            step, batches, skipped = roll_back(tripped, args, out, steps, model, optimizers,
                                               scaler, dd, dataset, meta, run_log, progress, ema,
                                               device, before, stopping)  # fmt: skip
            recipe, t0, logged = scaled_rates(recipe, 0.5), time.monotonic(), step
            bad_steps.reset(skipped)
            if graph is not None:
                graph.reset()  # the reloaded optimizer states are new tensors: record again
            continue
        if args.sync_check_every and step % args.sync_check_every == 0:
            check_replicas(model, dd, step, run_log)
        if dd.main and logs:
            rec = log_step(run_log, progress, out_g, optimizers, recipe, step, skipped, t0, logged)
            result.update(loss=rec.get("loss"), loss_step=step, skipped=skipped)
            t0, logged = time.monotonic(), step
        if validates:
            best = validation(step, best)
        if (saves or unsaved) and bad == 0:  # never save inside a non-finite streak
            if save(out / "last.pt", step, skipped, best, model, optimizers, scaler, dd, meta,
                    ema):  # fmt: skip
                unsaved, saved = False, step
                result.update(checkpoint=str(out / "last.pt"), checkpoint_step=step)
    # A signal in the last step's validation ended the loop as done (exit 0, the validation not
    # scored): stopped as at any other step (exit 75), the resumed run validates it (rank 0's).
    # One in the last step with no validation after it, or in the save below, stays done (exit
    # 0, not requeued: the steps are all trained and saved, a requeue would resume a finished
    # run; README "Exit codes", examples/slurm/train.sbatch).
    last_stopped = dd.main and step == steps and meta.get("val_stopped") == step
    if stopped is None and distributed.agree(bool(last_stopped), dd, all_ranks=False):
        stopped = stop["signal"] or "signal (other rank)"
    check_run_folder(out, folder, step)
    _, skipped, tripped = bad_steps.read()
    if tripped >= 0:  # a signal or the time budget came right after the streak
        step, batches, skipped = roll_back(tripped, args, out, steps, model, optimizers, scaler,
                                           dd, dataset, meta, run_log, progress, ema, device,
                                           before, stopping)  # fmt: skip
    # A finished run resumed again keeps last.pt as it is. Out of memory, the failed step has
    # moved the random generators on: a last.pt of this very step stays as it was saved.
    oom = stopped == "out of memory"
    # (workers hung: a last.pt of this step, or of a new run's step 0, has nothing new)
    # (or the resumed step's stopped validation done: last.pt no longer asks for it)
    # (rank 0's verdict: every rank takes part in the save)
    redone = distributed.agree(
        bool(dd.main and pending and not meta.get("val_stopped")), dd, all_ranks=False
    )
    declined = None  # the step whose save `save` declined (its weights not finite)
    if (step > start or resumed is None or redone) and not (
        (oom or hung) and step in (start, saved)
    ):
        if save(out / "last.pt", step, skipped, best, model, optimizers, scaler, dd, meta, ema):
            saved = step
            result.update(checkpoint=str(out / "last.pt"), checkpoint_step=step)
        else:  # (non-finite weights) no "done", nor a stop's line naming last.pt: exit 5, below
            declined = step
    result.update(step=step, skipped=skipped, steps=steps)
    del forward, batches  # DDP and the loader hold the process group: gone before finish ends it
    # (one process below: finish() has no process group to leave; last.pt, if saved, of `step`)
    state, how = held_steps(dd, saved, out / "last.pt", ckpt_path, start, resumed)
    held = f"{state}: {how}"
    if oom:
        raise step_out_of_memory(step, args, cfg, recipe, model, device, state, how)
    if lost_image is not None:
        raise type(lost_image)(f"step {step + 1}: {lost_image}; {held} that fixed")
    if hung is not None:  # (one process) as after SIGTERM: requeued, the job goes on
        if args.requeue:
            requeue(say_out)  # (also with --quiet: the job's fate)
        raise WorkersHung(
            f"step {step + 1}: {hung}; {last_save(dd, saved, out / 'last.pt', before)}"
        )
    not_saved = (f"step {step}: the parameters are not finite, {out / 'last.pt'} not written; "
                 f"{state}" if declined is not None else "")  # fmt: skip
    return finish(stopped, step, steps, skipped, out, args, dd, say,
                  run_log.lost or run_log.unwritten if run_log else "", result,
                  not_saved)  # fmt: skip


def resolve_run(args: TrainArgs, rest: list[str], given: set[str]):
    """(run folder, checkpoint path, resumed checkpoint or None, model config, the model
    flags typed (`named`), recipe).

    A resumed run takes its model from the checkpoint (`args.model` is set) and its config; model
    flags repeated by a requeued job must agree with it. Its run flags that are not `given` take
    the checkpoint's values (`inherit_flags`). Unset run flags of a new run take the recipe."""
    out = Path(args.out or f"runs/{args.model or 'run'}_x{args.scale}")
    ckpt_path = {"": None, "auto": out / "last.pt"}.get(args.resume, Path(args.resume))
    if args.resume == "auto" and not ckpt_path.exists() and (out / "best.pt").is_file():
        ckpt_path = out / "best.pt"  # killed before its first last.pt: not a new run over best.pt
    resumed = None
    if ckpt_path is not None and ckpt_path.is_file():
        try:
            resumed = read_checkpoint(ckpt_path)
        except CheckpointError as e:  # a last.pt broken by a copy: best.pt may be whole
            best = out / "best.pt"
            if args.resume != "auto" or ckpt_path == best or not best.is_file():
                raise
            raise CheckpointError(f"{e}; or continue from {best}: move {ckpt_path.name} out of "
                                  "the folder and rerun with --resume auto") from None  # fmt: skip
        if "optimizers" not in resumed:
            raise CheckpointError(f"{ckpt_path}: holds weights only, no training state to resume")
        checkpoint_config(resumed, ckpt_path)  # a newer srspace's: one line, not a flag error
        inherit_flags(args, given, resumed)
        if args.model and args.model != resumed["model"]:
            raise CheckpointError(
                f"{ckpt_path}: is a run of {resumed['model']!r}, not {args.model!r}"
            )
        if resumed["model_cfg"]["scale"] != args.scale:
            raise CheckpointError(
                f"{ckpt_path}: is a x{resumed['model_cfg']['scale']} run, not --scale {args.scale}"
            )
        args.model = resumed["model"]
        if not args.out and args.resume != "auto":  # the default folder of its model and scale
            out = Path(f"runs/{args.model}_x{args.scale}")
        last = out / "last.pt"
        if last.is_file() and not last.samefile(ckpt_path):  # never overwrite another run
            raise UsageError(
                f"--resume {ckpt_path}: {out} holds another checkpoint (last.pt), which this run "
                "would overwrite; give --out a new folder"
            )
    elif args.resume not in ("", "auto"):
        said = describe_path(ckpt_path, "file", example="last.pt")  # (missing, a link to nothing)
        if ckpt_path.is_dir():  # the run folder given for its checkpoint: or its run resumed
            said += f", or --resume auto --out {shell_quote(args.resume)}"
        raise CheckpointError(f"--resume {args.resume}: {said}")
    elif held := [name for name in ("last.pt", "best.pt") if (out / name).is_file()]:
        raise UsageError(
            f"{out} already holds a run ({held[0]}); pass --resume auto to continue it or a new "
            "--out"
        )
    if args.lr_data and len(args.lr_data) != len(args.data):
        raise UsageError(
            f"--lr-data: {len(args.lr_data)} folders for {len(args.data)} --data folders; give "
            "one LR folder per HR folder"
        )
    degrading = [flag for flag, _ in degradation_flags(args)]
    if degrading and args.lr_data and args.data != ["demo"]:  # (demo: --lr-data is ignored)
        raise UsageError(
            f"{degrading[0]}: makes the LR from the HR, but --lr-data gives the LR images; drop one"
        )
    if not args.model:  # a new run, also of --resume auto in a folder without a checkpoint
        where = f" (--resume auto: {out} holds no checkpoint to take it from)" * bool(args.resume)
        raise UsageError(f"--model: a new run needs one{where}; choose one of {', '.join(MODELS)}")
    if args.model not in MODELS:
        raise unknown_model(args.model)
    model_cls = MODELS[args.model]
    if args.scale not in model_cls.scales:
        raise UsageError(f"--scale {args.scale}: {args.model} supports {scale_list(model_cls)}")
    model_flags = parse(model_cls.Config, rest, f"{PROG} --model {args.model}", near=TrainArgs)
    check_ranges(model_flags)
    cfg = {**asdict(model_flags), "scale": args.scale}
    named = given_fields(model_cls.Config, rest, f"{PROG} --model {args.model}")
    refuse_empty(model_flags, named, {k: v for k, v in MODEL_EMPTY_REFUSED.items() if k in cfg})
    if resumed is not None:  # a requeued job repeats its flags: allowed if they agree
        # the run's config as it builds: a field its (older) checkpoint lacks takes its default
        held = asdict(model_cls.Config(**resumed["model_cfg"]))
        order = [f.name for f in fields(model_cls.Config)]  # (as -h lists them)
        if changed := [k for k in order if k in named and cfg[k] != held.get(k)]:
            said = ", ".join(f"{model_flag(model_cls, k, cfg[k])} "
                             f"(was {model_flag(model_cls, k, held.get(k), bare=True)})"
                             for k in changed)  # fmt: skip
            raise UsageError(f"{ckpt_path}: a resume cannot change model flags: {said}; drop "
                             "them (it takes the run's), or give a new --out")  # fmt: skip
        cfg = dict(resumed["model_cfg"])
    # by the run's config: a resume's is its checkpoint's, not the flags repeated
    warn_unused(model_cls, model_cls.Config(**cfg), named)
    consistent = model_cls.input_consistency(model_cls.Config(**cfg))
    if degrading and consistent:  # trained as asked, but against the flags' purpose
        warnings.warn(
            f"{', '.join(degrading)} with {' and '.join(consistent)}: each SR's bicubic downscale "
            "is made to match the LR input, which assumes LR = bicubic(HR); it pulls the SR "
            "toward the input's blur, noise or JPEG artefacts",
            stacklevel=2,
        )
    recipe = parse_recipe(args, model_cls.recipe(args.scale))
    warn_unused_run(args, given, recipe, model_cls)
    if resumed is not None and recipe.steps < resumed["step"]:
        raise UsageError(
            f"--steps {recipe.steps}: {ckpt_path} is at step {resumed['step']} already; give "
            f"--steps {resumed['step']} or more to continue it"
        )
    return out, ckpt_path, resumed, cfg, named, recipe


def degradation(args: TrainArgs) -> Degradation | None:
    """The run's --lr-blur, --lr-noise, --lr-jpeg (checked by parse_all), None where none is set."""
    return degradation_of(args) or None


def warn_unused(model_cls, cfg, named: set[str]) -> None:
    """One warning line for each model flag given that has no effect with the others (the σ
    branch's without --loss le, a discriminator's at --lambda-adv 0, ...): not an error, as a
    script that varies one flag may keep the others, but never silently ignored."""
    unused = model_cls.unused_flags(cfg)
    for f in fields(cfg):
        if f.name in named and f.name in unused:
            off = f.default is True and getattr(cfg, f.name) is False  # --no-X, not --X
            flag = f"--{'no-' if off else ''}{f.name.replace('_', '-')}"
            warnings.warn(f"{flag}: no effect {unused[f.name]}; ignored", stacklevel=2)


def warn_unused_run(args: TrainArgs, given: set[str], recipe: Recipe, model_cls) -> None:
    """One warning line for each run flag typed that has no effect with the others, as
    `warn_unused` for the model's (a job script that varies one flag may keep the others)."""
    typed = [f"--{k.replace('_', '-')}" for k in NO_PARAMETERS if k in given]
    if typed and not model_cls.learns:  # one line for them all, not theirs below
        warnings.warn(f"{', '.join(typed)}: no effect, the {args.model} model has nothing to "
                      "train; ignored", stacklevel=2)  # fmt: skip
    if model_cls.learns and recipe.warmup > recipe.steps > 0:  # a short try of a long run's
        # command line is fine: trained as asked, but the rate given is never reached
        warnings.warn(f"--warmup {recipe.warmup}: longer than the run (--steps {recipe.steps}); "
                      f"its last step takes {recipe.steps / recipe.warmup:.0%} of the learning "
                      "rate", stacklevel=2)  # fmt: skip
    unused = {}
    if args.data == ["demo"]:  # built in: held in memory, its LR the bicubic downscale of its HR
        unused |= dict.fromkeys(("lr_data", "cache"), "with --data demo (its LR is made from its "
                                "HR, and it is held in memory)")  # fmt: skip
    if args.on_nan != "rollback":
        unused["max_rollbacks"] = "without --on-nan rollback"
    if recipe.schedule != "multistep":  # the decay points and factor of a multistep schedule
        why = f"with the {args.model} recipe's {recipe.schedule} learning-rate schedule"
        unused |= dict.fromkeys(("milestones", "gamma"), why)
    elif not recipe.milestones:
        unused["gamma"] = "without --milestones (no decay)"
    why = no_validation(args, recipe.steps)
    if why in ("no --val-data", "--val-every 0"):  # (--steps 0: a run that checks its setup)
        # (not the flag that turns it off, nor a --val-every 0 that asks for what happens)
        agree = {"val_data"} if why == "no --val-data" else set()
        agree |= {"val_every"} if args.val_every <= 0 else set()
        unused |= {k: f"without validation ({why})" for k in VAL_FLAGS if k not in agree}
    elif not model_cls.stochastic:  # its validation samples are the same, whatever these
        why = f"with the deterministic {args.model} model (its samples are identical)"
        unused |= dict.fromkeys(("val_n", "val_temperature"), why)
    unused = {k: v for k, v in unused.items() if model_cls.learns or k not in NO_PARAMETERS}
    for name in [f.name for f in fields(TrainArgs) if f.name in given and f.name in unused]:
        warnings.warn(f"--{name.replace('_', '-')}: no effect {unused[name]}; ignored",
                      stacklevel=2)  # fmt: skip


# The optimisation flags, which a model without parameters (bicubic) has no use for.
NO_PARAMETERS = ("learning_rate", "d_learning_rate", "milestones", "gamma", "grad_clip", "warmup",
                 "amp", "compile", "ema")  # fmt: skip
VAL_FLAGS = ("val_data", "val_images", "val_crop", "val_n", "val_temperature", "val_every",
             "keep_strips")  # fmt: skip


def no_validation(args: TrainArgs, steps: int) -> str | None:
    """Why the run validates nothing (and so writes no best.pt); None where it validates.
    `steps`: the run's (its recipe's where --steps is unset: bicubic's are 0)."""
    if not validation_source(vars(args)):
        return "no --val-data"
    if args.val_every <= 0:
        return "--val-every 0"
    if steps == 0:
        return "--steps 0" if args.steps == 0 else f"the {args.model} recipe has no steps"
    return None


# Flags of this invocation, not of the run: a resumed run does not take them from its checkpoint.
# (Switches that have one form only, --tensorboard, --deterministic, --no-requeue, are too: a
# resume could not turn them off.)
LOCAL_FLAGS = ("model", "out", "resume", "init_from", "device", "workers", "compile", "cuda_graphs",
               "time_budget", "tensorboard", "deterministic", "requeue", "quiet",
               "json")  # fmt: skip
# Unset run flags as checkpoints wrote them before they became None (srspace 0.2.0 before its
# Recipe): -1, 0, 0.0, []. Those marked are out of range today, so they tell such a checkpoint.
LEGACY_UNSET = {
    "steps": -1,
    "batch": 0,
    "patch": 0,
    "learning_rate": 0.0,
    "d_learning_rate": 0.0,
    "milestones": [],
    "gamma": 0.0,
    "grad_clip": -1.0,
    "val_temperature": -1.0,
}
LEGACY_MARKS = ("steps", "batch", "patch", "grad_clip", "val_temperature")  # fmt: skip


def inherit_flags(args: TrainArgs, given: set[str], resumed: dict) -> None:
    """A resumed run goes on as the run it continues: each run flag it is not given (but those of
    LOCAL_FLAGS) takes the value the checkpoint's run had (`train_args`), so that a resume
    typed without the first command line's flags keeps its batch, learning rate, seed, data,
    steps, weight average... Given flags win (`changed_flags` lists them)."""
    before = run_flags(resumed)
    for f in fields(TrainArgs):
        if f.name not in given and f.name not in LOCAL_FLAGS and f.name in before:
            setattr(args, f.name, before[f.name])
    if "data" in given and "lr_data" not in given:  # LR folders pair with the HR folders given
        args.lr_data = []
    check_ranges(args)


def model_flag(model_cls, name: str, value, bare: bool = False) -> str:
    """A model Config field's value as the flag that gives it: "--nb 3", a switch "--lu" or
    "--no-unused-conv" (off where it is on by default), "no --lu" (a switch off by default).
    bare: a value other than a switch's without its flag, "3"."""
    flag = "--" + name.replace("_", "-")
    if bare and not isinstance(value, bool):
        return model_flag(model_cls, name, value).removeprefix(flag + " ")
    if isinstance(value, bool):
        on = next((f.default for f in fields(model_cls.Config) if f.name == name), False)
        if value:
            return flag
        return f"--no-{flag[2:]}" if on is True else f"no {flag}"
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(map(str, value))}"
    return f"{flag} {value}"


def run_flags(resumed: dict) -> dict:
    """The run flags a checkpoint's run had, None where unset (also in an older checkpoint)."""
    before = dict(resumed.get("train_args", {}))
    if any(before.get(k) == LEGACY_UNSET[k] for k in LEGACY_MARKS):
        before.update({k: None for k, v in LEGACY_UNSET.items() if before.get(k) == v})
    if before:  # a run saved before the degradation flags existed trained without them
        before.update({k: before.get(k, "") for k in DEGRADATION_FLAGS})
    return before


def changed_flags(args: TrainArgs, resumed: dict) -> list[str]:
    """The run flags a resumed run was given with other values than its checkpoint's run had, as
    `--flag value (was value)` (--ema: `ema_change` says what happens to the average)."""
    before = run_flags(resumed)

    def shown(v):  # (an empty text flag is unset too; an empty list, --milestones alone: none)
        if isinstance(v, list):
            return " ".join(map(str, v)) or "none"
        return "unset" if v is None or v == "" else str(v)

    return [
        f"--{f.name.replace('_', '-')} {shown(getattr(args, f.name))} (was {shown(before[f.name])})"
        for f in fields(TrainArgs)
        if f.name not in (*LOCAL_FLAGS, "ema") and f.name in before
        and getattr(args, f.name) != before[f.name]
    ]  # fmt: skip


def schedule_moved(args: TrainArgs, recipe: Recipe, resumed: dict, start: int) -> str | None:
    """What a resume with another --steps does to the learning rate: the milestones (and a
    cosine) are fractions of --steps, so a longer run put the rate of its step `start` back up
    (EDSR at step 250k of 300k, rate 5e-5 after one halving at 200k, resumed with --steps 400000:
    1e-4 again until step 266,667), with no sign but "changed flags". None where the rate at
    `start` is the one the checkpoint's run would have used."""
    before, paper = run_flags(resumed), MODELS[args.model].recipe(args.scale)
    was = before.get("steps") if before.get("steps") is not None else paper.steps
    if was == recipe.steps or not recipe.steps or not was:
        return None
    # the checkpoint run's schedule: its length and milestones, this run's rates (a changed
    # --learning-rate or --gamma is said by "changed flags", and meant)
    milestones = before.get("milestones")
    milestones = paper.milestones if milestones is None else tuple(milestones)
    ran = replace(recipe, steps=was, milestones=milestones)
    now, then = learning_rate_at(start, recipe), learning_rate_at(start, ran)
    if math.isclose(now, then, rel_tol=1e-9):
        return None
    keep = ""
    if recipe.schedule != "cosine" and ran.milestones:
        same = " ".join(f"{m * was / recipe.steps:.6g}" for m in ran.milestones)
        keep = f"; to keep the schedule of the first {was} steps, give --milestones {same}"
    return (
        f"--steps {recipe.steps} (was {was}): the learning rate at step {start} is "
        f"{now:.4g}, not {then:.4g}, as the schedule is fractions of --steps{keep}"
    )


def validation_changes(args: TrainArgs, resumed: dict) -> list[str]:
    """The flags that make a resumed run's validation PSNR another measure than its checkpoint's
    run had (other images, crops; a stochastic model's sample count, temperature, seeds), as
    --flag names: the checkpoint's best PSNR (`best`) does not compare with its scores. (An
    older checkpoint without its run flags: none.)"""
    before = run_flags(resumed)
    if not before:
        return []
    names = ["val_images", "val_crop", *DEGRADATION_FLAGS]  # (the latter: other LR inputs)
    if MODELS[args.model].stochastic:
        names += ["val_n", "val_temperature", "seed"]
    changed = [n for n in names if n in before and getattr(args, n) != before[n]]
    if not same_source(validation_source(before), validation_source(asdict(args))):
        changed.insert(0, "val_data")
    return [f"--{n.replace('_', '-')}" for n in changed]


def later_best(out: Path, ckpt_path: Path, start: int, args: TrainArgs) -> tuple | None:
    """(step, PSNR) of OUT/best.pt where it was written after the checkpoint a run resumes (at
    step `start`) with the validation of this run, else None. A run that stopped without saving
    (kill -9, a node lost: no signal) may have written best.pt after its last last.pt, whose
    record of the best is older: the resumed run's next validation that beat that record, not
    best.pt's, replaced a better best.pt with a worse one. (Read only where best.pt's file is
    newer than the checkpoint's: best.pt is written before last.pt at a step of both.)"""
    path = out / "best.pt"
    try:
        if ckpt_path == path or path.stat().st_mtime_ns <= ckpt_path.stat().st_mtime_ns:
            return None
        ck = read_checkpoint(path)
    except (OSError, CheckpointError):  # none, or broken: the next validation writes it
        return None
    if ck.get("step", 0) <= start or validation_changes(args, ck) or "best" not in ck:
        return None
    return ck["step"], ck["best"]


def best_pt_step(out: Path, resumed: dict | None, best: float) -> int | None:
    """The step of the validation that made best.pt (whose strips --keep-strips keeps): the
    resumed checkpoint's record, or where it has none (srspace 0.2.0 wrote none), best.pt's
    own step; None without a best."""
    if resumed is None or best == -math.inf:
        return None
    if "best_step" in resumed:
        return resumed["best_step"]
    try:
        return read_checkpoint(out / "best.pt")["step"]
    except (OSError, CheckpointError, KeyError):  # none, or broken: no strips to keep for it
        return None


def validation_source(flags: dict) -> str:
    """The validation images of a run with these run flags: --val-data, else demo's when
    training on demo ("" for none)."""
    return flags.get("val_data") or ("demo" if flags.get("data") == ["demo"] else "")


def same_source(a: str, b: str) -> bool:
    """Whether two validation sources are one folder (under any name: a requeued job's path
    typed otherwise)."""
    if a == b:
        return True
    try:
        return "demo" not in (a, b) and "" not in (a, b) and os.path.samefile(a, b)
    except OSError:  # one gone (moved): another folder, as far as can be told
        return False


def parse_recipe(args: TrainArgs, recipe: Recipe) -> Recipe:
    """The model's recipe with every run flag that was given (not None) in its place."""
    milestones = None if args.milestones is None else tuple(args.milestones)
    given = dict(steps=args.steps, batch=args.batch, patch=args.patch,
                 learning_rate=args.learning_rate, d_learning_rate=args.d_learning_rate,
                 milestones=milestones, gamma=args.gamma, grad_clip=args.grad_clip,
                 warmup=args.warmup)  # fmt: skip
    return replace(recipe, **{k: v for k, v in given.items() if v is not None})


def scaled_rates(recipe: Recipe, factor: float) -> Recipe:
    """The recipe with every learning rate (generator, discriminator, cosine floor) x factor."""
    return replace(recipe, learning_rate=recipe.learning_rate * factor,
                   d_learning_rate=recipe.d_learning_rate * factor,
                   eta_min=recipe.eta_min * factor)  # fmt: skip


def setup_process(args: TrainArgs, cleanup) -> tuple[distributed.Dist, torch.device]:
    """One process, or one per GPU/CPU slot under torchrun/srun; its device and threads; seeded
    RNGs."""
    threads = torch.get_num_threads()
    cleanup.callback(torch.set_num_threads, threads)  # main() may be called again in a process
    torch.set_num_threads(thread_count(threads, os.environ, available_cores()))
    device = pick_device(args.device)
    dd = distributed.setup(use_cuda=device.type == "cuda")
    if dd.on and device.type == "cuda":
        device = torch.device("cuda", dd.local_rank)
    keep_determinism(cleanup)  # the caller's again after main(), as the thread count
    if args.deterministic:
        set_deterministic()
    elif device.type == "cuda":
        # Training patches have one shape: cuDNN times its algorithms once per shape and keeps
        # the fastest (the released SRFlow training does the same; --deterministic turns it off).
        torch.backends.cudnn.benchmark = True
    why = compile_blocker(device) if args.compile else None
    if why:
        raise UsageError(f"--compile: torch.compile cannot build kernels here: {why}; or drop "
                         "--compile")  # fmt: skip
    if args.amp == "fp16" and device.type not in FP16_DEVICES:
        raise UsageError(f"--amp fp16 needs a CUDA device (got {device}); on a CPU use --amp bf16")
    if args.cuda_graphs:
        why = ("needs a CUDA device (got {device})" if device.type not in GRAPH_DEVICES else
               "runs in one process (drop it under torchrun/srun)" if dd.on else
               "does not take --amp fp16 (its loss scaler steers from the host); use --amp bf16"
               if args.amp == "fp16" else "")  # fmt: skip
        if why:
            raise UsageError(f"--cuda-graphs {why.format(device=device)}")
    emulated = amp_emulated(args.amp, device) if dd.main else None
    if emulated:  # it still runs, only slower than float32: say so once, do not refuse
        print(f"{PROG}: warning: --amp {args.amp}: {emulated}", file=sys.stderr)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    return dd, device


# Flags that may differ from rank to rank: a node's own device, loader processes and scratch
# folders (the training images in --data / --lr-data are compared by name instead); --val-data
# is rank 0's alone.
RANK_FLAGS = ("device", "workers", "cache", "data", "lr_data", "val_data")


def check_same_run(args: TrainArgs, cfg: dict, resumed: dict | None, dd) -> None:
    """Every rank runs the run of rank 0: the same run flags (after a resume's inheritance), model
    config and checkpoint step. A multi-node script that passes one node other flags by mistake
    made a rank with another --steps, --save-every or --sync-check-every wait in a collective the
    others never joined (the process group's timeout, 30 minutes, then a traceback), and one with
    another --batch or learning rate train silently on. One line on every rank, exit 2."""
    if not dd.on:
        return
    mine = {f"--{k.replace('_', '-')}": v for k, v in asdict(args).items() if k not in RANK_FLAGS}
    mine.update({f"--{k.replace('_', '-')}": v for k, v in cfg.items()})
    mine["the resumed step"] = resumed["step"] if resumed is not None else "none"
    runs = distributed.gather_objects(mine, dd)
    differ = [
        f"{k} {v} on rank {r} (rank 0: {runs[0].get(k)})"
        for r, run in enumerate(runs)
        for k, v in run.items()
        if runs[0].get(k) != v
    ]
    if differ:
        raise UsageError(f"the processes were given other flags than rank 0: {', '.join(differ)}; "
                         "give every process the same command line")  # fmt: skip


def thread_count(current: int, env, cores: int) -> int:
    """Intra-op threads: SLURM_CPUS_PER_TASK, else the cores this process may run on shared by
    this node's processes (torchrun's LOCAL_WORLD_SIZE); never more than those cores (threads
    beyond them only spin-wait) nor than torch's `current` count (its default follows
    OMP_NUM_THREADS; a caller may have lowered it). Loader workers run one thread each
    (sr_lib/data.py)."""
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return max(1, min(int(slurm), cores, current))
    return max(1, min(cores // max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1)), current))


@contextlib.contextmanager
def open_run_folder(out: Path, tensorboard: bool, dd, resumed_step: int | None = None):
    """Rank 0: the run folder, proved writable (exit 7) and locked for this run (exit 2 while
    another run holds it), temp files of a process killed while saving removed, the log cut
    back to the checkpoint's step (`trim_log`; a new run's to nothing); yields its RunLog
    (None on the other ranks). Every rank learns whether rank 0 succeeded, so none is left
    waiting for it. A new OUT this run made, left before its first record by an error or a
    stop (an image deleted or a --data folder changed between the listing and the read, a
    --val-data image unreadable, a signal while decoding), is removed (`unmake_run_folder`)."""
    error, lock, run_log, failed = None, None, None, False
    made = dd.main and not os.path.exists(out)  # (a link to a folder not made yet: made here)
    try:
        if dd.main:
            for _ in range(3):
                try:
                    lock = lock_run_folder(check_out_dir(out))
                    break
                except FileNotFoundError:  # OUT removed between the two (a traceback): by a run
                    made = True  # that had made it and failed (`unmake_run_folder`). Made again
            else:
                raise OutputError(f"--out {out}: removed again each time this run made it "
                                  "(by another process?); rerun")  # fmt: skip
            stale = list(out.glob(".*.pt.tmp*"))
            for name in ("last.pt", "best.pt"):  # else found at the first save, steps later
                if (out / name).is_dir():
                    raise OutputError(f"--out {out}: {out / name} is a folder, where this run "
                                      "saves its checkpoint; move it away")  # fmt: skip
                if (real := write_target(out / name)) != out / name:  # a link: its target's
                    check_out_dir(real.parent, f"--out {out}: {name} is a link into")
                    stale += real.parent.glob(f".{glob.escape(real.name)}.tmp*")  # temp files
            for path in stale:
                path.unlink(missing_ok=True)
            # A new run (no checkpoint here: resolve_run refused one over them) starts its log
            # afresh: one killed before its first save left records that this run would repeat.
            start = 0 if resumed_step is None else resumed_step
            trim_log(out / "log.jsonl", start)
            run_log = RunLog(out, tensorboard, start)
    except SRSpaceError as e:
        error = e
    try:
        if not distributed.agree(error is None, dd):
            raise error or OutputError(f"--out {out}: rank 0 cannot use the run folder")
        yield run_log
    except BaseException as e:
        failed = e
        raise
    finally:
        if run_log is not None:
            run_log.close()
        if made and failed and lock is not None:  # (before the lock is let go: no run there)
            unmake_run_folder(out, unsaved=isinstance(failed, OutputError))
        if lock is not None:
            os.close(lock)


def unmake_run_folder(out: Path, unsaved: bool = False) -> None:
    """Remove the run folder OUT that this run made, where it holds nothing of a run: its .lock,
    an empty log.jsonl, and with --tensorboard tb/ of event files without a record. It was left
    as a run folder of nothing, a folder to clean up by hand for a wrong --data (the same
    command rerun started cleanly, and does). `unsaved`: the run failed to write its output (a
    full disk) before any checkpoint, so its steps logged are of no run either (a rerun there
    starts afresh and cuts them, `trim_log`): removed too, the disk's space with them. Anything
    else there (a step logged by a run that ended otherwise, whose records may say why, e.g. a
    loss gone NaN; a checkpoint; a file put there meanwhile): all of it stays."""
    real = Path(os.path.realpath(out))
    try:
        names = set(os.listdir(real))
        logged = (real / "log.jsonl").stat().st_size  # (none: not ours to judge, kept)
        if not names <= {".lock", "log.jsonl", "tb"} or (logged and not unsaved):
            return
        tb = os.listdir(real / "tb") if "tb" in names else []
        if any(not name.startswith("events.out.tfevents.") for name in tb):
            return  # (tb/val/: strips of a validation, after steps)
        for name in tb:
            (real / "tb" / name).unlink()
        if "tb" in names:
            (real / "tb").rmdir()
        # .lock last, held till then: a run that takes the folder once it is gone makes its own
        # log.jsonl (the empty one, opened for its records, went with the next removal)
        for name in sorted(names - {"tb"}, key=lambda name: name == ".lock"):
            (real / name).unlink()
        real.rmdir()  # (not empty: that run's, left to it)
    except OSError:  # (a file made meanwhile, a folder not ours to change: left as it is)
        pass


def lock_run_folder(out: Path) -> int:
    """An advisory lock on OUT/.lock for as long as this process runs: a second sr_train.py on
    the same folder would interleave log.jsonl and overwrite last.pt. The kernel drops the lock
    when the process ends, however it ends (kill -9 too): none is left stale.

    A POSIX record lock (lockf), which belongs to this process alone, not a flock, which belongs
    to the open file: the loader's workers, forked from this process, shared that, and after a
    kill -9 of this process alone they held the folder until they noticed (seconds), so that
    --resume auto at once was refused. (Such a lock is dropped when this process closes any
    descriptor of the file: nothing else here opens it.)"""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):  # held by another process
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                f"--out {out}: another sr_train.py is using this run folder ({holder}); wait for "
                "it to end or give another --out"
            ) from None
        # a file system without locks (some network mounts): run unlocked
        warnings.warn(f"--out {out}: cannot lock the run folder ({e.strerror or e}); a second "
                      "run on it would not be noticed", stacklevel=2)  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def trim_log(path: Path, step: int) -> None:
    """At a resume from a checkpoint of `step`, OUT/log.jsonl keeps its complete records up to
    that step, rewritten atomically. A run killed (kill -9, a lost node) has logged the steps
    after its last save, which the resumed run logs again, and may have left its last line half
    written, onto which the next record was appended (a line that no longer parses). So lines
    that do not parse go, and the records of steps after `step` are cut from the end back: a
    --on-nan rollback's row and the steps it repeats stay where the checkpoint came after it,
    and go with the steps it abandoned where the checkpoint is the one it went back to."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    lines = text.split("\n")[:-1]  # what follows the last newline is a torn record

    def parses(line: str) -> bool:
        try:
            return isinstance(json.loads(line), dict)
        except ValueError:
            return False

    kept = [line for line in lines if parses(line)]
    while kept and json.loads(kept[-1]).get("step", 0) > step:
        kept.pop()
    trimmed = "".join(line + "\n" for line in kept)
    if trimmed != text:
        write_text(path, trimmed)


def run_folder_id(out: Path) -> tuple:
    """(device, inode) of the run folder and of its lock file: which folder it is."""
    return tuple((st.st_dev, st.st_ino) for st in (os.stat(out), os.stat(out / ".lock")))


def check_run_folder(out: Path, folder: tuple | None, step: int) -> None:
    """Rank 0 (`folder` None elsewhere), before the run writes to OUT: it is still the folder
    this run locked (`run_folder_id`). One deleted or moved meanwhile (a clean-up of old runs)
    took the run with it: the log went on into a deleted file, a checkpoint made a new folder
    holding itself alone, and a second run there was not kept out by the lock. Stop instead."""
    if folder is None:
        return
    try:
        now = run_folder_id(out)
    except OSError:  # gone
        now = None
    if now != folder:
        raise OutputError(
            f"--out {out}: the run folder was deleted or moved away while this run used it "
            f"(seen at step {step}); stopped without writing there: a moved folder continues "
            "from its new place with --resume auto"
        )


class RunLog:
    """The record of a run (rank 0): OUT/log.jsonl, one JSON object per line, the source of
    truth; with --tensorboard also every logged number and the validation strips in OUT/tb/.

    A record that cannot be written (a full disk) is not written at all: the file is cut back
    to the end of the record before it. Then `lost` says why, later records are dropped, and
    the run stops as on SIGTERM (`stop`, set by `train`): it saves last.pt, then exits 7. So
    does a validation strip that cannot be written (`unwritten`: why; the log goes on)."""

    def __init__(self, out: Path, tensorboard: bool, start: int = 0):
        self.tb, self.lost, self.unwritten, self.stop = None, "", "", {}
        self.out, self.strips, self.strips_step = out, None, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install "
                                 "tensorboard") from None  # fmt: skip
            shown = printable(str(out))
            if shown != str(out):  # TensorBoard encodes its folder's name strictly
                raise UsageError(f"--tensorboard: TensorBoard cannot write to {shown} (a folder "
                                 "name that is not UTF-8); give another --out")  # fmt: skip
            # TensorBoard hides what an earlier process logged for steps after `start` (a run
            # killed after its last save, one that saved none), as trim_log cuts log.jsonl: it
            # would show two values at each of those steps.
            self.tb = SummaryWriter(str(out / "tb"), purge_step=start + 1)
            # (the strips' own files, `image`: those of the steps after `start` go likewise,
            # and one a killed run left half written)
            for step, path in tb_strip_files(out):
                if step > start:
                    path.unlink(missing_ok=True)
            for path in (out / "tb" / "val").glob(".step*.tmp"):
                path.unlink(missing_ok=True)
        self.path = out / "log.jsonl"
        self.file = open(self.path, "ab", buffering=0)  # each record one write(): no buffer

    def write(self, record: dict) -> None:
        if self.lost:
            return
        # Strict JSON: json.dumps writes NaN and Infinity as bare tokens that JSON.parse, Go and
        # serde_json refuse; a skipped step's NaN loss is the string "nan" ("inf", "-inf").
        strict = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}  # fmt: skip
        line = (json.dumps(strict, allow_nan=False) + "\n").encode()
        end = os.fstat(self.file.fileno()).st_size  # where the last whole record ends
        try:
            done = 0
            while done < len(line):  # a disk that fills takes a part, and fails at the next
                done += self.file.write(line[done:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.file.fileno(), end)  # no torn record for a reader or a resume
            self.lost = self.stop["signal"] = f"{self.path}: cannot write ({e.strerror or e})"
            return
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def strip_unwritten(self, why: str) -> None:
        """A validation strip that cannot be written (a full disk): the run stops as for a log
        record, saving last.pt first (it ended at once, the steps since the last save lost)."""
        self.unwritten = self.unwritten or why
        self.stop["signal"] = self.lost or self.unwritten

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) image; TensorBoard only (log.jsonl has the PNG's name in OUT/val/).
        Each validation's strips go to an event file of their own in OUT/tb/val/ (TensorBoard's
        run "val"), which --keep-strips deletes with the PNGs (`prune_strips`): in the one file
        of the numbers, a long run's strips grew it without end (docs/benchmarks.md). Written
        under a name TensorBoard does not read, renamed once whole (`end_strips`), named by the
        step: TensorBoard reads a run's files in their names' order, each once complete."""
        if self.tb is None or self.unwritten:  # (after one failed, the others would too)
            return
        try:
            self._image(tag, img, step)
        except OSError as e:  # a full disk: as a PNG strip, saved, then exit 7
            self.end_strips(whole=False)
            self.strip_unwritten(f"{self.out / 'tb' / 'val'}: cannot write ({e.strerror or e})")

    def _image(self, tag: str, img: np.ndarray, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import image

        if self.strips_step != step:  # the validation's first strip
            self.end_strips(whole=False)
            folder = self.out / "tb" / "val"
            folder.mkdir(parents=True, exist_ok=True)
            self.strips = RecordWriter(open(folder / f".step{step:012d}.tmp", "wb"))
            self.strips_step = step
            self.strips.write(Event(wall_time=time.time(), step=step,
                                    file_version="brain.Event:2").SerializeToString())  # fmt: skip
        # a tag is UTF-8: a file name that is not gets backslash escapes
        summary = image(printable(tag), img, dataformats="HWC")
        self.strips.write(Event(wall_time=time.time(), step=step,
                                summary=summary).SerializeToString())  # fmt: skip
        self.strips.flush()

    def end_strips(self, whole: bool = True) -> None:
        """The validation's strips are all written (`whole`): their event file takes its name.
        Else (a validation stopped by a signal, done again on resume) it is deleted."""
        if self.strips is None:
            return
        folder = self.out / "tb" / "val"
        temp = folder / f".step{self.strips_step:012d}.tmp"
        try:
            self.strips.close()
            if whole:
                os.replace(temp, folder / f"events.out.tfevents.{self.strips_step:012d}.strips")
        except OSError as e:  # (as `image`)
            whole = False
            self.strip_unwritten(f"{temp}: cannot write ({e.strerror or e})")
        finally:
            self.strips, self.strips_step = None, None
        if not whole:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.end_strips(whole=False)
            self.tb.close()


TB_STRIPS = re.compile(r"events\.out\.tfevents\.(\d{12,})\.strips")


def tb_strip_files(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of the validations' TensorBoard event files in OUT/tb/val/ (`RunLog.image`)."""
    try:
        names = os.listdir(out / "tb" / "val")
    except OSError:  # none yet
        return []
    return [(int(m[1]), out / "tb" / "val" / name) for name in names
            if (m := TB_STRIPS.fullmatch(name))]  # fmt: skip


def log(run_log: RunLog | None, record: dict) -> None:
    """One record of the run's log (rank 0; the other ranks have none)."""
    if run_log is not None:
        run_log.write(record)


def check_folder(flag: str, folder: str) -> None:
    """A folder flag's value that is no folder of images (a typo, a file, a folder without
    images): `list_images`' one line, with the flag, which says which of a run's folders is
    wrong (--data, --lr-data, --val-data), and the folder or built-in 'demo' (not --lr-data's)
    meant where one is near in spelling."""
    try:
        check_image_folder(folder, builtins=() if flag == "--lr-data" else ("demo",))
    except DataError as e:
        raise DataError(f"{flag} {e}") from None


def check_run_data(args: TrainArgs, out: Path, steps: int, dd) -> None:
    """`check_data_folders` before rank 0 makes the run folder. With several processes every rank
    checks its own --data and --lr-data (each node may read its own copy: RANK_FLAGS), rank 0
    its --val-data (read by rank 0 alone), and they agree first: one rank's missing folder was
    found only as it decoded its images, after rank 0 had made OUT/, with no flag named, and
    left the others "lost contact", exit 75. Every rank says the line of the first rank that
    failed, and which rank that was, with its exit code."""
    error = None
    try:
        check_data_folders(args, out, steps, validation=dd.main)
    except SRSpaceError as e:
        if not dd.on:
            raise
        error = e
    if not dd.on:
        return
    failed = distributed.gather_objects(error and (type(error), str(error)), dd)
    for rank, got in enumerate(failed):
        if got is not None:
            kind, message = got
            raise kind(f"rank {rank}: {message}") from None


def check_data_folders(args: TrainArgs, out: Path, steps: int, validation: bool = True) -> None:
    """A --data, --lr-data or --val-data folder that is not there or holds no image: its one
    line before the run folder is made (a typo left an OUT/ holding only .lock and an empty
    log.jsonl; --val-data's was found after the training images were decoded). An --out inside
    one of them: exit 2. `validation`: whether --val-data is checked (rank 0's alone). A --cache
    that cannot be a folder (a file, or one on its way): exit 7 here too, not after OUT/ is
    made (`training_data` makes the cache folder)."""
    if "demo" in args.data and args.data != ["demo"] and not Path("demo").exists():
        raise UsageError("--data demo: the built-in images are given alone, not with folders")
    folders = [("--data", f) for f in args.data if args.data != ["demo"]]
    folders += [("--lr-data", f) for f in args.lr_data]
    if validation and not no_validation(args, steps) and validation_source(vars(args)) != "demo":
        folders.append(("--val-data", args.val_data))
    for flag, folder in folders:
        check_folder(flag, folder)
    if args.cache and args.data != ["demo"]:  # (demo: ignored, warn_unused_run)
        refuse_out_dir(args.cache, "--cache")
    # (realpath: an --out in a loop of links is open_run_folder's one line; resolve() raised)
    real = Path(os.path.realpath(out))
    for flag, folder in folders:  # its strips, OUT/val/*.png, were read as images of the folder
        if Path(folder).resolve() in (real, *real.parents):
            raise UsageError(
                f"--out {out}: is inside {flag} {folder}, where its validation "
                "strips would be read as images; give --out a folder outside it"
            )


def training_data(args: TrainArgs, recipe: Recipe, model, dd, say) -> PatchPairs:
    """The training patches of this rank, and at start how many images were found and kept.
    Every image smaller than one patch: the --patch of `model` that one takes is named."""
    if args.cache and args.data != ["demo"]:  # (demo: ignored, warn_unused_run)
        try:
            check_out_dir(args.cache, "--cache")  # before decoding: the cache is written meanwhile
        except OutputError:
            if not Path(args.cache).is_dir():
                raise
            # A cache shared read-only (made once by another run, a lab's copy): its arrays are
            # read; an image whose arrays are missing stops the run at once, when they cannot be
            # written (exit 7, naming the file), after decoding it alone.
            say(f"--cache {args.cache}: read-only: its arrays are read, and none can be added")
    try:
        dataset = PatchPairs(
            args.data, args.scale, recipe.patch, recipe.batch, seed=args.seed, rank=dd.rank,
            lr_dirs=args.lr_data or None, cache=args.cache or None, degradation=degradation(args),
        )  # fmt: skip
    except TooSmall as e:  # what to do: the largest --patch the model takes that one fits
        least, fit = least_patch(model), e.lr_side // model.lr_multiple * model.lr_multiple
        raise DataError(
            f"{e}; use --patch {fit} (the largest image's LR is {e.lr_side} px on its shorter "
            f"side), or --data with larger images" if fit >= least else
            f"{e}; give --data larger images (the {args.model} model and its losses take an LR "
            f"patch of {least} px at least; the largest image's LR is {e.lr_side} px on its "
            "shorter side)"
        ) from None  # fmt: skip
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        # Not a step's memory (the fallback's "a smaller --batch or --patch" would not help):
        # without a cache every decoded image stays in RAM; with one, an image is decoded and
        # resized at a time per thread, then written and memory-mapped.
        raise OutOfMemory(
            "--data: out of memory while loading the training images, which without --cache "
            "are all held in memory decoded (DIV2K's 800: about 7 GB); use --cache DIR: each "
            "is decoded once to a .npy file there and memory-mapped"
            if not args.cache else
            f"--data: out of memory while decoding the training images into --cache "
            f"{args.cache} ({decode_threads()} at a time, with their LR made); a run "
            "with more memory can make the cache, which later runs read without decoding"
        ) from None  # fmt: skip
    found = len(dataset.names) + len(dataset.skipped)
    hp = recipe.patch * args.scale
    n = len(dataset.names)
    say(f"data: {n} training image{'s' * (n != 1)} of {found} found in {' '.join(args.data)}"
        + (f" ({len(dataset.skipped)} skipped: smaller than one {hp}x{hp} HR patch)"
           if dataset.skipped else ""))  # fmt: skip
    return dataset


def check_same_data(dataset: PatchPairs | None, dd) -> None:
    """Every rank trains on rank 0's images: each node reads --data from its own disk (a scratch
    copy), and one whose copy lacks images (cut short, not yet synced) drew its batches from
    fewer of them, silently. Compared by file name, in the one image order; one line on every
    rank naming the first image that differs, exit 3."""
    if not dd.on or dataset is None:
        return
    names = distributed.gather_objects([Path(n).name for n in dataset.names], dd)
    for rank, theirs in enumerate(names):
        if theirs != names[0]:
            # (the first position where the lists differ may hold a name both have: the one
            # after an image that only one of them lacks)
            mine, ours = set(theirs), set(names[0])
            lacks = [n for n in names[0] if n not in mine]
            extra = [n for n in theirs if n not in ours]
            what = (f"{lacks[0]} is not among them" if lacks else
                    f"{extra[0]} is not among rank 0's" if extra else
                    "the same names come in another order or number")  # fmt: skip
            raise DataError(
                f"--data: rank {rank} has {len(theirs)} training images, rank 0 has "
                f"{len(names[0])}, and {what} (a node's copy of the images differs); give every "
                "node the same images"
            )


def validation_pairs(args: TrainArgs, steps: int, dd, say,
                     dataset: PatchPairs | None = None) -> list:  # fmt: skip
    """Held-out (stem, HR, LR) pairs on rank 0 (--val-data, or the demo's when training on it);
    says at start whether validation (and so best.pt) will happen, and warns where validation
    images are training images too."""
    source = validation_source(vars(args))
    why = no_validation(args, steps)
    if why:
        say(f"validation: none ({why}): no best.pt will be written; sample from last.pt")
    if why or not dd.main:
        return []
    if source != "demo":
        check_folder("--val-data", source)
    files = list_images(source)[: args.val_images or None] if source != "demo" else []
    check_val_stems(source, files)
    pairs = load_pairs(source, args.scale, max_images=args.val_images or None, crop=args.val_crop,
                       degradation=degradation(args))  # fmt: skip
    if dataset is not None and source != "demo":  # (the demo's two splits share no image)
        # --val-data given as --data (or inside it): best.pt would reward fitting the training set
        seen = same_files(files, dataset.names)
        if seen:
            warnings.warn(
                f"--val-data: {len(seen)} of {len(pairs)} validation images are training images "
                f"too (e.g. {seen[0]}): their PSNR, and best.pt, reward fitting the training set; "
                "give --val-data held-out images",
                stacklevel=2,
            )
    say(f"validation: {len(pairs)} image{'s' * (len(pairs) != 1)} of {source} every "
        f"{args.val_every} steps and at the last; best.pt holds the best PSNR")  # fmt: skip
    return pairs


def check_val_stems(source: str, files: list[Path]) -> None:
    """The validation images' stems (relative paths without the extension, as `load_pairs`
    names them) name their sample seeds and their strips in OUT/val/: two images of one stem
    (cat.png and cat.jpg) drew the same noise, and the second's strip replaced the first's at
    every validation, without a word. One line, exit 3, as sr_sample.py --input refuses them."""
    first = {}
    for f in (f.relative_to(source) for f in files):
        stem = f.with_suffix("").as_posix()
        if stem in first:
            raise DataError(f"--val-data {source}: {first[stem]} and {f} share the stem "
                            f"{stem!r}, which names their validation samples and strips; rename "
                            "one")  # fmt: skip
        first[stem] = f


def training_model(args: TrainArgs, cfg: dict, named: set[str], recipe: Recipe, resumed, device,
                   say):  # fmt: skip
    """The model (with --init-from's weights for a new run); built first, so that a bad model
    flag or --init-from fails before anything is written or read. (Its optimizers are built
    once the ranks' data agree: `train`.)"""
    try:
        model = build_model(args.model, cfg).to(device)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        # The model alone: no batch or patch is involved yet
        big = bigger_flags(args.model, cfg)
        raise OutOfMemory(f"the {args.model} model does not fit in memory on {device}"
                          + (f" ({big}): use smaller model flags" if big else
                             " (the paper's size): use another device")) from None  # fmt: skip
    multiple = model.lr_multiple  # the LR sizes its layers need (sampling pads to them)
    if recipe.patch % multiple:  # else a shape error deep inside the first training step
        fit = -(-recipe.patch // multiple) * multiple
        raise UsageError(
            f"--patch {recipe.patch}: {args.model} x{args.scale} needs an LR patch that is a "
            f"multiple of {multiple}; use --patch {fit}"
        )
    # A loss or critic given too small a patch stopped the run at its first step (VarSR's
    # critic: at its adversarial phase), after OUT/ was made and the data decoded.
    if recipe.steps > (resumed["step"] if resumed else 0):
        for what, need, way_out in model.patch_needs():
            if recipe.patch * args.scale < need:
                hr = recipe.patch * args.scale
                raise UsageError(
                    f"--patch {recipe.patch}: {what} needs HR patches of at least {need} px, not "
                    f"{hr}x{hr}: use --patch {least_patch(model)} or more (the HR "
                    f"patch is --patch x --scale){way_out}"
                )
    if args.d_learning_rate is not None and model.discriminator is None and model.learns:
        warnings.warn(f"--d-learning-rate: no effect, this {args.model} model has no "
                      "discriminator; ignored", stacklevel=2)  # fmt: skip
    if args.init_from and resumed is None:
        say(init_weights(model, args, cfg, named))
    elif args.init_from:  # a requeued fine-tuning job repeats it: its run has moved on since
        say(f"--init-from {args.init_from}: not used, the run goes on from its checkpoint")
    # The files its first step reads (--rrdb-init, a loss network's weights): a missing one is
    # one line now, before --out is written or the data read, not minutes later.
    if recipe.steps > (resumed["step"] if resumed else 0):
        model.check_files(loaded=bool(resumed or args.init_from))
    if args.cuda_graphs and model.graph_key() is None:
        raise UsageError(
            f"--cuda-graphs: {args.model}'s training step changes on the host from "
            "step to step, so one recording cannot replay it; drop --cuda-graphs"
        )
    return model


def held_steps(dd, saved: int | None, last: Path, ckpt_path: Path, start: int, resumed):
    """(what holds the steps done, how to go on with a change) for a run that stops: `last` if
    this run saved (step `saved`; only rank 0 knows that its save was written), else the resumed
    checkpoint, else nothing."""
    if saved is not None:
        held = f"{last} holds step {saved}" if dd.main else f"{last} holds rank 0's last save"
        return held, "continue with --resume auto and"
    if resumed is not None:
        return f"{ckpt_path} still holds step {start}", "resume it with"
    return "nothing was saved", "start again with"


def step_out_of_memory(step: int, args: TrainArgs, cfg: dict, recipe: Recipe, model, device,
                       state: str, how: str) -> OutOfMemory:  # fmt: skip
    """The line of step `step + 1` out of memory: what is left to lower (`lower_memory`), with
    this run's values, and where nothing is, that the model does not fit; `state`, `how`:
    `held_steps`."""
    helps = lower_memory(args, cfg, recipe, model, device)
    if not helps:
        return OutOfMemory(f"step {step + 1}: out of memory at --batch 1 and --patch "
                           f"{recipe.patch}, the least: the {args.model} model does not fit in "
                           f"training on {device}; {state}")  # fmt: skip
    return OutOfMemory(f"step {step + 1}: out of memory; {state}: {how} {any_of(helps)}")


def lower_memory(args: TrainArgs, cfg: dict, recipe: Recipe, model, device) -> list[str]:
    """What lowers a training step's memory, with this run's values: a smaller batch
    (`smaller_batches`), --amp bf16 where the run has no --amp and `device` runs bfloat16
    natively (measured on a CPU: a step of EDSR x4 at its recipe took 21 % less, one of SRFlow
    x4 16 % less; a halved batch about half), and the model flags set above the paper's
    (`bigger_flags`), a cause as much as the batch."""
    big = bigger_flags(args.model, cfg)
    bf16 = args.amp == "none" and native_bf16(device)
    return (smaller_batches(recipe, model) + (["--amp bf16 (this run's: none)"] if bf16 else [])
            + ([f"smaller model flags ({big})"] if big else []))  # fmt: skip


def native_bf16(device) -> bool:
    """Whether `device` runs --amp bf16 natively (a GPU from Ampere on, a CPU with AVX512-BF16 or
    AMX), not emulated, slower than float32."""
    return not amp_emulated("bf16", device)


def smaller_batches(recipe: Recipe, model) -> list[str]:
    """What makes a training batch smaller, with this run's values: a smaller --batch where it
    is over 1 (per process), a smaller --patch where one is left (`least_patch`)."""
    helps = [f"a smaller --batch (this run's: {recipe.batch})"] if recipe.batch > 1 else []
    if recipe.patch - model.lr_multiple >= least_patch(model):
        helps.append(f"a smaller --patch (this run's: {recipe.patch})")
    return helps


def least_patch(model) -> int:
    """The smallest --patch that `model` trains on: a multiple of its lr_multiple, at least its
    min_lr_size, whose HR patch (x its scale) each of its losses takes (`patch_needs`: the VGG19
    perceptual loss 16 px at relu5_4, VarSR's critic 17, VSpSR's 10)."""
    m, s = model.lr_multiple, model.scale
    lr = max([model.min_lr_size] + [-(-need // s) for _, need, _ in model.patch_needs()])
    return max(m, -(-lr // m) * m)


def bigger_flags(name: str, cfg: dict) -> str:
    """The model's size flags (its whole numbers: widths, depths, sizes) set above the paper's,
    as `--n-feats 512, --n-blocks 64`: what makes a model bigger than the recipe's. A default of
    0 stands for the paper's value at the run's scale (SRFlow's --flow-steps): not compared."""
    big = [f for f in fields(MODELS[name].Config) if f.type in (int, "int") and f.name != "scale"
           and f.default > 0 and cfg.get(f.name, f.default) > f.default]  # fmt: skip
    return ", ".join(f"--{f.name.replace('_', '-')} {cfg[f.name]}" for f in big)


def init_weights(model, args: TrainArgs, cfg: dict, named: set[str]) -> str:
    """--init-from: the weights of another run (its averaged ones if it has them, --ema), or a
    raw state_dict; returns the line that says which. A run of another model or scale, or one
    whose model flags give other shapes, is one line naming the flag and what differs, not a list
    of mismatching keys."""
    path = args.init_from
    if said := describe_path(path, "file", example="last.pt"):  # (the flag named)
        raise CheckpointError(f"--init-from {path}: {said}")
    init = read_checkpoint(path)
    if is_srspace_checkpoint(init):
        was = (init["model"], init["model_cfg"].get("scale"))
        if was != (args.model, args.scale):
            raise CheckpointError(
                f"--init-from {path}: holds {was[0]} x{was[1]} weights, and this run is "
                f"{args.model} x{args.scale}; give a checkpoint of the same model and scale"
            )
        held = init["model_cfg"]
    else:  # a raw state_dict: srspace's key names, or a released file's (SRFlow, NCSR...)
        inner = init.get("state_dict")
        sd = as_state_dict(inner if is_tensor_dict(inner) else init, path)
        # What its keys tell (--nb, variant); where they do not tell rrdb's global skip (ESRGAN's
        # and SRFlow's files share a layout), the run's --global-skip says it, if typed: its
        # default would start an ESRGAN file with SRFlow's skip, other images, without a word.
        extra = {"global_skip": model.cfg.global_skip} if "global_skip" in named else {}
        try:
            held = MODELS[args.model].raw_config(sd, args.scale, **extra)
        except CheckpointError as e:  # (raw_config has no path to name)
            raise CheckpointError(f"--init-from {path}: {e}") from None
    where = f"--init-from {path}"
    try:
        if is_srspace_checkpoint(init):
            model.load_weights(init.get("ema_state_dict", init["state_dict"]), where)
        else:  # maps a released layout, and says which --model/--scale a mismatching file fits
            model.load_raw_state_dict(sd, where)
    except CheckpointError as e:
        differ = [f"--{k.replace('_', '-')} {held[k]} (this run {v})"
                  for k, v in cfg.items() if k in held and held[k] != v]  # fmt: skip
        if not differ:
            raise
        raise CheckpointError(f"{e}; its model flags differ: {', '.join(differ)}") from None
    if not is_srspace_checkpoint(init):
        return f"--init-from {path}: its weights (a state_dict)"
    which = (f"its weight average (--ema {init['ema_decay']:g})" if "ema_state_dict" in init
             else "its weights")  # fmt: skip
    return f"--init-from {path}: {which} at step {init.get('step', '?')}, a fresh optimizer"


def summary(args: TrainArgs, model, start: int, recipe: Recipe, dd, device, out: Path) -> str:
    """The line that starts the run's output."""
    threads = torch.get_num_threads()
    return (
        f"srspace {__version__} | {args.model} x{args.scale} | "
        f"{sum(p.numel() for p in model.parameters()):,} params | steps {start}->{recipe.steps} | "
        f"batch {recipe.batch} x {dd.world} process(es) | LR patch {recipe.patch} | device {device}"
        f" ({threads} thread{'s' if threads > 1 else ''}) | out {out}"
    )


def build_optimizers(model, recipe: Recipe) -> dict[str, torch.optim.Optimizer]:
    """Adam for the generator ("g", absent for a model with nothing to learn) and, if the model
    has a discriminator, its own ("d"). Fused: its kernel skips a step flagged non-finite on the
    device (step_unless_flagged)."""
    optimizers = {}
    if model.generator_parameters():
        optimizers["g"] = torch.optim.Adam(
            model.generator_param_groups(), lr=recipe.learning_rate, betas=recipe.betas,
            eps=recipe.eps, weight_decay=recipe.weight_decay, fused=True,
        )  # fmt: skip
    if model.discriminator is not None:
        optimizers["d"] = torch.optim.Adam(
            model.discriminator.parameters(), lr=recipe.d_learning_rate, betas=recipe.d_betas,
            weight_decay=recipe.d_weight_decay, fused=True,
        )  # fmt: skip
    return optimizers


def learning_rate_at(
    step: float, recipe: Recipe, length: float | None = None, base: float | None = None
) -> float:
    """The learning rate at `step` of a schedule over `length` steps (default: the run's), from
    `base` (default: recipe.learning_rate): multistep decay by gamma at each milestone (fractions
    of the length), or a cosine down to eta_min."""
    n = max(recipe.steps if length is None else length, 1)
    base = recipe.learning_rate if base is None else base
    if recipe.schedule == "cosine":
        return recipe.eta_min + 0.5 * (base - recipe.eta_min) * (1 + math.cos(math.pi * step / n))
    return base * recipe.gamma ** sum(step >= m * n for m in recipe.milestones)


def warmup_factor(step: int, warmup: int) -> float:
    """--warmup: the training step of index `step` (0-based; step t = step + 1 of the run) takes
    t/warmup of its scheduled rate while t < warmup, so the rate rises linearly from 1/warmup of
    it (no step is spent at rate 0) to all of it at step `warmup`. A pure function of the step,
    as the schedule is: a resume continues it exactly."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def set_learning_rates(optimizers: dict, model, step: int, recipe: Recipe) -> None:
    """Every parameter group at its own place in the schedule (a model's phases may differ),
    times the warm-up factor of the run's step (`warmup_factor`, every group and the
    discriminator's alike): the schedule itself is not shifted, so after the warm-up each rate is
    the one the run would have without it."""
    w = warmup_factor(step, recipe.warmup)
    for i, g in enumerate(optimizers["g"].param_groups if "g" in optimizers else []):
        t, length = model.schedule_position(i, step, recipe.steps)
        set_rate(g, w * learning_rate_at(t, recipe, length))
    for g in optimizers["d"].param_groups if "d" in optimizers else []:
        set_rate(g, w * learning_rate_at(step, recipe, base=recipe.d_learning_rate))


def set_rate(group: dict, rate: float) -> None:
    """A float, or in place into the device tensor that a recorded step reads (--cuda-graphs)."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(rate)
    else:
        group["lr"] = rate


def rates_on_device(optimizers: dict, device: torch.device) -> None:
    """Every parameter group's learning rate as a 0-dim float32 tensor on `device`, the dtype
    Adam's fused kernel reads; set_rate fills it in place from then on (--cuda-graphs)."""
    for g in (g for opt in optimizers.values() for g in opt.param_groups):
        if not torch.is_tensor(g["lr"]):
            g["lr"] = torch.tensor(g["lr"], dtype=torch.float32, device=device)


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() as a checkpoint keeps it: plain float rates and capturable off, so that
    a run recorded with --cuda-graphs resumes without it too."""
    sd = opt.state_dict()
    groups = [{**g, "lr": float(g["lr"]), "capturable": False} for g in sd["param_groups"]]
    return {**sd, "param_groups": groups}


def current_learning_rate(optimizers: dict, step: int, recipe: Recipe) -> float:
    """The rate the first (main) parameter group used at `step` (groups may have own phases)."""
    if "g" in optimizers:
        rate = optimizers["g"].param_groups[0]["lr"]
        # --cuda-graphs' float32 rate: logged as its shortest decimal (2.5e-4, not 2.5000001e-4)
        return float(str(np.float32(rate.item()))) if torch.is_tensor(rate) else rate
    return learning_rate_at(step, recipe)


def restore(resumed: dict, path: Path, model, optimizers: dict, scaler, dd) -> None:
    """Weights, optimizers, loss scaler and this rank's RNG states of a resumed run."""
    model.load_weights(resumed["state_dict"], path)
    for k, o in optimizers.items():
        o.load_state_dict(resumed["optimizers"][k])
    if scaler is not None and "scaler" in resumed:
        scaler.load_state_dict(resumed["scaler"])
    rngs = resumed.get("rng_ranks", [resumed["rng"]])
    set_rng_state(rngs[dd.rank] if dd.rank < len(rngs) else rngs[0])
    if dd.rank >= len(rngs):
        # A rank the checkpoint's run did not have (resumed by more processes): rank 0's states
        # would give it rank 0's model-internal noise (dequantisation, latents) at every step,
        # the same draws twice in the averaged batch. Its own stream instead, as a new run's
        # ranks have, from (seed, rank, step).
        seed = resumed.get("train_args", {}).get("seed", 0)
        torch.manual_seed(int(np.random.SeedSequence([seed, dd.rank, resumed["step"]])
                              .generate_state(1)[0]))  # fmt: skip


def start_model(args, model, optimizers, scaler, resumed, path, dataset, steps, dd, device, say,
                too_big):  # fmt: skip
    """The state of a resumed run, or the data-dependent initialisation of a new one; returns the
    weight average (--ema, rank 0; made before compilation) or None. The initialisation runs the
    first batch: out of memory there raises too_big(), the line of step 1's (it said "use a
    smaller --batch or --patch", without this run's values)."""
    start = resumed["step"] if resumed is not None else 0
    if resumed is not None:
        restore(resumed, path, model, optimizers, scaler, dd)
        why = (
            " (the run has no last.pt)" if path.name == "best.pt" and args.resume == "auto" else ""
        )
        say(f"resumed {path} at step {start}{why}")
        changed = changed_flags(args, resumed)
        if changed:
            say(f"changed flags: {', '.join(changed)}")
        change = ema_change(args.ema, resumed, path)
        if change:
            say(change)
        was = resumed.get("world_size", 1)
        if was != dd.world:  # each rank draws its own batches: the total batch changes
            say(f"{path} was trained by {was} process(es), this run has {dd.world}: a step "
                f"averages {dd.world} batches (it averaged {was}), and they differ from those of "
                "an uninterrupted run")  # fmt: skip
    elif args.resume == "auto":  # a mistyped --out would otherwise start over in silence
        say(f"--resume auto: no {path} yet; a new run starts")
    try:
        initialize(model, dataset, start, steps, bool(resumed or args.init_from), dd, device,
                   args.compile or args.ema > 0)  # fmt: skip
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        raise too_big() from None
    return EMA(model, args.ema, resumed, path) if args.ema and dd.main else None


def ema_change(decay: float, resumed: dict, path) -> str | None:
    """What --ema DECAY does to the weight average of the checkpoint a run resumes (None: it
    goes on as it was)."""
    held = resumed.get("ema_decay")
    if held is None:
        return f"--ema {decay:g}: {path} holds no weight average; it starts here" if decay else None
    if not decay:
        return (f"--ema 0: the weight average of {path} (decay {held:g}) is dropped; validation "
                "and the checkpoints from here on have the raw weights only")  # fmt: skip
    if decay != held:
        return f"--ema {decay:g}: the weight average of {path} goes on at this decay (was {held:g})"
    return None


def log_step(run_log, progress, out_g, optimizers, recipe, step, skipped, t0, logged) -> dict:
    """A record of log.jsonl (and the progress line): the step's scalars, learning rate, skipped
    steps so far and seconds per step since the last record."""
    scalars = {k: float(v.detach()) for k, v in out_g.items() if v.ndim == 0}
    rate = current_learning_rate(optimizers, step - 1, recipe)
    rec = {"step": step, "learning_rate": rate, "skipped": skipped, **scalars}
    rec["s_per_step"] = (time.monotonic() - t0) / (step - logged)
    log(run_log, rec)
    progress.update(step, rec)
    return rec


def initialize(model, dataset, start: int, steps: int, loaded: bool, dd, device, now: bool):
    """Loaded weights (resume, --init-from): the model skips its data-dependent initialisation.
    Else, with several processes or `now` (--compile, --ema), that initialisation (ActNorm) runs
    here, eagerly, on each rank's first batch, then rank 0's statistics go everywhere: DDP only
    broadcasts the weights it is given at construction, a compiled graph would be specialised to
    the one-time initialising call, and the weight average starts from initialised weights.
    (Otherwise it runs in the first training step.)"""
    if loaded:
        model.mark_initialized()
    elif (dd.on or now) and start < steps:
        trainable = [p.requires_grad for p in model.parameters()]
        model.train()
        model.on_step(start, steps)  # the first step's state (its --rrdb-init: by check_files)
        with torch.no_grad():
            model(*(x.to(device) for x in dataset[start]))
        distributed.broadcast_state(model, dd)
        for p, t in zip(model.parameters(), trainable):  # DDP must see what on_step may unfreeze
            p.requires_grad_(t)


def wrap(model, dd, device, compile: bool):
    """What the loop calls: the model, under DDP for the generator (a discriminator is stepped
    outside it with averaged gradients), compiled with --compile; checkpoints save `model`."""
    forward = model
    if dd.on and model.generator_parameters():
        if model.discriminator is not None:
            ignore = [f"discriminator.{n}" for n, _ in model.discriminator.named_parameters()]
            ignore += [f"discriminator.{n}" for n, _ in model.discriminator.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        ids = [dd.local_rank] if device.type == "cuda" else None
        forward = DDP(model, device_ids=ids, find_unused_parameters=model.ddp_find_unused)
        if compile:  # DDP's forward names itself to the profiler, a range dynamo leaves out
            # and logs so on every rank at the first compiled step: torch's own code, nothing
            # to act on, where a line every rank says alike belongs in the log once at most
            for name in ("ctx_manager", "torch"):  # (torch 2.6: variables.torch's words)
                logging.getLogger(f"torch._dynamo.variables.{name}").addFilter(
                    lambda r: not str(r.msg).startswith(("Profiler record function",
                                                         "Profiler function")))  # fmt: skip
    return compile_model(model, forward) if compile else forward


def compile_model(model, forward, backend: str = "inductor"):
    """--compile. A model that names `compile_regions` (its repeated blocks: a flow's steps and
    splits, RRDB blocks) has each such module compiled on its own, so a network of hundreds of
    layers becomes a few small graphs, one per distinct block and shape (SRFlow ×4 on a CPU:
    3.3× less compile time than one whole-model graph, docs/benchmarks.md); `forward` is
    returned as it is. Other models: their whole training forward is compiled."""
    if not model.compile_regions:
        return torch.compile(forward, backend=backend)
    # Each level's shapes, a transition and a conditional step, the first step's input without
    # gradient and an encoder frozen or not are distinct graphs of the same code: more than
    # dynamo's default limit of 8 per code object (beyond it, it would silently run eagerly).
    config = torch._dynamo.config  # the limit's name in torch 2.6: cache_size_limit
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    for m in model.modules():
        if isinstance(m, model.compile_regions):
            m.compile(backend=backend)
    return forward


def compile_count() -> int | None:
    """How many compilation phases torch.compile has timed in this process (dynamo capturing a
    frame, AOT autograd, inductor's kernels, a backward compiled at its first call), failed ones
    included: the record that torch._dynamo.utils.compile_times() prints. A count that moved
    during a step: the step compiled. None where this torch keeps no such record."""
    from torch._dynamo import utils  # (imported by --compile's torch.compile already)

    times = getattr(utils, "compilation_time_metrics", None)
    return sum(len(t) for t in times.values()) if isinstance(times, dict) else None


def stopped_compiling(e: BaseException, stop: dict, args: TrainArgs,
                      compiled: int | None) -> bool:  # fmt: skip
    """--compile: whether error `e` of a training step or validation is the effect of a stop
    signal. A signal to the process group also ends the compiler processes that torch.compile
    runs (g++, inductor's compile workers), so a compilation under way raises (torch 2.14:
    InductorError from CppCompileError from CalledProcessError -15). Such an error, raised
    after a signal by a step that compiled (`compiled`: compile_count() before the step; None:
    not known, taken as compiled), is the stop's; the caller says so (`said_stopped`). Out of
    memory, no signal, or nothing compiled: an error."""
    if not (stop["signal"] and args.compile) or is_out_of_memory(e):
        return False
    now = compile_count()
    return compiled is None or now is None or now != compiled


STOPPED_COMPILING = ("taken as the stop's effect (the signal ends the compiler too): if it "
                     "recurs after resuming, it is a real error")  # fmt: skip


def said_stopped(e: BaseException, stop: dict, where: str, step: int, run_log,
                 warn: bool = True) -> tuple:  # fmt: skip
    """What `stopped_compiling` took as the stop, for one line: (the signal, the error's type
    and its message as the line shows a library's (`joined_lines`: inductor's runs to thousands
    of lines, the compiler's output: its first, and the next after dynamo's "backend='inductor'
    raised:").
    Also a log.jsonl record of the last step done (a resume keeps it) and, with `warn`, the
    warning line (several processes: the caller's Resumable line says it instead)."""
    sig = stop["signal"]  # (a log.jsonl that cannot be written replaces it with its reason)
    first = joined_lines(str(e))
    name = type(e).__name__
    record = {"error": f"{name}: {first}" if first else name}
    log(run_log, {"step": step, "signal": sig, "error_in": where, **record})
    error = f"{name} ({first})" if first else name
    if warn:
        say_err(f"{PROG}: warning: {where} raised {error} after {sig} while compiling; "
                f"{STOPPED_COMPILING}", [str(e)])  # fmt: skip
    return sig, error


STOP_SIGNALS = (signal.SIGINT, *PREEMPT_SIGNALS)
SIGNAL_NAMES = {s.name for s in STOP_SIGNALS}  # stop["signal"] of a signal (not a full disk's)


def catch_signals(cleanup: contextlib.ExitStack) -> dict:
    """SIGTERM (SLURM end/preemption), SIGUSR1 (SLURM's warning), SIGINT, SIGHUP (the terminal
    closed, e.g. a dropped ssh connection; prints to it then fail: `stdout_closed`): recorded in
    the dict; the loop finishes the step, saves and exits 75. Ranks agree every step, so all stop
    at the same step.

    Before the loop (`stop["at_once"]`, from the start of main: while the data is decoded or
    cached, the model built, the processes meet) there is nothing to save, and such a phase can
    last minutes: the first signal raises there and then, SIGINT KeyboardInterrupt (exit 130),
    the others Preempted (exit 75, and the job requeued, as after a stop in the loop), outside a
    thread pool's lock code (`when_not_held`). One that came while the script was importing is
    raised here (`record_stop_signals`)."""
    stop = {"signal": None, "at_once": True}

    def request_stop(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        if stop["at_once"]:
            stop["at_once"] = False  # a second signal meanwhile does not cut the way out short
            raise KeyboardInterrupt if signum == signal.SIGINT else Preempted(stop["signal"])

    for s in STOP_SIGNALS:  # (a SIGINT ignored at start stays ignored: a background job)
        # put back at the end: main() may be called from Python
        cleanup.callback(signal.signal, s, catch(s, when_not_held(request_stop)))
    replay_stop_signal()
    return stop


def stopped_before_training(name: str, args: TrainArgs) -> Stopped:
    """The error for a stop by signal `name` before the first step. Under SLURM, rank 0 requeues
    the job after SIGUSR1 or SIGTERM, as `finish` does after a stop in the loop."""
    rank = (distributed.env_ranks() or (0,))[0]  # the processes may not have met yet
    if rank == 0 and name in ("SIGUSR1", "SIGTERM") and args.requeue:
        requeue(say_out)
    # The command as given is right either way: a resumed run's has its --resume, and a new
    # run's folder is gone (unmake_run_folder), so "--resume auto" would suggest a kept run
    return Stopped(f"stopped by {name} before the first step, nothing to save; rerun the same "
                   "command")  # fmt: skip


def train_step(model, forward, optimizers, batches, step, recipe, dd, scaler, autocast,
               graph=None):  # fmt: skip
    """Training step `step`: the generator's backward, then the discriminator's, then both
    optimizers' steps. Returns forward's output (with the discriminator's parts as d_*) and `ok`,
    a 0-dim float32 tensor on the device: 0 if either part was non-finite on some rank, and so
    the step changed nothing (weights, optimizer states, buffers such as BatchNorm statistics);
    never read here (docs/design.md). With `graph` (--cuda-graphs), the part after the host's
    decisions is replayed from a recording."""
    if not model.training:  # (after a validation; model.train() walks every module: ~3 ms)
        model.train()
    model.on_step(step, recipe.steps)
    lr, hr = next(batches)  # on the device already (train_loader)
    set_learning_rates(optimizers, model, step, recipe)

    def run(lr, hr):
        buffers = [b.clone() for b in model.buffers()]
        with autocast:
            out = forward(lr, hr)
        ok, g = checked_backward(optimizers.get("g"), out["loss"], model.generator_parameters(),
                                 recipe.grad_clip, dd, scaler)  # fmt: skip
        stepping = [g]
        if "d" in optimizers:
            # The critic learns from the generator's output before the generator's step (as when
            # each stepped in turn); neither steps unless both parts are finite.
            with autocast:
                out_d = model.discriminator_loss(lr, hr, out)
            ok_d, d = checked_backward(optimizers["d"], out_d["loss"],
                                       model.discriminator.parameters(), recipe.grad_clip, dd,
                                       scaler, sync=True)  # fmt: skip
            ok, stepping = ok * ok_d, stepping + [d]
            out.update({f"d_{k}": v for k, v in out_d.items()})
        ok = distributed.all_min_(ok, dd)
        step_unless_flagged([o for o in stepping if o is not None], ok)
        with torch.no_grad():
            for b, before in zip(model.buffers(), buffers):
                b.copy_(torch.where(ok > 0, b, before))
        if scaler is not None:
            scaler.update()
        return out, ok

    return run(lr, hr) if graph is None else graph(run, lr, hr, optimizers)


def capture(body, device: torch.device):
    """Record body() as a CUDA graph (nothing runs yet); returns the function that replays it.
    "thread_local": the loader's pin-memory thread may allocate while this thread records."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
    # Our own stream context around torch's: when a recording fails, torch.cuda.graph's exit
    # raises before it restores the current stream, so without this one the rest of the run
    # (eager from then on) would run on the recording stream.
    with (
        torch.cuda.stream(stream),
        torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"),
    ):
        body()
    return graph.replay


class StepGraph:
    """--cuda-graphs. A training step of SRFlow ×4 dispatches ~8,000 operations, most of them on
    small tensors: on a fast GPU, launching them from Python takes longer than running them. So
    the step is recorded once as a CUDA graph (docs/design.md, "CUDA graphs"); each later step
    copies its batch into the recorded input tensors and replays all kernels with one launch.

    What the host decides is done before the replay: the learning rates are 0-dim device
    tensors that Adam's fused, capturable kernel reads (set_learning_rates fills them), and the
    model's switches (`graph_key`), its parameters' requires_grad and the batch shape are
    checked every step: a change records again, as a --on-nan rollback does (new optimizer
    states). The WARMUP steps before each recording run eagerly on a side stream, so the lazy
    set-up (cuDNN plans, Adam's states, a perceptual loss built on first use) happens outside
    it. Only 0-dim outputs (the logged losses) are kept.

    A replay changes tensors without Python seeing it, so: the recording keeps every cached
    device table alive (`cached_tensors`: resize taps, CEM projections), and after each replay
    the version counters of what it writes (trained parameters, buffers) are bumped, so caches
    keyed on them (a flow's 1×1 inverses in validation) see the new weights. A step that CUDA
    refuses to record runs eagerly, with one warning, for the rest of the run."""

    WARMUP = 3

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.params = list(model.parameters())  # (walking the modules each step costs ~2 ms)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.recordings, self.failed = 0, None
        self.reset()

    def reset(self) -> None:
        self.key, self.warmup, self.replay, self.keep = None, self.WARMUP, None, []

    def __call__(self, run, lr: torch.Tensor, hr: torch.Tensor, optimizers: dict):
        if self.failed:
            return run(lr, hr)
        key = (self.model.graph_key(), tuple(p.requires_grad for p in self.params),
               lr.shape, hr.shape)  # fmt: skip
        if key != self.key:
            self.reset()
            self.key = key
        if self.warmup:
            self.warmup -= 1
            out, ok = self.eager(run, lr, hr)
            self.out = {k: v.detach().clone() for k, v in out.items() if v.ndim == 0}
            self.ok = ok.clone()
            return out, ok
        if self.replay is None:
            if not self.record(run, lr, hr, optimizers):
                return run(lr, hr)  # nothing of this step ran while recording
        else:
            self.lr.copy_(lr)
            self.hr.copy_(hr)
        self.replay()
        torch.autograd.graph.increment_version(self.written)
        return self.out, self.ok

    def eager(self, run, lr, hr):
        """run(lr, hr) on the side stream (as PyTorch's CUDA-graph recipe warms up)."""
        if self.stream is None:
            return run(lr, hr)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            result = run(lr, hr)
        main.wait_stream(self.stream)
        return result

    def record(self, run, lr, hr, optimizers: dict) -> bool:
        """Record the step (True), or warn and give up recording for this run (False)."""
        rates_on_device(optimizers, self.device)
        for opt in optimizers.values():
            for g in opt.param_groups:
                g["capturable"] = True
            opt._warned_capturable_if_run_uncaptured = True  # warm-up steps after a change
            # Gradients made outside the recording are dropped before it, not freed inside it:
            # the recorded backward makes its own, in the graph's memory pool (PyTorch's recipe).
            opt.zero_grad(set_to_none=True)
        self.lr, self.hr = lr.clone(), hr.clone()
        self.written = [p for p in self.params if p.requires_grad] + list(self.model.buffers())
        self.keep = cached_tensors()  # read by address in every replay: never freed before it

        def body():
            out, ok = run(self.lr, self.hr)
            for k, v in self.out.items():
                v.copy_(out[k].detach())
            self.ok.copy_(ok)

        try:
            self.replay = capture(body, self.device)
        except RuntimeError as e:
            # What failed inside the recording raises first; torch.cuda.graph's exit then raises
            # "operation failed due to a previous error during capture" from it: name the first.
            cause = e.__context__ if isinstance(e.__context__, Exception) else e
            self.failed = said_error(cause)  # (its lines joined)
            self.reset()
            name = type(self.model).__name__
            say_err(
                f"{PROG}: warning: --cuda-graphs: {name}'s training step could not be "
                f"recorded as a CUDA graph ({self.failed}); it goes on without recording",
                [str(cause)],
            )
            return False
        self.recordings += 1
        return True


class BadSteps:
    """Non-finite steps counted on the device, so that no step waits for the host: `run` (the
    current streak), `skipped` (all) and `tripped`, the first step at which the streak reached
    `limit` (-1: not yet). `read()` fetches them, one synchronisation, at log, validation and
    save steps only: --max-bad-steps acts at the first of those after the streak."""

    def __init__(self, device: torch.device, limit: int, skipped: int = 0):
        # (a limit beyond int64, --max-bad-steps 1e23 typed out: an OverflowError in the first
        # step; no streak reaches 2**62 steps, so it is the same limit)
        self.limit = min(limit, 2**62)
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.full((), skipped, dtype=torch.int64, device=device)
        self.tripped = torch.full((), -1, dtype=torch.int64, device=device)

    def count(self, ok: torch.Tensor, step: int, scale: torch.Tensor | None = None) -> None:
        """`scale`: --amp fp16's loss scale after this step's update, which halves it on a
        skipped step. A step skipped at a scale above 1 (so at least 1 after halving) is the
        scaler's search for a scale whose gradients fit float16: skipped, but no part of a
        streak (docs/design.md)."""
        skipped = (ok == 0).long()
        bad = skipped if scale is None else skipped * (scale < 1).long()
        self.run.add_(bad).mul_(bad)  # +1 on a bad step, back to 0 on a good one
        self.skipped.add_(skipped)
        self.tripped.copy_(torch.where((self.tripped < 0) & (self.run >= self.limit), step,
                                       self.tripped))  # fmt: skip

    def read(self) -> tuple[int, int, int]:
        """(current streak, skipped, tripped) as Python ints."""
        return tuple(torch.stack([self.run, self.skipped, self.tripped]).tolist())

    def reset(self, skipped: int) -> None:
        """After a rollback: no streak, and the skipped steps of the checkpoint gone back to (those
        of the steps it abandoned are no steps of the run's)."""
        self.run.zero_()
        self.skipped.fill_(skipped)
        self.tripped.fill_(-1)


def roll_back(tripped: int, args, out: Path, steps: int, model, optimizers: dict, scaler, dd,
              dataset, meta: dict, run_log, progress, ema, device,
              before: str, stopping=None) -> tuple:  # fmt: skip
    """--max-bad-steps consecutive non-finite steps ended at step `tripped`. --on-nan rollback
    (while under --max-rollbacks and a last.pt exists): reload last.pt as a resume would, count
    the rollback in `meta` (saved with every checkpoint; the caller halves the learning rates,
    0.5 ** rollbacks, which a resumed run restores) and return (its step, a loader from there,
    its count of skipped steps).
    Else stop with exit code 5, writing nothing: last.pt stays the last good checkpoint (where
    there is none yet, `before` says what is: the checkpoint the run resumed, or nothing)."""
    path, n = out / "last.pt", meta["rollbacks"]
    what = f"step {tripped}: {args.max_bad_steps} consecutive non-finite losses/gradients"
    if args.on_nan != "rollback" or n >= args.max_rollbacks or not path.is_file():
        why = (f"after {n} rollbacks (--max-rollbacks {args.max_rollbacks})" if n else
               "before the first checkpoint" if args.on_nan == "rollback" else "")  # fmt: skip
        other = "" if args.on_nan == "rollback" else ", or use --on-nan rollback"
        lower = f"with a lower --learning-rate{other}"
        held = (f"the last good checkpoint is {shell_quote(path)} (resume {lower})"
                if path.is_file() else f"{before} {lower}")  # fmt: skip
        raise NonFiniteError(f"{what}{' ' + why if why else ''}; stopped without saving; {held}")
    ck = read_checkpoint(path)
    # A loader from the checkpoint's step (it draws from no global RNG, as at a resume)
    loader = train_loader(dataset, ck["step"], steps, args.workers, device.type == "cuda", device,
                          stopping)  # fmt: skip
    batches = iter(loader)
    restore(ck, path, model, optimizers, scaler, dd)
    if ema is not None:
        ema.restore(ck, path)
    meta["rollbacks"] = n + 1
    scale = 0.5 ** meta["rollbacks"]
    log(run_log, {"step": tripped + 1, "rollback": n + 1, "to_step": ck["step"],
                  "learning_rate_scale": scale})  # fmt: skip
    if progress is not None:
        progress.message(f"{what}; rollback {n + 1} of {args.max_rollbacks}: back to step "
                         f"{ck['step']} ({path}), learning rates x{scale:g}")  # fmt: skip
    return ck["step"], batches, ck["skipped"]


def check_replicas(model, dd, step: int, log_file) -> None:
    """--sync-check-every: stop if the model replicas of the ranks differ."""
    diff = distributed.replicas_differ(model, dd)
    log(log_file, {"step": step, "replica_max_diff": diff})
    if diff != 0:
        raise SRSpaceError(f"step {step}: model replicas differ across ranks ({diff})")


def save(path: Path, step, skipped, best, model, optimizers: dict, scaler, dd, meta, ema) -> bool:
    """Write a checkpoint on rank 0 (every rank takes part: their RNG states are gathered): the
    weights, optimizers, RNG states, counters, `meta` (model name and config, run flags) and the
    weight average (--ema). False, on every rank, where rank 0's weights are not finite and
    nothing was written: the caller then records no save (the closing line named last.pt, and
    a stop's line its step, for a step it did not hold)."""
    rngs = distributed.gather_objects(rng_state(), dd)
    finite = dd.main and all(torch.isfinite(p).all() for p in model.parameters())
    if distributed.agree(dd.main and not finite, dd, all_ranks=False):  # rank 0's verdict
        if dd.main:
            say_out(f"step {step}: non-finite parameters, {path.name} not written")
        return False
    if not dd.main:
        return True
    save_checkpoint(path, {
        **meta, "step": step, "state_dict": model.state_dict(), "skipped": skipped, "best": best,
        "optimizers": {k: optimizer_state(o) for k, o in optimizers.items()},
        "rng": rngs[0], "rng_ranks": rngs, "world_size": dd.world,
        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        **(ema.state_dict() if ema is not None else {}),
    })  # fmt: skip
    return True


def finish(stopped: str | None, step: int, steps: int, skipped: int, out: Path, args, dd, say,
           log_lost: str, result: Summary, not_saved: str = "") -> int:  # fmt: skip
    """Leave the process group; the closing line and the exit code: 7 where rank 0 could not
    write log.jsonl or a validation strip (`log_lost`: why; last.pt is saved), 75 after a
    signal (resume with --resume auto; under SLURM the job is requeued after SIGUSR1/SIGTERM),
    else 0: also where
    --time-budget stopped the run before `steps` (its line says to continue with --resume auto);
    5 where the last save was declined (`not_saved`: its line, what holds the run).
    The closing line is rank 0's, also with --quiet (`say` is silent then), and with --json
    `result`'s JSON instead. (main() closes the progress bar and the log, also on an error.)"""
    unwritable = distributed.agree(bool(log_lost), dd, all_ranks=False)  # every rank exits 7
    distributed.barrier(dd)
    distributed.cleanup(dd)
    if not_saved:  # the last save declined (`save`): its line, exit 5, on every rank
        if not dd.main:
            return EXIT_NONFINITE
        raise NonFiniteError(not_saved)
    if unwritable:
        if not dd.main:
            return EXIT_OUTPUT
        raise OutputError(f"{log_lost}; stopped at step {step}, wrote {out / 'last.pt'}: free "
                          "space, then continue with --resume auto")  # fmt: skip
    end = say_out if dd.main else say  # (say: nothing on the other ranks)
    result.update(stopped=stopped)
    # The checkpoint that holds the run. A run resumed from elsewhere (or from best.pt) that
    # stopped or ended before a step of its own wrote no OUT/last.pt, which the lines named all
    # the same, with --resume auto: in a folder without a checkpoint that starts a new run.
    held = Path(result.fields.get("checkpoint") or out / "last.pt")
    go_on = (f"wrote {held}; continue with --resume auto" if held == out / "last.pt" else
             f"{held} holds it; continue with --resume {shell_quote(held)}")  # fmt: skip
    if stopped and stopped != "time budget":
        result.line(f"{stopped}: stopped at step {step}, {go_on}", end)
        if dd.main and stopped in ("SIGUSR1", "SIGTERM") and args.requeue:
            requeue(end)  # (also with --quiet)
        return EXIT_PREEMPTED
    if stopped == "time budget" and step < steps:
        result.line(f"time budget: stopped at step {step} of {steps}, {skipped} skipped, {go_on}",
                    end)  # fmt: skip
        return 0
    result.line(f"done: {step} steps, {skipped} skipped, checkpoint {held}", end)
    return 0


def lost_contact(e, dd, step: int, saved: int | None, last: Path, before: str) -> None:
    """`train`'s exit callback: a collective that failed because another rank is gone
    (`distributed.lost_contact`) is one line and exit 75, not a traceback; anything else goes on.
    The steps since the last save are lost: that needs every rank (their RNG states). Only rank 0
    knows that its last save was written; another rank says so."""
    if not distributed.lost_contact(e, dd):
        return
    raise Resumable(
        f"lost contact with the other processes after step {step} (a rank died, the network "
        f"failed, or a rank did not answer in time); {last_save(dd, saved, last, before)}"
    ) from None


def last_save(dd, saved: int | None, last: Path, before: str) -> str:
    """What a run that stops without saving holds and how to go on: `last` if this run saved
    (step `saved`; only rank 0 knows that its save was written), else `before` (every rank knows
    that no save was made)."""
    if not dd.main and saved is not None:
        return f"{last} holds rank 0's last save: continue with --resume auto"
    if saved is not None:
        return f"{last} holds step {saved}: continue with --resume auto"
    return before


def checked_backward(opt, loss, params, grad_clip, dd, scaler=None, sync=False):
    """backward + finite check + optional clipping for one part of a step (the generator's, the
    discriminator's). Returns (this rank's flag: loss and gradient norm finite, a 0-dim float32
    tensor on the device; the optimizer to step, None when nothing learns from this loss).
    `sync`: average the gradients across ranks here (parameters outside DDP)."""
    flag = torch.isfinite(loss.detach()).float()
    if opt is None or not loss.requires_grad:  # bicubic; a critic before its phase
        return flag, None
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    params = [p for p in params if p.grad is not None]
    if sync:
        distributed.average_gradients(params, dd)
    if scaler is not None:
        scaler.unscale_(opt)  # scaler.update() then lowers the scale after an overflow
    if params:  # without clipping, only the norm (the finite check): no pass scaling by 1
        norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else
                torch.nn.utils.get_total_norm([p.grad for p in params]))  # fmt: skip
        flag = flag * torch.isfinite(norm)
    return flag, opt


def step_unless_flagged(optimizers: list, ok: torch.Tensor) -> None:
    """Each optimizer's step, which `ok` == 0 turns into nothing.

    The flag is never read on the host (a device-to-host copy would stall the step): it reaches
    Adam's fused kernel as `found_inf`, the mechanism of torch's GradScaler, which then leaves
    the weights, the moments and the step count untouched."""
    for opt in optimizers:
        opt.found_inf = 1 - ok
        try:
            opt.step()
        finally:
            del opt.found_inf


def keep_determinism(cleanup) -> None:
    """Put back, when `cleanup` closes, what set_deterministic and cuDNN's autotuning change: a
    caller of main() (a notebook, a test) that runs without --deterministic afterwards gets
    torch's fast algorithms again, and its later subprocesses the environment it had."""
    cudnn = torch.backends.cudnn
    algorithms = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    flags = cudnn.benchmark, cudnn.deterministic
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")

    def put_back():
        # Only where it changed: the call imports torch._inductor's config, and with it
        # torch._dynamo (~1.3 s of CPU on 2 cores), which a run of a model without weights
        # (bicubic: no optimizer, torch's import it) loads nowhere else
        now = torch.are_deterministic_algorithms_enabled()
        if (now, torch.is_deterministic_algorithms_warn_only_enabled()) != (algorithms, warn_only):
            torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        cudnn.benchmark, cudnn.deterministic = flags
        if config is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = config

    cleanup.callback(put_back)


def set_deterministic() -> None:
    """Deterministic algorithms where PyTorch has them; the rest warn once and stay
    non-deterministic (docs/design.md, "Determinism", lists the GPU operations concerned)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def requeue(say) -> None:
    """Under SLURM, put this job back in the queue (the sbatch script passes --resume auto)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
        say(f"requeued SLURM job {job}")
    except (OSError, subprocess.SubprocessError) as e:
        say(f"could not requeue SLURM job {job} ({e}); resubmit with --resume auto")


@torch.no_grad()
def validate(model, pairs, args, device, out: Path, step: int, run_log, progress,
             stop: dict | None = None) -> float:  # fmt: skip
    """PSNR and NTIRE LR-PSNR of --val-n samples (one of a deterministic model: the others would
    be copies; at --val-temperature, default the model's) on
    held-out images, logged, plus a PNG strip per image (OUT/val/, and TensorBoard); returns the
    PSNR (-inf without images: the ranks other than 0).

    A stop request in `stop` (SIGTERM, SLURM's warning signal) ends it before the next image: a
    whole validation (--val-images 0 --val-crop 0 of a flow) can outlast the signal's lead time,
    and the steps since the last save would be lost to the kill. Then -inf: not scored."""
    if not pairs:
        return -math.inf
    model.eval()
    temperature = (
        model.default_temperature if args.val_temperature is None else args.val_temperature
    )
    n = args.val_n if model.stochastic else 1  # (a deterministic model's n would be copies)
    degraded = degradation(args) is not None
    psnrs, lrpsnrs, nan = [], [], 0
    for done, (stem, hr, lr) in enumerate(pairs):
        sig = stop and stop["signal"]  # (a full disk's stop lets it end: its scores count)
        if sig in SIGNAL_NAMES:
            say_err(f"{PROG}: warning: validation at step {step}: stopped by {sig} after "
                    f"{done} of {len(pairs)} images; not scored (best.pt as it was)")  # fmt: skip
            log(run_log, {"step": step, "signal": sig, "validation": "stopped"})
            return -math.inf
        noise = NoiseSource([sample_seed(args.seed, stem, i) for i in range(n)], device)
        x = torch.from_numpy(lr).permute(2, 0, 1)[None].float().div(255).to(device)
        samples = model.sample(x, n, temperature, noise)[0].cpu()  # (n, 3, sH, sW)
        nan += int(torch.isnan(samples).flatten(1).any(1).sum())
        srs = [to_uint8(s) for s in samples]
        psnrs += [metrics.psnr(sr, hr) for sr in srs]
        # NTIRE: against D(hr), the bicubic downscale of the HR; the degraded LR is the input only
        clean = metrics.downscale(hr, args.scale) if degraded else lr
        lrpsnrs += [metrics.lr_psnr(sr, clean, args.scale) for sr in srs]
        lr_big = np.repeat(np.repeat(lr, args.scale, 0), args.scale, 1)
        strip = np.concatenate([lr_big, *srs, hr], 1)
        path = strip_path(out, stem, step)
        if run_log is None or not run_log.unwritten:  # (after one failed, the others would too)
            try:
                write_png(path, strip)
            except OutputError as e:  # a full disk: the scores still count; saved, then exit 7
                if run_log is None:
                    raise
                why = getattr(e.__cause__, "strerror", None) or e.__cause__ or e
                run_log.strip_unwritten(f"{path}: cannot write ({why})")
        if run_log is not None:
            run_log.image(f"val/{stem}", strip, step)
    if run_log is not None:
        run_log.end_strips()
    if nan:  # to_uint8 makes NaN black: say so rather than score it silently
        what = f"{nan} of {len(psnrs)} samples have NaN pixels (black in the strips, scored so)"
        print(f"{PROG}: warning: validation at step {step}: {what}", file=sys.stderr, flush=True)
    finite = [p for p in lrpsnrs if math.isfinite(p)]
    val = {
        "val_psnr": float(np.mean(psnrs)),
        "val_lrpsnr": float(np.mean(finite)) if finite else math.inf,
    }
    log(run_log, {"step": step, **val})
    progress.message(f"step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in val.items()))
    return val["val_psnr"]


def strip_path(out: Path, stem: str, step: int) -> Path:
    """The validation strip of image `stem` at `step`: OUT/val/step0001000_STEM.png."""
    # An image of a subfolder ("sub/img"): its strips in OUT/val/sub/, as its file's folder
    # (the step's prefix on the folder made a new folder per subfolder at every validation)
    folder, _, base = stem.rpartition("/")
    prefix = f"step{step:07d}_"
    name = fit_name(base, len(prefix) + len(".png"), name_max(out))  # a long stem: cut
    return out / "val" / folder / f"{prefix}{name}.png"


STRIP = re.compile(r"step(\d{7,})_.*\.png", re.DOTALL)  # (a stem may hold a newline)


def prune_strips(out: Path, stems: list[str], step: int, keep: int, best_step: int | None):
    """--keep-strips: delete the validation strips of this run's images (`stems`) of the
    validations before the last `keep` up to `step` (this one counted), but best.pt's
    (`best_step`), and so their TensorBoard event files: a long run validating often filled the
    disk. Only files at the very path a
    validation writes (`strip_path`) go, never another file in OUT/val/; those of steps after
    `step` (a run killed after its last save, now resumed) stay until the run passes them."""
    found: dict[int, list[Path]] = {}
    for folder in {strip_path(out, stem, 0).parent for stem in stems}:
        try:
            names = os.listdir(folder)
        except OSError:  # none yet (or unreadable: the strips' own writes say so)
            continue
        for name in names:
            if match := STRIP.fullmatch(name):
                found.setdefault(int(match[1]), []).append(folder / name)
    for s, paths in list(found.items()):  # (step00001000_x.png, a stem of other images: not ours)
        ours = {strip_path(out, stem, s) for stem in stems}
        found[s] = [p for p in paths if p in ours]
    validated = sorted(s for s, paths in found.items() if paths and s <= step)
    old = [p for s in validated[:-keep] if s != best_step for p in found[s]]
    # --tensorboard: each validation's strips in an event file of its own (`RunLog.image`)
    tb = sorted(tb_strip_files(out))
    tb_kept = [s for s, _ in tb if s <= step][-keep:]  # (steps after `step`, as the PNGs)
    old += [path for s, path in tb if s <= step and s not in tb_kept and s != best_step]
    failed = []
    for path in old:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # (training goes on: the strips are a view of it)
            failed.append(f"{path} ({e.strerror or e})")
    if failed:
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        say_err(f"{PROG}: warning: --keep-strips {keep}: cannot delete the old validation strip "
                f"{failed[0]}{more}; training goes on")  # fmt: skip


def rng_state() -> dict:
    numpy = np.random.get_state()
    return {
        **torch_rng_state(),  # "torch", and "cuda"
        "numpy": torch.from_numpy(numpy[1].astype(np.int64)),
        "numpy_pos": int(numpy[2]),
        "python": random.getstate()[1],
    }


def torch_rng_state() -> dict:
    """The generators a training step draws from: torch's (none of numpy's or Python's, whose
    states take 100 us to read; torch's 1 us)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate((3, tuple(state["python"]), None))
    set_torch_rng_state(state)


def set_torch_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def say_out(text: str) -> None:
    """A line on stdout; on stderr once stdout cannot be written (the closing line then)."""
    if not print_out(text):
        say_err(text)


class Progress:
    """A rich progress bar on a terminal; plain log lines otherwise (SLURM logs). Where they
    cannot be written (`sr_train.py ... | head` once head has its lines, a full disk), the run
    stops as on SIGTERM: it saves last.pt and exits 75, instead of losing the steps since the
    last save to the write's error (before the first step, `train` just stops: exit 7)."""

    def __init__(self, total: int, start: int, stop: dict, quiet: bool = False):
        self.stop, self.quiet = stop, quiet  # --quiet: neither
        self.tty = sys.stdout.isatty() and not quiet
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            )  # fmt: skip
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, rec: dict) -> None:
        keys = [k for k in rec if k not in ("step", "learning_rate", "s_per_step")]
        info = " | ".join(f"{k} {rec[k]:.4g}" for k in keys)
        if self.tty:
            self.bar.update(self.task, completed=step, info=info)
        else:
            self.print(f"step {step} | {info} | {rec['s_per_step']:.3f} s/step")

    def message(self, text: str) -> None:
        if self.tty:  # (not rich markup; one line, as print_out's)
            self.bar.console.print(one_line(text), markup=False)
        else:
            self.print(text)

    def print(self, text: str) -> None:
        if not self.quiet and not print_out(text):
            self.stop["signal"] = f"standard output {stdout_closed()}"  # the loop saves, stops

    def close(self) -> None:
        if self.tty:
            self.bar.stop()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    distributed.exit_process(code)  # without the process group's teardown, where it is still up
