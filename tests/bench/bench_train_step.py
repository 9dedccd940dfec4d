"""Seconds per training step of a model, in both memory formats. Run by hand; prints one JSON.

    python tests/bench/bench_train_step.py [--model edsr] [--scale 4] [--batch 8] [--patch 24]
                                           [--losses l1 le] [--rounds 6]

What the NHWC (channels-last) memory format would buy a training step: each (loss, format) runs
forward + backward + Adam on fixed random patches; the configurations take turns (`--rounds`
rounds of 3 steps each), so a machine that speeds up or slows down during the run affects all of
them alike. Reports the median and the fastest round per configuration; it fails if a
configuration's loss is not finite (a timing of a diverged step would mean nothing). Which
layers take the time: use a profiler.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from machine import machine  # noqa: E402  (this folder)

from sr_lib.models import MODELS  # noqa: E402


def make_step(a, loss: str, channels_last: bool):
    cls = MODELS[a.model]
    extra = {"loss": loss} if loss != "default" else {}
    torch.manual_seed(0)
    model = cls(cls.Config(scale=a.scale, **extra))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.generator_parameters(), 1e-4)
    lr = torch.rand(a.batch, 3, a.patch, a.patch).contiguous(memory_format=fmt)
    hr = torch.rand(a.batch, 3, a.scale * a.patch, a.scale * a.patch)

    def step():
        out = model(lr, hr)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="edsr", choices=list(MODELS))
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=24, help="LR patch")
    p.add_argument("--losses", nargs="+", default=["l1", "le"], help="for edsr/rrdb")
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    if "loss" not in MODELS[a.model].Config.__dataclass_fields__:
        a.losses = ["default"]  # models without --loss
    configs = [(loss, cl) for loss in a.losses for cl in (False, True)]
    steps = {c: make_step(a, *c) for c in configs}
    for step in steps.values():  # warm-up: oneDNN picks and caches its kernels
        step()
        step()
    times = {c: [] for c in configs}
    load0 = os.getloadavg()
    for _ in range(a.rounds):
        for c in configs:
            t0 = time.perf_counter()
            for _ in range(3):
                steps[c]()
            times[c].append((time.perf_counter() - t0) / 3)
    result = {**machine(),
              "bench": "train_step", "model": a.model, "scale": a.scale, "batch": a.batch,
              "patch": a.patch, "threads": torch.get_num_threads(),
              "loadavg_start": load0}  # fmt: skip
    for loss, cl in configs:
        t = times[(loss, cl)]
        key = f"{loss}_{'channels_last' if cl else 'nchw'}"
        result[key] = {"median_s": round(float(np.median(t)), 4), "min_s": round(min(t), 4)}
    for loss in a.losses:
        nchw, nhwc = (result[f"{loss}_{f}"]["median_s"] for f in ("nchw", "channels_last"))
        result[f"{loss}_channels_last_speedup"] = round(nchw / nhwc, 3)
    for c, step in steps.items():
        loss = step()
        assert torch.isfinite(loss), f"{c}: non-finite loss {loss.item()}"
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
