"""sr_eval.py --lr-blur: LR-PSNR with the blur + bicubic downscale of sr_sample.py --from-hr
--lr-blur's LR (docs/metrics.md "LR-PSNR of a degraded LR"), on tiny generated images."""

import dataclasses
import hashlib
import json
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
from test_eval_cli import fails, make_hr, run, stop_at_image

import sr_eval
import sr_sample
from sr_lib.data import (
    Degradation,
    degrade,
    validation_blur,
    validation_rng,
)

STEMS = ("0801", "0802")


def blurred_set(root, blur: str, sizes=((48, 64), (53, 70))):
    """HR images, their LR written by sr_sample.py --from-hr --lr-blur `blur`'s code
    (`read_input`: the HR cropped to a multiple of 8, `validation_degradation` seeded by the
    stem) and one sample per image: the HR itself."""
    hr_dir, lr_dir, sr_dir = root / "hr", root / "lr", root / "sr"
    for d in (hr_dir, lr_dir, sr_dir):
        d.mkdir()
    flags = SimpleNamespace(bit_depth=8, alpha_channel="keep", lr_blur=blur, lr_noise="",
                            lr_jpeg="")  # fmt: skip
    for k, (stem, (h, w)) in enumerate(zip(STEMS, sizes)):
        hr = make_hr(h, w, seed=k)
        iio.imwrite(hr_dir / f"{stem}.png", hr)
        sr_sample.read_input(hr_dir / f"{stem}.png", 4, True, lr_dir / f"{stem}.png", flags)
        iio.imwrite(sr_dir / f"{stem}.png", hr)
    return hr_dir, lr_dir, sr_dir


def scores(capsys, tmp_path, hr_dir, lr_dir, sr_dir, *extra):
    out = tmp_path / "r.json"
    code, _ = run(capsys, "--hr", hr_dir, "--sr", sr_dir, "--lr", lr_dir, "--scale", 4, "--n", 1,
                  "--no-lpips", "--out", out, *extra)  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_a_perfect_sample_of_a_blurred_lr_is_lr_consistent_only_with_its_blur(tmp_path, capsys):
    """SR = GT, its LR made with --lr-blur 2: LR-PSNR against that LR was low (the SR's bicubic
    downscale is sharper than the blurred LR); with --lr-blur 2 the SR downscales to that LR
    exactly (+inf: the LR is the same rounding of the same float image). The official columns
    stay the bicubic ones (+inf: SR = GT)."""
    hr_dir, lr_dir, sr_dir = blurred_set(tmp_path, "2.0")
    plain = scores(capsys, tmp_path, hr_dir, lr_dir, sr_dir)
    assert all(20 < r["LRPSNR_vs_input_mean"] < 35 for r in plain["per_image"])
    assert "LRPSNR_blur_mean" not in plain["mean"] and plain["settings"]["lr_blur"] is None
    res = scores(capsys, tmp_path, hr_dir, lr_dir, sr_dir, "--lr-blur", "2")
    for row in res["per_image"]:
        assert row["LRPSNR_vs_input_mean"] == "inf" and row["LRPSNR_blur_worst"] == "inf"
        assert row["LRPSNR_mean"] == "inf"  # (the official one: bicubic, SR = GT)
    assert res["settings"]["lr_blur"] == "2.0"
    assert res["settings"]["columns"][-3:] == [
        "LRPSNR_blur_worst", "LRPSNR_blur_mean", "LRPSNR_vs_input_mean"
    ]  # fmt: skip


def test_lr_psnr_with_the_blur_of_a_sample_that_differs(tmp_path, capsys):
    """A sample other than the GT: LRPSNR_blur_* are PSNR(D_b(SR crop), D_b(GT crop)) and
    LRPSNR_vs_input_mean PSNR(D_b(SR crop), LR), D_b = `degrade` with the blur."""
    hr_dir, lr_dir, sr_dir = blurred_set(tmp_path, "1.5")
    hr = iio.imread(hr_dir / "0801.png")
    sr = np.clip(hr + np.random.default_rng(0).normal(0, 8, hr.shape), 0, 255).astype(np.uint8)
    iio.imwrite(sr_dir / "0801.png", sr)
    row = scores(capsys, tmp_path, hr_dir, lr_dir, sr_dir, "--lr-blur", "1.5")["per_image"][0]
    down, gt_down = degrade(sr, 4, 1.5), degrade(hr, 4, 1.5)  # (48x64: its own mod-8 crop)
    assert np.array_equal(iio.imread(lr_dir / "0801.png"), gt_down)  # (sr_sample.py's LR)
    mse = np.mean((down.astype(float) - gt_down) ** 2)
    assert row["LRPSNR_blur_mean"] == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-9)
    assert row["LRPSNR_vs_input_mean"] == row["LRPSNR_blur_mean"]  # (the LR is D_b(GT) here)
    assert 30 < row["LRPSNR_blur_mean"] < row["LRPSNR_mean"] + 10


