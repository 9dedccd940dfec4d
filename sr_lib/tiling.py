"""Tiled inference: a model applied to overlapping LR tiles, blended with feathered weights.

The LR is reflect-padded to the model's lr_multiple and cut into tiles whose sizes and positions
are multiples of it. In each overlap the outer quarter next to a tile's edge gets weight 0 (the
network's zero padding makes its output wrong there) and the middle half is a linear crossfade;
weights are normalised. Stochastic models draw each sample's noise once at whole-image size
(`NoiseSource.field`) and cut it per tile, so a tiled sample equals the untiled one.
"""

import torch

from sr_lib.cem import cem
from sr_lib.models.base import NoiseSource, pad_to_multiple


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile positions along one axis: stride tile - overlap, the last one flush with the end."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def feather(starts: list[int], i: int, length: int, s: int, device) -> torch.Tensor:
    """1-D weights of tile i (length LR px, s·length output px): towards each neighbour, 0 on the
    outer quarter of the overlap, a linear ramp across its middle half, 1 elsewhere."""
    d = torch.arange(length * s, device=device) + 0.5  # output pixel centres
    w = torch.ones_like(d)
    left = (starts[i - 1] + length - starts[i]) * s if i > 0 else 0
    right = (starts[i] + length - starts[i + 1]) * s if i + 1 < len(starts) else 0
    if left:
        w = w * ((d - left / 4) / (left / 2)).clamp(0, 1)
    if right:
        w = w * ((length * s - d - right / 4) / (right / 2)).clamp(0, 1)
    return w


def upscale(model, lr, fn, tile: int, overlap: int, noise=None) -> torch.Tensor:
    """fn(lr) -> (N, C, s·h, s·w) on the (1, 3, h, w) LR padded to lr_multiple, whole or in
    overlapping tiles blended with feathered weights; `noise` is windowed to each tile, replayed."""
    h, w, s, m = *lr.shape[-2:], model.scale, model.lr_multiple
    x = pad_to_multiple(lr, m)
    H, W = x.shape[-2:]
    if not tile:
        return fn(x)[..., : h * s, : w * s]
    tile = max(m, tile // m * m)
    overlap = min(-(-overlap // m) * m, tile - m)
    th, tw = min(tile, H), min(tile, W)
    ys, xs = tile_starts(H, th, overlap), tile_starts(W, tw, overlap)
    out = weight = None
    for a, y0 in enumerate(ys):
        for b, x0 in enumerate(xs):
            if noise is not None:
                noise.window = (y0, x0, th, tw, H, W)  # the whole-image field, cut to this tile
                noise.restart()
            sr = fn(x[..., y0 : y0 + th, x0 : x0 + tw])  # (N, C, s·th, s·tw)
            wgt = feather(ys, a, th, s, x.device)[:, None] * feather(xs, b, tw, s, x.device)
            if out is None:
                out = sr.new_zeros((*sr.shape[:2], H * s, W * s))
                weight = sr.new_zeros((H * s, W * s))
            out[..., y0 * s : (y0 + th) * s, x0 * s : (x0 + tw) * s] += sr * wgt
            weight[y0 * s : (y0 + th) * s, x0 * s : (x0 + tw) * s] += wgt
    return (out / weight.clamp_min(1e-12))[..., : h * s, : w * s]


def draw(model, lr, seeds, temperature, tile, overlap, consistent=False, controls=None):
    """(len(seeds), 3, sH, sW): the samples with these seeds of one (1, 3, h, w) LR, one
    model.sample call (per tile).

    consistent: apply the CEM to the whole (blended) sample, so its MATLAB-bicubic downscale equals
    the LR (exact projection, sr_lib/cem.py), then clamp to [0, 1] again. controls: sampling
    controls passed to model.sample (e.g. {"latent": z})."""
    noise = NoiseSource(seeds, lr.device)
    fn = lambda x: model.sample(x, len(seeds), temperature, noise, **(controls or {}))[0]  # noqa: E731
    sr = upscale(model, lr, fn, tile, overlap, noise)
    return cem(sr, lr, model.scale).clamp(0, 1) if consistent else sr
