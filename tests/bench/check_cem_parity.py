"""Parity check (run by hand): srspace's CEM (sr_lib/cem.py) against the released VSpSR CEM
(models/cem_postprocess.py over CEM/CEMnet.py), the defining properties measured on both.

The released code (zzhwfy/VSpSR; no licence: read and run, never copied) is not part of this
repository: give the path of a checkout. The two use different degradations H by design
(docs/cem.md: OpenCV bicubic a = −0.75 with replicated borders there, MATLAB imresize a = −0.5
with mirrored borders here) and `cem()` takes no kernel, so their outputs are not compared with
each other; each is compared with the exact projection for its own H, in float64:

  residual      max |H x̂ − y| (0 for a projection onto {H x̂ = y});
  idempotence   max |CEM(CEM(x)) − CEM(x)|;
  vs_exact      max |x̂ − (x + Hᵀ(HHᵀ)⁻¹(y − Hx))|, Hᵀ by autograd and (HHᵀ)⁻¹ by conjugate
                gradients to float rounding (`exact_solve_residual` says how close);
  brute force   on tiny images: max |x̂ − x̂*|, x̂* the solution of the KKT system of
                min ‖x̂ − x‖² s.t. H x̂ = y (dense H from H applied to every unit image), and
                range_HT: the least-squares residual of x̂ − x = Hᵀv (0 when the correction
                lies in the range of Hᵀ).

For the released code the `_interior` values leave out the border it declares invalid itself
(CEMnet.invalidity_margins_LR, 10 LR pixels at ×4 and ×8), and `truncation` reruns it with a
longer inverse filter (its desired_inv_hTh_energy_portion, 1 − 1e-6 in VSpSR; NFFT_add, 36).

Run-time patches of the released code (CPU-only torch; nothing in its files is changed): its
filters' `.type(torch.cuda.FloatTensor)` gives torch.DoubleTensor (float64 on CPU), and the
`.cuda()` of its imresize for kernels over 1000 taps (×8) is the identity; its one print goes to
stderr. Prints one JSON object on stdout; exit status 0 only if srspace's CEM meets every
property within 1e-12. ~13 min on 2 cores (×4 2.5 min, ×8 10 min; --scales 4 for one).

    python tests/bench/check_cem_parity.py --released VSpSR/ [--json out.json]

Environment: srspace's requirements plus scipy and opencv-python (imported by the released code).
"""

import argparse
import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without install
from sr_lib.errors import UsageError, exit_on_error  # noqa: E402

REPO = "zzhwfy/VSpSR"
TOL = 1e-12  # srspace's CEM, float64
SIZES = [(5, 7), (6, 6), (9, 4), (3, 2)]  # LR (H, W): odd, square, non-square, tiny
RAGGED = [(21, 30), (9, 17)]  # srspace only: HR sizes not a multiple of the scale
TINY = {4: (2, 3), 8: (2, 1)}  # LR of the brute-force solve (HR 8x12, 16x8)
BIG = {4: 48, 8: 32}  # LR side for the interior and truncation measurements
TRUNCATION = [(1 - 1e-6, 36), (1 - 1e-10, 36), (1 - 1e-14, 108)]


@contextlib.contextmanager
def cpu_float64_released():
    """The released code's CUDA casts as CPU float64 (see the module docstring)."""
    import torch

    saved = torch.cuda.FloatTensor, torch.Tensor.cuda
    torch.cuda.FloatTensor = torch.DoubleTensor
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        torch.cuda.FloatTensor, torch.Tensor.cuda = saved


def released_modules(path: str):
    """(CEM.CEMnet, models/cem_postprocess.py) of checkout `path`, without models/__init__."""
    sys.path.insert(0, path)
    from CEM import CEMnet  # the released package, from `path`

    spec = importlib.util.spec_from_file_location(
        "released_cem_postprocess", Path(path) / "models" / "cem_postprocess.py"
    )
    post = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(post)
    return CEMnet, post


