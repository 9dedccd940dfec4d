"""Parity check (run by hand): a released EDSR-PyTorch state_dict loaded by srspace computes the
released network's function, rescaled from [0, 255] to [0, 1].

The released code (sanghyun-son/EDSR-PyTorch, MIT) is not part of this repository: give the path
of its `src/model` folder (edsr.py and common.py; the script imports them as the package `model`,
as the released code does). For the six released configurations (EDSR-baseline: 16 blocks of 64
features, residual scaling 1; EDSR: 32 blocks of 256 features, 0.1; each at x2, x3 and x4) this
script, on CPU:

 1. builds the released network (`model.edsr.EDSR`, --rgb_range 255) with seeded random weights
    (biases too: PyTorch's default initialisation keeps them small, which would hide a bias that
    is not rescaled);
 2. saves its state_dict (what a released edsr_*.pt file holds) and loads it through srspace's
    public path, `load_model(path, model="edsr", scale=s)` (what `sr_sample.py --ckpt FILE
    --model edsr --scale s` does);
 3. feeds both one random non-square LR image x in [0, 1], the released network 255·x, and
    compares released(255·x) / 255 with srspace's output before clamping (`predict`), in
    float64 (everything built and run in double) and in float32.
    Tolerance: max |difference| <= 1e-12 (float64) and 1e-4 (float32) on the [0, 1] scale.

Prints one line per case on stderr and, on stdout, one JSON object with the max differences; exit
status 0 only if every case agrees. ~1 min on 2 cores (the full EDSR at x4 is the bulk).

    python tests/bench/check_edsr_parity.py --released EDSR-PyTorch/src/model
"""

import argparse
import json
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without install
from sr_lib.errors import UsageError, exit_on_error  # noqa: E402

CONFIGS = {"baseline": (16, 64, 1.0), "full": (32, 256, 0.1)}  # blocks, features, res_scale
TOL = {"float64": 1e-12, "float32": 1e-4}
LR_SIZE = (13, 17)

REPO = "sanghyun-son/EDSR-PyTorch"


def released_edsr(folder: str, blocks: int, feats: int, res_scale: float, scale: int):
    """The released network of `folder` (its src/model) at one configuration, --rgb_range 255."""
    sys.path.insert(0, str(Path(folder).resolve().parent))
    from model import edsr  # the released module, from `folder`

    args = Namespace(
        n_resblocks=blocks, n_feats=feats, scale=[scale], rgb_range=255, n_colors=3,
        res_scale=res_scale,
    )  # fmt: skip
    return edsr.EDSR(args)


def run_case(folder: str, config: str, scale: int, dtype_name: str, seed: int) -> dict:
    import torch

    from sr_lib.models import load_model

    dtype = getattr(torch, dtype_name)
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    blocks, feats, res_scale = CONFIGS[config]
    net = released_edsr(folder, blocks, feats, res_scale, scale).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".bias") and not name.startswith(("sub_mean", "add_mean")):
                p.normal_(0, 1.0)  # a bias of pixel size on the 255 scale
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"edsr_{config}_x{scale}.pt"
        torch.save(net.state_dict(), path)
        ours, ck = load_model(path, model="edsr", scale=scale)
    x = torch.rand(1, 3, *LR_SIZE)
    with torch.no_grad():
        want = net(255 * x) / 255
        got = ours.predict(x)[0]
    torch.set_default_dtype(torch.float32)
    d = (want - got).abs().max().item()
    return {
        "max_abs": d,
        "rel": d / want.abs().max().item(),
        "cfg": {k: ck["model_cfg"][k] for k in ("n_blocks", "n_feats", "res_scale")},
        "ok": d <= TOL[dtype_name] and ck["model_cfg"]["res_scale"] == res_scale,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--released", required=True, help="EDSR-PyTorch's src/model folder")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4, 8])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    folder = Path(args.released)
    if not folder.is_dir():
        raise UsageError(f"--released {folder}: no such folder; give {REPO}'s src/model")
    if not (folder / "edsr.py").is_file() or not (folder / "common.py").is_file():
        raise UsageError(
            f"--released {folder}: not a checkout of {REPO}'s src/model (no edsr.py and common.py)"
        )
    results = {}
    for config in args.configs:
        for scale in args.scales:
            for dtype in TOL:
                res = run_case(str(folder), config, scale, dtype, args.seed)
                results[f"{config}:x{scale}:{dtype}"] = res
                # progress on stderr: stdout is the one JSON object
                print(f"edsr {config} x{scale} {dtype}: {'ok' if res['ok'] else 'MISMATCH'} "
                      f"(max |diff| {res['max_abs']:.2e})", file=sys.stderr)  # fmt: skip
    ok = all(r["ok"] for r in results.values())
    print(json.dumps({"ok": ok, "cases": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        sys.exit(main())