def test_a_range_draws_each_images_sigma_as_sr_sample_does(tmp_path, capsys):
    """--lr-blur 0.2:3: each image's sigma is the one sr_sample.py --from-hr (and sr_train.py's
    validation) drew for its stem, whatever noise and JPEG drew after it: the perfect samples
    are +inf against their LR, made with that range and a noise."""
    full = Degradation(blur=(0.2, 3.0), noise=(1.0, 5.0), jpeg=(50, 90))
    sigmas = [validation_blur(Degradation(blur=(0.2, 3.0)), s) for s in STEMS]
    assert sigmas == [full.draw(validation_rng(s), 1)[0][0] for s in STEMS]
    assert sigmas[0] != sigmas[1] and all(0.2 <= s <= 3 for s in sigmas)
    hr_dir, lr_dir, sr_dir = blurred_set(tmp_path, "0.2:3.0")
    res = scores(capsys, tmp_path, hr_dir, lr_dir, sr_dir, "--lr-blur", "0.2:3")
    assert [r["LRPSNR_vs_input_mean"] for r in res["per_image"]] == ["inf", "inf"]
    one = scores(capsys, tmp_path, hr_dir, lr_dir, sr_dir, "--lr-blur", "1.6")  # (one sigma)
    assert all(r["LRPSNR_vs_input_mean"] != "inf" for r in one["per_image"])


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--lr-blur", "-1"], "--lr-blur -1: sigma must be >= 0"),
        (["--lr-blur", "abc"], "--lr-blur abc: must be a sigma >= 0 or a range LO:HI"),
        (["--lr-blur", "3:1"], "--lr-blur 3:1: LO 3 is above HI 1; give 1:3"),
        (["--lr-blur", ""], "--lr-blur: an empty value; give a sigma or LO:HI"),
        (["--lr-blur", "2", "--ntire"], "--ntire --lr-blur 2.0: the official LR-PSNR"),
        (["--lr-noise", "2"], "--lr-noise: noise and JPEG are random draws on the LR"),
        (["--lr-jpeg=50"], "--lr-jpeg: noise and JPEG are random draws on the LR"),
    ],
)
def test_bad_blur_values_are_one_line(tmp_path, capsys, extra, said):
    hr_dir, _, sr_dir = blurred_set(tmp_path, "2.0")
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips", *extra]
    code, err = fails(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and said in err, err


def test_a_manifest_of_a_blurred_lr_is_one_warning_naming_the_flag(tmp_path, capsys):
    """Samples that sr_sample.py --from-hr --lr-blur made (its manifest.json says so), scored
    without --lr-blur: one warning line naming the flag to give (the blur is not applied:
    the command says what is scored); with it, none; with another, one."""
    hr_dir, _, sr_dir = blurred_set(tmp_path, "0.5:3.0")
    manifest = {"scale": 4, "n": 1, "from_hr": True, "flags": {"lr_blur": "0.5:3.0"}}
    (sr_dir / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips"]
    code, got = run(capsys, *argv)
    assert code == 0 and got.err == (
        f"sr_eval.py: warning: --sr {sr_dir}: its manifest.json says its LR was made by "
        "sr_sample.py --from-hr with --lr-blur 0.5:3.0, scored with no --lr-blur; give "
        "--lr-blur 0.5:3.0 to score LR-PSNR with the blur its LR had\n"
    )
    assert run(capsys, *argv, "--lr-blur", "0.5:3")[1].err == ""
    err = run(capsys, *argv, "--lr-blur", "2")[1].err
    assert err.count("\n") == 1 and "with --lr-blur 0.5:3.0, scored with --lr-blur 2.0" in err
    err = run(capsys, *argv, "--ntire")[1].err
    assert err.count("\n") == 1 and "without --ntire, --lr-blur 0.5:3.0 adds" in err


def test_another_blur_is_another_command_whose_kept_scores_are_not_continued(
    tmp_path, capsys, monkeypatch
):
    """The scores kept by a run stopped with --lr-blur 2 (OUT.partial) are not continued by a
    rerun with --lr-blur 1 (moved aside, every image scored), but are by one with 2.0; the key
    of a run without --lr-blur is that of an srspace before it (its kept scores continued)."""
    hr_dir, lr_dir, sr_dir = blurred_set(tmp_path, "2.0")
    out = tmp_path / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", 4, "--n", 1, "--no-lpips", "--out", out]
    stop_at_image(monkeypatch, "0802")
    assert fails(capsys, *argv, "--lr-blur", "2")[0] == 75
    monkeypatch.undo()
    calls = stop_at_image(monkeypatch, "0802")
    assert fails(capsys, *argv, "--lr-blur", "1")[0] == 75 and calls == ["0801", "0802"]
    assert len(list(tmp_path.glob("r.json.*.partial"))) == 1  # (the --lr-blur 2 run's, kept)
    monkeypatch.undo()
    calls = stop_at_image(monkeypatch, "none")
    assert run(capsys, *argv, "--lr-blur", "2.0")[0] == 0 and calls == ["0802"]
    args = sr_eval.EvalArgs(hr=str(hr_dir), sr=[str(sr_dir)], scale=4, n=1, no_lpips=True)
    # the key as an srspace before --lr-blur made it (its flags and settings had none)
    skip = ("out", "csv", "report", "quiet", "json", "device", "lpips_batch", "lr_blur")
    typed = {k: v for k, v in dataclasses.asdict(args).items() if k not in skip}
    what = {"columns": ["LRPSNR_mean"], "args": typed}
    before = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    settings = {"columns": ["LRPSNR_mean"], "lr_blur": None}
    assert sr_eval.scores_key(args, settings) == before
    blurred = dataclasses.replace(args, lr_blur="2.0")
    assert sr_eval.scores_key(blurred, {**settings, "lr_blur": "2.0"}) != before


@pytest.mark.parametrize("layout", ["suffix", "ntire"])
def test_each_images_sigma_is_drawn_by_the_stem_sr_sample_seeded(tmp_path, capsys, layout):
    """HR inputs named as DIV2K's LR (0801x4.png), sampled by sr_sample.py --from-hr
    --lr-blur 0.2:3 (its draws seeded by the input's stem, 0801x4) and scored against the GT
    0801.png, their samples named 0801x4.png or 000000.png with an ntire_index.json: each
    image's sigma was drawn by the GT's stem (0801), another than its LR's, so a perfect
    sample scored below +inf against that LR; it is drawn by the stem the samples were made
    from."""
    hr_dir, lr_dir, sr_dir = blurred_set(tmp_path, "0.2:3.0")
    flags = SimpleNamespace(bit_depth=8, alpha_channel="keep", lr_blur="0.2:3.0", lr_noise="",
                            lr_jpeg="")  # fmt: skip
    index = {"scale": 4}
    for k, stem in enumerate(STEMS):
        (sr_dir / f"{stem}.png").unlink()
        named = tmp_path / f"{stem}x4.png"  # (the input sr_sample.py read)
        named.write_bytes((hr_dir / f"{stem}.png").read_bytes())
        sr_sample.read_input(named, 4, True, lr_dir / f"{stem}x4.png", flags)
        (lr_dir / f"{stem}.png").unlink()
        sample = f"{k:06d}.png" if layout == "ntire" else named.name
        (sr_dir / sample).write_bytes(named.read_bytes())
        index[f"{k:06d}"] = f"{stem}x4"
    if layout == "ntire":
        (sr_dir / "ntire_index.json").write_text(json.dumps(index))
    res = scores(capsys, tmp_path, hr_dir, lr_dir, sr_dir, "--lr-blur", "0.2:3")
    assert [r["LRPSNR_vs_input_mean"] for r in res["per_image"]] == ["inf", "inf"]
