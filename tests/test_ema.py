"""sr_train.py --ema: the moving average of the weights, its checkpoints, resume, validation and
loading (sr_lib.models.load_model, sr_sample.py --raw-weights). Two processes:
test_distributed.py."""

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

import sr_sample
import sr_train
from sr_lib.checkpoint import load_checkpoint
from sr_lib.ema import EMA
from sr_lib.models import build_model, load_model
from sr_lib.models.edsr import EDSR

TINY = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--gamma", "1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(3):
        img = np.kron(rng.random((12, 12, 3)), np.ones((8, 8, 1)))  # 96x96
        iio.imwrite(d / f"img {i}.png", (img * 255).astype(np.uint8))
    return d


def run(out, images, *extra):
    argv = ["--data", str(images), "--scale", "2", "--patch", "8", "--batch", "2",
            "--workers", "0", "--val-every", "0", "--log-every", "1", "--learning-rate", "1e-2",
            "--out", str(out), *extra]  # fmt: skip
    return sr_train.main(argv)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.register_buffer("stat", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("flag", torch.tensor(False))


def test_update_averages_parameters_and_float_buffers_and_copies_the_rest():
    net = Net()
    with torch.no_grad():
        net.conv.weight.zero_()
    ema = EMA(net, 0.75)  # starts as a copy of the weights
    values = []
    for t, applied in enumerate([True, torch.tensor(1.0), torch.tensor(0.0), False, True]):
        with torch.no_grad():
            net.conv.weight.fill_(float(t + 1))
            net.stat.fill_(10.0 * (t + 1))
            net.count.fill_(t + 5)
            net.flag.fill_(t % 2 == 0)
        ema.update(applied)  # a bool, or a device tensor as a non-finite guard gives it
        values.append((ema.module.conv.weight.flatten()[0].item(), ema.module.stat[0].item(),
                       int(ema.module.count)))  # fmt: skip
    # average <- average + 0.25 (weights - average), integers copied, when the step was applied
    assert values == [(0.25, 2.5, 5), (0.6875, 6.875, 6), (0.6875, 6.875, 6), (0.6875, 6.875, 6),
                      (1.765625, 17.65625, 9)]  # fmt: skip
    assert bool(ema.module.flag) is True and int(ema.updates) == 3
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert torch.equal(net.conv.weight, torch.full_like(net.conv.weight, 5.0))  # model untouched


def test_checkpoints_carry_the_average_and_resume_exactly(tmp_path, images):
    ema = ["--ema", "0.5"]
    assert run(tmp_path / "a", images, *TINY, *ema, "--steps", "4") == 0
    assert run(tmp_path / "b", images, *TINY, *ema, "--steps", "2") == 0
    assert run(tmp_path / "b", images, *TINY, *ema, "--steps", "4", "--resume", "auto") == 0
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert same(a["state_dict"], b["state_dict"])
    assert same(a["ema_state_dict"], b["ema_state_dict"])  # 2 + 2 steps == 4 steps, bit for bit
    assert a["ema_updates"] == b["ema_updates"] == 4 and a["ema_decay"] == 0.5
    assert not same(a["ema_state_dict"], a["state_dict"])

    # without --ema nothing is averaged or saved
    assert run(tmp_path / "plain", images, *TINY, "--steps", "2") == 0
    assert "ema_state_dict" not in load_checkpoint(tmp_path / "plain" / "last.pt")


def test_a_skipped_non_finite_step_is_not_averaged_in(tmp_path, images, monkeypatch):
    real, calls = EDSR.forward, []

    def forward(self, lr, hr):  # the loss of the 2nd training step is NaN
        out = real(self, lr, hr)
        calls.append(1)
        if len(calls) == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(EDSR, "forward", forward)
    assert run(tmp_path, images, *TINY, "--ema", "0.5", "--steps", "3") == 0
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["skipped"] == 1 and ck["ema_updates"] == 2


def test_validation_and_best_pt_use_the_average(tmp_path, images, monkeypatch):
    seen = []
    real = sr_train.validate

    def spy(net, *args):
        seen.append({k: v.clone() for k, v in net.state_dict().items()})
        return real(net, *args)

    monkeypatch.setattr(sr_train, "validate", spy)
    val = ["--val-data", str(images), "--val-every", "3", "--val-crop", "32", "--val-n", "1"]
    assert run(tmp_path, images, *TINY, "--ema", "0.5", "--steps", "3", *val) == 0
    last, best = (load_checkpoint(tmp_path / f) for f in ("last.pt", "best.pt"))
    assert len(seen) == 1 and same(seen[0], last["ema_state_dict"])
    assert not same(seen[0], last["state_dict"])
    assert best["step"] == 3 and same(best["ema_state_dict"], last["ema_state_dict"])
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_psnr" in r] == [3]


def test_loading_sampling_and_init_from_take_the_average_unless_raw(tmp_path, images, capsys):
    assert run(tmp_path / "run", images, *TINY, "--ema", "0.5", "--steps", "3") == 0
    path = tmp_path / "run" / "last.pt"
    ck = load_checkpoint(path)
    assert same(load_model(path)[0].state_dict(), ck["ema_state_dict"])
    assert same(load_model(path, raw_weights=True)[0].state_dict(), ck["state_dict"])

    pngs = {}
    for name, flag in (("avg", []), ("raw", ["--raw-weights"])):
        out = tmp_path / name
        argv = ["--ckpt", str(path), "--input", str(images), "--from-hr", "--n", "1",
                "--out", str(out), *flag]  # fmt: skip
        capsys.readouterr()
        assert sr_sample.main(argv) == 0
        said = "the weights as trained (--raw-weights)" if flag else "the moving average of the "
        assert capsys.readouterr().out.startswith(f"{path}: {said}")
        pngs[name] = iio.imread(out / "img 0.png")
    assert not np.array_equal(pngs["avg"], pngs["raw"])
    model = load_model(path)[0]
    lr = torch.from_numpy(iio.imread(tmp_path / "avg" / "lr" / "img 0.png")).permute(2, 0, 1)
    sr = model.sample(lr[None].float().div(255), 1)[0, 0].permute(1, 2, 0)
    assert np.array_equal((sr * 255).round().byte().numpy(), pngs["avg"])

    # --init-from starts from the averaged weights, and says so (it said nothing: which weights
    # a fine-tuning run started from was told by the docs alone); a resumed run does not use it
    capsys.readouterr()
    assert run(tmp_path / "ft", images, *TINY, "--steps", "0", "--init-from", str(path)) == 0
    assert same(load_checkpoint(tmp_path / "ft" / "last.pt")["state_dict"], ck["ema_state_dict"])
    said = f"--init-from {path}: its weight average (--ema 0.5) at step 3, a fresh optimizer"
    assert said in capsys.readouterr().out.splitlines()
    argv = ["--resume", "auto", "--steps", "1", "--init-from", str(path)]
    assert run(tmp_path / "ft", images, *TINY, *argv) == 0
    said = f"--init-from {path}: not used, the run goes on from its checkpoint"
    assert said in capsys.readouterr().out.splitlines()


def test_rrdb_init_takes_the_average_of_an_rrdb_run(tmp_path, images):
    rrdb = ["--model", "rrdb", "--nb", "2", "--nf", "8", "--gc", "4", "--scale", "4"]
    assert run(tmp_path / "rrdb", images, *rrdb, "--ema", "0.5", "--steps", "2") == 0
    path = tmp_path / "rrdb" / "last.pt"
    flow = build_model(
        "srflow",
        {
            "scale": 4,
            "nb": 2,
            "nf": 8,
            "gc": 4,
            "rrdb_blocks": "0,1",
            "flow_steps": 1,
            "hidden_channels": 8,
            "rrdb_init": str(path),
        },
    )
    flow.on_step(0, 10)  # loads the encoder
    average = load_checkpoint(path)["ema_state_dict"]
    assert same(flow.RRDB.state_dict(), {k[4:]: v for k, v in average.items()})


def test_resume_adds_continues_or_drops_the_average(tmp_path, images, capsys):
    """--ema on a resumed run without an average starts one; left out, the checkpoint's average
    goes on at its decay, exactly as with --ema given; --ema 0 drops it. Each change is said."""
    assert run(tmp_path / "a", images, *TINY, "--steps", "2") == 0
    before = load_checkpoint(tmp_path / "a" / "last.pt")["state_dict"]
    capsys.readouterr()
    assert (
        run(tmp_path / "a", images, *TINY, "--steps", "3", "--ema", "0.5", "--resume", "auto") == 0
    )
    assert "holds no weight average; it starts here" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    assert ck["ema_updates"] == 1  # started from the resumed weights, then one step
    for k, w in ck["state_dict"].items():
        assert torch.allclose(ck["ema_state_dict"][k], before[k] + 0.5 * (w - before[k]), 0, 1e-6)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert run(tmp_path / "a", images, *TINY, "--steps", "4", "--resume", "auto") == 0
    assert "--ema" not in capsys.readouterr().out
    assert (
        run(tmp_path / "b", images, *TINY, "--steps", "4", "--ema", "0.5", "--resume", "auto") == 0
    )
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in "ab")
    assert a["ema_updates"] == 2 and a["ema_decay"] == 0.5 and a["train_args"]["ema"] == 0.5
    assert same(a["ema_state_dict"], b["ema_state_dict"])
    capsys.readouterr()
    assert (
        run(tmp_path / "a", images, *TINY, "--steps", "5", "--ema", "0.9", "--resume", "auto") == 0
    )
    assert "goes on at this decay (was 0.5)" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "a" / "last.pt")["ema_decay"] == 0.9
    assert run(tmp_path / "a", images, *TINY, "--steps", "6", "--ema", "0", "--resume", "auto") == 0
    assert "(decay 0.9) is dropped" in capsys.readouterr().out
    assert "ema_state_dict" not in load_checkpoint(tmp_path / "a" / "last.pt")


