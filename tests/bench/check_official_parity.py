"""Parity check (run by hand): srspace's SRFlow, SRFlow-DA and NCSR compute the released code's
function, given the same weights.

The released code (andreas128/SRFlow, yhjo09/SRFlow-DA, younggeun-kim/NCSR; CC BY-NC-SA 4.0) is
never part of this repository: give the path of a checkout of each. For every case (model, scale,
variant) this script, in a subprocess of its own (the three code bases share module names):

 1. builds the released network from its released config (`define_Flow`), seeded, and runs one
    training-mode encode on an init batch: the ActNorm data initialisation, as released training
    starts. Then it gives every zero-initialised conv (coupling outputs, split priors; SRFlow-DA's
    zero biases) random values and makes every 1x1 conv non-orthogonal. With the released
    initialisation every coupling outputs exactly 0, and the coupling networks and the
    conditioning could not change z, the NLL or a sample: a check on such weights proves little;
 2. saves its state_dict (the layout of the release files) and loads that file through srspace's
    public path, `sr_lib.models.load_model(path, model=..., scale=...)` (what
    `sr_sample.py --ckpt FILE --model M --scale S` does);
 3. compares, on a batch of 2 non-square LR/HR pairs:
      rrdb_*        every RRDB feature map (stacked blocks, fea_up*, the image output);
      cond_level*   the conditioning of every flow level;
      z_*, nll      every latent of encode and the NLL in bits per HR pixel (NCSR: also with a
                    noise condition);
      reverse       the released latents decoded by both;
      t0            temperature 0 through srspace's `sample` (clamped) and `generate`;
      t_sample      a sample at temperature 0.9 from srspace's `sample`, its noise fed to the
                    released decoder;
      actnorm_init  srspace's ActNorm data initialisation on the released init batch;
      train_nll     the training objective with its input noise drawn from one seed: SRFlow's
                    uniform dequantisation (`--dequant uniform`), NCSR's noise on HR and its
                    MATLAB-bicubic downscale on LR, with the noise condition.
    Tolerance: max |difference| / max |released| <= 1e-4; NLL within 1e-3 bits per pixel.

Prints one line per case on stderr as it goes and, on stdout, one JSON object with the max
differences; exit status 0 only if every quantity of every case agrees. CPU only; ~1-5 min a case
on 2 cores.

    python tests/bench/check_official_parity.py --srflow SRFlow/ --da SRFlow-DA/ --ncsr NCSR/
        [--cases srflow:4 ncsr:8 ...] [--json out.json]

Environment: srspace's requirements plus pyyaml, natsort, opencv-python-headless (imported by the
released code).
"""

import argparse
import contextlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without install
from sr_lib.errors import UsageError, exit_on_error  # noqa: E402

# case -> (which checkout, released config, srspace model); the variant is read off the file.
CASES = {
    "srflow:4": ("srflow", "confs/SRFlow_DF2K_4X.yml", "srflow"),
    "srflow:8": ("srflow", "confs/SRFlow_DF2K_8X.yml", "srflow"),
    "srflow_celeba:8": ("srflow", "confs/SRFlow_CelebA_8X.yml", "srflow"),
    "srflow_da:4": ("da", "confs/SRFlow-DA_DF2K_4X.yml", "srflow_da"),
    "srflow_da:8": ("da", "confs/SRFlow-DA_DF2K_8X.yml", "srflow_da"),
    "ncsr:4": ("ncsr", "confs/4X.yml", "ncsr"),
    "ncsr:8": ("ncsr", "confs/8X.yml", "ncsr"),
    "srflow_da_r:4": ("da", "confs/SRFlow-DA-R_DF2K_4X.yml", "srflow_da"),
    "srflow_da_r:8": ("da", "confs/SRFlow-DA-R_DF2K_8X.yml", "srflow_da"),
    "srflow_da_s:4": ("da", "confs/SRFlow-DA-S_DF2K_4X.yml", "srflow_da"),
    "srflow_da_s:8": ("da", "confs/SRFlow-DA-S_DF2K_8X.yml", "srflow_da"),
    "srflow_da_d:4": ("da", "confs/SRFlow-DA-D_DF2K_4X.yml", "srflow_da"),
    "srflow_da_d:8": ("da", "confs/SRFlow-DA-D_DF2K_8X.yml", "srflow_da"),
}
REL_TOL, NLL_TOL = 1e-4, 1e-3
TEMPERATURE = 0.9