def released_cem(mods, scale: int, energy=None, nfft_add=None):
    """The released CEM_Post as `get_cem(scale)` builds it; energy/nfft_add lengthen its filter."""
    cemnet, post = mods
    conf = cemnet.Get_CEM_Conf(scale)
    conf.lower_magnitude_bound = 0.1  # get_cem's value
    if energy is not None:
        conf.desired_inv_hTh_energy_portion = energy
    net_class = cemnet.CEMnet
    if nfft_add is not None:
        net_class = type("CEMnet", (cemnet.CEMnet,), {"NFFT_add": nfft_add})
    with cpu_float64_released():
        net = net_class(conf, upscale_kernel="cubic")
        net.WrapArchitecture_PyTorch(only_padders=True)
        module = post.CEM_Post(net)
    return module, net


def adjoint(down, hr_shape):
    """Hᵀ of the linear map `down`, by autograd (exact for any border handling)."""
    import torch

    def ht(v):
        x = torch.zeros(hr_shape, dtype=v.dtype, requires_grad=True)
        (g,) = torch.autograd.grad(down(x), x, v)
        return g

    return ht


def exact_projection(down, x, y, iters=60):
    """x + Hᵀ(HHᵀ)⁻¹(y − Hx): HHᵀ is SPD and well conditioned, so CG reaches float rounding."""
    import torch

    ht = adjoint(down, x.shape)
    r = y - down(x)
    z, res = torch.zeros_like(r), r.clone()
    p, rs = res.clone(), (res * res).sum()
    for _ in range(iters):
        ap = down(ht(p))
        a = rs / (p * ap).sum()
        z, res = z + a * p, res - a * ap
        rn = (res * res).sum()
        if rn.sqrt() <= 1e-15 * r.norm():
            break
        p, rs = res + rn / rs * p, rn
    out = x + ht(z)
    return out, (down(out) - y).abs().max().item()


def brute_force(down, cem_fn, scale, hr, seed):
    """Max |x̂ − x̂*| with x̂* from the KKT system, and the range-of-Hᵀ residual (one channel)."""
    import torch

    n = hr[0] * hr[1]
    basis = torch.eye(n).reshape(n, 1, *hr).expand(n, 3, *hr)  # every unit image, 3 channels
    with torch.no_grad():
        h = down(basis.contiguous())[:, 0].reshape(n, -1).T  # (m, n)
    m = h.shape[0]
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, generator=g), torch.rand(m, generator=g)
    kkt = torch.zeros(n + m, n + m)
    kkt[:n, :n], kkt[:n, n:], kkt[n:, :n] = torch.eye(n), h.T, h
    best = torch.linalg.solve(kkt, torch.cat([x, y]))[:n]
    lr_shape = (1, 3, *down(torch.zeros(1, 3, *hr)).shape[-2:])
    with torch.no_grad():
        out = cem_fn(
            x.reshape(1, 1, *hr).expand(1, 3, *hr), y.reshape(lr_shape[-2:]).expand(lr_shape)
        )
    out = out[0, 0].reshape(-1)
    v = torch.linalg.lstsq(h.T, (out - x)[:, None]).solution
    return {
        "hr": list(hr),
        "vs_kkt": (out - best).abs().max().item(),
        "range_HT": (h.T @ v - (out - x)[:, None]).abs().max().item(),
    }


def properties(down, cem_fn, x, y, margin=0, scale=1):
    """residual, idempotence and vs_exact (and their interiors past `margin` LR pixels)."""
    import torch

    with torch.no_grad():
        out = cem_fn(x, y)
        res = (down(out) - y).abs()
        idem = (cem_fn(out, y) - out).abs()
    exact, solve_res = exact_projection(down, x, y)
    diff = (out - exact).abs().detach()
    row = {
        "residual": res.max().item(),
        "idempotence": idem.max().item(),
        "vs_exact": diff.max().item(),
        "exact_solve_residual": solve_res,
    }
    k, hk = margin, margin * scale
    if k and min(y.shape[-2:]) > 2 * k:
        row["residual_interior"] = res[..., k:-k, k:-k].max().item()
        row["idempotence_interior"] = idem[..., hk:-hk, hk:-hk].max().item()
        row["vs_exact_interior"] = diff[..., hk:-hk, hk:-hk].max().item()
    return row


