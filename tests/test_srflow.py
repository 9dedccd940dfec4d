"""SRFlow, SRFlow-DA and NCSR (docs/flows.md): parameter counts, the official key layout,
whole-model invertibility and log-det, NLL units, temperature, training-step and sampling facts."""

import hashlib
import json
import math
import re
from pathlib import Path
from unittest import mock

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from test_flow_layers import perturb
from test_models import official_rrdb_layout
from test_refvae import run  # sr_sample.main's exit code
from torch.autograd.functional import jacobian

import sr_eval
import sr_lib.models
import sr_lib.models.srflow
import sr_sample
import sr_train
from sr_lib.checkpoint import save_checkpoint
from sr_lib.config import parse
from sr_lib.data import to_uint8
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models import MODELS, build_model
from sr_lib.models.base import NoiseSource
from sr_lib.models.flow_layers import ActNorm, gaussian_logp
from sr_lib.models.rrdb import RRDBNet
from sr_lib.resize import imresize_torch
from sr_lib.tiling import draw

FLOWS = ["srflow", "srflow_da", "ncsr"]
UNUSED_CONV = 276_576  # the released code's never-called conv flowUpsamplerNet.f (320 -> 96, 3x3)


def tiny(name: str, scale: int = 4, seed: int = 0, **cfg):
    """A tiny model with non-trivial weights (perturbed zero convs and ActNorms), in eval mode."""
    torch.manual_seed(seed)
    return perturb(build_model(name, {**TINY[name], "scale": scale, **cfg}), seed).eval()


def batch(scale: int, b: int = 2, h: int = 4, w: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, h * scale, w * scale, generator=g)
    return imresize_torch(hr, 1 / scale), hr


