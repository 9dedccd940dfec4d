"""sr_train.py --compile on CPU with dynamo's cheap backends ("eager": graph capture only;
"aot_eager": also AOT autograd, as inductor uses it), so these run in seconds. The flows compile
regionally: each flow step, split and RRDB block once per distinct shape, without graph breaks.
Also the loader settings of the CUDA path. Compile time and speed on a GPU:
tests/bench/bench_gpu.py."""

import contextlib
import functools
import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import TINY
from test_distributed import ONE_WORKER, ended, srun_ranks
from torch._dynamo.utils import counters

import sr_train
from sr_lib.checkpoint import load_checkpoint
from sr_lib.config import compile_blocker
from sr_lib.models import build_model, vspsr
from sr_lib.models.flow_layers import FlowStep, Split
from sr_lib.models.losses import on_device
from sr_lib.models.rrdb import RRDBBlock
from sr_lib.models.vgg import VGGFeatures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def flow(**cfg):
    torch.manual_seed(0)
    model = build_model("srflow", {**TINY["srflow"], "scale": 4, **cfg}).train()
    g = torch.Generator().manual_seed(1)
    lr, hr = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    model.on_step(0, 4)
    with torch.no_grad():
        model(lr, hr)  # ActNorm's data-dependent init, eagerly (as sr_train's initialize)
    return model, lr, hr


def train(model, forward, lr, hr, steps, amp=False, total=4):
    """`steps` (step, ...) of NLL + backward + Adam; the losses and the final weights."""
    opt = torch.optim.Adam([p for p in model.parameters()], 1e-3)
    losses = []
    for step in steps:
        model.on_step(step, total)
        torch.manual_seed(step)  # the same dequantisation noise in both runs
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = forward(lr, hr)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_flow_compiles_each_block_once_per_shape_without_graph_breaks():
    model, lr, hr = flow(flow_steps=1, transitions=1)
    assert model.compile_regions == (FlowStep, Split, RRDBBlock)
    forward = sr_train.compile_model(model, model, backend="eager")
    assert forward is model  # regional: the model itself is not wrapped
    train(model, forward, lr, hr, [0, 1], amp=False)  # encoder frozen (the first half)
    graphs = counters["stats"]["unique_graphs"]
    # per level one transition and one conditional step (the same classes, other shapes), one
    # split (×4: after level 1), the frozen RRDB block
    assert graphs == 3 * 2 + 1 + 1
    train(model, forward, lr, hr, [2, 3], amp=False)  # unfrozen: conditional steps, RRDB again
    assert counters["stats"]["unique_graphs"] == graphs + 3 + 1
    train(model, forward, lr, hr, [2, 3], amp=True)  # bfloat16 autocast: its own graphs
    graphs = counters["stats"]["unique_graphs"]
    train(model, forward, lr, hr, [2, 3], amp=True)  # compiled once, not per step
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"] and not counters["unimplemented"]


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_compiled_flow_training_matches_eager(amp):
    model, lr, hr = flow(transitions=0)
    eager = build_model("srflow", {**TINY["srflow"], "scale": 4, "transitions": 0})
    eager.load_state_dict(model.state_dict())
    eager.train().mark_initialized()
    forward = sr_train.compile_model(model, model, backend="aot_eager")
    got, got_w = train(model, forward, lr, hr, [0, 1], amp)
    want, want_w = train(eager, eager, lr, hr, [0, 1], amp)
    tol = dict(rtol=1e-3, atol=1e-3) if amp else dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), **tol), (got, want)
    assert all(torch.allclose(a, b, **tol) for a, b in zip(got_w, want_w))
    assert not counters["graph_break"]


