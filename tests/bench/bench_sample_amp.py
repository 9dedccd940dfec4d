"""Benchmark: `sr_sample.py --amp bf16` and `--amp fp16` against float32 on the demo images.

For each checkpoint: sr_sample.py (the real command) draws --n samples of the demo validation
photographs, or of the HR images in --input (`--from-hr`: HR cropped to a multiple of 8, LR its
MATLAB-bicubic downscale) in float32 and with
each `--amp` of --amp, on the same seeds; every sample is scored as sr_eval.py does
(`sr_lib.metrics.evaluate_image`: PSNR against the HR with a `scale`-px shave, NTIRE LR-PSNR).
Reports per model the means over images and samples, their change under each --amp, the largest
pixel difference to the float32 run's PNGs, and the wall time of each run (a CPU that emulates a
dtype is slow: the times say nothing about a GPU). The demo images are a
smoke test, not a benchmark of quality. Prints one JSON object.

    python tests/bench/bench_sample_amp.py --ckpt runs/edsr/last.pt runs/srflow/last.pt [--n 10]
        [--amp bf16 fp16] [--input HR_FOLDER]
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
from machine import machine  # noqa: E402  (this folder)

import sr_sample  # noqa: E402
from sr_lib.data import load_pairs, read_image  # noqa: E402
from sr_lib.errors import exit_on_error  # noqa: E402
from sr_lib.metrics import evaluate_image  # noqa: E402
from sr_lib.models import MODELS, read_checkpoint  # noqa: E402


def run(ckpt: str, source: str, amp: str, n: int, out: Path, device: str) -> tuple[Path, float]:
    t0 = time.time()
    argv = ["--ckpt", ckpt, "--input", source, "--from-hr", "--n", str(n), "--amp", amp,
            "--device", device]  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines: stdout is the JSON
        code = sr_sample.main([*argv, "--out", str(out)])
    if code != 0:
        raise SystemExit(f"sr_sample.py {' '.join(argv)} exited {code}")
    return out, time.time() - t0


def scores(folder: Path, source: str, scale: int, n: int) -> tuple[dict, dict]:
    """Mean PSNR and LR-PSNR over images and samples, and the sample arrays by file name."""
    psnrs, lr_psnrs, arrays = [], [], {}
    for stem, hr, _ in load_pairs(source, scale):
        names = [f"{stem}_sample{i:05d}.png" for i in range(n)]
        if not (folder / names[0]).is_file():
            names = [f"{stem}.png"]  # a deterministic model with --n 1
        srs = [read_image(folder / name) for name in names]
        arrays.update(zip(names, srs))
        row = evaluate_image(hr, srs, scale)
        psnrs.append(row["PSNR_mean"])
        lr_psnrs.append(row["LRPSNR_mean"])
    return {"PSNR": float(np.mean(psnrs)), "LRPSNR": float(np.mean(lr_psnrs))}, arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", nargs="+", required=True)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    parser.add_argument("--input", default="demo", help="HR folder (default: the demo val set)")
    args = parser.parse_args()
    result = {
        **machine(),
        "input": args.input,
        "n": args.n,
        "device": args.device,
        "load_average": os.getloadavg(),
        "models": {},
    }
    # every checkpoint read first: a missing or bad last one is said now, not after the others ran
    checkpoints = {ckpt: read_checkpoint(ckpt) for ckpt in args.ckpt}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (ckpt, ck) in enumerate(checkpoints.items()):
            scale = int(ck["model_cfg"]["scale"])
            row = {"checkpoint": ckpt, "step": ck.get("step"), "scale": scale}
            arrays = {}
            amps = [a for a in args.amp if a != "fp16" or MODELS[ck["model"]].fits_float16]
            row.update({a: "refused by sr_sample.py (fits_float16 False)" for a in args.amp
                        if a not in amps})  # fmt: skip
            for amp in ("none", *amps):
                folder, seconds = run(ckpt, args.input, amp, args.n, Path(tmp) / f"{k}_{amp}",
                                      args.device)  # fmt: skip
                row[amp], arrays[amp] = scores(folder, args.input, scale, args.n)
                row[amp]["seconds"] = round(seconds, 3)
            for amp in amps:
                for key in ("PSNR", "LRPSNR"):
                    row[amp][f"{key}_change_dB"] = row[amp][key] - row["none"][key]
                row[amp]["max_pixel_difference"] = max(
                    int(np.abs(a.astype(int) - arrays[amp][name]).max())
                    for name, a in arrays["none"].items()
                )
            result["models"][f"{ck['model']} ({ckpt})"] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        main()
