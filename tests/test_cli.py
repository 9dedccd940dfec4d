"""End to end through the three scripts' main(argv): train -> last.pt -> sample -> evaluate."""

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch.torch_version import TorchVersion

import sr_eval
import sr_sample
import sr_train
from sr_lib import refuse_non_posix
from sr_lib.checkpoint import load_checkpoint, save_checkpoint
from sr_lib.config import NO_POSITIVE_FORM, OneLineParser, option_strings, parse
from sr_lib.data import read_image, write_text
from sr_lib.errors import OLDEST_TORCH, OutputError, UsageError, exit_on_error
from sr_lib.metrics import psnr
from sr_lib.models import MODELS
from sr_lib.models.base import sample_seed
from sr_lib.resize import imresize

REPO = Path(__file__).resolve().parents[1]


def blocks(h: int, w: int, rng) -> np.ndarray:
    """A smooth uint8 HR image of (8h, 8w): random colours in 8x8 blocks."""
    return (np.kron(rng.random((h, w, 3)), np.ones((8, 8, 1))) * 255).astype(np.uint8)


def test_train_sample_evaluate(tmp_path):
    rng = np.random.default_rng(0)
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for i in range(2):
        iio.imwrite(hr_dir / f"im{i}.png", blocks(10, 12, rng))  # 80x96
    run = tmp_path / "run"
    argv = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "4",
            "--data", str(hr_dir), "--patch", "8", "--batch", "2", "--steps", "2",
            "--workers", "0", "--val-data", str(hr_dir), "--val-every", "2", "--val-n", "1",
            "--out", str(run)]  # fmt: skip
    assert sr_train.main(argv) == 0
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("val_psnr" in r for r in log) and any("loss" in r for r in log)
    assert len(list((run / "val").glob("*.png"))) == 2

    samples = tmp_path / "samples"
    argv = ["--ckpt", str(run / "last.pt"), "--input", str(hr_dir), "--from-hr", "--n", "2",
            "--out", str(samples)]  # fmt: skip
    assert sr_sample.main(argv) == 0
    assert sorted(p.name for p in samples.glob("*_sample*.png")) == [
        "im0_sample00000.png", "im0_sample00001.png", "im1_sample00000.png", "im1_sample00001.png"
    ]  # fmt: skip

    results = tmp_path / "results.json"
    argv = ["--hr", str(hr_dir), "--sr", str(samples), "--scale", "4", "--n", "2", "--no-lpips",
            "--out", str(results)]  # fmt: skip
    assert sr_eval.main(argv) == 0
    res = json.loads(results.read_text())
    assert [r["image"] for r in res["per_image"]] == ["im0", "im1"]
    # Independent check of one number: PSNR against the ground truth, `scale` pixels shaved.
    hr = read_image(hr_dir / "im0.png")[4:-4, 4:-4]
    srs = [read_image(samples / f"im0_sample{i:05d}.png")[4:-4, 4:-4] for i in range(2)]
    expect = np.mean([psnr(sr, hr) for sr in srs])
    assert abs(res["per_image"][0]["PSNR_mean"] - expect) < 1e-9
    assert res["settings"]["scale"] == 4 and res["settings"]["n"] == 2
    # EDSR ignores the temperature: none is reported (its manifest records the one it was given)
    assert res["settings"]["temperature"] is None
    assert json.loads((samples / "manifest.json").read_text())["temperature"] == 1.0
    # which weights the numbers are of: the checkpoint that made the samples, hashed here
    ckpt_sha256 = hashlib.sha256((run / "last.pt").read_bytes()).hexdigest()
    assert (res["settings"]["model"], res["settings"]["checkpoint_sha256"]) == ("edsr", ckpt_sha256)
    # ... for each row of a comparison, and null for a folder that no sr_sample.py made
    other = tmp_path / "other"
    shutil.copytree(samples, other, ignore=shutil.ignore_patterns("manifest.json", "lr"))
    argv.insert(argv.index(str(samples)) + 1, str(other))  # --sr SAMPLES OTHER
    assert sr_eval.main(argv) == 0
    methods = json.loads(results.read_text())["methods"]
    assert [(m["model"], m["checkpoint_sha256"]) for m in methods.values()] == [
        ("edsr", ckpt_sha256), (None, None)
    ]  # fmt: skip


def test_a_wrong_scale_is_caught_by_the_samples_manifest(tmp_path, capsys):
    """Without --lr, x2 samples scored at --scale 4 give numbers (LR-PSNR of the wrong
    downscale); sr_sample.py's manifest.json says what they are."""
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    iio.imwrite(hr_dir / "a.png", blocks(4, 4, np.random.default_rng(2)))  # 32x32
    run = tmp_path / "run"
    argv = ["--model", "bicubic", "--scale", "2", "--data", str(hr_dir), "--steps", "0",
            "--val-every", "0", "--out", str(run)]  # fmt: skip
    assert sr_train.main(argv) == 0
    samples = tmp_path / "s"
    argv = ["--ckpt", str(run / "last.pt"), "--input", str(hr_dir), "--from-hr", "--n", "1",
            "--out", str(samples)]  # fmt: skip
    assert sr_sample.main(argv) == 0
    capsys.readouterr()
    argv = ["--hr", str(hr_dir), "--sr", str(samples), "--scale", "4", "--n", "1", "--no-lpips"]
    with pytest.raises(SystemExit) as e:
        sr_eval.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{samples / 'manifest.json'}: these samples are x2, not --scale 4" in err
    assert sr_eval.main([*argv[:5], "2", *argv[6:]]) == 0


