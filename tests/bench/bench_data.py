"""Throughput of the training data path: LR-48 x4 patch pairs per second through `train_loader`.

Run by hand: `python tests/bench/bench_data.py [--images 20] [--workers 2] [--batch 16]`. Creates
synthetic 2040x1356 PNGs (DIV2K-sized, smooth random content) in a temporary folder, builds the
.npy cache, then times batches after a warm-up. Prints one JSON object. Target: >= 2000 pairs/s
(bicubic pairs, no degradation).

`--lr-blur`, `--lr-noise`, `--lr-jpeg` (as sr_train.py's: a value or LO:HI) time the pairs with
that degradation made per patch; `--each` times, on the same cache, the bicubic pairs, each of
the three given alone, and all of them together (`variants` in the JSON, pairs/s each).

Wall-clock throughput depends on what else runs on the machine (see load_avg), so the CPU time the
loader spends per batch (main process + workers) is reported too, with the throughput that CPU
time allows on this machine's cores when they are free (`cpu_bound_pairs_per_s`).
"""

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
from sr_lib.data import (  # noqa: E402
    Degradation,
    PatchPairs,
    degradation_range,
    range_text,
    train_loader,
    write_png,
)
from sr_lib.errors import UsageError  # noqa: E402


def smooth_image(rng: np.random.Generator, h: int = 1356, w: int = 2040) -> np.ndarray:
    """Random low-frequency colour field plus a little grain: compresses like a photo."""
    coarse = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def describe(degradation: Degradation) -> str:
    """A degradation as sr_train.py's flags, "none" for the bicubic pairs."""
    names = [k for k in ("blur", "noise", "jpeg") if getattr(degradation, k)]
    return " ".join(f"--lr-{k} {range_text(getattr(degradation, k))}" for k in names) or "none"


def time_loader(ds: PatchPairs, args) -> dict:
    """Pairs per second through `train_loader` after a warm-up, and the CPU time per batch of
    the main process and its workers."""
    total = args.warmup + args.steps
    children0, main0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
    loader = train_loader(ds, 0, total, workers=args.workers)
    it = iter(loader)
    for _ in range(args.warmup):
        lr, hr = next(it)
    t0 = time.perf_counter()
    checksum = 0.0
    for _ in range(args.steps):
        lr, hr = next(it)
        checksum += float(lr[:, :, 0, 0].sum())  # touch the data, as a training step would
    dt = time.perf_counter() - t0
    del it, loader
    gc.collect()
    time.sleep(0.5)  # let the workers exit, so their CPU time is counted in RUSAGE_CHILDREN
    children1, main1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
    workers_s = sum(getattr(children1, k) - getattr(children0, k) for k in ("ru_utime", "ru_stime"))
    cpu_ms = (main1 - main0 + workers_s) / total * 1e3

    return {
        "pairs_per_s": round(args.steps * args.batch / dt, 1),
        "batches_per_s": round(args.steps / dt, 2),
        "cpu_ms_per_batch": round(cpu_ms, 2),
        "cpu_bound_pairs_per_s": round(os.cpu_count() * 1e3 / cpu_ms * args.batch),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=20, help="batches before timing starts")
    ap.add_argument("--steps", type=int, default=300, help="timed batches")
    ap.add_argument("--lr-blur", default="", help="Gaussian blur sigma of the HR: S or LO:HI")
    ap.add_argument("--lr-noise", default="", help="Gaussian noise sigma on the LR: S or LO:HI")
    ap.add_argument("--lr-jpeg", default="", help="JPEG quality of the LR: Q or LO:HI")
    ap.add_argument("--each", action="store_true",
                    help="time no degradation, each one given alone, and all of them")  # fmt: skip
    args = ap.parse_args()
    try:
        given = Degradation(*(degradation_range(getattr(args, k), "--" + k.replace("_", "-"))
                              for k in ("lr_blur", "lr_noise", "lr_jpeg")))  # fmt: skip
    except UsageError as e:
        ap.error(str(e))
    variants = [given]
    if args.each:
        alone = [Degradation(**{k: getattr(given, k)}) for k in ("blur", "noise", "jpeg")]
        variants = [Degradation(), *[d for d in alone if d], given]

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        hr_dir, cache = Path(tmp, "hr"), Path(tmp, "cache")
        for i in range(args.images):
            write_png(hr_dir / f"{i:04d}.png", smooth_image(rng))

        t0 = time.perf_counter()
        PatchPairs([hr_dir], scale=4, batch=args.batch, cache=cache)  # decode + LR, write .npy
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        PatchPairs([hr_dir], scale=4, batch=args.batch, cache=cache)  # reads the cache
        reopen_s = time.perf_counter() - t0

        timed = []
        for degradation in variants:
            ds = PatchPairs([hr_dir], scale=4, batch=args.batch, cache=cache,
                            degradation=degradation)  # fmt: skip
            timed.append({"degradation": describe(degradation), **time_loader(ds, args)})
        shapes = [list(x.shape) for x in next(iter(train_loader(ds, 0, 1, workers=0)))]

    pairs_per_s = timed[0]["pairs_per_s"]
    print(
        json.dumps(
            {
                "bench": "data.train_loader",
                "images": f"{args.images} x 2040x1356 RGB PNG",
                "scale": 4,
                "lr_patch": ds.patch,
                "batch": args.batch,
                "workers": args.workers,
                "timed_batches": args.steps,
                **timed[0],
                "target_pairs_per_s": 2000,
                "meets_target": pairs_per_s >= 2000 if not variants[0] else None,
                **({"variants": timed} if args.each else {}),
                "cache_build_s": round(build_s, 2),
                "cache_reopen_s": round(reopen_s, 3),
                "shapes": shapes,
                "load_avg": [round(x, 2) for x in os.getloadavg()],
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
