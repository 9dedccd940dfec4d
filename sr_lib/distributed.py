"""torch.distributed for sr_train.py: torchrun or SLURM (srun) environments, no launcher of ours.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (no torchrun) the
same values come from SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID and the first host of
the step's nodes, SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST). Backend: NCCL on GPUs, gloo
on CPU. Rank 0 logs, validates and saves.
"""

import atexit
import gc
import os
import re
import sys
import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sr_lib.errors import NodeWarning, Resumable, UsageError, said_error
from sr_lib.threads import result


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    host_group: object = None  # with NCCL: a gloo group for host-side agreement (see `agree`)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[003-006,9],cpu1' -> 'gpu003'. A host pattern may go
    on after its brackets or have several: 'node[01-04]-ib' -> 'node01-ib',
    'rack[1-2]-n[01-08]' -> 'rack1-n01'."""
    # the first host pattern: up to the first comma outside brackets
    pattern = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist.strip()).group(0)
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split("[,-]", m.group(1))[0], pattern)


def env_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of this process as torchrun (RANK, WORLD_SIZE, LOCAL_RANK)
    or srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID) describe it; None: a single
    process. The world is srun's step, not SLURM_NTASKS: the job script itself (SLURM's batch
    step, one process) has SLURM_NTASKS, the job's task count, and SLURM_PROCID 0 too."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and _env_int("SLURM_STEP_NUM_TASKS", 1) > 1:
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    else:
        return None
    rank, world, local = (_env_int(k, 0) for k in names)
    if not 0 <= rank < world or local < 0:
        raise UsageError(
            f"{names[0]}={rank} with {names[1]}={world}: not a rank of that world (0 to "
            f"{world - 1}); start the processes with torchrun or srun, which set these"
        )
    return rank, world, local


def _env_int(name: str, default: int) -> int:
    """Environment variable `name` (the launcher's) as an int; a value that is not one is a usage
    error naming it: int() raised a traceback from the first line of every script."""
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise UsageError(
            f"${name}={text!r}: not a whole number; it is set by torchrun or srun: unset it to run "
            "one process, or start the processes with torchrun or srun"
        ) from None


def warn_once() -> None:
    """Under torchrun/srun, a warning that every rank meets alike (a flag with no effect, torch's
    own) is printed by rank 0 alone: each rank printed it, 64 copies in a 64-rank job's log. A
    NodeWarning (this node's copy of the images, its --cache) is printed by the rank that meets
    it, naming it: another node's copy may be fine. From the environment, before the ranks meet
    (the flags are checked first); inside warnings.catch_warnings(), which puts all back."""
    ranks = env_ranks()
    if ranks is None or ranks[1] == 1:
        return
    rank, show = ranks[0], warnings.showwarning
    if rank:
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", NodeWarning)

    def named(message, category, *args, **kwargs):
        if issubclass(category, NodeWarning):
            message = f"rank {rank}: {message}"
        show(message, category, *args, **kwargs)

    warnings.showwarning = named


def check_not_batch_step() -> None:
    """A job of several tasks whose script runs `python sr_train.py` without srun (or torchrun):
    one process, where the job asked for SLURM_NTASKS. Taken for rank 0 of that many, it waited
    silently for the others, which never come, for the process group's timeout (30 minutes),
    deaf to SLURM's signals meanwhile (inside torch's rendezvous)."""
    env = os.environ
    tasks = env.get("SLURM_NTASKS", "1")
    launched = "SLURM_STEP_NUM_TASKS" in env or ("RANK" in env and "WORLD_SIZE" in env)
    if "SLURM_PROCID" in env and tasks.isdigit() and int(tasks) > 1 and not launched:
        raise UsageError(
            f"SLURM_NTASKS is {tasks} but this process was not started by srun (the job script "
            f"runs it itself): start one process per task with `srun python sr_train.py ...` "
            f"(or torchrun), or ask for --ntasks=1"
        )


def setup(use_cuda: bool) -> Dist:
    """Join the process group if the environment describes one; else a single process."""
    env = os.environ
    ranks = env_ranks()
    if ranks is None:
        check_not_batch_step()
        return Dist()
    rank, world, local = ranks
    if "RANK" not in env or "WORLD_SIZE" not in env:  # srun: torch's rendezvous reads these
        # The step's nodes: srun may run on a part of the job's (--relative, --nodelist), where
        # the job's first node runs no rank to answer.
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        env.setdefault("MASTER_ADDR", first_host(nodes))
        # A job-specific port, so two jobs sharing a node do not collide.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    if world == 1:
        return Dist()
    if use_cuda:
        torch.cuda.set_device(local)
    host_group = meet("nccl" if use_cuda else "gloo", rank, world, local if use_cuda else None)
    return Dist(rank, world, local, host_group)


_meeting = {"thread": None}  # `meet`'s thread: alive while it waits for the other ranks


def meet(backend: str, rank: int, world: int, device: int | None):
    """init_process_group, and with NCCL the gloo group for `agree` (returned): they wait for
    every rank to start, minutes where a node imports torch from a slow file system, the process
    group's timeout (30 minutes for gloo) for one that never comes. Python runs signal handlers
    in the main thread only, between bytecodes: waiting in torch's call, SLURM's SIGTERM/SIGUSR1
    and Ctrl-C went unheard until it returned. So the ranks meet in a helper thread, and the
    main thread waits in 0.1 s slices (sr_lib/threads.py `result`): a signal's handler stops the
    run at once. The thread is then left waiting (a daemon: nothing joins it), and
    `exit_process` skips the interpreter's finalization, which would run C++ destructors under
    it. A rank that cannot meet the others (no answer at MASTER_ADDR:MASTER_PORT within the
    timeout, a host name that does not resolve) is one line, exit 75: nothing was trained, and
    torch's own log lines above it say what it tried."""
    future = Future()

    def run():
        try:
            if device is not None:  # CUDA's current device is per thread: this one's too
                torch.cuda.set_device(device)
            dist.init_process_group(backend, rank=rank, world_size=world)
            future.set_result(dist.new_group(backend="gloo") if device is not None else None)
        except BaseException as e:
            future.set_exception(e)

    _meeting["thread"] = threading.Thread(target=run, name="rendezvous", daemon=True)
    _meeting["thread"].start()
    try:
        return result(future)
    except dist.DistError as e:
        what = said_error(e).rstrip(".")  # (torch's lines, joined)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise Resumable(
            f"could not meet the other processes at {where} (this is rank {rank} of {world}): "
            f"{what}; check that every rank started and can reach that address, then rerun "
            "(nothing was trained)"
        ) from None


