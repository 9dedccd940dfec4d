"""Multi-process training with torch.distributed (gloo on CPU), as torchrun/srun would run it."""

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sr_train
from sr_lib import distributed
from sr_lib.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def ONE_WORKER(test):
    """Marks a test that starts several ranks, each a process importing torch. They are the
    integration tier (pyproject: not in the default suite; `python -m pytest -m integration`,
    which CI runs too), on one pytest-xdist worker, one after the other (--dist loadgroup):
    between picking a free port for the ranks' rendezvous and binding it, another worker's ranks
    could take it."""
    return pytest.mark.integration(pytest.mark.xdist_group("torchrun")(test))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: str) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(4):
        img = np.kron(rng.random((12, 12, 3)), np.ones((8, 8, 1)))
        iio.imwrite(d / f"im{i}.png", (img * 255).astype(np.uint8))
    return d


def train_cmd(out, images, *extra, nproc=2):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                f"--master-port={free_port()}"] if nproc else [sys.executable]  # fmt: skip
    return launcher + [str(REPO / "sr_train.py"), "--data", str(images), "--scale", "2",
                       "--patch", "16", "--batch", "2", "--workers", "0", "--val-every", "0",
                       "--log-every", "1", "--device", "cpu", "--out", str(out),
                       *extra]  # fmt: skip


def srun_ranks(argvs, stdout=subprocess.DEVNULL, env=None, group=False):
    """One process per argv as `srun` starts a 2-task step on this machine (SLURM_* variables,
    no torchrun): rank i runs argvs[i]. `group`: the ranks in a process group of their own, led
    by rank 0, for a signal to all of them and their children (os.killpg(ranks[0].pid, ...))."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "localhost",
             "SLURM_JOB_ID": "9536",
             "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}  # fmt: skip
    ranks = []
    for rank, argv in enumerate(argvs):
        leader = ranks[0].pid if ranks else 0  # (0: a new group, of this process's id)
        ranks.append(subprocess.Popen(argv, cwd=REPO, stdout=stdout, stderr=subprocess.PIPE,
                                      text=True, env={**os.environ, **(env or {}), **slurm,
                                                      "SLURM_PROCID": str(rank),
                                                      "SLURM_LOCALID": str(rank)},
                                      preexec_fn=functools.partial(os.setpgid, 0, leader) if group
                                      else None))  # fmt: skip
    return ranks


def patched_rank(patch: str) -> list[str]:
    """The argv head of a rank that runs sr_train.py with `patch` (code that replaces some of
    sr_train's functions) applied first, and ends as the script's `__main__` does. An end of
    sys.exit(sr_train.main(...)) left a process group still up after a one-line error to the
    interpreter's finalization, whose gloo teardown aborted the rank now and then (exit -6,
    "terminate called without an active exception": 12 of 40 runs of the data-check test,
    none of 40 with this end)."""
    code = f"""
import sys, torch
sys.argv, sys.path[0] = sys.argv[1:], {str(REPO)!r}
import sr_train
{patch}
try:
    code = sr_train.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
