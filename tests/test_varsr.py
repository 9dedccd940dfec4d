"""VarSR (docs/vae.md): the Gaussian KL, latents and sampling controls, the WGAN-GP critic
and its phase switch, a tiny sr_train run, the LFW demo writer. Tiny configs, CPU, seconds."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from torch import nn

import sr_train
from sr_lib.models import build_model
from sr_lib.models.base import NoiseSource
from sr_lib.models.losses import gaussian_kl, gradient_penalty
from sr_lib.resize import imresize_torch

CFG = {**TINY["varsr"], "scale": 4}


def model(**cfg):
    net = build_model("varsr", {**CFG, **cfg}).eval()
    torch.nn.init.normal_(net.gen.tail[-1].weight, std=0.2)  # zero at init: now z matters
    return net


def test_kl_matches_the_direct_formula_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    lv_q, lv_p = 0.5 * torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    kl = gaussian_kl(mu_q, lv_q, mu_p, lv_p)
    s_q, s_p = np.exp(0.5 * lv_q.numpy()), np.exp(0.5 * lv_p.numpy())
    d = mu_q.numpy() - mu_p.numpy()
    direct = (np.log(s_p / s_q) + (s_q**2 + d**2) / (2 * s_p**2) - 0.5).sum(-1)
    assert kl.shape == (5,) and np.allclose(kl.numpy(), direct, rtol=1e-12)
    assert torch.allclose(gaussian_kl(mu_q, lv_q, mu_q, lv_q), torch.zeros(5, dtype=torch.float64))
    assert not torch.allclose(kl, gaussian_kl(mu_p, lv_p, mu_q, lv_q))  # asymmetric
    # Monte-Carlo: E_q[log q(z) − log p(z)] for the first row
    z = mu_q[0] + torch.exp(0.5 * lv_q[0]) * torch.randn(
        200_000, 4, generator=g, dtype=torch.float64
    )
    logn = lambda z, m, lv: (-0.5 * (lv + (z - m) ** 2 / lv.exp() + math.log(2 * math.pi))).sum(-1)  # noqa: E731
    mc = (logn(z, mu_q[0], lv_q[0]) - logn(z, mu_p[0], lv_p[0])).mean()
    assert abs(mc.item() - kl[0].item()) < 0.03 * max(1.0, kl[0].item())


def test_the_loss_is_eq9_of_eq6_and_eq7_by_hand(make_batch):
    """Eq. 9 = 1·Eq. 6 + λ_KL·Eq. 7 (no perceptual or adversarial term here), computed
    independently in float64: Eq. 6 the squared error on [-1, 1] with z ~ q(z | I_H) =
    N(μ_H, σ_H), Eq. 7 KL(q(z | I_H) ‖ p(z | I_L)) by torch.distributions, summed over D and
    averaged over the batch. Both encoders learn from the KL, E_L from nothing else."""
    net = model(lambda_per=0.0, lambda_adv=0.0, lambda_kl=0.02).double().train()
    lr, hr = (t.double() for t in make_batch(4, b=3, h=6, w=5))
    torch.manual_seed(7)
    out = net(lr, hr)
    torch.manual_seed(7)  # the same ε
    up = imresize_torch(lr, 4)
    mu_h, lv_h = net.enc_hr(2 * hr - 1)
    mu_l, lv_l = net.enc_lr(2 * up - 1)
    z = mu_h + lv_h.exp().sqrt() * torch.randn_like(mu_h)  # from the HR encoder (Eq. 6)
    sr = up + 0.5 * net.gen(2 * lr - 1, z)
    pixel = ((2 * hr - 1) - (2 * sr - 1)).square().mean()
    q = torch.distributions.Normal(mu_h, lv_h.exp().sqrt())
    p = torch.distributions.Normal(mu_l, lv_l.exp().sqrt())
    kl = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    assert out["pixel"].item() == pytest.approx(pixel.item(), rel=1e-12)
    assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-12)
    assert out["loss"].item() == pytest.approx((pixel + 0.02 * kl).item(), rel=1e-12)
    enc_l, enc_h = list(net.enc_lr.parameters()), list(net.enc_hr.parameters())
    got = torch.autograd.grad(out["loss"], enc_l)
    want = torch.autograd.grad(0.02 * kl, enc_l + enc_h)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    assert all(w.abs().sum() > 0 for w in want)  # the KL trains E_L and E_H


def test_latents_temperature_and_noise():
    net = model()
    lr = torch.rand(2, 3, 5, 6)
    mu, logvar = net.prior(lr)
    z0 = net.latents(lr, 3, 0.0, NoiseSource(range(6)))
    assert z0.shape == (2, 3, 8) and torch.equal(z0, mu[:, None].expand(2, 3, 8))  # T = 0: μ
    z1 = net.latents(lr, 3, 1.0, NoiseSource(range(6)))
    assert torch.equal(z1, net.latents(lr, 3, 1.0, NoiseSource(range(6))))
    assert not torch.equal(z1[:, 0], z1[:, 1])
    half = net.latents(lr, 3, 0.5, NoiseSource(range(6)))
    assert torch.allclose(half - z0, 0.5 * (z1 - z0), atol=1e-6)  # temperature scales σ·ε


def test_same_latent_same_output():
    net = model()
    lr = torch.rand(1, 3, 6, 7)
    z = torch.randn(2, 8)
    a = net.sample(lr, 2, 1.0, NoiseSource([1, 2]), latent=z)
    b = net.sample(lr, 2, 1.0, NoiseSource([3, 4]), latent=z)  # the noise is not used
    assert torch.equal(a, b) and a.shape == (1, 2, 3, 24, 28)
    assert not torch.equal(a[:, 0], a[:, 1])  # different latents differ
    # a sample drawn normally is reproduced by decoding its latent
    noise = NoiseSource([5, 6])
    drawn = net.sample(lr, 2, 1.0, noise)
    z = net.latents(lr, 2, 1.0, NoiseSource([5, 6]))
    assert torch.equal(drawn, net.sample(lr, 2, 1.0, NoiseSource([0, 0]), latent=z))


def test_latent_from_changes_the_output_and_is_deterministic():
    net = model()
    lr = torch.rand(1, 3, 6, 6)
    hr_a, hr_b = torch.rand(1, 3, 24, 24), torch.rand(1, 3, 24, 24)
    a1 = net.sample(lr, 1, 1.0, NoiseSource([1]), latent_from=hr_a)
    a2 = net.sample(lr, 1, 1.0, NoiseSource([2]), latent_from=hr_a)
    b = net.sample(lr, 1, 1.0, NoiseSource([1]), latent_from=hr_b)
    plain = net.sample(lr, 1, 1.0, NoiseSource([1]))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b) and not torch.equal(a1, plain)
    z = net.latents(lr, 1, 1.0, NoiseSource([1]), latent_from=hr_a)
    assert torch.equal(z[0, 0], net.posterior(hr_a)[0][0])  # μ_H (Fig. 4b)


class LinearCritic(nn.Module):
    """D(x) = a·Σx: ‖∇D‖₂ = |a|·sqrt(numel) everywhere, so the gradient penalty is known."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x):
        return self.a * x.flatten(1).sum(1)


