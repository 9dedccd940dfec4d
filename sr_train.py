"""Train one srspace model. Reads top to bottom: args -> data -> model -> optimizer -> loop.

    python sr_train.py --model edsr --scale 4 --data demo --steps 2000 --out runs/edsr_x4
    python sr_train.py --model edsr -h          # run flags and the model's own Config flags

Every flag left unset takes the model's paper recipe (`Model.recipe(scale)`). The loop is counted
in steps; the batch of step t is a pure function of (seed, rank, t), so `--resume auto` continues
exactly. Exit codes: README "Exit codes" (75 = stopped by a signal, resume with --resume auto).
"""

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sr_lib import __version__, distributed, metrics
from sr_lib.checkpoint import save_checkpoint
from sr_lib.config import parse, pick_device
from sr_lib.data import PatchPairs, load_pairs, to_uint8, train_loader, write_png
from sr_lib.ema import EMA
from sr_lib.errors import (
    EXIT_PREEMPTED,
    CheckpointError,
    NonFiniteError,
    SRSpaceError,
    UsageError,
    exit_on_error,
)
from sr_lib.models import MODELS, build_model, read_checkpoint
from sr_lib.models.base import NoiseSource, Recipe, sample_seed

PROG = "sr_train.py"


@dataclass
class TrainArgs:
    model: str = field(default="", metadata=dict(help=f"one of: {', '.join(MODELS)}"))
    scale: int = field(default=4, metadata=dict(choices=[2, 3, 4, 8]))
    data: list[str] = field(
        default_factory=lambda: ["demo"],
        metadata=dict(nargs="+", help="HR image folders (recursive), or 'demo'"),
    )
    lr_data: list[str] = field(
        default_factory=list, metadata=dict(nargs="+", help="paired LR folders, one per --data")
    )
    val_data: str = field(default="", metadata=dict(help="validation HR folder or 'demo'"))
    val_images: int = field(default=3, metadata=dict(help="validation images used (0 = all)"))
    val_crop: int = field(default=384, metadata=dict(help="centre-crop val HR to this (0 = off)"))
    val_n: int = field(default=3, metadata=dict(help="samples per validation image"))
    val_temperature: float | None = field(
        default=None, metadata=dict(type=float, help="default: the model's")
    )
    cache: str = field(default="", metadata=dict(help="folder for decoded .npy arrays"))
    # Unset (None): the model's recipe.
    steps: int | None = field(
        default=None, metadata=dict(type=int, help="total steps (default: the paper's)")
    )
    batch: int | None = field(
        default=None, metadata=dict(type=int, help="per-process batch (default: paper)")
    )
    patch: int | None = field(
        default=None, metadata=dict(type=int, help="LR patch size (default: paper)")
    )
    learning_rate: float | None = field(
        default=None, metadata=dict(type=float, help="default: the paper's")
    )
    d_learning_rate: float | None = field(
        default=None,
        metadata=dict(type=float, help="discriminator learning rate (default: the paper's)"),
    )
    milestones: list[float] | None = field(
        default=None,
        metadata=dict(
            nargs="*", type=float,
            help="multistep decay points as fractions of --steps (the flag alone: no decay)",
        ),
    )  # fmt: skip
    gamma: float | None = field(
        default=None, metadata=dict(type=float, help="multistep decay factor")
    )
    grad_clip: float | None = field(
        default=None, metadata=dict(type=float, help="max grad norm (0 = off)")
    )
    init_from: str = field(default="", metadata=dict(help="start from these weights (fine-tune)"))
    out: str = field(default="", metadata=dict(help="run folder (default runs/MODEL_xSCALE)"))
    resume: str = field(default="", metadata=dict(help="'auto' (DIR/last.pt) or a checkpoint"))
    seed: int = 0
    device: str = field(default="auto", metadata=dict(help="auto, cpu, cuda, cuda:1, ..."))
    workers: int = field(default=2, metadata=dict(help="data loader processes (0 = inline)"))
    log_every: int = 100
    val_every: int = 1000
    save_every: int = 1000
    max_bad_steps: int = field(default=20, metadata=dict(help="stop after this many NaN steps"))
    time_budget: float = field(
        default=0.0, metadata=dict(help="stop cleanly (save, exit 0) after this many seconds")
    )
    amp: str = field(
        default="none",
        metadata=dict(
            choices=["none", "bf16", "fp16"],
            help="mixed precision: bf16 (CUDA, or a CPU with native bf16) or fp16 (CUDA)",
        ),
    )
    compile: bool = field(
        default=False,
        metadata=dict(help="torch.compile the training forward (flows: each repeated block)"),
    )
    ema: float = field(
        default=0.0,
        metadata=dict(
            help="keep an exponential moving average of the weights with this decay, e.g. 0.999 "
            "(0 = off): validation, best.pt and sr_sample.py use it"
        ),
    )
    deterministic: bool = field(
        default=False, metadata=dict(help="deterministic algorithms only (README: what it costs)")
    )
    sync_check_every: int = field(
        default=0, metadata=dict(help="multi-process: verify replicas agree every K steps")
    )
    requeue: bool = field(
        default=True, metadata=dict(help="under SLURM, requeue the job after SIGUSR1/SIGTERM")
    )