sr_train.distributed.exit_process(code)
"""
    return [sys.executable, "-c", code]


def run(cmd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=timeout, env=env)


def sync_log(out):
    rows = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return [r for r in rows if "replica_max_diff" in r]


@ONE_WORKER
@pytest.mark.parametrize(
    "model, launcher",
    [(["--model", "edsr", "--n-feats", "8", "--n-blocks", "1"], "torchrun"),
     (["--model", "vspsr", "--n-basis", "8", "--basis-channels", "8", "--coef-channels", "8",
       "--d-channels", "8", "--lambda-per", "0"],  # a GAN: the discriminator is synced too
      "srun"),
     (["--model", "srflow", "--nb", "2", "--nf", "8", "--gc", "4", "--rrdb-blocks", "0,1",
       "--flow-steps", "2", "--hidden-channels", "8", "--freeze-encoder", "0.5", "--scale", "4",
       "--patch", "8"],  # ActNorm data init broadcast from rank 0; encoder frozen, then not
      "srun")],
    ids=["edsr", "vspsr-gan", "srflow"],
)  # fmt: skip
def test_two_processes_stay_identical_and_resume_in_one(tmp_path, images, model, launcher,
                                                        capsys):  # fmt: skip
    """Each launcher once: torchrun (its environment variables) and srun's (SLURM_*); the
    models' syncing does not depend on it (and torchrun's own process costs ~2 CPU-s)."""
    out = tmp_path / "run"
    argv = train_cmd(out, images, *model, "--steps", "3", "--sync-check-every", "1",
                     nproc=2 if launcher == "torchrun" else 0)  # fmt: skip
    if launcher == "torchrun":
        done = run(argv)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    else:
        codes, outs = two_ranks(argv)
        assert codes == [0, 0], [err for _, err in outs]
    assert [(r["step"], r["replica_max_diff"]) for r in sync_log(out)] == [(1, 0), (2, 0), (3, 0)]
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 3 and ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
    # the one process: this one (no process group), which saves an interpreter's start
    argv = train_cmd(out, images, *model, "--steps", "4", "--resume", "auto", nproc=0)[2:]
    assert sr_train.main(argv) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 4
    assert "was trained by 2 process(es), this run has 1" in capsys.readouterr().out


@pytest.fixture(scope="module")
def val_run(tmp_path_factory, images):
    """One run of the tiny edsr with the weight average (--ema) for the three tests that read it
    (a 2-rank run costs two interpreter starts): step 1 in this process, then steps to 2 resumed
    by 2 srun ranks, the first validation. These are given two flags that have no effect, and
    rank 1 reads its own copy of the images (a node's scratch) whose im0.png has an alpha
    channel: the same pixels, read as RGB, so the training is that of one copy. Returns the run
    folder, the ranks' flags (without --steps), their exit codes and stderr texts, and last.pt
    and best.pt after step 2."""
    tmp = tmp_path_factory.mktemp("val_run")
    scratch = tmp / "scratch"
    scratch.mkdir()
    for f in sorted(images.iterdir()):
        (scratch / f.name).write_bytes(f.read_bytes())
    rgb = iio.imread(images / "im0.png")
    iio.imwrite(scratch / "im0.png", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    val = tmp / "val"  # held out: no warning that it is training data
    val.mkdir()
    iio.imwrite(val / "v0.png", np.kron(np.random.default_rng(1).integers(0, 256, (12, 12, 3)),
                                        np.ones((8, 8, 1))).astype(np.uint8))  # fmt: skip
    out = tmp / "run"
    model = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--ema", "0.5",
             "--val-data", str(val), "--val-crop", "32",
             "--le-sigma-feats", "4", "--d-learning-rate", "1e-4"]  # fmt: skip
    one = train_cmd(out, images, *model, "--steps", "1", "--val-every", "0", nproc=0)[2:]
    assert sr_train.main(one) == 0
    argvs = [train_cmd(out, data, *model, "--val-every", "1", "--resume", "auto", nproc=0)
             for data in (images, scratch)]  # fmt: skip
    codes, outs = ended(srun_ranks([a + ["--steps", "2"] for a in argvs]), timeout=120)
    last, best = (load_checkpoint(out / f) if (out / f).exists() else None
                  for f in ("last.pt", "best.pt"))  # fmt: skip
    return SimpleNamespace(out=out, argvs=argvs, codes=codes, errs=[e for _, e in outs],
                           last=last, best=best)  # fmt: skip


@ONE_WORKER
def test_a_run_resumed_by_more_processes_gives_each_rank_its_own_noise(val_run):
    """A one-process run resumed under 2 ranks: the checkpoint holds one rank's RNG states, and
    rank 1 took rank 0's, so it drew rank 0's model-internal noise (a flow's dequantisation, a
    VAE's latents) at every step: the same draws twice in the averaged batch. It draws its own;
    the weight average (rank 0's) goes on."""
    assert val_run.codes == [0, 0], val_run.errs
    ck = val_run.last
    assert ck["step"] == 2 and ck["world_size"] == 2 and ck["ema_updates"] == 2
    # (EDSR draws nothing from torch's generator in a step, nor its validation: its states are
    # those set at resume)
    assert not torch.equal(ck["rng_ranks"][0]["torch"], ck["rng_ranks"][1]["torch"])


@ONE_WORKER
def test_the_time_budget_ends_every_rank_with_exit_0(tmp_path, images):
    """--time-budget under srun: each rank reads its own clock, and all stop at the step where
    the first is over its budget. A rank still under its own (started a little later; here its
    clock runs at a 16th of the speed, so it is unless rank 0's last step took 7 s) took the stop
    for a signal's and exited 75 beside rank 0's 0: srun reports the highest, so the job looked
    preempted. Both exit 0. (A budget of 0.5 s: what is tested does not depend on its length,
    and each second of it is 2 CPU-s of training.)"""
    argv = train_cmd(tmp_path / "run", images, "--model", "edsr", "--n-feats", "8", "--n-blocks",
                     "1", "--steps", "100000", "--log-every", "1000", "--time-budget", "0.5",
                     nproc=0)  # fmt: skip
    slow_clock = ("import runpy, sys, time\n"
                  "clock = time.monotonic\n"
                  "time.monotonic = lambda: clock() / 16\n"
                  f"sys.argv, sys.path[0] = sys.argv[1:], {str(REPO)!r}\n"
                  "runpy.run_path(sys.argv[0], run_name='__main__')\n")  # fmt: skip
    ranks = srun_ranks([argv, [sys.executable, "-c", slow_clock, *argv[1:]]], subprocess.PIPE)
    codes, outs = ended(ranks, timeout=120)
    assert codes == [0, 0], [err for _, err in outs]
    step = load_checkpoint(tmp_path / "run" / "last.pt")["step"]
    assert f"time budget: stopped at step {step} of 100000" in outs[0][0]
    assert outs[1] == ("", "")


@ONE_WORKER
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, images):
    out = tmp_path / "run"
    cmd = train_cmd(out, images, "--model", "edsr", "--n-feats", "8", "--n-blocks", "1",
                    "--steps", "100000", "--sync-check-every", "1", "--no-requeue")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and len(sync_log(out)) >= 3):
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGUSR1)  # one rank only, as when a node gets SLURM's warning
    stdout, stderr = proc.communicate(timeout=120)
    # torchrun reports the ranks' exit code 75 as a failure with a traceback of its own; no
    # frame of ours may appear in it
    assert f'File "{REPO}{os.sep}'.encode() not in stderr, stderr.decode()[-2000:]  # (not a venv's)
    assert b"exitcode  : 75" in stderr
    step = load_checkpoint(out / "last.pt")["step"]
    assert b"stopped at step %d" % step in stdout
    # every rank reached the same step: the last replica check is at that step, none after it
    assert sync_log(out)[-1]["step"] == step