def test_wgan_gp_loss_and_phases(make_batch):
    net = model().train()
    lr, hr = make_batch(4)
    net.on_step(4, 10)  # phase 1 (adv_start 0.5): no adversarial term, no critic step
    out = net(lr, hr)
    assert "adv" not in out
    d = net.discriminator_loss(lr, hr, out)
    assert d["loss"] == 0 and not d["loss"].requires_grad
    net.on_step(5, 10)
    out = net(lr, hr)
    assert "adv" in out and torch.isfinite(out["loss"])
    d = net.discriminator_loss(lr, hr, out)
    d["loss"].backward()
    assert all(p.grad is not None for p in net.discriminator.parameters())
    assert torch.isfinite(d["loss"]) and d["gp"] >= 0
    # a linear critic: E[D(ŷ)] − E[D(y)] + δ(|a|·sqrt(N) − 1)² exactly
    net.discriminator = LinearCritic(0.01)
    d = net.discriminator_loss(lr, hr, out)
    real, fake = 2 * hr - 1, 2 * out["sr"].detach() - 1
    n = hr[0].numel()
    want = 0.01 * (fake.sum() - real.sum()) / len(hr) + 10 * (0.01 * math.sqrt(n) - 1) ** 2
    assert d["loss"].item() == pytest.approx(want.item(), rel=1e-4)  # float32 sums
    assert model(lambda_adv=0.0).discriminator is None


