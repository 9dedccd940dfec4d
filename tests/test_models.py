"""The model contract (docs/design.md) for every registered model; EDSR, RRDB and ℓ_E specifics."""

import copy
import functools
import math
from dataclasses import fields
from typing import Literal, get_origin

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CASES, TINY, opens_of

from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models import MODELS, build_model, vspsr
from sr_lib.models.base import LatentSRModel, NoiseSource, Recipe, SRModel
from sr_lib.models.losses import hard_sample_mask, le_loss
from sr_lib.models.rrdb import RRDBNet, load_official_rrdb
from sr_lib.models.srflow import SRFlow
from sr_lib.models.vgg import VGGFeatures


def test_every_model_has_a_tiny_config():
    assert set(TINY) == set(MODELS)


def build(case: str, scale: int) -> SRModel:
    """The tiny model of a case at `scale`."""
    name, cfg = CASES[case]
    return build_model(name, {**cfg, "scale": scale})


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The scales a model refuses (the flows have no x2: docs/flows.md). The contract runs at every
# other pair: a model that stops building at one of them fails there (a UsageError at any scale
# but 4 was a skip, so an EDSR that refused x8 passed).
UNSUPPORTED = {("srflow", 2), ("srflow_da", 2), ("ncsr", 2)}
contract = pytest.mark.parametrize(
    "case, scale",
    [(c, s) for c in CASES for s in (4, 2, 8) if (CASES[c][0], s) not in UNSUPPORTED],
)
cases = pytest.mark.parametrize("case", list(CASES))


@pytest.mark.parametrize("name, scale", sorted(UNSUPPORTED))
def test_an_unsupported_scale_is_refused_in_one_line(name, scale):
    with pytest.raises(UsageError) as e:
        build_model(name, {**TINY[name], "scale": scale})
    assert "\n" not in str(e.value) and f"scale {scale} not supported" in str(e.value)


