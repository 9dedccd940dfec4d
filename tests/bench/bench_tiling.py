"""Benchmark: how far tiled samples are from untiled ones, per model and tile context.

For each model (the paper's configuration with random weights, its zero-initialised parameters
drawn at random too so that every part of the network depends on its input; or a trained
checkpoint with --ckpt), one LR image of --lr-size px (a smooth random image) is sampled whole
and in tiles of --tile px with each context of --contexts (LR px around each tile; `halo` = the
model's tile_halo, sr_sample.py's default), on the same seeds, at the model's temperature, in
float32 as sr_sample.py runs. Reports the largest difference of the 8-bit samples (x/255), the
share of 8-bit values that differ, and the seconds of each run. Prints one JSON object. The flows
are left out of the random-weight models: random couplings barely depend on their neighbours, so
no context changes an 8-bit value (measured: SRFlow-DA and NCSR, 0 at every context down to 0);
measure a trained flow with --ckpt.

    python tests/bench/bench_tiling.py [--models srflow vspsr ...] [--ckpt run/last.pt ...]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
from machine import machine  # noqa: E402  (this folder)

from sr_lib.data import to_uint8  # noqa: E402
from sr_lib.errors import exit_on_error  # noqa: E402
from sr_lib.models import MODELS, build_model, load_model  # noqa: E402
from sr_lib.models.base import NoiseSource, pad_to_multiple  # noqa: E402
from sr_lib.tiling import draw, prepare  # noqa: E402

OFFLINE = {"vspsr": {"lambda_per": 0.0}, "refvae": {"pretrained": False},
           "varsr": {"pretrained": False}}  # fmt: skip  # no ImageNet weights needed


def random_model(name: str, scale: int):
    torch.manual_seed(0)
    model = build_model(name, {"scale": scale, **OFFLINE.get(name, {})}).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return model


def smooth_image(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    small = torch.rand(1, 3, size // 8 + 1, size // 8 + 1, generator=g)
    img = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False)
    return (img + 0.05 * torch.rand(1, 3, size, size, generator=g)).clamp(0, 1)


def measure(model, lr, tile: int, contexts: list[str], n: int) -> dict:
    seeds = list(range(n))
    controls = {}
    if getattr(model, "z_dim", None):  # latent models: the whole image's latents, as sr_sample
        with torch.no_grad():
            x = pad_to_multiple(lr, model.lr_multiple)
            controls = {
                "latent": model.latents(x, n, model.default_temperature, NoiseSource(seeds))
            }
    temperature = model.default_temperature
    t0 = time.time()
    prepared = prepare(model, lr)
    whole = to_uint8(draw(model, lr, seeds, temperature, 0, 0, False, controls, prepared))
    row = {"tile_halo": model.tile_halo, "untiled_s": round(time.time() - t0, 1), "contexts": {}}
    for c in contexts:
        context = model.tile_halo if c == "halo" else int(c)
        t0 = time.time()
        sr = draw(model, lr, seeds, temperature, tile, context, False, controls, prepared)
        diff = (torch.from_numpy(to_uint8(sr)).int() - torch.from_numpy(whole).int()).abs()
        row["contexts"][f"{c} ({context} px)"] = {
            "max_difference_255": int(diff.max()),
            "share_of_values_differing": float((diff > 0).float().mean()),
            "seconds": round(time.time() - t0, 1),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    flows = ("srflow", "srflow_da", "ncsr")
    parser.add_argument(
        "--models", nargs="*", default=[m for m in MODELS if m != "bicubic" and m not in flows]
    )
    parser.add_argument("--ckpt", nargs="*", default=[])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--lr-size", type=int, default=96)
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--contexts", nargs="+", default=["halo", "32", "16", "8", "0"])
    parser.add_argument("--n", type=int, default=2)
    args = parser.parse_args()
    result = {**machine(),
              "lr_size": args.lr_size, "tile": args.tile, "n": args.n, "scale": args.scale,
              "load_average": os.getloadavg(),
              "models": {}}  # fmt: skip
    # the checkpoints loaded first: a missing or bad one is said now, not after the random models
    trained = {ckpt: load_model(ckpt) for ckpt in args.ckpt}
    lr = smooth_image(args.lr_size)
    for name in args.models:
        model = random_model(name, args.scale)
        result["models"][f"{name} (random weights)"] = measure(model, lr, args.tile,
                                                               args.contexts, args.n)  # fmt: skip
        print(json.dumps(result["models"]), file=sys.stderr, flush=True)
    for ckpt, (model, ck) in trained.items():
        result["models"][f"{ck['model']} ({ckpt})"] = measure(model, lr, args.tile,
                                                               args.contexts, args.n)  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        main()
