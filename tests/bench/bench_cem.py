"""Check: NTIRE LR-PSNR of `bicubic` samples without and with the CEM (issue 5 closing note).

On the demo validation images (`load_pairs("demo", scale)`: HR cropped to a multiple of 8, LR its
uint8 MATLAB-bicubic downscale), at ×4 and ×8: the bicubic model's sample as `sample()` returns it
(clamped), then the same sample through `sr_lib.cem.cem(sample, lr, scale)` and clamped again, each
saved as uint8 (what sr_sample.py writes) and scored with the NTIRE `LRPSNR_mean`
(`sr_lib.metrics.evaluate_image`). Also reports the float residual max |Down(CEM(x)) − lr| before
clamping and quantisation (the CEM itself is exact; uint8 rounding of the PNG sets the ceiling).
The demo images are a smoke test, not a benchmark. Prints one JSON object.

    python tests/bench/bench_cem.py [--scales 4 8]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
from sr_lib import metrics  # noqa: E402
from sr_lib.cem import cem  # noqa: E402
from sr_lib.data import load_pairs, to_tensor, to_uint8  # noqa: E402
from sr_lib.models import build_model  # noqa: E402
from sr_lib.resize import imresize_torch  # noqa: E402


def lr_psnr_mean(hr: np.ndarray, sr: torch.Tensor, scale: int) -> float:
    return metrics.evaluate_image(hr, [to_uint8(sr)], scale, ntire=True)["LRPSNR_mean"]


def run_scale(scale: int) -> dict:
    model = build_model("bicubic", {"scale": scale}).eval()
    rows = {}
    for stem, hr, lr_u8 in load_pairs("demo", scale):
        lr = to_tensor(lr_u8)[None]  # (1, 3, H, W): the model's actual LR input
        sr = model.sample(lr, n=1)[:, 0]  # (1, 3, sH, sW), clamped to [0, 1]
        x = cem(sr.double(), lr.double(), scale)  # float64 here only to report the exactness
        rows[stem] = {
            "hr_size": list(hr.shape[:2]),
            "LRPSNR_mean_bicubic": lr_psnr_mean(hr, sr[0], scale),
            "LRPSNR_mean_bicubic_cem": lr_psnr_mean(hr, cem(sr, lr, scale)[0].clamp(0, 1), scale),
            "float32_cem_residual_max": float(
                (imresize_torch(cem(sr, lr, scale), 1 / scale) - lr).abs().max()
            ),
            "float64_cem_residual_max": float((imresize_torch(x, 1 / scale) - lr).abs().max()),
        }
    mean = {
        k: float(np.mean([r[k] for r in rows.values()]))
        for k in ("LRPSNR_mean_bicubic", "LRPSNR_mean_bicubic_cem")
    }
    return {"images": rows, "mean_over_images": mean}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args(argv)
    t0 = time.time()
    result = {
        "what": "NTIRE LRPSNR_mean (dB) of uint8 bicubic samples on the demo val images "
        "(not a benchmark), without and with the exact MATLAB-bicubic CEM",
        **{f"x{s}": run_scale(s) for s in args.scales},
        "seconds": round(time.time() - t0, 2),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