@ONE_WORKER
@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_leaves_the_other_one_line_and_exit_75(tmp_path, images, victim):
    """srun's ranks (SLURM_* variables, no torchrun), one killed with SIGKILL (the kernel's
    out-of-memory killer, a node lost): the other's next collective fails. It ends with one line
    saying what last.pt holds, exit 75, no traceback, and its loader worker stopped. Rank 0
    also holds the rendezvous store. (Its gloo group, left to the interpreter's exit, aborted
    the survivor now and then: exit 134, "terminate called without an active exception".)"""
    out = tmp_path / "run"
    argv = train_cmd(out, images, "--model", "edsr", "--n-feats", "8", "--n-blocks", "1",
                     "--steps", "100000", "--save-every", "3", "--workers", "1",
                     nproc=0)  # fmt: skip
    ranks = srun_ranks([argv, argv], env={"PYTHONFAULTHANDLER": "1"})  # (its stacks: below)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) > 3):
        assert all(p.poll() is None for p in ranks), [p.communicate()[1] for p in ranks]
        time.sleep(0.05)
    survivor = ranks[1 - victim]
    workers = Path(f"/proc/{survivor.pid}/task/{survivor.pid}/children").read_text().split()
    ranks[victim].kill()
    ranks[victim].communicate()  # (its pipe closed: no file left open)
    try:  # it ends ~0.1 s after the kill; once, under load, it had not after 120 s
        err = survivor.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:  # SIGABRT: faulthandler prints every thread's stack
        survivor.send_signal(signal.SIGABRT)
        stacks = survivor.communicate(timeout=60)[1]
        pytest.fail(f"rank {1 - victim} did not end within 120 s of rank {victim}'s SIGKILL; "
                    f"its threads' stacks:\n{stacks[-8000:]}")  # fmt: skip
    assert survivor.returncode == 75 and len(err.splitlines()) == 1, err
    assert len(workers) == 1 and not alive(workers[0]), "its loader worker lives on"
    assert err.startswith("sr_train.py: error: lost contact with the other processes after step ")
    if victim == 1:
        step = load_checkpoint(out / "last.pt")["step"]
        assert err.endswith(f"{out / 'last.pt'} holds step {step}: continue with --resume auto\n")
    else:
        assert err.endswith(f"{out / 'last.pt'} holds rank 0's last save: continue with "
                            "--resume auto\n")  # fmt: skip


