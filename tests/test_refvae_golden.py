"""Golden numbers: RefVAE's full-size generator and discriminator with fixed, formula-made weights
must keep computing what the released code (Holmes-Alan/RefVAE `VAE_v3`, `discriminator_v2`)
computes with the same weights.

The numbers below were produced by the released networks, loaded with these weights through the
key mapping of `tests/bench/check_refvae_parity.py` (which also checks, with random weights in
float64, that srspace agrees with them within 1e-9 relative; docs/vae.md "Verified against the
released code"). Weights and inputs come from a sine formula, not from a random generator, so
they are the same on every machine and torch version. The generator has no bicubic inside: one
set serves ×4 and ×8.
"""

import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sr_sample
import sr_train
from sr_lib.errors import UsageError
from sr_lib.models import build_model, load_model
from sr_lib.models.refvae import Discriminator, Generator, RefVAEConfig, released_key


def formula(shape, k: int, amplitude: float) -> torch.Tensor:
    """amplitude · sin(0.7·i + 1.3·k) over the flattened tensor: deterministic, non-zero."""
    i = torch.arange(math.prod(shape), dtype=torch.float64)
    return (amplitude * torch.sin(0.7 * i + 1.3 * k)).reshape(shape).float()


def golden_weights(shapes: dict) -> dict:
    """{srspace state_dict key: tensor} for {key: shape}: weights with a gain near 0.5 (fan-in
    scaled), small biases, BatchNorm statistics away from 0 and 1. k is the key's sorted rank, so
    any network with these keys gets the same values."""
    out = {}
    for k, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros(shape, dtype=torch.long)
        elif name.endswith("running_var"):
            out[name] = 1 + formula(shape, k, 0.5).abs()
        elif name.endswith(("running_mean", "bias")):
            out[name] = formula(shape, k, 0.05)
        elif len(shape) == 1:  # BatchNorm weight
            out[name] = 1 + formula(shape, k, 0.2)
        else:
            out[name] = formula(shape, k, 0.5 / math.prod(shape[1:]) ** 0.5)
    return out


def golden_inputs():
    """Reference features (1, 512, 8, 8), LR features (1, 512, 4, 4), z (1, 256), an image."""
    f_ref = formula((1, 512, 8, 8), 1, 1.0).relu()
    f_x = formula((1, 512, 4, 4), 2, 1.0).relu()
    z = formula((1, 256), 3, 1.0)
    img = 0.5 + formula((1, 3, 64, 64), 4, 0.4)
    return f_ref, f_x, z, img


