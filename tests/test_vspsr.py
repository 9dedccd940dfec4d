"""VSpSR specifics (docs/vspsr.md) and the VGG feature loss; the generic contract is
in test_models.py."""

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from sr_lib.cem import cem
from sr_lib.config import parse
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models import build_model
from sr_lib.models.base import NoiseSource
from sr_lib.models.losses import VGGLoss, sparse_prior_kl
from sr_lib.models.vgg import VGG19_RELU, VGGFeatures
from sr_lib.models.vspsr import VSpSRConfig, coefficient_sparsity
from sr_lib.resize import imresize_torch


def tiny(**cfg):
    return build_model("vspsr", {**TINY["vspsr"], **cfg})


def n_params(module):
    return sum(p.numel() for p in module.parameters())


COUNTS = [(4, 4_417_910, 2_599_424), (8, 4_680_310, 2_861_824)]  # the released module


# The released module at --n_basis 64 (Table 1 #5), counted: its branch widths are C/4 ... 2C.
COUNTS_64 = [(4, 281_174), (8, 297_622)]


@pytest.mark.parametrize("scale, total", COUNTS_64)
def test_the_documented_64_atom_flags_build_the_released_64_atom_model(scale, total):
    """docs/vspsr.md's Table 1 #5 row gave `--n-basis 64` alone: 3,261,686 parameters at ×4 (the
    64/128/256/512 widths kept), where the released code's 64-atom model has 281,174."""
    text = (Path(__file__).parents[1] / "docs" / "vspsr.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| #5 "))
    flags = row.split("`")[1].split()
    cfg = {**asdict(parse(VSpSRConfig, flags, "test")), "scale": scale, "lambda_adv": 0.0}
    assert n_params(build_model("vspsr", cfg)) == total


@pytest.mark.parametrize("scale, total, basis", COUNTS)
def test_parameter_counts_match_the_released_model(scale, total, basis):
    model = build_model("vspsr", {"scale": scale, "lambda_adv": 0.0})
    assert n_params(model) == total  # counted from the released module
    assert (n_params(model.basis), n_params(model.coef)) == (basis, 1_814_400)
    assert (n_params(model.final), n_params(model.refine)) == (3_203, 883)


def test_kl_matches_eq5():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    alpha, beta = 3.0, 0.5
    m, var = mu.numpy(), np.exp(logvar.numpy())
    mu_rho = (alpha + 0.5) / (beta + 0.5 * (m**2 + var))  # Eq. 5's μ_ρ
    eq5 = 0.5 * np.sum(mu_rho * (m**2 + var) - np.log(var))  # Eq. 5 without its constant
    kl = sparse_prior_kl(mu, logvar, alpha, beta)
    assert kl.sum().item() / 2 == pytest.approx(eq5, rel=1e-12)  # code form = 2 × summand
    # μ = 0, σ = 1: (3.5 / 1.0) · 1 − 0 = 3.5 per element (docs/vspsr.md, "Sparse prior").
    zero = sparse_prior_kl(torch.zeros(3), torch.zeros(3), alpha, beta)
    assert torch.allclose(zero, torch.full((3,), 3.5))
    # E[ρ] is detached: ∂/∂μ = 2·E[ρ]·μ and ∂/∂log σ² = E[ρ]·σ² − 1.
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    sparse_prior_kl(mu, logvar, alpha, beta).sum().backward()
    rho = torch.from_numpy(mu_rho)
    assert torch.allclose(mu.grad, 2 * rho * mu.detach())
    assert torch.allclose(logvar.grad, rho * logvar.detach().exp() - 1)


