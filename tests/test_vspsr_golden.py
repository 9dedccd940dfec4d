"""Golden numbers: a tiny VSpSR with fixed, formula-made weights and noise must keep computing what
the released code (zzhwfy/VSpSR) computes.

The numbers below were produced by the released code and by srspace, in float64, from these
weights and this noise (the two were bit-identical; the full-size check is
`tests/bench/check_vspsr_parity.py`, docs/vspsr.md "Verified against the released code"). The
tiny config is one the released code builds: it ties the branch widths to C (C/4 = 2 here). Weights,
images and noise come from a sine formula, not a random generator, so they are the same on every
machine and torch version. A released state_dict (its key layout, made here) loads through
`load_model` as `sr_sample.py --ckpt FILE --model vspsr --scale S` does.
"""

import math

import pytest
import torch
from test_flow_golden import golden_batch as flow_golden_batch

from sr_lib.errors import CheckpointError
from sr_lib.models import build_model, load_model
from sr_lib.models.vspsr import from_released_key

TINY = dict(n_basis=8, basis_channels=2, coef_channels=2, lambda_per=0.0, lambda_adv=0.1)


def formula(shape, k: int, amplitude: float) -> torch.Tensor:
    """amplitude · sin(0.7·i + 1.3·k) over the flattened tensor: deterministic, non-zero."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    return (amplitude * torch.sin(0.7 * i + 1.3 * k)).reshape(shape)


def golden_model(scale: int, **cfg):
    """The tiny model (float64) with every weight and BatchNorm statistic set by `formula`."""
    upsample = "bicubic" if scale == 8 else "bilinear"
    model = build_model("vspsr", {**TINY, "scale": scale, "upsample": upsample, **cfg}).double()
    with torch.no_grad():
        for k, (name, t) in enumerate(model.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue
            if t.dim() > 1:  # conv, deconv and linear weights: gain about 0.8
                t.copy_(formula(t.shape, k, 0.8 / t[0].numel() ** 0.5))
            elif name.endswith(("running_var", ".weight")):
                t.copy_(1 + formula(t.shape, k, 0.3))  # norm scales, running variances
            else:
                t.copy_(formula(t.shape, k, 0.1))  # biases, running means
    return model


def golden_batch(scale: int):
    """Two smooth, non-square LR images of 16×18 px (the released basis branch needs 16) and HR."""
    return flow_golden_batch(scale, (16, 18), torch.float64)


def eps_like(t: torch.Tensor) -> torch.Tensor:
    """The coefficient noise ε, (B·3, C, h, w) as the released sampler draws it."""
    return formula(t.shape, 5, 1.5).to(t)


class FormulaNoise:
    """srspace's noise interface handing out `eps_like`'s ε, one sample."""

    def field(self, c, h, w):
        return eps_like(torch.empty(2 * 3, c // 3, h, w, dtype=torch.float64)).reshape(2, c, h, w)


# scale -> (sum of the temperature-0 image, sum of the ε sample, its RGB at pixel (3, 5) of the
# first image, MSE, KL, adversarial G, total loss, D loss, sum of the D's running means after)
GOLDEN = {
    4: (
        -1907.463682,
        -1910.434607,
        [-0.1091975181, -0.05487869555, 0.04093010315],
        0.4290069506,
        3.721405882,
        0.06518429809,
        0.8076659686,
        0.3063303449,
        0.4770492044,
    ),
    8: (
        -4303.975407,
        -4304.594237,
        [0.04716128746, -0.02332515146, -0.07130521901],
        0.3774726648,
        3.587184237,
        0.07625913465,
        0.7438170019,
        0.2954989487,
        0.2852741311,
    ),
}


@pytest.mark.parametrize("scale", sorted(GOLDEN))
def test_golden_samples_and_losses_match_the_released_code(scale, monkeypatch):
    t0_sum, sample_sum, pixel, mse, kl, adv, total, d_loss, d_mean = GOLDEN[scale]
    model = golden_model(scale).eval()
    lr, hr = golden_batch(scale)
    with torch.no_grad():
        x0 = model.generate(lr, 1, 0.0, None)[:, 0]
        x1 = model.generate(lr, 1, 1.0, FormulaNoise())[:, 0]
    assert x0.sum().item() == pytest.approx(t0_sum, rel=1e-9)
    assert x1.sum().item() == pytest.approx(sample_sum, rel=1e-9)
    assert x1[0, :, 3, 5].tolist() == pytest.approx(pixel, rel=1e-9)

    # One training step's losses with the same ε (the forward draws it by torch.randn_like).
    monkeypatch.setattr(torch, "randn_like", eps_like)
    model.train()
    out = model(lr, hr)
    got = [out["mse"], out["kl"], out["adv"], out["loss"]]
    d_out = model.discriminator_loss(lr, hr, out)
    assert [v.item() for v in got] == pytest.approx([mse, kl, adv, total], rel=1e-9)
    assert d_out["loss"].item() == pytest.approx(d_loss, rel=1e-9)
    # Three training-mode calls (G's fake, then real, then fake) moved the BatchNorm statistics,
    # in the released criterion's order; the discriminator's eval-mode scores depend on them.
    running = sum(b.sum() for n, b in model.discriminator.named_buffers() if "running_mean" in n)
    assert running.item() == pytest.approx(d_mean, rel=1e-9)


def released_state_dict(model) -> dict[str, torch.Tensor]:
    """`model`'s generator weights under the released code's key names (its checkpoints' `model`
    entry), made by inverting `from_released_key` over the released layout's names."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("discriminator.")}
    n_up = len(model.basis.up)
    names = [f"vspm.upsamplebranch.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    names += [f"vspm.kernelbranch.{i}.{p}" for i in (0, 4, 8, 12, 18) for p in ("weight", "bias")]
    names += [f"vspm.kernelbranch.{20 + i}.{p}" for i in range(n_up) for p in ("weight", "bias")]
    names += [
        f"vspm.weightbranch.{i}.{p}" for i in range(13) if i % 3 != 2 for p in ("weight", "bias")
    ]
    names += [f"vspm.finalbranch.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    released = {n: ours[from_released_key(n)] for n in names}
    assert len(released) == len(ours)  # every weight has one released name
    return released


@pytest.mark.parametrize("scale", [4, 8])
def test_a_released_state_dict_loads_as_sr_sample_loads_it(scale, tmp_path):
    src = golden_model(scale, lambda_adv=0.0).float()
    path = tmp_path / f"checkpoint_x{scale}.pth"
    torch.save(released_state_dict(src), path)
    model, ck = load_model(path, model="vspsr", scale=scale)
    # Read off the file: atoms and widths; the interpolation of the released command (×8 bicubic)
    want = dict(n_basis=8, basis_channels=2, coef_channels=2, lambda_adv=0.0)
    assert {k: ck["model_cfg"][k] for k in want} == want
    assert model.cfg.upsample == ("bicubic" if scale == 8 else "bilinear")
    lr, _ = golden_batch(scale)
    with torch.no_grad():
        want_x = src.eval().generate(lr.float(), 1, 0.0, None)
        assert torch.equal(model.generate(lr.float(), 1, 0.0, None), want_x)


def test_a_released_file_of_another_layout_is_one_line(tmp_path):
    sd = released_state_dict(golden_model(4, lambda_adv=0.0))
    sd["vspm.weightbranch.12.weight"] = sd["vspm.weightbranch.12.weight"][:8]  # ω not variational
    path = tmp_path / "novar.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="novar.pth: .*without --variational_w"):
        load_model(path, model="vspsr", scale=4)
    del sd["vspm.finalbranch.4.bias"]
    sd["vspm.weightbranch.12.weight"] = torch.zeros(16, 16, 1, 1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="novar.pth: does not match the released vspsr x4"):
        load_model(path, model="vspsr", scale=4)