def r41_inputs(scale: int):
    """An LR image (1, 3, 64/s, 96/s) and a 256² reference (the default --ref-size: no resize)."""
    lr = 0.5 + formula((1, 3, 64 // scale, 96 // scale), 5, 0.4)
    ref = 0.5 + formula((1, 3, 256, 256), 6, 0.4)
    return lr, ref


def sr_numbers(sr) -> dict:
    """Sum and three pixels of an SR image (1, 3, 64, 96)."""
    r = lambda x: round(float(x), 6)  # noqa: E731
    return {"sum": r(sr.double().sum()), "px": [r(v) for v in sr[0, :, 21, 50]]}


def golden_numbers(mu, logvar, res, logits) -> dict:
    r = lambda x: round(float(x), 6)  # noqa: E731
    return {
        "mu_sum": r(mu.double().sum()),
        "logvar_sum": r(logvar.double().sum()),
        "residual_sum": r(res.double().sum()),
        "residual_px": [r(v) for v in res[0, :, 3, 5]],
        "logits_sum": r(logits.double().sum()),
    }


# Produced by the released VAE_v3 / discriminator_v2 (see the docstring)
GOLDEN = {
    "mu_sum": -0.062852,
    "logvar_sum": 0.045607,
    "residual_sum": -129.924697,
    "residual_px": [-0.041789, -0.049573, -0.034132],
    "logits_sum": -16.07447,
}


def test_golden_generator_and_discriminator():
    gen, disc = Generator(RefVAEConfig(scale=8)), Discriminator(32)
    for net in (gen, disc):
        net.load_state_dict(golden_weights({k: v.shape for k, v in net.state_dict().items()}))
        net.eval()
    f_ref, f_x, z, img = golden_inputs()
    with torch.no_grad():
        mu, logvar = gen.encode(f_ref)
        res = gen.decode(*gen.modulation(f_x), z)
        logits, _ = disc(img)
    got = golden_numbers(mu, logvar, res, logits)
    assert got.pop("residual_px") == pytest.approx(GOLDEN["residual_px"], abs=1e-5)
    want = {k: v for k, v in GOLDEN.items() if k != "residual_px"}
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


# --encoder r41 and a released generator file. Produced by the released pipeline (test.py /
# eval_8x.py: torch bicubic, the r41 encoder, VAE_v3) with the formula weights above in VAE_v3 and
# in the r41 encoder, on `r41_inputs` (check_refvae_parity.py's `golden_r41`): SR at z = μ(R)
# and at z = formula((1, 256), 3, 1), clamped to [0, 1].
GOLDEN_R41 = {
    4: {"mu": {"sum": 8455.227254, "px": [0.079082, 0.290354, 0.78338]},
        "z": {"sum": 8455.223306, "px": [0.079082, 0.290354, 0.78338]}},
    8: {"mu": {"sum": 8446.866565, "px": [0.684962, 0.654039, 0.101826]},
        "z": {"sum": 8446.862989, "px": [0.684962, 0.654039, 0.101826]}},
}  # fmt: skip
TO_RELEASED = {"feat_enc.": "VAE_encoder.0.", "feat_dec.": "VAE_decoder.0.", "cond.": "dec_feat."}


def released_layout(gen_sd: dict) -> dict:
    """srspace generator weights under the released VAE_v3's key names, with its unused
    BatchNorm1d `bn.`, as the released ConVAE_4x.pth / ConVAE_8x.pth hold them."""
    out = {"bn.weight": torch.ones(256), "bn.running_var": torch.ones(256)}
    for k, v in gen_sd.items():
        head = next((a for a in TO_RELEASED if k.startswith(a)), "")
        k = TO_RELEASED.get(head, "") + k[len(head) :]
        out[k.replace(".body.0.", ".conv1.").replace(".body.2.", ".conv2.")] = v
    return out


@pytest.fixture
def released_files(tmp_path, monkeypatch):
    """A released generator file (formula weights) and vgg_r41.pth staged in $SRSPACE_WEIGHTS."""
    net = build_model("refvae", {"scale": 8, "encoder": "r41", "pretrained": False})
    gen = golden_weights({k: v.shape for k, v in net.gen.state_dict().items()})
    torch.save(released_layout(gen), tmp_path / "ConVAE.pth")
    enc = golden_weights({k: v.shape for k, v in net.encoder.state_dict().items()})
    (tmp_path / "w").mkdir()
    torch.save(enc, tmp_path / "w" / "vgg_r41.pth")
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "ConVAE.pth"


@pytest.mark.parametrize("scale", [4, 8])
def test_a_released_generator_file_samples_the_released_output(released_files, scale):
    net, ck = load_model(released_files, model="refvae", scale=scale)
    assert (ck["model_cfg"]["encoder"], ck["model_cfg"]["bicubic"]) == ("r41", "torch")
    lr, ref = r41_inputs(scale)
    got = {
        "mu": sr_numbers(net.sample(lr, temperature=0, ref=[ref[0]])[:, 0]),
        "z": sr_numbers(net.sample(lr, latent=formula((1, 256), 3, 1.0))[:, 0]),
    }
    for k, want in GOLDEN_R41[scale].items():
        assert got[k]["sum"] == pytest.approx(want["sum"], rel=1e-5), k
        assert got[k]["px"] == pytest.approx(want["px"], abs=1e-5), k


def test_a_released_file_without_the_r41_weights_says_how_to_get_them(
    released_files, tmp_path, capsys
):
    (tmp_path / "w" / "vgg_r41.pth").unlink()
    lr = tmp_path / "lr.png"
    iio.imwrite(lr, np.full((8, 12, 3), 128, np.uint8))
    argv = ["--ckpt", released_files, "--model", "refvae", "--scale", "8", "--input", lr]
    try:
        code = sr_sample.main([str(a) for a in [*argv, "--out", tmp_path / "o"]])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 6 and len(err) == 1, err
    assert err[0].startswith("sr_sample.py: error: weights 'vgg_r41' not found"), err
    assert "vgg_r41.pth" in err[0] and "Holmes-Alan/RefVAE" in err[0], err


def test_train_with_the_r41_encoder_init_from_a_released_file_and_sample(released_files, tmp_path):
    """`--encoder r41` trains (its weights from vgg_r41.pth, kept in the checkpoint, so sampling
    needs no weights file), and `--init-from` starts a run from a released generator file."""
    hr = tmp_path / "hr"
    hr.mkdir()
    for i in range(2):
        iio.imwrite(
            hr / f"{i}.png", np.random.default_rng(i).integers(0, 256, (40, 40, 3), np.uint8)
        )
    losses_off = ["--lambda-content", "0", "--lambda-style", "0", "--lambda-lpips", "0"]
    run = [
        "--model",
        "refvae",
        "--scale",
        "8",
        "--encoder",
        "r41",
        *losses_off,
        "--data",
        hr,
        "--patch",
        "2",
        "--batch",
        "2",
        "--workers",
        "0",
        "--val-every",
        "0",
        "--device",
        "cpu",
    ]
    tiny = ["--width", "16", "--cond-channels", "4", "--latent-grid", "2", "--z-dim", "8",
            "--mask-blocks", "1", "--ref-size", "16", "--d-channels", "4"]  # fmt: skip
    assert (
        sr_train.main([str(a) for a in [*run, *tiny, "--steps", 2, "--out", tmp_path / "a"]]) == 0
    )
    fine_tune = [*run, "--bicubic", "torch", "--init-from", released_files, "--steps", 1]
    assert sr_train.main([str(a) for a in [*fine_tune, "--out", tmp_path / "b"]]) == 0
    started, _ = load_model(tmp_path / "b" / "last.pt")
    released = torch.load(released_files, weights_only=True)
    ours = started.state_dict()
    mapped = {released_key(k): v for k, v in released.items() if not k.startswith("bn.")}
    assert mapped.keys() <= ours.keys()
    # one Adam step (learning rate 1e-4) from the file's weights, not from a fresh start (the
    # BatchNorm statistics moved by the step's batch aside)
    mapped = {k: v for k, v in mapped.items() if k.endswith(("weight", "bias"))}
    assert all(torch.allclose(ours[k], v, atol=1e-3) for k, v in mapped.items())
    (tmp_path / "w" / "vgg_r41.pth").unlink()  # the trained run's checkpoint holds the encoder
    sample = ["--ckpt", tmp_path / "a" / "last.pt", "--input", hr / "0.png", "--n", 2]
    assert sr_sample.main([str(a) for a in [*sample, "--out", tmp_path / "o"]]) == 0
    assert len(list((tmp_path / "o").glob("0_sample*.png"))) == 2


def test_inputs_too_small_for_the_r41_encoder_are_one_line():
    with pytest.raises(UsageError, match=r"--ref-size 8 .*reflection padding.*--ref-size 16"):
        build_model("refvae", {"scale": 8, "encoder": "r41", "ref_size": 8, "pretrained": False})
    net = build_model("refvae", {"scale": 8, "encoder": "r41", "pretrained": False, "width": 16,
                                 "cond_channels": 4, "latent_grid": 2, "z_dim": 8,
                                 "mask_blocks": 1, "ref_size": 16, "d_channels": 4})  # fmt: skip
    hr = torch.rand(2, 3, 8, 8)
    with pytest.raises(UsageError, match="the r41 encoder needs HR patches of at least 16 px"):
        net.train()(torch.rand(2, 3, 1, 1), hr)
    with pytest.raises(ValueError, match="2x2"):  # bicubic(LR) under 16 px at x8
        net.sample(torch.rand(1, 3, 1, 1), n=1)
