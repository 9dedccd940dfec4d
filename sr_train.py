"""Train one srspace model. Reads top to bottom: args -> data -> model -> optimizer -> loop.

    python sr_train.py --model edsr --scale 4 --data demo --steps 2000 --out runs/edsr_x4
    python sr_train.py --model edsr -h          # run flags and the model's own Config flags

Every flag left unset takes the model's paper recipe (`train_defaults`). The loop is counted in
steps; the batch of step t is a pure function of (seed, rank, t), so `--resume auto` continues
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sr_lib import __version__, distributed, metrics
from sr_lib.checkpoint import load_checkpoint, load_weights, save_checkpoint
from sr_lib.config import parse, pick_device
from sr_lib.data import PatchPairs, load_pairs, to_uint8, train_loader, write_png
from sr_lib.errors import (
    EXIT_PREEMPTED,
    CheckpointError,
    NonFiniteError,
    SRSpaceError,
    UsageError,
    exit_on_error,
)
from sr_lib.models import MODELS, build_model
from sr_lib.models.base import NoiseSource, sample_seed
from sr_lib.resize import imresize

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
    val_temperature: float = field(default=-1.0, metadata=dict(help="default: the model's"))
    cache: str = field(default="", metadata=dict(help="folder for decoded .npy arrays"))
    steps: int = field(default=-1, metadata=dict(help="total steps (default: the paper's)"))
    batch: int = field(default=0, metadata=dict(help="per-process batch (default: paper)"))
    patch: int = field(default=0, metadata=dict(help="LR patch size (default: paper)"))
    learning_rate: float = field(default=0.0, metadata=dict(help="default: the paper's"))
    d_learning_rate: float = field(
        default=0.0, metadata=dict(help="discriminator learning rate (default: the paper's)")
    )
    milestones: list[float] = field(
        default_factory=list,
        metadata=dict(nargs="+", help="multistep decay points as fractions of --steps"),
    )
    gamma: float = field(default=0.0, metadata=dict(help="multistep decay factor"))
    grad_clip: float = field(default=-1.0, metadata=dict(help="max grad norm (0 = off)"))
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
    compile: bool = field(default=False, metadata=dict(help="torch.compile the training forward"))
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
        return train(argv)


def train(argv) -> int:
    args, rest = parse_all(argv)
    out = Path(args.out or f"runs/{args.model or 'run'}_x{args.scale}")
    ckpt_path = {"": None, "auto": out / "last.pt"}.get(args.resume, Path(args.resume))
    resumed = None
    if ckpt_path is not None and ckpt_path.is_file():
        resumed = load_checkpoint(ckpt_path)
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

    # Unset flags take the paper's recipe.
    d = model_cls.train_defaults(args.scale)
    steps = args.steps if args.steps >= 0 else d["steps"]
    batch, patch = args.batch or d["batch"], args.patch or d["patch"]
    base_lr = args.learning_rate or d["learning_rate"]
    d_lr = args.d_learning_rate or d["d_learning_rate"]
    milestones = args.milestones or list(d["milestones"])
    gamma = args.gamma or d["gamma"]
    grad_clip = args.grad_clip if args.grad_clip >= 0 else d["grad_clip"]
    val_temperature = (
        args.val_temperature if args.val_temperature >= 0 else d.get("temperature", 1.0)
    )
    if steps < 0 or batch < 1 or patch < 1:
        raise UsageError("--steps must be >= 0, --batch and --patch >= 1")

    # Processes: one, or one per GPU/CPU slot under torchrun/srun (rank 0 logs, validates, saves).
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
    main_rank = dd.main
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.pt.tmp*"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)
    log_file = open(out / "log.jsonl", "a") if main_rank else None

    def log(record: dict) -> None:
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def say(text: str) -> None:
        if main_rank:
            print(text, flush=True)

    # Data: batch t of rank r is drawn from rng(seed, r, t): workers and resume do not matter.
    if steps > 0:
        dataset = PatchPairs(
            args.data, args.scale, patch, batch, seed=args.seed, rank=dd.rank,
            lr_dirs=args.lr_data or None, cache=args.cache or None,
        )  # fmt: skip
    val_source = args.val_data or ("demo" if args.data == ["demo"] else "")
    val_pairs = []
    if main_rank and val_source and args.val_every > 0:
        val_pairs = load_pairs(val_source, args.scale, max_images=args.val_images or None)
        val_pairs = [centre_crop(p, args.val_crop, args.scale) for p in val_pairs]

    # Model and optimizers (a discriminator, if the model has one, gets its own).
    model = build_model(args.model, cfg).to(device)
    if args.init_from and resumed is None:
        init = load_checkpoint(args.init_from)
        load_weights(model, init.get("state_dict", init), args.init_from)
    gen_params = model.generator_parameters()
    opt = None  # bicubic has nothing to optimise
    if gen_params:
        opt = torch.optim.Adam(
            model.generator_param_groups(), lr=base_lr, betas=tuple(d["betas"]), eps=d["eps"],
            weight_decay=d["weight_decay"],
        )  # fmt: skip
    optimizers = {"g": opt} if opt is not None else {}
    if model.discriminator is not None:
        optimizers["d"] = torch.optim.Adam(
            model.discriminator.parameters(), lr=d_lr, betas=tuple(d["d_betas"]),
            weight_decay=d["d_weight_decay"],
        )  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None

    def get_lr(step: float, length: float, base: float) -> float:
        t, n = step, max(length, 1)
        if d.get("schedule", "multistep") == "cosine":
            eta_min = d.get("eta_min", 0.0)
            return eta_min + 0.5 * (base - eta_min) * (1 + math.cos(math.pi * t / n))
        return base * gamma ** sum(t >= m * n for m in milestones)

    start, skipped, best = (
        (resumed["step"], resumed["skipped"], resumed["best"]) if resumed else (0, 0, -math.inf)
    )
    # Created before the RNG state is restored: making the iterator draws from the torch RNG.
    batches = iter(train_loader(dataset, start, steps, args.workers)) if steps > start else None
    if dd.rank:  # model-internal noise (dequantisation, latents) differs per rank, like the data
        torch.manual_seed(args.seed * 100_003 + dd.rank)
    if resumed is not None:
        load_weights(model, resumed["state_dict"], ckpt_path)
        for k, o in optimizers.items():
            o.load_state_dict(resumed["optimizers"][k])
        if scaler is not None and "scaler" in resumed:
            scaler.load_state_dict(resumed["scaler"])
        rngs = resumed.get("rng_ranks", [resumed["rng"]])
        set_rng_state(rngs[dd.rank] if len(rngs) == dd.world else resumed["rng"])
        say(f"resumed {ckpt_path} at step {start}")
    if hasattr(model, "mark_initialized") and (resumed is not None or args.init_from):
        model.mark_initialized()  # e.g. flows: no data-dependent init after loading weights
    elif dd.on and start < steps:
        # Data-dependent initialisation (ActNorm) on each rank's first batch, then rank 0's
        # statistics everywhere; DDP only broadcasts the weights it is given at construction.
        trainable = [p.requires_grad for p in model.parameters()]
        model.train()
        model.on_step(start, steps)  # e.g. loads a pretrained encoder before the statistics
        with torch.no_grad():
            model(*(x.to(device) for x in dataset[start]))
        distributed.broadcast_state(model, dd)
        for p, t in zip(model.parameters(), trainable):  # DDP must see what on_step may unfreeze
            p.requires_grad_(t)

    # DDP for the generator; a discriminator is stepped outside it with averaged gradients.
    forward = model
    if dd.on and gen_params:
        if model.discriminator is not None:
            ignore = [f"discriminator.{n}" for n, _ in model.discriminator.named_parameters()]
            ignore += [f"discriminator.{n}" for n, _ in model.discriminator.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        ids = [dd.local_rank] if device.type == "cuda" else None
        forward = DDP(model, device_ids=ids, find_unused_parameters=model.ddp_find_unused)
    if args.compile:
        forward = torch.compile(forward)  # checkpoints still save the uncompiled `model`

    def checkpoint(path: Path, step: int) -> None:
        rngs = distributed.gather_objects(rng_state(), dd)  # every rank takes part
        if not main_rank:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            say(f"step {step}: non-finite parameters, {path.name} not written")
            return
        save_checkpoint(path, {
            "model": args.model, "model_cfg": cfg, "step": step, "train_args": asdict(args),
            "state_dict": model.state_dict(), "skipped": skipped, "best": best,
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "rng": rngs[0], "rng_ranks": rngs, "world_size": dd.world,
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        })  # fmt: skip

    # SIGTERM (SLURM end/preemption), SIGUSR1 (SLURM's warning), SIGINT: finish the step, save,
    # exit 75. Ranks agree every step, so all stop at the same step.
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, request_stop)

    say(
        f"srspace {__version__} | {args.model} x{args.scale} | "
        f"{sum(p.numel() for p in model.parameters()):,} params | steps {start}->{steps} | "
        f"batch {batch} x {dd.world} process(es) | LR patch {patch} | device {device} | out {out}"
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = torch.autocast(device.type, amp_dtype) if amp_dtype else contextlib.nullcontext()
    bad, t0, step, logged = 0, time.time(), start, start
    progress = Progress(steps, start) if main_rank else None
    t_start = time.time()
    stopped = None
    for step in range(start, steps):
        over_budget = bool(args.time_budget) and time.time() - t_start > args.time_budget
        if distributed.agree(bool(stop["signal"]) or over_budget, dd, all_ranks=False):
            stopped = stop["signal"] or ("time budget" if over_budget else "signal (other rank)")
            break
        model.train()
        model.on_step(step, steps)
        lr_img, hr_img = (x.to(device, non_blocking=True) for x in next(batches))
        if opt is not None:
            for i, g in enumerate(opt.param_groups):
                g["lr"] = get_lr(*model.schedule_position(i, step, steps), base_lr)
        if "d" in optimizers:
            for g in optimizers["d"].param_groups:
                g["lr"] = get_lr(step, steps, d_lr)
        with autocast:
            out_g = forward(lr_img, hr_img)
        ok = guarded_step(opt, out_g["loss"], model.generator_parameters(), grad_clip, dd, scaler)
        if ok and "d" in optimizers:
            with autocast:
                out_d = model.discriminator_loss(lr_img, hr_img, out_g)
            ok = guarded_step(optimizers["d"], out_d["loss"], model.discriminator.parameters(),
                              grad_clip, dd, scaler, sync=True)  # fmt: skip
            out_g.update({f"d_{k}": v for k, v in out_d.items()})
        if scaler is not None:
            scaler.update()
        if ok:
            bad = 0
        else:
            bad, skipped = bad + 1, skipped + 1
            if bad >= args.max_bad_steps:
                raise NonFiniteError(
                    f"step {step}: {bad} consecutive non-finite losses/gradients; stopped without "
                    f"saving; the last good checkpoint is {out / 'last.pt'} (resume with a lower "
                    "--learning-rate)"
                )
        if args.sync_check_every and (step + 1) % args.sync_check_every == 0:
            diff = distributed.replicas_differ(model, dd)
            log({"step": step + 1, "replica_max_diff": diff})
            if diff != 0:
                raise SRSpaceError(f"step {step + 1}: model replicas differ across ranks ({diff})")
        if main_rank and ((step + 1) % args.log_every == 0 or step + 1 == steps):
            # the rate the first (main) parameter group actually used; groups may have own spans
            lr_now = opt.param_groups[0]["lr"] if opt is not None else get_lr(step, steps, base_lr)
            rec = {"step": step + 1, "learning_rate": lr_now, "skipped": skipped}
            rec.update({k: float(v.detach()) for k, v in out_g.items() if v.ndim == 0})
            rec["s_per_step"] = (time.time() - t0) / (step + 1 - logged)
            t0, logged = time.time(), step + 1
            log(rec)
            progress.update(step + 1, rec)
        if val_pairs and ((step + 1) % args.val_every == 0 or step + 1 == steps):
            val = validate(model, val_pairs, args, val_temperature, device, out, step + 1)
            log({"step": step + 1, **val})
            progress.message(
                f"step {step + 1} | " + " | ".join(f"{k} {v:.3f}" for k, v in val.items())
            )
            if val["val_psnr"] > best:
                best = val["val_psnr"]
                checkpoint(out / "best.pt", step + 1)
        if (step + 1) % args.save_every == 0 and bad == 0:  # never save inside a NaN streak
            checkpoint(out / "last.pt", step + 1)
    else:
        step = steps
    checkpoint(out / "last.pt", step)
    distributed.barrier(dd)
    if progress:
        progress.close()
    if log_file:
        log_file.close()
    distributed.cleanup(dd)
    if stopped and stopped != "time budget":
        say(f"{stopped}: stopped at step {step}, wrote {out / 'last.pt'}; continue with "
            "--resume auto")  # fmt: skip
        if main_rank and stopped in ("SIGUSR1", "SIGTERM") and args.requeue:
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
def validate(model, pairs, args, temperature, device, out: Path, step: int) -> dict:
    """PSNR and NTIRE LR-PSNR of samples on held-out images, plus a PNG grid per image."""
    model.eval()
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
    return {
        "val_psnr": float(np.mean(psnrs)),
        "val_lrpsnr": float(np.mean(finite)) if finite else math.inf,
    }


def centre_crop(pair, size: int, scale: int):
    """Centre-crop a validation HR (to a multiple of 8·scale, keeping the NTIRE mod-8 rule) and
    remake its LR from the crop, so validation stays cheap on large images."""
    stem, hr, lr = pair
    m = 8 * scale
    s = max(size // m * m, m)
    if size <= 0 or (hr.shape[0] <= s and hr.shape[1] <= s):
        return pair
    y, x = (max(0, hr.shape[0] - s) // 2), (max(0, hr.shape[1] - s) // 2)
    hr = hr[y : y + s, x : x + s]
    return stem, hr, imresize(hr, 1 / scale)


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
