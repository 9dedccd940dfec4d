"""Golden numbers: ESRGAN's released RRDBNet files load as `--model rrdb` and compute what the
released code (xinntao/ESRGAN) computes.

The numbers below were produced by the released `RRDBNet_arch.RRDBNet(3, 3, 8, 2, gc=4)` in
float64 from these formula-made weights, rounded to float32 as a saved file holds them (srspace's
output was bit-identical; the full-size check, nb = 23, is `tests/bench/check_esrgan_parity.py`).
The released files' key layouts are made here:
ESRGAN's new one (which SRFlow's RRDB_*.pth share), its old architecture
(RRDB_ESRGAN_x4_old_arch.pth) and BasicSR's RRDBNet names.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import sr_sample
import sr_train
from sr_lib.checkpoint import save_checkpoint
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models import build_model, load_model
from sr_lib.models.rrdb import RRDBNet

TINY = dict(nf=8, nb=2, gc=4)
# Sum of the output of lr_batch(), RGB of pixel (3, 5) of image 0 and (17, 20) of image 1.
GOLDEN_ESRGAN = (
    -155.00382826716302,
    [3.83822594435024, 4.332548947109341, 4.791478490461627],
    [-4.069043582910107, -4.914472185854255, -5.628221751900146],
)
GOLDEN_SRFLOW_SUM = -152.87574528630844  # the same weights with SRFlow's skip


def formula(shape, k: int, amplitude: float) -> torch.Tensor:
    """amplitude · sin(0.7·i + 1.3·k) over the flattened tensor: deterministic, non-zero."""
    i = torch.arange(math.prod(shape), dtype=torch.float64)
    return (amplitude * torch.sin(0.7 * i + 1.3 * k)).reshape(shape)


def released_state_dict() -> dict:
    """The tiny net's float32 weights under ESRGAN's new key names (its module order is ours)."""
    names = RRDBNet(4, **TINY).state_dict()
    return {
        name: formula(t.shape, k, 0.8 / t[0].numel() ** 0.5 if t.dim() > 1 else 0.1).float()
        for k, (name, t) in enumerate(names.items())
    }


def renamed(sd: dict, top: dict, trunk) -> dict:
    """`sd` (new layout) with its top-level modules renamed by `top` and each trunk key
    `RRDB_trunk.<rest>` by `trunk(rest)`. Written apart from srspace's own mapping, so that a
    fault in one does not hide in the other."""
    out = {}
    for k, v in sd.items():
        name, _, rest = k.partition(".")
        out[trunk(rest) if name == "RRDB_trunk" else f"{top[name]}.{rest}"] = v
    return out


def old_arch(sd: dict, nb: int = 2) -> dict:
    """ESRGAN's old architecture names: one Sequential (the trunk conv its trunk's entry nb),
    each trunk conv wrapped in a block (transer_RRDB_models.py's mapping read backwards)."""
    top = {"conv_first": "model.0", "trunk_conv": f"model.1.sub.{nb}", "upconv1": "model.3"}
    top |= {"upconv2": "model.6", "HRconv": "model.8", "conv_last": "model.10"}
    return renamed(sd, top, lambda rest: "model.1.sub.{}.0.{}".format(*rest.rsplit(".", 1)))


def basicsr(sd: dict) -> dict:
    """BasicSR's RRDBNet names (basicsr/archs/rrdbnet_arch.py: body.N.rdbJ.convK, conv_body,
    conv_up1/2, conv_hr)."""
    top = {"conv_first": "conv_first", "trunk_conv": "conv_body", "upconv1": "conv_up1"}
    top |= {"upconv2": "conv_up2", "HRconv": "conv_hr", "conv_last": "conv_last"}
    return renamed(sd, top, lambda rest: "body." + rest.replace(".RDB", ".rdb"))


def lr_batch() -> torch.Tensor:
    y = torch.arange(5, dtype=torch.float64).view(1, 1, 5, 1)
    x = torch.arange(7, dtype=torch.float64).view(1, 1, 1, 7)
    c = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    b = torch.arange(2, dtype=torch.float64).view(2, 1, 1, 1)
    return 0.5 + 0.4 * torch.sin(0.7 * y + 0.45 * x + 1.1 * c + 0.9 * b)


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model.double().net(lr_batch())


def write(tmp_path, sd, name="w.pth"):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


LAYOUTS = {
    "new": (lambda sd: sd, "esrgan"),
    "old_arch": (old_arch, None),
    "basicsr": (basicsr, None),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_released_layouts_compute_the_released_function(tmp_path, layout):
    rename, global_skip = LAYOUTS[layout]
    path = write(tmp_path, rename(released_state_dict()))
    model, ck = load_model(path, model="rrdb", scale=4, global_skip=global_skip)
    assert ck["model_cfg"] == {"scale": 4, **TINY, "global_skip": "esrgan"}
    out = output(model)
    total, pixel0, pixel1 = GOLDEN_ESRGAN
    assert out.sum().item() == pytest.approx(total, rel=1e-12)
    assert out[0, :, 3, 5].tolist() == pytest.approx(pixel0, rel=1e-12)
    assert out[1, :, 17, 20].tolist() == pytest.approx(pixel1, rel=1e-12)


def test_srflow_skip_stays_the_default_and_differs(tmp_path):
    path = write(tmp_path, released_state_dict())
    srflow, _ = load_model(path, model="rrdb", scale=4, global_skip="srflow")
    assert output(srflow).sum().item() == pytest.approx(GOLDEN_SRFLOW_SUM, rel=1e-12)
    # SRFlow's encoder and a config without `skip` (every checkpoint before it) keep SRFlow's skip
    assert RRDBNet(4).global_skip == "srflow"
    assert build_model("rrdb", {"scale": 4}).cfg.global_skip == "srflow"
    assert build_model("srflow", {"scale": 4, "nb": 1}).RRDB.global_skip == "srflow"


def run_sample(*argv) -> int:
    try:
        return sr_sample.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_ambiguous_layout_needs_skip_on_the_command_line(tmp_path, capsys):
    path = write(tmp_path, released_state_dict())
    lr = tmp_path / "lr"
    lr.mkdir()
    torch.manual_seed(0)

    Image.fromarray((torch.rand(6, 7, 3) * 255).byte().numpy()).save(lr / "a.png")
    argv = ["--ckpt", path, "--input", lr, "--out", tmp_path / "out", "--model", "rrdb"]
    argv += ["--scale", "4", "--n", "1", "--device", "cpu"]
    assert run_sample(*argv) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "--global-skip esrgan" in err
    assert run_sample(*argv, "--global-skip", "esrgan") == 0
    # the image of ESRGAN's skip, not SRFlow's
    img = torch.from_numpy(np.array(Image.open(tmp_path / "out" / "a.png"))).permute(2, 0, 1)
    x = torch.from_numpy(np.array(Image.open(lr / "a.png"))).permute(2, 0, 1)[None] / 255
    for global_skip, same in (("esrgan", True), ("srflow", False)):
        model, _ = load_model(path, model="rrdb", scale=4, global_skip=global_skip)
        want = (model.sample(x)[0, 0] * 255).round().byte()
        assert ((img.int() - want.int()).abs().max() <= 1) == same


def test_wrong_or_unknown_layouts_are_one_line(tmp_path):
    sd = released_state_dict()
    with pytest.raises(
        CheckpointError, match="whose global skip is esrgan, not --global-skip srflow"
    ):
        load_model(write(tmp_path, old_arch(sd)), model="rrdb", scale=4, global_skip="srflow")
    with pytest.raises(CheckpointError, match=r"holds a ×4 RRDBNet, not ×2"):
        load_model(write(tmp_path, basicsr(sd)), model="rrdb", scale=2)
    unshuffled = basicsr(sd) | {"conv_first.weight": torch.zeros(8, 12, 3, 3)}
    with pytest.raises(CheckpointError, match="takes 12 channels.*pixel-unshuffled"):
        load_model(write(tmp_path, unshuffled), model="rrdb", scale=4)
    partial = {k: v for k, v in old_arch(sd).items() if k != "model.8.weight"}
    with pytest.raises(CheckpointError, match="1 missing keys.*HRconv"):
        load_model(write(tmp_path, partial), model="rrdb", scale=4)
    with pytest.raises(UsageError, match="only for --model rrdb"):
        load_model(write(tmp_path, sd), model="edsr", scale=4, global_skip="esrgan")
    cfg = {"scale": 4, "n_blocks": 1, "n_feats": 8}  # an srspace checkpoint of another model
    net = build_model("edsr", cfg)
    save_checkpoint(tmp_path / "edsr.pt", {"model": "edsr", "model_cfg": cfg,
                                           "state_dict": net.state_dict(), "step": 0})  # fmt: skip
    with pytest.raises(CheckpointError, match="holds model 'edsr', not --global-skip esrgan"):
        load_model(tmp_path / "edsr.pt", global_skip="esrgan")


def test_train_with_esrgan_skip_and_its_checkpoint(tmp_path, monkeypatch):
    hr = tmp_path / "hr"
    hr.mkdir()

    torch.manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(hr / f"{i}.png")
    argv = ["--model", "rrdb", "--global-skip", "esrgan", "--nb", "1", "--nf", "8", "--gc", "4"]
    argv += ["--data", hr, "--scale", "4", "--patch", "4", "--batch", "2", "--steps", "1"]
    argv += ["--workers", "0", "--val-every", "0", "--out", tmp_path / "run", "--device", "cpu"]
    assert sr_train.main([str(a) for a in argv]) == 0
    model, ck = load_model(tmp_path / "run" / "last.pt")
    assert ck["model_cfg"]["global_skip"] == "esrgan" and model.net.global_skip == "esrgan"
    with pytest.raises(CheckpointError, match="holds an rrdb with the esrgan skip"):
        load_model(tmp_path / "run" / "last.pt", global_skip="srflow")
    # a flow's encoder (SRFlow's skip) is not pre-trained by it: --rrdb-init says so
    tiny = dict(nb=1, nf=8, gc=4, rrdb_blocks="0", flow_steps=2, hidden_channels=8)
    flow = build_model("srflow", tiny | {"rrdb_init": str(tmp_path / "run" / "last.pt")})
    with pytest.raises(CheckpointError, match="--rrdb-init .*--global-skip esrgan.*srflow skip"):
        flow.check_files(loaded=False)


@pytest.mark.parametrize("global_skip", ["esrgan", "srflow", None])
def test_init_from_a_released_file_takes_the_runs_global_skip(tmp_path, capsys, global_skip):
    """ESRGAN's new layout (SRFlow's RRDB_*.pth too) does not tell its skip: --init-from reads
    it off the run's --global-skip, and starts from the file's weights; with none typed, one
    line (the default would start an ESRGAN file with SRFlow's skip, without a word)."""
    hr = tmp_path / "hr"
    hr.mkdir()
    torch.manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(hr / f"{i}.png")
    sd = released_state_dict()
    path = write(tmp_path, sd)
    argv = ["--model", "rrdb", "--nb", "2", "--nf", "8", "--gc", "4", "--init-from", path]
    argv += ["--data", hr, "--scale", "4", "--patch", "4", "--batch", "2", "--steps", "1"]
    argv += ["--workers", "0", "--val-every", "0", "--out", tmp_path / "run", "--device", "cpu"]
    if global_skip is None:
        with pytest.raises(SystemExit) as stopped:
            sr_train.main([str(a) for a in argv])
        assert stopped.value.code == 6
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--init-from {path}: " in err
        assert "--global-skip esrgan or --global-skip srflow" in err
        assert not (tmp_path / "run" / "last.pt").exists()
        return
    assert sr_train.main([str(a) for a in [*argv, "--global-skip", global_skip]]) == 0
    model, ck = load_model(tmp_path / "run" / "last.pt")
    assert ck["model_cfg"]["global_skip"] == global_skip
    # one Adam step (2e-4) from the file's weights, not from a fresh initialisation
    assert torch.allclose(model.net.trunk_conv.weight, sd["trunk_conv.weight"], atol=1e-3)
