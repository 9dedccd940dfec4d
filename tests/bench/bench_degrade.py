"""Time and peak memory of the degraded LR of a whole image: `sr_lib.data.degrade` (blur and
MATLAB-bicubic ÷4), and `sr_sample.py --from-hr` end to end, at 512², 2040×1352 and 4096².

Run by hand: `python tests/bench/bench_degrade.py [--sizes 512x512 2040x1352 4096x4096]
[--blur 2] [--from-hr 4096x4096]`. Each case runs in its own process, so that its peak RSS
(ru_maxrss) is its own: `peak_rss_mb` is the process's, `added_mb` what the degradation added
to the process after imports and the image (`rss_before_mb`); `degrade_s` the best wall time,
`cpu_s` that run's CPU time (all threads; on a loaded machine the steadier of the two).
Without blur the LR is the uint8 bicubic (`imresize`); with it, the float64 blur and
downscale. `--from-hr`: sr_sample.py with a bicubic checkpoint (made here by sr_train.py
--steps 0) on one PNG of that size, with and without --lr-blur, `--runs` times each: each
run's wall time, CPU time and peak RSS. `--eval 2040x1352`: `sr_lib.metrics.evaluate_image`
of one image of that size and `--n` distinct samples with its blurred LR (`--lr`), without
LPIPS (its cost is the same with and without), without and with `blur` (sr_eval.py
--lr-blur), in its own process on one thread: the best wall and CPU time of `--runs`, and the
increase. Prints one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from anywhere without install
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

CASE = """
import resource, sys, time
import numpy as np
from sr_lib.data import degrade
h, w, blur, runs = {h}, {w}, {blur}, {runs}
hr = np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
degrade(hr[:64, :64], 4, blur)  # imports and caches warmed on a small image
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
times = []
for _ in range(runs):
    t0, c0 = time.perf_counter(), time.process_time()
    lr = degrade(hr, 4, blur)
    times.append((time.perf_counter() - t0, time.process_time() - c0))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(*min(times), before, peak, lr.shape[0], lr.shape[1])
