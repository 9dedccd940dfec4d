"""Parity check (run by hand): srspace's RefVAE computes the released code's function, given the
same weights.

The released code (Holmes-Alan/RefVAE, MIT) is never part of this repository: give the path of a
checkout. For ×4 (`VAE_v3_4x`) and ×8 (`VAE_v3_8x`), with `discriminator_v2`, this script builds
the released networks with seeded random weights (no pretrained VGG or r41 encoder exists here:
random on both sides; BatchNorm statistics and affine made non-trivial), maps their state_dicts
onto srspace's `refvae` (`sr_lib.models.refvae.released_key`), converts both to float64 and
compares:

  encoder_r41     the released r41 encoder (`network.encoder4`) and srspace's VGG19 encoder with
                  the r41 weights folded in (its 1×1 input conv into the first conv, behind the
                  ImageNet normalisation), at the feature positions whose receptive field does not
                  reach the border: srspace pads with zeros, the r41 encoder reflects (deviation 1)
  mu, logvar      the CVAE encoder on the same reference features, eval and train mode (BatchNorm)
  modulation      F_μ, F_σ of the same LR features
  residual        the decoder output from the same z
  sr              residual + the released torch bicubic (srspace's own skip is MATLAB bicubic,
                  deviation 2: `sr_matlab_bicubic` reports that difference, not checked)
  disc_logits, disc_feats   discriminator_v2 on the same image
  loss_*          one training step of main_GAN.py's generator loss (written out below from its
                  released expression) and srspace's `forward` with the released flags
                  (`RELEASED_FLAGS`), on one batch with the same ε: every term by sum, the total
                  without LPIPS (srspace's LPIPS net is not the `lpips` package's), and the
                  discriminator loss with the same random labels; srspace with --bicubic torch
                  and the released training with the VGG19 encoder in place of r41 (deviation 1)
  r41_*           --encoder r41: the encoder at every position (borders too), the same training
                  step with the released r41 encoder on both sides (`r41_loss_*`), and sampling
                  as test.py / eval_8x.py do (`r41_sample_*`: z = μ(R), and a given z)
  released_file_* the released generator saved as a file, vgg_r41.pth staged in
                  $SRSPACE_WEIGHTS, loaded by load_model(path, model="refvae", scale=s): its samples
  golden          the released networks (`golden.r41`: the released sampling pipeline) with
                  `tests/test_refvae_golden.py`'s formula weights on its formula inputs (the
                  numbers that test pins)

Tolerance: max |difference| / max |released| <= 1e-9 (float64). Prints one line per case on
stderr and one JSON object on stdout; exit status 0 only if every checked quantity agrees.
CPU only; ~3 min on 2 cores. The released code imports unchanged under torch 2.14; only its
`Vgg19_feat`, which asks torchvision for ImageNet weights, is built with random ones here.

    python tests/bench/check_refvae_parity.py --released RefVAE/ [--scales 4 8]
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without install
sys.path.insert(0, str(ROOT / "tests"))
from test_refvae_golden import (  # noqa: E402
    formula,
    golden_inputs,
    golden_numbers,
    golden_weights,
    r41_inputs,
    sr_numbers,
)

from sr_lib.errors import UsageError, exit_on_error  # noqa: E402
from sr_lib.models import build_model, load_model  # noqa: E402
from sr_lib.models.refvae import released_key  # noqa: E402
from sr_lib.weights import load_strict  # noqa: E402

REL_TOL = 1e-9
# srspace flags that select the released training recipe (docs/vae.md), LPIPS off (see above)
RELEASED_FLAGS = dict(
    pretrained=False, lambda_content=0.01, content_down="pyramid", lambda_lr=100,
    style_target="hr", style_layers="relu1_1,relu2_1,relu3_1,relu4_1", lambda_tv=0,
    adv_loss="l1", lambda_fm=0.01, lambda_lpips=0, lambda_style=10, lambda_kl=1, lambda_adv=1,
    bicubic="torch",
)  # fmt: skip
R41_CONVS = ["conv2", "conv3", "conv4", "conv5", "conv6", "conv7", "conv8", "conv9", "conv10"]
VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19]  # torchvision vgg19.features indices to relu4_1


class Diffs:
    def __init__(self):
        self.rows = {}

    def rel(self, name, released, ours, check=True):
        a, b = released.detach().double(), ours.detach().double()
        if a.shape != b.shape:
            self.rows[name] = {"shape": [list(a.shape), list(b.shape)], "ok": False}
            return
        d = (a - b).abs().max().item()
        rel = d / max(a.abs().max().item(), 1e-300)
        row = {"max_abs": d, "rel": rel}
        if check:
            row["ok"] = math.isfinite(d) and rel <= REL_TOL
        self.rows[name] = row

    @property
    def ok(self):
        return all(r.get("ok", True) for r in self.rows.values())


def randomise(module, g):
    """Non-trivial BatchNorm affine and running statistics (eval mode then means something)."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))


