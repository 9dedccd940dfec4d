"""Mixed precision and compilation on CUDA. These need a GPU: CPU CI skips them (with the reason);
run `pytest tests/test_gpu.py` on a GPU machine to exercise them. bf16 on a CPU: test_train.py."""

import inspect

import pytest
import torch

import sr_train
from sr_lib.checkpoint import load_checkpoint

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: --amp and --compile run on CUDA"
)
EDSR = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "2"]
SRFLOW = ["--model", "srflow", "--nb", "2", "--nf", "8", "--gc", "4", "--rrdb-blocks", "0,1",
          "--flow-steps", "2", "--hidden-channels", "8", "--scale", "4"]  # fmt: skip


def train(tmp_path, model, *flags):
    argv = [*model, "--data", "demo", "--patch", "8", "--batch", "2", "--steps", "2",
            "--workers", "0", "--val-every", "0", "--out", str(tmp_path), *flags]  # fmt: skip
    return sr_train.main(argv)


def test_fp16_on_cpu_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train(tmp_path, EDSR, "--device", "cpu", "--amp", "fp16")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--amp fp16 needs a CUDA device" in err and "--amp bf16" in err


@needs_cuda
@pytest.mark.parametrize("model", [EDSR, SRFLOW], ids=["edsr", "srflow"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_with_finite_weights(tmp_path, model, amp):
    assert train(tmp_path, model, "--device", "cuda", "--amp", amp) == 0
    sd = load_checkpoint(tmp_path / "last.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


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