@pytest.mark.parametrize(
    "name, extra",
    [("edsr", {}), ("varsr", {}), ("vspsr", {}), ("vspsr", {"lambda_per": 0.01}),
     ("refvae", {"lambda_lpips": 0.1})],
)  # fmt: skip
def test_other_models_compile_their_whole_forward(name, extra, monkeypatch):
    """One graph, no break. VarSR upsamples its LR with imresize_torch, whose tables (built by
    numpy) come from a dict that the graph reads as constants once an eager call made them, as
    sr_train's initialisation does before compiling; through an lru_cache dynamo traced the
    numpy instead and broke the graph at every resize. The loss networks kept out of state_dict
    (VarSR's and VSpSR's VGG, RefVAE's LPIPS) are moved only when on another device or dtype:
    torch 2.11's dynamo broke the graph at a `.to()` that moved nothing. Equal to float32
    rounding, not bit for bit: torch 2.11's dynamo traces `add_(x, alpha=w)` (the resize's taps)
    as a multiply and an add, which eager fuses (1 ulp)."""
    monkeypatch.setattr(vspsr, "VGGFeatures", functools.partial(VGGFeatures, pretrained=False))
    torch.manual_seed(0)
    model = build_model(name, {**TINY[name], **extra, "scale": 4}).train()
    model.on_step(99, 100)  # VarSR: its adversarial phase, the whole loss
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(lr, hr)
    forward = sr_train.compile_model(model, model, backend="eager")
    assert not model.compile_regions and forward is not model
    torch.manual_seed(1)
    got = forward(lr, hr)
    torch.manual_seed(1)
    want = model(lr, hr)
    if extra:
        assert {"per", "lpips"} & set(want)  # the loss network ran
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=0)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_loss_networks_move_only_when_on_another_device_or_dtype(monkeypatch):
    net = torch.nn.Conv2d(3, 3, 1)
    moves = []

    def to(*args, **kwargs):
        moves.append(args)
        return torch.nn.Module.to(net, *args, **kwargs)

    monkeypatch.setattr(net, "to", to)
    cpu64, meta64 = torch.zeros((), dtype=torch.float64), torch.zeros((), device="meta").double()
    assert on_device(net, torch.zeros(())) is net and not moves
    assert on_device(net, cpu64) is net and net.weight.dtype == torch.float64
    assert on_device(net, meta64) is net and net.weight.is_meta
    assert moves == [(torch.device("cpu"), torch.float64), (torch.device("meta"), torch.float64)]
    assert isinstance(on_device(torch.nn.ReLU(), meta64), torch.nn.ReLU)  # nothing to move


def test_sr_train_compile_amp_and_ema_together(tmp_path, monkeypatch):
    real = sr_train.compile_model
    monkeypatch.setattr(sr_train, "compile_model", lambda m, f: real(m, f, backend="eager"))
    flags = ["--model", "srflow", "--nb", "2", "--nf", "8", "--gc", "4", "--rrdb-blocks", "0,1",
             "--flow-steps", "1", "--hidden-channels", "8", "--scale", "4", "--data", "demo",
             "--patch", "8", "--batch", "2", "--workers", "0", "--val-every", "0",
             "--log-every", "1", "--compile", "--amp", "bf16", "--ema", "0.9"]  # fmt: skip
    assert sr_train.main([*flags, "--steps", "2", "--out", str(tmp_path)]) == 0
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 2 and ck["ema_updates"] == 2
    keys = list(ck["state_dict"]) + list(ck["ema_state_dict"])
    assert not any("_orig_mod" in k for k in keys)  # uncompiled names
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    assert not counters["graph_break"]


def test_compile_without_a_compiler_is_one_line_before_the_run(tmp_path):
    """--compile on a machine without g++ (a laptop, a slim container) stopped at the first step
    with inductor's traceback of ~100 lines; now one line, exit 2, before anything is written."""
    bare = tmp_path / "bin"  # a PATH with nothing on it
    bare.mkdir()
    argv = [sys.executable, str(REPO / "sr_train.py"), "--model", "edsr", "--scale", "2",
            "--data", "demo", "--steps", "1", "--compile", "--device", "cpu",
            "--out", str(tmp_path / "run")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")} | {"PATH": str(bare)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    why = "no working C++ compiler (g++): install g++, or name another in CXX"
    if compile_blocker(torch.device("cpu")):  # this machine lacks Python.h: that is said first
        why = compile_blocker(torch.device("cpu"))
    assert done.stderr.splitlines() == [
        f"sr_train.py: error: --compile: torch.compile cannot build kernels here: {why}; or drop "
        "--compile"
    ]
    assert not (tmp_path / "run").exists()


def test_compile_needs_on_a_gpu_triton_a_c_compiler_and_python_headers(tmp_path, monkeypatch):
    cuda = torch.device("cuda")
    (tmp_path / "Python.h").touch()  # headers found: the checks after them
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compile_blocker(cuda) == "no C compiler for Triton (gcc or clang; or set CC)"
    monkeypatch.setenv("CC", "cc")
    assert compile_blocker(cuda) is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "triton" else real(n))
    assert "Triton is not installed" in compile_blocker(cuda)
    (tmp_path / "Python.h").unlink()
    monkeypatch.setattr(sys, "platform", "linux")
    assert "(Python.h) are not installed" in compile_blocker(torch.device("cpu"))


