"""Tiled inference: a model applied to LR tiles, each computed with a margin of context.

The LR is padded to the model's `lr_multiple` and cut into a grid of tiles (`--tile`, a multiple
of it). Each tile is computed on the tile grown by `context` LR px on every side (clipped at the
image's border), and only the tile itself is kept. What a model computes from the LR alone
(`SRModel.prepare`: an encoder, global statistics) is computed once on the whole image and cut to
each grown tile, and stochastic models draw each noise field once at whole-image size and cut it
(`NoiseSource.window`). So with a context of at least the model's `tile_halo` (its per-tile
receptive field) a tiled sample equals the untiled one; with less, errors are confined to a band
along the tile edges (docs/design.md, "Tiled sampling").
"""

import torch

from sr_lib.cem import cem
from sr_lib.models.base import NoiseSource, Prepared, pad_to_multiple

DEFAULT_CONTEXT = 32  # LR px, for a model that declares no tile_halo


def spans(size: int, tile: int, context: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: (tile start, tile end, grown start, grown end) of each tile."""
    if not tile or tile >= size:
        return [(0, size, 0, size)]
    return [(a, min(a + tile, size), max(0, a - context), min(size, a + tile + context))
            for a in range(0, size, tile)]  # fmt: skip


def grid(model, tile: int, context: int) -> tuple[int, int]:
    """Tile and context rounded to the model's lr_multiple (tile down, at least one multiple;
    context up), so every tile and margin holds whole pixels of every internal resolution."""
    m = model.lr_multiple
    return (max(m, tile // m * m) if tile else 0), -(-context // m) * m


def prepare(model, lr: torch.Tensor) -> Prepared | None:
    """The model's LR-only work on one whole (1, 3, h, w) LR, padded as `generate` sees it."""
    with torch.no_grad():
        return model.prepare(pad_to_multiple(lr, model.lr_multiple))


def upscale(model, x, fn, tile: int, context: int, noise=None, prepared=None) -> torch.Tensor:
    """fn(x_part, prepared_part) -> (..., C, s·h, s·w) on the padded LR x (1, 3, H, W), whole or
    tile by tile; returns (..., C, s·H, s·W). `noise` and `prepared` are cut to each grown tile."""
    H, W, s = *x.shape[-2:], model.scale
    tile, context = grid(model, tile, context)
    if not tile or (tile >= H and tile >= W):
        return fn(x, prepared)
    out = None
    for ya, yb, y0, y1 in spans(H, tile, context):
        for xa, xb, x0, x1 in spans(W, tile, context):
            window = (y0, x0, y1 - y0, x1 - x0, H, W)
            if noise is not None:
                noise.window = window  # the whole-image noise fields, cut to this tile
                noise.restart()
            part = None if prepared is None else prepared.crop(window)
            sr = fn(x[..., y0:y1, x0:x1], part)  # (..., C, s·(y1 - y0), s·(x1 - x0))
            if out is None:
                out = sr.new_empty((*sr.shape[:-2], H * s, W * s))
            keep = sr[..., (ya - y0) * s : (yb - y0) * s, (xa - x0) * s : (xb - x0) * s]
            out[..., ya * s : yb * s, xa * s : xb * s] = keep
    return out


def draw(model, lr, seeds, temperature, tile, context, consistent=False, controls=None,
         prepared=None) -> torch.Tensor:  # fmt: skip
    """(len(seeds), 3, sH, sW): the samples with these seeds of one (1, 3, h, w) LR, one
    model.generate call (per tile), then the model's `finish` on the whole image, as `sample`.

    consistent: apply the CEM to the whole sample, so its MATLAB-bicubic downscale equals the LR
    (exact projection, sr_lib/cem.py), then clamp to [0, 1] again. controls: sampling controls
    passed to generate (e.g. {"latent": z}). prepared: `prepare(model, lr)`, reused (computed
    here when not given)."""
    h, w, s = *lr.shape[-2:], model.scale
    x = pad_to_multiple(lr, model.lr_multiple)
    noise = NoiseSource(seeds, lr.device)
    prepared = prepare(model, lr) if prepared is None else prepared

    def fn(part, p):
        extra = {} if p is None else {"prepared": p}
        return model.generate(part, len(seeds), float(temperature), noise, **extra,
                              **(controls or {}))  # fmt: skip

    with torch.no_grad():
        sr = model.finish(upscale(model, x, fn, tile, context, noise, prepared), x)
        sr = sr[0, ..., : h * s, : w * s].clamp(0, 1)
        return cem(sr, lr, s).clamp(0, 1) if consistent else sr