"""


EVAL = """
import os, time
import numpy as np
import torch
from sr_lib import metrics
from sr_lib.data import Degradation, mod_crop, validation_degradation
from sr_lib.resize import imresize
torch.set_num_threads(1)
h, w, n, blur, runs = {h}, {w}, {n}, {blur}, {runs}
rng = np.random.default_rng(0)  # a smooth GT (the bicubic x4 of noise), samples GT + noise
gt = imresize(rng.integers(0, 256, (-(-h // 4), -(-w // 4), 3), np.uint8), 4)[:h, :w]
srs = [np.clip(gt + rng.normal(0, 6, gt.shape), 0, 255).astype(np.uint8) for _ in range(n)]
lr = validation_degradation(mod_crop(gt, 8), 4, Degradation(blur=(blur, blur)), "0801")
times = {{}}
for _ in range(runs):
    for b in (None, blur):
        t0, c0 = time.perf_counter(), time.process_time()
        row = metrics.evaluate_image(gt, srs, 4, lr=lr, blur=b)
        times.setdefault(b, []).append((time.perf_counter() - t0, time.process_time() - c0))
print(*min(times[None]), *min(times[blur]), row["LRPSNR_mean"], row["LRPSNR_blur_mean"])
"""


def size(text: str) -> tuple[int, int]:
    w, h = map(int, text.lower().split("x"))
    return w, h


def run_child(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of a command in its own process (os.wait4: its alone)."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # (reaped here: Popen must not wait)
        if p.returncode:
            err.seek(0)
            sys.exit(f"bench_degrade.py: {' '.join(cmd[1:2])} failed\n{err.read()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", nargs="*", type=size, default=[(512, 512), (2040, 1352), (4096, 4096)]
    )
    ap.add_argument("--blur", type=float, default=2.0, help="--lr-blur sigma (HR pixels)")
    ap.add_argument(
        "--runs",
        type=int,
        default=3,
        help="degrade() calls per case, sr_sample.py runs per flag set (the best time)",
    )
    ap.add_argument("--from-hr", type=size, nargs="?", const=(4096, 4096), default=None,
                    help="also time sr_sample.py --from-hr on one image of this size")  # fmt: skip
    ap.add_argument("--eval", type=size, nargs="?", const=(2040, 1352), default=None,
                    help="also time sr_eval.py's columns of one image of this size, without "
                    "and with the blur")  # fmt: skip
    ap.add_argument("--n", type=int, default=10, help="--eval's samples per image")
    args = ap.parse_args(argv)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    load_before = os.getloadavg()
    cases = []
    for w, h in args.sizes:
        for blur in (0.0, args.blur):
            code = CASE.format(h=h, w=w, blur=blur, runs=args.runs)
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=REPO, check=False)  # fmt: skip
            if p.returncode:
                sys.exit(f"bench_degrade.py: degrade {w}x{h} blur {blur}: failed\n{p.stderr}")
            best, cpu, before, peak, lh, lw = p.stdout.split()
            cases.append({"hr": f"{w}x{h}", "blur": blur, "lr": f"{lw}x{lh}",
                          "degrade_s": round(float(best), 4), "cpu_s": round(float(cpu), 4),
                          "rss_before_mb": round(float(before)),
                          "peak_rss_mb": round(float(peak)),
                          "added_mb": round(float(peak) - float(before))})  # fmt: skip
    from_hr = []
    if args.from_hr:
        import numpy as np

        from sr_lib.data import write_png

        with tempfile.TemporaryDirectory() as tmp:
            ckpt, inp = Path(tmp, "bicubic"), Path(tmp, "in")
            subprocess.run([sys.executable, "sr_train.py", "--model", "bicubic", "--steps", "0",
                            "--val-every", "0", "--quiet", "--out", str(ckpt)],
                           cwd=REPO, check=True, capture_output=True)  # fmt: skip
            w, h = args.from_hr
            write_png(
                inp / "img.png", np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
            )
            for blur in ([], ["--lr-blur", str(args.blur)]):
                runs = []
                for k in range(args.runs):  # (a fresh folder each: a rerun would skip the image)
                    out = Path(tmp, f"out{len(from_hr)}-{k}")
                    cmd = [sys.executable, "sr_sample.py", "--ckpt", str(ckpt / "last.pt"),
                           "--input", str(inp), "--from-hr", "--n", "1", *blur,
                           "--out", str(out)]  # fmt: skip
                    runs.append(run_child(cmd))
                from_hr.append({"hr": f"{w}x{h}", "flags": " ".join(["--from-hr", *blur]),
                                "wall_s": [round(t, 2) for t, _, _ in runs],
                                "cpu_s": [round(t, 2) for _, t, _ in runs],
                                "peak_rss_mb": [round(m) for _, _, m in runs]})  # fmt: skip
    scored = {}
    if args.eval:
        w, h = args.eval
        code = EVAL.format(h=h, w=w, n=args.n, blur=args.blur, runs=args.runs)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO, check=False)  # fmt: skip
        if p.returncode:
            sys.exit(f"bench_degrade.py: --eval {w}x{h}: failed\n{p.stderr}")
        wall0, cpu0, wall1, cpu1, bicubic, blurred = map(float, p.stdout.split())
        scored = {"hr": f"{w}x{h}", "n": args.n, "blur": args.blur,
                  "wall_s": [round(wall0, 3), round(wall1, 3)],
                  "cpu_s": [round(cpu0, 3), round(cpu1, 3)],
                  "cpu_s_added": round(cpu1 - cpu0, 3),
                  "lrpsnr_mean": [round(bicubic, 3), round(blurred, 3)]}  # fmt: skip
    result = {
        "bench": "data.degrade",
        "scale": 4,
        "cases": cases,
        **({"from_hr": from_hr} if args.from_hr else {}),
        **({"eval": scored} if args.eval else {}),
        "load_avg": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "cpus": os.cpu_count(),
        **machine(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
