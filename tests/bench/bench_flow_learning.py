"""Learning check: a small srflow trained on the demo data at x4 for <= 15 CPU minutes.

Follows the paper's two-stage recipe inside the budget, all through `sr_train.main` (the real loop:
non-finite guard, schedule, frozen encoder):
  1. `rrdb` with the same small encoder config, L1, for --rrdb-minutes (the official SRFlow runs
     start from an L1-trained RRDB; --rrdb-minutes 0 skips this and starts from random weights);
  2. `srflow --rrdb-init <that checkpoint>`: 1 step (ActNorm data init; gives the first validation
     NLL), then resumed up to --steps or the rest of the budget, whichever comes first, with the
     encoder frozen for the first half of --steps (the paper).
Then, on centre crops of the demo validation images:
  - validation NLL (bits per HR pixel, eval mode, no dequantisation noise) must fall by >= 1 bit
    from its first value;
  - the temperature-0 output must beat bicubic upsampling (MATLAB imresize) in PSNR;
  - 10 samples at temperature 0.9 must differ (NTIRE diversity score > 0) and keep NTIRE LR-PSNR
    >= 40 dB (`sr_lib.metrics.evaluate_image(..., ntire=True)`); the LR-PSNR of the
    temperature-0 output is reported too.
LPIPS (for the diversity score) uses the official AlexNet weights when they can be found offline.
Otherwise it uses a RANDOM-weight AlexNet trunk (with lpips' own v0.1 linear heads), saved to a
temp file and labelled so in the output: the score then only shows that samples differ; its value
is not comparable with NTIRE numbers. The demo images are a demo, not a benchmark.

    python tests/bench/bench_flow_learning.py [--minutes 14] [--rrdb-minutes 4] [--out DIR]
    python tests/bench/bench_flow_learning.py --steps 3 --minutes 1 --rrdb-minutes 0.1  # smoke run
"""

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without install
from machine import machine  # noqa: E402  (this folder)

import sr_train  # noqa: E402
from sr_lib import metrics  # noqa: E402
from sr_lib.data import load_pairs, to_tensor, to_uint8  # noqa: E402
from sr_lib.errors import CheckpointError  # noqa: E402
from sr_lib.models import load_model  # noqa: E402
from sr_lib.models.base import NoiseSource, sample_seed  # noqa: E402
from sr_lib.resize import imresize  # noqa: E402

SCALE = 4
# "e.g. 4 RRDB blocks, K = 4, hidden 32": every RRDB block stacked, 32 encoder features.
ENCODER_FLAGS = ["--nb", "4", "--nf", "32", "--gc", "16"]
MODEL_FLAGS = [*ENCODER_FLAGS, "--rrdb-blocks", "0,1,2,3", "--flow-steps", "4",
               "--hidden-channels", "32"]  # fmt: skip


def lpips_metric(tmp: Path) -> tuple[metrics.LpipsMetric, str]:
    try:
        return metrics.LpipsMetric.load(offline=True), "official (AlexNet ImageNet + lpips v0.1)"
    except CheckpointError:
        import lpips

        torch.manual_seed(0)
        net = lpips.LPIPS(net="alex", version="0.1", spatial=True, pretrained=True,
                          pnet_rand=True, verbose=False)  # fmt: skip
        path = tmp / "lpips_random_alexnet.pth"
        torch.save(net.state_dict(), path)
        label = (
            "RANDOM-weight AlexNet trunk (ImageNet weights not available offline): the "
            "diversity score only shows that samples differ, not comparable to NTIRE"
        )
        return metrics.LpipsMetric.load(weights=path), label


@torch.no_grad()
def evaluate(ckpt: Path, pairs, n: int, lpips=None) -> dict:
    model, _ = load_model(ckpt)
    rows = []
    for stem, hr, lr in pairs:
        x = to_tensor(lr)[None]
        row = {"nll": model.nll(x, to_tensor(hr)[None]).item()}
        if lpips is not None:
            t0 = to_uint8(model.sample(x, 1, 0.0)[0, 0])
            row["psnr_t0"] = metrics.psnr(t0, hr)
            row["lr_psnr_t0"] = metrics.lr_psnr(t0, lr, SCALE)
            row["psnr_bicubic"] = metrics.psnr(imresize(lr, SCALE), hr)
            noise = NoiseSource([sample_seed(0, stem, i) for i in range(n)])
            samples = list(to_uint8(model.sample(x, n, 0.9, noise)[0]))
            row.update(metrics.evaluate_image(hr, samples, SCALE, lpips, ntire=True))
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


