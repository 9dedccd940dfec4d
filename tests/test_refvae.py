"""RefVAE (docs/vae.md) and the sampling controls of sr_sample.py (--ref, --latent-from,
--latent, --latent-shift, --save-latent) for refvae and varsr. Tiny configs, CPU, seconds."""

import glob
import hashlib
import json
from pathlib import Path
from unittest import mock

import imageio.v3 as iio
import numpy as np
import png
import pytest
import torch
from conftest import TINY, opens_per_run

import sr_sample
import sr_train
from sr_lib.checkpoint import load_checkpoint, save_checkpoint
from sr_lib.data import read_image, to_tensor, to_uint8
from sr_lib.errors import CheckpointError, UsageError
from sr_lib.models import build_model, load_model
from sr_lib.models.base import NoiseSource, sample_seed
from sr_lib.models.losses import style_stats
from sr_lib.models.refvae import Discriminator, RefVAE
from sr_lib.resize import imresize_torch

CFG = {**TINY["refvae"], "scale": 4}


def sensitise(net):
    """Randomise the zero-initialised last conv(s), as training would: the output then depends
    on z. Returns the model."""
    last = net.gen.decoder[-1] if isinstance(net, RefVAE) else net.gen.tail[-1]
    torch.nn.init.normal_(last.weight, std=0.2)
    return net


def model(**cfg) -> RefVAE:
    return sensitise(build_model("refvae", {**CFG, **cfg}).eval())


def images(folder, seed=0, sizes=((20, 30), (17, 25), (33, 21))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):  # noise of different brightness: clearly other latents
        img = rng.random((h, w, 3)) * (1 + i) / len(sizes)
        iio.imwrite(folder / f"r{i}.png", (img * 255).astype(np.uint8))
    return folder


def test_official_sizes():
    with torch.device("meta"):  # parameter counts and shapes without allocating 34 M parameters
        net = RefVAE(RefVAE.Config(scale=8))
        logits, _ = Discriminator(32)(torch.zeros(1, 3, 256, 256))
    # the code's VAE_v3 has 33,924,675: its unused BatchNorm1d(256) (512) is left out here
    assert sum(p.numel() for p in net.gen.parameters()) == 33_924_675 - 512
    assert sum(p.numel() for p in Discriminator(32).parameters()) == 691_777
    assert logits.shape == (1, 1344)  # 1024 + 256 + 64 logits: the code's label count
    assert sum(p.numel() for p in net.vgg.parameters()) == 3_505_728  # VGG19 up to relu4_1
    assert not any(p.requires_grad for p in net.vgg.parameters())  # frozen


@pytest.mark.parametrize("scale", [4, 8])
def test_both_optimizers_are_the_papers_adam(scale):
    """Paper §4.1 gives one setting, Adam (momentum 0.9) at 1e-4 with weight decay 1e-4; G had it
    and the discriminator's Adam had no weight decay (the released code has none for either)."""
    model = build_model("refvae", {**TINY["refvae"], "scale": scale})
    opts = sr_train.build_optimizers(model, model.recipe(scale))
    (g,), (d,) = opts["g"].param_groups, opts["d"].param_groups
    paper = dict(lr=1e-4, weight_decay=1e-4)
    assert {k: g[k] for k in paper} == {k: d[k] for k in paper} == paper
    assert g["betas"][0] == d["betas"][0] == 0.9


def test_shapes_any_lr_size_and_bicubic_start():
    net = model()
    sr = net.sample(torch.rand(1, 3, 30, 44), n=2)  # 30×44 at ×4 -> 120×176 (padded, cropped back)
    assert sr.shape == (1, 2, 3, 120, 176)
    assert net.lr_multiple == 2 and model(scale=8).lr_multiple == 1
    lr = torch.rand(1, 3, 6, 8)
    fresh = build_model("refvae", CFG).eval().sample(lr, 2)  # zero residual at init
    assert torch.allclose(fresh, imresize_torch(lr, 4).clamp(0, 1)[:, None].expand_as(fresh))


def test_output_changes_with_the_reference_and_is_deterministic():
    net = model()
    lr = torch.rand(1, 3, 8, 10)
    r1, r2 = torch.rand(3, 40, 30), torch.rand(3, 20, 20)
    a = net.sample(lr, 2, 1.0, NoiseSource([1, 2]), ref=[r1])
    assert torch.equal(a, net.sample(lr, 2, 1.0, NoiseSource([1, 2]), ref=[r1]))
    assert not torch.equal(a, net.sample(lr, 2, 1.0, NoiseSource([1, 2]), ref=[r2]))
    t0 = net.sample(lr, 3, 0.0, NoiseSource([1, 2, 3]), ref=[r1])  # z = μ(R): one output
    assert torch.equal(t0, t0[:, :1].expand_as(t0))
    per_ref = net.sample(lr, 2, 0.0, NoiseSource([1, 2]), ref=[r1, r2])  # sample i: ref i
    assert torch.equal(per_ref[:, 0], t0[:, 0]) and not torch.equal(per_ref[:, 0], per_ref[:, 1])
    lr_ref = net.sample(lr, 2, 1.0, NoiseSource([1, 2]), ref="lr")
    assert not torch.equal(lr_ref, a)
    prior = net.latents(lr, 2, 0.0, NoiseSource([1, 2]), ref="prior")
    assert torch.equal(prior, torch.zeros(1, 2, 8))  # z ~ N(0, I) at temperature 0


def test_noise_references_are_per_sample_and_reproducible():
    net = model()
    lr = torch.rand(2, 3, 6, 6)
    z = net.latents(lr, 3, 1.0, NoiseSource(range(6)))
    assert z.shape == (2, 3, 8) and len({tuple(v.tolist()) for v in z.reshape(6, 8)}) == 6
    z2 = net.latents(lr[1:], 2, 1.0, NoiseSource([3, 4]))  # the same seeds, another batch
    assert torch.allclose(z[1, :2], z2[0], atol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        {},  # paper defaults: content, style, LPIPS (random AlexNet), TV, KL, −log D
        dict(reduction="mean", adv_loss="l1", lambda_fm=0.01, lambda_lr=100.0,
             content_down="pyramid", style_target="hr", lambda_tv=0.0, tv_beta=0.5,
             style_layers="relu1_1,relu2_1,relu3_1,relu4_1"),  # the code's terms
        dict(lambda_adv=0.0, lambda_content=0.0, lambda_style=0.0, lambda_lpips=0.0),
    ],
)  # fmt: skip
def test_loss_variants(cfg, make_batch):
    net = model(**cfg).train()
    lr, hr = make_batch(4)
    out = net(lr, hr)
    assert torch.isfinite(out["loss"]) and out["kl"] >= 0
    out["loss"].backward()
    assert all(p.grad is not None for p in net.gen.parameters())
    if net.discriminator is not None:
        d = net.discriminator_loss(lr, hr, out)
        d["loss"].backward()
        assert torch.isfinite(d["loss"])
        assert all(p.grad is not None for p in net.discriminator.parameters())
    parts = {"pixel", "kl"} | ({"adv"} if net.discriminator is not None else set())
    assert parts <= set(out)


def test_imagenet_encoder_is_loaded_once_and_read_once(monkeypatch, make_batch):
    """--pretrained: the VGG19 weights are loaded before the first training step (its
    vgg_loaded would otherwise be put back to False if that step is skipped as non-finite) or
    the first forward; later forwards neither load nor read the "loaded" buffer (a GPU read per
    step); a loaded state_dict is read again."""
    from types import SimpleNamespace

    from torchvision.models.vgg import cfgs, make_layers

    from sr_lib.models import refvae

    loads, reads = [], []
    monkeypatch.setattr(refvae, "resolve", lambda name, **kwargs: None)
    monkeypatch.setattr(refvae, "load_alexnet_trunk", lambda net, *args: None)
    monkeypatch.setattr(refvae, "torchvision_model", lambda name, pretrained: loads.append(name)
                        or SimpleNamespace(features=make_layers(cfgs["E"])))  # fmt: skip
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    lr, hr = make_batch(4)
    net = model(pretrained=True, lambda_lpips=0.0).train()
    net.on_step(0, 10)  # before the training step keeps its buffers (a skipped one restores them)
    assert loads == ["vgg19"] and reads == [1] and net.vgg_loaded.item() is True
    net(lr, hr)
    assert loads == ["vgg19"] and reads == [1]
    encoder = {k: v.clone() for k, v in net.vgg.state_dict().items()}
    reads.clear()
    net(lr, hr)
    assert loads == ["vgg19"] and reads == []
    loaded = model(pretrained=True, lambda_lpips=0.0).train()
    loaded.load_state_dict(net.state_dict())  # a checkpoint with the encoder in it: not reloaded
    loaded(lr, hr)
    assert loads == ["vgg19"] and reads == [1]
    assert all(torch.equal(v, encoder[k]) for k, v in loaded.vgg.state_dict().items())
    net.load_state_dict(model(pretrained=True, lambda_lpips=0.0).state_dict())  # not loaded yet
    net(lr, hr)
    assert loads == ["vgg19", "vgg19"]


def test_training_references_from_a_folder(tmp_path, make_batch):
    net = model(ref_data=str(images(tmp_path / "art"))).train()
    _, hr = make_batch(4, b=4)
    net.on_step(5, 10)
    a = net.training_refs(hr)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, net.training_refs(hr))
    net.on_step(6, 10)
    assert not torch.equal(a, net.training_refs(hr))
    assert torch.equal(model().training_refs(hr), torch.nn.functional.interpolate(
        hr, (16, 16), mode="bicubic", antialias=True).clamp(0, 1))  # fmt: skip
    # a tiny sr_train run with folder references and the discriminator step
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY["refvae"].items() if k != "pretrained"]
    hr_dir = images(tmp_path / "hr", 1, ((40, 40),) * 2)
    argv = ["--model", "refvae", "--data", hr_dir, "--patch", 4, "--batch", 2, "--steps", 2,
            "--val-every", 0, "--workers", 0, "--no-pretrained", "--ref-data", tmp_path / "art",
            "--out", tmp_path / "run", *flags]  # fmt: skip
    assert sr_train.main([str(a) for a in argv]) == 0


