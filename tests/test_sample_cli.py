"""sr_sample.py end to end: names, bicubic exactness, --from-hr, seeds, tiling, uncertainty, grid,
odd inputs and one-line errors with their exit codes, writing on threads. CPU, tiny images, a few
seconds."""

import hashlib
import json
import os
import signal
import subprocess
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import png
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, opens_per_run
from PIL import Image

import sr_eval
import sr_lib.data
import sr_sample
from sr_lib import config
from sr_lib.checkpoint import save_checkpoint
from sr_lib.data import (
    describe_path,
    read_image,
    read_planes,
    to_tensor,
    to_uint8,
    to_uint16,
    write_png,
)
from sr_lib.errors import DataError, OutputError
from sr_lib.models import MODELS, build_model, load_model
from sr_lib.models.base import SRModel, pad_to_multiple, sample_seed
from sr_lib.models.blocks import RegressionSR
from sr_lib.resize import imresize
from sr_lib.tiling import draw

SCALE = 2
REPO = Path(__file__).resolve().parents[1]


class Toy(SRModel):
    """Stochastic and pointwise in its noise: nearest upscale + temperature x three noise fields
    (quarter-LR, LR and HR resolution), so tiled sampling must reproduce it exactly."""

    stochastic = True
    lr_multiple = 4
    default_temperature = 0.5
    has_uncertainty = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    def forward(self, lr, hr):
        return {"loss": torch.zeros(())}

    def generate(self, lr, n, temperature, noise):
        b, _, h, w = lr.shape
        s = self.scale
        z = sum(
            F.interpolate(noise.field(3, h // f, w // f), scale_factor=s * f, mode="nearest")
            for f in (4, 1)
        )
        z = z + noise.field(3, h * s, w * s)
        sr = F.interpolate(lr, scale_factor=s, mode="nearest").unsqueeze(1)
        return sr + 0.1 * temperature * z.view(b, n, 3, h * s, w * s)

    def uncertainty(self, lr):
        h, w = lr.shape[-2:]
        x = F.interpolate(
            pad_to_multiple(lr, self.lr_multiple), scale_factor=self.scale, mode="nearest"
        )
        return (0.25 + 0.5 * x)[..., : h * self.scale, : w * self.scale]


def run(*argv) -> int:
    try:
        return sr_sample.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def image(shape, seed=0, dtype=np.uint8) -> np.ndarray:
    """A smooth random image (bilinear-enlarged noise), so networks see image-like input."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((1, 3, shape[0] // 4 + 2, shape[1] // 4 + 2)))
    big = F.interpolate(small, size=shape[:2], mode="bilinear", align_corners=False)[0]
    img = big.permute(1, 2, 0).numpy() * 0.8 + 0.2 * rng.random((*shape[:2], 3))
    top = 65535 if dtype == np.uint16 else 255
    return np.round(img * top).astype(dtype)


def folder(path, **images):
    path.mkdir(parents=True, exist_ok=True)
    for stem, img in images.items():
        iio.imwrite(path / f"{stem}.png", img)
    return path


def read(path) -> np.ndarray:
    """The pixels of an image file; a 16-bit PNG's exactly (pypng: Pillow truncates RGB ones)."""
    if Path(path).suffix == ".png" and png_kind(path)[0] == 16:
        w, h, rows, info = png.Reader(filename=str(path)).read()
        arr = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, -1)
        return arr[..., 0] if arr.shape[-1] == 1 else arr
    return iio.imread(path)


def pngs(path) -> list[str]:
    """The PNG files of a folder, sorted (manifest.json and ntire_index.json aside)."""
    return sorted(p.name for p in path.iterdir() if p.suffix == ".png")


def same(a, b) -> bool:
    return bool((read(a) == read(b)).all())


def png_kind(path) -> tuple[int, str]:
    """A PNG's bit depth and colour type, from its IHDR."""
    head = Path(path).read_bytes()[:26]
    return head[24], {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}[head[25]]


@pytest.fixture(scope="module")
def bicubic_ckpt(tmp_path_factory):
    import sr_train

    d = tmp_path_factory.mktemp("bicubic") / "run"
    args = ["--model", "bicubic", "--scale", SCALE, "--steps", 0, "--val-every", 0, "--out", d]
    assert sr_train.main([str(a) for a in args]) == 0
    return d / "last.pt"


@pytest.fixture
def toy_ckpt(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "toy", Toy)
    path = tmp_path / "toy.pt"
    save_checkpoint(
        path, {"model": "toy", "model_cfg": {"scale": SCALE}, "state_dict": {}, "step": 0}
    )
    return path


def edsr_ckpt(path, **cfg):
    """A tiny edsr with random weights (seeded by the conftest fixture)."""
    model_cfg = {**TINY["edsr"], "scale": SCALE, **cfg}
    net = build_model("edsr", model_cfg)
    save_checkpoint(
        path, {"model": "edsr", "model_cfg": model_cfg, "state_dict": net.state_dict(), "step": 0}
    )
    return path


def test_names_and_bicubic_values(tmp_path, bicubic_ckpt):
    lrs = {"b": image((12, 17), 1), "a": image((9, 10), 2)}
    inp = folder(tmp_path / "in", **lrs)
    assert run("--ckpt", bicubic_ckpt, "--input", inp, "--n", 3, "--out", tmp_path / "s") == 0
    assert pngs(tmp_path / "s") == [f"{s}_sample{i:05d}.png" for s in "ab" for i in range(3)]
    for stem, lr in lrs.items():
        want = np.round(np.clip(imresize(lr.astype(float), SCALE), 0, 255))
        for i in range(3):
            got = read(tmp_path / "s" / f"{stem}_sample{i:05d}.png").astype(float)
            assert got.shape == want.shape and np.abs(got - want).max() <= 1
    assert run("--ckpt", bicubic_ckpt, "--input", inp, "--n", 1, "--out", tmp_path / "one") == 0
    assert pngs(tmp_path / "one") == ["a.png", "b.png"]
    argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--layout", "ntire"]
    assert run(*argv, "--n", 2, "--out", tmp_path / "nt") == 0
    assert pngs(tmp_path / "nt") == [
        f"{k:06d}_sample{i:05d}.png" for k in range(2) for i in range(2)
    ]
    assert same(tmp_path / "nt" / "000000_sample00001.png", tmp_path / "s" / "a_sample00000.png")
    assert run(*argv, "--n", 1, "--out", tmp_path / "nt1") == 0
    assert pngs(tmp_path / "nt1") == ["000000.png", "000001.png"]


def test_a_deterministic_model_is_run_once_and_each_file_written_once(
    tmp_path, bicubic_ckpt, monkeypatch
):
    """--n 10 of a deterministic model (an NTIRE submission of a baseline): one output, 10 files."""
    drawn, encoded, written = [], [], []
    draw, encode, write = sr_sample.draw, sr_sample.encode_png, sr_sample.write_encoded_png
    monkeypatch.setattr(sr_sample, "draw", lambda m, lr, seeds, *a: drawn.append(len(seeds))
                        or draw(m, lr, seeds, *a))  # fmt: skip
    monkeypatch.setattr(sr_sample, "encode_png", lambda img: encoded.append(1) or encode(img))
    monkeypatch.setattr(sr_sample, "write_encoded_png", lambda path, data: written.append(
                        path.name) or write(path, data))  # fmt: skip
    inp = folder(tmp_path / "in", a=image((9, 10), 2))
    assert run("--ckpt", bicubic_ckpt, "--input", inp, "--n", 10, "--out", tmp_path / "s") == 0
    assert drawn == [1] and encoded == [1]
    assert sorted(written) == [f"a_sample{i:05d}.png" for i in range(10)]
    first = (tmp_path / "s" / "a_sample00000.png").read_bytes()
    assert all((tmp_path / "s" / f).read_bytes() == first for f in written)


class CountedStem(str):
    """A stem that counts its comparisons."""

    compared = 0

    def __eq__(self, other):
        CountedStem.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


class CountedPath(type(Path())):
    @property
    def stem(self):
        return CountedStem(super().stem)


@pytest.mark.parametrize("module, lister", [(sr_sample, "input_paths"), (sr_eval, "hr_images")])
def test_the_shared_stem_check_is_one_pass(tmp_path, monkeypatch, module, lister):
    # Counting each stem in the whole list compared every stem with every other: N^2 string
    # comparisons, 6 s before the first sample at 20,000 inputs (sr_eval.py: where one is shared).
    n = 400
    for k in range(n):
        (tmp_path / f"img{k:03d}.png").touch()
    (tmp_path / f"img{n - 1:03d}.jpg").touch()  # shares the last stem: the whole list is searched
    listed = module.list_images
    monkeypatch.setattr(module, "list_images",
                        lambda *a, **k: [CountedPath(p) for p in listed(*a, **k)])  # fmt: skip
    monkeypatch.setattr(CountedStem, "compared", 0)
    with pytest.raises(DataError, match=f"share the stem 'img{n - 1:03d}'"):
        getattr(module, lister)(tmp_path if module is sr_sample else str(tmp_path))
    assert CountedStem.compared < 10 * n  # N^2 = 160,000 before


def test_from_hr(tmp_path, bicubic_ckpt):
    hr = image((37, 45), 3)
    inp = folder(tmp_path / "hr", photo=hr)
    argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--from-hr", "--n", 1]
    assert run(*argv, "--out", tmp_path / "o") == 0
    lr = read(tmp_path / "o" / "lr" / "photo.png")
    assert (lr == imresize(hr[:32, :40], 1 / SCALE)).all()
    assert read(tmp_path / "o" / "photo.png").shape == (32, 40, 3)


def test_a_rerun_that_writes_only_a_missing_lr_file_samples_nothing(tmp_path, toy_ckpt, capsys):
    """A --from-hr rerun whose samples were complete but for OUT/lr/NAME.png wrote that file again
    and said the image was sampled ("photo.png 16x20 -> 2 x 32x40", --json's sampled 1): nothing
    was. Now it says what it wrote, and counts the image as complete. An empty OUT/lr/NAME.png
    (a node that crashed soon after its rename) was taken as complete: now written again."""
    inp = folder(tmp_path / "hr", photo=image((32, 40), 3))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--from-hr", "--n", 2, "--out", tmp_path / "o"]
    assert run(*argv) == 0
    lr = tmp_path / "o" / "lr" / "photo.png"
    samples = {f: (tmp_path / "o" / f).stat().st_mtime_ns for f in pngs(tmp_path / "o")}
    before = read(lr)
    lr.unlink()
    capsys.readouterr()
    assert run(*argv, "--json") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"[1/1] photo.png: samples complete, {lr} written again"), lines
    assert json.loads(lines[-1])["sampled"] == 0 and json.loads(lines[-1])["skipped"] == 1
    assert np.array_equal(read(lr), before)
    assert {f: (tmp_path / "o" / f).stat().st_mtime_ns for f in pngs(tmp_path / "o")} == samples
    lr.write_bytes(b"")  # a node that crashed after the rename: empty, as a sample is redone
    assert run(*argv, "--quiet") == 0
    assert lr.stat().st_size > 0 and np.array_equal(read(lr), before)


def test_cem_makes_any_model_lr_consistent(tmp_path, bicubic_ckpt, toy_ckpt):
    from sr_lib.metrics import psnr

    hr = image((48, 64), 5)
    inp = folder(tmp_path / "hr", photo=hr)
    for ckpt in (bicubic_ckpt, toy_ckpt):
        for flag in ([], ["--cem"]):
            out = tmp_path / f"{ckpt.stem}{len(flag)}"
            assert (
                run("--ckpt", ckpt, "--input", inp, "--from-hr", "--n", 2, "--out", out, *flag) == 0
            )
            lr = read(out / "lr" / "photo.png")
            sr = read(out / "photo_sample00001.png")
            lrpsnr = psnr(imresize(sr, 1 / SCALE), lr)
            # uint8 rounding of the saved PNG sets the ceiling; without CEM: ~bicubic level
            assert lrpsnr >= 50 if flag else lrpsnr < 50, (ckpt, flag, lrpsnr)


def test_seeds_do_not_depend_on_n_batch_or_other_files(tmp_path, toy_ckpt):
    inp = folder(tmp_path / "in", a=image((12, 16), 1), b=image((8, 8), 2))
    base = ["--ckpt", toy_ckpt, "--seed", 7]
    assert run(*base, "--input", inp, "--n", 4, "--batch", 4, "--out", tmp_path / "r1") == 0
    folder(inp, aa=image((8, 12), 3))  # sorts between a and b
    assert run(*base, "--input", inp, "--n", 6, "--batch", 1, "--out", tmp_path / "r2") == 0
    assert run(*base, "--input", inp / "a.png", "--n", 4, "--out", tmp_path / "r3") == 0
    for i in range(4):
        first = read(tmp_path / "r1" / f"a_sample{i:05d}.png")
        assert (first == read(tmp_path / "r2" / f"a_sample{i:05d}.png")).all()
        assert (first == read(tmp_path / "r3" / f"a_sample{i:05d}.png")).all()
    assert same(tmp_path / "r1" / "b_sample00003.png", tmp_path / "r2" / "b_sample00003.png")
    s0, s1 = (read(tmp_path / "r1" / f"a_sample{i:05d}.png") for i in range(2))
    assert (s0 != s1).any()  # different samples differ
    assert (
        run("--ckpt", toy_ckpt, "--seed", 8, "--input", inp, "--n", 1, "--out", tmp_path / "r4")
        == 0
    )
    assert (read(tmp_path / "r4" / "a_sample00000.png") != s0).any()
    assert run(*base, "--input", inp, "--n", 1, "--temperature", 0, "--out", tmp_path / "t0") == 0
    zero = read(tmp_path / "t0" / "a_sample00000.png")
    near = np.repeat(np.repeat(read(inp / "a.png"), SCALE, 0), SCALE, 1)
    assert (zero == near).all()


def files_of(path) -> dict:
    """Each file of a folder but manifest.json: its bytes and inode (a file written again by an
    atomic rename has another)."""
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(path.iterdir())
            if p.name != "manifest.json"}  # fmt: skip


def test_a_rerun_of_a_larger_n_adds_the_missing_samples_and_a_smaller_one_takes_the_first(
    tmp_path, toy_ckpt, capsys
):
    """--n 3 into a folder, then --n 5: sample i is seeded by (--seed, stem, i) alone, so the
    three there are the first three of a --n 5 run (byte for byte, --batch 2 below n, so they
    are drawn in other chunks), kept unwritten, and samples 3 and 4 are added; manifest.json's n
    is 5. A rerun of --n 2 then finds every image complete and leaves n at 5 (sr_eval.py scores
    at most n per image). Before, both reruns were refused ("n 3, not 5")."""
    inp = folder(tmp_path / "in", a=image((12, 16), 1), b=image((8, 8), 2))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--batch", 2, "--seed", 4, "--quiet"]
    out, fresh = tmp_path / "o", tmp_path / "fresh"
    assert run(*argv, "--n", 3, "--out", out) == 0
    assert run(*argv, "--n", 5, "--out", fresh) == 0
    three = files_of(out)
    assert {k: v[0] for k, v in three.items()} == {
        k: v[0] for k, v in files_of(fresh).items() if int(k[-9:-4]) < 3
    }
    assert run(*argv, "--n", 5, "--out", out) == 0
    assert {k: v[0] for k, v in files_of(out).items()} == {
        k: v[0] for k, v in files_of(fresh).items()
    }
    assert {k: files_of(out)[k] for k in three} == three  # not drawn nor written again
    assert json.loads((out / "manifest.json").read_text())["n"] == 5
    five = files_of(out)
    capsys.readouterr()
    assert run(*argv, "--n", 2, "--out", out) == 0
    assert "0 images sampled, 2 already complete" in capsys.readouterr().out
    assert files_of(out) == five and json.loads((out / "manifest.json").read_text())["n"] == 5
    assert len(sr_eval.find_samples(out, ["a", "b"], 5, SCALE)[0]) == 5


