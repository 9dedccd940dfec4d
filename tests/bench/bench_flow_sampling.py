"""Benchmark: SRFlow sampling on CPU, official default configs, random weights.

Cases, each in a fresh process (so its peak RSS is its own), batch of one LR image, fp32, no_grad:
  x4, x8   10 samples of one 64x64 LR at temperature 0.9: total time, the encoder + conditioning
           time, seconds per sample, peak RSS; and whether the 10 samples drawn at once are
           bit-identical to drawing them one at a time with the same seeds (--check).
  tile     one 1024x1024 x4 sample (256x256 LR) through sr_sample's tiled path (--tile, with the
           model's context by default: exact): time and peak RSS (target <= 3 GB).
Reference, the original implementation on this 2-core CPU (docs/benchmarks.md): x4 LR64 2.92 s per
sample (encoder 1.03 s, flow 1.90 s), so 29.2 s for 10; x8 LR64 10.92 s per sample; peak RSS
1129 MB / 1785 MB. Target: 10 x4 samples in <= 12 s. Weights are random (see `model`), which
does not change the cost of the dense convolutions.
Prints one JSON object; the load average is included because the machine may be shared.

    python tests/bench/bench_flow_sampling.py [--runs 3] [--cases x4 x8 tile] [--quick]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without install
from sr_lib.models import build_model  # noqa: E402
from sr_lib.models.base import NoiseSource  # noqa: E402
from sr_lib.models.flow_layers import ZeroConv2d  # noqa: E402
from sr_lib.resize import imresize_torch  # noqa: E402

REFERENCE = {  # original implementation, seconds per sample and peak RSS (MB), docs/benchmarks.md
    "x4": {"s_per_sample": 2.92, "encoder_s": 1.03, "flow_s": 1.90, "peak_rss_mb": 1129},
    "x8": {"s_per_sample": 10.92, "encoder_s": 1.66, "flow_s": 8.62, "peak_rss_mb": 1785},
}


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model(scale: int, std: float = 0.002):
    """The official default config with random weights: ActNorm data-initialised on a smooth
    synthetic patch (as the reference measurement), then the zero-initialised output convs
    perturbed (N(0, std)) so the couplings are not constant and the identity check means
    something. Stronger random weights make a 16-step reverse pass overflow."""
    torch.manual_seed(0)
    net = build_model("srflow", {"scale": scale})
    g = torch.Generator().manual_seed(0)
    hr = F.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=(64, 64), mode="bicubic")
    net.train()
    with torch.no_grad():
        net(imresize_torch(hr, 1 / scale), hr.clamp(0, 1))
        for m in net.modules():
            if isinstance(m, ZeroConv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
    return net.eval()


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_case(case: str, args) -> dict:
    """Runs inside the child process."""
    torch.set_num_threads(args.threads)
    lr_size = args.lr if case != "tile" else args.tile_lr
    scale = 8 if case == "x8" else 4
    net = model(scale)
    post_build = rss_mb("VmRSS")
    lr = torch.rand(1, 3, lr_size, lr_size, generator=torch.Generator().manual_seed(1))
    out = {"case": case, "lr": lr_size, "hr": lr_size * scale, "post_build_rss_mb": post_build}
    with torch.no_grad():
        net.sample(lr, 1, 0.9, NoiseSource([99]))  # warm-up: oneDNN primitive creation
        if case == "tile":
            from sr_lib.tiling import draw

            context = net.tile_halo if args.tile_overlap is None else args.tile_overlap
            t, sr = timed(lambda: draw(net, lr, [0], 0.9, args.tile, context), args.runs)
            out.update(tile=args.tile, tile_context=context, s_per_sample=t)
        else:
            seeds = list(range(args.n))
            out["encoder_s"] = timed(lambda: net.conditions(lr), args.runs)[0]
            out["one_sample_s"] = timed(lambda: net.sample(lr, 1, 0.9, NoiseSource([0])), 1)[0]
            t, sr = timed(lambda: net.sample(lr, args.n, 0.9, NoiseSource(seeds)), args.runs)
            out.update(n=args.n, total_s=t, s_per_sample=t / args.n)
            if case in REFERENCE and lr_size == 64:  # the reference was measured at LR 64
                ref = REFERENCE[case]
                out["reference_total_s"] = ref["s_per_sample"] * args.n
                out["ratio_to_reference"] = t / out["reference_total_s"]
                out["reference_peak_rss_mb"] = ref["peak_rss_mb"]
            if args.check:
                one = [net.sample(lr, 1, 0.9, NoiseSource([s]))[0, 0] for s in seeds]
                out["bit_identical_to_one_at_a_time"] = all(
                    torch.equal(a, b) for a, b in zip(one, sr[0])
                )
    out["peak_rss_mb"] = rss_mb("VmHWM")
    out["finite"] = bool(torch.isfinite(sr).all())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed calls per case (median)")
    parser.add_argument("--cases", nargs="+", default=["x4", "x8", "tile"])
    parser.add_argument("--n", type=int, default=10, help="samples per LR image")
    parser.add_argument("--lr", type=int, default=64, help="LR size of the x4/x8 cases")
    parser.add_argument("--tile-lr", type=int, default=256, help="LR size of the tiled case")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--tile-overlap", type=int, default=None, help="default: exact")
    parser.add_argument("--threads", type=int, default=None, help="default: 2, --quick: 1")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one thread: checks the script runs")  # fmt: skip
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # still 2 x 2 tiles, each with context on its inner sides
        args.runs, args.n, args.lr, args.tile_lr, args.tile, args.tile_overlap = 1, 3, 16, 24, 12, 4
    if args.threads is None:
        # Two threads on a loaded 2-core machine spin-wait at every one of a reverse pass's
        # thousands of small operations: the quick run took 120-180 s instead of 25-65 s.
        args.threads = 1 if args.quick else 2
    if args.child:
        print(json.dumps(run_case(args.child, args)))
        return {}

    load_before = os.getloadavg()
    results = []
    for case in args.cases:  # a fresh process per case: its peak RSS is its own
        cmd = [sys.executable, __file__, "--child", case, *(argv or sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"case": case, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report = {
        "benchmark": "srflow sampling",
        "quick": args.quick,
        "threads": args.threads,
        "results": results,
        "targets": {"x4_10_samples_s": 12.0, "tile_peak_rss_mb": 3072},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
