"""sr_train.py around the loop: the run-folder lock, TensorBoard, threads, what it says at start,
its help text, and model flags that must work without the paper's full-size defaults."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sr_train
from sr_lib.checkpoint import load_checkpoint, save_checkpoint
from sr_lib.errors import UsageError
from sr_lib.models import MODELS, build_model
from sr_lib.models.srflow import encoder_taps

REPO = Path(__file__).resolve().parents[1]
TINY_EDSR = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "2",
             "--patch", "8", "--batch", "2", "--workers", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("my photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        img = np.kron(rng.random((8, 8, 3)), np.ones((8, 8, 1)))  # 64 x 64
        iio.imwrite(d / f"photo {i}.png", (img * 255).astype(np.uint8))
    iio.imwrite(d / "thumb.png", np.zeros((8, 8, 3), np.uint8))  # smaller than a 16 px patch
    return d


def script(*argv, out, env=None):
    """sr_train.py as a user starts it, in its own process."""
    cmd = [sys.executable, str(REPO / "sr_train.py"), *TINY_EDSR, *argv, "--out", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip


def wait_for_log(out: Path, proc, lines: int = 2) -> None:
    deadline = time.time() + 120
    log = out / "log.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= lines:
            return
        time.sleep(0.05)
    raise AssertionError(f"no training progress in {out}: {proc.communicate()}")


def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_run_leaves_no_lock(
    tmp_path, images, monkeypatch, capsys
):
    """Two real processes on one --out: the first, as a user starts it, runs as a SLURM job with
    one CPU would (one thread, whatever the cores of the machine); the second is this one
    (refused before training, it needs no interpreter of its own)."""
    out = tmp_path / "run x"
    flags = ["--data", str(images), "--val-every", "0", "--log-every", "1", "--save-every", "1"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    first = script(*flags, "--steps", "100000", out=out, env={**env, "SLURM_CPUS_PER_TASK": "1"})
    try:
        wait_for_log(out, first)
        capsys.readouterr()
        with monkeypatch.context() as m, pytest.raises(SystemExit) as e:
            m.setattr(sr_train, "train_step", lambda *a: pytest.fail("the second run trains"))
            sr_train.main([*TINY_EDSR, *flags, "--steps", "100000", "--resume", "auto", "--out",
                           str(out)])  # fmt: skip
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert err.strip().splitlines() == [
            f"sr_train.py: error: --out {out}: another sr_train.py is using this run folder "
            f"(pid {first.pid} on {os.uname().nodename}); wait for it to end or give another --out"
        ]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)  # the kernel releases the lock with the process
    assert "device cpu (1 thread)" in first.communicate()[0]
    step = load_checkpoint(out / "last.pt")["step"]
    argv = [*TINY_EDSR, *flags, "--steps", str(step + 1), "--resume", "auto", "--out", str(out)]
    assert sr_train.main(argv) == 0  # no stale lock
    assert load_checkpoint(out / "last.pt")["step"] == step + 1


def test_a_run_killed_while_its_loader_workers_live_on_leaves_no_lock(
    tmp_path, images, own_temp_dir
):
    """kill -9 of sr_train.py alone: its loader workers, forked from it, live on until they
    notice (seconds). A --resume auto at once, while they are alive, is not refused: the lock is
    the process's own, not shared with them. The folder of the workers' sockets ($TMPDIR/pymp-*),
    the main process's, is left to them: the last to end removes it."""
    out = tmp_path / "run"
    flags = ["--data", str(images), "--val-every", "0", "--log-every", "1", "--save-every", "1"]
    first = script(*flags, "--workers", "2", "--steps", "100000", out=out)
    wait_for_log(out, first)
    workers = Path(f"/proc/{first.pid}/task/{first.pid}/children").read_text().split()
    first.kill()  # the main process only
    first.wait()
    first.stdout.close()  # (the workers hold the pipes: no communicate())
    first.stderr.close()

    def alive(pid: str) -> bool:
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

    assert len(workers) == 2 and all(map(alive, workers)), "the workers ended already"
    step = load_checkpoint(out / "last.pt")["step"]
    argv = [*TINY_EDSR, *flags, "--steps", str(step + 1), "--resume", "auto", "--out", str(out)]
    assert sr_train.main(argv) == 0
    assert load_checkpoint(out / "last.pt")["step"] == step + 1
    deadline = time.monotonic() + 60  # (a worker looks for its parent every 5 s)
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers)), "the workers live on"
    assert list(own_temp_dir.glob("pymp-*")) == []


