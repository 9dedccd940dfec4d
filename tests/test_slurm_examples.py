"""The job scripts of examples/slurm, run end to end under stand-ins for SLURM's sbatch, srun and
scontrol (tests/slurm/: the variables SLURM sets, a step's tasks in a process group of their
own, `scontrol requeue` running the job again under its id), with tiny settings given as a user
gives them: DATA, RUN, ... in the environment and flags after the script's name. A preemption
is the script's own --signal, sent to the step's process group."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import sr_train
from sr_lib.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "slurm"
JOB = 4321
# the ranks meet at port 20000 + the job id: one such job at a time (pyproject: --dist loadgroup);
# job scripts of several processes: the integration tier (pyproject: pytest -m integration)
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("torchrun")]
TINY_EDSR = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "2",
             "--patch", "16", "--batch", "2", "--workers", "0", "--val-every", "0",
             "--log-every", "1", "--device", "cpu"]  # fmt: skip


def make_images(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        img = np.kron(rng.random((12, 12, 3)), np.ones((8, 8, 1)))
        iio.imwrite(folder / name, (img * 255).astype(np.uint8))
    return folder


def submit(tmp_path, script, opts=(), flags=(), env=None):
    """`sbatch OPTS SCRIPT FLAGS` (the stand-in: it waits for the job) from a repository root of
    links, logs/ made as the script says. Returns the running sbatch and the root."""
    root = tmp_path / "root"
    (root / "logs").mkdir(parents=True)
    for name in ("sr_train.py", "sr_sample.py"):
        (root / name).symlink_to(REPO / name)
    (tmp_path / "slurm").mkdir()
    path = f"{REPO / 'tests' / 'slurm'}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "FAKE_SLURM_DIR": str(tmp_path / "slurm"),
           "FAKE_SLURM_JOB_ID": str(JOB), "SRSPACE_OFFLINE": "1", **(env or {})}  # fmt: skip
    return subprocess.Popen(["sbatch", *opts, str(script), *flags], cwd=root, env=env), root


def job_log(root) -> str:
    return "".join(p.read_text() for p in sorted((root / "logs").iterdir()))


def preempt(tmp_path, script, ready, job, root, timeout=90):
    """Once `ready()`, the signal the script's `#SBATCH --signal` asks for, to the process group
    of its first run's step (every task, as SLURM signals them). A job that ends before (a bad
    flag: sr_train.py's error line) fails the test at once, with the job's log (stdout and
    stderr, as SLURM's --output holds both), rather than after the whole `timeout`."""
    name = re.search(r"^#SBATCH --signal=(?:B:)?(\w+)@", script.read_text(), re.M).group(1)
    pgid = tmp_path / "slurm" / f"step.{JOB}.0.pgid"
    deadline = time.time() + timeout
    while not (pgid.exists() and ready()):
        if job.poll() is not None:
            pytest.fail(f"the job ended (exit {job.returncode}) before its step got under way; "
                        f"its log:\n{job_log(root)[-4000:]}")  # fmt: skip
        assert time.time() < deadline, f"the job's step did not get under way:\n{job_log(root)}"
        time.sleep(0.05)
    os.killpg(int(pgid.read_text()), getattr(signal, f"SIG{name}"))


def logged_steps(out: Path) -> int:
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize(
    "script, opts, model",
    [("train.sbatch", ["--ntasks-per-node=1"], TINY_EDSR),
     pytest.param("train_multinode.sbatch", ["--nodes=2", "--ntasks-per-node=1"],
                  TINY_EDSR[6:] + ["--n-basis", "8", "--basis-channels", "4", "--coef-channels",
                                   "4", "--d-channels", "4", "--lambda-per", "0",
                                   "--sync-check-every", "10"],
                  marks=pytest.mark.slow)],
    ids=["one-node", "two-nodes"],
)  # fmt: skip
def test_a_preempted_training_job_requeues_and_resumes_from_last_pt(tmp_path, script, opts, model):
    """The job trains; SLURM's warning stops it with exit 75 after last.pt, the job asks to be
    requeued, and its second run resumes at last.pt's step and finishes. Two nodes: the ranks
    meet at the first node of SLURM_STEP_NODELIST (127.0.0.[1-2]) and the job id's port."""
    data = make_images(tmp_path / "hr", [f"im{i}.png" for i in range(4)])
    out = tmp_path / "root" / "run"
    env = {"DATA": str(data), "CACHE": str(tmp_path / "cache"), "RUN": "run", "RRDB": ""}
    flags = [*model, "--steps", "100", "--save-every", "5"]
    job, root = submit(tmp_path, EXAMPLES / script, opts, flags, env)
    preempt(tmp_path, EXAMPLES / script, lambda: logged_steps(out) >= 7, job, root)
    assert job.wait(timeout=240) == 0
    log = job_log(root)
    stopped = int(re.search(r"SIGUSR1: stopped at step (\d+), wrote run/last.pt", log).group(1))
    assert exits(tmp_path) == [f"{JOB}  75", f"{JOB}  0"], log
    assert (tmp_path / "slurm" / "scontrol").read_text() == f"requeue {JOB}\n"
    assert f"resumed run/last.pt at step {stopped}\n" in log
    assert 7 <= stopped < 100 and load_checkpoint(out / "last.pt")["step"] == 100
    nproc = 2 if "multinode" in script else 1
    assert f"batch 2 x {nproc} process(es)" in log


def exits(tmp_path) -> list[str]:
    return (tmp_path / "slurm" / "exits").read_text().splitlines()


def test_the_array_script_takes_its_temperatures_from_the_environment(tmp_path):
    """sr_sample.py takes a repeated --temperature as one list, so one typed after the script's
    name added to its sweep (`--temperature 0 0.9`: '0 is given twice'); TEMPERATURES replaces
    it, as DATA does train.sbatch's --data. srun here prints the command it is given."""
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    srun.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "ARGS_OUT": str(tmp_path / "args")}  # fmt: skip
    for temperatures, want in [(None, ["0", "0.5", "0.7", "0.9", "1"]), ("0 0.9", ["0", "0.9"])]:
        run_env = {**env, "TEMPERATURES": temperatures} if temperatures else env
        script = str(EXAMPLES / "sample_array.sbatch")
        assert subprocess.run(["bash", script, "--n", "1"], env=run_env, timeout=30).returncode == 0
        args = (tmp_path / "args").read_text().split("\n")
        at = args.index("--temperature") + 1
        assert args[at : at + len(want) + 1] == [*want, "--shard"], args


