"""Golden numbers: tiny flows with fixed, formula-made weights must keep computing the same NLL and
the same temperature-0 image.

The numbers below were produced once by the flows after they were checked against the released
code at full size (`tests/bench/check_official_parity.py`: every quantity within 1e-4 relative,
NLL within 1e-5 bits per pixel; docs/flows.md). Weights and images come from a sine formula, not
from a random generator, so they are the same on every machine and torch version. Every weight is
non-zero (the released initialisation zeroes the coupling outputs, which would hide the
conditioning), so a change to the conditioning, a coupling, a split or the squeeze order moves
these numbers.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sr_lib.models import build_model
from sr_lib.models.flow_layers import ActNorm, InvConv1x1, ZeroConv2d

TINY = dict(nb=2, nf=8, gc=4, rrdb_blocks="0,1", flow_steps=2, hidden_channels=8)


def formula(shape, k: int, amplitude: float) -> torch.Tensor:
    """amplitude · sin(0.7·i + 1.3·k) over the flattened tensor: deterministic, non-zero."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    return (amplitude * torch.sin(0.7 * i + 1.3 * k)).reshape(shape).float()


def golden_model(name: str, scale: int):
    """The tiny model with every parameter set by `formula`, in order, in eval mode."""
    model = build_model(name, {**TINY, "scale": scale})
    with torch.no_grad():
        for k, (mname, m) in enumerate(model.named_modules()):
            if isinstance(m, InvConv1x1):  # near-identity: invertible, not orthogonal
                c = m.weight.shape[0]
                m.weight.copy_(torch.eye(c) + formula(m.weight.shape, k, 0.3 / c**0.5))
            elif isinstance(m, ActNorm):
                m.bias.copy_(formula(m.bias.shape, k, 0.1))
                m.logs.copy_(formula(m.logs.shape, k + 1, 0.1))
                m.initialized = True
            elif isinstance(m, torch.nn.Conv2d):
                # Output convs of couplings and priors small (scales near sigmoid(2)), the
                # others with a gain near 0.5 (the RRDB trunk: 0.1, as its own init).
                gain = 0.1 if isinstance(m, ZeroConv2d) or mname.startswith("RRDB.RRDB") else 0.5
                m.weight.copy_(formula(m.weight.shape, k, gain / m.weight[0].numel() ** 0.5))
                if m.bias is not None:
                    m.bias.copy_(formula(m.bias.shape, k + 1, 0.02))
                if isinstance(m, ZeroConv2d):
                    m.logs.copy_(formula(m.logs.shape, k + 2, 0.05))
    return model.eval()


def golden_batch(scale: int, lr_size=(4, 6), dtype=torch.float32):
    """Two smooth, non-square HR images in [0.1, 0.9] and their box-filtered LR."""
    h, w = lr_size[0] * scale, lr_size[1] * scale
    y = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, 1, 1, w)
    c = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    b = torch.arange(2, dtype=torch.float64).view(2, 1, 1, 1)
    hr = (0.5 + 0.4 * torch.sin(0.31 * y + 0.17 * x + 1.1 * c + 0.5 * b)).to(dtype)
    return F.avg_pool2d(hr, scale), hr


# (model, scale): NLL of the two images (bits per HR pixel), sum of the temperature-0 image,
# and the RGB of pixel (3, 5) of the first one.
GOLDEN = {
    ("srflow", 4): ([7.481764, 7.484728], 15.83416, [-0.096129, 0.215851, 0.011871]),
    ("srflow", 8): ([7.481326, 7.480524], -162.85916, [0.200382, 0.220737, -0.231619]),
    ("srflow_da", 4): ([6.838478, 6.850034], 29.29643, [0.269202, -0.19329, 0.05468]),
    ("ncsr", 8): ([7.748941, 7.747218], 67.49827, [-0.04429, 0.300441, -0.174499]),
}
# Conditioning on the pre-activation maps instead gives, for srflow x4, NLL [7.482581, 7.485521]
# and sum 14.40051: the tolerances below tell the two apart.


@pytest.mark.parametrize("name, scale", sorted(GOLDEN))
def test_golden_nll_and_temperature_0_image(name, scale):
    nll_want, sum_want, pixel_want = GOLDEN[(name, scale)]
    model = golden_model(name, scale)
    lr, hr = golden_batch(scale)
    with torch.no_grad():
        nll = model.nll(lr, hr)
        x0 = model.generate(lr, 1, 0.0, None)[:, 0]
    assert nll.tolist() == pytest.approx(nll_want, abs=3e-5)
    assert x0.double().sum().item() == pytest.approx(sum_want, rel=1e-5)
    assert x0[0, :, 3, 5].tolist() == pytest.approx(pixel_want, abs=1e-5)
