"""sr_eval.py: its out-of-memory line, the temperature of a folder whose latents a control set,
and the --json line's results and csv after a run that wrote no file there."""

import dataclasses
import json
import re

import imageio.v3 as iio
import numpy as np
import pytest

import sr_eval
import sr_lib.metrics
import sr_sample
import sr_train
from sr_lib.errors import exit_on_error

SCALE, N = 4, 2


def make_set(root, count=2, size=32):
    """`count` HR images and N samples of each (HR plus seeded noise), index layout."""
    hr_dir, sr_dir = root / "hr", root / "sr"
    hr_dir.mkdir(parents=True)
    sr_dir.mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        hr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        iio.imwrite(hr_dir / f"{k:04d}.png", hr)
        for i in range(N):
            noise = rng.integers(-8, 9, hr.shape)
            sr = np.clip(hr.astype(int) + noise, 0, 255).astype(np.uint8)
            iio.imwrite(sr_dir / f"{k:06d}_sample{i:05d}.png", sr)
    return hr_dir, sr_dir


def out_of_memory_at(monkeypatch, image: int, error: BaseException):
    """sr_lib.metrics.evaluate_image raising `error` on the `image`-th HR image (from 0)."""
    real, calls = sr_lib.metrics.evaluate_image, []

    def evaluate(gt, samples, **kwargs):
        calls.append(kwargs["gt_name"])
        if len(calls) == image + 1:
            raise error
        return real(gt, samples, **kwargs)

    monkeypatch.setattr(sr_lib.metrics, "evaluate_image", evaluate)


@pytest.mark.parametrize(
    "error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")]
)
def test_out_of_memory_names_sr_evals_own_flags_and_the_scores_kept(
    tmp_path, capsys, monkeypatch, error
):
    """The line said "use a smaller --batch or --tile", flags of sr_sample.py that sr_eval.py
    has not, and not that the scores of the images done were kept. Now exit 4, one line naming
    --lpips-batch, --device cpu and --no-lpips and where the scores so far are, which a rerun
    continues from."""
    hr_dir, sr_dir = make_set(tmp_path)
    out = tmp_path / "res" / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", N, "--no-lpips", "--out",
            out, "--json", "--quiet"]  # fmt: skip
    argv = [str(a) for a in argv]
    out_of_memory_at(monkeypatch, 1, error)
    with pytest.raises(SystemExit) as e:
        sr_eval.main(argv)
    got = capsys.readouterr()
    said = (
        f"{sr_eval.OUT_OF_MEMORY}; the scores of 1 of 2 images are kept in {out}.partial: fix "
        "that and rerun the same command to continue"
    )
    assert e.value.code == 4
    assert got.err.splitlines() == [f"sr_eval.py: error: {said}"]
    assert "--lpips-batch" in said and "--device cpu" in said and "--no-lpips" in said
    assert "--batch " not in said and "--tile" not in said
    line = json.loads(got.out.splitlines()[-1])
    assert (line["exit_code"], line["error"], line["scored"], line["kept"]) == (4, said, 1, 1)
    monkeypatch.undo()  # the rerun continues from the image kept
    assert sr_eval.main(argv) == 0
    assert "continuing" not in capsys.readouterr().err  # (--quiet)
    assert json.loads(out.read_text())["settings"]


@pytest.mark.parametrize(
    "script, args",
    [
        (sr_eval, sr_eval.EvalArgs),
        (sr_sample, sr_sample.SampleArgs),
        (sr_train, sr_train.TrainArgs),
    ],  # fmt: skip
)
def test_each_scripts_out_of_memory_line_names_its_own_flags(script, args, capsys):
    """Every script said "use a smaller --batch or --tile": sr_eval.py has neither flag,
    sr_train.py no --tile. Each names flags of its own now, and an out-of-memory error that no
    code caught is that line, exit 4."""
    flags = re.findall(r"--([a-z][a-z-]*)", script.OUT_OF_MEMORY)
    own = {f.name.replace("_", "-") for f in dataclasses.fields(args)}
    assert flags and set(flags) <= own, (flags, script.PROG)
    with pytest.raises(SystemExit) as e, exit_on_error(script.PROG, script.OUT_OF_MEMORY):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert e.value.code == 4
    assert capsys.readouterr().err == f"{script.PROG}: error: {script.OUT_OF_MEMORY}\n"
