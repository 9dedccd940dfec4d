"""sr_train.py: checkpoints, exact resume, the non-finite guard, signals, bad flags."""

import errno
import hashlib
import json
import multiprocessing.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

import sr_lib.data
import sr_train
from sr_lib import config, models
from sr_lib.checkpoint import load_checkpoint, save_checkpoint
from sr_lib.errors import OutputError, UsageError
from sr_lib.models import load_model
from sr_lib.models.base import ModelConfig, Recipe, SRModel

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ToyConfig(ModelConfig):
    nan_loss_steps: str = ""  # comma-separated steps whose loss is NaN
    nan_grad_steps: str = ""  # steps whose gradient is NaN while the loss is finite
    noisy: bool = False  # draw from the global torch RNG in forward (tests RNG restore)


class Toy(SRModel):
    """conv + pixel shuffle; can produce NaN losses/gradients on chosen steps."""

    Config = ToyConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.conv = nn.Conv2d(3, 3 * cfg.scale**2, 3, padding=1)
        self.step = 0

    def on_step(self, step, total):
        self.step = step

    def _steps(self, text):
        return {int(s) for s in text.split(",") if s}

    def forward(self, lr, hr):
        sr = nn.functional.pixel_shuffle(self.conv(lr), self.scale)
        if self.cfg.noisy:
            sr = sr + 0.01 * torch.randn_like(sr)
        if self.step in self._steps(self.cfg.nan_grad_steps):
            sr.register_hook(lambda g: g * float("nan"))
        loss = (sr - hr).abs().mean()
        if self.step in self._steps(self.cfg.nan_loss_steps):
            loss = loss * float("nan")
        return {"loss": loss, "sr": sr}

    def generate(self, lr, n, temperature, noise):
        sr = nn.functional.pixel_shuffle(self.conv(lr), self.scale)
        return sr.unsqueeze(1).expand(-1, n, -1, -1, -1)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(models.MODELS, "toy", Toy)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(4):
        base = rng.random((12, 12, 3))
        img = np.kron(base, np.ones((8, 8, 1)))  # smooth-ish 96x96
        iio.imwrite(d / f"img{i}.png", (img * 255).astype(np.uint8))
    return d


def run(out, images, *extra):
    argv = ["--data", str(images), "--scale", "2", "--patch", "8", "--batch", "2",
            "--workers", "0", "--val-every", "0", "--log-every", "1",
            "--out", str(out), *extra]  # fmt: skip
    return sr_train.main(argv)


def params(path):
    return load_checkpoint(path)["state_dict"]


def test_bicubic_zero_steps_writes_a_valid_checkpoint(tmp_path):
    assert sr_train.main(["--model", "bicubic", "--steps", "0", "--out", str(tmp_path)]) == 0
    model, ck = load_model(tmp_path / "last.pt")
    assert ck["model"] == "bicubic" and ck["step"] == 0
    assert model.sample(torch.rand(1, 3, 5, 6), 2).shape == (1, 2, 3, 20, 24)


