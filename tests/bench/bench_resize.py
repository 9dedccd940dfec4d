"""Benchmark: MATLAB-bicubic ÷4 of a DIV2K-sized (1356, 2040, 3) uint8 image.

Times `sr_lib.resize.imresize`, a baseline written here in the style of the NTIRE21 numpy port
(gather the taps, multiply, np.sum per axis in float64), and the torch float path (N = 1). Prints
one JSON object; the load average is included because the machine may be shared.

    python tests/bench/bench_resize.py [--runs 15]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
from sr_lib.resize import contributions, imresize, imresize_torch, output_size  # noqa: E402


def baseline_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """The port's algorithm, straightforwardly: per axis gather (out, taps, ...) and np.sum."""
    x = img[:, :, None] if img.ndim == 2 else img
    out_hw = output_size(x.shape[:2], scale)
    for axis in (0, 1):  # rows first
        ind, w = contributions(x.shape[axis], out_hw[axis], scale)
        taps = np.take(x, ind, axis=axis).astype(np.float64)  # axis -> (out, taps)
        w = w.reshape(w.shape + (1,) * (taps.ndim - axis - 2))  # broadcast over trailing axes
        y = np.sum(w * taps, axis=axis + 1)
        x = np.round(np.clip(y, 0, 255)).astype(np.uint8) if img.dtype == np.uint8 else y
    return x[:, :, 0] if img.ndim == 2 else x


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up: caches, allocator, thread pool
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1356, 2040, 3), dtype=np.uint8)
    scale = 1 / 4
    assert np.array_equal(imresize(img, scale), baseline_imresize(img, scale))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    load_before = os.getloadavg()
    ours = median_ms(lambda: imresize(img, scale), args.runs)
    base = median_ms(lambda: baseline_imresize(img, scale), max(3, args.runs // 3))
    torch_float = median_ms(lambda: imresize_torch(x, scale), args.runs)
    result = {
        "case": "imresize 1/4 of (1356, 2040, 3) uint8",
        "ours_ms": round(ours, 2),
        "baseline_ms": round(base, 2),
        "speedup": round(base / ours, 2),
        "torch_float_n1_ms": round(torch_float, 2),
        "runs": args.runs,
        "bit_exact_vs_baseline": True,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