def test_a_resumed_run_goes_on_bit_for_bit(tmp_path):
    """RefVAE builds its LPIPS loss at its first training step: building it drew from the run's
    generator, so a run resumed at step 2 drew other noise (and another random trunk) than the
    straight run did there."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY["refvae"].items() if k != "pretrained"]
    hr_dir = images(tmp_path / "hr", 1, ((40, 40),) * 2)
    base = ["--model", "refvae", "--data", hr_dir, "--patch", 4, "--batch", 2, "--val-every", 0,
            "--workers", 0, "--no-pretrained", "--milestones", *flags]  # fmt: skip
    for out, steps in (("a", 3), ("b", 1), ("b", 3)):  # b: 1 step, then resumed to 3
        argv = [*base, "--steps", steps, "--out", tmp_path / out, "--resume", "auto"]
        assert sr_train.main([str(a) for a in argv]) == 0
    a, b = (load_checkpoint(tmp_path / out / "last.pt")["state_dict"] for out in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_empty_reference_folder_names_the_flag(tmp_path, capsys):
    # "DIR: no images found" alone reads as if a --data folder were empty
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY["refvae"].items() if k != "pretrained"]
    (tmp_path / "art").mkdir()
    argv = ["--model", "refvae", "--data", images(tmp_path / "hr", 1, ((40, 40),)), "--patch", 4,
            "--batch", 2, "--steps", 1, "--val-every", 0, "--workers", 0, "--no-pretrained",
            "--ref-data", tmp_path / "art", "--out", tmp_path / "run", *flags]  # fmt: skip
    try:
        code = sr_train.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if ": warning: " not in line]
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith(f"sr_train.py: error: --ref-data {tmp_path / 'art'}: no images"), err


def test_missing_weights_stop_with_the_staging_message(tmp_path, monkeypatch, make_batch):
    monkeypatch.setenv("SRSPACE_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("SRSPACE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    net = model(pretrained=True).train()
    with pytest.raises(CheckpointError, match="vgg19"):
        net(*make_batch(4))


# sr_sample.py controls


def run(*argv) -> int:
    try:
        return sr_sample.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    paths = {}
    for name in ("refvae", "varsr", "edsr"):
        cfg = {**TINY[name], "scale": 4}
        net = build_model(name, cfg)
        if name != "edsr":
            sensitise(net)
        paths[name] = folder / f"{name}.pt"
        save_checkpoint(paths[name], {"model": name, "model_cfg": cfg,
                                      "state_dict": net.state_dict(), "step": 0})  # fmt: skip
    return paths


def read(path):
    return iio.imread(path)


@pytest.mark.parametrize("name", ["refvae", "varsr"])
def test_save_latent_then_latent_reproduces_a_sample(tmp_path, ckpts, name):
    inp = images(tmp_path / "in", 3, ((10, 12),))
    base = ["--ckpt", ckpts[name], "--input", inp]
    assert run(*base, "--n", 3, "--batch", 2, "--save-latent", "--out", tmp_path / "a") == 0
    z = np.load(tmp_path / "a" / "r0_sample00002.latent.npz")["z0"]
    assert z.shape == (8,) and z.dtype == np.float32
    assert run(*base, "--latent", tmp_path / "a" / "r0_sample00002.latent.npz", "--out",
               tmp_path / "b") == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "b").glob("*.png")) == ["r0_sample00000.png"]
    assert (
        read(tmp_path / "b" / "r0_sample00000.png") == read(tmp_path / "a" / "r0_sample00002.png")
    ).all()
    assert not (
        read(tmp_path / "a" / "r0_sample00000.png") == read(tmp_path / "a" / "r0_sample00002.png")
    ).all()
    # tiles are decoded with the whole-image latent and the model's context: the same samples
    big = ["--ckpt", ckpts[name], "--input", images(tmp_path / "big", 5, ((36, 44),)), "--n", 2]
    assert run(*big, "--out", tmp_path / "u") == 0
    assert run(*big, "--tile", 16, "--out", tmp_path / "t") == 0
    for i in range(2):
        name = f"r0_sample{i:05d}.png"
        assert (read(tmp_path / "t" / name) == read(tmp_path / "u" / name)).all()
    # a walk along a direction: one output per step, step 0 = the temperature-0 latent
    np.save(tmp_path / "dir.npy", np.linspace(-1, 1, 8).astype(np.float32))
    walk = ["--latent-shift", tmp_path / "dir.npy", "--latent-steps", "-1,0,2"]
    assert run(*base, *walk, "--out", tmp_path / "w") == 0
    outs = [read(tmp_path / "w" / f"r0_sample{i:05d}.png") for i in range(3)]
    assert len(list((tmp_path / "w").glob("*.png"))) == 3 and not (outs[0] == outs[2]).all()
    assert run(*base, "--n", 1, "--temperature", 0, "--out", tmp_path / "t0") == 0
    assert (outs[1] == read(tmp_path / "t0" / "r0_sample00000.png")).all()


@pytest.mark.parametrize("name", ["refvae", "varsr"])
def test_a_saved_latent_names_its_model_and_an_old_npy_is_still_read(tmp_path, ckpts, name):
    """--save-latent wrote a bare .npy, no record of the model that saved it; now a .npz of z0
    (D,) and made_by, as a flow's (the run's latent_source), and --latent decodes it to the same
    sample. The .npy of an older srspace decodes to that sample too, alone or as a --latent DIR
    (test_latent_dir_of_another_checkpoint_is_one_warning: what it says of its model)."""
    inp = images(tmp_path / "in", 3, ((10, 12),))
    base = ["--ckpt", ckpts[name], "--input", inp]
    a = tmp_path / "a"
    assert run(*base, "--n", 2, "--save-latent", "--out", a) == 0
    with np.load(a / "r0_sample00001.latent.npz") as f:
        assert sorted(f.files) == ["made_by", "z0"] and f["z0"].shape == (8,)
        made_by = json.loads(str(f["made_by"]))
    sha = hashlib.sha256(ckpts[name].read_bytes()).hexdigest()
    assert (made_by["model"], made_by["scale"], made_by["checkpoint_sha256"]) == (name, 4, sha)
    as_old(a)
    assert sorted(p.name for p in a.glob("*.latent.*")) == [
        f"r0_sample{i:05d}.latent.npy" for i in range(2)
    ]
    assert run(*base, "--latent", a / "r0_sample00001.latent.npy", "--out", tmp_path / "b") == 0
    assert (read(tmp_path / "b" / "r0_sample00000.png") == read(a / "r0_sample00001.png")).all()
    assert run(*base, "--latent", a, "--out", tmp_path / "c") == 0
    for i in range(2):
        f = f"r0_sample{i:05d}.png"
        assert (read(tmp_path / "c" / f) == read(a / f)).all()


def test_a_rerun_of_a_folder_of_old_npy_latents(tmp_path, ckpts, capsys):
    """A folder an older srspace saved latents in as .npy: a rerun with the same settings takes
    an image whose files are all there as complete (not sampled again, no .npz written beside
    the .npy); of an image not complete the samples missing are drawn again, their .npy
    replaced by the .npz (one latent a sample, not two), the samples there kept with theirs;
    --overwrite writes every image's .npz, no .npy left. A folder holding both files of a
    sample is refused by --latent DIR, naming them."""
    inp = images(tmp_path / "in", 3, ((10, 12), (12, 10)))
    out = tmp_path / "o"
    argv = ["--ckpt", ckpts["varsr"], "--input", inp, "--n", 2, "--save-latent", "--out", out]
    assert run(*argv) == 0
    pngs = {p.name: read(p) for p in out.glob("*.png")}
    as_old(out)
    latents = lambda: sorted(p.name for p in out.glob("*.latent.*"))  # noqa: E731
    old = latents()
    assert len(old) == 4 and all(f.endswith(".latent.npy") for f in old)
    capsys.readouterr()
    assert run(*argv) == 0
    assert "0 images sampled, 2 already complete" in capsys.readouterr().out
    assert latents() == old
    (out / "r1_sample00001.png").unlink()
    assert run(*argv) == 0
    assert "1 images sampled, 1 already complete" in capsys.readouterr().out
    assert latents() == [*old[:3], "r1_sample00001.latent.npz"]
    assert all((read(out / f) == x).all() for f, x in pngs.items())
    assert run(*argv, "--overwrite") == 0
    assert latents() == [f.replace(".npy", ".npz") for f in old]
    assert all((read(out / f) == x).all() for f, x in pngs.items())
    np.save(out / "r0_sample00000.latent.npy", np.zeros(8, np.float32))  # a sample's two files
    assert (
        run("--ckpt", ckpts["varsr"], "--input", inp, "--latent", out, "--out", tmp_path / "d") == 3
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sr_sample.py: error: --latent {out}: r0_sample00000.latent.npy and "
        "r0_sample00000.latent.npz are both sample 0 of r0 (its latent as an older srspace saved "
        "it, .latent.npy, and as now, .latent.npz); remove one"
    )


def test_ref_modes_from_the_cli(tmp_path, ckpts):
    inp = images(tmp_path / "in", 3, ((10, 12),))
    refs = images(tmp_path / "refs")
    base = ["--ckpt", ckpts["refvae"], "--input", inp, "--save-latent"]
    assert run(*base, "--ref", refs, "--out", tmp_path / "dir") == 0  # n = 3 references
    names = sorted(p.name for p in (tmp_path / "dir").glob("*.png"))
    assert names == [f"r0_sample{i:05d}.png" for i in range(3)]
    assert run(*base, "--ref", refs / "r1.png", "--n", 2, "--out", tmp_path / "file") == 0
    assert run(*base, "--ref", refs / "r1.png", "--n", 2, "--out", tmp_path / "file2") == 0
    png = lambda d, i: read(tmp_path / d / f"r0_sample{i:05d}.png")  # noqa: E731
    z = lambda d, i: np.load(tmp_path / d / f"r0_sample{i:05d}.latent.npz")["z0"]  # noqa: E731
    assert (png("file", 1) == png("file2", 1)).all()  # a fixed reference: deterministic
    # sample i of --ref DIR is sample i of --ref DIR/image_i (same reference, same seed); a
    # random tiny network hardly reacts to z in 8 bits, so the latents show the difference
    assert (png("file", 1) == png("dir", 1)).all() and (z("file", 1) == z("dir", 1)).all()
    assert not (z("file", 0) == z("dir", 0)).all()  # another reference, another latent
    for mode in ("noise", "lr", "prior"):
        assert run(*base, "--ref", mode, "--n", 2, "--out", tmp_path / mode) == 0
        assert not (z(mode, 0) == z("file", 0)).all()
    assert run(*base, "--n", 2, "--out", tmp_path / "default") == 0  # noise is the default
    for i in range(2):
        assert (png("default", i) == png("noise", i)).all() and (
            z("default", i) == z("noise", i)
        ).all()


def test_latent_from_cli(tmp_path, ckpts):
    inp = images(tmp_path / "in", 3, ((6, 6),))
    hrs = images(tmp_path / "hr", 4, ((24, 24), (24, 24)))
    base = ["--ckpt", ckpts["varsr"], "--input", inp]
    for tag, hr in (("a", "r0"), ("a2", "r0"), ("b", "r1")):
        assert run(*base, "--latent-from", hrs / f"{hr}.png", "--out", tmp_path / tag) == 0
    a, a2, b = (read(tmp_path / t / "r0_sample00000.png") for t in ("a", "a2", "b"))
    assert (a == a2).all() and not (a == b).all()
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["r0_sample00000.png"]


NOT_NUMPY = ("text.npy: not a readable .npy array (no NumPy file: it begins b'0.1 0.2 ', not "
             "with np.save's header)")  # fmt: skip
OBJECTS = ("objects.npy: not a readable .npy array (its array holds Python objects, not numbers: "
           "np.save a float32 array)")  # fmt: skip


@pytest.mark.parametrize(
    "name, flags, code, words",
    [
        ("edsr", ["--ref", "noise"], 2, "--ref: the edsr model does not support it (only: refvae)"),
        ("varsr", ["--ref", "lr"], 2, "(only: refvae)"),
        ("refvae", ["--latent-from", "x.png"], 2, "(only: varsr)"),
        ("edsr", ["--save-latent"], 2, "only: srflow, srflow_da, ncsr, refvae, varsr"),
        ("refvae", ["--ref", "nowhere"], 3, "--ref"),
        ("refvae", ["--ref", "no refs"], 3, "error: --ref "),  # an empty folder names the flag
        ("varsr", ["--latent", "bad.npy"], 3, "expected (8,)"),
        ("varsr", ["--latent-shift", "ok.npy", "--latent-steps", "a,b"], 2, "--latent-steps"),
        ("refvae", ["--latent", "ok.npy", "--ref", "lr"], 2, "cannot be combined"),
        (
            "varsr",
            ["--latent", "z.npz"],
            3,
            "z.npz: a .npz archive of z (8,); expected a "
            "--save-latent file's one latent z0, (8,) or (k, 8)",
        ),
        ("refvae", ["--latent-shift", "z.npz"], 3, "--latent-shift"),
        (
            "varsr",
            ["--latent-shift", "rows.npy"],
            3,
            "--latent-shift rows.npy: 2 rows of (8,); expected one direction, (8,) or (1, 8)",
        ),
        ("varsr", ["--latent", "empty.npy"], 3, "(0, 8), expected (8,) or (k, 8) with at least"),
        ("refvae", ["--latent", "nan.npy"], 3, "nan.npy: holds NaN or infinite values"),
        ("varsr", ["--latent", "zero.npy"], 3, ".npy array (an empty file, 0 bytes)"),
        # no NumPy file, or an array of Python objects: not numpy's advice to unpickle it
        ("varsr", ["--latent", "text.npy"], 3, NOT_NUMPY),
        ("varsr", ["--latent", "nowhere"], 3, "nowhere: not a readable .npy array (No such file"),
        ("refvae", ["--latent-shift", "objects.npy"], 3, OBJECTS),
        ("varsr", ["--latent-shift", "inf.npy"], 3, "--latent-shift"),
        # a folder of no latents of the input (--latent DIR: test_latent_dir_*)
        ("refvae", ["--latent", "refs"], 3, "--latent refs: 1 of 1 inputs have no saved latents"),
        ("refvae", ["--latent-shift", "refs"], 3, "--latent-shift refs: a folder; give one .npy"),
        # a file that is no image (a checkpoint), a folder: the line names the flag that gave it
        ("varsr", ["--latent-from", "varsr.pt"], 3, "--latent-from varsr.pt: not an image file"),
        ("varsr", ["--latent-from", "refs"], 3, "--latent-from refs: not a file"),
        ("refvae", ["--ref", "ok.npy"], 3, "--ref ok.npy: not an image file"),
    ],
)
def test_unsupported_or_bad_controls_one_line(tmp_path, ckpts, capsys, name, flags, code, words):
    inp = images(tmp_path / "in", 3, ((8, 8),))
    np.save(tmp_path / "bad.npy", np.zeros((2, 5), np.float32))
    np.save(tmp_path / "ok.npy", np.zeros(8, np.float32))
    np.save(tmp_path / "rows.npy", np.zeros((2, 8), np.float32))
    np.savez(tmp_path / "z.npz", z=np.zeros(8, np.float32))  # an archive, not --save-latent's
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    np.save(tmp_path / "nan.npy", np.full(8, np.nan, np.float32))
    np.save(tmp_path / "inf.npy", np.array([np.inf] + [0] * 7, np.float32))
    (tmp_path / "zero.npy").write_bytes(b"")  # an empty file: np.load raised EOFError (numpy 2)
    (tmp_path / "text.npy").write_text("0.1 0.2 0.3\n")  # np.savetxt's, not np.save's
    np.save(tmp_path / "objects.npy", np.array([0.5, None] * 4, object), allow_pickle=True)
    (tmp_path / "no refs").mkdir()
    (tmp_path / "varsr.pt").write_bytes(ckpts["varsr"].read_bytes())
    images(tmp_path / "refs", 3, ((8, 8),))
    flags = [f"{f}" if not f.endswith((".npy", ".npz", ".pt", "nowhere", "refs")) else
             str(tmp_path / f) for f in flags]  # fmt: skip
    assert run("--ckpt", ckpts[name], "--input", inp, "--out", tmp_path / "o", *flags) == code
    err = capsys.readouterr().err.strip().splitlines()
    err = [line.replace(f"{tmp_path}/", "") for line in err]
    assert len(err) == 1 and err[0].startswith("sr_sample.py: error: ") and words in err[0]


@pytest.mark.parametrize(
    "name, control, typed, said",
    [
        ("refvae", ["--ref", "refs"], ["--n", "5"], "--n: no effect, --ref DIR sets the number"),
        ("varsr", ["--latent-from", "refs/r0.png"], ["--n", "2"], "--n: no effect, --latent-from"),
        ("varsr", ["--latent", "z.npy"], ["--n", "4"], "--n: no effect, --latent sets the number"),
        ("refvae", ["--latent-shift", "z.npy"], ["--n", "1"], "--n: no effect, --latent-shift"),
        ("refvae", ["--latent", "z.npy"], ["--temperature", "0.5"],
         "--temperature: no effect, --latent sets the latents"),
        ("varsr", ["--latent-shift", "z.npy"], ["--temperature", "2"],
         "--temperature: no effect, --latent-shift sets the latents"),
        ("varsr", ["--latent-from", "refs/r0.png"], ["--seed", "7"],
         "--seed: no effect, --latent-from sets the latents"),
        ("refvae", ["--latent", "z.npy"], ["--seed", "7"], "--seed: no effect, --latent sets"),
    ],
)  # fmt: skip
def test_a_flag_a_control_overrides_is_a_warning(tmp_path, ckpts, capsys, name, control, typed,
                                                  said):  # fmt: skip
    """--n where a control gives the number of outputs, --temperature and --seed where it gives
    the latents: one warning line when typed, none when not, and the same samples."""
    inp = images(tmp_path / "in", 3, ((10, 12),))
    images(tmp_path / "refs")
    np.save(tmp_path / "z.npy", np.linspace(-1, 1, 8).astype(np.float32))
    control = [str(tmp_path / f) if f.endswith(("refs", ".png", ".npy")) else f for f in control]
    for out, extra in (("typed", typed), ("not", [])):
        assert run("--ckpt", ckpts[name], "--input", inp, *control, *extra, "--out",
                   tmp_path / out) == 0  # fmt: skip
        warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(warned) == bool(extra) and all(said in line for line in warned), warned
    files = sorted(p.name for p in (tmp_path / "not").glob("*.png"))
    assert files == sorted(p.name for p in (tmp_path / "typed").glob("*.png"))
    assert all((read(tmp_path / "not" / f) == read(tmp_path / "typed" / f)).all() for f in files)


@pytest.mark.parametrize(
    "name, control, typed, changed",
    [
        ("varsr", ["--latent", "z.npy"], ["--seed", 5, "--temperature", 0.5],
         ["--latent", "z2.npy"]),
        ("refvae", ["--latent", "saved"], ["--seed", 5, "--temperature", 0.5],  # a DIR
         ["--latent", "z.npy"]),
        ("varsr", ["--latent-from", "refs/r0.png"], ["--seed", 5, "--temperature", 0.5],
         ["--latent-from", "refs/r1.png"]),
        ("refvae", ["--latent-shift", "z.npy"], ["--seed", 5, "--temperature", 0.5],
         ["--latent-shift", "z.npy", "--latent-steps", "1,2"]),
        ("varsr", [], ["--latent-steps", "1,2"], ["--seed", 6]),  # without --latent-shift
        ("edsr", [], ["--seed", 5, "--temperature", 0.5],  # a deterministic model
         ["--bit-depth", 16]),
    ],
)  # fmt: skip
def test_a_rerun_may_change_a_flag_of_no_effect(tmp_path, ckpts, capsys, name, control, typed,
                                                 changed):  # fmt: skip
    """A flag the run says has no effect (--seed and --temperature where a control sets the
    latents or the model is deterministic, --latent-steps without --latent-shift) does not make
    a rerun another run: left out or changed, the complete images are skipped, not refused
    ('holds samples made with --seed 5, not 0'), and a fresh folder without it holds the same
    PNGs. A change that makes other samples (`changed`) is still refused."""
    inp = images(tmp_path / "in", 3, ((10, 12),))
    images(tmp_path / "refs")
    np.save(tmp_path / "z.npy", np.linspace(-1, 1, 8).astype(np.float32))
    np.save(tmp_path / "z2.npy", np.linspace(1, -1, 8).astype(np.float32))
    assert run("--ckpt", ckpts["refvae"], "--input", inp, "--n", 2, "--save-latent", "--out",
               tmp_path / "saved") == 0  # fmt: skip
    path = lambda f: str(tmp_path / f) if str(f).endswith(("saved", ".png", ".npy")) else f  # noqa: E731
    base = ["--ckpt", ckpts[name], "--input", inp]
    o = tmp_path / "o"
    assert run(*base, *map(path, control), *typed, "--out", o) == 0
    other = [v + 1 if isinstance(v, (int, float)) else v for v in typed]  # --seed 6, ...
    other = ["--latent-steps", "2,3"] if "--latent-steps" in typed else other
    for again in ([], other):
        capsys.readouterr()
        assert run(*base, *map(path, control), *again, "--out", o) == 0
        assert "0 images sampled, 1 already complete" in capsys.readouterr().out
    assert run(*base, *map(path, control), "--out", tmp_path / "plain") == 0
    plain, got = pngs_of(tmp_path / "plain"), pngs_of(o)
    assert plain.keys() == got.keys() and all((x == plain[f]).all() for f, x in got.items())
    capsys.readouterr()
    assert run(*base, *map(path, changed), "--out", o) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {o} holds samples made with " in err[0], err


def test_a_temperature_sweep_of_fixed_latents_is_refused(tmp_path, ckpts, capsys):
    """Several temperatures where --latent sets the latents would write identical folders."""
    np.save(tmp_path / "z.npy", np.zeros(8, np.float32))
    inp = images(tmp_path / "in", 3, ((10, 12),))
    argv = ["--ckpt", ckpts["varsr"], "--input", inp, "--latent", tmp_path / "z.npy",
            "--temperature", "0.5", "1", "--out", tmp_path / "o"]  # fmt: skip
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sr_sample.py: error: --temperature: --latent sets the latents; its samples do "
                   "not depend on the temperature (give one)"]  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_reference_folder_is_held_at_ref_size(tmp_path):
    """--ref DIR of n large photographs: each reference is kept as the encoder uses it,
    (3, ref_size, ref_size), not at full size (n of them on the device for the whole run), and
    decodes to the same latents as the full-size image."""
    net = model()
    refs = images(tmp_path / "refs", 1, ((64, 96), (5, 7), (40, 40)))  # larger and smaller
    ctl = net.resolve_controls({"ref": str(refs)}, 10, "cpu")
    assert ctl.n == 3 and [tuple(r.shape) for r in ctl.cond["ref"]] == [(3, 16, 16)] * 3
    full = [torch.from_numpy(iio.imread(p)).permute(2, 0, 1) / 255 for p in sorted(refs.iterdir())]
    assert torch.equal(net.encode_refs(ctl.cond["ref"])[0], net.encode_refs(full)[0])


def test_ref_lr_is_the_lr_itself_in_the_api_as_in_the_cli(tmp_path, ckpts):
    """--ref lr encodes the LR image itself (paper §3.2), not the LR padded to lr_multiple: an
    LR of odd size at x4 (RefVAE pads to 2) gives model.sample the samples sr_sample.py writes."""
    inp = images(tmp_path / "in", 3, ((9, 11),))
    argv = ["--ckpt", ckpts["refvae"], "--input", inp, "--ref", "lr", "--n", 2, "--temperature",
            1, "--seed", 5, "--save-latent", "--out", tmp_path / "o"]  # fmt: skip
    assert run(*argv) == 0
    net = load_model(ckpts["refvae"])[0]
    lr = torch.from_numpy(read(inp / "r0.png")).permute(2, 0, 1)[None] / 255
    decoded = []  # the latents sample() decodes: a tiny random net hardly shows them in 8 bits
    decode = net.decode_latents
    net.decode_latents = lambda x, z, p=None: decoded.append(z) or decode(x, z, p)
    noise = NoiseSource([sample_seed(5, "r0", i) for i in range(2)])
    sr = net.sample(lr, 2, 1.0, noise, ref="lr")[0]
    for i in range(2):
        z = np.load(tmp_path / "o" / f"r0_sample{i:05d}.latent.npz")["z0"]
        assert (decoded[0][0, i].numpy() == z).all()
        assert (to_uint8(sr[i : i + 1])[0] == read(tmp_path / "o" / f"r0_sample{i:05d}.png")).all()


@pytest.mark.parametrize("name, flag", [("refvae", "--ref"), ("varsr", "--latent"),
                                        ("varsr", "--latent-from")])  # fmt: skip
def test_a_rerun_with_other_control_contents_is_refused(tmp_path, ckpts, capsys, name, flag):
    """A rerun into the same --out skips complete images: with a --ref folder whose images, or
    a --latent/--latent-from file whose contents, changed under the same names it kept the old
    samples made with the old ones. It is refused, as another checkpoint is; --overwrite redoes
    them."""
    inp = images(tmp_path / "in", 3, ((10, 12),))
    control = {"--ref": tmp_path / "refs", "--latent": tmp_path / "z.npy",
               "--latent-from": tmp_path / "hr" / "r0.png"}[flag]  # fmt: skip

    def make(seed):
        images(tmp_path / "refs", seed)  # same names, same count, other pixels
        images(tmp_path / "hr", seed, ((24, 24),))
        np.save(tmp_path / "z.npy", np.random.default_rng(seed).normal(size=(2, 8)).astype("f4"))

    argv = ["--ckpt", ckpts[name], "--input", inp, flag, control, "--save-latent", "--out",
            tmp_path / "o"]  # fmt: skip
    make(0)
    assert run(*argv) == 0
    first = np.load(tmp_path / "o" / "r0_sample00000.latent.npz")["z0"]
    assert run(*argv) == 0  # the same contents: complete, skipped
    make(1)
    capsys.readouterr()
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sr_sample.py: error: {tmp_path / 'o'} holds samples made with other "
                   f"contents of {flag} {control}; use another --out, or --overwrite to redo "
                   "them"]  # fmt: skip
    assert (np.load(tmp_path / "o" / "r0_sample00000.latent.npz")["z0"] == first).all()  # kept
    assert run(*argv, "--overwrite") == 0
    assert not (np.load(tmp_path / "o" / "r0_sample00000.latent.npz")["z0"] == first).all()
    assert run(*argv) == 0  # the manifest now holds the new contents
    manifest = tmp_path / "o" / "manifest.json"  # one of an srspace that kept no digests
    old = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "control_sha256"}
    manifest.write_text(json.dumps(old))
    capsys.readouterr()
    assert run(*argv) == 2  # (its samples may be of other contents: it cannot tell)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sr_sample.py: error: {tmp_path / 'o'} holds samples made with an srspace that did not "
        f"record the contents of {flag} {control}; use another --out, or --overwrite to redo them"
    ]  # fmt: skip


# --latent DIR: a folder of --save-latent files, each input decoded from its own


def named_images(folder, sizes: dict):
    """Noise images named {stem}.png (stems sharing prefixes, a space) of the (h, w) given."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for stem, (h, w) in sizes.items():
        iio.imwrite(folder / f"{stem}.png", (rng.random((h, w, 3)) * 255).astype(np.uint8))
    return folder