@ONE_WORKER
def test_a_hung_loader_worker_on_one_rank_ends_every_rank_at_once_with_exit_75(
    tmp_path, images, worker_hang, own_temp_dir
):
    """srun's ranks, rank 1's loader worker hung from step 4's batch (CPython gh-112275): after
    LOADER_TIMEOUT rank 1 stops with one line, exit 75, and rank 0, waiting for it in a
    collective, loses contact at once (not the process group's 30 minutes): one line, exit 75;
    last.pt holds the last save (step 2), as rank 0 says. The killed worker's socket folder
    ($TMPDIR/pymp-*) is its rank's, removed at the rank's exit."""
    out, pid_file = tmp_path / "run", tmp_path / "worker.pid"
    argv = train_cmd(out, images, "--model", "edsr", "--n-feats", "8", "--n-blocks", "1",
                     "--steps", "100000", "--save-every", "2", "--workers", "1",
                     nproc=0)  # fmt: skip
    hangs = f"""
import runpy, sys
sys.argv, sys.path[0] = sys.argv[1:], {str(REPO)!r}
{worker_hang(3, pid_file, 3.0)}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    ranks = srun_ranks([argv, [sys.executable, "-c", hangs, *argv[1:]]], subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not pid_file.exists():
            assert all(p.poll() is None for p in ranks) and time.time() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        codes, outs = ended(ranks, timeout=60)  # (a rank left in a collective: 30 minutes)
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    errs = [err for _, err in outs]
    assert codes == [75, 75], errs
    assert errs[1] == (
        "sr_train.py: error: step 4: the data loader's workers gave no batch for 3 s (a worker "
        "hung: on Python before 3.12 a worker can hang at its start, CPython gh-112275); "
        f"{out / 'last.pt'} holds rank 0's last save: continue with --resume auto\n"
    )
    assert errs[0] == (
        "sr_train.py: error: lost contact with the other processes after step 3 (a rank died, "
        "the network failed, or a rank did not answer in time); "
        f"{out / 'last.pt'} holds step 2: continue with --resume auto\n"
    )
    assert took < 3 + 10, took  # the hang's 3 s, and the exits
    assert load_checkpoint(out / "last.pt")["step"] == 2
    with pytest.raises(ProcessLookupError):  # the hung worker killed (and reaped)
        os.kill(int(pid_file.read_text()), 0)
    assert list(own_temp_dir.glob("pymp-*")) == []  # (its socket's folder: its rank's)


@ONE_WORKER
@pytest.mark.parametrize("victim", [0, 1])
def test_a_step_out_of_memory_on_one_rank_names_what_to_lower_with_this_runs_values(
    tmp_path, images, victim
):
    """srun's ranks, one whose step 4 runs out of memory (faked: CUDA's error, which a CPU test
    cannot make): it said "out of memory; use a smaller --batch or --patch", the fallback, without
    this run's values, where one process names what is left to lower with them. Now its line is
    one process's, with where the steps are (rank 0 knows its save of step 2 was written, another
    rank only that there was one); the other rank, left in a collective, loses contact: exit 75."""
    out = tmp_path / "run"
    argv = train_cmd(out, images, "--model", "edsr", "--n-feats", "8", "--n-blocks", "1",
                     "--steps", "100000", "--save-every", "2", nproc=0)  # fmt: skip
    oom = """
real = sr_train.train_step
def train_step(model, forward, optimizers, batches, step, *a, **k):
    if step == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(model, forward, optimizers, batches, step, *a, **k)