def test_resume_is_exact(tmp_path, images, toy):
    run(tmp_path / "a", images, "--model", "toy", "--steps", "4", "--noisy")
    run(tmp_path / "b", images, "--model", "toy", "--steps", "2", "--noisy")
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 2
    run(tmp_path / "b", images, "--model", "toy", "--steps", "4", "--resume", "auto")
    a, b = params(tmp_path / "a" / "last.pt"), params(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_deterministic_run_called_from_python_puts_torchs_settings_back(tmp_path, images, toy):
    """main(["--deterministic", ...]) left deterministic algorithms on (warn-only), cuDNN's
    deterministic flag set and CUBLAS_WORKSPACE_CONFIG in the caller's environment: a notebook's
    or a test's later run without the flag was deterministic too, and slower on a GPU."""
    cudnn = torch.backends.cudnn

    def settings():
        return (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.benchmark,
                cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip

    before = settings()
    assert before == (False, False, False, False, None)  # torch's defaults
    assert run(tmp_path, images, "--model", "toy", "--steps", "1", "--deterministic") == 0
    assert settings() == before


def test_a_resume_without_the_first_flags_goes_on_as_the_run(tmp_path, images, capsys):
    """`--resume auto --out DIR` alone continues the run as it was: its batch, patch, learning
    rate and schedule, seed, scale, data and weight average come from the checkpoint (they fell
    back to the recipe and defaults, silently), bit for bit as one straight run. A flag given
    on the resume wins and is said, also when abbreviated; an abbreviated model flag that
    differs is refused like a spelled-out one (it was ignored)."""
    # (--milestones alone: no decay; a schedule in fractions of 2 steps would differ)
    first = ("--model edsr --n-feats 8 --n-blocks 1 --learning-rate 1e-3 --milestones --gamma 0.25 "
             "--seed 5 --ema 0.5 --batch 3 --deterministic --no-requeue").split()  # fmt: skip
    assert run(tmp_path / "a", images, *first, "--steps", "4") == 0
    assert run(tmp_path / "b", images, *first, "--steps", "2") == 0
    capsys.readouterr()
    resume = ["--resume", "auto", "--out", str(tmp_path / "b"), "--steps", "4"]
    assert sr_train.main(resume) == 0
    assert "changed flags: --steps 4 (was 2)" in capsys.readouterr().out
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    local = set(sr_train.LOCAL_FLAGS)
    assert {k: v for k, v in a["train_args"].items() if k not in local} == {
        k: v for k, v in b["train_args"].items() if k not in local
    }
    # one-way switches are this invocation's: a resume could not turn them off
    assert (b["train_args"]["deterministic"], b["train_args"]["requeue"]) == (False, True)
    assert sr_train.main([*resume[:4], "--steps", "5", "--learn", "2e-3", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "--learning-rate 0.002 (was 0.001), --seed 0 (was 5)" in out
    assert logged_rates(tmp_path / "b")[-1] == pytest.approx(2e-3)
    with pytest.raises(SystemExit) as e:
        sr_train.main([*resume[:4], "--steps", "6", "--n-feat", "16"])
    assert e.value.code == 2 and "--n-feats 16 (was 8)" in capsys.readouterr().err


def test_a_resume_of_a_checkpoint_without_a_newer_model_field_compares_its_default(
    tmp_path, capsys
):
    """A checkpoint of an srspace before a model field (here rrdb's global_skip) builds with
    that field's default: a resume repeating the default is no change (it was refused as
    '--global-skip srflow (was None)'), another value is refused naming the default."""
    out = tmp_path / "run"
    tiny = ["--model", "rrdb", "--nb", "1", "--nf", "8", "--gc", "4", "--batch", "2", "--patch",
            "8", "--val-every", "0", "--no-requeue", "--out", str(out)]  # fmt: skip
    assert sr_train.main([*tiny, "--steps", "0"]) == 0
    ck = load_checkpoint(out / "last.pt")
    del ck["model_cfg"]["global_skip"]  # as an srspace before --global-skip wrote it
    save_checkpoint(
        out / "last.pt", {k: v for k, v in ck.items() if k not in ("format", "version", "torch")}
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sr_train.main([*tiny, "--steps", "1", "--resume", "auto", "--global-skip", "esrgan"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model flags: --global-skip esrgan (was srflow); " in err
    assert (
        sr_train.main([*tiny, "--steps", "1", "--resume", "auto", "--global-skip", "srflow"]) == 0
    )
    assert load_checkpoint(out / "last.pt")["step"] == 1


def test_a_resume_by_path_never_overwrites_another_runs_last_pt(tmp_path, images, toy, capsys,
                                                               monkeypatch):  # fmt: skip
    """--resume CKPT without --out trains in the default folder of its model and scale
    (runs/toy_x2); where that folder holds another run's last.pt, it is refused (before, the
    default --scale 4 refused it by chance, and --scale 2 overwrote the other run)."""
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path / "old", images, "--model", "toy", "--steps", "1") == 0
    assert run(tmp_path / "runs" / "toy_x2", images, "--model", "toy", "--steps", "2") == 0
    other = (tmp_path / "runs" / "toy_x2" / "last.pt").read_bytes()
    capsys.readouterr()
    for resume in (tmp_path / "old" / "last.pt", tmp_path / "runs" / "toy_x2" / "best.pt"):
        if resume.name == "best.pt":  # another checkpoint of that very folder
            shutil.copy(tmp_path / "old" / "last.pt", resume)
        with pytest.raises(SystemExit) as e:
            sr_train.main(["--resume", str(resume), "--steps", "3", "--workers", "0"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "holds another checkpoint" in err[0], err
        assert (tmp_path / "runs" / "toy_x2" / "last.pt").read_bytes() == other
    assert sr_train.main(["--resume", str(tmp_path / "old" / "last.pt"), "--steps", "2",
                          "--workers", "0", "--out", "new"]) == 0  # fmt: skip
    assert load_checkpoint(tmp_path / "new" / "last.pt")["step"] == 2


def test_an_older_checkpoints_unset_flags_stay_unset(tmp_path, images, toy, capsys):
    """Before the Recipe, unset run flags were stored as -1, 0, 0.0 or []: taken over as such,
    a resume would have trained at a learning rate of 0. They are read as unset (the recipe's);
    the other flags are taken over (here the scale, 2, and the data)."""
    assert run(tmp_path, images, "--model", "toy", "--steps", "2") == 0
    ck = load_checkpoint(tmp_path / "last.pt")
    legacy = dict(steps=-1, batch=0, patch=0, learning_rate=0.0, d_learning_rate=0.0)
    ck["train_args"].update(legacy, milestones=[], gamma=0.0, grad_clip=-1.0, val_temperature=-1.0)
    save_checkpoint(tmp_path / "last.pt", ck)
    capsys.readouterr()
    assert sr_train.main(["--resume", "auto", "--out", str(tmp_path), "--steps", "3",
                          "--workers", "0"]) == 0  # fmt: skip
    assert "changed flags: --steps 3 (was unset)" in capsys.readouterr().out
    recipe = models.MODELS["toy"].recipe(2)
    assert logged_rates(tmp_path)[-1] == sr_train.learning_rate_at(2, replace(recipe, steps=3))
    assert load_checkpoint(tmp_path / "last.pt")["train_args"]["batch"] is None


def test_a_resume_with_more_steps_says_where_the_learning_rate_moves(tmp_path, images, capsys):
    """The milestones are fractions of --steps: a run halved at step 2 of 4, resumed at step 4
    with --steps 10, trained at the undecayed rate again until step 5, and only "changed flags"
    hinted at it. One line now gives the rate before and after and the --milestones that keep
    the first run's schedule; with those, or with the same --steps, no line."""
    first = ("--model edsr --n-feats 8 --n-blocks 1 --learning-rate 6e-4 --milestones 0.5 "
             "--steps 4").split()  # fmt: skip
    assert run(tmp_path / "a", images, *first) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert sr_train.main(["--resume", "auto", "--out", str(tmp_path / "a"), "--steps", "10"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "learning rate at" in line]
    assert said == ["--steps 10 (was 4): the learning rate at step 4 is 0.0006, not 0.0003, as "
                    "the schedule is fractions of --steps; to keep the schedule of the first 4 "
                    "steps, give --milestones 0.2"]  # fmt: skip
    assert logged_rates(tmp_path / "a")[4] == 6e-4  # (what the line said)
    assert sr_train.main(["--resume", "auto", "--out", str(tmp_path / "b"), "--steps", "10",
                          "--milestones", "0.2"]) == 0  # fmt: skip
    assert "learning rate at" not in capsys.readouterr().out
    assert logged_rates(tmp_path / "b")[4] == 3e-4


def test_given_hr_folders_do_not_keep_the_runs_lr_folders():
    args, _, given = sr_train.parse_all(["--data", "new_hr", "--resume", "auto"])
    resumed = {"train_args": {"data": ["old_hr"], "lr_data": ["old_lr"], "seed": 5}}
    sr_train.inherit_flags(args, given, resumed)
    assert (args.data, args.lr_data, args.seed) == (["new_hr"], [], 5)


def test_a_list_flag_given_twice_keeps_both_also_abbreviated():
    """`--data A --data B` trains on both; `--data A --dat B` (argparse takes `--dat` for
    --data) trained on A alone, silently: argparse keeps a flag's last occurrence, and only the
    spelled-out ones were merged. given_fields and sr_sample.py's and sr_eval.py's list flags
    share the merge."""
    argv = ["--dat=A", "--data", "B", "--lr-dat", "X", "--lr-data", "Y", "--milest", "0.5"]
    args, _, given = sr_train.parse_all([*argv, "--milestones", "0.75"])
    assert (args.data, args.lr_data, args.milestones) == (["A", "B"], ["X", "Y"], [0.5, 0.75])
    assert {"data", "lr_data", "milestones"} <= given
    with pytest.raises(UsageError, match="ambiguous option: --d could match"):
        sr_train.parse_all(["--data", "A", "--d", "B"])  # (not one flag's start: argparse's)


def test_changed_flags_name_an_empty_value_as_unset_or_none():
    """A resume given --val-data where the run had none said `--val-data DIR (was )`, and one
    given --milestones alone `--milestones  (was 0.5)`: an empty text flag is unset, an empty
    list none."""
    argv = ["--data", "new_hr", "--val-data", "val", "--milestones", "--resume", "auto"]
    args, _, given = sr_train.parse_all(argv)
    resumed = {"train_args": {"data": ["old_hr"], "lr_data": ["old_lr"], "val_data": "",
                              "milestones": [0.5]}}  # fmt: skip
    sr_train.inherit_flags(args, given, resumed)
    assert sr_train.changed_flags(args, resumed) == [
        "--data new_hr (was old_hr)", "--lr-data none (was old_lr)", "--val-data val (was unset)",
        "--milestones none (was 0.5)"]  # fmt: skip


def test_resuming_a_finished_run_leaves_last_pt_byte_for_byte(tmp_path, images, toy):
    """A job rerun after it finished (a pipeline's `--resume auto`, demo.sh twice) trains
    nothing and rewrites nothing: samples made from last.pt still match its sha256."""
    assert run(tmp_path, images, "--model", "toy", "--steps", "2") == 0
    before = (tmp_path / "last.pt").read_bytes()
    assert run(tmp_path, images, "--model", "toy", "--steps", "2", "--resume", "auto") == 0
    assert (tmp_path / "last.pt").read_bytes() == before
    assert run(tmp_path, images, "--model", "toy", "--steps", "3", "--resume", "auto") == 0
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3  # more steps: trains and saves


def test_a_folder_with_best_pt_but_no_last_pt_is_resumed_never_restarted(tmp_path, images, toy,
                                                                         capsys):  # fmt: skip
    """A run killed (SIGKILL, a node down) after its first validation but before its first save
    of last.pt leaves best.pt alone: `--resume auto` (the requeued job) started a new run from
    step 0 that overwrote it, and so did a run without --resume. Now auto resumes best.pt."""
    flags = ["--model", "toy", "--val-data", str(images), "--val-every", "1", "--val-images", "1"]
    assert run(tmp_path, images, *flags, "--steps", "2") == 0
    (tmp_path / "last.pt").unlink()
    best = (tmp_path / "best.pt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, *flags, "--steps", "3")
    assert e.value.code == 2 and "holds a run (best.pt)" in capsys.readouterr().err
    assert (tmp_path / "best.pt").read_bytes() == best
    assert run(tmp_path, images, *flags, "--steps", "3", "--resume", "auto") == 0
    assert f"resumed {tmp_path / 'best.pt'} at step 2 (the run has no last.pt)" in (
        capsys.readouterr().out
    )
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3


def test_a_resume_validating_otherwise_does_not_keep_the_old_best_psnr(tmp_path, images, toy,
                                                                      capsys):  # fmt: skip
    """A resume given another --val-data (or --val-images...) kept the checkpoint's best PSNR,
    measured on other images: the new set's lower scores never beat it, and best.pt stayed the
    old step's for the rest of the run, while the run said best.pt holds the best PSNR. Now it
    says so and the next validation writes best.pt; the same folder under another name (a
    link) is the same validation."""
    white = tmp_path / "white"  # (the toy's samples are dark: a white image scores lowest)
    white.mkdir()
    iio.imwrite(white / "w.png", np.full((32, 32, 3), 255, np.uint8))
    flags = ["--model", "toy", "--val-every", "2", "--val-images", "1"]
    assert run(tmp_path / "r", images, *flags, "--val-data", str(images), "--steps", "2") == 0
    old = load_checkpoint(tmp_path / "r" / "best.pt")["best"]
    (tmp_path / "link").symlink_to(images)
    assert run(tmp_path / "r", images, *flags, "--val-data", str(tmp_path / "link"), "--steps",
               "4", "--resume", "auto") == 0  # fmt: skip
    assert "best.pt:" not in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "r" / "best.pt")["best"] >= old  # (one measure)
    best = load_checkpoint(tmp_path / "r" / "best.pt")["best"]
    assert run(tmp_path / "r", images, *flags, "--val-data", str(white), "--steps", "6",
               "--resume", "auto") == 0  # fmt: skip
    ck = load_checkpoint(tmp_path / "r" / "best.pt")
    assert ck["step"] == 6 and ck["best"] < best  # scored lower: kept out of best.pt before
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("best.pt:")]
    assert said == [f"best.pt: the best PSNR so far ({best:.3f}) was validated with other "
                    "--val-data; it is not compared with this run's, whose next validation "
                    "writes best.pt"]  # fmt: skip


def test_a_broken_last_pt_beside_a_whole_best_pt_says_how_to_go_on(tmp_path, images, toy,
                                                                   capsys):  # fmt: skip
    """A last.pt truncated by a copy to another disk (saves here are atomic): its line says how to
    continue from best.pt, which --resume auto then takes."""
    flags = ["--model", "toy", "--val-data", str(images), "--val-every", "1", "--val-images", "1"]
    assert run(tmp_path, images, *flags, "--steps", "2") == 0
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:300])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, *flags, "--steps", "3", "--resume", "auto")
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 6 and len(err) == 1
    assert err[0].startswith(f"sr_train.py: error: {last}: not a valid torch file or is truncated")
    assert err[0].endswith(f"; or continue from {tmp_path / 'best.pt'}: move last.pt out of the "
                           "folder and rerun with --resume auto")  # fmt: skip
    last.rename(tmp_path.parent / "broken last.pt")
    assert run(tmp_path, images, *flags, "--steps", "3", "--resume", "auto") == 0
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3


def test_resume_auto_in_a_folder_without_a_checkpoint_says_it_starts_anew(tmp_path, images, toy,
                                                                          capsys):  # fmt: skip
    """A job that always passes --resume auto starts its first run with it; so does a mistyped
    --out, which started over from step 0 without a word."""
    assert run(tmp_path / "new", images, "--model", "toy", "--steps", "1", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert f"--resume auto: no {tmp_path / 'new' / 'last.pt'} yet; a new run starts" in out


def test_a_new_run_after_one_killed_before_its_first_save_logs_each_step_once(tmp_path, images,
                                                                              toy):  # fmt: skip
    """A run killed before its first save leaves log.jsonl alone (here: its last.pt removed,
    a half-written line left); the requeued job's --resume auto starts a new run, which appended
    to that log: steps 1, 2, 3, 1, 2, 3, 4, two runs' numbers under the same steps."""
    flags = ["--model", "toy", "--noisy", "--resume", "auto"]
    assert run(tmp_path, images, *flags, "--steps", "3") == 0
    (tmp_path / "last.pt").unlink()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert run(tmp_path, images, *flags, "--steps", "4") == 0
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_a_data_error_before_the_first_step_leaves_no_run_folder(tmp_path, images, toy, capsys):
    """An image unreadable at start (deleted or changed between the folder's listing and its
    read; here a broken file) stops the run after it made OUT/: left holding .lock, an empty
    log.jsonl and tb/ with an event file of nothing, a run folder of no run. Removed now; the
    same command rerun once the data is fixed starts as a new run, and a folder with a run in
    it keeps all of it."""
    data, out = tmp_path / "hr", tmp_path / "run"
    shutil.copytree(images, data)
    (data / "img9.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    flags = ["--model", "toy", "--resume", "auto", "--tensorboard", "--quiet"]
    with pytest.raises(SystemExit) as e:
        run(out, data, *flags, "--steps", "2")
    assert e.value.code == 3
    assert f"{data / 'img9.png'}: not an image file" in capsys.readouterr().err
    assert not out.exists()
    (data / "img9.png").rename(tmp_path / "img9.png")
    assert run(out, data, *flags, "--steps", "2") == 0
    kept = {p: p.read_bytes() for p in [out / "last.pt", out / "log.jsonl"]}
    (tmp_path / "img9.png").rename(data / "img9.png")
    with pytest.raises(SystemExit) as e:
        run(out, data, *flags, "--steps", "4")  # (a resume: its folder stays as it was)
    assert e.value.code == 3
    assert {p: p.read_bytes() for p in kept} == kept


def test_a_full_disk_before_the_first_checkpoint_leaves_no_run_folder(
    tmp_path, images, toy, monkeypatch, capsys
):
    """A full disk (ENOSPC) at the first save of a new run (steps logged, no checkpoint
    written) left OUT holding .lock and the log.jsonl of those steps, of no run: a rerun there
    starts afresh and cuts them. Removed now, as a run folder of nothing is; a folder that was
    there before the run keeps all of it."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    made, there = tmp_path / "run", tmp_path / "there"
    there.mkdir()
    for out in (made, there):
        with pytest.raises(SystemExit) as e:
            run(out, images, "--model", "toy", "--steps", "2", "--tensorboard", "--quiet")
        assert e.value.code == 7 and "none was written before" in capsys.readouterr().err
    assert not made.exists()
    assert [json.loads(r)["step"] for r in (there / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_started_as_a_new_run_folder_is_removed_keeps_its_log(tmp_path, monkeypatch):
    """A new run's folder of nothing (`unmake_run_folder`) had its .lock and log.jsonl removed
    in a set's order: where .lock went first, a run started on --out right then (its own lock,
    the empty log.jsonl opened for its records) lost its whole log.jsonl to the next removal,
    unnoticed (its folder and lock file are its own). .lock goes last: the new run's stay."""
    out = tmp_path / "run"
    out.mkdir()
    lock = sr_train.lock_run_folder(out)  # the failed run's
    (out / "log.jsonl").touch()
    unlink = Path.unlink

    def then_a_new_run(path, missing_ok=False):
        unlink(path, missing_ok)
        if path.name == ".lock":  # another sr_train.py takes the folder as soon as it can
            os.close(sr_train.lock_run_folder(out))
            with open(out / "log.jsonl", "ab") as f:
                f.write(b'{"step": 1}\n')

    monkeypatch.setattr(Path, "unlink", then_a_new_run)
    sr_train.unmake_run_folder(out)
    os.close(lock)
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'


def test_a_run_folder_removed_between_its_check_and_its_lock_is_made_again(
    tmp_path, images, toy, monkeypatch, capsys
):
    """A run that had checked (made) --out, its .lock not made yet, when the run that had made
    the folder and failed removed it (`unmake_run_folder`), ended in a traceback (os.open of
    OUT/.lock: FileNotFoundError). It makes the folder again and runs."""
    out = tmp_path / "run"
    check = sr_train.check_out_dir

    def removed_right_after(path, *args):
        checked = check(path, *args)
        if not calls:  # (once: the other run's removal of its folder of nothing)
            calls.append(path)
            shutil.rmtree(checked)
        return checked

    calls = []
    monkeypatch.setattr(sr_train, "check_out_dir", removed_right_after)
    assert run(out, images, "--model", "toy", "--steps", "1", "--quiet") == 0
    assert calls == [out] and (out / "last.pt").is_file()

    def removed_each_time(path, *args):  # (never ends: one line, exit 7, after three tries)
        shutil.rmtree(check(path, *args))
        return path

    monkeypatch.setattr(sr_train, "check_out_dir", removed_each_time)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "gone", images, "--model", "toy", "--steps", "1", "--quiet")
    assert e.value.code == 7
    assert f"--out {tmp_path / 'gone'}: removed again each time" in capsys.readouterr().err


def test_a_stop_before_the_first_step_of_a_resume_from_elsewhere_names_its_checkpoint(
    tmp_path, images, toy, monkeypatch, capsys
):
    """A run resumed from another folder's checkpoint, stopped (SIGTERM) while it decoded its
    data, said 'continue with --resume auto': in its --out, which holds no checkpoint, that
    started a new run from step 0 (or refused one without --model). It says to rerun the same
    command, which holds the --resume it was given."""
    run(tmp_path / "a", images, "--model", "toy", "--steps", "1", "--quiet")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # (no requeue)
    load = sr_train.training_data

    def stopped_while_decoding(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(sr_train, "training_data", stopped_while_decoding)
    last = tmp_path / "a" / "last.pt"
    for out, resume in [(tmp_path / "a", "auto"), (tmp_path / "b", str(last))]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run(out, images, "--steps", "2", "--resume", resume)
        assert e.value.code == 75
        assert capsys.readouterr().err.endswith("nothing to save; rerun the same command\n")


def test_nan_validation_samples_are_named_not_scored_silently(tmp_path, images, toy, monkeypatch,
                                                             capsys):  # fmt: skip
    """A model whose samples hold NaN at validation (weights fine): training goes on, validation
    says how many samples were NaN (black in the strips) in a one-line warning."""

    def nan_generate(self, lr, n, temperature, noise):
        sr = nn.functional.pixel_shuffle(self.conv(lr), self.scale).unsqueeze(1)
        return (sr * float("nan")).expand(-1, n, -1, -1, -1)

    monkeypatch.setattr(Toy, "generate", nan_generate)
    assert validation_warnings(tmp_path, images, capsys, steps=2) == [
        "sr_train.py: warning: validation at step 2: 2 of 2 samples have NaN "
        "pixels (black in the strips, scored so)"]  # fmt: skip


def test_a_validation_strip_not_written_saves_the_steps_done(tmp_path, images, toy, monkeypatch,
                                                            capsys):  # fmt: skip
    """A full disk when a validation strip is written (OUT/val/, the run's largest file but
    its checkpoints): the run ended at once, with exit 7 and a line naming the PNG alone, the
    steps since the last save lost (here: all of them, nothing saved yet). Now it stops as for
    a log record it cannot write: the validation scored (log.jsonl, best.pt), last.pt saved,
    one line naming the PNG and what holds the run, exit 7."""
    real = sr_train.write_png

    def full_disk(path, img):
        if Path(path).parent.name == "val":
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise OutputError(f"{path}: cannot write ({e.strerror}); check the folder") from e
        real(path, img)

    monkeypatch.setattr(sr_train, "write_png", full_disk)
    flags = ["--model", "toy", "--steps", "6", "--val-data", str(images), "--val-every", "3",
             "--val-images", "2", "--save-every", "100"]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, *flags)
    err = [x for x in capsys.readouterr().err.splitlines() if "training images too" not in x]
    strip = tmp_path / "val" / "step0000003_img0.png"
    assert e.value.code == 7 and err == [
        f"sr_train.py: error: {strip}: cannot write (No space left on device); stopped at step "
        f"3, wrote {tmp_path / 'last.pt'}: free space, then continue with --resume auto"
    ]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 3
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_psnr" in r] == [3]


def validation_warnings(tmp_path, images, capsys, steps: int) -> list[str]:
    """The warning lines of a toy run of `steps` steps validating every 2 steps, one sample (the
    toy is deterministic) of each of 2 validation images."""
    flags = ["--model", "toy", "--steps", str(steps), "--val-data", str(images), "--val-every",
             "2", "--val-images", "2"]  # fmt: skip
    assert run(tmp_path, images, *flags) == 0
    # (it validates on its training images: test_train_run.py tests that warning)
    err = capsys.readouterr().err.splitlines()
    return [x for x in err if "warning" in x and "training images too" not in x]


def test_resume_refuses_other_model_or_scale_and_never_restarts(tmp_path, images, toy, capsys):
    run(tmp_path, images, "--model", "toy", "--steps", "1")
    with pytest.raises(SystemExit) as e:  # an existing run is never overwritten silently
        run(tmp_path, images, "--model", "toy", "--steps", "2")
    assert e.value.code == 2 and "--resume auto" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, "--model", "bicubic", "--steps", "2", "--resume", "auto")
    assert e.value.code == 6 and "'toy'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sr_train.main(
            ["--model", "toy", "--scale", "4", "--resume", "auto", "--out", str(tmp_path)]
        )
    err = capsys.readouterr().err
    assert e.value.code == 6 and "x2" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "at, save_every, error",
    [(0, 100, torch.OutOfMemoryError), (5, 100, torch.OutOfMemoryError), (5, 5, MemoryError)],
    ids=["first-step", "step-6", "just-saved"],
)
def test_out_of_memory_in_a_step_saves_the_steps_done(tmp_path, images, toy, monkeypatch, capsys,
                                                      at, save_every, error):  # fmt: skip
    """Out of memory in training step 6 (fragmentation hours in, another process on the GPU;
    MemoryError on a CPU): the 5 steps done since the last save are saved, one line, exit 4, and
    --resume auto continues. A last.pt saved at step 5 stays as it was (the failed step has
    moved the random generators on: it equals a straight 5-step run's). In the first step there
    is nothing to save."""
    real, calls = Toy.forward, []

    def forward(self, lr, hr):
        out = real(self, lr, hr)  # (its noise drawn: the generators move on)
        calls.append(1)
        if len(calls) == at + 1:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return out

    monkeypatch.setattr(Toy, "forward", forward)
    monkeypatch.setattr(sr_train, "native_bf16", lambda device: False)  # (else --amp bf16 too)
    flags = ["--model", "toy", "--noisy", "--save-every", str(save_every)]
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "a", images, *flags, "--steps", "8")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 4
    if at == 0:
        assert err == ["sr_train.py: error: step 1: out of memory; nothing was saved: start again "
                       "with a smaller --batch (this run's: 2) or a smaller --patch (this run's: "
                       "8)"]  # fmt: skip
        assert not (tmp_path / "a" / "last.pt").exists()
        return
    last = tmp_path / "a" / "last.pt"
    assert err == [f"sr_train.py: error: step 6: out of memory; {last} holds step 5: continue "
                   "with --resume auto and a smaller --batch (this run's: 2) or a smaller "
                   "--patch (this run's: 8)"]  # fmt: skip
    ck = load_checkpoint(last)
    assert ck["step"] == 5
    monkeypatch.setattr(Toy, "forward", real)
    assert run(tmp_path / "b", images, *flags, "--steps", "5") == 0
    straight = load_checkpoint(tmp_path / "b" / "last.pt")
    assert torch.equal(ck["rng"]["torch"], straight["rng"]["torch"]) == (save_every == 5)
    assert run(tmp_path / "a", images, "--steps", "8", "--resume", "auto") == 0
    assert load_checkpoint(last)["step"] == 8


def test_out_of_memory_in_validation_skips_it_and_trains_on(tmp_path, images, toy, monkeypatch,
                                                            capsys):  # fmt: skip
    """Validation at step 2 runs out of memory: a warning, no score for it; training goes on,
    and the validation at step 4 makes best.pt."""
    real, calls = Toy.generate, []

    def generate(self, lr, n, temperature, noise):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(self, lr, n, temperature, noise)

    monkeypatch.setattr(Toy, "generate", generate)
    assert validation_warnings(tmp_path, images, capsys, steps=4) == [
        "sr_train.py: warning: validation at step 2: out of memory; skipped (a smaller "
        "--val-crop or --val-n needs less)"]  # fmt: skip
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_psnr" in r] == [4]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 4


def test_isolated_nan_step_changes_nothing(tmp_path, images, toy):
    run(tmp_path / "a", images, "--model", "toy", "--steps", "1")
    run(tmp_path / "b", images, "--model", "toy", "--steps", "2", "--nan-loss-steps", "1")
    run(tmp_path / "c", images, "--model", "toy", "--steps", "2", "--nan-grad-steps", "1")
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    for run_dir in ("b", "c"):
        ck = load_checkpoint(tmp_path / run_dir / "last.pt")
        assert ck["skipped"] == 1
        assert all(torch.equal(a["state_dict"][k], ck["state_dict"][k]) for k in a["state_dict"])
        opt_a, opt_b = a["optimizers"]["g"]["state"], ck["optimizers"]["g"]["state"]
        assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
        assert all(float(opt_a[i]["step"]) == float(opt_b[i]["step"]) == 1 for i in opt_a)


def test_consecutive_nan_steps_abort_and_keep_the_last_checkpoint(tmp_path, images, toy, capsys):
    saved = []
    real_save = sr_train.save_checkpoint

    def spy(path, payload):
        real_save(path, payload)
        saved.append((payload["step"], hashlib.sha256(Path(path).read_bytes()).hexdigest()))

    sr_train.save_checkpoint = spy
    try:
        with pytest.raises(SystemExit) as e:
            run(tmp_path, images, "--model", "toy", "--steps", "20", "--save-every", "2",
                "--nan-loss-steps", "3,4,5,6,7,8,9", "--max-bad-steps", "3")  # fmt: skip
    finally:
        sr_train.save_checkpoint = real_save
    assert e.value.code == 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step 5" in err and "last.pt" in err
    assert [s for s, _ in saved] == [2]  # nothing written after the bad steps began
    assert hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest() == saved[-1][1]


def test_a_good_step_resets_the_bad_step_counter(tmp_path, images, toy):
    run(tmp_path, images, "--model", "toy", "--steps", "7", "--nan-loss-steps", "1,2,4,5",
        "--max-bad-steps", "3")  # fmt: skip
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 7 and ck["skipped"] == 4


def logged_rates(run_dir) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["learning_rate"] for r in rows if "learning_rate" in r]


