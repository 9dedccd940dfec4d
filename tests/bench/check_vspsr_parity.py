"""Parity check (run by hand): srspace's VSpSR computes the released code's function, given the
same weights and the same noise.

The released code (zzhwfy/VSpSR; no licence: read and run, never copied) is not part of this
repository: give the path of a checkout. For the released configurations of demo.sh (×4:
bilinear m, β = 1, λ_G = 0.1; ×8: bicubic m, β = 0.1; both --variational_w --upsample --GAN,
α = 3, C = 256, λ_KL = 0.1) this script, on CPU in float64:

 1. builds the released network and criterion (`models.build_model`) with seeded random
    weights; the GroupNorm and BatchNorm affines and the BatchNorm running statistics are
    randomised too (their initial 1/0 would hide a mapping error);
 2. saves the network's state_dict (the `model` entry of a released checkpoint) and loads it
    through srspace's public path, `load_model(path, model="vspsr", scale=s)` (what
    `sr_sample.py --ckpt FILE --model vspsr --scale s` does); the discriminator, which the
    released code keeps in its criterion, is mapped by `from_released_key` into a training
    model of the same weights;
 3. compares, on a batch of 2 non-square LR/HR pairs, the released forward's intermediates
    (forward hooks, and a recording wrapper around its `sample_normal_jit`; behaviour unchanged):
      m                  the refined upsampling U(interp(y));
      basis              the C atoms z;
      coef_mu, coef_logvar  the coefficient distribution;
      sample_final       the colour-mixing branch's output for the released draw of ω
                         (srspace's `generate` fed the released ε);
      sample             that sample, final + m (the released `pred`, before any CEM);
      t0                 temperature 0 (ω = μ) through srspace's `generate`, against the released
                         modules run with ω = μ (its sampler replaced by the mean for this call);
      loss_mse, loss_kl, loss_adv_g, loss_total  srspace's training forward and the released
                         criterion on one batch, the same global seed before each (so the same ε:
                         checked by loss_mse);
      loss_d             the discriminator's LSGAN loss;
      grad_g             the gradient of the generator's total loss over every generator weight;
      grad_d             the gradient of the discriminator's loss over its weights;
      d_running_stats    the discriminator's BatchNorm running statistics after that step (each
                         training-mode call moves them: the order of the calls counts);
      d_train, d_eval    the discriminator's scores in training mode (batch statistics) and in
                         eval mode (running statistics).
    Tolerance: max |difference| / max |released| <= 1e-9 (float64).

Not compared: the CEM (deliberately different: docs/vspsr.md, deviations 1) and the VGG term (the
released one downloads ImageNet weights). The released `e`/explore output is not compared either:
it aliases the final output (deviation 6); `sample_final` is the tensor it meant.

Prints one line per case on stderr and, on stdout, one JSON object with the max differences; exit
status 0 only if every quantity agrees. ~1 min on 2 cores.

    python tests/bench/check_vspsr_parity.py --released VSpSR/ [--json out.json]

Environment: srspace's requirements plus scipy (imported by the released code).
"""

import argparse
import json
import math
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without install
from sr_lib.errors import UsageError, exit_on_error  # noqa: E402

# scale -> the released command's flags (demo.sh) that differ between the two
CASES = {4: dict(beta=1.0, upsample_mode="bilinear"), 8: dict(beta=0.1, upsample_mode="bicubic")}
LR_SIZE = {4: (20, 24), 8: (16, 20)}  # the released basis branch needs 16 px per side
G_WEIGHT, KL_WEIGHT, ALPHA = 0.1, 0.1, 3.0
REL_TOL = 1e-9


