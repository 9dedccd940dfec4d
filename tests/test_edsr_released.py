"""Released EDSR-PyTorch state_dicts (edsr_baseline_x2/x3/x4-*.pt, edsr_x2/x3/x4-*.pt) load through
load_model / sr_sample.py --model edsr --scale s and compute the released function on [0, 1]:
released(255·x) / 255. The released code is not used here: a file of its layout is made in the
test, and its arithmetic, on the [0, 255] scale, is re-done below with plain convolutions."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sr_sample
from sr_lib.errors import CheckpointError
from sr_lib.models import load_model

MEAN = torch.tensor([0.4488, 0.4371, 0.4040], dtype=torch.float64)  # the released DIV2K mean
STAGES = {2: [2], 3: [3], 4: [2, 2]}  # the released upsampler: one conv + shuffle per stage


def released_state_dict(scale, feats=8, blocks=2, seed=0, std=1.0) -> dict:
    """A state_dict with EDSR-PyTorch's keys and shapes (--rgb_range 255), random weights and
    biases of pixel size on the 255 scale, float32 as the released files."""
    g = torch.Generator().manual_seed(seed)

    def conv(name, cin, cout):
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (0.5 / (3 * cin**0.5))
        sd[f"{name}.bias"] = torch.randn(cout, generator=g)

    eye = torch.eye(3).view(3, 3, 1, 1)
    sd = {
        "sub_mean.weight": eye / std,
        "sub_mean.bias": (-255 * MEAN / std).float(),
        "add_mean.weight": eye / std,
        "add_mean.bias": (255 * MEAN / std).float(),
    }
    conv("head.0", 3, feats)
    for i in range(blocks):
        conv(f"body.{i}.body.0", feats, feats)
        conv(f"body.{i}.body.2", feats, feats)
    conv(f"body.{blocks}", feats, feats)
    for j, f in enumerate(STAGES[scale]):
        conv(f"tail.0.{2 * j}", feats, feats * f * f)
    conv("tail.1", feats, 3)
    return sd


def released_forward(sd, x255, res_scale, scale) -> torch.Tensor:
    """The released network on [0, 255], in float64, written out from its definition."""
    p = {k: v.double() for k, v in sd.items()}

    def conv(name, x, k=3):
        return F.conv2d(x, p[f"{name}.weight"], p[f"{name}.bias"], padding=k // 2)

    x = conv("head.0", conv("sub_mean", x255, k=1))
    res, i = x, 0
    while f"body.{i}.body.0.weight" in p:
        res = res + res_scale * conv(f"body.{i}.body.2", F.relu(conv(f"body.{i}.body.0", res)))
        i += 1
    res = conv(f"body.{i}", res) + x
    for j, f in enumerate(STAGES[scale]):
        res = F.pixel_shuffle(conv(f"tail.0.{2 * j}", res), f)
    return conv("add_mean", conv("tail.1", res), k=1)


@pytest.mark.parametrize(
    "scale, feats, blocks, res_scale",
    [(2, 8, 2, 1.0), (3, 8, 2, 1.0), (4, 8, 3, 1.0), (2, 256, 1, 0.1)],  # 256: the full EDSR's
)
def test_a_released_file_computes_the_released_function_on_0_1(
    tmp_path, scale, feats, blocks, res_scale
):
    sd = released_state_dict(scale, feats, blocks)
    path = tmp_path / f"edsr_x{scale}.pt"
    torch.save(sd, path)
    net, ck = load_model(path, model="edsr", scale=scale)
    assert (ck["model_cfg"]["n_blocks"], ck["model_cfg"]["n_feats"]) == (blocks, feats)
    assert ck["model_cfg"]["res_scale"] == res_scale  # not in the file: tied to the width
    x = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    want = released_forward(sd, 255 * x.double(), res_scale, scale) / 255
    with torch.no_grad():
        got = net.predict(x)[0].double()
    # float32 against float64: a few float32 ulps of outputs of order 1 (measured 2.4e-7 with
    # the released code itself, tests/bench/check_edsr_parity.py); not rescaling the biases is
    # off by their size, 0.1 to 1
    assert (got - want).abs().max() < 2e-6
    assert want.abs().max() > 0.1  # (not a test of zeros)


def test_sr_sample_runs_on_a_released_file(tmp_path):
    torch.save(released_state_dict(4), tmp_path / "edsr_baseline_x4.pt")
    lr = (np.random.default_rng(0).random((6, 8, 3)) * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "a.png", lr)
    code = sr_sample.main(
        ["--ckpt", str(tmp_path / "edsr_baseline_x4.pt"), "--model", "edsr", "--scale", "4",
         "--input", str(tmp_path / "a.png"), "--n", "1", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code in (0, None)
    (png,) = (tmp_path / "out").rglob("a*.png")
    assert iio.imread(png).shape == (24, 32, 3)


def upsample_renamed(sd):  # MDSR's layout: its upsamplers under `upsample.`, not `tail.0.`
    return {k.replace("tail.0.", "upsample.0."): v for k, v in sd.items()}


BAD = {
    "another scale": (lambda: released_state_dict(2), 4, "a released EDSR x2 (its upsampler), "
                      "not x4; pass --scale 2"),
    "another layout": (lambda: upsample_renamed(released_state_dict(4)), 4,
                       "not the released EDSR x4 (2 blocks, 8 features): 4 missing keys"),
    "another mean shift": (lambda: released_state_dict(4, std=0.5), 4,
                           "its mean shift (sub_mean/add_mean) is not EDSR-PyTorch's"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_other_layouts_are_refused_in_one_line_naming_the_file(tmp_path, case, capsys):
    make, scale, words = BAD[case]
    path = tmp_path / "weights.pt"
    torch.save(make(), path)
    with pytest.raises(CheckpointError, match=f"^{path}: ") as e:
        load_model(path, model="edsr", scale=scale)
    assert words in str(e.value) and "\n" not in str(e.value)
    iio.imwrite(tmp_path / "a.png", np.zeros((6, 6, 3), np.uint8))
    argv = ["--ckpt", str(path), "--model", "edsr", "--scale", str(scale),
            "--input", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]  # fmt: skip
    try:
        code = sr_sample.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 6 and len(err) == 1 and words in err[0], err
