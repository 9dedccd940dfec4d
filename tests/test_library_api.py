"""srspace as a Python library (docs/design.md, "The model interface"): what a notebook passes to
every model's sample() and forward(), right or wrong."""

import os

import pytest
import torch
from conftest import TINY

from sr_lib.checkpoint import save_checkpoint
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models import build_model, load_model
from sr_lib.models.base import NoiseSource


def tiny(name: str):
    return build_model(name, {**TINY[name], "scale": 4}).eval()


def lr_image() -> torch.Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))


# What a notebook gets wrong: each is a one-line error naming the argument and what to pass.
WRONG_SAMPLE = {
    "uint8": (lambda lr: dict(lr=(lr * 255).to(torch.uint8)), TypeError, "lr: a torch.uint8"),
    "CHW": (lambda lr: dict(lr=lr[0]), ValueError, "lr[None]"),
    "HWC": (lambda lr: dict(lr=lr[0].permute(1, 2, 0)), ValueError, "permute(2, 0, 1)[None]"),
    "[0, 255]": (lambda lr: dict(lr=lr * 255), ValueError, "lr / 255"),
    "[-1, 1]": (lambda lr: dict(lr=2 * lr - 1), ValueError, "(lr + 1) / 2"),
    "NaN": (
        lambda lr: dict(lr=lr.index_fill(3, torch.tensor([0]), float("nan"))),
        ValueError,
        "NaN",
    ),  # fmt: skip
    "gray": (lambda lr: dict(lr=lr[:, :1]), ValueError, "lr.expand(-1, 3, -1, -1)"),
    "RGBA": (lambda lr: dict(lr=torch.cat([lr, lr[:, :1]], 1)), ValueError, "lr[:, :3]"),
    "numpy": (lambda lr: dict(lr=lr.numpy()), TypeError, "pass a torch tensor"),
    "n=0": (lambda lr: dict(lr=lr, n=0), ValueError, "n: 0"),
    "T<0": (lambda lr: dict(lr=lr, temperature=-1.0), ValueError, "temperature: -1.0"),
    "device": (lambda lr: dict(lr=lr.to("meta")), ValueError, "lr: on meta, the model on cpu"),
}


@pytest.mark.parametrize("case", WRONG_SAMPLE)
@pytest.mark.parametrize("name", TINY)
def test_a_wrong_input_to_sample_is_one_line_naming_it(name, case):
    model = tiny(name)
    args, error, hint = WRONG_SAMPLE[case]
    with pytest.raises(error) as e:
        model.sample(**args(lr_image()))
    assert hint in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).split(":")[0] in ("lr", "n", "temperature")


@pytest.mark.parametrize("name", TINY)
def test_float64_strided_and_channels_last_lr_sample_as_float32(name):
    """A float64 array from numpy is converted to the model's dtype; a view or another memory
    layout gives the same samples."""
    model, lr = tiny(name), lr_image()
    want = model.sample(lr, 2, 0.8, NoiseSource([1, 2]))
    strided = torch.rand(1, 3, 8, 16)
    strided[..., ::2] = lr
    for x in (lr.double(), strided[..., ::2], lr.contiguous(memory_format=torch.channels_last)):
        got = model.sample(x, 2, 0.8, NoiseSource([1, 2]))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["rrdb", "srflow_da"])
def test_an_lr_below_the_models_minimum_is_one_line(name):
    model = tiny(name)
    with pytest.raises(ValueError, match=r"^lr: 1x1 px; .* needs at least 2x2"):
        model.sample(torch.rand(1, 3, 1, 1))
    assert model.sample(torch.rand(1, 3, 2, 3)).shape == (1, 1, 3, 8, 12)


WRONG_FORWARD = {
    "uint8": (
        lambda lr, hr: ((lr * 255).byte(), (hr * 255).byte()),
        TypeError,
        "lr: a torch.uint8",
    ),
    "CHW": (lambda lr, hr: (lr[0], hr[0]), ValueError, "lr: shape (3, 8, 8)"),
    "gray": (lambda lr, hr: (lr[:, :1], hr[:, :1]), ValueError, "lr: shape (1, 1, 8, 8)"),
    "hr size": (lambda lr, hr: (lr, hr[..., :30, :30]), ValueError, "pass (1, 3, 32, 32)"),
    "device": (lambda lr, hr: (lr.to("meta"), hr), ValueError, "lr: on meta"),
}


@pytest.mark.parametrize("case", WRONG_FORWARD)
@pytest.mark.parametrize("name", TINY)
def test_a_wrong_input_to_forward_is_one_line_naming_it(name, case):
    model = tiny(name).train()
    lr = lr_image()
    hr = torch.rand(1, 3, 32, 32)
    args, error, hint = WRONG_FORWARD[case]
    with pytest.raises(error, match=r"^(lr|hr): ") as e:
        model(*args(lr, hr))
    assert hint in str(e.value)


@pytest.mark.parametrize("name", TINY)
def test_forward_converts_float64(name):
    lr, hr = lr_image(), torch.rand(1, 3, 32, 32)
    losses = []
    for x, y in ((lr, hr), (lr.double(), hr.double())):
        torch.manual_seed(3)  # the same weights and training noise
        losses.append(tiny(name).train()(x, y)["loss"])
    assert losses[1].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0])