def test_a_model_without_weights_keeps_an_empty_average(tmp_path):
    argv = ["--model", "bicubic", "--steps", "2", "--workers", "0", "--val-every", "0",
            "--ema", "0.9", "--out", str(tmp_path)]  # fmt: skip
    assert sr_train.main(argv) == 0
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["ema_updates"] == 2 and ck["ema_state_dict"].keys() == ck["state_dict"].keys()


@pytest.mark.parametrize("decay", ["1", "-0.5", "1.5"])
def test_bad_decay_is_a_usage_error(tmp_path, images, capsys, decay):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, images, *TINY, "--steps", "1", "--ema", decay)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--ema" in err


def test_the_average_shares_the_frozen_loss_networks():
    """VarSR's VGG19 (built at start by sr_train's file checks, before the average) and RefVAE's
    LPIPS are kept out of state_dict; the average used to deepcopy them, one more VGG19 (20M
    parameters at relu5_4) held for nothing."""
    from conftest import TINY as MODELS_TINY

    for name, cfg in [("varsr", {**MODELS_TINY["varsr"], "lambda_per": 1.0}),
                      ("refvae", {**MODELS_TINY["refvae"], "lambda_lpips": 1.0})]:  # fmt: skip
        model = build_model(name, {**cfg, "scale": 4})
        frozen = model.perceptual_loss() if name == "varsr" else model.lpips()
        ema = EMA(model, 0.9)
        copy = ema.module.perceptual_loss() if name == "varsr" else ema.module.lpips()
        assert copy is frozen, name
        assert same(ema.module.state_dict(), model.state_dict())  # the rest is a copy
        assert all(a is not b for a, b in zip(ema.module.parameters(), model.parameters()))