@pytest.mark.parametrize(
    "ckpt, flags, was, now, why",
    [
        ("bicubic", [], 1, 2, "at --n 1 each image's one output is NAME.png"),
        ("toy", ["--layout", "ntire"], 3, 1, "at --n 1 each image's one output is NAME.png"),
        ("toy", ["--grid"], 4, 2, "--grid's sheets of the images complete show the std of 4"),
    ],
)
def test_a_rerun_of_another_n_is_refused_where_it_changes_the_files(
    tmp_path, toy_ckpt, bicubic_ckpt, capsys, ckpt, flags, was, now, why
):
    """Another --n is refused, with its reason, where the files would not be one run's: at n 1
    one output per image is NAME.png (a deterministic model, --layout ntire), and --grid's sheet
    shows the std of all n samples (a larger n is taken: every image is then sampled again)."""
    ckpt = {"bicubic": bicubic_ckpt, "toy": toy_ckpt}[ckpt]
    inp = folder(tmp_path / "in", a=image((8, 8), 1))
    argv = ["--ckpt", ckpt, "--input", inp, "--out", tmp_path / "o", *flags]
    assert run(*argv, "--n", was) == 0
    before = files_of(tmp_path / "o")
    capsys.readouterr()
    assert run(*argv, "--n", now) == 2
    err = capsys.readouterr().err.strip()
    assert f"holds samples made with n {was}, not {now} ({why}" in err and "\n" not in err
    assert files_of(tmp_path / "o") == before
    if flags == ["--grid"]:
        assert run(*argv, "--n", 6) == 0
        assert run(*argv, "--n", 6, "--out", tmp_path / "fresh") == 0
        sheet = "a_grid.png"
        assert same(tmp_path / "o" / sheet, tmp_path / "fresh" / sheet)


def test_shards_of_other_n_and_a_requeue_with_another_n_stay_one_runs_samples(tmp_path, toy_ckpt):
    """An array whose tasks ran with --n 3 and --n 5 into one folder: manifest.json records 5,
    and sr_eval.py with N = 5 names the sample an image lacks. The --n 3 task requeued with
    --n 5 completes the folder to the bytes of one unsharded --n 5 run; the --n 5 task,
    preempted mid-image (its last samples missing) and requeued with --n 3, finds its images
    complete and writes nothing (n stays 5)."""
    inp = folder(tmp_path / "in", a=image((8, 12), 1), b=image((12, 8), 2), c=image((8, 8), 3))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--batch", 2, "--quiet", "--out"]
    out = tmp_path / "o"
    assert run(*argv, out, "--n", 3, "--shard", "0/2") == 0  # a, c
    assert run(*argv, out, "--n", 5, "--shard", "1/2") == 0  # b
    assert json.loads((out / "manifest.json").read_text())["n"] == 5
    with pytest.raises(DataError, match=r"a_sample00003\.png \(image a, sample 3 of N = 5\)"):
        sr_eval.find_samples(out, ["a", "b", "c"], 5, SCALE)
    for i in (3, 4):
        (out / f"b_sample{i:05d}.png").unlink()
    assert run(*argv, out, "--n", 3, "--shard", "1/2") == 0
    assert not (out / "b_sample00003.png").exists()
    assert json.loads((out / "manifest.json").read_text())["n"] == 5
    assert run(*argv, out, "--n", 5, "--shard", "0/2") == 0
    assert run(*argv, out, "--n", 5, "--shard", "1/2") == 0
    assert run(*argv, tmp_path / "whole", "--n", 5) == 0
    assert {k: v[0] for k, v in files_of(out).items()} == {
        k: v[0] for k, v in files_of(tmp_path / "whole").items()
    }


def test_a_run_of_complete_images_is_one_line_of_the_log(tmp_path, toy_ckpt, capsys):
    """A requeued job of 20,000 images printed a "complete, skipped" line for each image already
    done: one line now for each run of them, between the images it samples."""
    names = ["a", "b", "c", "d", "e"]
    inp = folder(tmp_path / "in", **{k: image((8, 8), i) for i, k in enumerate(names)})
    base = ["--ckpt", toy_ckpt, "--input", inp, "--n", 1, "--out", tmp_path / "o"]
    assert run(*base) == 0
    for k in ("c", "e"):
        (tmp_path / "o" / f"{k}_sample00000.png").unlink()
    capsys.readouterr()
    assert run(*base) == 0
    lines = [x.split(" in ")[0] for x in capsys.readouterr().out.splitlines()]  # (no times)
    assert lines[:4] == [
        "[2/5] 2 complete, skipped (a.png .. b.png)", "[3/5] c.png 8x8 -> 1 x 16x16",
        "[4/5] 1 complete, skipped (d.png)", "[5/5] e.png 8x8 -> 1 x 16x16",
    ]  # fmt: skip
    assert lines[4].startswith("done: 2 images sampled, 3 already complete"), lines


def test_out_in_the_input_folder_does_not_sample_its_samples(tmp_path, toy_ckpt, bicubic_ckpt,
                                                             capsys):  # fmt: skip
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 12), 2))
    made = ["a.png", "a_grid.png", "a_sample00000.png", "a_sample00001.png",
            "b.png", "b_grid.png", "b_sample00000.png", "b_sample00001.png"]  # fmt: skip
    for _ in range(2):  # the rerun finds its samples complete, and no new inputs among them
        assert run("--ckpt", toy_ckpt, "--input", inp, "--n", 2, "--grid", "--out", inp) == 0
        assert pngs(inp) == made
    assert "2 already complete" in capsys.readouterr().out
    # NTIRE numbers are left out too, and a sweep's T* folders are not listed (not recursive)
    ntire = folder(tmp_path / "nt", a=image((8, 8), 1))
    for _ in range(2):
        assert run("--ckpt", toy_ckpt, "--input", ntire, "--n", 1, "--layout", "ntire",
                   "--temperature", 0, 1, "--out", ntire) == 0  # fmt: skip
    assert pngs(ntire) == ["a.png"] and pngs(ntire / "T1") == ["000000.png"]
    # a deterministic model's one output, NAME.png, would be the input's own name: refused
    capsys.readouterr()
    one = folder(tmp_path / "one", a=image((8, 8), 1))
    assert run("--ckpt", bicubic_ckpt, "--input", one, "--n", 1, "--out", one) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the --input folder" in err[0] and pngs(one) == ["a.png"]


def test_an_output_that_links_to_an_input_is_not_a_sample(tmp_path, toy_ckpt, capsys):
    """A sample file that is a symbolic link (to the input image, say) was taken for a sample:
    the image was "complete, skipped" and never sampled. It is sampled now (the rename replaces
    the link, not the image it points at)."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1))
    before = (inp / "a.png").read_bytes()
    out = tmp_path / "o"
    out.mkdir()
    for i in range(2):
        (out / f"a_sample{i:05d}.png").symlink_to(inp / "a.png")
    assert run("--ckpt", toy_ckpt, "--input", inp, "--n", 2, "--out", out) == 0
    assert "complete, skipped" not in capsys.readouterr().out
    for i in range(2):
        sample = out / f"a_sample{i:05d}.png"
        assert not sample.is_symlink() and read(sample).shape == (16, 16, 3)
    assert (inp / "a.png").read_bytes() == before


def test_one_ntire_output_per_image_is_refused_in_the_input_folder(tmp_path, bicubic_ckpt, capsys):
    """A deterministic model's --layout ntire --n 1 output, 000000.png, in the --input folder was
    written, and became an input of the rerun that a preempted job makes, which then stopped
    (exit 2: it would write its own input). No name rule tells it from an input (datasets are
    numbered so too), so the first run is refused, before any work, as with NAME.png."""
    one = folder(tmp_path / "one", a=image((8, 8), 1), b=image((8, 12), 2))
    args = ["--ckpt", bicubic_ckpt, "--input", one, "--n", 1, "--layout", "ntire", "--out", one]
    assert run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the --input folder" in err[0] and "000000.png" in err[0], err
    assert pngs(one) == ["a.png", "b.png"]


def test_ntire_layout_at_n_1_writes_the_challenges_names(tmp_path, toy_ckpt):
    """The challenge's measure.py reads N = 1 as 000000.png, ..., N > 1 as 000000_sample00000.png.
    A stochastic model's --layout ntire --n 1 wrote 000000_sample00000.png, which it does not
    find; now 000000.png, as a deterministic model's, and sr_eval.py reads it back."""
    hr = folder(tmp_path / "hr", **{"10": image((32, 32), 1), "9": image((32, 40), 2)})
    sub = tmp_path / "sub"
    argv = ["--ckpt", toy_ckpt, "--input", hr, "--from-hr", "--layout", "ntire", "--out", sub]
    assert run(*argv, "--n", 1) == 0
    assert pngs(sub) == ["000000.png", "000001.png"]  # "10" sorts before "9"
    assert sr_eval.main(["--hr", str(hr), "--sr", str(sub), "--scale", str(SCALE), "--n", "1",
                         "--ntire", "--no-lpips"]) == 0  # fmt: skip
    assert run(*argv, "--n", 2, "--out", tmp_path / "two") == 0
    assert pngs(tmp_path / "two")[:2] == ["000000_sample00000.png", "000000_sample00001.png"]


def test_no_output_is_an_input(tmp_path, bicubic_ckpt, capsys):
    """--input FILE with --out its folder: a deterministic model's NAME.png is the input itself,
    taken as complete (nothing sampled, exit 0), and --overwrite replaced the input with its SR;
    --input OUT/lr --from-hr replaced each input with its own downscale. Now refused before any
    work, the inputs intact."""
    one = folder(tmp_path / "one", a=image((8, 8), 1))
    run_dir = tmp_path / "run"
    lr = folder(run_dir / "lr", a=image((16, 16), 2))
    before = read(one / "a.png"), read(lr / "a.png")
    cases = [
        (["--input", one / "a.png"], one, one / "a.png"),
        (["--input", one / "a.png", "--overwrite"], one, one / "a.png"),
        (["--input", lr, "--from-hr"], run_dir, lr / "a.png"),
    ]
    for argv, out, written in cases:
        assert run("--ckpt", bicubic_ckpt, "--n", 1, *argv, "--out", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"sr_sample.py: error: --out {out}: this run would write {written}, one of "
                       "its inputs, and replace it; use another --out"]  # fmt: skip
    assert np.array_equal(read(one / "a.png"), before[0])
    assert np.array_equal(read(lr / "a.png"), before[1]) and pngs(run_dir) == []


def test_the_checkpoint_is_opened_once_and_its_sha256_is_of_that_read(tmp_path):
    """--ckpt was opened twice: loaded for the model, then hashed again for manifest.json's
    checkpoint_sha256 (a raw state_dict three times: loaded as a checkpoint, loaded again as a
    state_dict, hashed); on a cluster's file system each read of a big file costs, and a file
    replaced between two reads was recorded under another's digest. One open now gives the
    model and the digest. (Counted by the interpreter's audit hook, in a process of its own: a
    hook cannot be removed; the two kinds of file one after the other there.)"""
    ckpts = {"checkpoint": edsr_ckpt(tmp_path / "model.pt"), "raw": tmp_path / "raw.pt"}
    # weights alone (the default config's, which a raw file with our key names is)
    torch.save(build_model("edsr", {"scale": SCALE}).state_dict(), ckpts["raw"])
    inp = folder(tmp_path / "in", a=image((8, 8)))
    argvs = {kind: ["--ckpt", str(ckpt), "--input", str(inp), "--out", str(tmp_path / kind)]
             for kind, ckpt in ckpts.items()}  # fmt: skip
    argvs["raw"] += ["--model", "edsr", "--scale", str(SCALE)]
    got, _ = opens_per_run(ckpts.values(), "sr_sample", argvs)
    for kind, ckpt in ckpts.items():
        assert got[kind] == [0, {str(ckpt): 1}], (kind, got)
        manifest = json.loads((tmp_path / kind / "manifest.json").read_text())
        assert manifest["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


@pytest.mark.parametrize("in_place", [False, True])
def test_a_rerun_looks_at_each_file_once(tmp_path, bicubic_ckpt, monkeypatch, in_place):
    """Every run, so every --shard of one, resolved each input path (Path.resolve: a call for
    every part of the path and one more, 100,000 file system calls at 20,000 inputs, in each of
    100 shards), and an --out that is the --input folder each output file too (a million). Now a
    rerun of complete images looks at each output once and at each input once: the file system
    calls grow by n + 1 an image, counted at k and 2k images."""
    calls = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(
            os, name, lambda p, *a, real=real, **kw: calls.append(p) or real(p, *a, **kw)
        )
    grew = []
    for k in (4, 8):
        inp = folder(tmp_path / f"in{k}", **{f"im {i} x": image((8, 8), i) for i in range(k)})
        out = inp if in_place else tmp_path / f"out{k}"
        argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--n", 3, "--out", out]
        assert run(*argv) == 0  # the first run writes the samples
        calls.clear()
        assert run(*argv) == 0  # the rerun finds them complete
        grew.append(len(calls))
    assert grew[1] - grew[0] <= 4 * (3 + 1), grew


def test_overwrite_removes_the_old_runs_files_of_its_images(tmp_path, toy_ckpt):
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 8), 2))
    out = tmp_path / "out"
    assert run("--ckpt", toy_ckpt, "--input", inp, "--n", 5, "--grid", "--out", out) == 0
    folder(out, a_notes=image((4, 4)), a_sample1=image((4, 4)))  # the user's, named alike
    (out / "a_sample00009.latent.npy").write_bytes(b"old")
    new = ["--ckpt", toy_ckpt, "--n", 2, "--seed", 3, "--overwrite", "--out", out]
    # (b not among --input: its old files under the new manifest, refused: test_overwrite_of_..)
    assert run(*new, "--input", inp) == 0
    assert pngs(out) == ["a_notes.png", "a_sample00000.png", "a_sample00001.png",
                         "a_sample1.png", "b_sample00000.png", "b_sample00001.png"]  # fmt: skip
    assert not (out / "a_sample00009.latent.npy").exists()
    assert run(*new[:-2], "--out", tmp_path / "fresh", "--input", inp / "a.png") == 0
    assert same(out / "a_sample00001.png", tmp_path / "fresh" / "a_sample00001.png")