@contract
def test_forward_gives_finite_scalar_loss_and_grads(case, scale, make_batch):
    model = build(case, scale).train()
    lr, hr = make_batch(scale)
    out = model(lr, hr)
    loss = out["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    params = [(k, p) for k, p in params if id(p) in set(map(id, model.generator_parameters()))]
    if CASES[case][0] == "bicubic":  # nothing to train (any other model: a skip hid that)
        assert not params and not loss.requires_grad
        return
    assert params, "no trainable parameters"
    loss.backward()
    for k, p in params:
        assert p.grad is not None, f"{k} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{k} has a non-finite gradient"


@cases
def test_forward_under_cpu_bf16_autocast_gives_finite_loss_and_grads(case, make_batch):
    """sr_train.py --amp bf16 on a CPU: every model trains under bfloat16 autocast."""
    model = build(case, 4).train()
    lr, hr = make_batch(4)
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(lr, hr)["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    if CASES[case][0] == "bicubic":  # nothing to train
        assert not loss.requires_grad
        return
    loss.backward()
    grads = [p.grad for p in model.generator_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# Every loss that runs a frozen network kept out of state_dict (VGG19, LPIPS's AlexNet) or held
# as a submodule (RefVAE's VGG19), and every discriminator, switched on; the parts it reports.
LOSS_NETS_ON: dict[str, tuple[dict, set[str]]] = {
    "vspsr": (dict(lambda_per=0.01, per_layer="relu1_2", lambda_adv=0.01), {"per", "adv"}),
    "refvae": (dict(lambda_lpips=0.1, lambda_fm=0.01), {"content", "style", "lpips", "adv", "fm"}),
    "varsr": (dict(lambda_per=0.006, per_layer="relu1_2", lambda_adv=0.001), {"per", "adv"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_in_float64_trains_and_samples_in_float64(name, make_batch, monkeypatch):
    """model.double() (a float64 gradient check, tests/bench's parity scripts): the frozen loss
    networks, built on first use and kept out of state_dict, stayed float32 and the forward of
    VSpSR and VarSR (VGG19) and RefVAE (LPIPS) stopped with a conv dtype error."""
    monkeypatch.setattr(vspsr, "VGGFeatures", functools.partial(VGGFeatures, pretrained=False))
    extra, parts = LOSS_NETS_ON.get(name, ({}, set()))
    model = build_model(name, {**TINY[name], **extra}).train()
    model.on_step(99, 100)  # VarSR: the adversarial phase, its critic on
    lr, hr = make_batch(4)
    keys = list(model.state_dict())
    model.double()  # before the loss networks are built (on first use)
    for dtype in (torch.float64, torch.float32, torch.float64):  # then converted both ways
        out = model.to(dtype)(lr.to(dtype), hr.to(dtype))
        assert parts <= set(out)  # each loss network ran
        assert all(v.dtype == dtype for v in out.values())
    lr, hr = lr.double(), hr.double()
    if out["loss"].requires_grad:  # (bicubic: nothing to train)
        out["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float64 and g.isfinite().all() for g in grads)
    if model.discriminator is not None:
        d = model.discriminator_loss(lr, hr, out)["loss"]
        assert d.dtype == torch.float64 and d.requires_grad
        d.backward()
    sr = model.sample(lr, n=2, temperature=0.8)
    assert sr.shape == (2, 2, 3, 32, 32) and sr.dtype == torch.float64
    assert all(
        v.dtype == torch.float64 for v in model.state_dict().values() if v.is_floating_point()
    )
    assert list(model.state_dict()) == keys  # the loss networks stay out of checkpoints


@pytest.mark.parametrize(
    "name, first, trunk, last",
    [("edsr", "head", "body", "tail.1"),
     ("rrdb", "net.conv_first", "net.RRDB_trunk.0", "net.conv_last")],
)  # fmt: skip
def test_the_convs_reading_and_making_the_image_run_in_float32_under_autocast(
    name, first, trunk, last, make_batch
):
    """In bfloat16 the first conv would read the LR pixels and its weights rounded to 8 bits, an
    error every output follows: EDSR's LR-PSNR on the demo images moved by 0.09 dB, a small
    SRFlow's (whose encoder is an RRDBNet) by 0.02 dB; bf16 output steps (1/256 in [0.5, 1)) cost
    l1 0.17 dB after 6,258 EDSR steps (docs/design.md, "Numerics")."""
    model = build_model(name, TINY[name])
    seen = []
    for part in (first, trunk, last):
        hook = lambda m, i, o, part=part: seen.append((part, i[0].dtype, o.dtype))  # noqa: E731
        model.get_submodule(part).register_forward_hook(hook)
    lr, _ = make_batch(4)
    with torch.autocast("cpu", torch.bfloat16):
        model.sample(lr, 1)
    # the trunk gets one bfloat16 copy of the first conv's output (not a cast in each of its convs)
    assert seen == [(first, torch.float32, torch.float32), (trunk, torch.bfloat16, torch.bfloat16),
                    (last, torch.float32, torch.float32)]  # fmt: skip


@contract
def test_sample_shape_range_and_odd_sizes(case, scale, make_batch):
    model = build(case, scale).eval()
    lr, _ = make_batch(scale, b=2, h=7, w=9)
    sr = model.sample(lr, n=3)
    assert sr.shape == (2, 3, 3, 7 * scale, 9 * scale)
    assert sr.dtype == torch.float32
    assert sr.min() >= 0 and sr.max() <= 1


@cases
def test_same_seeds_same_samples_and_copies(case, make_batch):
    model = build(case, 4).eval()
    lr, _ = make_batch(4, b=2, h=5, w=6)
    seeds = [11, 12, 13, 14]
    a = model.sample(lr, n=2, temperature=0.8, noise=NoiseSource(seeds))
    b = model.sample(lr, n=2, temperature=0.8, noise=NoiseSource(seeds))
    assert torch.equal(a, b)
    # Stochastic models collapse to copies at temperature 0; deterministic ones ignore it.
    for t in (0.0,) if model.stochastic else (0.0, 1.3):
        s = model.sample(lr, n=3, temperature=t)
        assert torch.equal(s, s[:, :1].expand_as(s))
    if not model.stochastic:
        assert torch.equal(s, model.sample(lr, n=3, temperature=0.0))


@cases
def test_a_sample_does_not_depend_on_what_it_is_drawn_with(case, make_batch):
    """Sample i of a seed is the same bytes drawn in one call of 5 or in calls of 2 and 3 (how
    sr_sample.py's --batch chunks --n), as README promises: each sample is computed alone."""
    model = build(case, 4).eval()
    if not model.stochastic:
        pytest.skip("one output, drawn once")
    for p in model.parameters():  # zero-initialised last layers would hide the latent's effect
        p.data.add_(0.05 * torch.randn_like(p))
    lr, _ = make_batch(4, b=1, h=6, w=7)
    seeds = [21, 22, 23, 24, 25]
    whole = model.sample(lr, n=5, temperature=0.8, noise=NoiseSource(seeds))
    parts = [model.sample(lr, n=len(s), temperature=0.8, noise=NoiseSource(s))
             for s in (seeds[:2], seeds[2:])]  # fmt: skip
    assert torch.equal(whole, torch.cat(parts, dim=1))
    assert not torch.equal(whole[:, 0], whole[:, 1])


def test_noise_fields_are_cut_per_tile_and_vectors_never():
    whole = NoiseSource([3, 4])
    f_lr, f_hr, v = whole.field(2, 8, 12), whole.field(1, 32, 48), whole.vector(5)
    assert f_lr.shape == (2, 2, 8, 12) and f_hr.shape == (2, 1, 32, 48) and v.shape == (2, 5)
    # the tile at LR (y, x) = (4, 6), 4 x 6 px of an 8 x 12 image: the same draws, in order
    tile = NoiseSource([3, 4], window=(4, 6, 4, 6, 8, 12))
    assert torch.equal(tile.field(2, 4, 6), f_lr[..., 4:8, 6:12])
    assert torch.equal(tile.field(1, 16, 24), f_hr[..., 16:32, 24:48])  # at HR resolution
    assert torch.equal(tile.vector(5), v)
    tile.restart()  # the next tile replays the same streams
    tile.window = (0, 0, 4, 6, 8, 12)
    assert torch.equal(tile.field(2, 4, 6), f_lr[..., :4, :6])
    # one generator per sample: a stream does not depend on the others
    assert torch.equal(NoiseSource([4]).field(2, 8, 12)[0], f_lr[1])


@cases
def test_uncertainty_is_none_or_a_nonnegative_map(case, make_batch):
    model = build(case, 4).eval()
    lr, _ = make_batch(4, b=2, h=5, w=6)
    u = model.uncertainty(lr)
    if u is not None:
        assert u.shape == (2, 3, 20, 24) and (u >= 0).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_config_is_flat_and_defaults_complete(name):
    cls = MODELS[name]
    for f in fields(cls.Config):
        ok = f.type in (int, float, str, bool) or get_origin(f.type) is Literal
        assert ok, f"{name}.{f.name}: {f.type} is not a flat CLI type"
    for scale in (4, 8):
        assert isinstance(cls.recipe(scale), Recipe)


# What sr_train.py, sr_sample.py and the loaders call on a model: all declared by SRModel, so no
# script probes a model for an attribute.
HOOKS = ("forward", "generate", "sample", "uncertainty", "resolve_controls", "sample_latents",
         "on_step", "graph_key", "generator_parameters", "generator_param_groups",
         "schedule_position", "discriminator_loss", "mark_initialized", "complete_state_dict",
         "load_weights", "load_raw_state_dict")  # fmt: skip
ATTRIBUTES = {"stochastic": bool, "lr_multiple": int, "default_temperature": float,
              "ddp_find_unused": bool, "oldest_checkpoint_format": int, "sample_controls": tuple,
              "has_uncertainty": bool, "scale": int, "fits_float16": bool}  # fmt: skip


@cases
def test_every_model_implements_the_declared_interface(case, make_batch):
    name, cfg = CASES[case]
    cls, model = MODELS[name], build(case, 4)
    for hook in HOOKS:
        assert callable(getattr(SRModel, hook)) and callable(getattr(model, hook)), hook
    for attr, kind in ATTRIBUTES.items():
        assert isinstance(getattr(model, attr), kind), attr
    assert cls.forward is not SRModel.forward and cls.generate is not SRModel.generate
    assert cls.raw_config({}, 4)["scale"] == 4 and isinstance(cls.recipe(4), Recipe)
    # latent controls: the LatentSRModels, which define their latents and decoding, and the
    # flows (--latent, --latent-shift, --save-latent of their latent fields)
    assert set(cls.sample_controls) <= {"latent", "latent_shift", "ref", "latent_from"}
    flow = issubclass(cls, SRFlow)
    assert ("latent" in cls.sample_controls) == (issubclass(cls, LatentSRModel) or flow)
    assert ("latent_shift" in cls.sample_controls) == (issubclass(cls, LatentSRModel) or flow)
    assert model.latent_file == ".latent.npz"  # every model's, with the record of its model
    old = ".latent.npy" if issubclass(cls, LatentSRModel) else ""  # an older srspace's, read
    assert model.old_latent_file == old
    if issubclass(cls, LatentSRModel):
        assert cls.latents is not LatentSRModel.latents
        assert cls.decode_latents is not LatentSRModel.decode_latents
        assert model.z_dim == cfg["z_dim"]
    elif flow:
        assert model.resolve_controls({}, 3, "cpu").latent is None
    else:
        assert model.resolve_controls({}, 3, "cpu") is None
    if model.discriminator is not None:
        assert cls.discriminator_loss is not SRModel.discriminator_loss
    lr, _ = make_batch(4, b=1, h=5, w=6)
    assert model.has_uncertainty == (model.eval().uncertainty(lr) is not None)
    # the parameter groups cover the generator, each with a place in the schedule
    groups = model.generator_param_groups()
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(map(id, model.generator_parameters()))
    for i in range(len(groups)):
        t, length = model.schedule_position(i, 5, 8)
        assert 0 <= t <= length <= 8
    # strict loading of its own weights, and the hook called after loading them
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_weights(state, "own")
    model.load_raw_state_dict(state, "own")
    model.mark_initialized()


@pytest.mark.parametrize(
    "cfg", [dict(loss="l2"), dict(loss="le", le_mask_scope="pixel"), dict(le_aux_target="sq")]
)
@pytest.mark.parametrize("name", ["edsr", "rrdb"])
def test_bad_loss_options_fail_in_one_line(name, cfg):
    with pytest.raises(UsageError) as e:
        build_model(name, {**TINY[name], **cfg})
    assert "\n" not in str(e.value) and "choose one of" in str(e.value)


# EDSR


def edsr_params(nf: int, nb: int, scale: int) -> int:
    """Counted from the layer list: head, nb × 2 convs, body-end conv, upsampler, tail conv."""
    conv = lambda i, o: i * o * 9 + o  # noqa: E731
    stages = [scale] if scale in (2, 3) else [2] * int(math.log2(scale))
    up = sum(conv(nf, nf * f * f) for f in stages)
    return conv(3, nf) + nb * 2 * conv(nf, nf) + conv(nf, nf) + up + conv(nf, 3)


@pytest.mark.parametrize("scale, paper_k", [(2, 1370), (3, 1555), (4, 1518)])
def test_edsr_baseline_parameter_count(scale, paper_k):
    model = build_model("edsr", {"scale": scale})
    assert n_params(model) == edsr_params(64, 16, scale)
    assert abs(n_params(model) / 1000 - paper_k) < 1  # He & Cheng Table 3, in thousands
    assert scale != 4 or n_params(model) == 1_517_571


def test_full_edsr_builds():
    model = build_model("edsr", dict(n_blocks=32, n_feats=256, res_scale=0.1))  # never run: 43 M
    assert n_params(model) == edsr_params(256, 32, 4)
    assert abs(n_params(model) / 1e6 - 43.10) < 0.015  # 43.10 M in He & Cheng Table 6
    assert model.body[0].res_scale == 0.1


def test_edsr_mean_shift_is_added_back():
    model = build_model("edsr", TINY["edsr"])
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    sr = model.sample(torch.rand(1, 3, 4, 4))[:, 0]
    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    assert torch.allclose(sr, mean.expand_as(sr))


# RRDB (docs/flows.md: the encoder and the key layout)


def official_rrdb_layout(scale: int, nb: int = 23, nf: int = 64, gc: int = 32) -> dict:
    """Key -> shape of an official RRDB_*.pth, written out from the released RRDBNet."""
    keys = {"conv_first.weight": (nf, 3, 3, 3), "conv_first.bias": (nf,)}
    for b in range(nb):
        for r in (1, 2, 3):
            for j in range(1, 6):
                out = nf if j == 5 else gc
                key = f"RRDB_trunk.{b}.RDB{r}.conv{j}"
                keys[f"{key}.weight"] = (out, nf + (j - 1) * gc, 3, 3)
                keys[f"{key}.bias"] = (out,)
    ups = [f"upconv{i}" for i in range(1, int(math.log2(scale)) + 1)]
    for name in ["trunk_conv", *ups, "HRconv"]:
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (nf, nf, 3, 3), (nf,)
    keys["conv_last.weight"], keys["conv_last.bias"] = (3, nf, 3, 3), (3,)
    return keys


@pytest.mark.parametrize("scale, count", [(4, 16_697_987), (8, 16_734_915), (2, None)])
def test_rrdb_official_layout_and_count(scale, count):
    net = RRDBNet(scale)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == official_rrdb_layout(scale)
    assert list(got)[:3] == [
        "conv_first.weight",
        "conv_first.bias",
        "RRDB_trunk.0.RDB1.conv1.weight",
    ]
    model = build_model("rrdb", {**TINY["rrdb"], "scale": scale})  # the registry model wraps it
    assert {k.removeprefix("net.") for k in model.state_dict()} == set(
        official_rrdb_layout(scale, 2, 8, 4)
    )
    if count is not None:
        assert n_params(net) == count


def test_rrdb_rejects_x3_in_one_line():
    for make in (lambda: RRDBNet(3), lambda: build_model("rrdb", {"scale": 3})):
        with pytest.raises(UsageError) as e:
            make()
        assert "\n" not in str(e.value) and "scale 3" in str(e.value)


def test_rrdb_dense_block_init():
    net = RRDBNet(4, nb=1)
    conv = net.RRDB_trunk[0].RDB2.conv5  # 192 -> 64: 110,592 weights, fan_in 1728
    assert conv.bias.abs().max() == 0
    expected = 0.1 * math.sqrt(2 / (192 * 9))  # Kaiming normal (fan_in, a=0) × 0.1
    assert abs(conv.weight.std().item() / expected - 1) < 0.03


@pytest.mark.parametrize("scale", [4, 8])
def test_rrdb_features(scale):
    net = RRDBNet(scale, nf=8, nb=4, gc=4)
    lr = torch.rand(2, 3, 6, 10)
    f = net.features(lr, blocks=(1, 3))
    names = {"block_1", "block_3", "last_lr_fea", "fea_up0", "fea_up1", "out"}
    ups = [2**i for i in range(1, int(math.log2(scale)) + 1)]
    assert set(f) == names | {f"fea_up{u}" for u in ups}
    assert f["block_1"].shape == f["last_lr_fea"].shape == (2, 8, 6, 10)
    assert f["fea_up0"].shape == (2, 8, 3, 5)
    for u in ups:
        assert f[f"fea_up{u}"].shape == (2, 8, 6 * u, 10 * u)
    assert f["out"].shape == (2, 3, 6 * scale, 10 * scale)
    # SRFlow's global skip around trunk_conv, and fea_up1 is the same map.
    t = net.RRDB_trunk(net.conv_first(lr))
    assert torch.allclose(f["last_lr_fea"], t + net.trunk_conv(t), atol=1e-6)
    assert torch.equal(f["fea_up1"], f["last_lr_fea"])
    assert torch.allclose(f["block_3"], t)
    # Post-activation upconv outputs (the released RRDBNet's in-place LeakyReLU): each stage
    # upsamples the previous map as it is returned.
    up = lambda x: F.interpolate(x, scale_factor=2, mode="nearest")  # noqa: E731
    pre = net.upconv2(up(f["fea_up2"]))
    assert torch.allclose(f["fea_up4"], F.leaky_relu(pre, 0.2), atol=1e-6)
    assert not torch.allclose(f["fea_up4"], pre, atol=1e-6)  # the activation changed something
    last = f[f"fea_up{scale}"]
    assert torch.allclose(f["out"], net.conv_last(F.leaky_relu(net.HRconv(last), 0.2)), atol=1e-6)
    assert torch.allclose(net(lr), f["out"])
    # For even sizes the bilinear ×0.5 is exactly a 2x2 average.
    assert torch.allclose(f["fea_up0"], F.avg_pool2d(f["last_lr_fea"], 2), atol=1e-6)
    # Early stops: no HR-resolution map and no output branch; maps=False stops at the trunk.
    g = net.features(lr, blocks=(1,), up_to=scale // 2)
    assert f"fea_up{scale}" not in g and "out" not in g
    assert torch.allclose(g[f"fea_up{scale // 2}"], f[f"fea_up{scale // 2}"])
    assert set(net.features(lr, (0,), maps=False)) == {"block_0", "last_lr_fea"}
    with pytest.raises(UsageError):
        net.features(lr, blocks=(4,))


def test_load_official_rrdb(tmp_path):
    src = RRDBNet(4, nf=8, nb=2, gc=4)
    path = tmp_path / "RRDB_tiny.pth"
    torch.save(src.state_dict(), path)
    for target in (RRDBNet(4, nf=8, nb=2, gc=4), build_model("rrdb", TINY["rrdb"])):
        load_official_rrdb(target, path)
        net = target if isinstance(target, RRDBNet) else target.net
        assert all(
            torch.equal(a, b) for a, b in zip(src.state_dict().values(), net.state_dict().values())
        )
    # DataParallel prefixes are stripped.
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    load_official_rrdb(RRDBNet(4, nf=8, nb=2, gc=4), path)
    for wrong, what in [  # one line naming what differs, not the strict load's list of keys
        (RRDBNet(4, nf=8, nb=3, gc=4), "an RRDBNet of --nb 2 (this encoder: 3); "),
        (RRDBNet(8, nf=8, nb=2, gc=4), "an RRDBNet of x4, and this encoder is x8; "),
        (RRDBNet(2, nf=8, nb=2, gc=4), "an RRDBNet of x4, and this encoder is x2; "),
        (RRDBNet(4, nf=16, nb=2, gc=4), "an RRDBNet of --nf 8 (this encoder: 16); "),
    ]:
        torch.save(src.state_dict(), path)
        with pytest.raises(CheckpointError) as e:
            load_official_rrdb(wrong, path)
        assert str(e.value).startswith(f"{path}: {what}") and "\n" not in str(e.value)
    torch.save(RRDBNet(4, nf=8, nb=3, gc=4).state_dict(), path)
    with pytest.raises(CheckpointError, match="an RRDBNet of --nb 3 "):
        load_official_rrdb(src, path)
    for file, ours, what in [  # a trunk of 0 blocks (an rrdb --nb 0 run): --nb 0, not None
        (RRDBNet(4, nf=8, nb=0, gc=4), src, "an RRDBNet of --nb 0 (this encoder: 2); "),
        (src, RRDBNet(4, nf=8, nb=0, gc=4), "an RRDBNet of --nb 2 (this encoder: 0); "),
    ]:
        torch.save(file.state_dict(), path)
        with pytest.raises(CheckpointError) as e:
            load_official_rrdb(ours, path)
        assert str(e.value).startswith(f"{path}: {what}give ") and "\n" not in str(e.value)
    torch.save(RRDBNet(4, nf=8, nb=2, gc=4).state_dict(), path)  # a key of its own: the strict load
    net = RRDBNet(4, nf=8, nb=2, gc=4)
    net.extra = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_official_rrdb(net, path)


def test_an_official_rrdb_file_is_opened_once(tmp_path):
    """load_official_rrdb (SRFlow's --rrdb-init) read a released RRDB file (RRDB_PSNR_x4.pth:
    67 MB) twice: as a checkpoint, to see whether it was one of ours, then again as a
    state_dict. Now it loads the weights from the one read."""
    path = tmp_path / "RRDB_tiny.pth"
    torch.save(RRDBNet(4, nf=8, nb=2, gc=4).state_dict(), path)
    load = f"load_official_rrdb(RRDBNet(4, nf=8, nb=2, gc=4), {str(path)!r})"
    opens, done = opens_of(path, "from sr_lib.models.rrdb import RRDBNet, load_official_rrdb", load)
    assert done.returncode == 0 and opens == 1, done.stderr[-2000:]


# ℓ_E (He & Cheng; docs/le.md)


def le_numpy(mu, hr, sigma, z, beta, scope, target):
    """Eq. 8 (hard-sample mask, mean) + β · Eq. 10, straight from the formulas."""
    r = hr - mu
    a = np.abs(r)
    axes = None if scope == "batch" else (1, 2, 3)
    a = np.where(a < a.mean(axis=axes, keepdims=True), 0.0, a)
    aux_target = r if target == "signed" else np.abs(r)
    return np.abs(r - a * z).mean() + beta * np.abs(aux_target - sigma).mean()


def le_inputs(shape=(2, 3, 6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, hr, sigma = (torch.rand(shape, generator=g, dtype=torch.float64) for _ in range(3))
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    return mu, hr, sigma, z


@pytest.mark.parametrize("scope", ["batch", "image"])
@pytest.mark.parametrize("target", ["signed", "abs"])
def test_le_loss_matches_numpy(scope, target):
    mu, hr, sigma, z = le_inputs()
    out = le_loss(mu, hr, sigma, beta=0.01, mask_scope=scope, aux_target=target, z=z)
    ref = le_numpy(*(t.numpy() for t in (mu, hr, sigma, z)), 0.01, scope, target)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-12)
    assert out["loss"].item() == pytest.approx((out["le"] + out["sigma_aux"]).item(), rel=1e-12)
    assert out["l1"].item() == pytest.approx(np.abs((hr - mu).numpy()).mean(), rel=1e-12)


def test_le_with_zero_noise_is_l1():
    mu, hr, sigma, _ = le_inputs()
    out = le_loss(mu, hr, sigma, z=torch.zeros_like(mu))
    assert out["le"].item() == pytest.approx(out["l1"].item(), rel=1e-12)


def test_hard_sample_mask():
    a = torch.tensor([0.125, 0.25, 0.5, 1.0, 0.0625, 0.0625, 0.0625, 0.125]).view(2, 1, 2, 2)
    # Batch mean 0.2734375: only 0.5 and 1.0 survive, image 1 is zeroed entirely.
    batch = torch.tensor([0, 0, 0.5, 1.0, 0, 0, 0, 0]).view(2, 1, 2, 2)
    assert torch.equal(hard_sample_mask(a, "batch"), batch)
    # Per-image means 0.46875 and 0.078125: each image keeps its own hard pixels.
    image = torch.tensor([0, 0, 0.5, 1.0, 0, 0, 0, 0.125]).view(2, 1, 2, 2)
    assert torch.equal(hard_sample_mask(a, "image"), image)
    # Values equal to the mean are kept ("less than the average" is zeroed).
    flat = torch.full((1, 3, 2, 2), 0.25)
    assert torch.equal(hard_sample_mask(flat), flat)
    with pytest.raises(UsageError):
        hard_sample_mask(a, "channel")


def test_le_gradient_sign_never_flips_but_detached_sigma_does():
    mu, hr, sigma, _ = le_inputs(shape=(4, 3, 8, 8))
    l1_sign = -torch.sign(hr - mu)  # sign of ∂|ŷ − μ|/∂μ
    g = torch.Generator().manual_seed(1)
    flips = 0
    for _ in range(10):
        z = torch.randn(mu.shape, generator=g, dtype=torch.float64)
        m = mu.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(le_loss(m, hr, sigma, z=z)["le"], m)
        assert torch.equal(torch.sign(grad), l1_sign)  # Eq. 9, every pixel, every z
        # The same loss with σ = |ŷ − μ| treated as a constant (Noise2Noise, paper §3.3).
        m = mu.clone().requires_grad_(True)
        r = hr - m
        a = hard_sample_mask(r.abs()).detach()
        (grad_d,) = torch.autograd.grad((r - a * z).abs().mean(), m)
        flipped = torch.sign(grad_d) != l1_sign
        kept = a > 0
        assert torch.equal(flipped, kept & (z * torch.sign(r.detach()) > 1))
        flips += flipped.sum().item()
    assert flips > 0


def test_le_mean_gradient_weight():
    """On kept pixels the μ-gradient is sign-preserving with mean weight E|1 − Z| ≈ 1.1666."""
    n = 200_000
    mu, hr = torch.zeros(n, dtype=torch.float64, requires_grad=True), torch.full((n,), 0.5)
    z = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    le = le_loss(mu.view(1, 1, 1, n), hr.view(1, 1, 1, n).double(), torch.zeros(1, 1, 1, n), z=z)
    le["le"].backward()
    assert (-mu.grad * n).mean().item() == pytest.approx(1.16663, abs=0.01)


def test_le_aux_sends_no_gradient_to_mu():
    mu, hr, sigma, z = le_inputs()
    mu.requires_grad_(True)
    sigma.requires_grad_(True)
    out = le_loss(mu, hr, sigma, beta=0.01, z=z)
    out["sigma_aux"].backward()
    assert mu.grad is None
    target = hr - mu.detach()
    assert torch.allclose(sigma.grad, -0.01 * torch.sign(target - sigma) / mu.numel())


def test_le_model_loss_and_gradients_are_eq8_eq9_eq10_by_hand():
    """A float64 EDSR trained with ℓ_E, checked value by value: its loss is Eq. 8 (σ := the
    masked |ŷ − μ|, one z per pixel, mean) + β·Eq. 10 (the σ branch against ŷ − μ, μ detached);
    ∂/∂μ_i is Eq. 9's −sign(r_i)·|sign(r_i) − z_i|/N on kept pixels and −sign(r_i)/N on masked
    ones; the σ branch learns from Eq. 10 only."""
    net = build_model("edsr", {**CASES["edsr_le"][1], "scale": 2}).double()
    g = torch.Generator().manual_seed(4)
    lr, hr = (
        torch.rand(2, 3, 5, 4, generator=g).double(),
        torch.rand(2, 3, 10, 8, generator=g).double(),
    )
    torch.manual_seed(3)
    out = net(lr, hr)
    torch.manual_seed(3)  # the same z
    mu, fea = net.predict(lr)
    sigma = net.sigma(fea)
    z = torch.randn_like(mu)
    n = mu.numel()
    r = (hr - mu).detach().flatten().tolist()
    s, zz = sigma.detach().flatten().tolist(), z.flatten().tolist()
    mean = sum(abs(v) for v in r) / n
    kept = [abs(v) >= mean for v in r]
    le = sum(abs(v - (abs(v) if k else 0.0) * w) for v, k, w in zip(r, kept, zz)) / n
    aux = 0.01 * sum(abs(v - t) for v, t in zip(r, s)) / n
    assert out["le"].item() == pytest.approx(le, rel=1e-12)
    assert out["sigma_aux"].item() == pytest.approx(aux, rel=1e-12)
    assert out["loss"].item() == pytest.approx(le + aux, rel=1e-12)
    (d_mu,) = torch.autograd.grad(out["le"], out["sr"], retain_graph=True)
    sign = [(v > 0) - (v < 0) for v in r]
    eq9 = [-(q * abs(q - w) if k else q) / n for q, k, w in zip(sign, kept, zz)]
    assert d_mu.flatten().tolist() == pytest.approx(eq9, rel=1e-12, abs=1e-15)
    branch = list(net.sigma.parameters())
    assert all(d is None for d in torch.autograd.grad(out["le"], branch, allow_unused=True))
    (d_mu_aux,) = torch.autograd.grad(out["sigma_aux"], out["sr"], allow_unused=True)
    assert d_mu_aux is None  # μ detached in Eq. 10


@pytest.mark.parametrize(
    "name, mu_only", [("edsr", ("tail.",)), ("rrdb", ("net.upconv", "net.HRconv", "net.conv_last"))]
)
def test_le_model_parts(name, mu_only, make_batch):
    model = build_model(name, CASES[f"{name}_le"][1])
    assert any(k.startswith("sigma.") for k in model.state_dict())
    assert not any(k.startswith("sigma.") for k in build_model(name, TINY[name]).state_dict())
    lr, hr = make_batch(4)
    out = model(lr, hr)
    assert set(out) == {"loss", "le", "sigma_aux", "l1", "sr"}
    assert out["l1"].item() == pytest.approx((out["sr"] - hr).abs().mean().item())
    assert out["le"].item() != model(lr, hr)["le"].item()  # a fresh z every step
    # The aux term trains σ and (multi-task) the shared body, never the μ-only layers.
    out["sigma_aux"].backward()
    for k, p in model.named_parameters():
        if k.startswith(mu_only):
            assert p.grad is None or not p.grad.any(), k
        if k.startswith("sigma."):
            assert p.grad is not None and p.grad.abs().sum() > 0, k
    u = model.eval().uncertainty(lr)
    assert u.shape == hr.shape and (u > 0).all() and (u < 1).all()


def test_le_sigma_final_fraction_trains_sigma_alone_on_the_whole_batch(make_batch):
    cfg = {**CASES["edsr_le"][1], "le_sigma_final_fraction": 0.25}
    model = build_model("edsr", cfg)
    assert model.ddp_find_unused  # μ gets no gradient in the σ-only phase
    sig = set(map(id, model.sigma.parameters()))
    body = [p for p in model.parameters() if id(p) not in sig]
    lr, hr = make_batch(4, b=3)

    def step(i: int) -> dict:
        model.zero_grad(set_to_none=True)
        model.on_step(i, 8)
        out = model(lr, hr)
        out["loss"].backward()
        return out

    step(5)  # joint: μ and σ learn
    assert all(p.grad is not None for p in body)
    mu, fea = model.predict(lr)

    out = step(6)  # 6 >= (1 - 0.25) * 8: σ only, on every image
    assert all(not p.requires_grad and p.grad is None for p in body)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sigma.parameters())
    whole = 0.01 * ((hr - mu).detach() - model.sigma(fea)).abs().mean()
    assert out["sigma_aux"].item() == pytest.approx(whole.item(), rel=1e-5)

    step(0)  # e.g. a run resumed before the phase: μ trains again
    assert all(p.requires_grad and p.grad is not None for p in body)
    # each group runs the schedule over its own phase: μ over steps 0-5, σ over steps 6-7
    assert len(model.generator_param_groups()) == 2
    assert [model.schedule_position(0, t, 8) for t in (3, 7)] == [(3, 6.0), (6.0, 6.0)]
    assert [model.schedule_position(1, t, 8) for t in (3, 7)] == [(0.0, 2.0), (1.0, 2.0)]
    plain = build_model("edsr", CASES["edsr_le"][1])
    assert len(plain.generator_param_groups()) == 1 and plain.schedule_position(0, 3, 8) == (3, 8)
    assert not build_model("edsr", CASES["edsr_le"][1]).ddp_find_unused
    for bad in (-0.1, 1.5):
        with pytest.raises(UsageError) as e:
            build_model("edsr", {**cfg, "le_sigma_final_fraction": bad})
        assert "\n" not in str(e.value) and f"--le-sigma-final-fraction {bad}" in str(e.value)


def test_le_sigma_ema_averages_sigma_for_the_uncertainty_map(make_batch, tmp_path):
    cfg = {**CASES["edsr_le"][1], "le_sigma_ema": 0.5}
    model = build_model("edsr", cfg)
    plain = build_model("edsr", CASES["edsr_le"][1])
    assert list(model.sigma_ema.parameters()) == []  # buffers: not trained, not counted
    assert n_params(model) == n_params(plain)
    key = "sigma_ema.upsample__0__weight"
    w0 = model.sigma.upsample[0].weight.detach().clone()
    assert torch.equal(model.state_dict()[key], w0)  # starts at the initial weights

    with torch.no_grad():
        model.sigma.upsample[0].weight.add_(1.0)
    w1 = model.sigma.upsample[0].weight.detach().clone()
    model.on_step(0, 8)  # nothing learned before step 0
    assert torch.equal(model.state_dict()[key], w0)
    model.on_step(1, 8)  # warm-up decay min(0.5, 1/10)
    want = 0.1 * w0 + 0.9 * w1
    assert torch.allclose(model.state_dict()[key], want, atol=1e-6)
    model.on_step(1, 8)  # the same step again (e.g. DDP's init pass) adds nothing
    assert torch.allclose(model.state_dict()[key], want, atol=1e-6)
    model.on_step(3, 8)  # decay min(0.5, 2/11)
    want = (2 / 11) * want + (9 / 11) * w1
    assert torch.allclose(model.state_dict()[key], want, atol=1e-6)

    # uncertainty() runs σ with the averaged weights; sample() (μ) does not involve σ
    lr, _ = make_batch(4, b=1)
    averaged = copy.deepcopy(model.sigma)
    averaged.load_state_dict(
        {n: model.state_dict()["sigma_ema." + n.replace(".", "__")] for n in model.sigma_ema.names}
    )
    fea = model.predict(lr)[1]
    u = model.uncertainty(lr)
    assert torch.allclose(u, averaged(fea), atol=1e-6)
    assert not torch.allclose(u, model.sigma(fea), atol=1e-3)

    # saved and loaded with the model; a state without an average starts it at its σ; an
    # average the config does not keep is dropped
    torch.save(model.state_dict(), tmp_path / "ema.pt")
    again = build_model("edsr", cfg)
    again.load_weights(torch.load(tmp_path / "ema.pt", weights_only=True), "ema.pt")
    assert torch.equal(again.uncertainty(lr), u)
    again.load_weights(plain.state_dict(), "plain")
    assert torch.equal(again.state_dict()[key], plain.sigma.upsample[0].weight)
    assert int(again.sigma_ema.step) == 0
    plain.load_weights(model.state_dict(), "ema")
    assert torch.equal(plain.sigma.upsample[0].weight, w1)
    for bad in (-0.1, 1.0):
        with pytest.raises(UsageError) as e:
            build_model("edsr", {**cfg, "le_sigma_ema": bad})
        assert "\n" not in str(e.value) and f"--le-sigma-ema {bad}" in str(e.value)
