"""Evaluation metrics on what gets scored: uint8 (H, W, 3) RGB arrays as read from the saved PNGs.

The four NTIRE 2021 "Learning the SR Space" columns follow the official `measure.py` exactly, as
docs/metrics.md describes them (its sections are cited below by their headings):

- `LPIPS_mean`: LPIPS v0.1 (AlexNet trunk + learned linear heads), spatial map upsampled to the
  full crop, mean over the map, mean over the N samples (docs/metrics.md "LPIPS");
- `LRPSNR_worst` / `LRPSNR_mean`: PSNR between the uint8 `imresize(·, 1/scale)` of the SR and of
  the ground truth, both cropped top-left to a multiple of 8 ("Inputs and crops", "LR-PSNR"); +inf
  when identical;
- `score`: diversity, (G - L) / G * 100 with G = min over samples of the map means and L = mean of
  the per-pixel minimum over the N maps ("Diversity score"); the dataset value is a mean of
  per-image ratios.

Extra columns (never mixed up with the official ones, "Official and extra columns"): `PSNR_mean`,
`PSNR_best`, `SSIM_mean` (optionally on the MATLAB Y channel, with a border shave) and
`LRPSNR_vs_input_mean` (against the LR input file instead of the re-downscaled ground truth);
with a blur (sr_eval.py --lr-blur) `LRPSNR_blur_worst` / `LRPSNR_blur_mean`, LR-PSNR with the
Gaussian blur + bicubic downscale that made a degraded LR ("LR-PSNR of a degraded LR"), which
LRPSNR_vs_input_mean then takes too; and `LPIPS_pairwise`, the mean LPIPS between the samples
of one image, the lpips package's default non-spatial call, from the features of the samples'
LPIPS passes ("Pairwise LPIPS").

Where a function departs from the naive version (and why) its docstring says so.
"""

import contextlib
import copy
import ctypes
import functools
import importlib.metadata
import itertools
import math
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sr_lib.data import degrade
from sr_lib.errors import DataError
from sr_lib.lpips_net import alex_tap_values, heads_file, load_alexnet_trunk, lpips_module
from sr_lib.resize import imresize
from sr_lib.weights import load_strict, read_state_dict, sha256_file

OFFICIAL_COLUMNS = ("LPIPS_mean", "LRPSNR_worst", "LRPSNR_mean", "score")
# the mean LPIPS between the N samples of an image (`evaluate_image(pairwise=True)`) and its
# (N, N) matrix, which the --out JSON carries in the image's row
PAIRWISE_COLUMN, PAIRWISE_MATRIX = "LPIPS_pairwise", "LPIPS_pairwise_matrix"
EXTRA_COLUMNS = ("PSNR_mean", "PSNR_best", "SSIM_mean")
LR_INPUT_COLUMN = "LRPSNR_vs_input_mean"
# LR-PSNR's worst and mean with the downscale of a degraded LR (`evaluate_image`'s blur)
BLUR_COLUMNS = ("LRPSNR_blur_worst", "LRPSNR_blur_mean")
# The official GT crop is to a multiple of 8 for every scale, ×4 included (docs/metrics.md,
# "Inputs and crops").
NTIRE_MOD = 8
LPIPS_MIN_SIZE = 32  # smaller crops vanish inside AlexNet's pooling layers
ARRAY = np.ndarray


# ----------------------------------------------------------------------------- crops and PSNR


def shave_border(img: ARRAY, k: int) -> ARRAY:
    """Remove `k` pixels from every border (k = 0: unchanged)."""
    return img[k : img.shape[0] - k, k : img.shape[1] - k] if k > 0 else img


def psnr(a: ARRAY, b: ARRAY, peak: float | None = None) -> float:
    """PSNR in dB of two same-shape images with values in [0, peak]: numpy arrays or torch
    tensors; `peak` may be left out for uint8 (255) only. A float image may be on [0, 1] (a
    model's `sample()`) or [0, 255]: a default of 255 read [0, 1] images 48 dB too high, silently.

    As skimage's `peak_signal_noise_ratio` used by the reference (docs/metrics.md, "LR-PSNR"): the
    MSE is over all values in float64; identical inputs give +inf (the reference's numpy division
    gives the same).
    """
    a, b = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            for x in (a, b))  # fmt: skip
    if peak is None:
        if a.dtype != np.uint8 or b.dtype != np.uint8:
            raise ValueError(
                f"psnr: {a.dtype} and {b.dtype} images need peak= (1.0 for values "
                "in [0, 1], 255.0 for [0, 255]); uint8 alone has a default (255)"
            )
        peak = 255.0
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    a, b = (a[None], b[None]) if a.ndim == 0 else (a, b)
    sq = np.empty(a.shape, dtype=np.float64)  # the squared differences, a band at a time
    for rows in bands(a.shape[0], a[0].size):
        d = a[rows].astype(np.float64)
        d -= b[rows]
        np.square(d, out=sq[rows])
    mse = np.mean(sq, dtype=np.float64)  # (the mean of the whole array: numpy's summation order)
    return math.inf if mse == 0 else float(10 * np.log10(peak**2 / mse))


BAND_VALUES = 1 << 20  # values per band of the per-pixel passes (8 MB per float64 temporary)


