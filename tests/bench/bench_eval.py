"""Benchmark: sr_eval.py against a reference-style loop on DIV2K-sized images (run by hand).

Writes `--images` ground truths of 2040x1352 and N = 10 samples each (x4: bicubic-up of the
imresize LR plus seeded noise, as PNGs), a seeded random-weight LPIPS state_dict (no download;
these are not real LPIPS values), then times per image
  - ours: `sr_eval.main([... --ntire --lpips-weights FILE])`, and the generic mode (+ PSNR/SSIM);
  - reference: a loop written here the way the official measure.py works: per sample, read the
    PNG, call the lpips module (spatial=True) on (SR, GT), imresize both SR and GT, skimage PSNR;
    then stack the N maps for the per-pixel minimum.
and checks that the numbers agree within docs/metrics.md's tolerances (LR-PSNR exact, LPIPS_mean
<= 1e-6 relative, score <= 1e-4 absolute). Prints one JSON object with the load average (the
machine may be shared: rerun when it is low).

    python tests/bench/bench_eval.py [--images 2] [--n 10] [--threads 0] [--keep DIR]
"""

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
import sr_eval  # noqa: E402
from sr_lib import metrics  # noqa: E402
from sr_lib.data import read_image  # noqa: E402
from sr_lib.resize import imresize  # noqa: E402

H, W, SCALE = 1352, 2040, 4


def make_data(root: Path, images: int, n: int) -> tuple[Path, Path, Path]:
    from skimage import data as skdata

    hr_dir, sr_dir = root / "hr", root / "sr"
    hr_dir.mkdir(parents=True, exist_ok=True)
    sr_dir.mkdir(parents=True, exist_ok=True)
    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for k in range(images):
        src = sources[k % len(sources)]
        up = imresize(src, max(H / src.shape[0], W / src.shape[1]) + 0.01)[:H, :W]
        hr = np.clip(np.round(up + rng.normal(0, 4, up.shape)), 0, 255).astype(np.uint8)
        iio.imwrite(hr_dir / f"{801 + k:04d}.png", hr)
        bicubic = imresize(imresize(hr, 1 / SCALE), SCALE).astype(np.float64)
        for i in range(n):
            sr = np.clip(np.round(bicubic + rng.normal(0, 3, hr.shape)), 0, 255).astype(np.uint8)
            iio.imwrite(sr_dir / f"{k:06d}_sample{i:05d}.png", sr)
    torch.manual_seed(0)
    net = metrics.lpips_module()  # random trunk (pnet_rand), v0.1 heads of the package
    weights = root / "lpips_random.pth"
    torch.save(net.state_dict(), weights)
    return hr_dir, sr_dir, weights