def test_gamma_zero_and_no_milestones_are_expressible(tmp_path, images, toy):
    # --gamma 0: the rate drops to exactly 0 at the milestone (0 is not "unset")
    flags = ["--steps", "4", "--learning-rate", "1e-3", "--milestones", "0.5", "--gamma", "0"]
    assert run(tmp_path / "g", images, "--model", "toy", *flags) == 0
    assert logged_rates(tmp_path / "g") == [1e-3, 1e-3, 0.0, 0.0]
    assert (
        load_checkpoint(tmp_path / "g" / "last.pt")["optimizers"]["g"]["param_groups"][0]["lr"]
        == 0.0
    )
    # --milestones alone: no decay, where EDSR's recipe halves the rate at 2/3 of the steps
    edsr = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--steps", "3",
            "--learning-rate", "1e-3"]  # fmt: skip
    assert run(tmp_path / "paper", images, *edsr) == 0
    assert logged_rates(tmp_path / "paper") == [1e-3, 1e-3, 5e-4]
    assert run(tmp_path / "flat", images, *edsr, "--milestones") == 0
    assert logged_rates(tmp_path / "flat") == [1e-3, 1e-3, 1e-3]
    assert load_checkpoint(tmp_path / "flat" / "last.pt")["train_args"]["milestones"] == []