def bands(rows: int, per_row: int, margin: int = 0) -> list[slice]:
    """Slices of `rows` rows of `per_row` values each, about `BAND_VALUES` values per slice
    (with `margin` rows more for a filter's overlap), so that float64 temporaries of a
    per-pixel computation take megabytes, not as many copies of a large image in gigabytes.
    Each value is computed as in one pass over the whole image: bands change no number."""
    step = max(1, BAND_VALUES // max(1, per_row) - margin)
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def downscale(img: ARRAY, scale: int) -> ARRAY:
    """uint8 (H, W, 3) -> uint8 `imresize(img, 1/scale)`: MATLAB bicubic, uint8 per pass.

    Not `F.interpolate` nor a float pipeline: those differ by up to ~18 dB in LR-PSNR
    (docs/metrics.md).
    """
    return imresize(img, 1 / scale)


def lr_psnr(sr: ARRAY, lr_ref: ARRAY, scale: int) -> float:
    """PSNR between `downscale(sr, scale)` and the uint8 LR reference `lr_ref`.

    For the official LR-PSNR, `sr` is the SR cropped to the mod-8 GT crop and `lr_ref` is
    `downscale(gt_crop8, scale)`, computed once per image (the reference recomputes it per
    sample; the value is identical, docs/metrics.md "LR-PSNR").
    """
    return psnr(downscale(sr, scale), lr_ref)


def rgb2y(img: ARRAY) -> ARRAY:
    """MATLAB `rgb2ycbcr` luma of uint8 RGB (H, W, 3), as float64 (H, W) in [16, 235].

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with R, G, B in 0..255. Unlike MATLAB's
    uint8 path, Y is not rounded to uint8 (the BasicSR `test_y_channel` convention).
    """
    y = np.empty(img.shape[:2], dtype=np.float64)
    for rows in bands(img.shape[0], img[0].size):  # (float64 temporaries of a band, not the image)
        x = img[rows].astype(np.float64)
        y[rows] = 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0
    return y


# ----------------------------------------------------------------------------- SSIM


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> ARRAY:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


_WINDOW = _gaussian_window()
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def _filter_valid(x: ARRAY) -> ARRAY:
    """Correlate (C, H, W) float64 with the separable 11×11 Gaussian; valid region (C, H-10, W-10).

    Channels-first and contiguous: scipy filters contiguous lines ~2x faster than HWC strides.
    """
    # scipy (a dependency of scikit-image, which requirements.txt lists) here, not at import:
    # its ~0.2 s would be paid by every start of sr_train.py, which computes no SSIM
    from scipy import ndimage

    r = _WINDOW.size // 2
    y = ndimage.correlate1d(x, _WINDOW, axis=1, mode="constant")[:, r:-r]
    return ndimage.correlate1d(y, _WINDOW, axis=2, mode="constant")[:, :, r:-r]


def _chw64(img: ARRAY) -> ARRAY:
    x = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float64)


class SsimReference:
    """SSIM against one fixed reference image; its local statistics are computed once.

    By bands of rows (`bands`, 10 rows of overlap for the 11x11 window): what stays between
    calls is two float64 maps of the valid region (the reference's local mean and variance term)
    and a call adds a third (the SSIM map, whose mean is taken whole), where computing each map
    of the whole image at once took ~13 float64 copies of it (2.9 GB for one 3072x3072 RGB
    sample). Each value is computed by the same operations on the same inputs, so the result is
    the same to the bit."""

    def __init__(self, ref: ARRAY):
        if min(ref.shape[:2]) < _WINDOW.size:
            raise ValueError(f"ssim: image {ref.shape[:2]} is smaller than the 11×11 window")
        self.shape = ref.shape
        self.ref = ref  # (as given: read a band at a time)
        channels = 1 if ref.ndim == 2 else ref.shape[2]
        r = _WINDOW.size - 1
        self.valid = (channels, ref.shape[0] - r, ref.shape[1] - r)
        self.mu = np.empty(self.valid)  # the reference's local mean
        self.den2 = np.empty(self.valid)  # its variance + C2
        for rows, band in self._bands(ref):
            y = _chw64(band)
            mu = _filter_valid(y)
            self.mu[:, rows] = mu
            self.den2[:, rows] = _filter_valid(y**2) - mu**2 + _C2

    def _bands(self, img: ARRAY):
        """(rows of the valid region, the rows of `img` they are computed from), in order."""
        r = _WINDOW.size - 1
        for rows in bands(self.valid[1], img[0].size, r):
            yield rows, img[rows.start : rows.stop + r]

    def __call__(self, img: ARRAY) -> float:
        if img.shape != self.shape:
            raise ValueError(f"ssim: shapes differ {img.shape} vs {self.shape}")
        ssim_map = np.empty(self.valid)
        for (rows, band), (_, ref) in zip(self._bands(img), self._bands(self.ref)):
            x, y, mu_y = _chw64(band), _chw64(ref), self.mu[:, rows]
            mu = _filter_valid(x)
            musq = mu**2
            cov2 = _filter_valid(x * y)  # 2 * cov + C2, in place
            cov2 -= mu * mu_y
            cov2 *= 2
            cov2 += _C2
            num = mu * (2 * mu_y)  # (2 mu_x mu_y + C1) * (2 cov + C2)
            num += _C1
            num *= cov2
            var = _filter_valid(x * x)  # (mu_x^2 + mu_y^2 + C1) * (var_x + var_y + C2)
            var -= musq
            var += self.den2[:, rows]
            musq += mu_y**2 + _C1
            var *= musq
            np.divide(num, var, out=ssim_map[:, rows])
        return float(np.mean(ssim_map))  # mean over pixels and channels == mean of channel SSIMs


def ssim(a: ARRAY, b: ARRAY) -> float:
    """SSIM of Wang et al. (2004) between (H, W) or (H, W, C) arrays with values in [0, 255].

    Gaussian 11×11 window with sigma 1.5, K1 = 0.01, K2 = 0.03, peak L = 255, population
    (not sample) statistics, mean over the *valid* region (no padding), computed per channel
    and averaged over channels for RGB. This equals MATLAB `ssim_index.m` and skimage's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255)`. Not part of the NTIRE 2021 protocol (no SSIM there; docs/metrics.md).
    """
    return SsimReference(b)(a)


# ----------------------------------------------------------------------------- diversity score


def diversity_score(maps: ARRAY | torch.Tensor) -> float:
    """NTIRE 2021 diversity score of one image from its N full-resolution LPIPS maps (N, H, W).

    global best G = min over samples of the map mean; local best L = mean over pixels of the
    per-pixel minimum over samples; score = (G - L) / G * 100 (docs/metrics.md, "Diversity score").
    The minimum is per pixel of the summed, upsampled map: not per patch, not per layer, not pooled
    (docs/metrics.md, "Where a naive version differs").
    G = 0 (a sample identical to the ground truth) gives NaN, as the reference's 0/0.
    """
    acc = DiversityAccumulator()
    acc.update(torch.as_tensor(np.asarray(maps)) if isinstance(maps, np.ndarray) else maps)
    return acc.score