def meta_model(name: str, cfg: dict):
    """The full-size model on the meta device (no memory, no init): for counting only."""
    noop = lambda t, *a, **k: t  # noqa: E731
    inits = ["kaiming_normal_", "kaiming_uniform_", "uniform_", "normal_", "zeros_"]
    with mock.patch.multiple(torch.nn.init, **{n: noop for n in inits}), torch.device("meta"):
        return build_model(name, cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# Official parameter counts (the released models), all with the unused conv.
COUNTS = [
    ("srflow", 4, {}, 39_541_811, 1733),
    ("srflow", 8, {}, 50_821_891, 2080),
    ("srflow_da", 4, {}, 25_388_627, 1067),
    ("srflow_da", 8, {}, 30_014_883, 1252),
    ("ncsr", 4, {}, 41_662_643, 2165),
    ("ncsr", 8, {}, 64_520_163, 3136),
    ("srflow_da", 4, {"variant": "r"}, 25_388_627, None),
    ("srflow_da", 8, {"variant": "r"}, 30_014_883, None),
    ("srflow_da", 4, {"variant": "s"}, 25_479_299, None),
    ("srflow_da", 8, {"variant": "s"}, 31_748_931, None),
    ("srflow_da", 4, {"variant": "d"}, 23_105_571, None),
    ("srflow_da", 8, {"variant": "d"}, 26_276_979, None),
]


@pytest.mark.parametrize("name, scale, cfg, count, keys", COUNTS)
def test_parameter_counts_equal_the_official_models(name, scale, cfg, count, keys):
    model = meta_model(name, {"scale": scale, **cfg})
    assert n_params(model) == count
    if keys is not None:
        assert len(model.state_dict()) == keys
    if not cfg:
        lean = meta_model(name, {"scale": scale, "unused_conv": False})
        assert n_params(lean) == count - UNUSED_CONV


def official_flow_layout(scale: int, L: int, K: int) -> dict:
    """Key -> shape of the official flowUpsamplerNet (docs/flows.md, "Key layout"), written out."""
    keys, i, c = {}, 0, 3

    def net(prefix, cin, cout):
        keys[f"{prefix}.0.weight"] = (64, cin, 3, 3)
        keys[f"{prefix}.2.weight"] = (64, 64, 1, 1)
        for j in (0, 2):
            keys[f"{prefix}.{j}.actnorm.bias"] = keys[f"{prefix}.{j}.actnorm.logs"] = (1, 64, 1, 1)
        keys[f"{prefix}.4.weight"], keys[f"{prefix}.4.bias"] = (cout, 64, 3, 3), (cout,)
        keys[f"{prefix}.4.logs"] = (cout, 1, 1)

    for level in range(1, L + 1):
        c, i = c * 4, i + 1  # the squeeze takes index i - 1
        for k in range(2 + K):
            p = f"flowUpsamplerNet.layers.{i}"
            keys[f"{p}.actnorm.bias"] = keys[f"{p}.actnorm.logs"] = (1, c, 1, 1)
            keys[f"{p}.invconv.weight"] = (c, c)
            if k >= 2:
                net(f"{p}.affine.fFeatures", 320, 2 * c)
                net(f"{p}.affine.fAffine", c // 2 + 320, c)
            i += 1
        if level < L - 1:
            p = f"flowUpsamplerNet.layers.{i}.conv"
            keys[f"{p}.weight"], keys[f"{p}.bias"] = (c, c // 2, 3, 3), (c,)
            keys[f"{p}.logs"] = (c, 1, 1)
            c, i = c // 2, i + 1
    keys["flowUpsamplerNet.f.0.weight"], keys["flowUpsamplerNet.f.0.bias"] = (96, 320, 3, 3), (96,)
    return keys


@pytest.mark.parametrize("scale", [4, 8])
def test_official_key_layout(scale):
    model = meta_model("srflow", {"scale": scale})
    got = {k: tuple(v.shape) for k, v in model.export_official_state_dict().items()}
    want = {f"RRDB.{k}": v for k, v in official_rrdb_layout(scale).items()}
    want.update(official_flow_layout(scale, 3 if scale == 4 else 4, 16))
    assert got == want
    assert len(got) == (1733 if scale == 4 else 2080)
    split = "flowUpsamplerNet.layers.19.conv.weight"  # x4 split at 19, x8 at 19 and 39
    assert got[split] == (12, 6, 3, 3)
    assert scale == 4 or got["flowUpsamplerNet.layers.39.conv.weight"] == (24, 12, 3, 3)
    ncsr = meta_model("ncsr", {"scale": scale}).export_official_state_dict()
    extra = sorted(set(ncsr) - set(got))
    assert len(ncsr) == (2165 if scale == 4 else 3136)
    assert scale == 8 or all(".affine.fAffine_std." in k for k in extra)
    da = meta_model("srflow_da", {"scale": scale}).export_official_state_dict()
    assert tuple(da["flowUpsamplerNet.layers.3.affine.fAffine.10.logs"].shape) == (12, 1, 1)
    assert "flowUpsamplerNet.layers.3.affine.fAffine.8.bias" in da  # 3x3 convs with bias
    assert not any("fAffine.0.actnorm" in k for k in da)  # and no ActNorm in F


@pytest.mark.parametrize("name", FLOWS)
def test_official_export_import_round_trip(name):
    src = tiny(name, seed=1)
    sd = src.export_official_state_dict()
    assert set(sd) == set(src.official_keys().values())
    dst = build_model(name, {**TINY[name], "scale": 4})
    dst.load_raw_state_dict(sd, "official.pth")
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    assert all(m.initialized for m in dst.modules() if isinstance(m, ActNorm))
    lr, hr = batch(4)
    dst.eval()
    assert torch.equal(src.nll(lr, hr), dst.nll(lr, hr))
    seeds = [5, 6, 7, 8]
    a = src.sample(lr, 2, 0.9, NoiseSource(seeds))
    assert torch.equal(a, dst.sample(lr, 2, 0.9, NoiseSource(seeds)))
    # Only the unused conv may be missing or extra.
    lean = build_model(name, {**TINY[name], "unused_conv": False})
    lean.load_raw_state_dict(sd)
    dst.load_raw_state_dict({k: v for k, v in sd.items() if ".f.0." not in k})


def test_official_loading_is_strict_and_says_why(tmp_path):
    sd = tiny("srflow").export_official_state_dict()
    model = build_model("srflow", TINY["srflow"])
    broken = dict(sd)
    broken.pop("flowUpsamplerNet.layers.3.invconv.weight")
    with pytest.raises(CheckpointError, match="1 missing") as e:
        model.load_raw_state_dict(broken, "x.pth")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="unexpected.*looks like --model ncsr --scale 4"):
        model.load_raw_state_dict(tiny("ncsr").export_official_state_dict(), "ncsr.pth")
    with pytest.raises(CheckpointError, match="shape"):
        build_model("srflow", {**TINY["srflow"], "hidden_channels": 4}).load_raw_state_dict(sd)
    with pytest.raises(CheckpointError, match="rrdb-init"):
        model.load_raw_state_dict(RRDBNet(4, 8, 2, 4).state_dict(), "RRDB_DF2K_4X.pth")
    # Through load_model (as sr_sample.py --ckpt F --model srflow --scale 4), tiny-sized here.
    path = tmp_path / "SRFlow_tiny.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="pass --model and --scale"):
        sr_lib.models.load_model(path)
    real = sr_lib.models.build_model
    small = lambda name, cfg: real(name, {**TINY[name], **cfg})  # noqa: E731
    with mock.patch.object(sr_lib.models, "build_model", small):
        net, _ = sr_lib.models.load_model(path, model="srflow", scale=4)
    assert not net.training and all(m.initialized for m in net.modules() if isinstance(m, ActNorm))


def test_encoder_size_follows_the_checkpoint():
    """SRFlow_CelebA_8X has an 8-block encoder: raw_config reads `nb` off the keys."""
    sd = tiny("srflow", scale=8, nb=8, rrdb_blocks="1,3,5,7").export_official_state_dict()
    cfg = MODELS["srflow"].raw_config(sd, 8)
    assert cfg == {"scale": 8, "nb": 8}
    dst = build_model("srflow", {**TINY["srflow"], **cfg, "rrdb_blocks": "1,3,5,7"})
    dst.load_raw_state_dict(sd)
    assert len(dst.RRDB.RRDB_trunk) == 8


@pytest.mark.parametrize("variant", ["da", "r", "s", "d"])
def test_srflow_da_variants_load_from_the_released_layout(tmp_path, variant):
    """The released SRFlow-DA-R/-S/-D files name their modules as the released code does; the
    variant is read off the keys, so `--model srflow_da --scale 4` loads all four."""
    src = tiny("srflow_da", variant=variant)
    sd = src.export_official_state_dict()
    assert len(sd) == len(src.state_dict())
    if variant in ("r", "d"):
        assert any(".affine.fAffine1.0.weight" in k for k in sd)
        assert any(".affine.fFeatures3.0.logs" in k for k in sd)
        nested = "fAffine2.0.0.weight" if variant == "d" else "fAffine2.0.weight"
        assert any(k.endswith(nested) for k in sd)
    assert MODELS["srflow_da"].raw_config(sd, 4) == {
        "scale": 4,
        "nb": 2,
        **({} if variant == "da" else {"variant": variant}),
    }
    path = tmp_path / f"SRFlow-DA-{variant}.pth"
    torch.save(sd, path)
    real = sr_lib.models.build_model
    small = lambda name, cfg: real(name, {**TINY[name], **cfg})  # noqa: E731
    with mock.patch.object(sr_lib.models, "build_model", small):
        net, ck = sr_lib.models.load_model(path, model="srflow_da", scale=4)
    assert net.variant == variant and ck["model_cfg"]["scale"] == 4
    lr, hr = batch(4)
    assert torch.equal(src.nll(lr, hr), net.nll(lr, hr))


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("scale", [4, 8])
def test_whole_model_round_trip_and_latent_shapes(name, scale):
    model = tiny(name, scale)
    lr, hr = batch(scale, h=4, w=6)
    latents, logdet = model.encode(lr, hr)
    back, logdet_back = model.reconstruct(lr, latents)
    # float32 rounding, measured over seeds 0-5 of the six cases: at most 1.0e-5 on the image and
    # 3.9e-7 relative on log|det J|; the tolerances are about 5x that.
    assert (back - hr).abs().max() < 5e-5
    assert torch.allclose(logdet_back, -logdet, rtol=2e-6, atol=0)
    # Final latent at LR/2 (SRFlow, NCSR) or at LR resolution (SRFlow-DA).
    final = {"srflow_da": (24 if scale == 4 else 48, 4, 6)}.get(name, (96 * scale // 4, 2, 3))
    assert tuple(latents[-1].shape[1:]) == final
    assert len(latents) == (2 if scale == 4 else 3)  # splits + z_L


@pytest.mark.parametrize("dequant", ["gaussian", "uniform"])
def test_the_logged_nll_is_split_into_logdet_and_logp(dequant):
    """What the training log shows of a flow's NLL, besides the NLL: log|det J| and the log
    density of the standard-normal latents, in the same bits per HR pixel, so a user sees which
    one makes it bounce or turn non-finite (SRFlow issues #2, #23). Each is computed here from
    the latents, independently of the model's sum."""
    model = tiny("srflow", dequant=dequant)
    lr, hr = batch(4, b=2)
    out = model(lr, hr)  # (eval mode: no training noise)
    latents, logdet = model.encode(lr, hr)
    bits = math.log(2) * hr.shape[2] * hr.shape[3]
    by_hand = sum(
        (-0.5 * z.double() ** 2 - 0.5 * math.log(2 * math.pi)).sum((1, 2, 3)) for z in latents
    )
    assert out["logdet"].item() == pytest.approx(logdet.mean().item() / bits, rel=1e-6)
    assert out["logp"].item() == pytest.approx(by_hand.mean().item() / bits, rel=1e-5)
    constant = math.log2(32) if dequant == "uniform" else 0.0  # --quant 32: its log2 bits
    assert out["nll"].item() == pytest.approx(
        -(out["logdet"] + out["logp"]).item() + constant, rel=1e-5, abs=1e-5
    )
    assert out["loss"].item() == out["nll"].item()  # the same number as before: the loss


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("scale", [4, 8])
def test_log_likelihood_equals_brute_force_jacobian(name, scale):
    """log p = log|det J| + Σ log N(outputs) for HR (1x3x8x8 = 192 dims at x4, 768 at x8: every
    level and split) -> all latents, the Jacobian by autograd in float64; the float32 flow's
    log-det against it too."""
    model = tiny(name, scale).double()
    lr, hr = (t.double() for t in batch(scale, b=1, h=2, w=2))
    noise = 0.05 * torch.randn_like(hr) if name == "ncsr" else None  # a non-zero condition
    conds = model.conditions(lr)

    def latents(x):
        return torch.cat([z.flatten() for z in model.encode(lr, x.view_as(hr), noise, conds)[0]])

    J = jacobian(latents, hr.flatten(), vectorize=True)
    logdet = torch.linalg.slogdet(J)[1].item()
    brute = logdet + gaussian_logp(latents(hr).view(1, -1, 1, 1)).item()
    # Measured over seeds 0-5 of the six cases: float64 within 5.4e-16 relative, float32 within
    # 4.7e-7. Tolerances 1e-13 and 2e-6: a log-det off by 2e-6 of its size (~1e-3 nats) fails.
    assert model.log_likelihood(lr, hr, noise).item() == pytest.approx(brute, rel=1e-13)
    f32 = tiny(name, scale)
    ld32 = f32.encode(lr.float(), hr.float(), None if noise is None else noise.float())[1]
    assert ld32.dtype == torch.float32 and ld32.item() == pytest.approx(logdet, rel=2e-6)


def test_nll_units_and_sign():
    model = tiny("srflow")
    lr, hr = batch(4, b=3)
    nll = model.nll(lr, hr)
    objective = model.log_likelihood(lr, hr)
    assert torch.allclose(nll, -objective / (math.log(2) * hr.shape[2] * hr.shape[3]))
    assert torch.allclose(model.nll(lr[1:2], hr[1:2]), nll[1:2], rtol=1e-5)  # batch-independent
    assert model(lr, hr)["nll"].item() == pytest.approx(nll.mean().item(), rel=1e-6)
    uniform = build_model("srflow", {**TINY["srflow"], "dequant": "uniform"}).eval()
    uniform.load_state_dict(model.state_dict())
    assert (uniform.nll(lr, hr) - nll).sub(5.0).abs().max() < 1e-5  # exactly log2(32) bits


def test_dequantisation_noise_only_in_training():
    lr, hr = batch(4)
    for dequant, noisy in (("gaussian", True), ("uniform", True), ("none", False)):
        model = tiny("srflow", dequant=dequant).train()
        a, b = model(lr, hr)["loss"], model(lr, hr)["loss"]
        assert (a != b) == noisy
        model.eval()
        assert model(lr, hr)["loss"] == model(lr, hr)["loss"]


def test_temperature():
    model = tiny("srflow")
    lr, _ = batch(4, b=1)
    s0 = model.sample(lr, 3, 0.0)
    assert torch.equal(s0, model.sample(lr, 3, 0.0)) and torch.equal(s0[:, 0], s0[:, 2])
    zeros = [torch.zeros(1, 6, 8, 12), torch.zeros(1, 96, 2, 3)]  # split eps and z_L all 0
    with torch.no_grad():
        decoded = model.reconstruct(lr, zeros)[0].clamp(0, 1)
    assert torch.equal(s0[:, 0], decoded)
    assert not torch.equal(model.sample(lr, 1, 0.9), model.sample(lr, 1, 0.9))
    spread = [
        model.sample(lr, 16, t, NoiseSource(range(16)))[0].std(0).mean() for t in (0.3, 0.6, 1)
    ]
    assert 0 < spread[0] < spread[1] < spread[2]


def test_conditioning_changes_the_output():
    model = tiny("srflow")
    lr, _ = batch(4, b=2)
    s = model.sample(lr[:1], 1, 0.0)
    assert (s - model.sample(lr[1:], 1, 0.0)).abs().max() > 1e-3


@pytest.mark.parametrize("name", FLOWS)
def test_n_samples_at_once_equal_one_at_a_time(name):
    model = tiny(name)
    lr, _ = batch(4, b=2)
    seeds = [11, 12, 13, 21, 22, 23]
    together = model.sample(lr, 3, 0.9, NoiseSource(seeds))
    for b in range(2):
        for i in range(3):
            one = model.sample(lr[b : b + 1], 1, 0.9, NoiseSource([seeds[3 * b + i]]))
            assert torch.equal(one[0, 0], together[b, i])  # bit-identical


@pytest.mark.parametrize("name", FLOWS)
def test_one_training_step_gives_finite_gradients(name):
    model = tiny(name).train()
    lr, hr = batch(4)
    model(lr, hr)["loss"].backward()
    unused = {k for k, p in model.named_parameters() if not p.requires_grad}
    for k, p in model.named_parameters():
        if k not in unused:
            assert p.grad is not None and torch.isfinite(p.grad).all(), k
    expected = {"f.", "RRDB.upconv2.", "RRDB.HRconv.", "RRDB.conv_last."}
    if name == "ncsr":  # level 1 is not noise-conditional (S = 0, 16, 16)
        expected |= {f"flow.0.layers.{j}.affine.fAffine_std." for j in (2, 3)}
    assert {k for k in unused if not k.startswith(tuple(expected))} == set()
    assert all(any(k.startswith(e) for k in unused) for e in expected)


def test_encoder_frozen_for_the_first_half():
    model = tiny("srflow").train()
    lr, hr = batch(4)
    model.on_step(0, 10)
    model(lr, hr)["loss"].backward()
    assert model.RRDB.conv_first.weight.grad is None
    assert model.flow[0].layers[2].affine.fAffine[0].weight.grad is not None
    model.on_step(5, 10)
    assert model.RRDB.conv_first.weight.requires_grad
    assert not model.RRDB.HRconv.weight.requires_grad  # unused parts stay frozen
    released = tiny("srflow", freeze_encoder=0.0)
    released.on_step(0, 10)
    assert released.RRDB.conv_first.weight.requires_grad


def test_actnorm_initialises_once_and_never_after_loading(tmp_path):
    model = build_model("srflow", TINY["srflow"]).train()
    lr, hr = batch(4)
    model(lr, hr)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state["flow.0.layers.0.actnorm.logs"].abs().sum() > 0
    model(lr * 0.5, hr * 0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for load in ("load_state_dict", "mark_initialized"):
        other = build_model("srflow", TINY["srflow"]).train()
        if load == "load_state_dict":
            other.load_state_dict(state)
        else:
            other.mark_initialized()
        before = {k: v.clone() for k, v in other.state_dict().items()}
        other(lr, hr)
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items()), load
    path = tmp_path / "RRDB.pth"  # --rrdb-init loads at step 0 unless weights were loaded
    enc = RRDBNet(4, 8, 2, 4)
    torch.save(enc.state_dict(), path)
    fresh = build_model("srflow", {**TINY["srflow"], "rrdb_init": str(path)})
    fresh.on_step(0, 10)
    assert torch.equal(fresh.RRDB.conv_first.weight, enc.conv_first.weight)
    resumed = build_model("srflow", {**TINY["srflow"], "rrdb_init": str(path)})
    resumed.mark_initialized()
    resumed.on_step(0, 10)
    assert not torch.equal(resumed.RRDB.conv_first.weight, enc.conv_first.weight)


@pytest.mark.parametrize("name", ["srflow", "srflow_da", "ncsr"])
def test_a_random_encoder_frozen_at_start_is_a_warning(name, tmp_path, recwarn):
    """The paper's --freeze-encoder 0.5 froze a random encoder for half the run, without a word,
    where --rrdb-init was not given: training from the start, or a pre-trained RRDB, is meant."""
    said = r"--freeze-encoder 0.5: the encoder stays frozen for the first 50% of the steps, and "
    with pytest.warns(UserWarning, match=said + "without --rrdb-init it is random"):
        build_model(name, TINY[name]).check_files(loaded=False)
    path = tmp_path / "RRDB.pth"
    torch.save(build_model(name, TINY[name]).RRDB.state_dict(), path)
    recwarn.clear()
    build_model(name, {**TINY[name], "rrdb_init": str(path)}).check_files(loaded=False)
    build_model(name, {**TINY[name], "freeze_encoder": 0.0}).check_files(loaded=False)
    build_model(name, TINY[name]).check_files(loaded=True)  # a resume: its encoder was trained
    assert not [w for w in recwarn if "--freeze-encoder" in str(w.message)]


def test_ncsr_noise():
    model = tiny("ncsr", noise_steps="0,1,2")
    active = [[bool(getattr(m.affine, "noise_conditional", False)) for m in level.layers[2:4]]
              for level in model.flow]  # fmt: skip
    assert active == [[False, False], [False, True], [True, True]]  # the last S steps per level
    lr, hr = batch(4)
    torch.manual_seed(3)
    lr_in, hr_in, eps = model.perturb(lr, hr)
    assert torch.allclose(hr_in - hr, eps, atol=1e-6) and 0 < eps.std() < 0.05
    assert torch.allclose(lr_in - lr, imresize_torch(eps, 0.25), atol=1e-6)
    z_clean = model.encode(lr, hr)[0][-1]
    z_noisy = model.encode(lr, hr, torch.randn_like(hr))[0][-1]
    assert (z_noisy - z_clean).abs().max() > 1e-3  # the condition matters
    zero = model.encode(lr, hr, torch.zeros_like(hr))[0][-1]
    assert torch.allclose(zero, z_clean, atol=1e-6)  # inference uses the zero condition


def test_sr_flow_da_variants():
    lr, hr = batch(4)
    for variant, n in (("r", 2), ("s", 2), ("d", 2)):
        model = tiny("srflow_da", variant=variant)
        latents, _ = model.encode(lr, hr)
        back, _ = model.reconstruct(lr, latents)
        assert (back - hr).abs().max() < 1e-4 and len(latents) == n
    s = tiny("srflow_da", variant="s")
    assert s.flow[0].factor == 4 and s.lr_multiple == 1
    with pytest.raises(UsageError):
        build_model("srflow", {"scale": 2})


def test_tiled_sampling_uses_whole_image_noise_fields():
    """Each tile replays the untiled sample's draws, at whole-image size, and cuts its part
    (before, only the untiled draw's shapes were checked: a tile drawing its own noise passed)."""
    model = tiny("srflow")
    lr, _ = batch(4, b=1, h=12, w=12)
    draws, vectors = [], []
    real = NoiseSource._draw

    def record(self, call, shape):
        draws.append((call, shape))
        return real(self, call, shape)

    with (
        mock.patch.object(NoiseSource, "_draw", record),
        mock.patch.object(NoiseSource, "vector", lambda self, d: vectors.append(d)),
    ):
        whole = draw(model, lr, [1, 2], 0.9, 0, 0)
        untiled, draws = draws, []
        tiled = draw(model, lr, [1, 2], 0.9, 8, 4)
    assert untiled == [(0, (96, 6, 6)), (1, (6, 24, 24))]  # z_L at LR/2, the split eps at HR/2
    assert draws == untiled * 4  # 2 x 2 tiles of 8 (and 4) LR px, each the same two fields
    assert not vectors  # spatial fields only: tiles cut them from the whole
    assert tiled.shape == whole.shape == (2, 3, 48, 48) and torch.isfinite(tiled).all()


def test_config_flags():
    cfg = parse(build_model("srflow", TINY["srflow"]).Config, ["--dequant", "uniform",
                "--no-unused-conv", "--freeze-encoder", "0", "--lu"], "t")  # fmt: skip
    assert (cfg.dequant, cfg.unused_conv, cfg.freeze_encoder, cfg.lu) == ("uniform", False, 0, True)
    model = build_model("srflow", {**TINY["srflow"], "lu": True})
    lr, hr = batch(4)
    model.train()(lr, hr)["loss"].backward()
    with pytest.raises(UsageError):
        model.export_official_state_dict()
    recipe = model.recipe(4)
    assert recipe.milestones == (0.5, 0.75, 0.9, 0.95) and recipe.patch == 40
    assert build_model("srflow_da", TINY["srflow_da"]).recipe(8).learning_rate == 2e-4


def test_rrdb_init_from_own_rrdb_checkpoint(tmp_path):
    """The paper's two stages in srspace: train `rrdb` (L1), then --rrdb-init its last.pt."""
    assert sr_train.main(["--model", "rrdb", "--scale", "4", "--data", "demo", "--steps", "1",
                          "--batch", "1", "--patch", "8", "--workers", "0", "--val-every", "0",
                          "--loss", "le", "--le-sigma-feats", "8", "--nb", "2", "--nf", "8",
                          "--gc", "4",
                          "--out", str(tmp_path / "rrdb")]) == 0  # fmt: skip
    ck = torch.load(tmp_path / "rrdb" / "last.pt", weights_only=True)
    flow = build_model(
        "srflow", {**TINY["srflow"], "rrdb_init": str(tmp_path / "rrdb" / "last.pt")}
    )
    flow.on_step(0, 10)
    for k, v in flow.RRDB.state_dict().items():  # the σ branch of the `le` run is left out
        assert torch.equal(v, ck["state_dict"][f"net.{k}"]), k
    other = tmp_path / "bicubic"
    assert sr_train.main(["--model", "bicubic", "--steps", "0", "--out", str(other)]) == 0
    wrong = build_model("srflow", {**TINY["srflow"], "rrdb_init": str(other / "last.pt")})
    with pytest.raises(CheckpointError, match="a checkpoint of bicubic;"):
        wrong.on_step(0, 10)


def test_init_from_a_released_file(tmp_path, capsys):
    """--init-from SRFlow_DF2K_4X.pth (fine-tuning a release) maps the released key layout as
    sr_sample.py --ckpt does (it took srspace's key names only: 1031 missing and 1031 unexpected
    keys); a release of another model or scale is refused naming the flags it fits."""

    def train(name, scale, release, out):
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY[name].items()]
        argv = ["--model", name, "--scale", str(scale), "--data", "demo", "--steps", "0",
                "--workers", "0", "--val-every", "0", *flags, "--init-from", str(release),
                "--out", str(tmp_path / out)]  # fmt: skip
        return sr_train.main(argv)

    release = tmp_path / "SRFlow_x4.pth"  # as saved by the released code under DataParallel
    sd = tiny("srflow").export_official_state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, release)
    assert train("srflow", 4, release, "run") == 0
    assert f"--init-from {release}: its weights (a state_dict)" in capsys.readouterr().out
    got = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(got[k], sd[o]) for k, o in tiny("srflow").official_keys().items())

    torch.save(tiny("srflow", 8).export_official_state_dict(), tmp_path / "SRFlow_x8.pth")
    for name, file, fits in [("ncsr", "SRFlow_x4.pth", "--model srflow --scale 4"),
                             ("srflow", "SRFlow_x8.pth", "--model srflow --scale 8")]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            train(name, 4, tmp_path / file, f"{name}_{file}")
        err = capsys.readouterr().err
        assert e.value.code == 6 and err.count("\n") == 1
        assert f"--init-from {tmp_path / file}: does not match" in err and fits in err


# Facts found by running the released code side by side (tests/bench/check_official_parity.py).


@pytest.mark.parametrize("name", FLOWS)
@pytest.mark.parametrize("scale", [4, 8])
def test_conditioning_maps_are_the_post_activation_upconv_outputs(name, scale):
    """The released RRDBNet's in-place LeakyReLU makes fea_up2/4/8 post-activation maps."""
    model = tiny(name, scale)
    lr, _ = batch(scale)
    pre = {}
    hooks = [
        getattr(model.RRDB, f"upconv{i}").register_forward_hook(
            lambda m, args, out, i=i: pre.__setitem__(2**i, out)
        )
        for i in range(1, scale.bit_length())
    ]
    conds = model.conditions(lr)
    for h in hooks:
        h.remove()
    nf = TINY[name]["nf"]
    checked = 0
    for key, cond in zip(model.cond_keys, conds):
        up = int(key.removeprefix("fea_up"))
        if up >= 2:
            assert torch.equal(cond[:, :nf], F.leaky_relu(pre[up], 0.2)), key
            assert not torch.equal(cond[:, :nf], pre[up])  # the activation changed something
            checked += 1
    assert checked == (1 if scale == 4 else 2)  # x4: fea_up2; x8: fea_up4 and fea_up2


def test_stacked_rrdb_blocks_per_model_and_scale():
    """Released configs: SRFlow x8 stacks blocks 1,3,5,7; NCSR x8 and every x4 use 1,8,15,22."""
    want = {("srflow", 4): (1, 8, 15, 22), ("srflow", 8): (1, 3, 5, 7),
            ("srflow_da", 4): (1, 8, 15, 22), ("srflow_da", 8): (1, 8, 15, 22),
            ("ncsr", 4): (1, 8, 15, 22), ("ncsr", 8): (1, 8, 15, 22)}  # fmt: skip
    for (name, scale), blocks in want.items():
        assert meta_model(name, {"scale": scale}).blocks == blocks, (name, scale)


@pytest.mark.parametrize("name", FLOWS)
def test_format_1_flow_checkpoints_are_refused(tmp_path, capsys, name):
    """Format-1 flows were trained on pre-activation maps: another function, never loaded."""
    model = tiny(name)
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"model": name, "model_cfg": {**TINY[name], "scale": 4},
                           "state_dict": model.state_dict(), "step": 3})  # fmt: skip
    sr_lib.models.load_model(path)  # the current format loads
    ck = torch.load(path, weights_only=True)
    ck["format"] = 1
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="retrain"):
        sr_lib.models.load_model(path)
    img = tmp_path / "in.png"
    iio.imwrite(img, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["--ckpt", str(path), "--input", str(img), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 6 and len(err.splitlines()) == 1 and str(path) in err, err
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(path.read_bytes())
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", name, "--resume", "auto", "--out", str(run)])
    assert e.value.code == 6 and "retrain" in capsys.readouterr().err


def test_format_1_checkpoints_of_other_models_still_load(tmp_path):
    model = build_model("edsr", TINY["edsr"])
    path = tmp_path / "edsr.pt"
    save_checkpoint(path, {"model": "edsr", "model_cfg": {**TINY["edsr"], "scale": 4},
                           "state_dict": model.state_dict(), "step": 0})  # fmt: skip
    ck = torch.load(path, weights_only=True)
    ck["format"] = 1
    torch.save(ck, path)
    net, _ = sr_lib.models.load_model(path)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in model.state_dict().items())


# sr_sample.py --save-latent and --latent for flows (docs/flows.md, "Saved latents").


@pytest.fixture(scope="module")
def flow_ckpts(tmp_path_factory):
    """Checkpoints of tiny flows with non-trivial weights (the samples depend on the latents),
    srflow at x4 and x8 too."""
    folder = tmp_path_factory.mktemp("flow_ckpts")
    paths = {}
    for name, scale in [(n, 4) for n in FLOWS] + [("srflow", 8)]:
        cfg = {**TINY[name], "scale": scale}
        key = name if scale == 4 else f"{name}_x{scale}"
        paths[key] = folder / f"{key}.pt"
        save_checkpoint(paths[key], {"model": name, "model_cfg": cfg, "step": 0,
                                     "state_dict": tiny(name, scale).state_dict()})  # fmt: skip
    return paths


def lr_image(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    iio.imwrite(path, img)
    return path


def pngs(folder, n, stem="r0"):
    return [iio.imread(folder / f"{stem}_sample{i:05d}.png") for i in range(n)]


@pytest.mark.parametrize("name", FLOWS)
def test_save_latent_then_latent_reproduces_a_flow_sample(tmp_path, flow_ckpts, name):
    """--save-latent writes sample i's latent fields z0, z1, ... (C, h, w), temperature applied,
    at the LR padded to lr_multiple (9 x 11: srflow pads to 2); --latent decodes them to the
    same PNG, bit for bit, one output per file or per row of a (k, C, h, w) file; the PNGs are
    the library's `sample` with the same seeds (the same draw as without --save-latent)."""
    model = sr_lib.models.load_model(flow_ckpts[name])[0]
    inp = lr_image(tmp_path / "in" / "r0.png", 9, 11)
    base = ["--ckpt", flow_ckpts[name], "--input", inp]
    assert run(*base, "--n", 3, "--batch", 2, "--temperature", 0.7, "--save-latent", "--out",
               tmp_path / "a") == 0  # fmt: skip
    m = model.lr_multiple
    h, w = -(-9 // m) * m * 4, -(-11 // m) * m * 4
    files = [tmp_path / "a" / f"r0_sample{i:05d}.latent.npz" for i in range(3)]
    z = [dict(np.load(f)) for f in files]
    fields = model.latent_fields()
    assert sorted(z[0]) == sorted(["made_by", *(f"z{k}" for k in range(len(fields)))])
    assert len(fields) >= 2 and json.loads(str(z[0]["made_by"]))["model"] == name
    for k, (c, down) in enumerate(fields):
        assert z[0][f"z{k}"].shape == (c, h // down, w // down)
        assert z[0][f"z{k}"].dtype == np.float32
    a = pngs(tmp_path / "a", 3)
    assert not (a[0] == a[2]).all()  # the latents show in the samples
    lr = torch.from_numpy(iio.imread(inp)).permute(2, 0, 1)[None] / 255
    seeds = [sr_sample.sample_seed(0, "r0", i) for i in range(3)]
    sr = model.sample(lr, 3, 0.7, NoiseSource(seeds))[0]
    assert all((to_uint8(sr[i : i + 1])[0] == a[i]).all() for i in range(3))
    # decoded again: sample 2 from its file, all three from one (3, C, h, w) file
    assert run(*base, "--latent", files[2], "--out", tmp_path / "b") == 0
    assert sorted(p.name for p in (tmp_path / "b").glob("*.png")) == ["r0_sample00000.png"]
    assert (pngs(tmp_path / "b", 1)[0] == a[2]).all()
    np.savez(tmp_path / "all.npz", **{k: np.stack([zi[k] for zi in z]) for k in z[0]})
    assert run(*base, "--latent", tmp_path / "all.npz", "--save-latent", "--out",
               tmp_path / "c") == 0  # fmt: skip
    assert all((x == y).all() for x, y in zip(pngs(tmp_path / "c", 3), a))
    for i in range(3):  # saved again: the same fields
        again = np.load(tmp_path / "c" / f"r0_sample{i:05d}.latent.npz")
        assert all((again[k] == z[i][k]).all() for k in z[i])
    # what is saved is the temperature's draw: at T = 1 the same draw, unscaled
    assert run(*base, "--n", 1, "--temperature", 1, "--save-latent", "--out", tmp_path / "t1") == 0
    one = np.load(tmp_path / "t1" / "r0_sample00000.latent.npz")
    assert all((np.float32(0.7) * one[k] == z[0][k]).all() for k in z[0] if k != "made_by")


def test_flow_latent_with_tiles(tmp_path, flow_ckpts):
    """Tiled sampling draws the latent fields at whole-image size and cuts them per tile:
    --save-latent writes the same whole-image fields tiled or not, and --latent decodes them,
    tiled or not, to the untiled sample."""
    inp = lr_image(tmp_path / "in" / "r0.png", 36, 44, seed=5)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp, "--save-latent"]
    assert run(*base, "--n", 2, "--out", tmp_path / "u") == 0
    assert run(*base, "--n", 2, "--tile", 16, "--out", tmp_path / "t") == 0
    u, t = pngs(tmp_path / "u", 2), pngs(tmp_path / "t", 2)
    assert all((x == y).all() for x, y in zip(u, t)) and not (u[0] == u[1]).all()
    for i in range(2):
        zu = np.load(tmp_path / "u" / f"r0_sample{i:05d}.latent.npz")
        zt = np.load(tmp_path / "t" / f"r0_sample{i:05d}.latent.npz")
        assert all((zu[k] == zt[k]).all() for k in zu)
    latent = tmp_path / "u" / "r0_sample00001.latent.npz"
    assert run(*base, "--latent", latent, "--tile", 16, "--out", tmp_path / "tl") == 0
    assert (pngs(tmp_path / "tl", 1)[0] == u[1]).all()


@pytest.mark.parametrize(
    "latent, code, words",
    [
        ("other size", 3, ": fields z0 (6, 20, 24), z1 (96, 5, 6), the latents of an LR of 12x10 "
                          "px, not of r0.png's LR of 12x12 px (z0 (6, 24, 24), z1 (96, 6, 6) in "
                          "this x4 SRFlow, which pads the LR to a multiple of 2); a --latent file "
                          "fits one LR size: give --input only images of that size, or --latent "
                          "DIR, a folder written by --save-latent (each input decoded from its "
                          "own files there)"),
        ("x8", 3, "holds z0 (6, 40, 48), z1 (12, 20, 24), z2 (192, 5, 6); expected this model's 2 "
                  "latent fields z0, z1"),
        ("srflow_da", 3, "fields z0 (6, 24, 24), z1 (24, 12, 12), the latents of no LR of this "
                         "model, not of r0.png's LR of 12x12 px (z0 (6, 24, 24), z1 (96, 6, 6)"),
        ("ncsr", 3, ": saved by an x4 ncsr model, not this x4 srflow (its latents decode to other "
                    "images here); decode it with an x4 ncsr checkpoint"),
        ("made_by", 3, ": its made_by entry is not the record --save-latent writes"),
        ("one field", 3, "holds z0 (6, 24, 24); expected this model's 2 latent fields z0, z1, "
                         "each (C, h, w) or all (k, C, h, w) with the same k >= 1"),
        ("mixed", 3, "expected this model's 2 latent fields"),
        ("rows", 3, "its fields hold [2, 3] samples; expected one k"),
        ("nan", 3, "holds NaN or infinite values; use a finite latent"),
        ("refvae", 3, "a .npy array, not the .npz archive of this model's 2 latent fields z0, z1"),
        ("junk", 3, "not a readable .npz archive (no NumPy file: it begins b'junk', not with "
                    "np.savez's header)"),
    ],
)  # fmt: skip
def test_a_bad_flow_latent_is_one_line(tmp_path, flow_ckpts, capsys, latent, code, words):
    """A --latent file of another LR size, scale or flow, of other fields, non-finite, of a
    latent model (a (D,) .npy) or no archive: one line naming the file and what was expected,
    exit 3 (a file that cannot be used, as for refvae/varsr: it was 2 for some), nothing
    written."""
    inp = lr_image(tmp_path / "in" / "r0.png", 12, 12)
    made = {"other size": ("srflow", 10, 12), "x8": ("srflow_x8", 10, 12),
            "srflow_da": ("srflow_da", 12, 12), "ncsr": ("ncsr", 12, 12)}  # fmt: skip
    f = tmp_path / f"{latent}.npz"
    if latent in made:
        key, h, w = made[latent]
        other = lr_image(tmp_path / "other" / "o.png", h, w)
        assert run("--ckpt", flow_ckpts[key], "--input", other, "--n", 1, "--save-latent",
                   "--out", tmp_path / "saved") == 0  # fmt: skip
        f.write_bytes((tmp_path / "saved" / "o_sample00000.latent.npz").read_bytes())
        if latent in ("x8", "srflow_da"):  # as written before made_by: the shapes tell
            np.savez(f, **{k: v for k, v in np.load(f).items() if k != "made_by"})
    elif latent == "made_by":
        np.savez(f, z0=np.zeros((6, 24, 24), "f4"), z1=np.ones((96, 6, 6), "f4"), made_by="x")
    elif latent == "one field":
        np.savez(f, z0=np.zeros((6, 24, 24), np.float32))
    elif latent == "mixed":
        np.savez(f, z0=np.zeros((6, 24, 24), np.float32), z1=np.zeros((1, 96, 6, 6), np.float32))
    elif latent == "rows":
        np.savez(f, z0=np.zeros((2, 6, 24, 24), np.float32), z1=np.zeros((3, 96, 6, 6), "f4"))
    elif latent == "nan":
        np.savez(f, z0=np.zeros((6, 24, 24), np.float32), z1=np.full((96, 6, 6), np.nan, "f4"))
    elif latent == "refvae":
        f = tmp_path / "r0_sample00000.latent.npy"
        np.save(f, np.zeros(8, np.float32))
    else:
        f.write_text("junk")
    capsys.readouterr()
    argv = ["--ckpt", flow_ckpts["srflow"], "--input", inp, "--latent", f, "--out", tmp_path / "o"]
    assert run(*argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sr_sample.py: error: --latent {f}"), err
    assert words in err[0], err[0]
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_a_flow_latent_names_its_model(tmp_path, flow_ckpts, capsys):
    """--save-latent records in each .latent.npz what made it (made_by: model, scale,
    checkpoint sha256 and config): another checkpoint of the same model decodes it with one
    warning line (a fair experiment: the weights trained further), another flow of the same
    shapes is refused in one line (exit 2); a file without made_by (written before it, or by
    hand) decodes with any flow of its shapes, without a word."""
    inp = lr_image(tmp_path / "in" / "r0.png", 12, 12)
    base = ["--input", inp, "--n", 1]
    assert run("--ckpt", flow_ckpts["srflow"], *base, "--save-latent", "--out", tmp_path / "a") == 0
    saved = tmp_path / "a" / "r0_sample00000.latent.npz"
    made_by = json.loads(str(np.load(saved)["made_by"]))
    digest = hashlib.sha256(flow_ckpts["srflow"].read_bytes()).hexdigest()
    assert made_by["checkpoint_sha256"] == digest
    assert (made_by["model"], made_by["scale"], made_by["config"]["flow_steps"]) == ("srflow", 4, 2)
    # the same fields from a checkpoint of other weights and another K
    other = tmp_path / "other.pt"
    cfg = {**TINY["srflow"], "scale": 4, "flow_steps": 3}
    weights = tiny("srflow", 4, 1, flow_steps=3).state_dict()
    save_checkpoint(other, {"model": "srflow", "model_cfg": cfg, "step": 0, "state_dict": weights})
    capsys.readouterr()
    assert run("--ckpt", other, "--input", inp, "--latent", saved, "--out", tmp_path / "b") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [
        f"sr_sample.py: warning: --latent {saved}: saved by another srflow checkpoint (sha256 "
        f"{made_by['checkpoint_sha256'][:12]}...; its config differs in flow_steps): decoded "
        "with this one, its samples are not the saved ones"
    ]
    assert (tmp_path / "b" / "r0_sample00000.png").is_file()
    # the same file decoded by NCSR of the same shapes: refused, nothing written
    ncsr = ["--ckpt", flow_ckpts["ncsr"], "--input", inp]
    assert run(*ncsr, "--latent", saved, "--out", tmp_path / "c") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved by an x4 srflow model, not this x4 ncsr" in err[0], err
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.png"))
    # written the old way (no made_by): NCSR decodes it, as its own, with no warning
    old = tmp_path / "old.npz"
    np.savez(old, **{k: v for k, v in np.load(saved).items() if k != "made_by"})
    assert run(*ncsr, "--latent", old, "--out", tmp_path / "d") == 0
    assert "warning" not in capsys.readouterr().err
    assert (tmp_path / "d" / "r0_sample00000.png").is_file()
    # and srflow decodes the old file to the saved sample, bit for bit
    assert run("--ckpt", flow_ckpts["srflow"], "--input", inp, "--latent", old, "--out",
               tmp_path / "e") == 0  # fmt: skip
    assert (pngs(tmp_path / "e", 1)[0] == pngs(tmp_path / "a", 1)[0]).all()


def test_another_checkpoint_draws_the_saved_latents_again(tmp_path, flow_ckpts):
    """A flow's latents come from --seed and --temperature alone (sample i of image `stem`:
    sample_seed(seed, stem, i), fields of the model's latent shapes), so a rerun of a
    --save-latent run with another checkpoint of the same latent shapes (NCSR of SRFlow's
    config here) draws the same fields, for every image and sample: it decodes a whole saved run
    with that checkpoint, as the message of a --latent folder says."""
    inp = tmp_path / "in"
    lr_image(inp / "a.png", 8, 8)
    lr_image(inp / "b.png", 9, 11, seed=1)
    flags = ["--input", inp, "--n", 2, "--seed", 3, "--temperature", 0.8, "--save-latent"]
    assert run("--ckpt", flow_ckpts["srflow"], *flags, "--out", tmp_path / "s") == 0
    assert run("--ckpt", flow_ckpts["ncsr"], *flags, "--batch", 1, "--out", tmp_path / "n") == 0
    for stem in "ab":
        for i in range(2):
            name = f"{stem}_sample{i:05d}"
            zs, zn = (np.load(tmp_path / d / f"{name}.latent.npz") for d in "sn")
            assert all((zs[k] == zn[k]).all() for k in ("z0", "z1"))
            sample = [iio.imread(tmp_path / d / f"{name}.png") for d in "sn"]
            assert not (sample[0] == sample[1]).all()  # decoded by another model


def test_latent_dir_decodes_a_flow_run_again(tmp_path, flow_ckpts, capsys):
    """--latent DIR of a flow's --save-latent run: each input decoded from its own
    NAME_sample{i:05d}.latent.npz (of its LR size: inputs of three sizes), the whole stem ("a"
    is not "a_b"), sample i to NAME_sample{i:05d}.png with its i (a gap stays), bit for bit the
    saved sample. The made_by of every file is checked: another checkpoint of the model decodes
    them with one warning line counting them; another flow is refused naming a file."""
    inp = tmp_path / "in"
    for k, (stem, (h, w)) in enumerate({"a": (8, 8), "a_b": (8, 10), "img 1": (10, 6)}.items()):
        lr_image(inp / f"{stem}.png", h, w, seed=k)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    s = tmp_path / "s"
    assert run(*base, "--n", 4, "--temperature", 0.8, "--save-latent", "--out", s) == 0
    for i in (1, 2):
        (s / f"a_sample{i:05d}.latent.npz").unlink()
    capsys.readouterr()
    assert run(*base, "--latent", s, "--temperature", 0.5, "--out", tmp_path / "d") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [
        "sr_sample.py: warning: --temperature: no effect, --latent sets the latents; ignored",
        f"sr_sample.py: warning: --latent {s}: the sample numbers of a have a gap (0, 3; 1 of 3 "
        "inputs have one), kept in the samples' names; sr_eval.py scores samples 0..N-1 of every "
        "image: --n 1 at most here; to score them all, decode a copy of the folder with each "
        "image's files numbered 0, 1, ...",
    ]
    d = {p.name: iio.imread(p) for p in (tmp_path / "d").glob("*.png")}
    want = ["a_sample00000.png", "a_sample00003.png"]
    want += [f"{stem}_sample{i:05d}.png" for stem in ("a_b", "img 1") for i in range(4)]
    assert sorted(d) == sorted(want)
    assert all((x == iio.imread(s / f)).all() for f, x in d.items())
    assert not (d["a_sample00000.png"] == d["a_sample00003.png"]).all()
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["n"] == 4
    # what the gap's warning says: sr_eval.py scores --n 1 there, not --n 2 (no sample 1 of a)
    hr = tmp_path / "hr"
    hr.mkdir()
    for stem in ("a", "a_b", "img 1"):  # (HR images of the samples' size)
        iio.imwrite(hr / f"{stem}.png", d[f"{stem}_sample00000.png"])
    score = ["--hr", hr, "--sr", tmp_path / "d", "--scale", 4, "--no-lpips", "--quiet"]
    assert sr_eval.main([str(a) for a in [*score, "--n", 1]]) == 0
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in [*score, "--n", 2]])
    assert e.value.code == 3 and "a_sample00001.png" in capsys.readouterr().err
    # another checkpoint of srflow: one warning line for the folder's 10 files
    other = tmp_path / "other.pt"
    cfg = {**TINY["srflow"], "scale": 4, "flow_steps": 3}
    weights = tiny("srflow", 4, 1, flow_steps=3).state_dict()
    save_checkpoint(other, {"model": "srflow", "model_cfg": cfg, "step": 0, "state_dict": weights})
    digest = hashlib.sha256(flow_ckpts["srflow"].read_bytes()).hexdigest()
    assert run("--ckpt", other, "--input", inp, "--latent", s, "--out", tmp_path / "o") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 2 and "a gap" in warned[1], warned
    assert warned[:1] == [
        f"sr_sample.py: warning: --latent {s}: 10 of 10 files saved by another srflow checkpoint "
        f"(sha256 {digest[:12]}...; its config differs in flow_steps): decoded with this one, its "
        "samples are not the saved ones"
    ]
    assert len(list((tmp_path / "o").glob("*.png"))) == 10
    # NCSR of the same shapes: refused at a file, before any work
    assert run("--ckpt", flow_ckpts["ncsr"], "--input", inp, "--latent", s, "--out",
               tmp_path / "n") == 3  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sr_sample.py: error: --latent {s / 'a_'}"), err
    assert "saved by an x4 srflow model, not this x4 ncsr" in err[0]
    assert not (tmp_path / "n").exists() or not list((tmp_path / "n").glob("*.png"))


def test_a_flow_latent_that_records_no_model_is_one_warning(tmp_path, flow_ckpts, capsys):
    """A flow's saved .npz without made_by (written before --save-latent recorded it) was
    decoded with any flow of its shapes without a word (NCSR's by SRFlow: other images). Now it
    is one warning line naming it, as for RefVAE/VarSR; for a --latent DIR one line for the
    folder; a file named by hand (a direction, say) is the user's own: none."""
    inp = tmp_path / "in"
    for k, stem in enumerate("ab"):
        lr_image(inp / f"{stem}.png", 8, 8, seed=k)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp, "--quiet"]
    s = tmp_path / "s"
    assert run(*base, "--save-latent", "--n", 1, "--out", s) == 0
    for f in s.glob("*.latent.npz"):  # as written before made_by
        np.savez(f, **{k: v for k, v in np.load(f).items() if k != "made_by"})
    said = ("with no record of the model that saved it (an srspace before --save-latent "
            "recorded it, or rewritten): decoded as this x4 srflow's, unchecked; another model's "
            "latent of these shapes decodes to other images without an error")  # fmt: skip
    z = s / "a_sample00000.latent.npz"
    capsys.readouterr()
    assert run(*base, "--input", inp / "a.png", "--latent", z, "--out", tmp_path / "f") == 0
    assert capsys.readouterr().err.splitlines() == [f"sr_sample.py: warning: --latent {z}: {said}"]
    assert run(*base, "--latent", s, "--out", tmp_path / "d") == 0
    assert capsys.readouterr().err.splitlines() == [
        f"sr_sample.py: warning: --latent {s}: 2 of 2 files {said}"
    ]
    assert (pngs(tmp_path / "d", 1, "a")[0] == pngs(s, 1, "a")[0]).all()
    hand = tmp_path / "direction.npz"
    hand.write_bytes(z.read_bytes())
    for flag in ("--latent", "--latent-shift"):
        assert run(*base, "--input", inp / "a.png", flag, hand, "--out", tmp_path / flag) == 0
        assert capsys.readouterr().err == ""


def test_a_latent_dir_file_of_another_lr_size_is_refused_before_any_sample(
    tmp_path, flow_ckpts, capsys
):
    """--latent DIR whose files of an input fit another LR size (another image's latents under
    its name, or the LR resized since) stopped only when that input was decoded, the samples of
    the inputs before it written. The fields' shapes (from the .npz headers) are checked against
    every input's LR size (from its header) before any work, by every --shard (shard 1/2 here
    does not decode that input): one line naming the file, its LR size and the input's."""
    inp = tmp_path / "in"
    for k, (stem, (h, w)) in enumerate({"a": (8, 8), "a_b": (8, 10), "img 1": (10, 6)}.items()):
        lr_image(inp / f"{stem}.png", h, w, seed=k)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    s = tmp_path / "s"
    assert run(*base, "--n", 2, "--save-latent", "--out", s) == 0
    for i in range(2):  # the last input's latents replaced by a_b's (an LR of another size)
        (s / f"img 1_sample{i:05d}.latent.npz").write_bytes(
            (s / f"a_b_sample{i:05d}.latent.npz").read_bytes()
        )
    capsys.readouterr()
    for shard in ("0/1", "0/2", "1/2"):
        out = tmp_path / f"d{shard[0]}"
        assert run(*base, "--latent", s, "--shard", shard, "--out", out) == 3
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert err == [
            f"sr_sample.py: error: --latent {s / 'img 1_sample00000.latent.npz'}: fields z0 (6, "
            "16, 20), z1 (96, 4, 5), the latents of an LR of 10x8 px, not of img 1.png's LR of "
            "6x10 px (z0 (6, 20, 12), z1 (96, 5, 3) in this x4 SRFlow, which pads the LR to a "
            "multiple of 2); a --latent folder's files of img 1 are the latents of the input img "
            "1 as it was sampled: give that input (with --from-hr if it was made so)"
        ], (shard, err)
        assert not out.exists() or not list(out.iterdir()), (shard, list(out.iterdir()))


def test_latent_dir_shards_read_the_contents_of_their_own_files_only(
    tmp_path, flow_ckpts, capsys, monkeypatch
):
    """--latent DIR with --shard K/N: every shard read and hashed the files of every input (a
    DIV2K x4 flow latent is ~33 MB a sample: N times the folder's reading) so that the shards'
    manifest.json agreed. A .npz's digest there is now that of its zip directory (each member's
    name, size and CRC-32 of its contents, `latent_fingerprint`): a shard reads the contents of
    its own inputs' files alone. The shards still write one manifest.json; a rerun skips what
    is complete, and one with another shard's file changed (same name and size, other
    contents) is refused."""
    inp = tmp_path / "in"
    for k, stem in enumerate("abcd"):
        lr_image(inp / f"{stem}.png", 8, 8, seed=k)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    s, e = tmp_path / "s", tmp_path / "e"
    assert run(*base, "--n", 2, "--temperature", 0.8, "--save-latent", "--out", s) == 0
    read, hashed = [], []
    flow, real_hash = sr_lib.models.srflow.SRFlow, sr_sample.file_sha256
    real_read = flow.read_latent

    def spy_read(self, path, *args):
        read.append(Path(path).name)
        return real_read(self, path, *args)

    monkeypatch.setattr(flow, "read_latent", spy_read)
    monkeypatch.setattr(sr_sample, "file_sha256", lambda f: hashed.append(f.name) or real_hash(f))
    mine = {"0/2": "ac", "1/2": "bd"}  # (the inputs in order, every other one)
    for shard, stems in mine.items():
        read.clear(), hashed.clear()
        assert run(*base, "--latent", s, "--shard", shard, "--out", e) == 0
        own = [f"{stem}_sample{i:05d}.latent.npz" for stem in stems for i in range(2)]
        assert (sorted(read), hashed) == (sorted(own * 2), [])  # checked, then decoded
    saved = {p.name: iio.imread(p) for p in s.glob("*.png")}
    got = {p.name: iio.imread(p) for p in e.glob("*.png")}
    assert sorted(got) == sorted(saved) and all((x == saved[f]).all() for f, x in got.items())
    capsys.readouterr()
    assert run(*base, "--latent", s, "--shard", "0/2", "--out", e) == 0
    assert "0 images sampled, 2 already complete" in capsys.readouterr().out
    (s / "b_sample00000.latent.npz").write_bytes((s / "c_sample00001.latent.npz").read_bytes())
    for shard in mine:
        assert run(*base, "--latent", s, "--shard", shard, "--out", e) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1:] == [
            f"sr_sample.py: error: {e} holds samples made with other contents of --latent {s}; "
            "use another --out, or --overwrite to redo them"
        ]
    # contents other than its directory's CRC-32s say (a bit flipped): refused where read whole
    bad = s / "a_sample00001.latent.npz"
    flipped = bytearray(bad.read_bytes())
    flipped[len(flipped) // 3] ^= 1
    bad.write_bytes(bytes(flipped))
    assert run(*base, "--latent", s, "--shard", "0/2", "--out", tmp_path / "f") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"sr_sample.py: error: --latent {bad}: not a readable .npz archive (Bad CRC-32 for file"
    ), err