PREFIXED = {"a": (8, 10), "a_b": (10, 8), "img 1": (6, 6)}  # "a" a prefix of "a_b"


def pngs_of(folder) -> dict:
    return {p.name: read(p) for p in sorted(folder.glob("*.png"))}


def same_pngs(folder, *others) -> bool:
    """The PNGs of each of `others` are those of `folder`: the same names, the same pixels."""
    want = pngs_of(folder)
    got = [pngs_of(other) for other in others]
    return all(list(g) == list(want) and all((g[k] == want[k]).all() for k in g) for g in got)


@pytest.mark.parametrize("name", ["refvae", "varsr"])
def test_latent_dir_decodes_each_input_from_its_own_files(tmp_path, ckpts, capsys, name):
    """--latent DIR (a --save-latent run's folder): each input NAME is decoded from the files
    NAME_sample{i:05d}.latent.npz there, the whole stem (not "a"'s files for "a_b"), sample i
    written as NAME_sample{i:05d}.png with its i (a gap stays a gap), bit for bit the saved
    sample; --n, --seed and --temperature are set by the files (the --latent warnings);
    manifest.json records n (the highest number + 1) and the joint sha256 of the files in the
    input order, then by number, so a rerun skips and a changed file is refused. --shard
    decodes its images, a symbolic link to DIR reads it, and the folder of a --layout ntire
    run is read by its ntire_index.json."""
    inp = named_images(tmp_path / "in", PREFIXED)
    base = ["--ckpt", ckpts[name], "--input", inp]
    assert run(*base, "--n", 4, "--temperature", 0.9, "--save-latent", "--out", tmp_path / "s") == 0
    s = tmp_path / "s"
    for i in (1, 2):  # a gap: samples 0 and 3 of "a" only
        (s / f"a_sample{i:05d}.latent.npz").unlink()
    capsys.readouterr()
    again = [*base, "--latent", s, "--n", 2, "--seed", 5, "--out", tmp_path / "d"]
    assert run(*again) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert [w.split(":")[2].strip() for w in warned] == ["--n", "--seed", f"--latent {s}"], warned
    assert all("no effect, --latent sets the" in w for w in warned[:2])
    assert "the sample numbers of a have a gap (0, 3; 1 of 3 inputs have one)" in warned[2]
    d = pngs_of(tmp_path / "d")
    want = ["a_sample00000.png", "a_sample00003.png"]
    want += [f"{stem}_sample{i:05d}.png" for stem in ("a_b", "img 1") for i in range(4)]
    assert sorted(d) == sorted(want)
    saved = pngs_of(s)
    assert all((x == saved[f]).all() for f, x in d.items())
    assert not (d["a_sample00000.png"] == d["a_sample00003.png"]).all()  # the latents show
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    order = [p.stem for p in sr_sample.input_paths(inp)]
    files = [s / f[:-4] for stem in order for f in want if f.startswith(f"{stem}_sample")]
    joint = " ".join(sr_sample.latent_fingerprint(Path(f"{f}.latent.npz"))[0] for f in files)
    assert manifest["n"] == 4
    assert manifest["control_sha256"] == {"--latent": hashlib.sha256(joint.encode()).hexdigest()}
    # a rerun: every image complete
    assert run(*again) == 0
    assert "0 images sampled, 3 already complete" in capsys.readouterr().out
    # two shards into one folder: the same files; a link to the folder reads it
    (tmp_path / "link").symlink_to(s, target_is_directory=True)
    for shard in ("0/2", "1/2"):
        assert run(*base, "--latent", tmp_path / "link", "--shard", shard, "--out",
                   tmp_path / "e") == 0  # fmt: skip
    e = pngs_of(tmp_path / "e")
    assert sorted(e) == sorted(want) and all((x == saved[f]).all() for f, x in e.items())
    # a --layout ntire run's folder (000000_sample00000.latent.npz, ...): read by its index
    assert run(*base, "--n", 2, "--layout", "ntire", "--save-latent", "--out", tmp_path / "n") == 0
    assert run(*base, "--latent", tmp_path / "n", "--out", tmp_path / "m") == 0
    m, ntire = pngs_of(tmp_path / "m"), pngs_of(tmp_path / "n")
    assert sorted(m) == sorted(f"{stem}_sample{i:05d}.png" for stem in order for i in range(2))
    for k, stem in enumerate(order):
        assert all((m[f"{stem}_sample{i:05d}.png"] == ntire[f"{k:06d}_sample{i:05d}.png"]).all()
                   for i in range(2))  # fmt: skip
    # --grid labels the samples by their numbers
    texts = []
    label = sr_sample.labelled
    with mock.patch.object(sr_sample, "labelled", lambda p, *t: texts.append(t[0]) or label(p, *t)):
        assert run(*base, "--input", inp / "a.png", "--latent", s, "--grid", "--out",
                   tmp_path / "g") == 0  # fmt: skip
    assert texts == ["LR", "sample 0", "sample 3", "std"]
    # the same names of other contents: refused
    z = s / "a_b_sample00001.latent.npz"
    z.write_bytes((s / "a_b_sample00002.latent.npz").read_bytes())
    assert run(*again) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1:] == [
        f"sr_sample.py: error: {tmp_path / 'd'} holds samples made with other contents of "
        f"--latent {s}; use another --out, or --overwrite to redo them"
    ]
    # a file added above the highest number: its n follows the folder's files, said as them
    (s / "a_b_sample00007.latent.npz").write_bytes(z.read_bytes())
    assert run(*again) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1:] == [
        f"sr_sample.py: error: {tmp_path / 'd'} holds samples made with other contents of "
        f"--latent {s}; use another --out, or --overwrite to redo them"
    ]