class DiversityAccumulator:
    """Streams LPIPS maps of one image: the per-sample means and a running per-pixel minimum.

    Equivalent to stacking the N maps as the reference does (the minimum is exact in any order),
    without holding all N full-resolution maps in memory. The values stay on the maps' device
    until a property is read: on a GPU the host waits once per image, not once per sample.
    """

    def __init__(self):
        self._means: dict[int, torch.Tensor] = {}  # sample index -> its map's mean
        self.min_map: torch.Tensor | None = None

    def update(self, maps: torch.Tensor, samples: Sequence[Sequence[int]] | None = None) -> None:
        """Add a (B, H, W) float32 batch of maps, by default those of the next B samples in order.

        `samples[k]`: the indices of the samples that map k is the map of (equal samples share
        one); the means are read in sample order whatever order the maps come in.
        """
        if samples is None:
            samples = [[len(self._means) + k] for k in range(len(maps))]
        for m, indices in zip(maps, samples):
            mean = m.mean()  # float32 mean of each map, as the reference
            self._means.update({i: mean for i in indices})
        if self.min_map is None:
            self.min_map = maps.amin(dim=0)
        else:
            torch.minimum(
                self.min_map, maps.amin(dim=0) if len(maps) > 1 else maps[0], out=self.min_map
            )

    @property
    def means(self) -> list[float]:
        return torch.stack([self._means[i] for i in sorted(self._means)]).tolist()

    @property
    def lpips_mean(self) -> float:
        return float(np.mean(self.means))

    @property
    def global_best(self) -> float:
        return min(self.means)

    @property
    def local_best(self) -> float:
        return float(self.min_map.mean())

    @property
    def score(self) -> float:
        g, l = self.global_best, self.local_best
        return math.nan if g == 0 else (g - l) / g * 100


def dataset_mean(values: Sequence[float | None]) -> float | None:
    """Mean over images of one column, as pandas `DataFrame.mean()` in the reference.

    NaN/None entries are skipped (pandas `skipna`); one +inf makes the mean +inf. None if no
    value is left.
    """
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