def test_another_shards_latent_npz_without_its_zip_directory_is_refused_by_each(
    tmp_path, flow_ckpts, capsys
):
    """--latent DIR --shard: a .npz of another shard's input cut short (no zip directory) was
    fingerprinted by its whole contents' sha256 in the shards that do not decode it, which ran
    and wrote manifest.json; once the file was put back (as the shard that decodes it said),
    that shard was refused with 'holds samples made with other contents of --latent DIR', the
    digest now the directory's. Every shard refuses such a file now, naming it, before any
    work; the folder put right, both shards run."""
    inp = tmp_path / "in"
    for k, stem in enumerate("ab"):
        lr_image(inp / f"{stem}.png", 8, 8, seed=k)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    s, e = tmp_path / "s", tmp_path / "e"
    assert run(*base, "--n", 2, "--save-latent", "--out", s) == 0
    cut = s / "b_sample00001.latent.npz"  # input b: shard 1/2's
    whole = cut.read_bytes()
    cut.write_bytes(whole[:100])
    capsys.readouterr()
    for shard in ("0/2", "1/2"):
        assert run(*base, "--latent", s, "--shard", shard, "--out", e) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1:] == [
            f"sr_sample.py: error: --latent {cut}: not a readable .npz archive (File is not a "
            "zip file)"
        ], err
    assert not e.exists() or not list(e.iterdir())
    cut.write_bytes(whole)
    for shard in ("0/2", "1/2"):
        assert run(*base, "--latent", s, "--shard", shard, "--out", e) == 0, capsys.readouterr()
    assert sorted(p.name for p in e.glob("*.png")) == sorted(p.name for p in s.glob("*.png"))