def test_a_saved_latent_that_records_no_model_is_one_warning(tmp_path, ckpts, capsys):
    """A .npz named as --save-latent names them but without made_by (an srspace's before it
    recorded one, or rewritten) was decoded as this model's without a word, where an older
    srspace's .npy without its folder's manifest.json is one warning: a latent of another model
    of the same D decodes to other images without an error. Now it is one warning line naming
    it. A file named by hand (a .npz of z0, an np.save array) is the user's own: no warning, nor
    for a --latent-shift direction."""
    inp = images(tmp_path / "in", 3, ((8, 8),))
    z = np.random.default_rng(0).standard_normal(8).astype(np.float32)
    saved = tmp_path / "r0_sample00000.latent.npz"
    for f in (saved, tmp_path / "hand.npz"):
        np.savez(f, z0=z)
    np.save(tmp_path / "hand.npy", z)
    base = ["--ckpt", ckpts["varsr"], "--input", inp, "--quiet"]
    said = (f"sr_sample.py: warning: --latent {saved}: with no record of the model that saved it "
            "(an srspace before --save-latent recorded it, or rewritten): decoded as this x4 "
            "varsr's, unchecked; another model's latent of these shapes decodes to other images "
            "without an error")  # fmt: skip
    capsys.readouterr()
    assert run(*base, "--latent", saved, "--out", tmp_path / "saved") == 0
    assert capsys.readouterr().err.splitlines() == [said]
    for f in ("hand.npz", "hand.npy"):
        assert run(*base, "--latent", tmp_path / f, "--out", tmp_path / f[5:]) == 0
        assert run(*base, "--latent-shift", tmp_path / f, "--out", tmp_path / f"walk{f}") == 0
        assert capsys.readouterr().err == ""
    assert same_pngs(tmp_path / "saved", tmp_path / "npz", tmp_path / "npy")