class Diffs:
    """Max differences by name; `ok` is False once any exceeds the tolerance."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def rel(self, name, released, ours):
        import torch

        a, b = torch.as_tensor(released).detach(), torch.as_tensor(ours).detach()
        if a.shape != b.shape:
            self.rows[name] = {"shape": [list(a.shape), list(b.shape)], "ok": False}
            return
        d = (a - b).abs().max().item()
        rel = d / max(a.abs().max().item(), 1e-300)
        ok = math.isfinite(d) and bool(torch.isfinite(a).all()) and rel <= REL_TOL
        self.rows[name] = {"max_abs": d, "rel": rel, "ok": ok}

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows.values())


REPO = "zzhwfy/VSpSR"


def released_net(path: str, scale: int):
    """(network, criterion, the released vspm module) of checkout `path` at the demo.sh config."""
    sys.path.insert(0, path)
    import models  # the released package, from `path`

    args = Namespace(
        scale=scale, n_basis=256, alpha=ALPHA, variational_z=False, variational_w=True,
        upsample=True, postprocess=False, GAN=True, VGG=False, kl_weight=KL_WEIGHT,
        G_weight=G_WEIGHT, C_weight=0.01, **CASES[scale],
    )  # fmt: skip
    net, criterion = models.build_model(args)
    return net, criterion, sys.modules["models.vspm"]


def randomise_norms(module, gen) -> None:
    """Random affines and running statistics: the defaults (1, 0) would hide a swapped key."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def run_case(scale: int, released: str, seed: int) -> dict:
    import torch

    from sr_lib.models import build_model, load_model
    from sr_lib.models.vspsr import from_released_key

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)
    net, criterion, vspm_mod = released_net(released, scale)
    gen = torch.Generator().manual_seed(seed + 1)
    randomise_norms(net, gen)
    randomise_norms(criterion, gen)
    vspm = net.vspm

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"checkpoint_x{scale}.pth"
        torch.save(net.state_dict(), path)  # what a released checkpoint holds under 'model'
        model, ck = load_model(path, model="vspsr", scale=scale)
    model.double()
    assert model.cfg.upsample == CASES[scale]["upsample_mode"], model.cfg
    cfg = {**ck["model_cfg"], "beta": CASES[scale]["beta"], "lambda_adv": G_WEIGHT,
           "lambda_w": KL_WEIGHT, "alpha": ALPHA, "lambda_per": 0.0}  # fmt: skip
    trainee = build_model("vspsr", cfg).double()
    sd = {**net.state_dict(), **criterion.state_dict()}  # + Discriminator.layers.*
    trainee.load_weights({from_released_key(k): v for k, v in sd.items()}, "released")

    g = torch.Generator().manual_seed(seed + 2)
    lh, lw = LR_SIZE[scale]
    lr = torch.rand(2, 3, lh, lw, generator=g)
    hr = torch.rand(2, 3, lh * scale, lw * scale, generator=g)
    d = Diffs()

    # The released forward, its intermediates recorded.
    seen = {}

    def keep(name):
        def hook(_module, _inputs, out):
            seen[name] = out.clone()  # (clone: the final branch's output is added to in place)

        return hook

    for name in ("upsamplebranch", "kernelbranch", "weightbranch", "finalbranch"):
        getattr(vspm, name).register_forward_hook(keep(name))
    sample_normal = vspm_mod.sample_normal_jit

    def recording(mu, log_var):
        w, eps = sample_normal(mu, log_var)
        seen["w"] = w.clone()
        return w, eps

    vspm_mod.sample_normal_jit = recording
    net.eval()
    with torch.no_grad():
        pred = net(lr)["pred"]
        prepared = model.prepare(lr)
    mu_rel, logvar_rel = seen["weightbranch"].chunk(2, dim=1)
    d.rel("m", seen["upsamplebranch"], prepared.maps["m"])
    d.rel("basis", seen["kernelbranch"], prepared.extra["basis"])
    d.rel("coef_mu", mu_rel, prepared.maps["mu"])
    d.rel("coef_logvar", logvar_rel, prepared.maps["logvar"])

    class ReleasedNoise:  # srspace's noise interface, handing out the released draw's ε
        def field(self, c, h, w):
            eps = (seen["w"] - mu_rel) / torch.exp(0.5 * logvar_rel)  # (B·3, C, h, w)
            return eps.reshape(2, 1, c, h, w).reshape(2, c, h, w)

    with torch.no_grad():
        ours = model.generate(lr, 1, 1.0, ReleasedNoise())[:, 0]
        final = model.final(model.synthesize(prepared.extra["basis"], seen["w"], 2))
    d.rel("sample_final", seen["finalbranch"], final)
    d.rel("sample", pred, ours)

    # Temperature 0: the released modules with their sampler returning the mean.
    vspm_mod.sample_normal_jit = lambda mu, log_var: (mu, None)
    with torch.no_grad():
        pred0 = net(lr)["pred"]
        ours0 = model.generate(lr, 1, 0.0, None)[:, 0]
    d.rel("t0", pred0, ours0)
    vspm_mod.sample_normal_jit = sample_normal

    # One training batch: the same global seed before each forward gives the same ε.
    net.train()
    criterion.train()
    trainee.train()
    torch.manual_seed(seed + 3)
    outputs = net(lr)
    losses = criterion(outputs, hr)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    net.zero_grad()
    total.backward()
    torch.manual_seed(seed + 3)
    out = trainee(lr, hr)
    trainee.zero_grad()
    out["loss"].backward()
    d_out = trainee.discriminator_loss(lr, hr, out)
    criterion.zero_grad()  # (the released G loss left gradients in it; its D step zeroes them)
    losses["loss_D"].backward()
    d_out["loss"].backward()
    d.rel("loss_mse", losses["loss_MSE"], out["mse"])
    d.rel("loss_kl", losses["loss_KL_w"], out["kl"])
    d.rel("loss_adv_g", losses["loss_G"], out["adv"])
    d.rel("loss_total", total, out["loss"])
    d.rel("loss_d", losses["loss_D"], d_out["loss"])
    ours_grads = dict(trainee.named_parameters())
    rel_grads = [p.grad.flatten() for p in net.parameters()]
    our_grads = [ours_grads[from_released_key(k)].grad.flatten() for k, _ in net.named_parameters()]
    d.rel("grad_g", torch.cat(rel_grads), torch.cat(our_grads))
    rel_grads = [p.grad.flatten() for p in criterion.parameters()]
    our_grads = [ours_grads[from_released_key(k)].grad.flatten()
                 for k, _ in criterion.named_parameters()]  # fmt: skip
    d.rel("grad_d", torch.cat(rel_grads), torch.cat(our_grads))

    # The discriminator's running statistics after the step (its eval mode: the released
    # validation's loss_G/loss_D), and its scores on the HR batch in both modes.
    rel_stats = {k: v for k, v in criterion.state_dict().items() if "running" in k}
    our_stats = trainee.discriminator.state_dict()
    d.rel("d_running_stats", torch.cat([v.flatten() for v in rel_stats.values()]),
          torch.cat([our_stats[from_released_key(k)[len("discriminator."):]].flatten()
                     for k in rel_stats]))  # fmt: skip
    with torch.no_grad():
        for mode in ("train", "eval"):
            criterion.train(mode == "train")
            trainee.train(mode == "train")
            d.rel(f"d_{mode}", criterion.Discriminator(hr), trainee.discriminator(hr))
    return {"ok": d.ok, **d.rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--released", required=True, help="a checkout of zzhwfy/VSpSR (c2250ca)")
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 8], choices=sorted(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if not Path(args.released).is_dir():
        raise UsageError(f"--released {args.released}: no such folder; give a checkout of {REPO}")
    if not (Path(args.released) / "models" / "vspm.py").is_file():
        raise UsageError(
            f"--released {args.released}: not a checkout of {REPO} (no models/vspm.py)"
        )
    results = {}
    for scale in args.scales:
        res = run_case(scale, str(Path(args.released).resolve()), args.seed)
        results[f"vspsr:{scale}"] = res
        worst = max(r.get("rel", math.inf) for r in res.values() if isinstance(r, dict))
        # progress on stderr: stdout is the one JSON object
        print(f"vspsr x{scale}: {'ok' if res['ok'] else 'MISMATCH'} (worst rel {worst:.2e})",
              file=sys.stderr)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        sys.exit(main())