@pytest.mark.parametrize("layout", ["stem", "ntire"])
def test_overwrite_of_a_part_of_the_folders_images_is_refused(tmp_path, toy_ckpt, layout,
                                                              capsys):  # fmt: skip
    """--overwrite with some of the folder's inputs left out of --input redid those given and
    kept the others' older samples (and --from-hr's lr/ files) under the manifest it wrote, as if
    this command's: the folder the work of two commands, its manifest saying one. Refused, one
    line naming them and what to do, before any file is deleted; with them all: redone."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 8), 2), c=image((8, 8), 3))
    out = tmp_path / "out"
    base = ["--ckpt", toy_ckpt, "--n", 2, "--from-hr", "--layout", layout, "--out", out]
    assert run(*base, "--input", inp) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "a.png").symlink_to(inp / "a.png")
    capsys.readouterr()
    assert run(*base, "--input", tmp_path / "some", "--seed", 1, "--overwrite") == 2
    names = "'000001', '000002'" if layout == "ntire" else "'b', 'c'"
    assert capsys.readouterr().err == (
        f"sr_sample.py: error: {out} holds the files of 2 image(s) not among --input ({names}): "
        "--overwrite redoes the images given, and theirs would stay under its manifest.json as "
        "this command's; delete or move them, give their inputs too, or use another --out (to "
        "redo some images with the folder's settings: delete their files and rerun without "
        "--overwrite)\n"
    )
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    if layout == "stem":  # their samples gone, --from-hr's lr/ files of them stay: said too
        for f in [*out.glob("b_*"), *out.glob("c_*")]:
            f.unlink()
        assert run(*base, "--input", tmp_path / "some", "--seed", 1, "--overwrite") == 2
        assert f"{out / 'lr'} holds the files of 2 image(s)" in capsys.readouterr().err
        (out / "lr" / "b.png").unlink()
        (out / "lr" / "c.png").unlink()
        assert run(*base, "--input", tmp_path / "some", "--seed", 1, "--overwrite") == 0
    else:
        assert run(*base, "--input", inp, "--seed", 1, "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["flags"]["seed"] == 1


def test_overwrite_at_n_1_takes_the_users_own_pngs_for_no_images_output(tmp_path, bicubic_ckpt,
                                                                          capsys):  # fmt: skip
    """At n 1 an image's one output is NAME.png: a user's own notes.png or figure_old.png there
    was taken for the output of an image 'notes' or 'figure_old' not among --input, and every
    --overwrite was refused. manifest.json now lists the NAMEs of every input the folder was
    sampled from (each run's added): a file that is no output of theirs is the user's, kept;
    those of inputs left out, dropped from --input by a rerun too, are refused still."""
    inp = folder(tmp_path / "in", figure=image((8, 8), 1), chart=image((8, 8), 2))
    some = folder(tmp_path / "some", figure=image((8, 8), 1))
    out = tmp_path / "out"
    base = ["--ckpt", bicubic_ckpt, "--n", 1, "--quiet", "--out", out]
    assert run(*base, "--input", inp) == 0
    folder(out, notes=image((4, 4), 3), figure_old=image((4, 4), 4))  # the user's
    mine = {f: (out / f).read_bytes() for f in ("notes.png", "figure_old.png")}
    assert run(*base, "--input", inp, "--overwrite") == 0
    assert run(*base, "--input", some) == 0  # (complete; its list recorded, chart's name kept)
    capsys.readouterr()
    assert run(*base, "--input", some, "--overwrite") == 2
    assert f"{out} holds the files of 1 image(s) not among --input ('chart')" in (
        capsys.readouterr().err)  # fmt: skip
    (out / "chart.png").unlink()
    assert run(*base, "--input", some, "--overwrite") == 0
    assert pngs(out) == ["figure.png", "figure_old.png", "notes.png"]
    assert {f: (out / f).read_bytes() for f in mine} == mine
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["names"] == ["figure"]
    del manifest["names"]  # a folder of an srspace that did not list them: each name an image's
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run(*base, "--input", some, "--overwrite") == 2
    assert "2 image(s) not among --input ('figure_old', 'notes')" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["stem", "ntire"])
def test_overwrite_from_hr_keeps_the_users_own_pngs_in_lr(tmp_path, bicubic_ckpt, layout, capsys):
    """--from-hr writes OUT/lr/STEM.png, and an --overwrite took every PNG in OUT/lr/ not of an
    input's stem for the LR file of an image not among --input: a user's own lr/notes.png
    refused every --overwrite, of all the inputs too. The stems of the runs' inputs, from the
    manifests' "names" (--layout ntire: ntire_index.json) of OUT and its T*/, decide now: the
    user's file is kept; the LR file of an input left out is refused still; a manifest without
    the list (an older srspace's; --layout ntire: no ntire_index.json): every name, as before."""
    inp = folder(tmp_path / "in", figure=image((8, 8), 1), chart=image((8, 8), 2))
    some = folder(tmp_path / "some", figure=image((8, 8), 1))
    out = tmp_path / "out"
    base = ["--ckpt", bicubic_ckpt, "--n", 1, "--from-hr", "--layout", layout, "--quiet",
            "--out", out]  # fmt: skip
    assert run(*base, "--input", inp) == 0
    folder(out / "lr", notes=image((4, 4), 3))  # the user's
    mine = (out / "lr" / "notes.png").read_bytes()
    assert run(*base, "--input", inp, "--overwrite") == 0
    capsys.readouterr()
    for f in [p for p in out.glob("*.png") if p.name != "000000.png"]:  # chart's, or 000001's
        if f.name.startswith(("chart", "000001")):
            f.unlink()
    assert run(*base, "--input", some, "--overwrite") == 2  # chart's lr/chart.png: refused
    assert f"{out / 'lr'} holds the files of 1 image(s) not among --input ('chart')" in (
        capsys.readouterr().err)  # fmt: skip
    (out / "lr" / "chart.png").unlink()
    assert run(*base, "--input", some, "--overwrite") == 0
    assert (out / "lr" / "notes.png").read_bytes() == mine
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["names"]  # an older srspace's: every name an image's
    (out / "manifest.json").write_text(json.dumps(manifest))
    if layout == "ntire":  # (its stems: ntire_index.json's, gone)
        (out / "ntire_index.json").unlink()
    assert run(*base, "--input", some, "--overwrite") == 2
    assert f"{out / 'lr'} holds the files of 1 image(s) not among --input ('notes')" in (
        capsys.readouterr().err)  # fmt: skip


def test_overwrite_of_a_from_hr_sweep_keeps_the_users_own_png_in_lr(tmp_path, toy_ckpt):
    """A sweep's OUT/lr/ is shared by its T*/: the stems of its inputs are its T*/ manifests'
    "names" (OUT has none). The user's lr/notes.png refused its --overwrite; kept now, and the
    LR file of an input dropped from --input refused still."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 8), 2))
    out = tmp_path / "out"
    base = ["--ckpt", toy_ckpt, "--n", 1, "--from-hr", "--temperature", 0.5, 1, "--quiet",
            "--out", out]  # fmt: skip
    assert run(*base, "--input", inp) == 0
    folder(out / "lr", notes=image((4, 4), 3))  # the user's
    assert run(*base, "--input", inp, "--overwrite", "--seed", 1) == 0
    assert pngs(out / "lr") == ["a.png", "b.png", "notes.png"]
    for f in out.glob("T*/b_*"):
        f.unlink()
    (inp / "b.png").unlink()
    assert run(*base, "--input", inp, "--overwrite") == 2  # lr/b.png: b's, not among --input


def test_overwrite_of_a_sweep_over_a_one_temperature_folder_and_back_is_refused(tmp_path, toy_ckpt,
                                                                               capsys):  # fmt: skip
    """A sweep writes into OUT/T{t}, one temperature into OUT: --overwrite of a sweep left an
    earlier one-temperature run's samples at OUT's top (and a one-temperature --overwrite a
    sweep's T*/), exit 0, sr_eval --sr OUT then scoring the old run as a row of its own. Refused
    before any file is deleted; without --overwrite the two kinds share --out as before."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 8), 2))
    out, sweep = tmp_path / "out", ["--temperature", 0.5, 1]
    base = ["--ckpt", toy_ckpt, "--input", inp, "--n", 2, "--quiet", "--out", out]
    assert run(*base) == 0
    assert run(*base, *sweep) == 0  # (both kinds: each its own manifest.json)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert run(*base, *sweep, "--overwrite", "--seed", 1) == 2
    assert capsys.readouterr().err == (
        f"sr_sample.py: error: --out {out} holds a one-temperature run's manifest.json and 4 "
        "files of its samples (a_sample00000.png, a_sample00001.png, b_sample00000.png, and 1 "
        "more): --overwrite redoes the sweep folders T*, and those would stay beside them "
        "(sr_eval --sr: a row of their own); delete or move them, or use another --out\n"
    )
    assert run(*base, "--overwrite", "--seed", 1) == 2
    assert capsys.readouterr().err == (
        f"sr_sample.py: error: --out {out} holds the folders of a --temperature sweep (T0.5/, "
        "T1/): --overwrite redoes the files at its top, and those would stay beside them "
        "(sr_eval --sr: a row of their own); delete or move them, or use another --out\n"
    )
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    for f in [*out.glob("*.png"), out / "manifest.json"]:
        f.unlink()
    assert run(*base, *sweep, "--overwrite", "--seed", 1) == 0
    assert json.loads((out / "T1" / "manifest.json").read_text())["flags"]["seed"] == 1


def test_a_sweep_names_its_own_folders_not_every_t_folder_of_out(tmp_path, toy_ckpt, capsys):
    """A sweep's closing line said `-> OUT/T*` and --json's `out` "OUT/T*": after an --overwrite
    of some temperatures, or a sweep that adds some, that named the other temperatures' T*/ too,
    which stay (each its own manifest.json, its own sr_eval row) and which this run did not
    make. Now the run's folders alone: OUT/T{0.5,0.9} (bash expands it), --json's `folders`
    (`out` stays the --out folder, a string, as for one temperature)."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1))
    out = tmp_path / "out"
    base = ["--ckpt", toy_ckpt, "--input", inp, "--n", 1, "--quiet", "--out", out]
    assert run(*base, "--temperature", 0.5, 1) == 0
    assert capsys.readouterr().out.endswith(f" -> {out}/T{{0.5,1}}\n")
    kept = (out / "T1" / "a_sample00000.png").read_bytes()
    assert run(*base, "--temperature", 0.5, 0.9, "--overwrite", "--seed", 1, "--json") == 0
    said = json.loads(capsys.readouterr().out)
    assert said["folders"] == [str(out / "T0.5"), str(out / "T0.9")] and said["sampled"] == 1
    assert said["out"] == str(out)
    assert run(*base, "--temperature", 0.5, "--json") == 0
    said = json.loads(capsys.readouterr().out)
    assert said["out"] == str(out) and said["folders"] == [str(out)]
    assert (out / "T1" / "a_sample00000.png").read_bytes() == kept  # (another run's: it stays)
    assert json.loads((out / "T1" / "manifest.json").read_text())["flags"]["seed"] == 0


def test_a_sweeps_closing_line_pastes_back_into_bash_for_any_out(tmp_path, toy_ckpt, capsys):
    """`-> OUT/T{0.5,1}` expanded in bash only where OUT held no space, comma or brace (the
    word split, its braces taken apart): OUT is quoted for a shell now, the braces not."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1))
    out = tmp_path / "my out,{x}"
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 1, "--quiet", "--out", out]
    assert run(*argv, "--temperature", 0.5, 1) == 0
    said = capsys.readouterr().out.strip().split(" -> ", 1)[1]
    assert said == f"'{out}'/T{{0.5,1}}"
    listed = subprocess.run(["bash", "-c", f"ls -d {said}"], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.splitlines() == [f"{out}/T0.5", f"{out}/T1"]


def test_overwrite_in_one_shard_keeps_another_inputs_file_of_the_name(tmp_path, toy_ckpt):
    """--overwrite deletes NAME.png of its images (an earlier --n 1 run's), and x_grid.png, the
    NAME.png of an input x_grid, is also the --grid sheet of the input x: the shard of x_grid
    deleted the sheet the shard of x had written, x incomplete without a word. Kept now."""
    inp = folder(tmp_path / "in", x=image((8, 8), 1), x_grid=image((8, 8), 2))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 2, "--grid", "--out", tmp_path / "o"]
    assert run(*argv, "--shard", "0/2") == 0  # x
    assert run(*argv, "--shard", "1/2", "--overwrite") == 0  # x_grid
    x = ["x_grid.png", "x_sample00000.png", "x_sample00001.png"]
    assert pngs(tmp_path / "o") == sorted(x + ["x_grid_grid.png", "x_grid_sample00000.png",
                                               "x_grid_sample00001.png"])  # fmt: skip


def test_overwrite_in_one_shard_keeps_the_one_output_of_another_shards_input(
    tmp_path, bicubic_ckpt
):
    """The reverse: a deterministic model's --n 1 writes cat_grid.png for the input cat_grid and
    cat_sample00000.png for cat_sample00000; --overwrite in the shard of cat deleted both (the
    names of cat's --grid sheet and sample 0), exit 0, two images lost without a word. Kept."""
    inp = folder(tmp_path / "in", cat=image((8, 8), 1), cat_grid=image((8, 8), 2),
                 cat_sample00000=image((8, 8), 3))  # fmt: skip
    argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--n", 1, "--out", tmp_path / "o"]
    assert run(*argv) == 0
    written = {f: (tmp_path / "o" / f).read_bytes() for f in pngs(tmp_path / "o")}
    assert sorted(written) == ["cat.png", "cat_grid.png", "cat_sample00000.png"]
    assert run(*argv, "--shard", "0/3", "--overwrite") == 0  # cat
    assert {f: (tmp_path / "o" / f).read_bytes() for f in pngs(tmp_path / "o")} == written


def test_tiling_stochastic_is_exact(tmp_path, toy_ckpt):
    inp = folder(tmp_path / "in", a=image((45, 38), 4))  # odd sizes: padded to lr_multiple 4
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 3, "--batch", 2]
    assert run(*argv, "--out", tmp_path / "full") == 0
    assert run(*argv, "--tile", 16, "--tile-overlap", 6, "--out", tmp_path / "tiled") == 0
    for i in range(3):
        name = f"a_sample{i:05d}.png"
        assert (read(tmp_path / "full" / name) == read(tmp_path / "tiled" / name)).all()
    # the tensors themselves, not only after rounding
    model = Toy(Toy.Config(scale=SCALE))
    lr = torch.rand(1, 3, 45, 38)
    full = draw(model, lr, [1, 2, 3], 1.0, 0, 0)
    tiled = draw(model, lr, [1, 2, 3], 1.0, 20, 8)
    assert full.shape == (3, 3, 90, 76) and (tiled - full).abs().max() <= 1e-6


def test_tiling_deterministic_default_overlap(tmp_path):
    ckpt = edsr_ckpt(tmp_path / "edsr.pt")
    inp = folder(tmp_path / "in", a=image((48, 80), 5))
    argv = ["--ckpt", ckpt, "--input", inp, "--n", 1, "--tile", 40]
    assert run(*argv[:-2], "--out", tmp_path / "full") == 0
    assert run(*argv, "--out", tmp_path / "tiled") == 0  # default overlap 32
    assert run(*argv, "--tile-overlap", 0, "--out", tmp_path / "cut") == 0  # hard seam at x = 40
    full, tiled, cut = (read(tmp_path / d / "a.png") / 255 for d in ("full", "tiled", "cut"))
    assert full.shape == (96, 160, 3) and np.abs(full - tiled).mean() <= 1e-4
    assert np.abs(full - cut).mean() > 1e-4  # the test can see a seam


def test_a_tile_larger_than_the_image_is_exact_whatever_its_overlap(tmp_path, monkeypatch):
    """--tile at least the image's size samples it whole: exact, whatever --tile-overlap. The
    manifest recorded such a run as inexact tiles (as --tile 64 --tile-overlap 1 on a larger
    image), and refused it in a folder of untiled samples, and the reverse. An out-of-memory
    retry in smaller tiles then takes the model's exact context, so the folder stays exact. (The
    manifest records the flags' tiles; the inputs' sizes are read where a rerun's differ.)"""
    ckpt = edsr_ckpt(tmp_path / "edsr.pt")  # a context of 6 LR px makes its tiles exact
    inp = folder(tmp_path / "in", a=image((20, 60), 5))
    argv = ["--ckpt", ckpt, "--input", inp, "--n", 1]
    tiled = [*argv, "--tile", 64, "--tile-overlap", 1]
    assert run(*argv, "--out", tmp_path / "full") == 0
    assert run(*tiled, "--out", tmp_path / "one") == 0
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["tile_context"] == [64, 1]
    assert same(tmp_path / "full" / "a.png", tmp_path / "one" / "a.png")
    assert run(*tiled, "--out", tmp_path / "full") == 0  # the same samples: the same folder
    assert run(*argv, "--out", tmp_path / "one") == 0
    out_of_memory_above(44, RegressionSR, monkeypatch)  # tiles of 32 + 6 px of context fit
    assert run(*tiled, "--out", tmp_path / "oom") == 0
    full, oom = (read(tmp_path / d / "a.png") / 255 for d in ("full", "oom"))
    assert np.abs(full - oom).mean() <= 1e-4  # 1 px of context: a seam at x = 32


def test_a_folder_of_tiles_that_cut_no_sampled_image_takes_a_rerun_of_other_tiles(tmp_path):
    """A folder begun with --tile 64 --tile-overlap 1 whose every input fitted one tile records
    [64, 1]; an untiled rerun with a new, larger input was refused ("holds samples made with
    --tile 64 ..."), though every sample there is the untiled one. The folder's tiles are judged
    by the images sampled there (their samples' sizes), the run's by its inputs: allowed, the
    run's tiles recorded. Where a sample was cut (or the run would cut an image that the
    folder's tiles did not), the two settings differ: refused, in both directions."""
    ckpt = edsr_ckpt(tmp_path / "edsr.pt")  # a context of 6 LR px makes its tiles exact
    inp = folder(tmp_path / "in", a=image((20, 60), 5))
    argv = ["--ckpt", ckpt, "--input", inp, "--n", 1]
    tiled = ["--tile", 64, "--tile-overlap", 1]
    assert run(*argv, *tiled, "--out", tmp_path / "o") == 0
    assert run(*argv, "--out", tmp_path / "full") == 0
    folder(inp, b=image((20, 100), 6))  # wider than a tile
    assert run(*argv, "--out", tmp_path / "o") == 0  # a: exact already; b: untiled
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["tile_context"] == 0 and manifest["flags"]["tile"] == 0
    assert run(*argv, "--out", tmp_path / "full") == 0
    assert all(same(tmp_path / "full" / f, tmp_path / "o" / f) for f in ("a.png", "b.png"))
    # b's samples are untiled now: tiles that would cut a new image are refused
    folder(inp, c=image((20, 30), 7))
    assert run(*argv, *tiled, "--out", tmp_path / "o") == 2
    # a folder of b cut by those tiles: an untiled rerun is refused while b is an input; without
    # it, the run's samples (of a and c, one tile each) are the folder's tiles' (kept recorded),
    # but not those of a new image the tiles would cut
    assert run(*argv, *tiled, "--out", tmp_path / "cut") == 0
    assert run(*argv, "--out", tmp_path / "cut") == 2
    (tmp_path / "in" / "b.png").unlink()
    folder(inp, e=image((20, 40), 9))
    assert run(*argv, "--out", tmp_path / "cut") == 0
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["tile_context"] == [64, 1]
    folder(inp, f=image((20, 100), 10))
    assert run(*argv, "--out", tmp_path / "cut") == 2
    # the reverse: an untiled folder of images that fit a tile takes tiles that cut a new one,
    # its samples those tiles' (recorded), and then refuses an untiled rerun
    small = folder(tmp_path / "small", a=image((20, 60), 5))
    argv[3] = small
    assert run(*argv, "--out", tmp_path / "u") == 0
    folder(small, d=image((20, 100), 8))
    assert run(*argv, *tiled, "--out", tmp_path / "u") == 0
    assert json.loads((tmp_path / "u" / "manifest.json").read_text())["tile_context"] == [64, 1]
    assert run(*argv, "--out", tmp_path / "u") == 2


def test_a_shard_of_inexact_tiles_reads_no_inputs_header(tmp_path, monkeypatch):
    """--tile with a context below the exact one read the header of every input of every shard
    (whether the tile held them all whole, for manifest.json), 20,000 files in each of 100
    array tasks, and an input of another shard whose header is corrupt made its record inexact.
    Now the manifest records the flags' tiles, and a shard reads no header at start."""
    ckpt = edsr_ckpt(tmp_path / "edsr.pt")  # a context of 6 LR px makes its tiles exact
    inp = folder(tmp_path / "in", **{stem: image((20, 60), k) for k, stem in enumerate("abcd")})
    (inp / "e.png").write_bytes(b"not a png")  # of shard 0/2 (a, c, e)
    read = []
    size = sr_sample.image_size
    monkeypatch.setattr(sr_sample, "image_size", lambda p: read.append(p.name) or size(p))
    argv = ["--ckpt", ckpt, "--input", inp, "--n", 1, "--shard", "1/2"]
    assert run(*argv, "--tile", 64, "--tile-overlap", 1, "--out", tmp_path / "tiled") == 0
    assert read == []
    manifest = json.loads((tmp_path / "tiled" / "manifest.json").read_text())
    assert manifest["tile_context"] == [64, 1]
    assert run(*argv, "--out", tmp_path / "full") == 0
    assert pngs(tmp_path / "tiled") == pngs(tmp_path / "full") == ["b.png", "d.png"]
    assert all(same(tmp_path / "full" / f, tmp_path / "tiled" / f) for f in ("b.png", "d.png"))


def test_tile_overlap_without_tile_is_unused_with_one_warning(tmp_path, monkeypatch, capsys):
    """--tile-overlap without --tile set, unsaid, the context of an out-of-memory retry's tiles:
    a small one made that image's samples differ from the untiled ones, in a folder recorded as
    untiled (exact). Each image is sampled whole, the retry takes the exact context, and one
    warning line says that --tile-overlap goes with --tile."""
    ckpt = edsr_ckpt(tmp_path / "edsr.pt")  # a context of 6 LR px makes its tiles exact
    inp = folder(tmp_path / "in", a=image((20, 60), 5))
    argv = ["--ckpt", ckpt, "--input", inp, "--n", 1]
    assert run(*argv, "--out", tmp_path / "full") == 0
    capsys.readouterr()
    out_of_memory_above(44, RegressionSR, monkeypatch)  # tiles of 30 + 6 px of context fit
    assert run(*argv, "--tile-overlap", 1, "--out", tmp_path / "oom") == 0
    assert capsys.readouterr().err.splitlines() == [
        "sr_sample.py: warning: --tile-overlap 1 without --tile: each image is sampled whole; "
        "it is the context of --tile's tiles (a CUDA out-of-memory retry's tiles take the "
        "model's exact one)"
    ]
    assert json.loads((tmp_path / "oom" / "manifest.json").read_text())["tile_context"] == 0
    full, oom = (read(tmp_path / d / "a.png") / 255 for d in ("full", "oom"))
    assert np.abs(full - oom).mean() <= 1e-4  # 1 px of context: a seam at x = 30


def out_of_memory_above(width, cls, monkeypatch):
    """cls.generate raises CUDA's out-of-memory error for an LR (a tile) wider than `width`."""
    monkeypatch.setattr(sr_sample, "OOM_MIN_TILE", 8)
    generate = cls.generate

    def small_only(self, lr, *args, **kwargs):
        if lr.shape[-1] > width:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(self, lr, *args, **kwargs)

    monkeypatch.setattr(cls, "generate", small_only)


def test_cuda_oom_retries_in_tiles(tmp_path, toy_ckpt, monkeypatch, capsys):
    monkeypatch.setattr(Toy, "tile_halo", 0)  # pointwise: exact tiles need no context
    inp = folder(tmp_path / "in", a=image((24, 40), 6))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 2]
    assert run(*argv, "--out", tmp_path / "full") == 0
    out_of_memory_above(16, Toy, monkeypatch)  # tiles of 20 do not fit, of 10 (8: rounded) do
    assert run(*argv, "--out", tmp_path / "oom") == 0
    assert "a: CUDA out of memory; retrying with --tile 10" in capsys.readouterr().out
    for i in range(2):
        name = f"a_sample{i:05d}.png"
        assert (read(tmp_path / "full" / name) == read(tmp_path / "oom" / name)).all()
    monkeypatch.setattr(sr_sample, "OOM_MIN_TILE", 32)
    assert run(*argv, "--out", tmp_path / "oom2") == 4
    assert capsys.readouterr().err.strip().startswith("sr_sample.py: error: out of memory")