def test_a_job_array_samples_every_input_once(tmp_path):
    """Three array tasks share the inputs, names with spaces and shared prefixes among them:
    each samples its own, every input is sampled, none twice (each task's log names what it
    wrote), and every temperature folder holds them all."""
    names = ["a.png", "a b.png", "a1.png", "a10.png", "a_1.png", "ab.png", "b.png"]
    inputs = make_images(tmp_path / "in put", names)
    ckpt = tmp_path / "srflow" / "last.pt"
    assert sr_train.main(["--model", "srflow", "--nb", "2", "--nf", "8", "--gc", "4",
                          "--rrdb-blocks", "0,1", "--flow-steps", "2", "--hidden-channels", "8",
                          *TINY_EDSR[6:], "--scale", "4", "--patch", "8", "--steps", "1",
                          "--data", str(inputs), "--out", str(ckpt.parent)]) == 0  # fmt: skip
    env = {"CKPT": str(ckpt), "INPUT": str(inputs), "OUT": "sweep"}
    job, root = submit(tmp_path, EXAMPLES / "sample_array.sbatch", ["--array=0-2"],
                       ["--n", "1", "--device", "cpu"], env)  # fmt: skip
    assert job.wait(timeout=240) == 0, job_log(root)
    assert sorted(exits(tmp_path)) == [f"{JOB + 1 + i} {i} 0" for i in range(3)]
    logs = [(root / "logs" / f"srspace-sample-{JOB}_{i}.out").read_text() for i in range(3)]
    done = [re.findall(r"^\[\d+/\d+\] (.+) 24x24 ", log, re.M) for log in logs]
    assert all(done) and sorted(sum(done, [])) == sorted(names), done
    for t in ("T0", "T0.5", "T0.7", "T0.9", "T1"):
        got = sorted(p.name for p in (root / "sweep" / t).glob("*_sample00000.png"))
        assert got == sorted(n[:-4] + "_sample00000.png" for n in names), t