def test_latent_dir_one_line_errors(tmp_path, ckpts, capsys):
    """--latent DIR, refused in one line before any work (nothing written; exit 3 for what the
    folder holds or lacks: another model's files, of two samples, inputs
    without files there (how many, which; "a" is not "a_b"), a --temperature sweep's folder (its
    latents in T*/: which to give), numbered files without their ntire_index.json (or an
    unreadable one), a refvae run's folder for varsr (its manifest.json says; a .npy records
    nothing), a flow's .npz files for varsr, a file of two samples; exit 2 for the flags:
    --latent-shift (it walks from one latent), --layout ntire with
    a gap in the sample numbers (the challenge reads 0..N-1), and DIR as --out (its samples
    replaced, with --overwrite its latents deleted; a link to it too): the latents stay."""
    inp = named_images(tmp_path / "in", PREFIXED)
    s = tmp_path / "s"
    base = ["--ckpt", ckpts["varsr"], "--input", inp]
    assert run(*base, "--n", 2, "--save-latent", "--out", s) == 0
    before = {p.name: p.read_bytes() for p in s.iterdir()}
    only = tmp_path / "only_a_b"  # the files of "a_b", none of "a" and "img 1"
    only.mkdir()
    for f in s.glob("a_b_sample*.latent.npz"):
        (only / f.name).write_bytes(f.read_bytes())
    flows = tmp_path / "flows"
    flows.mkdir()
    flow = np.array(json.dumps({"model": "srflow", "scale": 4}))  # (made_by: what saved it)
    for stem in PREFIXED:
        np.savez(flows / f"{stem}_sample00000.latent.npz", z0=np.zeros((6, 4, 4), "f4"),
                 made_by=flow)  # fmt: skip
    two = tmp_path / "two"
    two.mkdir()
    for stem in PREFIXED:
        np.savez(two / f"{stem}_sample00000.latent.npz", z0=np.zeros((2, 8), "f4"))
    gap = tmp_path / "gap"
    gap.mkdir()
    for f in s.glob("*.latent.npz"):
        if f.name != "a_b_sample00000.latent.npz":
            (gap / f.name).write_bytes(f.read_bytes())
    (tmp_path / "link").symlink_to(s, target_is_directory=True)
    sweep = tmp_path / "sweep"  # a --temperature sweep's folder: its latents in T0.5/ and T1/
    for t in ("T0.5", "T1"):
        (sweep / t).mkdir(parents=True)
        for f in s.glob("*.latent.npz"):
            (sweep / t / f.name).write_bytes(f.read_bytes())
    order = [p.stem for p in sr_sample.input_paths(inp)]
    numbered, garbled = tmp_path / "numbered", tmp_path / "garbled"  # a --layout ntire run's files
    for d in (numbered, garbled):
        d.mkdir()
        for k, stem in enumerate(order):
            for f in s.glob(f"{glob.escape(stem)}_sample*.latent.npz"):
                (d / f.name.replace(stem, f"{k:06d}", 1)).write_bytes(f.read_bytes())
    (garbled / "ntire_index.json").write_text('{"scale": 4, "000000": ')  # cut short
    rv = tmp_path / "rv"  # refvae's latents: (8,) as varsr's, only their made_by differs
    assert run("--ckpt", ckpts["refvae"], "--input", inp, "--n", 1, "--save-latent", "--out",
               rv) == 0  # fmt: skip
    cases = [
        (["--latent", numbered], f"--latent {numbered}: its files are named by number "
         "(000000_sample00000.latent.npz, ...), as a --layout ntire run names them, and its "
         "ntire_index.json, which maps the numbers to the inputs, is missing: copy it there from "
         "that run's --out", 3),
        (["--latent", garbled], f"--latent {garbled}: its files are named by number "
         "(000000_sample00000.latent.npz, ...), as a --layout ntire run names them, and its "
         "ntire_index.json, which maps the numbers to the inputs, is not the index that run "
         "writes: copy it there from that run's --out", 3),
        (["--latent", rv], f"--latent {rv}/a_sample00000.latent.npz: saved by an x4 refvae "
         "model, not this x4 varsr (its latents decode to other images here); decode it with an "
         "x4 refvae checkpoint", 3),
        (["--latent", only], f"--latent {only}: 2 of 3 inputs have no saved latents there (no "
         "NAME_sample{i:05d}.latent.npz): a.png, img 1.png; give --input only the images whose "
         "latents it holds", 3),
        (["--latent", sweep], f"--latent {sweep}: a --temperature sweep's folder, its latents "
         f"in its subfolders T0.5, T1: give one of them (--latent {sweep / 'T0.5'})", 3),
        (["--latent", flows], ": saved by an x4 srflow model, not this x4 varsr (its latents "
         "decode to other images here); decode it with an x4 srflow checkpoint", 3),
        (["--latent", s, "--latent-shift", s / "a_sample00000.latent.npz"], f"--latent {s}: a "
         "folder, each input decoded from its own saved latents; it cannot be combined with "
         "--latent-shift (give --latent one FILE)"),
        (["--latent", two], f"--latent {two / 'a_sample00000.latent.npz'}: holds 2 samples; a "
         "--latent folder's NAME_sample{i:05d} file holds one, sample i", 3),
        (["--latent", gap, "--layout", "ntire"], "--layout ntire: the challenge reads samples "
         f"0..N-1 of every image, but --latent {gap} holds samples 1 of a_b, not 0..1; use "
         "--layout stem, which keeps the sample numbers"),
        (["--latent", s, "--out", s], f"--latent {s}: the --out folder; decoded there, its "
         "samples would replace those its latents were saved with (and --overwrite delete the "
         "latents); use another --out"),
        (["--latent", s, "--out", s, "--overwrite"], "the --out folder"),
        (["--latent", tmp_path / "link", "--out", s, "--overwrite"], "the --out folder"),
    ]  # fmt: skip
    for k, (flags, words, *code) in enumerate(cases):  # (exit 3: a file that cannot be used)
        capsys.readouterr()
        out = tmp_path / f"o{k}"
        assert run(*base, "--out", out, *flags) == (code[0] if code else 2), words
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sr_sample.py: error: ") and words in err[0], err
        assert not out.exists() or not list(out.glob("*.png"))
    assert {p.name: p.read_bytes() for p in s.iterdir()} == before