def test_uncertainty_files(tmp_path):
    ckpt = edsr_ckpt(tmp_path / "edsr_le.pt", loss="le", le_sigma_feats=8)
    inp = folder(tmp_path / "in", a=image((30, 37), 7))
    argv = ["--ckpt", ckpt, "--input", inp, "--n", 1, "--save-uncertainty"]
    assert run(*argv, "--out", tmp_path / "u") == 0
    png, npy = read(tmp_path / "u" / "a_sigma.png"), np.load(tmp_path / "u" / "a_sigma.npy")
    assert png.dtype == np.uint16 and png.shape == (60, 74)
    assert npy.dtype == np.float32 and npy.shape == (3, 60, 74)
    want = np.round(np.clip(npy.mean(0), 0, 1) * 65535)
    assert np.abs(png - want).max() <= 1
    assert run(*argv, "--tile", 16, "--out", tmp_path / "ut") == 0  # the σ branch's context too
    assert np.abs(np.load(tmp_path / "ut" / "a_sigma.npy") - npy).max() < 1e-5


def test_nan_uncertainty_stops_with_one_line(tmp_path, capsys):
    """A σ branch that gives NaN (the samples themselves finite) stops with exit 5 before any
    file of that image is written, instead of a black NAME_sigma.png."""
    path = tmp_path / "edsr_le.pt"
    edsr_ckpt(path, loss="le", le_sigma_feats=8)
    ck = torch.load(path, weights_only=True)
    bias = [k for k in ck["state_dict"] if k.startswith("sigma.") and k.endswith("bias")][-1]
    ck["state_dict"][bias][0] = float("nan")
    save_checkpoint(path, ck)
    inp = folder(tmp_path / "in", a=image((12, 12), 7))
    argv = ["--ckpt", path, "--input", inp, "--n", 1, "--save-uncertainty"]
    assert run(*argv, "--out", tmp_path / "u") == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sr_sample.py: error: a: the uncertainty map has NaN pixels, not written; "
                   "the checkpoint's σ branch gives NaN"]  # fmt: skip
    assert pngs(tmp_path / "u") == []


def test_no_uncertainty_warns(tmp_path, bicubic_ckpt, capsys):
    inp = folder(tmp_path / "in", a=image((8, 8), 1))
    argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--n", 1, "--save-uncertainty"]
    assert run(*argv, "--out", tmp_path / "o") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this bicubic model has no uncertainty output" in err[0]
    assert "--loss le" in err[0]  # (what gives one)
    assert pngs(tmp_path / "o") == ["a.png"]


def test_grid(tmp_path, toy_ckpt):
    inp = folder(tmp_path / "in", a=image((10, 13), 8))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 3, "--grid", "--layout", "ntire"]
    assert run(*argv, "--out", tmp_path / "g") == 0
    sheet = read(tmp_path / "g" / "000000_grid.png")
    label = sr_sample.LABEL_HEIGHT
    assert sheet.shape == (label + 20, 26 * (1 + 3 + 1 + 1), 3)  # LR, 3 samples, std, sigma
    assert (sheet[label:, 26:52] == read(tmp_path / "g" / "000000_sample00000.png")).all()
    strips = [sheet[:label, 26 * k : 26 * (k + 1)] for k in range(6)]
    assert all(strip.max() > 200 for strip in strips)  # every panel has its (white) label
    assert len({strip.tobytes() for strip in strips}) == 6  # LR, sample 0..2, std, sigma


def test_a_grid_of_many_samples_shows_the_first_16_and_the_std_of_all(tmp_path, toy_ckpt):
    """--n 20 --grid: a sheet of every sample would hold all n in memory (--n 200 of a 512² LR:
    GBs); it shows GRID_SAMPLES, and the std panel is still that of all n samples."""
    inp = folder(tmp_path / "in", a=image((10, 13), 8))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 20, "--batch", 3, "--grid"]
    assert run(*argv, "--out", tmp_path / "g") == 0
    sheet = read(tmp_path / "g" / "a_grid.png")
    label, k = sr_sample.LABEL_HEIGHT, sr_sample.GRID_SAMPLES
    assert k == 16 and sheet.shape == (label + 20, 26 * (1 + k + 1 + 1), 3)  # LR, 16, std, sigma
    assert (
        sheet[label:, 26 * k : 26 * (k + 1)] == read(tmp_path / "g" / "a_sample00015.png")
    ).all()
    srs = np.stack([read(tmp_path / "g" / f"a_sample{i:05d}.png") for i in range(20)])
    std = sr_sample.heat(srs.astype(np.float64).std(0).mean(-1)).astype(int)
    assert np.abs(sheet[label:, 26 * (k + 1) : 26 * (k + 2)] - std).max() <= 1


def test_grid_of_a_deterministic_model_has_no_std_panel(tmp_path, bicubic_ckpt):
    inp = folder(tmp_path / "in", a=image((10, 13), 8))
    assert run("--ckpt", bicubic_ckpt, "--input", inp, "--n", 1, "--grid",
               "--out", tmp_path / "g") == 0  # fmt: skip
    sheet = read(tmp_path / "g" / "a_grid.png")
    assert sheet.shape == (sr_sample.LABEL_HEIGHT + 10 * SCALE, 2 * 13 * SCALE, 3)  # LR, sample


def test_odd_inputs(tmp_path, bicubic_ckpt):
    inp = tmp_path / "in"
    inp.mkdir()
    iio.imwrite(inp / "gray.png", image((9, 11), 1)[..., 0])
    iio.imwrite(inp / "rgba.png", np.dstack([image((7, 5), 2), np.full((7, 5), 128, np.uint8)]))
    write_png(inp / "deep.png", image((6, 13), 3, np.uint16))  # 16-bit RGB
    write_png(inp / "deep_gray.png", image((5, 4), 3, np.uint16)[..., 0])
    iio.imwrite(inp / "photo.jpg", image((11, 3), 4))
    assert run("--ckpt", bicubic_ckpt, "--input", inp, "--n", 1, "--out", tmp_path / "o") == 0
    for stem, (h, w), kind in [
        ("gray", (9, 11), "L"), ("rgba", (7, 5), "RGBA"), ("deep", (6, 13), "RGB"),
        ("deep_gray", (5, 4), "L"), ("photo", (11, 3), "RGB"),
    ]:  # fmt: skip
        c = len(kind)
        assert (
            read(tmp_path / "o" / f"{stem}.png").shape == (h * SCALE, w * SCALE, c)[: 2 + (c > 1)]
        )
        assert png_kind(tmp_path / "o" / f"{stem}.png") == (8, kind)


def test_unreadable_among_good(tmp_path, bicubic_ckpt, capsys):
    inp = folder(tmp_path / "in", a=image((8, 8), 1), c=image((8, 8), 2))
    (inp / "b.png").write_text("not an image")
    with pytest.raises(SystemExit) as e:
        argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--n", 2, "--out", tmp_path / "o"]
        sr_sample.main([str(a) for a in argv])
    assert e.value.code == 3
    assert pngs(tmp_path / "o") == [f"{stem}_sample{i:05d}.png" for stem in "ac" for i in range(2)]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("sr_sample.py: error: ") for line in err)
    assert "b.png" in err[0] and "1 of 3" in err[1]


def test_too_small_and_unreadable_inputs_are_told_apart(tmp_path, bicubic_ckpt, capsys):
    """An HR too small for --from-hr to downscale was called "unreadable" in the end summary; a
    link to a missing image was skipped without a word (now: a warning, and said at the end)."""
    inp = folder(tmp_path / "in", a=image((16, 16), 1), tiny=image((4, 4), 2))
    (inp / "b.png").write_text("not an image")
    (inp / "gone.png").symlink_to(tmp_path / "moved.png")
    argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--from-hr", "--n", 1, "--out", tmp_path / "o"]
    with pytest.warns(UserWarning, match=r"in: skipped 1 symbolic link.s. .*gone.png -> .*moved"):
        assert run(*argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "sr_sample.py: error: 1 of 3 inputs unreadable (b.png); 1 of 3 inputs too small to "
        "downscale (under 8 px) (tiny.png); 1 symbolic link(s) to missing files in --input, not "
        f"sampled (gone.png -> {tmp_path / 'moved.png'}): restore their targets and rerun, or "
        f"remove the links; the others were written to {tmp_path / 'o'}"
    )
    assert len(err) == 3 and "tiny.png: smaller than 8 px" in err[1]
    (inp / "a.png").unlink()  # no image left to write: the line says so
    (inp / "gone.png").unlink()
    assert run(*argv[:-1], tmp_path / "none") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("(tiny.png); nothing was written"), err[-1]