sr_train.train_step = train_step
sr_train.native_bf16 = lambda device: False  # (else --amp bf16 too, on a CPU that runs it)
"""
    argvs = [argv, argv]
    argvs[victim] = [*patched_rank(oom), *argv[1:]]
    codes, outs = ended(srun_ranks(argvs, subprocess.PIPE))
    errs = [err for _, err in outs]
    held = "holds step 2" if victim == 0 else "holds rank 0's last save"
    assert codes[victim] == 4 and codes[1 - victim] == 75, errs
    assert errs[victim] == (
        f"sr_train.py: error: step 4: out of memory; {out / 'last.pt'} {held}: continue with "
        "--resume auto and a smaller --batch (this run's: 2) or a smaller --patch (this run's: "
        "16)\n"
    )
    assert errs[1 - victim].startswith("sr_train.py: error: lost contact with the other "), errs
    assert load_checkpoint(out / "last.pt")["step"] == 2


def two_ranks(argv, timeout=120):
    """`argv` run by 2 srun ranks to its end: (exit codes, (stdout, stderr) texts). For tests of
    what 2 processes do, not of a launcher: torchrun's own process (an interpreter that imports
    torch, ~2 CPU-s) adds nothing there; torchrun launches stay where torchrun is tested."""
    return ended(srun_ranks([argv, argv], subprocess.PIPE), timeout)


def ended(ranks, timeout=60):
    """(exit codes, (stdout, stderr) texts) of the ranks; a rank that waits instead (for a
    collective the others never join) fails the test after `timeout` seconds."""
    try:
        outs = [p.communicate(timeout=timeout) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    return [p.returncode for p in ranks], outs


@ONE_WORKER
def test_a_rank_given_other_flags_is_refused_before_training_not_a_wait(tmp_path, images):
    """A multi-node script that passes one node other flags by mistake: the rank with another
    --steps waited at its end in a collective that the other, done, never joined (the process
    group's timeout: 30 minutes), and one with another --batch trained on silently. Every rank
    says what differs from rank 0's in one line before training, exit 2; nothing is written."""
    out = tmp_path / "run"
    argv = train_cmd(out, images, "--model", "edsr", "--n-feats", "8", "--n-blocks", "1",
                     nproc=0)  # fmt: skip
    codes, outs = ended(srun_ranks([argv + ["--steps", "2"],
                                    argv + ["--steps", "3", "--batch", "3"]]))  # fmt: skip
    errs = [err for _, err in outs]
    assert codes == [2, 2], errs
    line = ("sr_train.py: error: the processes were given other flags than rank 0: --steps 3 on "
            "rank 1 (rank 0: 2), --batch 3 on rank 1 (rank 0: 2); give every process the same "
            "command line\n")  # fmt: skip
    assert errs == [line, line]
    assert not (out / "last.pt").exists()


@ONE_WORKER
@pytest.mark.parametrize(
    "short, what",
    [(1, "rank 1 has 3 training images, rank 0 has 4, and im3.png is not among them"),
     (0, "rank 1 has 4 training images, rank 0 has 3, and im1.png is not among rank 0's")],
)  # fmt: skip
def test_a_node_whose_copy_of_the_images_differs_is_refused_before_training(
    tmp_path, images, short, what
):
    """Each node reads --data from its own scratch copy; one copy lacks an image (cut short, not
    yet synced): its rank drew its batches from fewer images, silently. Every rank names the
    image that one copy lacks in one line before training, exit 3; rank 0's copy may be the
    short one (there, the line named an image both copies hold). The ranks are refused before
    they build their optimizers (torch's import torch._dynamo for them: ~1.4 CPU-s that the
    user waited for the line): said here by a build_optimizers that announces itself."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    lacks = "im3.png" if short == 1 else "im1.png"
    for f in sorted(images.iterdir()):
        if f.name != lacks:
            (scratch / f.name).write_bytes(f.read_bytes())
    folders = (images, scratch) if short == 1 else (scratch, images)
    announced = """
real = sr_train.build_optimizers
def build_optimizers(*a, **k):
    print("optimizers built", file=sys.stderr, flush=True)
    return real(*a, **k)
sr_train.build_optimizers = build_optimizers
"""
    argvs = [[*patched_rank(announced),
              *train_cmd(tmp_path / "run", data, "--model", "edsr", "--n-feats", "8",
                         "--n-blocks", "1", "--steps", "2", nproc=0)[1:]]
             for data in folders]  # fmt: skip
    codes, outs = ended(srun_ranks(argvs))
    errs = [err for _, err in outs]
    assert codes == [3, 3], errs
    line = (f"sr_train.py: error: --data: {what} (a node's copy of the images differs); give "
            "every node the same images\n")  # fmt: skip
    assert errs == [line, line]
    assert not (tmp_path / "run" / "last.pt").exists()


@ONE_WORKER
@pytest.mark.parametrize(
    "case, code, line",
    [("data", 3, "rank 0: --data {gone}: no such folder\n"),
     ("rank 1's data", 3, "rank 1: --data {gone}: no such folder\n"),
     ("val data", 3, "rank 0: --val-data {gone}: no such folder\n"),
     ("empty data", 3, "rank 1: --data {empty}: no images found"),
     ("out inside data", 2, "rank 0: --out {images}/run: is inside --data {images}, where")],
)  # fmt: skip
def test_a_data_folder_that_cannot_be_used_is_refused_before_the_run_folder(
    tmp_path, images, case, code, line
):
    """The data folders' checks ran in one process alone: with several, a missing --data was
    found as each rank decoded its images, after rank 0 had made OUT/ (".lock", "log.jsonl"),
    in a line without the flag; one rank's alone (its node's copy), or rank 0's --val-data, left
    the other "lost contact", exit 75. Every rank says the failing rank's line, with its exit
    code, and no run folder is made."""
    gone, empty = tmp_path / "gone", tmp_path / "empty"
    empty.mkdir()
    out = images / "run" if case == "out inside data" else tmp_path / "run"

    def cmd(data, *more):
        return train_cmd(out, data, "--model", "edsr", "--n-feats", "8", "--n-blocks", "1",
                         "--steps", "2", *more, nproc=0)  # fmt: skip

    argvs = {
        "data": [cmd(gone)] * 2,
        "rank 1's data": [cmd(images), cmd(gone)],
        "val data": [cmd(images, "--val-data", str(gone), "--val-every", "1")] * 2,
        "empty data": [cmd(images), cmd(empty)],
        "out inside data": [cmd(images)] * 2,
    }[case]
    codes, outs = ended(srun_ranks(argvs))
    errs = [err for _, err in outs]
    assert codes == [code, code], errs
    want = "sr_train.py: error: " + line.format(gone=gone, empty=empty, images=images)
    assert all(err.startswith(want) and len(err.splitlines()) == 1 for err in errs), errs
    assert not out.exists()


@ONE_WORKER
def test_a_warning_of_every_rank_is_printed_once_one_of_a_node_by_its_rank(val_run):
    """Every rank printed each warning: a flag with no effect 64 times in a 64-rank job's log.
    Rank 0 alone prints those; a warning about a node's own copy of the images (here rank 1's
    has an alpha channel) is printed by that rank, naming it."""
    errs = val_run.errs
    assert val_run.codes == [0, 0], errs
    assert errs[0].splitlines() == [
        "sr_train.py: warning: --le-sigma-feats: no effect without --loss le; ignored",
        "sr_train.py: warning: --d-learning-rate: no effect, this edsr model has no "
        "discriminator; ignored",
    ]
    scratch = Path(val_run.argvs[1][val_run.argvs[1].index("--data") + 1])
    assert errs[1].splitlines() == [
        f"sr_train.py: warning: rank 1: {scratch / 'im0.png'}: alpha channel dropped (the image "
        "is read as RGB)"
    ]


def listening(port: int) -> bool:
    """Whether a socket of this machine listens on TCP `port` (asked of the kernel: a connection
    would be a client of torch's store)."""
    rows = [
        line.split()
        for f in ("tcp", "tcp6")
        for line in Path(f"/proc/net/{f}").read_text().splitlines()
    ]
    return any(r[1].endswith(f":{port:04X}") and r[3] == "0A" for r in rows[1:] if len(r) > 3)


@pytest.mark.xdist_group("torchrun")  # one process (its peer never comes): the default suite
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_ranks_meet_stops_at_once(tmp_path, images, signum):
    """srun's rank 0 of 2 whose peer has not started (its node imports torch from a slow file
    system, or never comes) waits in torch's rendezvous, up to the process group's timeout (30
    minutes). SLURM's SIGTERM to the process group, or Ctrl-C in an interactive srun, went
    unheard there: Python runs signal handlers only when torch's call returns. It stops at once,
    as elsewhere before the first step: one line, exit 75 and the job requeued (SIGINT: 130)."""
    bin_dir = tmp_path / "bin"  # a stand-in for SLURM's scontrol, which notes its arguments
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    port = free_port()
    argv = train_cmd(tmp_path / "run", images, "--model", "edsr", "--n-feats", "8",
                     "--n-blocks", "1", "--steps", "1", nproc=0)  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": "2",
           "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while not listening(port):  # rank 0's store is up: it waits for rank 1 in torch's call
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        os.killpg(p.pid, signum)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    scontrol = tmp_path / "scontrol.txt"
    if signum == signal.SIGINT:
        assert p.returncode == 130 and err == "sr_train.py: interrupted\n", err
        assert not scontrol.exists()
    else:
        assert p.returncode == 75 and err == (
            "sr_train.py: error: stopped by SIGTERM before the first step, nothing to save; "
            "rerun the same command\n"
        ), err
        assert "requeued SLURM job 4242" in out and scontrol.read_text() == "requeue 4242\n"


def test_a_rank_that_cannot_meet_the_others_is_one_line_exit_75(tmp_path, images, monkeypatch,
                                                                  capsys):  # fmt: skip
    """The ranks meet in a helper thread (`distributed.meet`). Its failure (no answer from the
    master within the timeout, 30 minutes by default; a host name that does not resolve) was
    torch's traceback; it is one line naming the address, exit 75, torch's lines joined as in
    any line (`joined_lines`: its first alone, before). Any other error reaches the caller as
    it was."""
    failure = torch.distributed.DistNetworkError(
        "The client socket has timed out after 3000ms while trying to connect to (node7, 29511).\n"
        "Exception raised from throwTimeoutError at socket.cpp:1030"
    )

    def rendezvous(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch.distributed, "init_process_group", rendezvous)
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
           "MASTER_PORT": "29511"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = train_cmd(tmp_path / "run", images, "--model", "edsr", "--steps", "1", nproc=0)[2:]
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv)
    assert e.value.code == 75
    assert capsys.readouterr().err.splitlines() == [
        "sr_train.py: error: could not meet the other processes at node7:29511 (this is rank 1 "
        "of 2): The client socket has timed out after 3000ms while trying to connect to (node7, "
        "29511).; Exception raised from throwTimeoutError at socket.cpp:1030; check that every "
        "rank started and can reach that address, then rerun (nothing was trained)"
    ]
    bug = ValueError("a bug")

    def buggy(*args, **kwargs):
        raise bug

    monkeypatch.setattr(torch.distributed, "init_process_group", buggy)
    with pytest.raises(ValueError) as e:
        distributed.meet("gloo", 1, 2, None)
    assert e.value is bug