def test_uncertainty_maps_are_evaluated(tmp_path):
    """edsr --loss le -> sr_sample --save-uncertainty -> sr_eval --uncertainty (PLL, PSNR_sigma)."""
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    iio.imwrite(hr_dir / "a.png", blocks(6, 8, np.random.default_rng(1)))
    run = tmp_path / "run"
    argv = ["--model", "edsr", "--loss", "le", "--n-feats", "8", "--n-blocks", "1",
            "--le-sigma-feats", "8", "--scale", "2", "--data", str(hr_dir), "--patch", "8",
            "--batch", "2", "--steps", "1", "--workers", "0", "--val-every", "0",
            "--out", str(run)]  # fmt: skip
    assert sr_train.main(argv) == 0
    out = tmp_path / "s"
    argv = ["--ckpt", str(run / "last.pt"), "--input", str(hr_dir), "--from-hr", "--n", "1",
            "--save-uncertainty", "--out", str(out)]  # fmt: skip
    assert sr_sample.main(argv) == 0
    res = tmp_path / "r.json"
    argv = ["--hr", str(hr_dir), "--sr", str(out), "--scale", "2", "--n", "1", "--no-lpips",
            "--uncertainty", str(out), "--out", str(res)]  # fmt: skip
    assert sr_eval.main(argv) == 0
    row = json.loads(res.read_text())["per_image"][0]
    # independently: Gaussian log-density of the ground truth under N(mu, sigma^2), [0, 1] scale
    y = read_image(hr_dir / "a.png").astype(np.float64) / 255
    mu = read_image(out / "a.png").astype(np.float64) / 255
    s = np.maximum(np.load(out / "a_sigma.npy").transpose(1, 2, 0).astype(np.float64), 1e-6)
    pll = np.mean(-0.5 * np.log(2 * np.pi * s**2) - (y - mu) ** 2 / (2 * s**2))
    assert abs(row["PLL"] - pll) < 1e-9
    mse = np.mean((s - np.abs(y - mu)) ** 2)
    assert abs(row["PSNR_sigma"] - 10 * np.log10(1 / mse)) < 1e-9


def test_the_scripts_start_without_loading_torch_compile(tmp_path):
    """torch._dynamo takes ~1.3 s of CPU to import: the scripts load it only for --compile and
    torch's optimizers (a batch pipeline starts sr_sample.py and sr_eval.py once per job, the
    tests dozens of times). A model without weights (bicubic) builds no optimizer, yet its run
    loaded it at the end, putting back torch's determinism setting unchanged; the first resize
    (sr_sample.py's bicubic, sr_eval.py's LR-PSNR) loaded it too. scipy's ndimage (~0.2 s) is
    loaded by the first SSIM, which sr_train.py and sr_sample.py never compute."""
    code = """import sys, sr_train, sr_sample, sr_eval
out, slow = sys.argv[1], {"torch._dynamo", "scipy.ndimage"}
assert sr_train.main(["--model", "bicubic", "--steps", "0", "--val-every", "0", "--quiet",
                      "--out", out + "/run"]) == 0
assert sr_sample.main(["--ckpt", out + "/run/last.pt", "--input", "demo", "--n", "1", "--quiet",
                       "--out", out + "/sr"]) == 0
print(sorted(set(sys.modules) & slow))
assert sr_eval.main(["--hr", "demo", "--sr", out + "/sr", "--lr", out + "/sr/lr", "--n", "1",
                     "--scale", "4", "--no-lpips", "--quiet", "--csv", out + "/scores.csv"]) == 0
print(sorted(set(sys.modules) & slow))"""
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["[]", "['scipy.ndimage']"]
    assert (tmp_path / "scores.csv").is_file()


@pytest.mark.parametrize("script", [sr_train, sr_sample, sr_eval])
def test_a_too_old_torch_is_one_line_at_start(script, capsys, monkeypatch):
    """torch 2.5 lacks what the training step calls: it stopped at the first step with an
    AttributeError (after the loader had started). Now one line, before anything is read."""
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1+cu121"))
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{script.PROG}: error: torch 2.5.1+cu121 is too old: srspace needs torch "
                   ">= 2.6 (pip install -r requirements.txt)"]  # fmt: skip
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.6.0+cpu"))
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0  # --help: the oldest torch srspace runs with


# Windows as far as the scripts can tell: no fcntl, no SIGUSR1/SIGHUP, no select.poll, os.name nt
WINDOWS = """import os, runpy, select, signal, sys
sys.modules["fcntl"] = None
del signal.SIGUSR1, signal.SIGHUP, select.poll
os.name = "nt"
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["sr_train.py", "sr_sample.py", "sr_eval.py"])
def test_a_system_that_is_not_posix_is_one_line_at_start(script):
    """On Windows the scripts stopped at import with a traceback (sr_train.py: fcntl; the others:
    signal.SIGUSR1 in sr_lib/errors.py). Now one line naming the systems srspace runs on, exit 2,
    before those imports."""
    done = subprocess.run([sys.executable, "-c", WINDOWS, script], capture_output=True,
                          text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"{script}: error: srspace runs on Linux and macOS (POSIX): this system is not "
        "(os.name 'nt'); on Windows use WSL 2"
    ]
    assert done.stdout == ""


# A Python without torch installed, as far as the scripts can tell
NO_TORCH = """import runpy, sys
sys.modules["torch"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["sr_train.py", "sr_sample.py", "sr_eval.py"])
def test_a_python_without_the_requirements_is_one_line_at_start(script):
    """A venv where `pip install -r requirements.txt` was not run: each script stopped with
    ModuleNotFoundError's traceback. One line naming the package and the command, exit 2; with
    --json the pipeline's line too."""
    for argv, stdout in (([script, "--help"], []), ([script, "--json", "--help"], [2])):
        done = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True,
                              text=True, cwd=REPO, timeout=120)  # fmt: skip
        assert done.returncode == 2, done.stderr
        what = (f"this Python ({sys.executable}) lacks the package torch (no module torch); "
                "install the requirements: pip install -r requirements.txt")  # fmt: skip
        assert done.stderr.splitlines() == [f"{script}: error: {what}"]
        records = [json.loads(line) for line in done.stdout.splitlines()]
        assert records == [{"script": script, "exit_code": 2, "error": what} for _ in stdout]


