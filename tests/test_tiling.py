"""Tiled sampling equals untiled sampling for every model, given the model's context (tile_halo):
the LR-only work is done on the whole image and cut per tile (`SRModel.prepare`), the noise fields
are drawn whole and cut, and each tile is computed with its receptive field around it. "Equal" is
up to rounding: to 1e-5 in float32, and to 1e-9 in float64 for the flows (which amplify float32
rounding to ~1e-4). Without context the same check fails, so it can see a seam."""

import pytest
import torch
from conftest import CASES

from sr_lib.models import build_model
from sr_lib.models.base import NoiseSource, Prepared, pad_to_multiple
from sr_lib.tiling import draw, prepare, spans, upscale

SCALES = {"srflow": 4, "srflow_da": 8, "ncsr": 4, "refvae": 2, "vspsr": 3}  # else 2
FLOWS = ("srflow", "srflow_da", "ncsr")


def scrambled(name: str, cfg: dict, scale: int):
    """A tiny model whose zero-initialised parameters (flows' zero convs, the VAEs' residual
    output convs, biases) are random: at init many outputs would not depend on the input at all."""
    model = build_model(name, {**cfg, "scale": scale}).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return model.double() if name in FLOWS else model


def samples(model, lr, tile, context, prepared):
    controls = {}
    if getattr(model, "z_dim", None):  # latent models: the latents of the whole image, as sr_sample
        noise = NoiseSource([5, 6], lr.device)
        with torch.no_grad():
            z = model.latents(pad_to_multiple(lr, model.lr_multiple), 2, 1.0, noise)
        controls = {"latent": z}
    return draw(model, lr, [5, 6], 0.9, tile, context, False, controls, prepared)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiles_equal_the_whole_image(case):
    name, cfg = CASES[case]
    model = scrambled(name, cfg, SCALES.get(name, 2))
    tol = 1e-9 if name in FLOWS else 1e-5
    torch.manual_seed(1)
    lr = torch.rand(1, 3, 37, 46, dtype=torch.float64 if name in FLOWS else None)  # odd sizes
    prepared = prepare(model, lr)
    whole = samples(model, lr, 0, 0, prepared)
    assert torch.isfinite(whole).all() and whole.std() > 0.01
    tiled = samples(model, lr, 16, model.tile_halo, prepared)
    assert (tiled - whole).abs().max() < tol, model.tile_halo
    cut = samples(model, lr, 16, 0, prepared)  # no context: the check can see a seam
    assert (cut - whole).abs().max() > 1e-4
    if model.has_uncertainty:
        x = pad_to_multiple(lr, model.lr_multiple)
        sigma = upscale(model, x, lambda part, p: model.uncertainty(part), 16, model.tile_halo)
        whole_sigma = model.uncertainty(x)
        assert (sigma - whole_sigma).abs().max() < tol
        seams = upscale(model, x, lambda part, p: model.uncertainty(part), 16, 0)
        assert (seams - whole_sigma).abs().max() > 1e-4  # (no context: the check can see one)


def test_spans_cover_every_pixel_once():
    assert spans(50, 16, 6) == [
        (0, 16, 0, 22),
        (16, 32, 10, 38),
        (32, 48, 26, 50),
        (48, 50, 42, 50),
    ]
    assert spans(12, 16, 6) == [(0, 12, 0, 12)]
    assert spans(12, 0, 6) == [(0, 12, 0, 12)]


def test_prepared_crop_cuts_every_resolution():
    maps = {"half": torch.arange(12.0).view(1, 1, 3, 4), "double": torch.zeros(1, 2, 12, 16)}
    p = Prepared((6, 8), maps, {"global": 1})
    part = p.crop((2, 4, 4, 4, 6, 8))
    assert part.maps["half"].tolist() == [[[[6.0, 7.0], [10.0, 11.0]]]]
    assert part.maps["double"].shape == (1, 2, 8, 8) and part.extra == {"global": 1}
    assert part.window == (2, 4, 4, 4, 6, 8) and part.memo is None
    with pytest.raises(ValueError):
        p.crop((1, 0, 4, 4, 6, 8))  # y0 = 1 is half a pixel at resolution 1/2