# ----------------------------------------------------------------------------- LPIPS


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS; False elsewhere.

    glibc serves blocks above 32 MB (AlexNet's relu1 output of a 2040x1352 image is 44 MB) with
    mmap, unmaps them when freed and trims the top of its heap, so the memory of every LPIPS pass
    is faulted in afresh: ~160k zeroed pages per image of 10 samples (0.3 s of system time with
    one thread). Without mmap (M_MMAP_MAX = 0) and without trimming, freed blocks are reused; the
    process keeps its peak memory until it exits. Process-wide: for a process that evaluates.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


class LpipsMetric:
    """LPIPS v0.1 AlexNet spatial maps, batched, with the ground-truth features computed once.

    Equal to calling `lpips.LPIPS(net="alex", spatial=True)` as `loss(SR, GT)` per sample:
    the forward math is re-implemented from lpips' structure (scaling layer, the 5 ReLU taps of
    the trunk, channel unit-normalisation with eps 1e-10, squared difference, 1×1 linear heads,
    bilinear upsampling with align_corners=False of each layer map to H×W, sum in layer order) so
    that the GT half runs once per image and samples go through in batches of `batch`.

    Exactness: with batch 1 (the CPU default) the convolutions see the same shapes as in the
    module and run its kernels (`_layers`), and the maps come out equal to it on CPU. Batches
    > 1 (and the channels-last layout, deliberately not used) change the convolution kernels and
    thus the float32 rounding; the squared difference of nearly equal normalised features
    amplifies that, to ~1e-6 relative for samples very close to the GT (7e-8 measured on real
    images). On CPU, batching brings no speed, so it is only worth it on a GPU. On CUDA, TF32
    is off while it computes (it changes the values; docs/metrics.md "LPIPS"), and as it was
    afterwards.
    """

    def __init__(self, net, device: str | torch.device = "cpu", batch: int = 1, info=None):
        """`net`: an `lpips_module()` with weights loaded; `info`: what they are, for reports."""
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.batch = max(1, int(batch))
        self.info = info or {}
        self.slices = [getattr(self.net.net, f"slice{s}") for s in range(1, 6)]
        values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, 3)
        # (3, 256): scaling_layer(to_lpips_range(v)) per channel, computed on the CPU for every
        # device: CUDA divides by a number as a multiplication by its reciprocal, which would
        # change some of the trunk's input values
        scaling = copy.deepcopy(self.net.scaling_layer).cpu()
        with torch.no_grad():
            self._lut_np = scaling(to_lpips_range(values))[0, :, 0].numpy()
        self._lut = torch.from_numpy(self._lut_np).to(self.device)
        self._scratch: dict[str, torch.Tensor] = {}
        self._onednn: dict[tuple, list[bool]] = {}  # (input shape, oneDNN on) -> its plan

    @classmethod
    def load(
        cls,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch: int = 1,
        offline: bool | None = None,
        read: tuple[dict[str, torch.Tensor], str] | None = None,
    ) -> "LpipsMetric":
        """Build the official model offline.

        weights=None: the trunk is the torchvision ImageNet AlexNet resolved through the weights
        manifest (`sr_lib.weights.resolve("alexnet")`, CheckpointError with a staging hint if
        missing), the heads come from the lpips package. weights=FILE: a complete
        `lpips.LPIPS(net="alex")` state_dict (trunk + heads), loaded strictly; `read`: its
        (state_dict, sha256) where the caller has read it already (`read_state_dict`), so that
        the file is read once.
        """
        if weights is not None:
            sd, sha256 = read or read_state_dict(weights)
            import lpips  # noqa: F401  (its first import fails on the meta device: sr_lib/models/vgg.py)

            with torch.device("meta"):  # every tensor comes from the file: skip the random init
                net = lpips_module()  # (of AlexNet's classifier too, 0.3 s)
            net = net.to_empty(device="cpu")
            load_strict(net, sd, f"{weights} is not an lpips.LPIPS(net='alex') state_dict")
            info = {"weights": str(weights), "sha256": sha256}
        else:
            net = lpips_module()
            path = load_alexnet_trunk(net, offline)
            info = {
                "backbone": str(path),
                "backbone_sha256": sha256_file(path),
                "heads": f"v0.1 alex.pth shipped with the lpips package "
                f"{importlib.metadata.version('lpips')}",
                "heads_sha256": sha256_file(heads_file()),
            }
        return cls(net, device, batch, {"net": "alex", "version": "0.1", **info})

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 scratch tensor kept from sample to sample (its contents are overwritten).

        A sample's trunk input, taps and their squares are ~150 MB at 2040x1352: allocating them
        anew per sample costs memory traffic and, on CPU, page faults. Not thread-safe.
        """
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape:
            buf = self._scratch[name] = torch.empty(shape, device=self.device)
        return buf

    def _trunk_input(self, imgs: ARRAY, reuse: bool = False) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> the scaling layer's output, float32 contiguous (B, 3, H, W).

        A uint8 channel value has 256 possible results, so they are tabulated once with the very
        float32 ops of the module (`to_lpips_range`, then the scaling layer) and looked up: bit-
        identical values in one pass instead of five over the image. Contiguous NCHW like the
        module's input: channels-last changes the rounding and is not faster on a CPU (a whole pass:
        docs/benchmarks.md, "bench_eval.py: where the time goes").
        `reuse`: on CPU the result is a scratch buffer. On CUDA the upload is from pinned memory,
        so the host does not wait for the GPU.
        """
        if not isinstance(imgs, np.ndarray) or imgs.dtype != np.uint8 or imgs.ndim != 4:
            raise ValueError(f"LpipsMetric expects uint8 (B, H, W, 3) arrays, got {imgs!r:.60}")
        if imgs.shape[-1] != 3:
            raise ValueError(f"LpipsMetric expects uint8 (B, H, W, 3), got shape {imgs.shape}")
        if self.device.type == "cpu":
            shape = (imgs.shape[0], 3, *imgs.shape[1:3])
            out = self._buffer("input", shape) if reuse else torch.empty(shape)
            planes = out.numpy()
            for c in range(3):  # mode="wrap" avoids a buffered copy; indices are 0..255 anyway
                np.take(self._lut_np[c], imgs[..., c], out=planes[:, c], mode="wrap")
            return out
        x = torch.from_numpy(np.ascontiguousarray(imgs))
        if self.device.type == "cuda":
            x = x.pin_memory()
        return lut_lookup(self._lut, x.to(self.device, non_blocking=True))

    def _layers(self, x: torch.Tensor, reuse: bool = False):
        """Yield the 5 channel-normalised ReLU taps of the trunk for a scaled input batch.

        lpips' normalize_tensor, h / (sqrt(sum_c h^2) + 1e-10), op for op (h * h is h**2 bit for
        bit). `reuse`: the yielded taps are scratch buffers, valid until the next call.
        Where torch runs a convolution with oneDNN (`_onednn_convs`), the activations stay in
        oneDNN's blocked layout from it through the ReLU and max-pooling into the next one: the
        module's oneDNN kernels without its reorder of every input into that layout, and a
        pooling 3x faster than `_max_pool`. Only the taps come back to the module's layout.
        There the ReLU is the convolution's own post-op (`_conv_relu`): one pass less over
        each tap, the same values.
        """
        plan, c, h = self._onednn_convs(x), 0, x
        for k, s in enumerate(self.slices):
            fused = None  # a ReLU already applied by the convolution before it
            for layer, after in zip(s, [*s][1:] + [None]):
                if layer is fused:
                    continue
                if isinstance(layer, torch.nn.Conv2d):
                    h = h.to_mkldnn() if plan[c] and not h.is_mkldnn else h
                    c += 1
                    if h.is_mkldnn and isinstance(after, torch.nn.ReLU) and _conv_relu_works():
                        h, fused = _conv_relu(h, layer), after
                        continue
                if isinstance(layer, torch.nn.MaxPool2d) and not h.is_mkldnn:
                    h = _max_pool(h, layer)
                else:  # convolution, ReLU (in place), or a pooling in the blocked layout (exact)
                    h = layer(h)
            d = h.to_dense() if h.is_mkldnn else h  # (B, C, h_k, w_k) contiguous
            h = d if c < len(plan) and not plan[c] else h  # the next convolution's layout
            tap = self._buffer(f"tap{k}", tuple(d.shape)) if reuse else torch.empty_like(d)
            norm = torch.sum(torch.mul(d, d, out=tap), dim=1, keepdim=True).sqrt_().add_(1e-10)
            yield torch.div(d, norm, out=tap)  # the square is no longer needed: overwrite it

    def _onednn_convs(self, x: torch.Tensor) -> list[bool]:
        """Per trunk convolution, whether torch runs it with oneDNN for this input.

        torch picks the kernel by shape (small inputs take its own im2col path, `Slow2d`), and
        only where it picks oneDNN is the blocked layout the same arithmetic as the module's
        call. All False off the CPU, and where torch cannot say (`_select_conv_backend` is its
        internal choice, with no promise of staying).
        """
        select = getattr(torch._C, "_select_conv_backend", None)
        layers = [layer for s in self.slices for layer in s]
        dense = [False] * sum(isinstance(layer, torch.nn.Conv2d) for layer in layers)
        if self.device.type != "cpu" or select is None or not torch.backends.mkldnn.is_available():
            return dense
        key = (tuple(x.shape), torch.backends.mkldnn.enabled)
        if key not in self._onednn:
            plan, h = [], torch.empty(key[0], device="meta")
            try:
                for layer in layers:
                    if isinstance(layer, torch.nn.Conv2d):
                        args = (layer.weight, layer.bias, layer.stride, layer.padding)
                        args += (layer.dilation, False, (0, 0), layer.groups, None)
                        # an input of this shape, allocated and never written
                        backend = select(torch.empty(h.shape), *args)
                        plan.append(backend == torch._C._ConvBackend.Mkldnn)
                    h = layer(h)  # the next layer's input shape (meta tensors hold no data)
            except (RuntimeError, TypeError, AttributeError, NotImplementedError):
                plan = dense  # another torch's internals: the module's layout throughout
            self._onednn[key] = plan
        return self._onednn[key]

    @torch.no_grad()
    def reference(self, gt: ARRAY) -> list[torch.Tensor]:
        """Normalised trunk features of the uint8 (H, W, 3) ground truth, reused for each sample."""
        with without_tf32():
            return list(self._layers(self._trunk_input(gt[None])))

    @torch.no_grad()
    def maps(
        self,
        sr: ARRAY | Sequence[ARRAY],
        gt: ARRAY | list[torch.Tensor],
        keep: list | None = None,
    ) -> torch.Tensor:
        """Spatial LPIPS maps (N, H, W) float32 of uint8 samples (N, H, W, 3) against the GT.

        `gt` is the uint8 (H, W, 3) ground truth or its `reference(gt)`. Samples are processed in
        chunks of `self.batch`. The map mean is the per-sample LPIPS of the reference.
        `keep`: a list that each sample's 5 normalised taps are appended to, (1, C, h, w) float32
        copies, for `pairwise` (`lpips_net.alex_tap_values` of them a sample).
        """
        with without_tf32():
            return self._maps(sr, gt, keep)

    def _maps(self, sr, gt, keep: list | None = None) -> torch.Tensor:
        sr = np.stack(sr) if not isinstance(sr, np.ndarray) else sr
        ref = self.reference(gt) if isinstance(gt, np.ndarray) else gt
        out = []
        for i in range(0, len(sr), self.batch):
            x = self._trunk_input(sr[i : i + self.batch], reuse=True)
            total = None
            kept = [[] for _ in range(len(x))] if keep is not None else None
            for k, f in enumerate(self._layers(x, reuse=True)):
                for b, taps in enumerate(kept or []):  # before the in-place difference below
                    taps.append(f[b : b + 1].clone())
                d = self.net.lins[k](f.sub_(ref[k]).square_())  # (f - ref)**2: (B, 1, h_k, w_k)
                r = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
                total = r if total is None else total.add_(r)  # layer order, as the module
            out.append(total[:, 0])
            if keep is not None:
                keep += kept
        return out[0] if len(out) == 1 else torch.cat(out)

    @torch.no_grad()
    def taps(self, sr: ARRAY, copy: bool = True) -> list[list[torch.Tensor]]:
        """Each sample's 5 normalised taps of a batch of uint8 (B, H, W, 3) samples: those that
        `maps(..., keep=)` keeps where it took this very batch (the same trunk pass, the same
        values). `copy=False`: views of the scratch taps, valid until the next trunk pass."""
        with without_tf32():
            layers = list(self._layers(self._trunk_input(sr, reuse=True), reuse=True))
        return [[f[b : b + 1].clone() if copy else f[b : b + 1] for f in layers]
                for b in range(len(sr))]  # fmt: skip

    @torch.no_grad()
    def pairwise(
        self,
        features: Sequence[list[torch.Tensor]],
        batches: Sequence[Sequence[ARRAY]] | None = None,
    ) -> torch.Tensor:
        """(N, N) float32 LPIPS between N samples, from their `features` (`maps(..., keep=)`).

        Entry (i, j) is the `lpips` package's default (non-spatial) call `lpips.LPIPS(net="alex",
        version="0.1")(x_i, x_j)`: per layer the linear head of the squared difference of the
        two normalised taps, averaged at the layer's own resolution, summed in layer order
        (docs/metrics.md, "Pairwise LPIPS"). Only the heads run: no trunk pass. Symmetric to the
        bit ((a - b)^2 = (b - a)^2), zero on the diagonal. One scratch tensor of the largest
        tap's size (kept, as the trunk's).

        In blocks, where the features of all N would not fit in memory: `batches` are the N
        samples as `maps` took them, batch by batch (each a list of uint8 (1, H, W, 3) crops,
        `stack_crops`), and `features` those of the first K samples only (whole batches: the
        first block). A block's features are kept while each later batch's are computed again
        (one trunk pass, into the scratch taps) and paired with them; then the next K samples'
        are computed as the next block. Each pair is computed by the same operations on the same
        taps (a batch's trunk pass gives the same taps each time): the same matrix to the bit,
        for trunk passes more: each block's but the first, and the samples after each block
        (N (N - 1) / 2 + N - 2 at K = 1). `features` is emptied then, as its block is done."""
        sizes = [len(features)] if batches is None else [len(b) for b in batches]
        starts = list(itertools.accumulate(sizes, initial=0))  # batch c: starts[c]:starts[c + 1]
        n, k = starts[-1], len(features)
        values = {}
        block, first, c = features, 0, starts.index(k)  # (whole batches)
        scratch = self._buffer("pair", (max(f.numel() for f in features[0]),)) if n > 1 else None
        with without_tf32():
            while block:
                for i, j in itertools.combinations(range(len(block)), 2):
                    values[first + i, first + j] = self._pair(block[i], block[j], scratch)
                for d in range(c, len(sizes)):  # each later batch, its taps computed again
                    for j, later in enumerate(self.taps(stack_crops(batches[d]), copy=False)):
                        for i, kept in enumerate(block):
                            values[first + i, starts[d] + j] = self._pair(kept, later, scratch)
                first += len(block)
                if batches is not None:  # (`features` too: a block's memory freed before the next)
                    block.clear()
                block = []
                while n - first > 1 and c < len(sizes) and len(block) + sizes[c] <= max(k, 1):
                    block += self.taps(stack_crops(batches[c]))  # the next block (a last one
                    c += 1  # of one sample has no pair left: not computed)
        out = torch.zeros(n, n, device=self.device)
        for (i, j), v in values.items():  # (one copy to the host at the end, not one per pair)
            out[i, j] = out[j, i] = v
        return out.cpu()

    def _pair(self, a: list[torch.Tensor], b: list[torch.Tensor], scratch) -> torch.Tensor:
        """The LPIPS of two samples from their taps (`pairwise`), a 0-d tensor on the device."""
        total = None
        for k, (x, y) in enumerate(zip(a, b)):
            d = torch.sub(x, y, out=scratch[: x.numel()].view(x.shape))
            v = self.net.lins[k](d.square_()).mean([2, 3], keepdim=True)
            total = v if total is None else total + v  # layer order, as the module
        return total.reshape(())