# A library that warns as it is imported, in two lines (torch does about a NumPy it was not built
# against), as far as the scripts can tell
NOISY_IMPORT = """import runpy, sys, warnings
class Noisy:
    def find_spec(self, name, path=None, target=None):
        if name == "rich":
            warnings.warn_explicit("rich was built for another NumPy:\\n  some modules may fail",
                                   UserWarning, "/usr/lib/python3/dist-packages/rich/x.py", 1)
sys.meta_path.insert(0, Noisy())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_warning_while_the_script_imports_its_packages_is_one_line():
    """A warning raised while a script imports its packages, before exit_on_error's formatter is
    in place, was Python's own: `FILE:LINE: UserWarning: TEXT`, its text's lines raw. Now the
    run's one line, the library's lines joined (`require_packages`, the three scripts' own)."""
    script = "sr_eval.py"
    done = subprocess.run([sys.executable, "-c", NOISY_IMPORT, script, "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"{script}: warning: rich was built for another NumPy: some modules may fail"
    ]


def test_a_virtual_memory_limit_too_low_for_torch_is_one_line_at_start():
    """A login node's `ulimit -v` below what torch's libraries map (~3.3 GB for this CUDA build;
    here 400 MB, less than libtorch_cpu.so's size alone, and enough for Python and numpy): the
    script stopped with ImportError's traceback ("failed to map segment from shared object").
    One line naming the limit and what to do, exit 2."""
    import resource

    limit = 400 * 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "sr_eval.py", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS,
                                                                (limit, limit)))  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("sr_eval.py: error: torch cannot be loaded within this process's "
                           "virtual memory limit (ulimit -v: 400 MB; "), line  # fmt: skip
    assert line.endswith("failed to map segment from shared object); raise it (ulimit -v "
                         "unlimited) or run where there is no such limit"), line  # fmt: skip
    assert done.stdout == ""


def test_sr_eval_loads_scipys_openblas_at_its_start():
    """scipy.ndimage (SSIM's filter) was imported at the first SSIM; loading it starts the
    OpenBLAS scipy bundles, which spun forever, deaf to SIGTERM and Ctrl-C, where its buffers
    did not fit under a `ulimit -v` (seen with 60 MB left below the limit, the images decoded
    by then). sr_eval.py loads it at its start, where they fit."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['sr_eval.py', '--help']\n"
             "try:\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('scipy.ndimage' in sys.modules, file=sys.stderr)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert done.stderr.splitlines() == ["True"], done.stderr


def test_a_posix_system_is_not_refused(capsys):
    refuse_non_posix("sr_train.py", "posix")  # returns
    with pytest.raises(SystemExit) as e:
        refuse_non_posix("sr_train.py", "nt")
    assert e.value.code == 2 and "Linux and macOS" in capsys.readouterr().err


def test_the_oldest_torch_is_the_one_the_requirements_name():
    """The start check, requirements.txt and .ci/oldest.txt (the suite's run at the lower bounds)
    name one version."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    floor = [line.split("#")[0].strip() for line in lines]
    assert f"torch>={OLDEST_TORCH}" in floor
    assert f"torch=={OLDEST_TORCH}.0" in (REPO / ".ci" / "oldest.txt").read_text().split()


def test_standard_streams_closed_at_start_are_taken_as_dev_null(tmp_path):
    """`script >&- 2>&- <&-`: Python leaves sys.stdout None, and each script stopped with an
    AttributeError traceback before any work; the first file opened would also have taken file
    descriptor 1, where C++ code writing to stdout writes. Now all three run as with /dev/null."""
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    iio.imwrite(hr_dir / "a.png", blocks(8, 8, np.random.default_rng(4)))
    closed = ["bash", "-c", 'exec "$@" >&- 2>&- <&-', "-", sys.executable]
    run, samples, table = tmp_path / "run", tmp_path / "samples", tmp_path / "r.csv"
    for cmd in (
        ["sr_train.py", "--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "4",
         "--data", str(hr_dir), "--patch", "8", "--batch", "2", "--steps", "2",
         "--workers", "1", "--out", str(run)],
        ["sr_sample.py", "--ckpt", str(run / "last.pt"), "--input", str(hr_dir), "--from-hr",
         "--n", "1", "--out", str(samples)],
        ["sr_eval.py", "--hr", str(hr_dir), "--sr", str(samples), "--scale", "4", "--n", "1",
         "--no-lpips", "--csv", str(table)],
    ):  # fmt: skip
        done = subprocess.run(closed + cmd, cwd=REPO, capture_output=True, timeout=120)
        assert done.returncode == 0, cmd[0]
        assert done.stdout == done.stderr == b""  # nothing reaches the caller's pipes
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2
    assert read_image(samples / "a.png").shape == (64, 64, 3)
    assert table.read_text().splitlines()[1].startswith("samples,")


def test_sample_seed_hashes_the_name_as_its_bytes():
    """A name that is not UTF-8 reaches Python with its bytes as surrogates; a UTF-8 name keeps
    the seed it always had (sample sets made before stay reproducible)."""
    for name, raw in (("café", "café".encode()), (os.fsdecode(b"caf\xe9"), b"caf\xe9")):
        digest = hashlib.sha256(b"7/" + raw + b"/3").digest()
        assert sample_seed(7, name, 3) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert sample_seed(7, os.fsdecode(b"caf\xe9"), 3) != sample_seed(7, "café", 3)


NAMES = [b"caf\xe9", "café".encode(), b"plain"]  # latin-1 (not UTF-8), UTF-8, ASCII


@pytest.fixture
def odd_names(tmp_path):
    """HR and paired LR images under names from an old latin-1 archive: file names are bytes,
    and these bytes are not UTF-8 (Linux allows it)."""
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir(), lr_dir.mkdir()
    rng = np.random.default_rng(2)
    for raw in NAMES:
        hr = blocks(8, 8, rng)
        try:
            iio.imwrite(hr_dir / (os.fsdecode(raw) + ".png"), hr)
        except (OSError, UnicodeError):  # a file system that requires UTF-8 names (not Linux)
            pytest.skip("this file system refuses a name that is not UTF-8")
        iio.imwrite(lr_dir / (os.fsdecode(raw) + ".png"), imresize(hr, 1 / 4))
    return hr_dir, lr_dir


def test_names_that_are_not_utf8_train_sample_and_evaluate(tmp_path, odd_names, capsys):
    """Each of these stopped with a UnicodeEncodeError traceback: the --cache key, the sample
    seed, a TensorBoard tag, a printed name on a strict UTF-8 stdout, the --csv file, a method
    (a folder) named so in the --report plots. TensorBoard cannot write to such a folder: one
    line. The table stays aligned with the name's escapes in it."""
    hr_dir, lr_dir = odd_names
    with pytest.raises(SystemExit) as e:  # before any work; a UTF-8 --out works below
        sr_train.main(["--model", "edsr", "--scale", "4", "--data", str(hr_dir), "--tensorboard",
                       "--out", os.fsdecode(bytes(tmp_path) + b"/r\xe9")])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("/r\\xe9 (a folder name that is not UTF-8); give another --out"), err
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "4",
            "--data", str(hr_dir), "--lr-data", str(lr_dir), "--patch", "8", "--batch", "2",
            "--steps", "2", "--workers", "1", "--cache", str(cache), "--val-data", str(hr_dir),
            "--val-every", "2", "--val-n", "1", "--tensorboard", "--out", str(run)]  # fmt: skip
    assert sr_train.main(argv) == 0
    cached = sorted(os.listdir(os.fsencode(cache)))
    assert [name.rsplit(b"-", 1)[0] for name in cached] == sorted(NAMES * 2)
    assert sorted(os.listdir(os.fsencode(run / "val"))) == sorted(
        b"step0000002_" + raw + b".png" for raw in NAMES
    )
    samples = tmp_path / os.fsdecode(b"samples\xe9")  # the method's name in sr_eval.py
    argv = ["--ckpt", str(run / "last.pt"), "--input", str(lr_dir), "--n", "2",
            "--out", str(samples)]  # fmt: skip
    assert sr_sample.main(argv) == 0
    made = set(os.listdir(os.fsencode(samples)))
    assert {raw + b"_sample0000%d.png" % i for raw in NAMES for i in (0, 1)} <= made
    argv = ["--hr", str(hr_dir), "--sr", str(samples), "--scale", "4", "--n", "2", "--no-lpips",
            "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "r.json"),
            "--report", str(tmp_path / "report")]  # fmt: skip
    assert sr_eval.main(argv) == 0
    rows = (tmp_path / "r.csv").read_bytes().splitlines()[1:]
    assert sorted(row.split(b",")[3] for row in rows) == sorted(NAMES)  # the files' own bytes
    result = json.loads((tmp_path / "r.json").read_text())
    assert sorted(r["image"] for r in result["per_image"]) == sorted(map(os.fsdecode, NAMES))
    assert b"caf\xe9" in (tmp_path / "report" / "index.html").read_bytes()
    assert len(list((tmp_path / "report" / "plots").iterdir())) >= 1  # labelled plots
    out = capsys.readouterr().out  # pytest's stdout is strict UTF-8, as in a UTF-8 terminal
    assert "caf\\xe9.png" in out and "[3/3]" in out  # sr_sample.py's progress
    table = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]
    assert any(line.startswith("│ samples\\xe9 │") for line in table), table
    assert len({len(line) for line in table}) == 1, table  # the borders line up