def test_the_exit_with_a_process_group_up_skips_its_teardown(tmp_path):
    """A run that ends on an error leaves its process group up. Left to the interpreter's
    finalization, gloo's teardown with a peer gone aborted the process now and then (exit 134
    in place of 75); here a stand-in teardown always aborts. The exit hooks (the loader
    workers' stop) still run, and the exit code is the script's."""
    code = ("import atexit, os, sys, torch.distributed as dist\n"
            "from sr_lib import distributed\n"
            "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0,\n"
            "                        world_size=1)\n"
            "class Teardown:\n"
            "    def __del__(self):\n"
            "        os.abort()\n"
            "teardown = Teardown()\n"
            "atexit.register(print, 'exit hooks ran')\n"
            "print('flushed', end='')\n"
            "distributed.exit_process(75)\n")  # fmt: skip
    argv = [sys.executable, "-c", code, str(tmp_path / "store")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr
    assert proc.stdout == "flushedexit hooks ran\n"


def test_slurm_environment_is_understood(monkeypatch):
    assert distributed.first_host("gpu[003-006,9],cpu1") == "gpu003"
    assert distributed.first_host("node7") == "node7"
    assert distributed.first_host("node[01-02,05]") == "node01"
    assert distributed.first_host("gpu-a1,gpu-b2") == "gpu-a1"
    assert distributed.first_host("node[01-04]-ib,login1") == "node01-ib"
    assert distributed.first_host("rack[1-2]-n[01-08]") == "rack1-n01"
    calls = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.update(k))
    torchrun = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun}
    # `srun -n 4` in a job of 8 tasks: the world is the step's tasks
    env.update({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[12-13]",
                "SLURM_JOB_ID": "4242"})  # fmt: skip
    # setup() writes RANK/WORLD_SIZE/... for torch: keep them out of the real environment, where
    # they would make every later subprocess wait for a process group
    monkeypatch.setattr(os, "environ", env)
    d = distributed.setup(use_cuda=False)
    assert (d.rank, d.world, d.local_rank) == (3, 4, 1)
    assert os.environ["MASTER_ADDR"] == "gpu12" and os.environ["MASTER_PORT"] == "24242"
    assert calls == {"rank": 3, "world_size": 4}
    # `srun --relative 1 -N 1` (or --nodelist): the step runs on a part of the job's nodes, whose
    # first one holds rank 0's store
    env.update({"SLURM_STEP_NODELIST": "gpu13"})
    for k in torchrun:
        env.pop(k, None)
    distributed.setup(use_cuda=False)
    assert os.environ["MASTER_ADDR"] == "gpu13"