def reference_loop(hr_dir: Path, sr_dir: Path, n: int, weights: Path) -> list[dict]:
    """The official algorithm, straightforwardly (no no_grad, GT downscaled per sample)."""
    from skimage.metrics import peak_signal_noise_ratio

    loss = metrics.lpips_module()
    loss.load_state_dict(torch.load(weights, weights_only=True))

    def t(img):
        return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 * 2 - 1

    rows = []
    for k, hr_path in enumerate(sorted(hr_dir.glob("*.png"))):
        gt = read_image(hr_path)
        gt = gt[: gt.shape[0] // 8 * 8, : gt.shape[1] // 8 * 8]
        maps, lr_psnrs = [], []
        for i in range(n):
            sr = read_image(sr_dir / f"{k:06d}_sample{i:05d}.png")[: gt.shape[0], : gt.shape[1]]
            maps.append(loss(t(sr), t(gt)))
            lr_psnrs.append(
                peak_signal_noise_ratio(imresize(sr, 1 / SCALE), imresize(gt, 1 / SCALE))
            )
        means = [m.mean().item() for m in maps]
        local = torch.cat(maps).min(dim=0).values.mean().item()
        rows.append(
            {
                "LPIPS_mean": float(np.mean(means)),
                "LRPSNR_worst": min(lr_psnrs),
                "LRPSNR_mean": float(np.mean(lr_psnrs)),
                "score": (min(means) - local) / min(means) * 100,
            }
        )
    return rows


def run_ours(hr_dir, sr_dir, n, weights, out: Path, *extra) -> tuple[float, float]:
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", n, "--device", "cpu"]
    argv += ["--lpips-weights", weights, "--out", out, *extra]
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        assert sr_eval.main([str(a) for a in argv]) == 0
    return time.perf_counter() - t0, time.process_time() - c0


def trunk_gmac(h: int, w: int) -> float:
    """Multiply-accumulates of the AlexNet convolutions up to relu5 for one h x w image."""
    convs = [(64, 3, 11, 4, 2), (192, 64, 5, 1, 2), (384, 192, 3, 1, 1), (256, 384, 3, 1, 1)]
    convs += [(256, 256, 3, 1, 1)]
    total = 0
    for j, (cout, cin, k, s, p) in enumerate(convs):
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        total += h * w * cout * cin * k * k
        if j < 2:  # max-pool 3/2 after conv1 and conv2
            h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    return total / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--keep", type=str, default=None, help="reuse/keep the data in this folder")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        if (root / "lpips_random.pth").exists():
            hr_dir, sr_dir, weights = root / "hr", root / "sr", root / "lpips_random.pth"
        else:
            hr_dir, sr_dir, weights = make_data(root, args.images, args.n)
        images = len(list(hr_dir.glob("*.png")))

        ours_s, ours_cpu = run_ours(hr_dir, sr_dir, args.n, weights, root / "o.json", "--ntire")
        t0, c0 = time.perf_counter(), time.process_time()
        ref = reference_loop(hr_dir, sr_dir, args.n, weights)
        ref_s, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
        generic_s, generic_cpu = run_ours(hr_dir, sr_dir, args.n, weights, root / "g.json")
        ours = json.loads((root / "o.json").read_text())["per_image"]

        lm = metrics.LpipsMetric(metrics.lpips_module())
        gt = read_image(next(iter(sorted(hr_dir.glob("*.png")))))
        lm.reference(gt)  # warm-up
        t0 = time.perf_counter()
        lm.reference(gt)
        trunk_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        imresize(gt, 1 / SCALE)
        resize_s = time.perf_counter() - t0

    def diff(col, rel=False):
        d = [abs(o[col] - r[col]) / (abs(r[col]) if rel else 1) for o, r in zip(ours, ref)]
        return max(d)

    diffs = {
        "LRPSNR_abs_dB": max(diff("LRPSNR_worst"), diff("LRPSNR_mean")),
        "LPIPS_mean_rel": diff("LPIPS_mean", rel=True),
        "score_abs": diff("score"),
    }
    ok = diffs["LRPSNR_abs_dB"] <= 1e-9 and diffs["LPIPS_mean_rel"] <= 1e-6
    ok = ok and diffs["score_abs"] <= 1e-4
    result = {
        "bench": "sr_eval vs reference-style loop (random-weight LPIPS trunk)",
        "image": f"{W}x{H}",
        "scale": SCALE,
        "n": args.n,
        "images": images,
        "ours_ntire_s_per_image": round(ours_s / images, 2),
        "ours_generic_s_per_image": round(generic_s / images, 2),
        "reference_s_per_image": round(ref_s / images, 2),
        "speedup_ntire": round(ref_s / ours_s, 2),
        "cpu_s_per_image": {
            "ours_ntire": round(ours_cpu / images, 2),
            "ours_generic": round(generic_cpu / images, 2),
            "reference": round(ref_cpu / images, 2),
        },
        "bound": {
            "trunk_gmac_per_sample": round(trunk_gmac(H, W), 1),
            "trunk_s_per_pass": round(trunk_s, 3),
            "floor_s_per_image": round((args.n + 1) * trunk_s, 2),
            "imresize_s_per_call": round(resize_s, 3),
        },
        "max_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
        "identical_within_spec_tolerance": ok,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result))
    if not ok:
        raise SystemExit("numbers differ beyond the spec tolerances")


if __name__ == "__main__":
    main()