def test_a_latent_dir_name_of_no_file_is_one_line(tmp_path, ckpts, capsys):
    """A name of a --save-latent file in --latent DIR that is no file, a link to nothing (a
    folder of links into a purged scratch space) or a folder, is one line naming it (exit 3),
    not a sample silently left out (a gap, or a smaller n); where its input is given."""
    inp = named_images(tmp_path / "in", PREFIXED)
    s = tmp_path / "s"
    assert run("--ckpt", ckpts["varsr"], "--input", inp, "--n", 3, "--save-latent", "--out", s) == 0
    gone = s / "a_b_sample00002.latent.npz"
    gone.unlink()
    gone.symlink_to(tmp_path / "purged" / gone.name)
    decode = ["--ckpt", ckpts["varsr"], "--input", inp, "--latent", s, "--out", tmp_path / "d"]
    capsys.readouterr()
    assert run(*decode) == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sr_sample.py: error: --latent {s}: a_b_sample00002.latent.npz is no file (a link to "
        "nothing, or a folder); put the file back, or remove the name to decode the others"
    ]
    gone.unlink()
    gone.mkdir()
    assert run(*decode) == 3
    assert "a_b_sample00002.latent.npz is no file" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").glob("*.png"))
    # another input's: not this decode's concern
    assert run(*decode[:3], inp / "a.png", *decode[4:]) == 0
    assert sorted(p.name for p in (tmp_path / "d").glob("*.png")) == [
        f"a_sample{i:05d}.png" for i in range(3)
    ]


def as_old(folder):
    """The --save-latent files of `folder` as an older srspace wrote them: bare (D,) .npy arrays
    NAME_sample{i:05d}.latent.npy, which record no model; their .npz removed."""
    for f in sorted(folder.glob("*.latent.npz")):
        np.save(f.with_suffix(".npy"), np.load(f)["z0"])
        f.unlink()


def test_latent_dir_of_another_checkpoint_is_one_warning(tmp_path, ckpts, capsys):
    """A saved latent names the model that saved it (made_by, as a flow's): its files decode with
    another checkpoint of the model with one warning line naming it (a fair experiment: the
    weights trained further; another model's: refused, test_latent_dir_one_line_errors), also
    without the folder's manifest.json. An older srspace's .npy records nothing: its folder's
    manifest.json does; without it, one warning line that nothing records the model."""
    inp = named_images(tmp_path / "in", PREFIXED)
    s = tmp_path / "s"
    assert run("--ckpt", ckpts["varsr"], "--input", inp, "--n", 1, "--save-latent", "--out", s) == 0
    later = tmp_path / "later.pt"  # the same model and config, another file
    save_checkpoint(later, {**load_checkpoint(ckpts["varsr"]), "step": 1})
    sha = hashlib.sha256(ckpts["varsr"].read_bytes()).hexdigest()
    for out in ("d", "e"):
        capsys.readouterr()
        assert run("--ckpt", later, "--input", inp, "--latent", s, "--out", tmp_path / out) == 0
        assert capsys.readouterr().err.strip().splitlines() == [
            f"sr_sample.py: warning: --latent {s}: 3 of 3 files saved by another varsr checkpoint "
            f"(sha256 {sha[:12]}...): decoded with this one, its samples are not the saved ones"
        ]
        (s / "manifest.json").unlink(missing_ok=True)  # copied without it: the files say
    as_old(s)
    assert run("--ckpt", later, "--input", inp, "--latent", s, "--out", tmp_path / "f") == 0
    assert capsys.readouterr().err.startswith(
        f"sr_sample.py: warning: --latent {s}: no manifest.json there names the model that saved "
        "its latents (a .npy holds the array alone): decoded as this x4 varsr's; "
    )


def test_a_latent_dir_of_npy_and_npz_files_warns_of_the_npy_files_alone(tmp_path, ckpts, capsys):
    """A folder of an older srspace's .npy latents and this one's .npz (rerun after an upgrade:
    an image not complete sampled again, its .npy replaced), copied without its manifest.json,
    was one warning that nothing names the model that saved "its latents", though each .npz names
    its model and is checked. The line names the .npy files (how many of the folder's) and says
    the .npz files are checked; a folder of .npz files alone is no warning."""
    inp = named_images(tmp_path / "in", PREFIXED)
    s = tmp_path / "s"
    base = ["--ckpt", ckpts["varsr"], "--input", inp]
    assert run(*base, "--n", 2, "--save-latent", "--out", s) == 0
    (s / "manifest.json").unlink()
    capsys.readouterr()
    assert run(*base, "--latent", s, "--out", tmp_path / "npz") == 0
    assert capsys.readouterr().err == ""
    f = s / "a_sample00001.latent.npz"
    np.save(f.with_suffix(".npy"), np.load(f)["z0"])
    f.unlink()
    assert run(*base, "--latent", s, "--out", tmp_path / "mixed") == 0
    assert capsys.readouterr().err.splitlines() == [
        f"sr_sample.py: warning: --latent {s}: no manifest.json there names the model that saved "
        "its .npy latents, 1 of 6 files (a .npy holds the array alone; its .npz files name "
        "theirs, checked each): decoded as this x4 varsr's; another model's latents of the same "
        "size decode to other images without an error (copy the manifest.json of their "
        "--save-latent folder there to have them checked)"
    ]
    assert same_pngs(tmp_path / "npz", tmp_path / "mixed")