def parse_all(argv):
    """Two-stage parsing: run flags, then the chosen model's Config flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    want_help = "-h" in argv or "--help" in argv
    argv = [a for a in argv if a not in ("-h", "--help")]
    args, rest = parse(TrainArgs, argv, PROG, known=True, add_help=False)
    if want_help:
        from argparse_dataclass import ArgumentParser

        ArgumentParser(TrainArgs, prog=PROG).print_help()
        if args.model in MODELS:
            print(f"\n{args.model} model options:")
            ArgumentParser(
                MODELS[args.model].Config, prog=f"{PROG} --model {args.model}"
            ).print_help()
        raise SystemExit(0)
    return args, rest


def main(argv=None) -> int:
    with exit_on_error(PROG):
        return train(*parse_all(argv))


def train(args: TrainArgs, rest: list[str]) -> int:
    out, ckpt_path, resumed, cfg, recipe = resolve_run(args, rest)
    dd, device = setup_process(args)
    say = (lambda text: print(text, flush=True)) if dd.main else (lambda text: None)
    log_file = open_run_folder(out) if dd.main else None  # rank 0 logs, validates and saves

    # Data: batch t of rank r is drawn from rng(seed, r, t): workers and resume do not matter.
    steps, dataset = recipe.steps, None
    if steps > 0:
        dataset = PatchPairs(
            args.data, args.scale, recipe.patch, recipe.batch, seed=args.seed, rank=dd.rank,
            lr_dirs=args.lr_data or None, cache=args.cache or None,
        )  # fmt: skip
    val_pairs = validation_pairs(args, dd)
    # Every rank takes part in saving best.pt (its RNG state is gathered): all must know when.
    val_every = args.val_every if distributed.agree(bool(val_pairs), dd, all_ranks=False) else 0

    # Model and optimizers; the state of a resumed run.
    model = build_model(args.model, cfg).to(device)
    if args.init_from and resumed is None:
        init = read_checkpoint(args.init_from)  # its averaged weights if it has them (--ema)
        model.load_weights(init.get("ema_state_dict", init.get("state_dict", init)), args.init_from)
    optimizers = build_optimizers(model, recipe)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    start, skipped, best = (
        (resumed["step"], resumed["skipped"], resumed["best"]) if resumed else (0, 0, -math.inf)
    )
    # Created before the RNG state is restored: making the iterator draws from the torch RNG.
    # On CUDA: from pinned memory, copied without blocking, converted on the device.
    loader = train_loader(dataset, start, steps, args.workers, device.type == "cuda", device)
    batches = iter(loader) if steps > start else None
    if dd.rank:  # model-internal noise (dequantisation, latents) differs per rank, like the data
        torch.manual_seed(args.seed * 100_003 + dd.rank)
    if resumed is not None:
        restore(resumed, ckpt_path, model, optimizers, scaler, dd)
        say(f"resumed {ckpt_path} at step {start}")
    initialize(model, dataset, start, steps, bool(resumed or args.init_from), dd, device,
               args.compile or args.ema > 0)  # fmt: skip
    ema = EMA(model, args.ema, resumed, ckpt_path) if args.ema and dd.main else None  # pre-compile
    forward = wrap(model, dd, device, args.compile)
    stop = catch_signals()
    say(f"srspace {__version__} | {args.model} x{args.scale} | "
        f"{sum(p.numel() for p in model.parameters()):,} params | steps {start}->{steps} | "
        f"batch {recipe.batch} x {dd.world} process(es) | LR patch {recipe.patch} | device {device}"
        f" | out {out}")  # fmt: skip
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, amp_dtype) if amp_dtype else contextlib.nullcontext()
    meta = dict(model=args.model, model_cfg=cfg, train_args=asdict(args))  # in every checkpoint
    progress = Progress(steps, start) if dd.main else None
    bad, stopped, t0, t_start, logged = 0, None, time.time(), time.time(), start

    for step in range(start, steps):
        over_budget = bool(args.time_budget) and time.time() - t_start > args.time_budget
        if distributed.agree(bool(stop["signal"]) or over_budget, dd, all_ranks=False):
            stopped = stop["signal"] or ("time budget" if over_budget else "signal (other rank)")
            break
        out_g, ok = train_step(model, forward, optimizers, batches, step, recipe, dd, scaler,
                               autocast)  # fmt: skip
        bad, skipped = (0, skipped) if ok else (bad + 1, skipped + 1)
        if ema is not None:
            ema.update(ok)  # a skipped step leaves the average as it is
        if not ok and bad >= args.max_bad_steps:
            raise NonFiniteError(
                f"step {step}: {bad} consecutive non-finite losses/gradients; stopped without "
                f"saving; the last good checkpoint is {out / 'last.pt'} (resume with a lower "
                "--learning-rate)"
            )
        if args.sync_check_every and (step + 1) % args.sync_check_every == 0:
            check_replicas(model, dd, step + 1, log_file)
        if dd.main and ((step + 1) % args.log_every == 0 or step + 1 == steps):
            scalars = {k: float(v.detach()) for k, v in out_g.items() if v.ndim == 0}
            rate = current_learning_rate(optimizers, step, recipe)
            rec = {"step": step + 1, "learning_rate": rate, "skipped": skipped, **scalars}
            rec["s_per_step"] = (time.time() - t0) / (step + 1 - logged)
            t0, logged = time.time(), step + 1
            log(log_file, rec)
            progress.update(step + 1, rec)
        if val_every and ((step + 1) % val_every == 0 or step + 1 == steps):
            net = ema.module if ema is not None else model  # with --ema, the averaged weights
            score = validate(net, val_pairs, args, device, out, step + 1, log_file, progress)
            if distributed.agree(score > best, dd, all_ranks=False):  # rank 0's verdict
                best = score
                save(out / "best.pt", step + 1, skipped, best, model, optimizers, scaler, dd, meta,
                     ema)  # fmt: skip
        if (step + 1) % args.save_every == 0 and bad == 0:  # never save inside a NaN streak
            save(out / "last.pt", step + 1, skipped, best, model, optimizers, scaler, dd, meta, ema)
    else:
        step = steps
    save(out / "last.pt", step, skipped, best, model, optimizers, scaler, dd, meta, ema)
    return finish(stopped, step, skipped, out, args, dd, (progress, log_file), say)


def resolve_run(args: TrainArgs, rest: list[str]):
    """(run folder, checkpoint path, resumed checkpoint or None, model config, recipe).

    A resumed run takes its model from the checkpoint (`args.model` is set) and its config; model
    flags repeated by a requeued job must agree with it. Unset run flags take the recipe."""
    out = Path(args.out or f"runs/{args.model or 'run'}_x{args.scale}")
    ckpt_path = {"": None, "auto": out / "last.pt"}.get(args.resume, Path(args.resume))
    resumed = None
    if ckpt_path is not None and ckpt_path.is_file():
        resumed = read_checkpoint(ckpt_path)
        if "optimizers" not in resumed:
            raise CheckpointError(f"{ckpt_path}: holds weights only, no training state to resume")
        if args.model and args.model != resumed["model"]:
            raise CheckpointError(f"{ckpt_path}: is a {resumed['model']!r} run, not {args.model!r}")
        if resumed["model_cfg"]["scale"] != args.scale:
            raise CheckpointError(
                f"{ckpt_path}: is a x{resumed['model_cfg']['scale']} run, not --scale {args.scale}"
            )
        args.model = resumed["model"]
    elif args.resume not in ("", "auto"):
        raise CheckpointError(f"{args.resume}: no such checkpoint to resume from")
    elif (out / "last.pt").is_file():
        raise UsageError(
            f"{out} already holds a run (last.pt); pass --resume auto to continue it or a new --out"
        )
    if args.model not in MODELS:
        raise UsageError(f"--model: choose one of {', '.join(MODELS)} (got {args.model!r})")
    model_cls = MODELS[args.model]
    model_flags = parse(model_cls.Config, rest, f"{PROG} --model {args.model}")
    cfg = {**asdict(model_flags), "scale": args.scale}
    if resumed is not None:  # a requeued job repeats its flags: allowed if they agree
        given = {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in rest}
        changed = [k for k in given if k in cfg and cfg[k] != resumed["model_cfg"].get(k)]
        if changed:
            raise UsageError(f"model flags {changed} differ from {ckpt_path}; they cannot change")
        cfg = dict(resumed["model_cfg"])
    return out, ckpt_path, resumed, cfg, parse_recipe(args, model_cls.recipe(args.scale))


def parse_recipe(args: TrainArgs, recipe: Recipe) -> Recipe:
    """The model's recipe with every run flag that was given (not None) in its place."""
    milestones = None if args.milestones is None else tuple(args.milestones)
    given = dict(steps=args.steps, batch=args.batch, patch=args.patch,
                 learning_rate=args.learning_rate, d_learning_rate=args.d_learning_rate,
                 milestones=milestones, gamma=args.gamma, grad_clip=args.grad_clip)  # fmt: skip
    recipe = replace(recipe, **{k: v for k, v in given.items() if v is not None})
    if recipe.steps < 0 or recipe.batch < 1 or recipe.patch < 1:
        raise UsageError("--steps must be >= 0, --batch and --patch >= 1")
    if not 0 <= args.ema < 1:
        raise UsageError(f"--ema {args.ema}: a decay in [0, 1), e.g. 0.999 (0 = off)")
    return recipe


