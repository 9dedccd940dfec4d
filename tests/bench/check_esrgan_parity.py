"""Parity check (run by hand): `--model rrdb` with ESRGAN's skip computes the released ESRGAN
RRDBNet's function, loaded from each of the released key layouts.

The released code (xinntao/ESRGAN, Apache-2.0; read and run, nothing copied) is not part of this
repository: give the path of a checkout. For nb = 23 (the released RRDB_ESRGAN_x4.pth and
RRDB_PSNR_x4.pth) and a tiny nb = 2, this script, on CPU:

 1. builds the released `RRDBNet_arch.RRDBNet(3, 3, 64, nb)` with seeded random weights (its own
    initialisation; every bias randomised too, so a bias lost in the mapping shows);
 2. writes its state_dict in three layouts: the new one as the released code saves it
    (RRDB_ESRGAN_x4.pth), the old architecture (RRDB_ESRGAN_x4_old_arch.pth: the inverse of the
    released `transer_RRDB_models.py`, which is run on the nb = 23 file to check that it turns it
    back into the new one), and BasicSR's RRDBNet names (by BasicSR's documented names; BasicSR
    itself is not run here);
 3. loads each through srspace's public path, `load_model(path, model="rrdb", scale=4,
    global_skip=...)` (what `sr_sample.py --ckpt FILE --model rrdb --scale 4 [--global-skip
    esrgan]` does),
    and compares its output on a 2-image 12×10 LR batch with the released forward, in float32
    and in float64. Tolerance: max |difference| <= 1e-5 (float32), 1e-12 (float64).

It also reports how far SRFlow's skip is from the released output on the same weights (what
loading an ESRGAN file without `--global-skip esrgan` would give).

Prints one line per case on stderr and, on stdout, one JSON object with the max differences; exit
status 0 only if every case agrees. About 2 min on 2 cores.

    python tests/bench/check_esrgan_parity.py --released ESRGAN/
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without install

sys.path.insert(0, str(ROOT / "tests"))
from test_rrdb_released import basicsr, old_arch  # noqa: E402

from sr_lib.errors import UsageError, exit_on_error  # noqa: E402
from sr_lib.models import load_model  # noqa: E402

REPO = "xinntao/ESRGAN"
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def transer_roundtrip(released: Path, old: dict, new: dict) -> bool:
    """Run the released transer_RRDB_models.py (nb = 23 only: it hard-codes it) on the old-layout
    file; True if it writes back exactly the new-layout state_dict."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").mkdir()
        torch.save(old, Path(tmp) / "models" / "RRDB_ESRGAN_x4.pth")
        env = {"PYTHONPATH": str(released)}
        script = str(released / "transer_RRDB_models.py")
        subprocess.run([sys.executable, script], cwd=tmp, env=env, check=True, capture_output=True)
        back = torch.load(Path(tmp) / "models" / "RRDB_ESRGAN_x4.pth", weights_only=True)
    return set(back) == set(new) and all(torch.equal(back[k], new[k]) for k in new)


def lr_batch(dtype) -> torch.Tensor:
    """Two smooth, non-square LR images in [0.1, 0.9]."""
    y = torch.arange(12, dtype=torch.float64).view(1, 1, 12, 1)
    x = torch.arange(10, dtype=torch.float64).view(1, 1, 1, 10)
    c = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    b = torch.arange(2, dtype=torch.float64).view(2, 1, 1, 1)
    return (0.5 + 0.4 * torch.sin(0.7 * y + 0.45 * x + 1.1 * c + 0.9 * b)).to(dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--released", required=True, help=f"a checkout of {REPO}")
    args = parser.parse_args(argv)
    # one line before any work, not the import's traceback (as the other parity checks)
    if not Path(args.released).is_dir():
        raise UsageError(f"--released {args.released}: no such folder; give a checkout of {REPO}")
    for need in ("RRDBNet_arch.py", "transer_RRDB_models.py"):
        if not (Path(args.released) / need).is_file():
            raise UsageError(f"--released {args.released}: not a checkout of {REPO} (no {need})")
    released = Path(args.released).resolve()
    sys.path.insert(0, str(released))
    import RRDBNet_arch as arch

    results, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        for nb in (23, 2):
            torch.manual_seed(nb)
            net = arch.RRDBNet(3, 3, 64, nb, gc=32)
            with torch.no_grad():
                for name, p in net.named_parameters():
                    if name.endswith("bias"):
                        p.uniform_(-0.05, 0.05)
            new = {k: v.clone() for k, v in net.state_dict().items()}
            files = {"new": new, "old_arch": old_arch(new, nb), "basicsr": basicsr(new)}
            if nb == 23:
                results["transer_roundtrip_nb23"] = transer_roundtrip(
                    released, files["old_arch"], new
                )
                ok &= results["transer_roundtrip_nb23"]
            for layout, sd in files.items():
                path = Path(tmp) / f"{layout}_{nb}.pth"
                torch.save(sd, path)
                # the other two layouts say it themselves
                global_skip = "esrgan" if layout == "new" else None
                ours, ck = load_model(path, model="rrdb", scale=4, global_skip=global_skip)
                assert ck["model_cfg"]["global_skip"] == "esrgan" and ck["model_cfg"]["nb"] == nb
                for dtype in (torch.float32, torch.float64):
                    lr = lr_batch(dtype)
                    with torch.no_grad():
                        want = net.to(dtype)(lr)
                        got = ours.to(dtype).net(lr)
                    diff = (got - want).abs().max().item()
                    case = f"nb{nb}_{layout}_{str(dtype)[6:]}"
                    results[case] = diff
                    good = diff <= TOLERANCE[dtype]
                    ok &= good
                    print(
                        f"{case}: max |diff| {diff:.3g} {'ok' if good else 'FAIL'}", file=sys.stderr
                    )
            srflow, _ = load_model(
                Path(tmp) / f"new_{nb}.pth", model="rrdb", scale=4, global_skip="srflow"
            )
            with torch.no_grad():
                lr = lr_batch(torch.float64)
                results[f"nb{nb}_srflow_skip_instead"] = (
                    (srflow.double().net(lr) - net.double()(lr)).abs().max().item()
                )
            net.float()
    results["ok"] = bool(ok)
    print(json.dumps(results))
    return 0 if ok else 1


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        sys.exit(main())