def code_dir(path: str) -> str:
    """A checkout or its code/ folder."""
    p = Path(path).resolve()
    return str(p / "code" if (p / "code" / "models").is_dir() else p)


REPOS = {"srflow": "andreas128/SRFlow", "da": "yhjo09/SRFlow-DA", "ncsr": "younggeun-kim/NCSR"}


def checkout_error(flag: str, path: str, repo: str, confs: list[str]) -> str:
    """Why `path`, given to `flag`, is not a checkout of `repo` holding `confs` ("" if it is): said
    in one line before anything runs, not as a traceback of the released code's imports later."""
    if not Path(path).is_dir():
        return f"{flag} {path}: no such folder; give a checkout of {repo}"
    cdir = Path(code_dir(path))
    for need in ("options/options.py", "models/networks.py", *confs):
        if not (cdir / need).is_file():
            return f"{flag} {path}: not a checkout of {repo} (no {need} in it or its code/)"
    return ""


def released_flow(path: str, conf: str, gpu: bool = False):
    """(network, options) of a released checkout `path` built from its own config `conf` (a path
    in its code/ folder), random weights: seed first. Its modules are imported from there (its
    code/ goes first on sys.path); it prints its config, which is swallowed."""
    cdir = code_dir(path)
    sys.path.insert(0, cdir)
    import options.options as options  # the released code's modules, from cdir
    from models import networks

    with contextlib.redirect_stdout(io.StringIO()):
        opt = options.parse(os.path.join(cdir, conf), is_train=False)
    opt["gpu_ids"] = [0] if gpu else None
    opt = options.dict_to_nonedict(opt)
    return networks.define_Flow(opt, step=0), opt


