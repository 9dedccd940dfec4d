"""Mixed precision and compilation on CUDA. These need a GPU: CPU CI skips them (with the reason);
run `pytest tests/test_gpu.py` on a GPU machine to exercise them. bf16 on a CPU: test_train.py."""

import contextlib
import inspect
import json

import pytest
import torch
from test_distributed import free_port
from test_train_guard import (  # noqa: F401
    READ_CASES,
    flaky_models,
    images,
    pretend_imagenet,
    read_case,
    run,
    tiny,
)

import sr_train
from sr_lib import distributed
from sr_lib.checkpoint import load_checkpoint
from sr_lib.data import _as_float
from sr_lib.models import MODELS
from sr_lib.models.edsr import EDSR as EDSR_MODEL
from sr_lib.models.srflow import SRFlow as SRFLOW_MODEL

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: --amp and --compile run on CUDA"
)
EDSR = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "2"]
SRFLOW = ["--model", "srflow", "--nb", "2", "--nf", "8", "--gc", "4", "--rrdb-blocks", "0,1",
          "--flow-steps", "2", "--hidden-channels", "8", "--scale", "4"]  # fmt: skip
VARSR = ["--model", "varsr", *tiny("varsr"), "--lambda-per", "0", "--scale", "4"]


def train(tmp_path, model, *flags):
    argv = [*model, "--data", "demo", "--patch", "8", "--batch", "2", "--steps", "2",
            "--workers", "0", "--val-every", "0", "--out", str(tmp_path), *flags]  # fmt: skip
    return sr_train.main(argv)


def test_fp16_on_cpu_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train(tmp_path, EDSR, "--device", "cpu", "--amp", "fp16")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--amp fp16 needs a CUDA device" in err and "--amp bf16" in err


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """--amp fp16 training on the CPU: the loop of a GPU, with GradScaler("cpu") for CUDA's."""
    monkeypatch.setattr(sr_train, "FP16_DEVICES", ("cuda", "cpu"))


def test_fp16_with_nothing_to_learn(tmp_path, fp16_on_cpu):
    """bicubic scales no loss: no loss scaler (GradScaler.update() would refuse to run)."""
    argv = ["--model", "bicubic", "--scale", "2"]
    assert train(tmp_path, argv, "--amp", "fp16", "--device", "cpu") == 0
    assert "scaler" not in load_checkpoint(tmp_path / "last.pt")


def test_fp16_loss_scaling_trains_a_critic_and_resumes_exactly(tmp_path, fp16_on_cpu,
                                                              monkeypatch):  # fmt: skip
    """VarSR, 20 steps, its critic (WGAN-GP) on from step 10. The scaled gradients overflow now
    and then and the scaler lowers its scale; the gradient penalty, computed in float32, does
    not (in float16 it overflowed at any scale: 11 of 20 steps skipped, and a longer run
    stopped as non-finite). Stopped at step 11 and resumed, the run ends as one straight run,
    to the bit, with the scaler's saved state."""
    flags = ["--steps", "20", "--milestones", "--amp", "fp16", "--device", "cpu",
             "--log-every", "1", "--save-every", "100"]  # fmt: skip
    assert train(tmp_path / "a", VARSR, *flags) == 0
    stops, catch, step = [], sr_train.catch_signals, sr_train.train_step
    monkeypatch.setattr(sr_train, "catch_signals", lambda c: stops.append(catch(c)) or stops[-1])

    def step_then_stop(*args, **kwargs):
        if args[4] == 10:  # (model, forward, optimizers, batches, step, ...)
            stops[-1]["signal"] = "SIGUSR1"  # as the signal handler records it
        return step(*args, **kwargs)

    monkeypatch.setattr(sr_train, "train_step", step_then_stop)
    assert train(tmp_path / "b", VARSR, *flags) == 75
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 11
    monkeypatch.setattr(sr_train, "train_step", step)
    assert train(tmp_path / "b", VARSR, *flags, "--resume", "auto") == 0
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] <= 2.0**14  # lowered twice
    assert a["skipped"] == b["skipped"] == 2  # the two overflows
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(v.isfinite().all() for v in a["state_dict"].values() if v.is_floating_point())


class LoudEDSR(EDSR_MODEL):
    """EDSR with its loss times 2²⁶: float16 gradients that fit only below a scale of 2⁻⁵.
    RefVAE's losses, sums over its recipe's 16 patches of 256², give a gradient of 2·10⁵ at the
    start (random weights): it fits float16 only at a scale of 1/4 or less."""

    def forward(self, lr, hr):
        out = super().forward(lr, hr)
        return {**out, "loss": out["loss"] * 2.0**26}