def agree(flag: bool, d: Dist, all_ranks: bool = True) -> bool:
    """all_ranks=True: True only if every rank says True; False: True if any rank does.

    A host-side decision (e.g. a signal arrived), agreed among the ranks' CPUs (gloo, also next
    to NCCL): asked every step, it must not wait for the GPU's queue of work to drain."""
    if not d.on:
        return flag
    return bool(_host_reduce(int(flag), dist.ReduceOp.MIN if all_ranks else dist.ReduceOp.MAX, d))


def most(value: int, d: Dist) -> int:
    """The largest of the ranks' `value`s, agreed on the host as `agree` is: a choice among
    several outcomes (why the loop stops), where a flag would say only that one happened."""
    return _host_reduce(value, dist.ReduceOp.MAX, d) if d.on else value


def _host_reduce(value: int, op, d: Dist) -> int:
    t = torch.tensor([value])
    dist.all_reduce(t, op=op, group=d.host_group)
    return int(t.item())


def all_min_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """t, in place, the minimum over the ranks (a device-side flag such as "this step was
    finite"); nothing is read back to the host."""
    if d.on:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def lost_contact(e: BaseException, d: Dist) -> bool:
    """Whether `e` is a collective that failed because another rank is gone (killed, its node or
    network down) or silent past the process group's timeout (torch's defaults: 30 min for
    gloo, 10 min for NCCL). torch raises a DistError for NCCL and its rendezvous store; gloo a
    plain RuntimeError, whose text names the transport's source file
    ("[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer"): no bug of ours does."""
    return d.on and (
        isinstance(e, dist.DistError)
        or (isinstance(e, RuntimeError) and "gloo/transport/" in str(e))
    )


def average_gradients(params, d: Dist) -> None:
    """All-reduce the gradients of params not managed by DDP (e.g. a discriminator)."""
    if not d.on:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= d.world
        for g, v in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(v.view_as(g))


def broadcast_state(module: torch.nn.Module, d: Dist) -> None:
    """Copy rank 0's parameters and buffers to every rank (after ActNorm's data init). DDP's
    construction, which follows, copies those it wraps too; this also covers what DDP is told to
    ignore (a discriminator, stepped outside it: `wrap`), which no model initialises from data
    today, so no test sees it off alone (the two-process tests do with both off)."""
    if d.on:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)


def replicas_differ(module: torch.nn.Module, d: Dist) -> float:
    """Max over ranks of |checksum - rank 0's checksum| of all parameters (0.0 = in sync)."""
    if not d.on:
        return 0.0
    with torch.no_grad():
        s = sum((p.double() * (1 + i % 7)).sum() for i, p in enumerate(module.parameters()))
        s = torch.as_tensor(s, dtype=torch.float64, device=_device(d)).reshape(1)
    gathered = [torch.zeros_like(s) for _ in range(d.world)]
    dist.all_gather(gathered, s)
    return float(max((g - gathered[0]).abs().item() for g in gathered))


def gather_objects(obj, d: Dist) -> list:
    if not d.on:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def cleanup(d: Dist) -> None:
    """Destroy the process group while the interpreter is alive, after the objects that held
    it (DDP's reducer sits in reference cycles): a gloo group left to the exit's destructors
    aborted the process now and then ("terminate called without an active exception")."""
    if d.on and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def exit_process(code) -> None:
    """End the script with exit code `code`. A process group still up here was left on an
    error (a rank lost, a one-line error on one rank): left to the interpreter's finalization,
    gloo's C++ teardown with a peer gone aborted the process now and then ("terminate called
    without an active exception", exit 134 in place of 75: 1 in about 40 runs of
    tests/test_distributed.py's lost-rank test). The script's files are closed by then, so the
    process ends as the interpreter would, less that finalization: the exit hooks run (data
    loader workers stopped, sr_lib/data.py), the standard streams are flushed, then os._exit.
    The same while `meet`'s thread still waits for the other ranks (a signal stopped the run)."""
    meeting = _meeting["thread"] is not None and _meeting["thread"].is_alive()
    up = dist.is_available() and dist.is_initialized()
    if not (up or meeting) or not isinstance(code, int):
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader gone: nothing more to say
            pass
    os._exit(code)


def _device(d: Dist) -> torch.device:
    return (
        torch.device("cuda", d.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    )
