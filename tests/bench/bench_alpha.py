"""Benchmark: the cost of `sr_sample.py --alpha-upsampler model` against `bicubic` (the default).

For each model (the paper's configuration with random weights, as built: the values do not
change the cost of a pass; --cfg gives other sizes) and each --n, sr_sample.py (the real
command, in this process) samples --images RGBA LR images of --lr-size px (a smooth random
colour, an opaque disc with a soft edge on transparency) with each --alpha-upsampler, --repeat
times (after one run of each, not timed), the two alternated, each run into a new folder.
Reports per model and n the median wall and CPU seconds of a run of each, the overhead of
`model` over `bicubic` as a fraction of bicubic's run, and the alpha's own pass (a wrapper
around `sr_sample.model_alpha`: one temperature-0 pass per image, its LR-only work included) in
CPU seconds and as a share of the `model` run. Prints one JSON object.

    python tests/bench/bench_alpha.py [--models edsr srflow] [--n 1 10] [--repeat 3]
        [--cfg '{"srflow": {"nb": 2}}']
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
from machine import machine  # noqa: E402  (this folder)

import sr_sample  # noqa: E402
from sr_lib.checkpoint import save_checkpoint  # noqa: E402
from sr_lib.errors import exit_on_error  # noqa: E402
from sr_lib.models import build_model  # noqa: E402

UPSAMPLERS = ("bicubic", "model")


def random_checkpoint(name: str, cfg: dict, path: Path) -> Path:
    """A checkpoint of `name` as built, seeded (its layers' random initialisation; a flow's
    zero-initialised couplings left so: drawn at random, the default SRFlow's samples are NaN at
    temperature 0.9, and the values do not change what a pass costs)."""
    torch.manual_seed(0)
    model = build_model(name, cfg).eval()
    save_checkpoint(path, {"model": name, "model_cfg": cfg, "state_dict": model.state_dict(),
                           "step": 0})  # fmt: skip
    return path


def rgba_images(folder: Path, count: int, size: int) -> Path:
    """`count` RGBA PNGs of size x size px: smooth random colour, an opaque disc, soft edge."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size] / (size - 1) - 0.5
    alpha = np.clip((0.4 - np.hypot(yy, xx)) * 10, 0, 1)  # 1 inside, 0 outside, a 0.1 ramp
    for i in range(count):
        small = rng.random((size // 8 + 1, size // 8 + 1, 3))
        rgb = np.kron(small, np.ones((8, 8, 1)))[:size, :size]
        img = np.dstack([rgb, alpha]) * 255
        iio.imwrite(folder / f"im{i}.png", img.round().astype(np.uint8))
    return folder


def run(ckpt: Path, inputs: Path, n: int, upsampler: str, device: str,
        out: Path) -> tuple[float, float]:  # fmt: skip
    """One sr_sample.py run: (wall s, CPU s)."""
    argv = ["--ckpt", str(ckpt), "--input", str(inputs), "--n", str(n), "--alpha-upsampler",
            upsampler, "--device", device, "--quiet", "--out", str(out)]  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):  # (its closing line: stdout is the JSON)
        code = sr_sample.main(argv)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if code != 0:
        raise SystemExit(f"sr_sample.py {' '.join(argv)} exited {code}")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["edsr", "srflow"])
    parser.add_argument("--cfg", type=json.loads, default={},
                        help="JSON: model -> config entries (default: the paper's)")  # fmt: skip
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--lr-size", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    result = {**machine(),
              "images": args.images, "lr_size": args.lr_size, "scale": args.scale,
              "repeat": args.repeat, "device": args.device,
              "load_average": os.getloadavg(), "models": {}}  # fmt: skip
    alpha_cpu: list[float] = []
    drawn = sr_sample.model_alpha

    def timed_alpha(*a, **k):
        c0 = time.process_time()
        try:
            return drawn(*a, **k)
        finally:
            alpha_cpu.append(time.process_time() - c0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = rgba_images(tmp / "rgba", args.images, args.lr_size)
        sr_sample.model_alpha = timed_alpha
        try:
            for name in args.models:
                cfg = {"scale": args.scale, **args.cfg.get(name, {})}
                ckpt = random_checkpoint(name, cfg, tmp / f"{name}.pt")
                rows = {}
                for n in args.n:
                    times = {u: [] for u in UPSAMPLERS}
                    passes = []
                    for u in UPSAMPLERS:  # a first run of each, not timed: its one-time costs
                        run(ckpt, inputs, n, u, args.device, tmp / f"{name}_n{n}_{u}_warm")
                    for r in range(args.repeat):
                        for u in UPSAMPLERS:  # alternated: a load that changes hits both
                            alpha_cpu.clear()
                            out = tmp / f"{name}_n{n}_{u}_{r}"
                            times[u].append(run(ckpt, inputs, n, u, args.device, out))
                            if u == "model":
                                passes.append(sum(alpha_cpu))
                    wall = {u: statistics.median(t[0] for t in times[u]) for u in UPSAMPLERS}
                    cpu = {u: statistics.median(t[1] for t in times[u]) for u in UPSAMPLERS}
                    rows[f"n {n}"] = {
                        "wall_s": {u: round(wall[u], 3) for u in UPSAMPLERS},
                        "cpu_s": {u: round(cpu[u], 3) for u in UPSAMPLERS},
                        "wall_overhead": round(wall["model"] / wall["bicubic"] - 1, 3),
                        "cpu_overhead": round(cpu["model"] / cpu["bicubic"] - 1, 3),
                        "alpha_pass_cpu_s": round(statistics.median(passes), 3),
                        "alpha_pass_share": round(statistics.median(passes) / cpu["model"], 3),
                        "runs_wall_s": {u: [round(t[0], 3) for t in times[u]] for u in UPSAMPLERS},
                    }
                    print(json.dumps({name: rows}), file=sys.stderr, flush=True)
                result["models"][f"{name} (random weights, {json.dumps(cfg)})"] = rows
        finally:
            sr_sample.model_alpha = drawn
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        main()
