"""Faults: kill -9 at random moments (also while saving), and unusable or hostile checkpoints."""

import contextlib
import errno
import json
import multiprocessing
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sr_lib.data
import sr_sample
import sr_train
from sr_lib.checkpoint import load_checkpoint, save_checkpoint
from sr_lib.errors import OutputError, exit_on_error
from sr_lib.weights import torch_load

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(3):
        img = np.kron(rng.random((12, 12, 3)), np.ones((8, 8, 1)))
        iio.imwrite(d / f"im{i}.png", (img * 255).astype(np.uint8))
    return d


def cmd(out, images, steps):
    return [sys.executable, str(REPO / "sr_train.py"), "--model", "edsr", "--n-feats", "8",
            "--n-blocks", "1", "--data", str(images), "--scale", "2", "--patch", "8",
            "--batch", "2", "--workers", "0", "--val-every", "0", "--log-every", "1",
            "--save-every", "1", "--steps", str(steps), "--out", str(out)]  # fmt: skip


def last_logged_step(log: Path) -> int:
    """The highest step in a complete line of log.jsonl (the last line may be half written)."""
    if not log.exists():
        return 0
    lines = log.read_text().split("\n")[:-1]
    # the last such line: polled every 2 ms, parsing every line took a core from the other tests
    last = next((line for line in reversed(lines) if '"step"' in line), None)
    return json.loads(last)["step"] if last else 0