def test_a_link_to_a_missing_input_is_exit_3_once_the_others_are_sampled(tmp_path, bicubic_ckpt,
                                                                         capsys):  # fmt: skip
    """A symbolic link to a missing file in the --input folder was one warning line and exit 0:
    a batch pipeline took every image of the folder as sampled. Now the others are sampled, then
    one line names the links, exit 3 (as for an unreadable input), in every --shard: the links
    are in no shard's images (the folder lists them as no image, as sr_eval.py lists it). Once
    they are removed, a rerun is exit 0 and samples nothing again."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1), c=image((8, 8), 2))
    for stem in "bde":
        (inp / f"{stem}.png").symlink_to(tmp_path / "moved" / f"{stem}.png")
    out = tmp_path / "o"
    argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--n", 1, "--quiet", "--out", out]
    moved = tmp_path / "moved"
    said = (f"sr_sample.py: error: 3 symbolic link(s) to missing files in --input, not sampled "
            f"(b.png -> {moved / 'b.png'}, d.png -> {moved / 'd.png'}, e.png -> "
            f"{moved / 'e.png'}): restore their targets and rerun, or remove the links; the "
            "others ")  # fmt: skip
    with pytest.warns(UserWarning, match="in: skipped 3 symbolic link"):
        assert run(*argv) == 3
    assert capsys.readouterr().err.splitlines() == [f"{said}were written to {out}"]
    assert pngs(out) == ["a.png", "c.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["count"] == 2  # (every image of the list sampled: recorded)
    for shard in ("0/2", "1/2"):
        with pytest.warns(UserWarning, match="in: skipped 3 symbolic link"):
            assert run(*argv, "--shard", shard) == 3
        assert capsys.readouterr().err.splitlines() == [f"{said}were already complete in {out}"]
    for stem in "bde":
        (inp / f"{stem}.png").unlink()
    assert run(*argv) == 0 and pngs(out) == ["a.png", "c.png"]


def test_the_line_of_links_to_missing_inputs_names_each_target(tmp_path, bicubic_ckpt, capsys):
    """The end's line named the target of the first link only, and an --input FILE that is a
    link to a missing file said "no such file or folder", as for a typo. Now each link is named
    with its target (the first three, then how many more), quoted where a name needs it, and
    the link given as --input FILE is said so, with its target (one line, exit 3)."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1))
    gone = tmp_path / "moved away"
    for stem in ("b 1", "c", "d", "e", "f"):
        (inp / f"{stem}.png").symlink_to(gone / f"{stem}.png")
    argv = ["--ckpt", bicubic_ckpt, "--n", 1, "--quiet", "--out", tmp_path / "o"]
    with pytest.warns(UserWarning, match="in: skipped 5 symbolic link"):
        assert run(*argv, "--input", inp) == 3
    assert capsys.readouterr().err.splitlines() == [
        "sr_sample.py: error: 5 symbolic link(s) to missing files in --input, not sampled "
        f"('b 1.png' -> '{gone}/b 1.png', c.png -> '{gone}/c.png', d.png -> '{gone}/d.png', and "
        "2 more): restore their targets and rerun, or remove the links; the others were written "
        f"to {tmp_path / 'o'}"
    ]
    assert run(*argv, "--input", inp / "b 1.png") == 3
    assert capsys.readouterr().err.splitlines() == [
        f"sr_sample.py: error: --input '{inp}/b 1.png': " + describe_path(inp / "b 1.png", "either")
    ]


def test_an_lr_too_small_for_the_model_is_one_line_and_skipped(tmp_path, capsys):
    """An LR of 1 px on a side stopped an RRDB (SRFlow-DA) run with a RuntimeError traceback from
    inside the network (its half-resolution map has no pixel), the images after it unsampled.
    Now it is skipped with one line, as an unreadable image, and counted apart at the end."""
    ckpts = {}
    for name, s in (("rrdb", SCALE), ("srflow_da", 4)):
        cfg = {**TINY[name], "scale": s}
        ckpts[name] = tmp_path / f"{name}.pt"
        save_checkpoint(ckpts[name], {"model": name, "model_cfg": cfg,
                                      "state_dict": build_model(name, cfg).state_dict(),
                                      "step": 0})  # fmt: skip
    inp = folder(tmp_path / "in", a=image((1, 7), 1), b=image((6, 6), 2))
    assert run("--ckpt", ckpts["rrdb"], "--input", inp, "--n", 1, "--out", tmp_path / "o") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"sr_sample.py: error: {inp / 'a.png'}: an LR of 7x1 px; the rrdb model takes at least "
        "2x2 px (upscale it, or leave it out); skipped",
        "sr_sample.py: error: 1 of 2 inputs too small for the rrdb model (an LR under 2 px) "
        f"(a.png); the others were written to {tmp_path / 'o'}",
    ]  # fmt: skip
    assert pngs(tmp_path / "o") == ["b.png"]
    argv = ["--ckpt", ckpts["srflow_da"], "--input", inp / "a.png", "--check-invertibility"]
    assert run(*argv, "--n", 1) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.png: an LR of 7x1 px; the srflow_da model takes" in err[0], err


def test_check_invertibility_skips_an_unreadable_input_as_sampling_does(
    tmp_path, capsys, monkeypatch
):
    """--check-invertibility stopped at an unreadable input (exit 3), the inputs after it not
    checked, where sampling skips it with one line. Now it is skipped so too: the others are
    checked, then one line and exit 3; a flow that does not invert is still exit 5, its line
    naming the inputs not checked."""
    cfg = {**TINY["srflow"], "scale": 4}
    ckpt = tmp_path / "srflow.pt"
    net = build_model("srflow", cfg)
    save_checkpoint(ckpt, {"model": "srflow", "model_cfg": cfg, "state_dict": net.state_dict()})
    inp = folder(tmp_path / "in", a=image((8, 8), 1), c=image((8, 8), 2))
    (inp / "b.png").write_bytes(b"not a png")
    argv = ["--ckpt", ckpt, "--input", inp, "--n", 1, "--check-invertibility"]
    assert run(*argv) == 3
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == ["a.png", "c.png", "invertible"]
    assert "invertible: 2 images x 1 samples" in out
    assert err.splitlines() == [
        f"sr_sample.py: error: {inp / 'b.png'}: not an image file (unknown format); skipped",
        "sr_sample.py: error: 1 of 3 inputs unreadable (b.png); the others are invertible",
    ]
    trip = MODELS["srflow"].round_trip  # a broken inverse: x' = x + 0.1
    monkeypatch.setattr(MODELS["srflow"], "round_trip",
                        lambda *a: (lambda x, x2, z: (x, x2 + 0.1, z))(*trip(*a)))  # fmt: skip
    assert run(*argv, "--quiet") == 5
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("sr_sample.py: error: a.png: the flow does not invert: max |x - x'| ")
    assert err[-1].endswith("; not checked: 1 of 3 inputs unreadable (b.png)"), err[-1]


def test_a_saved_latent_of_another_model_is_refused_where_it_is_copied(tmp_path, capsys):
    """A RefVAE/VarSR --save-latent file was a bare .npy: copied without its folder's
    manifest.json, a VarSR of the same D decoded a RefVAE's with one warning line, exit 0 (another
    model's image). Now it is a .npz of z0 and made_by, as a flow's: another model's is refused in
    one line naming the file, the model that saved it and this one (exit 3), given to --latent,
    --latent-shift, through a link, copied alone, or as a --latent DIR of copies; another
    checkpoint of the model is one warning line, one of another D refused naming it. An older
    srspace's .npy is still read: checked by its folder's manifest.json, without one a warning."""
    ckpts = {}
    for name in ("refvae", "varsr"):
        cfg = {**TINY[name], "scale": 4}
        ckpts[name] = tmp_path / f"{name}.pt"
        net = build_model(name, cfg)
        save_checkpoint(
            ckpts[name], {"model": name, "model_cfg": cfg, "state_dict": net.state_dict()}
        )
    inp = folder(tmp_path / "in", a=image((16, 16), 1))
    saved = tmp_path / "saved"
    argv = ["--input", inp / "a.png", "--quiet"]
    assert run("--ckpt", ckpts["refvae"], *argv, "--n", 1, "--save-latent", "--out", saved) == 0
    file = saved / "a_sample00000.latent.npz"
    (tmp_path / "link.latent.npz").symlink_to(file)
    (tmp_path / "alone").mkdir()  # copied without the folder's manifest.json
    alone = tmp_path / "alone" / file.name
    alone.write_bytes(file.read_bytes())
    for flag, given, named in (
        ("--latent", file, file),
        ("--latent-shift", file, file),
        ("--latent", tmp_path / "link.latent.npz", tmp_path / "link.latent.npz"),
        ("--latent", alone, alone),
        ("--latent", alone.parent, alone),
    ):
        capsys.readouterr()
        assert run("--ckpt", ckpts["varsr"], *argv, flag, given, "--out", tmp_path / "o") == 3
        assert capsys.readouterr().err.splitlines() == [
            f"sr_sample.py: error: {flag} {named}: saved by an x4 refvae model, not this x4 varsr "
            "(its latents decode to other images here); decode it with an x4 refvae checkpoint"
        ]
        assert not list(tmp_path.glob("o/*.png"))
    other = tmp_path / "other.pt"  # the same model, other weights: decoded, one warning line
    cfg = {**TINY["refvae"], "scale": 4}
    ck = {
        "model": "refvae",
        "model_cfg": cfg,
        "state_dict": build_model("refvae", cfg).state_dict(),
    }
    save_checkpoint(other, ck)
    sha = hashlib.sha256(ckpts["refvae"].read_bytes()).hexdigest()
    assert run("--ckpt", other, *argv, "--latent", alone, "--out", tmp_path / "o2") == 0
    assert capsys.readouterr().err == (
        f"sr_sample.py: warning: --latent {alone}: saved by another refvae checkpoint (sha256 "
        f"{sha[:12]}...): decoded with this one, its samples are not the saved ones\n"
    )
    wide = tmp_path / "wide.pt"  # another D: refused, naming the checkpoint that saved it
    cfg = {**TINY["refvae"], "scale": 4, "z_dim": 16}
    save_checkpoint(wide, {"model": "refvae", "model_cfg": cfg,
                           "state_dict": build_model("refvae", cfg).state_dict()})  # fmt: skip
    assert run("--ckpt", wide, *argv, "--latent", alone, "--out", tmp_path / "o5") == 3
    assert capsys.readouterr().err == (
        f"sr_sample.py: error: --latent {alone}: shape (8,), expected (16,) or (k, 16) with at "
        "least one row (16: this model's latent size D; rows of 8 are those of another refvae "
        f"checkpoint (sha256 {sha[:12]}...; its config differs in z_dim): decode them with the "
        "checkpoint that saved them)\n"
    )
    # an older srspace's bare .npy: its folder's manifest.json names the model; alone, nothing
    np.save(saved / "a_sample00000.latent.npy", np.load(file)["z0"])
    file.unlink()
    old = saved / "a_sample00000.latent.npy"
    assert run("--ckpt", ckpts["varsr"], *argv, "--latent", old, "--out", tmp_path / "o6") == 3
    assert capsys.readouterr().err == (
        f"sr_sample.py: error: --latent {old}: it was saved by an x4 refvae model (the "
        "manifest.json of its folder), not this x4 varsr: it decodes to another image here; "
        "decode it with an x4 refvae checkpoint\n"
    )
    alone.unlink()
    (tmp_path / "alone" / old.name).write_bytes(old.read_bytes())
    for latent, out in ((tmp_path / "alone" / old.name, "o3"), (alone.parent, "o4")):
        assert run("--ckpt", ckpts["varsr"], *argv, "--latent", latent, "--out", tmp_path / out,
                   "--n", 1) == 0  # fmt: skip
        err = [line for line in capsys.readouterr().err.splitlines() if "manifest" in line]
        assert len(err) == 1 and err[0].startswith(
            f"sr_sample.py: warning: --latent {latent}: no manifest.json "
        ), err
        assert "(a .npy holds the array alone): decoded as this x4 varsr's; another " in err[0]


def test_latent_dir_of_an_ntire_n1_run_warns_of_inputs_of_another_size(tmp_path, capsys):
    """--latent DIR given other inputs than the LR its latents were saved from warns, told by
    the size of the sample beside each file; a --layout ntire --n 1 run's sample is {k:06d}.png,
    not {k:06d}_sample00000.png, so only a --from-hr run's lr/ could tell, and the LR-saved
    folder decoded with its HR images (twice the size) gave no warning. Now {k:06d}.png does."""
    cfg = {**TINY["refvae"], "scale": 4}
    ckpt = tmp_path / "refvae.pt"
    save_checkpoint(ckpt, {"model": "refvae", "model_cfg": cfg,
                           "state_dict": build_model("refvae", cfg).state_dict()})  # fmt: skip
    lr = folder(tmp_path / "lr", a=image((16, 16), 1))
    hr = folder(tmp_path / "hr", a=image((32, 32), 1))
    argv = ["--ckpt", ckpt, "--layout", "ntire", "--quiet"]
    assert run(*argv, "--input", lr, "--n", 1, "--save-latent", "--out", tmp_path / "s") == 0
    assert pngs(tmp_path / "s") == ["000000.png"]
    capsys.readouterr()
    assert run(*argv, "--input", hr, "--latent", tmp_path / "s", "--out", tmp_path / "d") == 0
    assert capsys.readouterr().err == (
        f"sr_sample.py: warning: --latent {tmp_path / 's'}: 1 of 1 inputs are not the LR their "
        "latents were saved from (a.png: an LR of 32x32 px; its samples there are x4 of an LR "
        "of 16x16 px): their samples are not the saved ones; give each input as it was sampled "
        "(with --from-hr where it was made so)\n"
    )
    assert run(*argv, "--input", lr, "--latent", tmp_path / "s", "--out", tmp_path / "e") == 0
    assert capsys.readouterr().err == ""


def test_latent_dir_rerun_reads_whole_only_the_files_it_decodes(tmp_path, monkeypatch):
    """--latent DIR read every file of the shard's inputs whole before any work, also on a rerun
    (after a preemption) whose images are complete, and so not decoded: 0.2 s a DIV2K x4 flow
    sample. Now only the files of the images it decodes; the manifest is the same, and an image
    whose sample was lost is decoded from its files, bit for bit."""
    cfg = {**TINY["srflow"], "scale": 4}
    ckpt = tmp_path / "srflow.pt"
    net = build_model("srflow", cfg)
    save_checkpoint(ckpt, {"model": "srflow", "model_cfg": cfg, "state_dict": net.state_dict()})
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 8), 2))
    argv = ["--ckpt", ckpt, "--input", inp, "--quiet"]
    assert run(*argv, "--n", 2, "--save-latent", "--out", tmp_path / "s") == 0
    argv += ["--latent", tmp_path / "s", "--out", tmp_path / "d"]
    assert run(*argv) == 0
    manifest = (tmp_path / "d" / "manifest.json").read_bytes()
    first = (tmp_path / "d" / "b_sample00001.png").read_bytes()
    read, trip = [], MODELS["srflow"].read_latent

    def counted(self, path, *a):
        read.append(Path(path).name)
        return trip(self, path, *a)

    monkeypatch.setattr(MODELS["srflow"], "read_latent", counted)
    assert run(*argv) == 0 and read == []
    (tmp_path / "d" / "b_sample00001.png").unlink()
    assert run(*argv) == 0
    assert sorted(set(read)) == ["b_sample00000.latent.npz", "b_sample00001.latent.npz"]
    assert (tmp_path / "d" / "b_sample00001.png").read_bytes() == first
    assert (tmp_path / "d" / "manifest.json").read_bytes() == manifest


def test_names_too_long_for_their_outputs_one_line_before_any_work(tmp_path, bicubic_ckpt, capsys):
    """STEM_sample00001.png is 16 bytes longer than STEM.png: a 245-byte input name made an
    OSError traceback (File name too long). Now one line before anything is written; the NTIRE
    layout's numbered names take such inputs, and a name of 255 bytes exactly is written."""
    long, fits = "x" * 245, "猫" * 79 + "ab"  # 245 bytes; 239 bytes, + _sample00001.png = 255
    inp = folder(tmp_path / "in", a=image((8, 8), 1), **{long: image((8, 8), 2)})
    assert run("--ckpt", bicubic_ckpt, "--input", inp, "--n", 2, "--out", tmp_path / "o") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sr_sample.py: error: --input: 1 of 2 file names too long for their outputs in "
                   f"{tmp_path / 'o'} (at most 255 bytes there): {long}.png makes "
                   f"{long}_sample00000.png (261 bytes); use --layout ntire (numbered files) or "
                   "rename them"]  # fmt: skip
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--n", 2, "--layout", "ntire"]
    assert run(*argv, "--out", tmp_path / "ntire") == 0
    made = [f"00000{k}_sample0000{i}.png" for k in (0, 1) for i in (0, 1)]
    assert pngs(tmp_path / "ntire") == made
    inp = folder(tmp_path / "in2", **{fits: image((8, 8), 3)})
    assert run("--ckpt", bicubic_ckpt, "--input", inp, "--n", 2, "--out", tmp_path / "o2") == 0
    assert pngs(tmp_path / "o2") == [f"{fits}_sample0000{i}.png" for i in (0, 1)]
    assert max(len(os.fsencode(f)) for f in pngs(tmp_path / "o2")) == 255


