"""Learning check for VSpSR (issue 5): a small ×4 model trained on the demo data on CPU (≤ 15 min).

Trains through `sr_train.main` (λ_per = 0: no VGG weights needed; the LSGAN term stays on), then
on the demo validation images reports
  - PSNR (RGB, shave 4) of the mean sample (temperature 0) vs MATLAB bicubic, with and without the
    test-time CEM;
  - the NTIRE diversity score and LPIPS_mean of 10 samples at temperature 1, computed with a
    RANDOM-WEIGHT LPIPS (random AlexNet trunk, the v0.1 heads shipped with the lpips package).
    These are "random-weight LPIPS, not real LPIPS" numbers: they show the samples differ, no more;
  - the NTIRE LRPSNR_mean / LRPSNR_worst of those samples, with the CEM (the default) and without.
The demo images are a smoke test, not a benchmark. Prints one JSON object; pass/fail flags for
the issue's criteria: PSNR(mean sample) > PSNR(bicubic), diversity > 0, LR-PSNR with CEM ≥ 45 dB.

    python tests/bench/bench_vspsr_learning.py                   # the full check (~15 min on CPU)
    python tests/bench/bench_vspsr_learning.py --steps 5 --n 3   # end-to-end smoke run
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

SMALL = ["--n-basis", "64", "--basis-channels", "8", "--coef-channels", "8",
         "--d-channels", "8", "--lambda-per", "0"]  # fmt: skip


def random_lpips(folder: Path) -> metrics.LpipsMetric:
    """LpipsMetric from a saved random-trunk lpips state_dict: NOT the real LPIPS."""
    torch.manual_seed(0)
    path = folder / "lpips_random_alex.pth"
    torch.save(lpips_module().state_dict(), path)  # pnet_rand: random AlexNet
    return metrics.LpipsMetric.load(weights=path)


def evaluate(model, pairs, n: int, lpips_metric, seed: int = 0) -> dict:
    cem_default = model.cfg.cem_test
    out: dict[str, list] = {}
    for stem, hr, lr_u8 in pairs:
        lr = to_tensor(lr_u8)[None]
        bicubic = imresize(lr_u8, 4)
        rows = {"bicubic": metrics.evaluate_image(hr, [bicubic], 4)}
        for cem_on in (True, False):
            model.cfg.cem_test = cem_on
            tag = "cem" if cem_on else "no_cem"
            noise = NoiseSource([sample_seed(seed, stem, i) for i in range(n)])
            samples = to_uint8(model.sample(lr, n, 1.0, noise)[0])
            mean = to_uint8(model.sample(lr, 1, 0.0)[0])
            rows[f"mean_sample_{tag}"] = metrics.evaluate_image(hr, list(mean), 4)
            metric = lpips_metric if cem_on else None  # LPIPS only for what would be saved
            rows[f"samples_{tag}"] = metrics.evaluate_image(
                hr, list(samples), 4, lpips_metric=metric, ntire=True
            )
        model.cfg.cem_test = cem_default
        for key, row in rows.items():
            for col, v in row.items():
                out.setdefault(f"{key}/{col}", []).append(v)
    return {k: metrics.dataset_mean(v) for k, v in out.items() if any(x is not None for x in v)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="upper bound on steps")
    parser.add_argument("--time-budget", type=float, default=660, help="training seconds")
    parser.add_argument("--out", default="", help="run folder (default: a temporary one)")
    parser.add_argument("--n", type=int, default=10, help="samples per validation image")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--patch", type=int, default=32, help="LR patch")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.out or Path(tmp.name) / "vspsr_x4")
    t0 = time.time()
    # Small model, a constant higher learning rate and a wall-clock budget (sr_train stops
    # cleanly and saves): a short CPU run, not the paper recipe.
    train_argv = ["--model", "vspsr", "--scale", "4", "--data", "demo", "--steps", str(args.steps),
                  "--time-budget", str(args.time_budget), "--batch", "4", "--patch",
                  str(args.patch), "--learning-rate", str(args.learning_rate), "--gamma", "1",
                  "--val-every", "0", "--save-every", "500", "--log-every", "50",
                  "--workers", "1", "--out", str(out), *SMALL]  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # training logs; stdout is the JSON
        code = sr_train.main(train_argv)
    if code != 0:
        raise SystemExit("training failed")
    train_s = time.time() - t0
    model, ck = load_model(out / "last.pt")
    pairs = load_pairs("demo", 4)
    res = evaluate(model, pairs, args.n, random_lpips(Path(tmp.name)))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = [r for r in log if "loss" in r][-1]
    psnr_mean, psnr_bic = res["mean_sample_cem/PSNR_mean"], res["bicubic/PSNR_mean"]
    result = {
        **machine(),
        "what": "VSpSR x4 small config on the demo data (not a benchmark); LPIPS and diversity "
        "use random-weight LPIPS, not real LPIPS",
        "train_argv": train_argv,
        "steps_done": ck["step"],
        "train_seconds": round(train_s, 1),
        "last_log": last,
        "metrics": res,
        "checks": {
            "psnr_mean_sample_beats_bicubic": psnr_mean > psnr_bic,
            "psnr_mean_sample_no_cem_beats_bicubic": res["mean_sample_no_cem/PSNR_mean"] > psnr_bic,
            "diversity_random_lpips_positive": (res.get("samples_cem/score") or 0) > 0,
            "lrpsnr_with_cem_at_least_45": res["samples_cem/LRPSNR_mean"] >= 45,
        },
        "total_seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=1, default=lambda v: None if math.isnan(v) else v))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
