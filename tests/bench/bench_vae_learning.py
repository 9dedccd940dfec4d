"""Learning check for RefVAE and VarSR (issue 6): small ×4 models trained on the demo data on CPU.

Each model trains through `sr_train.main` under a wall-clock budget (default 11 min, so training
plus evaluation stays within 15 min per model), then on the demo validation images
(`load_pairs("demo", 4)`) the script reports, for n = 10 samples per image at the model's default
temperature (RefVAE: one Gaussian-noise reference per sample, its default sampling mode):
  - PSNR (RGB, shave 4) of the samples (mean over samples and images) vs MATLAB bicubic;
  - the NTIRE diversity score and LPIPS_mean, computed with a RANDOM-WEIGHT LPIPS (random AlexNet
    trunk, the v0.1 heads shipped with the lpips package): "random-weight LPIPS, not real LPIPS"
    numbers, they show that the samples differ, no more;
  - the NTIRE LRPSNR_mean of the samples.
RANDOM-WEIGHT NETWORKS: no ImageNet weights are used. RefVAE runs with --no-pretrained (its frozen
VGG19 encoder is randomly initialised) and its VGG content/style and LPIPS terms off; VarSR runs
with its perceptual term off. The demo images are a smoke test, not a benchmark. Prints one JSON
object; pass/fail flags: PSNR(samples) > PSNR(bicubic) and diversity > 0, per model.

    python tests/bench/bench_vae_learning.py                       # the full check (~2 x 13 min)
    python tests/bench/bench_vae_learning.py --steps 3 --n 3       # end-to-end smoke run
"""

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
from machine import machine  # noqa: E402  (this folder)

import sr_train  # noqa: E402
from sr_lib import metrics  # noqa: E402
from sr_lib.data import load_pairs, to_tensor, to_uint8  # noqa: E402
from sr_lib.lpips_net import lpips_module  # noqa: E402
from sr_lib.models import load_model  # noqa: E402
from sr_lib.models.base import NoiseSource, sample_seed  # noqa: E402
from sr_lib.resize import imresize  # noqa: E402

# Small configs and short-run settings (not the paper recipes): model flags, then run flags.
SMALL = {
    "refvae": (
        ["--width", "256", "--cond-channels", "32", "--latent-grid", "8", "--z-dim", "64",
         "--mask-blocks", "1", "--ref-size", "64", "--d-channels", "16", "--no-pretrained",
         "--lambda-content", "0", "--lambda-style", "0", "--lambda-lpips", "0",
         "--lambda-adv", "0.25"],  # 64² patches have 4x the D logits per pixel of 256²
        ["--batch", "8", "--patch", "16", "--learning-rate", "2e-4"],
    ),
    "varsr": (
        ["--z-dim", "64", "--n-feats", "32", "--n-blocks", "4", "--enc-feats", "16",
         "--d-channels", "16", "--lambda-per", "0"],
        ["--batch", "16", "--patch", "24", "--learning-rate", "2e-4"],
    ),
}  # fmt: skip


def random_lpips() -> metrics.LpipsMetric:
    """LPIPS with a RANDOM AlexNet trunk (seeded): NOT the real LPIPS."""
    torch.manual_seed(0)
    return metrics.LpipsMetric(lpips_module(), info={"trunk": "random (not LPIPS)"})


def evaluate(model, pairs, n: int, lpips_metric, seed: int = 0) -> dict:
    out: dict[str, list] = {}
    for stem, hr, lr_u8 in pairs:
        noise = NoiseSource([sample_seed(seed, stem, i) for i in range(n)])
        samples = to_uint8(model.sample(to_tensor(lr_u8)[None], n, model.default_temperature,
                                        noise)[0])  # fmt: skip
        rows = {
            "bicubic": metrics.evaluate_image(hr, [imresize(lr_u8, 4)], 4),
            "samples": metrics.evaluate_image(hr, list(samples), 4, lpips_metric=lpips_metric),
        }
        for key, row in rows.items():
            for col, v in row.items():
                out.setdefault(f"{key}/{col}", []).append(v)
    return {k: metrics.dataset_mean(v) for k, v in out.items() if any(x is not None for x in v)}


def run_model(name: str, args, folder: Path, lpips_metric) -> dict:
    out = folder / f"{name}_x4"
    t0 = time.time()
    model_flags, run_flags = SMALL[name]
    train_argv = ["--model", name, "--scale", "4", "--data", "demo", "--steps", str(args.steps),
                  "--time-budget", str(args.time_budget), "--gamma", "1", "--val-every", "0",
                  "--save-every", "500", "--log-every", "50", "--workers", "1", "--out", str(out),
                  *run_flags, *model_flags]  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # training logs; stdout is the JSON
        code = sr_train.main(train_argv)
    if code != 0:
        raise SystemExit(f"{name}: training failed")
    train_s = time.time() - t0
    model, ck = load_model(out / "last.pt")
    res = evaluate(model, load_pairs("demo", 4), args.n, lpips_metric)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    psnr, bicubic = res["samples/PSNR_mean"], res["bicubic/PSNR_mean"]
    return {
        "train_argv": train_argv,
        "steps_done": ck["step"],
        "train_seconds": round(train_s, 1),
        "last_log": [r for r in log if "loss" in r][-1:],
        "metrics": res,
        "checks": {
            "psnr_samples_beat_bicubic": psnr > bicubic,
            "diversity_random_lpips_positive": (res.get("samples/score") or 0) > 0,
        },
        "total_seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["refvae", "varsr"], choices=list(SMALL))
    parser.add_argument("--steps", type=int, default=100_000, help="upper bound on steps")
    parser.add_argument("--time-budget", type=float, default=660, help="training s per model")
    parser.add_argument("--out", default="", help="run folder (default: a temporary one)")
    parser.add_argument("--n", type=int, default=10, help="samples per validation image")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.out or tmp.name)
    lpips_metric = random_lpips()
    result = {
        **machine(),
        "what": "RefVAE / VarSR x4 small configs on the demo data (not a benchmark); random-weight "
        "VGG encoder (RefVAE), no perceptual terms; LPIPS and diversity use random-weight LPIPS, "
        "not real LPIPS",
        **{name: run_model(name, args, folder, lpips_metric) for name in args.models},
    }
    print(json.dumps(result, indent=1, default=lambda v: None if math.isnan(v) else v))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