def test_the_critic_loss_is_eq8_by_hand_in_float64(make_batch):
    """Eq. 8, E[D(ŷ)] − E[D(y)] + δ·E[(‖∇D(x̂)‖₂ − 1)²] with δ = 10 and x̂ uniform on the line
    between each real and generated pair, computed here independently for a model in float64
    (it used to stop with a dtype error: the penalty cast its inputs to float32 always)."""
    net = model(lambda_per=0.0).double().train()  # (the frozen VGG19 stays float32)
    net.set_adversarial(True)
    lr, hr = (t.double() for t in make_batch(4))
    out = net(lr, hr)
    torch.manual_seed(5)
    d = net.discriminator_loss(lr, hr, out)
    torch.manual_seed(5)  # the same draw of the line positions
    real, fake = 2 * hr - 1, 2 * out["sr"].detach() - 1  # the critic reads [-1, 1]
    t = torch.rand(len(hr), 1, 1, 1).double()
    x = (t * real + (1 - t) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(net.discriminator(x).sum(), x)
    penalty = ((grad.flatten(1).square().sum(1).sqrt() - 1) ** 2).mean()
    crit = net.discriminator
    want = crit(fake).mean() - crit(real).mean() + 10 * penalty
    assert d["loss"].dtype == torch.float64
    assert d["loss"].item() == pytest.approx(want.item(), rel=1e-12)
    assert d["gp"].item() == pytest.approx(penalty.item(), rel=1e-12)


def test_recipe():
    r = build_model("varsr", CFG).recipe(8)
    assert r.betas == (0.9, 0.99) and r.learning_rate == 1e-4
    assert len(r.milestones) == 1 and r.patch == 8  # decayed once; 8×8 -> 64×64


def test_tiny_training_run_switches_phase(tmp_path, monkeypatch):
    # (sys.path as it was afterwards, with the example's own insertion of the repository)
    monkeypatch.syspath_prepend(Path(__file__).resolve().parents[1] / "examples")
    from make_lfw_demo import write_lfw_demo

    paths = write_lfw_demo(tmp_path / "lfw")
    assert len(paths) == 100 and len(list((tmp_path / "lfw" / "val").iterdir())) == 10
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY["varsr"].items() if k != "pretrained"]
    argv = ["--model", "varsr", "--scale", "4", "--data", tmp_path / "lfw" / "val", "--patch", 6,
            "--batch", 2, "--steps", 4, "--log-every", 1, "--val-every", 0, "--workers", 0,
            "--out", out, "--no-pretrained", *flags]  # fmt: skip
    assert sr_train.main([str(a) for a in argv]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in log if "loss" in r}
    assert "adv" not in steps[2] and steps[2]["d_loss"] == 0
    assert "adv" in steps[3] and "d_gp" in steps[3]


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_the_gradient_penalty_runs_in_float32_under_float16_only(amp):
    """Its double backward overflows float16 (an instance norm's 1/σ³); bfloat16 has float32's
    range and keeps its speed; autocast stays as it was for the rest of the critic's loss."""
    critic = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.LeakyReLU(0.2))
    dtypes = []  # of the critic's convolution: in the penalty, then in the plain critic call
    critic[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    real, fake = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", amp or torch.bfloat16, enabled=amp is not None):
        gp = gradient_penalty(critic, real, fake)
        critic(real)
    in_penalty = torch.float32 if amp in (None, torch.float16) else torch.bfloat16
    assert dtypes == [in_penalty, amp or torch.float32]
    assert gp.dtype == torch.float32 and gp.isfinite()