def test_latent_dir_decoded_from_other_inputs_than_it_was_saved_from_is_one_warning(
    tmp_path, ckpts, capsys
):
    """A .npy latent decodes with any LR, so a --from-hr run's folder decoded from its HR
    without --from-hr (or an LR run's with it) wrote samples of other images, exit 0, without a
    word. The LR sizes tell (this run's, from the input headers; the saving run's, its sample
    PNG's / scale, else its lr/NAME.png): one warning line, naming the flag the manifest.json
    says. --input DIR/lr without --from-hr (that run's LR) and the HR with it: no warning."""
    hr = tmp_path / "hr"
    hr.mkdir()
    for k, (h, w) in enumerate([(37, 45), (48, 32)]):
        img = (np.random.default_rng(k).random((h, w, 3)) * 255).astype(np.uint8)
        iio.imwrite(hr / f"h{k}.png", img)
    s, ck = tmp_path / "s", ["--ckpt", ckpts["refvae"]]
    assert run(*ck, "--input", hr, "--from-hr", "--n", 2, "--save-latent", "--out", s) == 0
    capsys.readouterr()
    for k, flags in enumerate([["--input", hr, "--from-hr"], ["--input", s / "lr"]]):
        assert run(*ck, *flags, "--latent", s, "--out", tmp_path / f"ok{k}") == 0
        assert capsys.readouterr().err == ""
    assert (read(tmp_path / "ok0" / "h0_sample00001.png") == read(s / "h0_sample00001.png")).all()
    said = (
        f"sr_sample.py: warning: --latent {s}: 2 of 2 inputs are not the LR their latents were "
        "saved from (h0.png: an LR of 45x37 px; its samples there are x4 of an LR of 10x8 px): "
        "their samples are not the saved ones; it was saved with --from-hr (its manifest.json): "
        f"give the HR images with --from-hr, or the LR it wrote ({s / 'lr'})"
    )
    assert run(*ck, "--input", hr, "--latent", s, "--out", tmp_path / "hr_as_lr") == 0
    assert capsys.readouterr().err.splitlines() == [said]
    for f in s.glob("*.png"):  # latents copied with its lr/ alone: told by lr/NAME.png
        f.unlink()
    assert run(*ck, "--input", hr, "--latent", s, "--out", tmp_path / "no_png") == 0
    assert capsys.readouterr().err.splitlines() == [
        said.replace("its samples there are x4 of", "its lr/ holds")
    ]
    # the reverse: an LR run's folder decoded with --from-hr (the HR of that LR: no warning)
    lr = tmp_path / "l"
    assert run(*ck, "--input", s / "lr", "--n", 2, "--save-latent", "--out", lr) == 0
    assert run(*ck, "--input", hr, "--from-hr", "--latent", lr, "--out", tmp_path / "ok2") == 0
    assert capsys.readouterr().err == ""
    assert run(*ck, "--input", s / "lr", "--latent", lr, "--from-hr", "--out", tmp_path / "r") == 0
    assert capsys.readouterr().err.splitlines() == [
        f"sr_sample.py: warning: --latent {lr}: 2 of 2 inputs are not the LR their latents were "
        "saved from (h0.png: an LR of 2x2 px; its samples there are x4 of an LR of 10x8 px): "
        "their samples are not the saved ones; it was saved from LR inputs, without --from-hr "
        "(its manifest.json): give those LR images without --from-hr"
    ]


def test_latent_dir_to_the_ntire_layout(tmp_path, ckpts):
    """--layout ntire from --latent DIR where every image has samples 0..N-1: written as that
    layout (numbered images, the same sample numbers), and at N = 1 as NAME.png, as a run of
    --n 1 writes it; the PNGs are the saved ones."""
    inp = named_images(tmp_path / "in", PREFIXED)
    base = ["--ckpt", ckpts["refvae"], "--input", inp]
    order = [p.stem for p in sr_sample.input_paths(inp)]
    for n in (2, 1):
        s, o = tmp_path / f"s{n}", tmp_path / f"o{n}"
        assert run(*base, "--n", n, "--save-latent", "--out", s) == 0
        assert run(*base, "--latent", s, "--layout", "ntire", "--out", o) == 0
        got = pngs_of(o)
        name = (lambda k, i: f"{k:06d}_sample{i:05d}.png") if n > 1 else lambda k, i: f"{k:06d}.png"
        assert sorted(got) == sorted(name(k, i) for k in range(3) for i in range(n))
        for k, stem in enumerate(order):
            assert all((got[name(k, i)] == read(s / f"{stem}_sample{i:05d}.png")).all()
                       for i in range(n))  # fmt: skip
        index = json.loads((o / "ntire_index.json").read_text())
        assert [index[f"{k:06d}"] for k in range(3)] == order


def test_ntire_n1_latents_are_numbered_and_read_by_latent_dir(tmp_path, ckpts, capsys):
    """--layout ntire --n 1 writes each image as {k:06d}.png, and its latent as sample 0's,
    {k:06d}_sample00000.latent.npz (the one name of every --save-latent file), so --latent DIR
    decodes that folder like any other; a folder of the older name {k:06d}.latent.npz (a run
    before the latents were always numbered) is read as sample 0 too, and --overwrite deletes
    those files with the image's others."""
    inp = named_images(tmp_path / "in", PREFIXED)
    base = ["--ckpt", ckpts["refvae"], "--input", inp]
    order = [p.stem for p in sr_sample.input_paths(inp)]
    s = tmp_path / "s"
    assert run(*base, "--n", 1, "--layout", "ntire", "--save-latent", "--out", s) == 0
    assert sorted(p.name for p in s.glob("*.latent.npz")) == [
        f"{k:06d}_sample00000.latent.npz" for k in range(3)
    ]
    capsys.readouterr()
    assert run(*base, "--n", 1, "--layout", "ntire", "--save-latent", "--out", s) == 0
    assert "0 images sampled, 3 already complete" in capsys.readouterr().out
    for layout, name in (("stem", "{stem}_sample00000.png"), ("ntire", "{k:06d}.png")):
        out = tmp_path / layout
        assert run(*base, "--latent", s, "--layout", layout, "--out", out) == 0
        got = pngs_of(out)
        assert sorted(got) == sorted(name.format(k=k, stem=stem) for k, stem in enumerate(order))
        assert all((got[name.format(k=k, stem=stem)] == read(s / f"{k:06d}.png")).all()
                   for k, stem in enumerate(order))  # fmt: skip
    old = tmp_path / "old"  # as written before: {k:06d}.latent.npz
    old.mkdir()
    for f in s.iterdir():
        (old / f.name.replace("_sample00000.latent", ".latent")).write_bytes(f.read_bytes())
    assert run(*base, "--latent", old, "--out", tmp_path / "from_old") == 0
    assert pngs_of(tmp_path / "from_old").keys() == pngs_of(tmp_path / "stem").keys()
    assert all((x == read(tmp_path / "stem" / f)).all()
               for f, x in pngs_of(tmp_path / "from_old").items())  # fmt: skip
    # both names of one sample (a rerun of such a folder wrote the numbered one): one line
    (old / "000000_sample00000.latent.npz").write_bytes((s / "000000_sample00000.latent.npz")
                                                        .read_bytes())  # fmt: skip
    capsys.readouterr()
    assert run(*base, "--latent", old, "--out", tmp_path / "both") == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sr_sample.py: error: --latent {old}: 000000.latent.npz and 000000_sample00000.latent.npz "
        f"are both sample 0 of {order[0]} (the older and the numbered name of sample 0); remove one"
    ]
    # --overwrite of that folder deletes both names with the image's files
    assert run(*base, "--n", 1, "--layout", "ntire", "--overwrite", "--out", old) == 0
    assert not list(old.glob("*.latent.npz"))
    # a stem folder's NAME.latent.npz is no --save-latent file (never written so): not read
    (tmp_path / "stray").mkdir()
    np.savez(tmp_path / "stray" / "a.latent.npz", z0=np.zeros(8, np.float32))
    capsys.readouterr()
    assert run(*base, "--input", inp / "a.png", "--latent", tmp_path / "stray", "--out",
               tmp_path / "none") == 3  # fmt: skip
    assert "1 of 1 inputs have no saved latents" in capsys.readouterr().err
    # nor does --overwrite of a --layout stem folder delete it
    one = ["--input", inp / "a.png", "--n", 1, "--out", tmp_path / "stray"]
    assert run(*base, *one, "--overwrite") == 0 and run(*base, *one, "--overwrite") == 0
    assert (tmp_path / "stray" / "a.latent.npz").is_file()


def test_a_latent_dir_file_changed_during_the_run_is_refused(tmp_path, ckpts, capsys):
    """Each file of --latent DIR is read before the run (manifest.json records the joint digest)
    and again when its image is decoded: a file that changed in between is one line (exit 3, its
    contents: a data fault; the images before it written),
    not a sample of contents the manifest does not record."""
    inp = named_images(tmp_path / "in", PREFIXED)
    s = tmp_path / "s"
    base = ["--ckpt", ckpts["varsr"], "--input", inp]
    assert run(*base, "--n", 1, "--save-latent", "--out", s) == 0
    late = s / "img 1_sample00000.latent.npz"  # the last image's
    capsys.readouterr()
    d = tmp_path / "d"
    with changed_after_check(late):
        assert run(*base, "--latent", s, "--out", d, "--json") == 3
    said = capsys.readouterr()
    err = [line for line in said.err.splitlines() if "error" in line]
    kept = len(list(d.glob("*_sample00000.png")))  # the images before it, written
    assert err == [f"sr_sample.py: error: --latent {late}: changed while this run read the "
                   "folder (other contents than manifest.json records, which a rerun refuses): "
                   "put its contents back and rerun, or, the change meant, rerun with "
                   f"--overwrite once nothing writes there; the {kept} images sampled before it "
                   f"are kept in {d}"]  # fmt: skip
    assert kept == len(PREFIXED) - 1 and not (d / "img 1_sample00000.png").exists()
    assert json.loads(said.out.splitlines()[-1])["sampled"] == kept  # (counted, as written)
    # what the line says: the rerun is refused while the file holds other contents
    assert run(*base, "--latent", s, "--out", d) == 2
    assert "holds samples made with other contents of --latent" in capsys.readouterr().err
    assert run(*base, "--latent", s, "--out", d, "--overwrite") == 0


def changed_after_check(path: Path):
    """--latent DIR's file `path` rewritten right after the run's first read of the folder
    (`LatentDir.check`), before its image is decoded."""
    check = sr_sample.LatentDir.check

    def then_changed(self, *args):
        digests = check(self, *args)
        np.savez(path, z0=np.ones(8, np.float32))
        return digests

    return mock.patch.object(sr_sample.LatentDir, "check", then_changed)