def test_a_name_near_the_length_limit_trains_with_a_cache_and_validation(tmp_path):
    """A 249-byte stem (83 CJK characters) made cache and validation file names longer than the
    255 bytes a file system takes: a traceback, and exit 7 at the first validation. Now they
    are cut at a character, with a hash (sr_lib.data.fit_name)."""
    stem = "猫" * 83
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    iio.imwrite(hr_dir / f"{stem}.png", blocks(8, 8, np.random.default_rng(3)))
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--model", "edsr", "--n-feats", "8", "--n-blocks", "1", "--scale", "4",
            "--data", str(hr_dir), "--patch", "8", "--batch", "2", "--steps", "2",
            "--workers", "0", "--cache", str(cache), "--val-data", str(hr_dir),
            "--val-every", "2", "--val-n", "1", "--out", str(run)]  # fmt: skip
    assert sr_train.main(argv) == 0
    names = [p.name for p in cache.iterdir()] + [p.name for p in (run / "val").iterdir()]
    assert len(names) == 3 and all(len(name.encode()) <= 255 for name in names), names
    assert all(name.startswith(("猫" * 70, "step0000002_" + "猫" * 70)) for name in names)


def test_help_and_table_on_an_ascii_or_latin1_terminal(tmp_path, odd_names, monkeypatch):
    """A σ in a help text stopped `-h` with a traceback on an ASCII terminal; the table's box
    characters came out as backslash escapes. Now escapes in the text, ASCII borders. The C
    locale (stdout ASCII with surrogateescape) in a Python of its own; PYTHONIOENCODING=ascii,
    which only makes stdout strict ASCII, as that stdout in this process."""
    help_line = b"--le-beta LE_BETA     \\u03b2 of the \\u03c3 auxiliary loss"
    ascii_c = dict(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")  # surrogateescape
    cmd = [sys.executable, "sr_train.py", "--model", "edsr", "-h"]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ascii_c}, capture_output=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert help_line in done.stdout
    strict = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")  # as Python's
    monkeypatch.setattr(sys, "stdout", strict)
    monkeypatch.setenv("COLUMNS", "80")  # argparse's width: as in a pipe, whatever the terminal
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "edsr", "-h"])
    strict.flush()
    assert e.value.code == 0 and help_line in strict.buffer.getvalue()
    assert strict.errors == "strict"  # put back
    hr_dir, _ = odd_names
    sr_dir = tmp_path / "σ-run"  # not in latin-1: an escape in the table
    sr_dir.mkdir()
    for raw in NAMES:  # the ground truth as its own sample
        name = os.fsdecode(raw)
        (sr_dir / f"{name}_sample00000.png").write_bytes((hr_dir / f"{name}.png").read_bytes())
    env = dict(os.environ, PYTHONIOENCODING="latin-1")
    done = subprocess.run([sys.executable, "sr_eval.py", "--hr", str(hr_dir), "--sr", str(sr_dir),
                           "--scale", "4", "--n", "1", "--no-lpips"], cwd=REPO, env=env,
                          capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    table = [line for line in done.stdout.decode("latin-1").splitlines() if line[:1] in "+|"]
    assert any(line.startswith("| \\u03c3-run |") for line in table), table
    assert len({len(line) for line in table}) == 1, table  # the borders line up
    assert "\\u25" not in done.stdout.decode("latin-1")  # no escaped box characters


def test_a_list_flags_value_starting_with_a_dash_is_kept_after_an_equals_sign():
    """`--sr=-run1` (argparse's way to give a value starting with '-') was refused as "argument
    --sr: expected at least one argument": the merge of repeated list flags wrote it back as
    `--sr -run1`. Several values where one starts with '-' are one line naming it."""
    args = parse(sr_eval.EvalArgs, ["--hr=-hr", "--sr=-run1", "--scale", "4", "--n", "1"], "p")
    assert (args.hr, args.sr) == ("-hr", ["-run1"])
    args, _, given = sr_train.parse_all(["--data=-hr", "--lr-data", "lr"])
    assert (args.data, args.lr_data, "data" in given) == (["-hr"], ["lr"], True)
    with pytest.raises(UsageError, match=r"--sr -a -b: -a starts with '-'; give it as \./-a"):
        parse(
            sr_eval.EvalArgs, ["--hr", "h", "--sr=-a", "--sr=-b", "--scale", "4", "--n", "1"], "p"
        )


def test_an_unknown_flag_names_the_nearest_flags(tmp_path, capsys):
    """A typo was "unrecognized arguments: --stpes 3" alone; the line names the flags nearest in
    spelling now, sr_train.py's run flags too at its model's parse (which sees the flags left
    over), and none where no flag is near."""
    argv = ["--model", "edsr", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        sr_train.main([*argv, "--stpes", "3", "--n-fets=8"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "sr_train.py: error: unrecognized arguments: --stpes 3 --n-fets=8 (did you mean --steps "
        "or --n-feats?); see sr_train.py --model edsr -h\n"
    )
    with pytest.raises(UsageError) as e:
        parse(
            sr_eval.EvalArgs, ["--hr", "h", "--sr", "s", "--scale", "4", "--n", "1", "--bogus"], "p"
        )
    assert str(e.value) == "unrecognized arguments: --bogus; see p -h"


@pytest.mark.parametrize("script, argv, said", [
    (sr_train, ["--re", "auto"], "--re could match --resume, --requeue; see sr_train.py -h"),
    (sr_train, ["--model", "vspsr", "--cem"],  # (the model's flags: its own parse)
     "--cem could match --cem-train, --cem-test; see sr_train.py --model vspsr -h"),
    (sr_sample, ["--lr", "3"], "--lr could match --lr-blur, --lr-noise, --lr-jpeg; see "
     "sr_sample.py -h"),
    (sr_eval, ["--lp", "x"], "--lp could match --lpips-weights, --lpips, --lpips-batch; see "
     "sr_eval.py -h"),
])  # fmt: skip
def test_an_ambiguous_abbreviation_is_one_line_naming_its_flags(script, argv, said, capsys):
    """An abbreviation that starts several flags is refused as argparse does (which one was
    meant cannot be told): one line naming them, exit 2, before any work, in each script."""
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert (e.value.code, capsys.readouterr()) == (
        2, ("", f"{script.PROG}: error: ambiguous option: {said}\n"))  # fmt: skip


def test_a_dash_given_to_a_list_flag_is_named_as_no_standard_input():
    """`--data -` said "argument --data: expected at least one argument" and `--data a -`
    "unrecognized arguments: -" (the merge of repeated list flags took `-` for a flag, as argparse
    does not): it is the value, refused by its own line."""
    stdio = r"--data -: standard input or output cannot be used here"
    for argv in (["--data", "-"], ["--data", "a", "-"], ["--data", "a", "--data", "-"]):
        with pytest.raises(UsageError, match=stdio):
            sr_train.parse_all(argv)
    args = parse(sr_eval.EvalArgs, ["--hr", "h", "--sr", "a", "-", "--scale", "4", "--n", "1"], "p")
    assert args.sr == ["a", "-"]


def test_an_unknown_model_is_one_line_before_the_help(capsys):
    """`sr_train.py --model nope --help` printed the run's help (exit 0) without a word that nope
    is no model; it is the usage line now (exit 2), -h or not, naming the nearest model where one
    is near, as a mistyped choice of the other scripts' flags does."""
    models = "bicubic, edsr, rrdb, srflow, srflow_da, ncsr, vspsr, refvae, varsr"
    for argv in (["--model", "nope", "--help"], ["--model=edsrr", "-h"], ["--model", "edsrr"]):
        with pytest.raises(SystemExit) as e:
            sr_train.main(argv)
        got = argv[0].split("=")[1] if "=" in argv[0] else argv[1]
        near = " (did you mean edsr?)" if got == "edsrr" else ""
        assert (e.value.code, capsys.readouterr()) == (
            2,
            ("", f"sr_train.py: error: --model {got}: choose one of {models}{near}\n"),
        )
    with pytest.raises(
        UsageError, match=r"^--model srflowda: choose one of .*\(did you mean srflow_da\?\)$"
    ):
        parse(sr_sample.SampleArgs, ["--ckpt", "c", "--input", "l", "--model", "srflowda"], "p")


def test_a_switch_on_by_default_takes_its_positive_form_too(capsys):
    """`--no-requeue` had no `--requeue` (nor `--no-pretrained` a `--pretrained`...): a pipeline
    that builds the flags from variables could not say the default. Every switch on by default,
    of the run and of each model, takes both forms now; the last one given wins; -h shows both."""
    switches = [(sr_train.TrainArgs, "requeue")] + [
        (m.Config, f.name)
        for m in dict.fromkeys(MODELS.values())
        for f in dataclasses.fields(m.Config)
        if f.default is True and f"--no-{f.name.replace('_', '-')}" not in NO_POSITIVE_FORM
    ]
    assert len(switches) >= 2
    for cls, name in switches:
        on, off = "--" + name.replace("_", "-"), "--no-" + name.replace("_", "-")
        for argv, value in (([on], True), ([off], False), ([on, off], False), ([off, on], True)):
            args, _ = parse(cls, argv, "p", known=True)
            assert (argv, getattr(args, name)) == (argv, value)
        assert getattr(parse(cls, [], "p", known=True)[0], name) is True
    with pytest.raises(SystemExit) as e:
        sr_train.main(["--model", "vspsr", "-h"])
    assert e.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "[--no-requeue] [--requeue]" in shown
    assert "--no-requeue under SLURM, do not requeue the job" in shown
    assert "--requeue the default; undoes a --no-requeue given before it" in shown
    assert "--no-refine-m m without the small learned conv U the code adds --refine-m the " in shown
    args, _, given = sr_train.parse_all(["--requeue"])
    assert (args.requeue, "requeue" in given) == (True, True)
    varsr = MODELS["varsr"]  # a flag of no effect is named in the form given
    for flag in ("--pretrained", "--no-pretrained"):
        cfg = parse(varsr.Config, ["--lambda-per", "0", flag], "p")
        with pytest.warns(UserWarning, match=f"^{flag}: no effect with --lambda-per 0; ignored"):
            sr_train.warn_unused(varsr, cfg, {"pretrained"})


def test_a_no_switch_off_by_default_takes_its_positive_form_too(capsys):
    """sr_eval.py's --no-lpips (a `no_lpips` field off by default: a store_true `--no-X`, not the
    `X` field on by default of the switches above) had no --lpips: `$LPIPS_FLAG` could not say
    the default (argparse took `--lpips` as an ambiguous start of --lpips-weights and
    --lpips-batch). Every such switch of the three scripts takes --X now, the last one given
    winning, the field and so the kept scores' key as they were; -h shows both."""
    scripts = (sr_train.TrainArgs, sr_sample.SampleArgs, sr_eval.EvalArgs)
    switches = [(cls, f.name) for cls in scripts for f in dataclasses.fields(cls)
                if f.name.startswith("no_") and f.default is False]  # fmt: skip
    assert (sr_eval.EvalArgs, "no_lpips") in switches
    base = ["--hr", "h", "--sr", "s", "--scale", "4", "--n", "1"]
    for cls, name in switches:
        off, on = "--" + name.replace("_", "-"), "--" + name[3:].replace("_", "-")
        for argv, value in (([], False), ([off], True), ([on], False), ([off, on], False),
                            ([on, off], True)):  # fmt: skip
            args, _ = parse(cls, [*(base if cls is sr_eval.EvalArgs else []), *argv], "p",
                            known=True)  # fmt: skip
            assert (argv, getattr(args, name)) == (argv, value)
    with pytest.raises(SystemExit) as e:
        sr_eval.main(["-h"])
    assert e.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "[--no-lpips] [--lpips]" in shown
    assert "--lpips the default; undoes a --no-lpips given before it" in shown


def test_no_model_flag_is_also_a_run_flag(capsys):
    """sr_train.py reads its run flags first: a model flag of a run flag's name was the run
    flag's. NCSR's --lr-noise (the positive form of --no-lr-noise) was sr_train.py's --lr-noise
    SIGMA: `--no-lr-noise --lr-noise`, as -h offered, was exit 2, 'expected one argument'."""
    run = set(option_strings(OneLineParser(sr_train.TrainArgs, prog="p")))
    for name, m in MODELS.items():
        own = set(option_strings(OneLineParser(m.Config, prog="p"))) - {"-h", "--help", "--scale"}
        assert not own & run, (name, own & run)
    with pytest.raises(SystemExit):
        sr_train.main(["--model", "ncsr", "-h"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "[--no-lr-noise]" in shown and "[--lr-noise]" not in shown
    assert "undoes a --no-lr-noise" not in shown


def test_an_output_that_is_a_symbolic_link_keeps_its_link_and_its_target_is_written(
    tmp_path, monkeypatch, capsys
):
    """An atomic write (a temporary file, then os.replace) replaced a symbolic link by a regular
    file: last.pt linked onto another disk, an sr_eval --csv link, kept the old bytes there. The
    link stays now and its target is replaced, from a temporary file beside the target (atomic on
    that file system); a link to nothing writes its target where that folder exists, else it is
    one line, as is a loop of links."""
    disk, run = tmp_path / "disk", tmp_path / "run"
    disk.mkdir()
    run.mkdir()
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((Path(a), Path(b))) or
                        real_replace(a, b))  # fmt: skip
    (disk / "last.pt").write_bytes(b"an earlier checkpoint")
    (run / "last.pt").symlink_to(disk / "last.pt")
    save_checkpoint(run / "last.pt", {"step": 7})
    (disk / "m.json").write_text("old")
    (run / "m.json").symlink_to("../disk/m.json")  # (relative)
    write_text(run / "m.json", "new")
    assert [os.readlink(run / n) for n in ("last.pt", "m.json")] == [
        str(disk / "last.pt"),
        "../disk/m.json",
    ]
    assert (load_checkpoint(disk / "last.pt")["step"], (disk / "m.json").read_text()) == (7, "new")
    assert [(a.parent, b) for a, b in replaced] == [
        (disk, disk / "last.pt"),
        (disk, disk / "m.json"),
    ]
    assert sorted(p.name for p in disk.iterdir()) == ["last.pt", "m.json"]  # no temp file left
    (run / "nowhere.json").symlink_to(tmp_path / "gone" / "n.json")
    gone = r"nowhere.json: a symbolic link to .*gone/n.json, whose folder does not exist; create"
    with pytest.raises(OutputError, match=gone):
        write_text(run / "nowhere.json", "x")
    (run / "loop").symlink_to("loop")
    with pytest.raises(OutputError, match="loop: a loop of symbolic links"):
        write_text(run / "loop", "x")

    # sr_train: a new run whose last.pt is a link to nothing yet
    hr = tmp_path / "hr"
    hr.mkdir()
    iio.imwrite(hr / "a.png", blocks(2, 2, np.random.default_rng(0)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").symlink_to(disk / "run.pt")
    argv = ["--model", "bicubic", "--scale", "2", "--data", hr, "--steps", "0", "--val-every", "0",
            "--out", out]  # fmt: skip
    assert sr_train.main([str(a) for a in argv]) == 0
    assert (out / "last.pt").is_symlink() and load_checkpoint(disk / "run.pt")["step"] == 0
    # sr_eval: --csv over a link to an earlier file, --out a link to nothing yet
    (disk / "s.csv").write_text("an earlier run's")
    (run / "s.csv").symlink_to(disk / "s.csv")
    (run / "s.json").symlink_to(disk / "s.json")
    argv = ["--hr", hr, "--sr", hr, "--scale", "2", "--n", "1", "--no-lpips", "--csv",
            run / "s.csv", "--out", run / "s.json"]  # fmt: skip
    assert sr_eval.main([str(a) for a in argv]) == 0
    assert (run / "s.csv").is_symlink() and (run / "s.json").is_symlink()
    assert (disk / "s.csv").read_text().startswith("method,")
    assert json.loads((disk / "s.json").read_text())["settings"]["scale"] == 2
    assert not [p.name for p in [*disk.iterdir(), *run.iterdir()] if ".old" in p.name]
    (run / "x.csv").symlink_to(tmp_path / "gone" / "x.csv")
    with pytest.raises(SystemExit) as e:
        sr_eval.main([str(a) for a in argv[:-4]] + ["--csv", str(run / "x.csv")])
    assert e.value.code == 7
    gone = f"{tmp_path / 'gone' / 'x.csv'}, whose folder does not exist; create that folder"
    assert f"error: --csv {run / 'x.csv'}: a symbolic link to {gone}" in capsys.readouterr().err


def bicubic_sampling(tmp_path: Path, stems) -> list[str]:
    """A bicubic x2 run trained on HR images STEM.png of `stems` (tmp_path/hr), and the
    sr_sample.py flags that sample those images with it at N = 1 into tmp_path/s, quietly."""
    hr = tmp_path / "hr"
    hr.mkdir()
    for stem in stems:
        iio.imwrite(hr / f"{stem}.png", blocks(2, 2, np.random.default_rng(ord(stem[0]))))
    run = tmp_path / "run"
    argv = ["--model", "bicubic", "--scale", "2", "--data", hr, "--steps", "0", "--val-every", "0",
            "--out", run]  # fmt: skip
    assert sr_train.main([str(a) for a in argv]) == 0
    return [str(a) for a in ["--ckpt", run / "last.pt", "--input", hr, "--n", 1, "--quiet",
                             "--out", tmp_path / "s"]]  # fmt: skip


def test_another_srspace_version_is_said_once_per_version(tmp_path, monkeypatch, capsys):
    """A folder begun by an older srspace warned at every rerun (the manifest keeps the first
    version): an array's hundred requeued tasks, a hundred lines. The manifest records each
    version that sampled into the folder now: a new one is said at its first run that samples
    there only (a run of images complete samples none: no line, nothing recorded), the first
    version kept; an older manifest (no record) is read as its first version alone."""
    argv = bicubic_sampling(tmp_path, "01")
    out = tmp_path / "s"
    first = sr_sample.__version__
    said = []
    for version in (first, "99.0.0", "99.0.0", "99.1.0", "99.1.0", "99.0.0"):
        monkeypatch.setattr(sr_sample, "__version__", version)
        (out / f"{len(said) % 2}.png").unlink(missing_ok=True)  # the shard's image sampled again
        assert sr_sample.main([*argv, "--shard", f"{len(said) % 2}/2"]) == 0
        said.append(capsys.readouterr().err.count("holds samples made by srspace"))
    assert said == [0, 1, 0, 1, 0, 0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["version"], manifest["versions"]) == (first, [first, "99.0.0", "99.1.0"])
    monkeypatch.setattr(sr_sample, "__version__", "99.3.0")  # every image complete: no sample
    assert sr_sample.main(argv) == 0
    assert "holds samples" not in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text()) == manifest
    del manifest["versions"]  # an older srspace's manifest
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(sr_sample, "__version__", first)
    (out / "0.png").unlink()
    assert sr_sample.main(argv) == 0
    assert "holds samples made by srspace" not in capsys.readouterr().err
    monkeypatch.setattr(sr_sample, "__version__", "99.2.0")
    (out / "0.png").unlink()
    assert sr_sample.main(argv) == 0
    assert f"made by srspace {first}, this is 99.2.0" in capsys.readouterr().err


def test_a_killed_run_of_every_image_leaves_the_folders_list_to_its_shards(
    tmp_path, monkeypatch, capsys
):
    """--layout stem: a run of every image (--shard 0/1) of another list of inputs recorded its
    list at start; killed, a requeued --shard 1/2 of that list was then taken (exit 0) and
    skipped the images the earlier list had given to task 0, done already: 3 of 5 images
    sampled by no task. The list is recorded once the run has sampled every image now: until
    then a shard of the new list is refused, as any shard of another list."""
    base = bicubic_sampling(tmp_path, "abcd")
    hr, out = tmp_path / "hr", tmp_path / "s"
    assert sr_sample.main([*base, "--shard", "0/2"]) == 0  # task 0 of [a, b, c, d]: a, c
    shutil.copy(hr / "a.png", hr / "0.png")  # an image added: [0, a, b, c, d]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sr_sample, "read_input", killed)
        with pytest.raises(SystemExit) as e:
            sr_sample.main([*base, "--shard", "0/1"])
    assert e.value.code == 130
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # task 1 of [0, a, b, c, d]: a, c, which are done
        sr_sample.main([*base, "--shard", "1/2"])
    assert e.value.code == 2
    assert "was begun with another list of inputs (4 images, 5 now" in capsys.readouterr().err
    assert sr_sample.main([*base, "--shard", "0/1"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{s}.png" for s in "0abcd"]
    assert sr_sample.main([*base, "--shard", "1/2"]) == 0  # the folder's list now


@pytest.mark.parametrize("script", [sr_train, sr_sample, sr_eval])
def test_a_cuda_device_the_machine_has_not_is_one_line(tmp_path, capsys, monkeypatch, script):
    """--device cuda:2 on a machine of two GPUs was an error at the model's first use (a
    traceback in sr_train.py and sr_sample.py, after the run folder was made); now one line,
    exit 2, in every script, and nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (two GPUs, in this test)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    out = tmp_path / "out"
    argv = {
        sr_train: ["--model", "edsr", "--data", "demo", "--steps", "1", "--out", str(out)],
        sr_sample: ["--ckpt", str(tmp_path / "last.pt"), "--input", "demo", "--out", str(out)],
        sr_eval: ["--hr", "demo", "--sr", str(tmp_path), "--scale", "4", "--n", "1", "--out",
                  str(out)],
    }[script]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        script.main([*argv, "--device", "cuda:2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1" in err[0], err
    assert not out.exists()


def test_a_library_dump_of_many_lines_is_its_first_line_and_a_count(tmp_path):
    """torch's C++ stack under TORCH_SHOW_CPP_STACKTRACES=1 (a cluster's debugging setting) is
    part of its error's text: `--device cpu:x` was one line of thousands of characters and
    escapes. Its first line says what went wrong, how many lines are left out, and how to see
    them: SRSPACE_FULL_ERRORS=1 (README "Exit codes"), which writes them after the line,
    indented (before, the line did not say how, and nothing showed them)."""
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1", TORCH_DISABLE_ADDR2LINE="1")
    env.pop("SRSPACE_FULL_ERRORS", None)
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    cmd = [sys.executable, str(REPO / "sr_sample.py"), "--ckpt", "x.pt", "--input", "a.png",
           "--out", "o", "--device", "cpu:x"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=120, text=True)
    assert done.returncode == 2, done.stderr
    err = done.stderr
    assert err.count("\n") == 1 and err[:-1].isprintable(), err
    said = re.fullmatch(
        r"sr_sample\.py: error: --device cpu:x: Invalid device string: "
        r"'cpu:x' \(and (\d+) more lines: SRSPACE_FULL_ERRORS=1 shows them\)\n",
        err,
    )
    assert said, err
    env["SRSPACE_FULL_ERRORS"] = "1"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=120, text=True)
    assert done.returncode == 2, done.stderr
    first, head, *lines = done.stderr.splitlines()
    assert first + "\n" == err and head == "  its whole text (SRSPACE_FULL_ERRORS=1):", done.stderr
    assert lines[0] == "    Invalid device string: 'cpu:x'", lines
    assert len([t for t in lines if t.strip()]) == 1 + int(said[1]), lines
    assert all(t.startswith("    ") and t.isprintable() for t in lines), lines


def test_a_name_not_utf8_in_an_error_line_pastes_back_under_the_c_locale(tmp_path):
    """LC_ALL=C, in Python's UTF-8 mode (its default there) and without it (an ASCII locale,
    where every byte past ASCII of a name is held as a surrogate): an error line showed a byte
    that is not UTF-8 as \\udcff, which no shell reads back. Now as \\xff, as bash's $'...'
    reads it; UTF-8 as itself where the stream is UTF-8; nothing raises UnicodeEncodeError."""
    name = b"caf\xc3\xa9\xff"  # UTF-8 "café", then a byte that is not UTF-8
    unset = ("LANG", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONCOERCECLOCALE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k not in unset}
    cmd = [sys.executable, str(REPO / "sr_eval.py"), "--hr", os.fsdecode(name), "--sr", "sr",
           "--scale", "4", "--n", "1"]  # fmt: skip
    for mode, shown in (
        ({}, b"caf\xc3\xa9\\xff"),
        ({"PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}, b"caf\\xc3\\xa9\\xff"),
    ):
        done = subprocess.run(cmd, cwd=tmp_path, env={**env, "LC_ALL": "C", **mode},
                              capture_output=True, timeout=120)  # fmt: skip
        assert done.returncode == 3, done.stderr
        assert done.stderr == b"sr_eval.py: error: --hr " + shown + b": no such folder\n", mode
        pasted = subprocess.run(["bash", "-c", b"printf %s $'" + shown + b"'"],
                                capture_output=True, check=True, timeout=60).stdout  # fmt: skip
        assert pasted == name, mode


class OtherWarning(UserWarning):
    pass


def test_an_identical_warning_is_shown_once_a_run():
    """torch's DataLoader warns of too many workers at its creation and again at iter(): the
    "default" filter's once is forgotten whenever the filters change (a simplefilter or
    catch_warnings between, as srspace's loaders do), and the line came twice in one run of
    sr_train.py. Now each warning, its category and text, is shown once under exit_on_error (all
    three scripts); another text or category is shown, and a later run shows it again."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        for _ in range(2):  # (two runs: main() called twice in one process)
            with exit_on_error("p.py"):
                warnings.warn("too many workers", stacklevel=1)
                warnings.simplefilter("default")  # (resets the registry: shown again before)
                warnings.warn("too many workers", stacklevel=1)
                warnings.warn("too many workers", OtherWarning, stacklevel=1)
                warnings.warn("too few workers", stacklevel=1)
        warnings.warn("too many workers", stacklevel=1)  # (outside: Python's own, not ours)
    said = [(w.category, str(w.message)) for w in shown]
    run = [(UserWarning, "too many workers"), (OtherWarning, "too many workers")]
    run += [(UserWarning, "too few workers")]
    assert said == [*run, *run, (UserWarning, "too many workers")], said