def test_two_inputs_that_would_write_one_file_are_refused_before_any_work(tmp_path, bicubic_ckpt,
                                                                        capsys):  # fmt: skip
    """A deterministic model's --n 1 output of cat_grid.png is cat_grid.png, also the --grid sheet
    of cat.png: the two replaced each other (exit 0, one image's file lost, and a rerun took it as
    complete). Now one line before any work; --layout ntire's numbered names take them."""
    inp = folder(tmp_path / "in", cat=image((8, 8), 1), cat_grid=image((8, 12), 2))
    argv = ["--ckpt", bicubic_ckpt, "--input", inp, "--n", 1, "--grid"]
    assert run(*argv, "--out", tmp_path / "o") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sr_sample.py: error: --input: cat.png and cat_grid.png would both write "
                   f"{tmp_path / 'o' / 'cat_grid.png'}, one replacing the other; rename one of "
                   "them, or use --layout ntire (numbered files)"]  # fmt: skip
    assert not (tmp_path / "o").exists() or pngs(tmp_path / "o") == []
    assert run(*argv, "--layout", "ntire", "--out", tmp_path / "nt") == 0
    assert pngs(tmp_path / "nt") == ["000000.png", "000000_grid.png", "000001.png",
                                     "000001_grid.png"]  # fmt: skip


@pytest.mark.parametrize(
    "ckpt, flags, code, words",
    [
        ("missing", [], 6, "missing: no such file"),
        ("truncated", [], 6, "truncated"),
        ("text", [], 6, "checkpoint"),
        ("good", ["--input", "nowhere"], 3, "--input"),
        ("good", ["--input", "empty"], 3, "no images"),
        ("good", ["--n", "0"], 2, "--n"),
        ("good", ["--temperature", "-0.5"], 2, "--temperature"),
        ("good", ["--layout", "flat"], 2, "--layout"),
        ("good", ["--tile", "32", "--tile-overlap", "32"], 2, "--tile-overlap"),
    ],
)
def test_bad_input_one_line(tmp_path, bicubic_ckpt, capsys, ckpt, flags, code, words):
    inp = folder(tmp_path / "in", a=image((8, 8), 1))
    (tmp_path / "empty").mkdir()
    data = bicubic_ckpt.read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    (tmp_path / "text").write_text("hello\n")
    path = bicubic_ckpt if ckpt == "good" else tmp_path / ckpt
    flags = [str(tmp_path / f) if f in ("nowhere", "empty") else f for f in flags]
    argv = ["--ckpt", str(path), "--input", str(inp), "--out", str(tmp_path / "o"), *flags]
    with pytest.raises(SystemExit) as e:
        sr_sample.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sr_sample.py: error: ") and words in err[0]


@pytest.mark.parametrize("name", ["edsr", "rrdb", "srflow", "ncsr", "vspsr", "refvae", "varsr"])
def test_amp_runs_and_stays_close(tmp_path, name, monkeypatch, capsys):
    """bfloat16 and float16 autocast (emulated or native on this CPU): the same samples up to the
    rounding of the networks (the flows keep their state float32); float16's 3 more mantissa
    bits make it the closer of the two. A CPU that emulates the dtype gets a one-line warning.
    The flows refuse float16: their reverse state can leave its range (SRFlow.fits_float16)."""
    from sr_lib.metrics import psnr

    cfg = {**TINY[name], "scale": 4}
    net = build_model(name, cfg)
    with torch.no_grad():  # the flows' zero-initialised last convs would hide the conditioning
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, {"model": name, "model_cfg": cfg, "state_dict": net.state_dict(),
                           "step": 0})  # fmt: skip
    inp = folder(tmp_path / "in", a=image((12, 16), 9))
    argv = ["--ckpt", path, "--input", inp, "--n", 2]
    assert run(*argv, "--out", tmp_path / "none") == 0
    monkeypatch.setattr(config, "cpu_has_native", lambda amp: amp == "bf16")
    capsys.readouterr()
    amps = ("bf16", "fp16") if net.fits_float16 else ("bf16",)
    closeness = {}
    for amp in amps:
        assert run(*argv, "--amp", amp, "--out", tmp_path / amp) == 0
        for i in range(2):
            a, b = (read(tmp_path / d / f"a_sample{i:05d}.png") for d in ("none", amp))
            assert a.shape == b.shape == (48, 64, 3)
            closeness[amp, i] = psnr(a, b) if (a != b).any() else np.inf
            assert closeness[amp, i] > 35, closeness
    assert closeness["bf16", 0] < np.inf  # bf16 did run
    err = capsys.readouterr().err.strip().splitlines()
    if net.fits_float16:
        assert min(closeness["fp16", i] - closeness["bf16", i] for i in range(2)) > 3, closeness
        warning = "--amp fp16: this CPU emulates fp16, slower than float32; drop --amp"
        assert [line for line in err if "warning" in line] == [f"sr_sample.py: warning: {warning}"]
    else:
        assert run(*argv, "--amp", "fp16", "--out", tmp_path / "fp16") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"sr_sample.py: error: --amp fp16: the {name} model's sampling leaves "
                       "float16's range (NaN samples); use --amp bf16"]  # fmt: skip
        assert not (tmp_path / "fp16").exists()


@pytest.mark.parametrize("name", ["edsr", "toy"])
def test_nan_sample_stops_with_one_line_and_writes_nothing_of_it(tmp_path, toy_ckpt, capsys,
                                                                  monkeypatch, name):  # fmt: skip
    """A checkpoint whose output is NaN (a diverged run's weights; float16 overflow) stops with
    exit 5 naming the image, instead of a black PNG; the images before it stay written."""
    if name == "edsr":
        path = tmp_path / "edsr.pt"
        edsr_ckpt(path)
        ck = torch.load(path, weights_only=True)
        ck["state_dict"]["tail.1.bias"][1] = float("nan")  # the output conv: NaN in green
        save_checkpoint(path, ck)
        stem, what = "a", "the output has NaN pixels"  # every output is NaN: a stops the run
    else:  # the 4th model call (--batch 1: a0, a1, b0, b1) gives NaN: sample 1 of image b
        path, stem, what = toy_ckpt, "b", "sample 1 at temperature 0.5 has NaN pixels"
        generate, calls = Toy.generate, []

        def nan_generate(self, lr, n, temperature, noise):
            calls.append(1)
            sr = generate(self, lr, n, temperature, noise)
            return sr * float("nan") if len(calls) == 4 else sr

        monkeypatch.setattr(Toy, "generate", nan_generate)
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 8), 2))
    batch = [] if name == "edsr" else ["--batch", 1]  # (a deterministic model: a warning line)
    code = run("--ckpt", path, "--input", inp, "--n", 2, *batch, "--out", tmp_path / "o")
    assert code == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sr_sample.py: error: {stem}: {what}"), err
    assert "not written" in err[0]
    written = pngs(tmp_path / "o")
    if name == "edsr":
        assert written == []
    else:  # image a complete, b's sample 0 written before sample 1 failed, no sample 1 of b
        assert written == ["a_sample00000.png", "a_sample00001.png", "b_sample00000.png"]


def test_flow_inverse_1x1_conv_stays_float32_under_bf16_autocast():
    """The flow's state passes through every inverse 1x1 conv: under --amp bf16 it is computed in
    float32, exactly as without autocast (bfloat16 would round the state at every step)."""
    from sr_lib.models.flow_layers import InvConv1x1

    conv = InvConv1x1(12).eval()
    z = torch.randn(2, 12, 8, 8)
    with torch.no_grad():
        want = conv.reverse(z)[0]
        with torch.autocast("cpu", torch.bfloat16):
            got = conv.reverse(z)[0]
    assert got.dtype == torch.float32 and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# The sample PNGs are written on threads (SampleWriter)


def test_samples_are_written_on_threads_while_the_next_are_drawn(tmp_path, toy_ckpt, monkeypatch):
    """The first sample's PNG is still being written when the model draws the next sample, and the
    files are those of a one-thread run, byte for byte."""
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 8), 2))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 3, "--batch", 1]
    monkeypatch.setattr(sr_sample, "cpu_workers", lambda: 1)
    assert run(*argv, "--out", tmp_path / "one") == 0
    drawn, writers, generate = threading.Event(), [], Toy.generate

    def draw_and_tell(self, *args):
        drawn.set() if writers else None  # a draw after the first write was given
        return generate(self, *args)

    def write_after_the_next_draw(paths, img):
        writers.append(threading.current_thread().name)
        if len(writers) == 1 and not drawn.wait(20):
            raise OutputError(f"{paths[0]}: the next sample was not drawn while this was written")
        write_png(paths[0], img)

    monkeypatch.setattr(Toy, "generate", draw_and_tell)
    monkeypatch.setattr(sr_sample, "write_pngs", write_after_the_next_draw)
    monkeypatch.setattr(sr_sample, "cpu_workers", lambda: 3)
    assert run(*argv, "--out", tmp_path / "three") == 0
    assert len(writers) == 6 and all(name.startswith("png") for name in writers), writers
    assert pngs(tmp_path / "three") == pngs(tmp_path / "one") and len(pngs(tmp_path / "one")) == 6
    for f in pngs(tmp_path / "one"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "three" / f).read_bytes()


def test_a_failed_write_on_a_thread_is_one_line_and_the_files_before_it_stay(
    tmp_path, toy_ckpt, monkeypatch, capsys
):
    def full_disk_at_the_second(path, data):
        if path.name == "a_sample00001.png":
            raise OutputError(f"{path}: cannot write (No space left on device); check the folder")
        write(path, data)

    write = sr_sample.write_encoded_png
    monkeypatch.setattr(sr_sample, "write_encoded_png", full_disk_at_the_second)
    monkeypatch.setattr(sr_sample, "cpu_workers", lambda: 3)
    inp = folder(tmp_path / "in", a=image((8, 8), 1), b=image((8, 8), 2))
    code = run("--ckpt", toy_ckpt, "--input", inp, "--n", 3, "--batch", 1, "--out", tmp_path / "o")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 7 and len(err) == 1 and "a_sample00001.png: cannot write" in err[0], err
    written = pngs(tmp_path / "o")
    assert "a_sample00000.png" in written and "a_sample00001.png" not in written
    assert not [f for f in (tmp_path / "o").iterdir() if f.name.endswith(".tmp")]


def test_the_writer_holds_at_most_twice_its_threads(tmp_path, monkeypatch):
    """A model faster than PNG encoding waits for a place instead of piling up arrays."""
    gate = threading.Event()

    def blocked(paths, img):
        assert gate.wait(20)
        paths[0].write_bytes(b"png")

    monkeypatch.setattr(sr_sample, "write_pngs", blocked)
    with sr_sample.SampleWriter(2) as write:
        for i in range(4):  # 2 being written, 2 waiting
            write([tmp_path / f"{i}.png"], None)
        fifth = threading.Thread(target=write, args=([tmp_path / "4.png"], None))
        fifth.start()
        fifth.join(0.5)
        assert fifth.is_alive()  # waits for a place
        gate.set()
        fifth.join(20)
        assert not fifth.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.png" for i in range(5)]


@pytest.mark.parametrize(
    "stop, written",
    [(sr_sample.Preempted, 4), (OutputError, 4), (KeyboardInterrupt, 2)],
    ids=["preempted", "error", "ctrl-c"],
)
def test_leaving_the_writer_finishes_the_writes_given_but_ctrl_c_only_those_begun(
    tmp_path, monkeypatch, stop, written
):
    gate = threading.Event()

    def blocked(paths, img):
        assert gate.wait(20)
        paths[0].write_bytes(b"png")

    monkeypatch.setattr(sr_sample, "write_pngs", blocked)
    with pytest.raises(stop):
        with sr_sample.SampleWriter(2) as write:
            for i in range(4):  # 2 being written, 2 waiting
                write([tmp_path / f"{i}.png"], None)
            shutdown = write.pool.shutdown

            def then_open_the_gate(wait=True, cancel_futures=False):
                shutdown(wait=False, cancel_futures=cancel_futures)  # drops what it drops, now
                gate.set()  # only then may the 2 begun writes (and any kept) finish
                shutdown(wait=wait)

            write.pool.shutdown = then_open_the_gate
            raise stop("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.png" for i in range(written)]


def test_a_stop_while_an_images_line_is_said_says_it_whole_first(tmp_path):
    """A progress line said once its image's PNGs are written (`then`): a SIGTERM that comes as
    the line is said (or between the write's count and the call) is taken after it, so the
    image written is said and counted; before, the stop's Preempted was raised inside it, the
    call already taken off the queue: the image on disk never said nor counted."""
    said = []

    def line():
        os.kill(os.getpid(), signal.SIGTERM)  # (the handler runs at once where not held)
        said.append("a.png 4x4 -> ...")

    with pytest.raises(sr_sample.Preempted):
        with sr_sample.SIGNALS, sr_sample.SampleWriter(2) as write:
            write([tmp_path / "a.png"], np.zeros((4, 4, 3), np.uint8))
            write.then(line)
            write.flush()
    assert said == ["a.png 4x4 -> ..."] and (tmp_path / "a.png").is_file()


# ---------------------------------------------------------------------------------------------
# Gray, alpha and 16-bit inputs


def model_samples(ckpt, path, n, temperature=None, wide=False) -> torch.Tensor:
    """The float (n, 3, sH, sW) samples the model gives the LR file `path` (RGB, seeds of its
    stem), untiled: what sr_sample.py writes, before its conversions."""
    model, _ = load_model(ckpt, "cpu")
    lr = to_tensor(read_planes(path, wide=wide).rgb)[None]
    seeds = [sample_seed(0, Path(path).stem, i) for i in range(n)]
    t = model.default_temperature if temperature is None else temperature
    return draw(model, lr, seeds, t, 0, 0)


def test_a_gray_input_gives_gray_outputs_the_luma_of_the_rgb_samples(tmp_path, toy_ckpt,
                                                                     bicubic_ckpt):  # fmt: skip
    """Gray in, gray out: an 8-bit gray PNG, a 16-bit gray PNG and a 16-bit gray TIFF give gray
    PNGs (colour type 0) whose values are BT.601 luma (sr_sample.to_gray) of the RGB samples
    the model gives the same LR (replicated to RGB) and seeds, rounded once."""
    inp = tmp_path / "in"
    inp.mkdir()
    iio.imwrite(inp / "g8.png", image((10, 13), 1)[..., 0])
    write_png(inp / "g16.png", image((9, 12), 2, np.uint16)[..., 0])
    Image.fromarray(image((7, 9), 3, np.uint16)[..., 0]).save(inp / "t16.tif")  # I;16
    assert read_planes(inp / "t16.tif").gray
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64)  # to_gray is BT.601 luma, float
    want = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert (sr_sample.to_gray(x)[:, 0] - want).abs().max() < 1e-6
    for ckpt, n, name in [(toy_ckpt, 3, "{}_sample{:05d}.png"), (bicubic_ckpt, 1, "{}.png")]:
        for bits, quantize in [(8, to_uint8), (16, to_uint16)]:
            out = tmp_path / f"o{n}_{bits}"
            argv = ["--ckpt", ckpt, "--input", inp, "--n", n, "--bit-depth", bits, "--out", out]
            assert run(*argv) == 0
            for stem in ("g8", "g16", "t16"):
                path = next(inp.glob(f"{stem}.*"))
                x = model_samples(ckpt, path, n, wide=bits == 16)
                rgb = quantize(x)
                for i in range(n):
                    got = read(out / name.format(stem, i))
                    assert png_kind(out / name.format(stem, i)) == (bits, "L")
                    assert np.array_equal(got, quantize(sr_sample.to_gray(x[i]))[..., 0])
                    luma = rgb[i].astype(np.float64) @ np.array(sr_sample.LUMA)  # of RGB PNGs
                    assert np.abs(got - luma).max() <= 1