@torch.no_grad()
def rrdb_stats(ckpt: Path, pairs) -> dict:
    """Steps and validation PSNR of the pre-trained encoder network (its own L1 output)."""
    model, ck = load_model(ckpt)
    out = [metrics.psnr(to_uint8(model.sample(to_tensor(lr)[None], 1)[0, 0]), hr)
           for _, hr, lr in pairs]  # fmt: skip
    return {"rrdb_steps": ck["step"], "rrdb_psnr": float(np.mean(out))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=14.0, help="training time budget")
    parser.add_argument("--rrdb-minutes", type=float, default=4.0, help="RRDB L1 pre-training")
    parser.add_argument("--steps", type=int, default=800, help="flow schedule length (~0.7 s each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=24, help="LR patch (HR 96)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--val-crop", type=int, default=192, help="HR centre crop of val images")
    parser.add_argument("--n", type=int, default=10, help="samples per image at temperature 0.9")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="run folder (default: a temp folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "run")
        common = ["--model", "srflow", "--scale", str(SCALE), "--data", "demo", "--out", str(out),
                  "--batch", str(args.batch), "--patch", str(args.patch), "--learning-rate",
                  str(args.learning_rate), "--val-every", "0", "--save-every", "500",
                  "--log-every", "50", "--workers", "0", *MODEL_FLAGS]  # fmt: skip
        pairs = load_pairs("demo", SCALE, crop=args.val_crop)
        t0 = time.time()
        rrdb = {}
        if args.rrdb_minutes > 0:
            rrdb_out = out.with_name(out.name + "_rrdb")
            pretrain = ["--model", "rrdb", "--scale", str(SCALE), "--data", "demo", "--out",
                        str(rrdb_out), "--batch", str(args.batch), "--patch", str(args.patch),
                        "--learning-rate", str(args.learning_rate), "--steps", "1000000",
                        "--time-budget", str(args.rrdb_minutes * 60), "--val-every", "0",
                        "--save-every", "500", "--log-every", "50", "--workers", "0",
                        *ENCODER_FLAGS]  # fmt: skip
            with contextlib.redirect_stdout(sys.stderr):  # training logs; stdout is the JSON
                assert sr_train.main(pretrain) == 0
            rrdb = rrdb_stats(rrdb_out / "last.pt", pairs)
            common += ["--rrdb-init", str(rrdb_out / "last.pt")]
        with contextlib.redirect_stdout(sys.stderr):  # training logs; stdout is the JSON
            assert sr_train.main([*common, "--steps", "1"]) == 0
        first = evaluate(out / "last.pt", pairs, args.n)
        budget = max(1.0, args.minutes * 60 - (time.time() - t0))  # every stage counts
        with contextlib.redirect_stdout(sys.stderr):
            rc = sr_train.main([*common, "--steps", str(args.steps), "--resume", "auto",
                                "--time-budget", str(budget)])  # fmt: skip
        train_s = time.time() - t0
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        lpips, lpips_label = lpips_metric(Path(tmp))
        last = evaluate(out / "last.pt", pairs, args.n, lpips)

    result = {
        **machine(),
        "benchmark": "srflow learning check, demo data, x4",
        "model_flags": " ".join(MODEL_FLAGS),
        "rrdb_pretraining_minutes": args.rrdb_minutes,
        **rrdb,
        "train_rc": rc,
        "steps_done": ck["step"],
        "skipped_steps": ck["skipped"],
        "train_minutes": train_s / 60,
        "val_nll_first": first["nll"],
        "val_nll_last": last["nll"],
        "val_nll_drop": first["nll"] - last["nll"],
        "psnr_t0": last["psnr_t0"],
        "psnr_bicubic": last["psnr_bicubic"],
        "diversity_score": last["score"],
        "lpips_mean": last["LPIPS_mean"],
        "lr_psnr_mean": last["LRPSNR_mean"],
        "lr_psnr_t0": last["lr_psnr_t0"],
        "lr_psnr_worst": last["LRPSNR_worst"],
        "lpips_weights": lpips_label,
        "val_images": [p[0] for p in pairs],
        "val_hr_size": list(pairs[0][1].shape[:2]),
    }
    result["targets"] = {
        "nll_drop_ge_1_bit": result["val_nll_drop"] >= 1.0,
        "t0_beats_bicubic": result["psnr_t0"] > result["psnr_bicubic"],
        "diversity_gt_0": result["diversity_score"] > 0,
        "lr_psnr_ge_40": result["lr_psnr_mean"] >= 40.0 and not math.isnan(result["lr_psnr_mean"]),
    }
    result["loadavg_before"] = load_before
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
