"""sr_train.py's non-finite guard: no host reads between log and save steps, a skipped step changes
nothing (weights, both optimizers, buffers), --max-bad-steps at check steps, --on-nan rollback."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY
from test_distributed import ONE_WORKER, two_ranks
from torch.utils._python_dispatch import TorchDispatchMode

import sr_train
from sr_lib import models
from sr_lib.checkpoint import load_checkpoint
from sr_lib.models.edsr import EDSR
from sr_lib.models.vspsr import VSpSR

REPO = Path(__file__).resolve().parents[1]


def flaky(base):
    """`base` whose loss is NaN at the steps listed in --nan-steps, its gradient too; a step
    written N:loss has a NaN loss with a finite gradient (only the loss's check sees it), N:grad a
    finite loss with a NaN gradient (only the gradient norm's check sees it). With --nan-once only
    the first time each of those steps runs (a rollback then gets past them); with --nan-rank R
    only on process R of several; with --nan-critic the discriminator's loss instead."""

    @dataclass
    class FlakyConfig(base.Config):
        nan_steps: str = ""
        nan_once: bool = False
        nan_rank: int = field(default=-1, metadata=dict(range="[-1, inf)"))  # -1: every rank
        nan_critic: bool = False

    class Flaky(base):
        Config = FlakyConfig

        def __init__(self, cfg):
            super().__init__(cfg)
            self.step, self.seen = 0, set()

        def on_step(self, step, total):
            super().on_step(step, total)
            self.step = step

        def spoil(self, out, critic):
            bad = dict((s + ":both").split(":")[:2] for s in self.cfg.nan_steps.split(",") if s)
            bad = {int(s): how for s, how in bad.items()}
            rank = int(os.environ.get("RANK", 0))
            if self.cfg.nan_rank not in (-1, rank) or critic != self.cfg.nan_critic:
                bad = {}
            if self.step in bad and not (self.cfg.nan_once and self.step in self.seen):
                self.seen.add(self.step)
                loss, how = out["loss"], bad[self.step]
                if how == "loss":  # its gradient: that of `loss`
                    out["loss"] = loss + float("nan")
                elif how == "grad":  # + sqrt(0) = 0, whose derivative, inf, times 0 is NaN
                    out["loss"] = loss + (loss * 0).sqrt()
                else:
                    out["loss"] = loss * float("nan")
            return out

        def forward(self, lr, hr):
            return self.spoil(super().forward(lr, hr), critic=False)

        def discriminator_loss(self, lr, hr, out):
            return self.spoil(super().discriminator_loss(lr, hr, out), critic=True)

    return Flaky


def register():
    """The test models, also for a script run in a subprocess (see test_rollback_through_cli)."""
    models.MODELS["flaky_edsr"] = flaky(EDSR)
    models.MODELS["flaky_vspsr"] = flaky(VSpSR)


@pytest.fixture
def flaky_models(monkeypatch):
    monkeypatch.setitem(models.MODELS, "flaky_edsr", flaky(EDSR))
    monkeypatch.setitem(models.MODELS, "flaky_vspsr", flaky(VSpSR))


def tiny(name):
    """A registered model's tiny config as command-line flags."""
    flags = []
    for key, value in TINY[name].items():
        flag = "--" + key.replace("_", "-")
        if value is False:
            flags.append(flag.replace("--", "--no-"))
        elif value is not True:
            flags += [flag, str(value)]
    return flags


EDSR_TINY = ["--model", "flaky_edsr", *tiny("edsr")]
VSPSR_TINY = ["--model", "flaky_vspsr", *tiny("vspsr")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(3):
        img = np.kron(rng.random((12, 12, 3)), np.ones((8, 8, 1)))  # smooth-ish 96x96
        iio.imwrite(d / f"img {i}.png", (img * 255).astype(np.uint8))
    return d


def run(out, images, *extra, scale=2):
    return sr_train.main([
        "--data", str(images), "--scale", str(scale), "--patch", "8", "--batch", "2",
        "--workers", "0", "--val-every", "0", "--log-every", "1", "--out", str(out), *extra,
    ])  # fmt: skip


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
# Operations whose output size depends on values (a host read inside the operation on a GPU).
SIZED_BY_VALUES = ("nonzero", "masked_select", "unique_dim", "_unique", "_unique2",
                   "unique_consecutive", "repeat_interleave", "equal", "is_nonzero")  # fmt: skip

# Every model, with its optional parts on and --ema: case -> (model, extra flags, scale). Steps 0-7
# of 8: SRFlow's encoder unfreezes at step 4, VarSR's critic starts at step 2, the ℓE σ-only
# phase at step 4.
READ_CASES = {
    "bicubic": ("bicubic", [], 2),
    "edsr_bf16_clip": ("edsr", ["--amp", "bf16", "--grad-clip", "1"], 2),
    "edsr_le": ("edsr", ["--loss", "le", "--le-sigma-feats", "8", "--le-sigma-ema", "0.9",
                         "--le-sigma-final-fraction", "0.5"], 2),
    "rrdb": ("rrdb", [], 2),
    "srflow": ("srflow", [], 4),
    "srflow_da": ("srflow_da", [], 4),
    "ncsr": ("ncsr", [], 4),
    "vspsr": ("vspsr", ["--cem-train"], 2),
    "varsr": ("varsr", ["--adv-start", "0.25", "--lambda-per", "0.01"], 4),
    "vspsr_fp16": ("vspsr", ["--amp", "fp16"], 2),
    "refvae": ("refvae", ["--adv-loss", "l1", "--lambda-lpips", "0.1"], 4),  # and pretrained
}  # fmt: skip


class LoopReads:
    """Host reads of tensor values while sr_train.train runs: (what, step of the loop, inside
    train_step). Tensor methods that hand a value to Python are patched; operations whose output
    size depends on values are seen as they are dispatched."""

    def __init__(self, monkeypatch):
        self.reads = []
        self.train_code, self.step_code = sr_train.train.__code__, sr_train.train_step.__code__
        for method in HOST_READS:
            monkeypatch.setattr(
                torch.Tensor, method, self.spy(method, getattr(torch.Tensor, method))
            )
        self.mode = Dispatched(self)

    def spy(self, method, real):
        def read(tensor, *args, **kwargs):
            self.seen(method, sys._getframe(1))
            return real(tensor, *args, **kwargs)

        return read

    def seen(self, what, caller):
        # The loader converts CPU batches on the host (workers 0); not a read of the device.
        if caller.f_code.co_filename.endswith(str(Path("sr_lib", "data.py"))):
            return
        frame, in_step = caller, False
        while frame is not None and frame.f_code is not self.train_code:
            in_step |= frame.f_code is self.step_code
            frame = frame.f_back
        # inside the loop: `logged` is set just before it (`step` is set earlier: train's exit
        # callback reads it)
        if frame is not None and "logged" in frame.f_locals:
            self.reads.append((what, frame.f_locals["step"], in_step))


class Dispatched(TorchDispatchMode):
    def __init__(self, loop_reads):
        super().__init__()
        self.loop_reads = loop_reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        # x[mask] and x[mask] = v: aten.index / index_put with a list of index tensors
        masks = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        masked = isinstance(masks, (list, tuple)) and any(
            isinstance(m, torch.Tensor) and m.dtype in (torch.bool, torch.uint8) for m in masks
        )
        if name in SIZED_BY_VALUES or masked:
            self.loop_reads.seen(name, sys._getframe(1))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def pretend_imagenet(monkeypatch):
    """RefVAE --pretrained with random VGG19 and AlexNet weights in place of the manifest's."""
    from torchvision.models.vgg import cfgs, make_layers

    from sr_lib.models import refvae

    monkeypatch.setattr(refvae, "resolve", lambda name, **kwargs: None)
    monkeypatch.setattr(refvae, "load_alexnet_trunk", lambda net, *args: None)
    monkeypatch.setattr(
        refvae,
        "torchvision_model",
        lambda name, pretrained: SimpleNamespace(features=make_layers(cfgs["E"])),
    )


def read_case(case: str, images: Path, monkeypatch) -> tuple[list[str], int]:
    """sr_train.py flags (but --device) and scale of a READ_CASES case, 8 steps, logging at 4
    and 8, saving at 8. RefVAE needs the `pretend_imagenet` fixture."""
    name, extra, scale = READ_CASES[case]
    flags = tiny(name)
    if case == "refvae":
        flags.remove("--no-pretrained")  # (pretend_imagenet)
        extra = [*extra, "--ref-data", str(images)]
    if "fp16" in extra:
        monkeypatch.setattr(sr_train, "FP16_DEVICES", ("cuda", "cpu"))
    argv = ["--model", name, *flags, *extra, "--ema", "0.999", "--log-every", "4",
            "--save-every", "8", "--steps", "8"]  # fmt: skip
    return argv, scale


@pytest.mark.parametrize("case", READ_CASES)
def test_no_host_reads_between_log_and_save_steps(tmp_path, images, monkeypatch, case,
                                                   pretend_imagenet):  # fmt: skip
    """On a GPU every read of a tensor's value on the host waits for the device. The loop reads
    only at log, validation and save steps (steps 4 and 8 here), never inside a training step:
    every model, with its weight average, its phases (a flow's encoder unfreezing, a critic
    starting, the ℓE σ-only phase), mixed precision and the loss scaler, clipping, RefVAE's
    ImageNet encoder (loaded once, then not read again) and references from a folder.
    tests/test_gpu.py checks the same on a GPU with CUDA's own detector of synchronisations."""
    argv, scale = read_case(case, images, monkeypatch)
    spy = LoopReads(monkeypatch)
    with spy.mode:
        assert run(tmp_path, images, *argv, scale=scale) == 0
    monkeypatch.undo()
    assert spy.reads, "the spy saw nothing: the logging steps must read the loss"
    assert not [r for r in spy.reads if r[2]], f"host reads inside a training step: {spy.reads}"
    assert {r[1] for r in spy.reads} <= {4, 8}, spy.reads


@pytest.mark.parametrize("read", ["item", "mask", "nonzero"])
def test_the_host_read_spy_sees_reads_in_a_step(tmp_path, images, monkeypatch, read):
    """The spy of the test above sees a read inside the model's forward at every step."""
    real = EDSR.forward

    def forward(self, lr, hr):
        out = real(self, lr, hr)
        if read == "item":
            out["loss"] = out["loss"] * out["loss"].item() / out["loss"].item()
        elif read == "mask":
            out["loss"] = out["loss"] + lr[lr > 2].sum()  # a boolean mask: size from values
        else:
            out["loss"] = out["loss"] + torch.nonzero(lr > 2).sum()
        return out

    monkeypatch.setattr(EDSR, "forward", forward)
    spy = LoopReads(monkeypatch)
    with spy.mode:
        assert run(tmp_path, images, "--model", "edsr", *tiny("edsr"), "--log-every", "4",
                   "--steps", "4") == 0  # fmt: skip
    monkeypatch.undo()
    assert {r[1] for r in spy.reads if r[2]} == {0, 1, 2, 3}, spy.reads


@pytest.mark.parametrize("where", ["generator", "critic"])
def test_a_skipped_step_changes_nothing_discriminator_and_buffers_included(
    tmp_path, images, flaky_models, where
):
    """A NaN generator (or discriminator) loss at step 1 skips that whole step: the generator's
    and the discriminator's weights, both Adam states (moments, step counts) and the
    discriminator's BatchNorm statistics are those after step 0."""
    common = [*VSPSR_TINY, "--learning-rate", "1e-3"]
    nan = ["--nan-steps", "1"] + (["--nan-critic"] if where == "critic" else [])
    assert run(tmp_path / "one", images, *common, "--steps", "1") == 0
    assert run(tmp_path / "two", images, *common, "--steps", "2", *nan) == 0
    a, b = (
        load_checkpoint(tmp_path / "one" / "last.pt"),
        load_checkpoint(tmp_path / "two" / "last.pt"),
    )
    assert b["skipped"] == 1 and a["skipped"] == 0
    assert any("running_mean" in k for k in a["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for opt in ("g", "d"):
        sa, sb = a["optimizers"][opt]["state"], b["optimizers"][opt]["state"]
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            assert all(torch.equal(sa[i][k], sb[i][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
            assert float(sb[i]["step"]) == 1


def test_a_non_finite_loss_is_logged_as_strict_json(tmp_path, images, flaky_models):
    """The NaN loss of a skipped step is written as the string "nan": json.dumps wrote the bare
    token NaN, which strict JSON readers (JavaScript's JSON.parse, Go, serde_json) refuse, so
    the log of the very run a user inspects for non-finite steps could not be read there.
    TensorBoard still gets the number."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["--steps", "3", "--nan-steps", "1", "--tensorboard"]
    assert run(tmp_path, images, *EDSR_TINY, *argv) == 0

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [(r["step"], r["skipped"], r["loss"]) for r in rows][1] == (2, 1, "nan")
    assert all(isinstance(r["loss"], float) for r in rows if r["step"] != 2)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [np.isnan(e.value) for e in events.Scalars("loss")] == [False, True, False]


def test_max_bad_steps_is_checked_at_log_and_save_steps(tmp_path, images, flaky_models, capsys):
    """A streak found at the next log step after it ended still stops the run with the step where
    it reached --max-bad-steps; no checkpoint is written inside the streak."""
    flags = [*EDSR_TINY, "--steps", "20", "--max-bad-steps", "3", "--nan-steps", "1,2,3"]
    with pytest.raises(SystemExit) as e:  # log at 5: the streak 1-3 ended at step 4
        run(tmp_path / "log", images, *flags, "--log-every", "5", "--save-every", "100")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 5 and len(err.splitlines()) == 1 and "step 3: 3 consecutive" in err
    assert not (tmp_path / "log" / "last.pt").exists()
    with pytest.raises(SystemExit) as e:  # save at 2 (inside the streak: skipped), at 4 stopped
        run(tmp_path / "save", images, *flags, "--log-every", "100", "--save-every", "2")
    assert e.value.code == 5 and "step 3" in capsys.readouterr().err
    assert not (tmp_path / "save" / "last.pt").exists()


def test_rollback_reloads_last_checkpoint_and_halves_the_rates(tmp_path, images, flaky_models):
    """Steps 5 and 6 are NaN once: after 2 bad steps the run goes back to last.pt (step 4) with
    the learning rates halved and ends exactly as a run resumed from step 4 at half the rates,
    its count of skipped steps too: the abandoned steps' 2 are none of the run's 10 (they were
    counted on, "done: 10 steps, 2 skipped" where none of them was)."""
    common = [*VSPSR_TINY, "--learning-rate", "1e-3", "--d-learning-rate", "2e-4",
              "--milestones", "--save-every", "4"]  # fmt: skip
    rollback = ["--steps", "10", "--max-bad-steps", "2", "--on-nan", "rollback",
                "--nan-steps", "5,6", "--nan-once"]  # fmt: skip
    assert run(tmp_path / "rb", images, *common, *rollback) == 0
    ck = load_checkpoint(tmp_path / "rb" / "last.pt")
    assert ck["step"] == 10 and ck["rollbacks"] == 1 and ck["skipped"] == 0
    assert ck["optimizers"]["g"]["param_groups"][0]["lr"] == 5e-4
    assert ck["optimizers"]["d"]["param_groups"][0]["lr"] == 1e-4
    log = records(tmp_path / "rb")
    assert {"step": 7, "rollback": 1, "to_step": 4, "learning_rate_scale": 0.5} in log
    assert [r["learning_rate"] for r in log if "loss" in r] == [1e-3] * 6 + [5e-4] * 6  # 1-6, 5-10
    assert [r["skipped"] for r in log if "loss" in r] == [0] * 5 + [1] + [0] * 6

    assert run(tmp_path / "ref", images, *common, "--steps", "4") == 0
    half = ["--learning-rate", "5e-4", "--d-learning-rate", "1e-4"]
    assert run(tmp_path / "ref", images, *common, "--steps", "10", *half, "--resume", "auto") == 0
    ref = load_checkpoint(tmp_path / "ref" / "last.pt")
    assert all(torch.equal(ck["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    assert ck["skipped"] == ref["skipped"]

    # the halved rates are kept by a resumed run (they are in the checkpoint)
    assert run(tmp_path / "rb", images, *common, "--steps", "12", "--resume", "auto") == 0
    assert [r["learning_rate"] for r in records(tmp_path / "rb") if "loss" in r][-2:] == [5e-4] * 2
    assert load_checkpoint(tmp_path / "rb" / "last.pt")["rollbacks"] == 1


def test_rollback_restores_the_weight_average(tmp_path, images, flaky_models):
    """With --ema a rollback also takes the average back to last.pt's: the run ends with the
    average of a run resumed from there at half the rates, update count included."""
    common = [*EDSR_TINY, "--learning-rate", "1e-3", "--milestones", "--save-every", "4",
              "--ema", "0.5"]  # fmt: skip
    rollback = ["--steps", "10", "--max-bad-steps", "2", "--on-nan", "rollback",
                "--nan-steps", "5,6", "--nan-once"]  # fmt: skip
    assert run(tmp_path / "rb", images, *common, *rollback) == 0
    assert run(tmp_path / "ref", images, *common, "--steps", "4") == 0
    half = ["--learning-rate", "5e-4", "--steps", "10", "--resume", "auto"]
    assert run(tmp_path / "ref", images, *common, *half) == 0
    ck, ref = (load_checkpoint(tmp_path / d / "last.pt") for d in ("rb", "ref"))
    assert ck["rollbacks"] == 1 and ck["ema_updates"] == ref["ema_updates"] == 10
    for k, v in ref["ema_state_dict"].items():
        assert torch.equal(ck["ema_state_dict"][k], v), k


def test_rollbacks_run_out_then_exit_5(tmp_path, images, flaky_models, capsys):
    nan = ",".join(map(str, range(3, 20)))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, *EDSR_TINY, "--steps", "20", "--save-every", "2", "--on-nan",
            "rollback", "--max-rollbacks", "2", "--max-bad-steps", "2",
            "--nan-steps", nan)  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert e.value.code == 5 and len(err.splitlines()) == 1 and "after 2 rollbacks" in err
    assert [r["rollback"] for r in records(tmp_path) if "rollback" in r] == [1, 2]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2  # the last good one, untouched


def test_rollback_before_any_checkpoint_is_exit_5(tmp_path, images, flaky_models, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, *EDSR_TINY, "--steps", "5", "--on-nan", "rollback",
            "--max-bad-steps", "2", "--nan-steps", "0,1,2,3,4")  # fmt: skip
    assert e.value.code == 5 and "before the first checkpoint" in capsys.readouterr().err


def test_a_run_resumed_into_a_new_folder_rolls_back_to_its_own_first_save(
    tmp_path, images, flaky_models, capsys
):
    """--resume A/last.pt --out B --on-nan rollback: B has no last.pt until its first save, so
    its first good step saves one there, as a new run's does; a streak then rolls back to it
    instead of stopping with exit 5 "before the first checkpoint"."""
    common = [*EDSR_TINY, "--nan-steps", "5,6", "--nan-once", "--milestones"]
    assert run(tmp_path / "a", images, *common, "--steps", "4") == 0
    rollback = ["--steps", "10", "--save-every", "100", "--max-bad-steps", "2",
                "--on-nan", "rollback"]  # fmt: skip
    resume = ["--resume", str(tmp_path / "a" / "last.pt")]
    assert run(tmp_path / "b", images, *common, *rollback, *resume) == 0
    assert {"step": 7, "rollback": 1, "to_step": 5, "learning_rate_scale": 0.5} in records(
        tmp_path / "b"
    )
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ck["step"] == 10 and ck["rollbacks"] == 1


def test_a_stop_before_any_save_names_what_holds_the_run(tmp_path, images, flaky_models, capsys):
    """--on-nan stop before this run saved: the line names no last.pt that does not exist, but
    the checkpoint it resumed (or that nothing was saved), and suggests no --on-nan rollback to a
    run that has it."""
    flags = [*EDSR_TINY, "--steps", "8", "--max-bad-steps", "2", "--save-every", "100"]
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "new", images, *flags, "--nan-steps", "1,2,3")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 5 and not (tmp_path / "new" / "last.pt").exists()
    assert err.endswith("nothing was saved: start again with a lower --learning-rate, or use "
                        "--on-nan rollback")  # fmt: skip
    assert run(tmp_path / "a", images, *flags, "--nan-steps", "5,6", "--steps", "4") == 0
    resume = ["--resume", str(tmp_path / "a" / "last.pt")]
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "b", images, *flags, "--nan-steps", "5,6", *resume)
    err = capsys.readouterr().err.strip()
    assert (
        e.value.code == 5 and f"{tmp_path / 'a' / 'last.pt'} still holds step 4: resume it" in err
    )
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "c", images, *flags, "--nan-steps", "0,1,2", "--on-nan", "rollback")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 5 and "before the first checkpoint" in err
    assert "--on-nan rollback" not in err.split("; ", 1)[1]


def test_rollback_through_cli(tmp_path, images):
    """The same from the command line: sr_train.py in its own process, the test model registered
    first (it is not part of srspace)."""
    script = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]; "
              "import test_train_guard, sr_train; test_train_guard.register(); "
              "raise SystemExit(sr_train.main())")  # fmt: skip
    argv = [*EDSR_TINY, "--data", str(images), "--scale", "2", "--patch", "8", "--batch", "2",
            "--workers", "0", "--val-every", "0", "--log-every", "1", "--save-every", "3",
            "--steps", "8", "--max-bad-steps", "2", "--on-nan", "rollback", "--nan-steps", "4,5",
            "--nan-once", "--out", str(tmp_path / "run")]  # fmt: skip
    p = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "step 5: 2 consecutive non-finite" in p.stdout and "rollback 1 of 3" in p.stdout
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["step"] == 8 and ck["rollbacks"] == 1 and ck["skipped"] == 0


@ONE_WORKER
def test_a_nan_on_one_rank_rolls_back_every_rank(tmp_path, images):
    """Two processes (gloo): rank 1 alone sees NaN at steps 4 and 5. Both skip those steps, both
    roll back to last.pt and stay identical; only rank 0 writes the log, the TensorBoard events
    and the checkpoints. Step 4's NaN is in rank 1's loss alone (its gradient, averaged with rank
    0's, is finite): rank 0 skips it only through the flag agreed on the device. Step 5's is in
    the gradient alone (a finite loss): only the gradient norm's check sees it."""
    script = tmp_path / "train_flaky.py"
    script.write_text(
        f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "import sr_train, test_train_guard\n"
        "test_train_guard.register()\n"
        "raise SystemExit(sr_train.main())\n"
    )
    out = tmp_path / "run"
    # (srun's ranks, not torchrun's: its agent, a process importing torch, is not tested here)
    cmd = [sys.executable, str(script), *EDSR_TINY, "--data", str(images),
           "--scale", "2", "--patch", "8", "--batch", "2", "--workers", "0", "--val-every", "0",
           "--log-every", "1", "--save-every", "3", "--steps", "8", "--device", "cpu",
           "--max-bad-steps", "2", "--on-nan", "rollback", "--nan-steps", "4:loss,5:grad",
           "--nan-once", "--nan-rank", "1", "--sync-check-every", "1", "--tensorboard",
           "--out", str(out)]  # fmt: skip
    codes, outs = two_ranks(cmd, timeout=300)
    assert codes == [0, 0], [err[-3000:] for _, err in outs]
    log = records(out)
    assert [r for r in log if "rollback" in r] == [
        {"step": 6, "rollback": 1, "to_step": 3, "learning_rate_scale": 0.5}
    ]
    diffs = [r["replica_max_diff"] for r in log if "replica_max_diff" in r]
    assert len(diffs) == 10 and set(diffs) == {0.0}  # steps 1-5, then 4-8 again
    ck = load_checkpoint(out / "last.pt")
    assert (ck["step"], ck["rollbacks"], ck["skipped"], ck["world_size"]) == (8, 1, 0, 2)
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_finite_loss_with_a_non_finite_gradient_is_skipped(grad_clip):
    """sqrt at 0: the loss is 0, its gradient inf. With clipping off only the norm is taken (no
    pass scaling every gradient by 1); either way the flag is 0 and Adam changes nothing."""
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    opt = torch.optim.Adam([w], lr=0.1, fused=True)

    def step(loss):
        ok, stepping = sr_train.checked_backward(opt, loss, [w], grad_clip,
                                                 sr_train.distributed.Dist())  # fmt: skip
        assert stepping is opt
        sr_train.step_unless_flagged([opt], ok)
        return float(ok)

    assert step(w.sqrt().sum() - 1) == 0 and torch.equal(w.detach(), torch.tensor([0.0, 1.0]))
    assert step((w - 2).square().sum()) == 1
    assert not torch.equal(w.detach(), torch.tensor([0.0, 1.0]))


def test_the_last_good_checkpoint_named_is_quoted_for_a_shell(tmp_path, images, flaky_models,
                                                               capsys):  # fmt: skip
    """The line of rollbacks run out names the last good checkpoint, pasted into --resume: a
    run folder with a space was written bare (two words in a shell); quoted (`shell_quote`)."""
    out = tmp_path / "my run"
    with pytest.raises(SystemExit) as e:
        run(out, images, *EDSR_TINY, "--steps", "8", "--save-every", "2", "--on-nan",
            "rollback", "--max-rollbacks", "1", "--max-bad-steps", "2",
            "--nan-steps", "3,4,5,6,7")  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 5 and f"the last good checkpoint is '{out / 'last.pt'}' (" in err, err