def test_forward_kl_is_the_mean_over_coefficients(make_batch):
    model = tiny(lambda_adv=0.0)
    lr, hr = make_batch(4)
    out = model(lr, hr)
    _, mu, logvar = model.distributions(lr)
    assert mu.shape == logvar.shape == (6, 8, 8, 8)  # (B·3, C, h, w)
    assert out["kl"].item() == pytest.approx(sparse_prior_kl(mu, logvar, 3.0, 0.5).mean().item())
    assert out["loss"].item() == pytest.approx(out["mse"].item() + 0.1 * out["kl"].item(), rel=1e-6)
    assert 0 <= out["sparsity"].item() <= 1 and set(out) == {"loss", "mse", "kl", "sparsity", "sr"}


def test_coefficient_sparsity():
    mu = torch.tensor([0.0, 0.01, -0.04, 1.0, -2.0, 0.3, 0.06, 0.0])
    assert coefficient_sparsity(mu, torch.zeros(8), 0.05).item() == pytest.approx(4 / 8)
    # N(0, 1): P(|ω| < t) = erf(t / √2).
    p = coefficient_sparsity(torch.zeros(4), torch.ones(4), 0.5).item()
    assert p == pytest.approx(math.erf(0.5 / math.sqrt(2)), rel=1e-6)


def test_synthesis_puts_atom_pixels_at_their_sub_pixel_positions():
    model = tiny()
    s, c = 4, 8
    basis = torch.zeros(3, c, s, s)
    basis[1, 2, 1, 3] = 1.0  # channel G, atom 2: a single HR pixel at sub-position (1, 3)
    w = torch.zeros(3, c, 2, 3)
    w[1, 2, 1, 2] = 5.0  # coefficient 5 at LR pixel (1, 2)
    e = model.synthesize(basis, w, 1)
    assert e.shape == (1, 3, 8, 12)
    assert e[0, 1, 1 * s + 1, 2 * s + 3] == 5.0 and e.abs().sum() == 5.0


def test_sigma_to_zero_and_temperature_zero_are_deterministic(make_batch):
    model = tiny(lambda_adv=0.0).eval()
    lr, hr = make_batch(4, b=1, h=6, w=5)
    a = model.sample(lr, 2, 1.0, NoiseSource([1, 2]))
    assert not torch.allclose(a[:, 0], a[:, 1])  # stochastic at temperature 1
    t0 = model.sample(lr, 2, 0.0, NoiseSource([1, 2]))
    assert torch.equal(t0[:, 0], t0[:, 1])
    basis, mu, _ = model.distributions(lr)
    mean = model.decode(model.synthesize(basis, mu, 1), model.deterministic_part(lr))
    assert torch.allclose(t0[:, 0], cem(mean, lr, 4).clamp(0, 1), atol=1e-6)
    # σ → 0 (log σ² = −80): every sample and every training forward is the mean.
    head = model.coef.head
    with torch.no_grad():
        head.weight[8:] = 0
        head.bias[8:] = -80.0
    s = model.sample(lr, 3, 1.0, NoiseSource([4, 5, 6]))
    assert torch.allclose(s, t0[:, :1].expand_as(s), atol=1e-6)
    model.train()
    assert torch.allclose(model(lr, hr)["sr"], model(lr, hr)["sr"], atol=1e-6)


def test_cem_at_test_time_by_default_and_optionally_in_training(make_batch):
    lr, hr = make_batch(4, b=1, h=6, w=7)
    noise = NoiseSource([3])
    model = tiny().eval()
    x = model.finish(model.generate(lr, 1, 1.0, noise), lr)[:, 0]  # before sample()'s clamp
    assert (imresize_torch(x, 1 / 4) - lr).abs().max() < 1e-5
    model_off = tiny(cem_test=False).eval()
    model_off.load_state_dict(model.state_dict())
    y = model_off.finish(model_off.generate(lr, 1, 1.0, NoiseSource([3])), lr)[:, 0]
    assert (imresize_torch(y, 1 / 4) - lr).abs().max() > 1e-3
    assert torch.allclose(cem(y, lr, 4), x, atol=1e-5)
    sr = tiny(cem_train=True)(lr, hr)["sr"]
    assert (imresize_torch(sr, 1 / 4) - lr).abs().max() < 1e-5