def test_a_flow_latent_fits_one_lr_size(tmp_path, flow_ckpts, capsys):
    """A folder of inputs of two sizes with one --latent (or --latent-shift) file: the first
    input of another size was found when decoded, the samples of those before it written. Now
    each input's LR size is read from its header before any sample: one line (exit 3) naming
    it, nothing written, also by a --shard whose own inputs fit (every shard checks all)."""
    inp = tmp_path / "in"
    lr_image(inp / "a.png", 8, 8)
    lr_image(inp / "b.png", 8, 10, seed=1)
    lr_image(inp / "c.png", 8, 8, seed=2)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    assert run(*base, "--input", inp / "a.png", "--save-latent", "--out", tmp_path / "a") == 0
    z = tmp_path / "a" / "a_sample00000.latent.npz"
    capsys.readouterr()
    assert run(*base, "--latent", z, "--out", tmp_path / "o") == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err == [
        f"sr_sample.py: error: --latent {z}: fields z0 (6, 16, 16), z1 (96, 4, 4), the latents "
        "of an LR of 8x8 px, not of b.png's LR of 10x8 px (z0 (6, 16, 20), z1 (96, 4, 5) in this "
        "x4 SRFlow, which pads the LR to a multiple of 2); a --latent file fits one LR size: "
        "give --input only images of that size, or --latent DIR, a folder written by "
        "--save-latent (each input decoded from its own files there)"
    ]
    assert list((tmp_path / "o").glob("*.png")) == []
    shift = f"--latent-shift {z}: fields z0 (6, 16, 16), z1 (96, 4, 4), the latents of an LR of"
    for flags in (["--latent", z, "--shard", "0/2"], ["--latent-shift", z]):  # (0/2: a and c)
        assert run(*base, *flags, "--out", tmp_path / "p") == 3
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and "not of b.png's LR of 10x8 px" in err[0], err
        assert flags[0] == "--latent" or err[0].startswith(f"sr_sample.py: error: {shift}")
        assert list((tmp_path / "p").glob("*.png")) == []
    # what the line says: --latent DIR, each input its own files
    assert run(*base, "--save-latent", "--out", tmp_path / "all") == 0
    assert run(*base, "--latent", tmp_path / "all", "--out", tmp_path / "d") == 0
    for stem in "abc":
        assert (pngs(tmp_path / "d", 1, stem)[0] == pngs(tmp_path / "all", 1, stem)[0]).all()