def test_the_loader_pins_and_copies_to_the_device_only_on_cuda(tmp_path, monkeypatch):
    seen = {}
    real = sr_train.train_loader

    def spy(*args, **kwargs):
        seen.update(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(sr_train, "train_loader", spy)
    argv = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--data", "demo", "--patch",
            "8", "--batch", "2", "--steps", "1", "--workers", "0", "--val-every", "0",
            "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert sr_train.main(argv) == 0
    assert not seen["pin_memory"] and seen["device"] == torch.device("cpu")


# sr_train.py whose --compile backend runs a compiler process, as inductor runs g++ in the step
COMPILING = """import os, signal, subprocess, sys, torch, sr_train
def backend(gm, inputs):  # a child in the script's process group, as g++ is
    compiler = subprocess.Popen(["sleep", "60"])  # running (exec'd) before the test may signal
    open(os.environ["COMPILING"], "w").close()
    if compiler.wait():
        raise subprocess.CalledProcessError(compiler.returncode, "sleep")
    return gm.forward
sr_train.compile_blocker = lambda device: None  # (no g++ needed)
sr_train.compile_model = lambda model, forward: torch.compile(forward, backend=backend)
sys.exit(sr_train.main(sys.argv[1:]))"""


def test_a_signal_to_the_group_while_compiling_the_first_step_stops_it_cleanly(tmp_path):
    """SIGTERM to the process group (SLURM, or Ctrl-C's SIGINT in a terminal) during the first
    step of a --compile run, minutes of compiling on a CPU, also killed inductor's g++: the
    compilation failed and the run ended with a traceback of ~2,400 lines (the compiler's
    output) and exit 1, the job not requeued. Now as a signal after a step: last.pt, exit 75,
    one line; no compiler left running."""
    out, flag = tmp_path / "run", tmp_path / "compiling"
    cmd = [sys.executable, "-c", COMPILING, "--model", "edsr", "--n-feats", "8", "--n-blocks",
           "1", "--scale", "2", "--data", "demo", "--patch", "8", "--batch", "2", "--steps", "3",
           "--workers", "0", "--val-every", "0", "--device", "cpu", "--compile", "--out",
           str(out)]  # fmt: skip
    assert stopped_while_compiling(cmd, flag) == 0


@ONE_WORKER
def test_a_signal_to_the_group_while_two_ranks_compile_the_first_step_stops_both(tmp_path):
    """The same under srun, 2 ranks: SIGTERM to the process group of both ranks and their
    compilers during the first step. A rank of several saves nothing (the other may wait in a
    collective): each ends with one line saying what OUT/last.pt holds, exit 75; none existed.
    (Each rank also printed torch's log line on DDP's profiler range, left out of the graph.)"""
    out, flags = tmp_path / "run", [tmp_path / "compiling0", tmp_path / "compiling1"]
    argvs = [[sys.executable, "-c", COMPILING.replace('environ["COMPILING"]',
                                                      f"environ['COMPILING'] + '{rank}'"),
              "--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "2", "--data",
              "demo", "--patch", "8", "--batch", "2", "--steps", "3", "--workers", "0",
              "--val-every", "0", "--device", "cpu", "--compile", "--out", str(out)]
             for rank in (0, 1)]  # fmt: skip
    ranks = srun_ranks(argvs, subprocess.PIPE, {"COMPILING": str(tmp_path / "compiling")}, True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not all(f.exists() for f in flags):
            assert all(p.poll() is None for p in ranks), [p.communicate()[1] for p in ranks]
            time.sleep(0.05)
        assert all(f.exists() for f in flags)
        os.killpg(ranks[0].pid, signal.SIGTERM)  # both ranks and their compilers
        codes, outs = ended(ranks)
        with pytest.raises(ProcessLookupError):  # no compiler left running in the group
            os.killpg(ranks[0].pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ranks[0].pid, signal.SIGKILL)
    errs = [err for _, err in outs]
    assert codes == [75, 75], errs
    # (DDP's optimizer hands each bucket's graph to the backend through its compile_fn)
    line = (
        "sr_train.py: error: SIGTERM: stopped in step 1, whose compilation raised "
        "BackendCompilerFailed (backend='compile_fn' raised: CalledProcessError: Command 'sleep' "
        "died with <Signals.SIGTERM: 15>.), taken as the stop's effect (the signal ends the "
        "compiler too): if it recurs after resuming, it is a real error; "
    )
    assert [no_advice(e) for e in errs] == [line + "nothing was saved: start again\n"] * 2
    assert not (out / "last.pt").exists()


# The advice dynamo adds to a backend's error (its words are torch's, of its version's), joined
# into the line as a library's lines are (sr_lib.errors.joined_lines): torch 2.14's stays whole;
# older torch's (2.6, .ci/oldest.txt) runs past the 300 characters, so the text is cut after its
# first lines, "(and 4 more lines: SRSPACE_FULL_ERRORS=1 shows them)" in its place
DYNAMO_ADVICE = re.compile(r"; Set TORCHDYNAMO_VERBOSE=1 [^\n]*?TORCH_LOGS=\\?\"\+dynamo\\?\"")
ADVICE_CUT = re.compile(r" \(and \d+ more lines?: SRSPACE_FULL_ERRORS=1 shows (?:them|it)\)")


def no_advice(text: str) -> str:
    return ADVICE_CUT.sub("", DYNAMO_ADVICE.sub("", text))


GUARDS_ON_3130 = "sr_train.py: warning: Guards may run slower on Python 3.13.0."


def stopped_while_compiling(cmd: list[str], flag: Path, validating: bool = False) -> int:
    """Runs `cmd` (sr_train.py ... --out OUT) in its own process group, sends the group SIGTERM
    once its compiler runs (`flag` exists), checks the run stopped cleanly, saying in one line
    which error of the step (or of its validation) it took as the stop; the step saved."""
    out = Path(cmd[-1])
    env = {**os.environ, "COMPILING": str(flag)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not flag.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert flag.exists(), proc.communicate()[1].decode()[-2000:]
        os.killpg(proc.pid, signal.SIGTERM)  # the script and its compiler
        stdout, stderr = proc.communicate(timeout=60)
        with pytest.raises(ProcessLookupError):  # no compiler left running in the group
            os.killpg(proc.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # torch's note on Python 3.13.0 (dynamo's guards run slower there), one warning line once a
    # step's guards are built: the user's to act on, no part of the stop, and no other version.
    # Also the start's warning of the tiny flow's random encoder, frozen (no --rrdb-init).
    said = (GUARDS_ON_3130, "sr_train.py: warning: --freeze-encoder 0.5: ")
    errs = [no_advice(e) for e in stderr.decode().splitlines() if not e.startswith(said)]
    assert proc.returncode == 75, stderr.decode()[-2000:]
    step = load_checkpoint(out / "last.pt")["step"]
    where = f"validation at step {step}" if validating else f"step {step + 1}"
    assert errs == [
        f"sr_train.py: warning: {where} raised BackendCompilerFailed (backend='backend' raised: "
        "CalledProcessError: Command 'sleep' died with <Signals.SIGTERM: 15>.) after SIGTERM "
        "while compiling; taken as the stop's effect (the signal ends the compiler too): if it "
        "recurs after resuming, it is a real error"
    ], stderr.decode()[-2000:]
    assert stdout.decode().splitlines()[-1] == (
        f"SIGTERM: stopped at step {step}, wrote {out / 'last.pt'}; continue with --resume auto"
    )
    return step


# sr_train.py whose flow blocks compile eagerly in training and run a compiler process in
# validation: a flow validates through its compiled blocks, compiled again there (no gradients)
COMPILING_IN_VALIDATION = """import os, subprocess, sys, sr_train
validating = []
def backend(gm, inputs):
    if validating:  # a child in the script's process group, as g++ is
        compiler = subprocess.Popen(["sleep", "60"])  # (as above)
        open(os.environ["COMPILING"], "w").close()
        if compiler.wait():
            raise subprocess.CalledProcessError(compiler.returncode, "sleep")
    return gm.forward
def validate(*args):
    validating.append(1)
    return real_validate(*args)
real_validate, sr_train.validate = sr_train.validate, validate
real_compile = sr_train.compile_model
sr_train.compile_blocker = lambda device: None
sr_train.compile_model = lambda model, forward: real_compile(model, forward, backend=backend)
sys.exit(sr_train.main(sys.argv[1:]))"""


def test_a_signal_to_the_group_while_validation_compiles_stops_cleanly(tmp_path):
    """The same in a flow's validation, which compiles its blocks again: a traceback, exit 1,
    the step before it not saved. Now: last.pt of that step, exit 75, one line."""
    out, flag = tmp_path / "run", tmp_path / "compiling"
    cmd = [sys.executable, "-c", COMPILING_IN_VALIDATION, "--model", "srflow", "--nb", "2",
           "--nf", "8", "--gc", "4", "--rrdb-blocks", "0,1", "--flow-steps", "1",
           "--hidden-channels", "8", "--scale", "4", "--data", "demo", "--patch", "8", "--batch",
           "2", "--steps", "3", "--workers", "0", "--val-every", "1", "--val-images", "1",
           "--val-crop", "32", "--val-n", "1", "--device", "cpu", "--compile", "--out",
           str(out)]  # fmt: skip
    assert stopped_while_compiling(cmd, flag, validating=True) == 1


# A tiny --compile run of 3 steps, compiled by dynamo's "eager" backend (no g++ needed)
EAGER_RUN = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "2", "--data",
             "demo", "--patch", "8", "--batch", "2", "--steps", "3", "--workers", "0",
             "--device", "cpu", "--compile"]  # fmt: skip


def killed_compiler(gm, inputs):
    """A backend whose compiler process a signal to the group has ended (g++ under inductor)."""
    raise subprocess.CalledProcessError(-signal.SIGTERM, ["g++"])


# its error's lines, joined (the first ends in a colon; no_advice leaves dynamo's out)
KILLED = ("backend='killed_compiler' raised: CalledProcessError: Command '['g++']' died with "
          "<Signals.SIGTERM: 15>.")  # fmt: skip


def failing_in_step_2(monkeypatch, signalled: bool, compiles: bool):
    """sr_train whose second training step (after SIGTERM to the process if `signalled`)
    compiles a new graph whose compiler fails if `compiles`, else raises a RuntimeError of its
    own; the first step is real. Returns the steps that ran."""
    real, ran = sr_train.train_step, []

    def train_step(model, forward, optimizers, batches, step, *rest):
        ran.append(step)
        if step == 0:
            return real(model, forward, optimizers, batches, step, *rest)
        if signalled:
            os.kill(os.getpid(), signal.SIGTERM)
        if compiles:
            torch.compile(torch.sin, backend=killed_compiler)(torch.ones(2))
        raise RuntimeError("a bug of the step\nits second line")

    compile_eagerly(monkeypatch)
    monkeypatch.setattr(sr_train, "train_step", train_step)
    return ran


def compile_eagerly(monkeypatch):
    """sr_train --compile with dynamo's "eager" backend, whether g++ is there or not."""
    real = sr_train.compile_model
    monkeypatch.setattr(sr_train, "compile_blocker", lambda device: None)
    monkeypatch.setattr(sr_train, "compile_model", lambda m, f: real(m, f, backend="eager"))


def test_an_error_of_a_compilation_after_a_signal_is_the_stop_said_in_one_line(
    tmp_path, monkeypatch, capsys
):
    """A signal to the process group ends --compile's compiler, so the compilation under way
    fails (torch 2.14: InductorError from CppCompileError from CalledProcessError -15): the
    run stops as after a signal in the step. That error was swallowed without a word; now one
    warning line (and a log.jsonl record) names it, so that one which recurs after the resume
    is known to be a real error."""
    ran = failing_in_step_2(monkeypatch, signalled=True, compiles=True)
    out = tmp_path / "run"
    assert sr_train.main([*EAGER_RUN, "--val-every", "0", "--out", str(out)]) == 75
    assert ran == [0, 1] and load_checkpoint(out / "last.pt")["step"] == 1
    assert no_advice(capsys.readouterr().err).splitlines() == [
        f"sr_train.py: warning: step 2 raised BackendCompilerFailed ({KILLED}) after SIGTERM "
        "while compiling; taken as the stop's effect (the signal ends the compiler too): if it "
        "recurs after resuming, it is a real error"
    ]
    with open(out / "log.jsonl", encoding="utf-8") as f:
        last = json.loads(no_advice(f.read()).splitlines()[-1])
    assert last == {"step": 1, "signal": "SIGTERM", "error_in": "step 2",
                    "error": f"BackendCompilerFailed: {KILLED}"}  # fmt: skip


@pytest.mark.parametrize("signalled, compiles", [(True, False), (False, True), (False, False)])
def test_an_error_of_a_step_that_compiled_nothing_or_got_no_signal_is_an_error(
    tmp_path, monkeypatch, signalled, compiles
):
    """Any RuntimeError of a --compile step after a signal was taken as the signal's effect on
    the compiler, a step that compiled nothing too: a bug of the step ended the run as a stop
    (exit 75), silently. Only an error of a step that compiled is the stop's now."""
    ran = failing_in_step_2(monkeypatch, signalled, compiles)
    argv = [*EAGER_RUN, "--val-every", "0", "--out", str(tmp_path / "run")]
    what = "backend='killed_compiler' raised" if compiles else "a bug of the step"
    with pytest.raises(RuntimeError, match=what):
        sr_train.main(argv)
    assert ran == [0, 1]


def test_an_error_of_a_validation_that_compiled_nothing_after_a_signal_is_an_error(
    tmp_path, monkeypatch, capsys
):
    """The same in validation (a flow's compiles its blocks again): one that compiled and failed
    after the signal is the stop, said in one line; one that compiled nothing is an error."""
    compile_eagerly(monkeypatch)
    compiles = []

    def validate(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        if compiles:
            torch.compile(torch.cos, backend=killed_compiler)(torch.ones(2))
        raise RuntimeError("a bug of the validation")

    monkeypatch.setattr(sr_train, "validate", validate)
    argv = [*EAGER_RUN, "--val-every", "1", "--val-images", "1"]
    with pytest.raises(RuntimeError, match="a bug of the validation"):
        sr_train.main([*argv, "--out", str(tmp_path / "a")])
    capsys.readouterr()
    compiles.append(True)
    assert sr_train.main([*argv, "--out", str(tmp_path / "b")]) == 75
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 1
    assert no_advice(capsys.readouterr().err).splitlines() == [
        f"sr_train.py: warning: validation at step 1 raised BackendCompilerFailed ({KILLED}) "
        "after SIGTERM while compiling; taken as the stop's effect (the signal ends the compiler "
        "too): if it recurs after resuming, it is a real error"
    ]


# sr_train.py whose flow blocks run a compiler process as each compiles (the first step's)
COMPILING_BLOCKS = COMPILING.replace(
    "torch.compile(forward, backend=backend)", "real(model, forward, backend=backend)"
).replace("sr_train.compile_model =", "real = sr_train.compile_model\nsr_train.compile_model =")


def test_a_step_stopped_in_its_compilation_leaves_last_pt_as_before_the_step(
    tmp_path, monkeypatch, capsys
):
    """SRFlow draws its dequantisation noise eagerly, before its first compiled block: a signal
    during that block's compilation saved last.pt with the random generators after that draw,
    so a resumed run drew other noise for the step than an uninterrupted one. last.pt now holds
    the weights and the generators as before the step: those of a stop at the same step by the
    time budget (checked at the top of the loop, before the step). That reference compiles
    nothing and needs no process of its own: it runs here."""
    flags = ["--model", "srflow", "--nb", "2", "--nf", "8", "--gc", "4", "--rrdb-blocks", "0,1",
             "--flow-steps", "1", "--hidden-channels", "8", "--scale", "4", "--data", "demo",
             "--patch", "8", "--batch", "2", "--steps", "3", "--workers", "0", "--val-every",
             "0", "--seed", "5", "--device", "cpu", "--compile"]  # fmt: skip
    script = [sys.executable, "-c", COMPILING_BLOCKS, *flags]
    assert stopped_while_compiling([*script, "--out", str(tmp_path / "a")], tmp_path / "f") == 0
    compile_eagerly(monkeypatch)
    assert sr_train.main([*flags, "--time-budget", "1e-9", "--out", str(tmp_path / "b")]) == 0
    assert "time budget" in capsys.readouterr().out
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("a", "b"))
    assert a["step"] == b["step"] == 0
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    for k, v in b["rng"].items():
        assert torch.equal(a["rng"][k], v) if torch.is_tensor(v) else a["rng"][k] == v, k