def test_a_job_script_without_srun_is_one_line_not_a_wait_for_other_ranks(
    tmp_path, images, monkeypatch, capsys
):
    """`python sr_train.py` run by the job script itself in a job of 4 tasks (no srun): SLURM
    sets SLURM_NTASKS=4 and SLURM_PROCID=0 there. Taken for rank 0 of 4, it waited silently, and
    deaf to SLURM's signals, for 3 processes that never come (30 minutes, then a traceback)."""
    import sr_train

    def rendezvous(*args, **kwargs):
        raise AssertionError("it waits for the other ranks")

    monkeypatch.setattr(torch.distributed, "init_process_group", rendezvous)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    batch_step = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
                  "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node[01-02]"}  # fmt: skip
    for k, v in batch_step.items():
        monkeypatch.setenv(k, v)
    argv = train_cmd(tmp_path / "run", images, "--model", "edsr", "--steps", "1", nproc=0)[2:]
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "SLURM_NTASKS is 4 but this process was not started by srun" in err


@ONE_WORKER
def test_validation_best_pt_and_the_weight_average_under_two_processes(val_run):
    """Rank 0 validates alone, yet every rank takes part in writing best.pt (their RNG states are
    gathered): the ranks agree on 'improved', else they wait for each other forever. The average
    (--ema) is kept by rank 0, saved, and continued exactly on resume."""
    out, one, best = val_run.out, val_run.last, val_run.best
    assert val_run.codes == [0, 0], val_run.errs
    assert best["step"] == 2 and best["world_size"] == 2 and one["ema_updates"] == 2
    assert not all(torch.equal(one["ema_state_dict"][k], v) for k, v in one["state_dict"].items())
    # resumed in the shared run's folder (the one test that writes to it)
    argvs = [a + ["--steps", "3"] for a in val_run.argvs]
    codes, outs = ended(srun_ranks(argvs), timeout=120)
    assert codes == [0, 0], [err for _, err in outs]
    two = load_checkpoint(out / "last.pt")
    assert two["ema_updates"] == 3
    for k, w in two["state_dict"].items():  # average <- average + 0.5 (weights - average)
        a = one["ema_state_dict"][k]
        assert torch.allclose(two["ema_state_dict"][k], a + 0.5 * (w - a), rtol=0, atol=1e-6), k
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_psnr" in r] == [2, 3]