def square_alpha(shape=(10, 13), top=255, dtype=np.uint8) -> np.ndarray:
    """An opaque square on transparency, its lower half halved: an alpha that the bicubic
    overshoots (clipped) and that no other upsampler upscales alike."""
    alpha = np.zeros(shape, dtype)
    alpha[2:8, 3:11] = top
    alpha[5:, :] //= 2
    return alpha


def test_alpha_is_upscaled_onto_the_outputs_and_the_colour_is_the_rgbs(tmp_path, toy_ckpt,
                                                                       capsys):  # fmt: skip
    """An RGBA or LA LR: its colour sampled as the same file without alpha is, its alpha
    upscaled (MATLAB bicubic, clipped) and put back; no "alpha channel dropped"; so with
    --alpha-upsampler bicubic typed (the default), bit for bit.
    --alpha-channel drop: the outputs of the file without alpha. --grid: no alpha (a gray LA's is
    gray)."""
    rgb, gray, alpha = image((10, 13), 1), image((10, 13), 2)[..., 0], square_alpha()
    inp = folder(tmp_path / "in", rgba=np.dstack([rgb, alpha]), la=np.dstack([gray, alpha]))
    plain = folder(tmp_path / "plain", rgba=rgb, la=gray)
    argv = ["--ckpt", toy_ckpt, "--n", 2, "--grid"]
    assert run(*argv, "--input", inp, "--out", tmp_path / "o") == 0
    assert "alpha" not in capsys.readouterr().err
    assert run(*argv, "--input", plain, "--out", tmp_path / "p") == 0
    assert run(*argv, "--input", inp, "--alpha-channel", "drop", "--out", tmp_path / "d") == 0
    assert run(*argv, "--input", inp, "--alpha-upsampler", "bicubic", "--out", tmp_path / "b") == 0
    assert pngs(tmp_path / "b") == pngs(tmp_path / "o")
    assert all((tmp_path / "b" / f).read_bytes() == (tmp_path / "o" / f).read_bytes()
               for f in pngs(tmp_path / "o"))  # fmt: skip
    up = np.clip(imresize(alpha / np.float32(255), SCALE), 0, 1).astype(np.float32)
    assert up.min() == 0 and up.max() == 1 and 0 < (up % 1).sum()  # clipped, and not 0/1 only
    want_alpha = to_uint8(torch.from_numpy(up)[None])[..., 0]
    for stem, kind in (("rgba", "RGBA"), ("la", "LA")):
        for i in range(2):
            name = f"{stem}_sample{i:05d}.png"
            got, colour = read(tmp_path / "o" / name), read(tmp_path / "p" / name)
            assert png_kind(tmp_path / "o" / name) == (8, kind)
            assert np.array_equal(got[..., -1], want_alpha)
            assert np.array_equal(got[..., :-1].squeeze(-1) if stem == "la" else got[..., :3],
                                  colour)  # fmt: skip
            assert same(tmp_path / "d" / name, tmp_path / "p" / name)
            assert png_kind(tmp_path / "d" / name) == (8, kind[:-1])
        assert same(tmp_path / "o" / f"{stem}_grid.png", tmp_path / "p" / f"{stem}_grid.png")
        assert png_kind(tmp_path / "o" / f"{stem}_grid.png") == (8, kind[:-1])


def model_alpha(ckpt, alpha: np.ndarray, bits: int = 8) -> tuple[np.ndarray, torch.Tensor]:
    """What --alpha-upsampler model puts on the outputs of an LR of this float alpha (h, w): the
    model (library API, temperature 0) run on it repeated to RGB, then BT.601 luma rounded to
    `bits`; with the model's float (3, sH, sW) output."""
    model, _ = load_model(ckpt, "cpu")
    x = model.sample(torch.from_numpy(alpha)[None, None].repeat(1, 3, 1, 1), 1, 0.0)[0]
    return (to_uint16 if bits == 16 else to_uint8)(sr_sample.to_gray(x))[0, ..., 0], x[0]


def test_alpha_upsampler_model_gives_the_models_alpha(tmp_path, toy_ckpt, capsys):
    """--alpha-upsampler model: an RGBA or LA LR's alpha on every output is the model's own
    super-resolution of it (repeated to RGB, temperature 0, BT.601 luma): the same on each
    sample of a stochastic model (Toy), and what a deterministic tiny EDSR whose R, G and B
    differ gives the repeated alpha directly; not the bicubic alpha. The colour is the default
    run's; an input without alpha is written as by default (no word). --alpha-channel drop with
    it: one line, exit 2."""
    rgb, gray, alpha = image((10, 13), 1), image((10, 13), 2)[..., 0], square_alpha()
    inp = folder(tmp_path / "in", rgba=np.dstack([rgb, alpha]), la=np.dstack([gray, alpha]),
                 rgb=rgb)  # fmt: skip
    edsr = edsr_ckpt(tmp_path / "edsr.pt")
    for ckpt, n, name in [(toy_ckpt, 2, "{}_sample{:05d}.png"), (edsr, 1, "{}.png")]:
        out, default = tmp_path / f"model{n}", tmp_path / f"bicubic{n}"
        argv = ["--ckpt", ckpt, "--input", inp, "--n", n]
        assert run(*argv, "--alpha-upsampler", "model", "--out", out) == 0
        assert capsys.readouterr().err == ""
        assert run(*argv, "--out", default) == 0
        want, x = model_alpha(ckpt, read_planes(inp / "rgba.png").alpha)
        if ckpt == edsr:  # (luma, not any one channel, is what is written)
            assert (x[0] - x[1]).abs().max() > 1 / 255 and (x[1] - x[2]).abs().max() > 1 / 255
        for stem in ("rgba", "la"):
            for i in range(n):
                file = name.format(stem, i)
                got, bicubic = read(out / file), read(default / file)
                assert np.array_equal(got[..., -1], want)
                assert np.abs(got[..., -1].astype(int) - bicubic[..., -1]).max() > 10
                assert np.array_equal(got[..., :-1], bicubic[..., :-1])
        assert same(out / name.format("rgb", 0), default / name.format("rgb", 0))
        assert png_kind(out / name.format("rgb", 0)) == (8, "RGB")
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--alpha-channel", "drop"]
    assert run(*argv, "--alpha-upsampler", "model", "--out", tmp_path / "no") == 2
    err = capsys.readouterr().err.strip()
    assert "--alpha-upsampler model" in err and "--alpha-channel drop" in err and "\n" not in err
    assert not (tmp_path / "no").exists()


ALPHA_FLAGS = [("--alpha-upsampler", "bicubic", "model"),
               ("--alpha-upsampler", "model", "bicubic"),
               ("--alpha-channel", "keep", "drop"),
               ("--alpha-channel", "drop", "keep")]  # fmt: skip


@pytest.mark.parametrize(("flag", "first", "then"), ALPHA_FLAGS)
def test_a_rerun_with_the_other_alpha_flag_is_refused_only_where_an_input_keeps_alpha(
    tmp_path, toy_ckpt, capsys, flag, first, then
):
    """--alpha-upsampler and --alpha-channel change no byte where no input has an alpha channel:
    a rerun with the other value (either way) into the folder is no other setting (its files
    kept, nothing sampled again, the folder's manifest as it was). With an RGBA input among them
    (of any --shard) it would put another alpha (or none) on its samples: refused, one line
    naming the flag, exit 2."""
    rgb = image((10, 13), 1)
    plain = folder(tmp_path / "plain", a=rgb, b=image((10, 13), 2))
    mixed = folder(tmp_path / "mixed", a=rgb, b=np.dstack([rgb, square_alpha()]))
    out = tmp_path / "plain_out"
    argv = ["--ckpt", toy_ckpt, "--input", plain, "--n", 2, "--out", out]
    assert run(*argv, flag, first) == 0
    manifest = (out / "manifest.json").read_text()
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run(*argv, flag, then) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files  # none rewritten
    assert run(*argv, flag, then, "--n", 3) == 0  # its new sample: no alpha
    assert png_kind(out / "a_sample00002.png") == (8, "RGB")
    kept = json.loads((out / "manifest.json").read_text())["flags"]  # (n raised alone)
    assert kept == json.loads(manifest)["flags"] and kept[flag[2:].replace("-", "_")] == first
    out = tmp_path / "mixed_out"
    argv = ["--ckpt", toy_ckpt, "--input", mixed, "--n", 2, "--out", out]
    assert run(*argv, flag, first, "--shard", "0/2") == 0  # a: no alpha
    capsys.readouterr()
    assert run(*argv, flag, then, "--shard", "1/2") == 2  # b's samples
    err = capsys.readouterr().err.strip()
    assert f'{flag} "{first}", not "{then}"' in err and "\n" not in err
    assert not list(out.glob("b_*"))


def test_an_rgba_input_dropped_from_input_keeps_the_folders_alpha_flags(tmp_path, toy_ckpt,
                                                                         capsys):  # fmt: skip
    """A folder's --alpha-channel and --alpha-upsampler are those of its samples with alpha: a
    rerun with the other values whose inputs have none (an RGBA input sampled there earlier,
    dropped from --input since) writes no file they change and goes on, the manifest keeping the
    folder's values (its RGBA image's samples are theirs); with that input put back it is
    refused, though its samples are complete (they have the folder's alpha, not the run's)."""
    rgb = image((10, 13), 1)
    both = folder(tmp_path / "both", a=rgb, b=np.dstack([rgb, square_alpha()]))
    only = folder(tmp_path / "only", a=rgb, c=image((10, 13), 2))
    out = tmp_path / "out"
    assert run("--ckpt", toy_ckpt, "--input", both, "--n", 2, "--out", out) == 0
    b_files = {p: p.read_bytes() for p in out.glob("b_*")}
    assert png_kind(out / "b_sample00000.png") == (8, "RGBA")
    flags = json.loads((out / "manifest.json").read_text())["flags"]
    other = ["--alpha-channel", "drop"]
    assert run("--ckpt", toy_ckpt, "--input", only, "--n", 2, "--out", out, *other) == 0
    assert png_kind(out / "c_sample00000.png") == (8, "RGB")
    kept = json.loads((out / "manifest.json").read_text())["flags"]
    assert (kept["alpha_channel"], kept["alpha_upsampler"]) == ("keep", "bicubic") == (
        flags["alpha_channel"], flags["alpha_upsampler"])  # fmt: skip
    assert {p: p.read_bytes() for p in out.glob("b_*")} == b_files
    capsys.readouterr()
    for again in (other, ["--alpha-upsampler", "model"]):
        assert run("--ckpt", toy_ckpt, "--input", both, "--n", 2, "--out", out, *again) == 2
        err = capsys.readouterr().err.strip()
        assert f'{again[0]} "{flags[again[0][2:].replace("-", "_")]}", not "{again[1]}"' in err
    assert {p: p.read_bytes() for p in out.glob("b_*")} == b_files