def test_a_flow_latent_is_checked_against_an_input_whose_header_cannot_tell_its_size(
    tmp_path, flow_ckpts, capsys, monkeypatch
):
    """An input whose size its header could not tell (sr_lib.data.image_size: None) was checked
    against a --latent FILE, or its own file of a --latent DIR, only when decoded: the run stopped
    there with the samples of the inputs before it written. Now its pixels tell its size before
    any sample: one line naming the file (exit 3), nothing written."""
    inp = tmp_path / "in"
    lr_image(inp / "a.png", 8, 8)
    lr_image(inp / "b.png", 8, 10, seed=1)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    assert run(*base, "--save-latent", "--out", tmp_path / "all") == 0
    z = tmp_path / "all" / "a_sample00000.latent.npz"
    (tmp_path / "dir").mkdir()  # b's file of a's LR size
    for stem in "ab":
        (tmp_path / "dir" / f"{stem}_sample00000.latent.npz").write_bytes(z.read_bytes())
    size = sr_sample.image_size
    monkeypatch.setattr(sr_sample, "image_size", lambda p: None if p.name == "b.png" else size(p))
    for latent, file in ((z, z), (tmp_path / "dir", tmp_path / "dir" / "b_sample00000.latent.npz")):
        capsys.readouterr()
        assert run(*base, "--latent", latent, "--out", tmp_path / "o") == 3
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1, err
        assert err[0].startswith(f"sr_sample.py: error: --latent {file}: fields z0 (6, 16, 16)")
        assert "not of b.png's LR of 10x8 px" in err[0]
        assert not (tmp_path / "o").exists() or list((tmp_path / "o").glob("*.png")) == []