@pytest.mark.parametrize(
    "env, says",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "$RANK='x': not a whole number"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": ""}, "$LOCAL_RANK='': not a whole"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 with WORLD_SIZE=2: not a rank of that world"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "two"}, "$SLURM_STEP_NUM_TASKS='two'"),
        ({"SLURM_PROCID": "-1", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID=-1 with"),
    ],
)
def test_a_malformed_launcher_variable_is_one_line_not_a_traceback(monkeypatch, capsys, env,
                                                                   says):  # fmt: skip
    """RANK=x (a job script's typo, a variable left from another tool): int() raised a ValueError
    traceback from distributed.warn_once, before the command line was read. With --json its
    line follows (it had none: the variable was read before --json)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "edsr", "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and err.count("\n") == 1 and says in err, err
    line = json.loads(out.splitlines()[-1]) if out.strip() else {}
    assert line.get("exit_code") == 2 and says in line.get("error", ""), out


def test_replica_check_sees_a_replica_that_differs(monkeypatch):
    """--sync-check-every's check, in one process: the checksums the ranks would gather are
    faked (rank 0's from the model as it was), so that a replica that moved is seen. Every
    multi-process test asserts replicas in sync (0), which a check that always said 0 would
    pass too. A swap of two same-shaped tensors keeps the plain sum: the per-tensor weights of
    the checksum see it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    rank0 = {}

    def all_gather(out, s):  # rank 0's checksum first, then this rank's (rank 1 of 2)
        out[0].copy_(rank0.setdefault("s", s.clone()))
        out[1].copy_(s)

    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    d = distributed.Dist(rank=1, world=2)
    assert distributed.replicas_differ(model, d) == 0.0
    with torch.no_grad():
        a, b = model[0].weight.clone(), model[1].weight.clone()
        model[0].weight.copy_(b), model[1].weight.copy_(a)  # (the same sum of all weights)
    assert distributed.replicas_differ(model, d) > 0
    with torch.no_grad():
        model[0].weight.copy_(a), model[1].weight.copy_(b)
        before = model[1].bias[2].double()
        model[1].bias[2] += 1e-3
        moved = float(model[1].bias[2].double() - before)  # (1e-3 in float32's steps)
    diff = distributed.replicas_differ(model, d)
    assert diff == pytest.approx(moved * 4, rel=1e-9)  # (the 4th tensor's weight, 1 + 3 % 7)
    logged = []
    monkeypatch.setattr(sr_train, "log", lambda _, record: logged.append(record))
    with pytest.raises(sr_train.SRSpaceError, match=r"step 7: model replicas differ across ranks"):
        sr_train.check_replicas(model, d, 7, None)
    assert logged == [{"step": 7, "replica_max_diff": diff}]