@pytest.mark.integration  # 6 training runs (pyproject: pytest -m integration)
def test_kill9_five_times_then_finish_equals_uninterrupted(tmp_path, images):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 75 steps: fifths of 15, each kill in the first 5 steps of its fifth; what a kill can hit
    # (a step, a log line, a checkpoint write: every step saves) does not depend on the length
    steps = 75
    # the uninterrupted run in this process (one thread, as the killed ones): same bits, one
    # interpreter start fewer
    assert sr_train.main(cmd(tmp_path / "ref", images, steps)[2:]) == 0
    out = tmp_path / "run"
    rng = random.Random(1)
    kills = 0
    # Kill points are tied to training progress, not wall time, so a fast machine cannot finish
    # the run before the fifth kill: one kill in each fifth of the run, at a random step, plus a
    # random few milliseconds so that some kills land inside a checkpoint write.
    targets = [rng.randint(i * steps // 5 + 1, (i + 1) * steps // 5 - 10) for i in range(5)]
    for target in targets:
        extra = ["--resume", "auto"] if (out / "last.pt").exists() else []
        with subprocess.Popen(cmd(out, images, steps) + extra, env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as p:  # fmt: skip
            deadline = time.time() + 120
            while time.time() < deadline and p.poll() is None:
                if last_logged_step(out / "log.jsonl") >= target:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.02))
            assert p.poll() is None, f"training ended before the kill at step {target}"
            p.send_signal(signal.SIGKILL)
            p.wait()
        kills += 1
        if (out / "last.pt").exists():  # never unreadable, whatever the moment of the kill
            assert load_checkpoint(out / "last.pt")["step"] <= steps
    assert kills == 5
    # the finishing run reads what the kills left: in this process, as the reference run
    assert sr_train.main([*cmd(out, images, steps)[2:], "--resume", "auto"]) == 0
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(out / "last.pt")
    assert b["step"] == steps
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not list(out.glob(".*.tmp*")), "a stale temporary checkpoint was left behind"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def bad_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    assert sr_train.main(["--model", "bicubic", "--steps", "0", "--out", str(tmp_path / "b")]) == 0
    good.write_bytes((tmp_path / "b" / "last.pt").read_bytes())
    cases = {}
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    cases["truncated"] = (trunc, "truncated")
    hostile = tmp_path / "hostile.pt"
    with open(hostile, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    cases["hostile"] = (hostile, "refused")
    newer = tmp_path / "newer.pt"
    save_checkpoint(newer, {"model": "bicubic", "model_cfg": {"scale": 4}, "state_dict": {}})
    ck = torch.load(newer, weights_only=True)
    ck["format"] = 99
    torch.save(ck, newer)
    cases["newer"] = (newer, "newer")
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    cases["text"] = (text, "not a torch checkpoint file")
    return cases


@pytest.mark.parametrize("case", ["truncated", "hostile", "newer", "text"])
def test_bad_checkpoints_one_line_each(tmp_path, capsys, case):
    path, words = bad_checkpoints(tmp_path)[case]
    img = tmp_path / "in.png"
    iio.imwrite(img, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["--ckpt", str(path), "--input", str(img), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 6 and len(err.splitlines()) == 1, err
    assert str(path) in err and words in err
    run = tmp_path / "resume"
    run.mkdir()
    (run / "last.pt").write_bytes(path.read_bytes())
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "bicubic", "--resume", "auto", "--out", str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 6 and len(err.splitlines()) == 1 and "last.pt" in err


def test_torch_error_on_a_broken_checkpoint_is_quoted_by_the_rule(tmp_path, capsys, monkeypatch):
    """torch's error on a checkpoint it cannot read was cut by hand to its first line (120
    characters): a second line that said more was lost, and a dump's cut did not say so. Now
    as every line shows a library's text (`joined_lines`): its lines joined, or its first and
    how many more, which SRSPACE_FULL_ERRORS=1 writes after the line."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(60))  # (torch.save's zip, as far as its start)
    said = {}

    def load(*args, **kwargs):
        raise RuntimeError(said["text"])

    monkeypatch.setattr(torch, "load", load)
    stack = [f"frame #{i}: c10::Error in caffe2::serialize::PyTorchStreamReader::init()"
             for i in range(8)]  # fmt: skip
    for text, env, shown, whole in [
        ("PytorchStreamReader failed reading zip archive:\nfailed finding central directory", "",
         "failed reading zip archive: failed finding central directory", []),
        ("\n".join(["PytorchStreamReader failed reading file data/0", *stack]), "1",
         "failed reading file data/0 (and 8 more lines: SRSPACE_FULL_ERRORS=1 shows them)",
         ["  its whole text (SRSPACE_FULL_ERRORS=1):",
          "    PytorchStreamReader failed reading file data/0", *(f"    {t}" for t in stack)]),
    ]:  # fmt: skip
        said["text"] = text
        monkeypatch.setenv("SRSPACE_FULL_ERRORS", env)
        with pytest.raises(SystemExit) as e, exit_on_error("sr_sample.py"):
            torch_load(path, "checkpoint")
        assert e.value.code == 6
        assert capsys.readouterr().err.splitlines() == [
            f"sr_sample.py: error: {path}: not a valid torch file or is truncated (a checkpoint "
            f"file was expected; RuntimeError: PytorchStreamReader {shown}); copy it again",
            *whole,
        ]


def test_full_disk_while_saving_leaves_the_last_checkpoint_and_no_temp_file(tmp_path, images):
    """A write that fails mid-checkpoint (a file-size limit: the kernel's own write error, as on a
    full disk) ends the run with one line and exit 7; last.pt from before stays loadable and no
    temp file is left behind."""
    out = tmp_path / "run"
    assert sr_train.main(cmd(out, images, 2)[2:]) == 0  # (the run before: in this process)
    good = (out / "last.pt").read_bytes()
    limit = len(good) // 2  # the next checkpoint (same size) cannot be written completely

    def small_files():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([*cmd(out, images, 4), "--resume", "auto"], capture_output=True, text=True,
                       preexec_fn=small_files)  # fmt: skip
    err = p.stderr.strip().splitlines()
    assert p.returncode == 7 and len(err) == 1, p.stderr
    assert (
        "last.pt: cannot write the checkpoint (File too large); the previous one is intact"
        in err[0]
    )
    assert (out / "last.pt").read_bytes() == good
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]


def test_full_disk_while_logging_saves_and_leaves_no_torn_record(tmp_path, images):
    """log.jsonl cannot grow (a file-size limit: the kernel's write errors, as on a full disk; the
    write that reaches the limit takes a part of its record, as a disk that fills does): the run
    saves last.pt (it fits), ends with one line and exit 7, and log.jsonl ends with a whole
    record, instead of three tracebacks, the steps since the last save lost and a torn line."""
    out = tmp_path / "run"
    assert sr_train.main(cmd(out, images, 2)[2:]) == 0  # (the run before: in this process)
    limit = (out / "last.pt").stat().st_size + 4096  # the checkpoint fits
    log = out / "log.jsonl"
    history = log.read_text()  # as long as a long run's: the limit comes some 10 records later
    log.write_text(history * ((limit - 1500) // len(history)))

    def small_files():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = [*cmd(out, images, 100000), "--resume", "auto", "--save-every", "100000"]
    p = subprocess.run(argv, capture_output=True, text=True, preexec_fn=small_files, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 7 and len(err) == 1, p.stderr
    step = load_checkpoint(out / "last.pt")["step"]
    assert err[0] == (
        f"sr_train.py: error: {out / 'log.jsonl'}: cannot write (File too large); stopped at "
        f"step {step}, wrote {out / 'last.pt'}: free space, then continue with --resume auto"
    )
    text = log.read_text()
    assert text.endswith("\n") and len(text) < limit
    assert [json.loads(line)["step"] for line in text.splitlines()][-1] == step - 1


def sample_cmd(tmp_path, images, count: int, size: int = 48) -> tuple[list[str], Path]:
    """A 1-step checkpoint and `count` LR images: sr_sample.py's command line and its --out."""
    run = tmp_path / "run"
    assert sr_train.main(cmd(run, images, 1)[2:]) == 0  # (in this process: not under test)
    lr = tmp_path / "lr"
    lr.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        iio.imwrite(lr / f"im{i:03d}.png", (rng.random((size, size, 3)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    return [sys.executable, str(REPO / "sr_sample.py"), "--ckpt", str(run / "last.pt"),
            "--input", str(lr), "--n", "2", "--out", str(out)], out  # fmt: skip


def sampling_under_way(tmp_path, images, count: int, popen=subprocess.Popen):
    """sr_sample.py started by `popen` on `count` LR images, once its first PNG is written."""
    argv, out = sample_cmd(tmp_path, images, count)
    p = popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out.is_dir() and any(out.glob("*.png"))) and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "it ended before the signal: use more images"
    return p, out


def test_ctrl_c_in_sample_is_one_line_and_leaves_no_partial_file(tmp_path, images):
    """Ctrl-C outside the training loop: `sr_sample.py: interrupted`, exit 130, no traceback, no
    half-written PNG (outputs are written to a temp name and renamed). The line said no more, where
    SIGTERM's says what to do: now it does too."""
    p, out = sampling_under_way(tmp_path, images, 200)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1].strip()
    assert p.returncode == 130, err
    assert err == (
        "sr_sample.py: interrupted (every file written is complete): rerun the same command to "
        "continue"
    ), err
    written = [f for f in out.iterdir() if f.name != "manifest.json"]
    assert 0 < len(written) < 400 and all(f.suffix == ".png" for f in written)
    for f in written:
        iio.imread(f)  # every file there is a whole PNG


def test_sample_started_in_the_background_keeps_ignoring_ctrl_c(tmp_path, images,
                                                               popen_in_background):  # fmt: skip
    """`sr_sample.py ... &` in a shell script starts with SIGINT ignored (Ctrl-C in the terminal is
    for the job in the foreground): it stays ignored and every sample is written."""
    p, out = sampling_under_way(tmp_path, images, 40, popen_in_background)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1].strip()
    assert p.returncode == 0, err
    assert len(list(out.glob("*.png"))) == 80


def test_train_piped_into_head_saves_and_exits_75(tmp_path, images):
    """`sr_train.py ... | head -5`: once head has its lines and exits, the next log line meets a
    closed pipe. The run saves the steps done and exits 75 (resume with --resume auto), with one
    line on stderr, instead of a BrokenPipeError traceback and the steps since the last save lost.
    Standard output on a full disk (/dev/full) before the loop: one line, exit 7, and nothing
    was trained yet."""
    run = tmp_path / "run"
    argv = cmd(run, images, 100000)
    argv[argv.index("--save-every") + 1] = "1000"  # last.pt only from the stop
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not p.stdout.readline().startswith("step 2 |"):  # `head` reads until its line ...
        assert p.poll() is None, p.stderr.read()
    p.stdout.close()  # ... and exits
    err = p.communicate(timeout=120)[1].strip().splitlines()
    assert p.returncode == 75, err
    step = load_checkpoint(run / "last.pt")["step"]
    assert step >= 3 and err[-1] == (
        f"standard output closed (the program reading it ended): stopped at step {step}, wrote "
        f"{run / 'last.pt'}; continue with --resume auto"
    )
    assert not any("Traceback" in line or "Exception" in line for line in err), err
    with open("/dev/full", "w") as full:
        early = subprocess.run(cmd(tmp_path / "early", images, 5), stdout=full,
                               stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    assert early.returncode == 7 and early.stderr.strip().splitlines()[-1] == (
        "sr_train.py: error: standard output cannot be written (No space left on device); "
        "stopped before training"
    ), early.stderr  # (after the start lines, which go to stderr then)
    assert "Traceback" not in early.stderr
    assert not (tmp_path / "early" / "last.pt").exists()


def test_sample_piped_into_head_stops_with_complete_files_and_reruns(tmp_path, images, capsys):
    """`sr_sample.py ... | head -0`: the run stops at its first progress line (exit 75, one
    line), every file written is whole, and the same command run again completes the rest. (An
    image's line is printed once its PNGs are written, in the background: a few more images may
    be drawn by then.)"""
    argv, out = sample_cmd(tmp_path, images, 40, size=24)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before its first line: the moment does not depend on the machine's speed
    err = p.communicate(timeout=120)[1].strip()
    assert p.returncode == 75 and err == (
        "sr_sample.py: error: standard output closed (the program reading it ended); every file "
        "written is complete: rerun the same command to continue"
    ), err
    written = list(out.glob("*.png"))
    for f in written:
        iio.imread(f)
    complete = len({f.name[:5] for f in written if f.name.endswith("_sample00001.png")})
    assert 1 <= complete < 40  # the first image's samples at least, whole
    capsys.readouterr()
    assert sr_sample.main(argv[2:]) == 0  # the same command again (here: stdout captured)
    assert f"{40 - complete} images sampled, {complete} already complete" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 80


def test_ctrl_c_in_train_while_decoding_data_is_one_line(tmp_path):
    """Ctrl-C before the training loop, while the images are decoded (on threads): one line
    `sr_train.py: interrupted`, exit 130, no traceback, no checkpoint."""
    data = tmp_path / "many photos"
    data.mkdir()
    rng = np.random.default_rng(2)
    tile = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    for i in range(600):  # enough decoding and downscaling to be inside it when the signal comes
        iio.imwrite(data / f"photo ({i}).png", np.roll(np.tile(tile, (8, 8, 1)), i, axis=1))
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(REPO / "sr_train.py"), "--model", "edsr",
                          "--n-feats", "8", "--n-blocks", "1", "--data", str(data), "--scale",
                          "2", "--steps", "5", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=120)
    assert "data: " not in stdout, "the signal came after decoding: use more images"
    assert p.returncode == 130 and err.strip() == "sr_train.py: interrupted", err
    assert not (out / "last.pt").exists()


def signal_caught(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler of its own for `sig` (its SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("script", ["sr_train.py", "sr_sample.py", "sr_eval.py"])
def test_a_signal_while_the_script_imports_torch_stops_it_with_one_line(tmp_path, images, script):
    """SLURM's SIGUSR1 (or SIGTERM) to the job's process group while the script still imports
    torch (seconds; a minute on a busy cluster file system): exit 75 and one line, not the
    default action's silent exit 138, which no job script takes for a preemption; with --json
    its line too (sr_sample.py and sr_eval.py raised the signal before reading --json: none)."""
    if script == "sr_train.py":
        argv, out = cmd(tmp_path / "run", images, 5), tmp_path / "run"
    elif script == "sr_sample.py":
        argv, out = sample_cmd(tmp_path, images, 2)
    else:  # the HR images scored as their own samples
        out = tmp_path / "res"
        argv = [sys.executable, str(REPO / "sr_eval.py"), "--hr", str(images), "--sr",
                f"{images}:1", "--scale", "2", "--n", "1", "--no-lpips", "--out",
                str(out / "r.json")]  # fmt: skip
    p = subprocess.Popen([*argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 60
    while not signal_caught(p.pid, signal.SIGUSR1) and time.time() < deadline:
        time.sleep(0.001)
    assert "libtorch" not in Path(f"/proc/{p.pid}/maps").read_text(), "torch is imported already"
    os.killpg(p.pid, signal.SIGUSR1)
    stdout, err = p.communicate(timeout=120)
    err = err.strip()
    assert p.returncode == 75, err
    said = {
        "sr_train.py": " before the first step, nothing to save; rerun the same command",
        "sr_sample.py": "; every file written is complete: rerun the same command to continue",
        "sr_eval.py": " before any image was scored; rerun the same command",
    }[script]
    assert err == f"{script}: error: stopped by SIGUSR1{said}"
    line = json.loads(stdout.splitlines()[-1]) if stdout.strip() else {}  # (--json's, after it)
    assert (line.get("exit_code"), line.get("error")) == (75, f"stopped by SIGUSR1{said}"), stdout
    assert not out.exists() or not any(out.iterdir())


def test_a_signal_while_the_cache_is_written_stops_there_and_requeues(tmp_path):
    """SIGTERM to the process group while `--cache` decodes the images (minutes for a large
    set): the run stops after the images in progress, with one line and exit 75, every cache
    file whole and no temporary one left, and under SLURM the job is requeued, as after a stop
    in the loop."""
    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(3)
    tile = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    for i in range(300):
        iio.imwrite(data / f"p{i}.png", np.roll(np.tile(tile, (8, 8, 1)), i, axis=1))
    bin_dir = tmp_path / "bin"  # a stand-in for SLURM's scontrol, which notes its arguments
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cache, out = tmp_path / "cache", tmp_path / "run"
    argv = cmd(out, data, 5) + ["--cache", str(cache), "--workers", "2"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while len(list(cache.glob("*.npy"))) < 4 and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGTERM)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 75 and err.strip() == (
        "sr_train.py: error: stopped by SIGTERM before the first step, nothing to save; rerun the "
        "same command"
    ), err
    assert "requeued SLURM job 4242" in stdout
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 4242\n"
    written = [f.name for f in cache.iterdir()]
    assert all(name.endswith(".npy") for name in written), written  # no temporary file
    assert len(written) < 600, "the signal came after decoding: use more images"
    for name in written:
        np.load(cache / name)  # whole
    assert not (out / "last.pt").exists()


def test_a_cache_on_a_full_disk_is_one_line_naming_why_exit_7(tmp_path, images):
    """A `--cache` folder that cannot take the arrays (a file-size limit: the kernel's write
    error, as on a full disk) is an output that cannot be written: exit 7, one line saying why,
    no temporary file left. It was exit 3 (a data error) with numpy's "N requested and M
    written", which does not say that the disk is full."""
    cache = tmp_path / "cache"

    def small_files():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))  # an HR array is 27 kB

    p = subprocess.run([*cmd(tmp_path / "run", images, 1), "--cache", str(cache)],
                       capture_output=True, text=True, preexec_fn=small_files)  # fmt: skip
    err = p.stderr.strip().splitlines()
    assert p.returncode == 7 and len(err) == 1, p.stderr
    assert err[0].startswith(f"sr_train.py: error: --cache {cache}: cannot write im"), err[0]
    assert err[0].endswith(
        ".hr.npy (File too large); free space there or give --cache another folder"
    ), err[0]
    assert list(cache.iterdir()) == []  # no temporary file, no array cut short


def test_a_complete_cache_in_a_read_only_folder_is_read(tmp_path, images, read_only_dir, capsys):
    """A cache made once and shared read-only (a lab's copy) was refused at start (exit 7), as an
    output that cannot be written. Its arrays are now read; a missing one stops the run with the
    line naming it, before the first step."""
    argv = cmd(tmp_path / "a", images, 1)[2:]
    assert sr_train.main([*argv, "--cache", str(tmp_path / "made")]) == 0
    for f in (tmp_path / "made").iterdir():  # the shared copy (links: made past the fixture)
        os.link(f, read_only_dir / f.name)
    capsys.readouterr()
    argv = cmd(tmp_path / "b", images, 1)[2:]
    assert sr_train.main([*argv, "--cache", str(read_only_dir)]) == 0
    assert f"--cache {read_only_dir}: read-only: its arrays are read" in capsys.readouterr().out
    gone = sorted(read_only_dir.glob("*.hr.npy"))[0]
    gone.unlink()
    with pytest.raises(SystemExit) as e:
        sr_train.main([*cmd(tmp_path / "c", images, 1)[2:], "--cache", str(read_only_dir)])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 7 and len(err) == 1, err
    assert err[0].startswith(f"sr_train.py: error: --cache {read_only_dir}: cannot write "
                             f"{gone.name} (Permission denied)")  # fmt: skip
    assert not (tmp_path / "c" / "last.pt").exists()


def test_cache_files_purged_mid_run_are_made_again_and_images_gone_too_save_first(
    tmp_path, images, monkeypatch, capsys
):
    """A scratch folder purged under a running job deletes its `--cache` files: a loader worker
    opening one (a set of over 256 images opens its memmaps again and again) stopped the run
    with its traceback, losing the steps since the last save. The files are now made again
    from their images, with a warning, and the run trains on as it would have. Where the
    images are gone too, the run saves the steps done and stops with one line, exit 3."""
    data, cache = tmp_path / "photos", tmp_path / "cache"
    data.mkdir()
    for f in images.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    real_step, away = sr_train.train_step, tmp_path / "away"

    def purge_after_3_steps(*args, **kwargs):
        if args[4] == 3:  # (step)
            for f in cache.iterdir():
                f.unlink()
            sr_lib.data._open_npy.cache_clear()  # as a large set evicts them
            if move_images:
                data.rename(away)
        return real_step(*args, **kwargs)

    def train(out, *more):
        argv = [*cmd(out, data, 6)[2:], "--save-every", "100", "--cache", str(cache), *more]
        return sr_train.main(argv)

    assert train(tmp_path / "ref") == 0
    monkeypatch.setattr(sr_train, "train_step", purge_after_3_steps)
    move_images = False
    with pytest.warns(UserWarning, match="is gone or damaged since the start; decoding"):
        assert train(tmp_path / "purged") == 0
    ref, purged = (load_checkpoint(tmp_path / r / "last.pt") for r in ("ref", "purged"))
    assert all(torch.equal(ref["state_dict"][k], v) for k, v in purged["state_dict"].items())

    move_images, out = True, tmp_path / "gone"
    capsys.readouterr()
    with pytest.warns(UserWarning), pytest.raises(SystemExit) as e:
        train(out)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and "\n" not in err, err
    assert re.fullmatch(
        rf"sr_train.py: error: step 4: {re.escape(str(data))}/im\d.png: no such file, and its "
        rf"--cache file is gone; {re.escape(str(out))}/last.pt holds step 3: "
        r"continue with --resume auto and that fixed",
        err,
    ), err
    assert load_checkpoint(out / "last.pt")["step"] == 3
    away.rename(data)
    monkeypatch.setattr(sr_train, "train_step", real_step)
    assert train(out, "--resume", "auto") == 0
    done = load_checkpoint(out / "last.pt")
    assert all(torch.equal(ref["state_dict"][k], v) for k, v in done["state_dict"].items())


def test_a_resume_after_kill_9_logs_each_step_once_and_no_torn_line(tmp_path, images):
    """A run killed with kill -9 has logged the steps after its last save, and may have left
    its last record half written. The resumed run logged those steps again, and its first record
    went onto the torn line (which then no longer parsed). Resumed, log.jsonl is cut back to the
    checkpoint's step: it reads as the log of one uninterrupted run (validation rows too)."""

    def train(out, steps, *extra):
        argv = [*cmd(out, images, steps)[2:], "--val-data", str(images), "--val-every", "2",
                "--val-n", "1", "--val-images", "1", *extra]  # fmt: skip
        assert sr_train.main(argv) == 0

    def records(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    train(tmp_path / "ref", 8)
    out = tmp_path / "run"
    train(out, 4)  # last.pt: step 4
    log = out / "log.jsonl"
    # what a run killed at step 6 leaves: steps 5 and 6 logged, a record begun
    later = [json.dumps({**r, "step": r["step"] + 2}) for r in records(log) if r["step"] > 2]
    log.write_text(log.read_text() + "".join(line + "\n" for line in later) + later[0][:20])
    train(out, 8, "--resume", "auto")

    def shape(path):
        return [(r["step"], sorted(r)) for r in records(path)]

    assert shape(log) == shape(tmp_path / "ref" / "log.jsonl")
    # --on-nan rollback: steps 1-6, back to 4 at step 7, steps 5-8 again
    rows = [{"step": s} for s in range(1, 7)] + [{"step": 7, "rollback": 1, "to_step": 4}]
    rows += [{"step": s} for s in range(5, 9)]
    for checkpoint, kept in ((6, 9), (4, 4)):  # saved after the rollback; the one it went to
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sr_train.trim_log(log, checkpoint)
        assert records(log) == rows[:kept]


def test_a_signal_while_an_error_before_the_first_step_unwinds_leaves_that_error(
    tmp_path, monkeypatch, capsys
):
    """A SIGTERM that comes while an error before the first step (a broken image) unwinds: it
    was raised in the middle of the clean-up, outside main's handler, a traceback of both. The
    error it interrupted is what the run reports (one line, exit 3): rerunning would meet it
    again."""
    data = tmp_path / "photos"
    data.mkdir()
    iio.imwrite(data / "good.png", np.full((64, 64, 3), 90, np.uint8))
    iio.imwrite(data / "broken.png", np.full((64, 64, 3), 90, np.uint8))
    (data / "broken.png").write_bytes((data / "broken.png").read_bytes()[:60])
    real = sr_train.setup_process

    def setup_then_a_signal_at_clean_up(args, cleanup):
        cleanup.callback(os.kill, os.getpid(), signal.SIGTERM)  # runs while the error unwinds
        return real(args, cleanup)

    monkeypatch.setattr(sr_train, "setup_process", setup_then_a_signal_at_clean_up)
    with pytest.raises(SystemExit) as e:
        sr_train.main(cmd(tmp_path / "run", data, 2)[2:])
    err = capsys.readouterr().err
    assert e.value.code == 3 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("sr_train.py: error: ") and "broken.png" in err


def test_a_checkpoint_not_written_says_whether_an_earlier_one_is_left(tmp_path, monkeypatch):
    """A disk full before the first save: the message said 'the previous one is intact' of a
    checkpoint that never was. After one: what to type to go on, here or on another disk."""

    def full(payload, f):
        f.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    path = tmp_path / "last.pt"
    with pytest.raises(OutputError, match=r"\(No space left on device\); none was written before"):
        save_checkpoint(path, {"step": 1})
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"earlier")
    with pytest.raises(OutputError) as e:
        save_checkpoint(path, {"step": 2})
    # what to type ("then --resume" named no value)
    assert str(e.value).endswith(
        "; the previous one is intact: free space, then continue with --resume auto (or on "
        f"another disk: --out NEW --resume {path})"
    )
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"] and path.read_bytes() == b"earlier"


def test_a_first_checkpoint_not_written_says_the_other_beside_it(tmp_path, monkeypatch):
    """best.pt's first save (the first validation) on a full disk said 'none was written before:
    ... then start again' where last.pt, an earlier save, was there to continue from, and so did
    a first last.pt beside best.pt; a folder named with a newline broke the line where it named
    the checkpoint (shlex.quote keeps it raw)."""

    def full(payload, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run\n1"
    save_checkpoint(out / "last.pt", {"step": 1})
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError) as e:
        save_checkpoint(out / "best.pt", {"step": 2})
    assert str(e.value) == (
        f"{out / 'best.pt'}: cannot write the checkpoint (No space left on device); none was "
        "written before, last.pt is intact: free space, then continue with --resume auto (or on "
        f"another disk: --out NEW --resume $'{tmp_path}/run\\n1/last.pt')"
    )
    assert sorted(f.name for f in out.iterdir()) == ["last.pt"]
    # best.pt before the first last.pt (written first at a step of both): --resume auto takes it
    (out / "last.pt").rename(out / "best.pt")
    with pytest.raises(OutputError) as e:
        save_checkpoint(out / "last.pt", {"step": 2})
    assert str(e.value).endswith(
        "; none was written before, best.pt is intact: free space, then continue with --resume "
        f"auto (or on another disk: --out NEW --resume $'{tmp_path}/run\\n1/best.pt')"
    )


@pytest.mark.parametrize("error", [errno.EINVAL, errno.EIO])
def test_a_folder_that_cannot_be_synced_after_the_rename_is_no_traceback(error, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """The fsync of the checkpoint's folder, after its rename, failed with a traceback: on a file
    system that cannot sync a folder (EINVAL) every save did, its file in place. There the save
    goes on; another error (the disk's) is one line saying the file is written."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(error, os.strerror(error))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "last.pt"
    if error == errno.EINVAL:
        save_checkpoint(path, {"step": 1})
    else:
        with pytest.raises(OutputError) as e:
            save_checkpoint(path, {"step": 1})
        assert str(e.value) == (
            f"{path}: written, but its folder cannot be synced to disk (Input/output error): it "
            "may not survive a crash of the machine; check the disk, then continue with "
            "--resume auto"
        )
    assert load_checkpoint(path)["step"] == 1 and [f.name for f in tmp_path.iterdir()] == [
        "last.pt"
    ]


def test_a_folder_that_cannot_be_opened_to_sync_is_no_traceback(tmp_path, monkeypatch):
    """The checkpoint's folder opened to fsync the rename: a folder that may be written but not
    read (mode 0333, or root squashed on NFS) was a PermissionError traceback at every save, the
    file in place. Not syncable by this user: the save goes on, as where the file system cannot."""
    real_open = os.open

    def no_read(file, flags, *args, **kwargs):
        if os.path.isdir(file):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_read)
    save_checkpoint(tmp_path / "last.pt", {"step": 1})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("where", ["start", "step 4"])
def test_a_hung_loader_worker_saves_and_exits_75_in_one_line(
    tmp_path, images, monkeypatch, capsys, where, own_temp_dir
):
    """A loader worker that hangs (on Python before 3.12 a forked worker can hang at its start
    for good, CPython gh-112275) left the run waiting for its batch until the job's time limit.
    After LOADER_TIMEOUT the run now stops as on SIGTERM: last.pt with the steps done, one line,
    exit 75, the workers gone; --resume auto continues."""
    monkeypatch.setattr(sr_lib.data, "LOADER_TIMEOUT", 2.0)
    pid_file = tmp_path / "worker.pid"
    real_crops = sr_lib.data.PatchPairs.crops

    def hang():  # in the forked worker
        pid_file.write_text(str(os.getpid()))
        time.sleep(3600)

    def init_hangs(worker_id):
        hang()

    def crops_hang_from_step_3(self, step):
        if step >= 3:
            hang()
        return real_crops(self, step)

    if where == "start":
        monkeypatch.setattr(sr_lib.data, "_worker_init", init_hangs)
    else:
        monkeypatch.setattr(sr_lib.data.PatchPairs, "crops", crops_hang_from_step_3)
    # The old code waited forever: kill the workers then, which fails the test with torch's error.
    watchdog = threading.Timer(60, lambda: [p.kill() for p in multiprocessing.active_children()])
    watchdog.start()
    out = tmp_path / "run"
    argv = [*cmd(out, images, 6)[2:], "--workers", "1", "--save-every", "100"]
    try:
        with pytest.raises(SystemExit) as e:
            sr_train.main(argv)
    finally:
        watchdog.cancel()
    err = capsys.readouterr().err.strip()
    held = (f"{out}/last.pt holds step 3: continue with --resume auto" if where == "step 4" else
            "nothing was saved: start again")  # fmt: skip
    assert e.value.code == 75 and err == (
        f"sr_train.py: error: {where if where != 'start' else 'step 1'}: the data loader's "
        "workers gave no batch for 2 s (a worker hung: on Python before 3.12 a worker can hang "
        f"at its start, CPython gh-112275); {held}"
    ), err
    if where == "start":
        assert not (out / "last.pt").exists()
    else:
        assert load_checkpoint(out / "last.pt")["step"] == 3
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
    assert multiprocessing.active_children() == []
    monkeypatch.undo()
    assert sr_train.main([*argv, "--resume", "auto"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == 6


def test_a_signal_during_a_loader_hang_saves_and_exits_75_within_seconds(
    tmp_path, images, worker_hang, own_temp_dir
):
    """SLURM's SIGTERM to the job's process group while a loader worker hangs: the wait for the
    batch was one call of LOADER_TIMEOUT (10 min), which the signal did not end, so SLURM's
    SIGKILL (30 s later) lost the steps done. The wait is now made of short slices that look at
    the stop request: last.pt with the steps done, the usual line, exit 75, within seconds. The
    hung worker, killed, left its socket's folder ($TMPDIR/pymp-*): the main process's now."""
    pid_file, out = tmp_path / "worker.pid", tmp_path / "run"
    argv = [*cmd(out, images, 8)[2:], "--workers", "1", "--save-every", "100"]
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import sr_train
{worker_hang(3, pid_file, 60.0)}
sys.exit(sr_train.main({argv!r}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120  # step 3 done, the worker in its hang: step 4 waits
        while not (pid_file.exists() and last_logged_step(out / "log.jsonl") >= 3):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGTERM)
        t0 = time.monotonic()
        stdout, err = p.communicate(timeout=20)  # the old code waited out the 60 s
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        if pid_file.exists() and pid_file.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert p.returncode == 75 and err == "", err
    assert stdout.strip().endswith(
        f"SIGTERM: stopped at step 3, wrote {out}/last.pt; continue with --resume auto"
    ), stdout
    assert took < 10, took
    assert load_checkpoint(out / "last.pt")["step"] == 3
    with pytest.raises(ProcessLookupError):  # the hung worker killed (and reaped)
        os.kill(int(pid_file.read_text()), 0)
    assert list(own_temp_dir.glob("pymp-*")) == []  # (its socket's folder: the main process's)


def test_a_library_text_is_shown_whole_once_and_only_where_quoted(tmp_path, capsys,
                                                                  monkeypatch):  # fmt: skip
    """Under SRSPACE_FULL_ERRORS=1 every library text behind an error that `joined_lines` cuts
    was written whole after the line: a text within another (torch re-raising from None with
    the first's text in its own, its context kept) twice, and one that the line never quoted
    (the weights-only refusal, said in srspace's words) as "its whole text" all the same. Now
    those the line shows cut, once each."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(60))  # (torch.save's zip, as far as its start)
    inner = "\n".join(["Unsupported global:", *(f"GLOBAL mod.cls{i} {'x' * 40}" for i in range(8))])
    said = {}

    def load(*args, **kwargs):
        try:
            raise said["kind"](inner)
        except Exception as e:
            raise said["kind"](f"{said['head']} {'y' * 50}\n{e}") from None

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setenv("SRSPACE_FULL_ERRORS", "1")
    cases = [(RuntimeError, "PytorchStreamReader failed:", 1),
             (pickle.UnpicklingError, "Weights only load failed.", 0)]  # fmt: skip
    for kind, head, whole in cases:
        said.update(kind=kind, head=head)
        with pytest.raises(SystemExit), exit_on_error("sr_sample.py"):
            torch_load(path, "checkpoint")
        err = capsys.readouterr().err
        assert err.count("its whole text") == whole and err.count("mod.cls3 ") == whole, err