@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_a_run_folder_deleted_or_moved_mid_run_stops_it_and_is_not_made_again(
    tmp_path, images, how, monkeypatch, capsys
):
    """`rm -rf` or `mv` of --out while the run trains (a clean-up of old runs): the run stops at
    its next write, one line and exit 7, instead of logging into a deleted file and making a new
    folder holding its checkpoint alone, where the lock would not keep a second run out. (Here
    in this process, at the start of step 3, after 2 logged steps: the folder, its open log and
    its lock are gone as under another process's rm or mv, at a step known in advance.)"""
    out = tmp_path / "run"
    real = sr_train.train_step

    def train_step(model, forward, optimizers, batches, step, *rest):
        if step == 2:
            assert (out / "log.jsonl").read_text().count("\n") == 2
            if how == "deleted":
                shutil.rmtree(out)
            else:
                out.rename(tmp_path / "moved")
        return real(model, forward, optimizers, batches, step, *rest)

    monkeypatch.setattr(sr_train, "train_step", train_step)
    flags = ["--data", str(images), "--val-every", "0", "--log-every", "1"]
    with pytest.raises(SystemExit) as e:  # (last.pt at the end only)
        sr_train.main([*TINY_EDSR, *flags, "--steps", "1000", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    # one error line; before it the warning of the thumbnail skipped, which Python says once per
    # process (another test of this xdist worker may have said it)
    assert e.value.code == 7 and all(line.startswith("sr_train.py: warning: ") for line in err[:-1])
    assert err[-1].startswith(f"sr_train.py: error: --out {out}: the run folder was deleted or "
                             "moved away while this run used it (seen at step ")  # fmt: skip
    assert not out.exists()


def test_tensorboard_holds_every_logged_number_and_the_validation_strips(tmp_path, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = [*TINY_EDSR, "--data", str(images), "--val-data", str(images), "--val-every", "2",
            "--val-n", "1", "--val-images", "2", "--steps", "4", "--log-every", "1",
            "--tensorboard", "--out", str(out)]  # fmt: skip
    assert sr_train.main(argv) == 0
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = {}
    for rec in map(json.loads, (out / "log.jsonl").read_text().splitlines()):
        for key, value in rec.items():
            if key != "step":
                logged.setdefault(key, []).append((rec["step"], value))
    assert {"loss", "learning_rate", "s_per_step", "val_psnr", "val_lrpsnr"} <= set(logged)
    assert set(events.Tags()["scalars"]) == set(logged)
    for key, values in logged.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in values], key
        assert np.allclose([v for _, v in got], [v for _, v in values], rtol=1e-6), key
    strips = EventAccumulator(str(out / "tb" / "val"), size_guidance={"images": 0})
    strips.Reload()  # (TensorBoard's run "val": an event file per validation, --keep-strips)
    assert sorted(strips.Tags()["images"]) == ["val/photo 0", "val/photo 1"]
    strip = iio.imread(out / "val" / "step0000004_photo 0.png")
    shown = strips.Images("val/photo 0")
    assert [i.step for i in shown] == [2, 4] and (shown[-1].height, shown[-1].width) == strip.shape[
        :2
    ]


def test_tensorboard_of_a_resumed_run_holds_each_step_once(tmp_path, images, monkeypatch):
    """A run killed after its last save (here: last.pt put back to step 2 after step 4) has
    logged steps 3 and 4, which the resumed run logs again: log.jsonl is cut back at the resume,
    and TensorBoard showed both runs' values at those steps (its files were left as they were).

    TensorBoard reads a folder's event files in their names' order: the second each was made,
    the host, the pid, then a count of the writers made in that process. Each sr_train.py
    process makes its file seconds after the one before (its start alone takes that long); the
    three runs here, in one process, may make theirs in one second, where a count past 9 (other
    tests' writers before them) sorts "10" before "9": the first run's file was read last, its
    purge of the steps from 1 on leaving [1, 2]. So each run's clock is a second later."""
    import tensorboard.summary.writer.event_file_writer as event_file_writer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    clock = types.SimpleNamespace(ahead=0)  # seconds: one more for each run
    clock.time = lambda: time.time() + clock.ahead
    monkeypatch.setattr(event_file_writer, "time", clock)
    out = tmp_path / "run"
    argv = [*TINY_EDSR, "--data", str(images), "--milestones", "--log-every", "1",
            "--tensorboard", "--out", str(out)]  # fmt: skip
    assert sr_train.main([*argv, "--steps", "2"]) == 0
    shutil.copy(out / "last.pt", tmp_path / "step2.pt")
    clock.ahead = 1
    assert sr_train.main([*argv, "--steps", "4", "--resume", "auto"]) == 0
    shutil.copy(tmp_path / "step2.pt", out / "last.pt")  # killed after step 4, saved at 2
    clock.ahead = 2
    assert sr_train.main([*argv, "--steps", "4", "--resume", "auto"]) == 0
    names = sorted(p.name for p in (out / "tb").glob("events.out.tfevents.*"))
    assert len({name.split(".")[3] for name in names}) == 3  # three seconds: read in run order
    rows = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    logged = [(r["step"], r["loss"]) for r in rows]
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in shown] == [s for s, _ in logged] == [1, 2, 3, 4]
    assert np.allclose([v for _, v in shown], [v for _, v in logged], rtol=1e-6)


def test_thread_count():
    count = sr_train.thread_count  # (torch's current count, environment, cores)
    assert count(64, {}, 8) == 8  # the cores this process may use
    assert count(64, {"SLURM_CPUS_PER_TASK": "2"}, 8) == 2
    assert count(64, {"SLURM_CPUS_PER_TASK": "16"}, 8) == 8  # never more than the cores
    assert count(64, {"LOCAL_WORLD_SIZE": "4"}, 8) == 2  # torchrun: the node's cores shared
    assert count(64, {"LOCAL_WORLD_SIZE": "4"}, 2) == 1
    assert count(3, {"SLURM_CPUS_PER_TASK": "4"}, 8) == 3  # lowered by OMP_NUM_THREADS or a caller


def test_start_says_what_was_found_and_whether_it_validates(tmp_path, images, capsys):
    base = [*TINY_EDSR, "--data", str(images), "--steps", "1"]
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        assert sr_train.main([*base, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"data: 3 training images of 4 found in {images} (1 skipped: smaller than one 16x16 " \
        "HR patch)" in out  # fmt: skip
    assert "validation: none (no --val-data): no best.pt will be written" in out
    with pytest.warns(UserWarning):
        assert sr_train.main([*base, "--val-data", str(images), "--val-every", "0",
                              "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    assert "validation: none (--val-every 0)" in capsys.readouterr().out
    steps0 = [*base[:-1], "0", "--val-data", str(images), "--out", str(tmp_path / "z")]
    assert sr_train.main(steps0) == 0  # said best.pt would hold the best PSNR: none is written
    assert "validation: none (--steps 0): no best.pt" in capsys.readouterr().out
    assert not (tmp_path / "z" / "best.pt").exists()
    with pytest.warns(UserWarning):
        assert sr_train.main([*base, "--val-data", str(images), "--val-images", "2",
                              "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    said = capsys.readouterr().out  # (a run shorter than --val-every validates at its end)
    assert f"validation: 2 images of {images} every 1000 steps and at the last;" in said
    assert (tmp_path / "c" / "best.pt").is_file()  # validated at the last step
    with pytest.warns(UserWarning):  # one image: "1 images" was said
        assert sr_train.main([*base, "--val-data", str(images), "--val-images", "1",
                              "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    assert f"validation: 1 image of {images} every" in capsys.readouterr().out


def test_a_recipe_of_no_steps_says_it_validates_nothing(tmp_path, capsys):
    """bicubic's recipe trains 0 steps: its run on demo said "validation: 3 images of demo
    every 1000 steps; best.pt holds the best PSNR" (and decoded them), then wrote no best.pt,
    as --steps 0 says it will not."""
    assert sr_train.main(["--model", "bicubic", "--out", str(tmp_path)]) == 0
    assert "validation: none (the bicubic recipe has no steps): no best.pt will be written; " \
        "sample from last.pt" in capsys.readouterr().out  # fmt: skip
    assert not (tmp_path / "best.pt").exists()


def test_a_finished_run_resumed_again_reads_no_image(tmp_path, images, monkeypatch, capsys):
    """A run at its --steps resumed again (a requeued job, a job script run twice) decoded every
    training and validation image (DIV2K's 800: minutes, 7 GB without --cache) to say "done",
    and said that its next validation, which never comes, writes best.pt. It says there is
    nothing to train now, reading no image; a larger --steps trains on."""
    base = [*TINY_EDSR, "--data", str(images), "--val-data", str(images), "--steps", "1",
            "--out", str(tmp_path)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the thumbnail, validation images being training ones)
        assert sr_train.main(base) == 0
        capsys.readouterr()
        with monkeypatch.context() as m:
            for name in ("PatchPairs", "load_pairs"):
                m.setattr(sr_train, name, lambda *a, **k: pytest.fail("an image was read"))
            assert sr_train.main([*base, "--resume", "auto", "--val-images", "2"]) == 0
        out = capsys.readouterr().out
        assert f"{tmp_path / 'last.pt'} is at step 1, the run's --steps: nothing to train (a " \
            "larger --steps goes on)" in out  # fmt: skip
        assert "data:" not in out and "validation" not in out and "best.pt" not in out
        assert out.strip().endswith(f"done: 1 steps, 0 skipped, checkpoint {tmp_path / 'last.pt'}")
        # resumed into another folder, where it writes no last.pt: the closing line named that
        other = tmp_path / "other"
        assert sr_train.main([*base[:-1], str(other), "--resume", str(tmp_path / "last.pt")]) == 0
        assert capsys.readouterr().out.strip().endswith(f"checkpoint {tmp_path / 'last.pt'}")
        assert not (other / "last.pt").exists()
        assert sr_train.main([*base, "--resume", "auto", "--steps", "2"]) == 0
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_a_bicubic_run_resumed_again_promises_no_larger_steps(tmp_path, capsys):
    # demo.sh's rerun: bicubic, without weights, has nothing a larger --steps would train
    base = ["--model", "bicubic", "--steps", "0", "--val-every", "0", "--out", str(tmp_path)]
    assert sr_train.main(base) == 0
    capsys.readouterr()
    assert sr_train.main([*base, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'last.pt'} is at step 0, the run's --steps: nothing to train\n" in out
    # in the order things happen: it said "nothing to train" before "resumed ... at step 0"
    assert out.index(f"resumed {tmp_path / 'last.pt'} at step 0") < out.index("nothing to train")


def test_a_stop_before_a_step_of_its_own_names_the_checkpoint_that_holds_the_run(
    tmp_path, images, monkeypatch, capsys
):
    """A run resumed from a checkpoint in another folder, stopped by SIGTERM while its loader
    waited for the first batch, wrote nothing, yet said "wrote OTHER/last.pt; continue with
    --resume auto", which in OTHER, holding no checkpoint, starts a new run. The --resume it
    says is quoted for a shell (a folder with a space: written bare, it was two words)."""
    first = tmp_path / "first run" / "last.pt"
    base = [*TINY_EDSR, "--data", str(images), "--val-every", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the thumbnail)
        assert sr_train.main([*base, "--steps", "1", "--out", str(first.parent)]) == 0
        capsys.readouterr()
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)

        def stopped_waiting(*args):  # a signal while the loader waits for the batch
            os.kill(os.getpid(), signal.SIGTERM)
            raise sr_train.StopRequested

        monkeypatch.setattr(sr_train, "train_step", stopped_waiting)
        other = tmp_path / "other"
        argv = [*base, "--steps", "3", "--resume", str(first), "--out", str(other)]
        assert sr_train.main(argv) == 75
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"SIGTERM: stopped at step 1, {first} holds it; continue with --resume '{first}'"
    )
    assert not (other / "last.pt").exists()


def test_a_signal_in_validation_ends_it_before_the_next_image_and_saves(
    tmp_path, images, monkeypatch, capsys
):
    """SLURM's signal comes a set time before the kill (--signal=B:USR1@120); a validation of
    whole images (--val-images 0 --val-crop 0, a flow) can outlast it, and went on to its end:
    the kill then took the steps since the last save. It ends before the next image, unscored
    (best.pt not written), and the run saves last.pt of this step and exits 75."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    model_cls = type(build_model("edsr", {"n_feats": 8, "n_blocks": 1, "scale": 2}))
    sample, calls = model_cls.sample, []

    def signalled(self, *args, **kwargs):  # the signal comes while the first image is sampled
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(model_cls, "sample", signalled)
    argv = [*TINY_EDSR, "--data", str(images), "--val-data", str(images), "--val-every", "2",
            "--save-every", "100", "--steps", "5", "--out", str(tmp_path)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the thumbnail, validation images being training ones)
        assert sr_train.main(argv) == 75
    err = capsys.readouterr().err
    assert "validation at step 2: stopped by SIGUSR1 after 1 of 3 images; not scored (best.pt " \
        "as it was)" in err  # fmt: skip
    assert len(calls) == 1 and not (tmp_path / "best.pt").exists()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"step": 2, "signal": "SIGUSR1", "validation": "stopped"} in records
    assert not any("val_psnr" in r for r in records)


def test_a_validation_a_signal_stopped_is_done_when_the_run_resumes(
    tmp_path, images, monkeypatch, capsys
):
    """The validation a signal ended (above) was not done again: the resumed run went on to
    the next step, so its best.pt and OUT/val/ strips were not those of the run never stopped
    (--learning-rate 0: every validation scores the same, best.pt is the first one's, step 2;
    the resumed run's was step 4's). The resumed run validates that step first: its scores,
    best.pt and strips are the uninterrupted run's. So does a run stopped in the validation of
    its last step, once (its last.pt says it is done)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    model_cls = type(build_model("edsr", {"n_feats": 8, "n_blocks": 1, "scale": 2}))
    sample = model_cls.sample

    def signalled(self, *args, **kwargs):  # (validation's first image: only it samples)
        monkeypatch.setattr(model_cls, "sample", sample)
        os.kill(os.getpid(), signal.SIGUSR1)
        return sample(self, *args, **kwargs)

    def argv(out, steps, *extra):
        return [
            *TINY_EDSR,
            "--data",
            str(images),
            "--val-data",
            str(images),
            "--val-every",
            "2",
            "--learning-rate",
            "0",
            "--steps",
            str(steps),
            "--out",
            str(out),
            *extra,
        ]

    def outcome(out):
        logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        best = load_checkpoint(out / "best.pt")
        return ([(r["step"], r["val_psnr"]) for r in logged if "val_psnr" in r], best["step"],
                {p.name: p.read_bytes() for p in (out / "val").iterdir()})  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the thumbnail, validation images being training ones)
        for steps in (4, 2):  # stopped at step 2's validation: mid-run, the run's last step
            never, out = tmp_path / f"never{steps}", tmp_path / f"stopped{steps}"
            assert sr_train.main(argv(never, steps)) == 0
            assert outcome(never)[1] == 2
            monkeypatch.setattr(model_cls, "sample", signalled)
            assert sr_train.main(argv(out, steps)) == 75  # (the last step's: was 0, "done")
            assert not (out / "best.pt").exists()
            assert sr_train.main(argv(out, steps, "--resume", "auto")) == 0
            assert outcome(out) == outcome(never)
            assert sr_train.main(argv(out, steps, "--resume", "auto")) == 0  # done: no more
            assert outcome(out) == outcome(never)
    assert "validation at step 2: stopped by SIGUSR1" in capsys.readouterr().err


def test_a_best_pt_newer_than_last_pt_is_replaced_only_by_a_better_one(tmp_path, images, capsys):
    """A run killed without a signal (kill -9, a node lost) after a validation wrote best.pt and
    before its next last.pt: the resumed run took last.pt's older record of the best, and its
    next validation above that record replaced the better best.pt. (Its step 3 here is made by
    hand: last.pt at step 2, best.pt of step 3 at PSNR 99.)"""
    base = [*TINY_EDSR, "--data", str(images), "--val-data", str(images), "--val-every", "1",
            "--out", str(tmp_path)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the thumbnail, validation images being training ones)
        assert sr_train.main([*base, "--steps", "2"]) == 0
        best = load_checkpoint(tmp_path / "best.pt")
        save_checkpoint(tmp_path / "best.pt", {**best, "step": 3, "best": 99.0})
        capsys.readouterr()
        assert sr_train.main([*base, "--steps", "3", "--resume", "auto"]) == 0
    assert f"best.pt: holds step 3 (PSNR 99.000), after {tmp_path / 'last.pt'}'s step 2 (the " \
        "run stopped without saving it): a validation replaces it only if better" \
        in capsys.readouterr().out  # fmt: skip
    kept = load_checkpoint(tmp_path / "best.pt")
    assert (kept["step"], kept["best"]) == (3, 99.0)
    assert load_checkpoint(tmp_path / "last.pt")["best"] == 99.0  # (its next resume knows)


def test_validation_images_that_are_training_images_are_warned_of(tmp_path, images):
    """--val-data given the --data folder, or a folder with links to training images: best.pt
    was chosen on images the model trains on, without a word. One warning now says how many;
    held-out images (and the training set's too-small image, never trained on) are not named."""
    held = tmp_path / "held out"
    held.mkdir()
    iio.imwrite(held / "a new one.png", np.full((64, 64, 3), 90, np.uint8))
    (held / "b linked.png").symlink_to(images / "photo 1.png")
    base = [*TINY_EDSR, "--data", str(images), "--steps", "1", "--val-images", "0"]
    expected = {
        images: f"3 of 4 validation images are training images too (e.g. {images / 'photo 0.png'})",
        held: f"1 of 2 validation images are training images too (e.g. {held / 'b linked.png'})",
    }
    for val, said in expected.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = tmp_path / f"run {val.name}"
            assert sr_train.main([*base, "--val-data", str(val), "--out", str(out)]) == 0
        msgs = [str(w.message) for w in caught if "--val-data" in str(w.message)]
        assert msgs == [
            f"--val-data: {said}: their PSNR, and best.pt, reward fitting the training set; give "
            "--val-data held-out images"
        ]
    (held / "b linked.png").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sr_train.main([*base, "--val-data", str(held), "--out", str(tmp_path / "c")]) == 0
    assert not [w for w in caught if "--val-data" in str(w.message)]


def test_validation_images_of_one_stem_are_refused_at_start(tmp_path, images, capsys):
    """cat.png and cat.jpg in --val-data: their samples drew the same noise (seeded by stem) and
    the second's strip replaced the first's in OUT/val/ at every validation, without a word,
    where the README promises a strip per image. One line now, exit 3, before any step; images
    beyond --val-images are not looked at, and sub/cat.png is another stem."""
    val = tmp_path / "val"
    (val / "sub").mkdir(parents=True)
    for name in ("cat.png", "cat.jpg", "sub/cat.png"):
        iio.imwrite(val / name, np.full((32, 32, 3), 90, np.uint8))
    base = [*TINY_EDSR, "--data", str(images), "--steps", "1", "--val-data", str(val)]
    with pytest.raises(SystemExit) as e:
        sr_train.main([*base, "--val-images", "0", "--out", str(tmp_path / "a")])
    err = [x for x in capsys.readouterr().err.splitlines() if "warning: skipped" not in x]
    assert e.value.code == 3 and err == [  # (the thumbnail's warning aside)
        f"sr_train.py: error: --val-data {val}: cat.jpg and cat.png share the stem 'cat', which "
        "names their validation samples and strips; rename one"
    ]
    assert not (tmp_path / "a").exists()  # no step taken: the folder it made removed
    (val / "cat.jpg").rename(val / "zebra.jpg")  # beyond --val-images 2 below
    (val / "zebra.png").write_bytes((val / "cat.png").read_bytes())
    # Two validations: a subfolder's strips go to that subfolder of OUT/val/ (they made a folder
    # step0000001_sub/ holding cat.png, and another at every validation)
    assert sr_train.main([*base, "--val-images", "2", "--steps", "2", "--val-every", "1",
                          "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    assert sorted(p.relative_to(tmp_path / "b" / "val").as_posix()
                  for p in (tmp_path / "b" / "val").rglob("*")) == [
        "step0000001_cat.png", "step0000002_cat.png", "sub", "sub/step0000001_cat.png",
        "sub/step0000002_cat.png"]  # fmt: skip


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        sr_train.main([*argv, "-h"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_defaults_and_what_each_switch_does(capsys):
    text = help_text([], capsys)
    assert "--workers WORKERS data loader processes (0 = inline) (default: 2)" in text
    assert "--max-rollbacks MAX_ROLLBACKS --on-nan rollback: at most this many, then exit 5 " \
        "(default: 3)" in text  # fmt: skip
    assert "--no-requeue under SLURM, do not requeue the job" in text
    assert "--model NAME -h" in text
    text = help_text(["--model", "vspsr"], capsys)
    assert "vspsr model options (--scale 2, 3, 4 or 8)" in text
    assert "--no-cem-test samples without the CEM" in text
    assert "--no-stochastic-w ω = μ, not sampled" in text
    assert "--no-refine-m m without the small learned conv U" in text
    assert "--n-basis N_BASIS atoms C (Table 1 #5: 64, widths 16) (default: 256)" in text
    text = help_text(["--model", "srflow"], capsys)
    assert "srflow model options (--scale 4 or 8)" in text
    assert "--no-unused-conv drop the released code's never-called conv f" in text
    assert "--gaussian-std GAUSSIAN_STD on the 0-255 scale (default: 2.3094)" in text


@pytest.mark.parametrize("model", ["edsr", "srflow", "bicubic"])
def test_help_lists_scale_and_help_once(model, capsys):
    """--scale is the run's (the model's Config has a scale field too, never parsed from the
    command line): one entry, with one help text, as -h."""
    with pytest.raises(SystemExit):
        sr_train.main(["--model", model, "-h"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("  --scale")] == ["--scale"]
    assert len([line for line in lines if line.startswith("  -h, --help")]) == 1
    assert sum(line.count("[--scale") + line.count("[-h]") for line in lines) == 2  # usage


def test_a_small_flow_encoder_needs_no_rrdb_blocks_flag(tmp_path, images):
    """--nb 2 alone: the paper's taps 1,8,15,22 of 23 blocks, spread over 2 blocks: 0,1."""
    assert encoder_taps("", "1,8,15,22", 2) == (0, 1)
    assert encoder_taps("", "1,8,15,22", 12) == (0, 4, 8, 11)
    assert encoder_taps("", "1,3,5,7", 8) == (1, 3, 5, 7)  # fits: the paper's as they are
    assert encoder_taps("0,1", "1,8,15,22", 2) == (0, 1)
    with pytest.raises(UsageError, match="need blocks in 0..1"):
        encoder_taps("1,2", "1,8,15,22", 2)
    tiny = dict(nb=2, nf=8, gc=4, flow_steps=1, hidden_channels=8)
    for name in ("srflow", "srflow_da", "ncsr"):
        assert build_model(name, {**tiny, "scale": 4}).blocks == (0, 1)
    assert build_model("srflow", {**tiny, "scale": 8}).blocks == (0,)  # x8: taps 1,3,5,7
    argv = ["--model", "srflow", "--scale", "4", "--nb", "2", "--nf", "8", "--gc", "4",
            "--flow-steps", "1", "--hidden-channels", "8", "--data", str(images), "--patch", "8",
            "--batch", "2", "--steps", "1", "--workers", "0", "--out", str(tmp_path)]  # fmt: skip
    with pytest.warns(UserWarning):
        assert sr_train.main(argv) == 0
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_a_file_system_without_locks_warns_and_trains(tmp_path, images, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(sr_train.fcntl, "lockf", no_locks)
    argv = [*TINY_EDSR, "--data", str(images), "--steps", "1", "--out", str(tmp_path)]
    with pytest.warns(UserWarning, match="cannot lock the run folder .No locks available"):
        assert sr_train.main(argv) == 0


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_folder_named_like_a_checkpoint_is_found_before_the_first_step(tmp_path, images, name,
                                                                         capsys):  # fmt: skip
    """OUT/last.pt (or best.pt) a folder, say made by a copy gone wrong: the run trained every
    step up to its first save, then stopped with exit 7 there; now it stops before the first."""
    (tmp_path / name).mkdir()
    argv = [*TINY_EDSR, "--data", str(images), "--steps", "2", "--val-data", str(images),
            "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv)
    assert e.value.code == 7
    out, err = capsys.readouterr()
    assert "step 1" not in out
    assert err.splitlines() == [
        f"sr_train.py: error: --out {tmp_path}: {tmp_path / name} is a folder, where this run "
        "saves its checkpoint; move it away"
    ]


def test_model_help_gives_its_paper_recipe_as_flags_that_reproduce_it(capsys):
    """--model NAME -h prints the recipe the unset run flags take, as flags: those flags typed
    onto any other recipe give the model's (exact values: 2/3 as 0.6666666666666666, not a
    rounded 0.666667 that moves a decay step), then where it departs from the released code:
    rrdb x4's 200k steps, where RRDB_DF2K_4X.yml says 1M, went unsaid (README, docs/flows.md
    alone)."""
    checked = 0
    for name, model in MODELS.items():
        for scale in model.scales if model.learns else ():
            about = sr_train.recipe_help(name, scale).splitlines()
            assert about[0].startswith(f"{name} paper recipe at --scale {scale}, which ")
            (line,) = [x for x in about if x.startswith("  --")]  # (one line: pasted as one
            assert line.startswith("  --batch ")  # command line)
            note = " ".join(about[about.index(line) + 1 :])
            assert note == (f"Unlike the released code: {model.recipe(scale).note}." * bool(note))
            tokens = line.split()
            args, _, _ = sr_train.parse_all(["--model", name, "--scale", str(scale), *tokens])
            other = sr_train.Recipe(batch=1, patch=2, steps=3, learning_rate=0.5,
                                    milestones=(0.1,), gamma=0.9, grad_clip=7.0, warmup=9,
                                    d_learning_rate=0.5)  # fmt: skip
            got, want = sr_train.parse_recipe(args, other), model.recipe(scale)
            flagged = ["batch", "patch", "steps", "learning_rate", "milestones", "gamma"]
            flagged += ["grad_clip"] * (want.grad_clip > 0) + ["warmup"] * (want.warmup > 0)
            flagged += ["d_learning_rate"] * ("--d-learning-rate" in tokens)
            if want.schedule == "cosine" or not want.milestones:
                flagged.remove("milestones"), flagged.remove("gamma")
            assert {k: getattr(got, k) for k in flagged} == {k: getattr(want, k) for k in flagged}
            checked += 1
    assert checked > 20
    assert "RRDB_DF2K_4X.yml trains 1M steps" in sr_train.recipe_help("rrdb", 4)
    assert "1M" not in sr_train.recipe_help("rrdb", 8)  # (RRDB_DF2K_8X.yml's are 200k)
    assert sr_train.recipe_help("srflow", 2).startswith("srflow has no recipe at --scale 2")
    with pytest.raises(SystemExit):
        sr_train.main(["--model", "vspsr", "--scale", "8", "-h"])
    assert "vspsr paper recipe at --scale 8" in capsys.readouterr().out