def test_cem_train_drops_the_mse_as_the_released_postprocess(make_batch):
    """The released code (zzhwfy/VSpSR, models/__init__.py build_model) starts its loss list
    empty under --postprocess, the CEM in training: KL_w, G, D and C on the CEM's output, no MSE.
    --cem-train kept the MSE of the CEM output (here a loss of 0.451 where 0.1·KL + 0.01·adv make
    0.373: the 0.078 MSE): the generator learnt from a term the code does not train."""
    lr, hr = make_batch(4, b=2, h=6, w=6)
    model = tiny(cem_train=True, lambda_adv=0.01)
    out = model(lr, hr)
    assert out["mse"] > 0.01  # logged, not trained
    want = 0.1 * out["kl"] + 0.01 * out["adv"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    # Nothing left to train the image: one line at sr_train.py's start (check_files) and here.
    off = tiny(cem_train=True, lambda_adv=0.0)
    for call in (lambda: off.check_files(loaded=False), lambda: off(lr, hr)):
        with pytest.raises(UsageError, match="--cem-train .* --lambda-adv and --lambda-per"):
            call()
    tiny(cem_train=False, lambda_adv=0.0).check_files(loaded=False)  # the MSE trains it


@pytest.mark.parametrize("scale", [4, 8])
def test_stochastic_basis_ablation(scale, make_batch):
    model = tiny(scale=scale, stochastic_basis=True)
    lr, hr = make_batch(scale, b=1, h=5, w=6)
    basis, _, _ = model.distributions(lr)
    assert basis.shape == (3, 16, scale, scale)  # (B·3, 2C: μ_z and log σ_z², s, s)
    out = model(lr, hr)
    assert "kl_z" in out and torch.isfinite(out["loss"])
    model.eval()
    t0 = model.sample(lr, 2, 0.0)
    assert torch.equal(t0[:, 0], t0[:, 1])
    # Only the basis is random: with ω fixed to μ, samples still differ through z.
    model_z = tiny(scale=scale, stochastic_basis=True, stochastic_w=False).eval()
    s = model_z.sample(lr, 2, 1.0, NoiseSource([1, 2]))
    assert not torch.allclose(s[:, 0], s[:, 1])


def test_stochastic_basis_kl_is_the_released_codes_term(make_batch):
    """Table 1 #3: the released code (zzhwfy/VSpSR, vspm.py) puts mean(μ_z² + σ_z² − log σ_z²)
    on the atoms, 2·KL(N(μ_z, σ_z²) ‖ N(0, 1)) + 1, weighted by λ_ω as the ω term; the term was
    KL itself, half the code's gradient on the basis."""
    model = tiny(stochastic_basis=True, lambda_adv=0.0)
    lr, hr = make_batch(4, b=2, h=5, w=6)
    basis, _, _ = model.distributions(lr)
    z_mu, z_logvar = basis.detach().double().chunk(2, dim=1)
    want = (z_mu**2 + z_logvar.exp() - z_logvar).mean()
    assert want > 0.5  # (not its half, (want - 1) / 2, which is near 0 for a fresh basis)
    assert float(model(lr, hr)["kl_z"]) == pytest.approx(float(want), rel=1e-5)


def test_deterministic_w_trains_without_the_sparse_prior_kl(make_batch):
    """Table 1 #1 (--no-stochastic-w): the released code adds KL_w only with --variational_w; the
    KL of a distribution ω is not drawn from was trained all the same (loss = MSE + λ_ω·3.7 on
    the tiny model), its −log σ² pulling the unused log σ² half of the head."""
    lr, hr = make_batch(4, b=2, h=5, w=6)
    model = tiny(stochastic_w=False, lambda_adv=0.0)
    out = model(lr, hr)
    assert "kl" not in out and torch.equal(out["loss"], F.mse_loss(out["sr"], hr))
    (grad,) = torch.autograd.grad(out["loss"], model.coef.head.weight)
    n = model.cfg.n_basis
    assert grad[:n].abs().sum() > 0 and torch.count_nonzero(grad[n:]) == 0  # μ | log σ²
    assert {"alpha", "beta", "lambda_w"} <= set(model.unused_flags(model.cfg))  # sr_train warns
    both = tiny(stochastic_w=False, stochastic_basis=True, lambda_adv=0.0)
    assert "lambda_w" not in both.unused_flags(both.cfg)  # it weights the basis prior
    out = both(lr, hr)
    assert torch.equal(out["kl"], out["kl_z"])  # the basis prior alone


def test_other_ablations(make_batch):
    lr, hr = make_batch(4, b=1)
    det = tiny(stochastic_w=False).eval()  # Table 1 #1: a deterministic model
    s = det.sample(lr, 2, 1.0)
    assert torch.equal(s[:, 0], s[:, 1])
    none = tiny(upsample="none")  # #4: no m, no U
    assert none.refine is None and none.deterministic_part(lr) is None
    assert torch.isfinite(none(lr, hr)["loss"])
    plain = tiny(upsample="bicubic", refine_m=False)
    m = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    assert torch.equal(plain.deterministic_part(lr), m)
    with pytest.raises(UsageError, match="choose one of"):
        tiny(upsample="nearest")
    with pytest.raises(UsageError):
        tiny(per_layer="relu6_1")


def test_flags_and_recipe():
    argv = ["--beta", "1.0", "--lambda-adv", "0.1", "--lambda-per", "0", "--n-basis", "64",
            "--upsample", "bicubic", "--no-stochastic-w", "--stochastic-basis",
            "--no-cem-test"]  # fmt: skip
    cfg = parse(VSpSRConfig, argv, "test")
    assert (cfg.beta, cfg.lambda_adv, cfg.lambda_per, cfg.n_basis, cfg.upsample) == (
        1.0, 0.1, 0.0, 64, "bicubic"
    )  # fmt: skip
    assert not cfg.stochastic_w and cfg.stochastic_basis and not cfg.cem_test
    r = build_model("vspsr", {"lambda_per": 0.0}).recipe(8)
    got = (r.batch, r.patch, r.steps, r.gamma, r.grad_clip)
    assert got == (4, 32, 60_000, 0.1, 0.1)
    assert r.milestones == pytest.approx((1 / 3, 2 / 3)) and r.weight_decay == 1e-4
    assert build_model("vspsr", {}).recipe(4).patch == 48


def test_discriminator_learns_only_from_its_own_loss(make_batch):
    model = tiny(lambda_adv=0.01).train()
    lr, hr = make_batch(4)
    d_ids = {id(p) for p in model.discriminator.parameters()}
    assert d_ids.isdisjoint(map(id, model.generator_parameters()))
    out = model(lr, hr)
    assert out["adv"] > 0
    out["loss"].backward()
    assert all(p.grad is None for p in model.discriminator.parameters())
    g_grads = [p.grad.clone() for p in model.generator_parameters()]
    d_out = model.discriminator_loss(lr, hr, out)
    assert set(d_out) >= {"loss"} and torch.isfinite(d_out["loss"])
    d_out["loss"].backward()
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert all(torch.equal(a, p.grad) for a, p in zip(g_grads, model.generator_parameters()))
    assert tiny(lambda_adv=0.0).discriminator is None


def test_vgg_features_taps_and_frozen():
    vgg = VGGFeatures(("relu1_1", "relu2_1"), imagenet_norm=True, pretrained=False)
    assert (VGG19_RELU["relu4_1"], VGG19_RELU["relu5_4"]) == (20, 35)
    assert len(vgg.features) == VGG19_RELU["relu2_1"] + 1
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    f = vgg.train()(x)
    assert not vgg.training and f["relu1_1"].shape == (1, 64, 16, 16)
    assert f["relu2_1"].shape == (1, 128, 8, 8)
    f["relu2_1"].sum().backward()
    assert x.grad is not None and all(p.grad is None for p in vgg.parameters())
    with pytest.raises(UsageError):
        VGGFeatures(("relu9_9",), pretrained=False)


def test_a_random_vgg_is_the_same_every_time_and_draws_nothing_from_the_run():
    """Built on a loss's first use, also after a resume: it must not depend on (or move) the
    run's random generator, or the resumed run would differ from the one it continues."""
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = VGGFeatures(("relu1_2",), pretrained=False)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    b = VGGFeatures(("relu1_2",), pretrained=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert a.features[0].weight.std() > 0


def test_perceptual_loss_with_a_random_vgg(make_batch):
    model = tiny(lambda_adv=0.0, lambda_per=0.01)
    loss = VGGLoss(VGGFeatures(("relu5_4",), pretrained=False))
    model.set_perceptual_loss(loss)
    lr, hr = make_batch(4, b=1)
    out = model(lr, hr)
    assert out["per"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.generator_parameters())
    assert not any(k.startswith(("vgg", "_perceptual")) for k in model.state_dict())


def test_missing_vgg_weights_stop_only_runs_that_need_them(make_batch, tmp_path, monkeypatch):
    for var, sub in (("SRSPACE_WEIGHTS", "weights"), ("TORCH_HOME", "torch")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    lr, hr = make_batch(4, b=1)
    model = tiny(lambda_per=0.01)  # building is fine: the VGG is loaded on first use
    with pytest.raises(CheckpointError) as e:
        model(lr, hr)
    assert "vgg19" in str(e.value) and "\n" not in str(e.value)
    assert torch.isfinite(tiny(lambda_per=0.0)(lr, hr)["loss"])


@pytest.fixture
def hr_folder(tmp_path):
    import imageio.v3 as iio

    d = tmp_path / "hr"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.kron(rng.random((8, 8, 3)), np.ones((8, 8, 1)))  # 64×64
        iio.imwrite(d / f"img{i}.png", (img * 255).astype(np.uint8))
    return d


def test_train_then_fine_tune_with_the_documented_flags(hr_folder, tmp_path, monkeypatch, capsys):
    import sr_train
    from sr_lib.checkpoint import load_checkpoint

    tiny_flags = ["--n-basis", "8", "--basis-channels", "4", "--coef-channels", "4",
                  "--d-channels", "4"]  # fmt: skip
    run = ["--model", "vspsr", "--data", str(hr_folder), "--scale", "4", "--patch", "8", "--batch",
           "2", "--workers", "0", "--val-every", "0", "--log-every", "1", *tiny_flags]  # fmt: skip
    stage1 = tmp_path / "stage1"
    assert sr_train.main([*run, "--steps", "2", "--lambda-per", "0", "--out", str(stage1)]) == 0
    ck = load_checkpoint(stage1 / "last.pt")
    assert set(ck["optimizers"]) == {"g", "d"} and ck["model_cfg"]["beta"] == 0.5
    fine = ["--init-from", str(stage1 / "last.pt"), "--learning-rate", "1e-5", "--steps", "1",
            "--beta", "1.0", "--lambda-adv", "0.1", "--lambda-per", "0"]  # fmt: skip
    assert sr_train.main([*run, *fine, "--out", str(tmp_path / "stage2")]) == 0
    cfg = load_checkpoint(tmp_path / "stage2" / "last.pt")["model_cfg"]
    assert (cfg["beta"], cfg["lambda_adv"]) == (1.0, 0.1)
    # λ_per > 0 without the VGG19 file: the staging message and the checkpoint exit code.
    for var in ("SRSPACE_WEIGHTS", "TORCH_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "empty"))
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        sr_train.main([*run, "--steps", "1", "--out", str(tmp_path / "per")])
    assert e.value.code == 6
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "vgg19" in err and "SRSPACE_WEIGHTS" in err