def run(released: str, seed: int, scales=(4, 8)) -> dict:
    import torch

    from sr_lib.cem import cem
    from sr_lib.resize import imresize_torch

    torch.set_default_dtype(torch.float64)
    mods = released_modules(released)
    g = torch.Generator().manual_seed(seed)
    results = {
        "patches": ["torch.cuda.FloatTensor -> torch.DoubleTensor", "Tensor.cuda -> identity"]
    }
    ours_ok = True
    for scale in scales:
        module, net = released_cem(mods, scale)
        margin = int(net.invalidity_margins_LR)

        def ours_down(t, s=scale):
            return imresize_torch(t, 1 / s)

        def ours_cem(t, lr, s=scale):
            return cem(t, lr, s)

        cases = {}
        hr_sizes = [(h * scale, w * scale) for h, w in SIZES + [(BIG[scale], BIG[scale])]] + RAGGED
        for hr in hr_sizes:
            x = torch.rand(1, 3, *hr, generator=g)
            y = torch.rand(1, 3, math.ceil(hr[0] / scale), math.ceil(hr[1] / scale), generator=g)
            row = {"ours": properties(ours_down, ours_cem, x, y)}
            if hr[0] % scale == 0 and hr[1] % scale == 0:  # the released code needs multiples
                row["released"] = properties(module.DownscaleOP, module, x, y, margin, scale)
            cases[f"{hr[0]}x{hr[1]}"] = row
            ours_ok &= all(v <= TOL for v in row["ours"].values())
        tiny = tuple(n * scale for n in TINY[scale])
        bf_ours = brute_force(ours_down, ours_cem, scale, tiny, seed)
        bf_ours_ragged = brute_force(ours_down, ours_cem, scale, (tiny[0] + 1, tiny[1] + 3), seed)
        bf_released = brute_force(module.DownscaleOP, module, scale, tiny, seed)
        for bf in (bf_ours, bf_ours_ragged):
            ours_ok &= bf["vs_kkt"] <= TOL and bf["range_HT"] <= TOL
        trunc = []
        x = torch.rand(1, 3, BIG[scale] * scale, BIG[scale] * scale, generator=g)
        y = torch.rand(1, 3, BIG[scale], BIG[scale], generator=g)
        for energy, nfft in TRUNCATION:
            mod, n = released_cem(mods, scale, energy, nfft)
            row = properties(mod.DownscaleOP, mod, x, y, margin, scale)
            trunc.append({"energy_portion": energy, "NFFT_add": nfft,
                          "inv_hTh": list(n.inv_hTh.shape), **row})  # fmt: skip
        results[f"x{scale}"] = {
            "released_margin_lr": margin,
            "released_inv_hTh": list(net.inv_hTh.shape),
            "cases": cases,
            "brute_force": {
                "ours": bf_ours,
                "ours_ragged": bf_ours_ragged,
                "released": bf_released,
            },
            "truncation": trunc,
        }
        worst = max(max(r["ours"].values()) for r in cases.values())
        print(f"cem x{scale}: srspace worst {worst:.1e}; released residual "
              f"{max(r['released']['residual'] for r in cases.values() if 'released' in r):.1e}",
              file=sys.stderr)  # fmt: skip
    results["ok"] = bool(ours_ok)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--released", required=True, help=f"a checkout of {REPO}")
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if not Path(args.released).is_dir():
        raise UsageError(f"--released {args.released}: no such folder; give a checkout of {REPO}")
    if (
        not (Path(args.released) / "models" / "cem_postprocess.py").is_file()
        or not (Path(args.released) / "CEM" / "CEMnet.py").is_file()
    ):
        raise UsageError(
            f"--released {args.released}: not a checkout of {REPO} "
            "(no models/cem_postprocess.py and CEM/CEMnet.py)"
        )
    results = run(str(Path(args.released).resolve()), args.seed, args.scales)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        sys.exit(main())
