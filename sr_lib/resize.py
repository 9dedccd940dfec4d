"""MATLAB-compatible bicubic `imresize` (Keys a = -0.5, antialiased when downscaling), bit-exact.

Follows the numpy port used by the NTIRE 2021 evaluation (docs/metrics.md): MATLAB
geometry, symmetric border mirroring, separable with the vertical pass first, and for uint8 input
the result of *each* 1-D pass clipped to [0, 255], rounded half-to-even and kept uint8. uint8 output
equals the port bit for bit, down to its float64 summation order over the taps.

Why it is fast: for integer factors (1/k, k) a pass is polyphase and shift-invariant, so it is a
symmetric pad plus a strided weighted sum over the taps (equal-weight taps added first). uint8
passes run in float32, then recompute exactly (float64, the port's order) only the values within
`eps` of a rounding boundary k + 1/2; every other value rounds the same either way. Other factors
take a gather path that follows the port's arithmetic directly. numpy arrays go through numpy in
cache-sized blocks on a few threads; tensors (any device, autograd for float) through torch.
"""

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from sr_lib.threads import thread_map

_BLOCK = 1 << 17  # output values per block of the numpy pass: its buffers stay in L2/L3


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (support |x| <= 2), in the port's float64 operation order."""
    ax = np.abs(np.asarray(x, dtype=np.float64))
    ax2 = ax * ax  # products rather than **, so the weights match the port to the last bit
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


_DEVICE_CACHES: list[dict] = []  # every `device_cache`'s store (`cached_tensors`)


def device_cache(maxsize: int):
    """Decorator: cache a function that builds device tensors from hashable arguments, the
    `maxsize` newest results kept. Not functools.lru_cache, for two readers of these tensors:
    - torch.compile reads a present entry as constants, where through an lru_cache it traces
      the function body (numpy and all: a graph break at every resize, e.g. VarSR's);
    - a CUDA graph (sr_train.py --cuda-graphs) reads them by address long after the call:
      `cached_tensors()` lists every one held, and the recording keeps them alive, so an
      eviction (validation at many image sizes) cannot free memory the graph still reads."""

    def wrap(build):
        store: dict = {}
        _DEVICE_CACHES.append(store)

        def get(*key):
            if key not in store:
                store[key] = _eagerly(build, key)
                if len(store) > maxsize:
                    del store[next(iter(store))]
            return store[key]

        get.__doc__, get.__name__ = build.__doc__, build.__name__
        return get

    return wrap


def _eagerly(build, key: tuple):
    """build(*key) outside any torch.compile graph (a miss while compiling: a graph break there,
    not numpy traced). Wrapped only while compiling: torch.compiler.disable imports dynamo (~1.3 s
    of CPU), which a script's first resize (sr_eval.py's LR-PSNR, sr_sample.py's bicubic) paid
    otherwise."""
    if torch.compiler.is_compiling():  # (tracing: dynamo is loaded)
        return torch.compiler.disable(build)(*key)
    return build(*key)


def cached_tensors() -> list[torch.Tensor]:
    """Every tensor that the `device_cache`s hold now."""
    out = []
    for store in _DEVICE_CACHES:
        for value in list(store.values()):
            items = value if isinstance(value, tuple) else (value,)
            out += [v for v in items if isinstance(v, torch.Tensor)]
    return out


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)  # cached and shared between callers
    return a