def test_warmup_rises_linearly_then_the_schedule_goes_on_as_without_it(tmp_path, images, toy):
    """--warmup 4: steps 1..4 take 1/4..4/4 of the scheduled rate (the milestone at step 4 of 6
    still decays it), then the schedule is the one of a run without warm-up; unset, no
    warm-up (every paper's recipe)."""
    flags = ["--model", "toy", "--steps", "6", "--learning-rate", "1e-3", "--milestones", "0.5",
             "--gamma", "0.1"]  # fmt: skip
    assert run(tmp_path / "w", images, *flags, "--warmup", "4") == 0
    assert logged_rates(tmp_path / "w") == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-4, 1e-4, 1e-4])
    assert load_checkpoint(tmp_path / "w" / "last.pt")["train_args"]["warmup"] == 4
    assert run(tmp_path / "none", images, *flags) == 0
    assert logged_rates(tmp_path / "none") == pytest.approx([1e-3] * 3 + [1e-4] * 3)


def test_a_resume_inside_the_warmup_is_exact(tmp_path, images, toy):
    """Resumed at step 2 of a 4-step warm-up without --warmup typed: the checkpoint's run flag
    is taken, and the weights and rates are those of one straight run."""
    flags = ["--model", "toy", "--noisy", "--learning-rate", "1e-2", "--milestones"]
    assert run(tmp_path / "a", images, *flags, "--steps", "4", "--warmup", "4") == 0
    assert run(tmp_path / "b", images, *flags, "--steps", "2", "--warmup", "4") == 0
    assert run(tmp_path / "b", images, "--steps", "4", "--resume", "auto") == 0
    a, b = params(tmp_path / "a" / "last.pt"), params(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged_rates(tmp_path / "b") == logged_rates(tmp_path / "a")
    assert logged_rates(tmp_path / "a") == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert run(tmp_path / "c", images, *flags, "--steps", "4") == 0  # the warm-up changed them
    c = params(tmp_path / "c" / "last.pt")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_warmup_scales_every_group_and_the_discriminator():
    """The warm-up factor is the run's step's, for each generator group at its own schedule
    position (a model's phases) and for the discriminator's rate."""
    assert [sr_train.warmup_factor(t, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert sr_train.warmup_factor(0, 0) == 1.0  # none
    net = nn.Linear(1, 1)
    opts = {"g": torch.optim.Adam([{"params": [net.weight]}, {"params": [net.bias]}], lr=1.0),
            "d": torch.optim.Adam(nn.Linear(1, 1).parameters(), lr=1.0)}  # fmt: skip
    model = types.SimpleNamespace(schedule_position=lambda i, step, total: (step + 5 * i, total))
    recipe = Recipe(steps=10, learning_rate=1.0, milestones=(0.5,), gamma=0.1,
                    d_learning_rate=2.0, warmup=4)  # fmt: skip
    sr_train.set_learning_rates(opts, model, 1, recipe)
    rates = [g["lr"] for o in opts.values() for g in o.param_groups]
    assert rates == pytest.approx([0.5, 0.05, 1.0])  # group 1 is past its milestone


def test_unset_run_flags_take_the_model_recipe_once():
    args, rest, given = sr_train.parse_all(["--model", "edsr", "--batch", "3", "--n-feats", "8"])
    recipe = sr_train.parse_recipe(args, models.MODELS["edsr"].recipe(args.scale))
    paper = models.MODELS["edsr"].recipe(4)
    assert recipe == replace(paper, batch=3) and rest == ["--n-feats", "8"]
    assert given == {"model", "batch"}
    assert (args.steps, args.milestones, args.gamma, args.val_temperature) == (None,) * 4


def test_learning_rate_schedules():
    at = sr_train.learning_rate_at
    step = Recipe(steps=10, learning_rate=1.0, milestones=(0.5, 0.8), gamma=0.1)
    assert [at(t, step) for t in (0, 4, 5, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert at(2, step, length=4) == pytest.approx(0.1)  # a phase of 4 steps: milestone 0.5 at 2
    assert at(9, step, base=2.0) == pytest.approx(0.02)  # the discriminator's base rate
    cos = Recipe(steps=10, learning_rate=1.0, schedule="cosine", eta_min=0.1)
    assert [at(t, cos) for t in (0, 5, 10)] == pytest.approx([1.0, 0.55, 0.1])
    assert at(3, Recipe(steps=0, learning_rate=1.0, milestones=(0.5,))) == 0.5  # steps 0: length 1


def test_help_shows_run_and_model_flags(capsys):
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "bicubic", "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--learning-rate" in out and "bicubic model options" in out


def test_bad_flags_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "nosuch", "--out", str(tmp_path)])
    assert e.value.code == 2 and "nosuch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "bicubic", "--scale", "5", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--scale 5: choose one of" in capsys.readouterr().err
    out = tmp_path / "run"  # (the test ran without --out: runs/bicubic_x4 in the repo)
    (tmp_path / "imgs").mkdir()  # (a folder without images is refused too)
    iio.imwrite(tmp_path / "imgs" / "a.png", np.zeros((16, 16, 3), np.uint8))
    for data in (
        ["--data", str(tmp_path / "none")],
        ["--data", str(tmp_path / "imgs"), str(tmp_path / "none")],
    ):
        with pytest.raises(SystemExit) as e:
            sr_train.main(["--model", "bicubic", "--steps", "3", *data, "--out", str(out)])
        assert e.value.code == 3
        assert capsys.readouterr().err == f"sr_train.py: error: --data {tmp_path / 'none'}: no " \
            "such folder\n"  # fmt: skip
        assert not out.exists()  # (it held .lock and an empty log.jsonl)


def test_started_in_the_background_sigint_is_ignored_and_sigterm_still_saves(
    tmp_path, images, popen_in_background
):
    """`sr_train.py ... &` in a shell script starts with SIGINT ignored, so that Ctrl-C in the
    terminal stops only the job in the foreground: training goes on. SIGTERM, SLURM's, still
    saves and exits 75."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "sr_train.py"), "--model", "edsr", "--n-feats", "8",
           "--n-blocks", "1", "--data", str(images), "--scale", "2", "--patch", "8", "--batch", "2",
           "--val-every", "0", "--log-every", "1", "--steps", "100000",
           "--out", str(out)]  # fmt: skip
    proc = popen_in_background(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / "log.jsonl"

    def logged():
        return log.read_text().count("\n") if log.exists() else 0

    deadline = time.time() + 120
    while time.time() < deadline and logged() < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # to the main process and (as a terminal does) nothing else
    at_signal = logged()
    while time.time() < deadline and logged() < at_signal + 3 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None and logged() >= at_signal + 3, proc.communicate()[1].decode()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "Traceback" not in stderr.decode(), stderr.decode()
    assert load_checkpoint(out / "last.pt")["step"] >= at_signal + 3


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_the_process_group_saves_exits_75_then_resumes(tmp_path, images, sig,
                                                                 own_temp_dir):  # fmt: skip
    """SLURM (and a terminal's Ctrl-C, or its closing: SIGHUP) signal every process of the job,
    the data-loader workers too: with the default --workers 2 the run must still save and exit
    75, without a traceback, and --resume auto continues it. Nothing is left in $TMPDIR."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "sr_train.py"), "--model", "edsr", "--n-feats", "8",
           "--n-blocks", "1", "--data", str(images), "--scale", "2", "--patch", "8", "--batch", "2",
           "--workers", "2", "--val-every", "0", "--log-every", "1", "--steps", "100000",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 3
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, sig)  # the main process and both loader workers
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr.decode()
    assert "Traceback" not in stderr.decode() and "killed by signal" not in stderr.decode()
    assert list(own_temp_dir.glob("pymp-*")) == []  # (the workers' sockets' folder)
    step = load_checkpoint(out / "last.pt")["step"]
    assert step >= 3
    cmd[cmd.index("100000")] = str(step + 2)
    cmd[cmd.index("--workers") + 1] = "0"  # resumed in this process: no interpreter to start
    assert sr_train.main([*cmd[2:], "--resume", "auto"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == step + 2


# sr_train.py as a user starts it (`python -c HOLD POINT MARKER sr_train.py FLAGS...`), held at
# one point of the run until the test, told by MARKER, has signalled the process group and
# removed MARKER: the loading of the first batch (in a loader worker), validation, the write of
# a mid-run last.pt, that of the last step's. The first batch: MARKER is made by the main
# process as it starts to wait for that batch in the loop, once each worker has set its signals
# (`_worker_init`), while the worker holds the batch back (a worker could reach it before the
# loop: a stop there ends a new run with nothing to save); then the batch comes within the
# wait's slice (LOADER_SLICE, made long: a loaded machine takes no longer), or, "first batch,
# none comes", never (the slice made short).
HOLD = """import pathlib, runpy, sys, time
point, marker = sys.argv[1], pathlib.Path(sys.argv[2])
sys.argv = sys.argv[3:]

def held():  # once: the save after the stop, the main process's own first batch go on
    if marker.with_suffix(".done").exists():
        return
    marker.touch()
    while marker.exists():
        time.sleep(0.01)
    marker.with_suffix(".done").touch()

def holding(f, when):
    def at(*args, **kwargs):
        if when(*args):
            held()
        return f(*args, **kwargs)
    return at

if point.startswith("first batch"):
    import sr_lib.data
    waiting = marker.with_suffix(".waiting")  # made with MARKER, never removed

    def first_wait(f):  # the main process: its loop's first wait for a batch, once every
        def at(self, batches):  # worker leaves the signals to it (before: SIGTERM ends one)
            while not waiting.exists() and len(list(marker.parent.glob("ready*"))) < len(
                    batches._workers):
                time.sleep(0.01)
            if not waiting.exists():
                marker.touch()
                waiting.touch()
            return f(self, batches)
        return at

    def worker_init(f):
        def at(worker_id):
            f(worker_id)
            (marker.parent / f"ready{worker_id}").touch()
        return at

    def loading(f):  # a worker: the first batch, until MARKER is made and removed (or never)
        def at(self, step):
            while step == 0 and (point != "first batch" or marker.exists()
                                 or not waiting.exists()):
                time.sleep(0.01)
            return f(self, step)
        return at

    sr_lib.data._worker_init = worker_init(sr_lib.data._worker_init)
    sr_lib.data._FloatLoader._next = first_wait(sr_lib.data._FloatLoader._next)
    sr_lib.data.PatchPairs.crops = loading(sr_lib.data.PatchPairs.crops)
    sr_lib.data.LOADER_SLICE = 60.0 if point == "first batch" else 0.5
elif point.startswith("worker start"):
    import sr_lib.data
    made = marker.with_suffix(".made")  # made after MARKER, never removed

    def first_wait(f):  # the main process: its loop's first wait for a batch
        def at(self, batches):
            if not made.exists():
                marker.touch()
                made.touch()
            return f(self, batches)
        return at

    def starting(f):  # a worker, past torch's signal handlers, before `_worker_init`'s: until
        def at(worker_id):  # MARKER is made and removed (or, "none comes", for good)
            while point != "worker start" or not made.exists() or marker.exists():
                time.sleep(0.01)
            return f(worker_id)
        return at

    sr_lib.data._worker_init = starting(sr_lib.data._worker_init)
    sr_lib.data._FloatLoader._next = first_wait(sr_lib.data._FloatLoader._next)
    sr_lib.data.LOADER_SLICE = 60.0 if point == "worker start" else 0.5
elif point == "validation":
    from sr_lib.models.edsr import EDSR
    EDSR.sample = holding(EDSR.sample, lambda *args: True)
else:
    import torch
    step = 2 if point == "checkpoint" else 4
    torch.save = holding(torch.save, lambda ck, f: ck.get("step") == step and ".last.pt" in f.name)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def held_flags(images) -> list[str]:
    return ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--data", str(images),
            "--val-data", str(images), "--scale", "2", "--patch", "8", "--batch", "2",
            "--val-every", "2", "--val-n", "1", "--save-every", "2", "--steps", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def never_stopped(images, tmp_path_factory) -> Path:
    """The run of `held_flags`, never stopped: its folder."""
    never = tmp_path_factory.mktemp("never")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (validation images that are training images)
        assert sr_train.main([*held_flags(images), "--workers", "0", "--out", str(never)]) == 0
    return never


@pytest.mark.integration  # (a signal sweep: 5 runs of the script)
@pytest.mark.parametrize(
    "point", ["first batch", "first batch, none comes", "validation", "checkpoint",
              "last checkpoint"]
)  # fmt: skip
def test_a_group_signal_anywhere_resumes_to_the_weights_of_a_run_never_stopped(
    point, tmp_path, images, never_stopped, own_temp_dir
):
    """SLURM's SIGTERM to the whole job (--workers 2: the loader workers too) while the first
    batch loads, in a validation, while last.pt is written: last.pt of the steps done, exit 75,
    and the requeued `--resume auto` ends with the weights, optimizer state and best.pt of the
    run never stopped, bit for bit. During the last step's save the run has done its work: it
    ends as done, exit 0, and is not requeued."""
    out = tmp_path / "run"
    returncode, _, stderr = signalled_while_held(point, images, out, tmp_path / "held")
    assert returncode == (0 if point == "last checkpoint" else 75), stderr
    assert "Traceback" not in stderr and list(own_temp_dir.glob("pymp-*")) == []
    # (the first batch, come within the wait's slice, LOADER_SLICE: its step is done first;
    # none within it: the workers are stopped, and the run saves the steps done, none)
    step = {"first batch": 1, "first batch, none comes": 0, "last checkpoint": 4}.get(point, 2)
    assert load_checkpoint(out / "last.pt")["step"] == step
    resumes_as_never_stopped(images, out, never_stopped)


def signalled_while_held(point: str, images, out: Path, marker: Path,
                         slurm: Path | None = None) -> tuple[int, str, str]:  # fmt: skip
    """sr_train.py of `held_flags` into `out`, --workers 2, held at `point` (HOLD), SIGTERM to
    its process group there: its exit code, stdout and stderr. Not under SLURM, or in job 4242
    with a stand-in for its scontrol in the folder `slurm`, which notes its arguments there."""
    cmd = [sys.executable, "-c", HOLD, point, str(marker), str(REPO / "sr_train.py"),
           *held_flags(images), "--workers", "2", "--out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}  # (no requeue)
    if slurm is not None:
        (slurm / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {slurm / "scontrol.txt"}\n')
        (slurm / "scontrol").chmod(0o755)
        env.update(SLURM_JOB_ID="4242", PATH=f"{slurm}{os.pathsep}{env['PATH']}")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert marker.exists(), proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and both loader workers
    marker.unlink()
    stdout, stderr = exited(proc, f"sr_train.py did not exit after SIGTERM at its {point}", True)
    return proc.returncode, stdout.decode(), stderr.decode()


def resumes_as_never_stopped(images, out: Path, never_stopped: Path) -> None:
    """`--resume auto` of the stopped run in `out` ends with the weights, optimizer state and
    best.pt of the run never stopped, bit for bit."""
    flags = [*held_flags(images), "--workers", "0", "--out", str(out), "--resume", "auto"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (validation images that are training images)
        assert sr_train.main(flags) == 0
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(never_stopped / name), load_checkpoint(out / name)
        assert a["step"] == b["step"] and a["best"] == b["best"]
        assert same(a["state_dict"], b["state_dict"]) and same(a["optimizers"], b["optimizers"])


@pytest.mark.parametrize("point", ["worker start", "worker start, none comes"])
def test_a_group_signal_while_the_workers_start_stops_as_a_preemption(point, tmp_path, images,
                                                                      never_stopped,
                                                                      own_temp_dir):  # fmt: skip
    """SLURM's SIGTERM to the whole job while the loader's workers start, between torch's signal
    handlers and `_worker_init`'s ignoring it (the main process waiting for the first batch in
    the loop): it killed a worker, and the run ended "a data loader worker ... was killed by
    SIGTERM ... use --cache", exit 4, not requeued. The workers now start with the stop signals
    blocked until they ignore them: the main process alone stops, exit 75, last.pt of the steps
    done (the first batch, which comes within the wait's slice: step 1; none: step 0), and the
    requeued `--resume auto` ends bit for bit as the run never stopped."""
    out = tmp_path / "run"
    returncode, stdout, stderr = signalled_while_held(point, images, out, tmp_path / "held",
                                                      slurm=tmp_path)  # fmt: skip
    step = 1 if point == "worker start" else 0
    assert returncode == 75 and "error:" not in stderr and "Traceback" not in stderr, stderr
    assert f"\nSIGTERM: stopped at step {step}, wrote {out / 'last.pt'}; " in stdout, stdout
    assert "requeued SLURM job 4242" in stdout
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 4242\n"
    assert list(own_temp_dir.glob("pymp-*")) == []
    assert load_checkpoint(out / "last.pt")["step"] == step
    resumes_as_never_stopped(images, out, never_stopped)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_loader_workers_start_with_the_stop_signals_blocked(method, own_temp_dir):
    """A training loader's workers start with SIGTERM, SIGINT, SIGUSR1 and SIGHUP blocked, until
    `_worker_init` (not run here: they stay so) has them ignored; a spawned one (macOS's start)
    too, where multiprocessing's resource tracker, started with the first worker, unblocked
    SIGINT and SIGTERM in the main thread. The main thread's signals are left as they were."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader = sr_lib.data._FloatLoader(range(2), batch_size=None, num_workers=2,
                                      persistent_workers=True,
                                      multiprocessing_context=method)  # fmt: skip
    iter(loader)  # (not a generator: the workers start)
    try:
        workers = loader._iterator._workers
        masks = [int(next(line.split()[1] for line in Path(f"/proc/{w.pid}/status").open()
                          if line.startswith("SigBlk:")), 16) for w in workers]  # fmt: skip
    finally:
        sr_lib.data._kill_workers(loader._iterator)  # (a spawned one may be importing still)
        loader.close()
    stops = sum(
        1 << (s - 1) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
    )
    assert [mask & stops for mask in masks] == [stops, stops], [hex(m) for m in masks]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def same(a, b) -> bool:
    """Whether two checkpoint parts (dicts, lists, tensors, numbers) are equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_time_budget_saves_exits_0_and_counts_monotonic_time(tmp_path, images, monkeypatch,
                                                              capsys):  # fmt: skip
    """--time-budget (a job's time limit): once spent, the run saves last.pt at the step it
    reached and exits 0; --resume auto continues it. The budget is measured on a monotonic
    clock: the wall clock stepping back or forward (NTP, a VM resumed from a snapshot) neither
    ends a run nor stretches it. Here each step takes 10 s of a fake clock."""
    clock = {"t": 1000.0}
    real_step = sr_train.train_step

    def ten_second_step(*args, **kwargs):
        clock["t"] += 10
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sr_train, "train_step", ten_second_step)
    monkeypatch.setattr(sr_train, "time", types.SimpleNamespace(monotonic=lambda: clock["t"]))
    monkeypatch.setattr(time, "time", lambda: 0.0)  # a wall clock that went back to 1970
    out = tmp_path / "run"
    tiny = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--steps", "6"]
    assert run(out, images, *tiny, "--time-budget", "25") == 0
    assert load_checkpoint(out / "last.pt")["step"] == 3  # 30 s > 25 s after the third step
    # not "done": the job script (or its user) must know the run is to be continued
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"time budget: stopped at step 3 of 6, 0 skipped, wrote {out / 'last.pt'}; continue "
        "with --resume auto"
    )
    assert run(out, images, "--resume", "auto", "--time-budget", "0") == 0  # 0: no budget
    assert load_checkpoint(out / "last.pt")["step"] == 6
    assert capsys.readouterr().out.splitlines()[-1].startswith("done: 6 steps")


def exited(proc: subprocess.Popen, what_if_not: str, both: bool = False) -> bytes | tuple:
    """The stderr of `proc` (its own session) once it exits, or (`both`) its stdout and stderr;
    killed and failed after 60 s."""
    try:
        out = proc.communicate(timeout=60)
        return out if both else out[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(what_if_not)


def test_a_bug_in_the_loop_with_loader_workers_exits_with_its_traceback(tmp_path, images,
                                                                        own_temp_dir):  # fmt: skip
    """The workers ignore SIGTERM (a group signal is the main process's to handle), and a
    traceback keeps the loader alive: multiprocessing's exit handler, which terminates and then
    joins daemonic children, waited for them forever. The run hung after its traceback (a SLURM
    job until its time limit), and SIGTERM could not end it. Nothing is left in $TMPDIR."""
    bug = ("import sys, sr_train\n"
           "def train_step(*args): raise RuntimeError('a bug in a training step')\n"
           "sr_train.train_step = train_step\n"
           "sys.exit(sr_train.main(sys.argv[1:]))")  # fmt: skip
    cmd = [sys.executable, "-c", bug, "--model", "edsr", "--n-feats", "8", "--n-blocks", "1",
           "--data", str(images), "--scale", "2", "--patch", "8", "--batch", "2", "--workers", "2",
           "--val-every", "0", "--steps", "3", "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    stderr = exited(
        proc, "sr_train.py did not exit after its traceback (its loader workers live on)"
    )
    assert proc.returncode == 1
    assert "RuntimeError: a bug in a training step" in stderr.decode()
    assert list(own_temp_dir.glob("pymp-*")) == []  # (the workers' sockets' folder)


@pytest.mark.parametrize(
    "flags, step, helps",
    [(("--workers", "1", "--batch", "2", "--patch", "8"), 3,
      "or use --workers 0, or a smaller --batch (this run's: 2) or a smaller --patch (this run's: "
      "8)"),
     (("--workers", "2", "--batch", "1", "--patch", "1"), 5,  # (worker 0's third: step 5)
      "or use fewer --workers (this run's: 2; each keeps up to 4 batches there) or --workers 0")],
)  # fmt: skip
def test_a_full_dev_shm_saves_the_steps_done_and_says_so_in_one_line(
    tmp_path, images, flags, step, helps
):
    """A loader worker hands a batch to the main process through /dev/shm (a container's is 64
    MB by default). Full, the queue's feeder thread printed torch's traceback and dropped the
    batch: the run waited for it until LOADER_TIMEOUT (10 min), then stopped as hung, exit 75,
    and requeued the job to meet the same wall again. Here a worker's third batch finds /dev/shm
    full (torch's own error, from the one call that allocates it). The line said "or a smaller
    --batch or --patch" also at --batch 1 and the least patch, and "--workers 0" alone: it names
    what is left to lower, with this run's values (each worker keeps up to 4 batches there)."""
    full = ("import sys, torch, sr_lib.data, sr_train\n"
            "sr_lib.data.LOADER_TIMEOUT = 5.0\n"  # (the old wait, shortened)
            "share, calls = torch.UntypedStorage._share_fd_cpu_, []\n"
            "def shm(self, *a, **k):\n"
            "    calls.append(not self.is_shared())  # (a shared one is passed on, no copy)\n"
            "    if calls[-1] and sum(calls) > 4:  # two tensors a batch: the third batch\n"
            "        raise RuntimeError('unable to allocate shared memory(shm) for file '\n"
            "                           '</torch_1_2_3>: No space left on device (28)')\n"
            "    return share(self, *a, **k)\n"
            "torch.UntypedStorage._share_fd_cpu_ = shm\n"
            "sys.exit(sr_train.main(sys.argv[1:]))")  # fmt: skip
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", full, "--model", "edsr", "--n-feats", "8", "--n-blocks", "1",
           "--data", str(images), "--scale", "2", *flags, "--val-every", "0", "--steps", "8",
           "--no-requeue", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr
    assert done.stderr.splitlines() == [
        f"sr_train.py: error: step {step}: the data loader's workers cannot hand over a batch of "
        "0.0 MB: shared memory (/dev/shm, "
        + done.stderr.split("(/dev/shm, ")[1].split(")")[0]
        + f") is full; give the container more (docker run --shm-size 1g), {helps}; "
        f"{out / 'last.pt'} holds step {step - 1}: continue with --resume auto and that fixed"
    ]
    assert load_checkpoint(out / "last.pt")["step"] == step - 1


def test_a_loader_worker_killed_saves_the_steps_done_and_says_so_in_one_line(
    tmp_path, images, own_temp_dir
):
    """The kernel's out-of-memory killer picks a loader worker (each may come to hold its own
    copy of the images). torch's SIGCHLD handler raised its "worker killed by signal" error
    wherever the main process was (a backward, an optimiser step): a traceback, exit 1, and
    the steps since the last save lost. Now the loader finds the death between steps: the
    steps done are saved, one line, exit 4, and --resume auto goes on. Each worker made its own
    folder for its socket ($TMPDIR/pymp-*), removed at its exit, which a killed one never
    reaches: one left in the node's /tmp for every worker killed. The folder is the main
    process's now, shared by its workers and removed at its exit."""
    out = tmp_path / "run"
    argv = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--data", str(images),
            "--scale", "2", "--patch", "8", "--batch", "2", "--workers", "2", "--val-every", "0",
            "--log-every", "1", "--save-every", "100000", "--steps", "100000"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(REPO / "sr_train.py"), *argv, "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    log, deadline = out / "log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    sockets = sorted(p.relative_to(own_temp_dir) for p in own_temp_dir.glob("pymp-*/*"))
    os.kill(int(workers[0]), signal.SIGKILL)  # as the out-of-memory killer does
    stderr = exited(proc, "sr_train.py went on after its loader worker was killed")
    assert proc.returncode == 4, stderr.decode()
    # one folder, both workers' sockets in it (the old code: a folder each)
    assert len(sockets) == 2 and sockets[0].parent == sockets[1].parent, sockets
    assert list(own_temp_dir.glob("pymp-*")) == []  # (the old code: the killed worker's)
    step = load_checkpoint(out / "last.pt")["step"]
    assert step >= 3  # (--save-every 100000: only the stop saved)
    assert stderr.decode().splitlines() == [
        f"sr_train.py: error: step {step + 1}: a data loader worker (pid {workers[0]}) was "
        "killed by SIGKILL (most likely by the kernel's out-of-memory killer: dmesg says); "
        "without --cache every worker may come to hold its own copy of the images: use --cache "
        f"DIR (memory-mapped, shared), fewer --workers or --workers 0; {out / 'last.pt'} holds "
        f"step {step}: continue with --resume auto and that fixed"
    ]
    argv[argv.index("100000", argv.index("--steps"))] = str(step + 2)
    argv[argv.index("--workers") + 1] = "0"
    assert sr_train.main([*argv, "--out", str(out), "--resume", "auto"]) == 0
    assert load_checkpoint(out / "last.pt")["step"] == step + 2


def test_le_sigma_final_fraction_freezes_mu_in_the_last_steps(tmp_path, images):
    tiny = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--loss", "le",
            "--le-sigma-feats", "8", "--learning-rate", "1e-3"]  # fmt: skip
    half = ["--le-sigma-final-fraction", "0.5", "--milestones", "0.75", "--gamma", "0.5"]
    assert run(tmp_path / "a", images, *tiny, "--steps", "4", *half) == 0
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    # Each phase runs the schedule over its own steps: at step 3, μ (steps 0-1) is past its
    # milestone, σ (steps 2-3) is one step into its phase, before 0.75 of it.
    groups = ck["optimizers"]["g"]["param_groups"]
    assert [g["lr"] for g in groups] == [5e-4, 1e-3]
    model = load_model(tmp_path / "a" / "last.pt")[0]
    assert len(groups[1]["params"]) == len(list(model.sigma.parameters()))
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]  # Adam's state is indexed in this order
    state = ck["optimizers"]["g"]["state"]
    steps = {n: int(state[i]["step"]) for i, n in enumerate(names) if i in state}
    assert {n.startswith("sigma.") for n in steps} == {True, False}
    assert all(v == (4 if n.startswith("sigma.") else 2) for n, v in steps.items()), steps
    # Resume restores both groups (the schedule counts fractions of --steps, so a 2-step run
    # resumed to 4 is not bit-equal to 4 straight when a phase boundary moves; compare groups)
    assert run(tmp_path / "r", images, *tiny, "--steps", "2", *half) == 0
    assert run(tmp_path / "r", images, *tiny, "--steps", "4", "--resume", "auto", *half) == 0
    resumed = load_checkpoint(tmp_path / "r" / "last.pt")["optimizers"]["g"]["param_groups"]
    assert [g["lr"] for g in resumed] == [5e-4, 1e-3]

    # 1 = σ only from the start: a trained model's μ is kept bit-exact, its σ is retrained
    assert run(tmp_path / "b", images, *tiny, "--steps", "3", "--le-sigma-final-fraction", "1",
               "--init-from", str(tmp_path / "a" / "last.pt")) == 0  # fmt: skip
    before, after = ck["state_dict"], params(tmp_path / "b" / "last.pt")
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != k.startswith("sigma."), k


def test_le_sigma_ema_is_saved_resumed_and_started_from_init_weights(tmp_path, images):
    tiny = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--loss", "le",
            "--le-sigma-feats", "8", "--learning-rate", "1e-3", "--gamma", "1"]  # fmt: skip
    ema = ["--le-sigma-ema", "0.9"]
    assert run(tmp_path / "a", images, *tiny, *ema, "--steps", "4") == 0
    assert run(tmp_path / "b", images, *tiny, *ema, "--steps", "2") == 0
    assert run(tmp_path / "b", images, *tiny, *ema, "--steps", "4", "--resume", "auto") == 0
    a, b = params(tmp_path / "a" / "last.pt"), params(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the average too: 2 + 2 steps == 4 steps
    assert int(a["sigma_ema.step"]) == 3  # averaged before steps 1-3 (after the last: not)
    key = "sigma_ema.upsample__0__weight"
    assert not torch.equal(a[key], a["sigma.upsample.0.weight"])

    # --init-from weights trained without an average: it starts at their σ
    assert run(tmp_path / "p", images, *tiny, "--steps", "2") == 0
    assert run(tmp_path / "c", images, *tiny, *ema, "--steps", "1",
               "--init-from", str(tmp_path / "p" / "last.pt")) == 0  # fmt: skip
    plain, c = params(tmp_path / "p" / "last.pt"), params(tmp_path / "c" / "last.pt")
    assert torch.equal(c[key], plain["sigma.upsample.0.weight"]) and int(c["sigma_ema.step"]) == 0


def test_amp_bf16_on_cpu_trains_le_and_resumes_exactly(tmp_path, images, monkeypatch, capsys):
    # le with a σ average under bf16 autocast; --gamma 1: a 2-step run has the 4-step schedule
    tiny = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--loss", "le",
            "--le-sigma-feats", "8", "--le-sigma-ema", "0.9", "--gamma", "1",
            "--device", "cpu"]  # fmt: skip
    bf16 = [*tiny, "--amp", "bf16"]
    assert run(tmp_path / "a", images, *bf16, "--steps", "4") == 0
    assert run(tmp_path / "b", images, *bf16, "--steps", "2") == 0
    assert run(tmp_path / "b", images, *bf16, "--steps", "4", "--resume", "auto") == 0
    assert run(tmp_path / "f", images, *tiny, "--steps", "4") == 0
    a, b, f = (params(tmp_path / d / "last.pt") for d in "abf")
    assert all(torch.equal(a[k], b[k]) for k in a)  # 2 + 2 steps == 4 steps under autocast too
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in a.values())  # weights stay float32
    assert not all(torch.equal(a[k], f[k]) for k in a)  # autocast did run: float32 differs

    # the σ-only phase (μ frozen) under autocast too
    assert (
        run(tmp_path / "s", images, *bf16, "--steps", "2", "--le-sigma-final-fraction", "0.5") == 0
    )
    s = params(tmp_path / "s" / "last.pt")
    assert all(torch.isfinite(v).all() for v in s.values() if v.is_floating_point())

    # a CPU without native bf16: it still trains, with a one-line warning
    monkeypatch.setattr(config, "cpu_has_native", lambda amp: False)
    capsys.readouterr()
    assert run(tmp_path / "c", images, *bf16, "--steps", "1") == 0
    assert capsys.readouterr().err.splitlines() == [
        "sr_train.py: warning: --amp bf16: this CPU emulates bf16, slower than float32; drop --amp"
    ]


def test_bf16_on_a_gpu_older_than_ampere_is_said_to_be_emulated(monkeypatch):
    """torch accepts bf16 autocast on a T4 or V100 and emulates it: slower than float32."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert config.amp_emulated("bf16", cuda) == (
        "this GPU (compute capability 7.5) emulates bf16, slower than float32; use --amp fp16 "
        "where the model allows it, or drop --amp"
    )
    assert config.amp_emulated("fp16", cuda) is None and config.amp_emulated("none", cuda) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert config.amp_emulated("bf16", cuda) is None


@pytest.mark.parametrize("how", ["too deep", "full"])
def test_a_temporary_folder_unfit_for_the_workers_sockets_is_one_line(
    tmp_path, images, monkeypatch, capsys, how
):
    """A TMPDIR deep in a scratch file system: each loader worker's socket
    ($TMPDIR/pymp-*/listener-*) could not be bound (AF_UNIX: 107 bytes), the worker printed a
    traceback, and the run waited LOADER_TIMEOUT, then exited 75 as "worker hung", to be
    requeued into the same wall. A full (or read-only) TMPDIR, where the sockets' folder
    (pymp-*) cannot be made: the same. Now one line before training, exit 2 or 7."""
    monkeypatch.setattr(sr_lib.data, "LOADER_TIMEOUT", 2.0)  # (the old wait, shortened)
    if how == "too deep":
        deep = tmp_path / ("d" * 60) / ("e" * 60)
        deep.mkdir(parents=True)
        monkeypatch.setattr(tempfile, "tempdir", str(deep))
        code, says = 2, f"--workers 2: the temporary folder {deep} ($TMPDIR) is too deep"
    else:

        def full():  # as tempfile.mkdtemp fails there (in the workers too: forked)
            folder = os.path.join(tempfile.gettempdir(), "pymp-12345678")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), folder)

        monkeypatch.setattr(multiprocessing.util, "get_temp_dir", full)
        code, says = 7, "--workers 2: cannot make the loader workers' socket folder in the "
        says += f"temporary folder {tempfile.gettempdir()} ($TMPDIR): No space left on device; "
        says += "free space there, set TMPDIR to a folder you can write to, or use --workers 0"
    argv = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--data", str(images),
            "--scale", "2", "--patch", "8", "--batch", "2", "--workers", "2", "--val-every", "0",
            "--steps", "2", "--out", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and err.count("\n") == 1, err
    assert says in err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.filterwarnings("ignore:--val-data.*training images too")  # (they are, here)
def test_validation_strips_keep_the_last_validations_and_the_best(tmp_path, images, toy):
    """OUT/val/ gained a strip per image at every validation, without end: a 1M-step run
    validating every 1000 steps filled the disk. It keeps the strips of the last --keep-strips
    validations and of best.pt's, across a resume too (also of a checkpoint written before
    it recorded best.pt's step); other files in OUT/val/ stay, those of names a strip could
    have too; --keep-strips 0 keeps them all. (--learning-rate 0: every validation scores
    the same, so best.pt is step 1's.)"""
    val = tmp_path / "val"
    val.mkdir()
    users = ["notes.txt", "step0000002_img3.png", "step00000002_img0.png", "step0000002_x.png"]
    for name in users:  # (img3: not a validation image here; 8 digits: no step's name)
        (val / name).write_bytes(b"mine")
    flags = ["--model", "toy", "--val-data", str(images), "--val-every", "1", "--val-images",
             "2", "--learning-rate", "0", "--keep-strips", "2"]  # fmt: skip

    def strips():
        names = sorted(p.name for p in val.iterdir() if p.name not in users)
        assert names == sorted(p.name for p in val.glob("step???????_img[01].png"))
        return sorted({int(name[4:11]) for name in names if name.endswith("img1.png")}), names

    assert run(tmp_path, images, *flags, "--steps", "5") == 0
    assert strips()[0] == [1, 4, 5]
    assert len(strips()[1]) == 6  # (both images')
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 1
    assert run(tmp_path, images, *flags, "--steps", "7", "--resume", "auto") == 0
    assert strips()[0] == [1, 6, 7]
    ck = load_checkpoint(tmp_path / "last.pt")
    del ck["best_step"]  # as srspace 0.2.0 wrote it: best.pt's own step is read
    save_checkpoint(tmp_path / "last.pt", ck)
    assert run(tmp_path, images, *flags, "--steps", "8", "--resume", "auto") == 0
    assert strips()[0] == [1, 7, 8]
    assert run(tmp_path, images, *flags, "--steps", "10", "--resume", "auto",
               "--keep-strips", "0") == 0  # fmt: skip
    assert strips()[0] == [1, 7, 8, 9, 10]
    assert all((val / name).read_bytes() == b"mine" for name in users)


@pytest.mark.filterwarnings("ignore:--val-data.*training images too")  # (they are, here)
def test_tensorboard_keeps_the_strips_that_val_keeps(tmp_path, images, toy):
    """--tensorboard wrote every validation's strips into its one event file, which
    --keep-strips could not prune: it grew by about the PNGs' size at each validation (1.45 MB
    of demo's, docs/benchmarks.md), without end. Each validation's strips are an event file of
    their own in OUT/tb/val/ (TensorBoard's run "val"), deleted with its PNGs. A resume deletes
    those of the steps after its checkpoint (done again), as TensorBoard hides their numbers,
    and one a killed validation left half written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--model", "toy", "--val-data", str(images), "--val-every", "1", "--val-images",
             "1", "--learning-rate", "0", "--keep-strips", "2", "--tensorboard"]  # fmt: skip

    def shown(folder=tmp_path / "tb" / "val"):
        events = EventAccumulator(str(folder), size_guidance={"images": 0})
        events.Reload()
        if folder.name == "tb":
            return events.Tags()["images"]
        steps = [image.step for image in events.Images("val/img0")]
        assert steps == sorted(s for s, _ in sr_train.tb_strip_files(tmp_path))  # a file each
        return steps

    assert run(tmp_path, images, *flags, "--steps", "5") == 0
    assert shown() == [1, 4, 5]  # best.pt's (step 1) and the last 2, as OUT/val/
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [
        f"step000000{s}_img0.png" for s in (1, 4, 5)
    ]
    assert shown(tmp_path / "tb") == []  # the numbers' file holds no strip
    shutil.copy(tmp_path / "last.pt", tmp_path / "step5.pt")
    assert run(tmp_path, images, *flags, "--steps", "7", "--resume", "auto") == 0
    assert shown() == [1, 6, 7]
    shutil.copy(tmp_path / "step5.pt", tmp_path / "last.pt")  # killed after step 7, saved at 5
    (tmp_path / "tb" / "val" / ".step000000000008.tmp").write_bytes(b"half")
    assert run(tmp_path, images, *flags, "--steps", "5", "--resume", "auto") == 0
    assert shown() == [1] and os.listdir(tmp_path / "tb" / "val") == [
        "events.out.tfevents.000000000001.strips"
    ]


@pytest.mark.filterwarnings("ignore:--val-data.*training images too")  # (they are, here)
def test_a_tensorboard_strip_that_cannot_be_written_stops_as_a_png_strip(tmp_path, images, toy,
                                                                        capsys):  # fmt: skip
    """OUT/tb/val/ that cannot take the strips' event file (here a file in its place; a full
    disk): as a PNG strip, the run saves last.pt and stops, one line naming it, exit 7."""
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "val").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, "--model", "toy", "--steps", "3", "--val-data", str(images),
            "--val-every", "1", "--val-images", "1", "--tensorboard")  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 7 and err[-1].startswith(
        f"sr_train.py: error: {tmp_path / 'tb' / 'val'}: cannot write (File exists); stopped at "
        f"step 1, wrote {tmp_path / 'last.pt'}"
    ), err
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1


@pytest.mark.filterwarnings("ignore:--val-data.*training images too")  # (they are, here)
def test_an_old_strip_that_cannot_be_deleted_is_a_warning(tmp_path, images, toy, monkeypatch,
                                                          capsys):  # fmt: skip
    """A strip --keep-strips cannot delete (a file made read-only elsewhere): one warning line
    naming it, training goes on (the strips are a view of the run, not its state). (Step 1's
    is best.pt's, at --learning-rate 0: step 2's is the one to delete, at step 3.)"""
    real = Path.unlink

    def refuse(path, missing_ok=False):
        if path.parent.name == "val":
            raise PermissionError(errno.EACCES, "Permission denied")
        real(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    assert run(tmp_path, images, "--model", "toy", "--steps", "3", "--val-data", str(images),
               "--val-every", "1", "--val-images", "1", "--learning-rate", "0",
               "--keep-strips", "1") == 0  # fmt: skip
    err = [x for x in capsys.readouterr().err.splitlines() if "--keep-strips" in x]
    assert err == [
        "sr_train.py: warning: --keep-strips 1: cannot delete the old validation strip "
        f"{tmp_path / 'val' / 'step0000002_img0.png'} (Permission denied); training goes on"
    ]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [
        "step0000001_img0.png", "step0000002_img0.png", "step0000003_img0.png"]  # fmt: skip


def test_strips_of_any_stem_are_kept_within_bounds(tmp_path):
    """prune_strips on names a regular expression's `.` misses (a newline: such a stem's strips
    were never deleted) and in a subfolder's OUT/val/sub/; best.pt's step stays."""
    stems = ["a\nb", "sub/c"]
    paths = [sr_train.strip_path(tmp_path, stem, s) for s in (1, 2, 3, 4) for stem in stems]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
    sr_train.prune_strips(tmp_path, stems, 4, 2, 1)
    assert [p.exists() for p in paths] == [True] * 2 + [False] * 2 + [True] * 4