def test_fp16_scale_search_is_not_a_streak_of_bad_steps(tmp_path, fp16_on_cpu, monkeypatch):
    """From 2¹⁶ down to where the gradients fit takes over 20 skipped steps: the run goes on
    (before, the 20th stopped it as non-finite); they are counted as skipped."""
    monkeypatch.setitem(MODELS, "loud_edsr", LoudEDSR)
    flags = ["--steps", "30", "--milestones", "--amp", "fp16", "--device", "cpu"]
    assert train(tmp_path, ["--model", "loud_edsr", *EDSR[2:]], *flags) == 0
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["skipped"] >= 21 and ck["scaler"]["scale"] <= 2.0**-5
    assert all(v.isfinite().all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_fp16_non_finite_losses_still_stop_the_run(tmp_path, fp16_on_cpu, capsys, flaky_models):  # noqa: F811
    """A NaN loss every step: the scaler halves its scale each time (2¹⁵ after step 0); once it
    is below 1 (step 16), the steps count: --max-bad-steps 3 stops the run at step 18."""
    flags = ["--steps", "40", "--milestones", "--amp", "fp16", "--device", "cpu",
             "--max-bad-steps", "3", "--nan-steps", ",".join(map(str, range(40)))]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        train(tmp_path, ["--model", "flaky_edsr", *EDSR[2:]], *flags)
    assert e.value.code == 5 and "step 18: 3 consecutive" in capsys.readouterr().err


def test_fp16_trains_a_flow_on_the_cpu(tmp_path, fp16_on_cpu, monkeypatch):
    """The CPU stand-in of test_amp_trains_with_finite_weights[fp16-srflow]: the same sr_train
    code (loss scaler, its state saved), SRFlow's float16 copy of the frozen encoder at step 0 and
    the float32 encoder trained at step 1, the flow's log-det and latents' density in float32.
    What it cannot stand in for: CUDA's autocast lists and kernels (the GPU test)."""
    seen = []
    encoder, terms = SRFLOW_MODEL.encoder, SRFLOW_MODEL.log_likelihood_terms

    def spy_encoder(self, lr):  # the encoder's weights' dtype
        net = encoder(self, lr)
        seen.append(("encoder", net.RRDB_trunk[0].RDB1.conv1.weight.dtype))
        return net

    def spy_terms(self, *args):  # (log|det J|, log N(latents))'s dtypes
        out = terms(self, *args)
        seen.append(("terms", *(t.dtype for t in out)))
        return out

    monkeypatch.setattr(SRFLOW_MODEL, "encoder", spy_encoder)
    monkeypatch.setattr(SRFLOW_MODEL, "log_likelihood_terms", spy_terms)
    assert train(tmp_path, SRFLOW, "--amp", "fp16", "--device", "cpu") == 0
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 2 and ck["scaler"]["scale"] <= 2.0**16  # the scaler ran and was saved
    assert all(v.isfinite().all() for v in ck["state_dict"].values() if v.is_floating_point())
    f16, f32 = torch.float16, torch.float32
    assert seen == [("encoder", f16), ("terms", f32, f32), ("encoder", f32), ("terms", f32, f32)]


@needs_cuda
def test_fp16_trains_a_critic_on_a_gpu(tmp_path):
    """CUDA autocast's float32 list is not the CPU's: 40 steps, the critic on from step 20."""
    flags = ["--steps", "40", "--milestones", "--amp", "fp16", "--device", "cuda"]
    assert train(tmp_path, VARSR, *flags) == 0
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["skipped"] <= 5, ck["skipped"]
    assert all(v.isfinite().all() for v in ck["state_dict"].values() if v.is_floating_point())


@needs_cuda
@pytest.mark.parametrize("model", [EDSR, SRFLOW], ids=["edsr", "srflow"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_with_finite_weights(tmp_path, model, amp):
    assert train(tmp_path, model, "--device", "cuda", "--amp", amp) == 0
    sd = load_checkpoint(tmp_path / "last.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


@needs_cuda
def test_an_nccl_group_met_in_a_helper_thread_works_in_the_main_thread(monkeypatch):
    """distributed.meet runs init_process_group, and the gloo group beside NCCL, in a helper
    thread (signals are heard while the ranks wait); the collectives then run in the main thread,
    where NCCL makes its communicator on the device set there. A world of one rank (one GPU)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    host = distributed.meet("nccl", 0, 1, 0)
    try:
        t = torch.full((4,), 2.0, device="cuda")
        torch.distributed.all_reduce(t)  # NCCL
        flag = torch.tensor([1])
        torch.distributed.all_reduce(flag, group=host)  # gloo, as `agree`
        assert torch.equal(t.cpu(), torch.full((4,), 2.0)) and flag.item() == 1
        assert torch.distributed.get_backend() == "nccl"
        assert torch.distributed.get_backend(host) == "gloo"
    finally:
        torch.distributed.destroy_process_group()


@needs_cuda
def test_batches_are_converted_on_the_gpu_to_the_cpus_values():
    """uint8 -> float32 / 255 on CUDA is an IEEE division as on the CPU (CUDA would multiply by
    the reciprocal of a Python-number divisor: one bit off for 126 of the 256 values)."""
    x = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    assert torch.equal(_as_float(x.cuda()).cpu(), _as_float(x))


@needs_cuda
def test_compile_trains_and_saves_uncompiled_keys(tmp_path):
    assert train(tmp_path, EDSR, "--device", "cuda", "--compile") == 0
    keys = load_checkpoint(tmp_path / "last.pt")["state_dict"]
    assert not any(k.startswith("_orig_mod.") for k in keys)


@needs_cuda
def test_batches_come_pinned_and_are_copied_without_blocking(tmp_path, monkeypatch):
    seen = {}
    real = sr_train.train_loader

    def spy(*args, **kwargs):
        loader = real(*args, **kwargs)
        seen.update(inspect.signature(real).bind(*args, **kwargs).arguments)
        seen["pinned"] = loader.pin_memory
        return loader

    monkeypatch.setattr(sr_train, "train_loader", spy)
    assert train(tmp_path, EDSR, "--device", "cuda") == 0
    assert seen["pin_memory"] and seen["pinned"] and seen["device"].type == "cuda"


@needs_cuda
@pytest.mark.parametrize("model", [EDSR, SRFLOW], ids=["edsr", "srflow"])
def test_cuda_graphs_record_and_train_as_eager(tmp_path, model, monkeypatch):
    """The real recording: 8 steps with the encoder unfreezing at step 4 (SRFlow: two
    recordings), validations at steps 4 and 8 between replays (a flow's cached 1×1 inverses
    must see the replayed weights), the same losses, scores and weights as the eager run up to
    cuDNN's rounding."""
    made = []
    real = sr_train.capture
    monkeypatch.setattr(
        sr_train, "capture", lambda body, device: made.append(1) or real(body, device)
    )
    flags = ["--device", "cuda", "--steps", "8", "--log-every", "1", "--deterministic",
             "--val-every", "4", "--val-n", "2"]  # fmt: skip
    assert train(tmp_path / "eager", model, *flags) == 0
    assert train(tmp_path / "graph", model, *flags, "--cuda-graphs") == 0
    assert len(made) == (2 if model is SRFLOW else 1)
    logs = {
        d: [json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
        for d in ("eager", "graph")
    }
    for key in ("loss", "val_psnr"):
        a, b = ([r[key] for r in logs[d] if key in r] for d in ("eager", "graph"))
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-3), key
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("eager", "graph"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def test_cudnn_times_its_algorithms_on_a_gpu_unless_deterministic(monkeypatch):
    """setup_process on a CUDA device (pretended: nothing else of CUDA is touched there)."""
    monkeypatch.setattr(sr_train, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    for deterministic, expected in ((False, True), (True, False)):
        with contextlib.ExitStack() as cleanup:
            args = sr_train.TrainArgs(model="edsr", deterministic=deterministic)
            sr_train.setup_process(args, cleanup)
            assert torch.backends.cudnn.benchmark is expected
            assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert not torch.backends.cudnn.benchmark  # the caller's again after main()
        assert not torch.are_deterministic_algorithms_enabled()


@needs_cuda
@pytest.mark.parametrize("case", READ_CASES)
def test_steady_steps_never_synchronise_on_a_gpu(
    tmp_path,
    images,  # noqa: F811
    monkeypatch,
    case,
    pretend_imagenet,  # noqa: F811
):
    """test_train_guard's host-read cases on CUDA, under CUDA's own detector of synchronising
    calls (a value read, a blocking copy, nonzero): it raises in steps 1, 5 and 6 of 8, those
    that neither log nor save nor start something (step 0 builds caches, optimizer states and
    cuDNN's choices; VarSR's critic starts at 2, SRFlow's encoder and the ℓE σ-only phase at 4;
    steps 3 and 7 end in a log or save)."""
    argv, scale = read_case(case, images, monkeypatch)
    real = sr_train.train_step

    def train_step(*args, **kwargs):
        step = inspect.signature(real).bind(*args, **kwargs).arguments["step"]
        torch.cuda.set_sync_debug_mode("error" if step in (1, 5, 6) else "default")
        return real(*args, **kwargs)

    monkeypatch.setattr(sr_train, "train_step", train_step)
    try:
        assert run(tmp_path, images, *argv, "--device", "cuda", scale=scale) == 0
    finally:
        torch.cuda.set_sync_debug_mode("default")