def test_flow_latent_flags_the_model_lacks_and_overrides(tmp_path, flow_ckpts, capsys):
    """--ref stays refvae's (one line, exit 2); --latent sets the number of outputs and the
    latents, so --n, --temperature and --seed typed with it are a warning and change nothing;
    several temperatures are refused."""
    inp = lr_image(tmp_path / "in" / "r0.png", 8, 8)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    np.savez(tmp_path / "z.npz", z0=np.zeros((6, 16, 16), np.float32),
             z1=np.ones((96, 4, 4), np.float32))  # fmt: skip
    assert run(*base, "--ref", "noise", "--n", 2, "--out", tmp_path / "s") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sr_sample.py: error: --ref: the srflow model does not support it (only: refvae)"
    ]
    control = ["--latent", tmp_path / "z.npz"]
    assert run(*base, *control, "--out", tmp_path / "plain") == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    typed = ["--n", 4, "--temperature", 0.3, "--seed", 9]
    assert run(*base, *control, *typed, "--out", tmp_path / "typed") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert [w.split(":")[2].strip() for w in warned] == ["--n", "--temperature", "--seed"]
    assert all("no effect, --latent sets the" in w for w in warned)
    assert (pngs(tmp_path / "typed", 1)[0] == pngs(tmp_path / "plain", 1)[0]).all()
    assert len(list((tmp_path / "typed").glob("*.png"))) == 1
    assert run(*base, *control, "--temperature", 0.5, 1, "--out", tmp_path / "sweep") == 2


