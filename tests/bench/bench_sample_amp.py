"""Benchmark: `sr_sample.py --amp bf16` against float32 on the demo validation images.

For each checkpoint: sr_sample.py (the real command) draws --n samples of the demo validation
photographs (HR cropped to a multiple of 8, LR its MATLAB-bicubic downscale) in float32 and with
`--amp bf16`, on the same seeds; every sample is scored as sr_eval.py does
(`sr_lib.metrics.evaluate_image`: PSNR against the HR with a `scale`-px shave, NTIRE LR-PSNR).
Reports per model the means over images and samples, their change under bf16, the largest pixel
difference between the two runs' PNGs, and the wall time of each run. The demo images are a
smoke test, not a benchmark of quality. Prints one JSON object.

    python tests/bench/bench_sample_amp.py --ckpt runs/edsr/last.pt runs/srflow/last.pt [--n 10]
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
import sr_sample  # noqa: E402
from sr_lib.data import load_pairs, read_image  # noqa: E402
from sr_lib.metrics import evaluate_image  # noqa: E402
from sr_lib.models import read_checkpoint  # noqa: E402


def run(ckpt: str, amp: str, n: int, out: Path, device: str) -> tuple[Path, float]:
    t0 = time.time()
    argv = ["--ckpt", ckpt, "--input", "demo", "--n", str(n), "--amp", amp, "--device", device]
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines: stdout is the JSON
        code = sr_sample.main([*argv, "--out", str(out)])
    if code != 0:
        raise SystemExit(f"sr_sample.py {' '.join(argv)} exited {code}")
    return out, time.time() - t0


def scores(folder: Path, scale: int, n: int) -> tuple[dict, dict]:
    """Mean PSNR and LR-PSNR over images and samples, and the sample arrays by file name."""
    psnrs, lr_psnrs, arrays = [], [], {}
    for stem, hr, _ in load_pairs("demo", scale):
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
    args = parser.parse_args()
    result = {"n": args.n, "device": args.device, "load_average": os.getloadavg(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for k, ckpt in enumerate(args.ckpt):
            ck = read_checkpoint(ckpt)
            scale = int(ck["model_cfg"]["scale"])
            row = {"checkpoint": ckpt, "step": ck.get("step"), "scale": scale}
            arrays = {}
            for amp in ("none", "bf16"):
                folder, seconds = run(ckpt, amp, args.n, Path(tmp) / f"{k}_{amp}", args.device)
                row[amp], arrays[amp] = scores(folder, scale, args.n)
                row[amp]["seconds"] = round(seconds, 1)
            for key in ("PSNR", "LRPSNR"):
                row[f"{key}_change_dB"] = row["bf16"][key] - row["none"][key]
            row["max_pixel_difference"] = max(
                int(np.abs(a.astype(int) - arrays["bf16"][name]).max())
                for name, a in arrays["none"].items()
            )
            result["models"][f"{ck['model']} ({ckpt})"] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
