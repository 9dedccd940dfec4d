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

import pytest
import torch

from sr_lib.models.refvae import Discriminator, Generator, RefVAEConfig


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