def test_a_latent_dir_file_of_the_first_image_changed_says_none_is_kept(tmp_path, ckpts, capsys):
    """The first image's --latent file changed before its read: its line said "the 0 images
    sampled before it are kept in OUT", which are none."""
    inp = named_images(tmp_path / "in", PREFIXED)
    s = tmp_path / "s"
    base = ["--ckpt", ckpts["varsr"], "--input", inp]
    assert run(*base, "--n", 1, "--save-latent", "--out", s) == 0
    first = s / "a_sample00000.latent.npz"
    capsys.readouterr()
    with changed_after_check(first):
        assert run(*base, "--latent", s, "--out", tmp_path / "d") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("once nothing writes there; no image was sampled before it"), err
    assert not list((tmp_path / "d").glob("*_sample00000.png"))


def test_latent_dir_in_the_input_folder(tmp_path, ckpts, capsys):
    """A --save-latent run into its --input folder left samples and latents among the inputs:
    --latent DIR of that folder, --input the same, --out another, leaves the samples out of the
    inputs (one warning line, as an --out there does) and decodes the images alone."""
    inp = named_images(tmp_path / "in", PREFIXED)
    base = ["--ckpt", ckpts["refvae"], "--input", inp]
    assert run(*base, "--n", 2, "--save-latent", "--out", inp) == 0
    capsys.readouterr()
    assert run(*base, "--latent", inp, "--out", tmp_path / "d") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [f"sr_sample.py: warning: --latent {inp} is the --input folder: 6 files "
                      "named as samples of its images left out of the inputs (a_b_sample00000.png"
                      ", ...)"]  # fmt: skip
    d, saved = pngs_of(tmp_path / "d"), pngs_of(inp)
    assert sorted(d) == sorted(f"{stem}_sample{i:05d}.png" for stem in PREFIXED for i in range(2))
    assert all((x == saved[f]).all() for f, x in d.items())


@pytest.mark.parametrize("name, flag", [("refvae", "--ref FILE"), ("refvae", "--ref DIR"),
                                        ("varsr", "--latent-from")])  # fmt: skip
def test_a_reference_is_encoded_once_per_run(tmp_path, ckpts, monkeypatch, name, flag):
    """--ref FILE|DIR and --latent-from: each reference is encoded once for the whole run, not
    for every image and chunk of --batch (a VGG19 or an encoder each time), and the latents are
    those `latents` computes from the reference image, bit for bit."""
    inp = images(tmp_path / "in", 3, ((10, 12), (9, 7), (12, 12)))
    refs = images(tmp_path / "refs", 1, ((20, 20), (16, 24), (30, 18)))
    given = {"--ref FILE": ["--ref", refs / "r1.png", "--n", 3], "--ref DIR": ["--ref", refs],
             "--latent-from": ["--latent-from", refs / "r2.png"]}[flag]  # fmt: skip
    net = load_model(ckpts[name])[0]
    cls, encoder = type(net), "encode_refs" if name == "refvae" else "posterior"
    calls, encode = [], getattr(cls, encoder)
    monkeypatch.setattr(cls, encoder, lambda self, x: calls.append(1) or encode(self, x))
    argv = ["--ckpt", ckpts[name], "--input", inp, *given, "--batch", 2, "--save-latent"]
    assert run(*argv, "--out", tmp_path / "o") == 0
    assert len(calls) == (3 if flag == "--ref DIR" else 1)  # one per reference
    ref = lambda f: torch.from_numpy(read(f)).permute(2, 0, 1) / 255  # noqa: E731
    for p in sorted(inp.iterdir()):
        lr, n = ref(p)[None], 1 if flag == "--latent-from" else 3
        noise = NoiseSource([sample_seed(0, p.stem, i) for i in range(n)])
        files = [refs / "r1.png"] if flag == "--ref FILE" else sorted(refs.iterdir())
        cond = ({"ref": [net.reference(ref(f)) for f in files]} if name == "refvae" else
                {"latent_from": ref(refs / "r2.png")[None]})  # fmt: skip
        z = net.latents(lr, n, 1.0, noise, **cond)[0]
        for i in range(n):
            saved = np.load(tmp_path / "o" / f"{p.stem}_sample{i:05d}.latent.npz")["z0"]
            assert (saved == z[i].numpy()).all()


def test_each_control_file_is_read_once(tmp_path, ckpts):
    """A control flag's files were read twice or more: read_image opened an image four times
    (its TIFF probe, the header, the PNG bit depth, the pixels), manifest.json's control_sha256
    hashed it once more, and a --latent file was loaded, then hashed. Each file is now read
    once, its bytes decoded and hashed: the digests are those of the files' contents, and the
    latents those of the references read by path. (Opens counted by the interpreter's audit
    hook, in a process of its own: the hook cannot be removed.)"""
    inp = images(tmp_path / "in", 3, ((10, 12),))
    refs = images(tmp_path / "refs", 1, ((20, 20), (16, 24)))
    wide = np.random.default_rng(2).integers(0, 65536, (18, 22 * 3), dtype=np.uint16)
    png.from_array(wide, "RGB;16").save(str(refs / "r2.png"))  # a 16-bit reference: pypng's
    z_file = tmp_path / "z.npy"
    np.save(z_file, np.linspace(-1, 1, 8).astype(np.float32))
    runs = {"--ref": ("refvae", refs), "--latent-from": ("varsr", refs / "r0.png"),
            "--latent": ("varsr", z_file), "--latent-shift": ("refvae", z_file)}  # fmt: skip
    argv = {flag: [str(a) for a in ["--ckpt", ckpts[name], "--input", inp, flag, control,
                                    "--save-latent", "--out", tmp_path / flag]]
            for flag, (name, control) in runs.items()}  # fmt: skip
    got, _ = opens_per_run((refs, z_file), "sr_sample", argv)
    sha256 = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    for flag, (_, control) in runs.items():
        files = sorted(control.iterdir()) if control.is_dir() else [control]
        assert got[flag] == [0, {str(f): 1 for f in files}], flag
        manifest = json.loads((tmp_path / flag / "manifest.json").read_text())
        digests = " ".join(sha256(f.read_bytes()) for f in files)
        assert manifest["control_sha256"] == {flag: sha256(digests.encode())}, flag
    net = load_model(ckpts["refvae"])[0]  # the references read by path: the same latents
    cond = {"ref": [net.reference(to_tensor(read_image(f))) for f in sorted(refs.iterdir())]}
    lr = to_tensor(read_image(inp / "r0.png"))[None]
    z = net.latents(lr, 3, 1.0, NoiseSource([sample_seed(0, "r0", i) for i in range(3)]), **cond)
    for i in range(3):
        saved = np.load(tmp_path / "--ref" / f"r0_sample{i:05d}.latent.npz")["z0"]
        assert (saved == z[0, i].numpy()).all()


def test_style_statistics_use_the_unbiased_variance_as_the_released_code():
    # calc_mean_std of the released code: var over space with n − 1, plus 1e-5, square root.
    # 0, 1, 2, 3: mean 1.5, variance 5/3 (the biased 5/4 gave a style loss ~0.2% off at 64²)
    mean, std = style_stats(torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]))
    assert mean.item() == pytest.approx(1.5)
    assert std.item() == pytest.approx((5 / 3 + 1e-5) ** 0.5, rel=1e-6)


@pytest.mark.parametrize("target", ["ref", "hr"])
def test_a_style_map_of_one_position_is_a_one_line_error_not_nan(make_batch, target):
    # The unbiased std of one position is NaN: without the critic (which needs 16 px), an 8-px
    # HR patch at x8 put relu4_1 at 1x1 and every step was skipped for a NaN loss.
    net = model(scale=8, lambda_adv=0.0, lambda_fm=0.0, lambda_lpips=0.0, style_target=target)
    lr, hr = make_batch(8, h=1, w=1)
    with pytest.raises(UsageError, match=r"the style loss needs HR patches of at least 16 px, "
                       r"not 8x8.*--lambda-style 0"):  # fmt: skip
        net.train()(lr, hr)
    lr, hr = make_batch(8, h=1, w=2)  # relu4_1 1x2: two positions, finite
    assert torch.isfinite(net(lr, hr)["loss"])
    small_refs = model(scale=8, lambda_adv=0.0, lambda_fm=0.0, ref_size=8, style_target=target)
    lr, hr = make_batch(8, h=2, w=2)
    if target == "hr":  # references never reach the style loss
        assert torch.isfinite(small_refs.train()(lr, hr)["loss"])
    else:
        with pytest.raises(UsageError, match=r"--ref-size 8 .*: the style loss needs references of "
                           r"at least 16 px; or --lambda-style 0"):  # fmt: skip
            small_refs.train()(lr, hr)
    assert torch.isfinite(model(scale=8, lambda_adv=0.0, lambda_fm=0.0, ref_size=8,
                                lambda_style=0.0).train()(lr, hr)["loss"])  # fmt: skip


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_the_content_and_lpips_losses_take_the_least_patch(make_batch, scale):
    """`patch_needs` names the discriminator and the style loss, not the content loss (VGG19
    relu4_1, three halvings) nor LPIPS: the least HR patch the model takes (8 px, a multiple of
    8) gives their relu4_1 map 1x1 and LPIPS is padded to AlexNet's 32 px, so both are finite,
    gradients too, at every scale; no least patch of theirs to check."""
    net = model(scale=scale, lambda_adv=0.0, lambda_fm=0.0, lambda_style=0.0)
    assert net.patch_needs() == []
    lr, hr = make_batch(scale, h=8 // scale, w=8 // scale)
    out = net.train()(lr, hr)
    assert out["content"] > 0 and out["lpips"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