@pytest.mark.parametrize("name", FLOWS)
def test_flow_latent_shift_walks_from_z0(tmp_path, flow_ckpts, capsys, name):
    """--latent-shift FILE (a .npz of one direction's fields, e.g. the difference of two saved
    latents) --latent-steps: one output per step k, z_0 + k · direction. Step 0 is z_0's sample
    bit for bit: the --latent file's, or without it the temperature-0 sample; steps +1 and -1
    differ from it and from each other, +1 from sample 0 along (sample 1 - sample 0) is sample 1
    (to float rounding); --save-latent writes each step's fields."""
    inp = lr_image(tmp_path / "in" / "r0.png", 9, 11)
    base = ["--ckpt", flow_ckpts[name], "--input", inp]
    assert run(*base, "--n", 2, "--save-latent", "--out", tmp_path / "a") == 0
    a, b = (dict(np.load(tmp_path / "a" / f"r0_sample{i:05d}.latent.npz")) for i in (0, 1))
    direction = tmp_path / "dir.npz"
    np.savez(direction, **{k: b[k] - a[k] for k in a if k != "made_by"})  # as docs/flows.md
    walk = ["--latent-shift", direction, "--latent-steps", "-1,0,1"]
    z0 = ["--latent", tmp_path / "a" / "r0_sample00000.latent.npz"]
    assert run(*base, *z0, *walk, "--save-latent", "--out", tmp_path / "w") == 0
    saved, w = pngs(tmp_path / "a", 2), pngs(tmp_path / "w", 3)
    assert not (tmp_path / "w" / "r0_sample00003.png").exists()
    assert (w[1] == saved[0]).all()  # step 0: z_0's sample, bit for bit
    assert not (w[0] == w[1]).all() and not (w[2] == w[1]).all() and not (w[0] == w[2]).all()
    assert np.abs(w[2].astype(int) - saved[1]).max() <= 1  # z_0 + (z_1 - z_0) = z_1
    for i, k in enumerate((-1, 0, 1)):
        z = np.load(tmp_path / "w" / f"r0_sample{i:05d}.latent.npz")
        assert all(
            np.allclose(z[f], a[f] + k * (b[f] - a[f]), atol=1e-6) for f in a if f != "made_by"
        )
    # without --latent, z_0 is the temperature-0 latent (zeros): step 0 is the T = 0 sample
    assert run(*base, *walk, "--out", tmp_path / "w0") == 0
    assert run(*base, "--n", 1, "--temperature", 0, "--out", tmp_path / "t0") == 0
    w0, t0 = pngs(tmp_path / "w0", 3), pngs(tmp_path / "t0", 1)[0]
    assert (w0[1] == t0).all() and not (w0[0] == t0).all() and not (w0[2] == t0).all()
    manifest = json.loads((tmp_path / "w0" / "manifest.json").read_text())
    assert set(manifest["control_sha256"]) == {"--latent-shift"}
    # a step far along it overflows: the line said "the checkpoint's weights give NaN"
    capsys.readouterr()
    assert run(*base, *walk[:2], "--latent-steps", "1e6", "--out", tmp_path / "far") == 5
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "has NaN pixels, not written; the --latent-shift walk left the model's "
        "range at --latent-steps 1e6: use smaller steps or a shorter direction"
    )


def test_a_bad_flow_latent_shift_is_one_line(tmp_path, flow_ckpts, capsys):
    """A --latent-shift direction of another LR size, of two rows, or with two --latent rows, or
    the file of another flow: one line naming the file, nothing written; exit 3 for the file
    (what was expected), 2 for the flags (two --latent rows)."""
    inp = lr_image(tmp_path / "in" / "r0.png", 8, 8)
    z = {"z0": np.ones((6, 16, 16), "f4"), "z1": np.ones((96, 4, 4), "f4")}
    np.savez(tmp_path / "ok.npz", **z)
    np.savez(tmp_path / "size.npz", z0=np.ones((6, 16, 20), "f4"), z1=np.ones((96, 4, 5), "f4"))
    np.savez(tmp_path / "two.npz", **{k: np.stack([v, v]) for k, v in z.items()})
    other = lr_image(tmp_path / "o" / "r0.png", 8, 8)
    assert run("--ckpt", flow_ckpts["ncsr"], "--input", other, "--n", 1, "--save-latent", "--out",
               tmp_path / "ncsr") == 0  # fmt: skip
    ncsr = tmp_path / "ncsr" / "r0_sample00000.latent.npz"
    cases = [
        (["--latent-shift", tmp_path / "size.npz"], f"--latent-shift {tmp_path / 'size.npz'}: "
         "fields z0 (6, 16, 20), z1 (96, 4, 5), the latents of an LR of 10x8 px, not of r0.png's "
         "LR of 8x8 px"),
        (["--latent-shift", tmp_path / "two.npz"], f"--latent-shift {tmp_path / 'two.npz'}: "
         "holds 2 samples; expected one direction, fields (C, h, w)"),
        (["--latent", tmp_path / "two.npz", "--latent-shift", tmp_path / "ok.npz"],
         "at most one --latent row (given: 2)", 2),
        (["--latent-shift", ncsr], f"--latent-shift {ncsr}: saved by an x4 ncsr model"),
    ]  # fmt: skip
    cases.append((["--latent-shift", tmp_path], f"--latent-shift {tmp_path}: a folder; give one "
                  ".npz file (of a direction's fields z0, z1, ...)"))  # fmt: skip
    for k, (flags, words, *code) in enumerate(cases):  # exit 3: a file that cannot be used
        capsys.readouterr()
        out = tmp_path / f"o{k}"
        code = code[0] if code else 3
        assert run("--ckpt", flow_ckpts["srflow"], "--input", inp, *flags, "--out", out) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (words, err)
        assert not out.exists() or not list(out.glob("*.png"))