@lru_cache(maxsize=256)
def _taps(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Unmirrored 0-based tap positions (out_len, taps) and their float64 weights."""
    kernel_width = 4.0
    if scale < 1:  # antialiasing: stretch the kernel by 1/scale
        kernel_width = kernel_width / scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel j sits here in 1-based input coordinates
    left = np.floor(u - kernel_width / 2)
    pos = (left[:, None] + np.arange(math.ceil(kernel_width) + 2) - 1).astype(np.int64)
    dist = u[:, None] - pos - 1  # same two subtractions as the port (its indices are 0-based)
    weights = scale * cubic(scale * dist) if scale < 1 else cubic(dist)
    weights = weights / np.sum(weights, axis=1)[:, None]  # C-order row sum: numpy's pairwise order
    keep = np.any(weights, axis=0)  # drop all-zero tap columns, like the port
    return _frozen(pos[:, keep]), _frozen(weights[:, keep])


def _mirror(pos: np.ndarray, in_len: int) -> np.ndarray:
    """MATLAB 'symmetric' padding: ..., 1, 0 | 0, 1, ..., n-1 | n-1, n-2, ..."""
    period = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    return period[np.mod(pos, 2 * in_len)]


@lru_cache(maxsize=256)
def contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel: the 0-based (mirrored) input indices and float64 weights of its taps."""
    pos, weights = _taps(in_len, out_len, scale)
    return _frozen(_mirror(pos, in_len)), weights


def output_size(in_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return math.ceil(in_hw[0] * scale), math.ceil(in_hw[1] * scale)


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"imresize: scale must be positive, got {scale}")
    return scale


@dataclass(frozen=True)
class _Plan:
    """A shift-invariant pass: output `period * i + q` = sum_t w_qt * padded[stride * i + o_qt]."""

    pad: np.ndarray  # source index of every position of the mirrored, padded input
    lo: int  # where input index 0 sits in the padded input
    period: int
    stride: int
    phases: tuple  # per phase q: ((offsets o_qt sharing one weight, w_qt), ...)
    eps: float  # float32 values this close to a tie k + 1/2 are recomputed in float64


def _pair_taps(taps: list[tuple[int, float]]) -> tuple[tuple[tuple[int, ...], float], ...]:
    """Group taps of bitwise-equal weight in pairs (symmetric kernels): add once, multiply once."""
    groups, free = [], list(range(len(taps)))
    while free:
        a = free.pop(0)
        b = next((b for b in reversed(free) if taps[b][1] == taps[a][1]), None)
        if b is None:
            groups.append(((taps[a][0],), taps[a][1]))
        else:
            free.remove(b)
            groups.append(((taps[a][0], taps[b][0]), taps[a][1]))
    return tuple(groups)


@lru_cache(maxsize=256)
def _plan(in_len: int, out_len: int, scale: float) -> _Plan | None:
    """Polyphase form of a pass for integer factors, or None where the taps are not periodic."""
    period, stride = (1, round(1 / scale)) if scale < 1 else (round(scale), 1)
    if abs(period / stride - scale) > 1e-12 * scale or out_len % period:
        return None
    pos, weights = _taps(in_len, out_len, scale)
    rel = pos - stride * (np.arange(out_len) // period)[:, None]  # offset from the cycle start
    nz = weights != 0
    lo, hi = int(rel[nz].min()), int(rel[nz].max())
    dense = np.zeros((out_len, hi - lo + 1))  # row j: weight at each offset
    rows = np.broadcast_to(np.arange(out_len)[:, None], rel.shape)
    np.add.at(dense, (rows[nz], rel[nz] - lo), weights[nz])
    phases, abs_sum, dev = [], 0.0, 0.0
    for q in range(period):
        w_q = dense[q::period]
        ref = w_q[len(w_q) // 2]
        # Within a phase the float64 weights agree up to rounding noise of u (x3: j/3 is inexact);
        # the float32 pass tolerates that, the exact recomputation uses each row's own weights.
        if np.abs(w_q - ref).max() > 1e-9:
            return None
        abs_sum = max(abs_sum, np.abs(ref).sum())
        dev = max(dev, np.abs(w_q - ref).sum(axis=1).max())
        phases.append(_pair_taps([(lo + int(c), float(ref[c])) for c in np.flatnonzero(ref)]))
    first = min(lo, 0)
    last = max(in_len - 1, stride * (out_len // period - 1) + hi)
    pad = _mirror(np.arange(first, last + 1), in_len)
    # |float32 pass - exact|: each rounding (one per product, per add and per float32 weight) is
    # at most 2^-24 of 255 * sum|w|, plus the rows' deviation from the phase's weights. Twice that
    # also covers the float64 side's own rounding.
    eps = 2 * 255 * ((2 * pos.shape[1] + 1) * 2.0**-24 * abs_sum + dev)
    return _Plan(_frozen(pad), -first, period, stride, tuple(phases), eps)


@device_cache(maxsize=64)
def _tables(in_len: int, out_len: int, scale: float, device: torch.device):
    """(device copies of the exact taps: mirrored indices, float64 weights; the pad indices or
    None; the polyphase plan or None) of one axis."""
    ind, weights = contributions(in_len, out_len, scale)
    plan = _plan(in_len, out_len, scale)
    pad = None if plan is None else torch.tensor(plan.pad, device=device)
    return torch.tensor(ind, device=device), torch.tensor(weights, device=device), pad, plan


def _ordered_sum(term, start: int, n: int, pairwise: bool):
    """sum(term(t) for t in start..start+n-1) in the order numpy's np.sum adds the port's products.

    The port reduces a non-innermost axis (sequential adds) unless the trailing axes have size 1,
    i.e. a grey image's horizontal pass: then numpy's pairwise summation with 8 accumulators.
    """
    if not pairwise or n < 8:
        acc = term(start)
        for t in range(start + 1, start + n):
            acc = acc + term(t)
        return acc
    if n <= 128:  # numpy's PW_BLOCKSIZE
        r = [term(start + j) for j in range(8)]
        i = 8
        while i < n - n % 8:
            r = [r[j] + term(start + i + j) for j in range(8)]
            i += 8
        acc = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for t in range(start + i, start + n):
            acc = acc + term(t)
        return acc
    half = n // 2
    half -= half % 8
    return _ordered_sum(term, start, half, True) + _ordered_sum(term, start + half, n - half, True)


def _to_uint8(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v.clamp(0, 255)).to(torch.uint8)  # torch.round is half-to-even, as np.round


def _gather_pass(x, ind, weights, uint8: bool, pairwise: bool) -> torch.Tensor:
    """Exact pass for any factor: x (L, R) -> (out_len, R), the port's arithmetic tap by tap."""
    dtype = torch.float64 if uint8 else x.dtype
    w = weights.to(dtype)

    def term(t):
        return x.index_select(0, ind[:, t]).to(dtype) * w[:, t, None]  # (out_len, R)

    out = _ordered_sum(term, 0, ind.shape[1], pairwise)
    return _to_uint8(out) if uint8 else out


def _fast_pass(xp: torch.Tensor, plan: _Plan, out_len: int) -> torch.Tensor:
    """Strided weighted sum over the taps: padded xp (Lp, R) -> (out_len, R), in xp's dtype."""
    n = out_len // plan.period
    outs = []
    for groups in plan.phases:
        acc = None
        for offs, w in groups:
            for o in offs:
                s = plan.lo + o
                xs = xp[s : s + plan.stride * (n - 1) + 1 : plan.stride]  # (n, R) view
                acc = xs * w if acc is None else acc.add_(xs, alpha=w)
        outs.append(acc)
    if plan.period == 1:
        return outs[0]
    return torch.stack(outs, 1).view(out_len, -1)  # (n, period, R) -> (out_len, R)


def _fast_pass_uint8(xp, plan, out_len, ind, weights, pairwise: bool) -> torch.Tensor:
    """Fast float32 pass, then float64 recomputation of the values near a rounding boundary."""
    acc = _fast_pass(xp.float(), plan, out_len)
    out = torch.round(acc)
    near = (acc - out).abs_() > 0.5 - plan.eps
    out = out.clamp_(0, 255).to(torch.uint8)
    i, m = near.nonzero(as_tuple=True)
    if len(i):
        rows, w = ind[i] + plan.lo, weights[i]  # (n_near, taps)

        def term(t):
            return xp[rows[:, t], m].double() * w[:, t]

        out[i, m] = _to_uint8(_ordered_sum(term, 0, ind.shape[1], pairwise))
    return out


def _np_fast_pass(xp: np.ndarray, plan: _Plan, out_len: int):
    """Strided weighted sum over the taps, in blocks of output rows that stay in cache.

    xp (Lp, R) uint8 or float64 -> (out_len, R) of the same dtype. uint8 is summed in float32 and
    rounded block by block; also returns the (rows, cols) within `eps` of a tie, to recompute.
    """
    uint8 = xp.dtype == np.uint8
    dtype = np.float32 if uint8 else np.float64
    n, r = out_len // plan.period, xp.shape[1]
    out = np.empty((n, plan.period, r), xp.dtype)
    step = max(1, _BLOCK // r)

    def blocks(start: int, stop: int) -> list:  # rows [start, stop) of every phase
        acc, tmp = np.empty((step, r), dtype), np.empty((step, r), dtype)
        near = []
        for i0 in range(start, stop, step):
            b = min(step, stop - i0)
            a, t = acc[:b], tmp[:b]
            for q, groups in enumerate(plan.phases):
                for k, (offs, w) in enumerate(groups):
                    s = [plan.lo + o + plan.stride * i0 for o in offs]
                    xs = [xp[j : j + plan.stride * (b - 1) + 1 : plan.stride] for j in s]  # (b, R)
                    if len(xs) == 2:  # equal weights: add first (exact for uint8), multiply once
                        xs = [np.add(*xs, out=t, dtype=dtype)]
                    if k == 0:
                        np.multiply(xs[0], dtype(w), out=a, dtype=dtype)
                    else:
                        a += np.multiply(xs[0], dtype(w), out=t, dtype=dtype)
                if not uint8:
                    out[i0 : i0 + b, q] = a
                    continue
                np.rint(a, out=t)  # half to even, as np.round
                np.clip(t, 0, 255, out=out[i0 : i0 + b, q], casting="unsafe")
                far = np.abs(np.subtract(a, t, out=a), out=a)  # distance to the rounded value
                i, m = np.divmod(np.flatnonzero(far > 0.5 - plan.eps), r)  # 2-D nonzero: 10x slower
                near.append(((i0 + i) * plan.period + q, m))
        return near

    # Contiguous runs of blocks, a few per thread so a thread slowed by other load gets fewer.
    cuts = np.linspace(0, n, min(-(-n // step), 2 * _threads()) + 1).astype(int)
    near = _parallel(blocks, list(zip(cuts[:-1], cuts[1:])))
    return out.reshape(out_len, r), [x for part in near for x in part]


def _threads() -> int:
    return max(1, min(os.cpu_count() or 1, torch.get_num_threads()))  # 1 in DataLoader workers


def _parallel(fn, args: list) -> list:
    """[fn(*a) for a in args] on up to `_threads()` threads: numpy drops the GIL inside its loops.
    A pool per call costs ~0.1 ms and, unlike a module-level one, survives fork (DataLoader)."""
    if _threads() == 1 or len(args) < 2:
        return [fn(*a) for a in args]
    return thread_map(fn, args, min(_threads(), len(args)))


def _swap01(a: np.ndarray) -> np.ndarray:
    """Contiguous copy of `a` with axes 0 and 1 swapped. Each pixel (its trailing axes) moves as one
    opaque void item: numpy transposes those several times faster than a trailing axis of 3."""
    a = np.ascontiguousarray(a)
    pix = a.reshape(a.shape[0], a.shape[1], -1)  # (H, W, C)
    v = pix.view(np.dtype((np.void, pix.shape[2] * a.itemsize)))[..., 0]  # (H, W) of C values
    return np.ascontiguousarray(v.T).view(a.dtype).reshape(a.shape[1], a.shape[0], *a.shape[2:])


def _np_pass(x: np.ndarray, out_len: int, scale: float, pairwise: bool) -> np.ndarray:
    """One 1-D pass of a numpy array along axis 0: (L, ...) -> (out_len, ...)."""
    in_len, rest = x.shape[0], x.shape[1:]
    ind, weights = contributions(in_len, out_len, scale)
    plan = _plan(in_len, out_len, scale)
    if plan is None:
        xr = x.reshape(in_len, -1)
        out = _ordered_sum(lambda t: xr[ind[:, t]] * weights[:, t, None], 0, ind.shape[1], pairwise)
        if x.dtype == np.uint8:
            out = np.round(np.clip(out, 0, 255)).astype(np.uint8)
        return out.reshape(out_len, *rest)
    xp = np.take(x, plan.pad, axis=0).reshape(len(plan.pad), -1)  # (Lp, R), mirrored borders
    out, near = _np_fast_pass(xp, plan, out_len)
    if near:
        i = np.concatenate([i for i, _ in near])
        m = np.concatenate([m for _, m in near])
        flat = (ind[i].T + plan.lo) * xp.shape[1] + m  # (taps, n_near) into xp.ravel()
        terms = xp.ravel().take(flat) * weights[i].T  # float64, one contiguous row per tap
        exact = _ordered_sum(lambda t: terms[t], 0, ind.shape[1], pairwise)
        out[i, m] = np.round(np.clip(exact, 0, 255))
    return out.reshape(out_len, *rest)


def _resize_axis(x: torch.Tensor, axis: int, out_len: int, scale: float, pairwise: bool):
    in_len = x.shape[axis]
    xm = x.movedim(axis, 0)  # (L, *rest)
    rest = xm.shape[1:]
    uint8 = x.dtype == torch.uint8
    ind, weights, pad, plan = _tables(in_len, out_len, scale, x.device)
    if pad is None:
        out = _gather_pass(xm.reshape(in_len, -1), ind, weights, uint8, pairwise)
    else:
        xp = xm.index_select(0, pad).reshape(len(pad), -1)  # (Lp, R): one copy pads and transposes
        if uint8:
            out = _fast_pass_uint8(xp, plan, out_len, ind, weights, pairwise)
        else:
            out = _fast_pass(xp, plan, out_len)
    return out.view(out_len, *rest).movedim(0, axis)


def _resize(x: torch.Tensor, h_axis: int, w_axis: int, scale: float, channels: int):
    """Both passes, rows first; `channels` of the equivalent HWC image decides the sum order."""
    out_h, out_w = output_size((x.shape[h_axis], x.shape[w_axis]), scale)
    x = _resize_axis(x, h_axis, out_h, scale, pairwise=x.shape[w_axis] * channels == 1)
    return _resize_axis(x, w_axis, out_w, scale, pairwise=channels == 1)


def imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """Resize an HW or HWC numpy image by `scale` (e.g. 1/4 or 4).

    uint8 in -> uint8 out, bit-exact with the NTIRE21 port; any other dtype -> float64, unrounded.
    numpy rather than torch here: torch's OpenMP pool stalls ~10x when the machine is shared.
    """
    scale = _check_scale(scale)
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
    channels = img.shape[2] if img.ndim == 3 else 1
    out_h, out_w = output_size(img.shape[:2], scale)
    out = _np_pass(img, out_h, scale, pairwise=img.shape[1] * channels == 1)  # rows first
    return _swap01(_np_pass(_swap01(out), out_w, scale, pairwise=channels == 1))


@lru_cache(maxsize=64)
def _matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
    ind, w = contributions(in_len, out_len, scale)
    m = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(m, (np.arange(out_len)[:, None].repeat(ind.shape[1], 1), ind), w)
    return _frozen(m)


@device_cache(maxsize=64)
def _matrix_on(in_len: int, out_len: int, scale: float, device: torch.device, dtype: torch.dtype):
    return torch.tensor(_matrix(in_len, out_len, scale), device=device, dtype=dtype)


def resize_matrix(
    in_len: int, out_len: int, scale: float, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense (out_len, in_len) matrix of one 1-D pass, mirror taps folded in (cached, read-only)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return _matrix_on(in_len, out_len, float(scale), device, dtype)


def imresize_torch(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize the last two axes (H, W) of a (N, C, H, W) tensor on any device.

    Float input: differentiable, same dtype, no rounding. uint8 input: bit-exact with `imresize` on
    each image as an HWC array (per-pass clip, round half-to-even, uint8).
    """
    scale = _check_scale(scale)
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"imresize_torch: expected a float or uint8 tensor, got {x.dtype}")
    return _resize(x, x.dim() - 2, x.dim() - 1, scale, channels=x.shape[-3] if x.dim() > 2 else 1)