def stack_crops(crops: Sequence[ARRAY]) -> ARRAY:
    """One batch of uint8 (1, H, W, 3) crops as `LpipsMetric.maps` takes it: the crop itself
    (a view) for one, a (B, H, W, 3) copy for more."""
    return crops[0] if len(crops) == 1 else np.concatenate(crops)


@contextlib.contextmanager
def without_tf32():
    """CUDA convolutions and matmuls in full float32 within, the caller's settings after."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def lut_lookup(lut: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
    """(3, 256) table at uint8 (B, H, W, 3) values, per channel -> contiguous (B, 3, H, W)."""
    channel = torch.arange(3, device=imgs.device)
    return lut[channel, imgs.long()].permute(0, 3, 1, 2).contiguous()


def to_lpips_range(imgs: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] as measure.py: x / 255 * 2 - 1."""
    return imgs.permute(0, 3, 1, 2).float().div(255).mul(2).sub(1)


def _conv_relu(h: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """relu(conv(h)) for `h` in oneDNN's layout, in one oneDNN call (its ReLU "post-op").

    The convolution is the one `conv(h)` runs (torch's `_convolution_pointwise` and its
    `mkldnn_convolution` make the same oneDNN primitive, but for the post-op), and the ReLU is
    applied to each output value before it is stored: bit-identical to the two calls, without a
    pass over the output (as inductor fuses them on CPU).
    """
    args = (conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
    return torch.ops.mkldnn._convolution_pointwise(h, *args, "relu", [], "")


@functools.cache
def _conv_relu_works() -> bool:
    """Whether this torch has `_conv_relu`'s op (an internal one, which inductor calls): checked
    once on a tiny input against the two calls; where it is missing or fails, the convolution
    and the ReLU run one after the other."""
    if getattr(torch.ops.mkldnn, "_convolution_pointwise", None) is None:
        return False
    w, b = torch.linspace(-1, 1, 16 * 2 * 3 * 3).view(16, 2, 3, 3), torch.linspace(-1, 1, 16)
    conv = types.SimpleNamespace(weight=w, bias=b, padding=(1, 1), stride=(1, 1))  # no RNG draw
    conv.dilation, conv.groups, x = (1, 1), 1, torch.linspace(-1, 1, 2 * 5 * 5).view(1, 2, 5, 5)
    try:
        y = _conv_relu(x.to_mkldnn(), conv)
        expect = torch.relu(F.conv2d(x.to_mkldnn(), w, b, padding=1)).to_dense()
        return y.is_mkldnn and torch.equal(y.to_dense(), expect)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _max_pool(h: torch.Tensor, pool: torch.nn.MaxPool2d) -> torch.Tensor:
    """AlexNet's MaxPool2d(3, stride 2) as maxima of strided views: exact, ~4x faster on CPU."""
    k, s = pool.kernel_size, pool.stride
    if not (k == 3 and s == 2 and pool.padding == 0 and pool.dilation == 1 and not pool.ceil_mode):
        return pool(h)
    oh, ow = (h.shape[2] - k) // s + 1, (h.shape[3] - k) // s + 1
    r = torch.maximum(h[:, :, 0 : s * (oh - 1) + 1 : s], h[:, :, 1 : s * (oh - 1) + 2 : s])
    for i in range(2, k):
        torch.maximum(r, h[:, :, i : i + s * (oh - 1) + 1 : s], out=r)
    c = torch.maximum(r[:, :, :, 0 : s * (ow - 1) + 1 : s], r[:, :, :, 1 : s * (ow - 1) + 2 : s])
    for i in range(2, k):
        torch.maximum(c, r[:, :, :, i : i + s * (ow - 1) + 1 : s], out=c)
    return c


# ----------------------------------------------------------------------------- one image


def pairwise_bytes(size: tuple[int, int], n: int, scale: int, block: int | None = None) -> int:
    """Bytes of the features that `evaluate_image(pairwise=True)` keeps for an image whose ground
    truth is `size` (H, W), with n samples (distinct: all, at most), `block` of them at once
    (None: all; `pairwise_block`): each kept sample's 5 normalised AlexNet taps of its official
    crop in float32, 114 MB at 2040x1352 (1.1 GB for all of N = 10), plus one scratch tensor of
    the largest tap's size (`LpipsMetric.pairwise`). 0 for n = 1."""
    if n < 2:
        return 0
    mod = official_mod(scale)
    h8, w8 = size[0] // mod * mod, size[1] // mod * mod
    largest = 64 * ((h8 - 7) // 4 + 1) * ((w8 - 7) // 4 + 1)  # conv1's tap
    return 4 * (min(n, block or n) * alex_tap_values(h8, w8) + largest)


def pairwise_block(size: tuple[int, int], n: int, scale: int, batch: int,
                   memory: int | None = None) -> int:  # fmt: skip
    """How many of the n distinct samples' features `evaluate_image(pairwise=True)` keeps at
    once, for an image whose ground truth is `size`, in LPIPS batches of `batch`, where they
    may take `memory` bytes (`pairwise_bytes`; None: no limit): all n where they fit (no trunk
    pass more), else the most whole batches that fit, one batch at least (the pairs in blocks,
    `LpipsMetric.pairwise`: the same numbers, trunk passes more)."""
    if memory is None or pairwise_bytes(size, n, scale) <= memory:
        return n
    fit = max(k for k in range(0, n + 1, batch) if k == 0 or pairwise_bytes(size, n, scale, k)
              <= memory)  # fmt: skip
    return max(batch, fit)


def official_mod(scale: int) -> int:
    """The GT crop of the official columns: lcm(8, scale), i.e. 8 at ×2, ×4, ×8 as the reference.

    At ×3 (not a challenge track) a multiple of 8 need not be one of 3: 24 keeps the LR size exact
    and an SR made from the usual mod-3 LR always covers the crop.
    """
    return math.lcm(NTIRE_MOD, scale)


def check_image_sizes(
    gt_size: tuple[int, int],
    sample_sizes: Sequence[tuple[int, int]],
    scale: int,
    lpips: bool = False,
    ntire: bool = False,
    shave: int | None = None,
    names: Sequence[str] | None = None,
    gt_name: str = "ground truth",
) -> None:
    """The size conditions of `evaluate_image` (its arguments, with the ground truth's and the
    samples' (H, W) for the arrays, `lpips` for an LPIPS metric): a DataError naming the file.
    From sizes alone, so that sr_eval.py checks every image from its files' headers before it
    scores the first one; evaluate_image checks them again on the decoded arrays."""
    names = list(names) if names is not None else [f"sample {i}" for i in range(len(sample_sizes))]
    mod = official_mod(scale)
    h8, w8 = gt_size[0] // mod * mod, gt_size[1] // mod * mod
    if h8 == 0 or w8 == 0:
        raise DataError(f"{gt_name}: {gt_size[1]}x{gt_size[0]} is under {mod} px in one dimension")
    if lpips and min(h8, w8) < LPIPS_MIN_SIZE:
        raise DataError(f"{gt_name}: the {w8}x{h8} crop is too small for LPIPS (min 32x32)")
    for (h, w), name in zip(sample_sizes, names):
        if h < h8 or w < w8:
            raise DataError(
                f"{name}: SR is {w}x{h} (WxH), smaller than the {w8}x{h8} ground-truth crop (to "
                f"a multiple of {mod}, for the official columns)"
            )
    if ntire:
        return
    shave = scale if shave is None else shave
    hs = min([gt_size[0] // scale * scale] + [h for h, _ in sample_sizes])
    ws = min([gt_size[1] // scale * scale] + [w for _, w in sample_sizes])
    if min(hs, ws) - 2 * shave < 11:  # SSIM's 11x11 window
        fits = (min(hs, ws) - 11) // 2  # the largest shave that leaves 11 px
        hint = f"use --shave {fits} or less" if fits >= 0 else "use --ntire (no PSNR/SSIM columns)"
        raise DataError(
            f"{gt_name}: {ws}x{hs} minus a {shave} px shave is too small for SSIM (11x11); {hint}"
        )


def first_equal(samples: Sequence[ARRAY]) -> list[int]:
    """For each sample the index of the first sample equal to it (its own if none): the n samples
    of a deterministic model are one image n times, and each distinct one is scored once.

    Samples are grouped by a 32x32 grid of their pixels (its bytes, a dict key), so a sample is
    compared whole only with the distinct ones before it that match it there: a stochastic
    model's samples cost one small copy each, an equal one one comparison of its bytes. (Checking
    each against every distinct one before it cost N^2 / 2 grid comparisons: 0.1 s per image of
    2040x1352 at N = 100, a hundred times that at N = 1,000.)
    """

    def grid(a: ARRAY) -> tuple:  # ~32x32 pixels as bytes: equal arrays have equal keys
        return a.shape, a[:: max(1, a.shape[0] // 32), :: max(1, a.shape[1] // 32)].tobytes()

    first: list[int] = []
    distinct: dict[tuple, list[int]] = {}  # grid -> its samples equal to none before them
    for i, s in enumerate(samples):
        alike = distinct.setdefault(grid(s), [])
        first.append(next((j for j in alike if np.array_equal(samples[j], s)), i))
        alike += [i] if first[-1] == i else []
    return first


def evaluate_image(
    gt: ARRAY,
    samples: Sequence[ARRAY],
    scale: int,
    lpips_metric: LpipsMetric | None = None,
    ntire: bool = False,
    color: str = "rgb",
    shave: int | None = None,
    lr: ARRAY | None = None,
    names: Sequence[str] | None = None,
    gt_name: str = "ground truth",
    warn: Callable[[str], None] = warnings.warn,
    pairwise: bool = False,
    pairwise_memory: int | None = None,
    blur: float | None = None,
) -> dict[str, float | None]:
    """All columns for one ground truth uint8 (H, W, 3) and its N uint8 (h, w, 3) samples.

    Official columns (always, both modes): GT cropped top-left to a multiple of `official_mod`
    (8: docs/metrics.md, "Inputs and crops"; 24 at ×3, which the challenge did not have), each SR
    cropped top-left to it; an SR
    smaller than that crop is a DataError naming the file (`names[i]`); one larger by more than
    mod - 1 px is cropped too, with a call of `warn`. `gt_name` names the GT in errors.
    `lpips_metric=None` leaves `LPIPS_mean` and `score` None. `ntire=True` returns only these.

    Extra columns (`ntire=False`): the top-left region common to the GT cropped to a multiple of
    `scale` (the usual SR "modcrop") and to every sample (so SRs of the NTIRE mod-8 size work
    too), minus `shave` px (default: scale) on each border, in RGB or MATLAB Y (`color`).
    `lr` (uint8) adds LRPSNR_vs_input_mean: PSNR of downscale(SR cropped to scale × the LR size)
    against the LR file itself (an SR smaller than that, of an HR whose size is no multiple of
    the scale: downscaled whole, as MATLAB's imresize made a ceil-sized LR).
    `pairwise` (with `lpips_metric`) adds PAIRWISE_MATRIX, the (N, N) LPIPS between the samples'
    official crops as nested lists (`LpipsMetric.pairwise`; equal samples 0), and PAIRWISE_COLUMN,
    its mean over the N(N - 1)/2 pairs; both None for N = 1. Each distinct sample's features are
    kept from its LPIPS pass meanwhile (`pairwise_bytes`): no trunk pass more; where they would
    take more than `pairwise_memory` bytes, those of a block of samples at a time
    (`pairwise_block`), the others' computed again: the same matrix, to the bit.
    `blur` (a sigma in HR pixels, `ntire=False`): BLUR_COLUMNS, LR-PSNR with the downscale D_b
    of sr_sample.py --from-hr --lr-blur's LR (`degrade`: Gaussian blur, bicubic, rounded to
    uint8), D_b(SR crop) against D_b(GT crop) on the official crops; LRPSNR_vs_input_mean then
    downscales by D_b too. The official columns keep the bicubic D.
    """
    names = list(names) if names is not None else [f"sample {i}" for i in range(len(samples))]
    if len(samples) == 0:
        raise DataError("no samples to evaluate")
    sizes = [img.shape[:2] for img in samples]
    lpips = lpips_metric is not None
    check_image_sizes(gt.shape[:2], sizes, scale, lpips, ntire, shave, names, gt_name)
    mod = official_mod(scale)
    h8, w8 = gt.shape[0] // mod * mod, gt.shape[1] // mod * mod
    shave = scale if shave is None else shave  # (big enough: check_image_sizes)
    hs = min([gt.shape[0] // scale * scale] + [img.shape[0] for img in samples])
    ws = min([gt.shape[1] // scale * scale] + [img.shape[1] for img in samples])
    scored = f"only its top-left {w8}x{h8} is scored" if ntire else (
        f"only its top-left is scored: {w8}x{h8} for the official columns, {ws}x{hs} less a "
        f"{shave} px border for PSNR and SSIM")  # fmt: skip
    for img, name in zip(samples, names):
        if img.shape[0] > h8 + mod - 1 or img.shape[1] > w8 + mod - 1:
            warn(
                f"{name}: SR {img.shape[1]}x{img.shape[0]} is larger than the ground truth "
                f"{gt.shape[1]}x{gt.shape[0]}; {scored}"
            )

    gt8 = gt[:h8, :w8]
    row: dict[str, float | None] = {c: None for c in OFFICIAL_COLUMNS}
    first = first_equal(samples)  # a deterministic model's n samples: one image, scored once
    distinct = sorted(set(first))

    def per_sample(fn: Callable) -> list:  # fn of each distinct sample, in sample order
        values = {i: fn(samples[i]) for i in distinct}
        return [values[i] for i in first]

    pairs = pairwise and lpips_metric is not None and len(samples) > 1
    if pairwise:
        row[PAIRWISE_COLUMN] = row[PAIRWISE_MATRIX] = None
    if lpips_metric is not None:  # first: on a GPU it runs while the CPU does the LR-PSNR
        ref, acc, b = lpips_metric.reference(gt8), DiversityAccumulator(), lpips_metric.batch
        chunks = [distinct[c : c + b] for c in range(0, len(distinct), b)]
        crops = [[samples[i][None, :h8, :w8] for i in chunk] for chunk in chunks]  # views
        kept = pairwise_block(gt.shape[:2], len(distinct), scale, b, pairwise_memory)
        features = [] if pairs else None  # per distinct sample its normalised taps
        for chunk, batch in zip(chunks, crops):
            # (the call of a run without pairs, and past the first block)
            keep = {"keep": features} if pairs and len(features) < kept else {}
            maps = lpips_metric.maps(stack_crops(batch), ref, **keep)
            acc.update(maps, [[j for j, f in enumerate(first) if f == i] for i in chunk])
        del ref, maps  # (the GT's features: ~60 bytes a pixel, not held while SSIM computes)
        if pairs:  # (distinct, distinct); in blocks where all of them would not fit
            d = lpips_metric.pairwise(features, crops if kept < len(distinct) else None)
            d = d.double()
            del features
            at = [distinct.index(f) for f in first]  # each sample's row: that of its first equal
            matrix = d[at][:, at]
            upper = torch.triu_indices(len(samples), len(samples), 1)
            row[PAIRWISE_COLUMN] = float(matrix[upper[0], upper[1]].mean())
            row[PAIRWISE_MATRIX] = matrix.tolist()
    gt_lr = downscale(gt8, scale)  # once per image
    lr_psnrs = per_sample(lambda img: lr_psnr(img[:h8, :w8], gt_lr, scale))
    row["LRPSNR_worst"], row["LRPSNR_mean"] = min(lr_psnrs), float(np.mean(lr_psnrs))
    if lpips_metric is not None:
        row["LPIPS_mean"], row["score"] = acc.lpips_mean, acc.score
    if ntire:
        return row

    def prep(img: ARRAY) -> ARRAY:
        img = shave_border(img[:hs, :ws], shave)
        return rgb2y(img) if color == "y" else img

    gt_s = prep(gt)
    ssim_ref = SsimReference(gt_s)

    def psnr_ssim(img: ARRAY) -> tuple[float, float]:
        x = prep(img)
        return psnr(x, gt_s, peak=255.0), ssim_ref(x)  # (uint8 RGB, or Y as float)

    psnrs, ssims = zip(*per_sample(psnr_ssim))
    row.update(
        PSNR_mean=float(np.mean(psnrs)), PSNR_best=max(psnrs), SSIM_mean=float(np.mean(ssims))
    )
    if blur is not None:  # (LRPSNR_vs_input_mean with the blur too, where `lr` is given)
        blurred_lr_psnr(row, gt8, samples, first, lr, scale, blur)
    elif lr is not None:
        hl, wl = lr.shape[0] * scale, lr.shape[1] * scale

        def vs_input(img: ARRAY) -> float:
            if img.shape[0] >= hl and img.shape[1] >= wl:  # the SR covers scale x the LR
                return lr_psnr(img[:hl, :wl], lr, scale)
            # An LR of ceil(H / scale) rows (MATLAB's imresize of a whole HR whose H is no
            # multiple of the scale) and an SR of that HR's size: downscaled whole, as the LR
            # was (ceil(H / scale) rows too), then both cut to the rows and columns they share.
            down = downscale(img, scale)
            h, w = min(down.shape[0], lr.shape[0]), min(down.shape[1], lr.shape[1])
            return psnr(down[:h, :w], lr[:h, :w])

        row[LR_INPUT_COLUMN] = float(np.mean(per_sample(vs_input)))
    return row


def blurred_lr_psnr(row: dict, gt8, samples, first: list[int], lr, scale: int, blur: float):
    """`evaluate_image`'s BLUR_COLUMNS into `row` (and with `lr` its LR_INPUT_COLUMN): LR-PSNR
    with the downscale of a degraded LR, `degrade(·, scale, blur)`, in place of the bicubic one
    (docs/metrics.md "LR-PSNR of a degraded LR"), on the official crops (`gt8`'s size). Each
    distinct sample (`first`: `first_equal`) is downscaled once: the LR of sr_sample.py
    --from-hr, made from the GT cropped as `gt8` is, covers that crop too."""
    h8, w8 = gt8.shape[:2]
    distinct = sorted(set(first))
    down = {i: degrade(samples[i][:h8, :w8], scale, blur) for i in distinct}
    gt_lr = degrade(gt8, scale, blur)
    values = [psnr(down[i], gt_lr) for i in first]
    row[BLUR_COLUMNS[0]], row[BLUR_COLUMNS[1]] = min(values), float(np.mean(values))
    if lr is None:
        return
    hl, wl = lr.shape[0] * scale, lr.shape[1] * scale

    def vs_input(img: ARRAY, i: int) -> float:  # (the crops of `evaluate_image`'s vs_input)
        if (hl, wl) == (h8, w8):
            x = down[i]
        else:
            x = degrade(img[:hl, :wl] if img.shape[0] >= hl and img.shape[1] >= wl else img,
                        scale, blur)  # fmt: skip
        h, w = min(x.shape[0], lr.shape[0]), min(x.shape[1], lr.shape[1])
        return psnr(x[:h, :w], lr[:h, :w])

    value = {i: vs_input(samples[i], i) for i in distinct}
    row[LR_INPUT_COLUMN] = float(np.mean([value[i] for i in first]))


# ----------------------------------------------------------------------------- uncertainty


def pll(gt: ARRAY, mu: ARRAY, sigma: ARRAY, floor: float = 1e-6) -> float:
    """Predictive log-likelihood of "Revisiting l1 loss" (Eq. 11, Table 7), nats per value.

    mean over pixels and RGB of log N(gt; mu, sigma^2) = -1/2 log(2 pi sigma^2) - (gt-mu)^2/(2
    sigma^2), all on the [0, 1] scale (gt, mu: uint8 HWC; sigma: float (3, H, W) or HWC in
    [0, 1]), sigma floored at `floor` (docs/metrics.md, "Uncertainty": RGB, no shave).
    """
    y, m, s = _uncertainty_inputs(gt, mu, sigma, floor)
    return float(np.mean(-0.5 * np.log(2 * np.pi * s**2) - (y - m) ** 2 / (2 * s**2)))


def sigma_psnr(gt: ARRAY, mu: ARRAY, sigma: ARRAY) -> float:
    """PSNR (peak 1) between the sigma map and the actual error |gt - mu| (Table 7, 2nd number)."""
    y, m, s = _uncertainty_inputs(gt, mu, sigma, 0.0)
    return psnr(s, np.abs(y - m), peak=1.0)


def _uncertainty_inputs(gt, mu, sigma, floor):
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim == 3 and s.shape[0] == 3 and s.shape[-1] != 3:
        s = s.transpose(1, 2, 0)  # (3, H, W) as saved by sr_sample.py -> HWC
    h = min(gt.shape[0], mu.shape[0], s.shape[0])
    w = min(gt.shape[1], mu.shape[1], s.shape[1])
    y = gt[:h, :w].astype(np.float64) / 255
    m = mu[:h, :w].astype(np.float64) / 255
    return y, m, np.maximum(s[:h, :w], floor)