@pytest.mark.parametrize("name", TINY)
def test_sample_in_train_mode_samples_as_eval_and_changes_nothing(name):
    """A notebook samples between training steps, the model left in train(): sampling used to
    update BatchNorm statistics (RefVAE, VarSR) and initialise a fresh flow's ActNorm from the
    LR (SRFlow, NCSR), changing the model."""
    model, lr = tiny(name), lr_image()
    want = model.sample(lr, 2, 0.8, NoiseSource([1, 2]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.enable_grad():
        got = model.sample(lr, 2, 0.8, NoiseSource([1, 2]))
    assert model.training and not got.requires_grad
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])] == []
    torch.testing.assert_close(got, want)


def write_checkpoint(path, name="edsr", **cfg):
    model = build_model("edsr", TINY["edsr"])
    payload = {"model": name, "model_cfg": {**TINY["edsr"], **cfg}, "step": 0}
    save_checkpoint(path, {**payload, "state_dict": model.state_dict()})
    return path


BAD_CHECKPOINTS = {
    "missing": (lambda d: d / "none.pt", "no such file"),
    "dangling": (lambda d: (d / "l.pt").symlink_to("gone.pt") or d / "l.pt", "gone.pt, which"),
    "loop": (lambda d: (d / "l.pt").symlink_to("l.pt") or d / "l.pt", "a loop of symbolic links"),
    "folder": (lambda d: d, "a folder, not a file; give a file, e.g. "),
    # sr_sample.py --ckpt <(ssh host cat last.pt): a pipe, not a file, was "does not exist"
    "pipe": (
        lambda d: os.mkfifo(d / "p.pt") or d / "p.pt",
        "a pipe, not a regular file; save what it gives",
    ),
    "not torch": (
        lambda d: (d / "x.pt").write_text("hello") and d / "x.pt",
        "not a torch file (it b",
    ),
    "newer model": (lambda d: write_checkpoint(d / "f.pt", "fancy"), "model 'fancy' this srspace"),
    "newer field": (lambda d: write_checkpoint(d / "k.pt", knob=1), "fields this srspace does no"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_load_model_of_a_bad_path_raises_one_line(tmp_path, case):
    """The library raises (CheckpointError, one line naming the path), never sys.exit."""
    path, hint = BAD_CHECKPOINTS[case]
    path = path(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(e.value).startswith(f"{path}: ") and hint in str(e.value)
    assert "\n" not in str(e.value)


def test_load_model_of_a_raw_state_dict_names_its_arguments_not_only_flags(tmp_path):
    """A released state_dict needs its model and scale: the message names load_model's
    arguments as well as sr_sample.py's flags; an unknown model= lists the models."""
    path = tmp_path / "raw.pth"
    torch.save(tiny("edsr").state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "--model and --scale" in str(e.value) and "model=..., scale=..." in str(e.value)
    with pytest.raises(UsageError, match=r"^model='esdr': unknown model; choose one of: bicubic"):
        load_model(path, model="esdr", scale=4)


@pytest.mark.parametrize("name, extra", [("vspsr", {}), ("varsr", {"adv_start": 0.0})])
def test_an_hr_below_the_critics_minimum_names_hr_not_only_patch(name, extra):
    """A notebook's forward on a small hr: the one line names its size and what to pass in
    Python, as well as sr_train.py's --patch."""
    model = build_model(name, {**TINY[name], "scale": 2, "lambda_per": 0.0, **extra}).train()
    model.on_step(0, 10)  # (VarSR's critic from its adv_start on: 0 here)
    lr, hr = torch.rand(1, 3, 2, 2), torch.rand(1, 3, 4, 4)
    with pytest.raises(UsageError) as e:
        model.discriminator_loss(lr, hr, model(lr, hr))
    assert "HR patches of at least" in str(e.value) and "not 4x4" in str(e.value)
    assert "--patch" in str(e.value) and "in Python, a larger hr" in str(e.value)


@pytest.mark.parametrize(
    "name, cfg, named",
    [
        ("edsr", {"n_feats": 0}, "--n-feats 0 (n_feats=0): must be an integer >= 1"),  # range
        ("edsr", {"loss": "l2"}, "--loss 'l2' (loss='l2'): choose one of l1, le"),  # choices
        ("srflow", {"flow_levels": 9}, "--flow-levels 9 (flow_levels=9): SRFlow x4 has at most"),
        ("srflow", {"rrdb_blocks": "a"}, "--rrdb-blocks a (rrdb_blocks='a'): give block numbers"),
        ("srflow", {"rrdb_blocks": "5"}, "need blocks in 0..1, of --nb 2 (nb=2)"),
        ("srflow_da", {"variant": "s", "flow_levels": 2}, "--variant s (variant='s') has"),
        ("ncsr", {"noise_steps": "1"}, "--noise-steps 1 (noise_steps='1'): need 3 whole"),
        ("refvae", {"width": 12}, "--width 12 (width=12): must be a multiple of 8"),
        ("refvae", {"ref_size": 7}, "--ref-size 7 (ref_size=7): the VGG19 encoder"),
        ("refvae", {"style_layers": ","}, "--style-layers ',' (style_layers=','): VGG19 ReLU"),
    ],
)
def test_a_bad_config_value_names_its_key_not_only_its_flag(name, cfg, named):
    """build_model's caller passed keys, not flags: each config check's one line names both."""
    with pytest.raises(UsageError) as e:
        build_model(name, {**TINY[name], "scale": 4, **cfg})
    assert named in str(e.value) and "\n" not in str(e.value)


def test_official_export_of_an_lu_flow_names_its_key():
    model = build_model("srflow", {**TINY["srflow"], "scale": 4, "lu": True})
    with pytest.raises(UsageError, match=r"^--lu \(lu=True\) models have no official key layout"):
        model.export_official_state_dict()