def fold_r41(enc, vgg_features):
    """The r41 encoder's weights in srspace's VGG19 encoder: its 1×1 conv1 (and the ImageNet
    normalisation srspace applies first) folded into the first 3×3 conv."""
    from sr_lib.models.vgg import IMAGENET_MEAN, IMAGENET_STD

    m = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    s = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    w1, b1 = enc.conv1.weight[:, :, 0, 0], enc.conv1.bias  # (3, 3), (3,)
    w2, b2 = enc.conv2.weight, enc.conv2.bias
    with torch.no_grad():
        first = vgg_features[0]
        first.weight.copy_(torch.einsum("ojhw,jc->ochw", w2, w1 * s))
        first.bias.copy_(b2 + torch.einsum("ojhw,j->o", w2, b1 + w1 @ m))
        for name, i in zip(R41_CONVS[1:], VGG_CONVS[1:]):
            vgg_features[i].weight.copy_(getattr(enc, name).weight)
            vgg_features[i].bias.copy_(getattr(enc, name).bias)


def run_scale(rel_code, scale: int, seed: int) -> dict:
    import model as M  # the released code, from rel_code (on sys.path)
    import network as N

    torch.manual_seed(seed)
    G = getattr(M, f"VAE_v3_{scale}x")(scale)
    D = M.discriminator_v2(3, 32)
    enc = N.encoder4()
    vgg19 = M.models.vgg19
    M.models.vgg19 = lambda pretrained=False, **kw: vgg19(weights=None)  # no ImageNet weights
    try:
        vgg_feat = M.Vgg19_feat("cpu")
    finally:
        M.models.vgg19 = vgg19
    g = torch.Generator().manual_seed(seed + 1)
    randomise(G, g)
    for net in (G, D, enc, vgg_feat):
        net.double()

    ours = build_model("refvae", {"scale": scale, **RELEASED_FLAGS, "ref_size": 64}).double()
    sd = {released_key(k): v for k, v in {**G.state_dict(), **D.state_dict()}.items()
          if not k.startswith("bn.")}  # fmt: skip  # VAE_v3's BatchNorm1d is never used
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    left = [k for k in missing if not k.startswith("vgg")]
    if left or unexpected:
        raise RuntimeError(f"key mapping: missing {left}, unexpected {unexpected}")
    d = Diffs()

    # encoder: interior positions only (zero vs reflection padding)
    fold_r41(enc, ours.vgg.features)
    x = torch.rand(2, 3, 128, 128, generator=g, dtype=torch.float64)
    with torch.no_grad():
        r41, f41 = enc(x)["r41"], ours.vgg(x)["relu4_1"]
    d.rel("encoder_r41", r41[..., 5:11, 5:11], f41[..., 5:11, 5:11])
    d.rel("encoder_r41_border", r41, f41, check=False)

    # the loss network: srspace's VGG19 = the released Vgg19_feat (both zero padding); its
    # slices keep torchvision's indices as module names, so their state_dicts merge into one
    slices = (vgg_feat.slice1, vgg_feat.slice2, vgg_feat.slice3, vgg_feat.slice4)
    ours.vgg.features.load_state_dict({k: v for sl in slices for k, v in sl.state_dict().items()})

    # generator parts on the same features
    b, hr_side = 2, 64
    hr = torch.rand(b, 3, hr_side, hr_side, generator=g, dtype=torch.float64)
    lr = F.avg_pool2d(hr, scale)
    f_ref = torch.randn(b, 512, 8, 8, generator=g, dtype=torch.float64).relu()
    f_x = torch.randn(b, 512, hr_side // 8, hr_side // 8, generator=g, dtype=torch.float64).relu()
    with torch.no_grad():
        for mode in ("eval", "train"):
            G.train(mode == "train")
            ours.train(mode == "train")
            (m_r, v_r), (m_o, v_o) = G.encode(f_ref), ours.gen.encode(f_ref)
            d.rel(f"mu_{mode}", m_r, m_o)
            d.rel(f"logvar_{mode}", v_r, v_o)
        G.eval(), ours.eval()
        mu_r, var_r = G.mask(f_x).chunk(2, dim=1)
        f_mu, f_sigma = ours.gen.modulation(f_x)
        d.rel("modulation_mu", mu_r, f_mu)
        d.rel("modulation_sigma", var_r, f_sigma)
        z = torch.randn(b, 256, generator=g, dtype=torch.float64)
        sr_r = G.decode(lr, f_x, z)
        bic = F.interpolate(lr, scale_factor=scale, mode="bicubic")
        res = ours.gen.decode(f_mu, f_sigma, z)
        d.rel("residual", sr_r - bic, res)
        d.rel("sr", sr_r, bic + res)
        from sr_lib.resize import imresize_torch

        d.rel("sr_matlab_bicubic", sr_r, imresize_torch(lr, scale) + res, check=False)
        feat_r, prob_r = D(hr)
        prob_o, feats_o = ours.discriminator(hr)
        d.rel("disc_logits", prob_r, prob_o)
        d.rel("disc_feats", feat_r, torch.cat(feats_o, dim=1))

    loss_step(d, G, D, vgg_feat, ours, lr, hr, seed)

    # --encoder r41: the released encoder at every position (borders too), the released training
    # step with its own encoder, and sampling end to end
    ours41 = build_model("refvae", {"scale": scale, **RELEASED_FLAGS, "ref_size": 64,
                                    "encoder": "r41"}).double()  # fmt: skip
    load_strict(ours41, {**ours.state_dict(), **{"encoder." + k: v for k, v in
                                                 enc.state_dict().items()}}, "r41",
                optional=("encoder_loaded",))  # fmt: skip
    x2 = torch.rand(1, 3, 88, 120, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for name, xi in (("128x128", x), ("88x120", x2)):
            d.rel(f"r41_encoder_{name}", enc(xi)["r41"], ours41.encoder(xi))
    loss_step(d, G, D, vgg_feat, ours41, lr, hr, seed, r41=enc, tag="r41_loss")
    G.eval(), ours41.eval()
    ref = torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64)  # = ref_size: no resize
    z = torch.randn(1, 256, generator=g, dtype=torch.float64)
    sample_r41(d, G, enc, ours41, scale, lr[:1], ref, z, "r41")
    released_file(d, G, enc, scale, g)
    golden = golden_released(G, D)
    golden["r41"] = golden_r41(G, enc, scale)
    return {"ok": d.ok, "diffs": d.rows, "golden": golden}


def sample_r41(d, G, enc, ours, scale, lr, ref, z, tag):
    """The released test.py / eval_8x.py pipeline (torch bicubic, r41 features of bicubic(LR) and
    of the reference, VAE_v3 with z = μ(R), then with a given z) against `sample` at temperature 0
    and `sample(latent=z)` (outputs clamped to [0, 1], as the released scripts save them)."""
    with torch.no_grad():
        mu, _ = G.encode(enc(ref)["r41"])
        f_x = enc(F.interpolate(lr, scale_factor=scale, mode="bicubic"))["r41"]
        d.rel(f"{tag}_sample_mu", G(lr, f_x, z_q=mu).clamp(0, 1),
              ours.sample(lr, n=1, temperature=0, ref=[ref[0]])[:, 0])  # fmt: skip
        d.rel(f"{tag}_sample_z", G(lr, f_x, z_q=z).clamp(0, 1), ours.sample(lr, latent=z)[:, 0])


def released_file(d, G, enc, scale, g):
    """The released generator state_dict saved as a file (float32, with its unused `bn.` keys)
    and vgg_r41.pth staged in $SRSPACE_WEIGHTS: load_model(path, model="refvae", scale=s) must
    sample the released output (float64 from the same float32 weights on both sides)."""
    import copy
    import os
    import tempfile

    G32 = {k: v.float() for k, v in G.state_dict().items()}
    E32 = {k: v.float() for k, v in enc.state_dict().items()}
    G64, enc64 = copy.deepcopy(G), copy.deepcopy(enc)
    G64.load_state_dict(G32), enc64.load_state_dict(E32)
    env = {k: os.environ.get(k) for k in ("SRSPACE_WEIGHTS", "SRSPACE_OFFLINE")}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(G32, f"{tmp}/ConVAE_{scale}x.pth")
        torch.save(E32, f"{tmp}/vgg_r41.pth")
        os.environ.update(SRSPACE_WEIGHTS=tmp, SRSPACE_OFFLINE="1")
        try:
            net, _ = load_model(f"{tmp}/ConVAE_{scale}x.pth", model="refvae", scale=scale)
            net.double()
            lr = torch.rand(1, 3, 64 // scale, 96 // scale, generator=g, dtype=torch.float64)
            ref = torch.rand(1, 3, 256, 256, generator=g, dtype=torch.float64)
            z = torch.randn(1, 256, generator=g, dtype=torch.float64)
            sample_r41(d, G64, enc64, net, scale, lr, ref, z, "released_file")
        finally:
            for k, v in env.items():
                os.environ.pop(k) if v is None else os.environ.update({k: v})


def golden_r41(G, enc, scale) -> dict:
    """The released pipeline (float32) with the golden formula weights (`golden_released` loaded
    them into G), formula weights in the r41 encoder, on `r41_inputs`: the numbers
    tests/test_refvae_golden.py pins for a released file loaded by load_model."""
    enc = enc.float().eval()
    enc.load_state_dict(golden_weights({k: v.shape for k, v in enc.state_dict().items()}))
    lr, ref = r41_inputs(scale)
    z = formula((1, 256), 3, 1.0)
    with torch.no_grad():
        mu, _ = G.encode(enc(ref)["r41"])
        f_x = enc(F.interpolate(lr, scale_factor=scale, mode="bicubic"))["r41"]
        return {"mu": sr_numbers(G(lr, f_x, z_q=mu).clamp(0, 1)),
                "z": sr_numbers(G(lr, f_x, z_q=z).clamp(0, 1))}  # fmt: skip


def loss_step(d, G, D, vgg_feat, ours, lr, hr, seed, r41=None, tag="loss"):
    """main_GAN.py's generator and discriminator losses (its expressions, LPIPS left out; the
    encoder the released r41 one if `r41` is given, else the VGG19 one) against srspace's
    `forward` / `discriminator_loss`."""

    def bicubic(x, s):
        return F.interpolate(x, scale_factor=s, mode="bicubic")

    l1 = torch.nn.L1Loss(reduction="sum")
    G.train(), D.train(), ours.train()
    s = ours.scale
    torch.manual_seed(seed + 2)  # the reparameterisation's ε: the first draw on both sides
    bic = bicubic(lr, s)
    enc = (lambda x: r41(x)["r41"]) if r41 else (lambda x: vgg_feat.feat_extract(x)[3])  # noqa: E731
    predict, KL = G(lr, enc(bic), enc(hr))
    terms = {
        "lr": l1(bicubic(predict, 1 / s), lr),
        "pixel": l1(predict, hr) + l1(bicubic(predict, 0.5), bicubic(hr, 0.5))
        + l1(bicubic(predict, 0.25), bicubic(hr, 0.25)),
        "kl": KL.mean(),
    }  # fmt: skip
    terms["content"], terms["style"] = vgg_feat(predict, hr)
    fake_feat, fake_prob = D(predict)
    real_feat, _ = D(hr)
    terms["fm"] = l1(fake_feat, real_feat)
    terms["adv"] = l1(fake_prob, torch.ones_like(fake_prob))
    weights = {"lr": 100, "pixel": 1, "fm": 0.01, "adv": 1, "content": 0.01, "style": 10, "kl": 1}
    total = sum(weights[k] * v for k, v in terms.items())

    torch.manual_seed(seed + 2)
    out = ours(lr, hr)
    d.rel(f"{tag}_sr", predict, out["sr"])
    for k, v in terms.items():
        d.rel(f"{tag}_{k}", v, out[k])
    d.rel(f"{tag}_total", total, out["loss"])

    torch.manual_seed(seed + 3)
    u = torch.rand(2)  # what discriminator_loss draws next: float32, its labels too
    hi, lo = (0.7 + 0.5 * u[0]).double(), (0.3 * u[1]).double()
    _, fake_prob = D(predict.detach())
    _, real_prob = D(hr)
    released = l1(real_prob, torch.ones_like(real_prob) * hi) + l1(fake_prob, lo + 0 * fake_prob)
    torch.manual_seed(seed + 3)
    d.rel(f"{tag}_discriminator", released / 2, ours.discriminator_loss(lr, hr, out)["loss"])


def golden_released(G, D) -> dict:
    """The released networks with the golden test's formula weights, on its inputs."""
    G, D = G.float().eval(), D.float().eval()
    for net in (G, D):
        keys = {k: released_key(k) for k in net.state_dict() if not k.startswith("bn.")}
        w = golden_weights({keys[k]: v.shape for k, v in net.state_dict().items() if k in keys})
        net.load_state_dict({k: w[keys[k]] for k in keys}, strict=False)
    f_ref, f_x, z, img = golden_inputs()
    with torch.no_grad():
        mu, logvar = G.encode(f_ref)
        mu_m, var_m = G.mask(f_x).chunk(2, dim=1)
        dec = G.VAE_decoder(z).view(1, 64, 16, 16)  # G.decode without its bicubic skip
        feat = G.dec_feat(F.interpolate(dec, size=f_x.shape[-2:], mode="bilinear"))
        res = G.decoder(feat * (1 + var_m) + mu_m)
        _, prob = D(img)
    return golden_numbers(mu, logvar, res, prob)


@exit_on_error("check_refvae_parity.py")
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--released", required=True, help="checkout of Holmes-Alan/RefVAE")
    p.add_argument("--scales", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rel = Path(a.released)
    if not rel.is_dir():
        raise UsageError(f"--released {rel}: no such folder; give a checkout of Holmes-Alan/RefVAE")
    if not (rel / "model.py").is_file() or not (rel / "network.py").is_file():
        raise UsageError(f"--released {rel}: not a checkout of Holmes-Alan/RefVAE "
                         "(no model.py and network.py in it)")  # fmt: skip
    sys.path.insert(0, str(rel.resolve()))
    result, ok = {}, True
    for s in a.scales:
        r = run_scale(rel, s, a.seed)
        worst = max(v.get("rel", math.inf) for k, v in r["diffs"].items() if "ok" in v)
        print(f"x{s}: {'ok' if r['ok'] else 'DIFFERENT'} (worst checked rel {worst:.2e})",
              file=sys.stderr)  # fmt: skip
        result[f"x{s}"] = r
        ok &= r["ok"]
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