def test_flow_latent_files_in_the_manifest_and_overwrite(tmp_path, flow_ckpts, capsys):
    """The --latent file's contents are in manifest.json (control_sha256): a rerun with other
    contents under the same name is refused; --overwrite deletes the old .latent.npz files of a
    larger --n, as it does the PNGs."""
    inp = lr_image(tmp_path / "in" / "r0.png", 8, 8)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    assert run(*base, "--n", 3, "--save-latent", "--out", tmp_path / "a") == 0
    z = tmp_path / "z.npz"
    z.write_bytes((tmp_path / "a" / "r0_sample00001.latent.npz").read_bytes())
    argv = [*base, "--latent", z, "--save-latent", "--out", tmp_path / "o"]
    assert run(*argv) == 0
    z.write_bytes((tmp_path / "a" / "r0_sample00002.latent.npz").read_bytes())
    capsys.readouterr()
    assert run(*argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sr_sample.py: error: {tmp_path / 'o'} holds samples made with other contents of "
        f"--latent {z}; use another --out, or --overwrite to redo them"
    ]
    assert run(*argv, "--overwrite") == 0
    assert (pngs(tmp_path / "o", 1)[0] == pngs(tmp_path / "a", 3)[2]).all()
    assert run(*base, "--n", 1, "--save-latent", "--overwrite", "--out", tmp_path / "a") == 0
    assert sorted(p.name for p in (tmp_path / "a").glob("r0_*")) == [
        "r0_sample00000.latent.npz", "r0_sample00000.png"
    ]  # fmt: skip
    (tmp_path / "a" / "r0_sample00000.latent.npz").unlink()  # incomplete: sampled again
    assert run(*base, "--n", 1, "--save-latent", "--out", tmp_path / "a") == 0
    assert (tmp_path / "a" / "r0_sample00000.latent.npz").is_file()


def test_the_same_latent_folder_named_another_way_is_no_other(tmp_path, flow_ckpts, capsys):
    """A rerun (or another --shard) with --latent DIR/ (a shell's completion adds the slash), an
    absolute path or a link to DIR was refused: "holds samples made with --latent "DIR", not
    "DIR/"", the path's text compared, where its files' contents (control_sha256) are what make
    the samples. The same files under another name are the same run now; other contents under
    the same link are still refused."""
    inp = lr_image(tmp_path / "in" / "r0.png", 8, 8)
    base = ["--ckpt", flow_ckpts["srflow"], "--input", inp]
    s, t, e = tmp_path / "s", tmp_path / "t", tmp_path / "e"
    assert run(*base, "--n", 2, "--save-latent", "--out", s) == 0
    assert run(*base, "--n", 2, "--seed", 1, "--save-latent", "--out", t) == 0
    link = tmp_path / "now"
    link.symlink_to(s)
    assert run(*base, "--latent", s, "--out", e) == 0
    for name in (f"{s}/", link, f"{link}/"):
        capsys.readouterr()
        assert run(*base, "--latent", name, "--out", e) == 0, capsys.readouterr().err
        assert "0 images sampled, 1 already complete" in capsys.readouterr().out
    link.unlink()
    link.symlink_to(t)  # the link now names other latents
    assert run(*base, "--latent", link, "--out", e) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sr_sample.py: error: {e} holds samples made with other contents of --latent {link}; "
        "use another --out, or --overwrite to redo them"
    ]


def test_flow_generate_refuses_latents_of_other_shapes():
    """The library: `sample(latent=...)` decodes explicit fields (the CLI's), `encode`'s
    latents of an HR image among them, and other shapes are one line."""
    model = tiny("srflow")
    lr, _ = batch(4, b=1)  # 4 x 6
    z = model.sample_latents(lr, [1, 2], range(2), 0.9, model.resolve_controls({}, 2, "cpu"))
    same = model.sample(lr, 2, 0.9, NoiseSource([1, 2]))
    assert torch.equal(model.sample(lr, 2, 0.9, latent=z), same)
    with pytest.raises(ValueError, match=r"generate: latent fields \[\(2, 6, 8, 12\)\], need"):
        model.sample(lr, 2, 0.9, latent=z[:1])
    # the fields are encode's latents: those of an HR image decode to it
    hr = model.sample(lr, 1, 0.9, NoiseSource([3]))[0]
    with torch.no_grad():
        fields = model.encode(lr, hr)[0]
    assert [tuple(f.shape[1:]) for f in fields] == [tuple(f.shape[1:]) for f in z]
    assert (model.sample(lr, 1, 0.9, latent=fields)[0] - hr).abs().max() < 1e-4


def flow_checkpoint(tmp_path, name: str = "srflow"):
    """A tiny flow with non-trivial weights saved as sr_train.py saves it, and a folder of two
    LR images (made here)."""
    net = tiny(name)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, {"model": name, "model_cfg": {**TINY[name], "scale": 4},
                           "state_dict": net.state_dict(), "step": 0})  # fmt: skip
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for stem, shape in (("a", (10, 12, 3)), ("b", (9, 14, 3))):
        iio.imwrite(inp / f"{stem}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    return path, inp


@pytest.mark.parametrize("name", FLOWS)
def test_check_invertibility_passes_a_flow_and_writes_nothing(name, tmp_path, capsys):
    """--check-invertibility: one line per image and a summary, exit 0; no --out needed, no file
    written. The errors are float32 rounding (about 1e-5 here), far under the tolerance."""
    path, inp = flow_checkpoint(tmp_path, name)
    before = sorted(tmp_path.rglob("*"))
    argv = ["--ckpt", str(path), "--input", str(inp), "--n", "2", "--temperature", "0", "0.9"]
    assert sr_sample.main([*argv, "--check-invertibility"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["a.png", "b.png", "invertible"], out
    assert out[-1].startswith("invertible: 2 images x 2 samples at temperature 0, 0.9: max")
    worst = [float(re.search(r"max \|x - x'\| (\S+)", line)[1]) for line in out]
    assert max(worst[:2]) == worst[2] and 0 <= worst[2] < 1e-4, out
    assert sorted(tmp_path.rglob("*")) == before
    # --out and the other flags of writing samples: no effect, one warning line
    assert sr_sample.main([*argv, "--check-invertibility", "--out", str(tmp_path / "o"),
                           "--grid"]) == 0  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err == ("sr_sample.py: warning: --out, --grid: no effect with --check-invertibility "
                   "(nothing is written; each image is checked whole); ignored")  # fmt: skip
    assert not (tmp_path / "o").exists()
    # --quiet: the closing line alone; --json: that line as JSON
    assert sr_sample.main([*argv, "--check-invertibility", "--quiet", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["exit_code"] == 0 and record["error"] is None, record
    assert (record["images"], record["samples"]) == (2, 2)
    assert record["max_error"] == pytest.approx(worst[2], rel=0.01)  # (the line's 3 digits)


@pytest.mark.parametrize("offset, said", [(0.01, r"\S+"), (math.nan, "is NaN")])
def test_check_invertibility_fails_a_broken_inverse(offset, said, tmp_path, capsys, monkeypatch):
    """One layer whose reverse no longer inverts its forward (ActNorm's, off by 0.01, or NaN):
    exit 5 (README "Exit codes"), one line naming the worst image, after a line for each."""
    path, inp = flow_checkpoint(tmp_path)
    reverse = ActNorm.reverse
    monkeypatch.setattr(ActNorm, "reverse", lambda self, y, logdet=None: (
        lambda x, ld: (x + offset, ld))(*reverse(self, y, logdet)))  # fmt: skip
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["--ckpt", str(path), "--input", str(inp), "--n", "2",
                        "--check-invertibility"])  # fmt: skip
    assert e.value.code == 5
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == ["a.png", "b.png"]
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    above = "" if math.isnan(offset) else r" is above 0\.00196078"  # (NaN: no number to compare)
    assert re.fullmatch(r"sr_sample\.py: error: [ab]\.png: the flow does not invert: max "
                        rf"\|x - x'\| {said} \(sample [01] at temperature 0\.9\){above} "
                        r"\(and 1 more of 2 images\); its weights are numerically broken "
                        r"\(docs/flows\.md#invertibility\)", err[0]), err  # fmt: skip


def test_check_invertibility_of_a_model_that_is_no_flow_is_a_usage_error(tmp_path, capsys):
    cfg = {**TINY["edsr"], "scale": 4}
    path = tmp_path / "edsr.pt"
    sd = build_model("edsr", cfg).state_dict()
    save_checkpoint(path, {"model": "edsr", "model_cfg": cfg, "state_dict": sd, "step": 0})
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["--ckpt", str(path), "--input", "demo", "--check-invertibility"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        "sr_sample.py: error: --check-invertibility: the edsr model is not a flow, it has no "
        "inverse to check (only: srflow, srflow_da, ncsr)"
    ]


@pytest.mark.parametrize(
    "n, said",
    [(3, "out of memory; use a --batch below 3"),
     (1, "out of memory drawing one sample at a time: this 12x10 LR image needs more memory than "
         "this machine has")],
)  # fmt: skip
def test_check_invertibility_out_of_memory_names_what_lowers_it(n, said, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    """--check-invertibility out of memory said "use a smaller --batch or --tile": it cuts no
    tiles (--tile has no effect there), and a single sample has no smaller --batch."""
    path, inp = flow_checkpoint(tmp_path)

    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(MODELS["srflow"], "round_trip", no_memory)
    argv = ["--ckpt", str(path), "--input", str(inp), "--n", str(n), "--check-invertibility"]
    with pytest.raises(SystemExit) as e:
        sr_sample.main(argv)
    assert (e.value.code, capsys.readouterr().err) == (4, f"sr_sample.py: error: {said}\n")


def test_rrdb_init_of_another_depth_names_the_flags(tmp_path):
    """An RRDB of other depth or widths than the flow's encoder (the released RRDB_CelebA_8X.yml
    trains 23 blocks, SRFlow's CelebA ×8 encoder has 8) is one line naming the flags that differ,
    not the strict load's list of missing keys."""
    path = tmp_path / "RRDB_other.pth"
    cfg = TINY["srflow"]
    torch.save(RRDBNet(4, cfg["nf"], cfg["nb"] + 1, cfg["gc"]).state_dict(), path)
    flow = build_model("srflow", {**cfg, "rrdb_init": str(path)})
    with pytest.raises(CheckpointError) as e:
        flow.on_step(0, 10)
    assert str(e.value).startswith(f"--rrdb-init {path}: an RRDBNet of --nb {cfg['nb'] + 1} ")
    assert f"(this encoder: {cfg['nb']})" in str(e.value) and "--nf" not in str(e.value)
    torch.save(RRDBNet(4, cfg["nf"] * 2, cfg["nb"], cfg["gc"]).state_dict(), path)
    with pytest.raises(CheckpointError, match=rf"--nf {cfg['nf'] * 2} \(this encoder: "):
        build_model("srflow", {**cfg, "rrdb_init": str(path)}).on_step(0, 10)