KINDS = ["RGBA", "LA", "P+tRNS", "RGB+tRNS", "L+tRNS", "RGB", "L", "P", "JPEG", "TIFF RGBA",
         "TIFF RGB", "16-bit RGBA", "16-bit RGB"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_has_alpha_from_the_header_says_what_read_planes_finds(tmp_path, kind):
    """sr_sample.has_alpha (whether --alpha-upsampler changes a file) tells an input's alpha
    channel from its header, the transparent colour of a palette, gray or RGB PNG included, as
    read_planes (what sampling keeps) finds it; a TIFF from its pixels."""
    rgb = image((6, 7), 3)
    path = tmp_path / ("x.jpg" if kind == "JPEG" else "x.tif" if "TIFF" in kind else "x.png")
    if kind.startswith("16-bit"):
        img = image((6, 7), 3, np.uint16)
        write_png(path, np.dstack([img, img[..., 0]]) if "RGBA" in kind else img)
    else:
        mode = "RGB" if kind == "JPEG" else kind.split()[-1].removesuffix("+tRNS")
        rgba = np.dstack([rgb, square_alpha((6, 7))])
        im = Image.fromarray(rgba if "A" in mode else rgb).convert(mode)
        extra = {"transparency": 0 if mode in ("L", "P") else (0, 0, 0)} if "tRNS" in kind else {}
        im.save(path, **extra)
    assert sr_sample.has_alpha(path) == (read_planes(path).alpha is not None)
    assert sr_sample.has_alpha(path) == ("A" in kind or "tRNS" in kind)


@pytest.mark.parametrize("kind", ["RGBA", "P+tRNS", "RGB", "TIFF RGBA"])
def test_has_alpha_of_an_image_too_large_is_the_loaders_no_warning(tmp_path, kind, monkeypatch):
    """An input of 2^28 to 2^29 px (above MAX_PIXELS, below Pillow's error at twice its
    MAX_IMAGE_PIXELS): has_alpha's Image.open printed Pillow's DecompressionBombWarning and took
    its mode, where the loader refuses the file (skipped as unreadable at its turn). Now as the
    loader: no alpha to keep, no warning. (The limits lowered to 100 px: a 12x12 image.)"""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(sr_lib.data, "MAX_PIXELS", 100)
    path = tmp_path / ("x.tif" if "TIFF" in kind else "x.png")
    mode = kind.split()[-1].removesuffix("+tRNS")
    im = Image.fromarray(np.dstack([image((12, 12), 3), square_alpha((12, 12))])).convert(mode)
    im.save(path, **({"transparency": 0} if "tRNS" in kind else {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sr_sample.has_alpha(path) is False
    assert [str(w.message) for w in caught] == []
    with pytest.raises(DataError, match="exceeds the limit of 100 pixels"):
        read_planes(path)


def test_model_alpha_through_tiles_sweeps_16_bits_from_hr_ntire_and_grid(tmp_path, toy_ckpt,
                                                                          monkeypatch):  # fmt: skip
    """--alpha-upsampler model, a 16-bit RGBA and an LA LR at --bit-depth 16: the same files
    untiled and through --tile, --batch and a temperature sweep, the alpha too drawn in tiles
    (no model call sees more than a tile: its memory is bounded as the samples'); the 16-bit
    alpha is the model's (one for all samples and temperatures); --grid's sheet is the default
    run's (no alpha). --from-hr --layout ntire: 000000.png's alpha is the model's of the LR's
    alpha (in OUT/lr)."""
    inp = tmp_path / "in"
    inp.mkdir()
    write_png(inp / "c.png", np.dstack([image((20, 26), 2, np.uint16),
                                        square_alpha((20, 26), 65535, np.uint16)]))  # fmt: skip
    iio.imwrite(inp / "g.png", np.dstack([image((20, 26), 3)[..., 0], square_alpha((20, 26))]))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 3, "--temperature", 0.5, 1,
            "--bit-depth", 16, "--grid"]  # fmt: skip
    model = [*argv, "--alpha-upsampler", "model"]
    assert run(*model, "--out", tmp_path / "whole") == 0
    sizes, generate = [], Toy.generate
    monkeypatch.setattr(Toy, "generate", lambda m, lr, *a: sizes.append(lr.shape[-2:])
                        or generate(m, lr, *a))  # fmt: skip
    tiled = [*model, "--tile", 16, "--tile-overlap", 0, "--batch", 2]
    assert run(*tiled, "--out", tmp_path / "tiled") == 0
    assert len(sizes) > 2 * 2 * 2 * 2 and max(max(hw) for hw in sizes) == 16  # (4 tiles an image)
    assert run(*argv, "--out", tmp_path / "bicubic") == 0
    for stem, kind in (("c", "RGBA"), ("g", "LA")):
        want, _ = model_alpha(toy_ckpt, read_planes(inp / f"{stem}.png", wide=True).alpha, 16)
        for t in ("T0.5", "T1"):
            whole = tmp_path / "whole" / t
            for i in range(3):
                got = whole / f"{stem}_sample{i:05d}.png"
                assert png_kind(got) == (16, kind)
                assert np.array_equal(read(got)[..., -1], want)
                assert same(got, tmp_path / "tiled" / t / got.name)
            grid = f"{stem}_grid.png"
            assert same(whole / grid, tmp_path / "bicubic" / t / grid)
            assert same(whole / grid, tmp_path / "tiled" / t / grid)
    hr = folder(tmp_path / "hr", c=np.dstack([image((16, 16), 4), square_alpha((16, 16))]))
    sub = tmp_path / "sub"
    assert run("--ckpt", toy_ckpt, "--input", hr, "--from-hr", "--layout", "ntire", "--n", 1,
               "--alpha-upsampler", "model", "--out", sub) == 0  # fmt: skip
    want, _ = model_alpha(toy_ckpt, read_planes(sub / "lr" / "c.png").alpha)
    assert np.array_equal(read(sub / "000000.png")[..., -1], want)
    assert np.abs(want.astype(int) - np.repeat(np.repeat(square_alpha((8, 8)), 2, 0), 2, 1)
                  ).max() > 10  # (not the HR's alpha: the LR's, super-resolved)  # fmt: skip


def test_bit_depth_16_reads_and_writes_16_bits(tmp_path, bicubic_ckpt, toy_ckpt, capsys):
    """--bit-depth 16: a 16-bit LR reaches the model as x / 65535 (not rounded to 8 bits first)
    and the outputs are 16-bit PNGs of round(x * 65535); an 8-bit LR gets 16-bit outputs of its
    samples. Without it, as before: 8-bit outputs of the LR rounded to 8 bits."""
    deep = image((10, 13), 5, np.uint16)
    inp = tmp_path / "in"
    inp.mkdir()
    write_png(inp / "d.png", deep)
    narrow = folder(tmp_path / "narrow", d=read_image(inp / "d.png"))  # round(x / 257)
    assert run("--ckpt", bicubic_ckpt, "--input", inp, "--n", 1, "--bit-depth", 16,
               "--out", tmp_path / "o16") == 0  # fmt: skip
    got = read(tmp_path / "o16" / "d.png").astype(np.float64)
    assert png_kind(tmp_path / "o16" / "d.png") == (16, "RGB")
    exact = np.clip(imresize(deep / 65535, SCALE), 0, 1) * 65535  # float64 MATLAB bicubic
    assert np.abs(got - exact).max() <= 1  # (the model's float32)
    rounded = np.clip(imresize(read_image(inp / "d.png") / 255, SCALE), 0, 1) * 65535
    assert np.abs(rounded - exact).max() > 60  # what an LR read as 8 bits first would give
    argv = ["--ckpt", bicubic_ckpt, "--n", 1, "--out"]
    assert run(*argv, tmp_path / "o8", "--input", inp) == 0  # the default: 8 bits, as before
    assert run(*argv, tmp_path / "n8", "--input", narrow) == 0
    assert same(tmp_path / "o8" / "d.png", tmp_path / "n8" / "d.png")
    assert png_kind(tmp_path / "o8" / "d.png") == (8, "RGB")
    argv = ["--ckpt", toy_ckpt, "--n", 2, "--input", narrow]  # an 8-bit LR, 16-bit outputs
    assert run(*argv, "--bit-depth", 16, "--out", tmp_path / "t16") == 0
    assert run(*argv, "--out", tmp_path / "t8") == 0
    x = model_samples(toy_ckpt, narrow / "d.png", 2)
    for i in range(2):
        name = f"d_sample{i:05d}.png"
        assert png_kind(tmp_path / "t16" / name) == (16, "RGB")
        assert np.array_equal(read(tmp_path / "t16" / name), to_uint16(x[i]))
        assert np.array_equal(read(tmp_path / "t8" / name), to_uint8(x[i]))
    capsys.readouterr()
    assert run(*argv, "--bit-depth", 16, "--layout", "ntire", "--out", tmp_path / "nt") == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "warning: --bit-depth 16 --layout ntire:" in err[0]


@pytest.mark.parametrize("flag", [("--bit-depth", "16"), ("--alpha-channel", "drop"),
                                  ("--alpha-upsampler", "model")])  # fmt: skip
def test_a_rerun_with_another_bit_depth_or_alpha_is_refused(tmp_path, toy_ckpt, capsys, flag):
    """The files of another --bit-depth, --alpha-channel or --alpha-upsampler are other files: a
    rerun must not keep them as complete (manifest.json records the flags). A folder of an
    srspace before --alpha-upsampler (no such key) was upscaled bicubic: a rerun is so too."""
    inp = folder(tmp_path / "in", a=np.dstack([image((8, 8), 1), square_alpha((8, 8))]))
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 2, "--out", tmp_path / "o"]
    assert run(*argv) == 0
    bicubic = read(tmp_path / "o" / "a_sample00000.png")[..., 3]
    if flag[0] == "--alpha-upsampler":
        manifest = tmp_path / "o" / "manifest.json"
        older = json.loads(manifest.read_text())
        del older["flags"]["alpha_upsampler"]
        manifest.write_text(json.dumps(older))
        assert run(*argv, "--alpha-upsampler", "bicubic") == 0  # complete: nothing redone
    before = {p: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    capsys.readouterr()
    assert run(*argv, *flag) == 2
    err = capsys.readouterr().err.strip()
    was = {"--bit-depth": "8", "--alpha-channel": '"keep"', "--alpha-upsampler": '"bicubic"'}
    assert f"holds samples made with {flag[0]} {was[flag[0]]}, not " in err and "\n" not in err
    assert {p: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert run(*argv, *flag, "--overwrite") == 0
    kind = png_kind(tmp_path / "o" / "a_sample00000.png")
    assert kind == {"--bit-depth": (16, "RGBA"), "--alpha-channel": (8, "RGB"),
                    "--alpha-upsampler": (8, "RGBA")}[flag[0]]  # fmt: skip
    if flag[0] == "--alpha-upsampler":  # (the bicubic alpha replaced)
        assert not np.array_equal(read(tmp_path / "o" / "a_sample00000.png")[..., 3], bicubic)


def test_tiles_batches_sweeps_shards_and_reruns_agree_on_gray_alpha_16(tmp_path, toy_ckpt):
    """A gray and a 16-bit RGBA LR at --bit-depth 16 through --tile, --batch, a temperature sweep,
    --shard and a rerun: the same 16-bit gray / RGBA files as one untiled run."""
    inp = tmp_path / "in"
    inp.mkdir()
    iio.imwrite(inp / "g.png", image((24, 21), 1)[..., 0])
    rgba = np.dstack([image((20, 26), 2, np.uint16), image((20, 26), 3, np.uint16)[..., :1]])
    write_png(inp / "c.png", rgba)
    argv = ["--ckpt", toy_ckpt, "--input", inp, "--n", 3, "--temperature", 0.5, 1,
            "--bit-depth", 16]  # fmt: skip
    assert run(*argv, "--out", tmp_path / "whole") == 0
    assert run(*argv, "--tile", 16, "--batch", 2, "--out", tmp_path / "tiled") == 0
    for shard in ("0/2", "1/2"):
        assert run(*argv, "--shard", shard, "--batch", 1, "--out", tmp_path / "shards") == 0
    assert run(*argv, "--out", tmp_path / "whole") == 0  # a rerun: all complete, kept
    for t in ("T0.5", "T1"):
        names = pngs(tmp_path / "whole" / t)
        assert len(names) == 6
        for name in names:
            whole = tmp_path / "whole" / t / name
            assert png_kind(whole) == (16, "L" if name.startswith("g") else "RGBA")
            assert same(whole, tmp_path / "tiled" / t / name)
            assert same(whole, tmp_path / "shards" / t / name)


def test_from_hr_makes_the_lr_file_as_the_outputs_are_written(tmp_path, bicubic_ckpt):
    """--from-hr: the LR of a gray or RGBA HR is written gray / with its alpha (downscaled) at
    --bit-depth, and sampling that LR file again gives the same samples (within a level)."""
    hr = tmp_path / "hr"
    hr.mkdir()
    write_png(hr / "g.png", image((16, 20), 1, np.uint16)[..., 0])
    iio.imwrite(hr / "c.png", np.dstack([image((16, 16), 2), np.full((16, 16), 200, np.uint8)]))
    for bits in (8, 16):
        out = tmp_path / f"o{bits}"
        argv = ["--ckpt", bicubic_ckpt, "--n", 1, "--bit-depth", bits]
        assert run(*argv, "--input", hr, "--from-hr", "--out", out) == 0
        assert png_kind(out / "lr" / "g.png") == (bits, "L")
        assert png_kind(out / "lr" / "c.png") == (bits, "RGBA")
        assert (read(out / "lr" / "c.png")[..., 3] == (200 if bits == 8 else 200 * 257)).all()
        assert run(*argv, "--input", out / "lr", "--out", tmp_path / f"again{bits}") == 0
        for stem in ("g", "c"):
            a, b = read(out / f"{stem}.png"), read(tmp_path / f"again{bits}" / f"{stem}.png")
            assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1


def test_flow_latents_and_invertibility_of_a_gray_16_bit_input(tmp_path, capsys):
    """--save-latent then --latent gives a gray 16-bit LR's sample again; --check-invertibility
    reads it at --bit-depth 16, writes nothing and calls --alpha-channel unused."""
    cfg = {**TINY["srflow"], "scale": 4}
    ckpt = tmp_path / "flow.pt"
    save_checkpoint(ckpt, {"model": "srflow", "model_cfg": cfg, "step": 0,
                           "state_dict": build_model("srflow", cfg).state_dict()})  # fmt: skip
    inp = tmp_path / "in"
    inp.mkdir()
    write_png(inp / "g.png", image((8, 8), 1, np.uint16)[..., 0])
    argv = ["--ckpt", ckpt, "--input", inp, "--n", 2, "--bit-depth", 16]
    assert run(*argv, "--save-latent", "--out", tmp_path / "o") == 0
    latent = tmp_path / "o" / "g_sample00001.latent.npz"
    assert run(*argv, "--latent", latent, "--out", tmp_path / "again") == 0
    assert png_kind(tmp_path / "again" / "g_sample00000.png") == (16, "L")
    assert np.abs(read(tmp_path / "again" / "g_sample00000.png").astype(int)
                  - read(tmp_path / "o" / "g_sample00001.png")).max() <= 1  # fmt: skip
    capsys.readouterr()
    assert run(*argv, "--check-invertibility", "--alpha-channel", "drop") == 0
    err = capsys.readouterr().err
    assert "--alpha-channel: no effect with --check-invertibility" in err


def test_sr_eval_reads_gray_16_bit_and_rgba_samples_as_8_bit_rgb(tmp_path, bicubic_ckpt):
    """sr_eval.py scores gray, 16-bit and RGBA sample folders as read_image reads them: gray
    repeated to RGB, alpha dropped, 16 bits rounded to 8 (round(x / 257)): the numbers of the
    same samples written as 8-bit RGB."""
    hr = tmp_path / "hr"
    hr.mkdir()
    iio.imwrite(hr / "g.png", image((24, 32), 1)[..., 0])
    write_png(hr / "d.png", image((32, 24), 2, np.uint16))
    iio.imwrite(hr / "a.png", np.dstack([image((24, 24), 3), np.full((24, 24), 99, np.uint8)]))
    sub = tmp_path / "sub"
    argv = ["--ckpt", bicubic_ckpt, "--input", hr, "--from-hr", "--n", 2, "--bit-depth", 16]
    assert run(*argv, "--out", sub) == 0
    assert {png_kind(sub / f"{s}_sample00000.png")[1] for s in "gda"} == {"L", "RGB", "RGBA"}
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        for name in pngs(sub):
            iio.imwrite(flat / name, read_image(sub / name))
    means = []
    for sr in (sub, flat):
        results = tmp_path / f"{sr.name}.json"
        assert sr_eval.main(["--hr", str(hr), "--sr", str(sr), "--scale", str(SCALE), "--n",
                             "2", "--no-lpips", "--out", str(results)]) == 0  # fmt: skip
        got = json.loads(results.read_text())
        means.append((got["mean"], got["per_image"]))
    assert means[0] == means[1] and {"PSNR_mean", "SSIM_mean"} <= set(means[0][0])


def test_the_help_of_the_latent_flags_names_the_flows_npz(capsys):
    """--save-latent writes a flow's fields as NAME_sample{i:05d}.latent.npz, and --latent reads
    that .npz back (docs/flows.md); the help named only RefVAE's and VarSR's .npy."""
    with pytest.raises(SystemExit) as e:
        sr_sample.main(["-h"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    save = text[text.index("--save-latent write") :][:200]
    latent = text[text.index("--latent LATENT decode") :][:200]
    assert ".latent.npz, its fields z0" in save and "model that saved it" in save, save
    assert ".npy" in latent and "flows: a .npz" in latent, latent


def host_out_of_memory(cls, monkeypatch):
    """cls.generate raises the host's out-of-memory error (a MemoryError: a CPU run)."""

    def no_memory(self, lr, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(cls, "generate", no_memory)


@pytest.mark.parametrize(
    "flags, said",
    [  # an LR of 24x40 (Toy: tiles in multiples of 4)
        (["--n", 2, "--batch", 1], "out of memory; use --tile 20"),
        (["--n", 4], "out of memory; use a --batch below 4 or --tile 20"),
        (["--n", 4, "--batch", 2, "--tile", 32],
         "out of memory; use a smaller --batch (this run's: 2) or --tile 16 (this run's: 32)"),
        (["--n", 4, "--batch", 2, "--tile", 16],
         "out of memory; use a smaller --batch (this run's: 2)"),
        (["--n", 1, "--tile", 16],
         "out of memory drawing one sample at a time in tiles of 16 LR px: this 40x24 LR image "
         "needs more memory than this machine has"),
    ],
)  # fmt: skip
def test_out_of_memory_names_only_what_lowers_it(tmp_path, toy_ckpt, monkeypatch, capsys, flags,
                                                 said):  # fmt: skip
    """The line was "out of memory; use a smaller --batch or --tile" for every run: at --batch 1
    (or a batch above --n: the samples of one image are drawn together at most) a smaller --batch
    cannot help, nor a smaller --tile at its least (16). It names what does, with the run's values:
    here a CPU's memory (a MemoryError), where no out-of-memory retry tiles the image."""
    monkeypatch.setattr(Toy, "tile_halo", 0)  # (no warning that the context outgrows a tile)
    inp = folder(tmp_path / "in", a=image((24, 40), 6))
    host_out_of_memory(Toy, monkeypatch)
    assert run("--ckpt", toy_ckpt, "--input", inp, "--out", tmp_path / "o", *flags) == 4
    assert capsys.readouterr().err.splitlines() == [f"sr_sample.py: error: {said}"]


class FakeCuda:
    type = "cuda"

    def __str__(self):
        return "cuda:0"


@pytest.mark.parametrize(
    "error, batch, n, tried, said",
    [
        (torch.OutOfMemoryError, 10, 10, 64,
         "out of memory on cuda:0, also in tiles of 64 LR px; use a smaller --batch (this run's: "
         "10) or --device cpu"),
        (torch.OutOfMemoryError, 1, 10, 64,
         "out of memory on cuda:0, also in tiles of 64 LR px; use --device cpu"),
        (torch.OutOfMemoryError, 4, 2, 0,  # an LR under 2 x OOM_MIN_TILE: no tiles tried
         "out of memory on cuda:0; use a --batch below 2 or --device cpu"),
        (MemoryError, 10, 10, 0,
         "out of memory; use a smaller --batch (this run's: 10)"),  # the host's, on a CUDA run
        (MemoryError, 1, 10, 0,
         "out of memory drawing one sample at a time: this 40x24 LR image needs more memory than "
         "this machine has"),
    ],
)  # fmt: skip
def test_out_of_memory_line_of_a_cuda_run(error, batch, n, tried, said):
    """On a CUDA device a retry tiles the image down to OOM_MIN_TILE first (`tried`: the last
    tile; 0: the image was whole), so a smaller --tile is not named; --device cpu takes the
    host's memory. The host's memory on a CUDA run: only --batch (the samples drawn together
    come back to it)."""
    model = Toy(Toy.Config(scale=SCALE))
    lr = SimpleNamespace(device=FakeCuda(), shape=(1, 3, 24, 40))
    args = SimpleNamespace(batch=batch, amp="none")
    line = sr_sample.out_of_memory_line(error("out of memory"), model, lr, n, args, 0, tried)
    assert line == said