class Diffs:
    """Max differences by name; `ok` is False once any exceeds its tolerance."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def rel(self, name, released, ours, ref=None):
        import torch

        a, b = released.detach().double(), ours.detach().double()
        if a.shape != b.shape:
            self.rows[name] = {"shape": [list(a.shape), list(b.shape)], "ok": False}
            return
        d = (a - b).abs().max().item()
        scale = (a if ref is None else ref.double()).abs().max().item()
        rel = d / max(scale, 1e-12)
        ok = math.isfinite(d) and bool(torch.isfinite(a).all()) and rel <= REL_TOL
        self.rows[name] = {"max_abs": d, "rel": rel, "ok": ok}

    def nll(self, name, released, ours):
        d = (released.double() - ours.double()).abs().max().item()
        self.rows[name] = {"max_abs": d, "ok": math.isfinite(d) and d <= NLL_TOL}

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows.values())


def run_case(case: str, paths: dict, seed: int) -> dict:
    """One case, in this process. Returns {"ok", "diffs", "notes", ...}."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    repo, conf, model_name = CASES[case]
    scale = int(case.split(":")[1])
    ncsr = repo == "ncsr"
    notes = []

    random.seed(seed)
    np.random.seed(seed)  # the released 1x1 convs draw their rotation from numpy
    torch.manual_seed(seed)
    net, opt = released_flow(paths[repo], conf)
    from models.modules.flow import Conv2dZeros  # (released_flow put its code/ on sys.path)

    g = torch.Generator().manual_seed(seed + 1)

    def image(b, h, w):
        """Smooth colour fields plus fine texture in [0, 1]: (b, 3, h, w)."""
        low = torch.rand(b, 3, max(2, h // 6), max(2, w // 6), generator=g)
        x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        return (x + 0.05 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)

    lh, lw = (16, 12) if scale == 4 else (16, 8)  # non-square; NCSR x8 needs LR >= 8 (LR/2 map)
    hr_init, hr = image(2, lh * scale, lw * scale), image(2, lh * scale, lw * scale)
    lr_init, lr = F.avg_pool2d(hr_init, scale), F.avg_pool2d(hr, scale)
    noise_init = 0.03 * torch.randn(hr.shape, generator=g)  # NCSR: the training noise field
    noise = 0.3 * torch.randn(hr.shape, generator=g)  # a noise condition that clearly matters
    clean = {"std": torch.zeros(2, 1, 1, 1)} if ncsr else {}  # NCSR's inference condition

    # 1. ActNorm data init by one training-mode encode, as released training starts. The same
    # pass measures the input scale of every zero conv, so the perturbation gives outputs of
    # std ~0.1: every coupling and prior matters, and samples stay finite.
    rms, hooks = {}, []

    def record_rms(name):
        return lambda m, args, out: rms.__setitem__(name, args[0].pow(2).mean().sqrt().item())

    for name, m in net.named_modules():
        if isinstance(m, Conv2dZeros):
            hooks.append(m.register_forward_hook(record_rms(name)))
    net.train()
    with torch.no_grad():
        net(gt=hr_init, lr=lr_init, reverse=False, **({"std": noise_init} if ncsr else {}))
    for h in hooks:
        h.remove()
    initialised = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for name, m in net.named_modules():
            if not name.startswith("flowUpsamplerNet.layers."):
                continue
            if isinstance(m, Conv2dZeros):
                fan_in = m.weight[0].numel()
                std = 0.1 / (max(rms.get(name, 1.0), 1e-3) * fan_in**0.5)
                m.weight.normal_(0, std, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.logs.normal_(0, 0.02, generator=g)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.01, generator=g)  # SRFlow-DA's biased convs start at 0
            elif type(m).__name__ == "InvertibleConv1x1":
                c = m.weight.shape[0]  # |det| != 1: the log-det term matters
                m.weight.mul_(1 + 0.2 * (torch.rand(c, 1, generator=g) - 0.5))
                m.weight.add_(torch.randn(c, c, generator=g) * 0.02 / c**0.5)
    net.eval()

    # 2. The release-layout file, loaded through srspace's public path.
    sys.path.insert(1, str(ROOT))
    from sr_lib.models import load_model
    from sr_lib.models.base import NoiseSource
    from sr_lib.models.flow_layers import ActNorm

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{case.replace(':', '_x')}.pth")
        torch.save(net.state_dict(), path)
        model, ck = load_model(path, model=model_name, scale=scale)
    res = {"case": case, "config": ck["model_cfg"], "notes": notes,
           "params": [sum(p.numel() for p in net.parameters()),
                      sum(p.numel() for p in model.parameters())]}  # fmt: skip
    diffs = Diffs()
    if res["params"][0] != res["params"][1]:
        notes.append("parameter counts differ: released {}, ours {}".format(*res["params"]))
        diffs.rows["params"] = {"ok": False}

    # 3. The comparisons.
    names = net.flowUpsamplerNet.levelToName
    with torch.no_grad():
        released = net.RRDB(lr, get_steps=True)
        ours = model.RRDB.features(lr, model.blocks)
        for key, value in released.items():
            if torch.is_tensor(value) and key in ours:
                diffs.rel(f"rrdb_{key}", value, ours[key])
        off = net.rrdbPreprocessing(lr)
        for level, cond in zip(model.flow, model.conditions(lr)):
            name = names[level.down.bit_length() - 1]  # released: level log2(HR / size)
            diffs.rel(f"cond_{name}", off[name], cond)

        def encode(tag, std, nz):
            epses, nll, _ = net(gt=hr, lr=lr, reverse=False, epses=[], **std)
            latents, _ = model.encode(lr, hr, nz)
            if len(epses) != len(latents):
                diffs.rows[f"{tag}_latents"] = {"count": [len(epses), len(latents)], "ok": False}
            for i, (a, b) in enumerate(zip(epses, latents)):
                diffs.rel(f"{tag}_{'z' if i == len(epses) - 1 else f'eps{i}'}", a, b)
            diffs.nll(f"{tag}_nll", nll, model.nll(lr, hr, nz))
            return epses

        epses = encode("encode", clean, None)
        if ncsr:
            encode("encode_noise_condition", {"std": noise}, noise)

        x_rel, _ = net(lr=lr, reverse=True, epses=list(epses), eps_std=None, **clean)
        x_ours, _ = model.reconstruct(lr, [e.clone() for e in epses])
        diffs.rel("reverse", x_rel, x_ours, ref=hr)
        res["reconstruction_error"] = [(x_rel - hr).abs().max().item(),
                                       (x_ours - hr).abs().max().item()]  # fmt: skip

        # Temperature 0: the released sampler draws z = 0 and eps with std 0.
        c, down = model.latent_channels, model.latent_down
        z0 = torch.zeros(2, c, lh * scale // down, lw * scale // down)
        x0, _ = net(lr=lr, z=z0, eps_std=0.0, reverse=True, **clean)
        diffs.rel("t0_sample", x0.clamp(0, 1), model.sample(lr, 1, 0.0)[:, 0])
        diffs.rel("t0_generate", x0, model.generate(lr, 1, 0.0, None)[:, 0])

        # A temperature-0.9 sample of srspace's public `sample`, its unit draws scaled and fed to
        # the released decoder in its order (the splits' eps first to last, then z).
        class Recording(NoiseSource):
            def field(self, c, h, w):
                z = super().field(c, h, w)
                self.drawn.append(z)
                return z

        noise_src = Recording([11, 12])
        noise_src.drawn = []
        t = TEMPERATURE
        ours_t = model.sample(lr, 1, t, noise_src)[:, 0]
        z, *split_eps = [d * t for d in noise_src.drawn]  # srspace: z_L, then splits last-first
        x_t, _ = net(lr=lr, reverse=True, epses=split_eps[::-1] + [z], eps_std=t, **clean)
        diffs.rel("t_sample", x_t.clamp(0, 1), ours_t)
        res["t_sample_max_abs_pixel"] = x_t.abs().max().item()

    # ActNorm data init: a fresh srspace model holding the released pre-init weights (all zero
    # couplings) runs the same training-mode encode; its ActNorms must equal the released ones.
    fresh = type(model)(model.Config(**ck["model_cfg"]))
    fresh.load_raw_state_dict({k: v for k, v in initialised.items()}, "init")
    for m in fresh.modules():
        if isinstance(m, ActNorm):
            with torch.no_grad():
                m.bias.zero_()
                m.logs.zero_()
            m.initialized = False
    fresh.train()
    with torch.no_grad():
        fresh.encode(lr_init, hr_init, noise_init if ncsr else None)
    # Compared by effect: |Δ logs| is the relative change of the scale, |Δ bias|·exp(logs) the
    # output change in units of the normalised output (a bias of ~1e-7 on zero-mean data has no
    # meaningful relative error).
    want, got = model.official_keys(), fresh.state_dict()
    worst, count = 0.0, 0
    for k in got:
        if k.endswith(".actnorm.logs"):
            logs, bias = initialised[want[k]], initialised[want[k[: -len("logs")] + "bias"]]
            if logs.abs().max() == 0:
                continue  # never ran in the init pass (NCSR's unused fAffine_std)
            d_logs = (logs - got[k]).abs().max().item()
            d_bias = ((bias - got[k[: -len("logs")] + "bias"]).abs() * logs.exp()).max().item()
            worst, count = max(worst, d_logs, d_bias), count + 1
    diffs.rows["actnorm_init"] = {"rel": worst, "count": count,
                                  "ok": count > 0 and worst <= REL_TOL}  # fmt: skip

    # Training objective with its input noise: both draw from the global generator, same order.
    net.train()
    model.train()
    with torch.no_grad():
        torch.manual_seed(seed + 5)
        if ncsr:
            std = torch.rand_like(hr[:, 0, 0, 0]).view(-1, 1, 1, 1) * opt["std"]
            eps = torch.randn_like(hr) * std
            from imresize import imresize  # the released code's MATLAB-bicubic resize (numpy)

            lr_eps = torch.stack([
                torch.tensor(imresize(e.permute(1, 2, 0).numpy(), 1 / scale), dtype=torch.float32)
                .permute(2, 0, 1) for e in eps
            ])  # fmt: skip
            _, nll_rel, _ = net(gt=hr + eps, lr=lr + lr_eps, reverse=False, std=eps)
        else:
            # The released dequantisation: SRFlow uniform noise / quant and -ln(quant) per pixel
            # (its training never switches it on); SRFlow-DA Gaussian noise, what it trains with.
            _, nll_rel, _ = net(gt=hr, lr=lr, reverse=False, add_gt_noise=True)
            if repo == "srflow":
                model.cfg.dequant, model.cfg.quant = "uniform", opt["datasets"]["train"]["quant"]
            res["dequant"] = model.cfg.dequant
        torch.manual_seed(seed + 5)
        lr_in, hr_in, nz = model.perturb(lr, hr)
        diffs.nll("train_nll", nll_rel, model.nll(lr_in, hr_in, nz))
        if ncsr:
            diffs.rel("train_lr_noise", lr + lr_eps, lr_in)

    res["diffs"] = diffs.rows
    res["ok"] = diffs.ok
    return res


GROUPS = [  # (name prefix, group): the max difference is reported per group
    ("rrdb_", "rrdb"), ("cond_", "cond"), ("train_nll", "train_nll_bits"), ("train_lr", "train_lr"),
    ("encode", "z"), ("reverse", "reverse"), ("t0_", "t0"), ("t_sample", "t0.9"),
    ("actnorm", "actnorm_init"), ("params", "params"),
]  # fmt: skip


def signal_name(number: int) -> str:
    """SIGKILL for 9; the number where the signal has no name here (a real-time signal)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def groups(res: dict) -> dict:
    """The max difference per kind of quantity: relative, NLLs in bits per pixel."""
    worst = {}
    for k, v in res.get("diffs", {}).items():
        group = "nll_bits" if k.startswith("encode") and k.endswith("nll") else None
        group = group or next(g for prefix, g in GROUPS if k.startswith(prefix))
        val = v.get("max_abs" if group.endswith("nll_bits") else "rel", math.inf)
        worst[group] = max(worst.get(group, 0.0), val)
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--srflow", help="checkout of andreas128/SRFlow")
    ap.add_argument("--da", help="checkout of yhjo09/SRFlow-DA")
    ap.add_argument("--ncsr", help="checkout of younggeun-kim/NCSR")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), help="default: all with a checkout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args(argv)
    paths = {"srflow": args.srflow, "da": args.da, "ncsr": args.ncsr}

    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_case(args.one, paths, args.seed)))
        return 0

    cases = args.cases or [c for c, (repo, _, _) in CASES.items() if paths[repo]]
    if not cases:
        ap.error("give at least one of --srflow, --da, --ncsr")
    missing = sorted({CASES[c][0] for c in cases if not paths[CASES[c][0]]})
    if missing:
        ap.error(f"cases need --{' --'.join(missing)}")
    for repo in sorted({CASES[c][0] for c in cases}):
        confs = [CASES[c][1] for c in cases if CASES[c][0] == repo]
        why = checkout_error(f"--{repo}", paths[repo], REPOS[repo], confs)
        if why:
            raise UsageError(why)
    results = []
    for case in cases:
        t0 = time.time()
        cmd = [sys.executable, __file__, "--one", case, "--seed", str(args.seed),
               "--threads", str(args.threads)]  # fmt: skip
        for repo, p in paths.items():
            if p:
                cmd += [f"--{repo}", p]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        # a case killed by a signal (the kernel's OOM killer: SIGKILL) leaves no output
        how = (f"killed by {signal_name(-proc.returncode)}" if proc.returncode < 0
               else f"exit {proc.returncode}")  # fmt: skip
        if not lines:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            res = {"case": case, "ok": False, "notes": [f"crashed ({how}): {tail}"], "diffs": {}}
        else:  # every comparison was made: a kill after the result does not undo it, said
            res = json.loads(lines[-1][len("RESULT ") :])
            if proc.returncode:
                res["notes"].append(f"{how} after its result")
        res["seconds"] = round(time.time() - t0, 1)
        results.append(res)
        line = " ".join(f"{k}={v:.1e}" for k, v in groups(res).items())
        bad = [k for k, v in res["diffs"].items() if not v["ok"]]
        line += f"  failing: {', '.join(bad)}" if bad else ""
        line += f"  {'; '.join(res['notes'])}" if res["notes"] else ""
        verdict = "ok  " if res["ok"] else "FAIL"
        # progress on stderr: stdout is the one JSON object (`... > out.json`, json.loads)
        print(f"{case:16s} {verdict} {res['seconds']:6.1f} s  {line}", file=sys.stderr, flush=True)
    ok = all(r["ok"] for r in results)
    out = {"ok": ok, "tolerance": {"rel": REL_TOL, "nll_bits_per_px": NLL_TOL},
           "max_differences": {r["case"]: groups(r) for r in results}}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        sys.exit(main())