def setup_process(args: TrainArgs) -> tuple[distributed.Dist, torch.device]:
    """One process, or one per GPU/CPU slot under torchrun/srun; its device; seeded RNGs."""
    device = pick_device(args.device)
    dd = distributed.setup(use_cuda=device.type == "cuda")
    if dd.on and device.type == "cuda":
        device = torch.device("cuda", dd.local_rank)
    if args.deterministic:
        set_deterministic()
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError(f"--amp fp16 needs a CUDA device (got {device}); on a CPU use --amp bf16")
    if args.amp == "bf16" and device.type == "cpu" and dd.main and not cpu_has_bf16():
        # it still runs (emulated), only slower than float32: say so once, do not refuse
        warning = "this CPU has no native bfloat16 (AVX512-BF16 or AMX); emulated bf16 is slower"
        print(f"{PROG}: warning: --amp bf16: {warning} than float32, drop --amp", file=sys.stderr)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    return dd, device


def open_run_folder(out: Path):
    """Create the run folder, remove temp files of a process killed while saving; the log file."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.pt.tmp*"):
        stale.unlink(missing_ok=True)
    return open(out / "log.jsonl", "a")


def log(log_file, record: dict) -> None:
    """One JSON line of OUT/log.jsonl (rank 0; the other ranks have no file)."""
    if log_file:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()


def validation_pairs(args: TrainArgs, dd) -> list:
    """Held-out (stem, HR, LR) pairs on rank 0 (--val-data, or the demo's when training on it)."""
    source = args.val_data or ("demo" if args.data == ["demo"] else "")
    if not (dd.main and source and args.val_every > 0):
        return []
    return load_pairs(source, args.scale, max_images=args.val_images or None, crop=args.val_crop)


def build_optimizers(model, recipe: Recipe) -> dict[str, torch.optim.Optimizer]:
    """Adam for the generator ("g", absent for a model with nothing to learn) and, if the model
    has a discriminator, its own ("d")."""
    optimizers = {}
    if model.generator_parameters():
        optimizers["g"] = torch.optim.Adam(
            model.generator_param_groups(), lr=recipe.learning_rate, betas=recipe.betas,
            eps=recipe.eps, weight_decay=recipe.weight_decay,
        )  # fmt: skip
    if model.discriminator is not None:
        optimizers["d"] = torch.optim.Adam(
            model.discriminator.parameters(), lr=recipe.d_learning_rate, betas=recipe.d_betas,
            weight_decay=recipe.d_weight_decay,
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


def set_learning_rates(optimizers: dict, model, step: int, recipe: Recipe) -> None:
    """Every parameter group at its own place in the schedule (a model's phases may differ)."""
    for i, g in enumerate(optimizers["g"].param_groups if "g" in optimizers else []):
        t, length = model.schedule_position(i, step, recipe.steps)
        g["lr"] = learning_rate_at(t, recipe, length)
    for g in optimizers["d"].param_groups if "d" in optimizers else []:
        g["lr"] = learning_rate_at(step, recipe, base=recipe.d_learning_rate)


def current_learning_rate(optimizers: dict, step: int, recipe: Recipe) -> float:
    """The rate the first (main) parameter group used at `step` (groups may have own phases)."""
    if "g" in optimizers:
        return optimizers["g"].param_groups[0]["lr"]
    return learning_rate_at(step, recipe)


def restore(resumed: dict, path: Path, model, optimizers: dict, scaler, dd) -> None:
    """Weights, optimizers, loss scaler and this rank's RNG states of a resumed run."""
    model.load_weights(resumed["state_dict"], path)
    for k, o in optimizers.items():
        o.load_state_dict(resumed["optimizers"][k])
    if scaler is not None and "scaler" in resumed:
        scaler.load_state_dict(resumed["scaler"])
    rngs = resumed.get("rng_ranks", [resumed["rng"]])
    set_rng_state(rngs[dd.rank] if len(rngs) == dd.world else resumed["rng"])


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
        model.on_step(start, steps)  # e.g. loads a pretrained encoder before the statistics
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
    return compile_model(model, forward) if compile else forward


def compile_model(model, forward, backend: str = "inductor"):
    """--compile. A model that names `compile_regions` (its repeated blocks: a flow's steps and
    splits, RRDB blocks) has each such module compiled on its own, so a network of hundreds of
    layers becomes a few small graphs, one per distinct block and shape, compiled in seconds;
    `forward` is returned as it is. Other models: their whole training forward is compiled."""
    if not model.compile_regions:
        return torch.compile(forward, backend=backend)
    # Each level's shapes, a transition and a conditional step, the first step's input without
    # gradient and an encoder frozen or not are distinct graphs of the same code: more than
    # dynamo's default limit of 8 per code object (beyond it, it would silently run eagerly).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for m in model.modules():
        if isinstance(m, model.compile_regions):
            m.compile(backend=backend)
    return forward


def catch_signals() -> dict:
    """SIGTERM (SLURM end/preemption), SIGUSR1 (SLURM's warning), SIGINT: recorded in the dict;
    the loop finishes the step, saves and exits 75. Ranks agree every step, so all stop at the
    same step."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, request_stop)
    return stop


def train_step(model, forward, optimizers, batches, step, recipe, dd, scaler, autocast):
    """Training step `step`: the generator, then the discriminator. Returns forward's output
    (with the discriminator's parts as d_*) and False if the step was skipped as non-finite."""
    model.train()
    model.on_step(step, recipe.steps)
    lr, hr = next(batches)  # on the device already (train_loader)
    set_learning_rates(optimizers, model, step, recipe)
    with autocast:
        out = forward(lr, hr)
    params = model.generator_parameters()
    ok = guarded_step(optimizers.get("g"), out["loss"], params, recipe.grad_clip, dd, scaler)
    if ok and "d" in optimizers:
        with autocast:
            out_d = model.discriminator_loss(lr, hr, out)
        ok = guarded_step(optimizers["d"], out_d["loss"], model.discriminator.parameters(),
                          recipe.grad_clip, dd, scaler, sync=True)  # fmt: skip
        out.update({f"d_{k}": v for k, v in out_d.items()})
    if scaler is not None:
        scaler.update()
    return out, ok


def check_replicas(model, dd, step: int, log_file) -> None:
    """--sync-check-every: stop if the model replicas of the ranks differ."""
    diff = distributed.replicas_differ(model, dd)
    log(log_file, {"step": step, "replica_max_diff": diff})
    if diff != 0:
        raise SRSpaceError(f"step {step}: model replicas differ across ranks ({diff})")


def save(path: Path, step, skipped, best, model, optimizers: dict, scaler, dd, meta, ema) -> None:
    """Write a checkpoint on rank 0 (every rank takes part: their RNG states are gathered): the
    weights, optimizers, RNG states, counters, `meta` (model name and config, run flags) and the
    weight average (--ema)."""
    rngs = distributed.gather_objects(rng_state(), dd)
    if not dd.main:
        return
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        print(f"step {step}: non-finite parameters, {path.name} not written", flush=True)
        return
    save_checkpoint(path, {
        **meta, "step": step, "state_dict": model.state_dict(), "skipped": skipped, "best": best,
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "rng": rngs[0], "rng_ranks": rngs, "world_size": dd.world,
        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        **(ema.state_dict() if ema is not None else {}),
    })  # fmt: skip


def finish(stopped: str | None, step: int, skipped: int, out: Path, args, dd, files, say) -> int:
    """Close the progress bar and the log, leave the process group; the closing line and the exit
    code: 75 after a signal (resume with --resume auto; under SLURM the job is requeued after
    SIGUSR1/SIGTERM), else 0."""
    distributed.barrier(dd)
    for f in files:
        if f is not None:
            f.close()
    distributed.cleanup(dd)
    if stopped and stopped != "time budget":
        say(f"{stopped}: stopped at step {step}, wrote {out / 'last.pt'}; continue with "
            "--resume auto")  # fmt: skip
        if dd.main and stopped in ("SIGUSR1", "SIGTERM") and args.requeue:
            requeue(say)
        return EXIT_PREEMPTED
    say(f"done: {step} steps, {skipped} skipped, checkpoint {out / 'last.pt'}")
    return 0


def guarded_step(opt, loss, params, grad_clip, dd, scaler=None, sync=False) -> bool:
    """backward + finite check (agreed by all ranks) + optional clipping + step.

    A non-finite loss or gradient on any rank skips the step everywhere and changes nothing.
    `sync`: average the gradients across ranks here (parameters outside DDP).
    """
    finite = bool(torch.isfinite(loss.detach()))
    if opt is None or not loss.requires_grad:  # e.g. bicubic: nothing to learn
        return distributed.agree(finite, dd)
    opt.zero_grad(set_to_none=True)
    if finite or dd.on:  # under DDP every rank must join the gradient all-reduce
        (scaler.scale(loss) if scaler is not None else loss).backward()
    params = [p for p in params if p.grad is not None]
    if sync:
        distributed.average_gradients(params, dd)
    if scaler is not None:
        scaler.unscale_(opt)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
    if not distributed.agree(finite and bool(torch.isfinite(norm)), dd):
        opt.zero_grad(set_to_none=True)
        return False
    scaler.step(opt) if scaler is not None else opt.step()
    return True


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX); what that buys:
    README, `--amp bf16`."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # private; no public API yet
    except (AttributeError, RuntimeError):
        return False


def set_deterministic() -> None:
    """Deterministic algorithms where PyTorch has them; the rest warn once and stay
    non-deterministic (README lists the GPU operations concerned)."""
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
def validate(model, pairs, args, device, out: Path, step: int, log_file, progress) -> float:
    """PSNR and NTIRE LR-PSNR of --val-n samples (at --val-temperature, default the model's) on
    held-out images, logged, plus a PNG strip per image; returns the PSNR (-inf without images:
    the ranks other than 0)."""
    if not pairs:
        return -math.inf
    model.eval()
    temperature = (
        model.default_temperature if args.val_temperature is None else args.val_temperature
    )
    psnrs, lrpsnrs = [], []
    for stem, hr, lr in pairs:
        noise = NoiseSource([sample_seed(args.seed, stem, i) for i in range(args.val_n)], device)
        x = torch.from_numpy(lr).permute(2, 0, 1)[None].float().div(255).to(device)
        srs = [to_uint8(s) for s in model.sample(x, args.val_n, temperature, noise)[0].cpu()]
        psnrs += [metrics.psnr(sr, hr) for sr in srs]
        lrpsnrs += [metrics.lr_psnr(sr, lr, args.scale) for sr in srs]  # lr = D(hr), NTIRE
        lr_big = np.repeat(np.repeat(lr, args.scale, 0), args.scale, 1)
        write_png(out / "val" / f"step{step:07d}_{stem}.png", np.concatenate([lr_big, *srs, hr], 1))
    finite = [p for p in lrpsnrs if math.isfinite(p)]
    val = {
        "val_psnr": float(np.mean(psnrs)),
        "val_lrpsnr": float(np.mean(finite)) if finite else math.inf,
    }
    log(log_file, {"step": step, **val})
    progress.message(f"step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in val.items()))
    return val["val_psnr"]


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": random.getstate()[1],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Progress:
    """A rich progress bar on a terminal; plain log lines otherwise (SLURM logs)."""

    def __init__(self, total: int, start: int):
        self.tty = sys.stdout.isatty()
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
            print(f"step {step} | {info} | {rec['s_per_step']:.3f} s/step", flush=True)

    def message(self, text: str) -> None:
        (self.bar.console.print if self.tty else print)(text)

    def close(self) -> None:
        if self.tty:
            self.bar.stop()


if __name__ == "__main__":
    raise SystemExit(main())
