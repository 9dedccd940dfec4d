"""sr_sample.py at cluster scale: temperature sweeps in one pass (the LR-only work once per image),
job-array shards, resumable runs (SIGKILL, Ctrl-C, SIGTERM, then a rerun) that equal one run file
by file, manifest.json and ntire_index.json, progress output, and output-folder failures."""

import concurrent.futures
import errno
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from argparse import ArgumentTypeError
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY

import sr_lib
import sr_sample
from sr_lib.checkpoint import save_checkpoint
from sr_lib.models import build_model
from sr_lib.models.flow_layers import CondAffine
from sr_lib.models.srflow import SRFlow

REPO = Path(__file__).resolve().parents[1]


def run(*argv) -> int:
    try:
        return sr_sample.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def images(folder: Path, count: int, size=(24, 28), names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    for name in names or [f"im {i:02d}" for i in range(count)]:
        img = np.kron(rng.random((size[0] // 4, size[1] // 4, 3)), np.ones((4, 4, 1)))
        iio.imwrite(folder / f"{name}.png", (img * 255).astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory) -> Path:
    """A tiny x4 SRFlow whose zero-initialised convs are random, so samples depend on the LR."""
    torch.manual_seed(0)
    cfg = {**TINY["srflow"], "scale": 4}
    model = build_model("srflow", cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "flow.pt"
    save_checkpoint(path, {"model": "srflow", "model_cfg": cfg, "state_dict": model.state_dict(),
                           "step": 0})  # fmt: skip
    return path


def files(folder: Path) -> dict[str, bytes]:
    """Every visible file under folder (relative path -> bytes), manifest.json aside."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return {str(p.relative_to(folder)): p.read_bytes() for p in paths if p.name != "manifest.json"}


def test_sweep_one_pass_equals_separate_runs_and_encodes_once(tmp_path, flow_ckpt, monkeypatch):
    inp = images(tmp_path / "in", 2)
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 3, "--batch", 1]
    calls = {"encoder": 0, "steps": 0}
    conditions, prepare = SRFlow.conditions, CondAffine.prepare

    def counted_conditions(self, lr):
        calls["encoder"] += 1
        return conditions(self, lr)

    def counted_prepare(self, ft, noise=None):
        calls["steps"] += 1
        return prepare(self, ft, noise)

    monkeypatch.setattr(SRFlow, "conditions", counted_conditions)
    monkeypatch.setattr(CondAffine, "prepare", counted_prepare)
    assert run(*base, "--temperature", 0, 0.5, 0.9, "--out", tmp_path / "sweep") == 0
    model = build_model("srflow", {**TINY["srflow"], "scale": 4})
    flow_steps = sum(1 for m in model.modules() if isinstance(m, CondAffine))
    # 2 images x 3 temperatures x 3 chunks of 1 sample: the encoder and every flow step's
    # LR-only part ran once per image
    assert calls == {"encoder": 2, "steps": 2 * flow_steps}
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir()) == ["T0", "T0.5", "T0.9"]
    for t in ("0", "0.5", "0.9"):
        assert run(*base, "--temperature", t, "--out", tmp_path / t) == 0
        assert files(sweep / f"T{t}") == files(tmp_path / t) != {}
        manifest = json.loads((sweep / f"T{t}" / "manifest.json").read_text())
        assert manifest["temperature"] == float(t) and manifest["n"] == 3
        assert manifest["flags"]["temperature"] == [0, 0.5, 0.9] and manifest["model"] == "srflow"
    a, b = (iio.imread(sweep / f"T{t}" / "im 00_sample00001.png") for t in ("0.5", "0.9"))
    assert (a != b).any()


def test_shards_and_a_rerun_equal_one_run(tmp_path, flow_ckpt, monkeypatch):
    inp = images(tmp_path / "in", 5)
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 2, "--layout", "ntire", "--grid"]
    assert run(*base, "--out", tmp_path / "one") == 0
    for i in range(3):
        assert run(*base, "--shard", f"{i}/3", "--out", tmp_path / "shards") == 0
    assert files(tmp_path / "shards") == files(tmp_path / "one")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # an array --array=1-2: tasks 1, 2 = shards 0, 1
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert run(*base, "--shard", "auto", "--out", tmp_path / "auto") == 0
    got = files(tmp_path / "auto")
    assert {k for k in got if k.startswith("000001")} == set()  # image 1 belongs to task 2
    assert all(got[k] == v for k, v in files(tmp_path / "one").items() if k.startswith("000002"))


@pytest.mark.parametrize("env, want", [
    ({"ID": "5", "MIN": "1", "MAX": "5", "STEP": "2", "COUNT": "3"}, "2/3"),  # --array=1-5:2
    ({"ID": "3", "MIN": "0", "MAX": "3", "STEP": "1", "COUNT": "4"}, "3/4"),  # --array=0-3
    ({"ID": "3", "COUNT": "4"}, "3/4"),  # no MIN/MAX/STEP: from 0 in steps of 1
    ({"ID": "3", "MIN": "1", "MAX": "7", "STEP": "1", "COUNT": "3"}, None),  # --array=1,3,7
    ({"ID": "7", "MIN": "1", "MAX": "7", "STEP": "1", "COUNT": "3"}, None),
    ({"ID": "x", "COUNT": "2"}, "SLURM_ARRAY_TASK_ID='x' is not a whole number"),
    ({"ID": "1", "COUNT": "2", "STEP": ""}, "SLURM_ARRAY_TASK_STEP='' is not a whole number"),
])  # fmt: skip
def test_shard_auto_maps_a_range_array_and_refuses_a_list(monkeypatch, env, want):
    """A list array's IDs have no shard order: (ID - MIN) // STEP gave 1,3,7 the shards 0, 2 and
    6/3 (an error), so shard 1's images were never sampled; `auto` now refuses such arrays. A
    variable that is no number was argparse's "invalid shard_value value: 'auto'": named now."""
    for k in ("ID", "MIN", "MAX", "STEP", "COUNT"):
        monkeypatch.delenv(f"SLURM_ARRAY_TASK_{k}", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{k}", v)
    if want and "/" not in want:
        with pytest.raises(ArgumentTypeError, match=f"'auto': {want}; give I/N"):
            sr_sample.shard_value("auto")
    elif want:
        assert sr_sample.shard_value("auto") == want
    else:
        with pytest.raises(ArgumentTypeError, match="not a range MIN-MAX.*give --shard I/N"):
            sr_sample.shard_value("auto")


def killed_base(inp: Path, flow_ckpt: Path) -> list:
    return ["--ckpt", flow_ckpt, "--input", inp, "--n", 2, "--from-hr", "--grid"]


@pytest.fixture(scope="module")
def one_run(tmp_path_factory, flow_ckpt) -> tuple[Path, dict[str, bytes]]:
    """The input folder of test_killed_then_rerun_equals_one_run and the files of one
    uninterrupted run on it: made once for its four signals (the same run each time)."""
    folder = tmp_path_factory.mktemp("one_run")
    inp = images(folder / "in", 24, size=(96, 96))
    assert run(*killed_base(inp, flow_ckpt), "--out", folder / "one") == 0
    return inp, files(folder / "one")


# (one pytest-xdist worker for the four, pyproject: --dist loadgroup: each worker that ran one
# made one_run's uninterrupted run again)
# 3 runs per signal: SLURM's SIGTERM in the default suite, the others in the integration tier
# (pyproject: pytest -m integration)
@pytest.mark.xdist_group("one_run")
@pytest.mark.parametrize("sig, code", [
    (signal.SIGTERM, 75),
    *(pytest.param(sig, code, marks=pytest.mark.integration)
      for sig, code in ((signal.SIGKILL, -9), (signal.SIGINT, 130), (signal.SIGHUP, 75))),
])  # fmt: skip
def test_killed_then_rerun_equals_one_run(tmp_path, flow_ckpt, one_run, sig, code, capsys):
    """Two shards into one folder, the second killed mid-run and run again: the folder equals that
    of one uninterrupted run, file by file."""
    inp, one = one_run
    base = killed_base(inp, flow_ckpt)
    out = tmp_path / "resumed"
    assert run(*base, "--shard", "0/2", "--out", out) == 0
    cmd = [sys.executable, str(REPO / "sr_sample.py"), *map(str, base), "--shard", "1/2", "--out",
           str(out)]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    deadline = time.time() + 120
    first = [out / f"im 01_{f}.png" for f in ("sample00000", "sample00001", "grid")]
    while not all(f.exists() for f in first) and time.time() < deadline:  # one image complete
        time.sleep(0.02)  # (its PNGs are written on threads, in any order)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1].strip()
    assert p.returncode == code, err
    if code > 0:  # one line, no traceback
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in out.glob("*.png"):
        iio.imread(f)  # every visible file is whole (temp files are hidden: .NAME.tmp)
    capsys.readouterr()
    assert run(*base, "--shard", "1/2", "--out", out) == 0
    text = capsys.readouterr().out
    skipped = int(text.split("images sampled, ")[1].split(" already complete")[0])
    assert 0 < skipped < 12, text  # it continued where it stopped
    assert files(out) == one and len(one) == 24 * 4  # per image 2 samples, a grid, lr/ (--from-hr)


def test_rerun_skips_complete_images_and_refuses_other_settings(tmp_path, flow_ckpt, capsys):
    inp = images(tmp_path / "in", 2)
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 2, "--out", tmp_path / "o"]
    assert run(*base) == 0
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "o").glob("*.png")}
    assert run(*base, "--batch", 1, "--device", "cpu") == 0  # these do not change the files
    assert "0 images sampled, 2 already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in first} == first  # nothing was rewritten
    # exact tiles (the default context) equal the untiled samples: after an out-of-memory, tile
    assert run(*base, "--tile", 32) == 0 and "2 already complete" in capsys.readouterr().out
    (tmp_path / "o" / "im 01_sample00001.png").unlink()
    assert run(*base) == 0 and "1 images sampled, 1 already complete" in capsys.readouterr().out
    # emptied, as a node's crash can leave a file renamed into place but never flushed
    whole = (tmp_path / "o" / "im 00_sample00000.png").read_bytes()
    (tmp_path / "o" / "im 00_sample00000.png").write_bytes(b"")
    assert run(*base) == 0 and "1 images sampled, 1 already complete" in capsys.readouterr().out
    assert (tmp_path / "o" / "im 00_sample00000.png").read_bytes() == whole
    # (another --n is taken: test_sample_cli.py's test_a_rerun_of_a_larger_n_adds_...)
    for flags, made in ((["--seed", 1], "--seed 0, not 1"),
                        (["--temperature", 0.5], "temperature 0.9, not 0.5"),
                        (["--tile", 16, "--tile-overlap", 8],  # (--tile 32: one tile, exact)
                         "no tiles or exact tiles, not --tile 16 --tile-overlap 8 (inexact tiles)"),
                        (["--cem"], "--cem false"),
                        (["--amp", "bf16"], '--amp "none", not "bf16"')):  # fmt: skip
        assert run(*base, *flags) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"made with {made}" in err and "--overwrite" in err
    assert run(*base, "--seed", 1, "--overwrite") == 0
    assert all(p.stat().st_mtime_ns != t for p, t in first.items())
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["flags"]["seed"] == 1


def test_ntire_layout_numbers_images_in_the_one_order(tmp_path, flow_ckpt):
    stems = ["photo (1)", "cat-2", "photo", "cat"]  # name order: cat-2 < cat, photo (1) < photo
    inp = images(tmp_path / "in", 4, names=stems)
    argv = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--layout", "ntire"]
    assert run(*argv, "--out", tmp_path / "o") == 0
    index = json.loads((tmp_path / "o" / "ntire_index.json").read_text())
    order = ["cat", "cat-2", "photo", "photo (1)"]
    assert index == {"scale": 4, **{f"{k:06d}": stem for k, stem in enumerate(order)}}
    assert run(*argv, "--input", inp / "cat-2.png", "--out", tmp_path / "single") == 0
    same = iio.imread(tmp_path / "single" / "000000.png")
    assert (iio.imread(tmp_path / "o" / "000001.png") == same).all()
    images(inp, 1, names=["bird"])  # sorts first: every index would move
    assert run(*argv, "--out", tmp_path / "o") == 2


def test_progress_lines_and_bar(tmp_path, flow_ckpt, capsys, monkeypatch):
    inp = images(tmp_path / "in", 2)
    argv = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1]
    assert run(*argv, "--out", tmp_path / "a") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] im 00.png 28x24 -> 1 x 112x96") and "ETA" in lines[0]
    assert lines[1].startswith("[2/2] im 01.png") and lines[2].startswith("done: 2 images")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run(*argv, "--out", tmp_path / "b") == 0
    assert "2/2" in capsys.readouterr().out  # rich's bar: images done / total


def test_output_folder_problems_are_one_line_exit_7(tmp_path, flow_ckpt, capsys, read_only_dir):
    inp = images(tmp_path / "in", 2)
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 2]
    (tmp_path / "file").write_text("x")
    assert run(*base, "--out", tmp_path / "file") == 7
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "file: a file, not a folder" in err
    assert run(*base, "--out", read_only_dir) == 7
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write there (Permission denied)" in err
    assert list(read_only_dir.iterdir()) == []


def test_full_disk_is_one_line_exit_7_and_no_partial_file(tmp_path, flow_ckpt):
    inp = images(tmp_path / "in", 2, size=(48, 48))
    out = tmp_path / "out"

    def small_files():  # a write past 4 kB fails with EFBIG, as a full disk's with ENOSPC
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    cmd = [sys.executable, str(REPO / "sr_sample.py"), "--ckpt", str(flow_ckpt), "--input",
           str(inp), "--n", "2", "--out", str(out), "--json"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, preexec_fn=small_files)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 7 and len(err) == 1, p.stderr
    assert "im 00_sample00000.png: cannot write (File too large)" in err[0]
    assert [f.name for f in out.iterdir()] == ["manifest.json"]  # no partial PNG, no temp file
    line = json.loads(p.stdout.splitlines()[-1])
    assert line["exit_code"] == 7 and line["sampled"] == 0, p.stdout  # (none of it is on disk)
    assert "[1/2]" not in p.stdout


def test_an_image_whose_png_write_fails_is_not_counted_or_shown_sampled(
    tmp_path, flow_ckpt, monkeypatch, capsys
):
    """The PNGs are written in the background: a write that fails (a full disk) shows at a later
    write or at the end. --json's `sampled` counted the image, and its progress line said it done,
    as soon as its writes were handed over: `sampled: 1` with none of its samples on disk. Now an
    image counts, and its line is printed, once its files are written."""
    inp = images(tmp_path / "in", 3)
    real_write = sr_sample.write_encoded_png

    def full_disk_at_the_second_image(path, data):
        if Path(path).name.startswith("im 01"):
            raise sr_sample.OutputError(f"{path}: cannot write (No space left on device)")
        real_write(path, data)

    # The third image's write is handed over once the two before it have ended: a failing write
    # that its thread had not run yet (a loaded machine) let the third's be given, and written,
    # before the failure was seen, and its file was then on disk (failed once so under load).
    # The writer still finds the failure as it would: at the hand-over after it.
    give = sr_sample.SampleWriter.__call__

    def after_the_writes_before(writer, paths, img):
        if Path(paths[0]).name.startswith("im 02"):
            concurrent.futures.wait(list(writer.queue))
        give(writer, paths, img)

    monkeypatch.setattr(sr_sample, "cpu_workers", lambda: 2)  # (the writes in the background)
    monkeypatch.setattr(sr_sample, "write_encoded_png", full_disk_at_the_second_image)
    monkeypatch.setattr(sr_sample.SampleWriter, "__call__", after_the_writes_before)
    argv = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--out", tmp_path / "out", "--json"]
    assert run(*argv) == 7
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1])["sampled"] == 1, out
    assert "im 00.png" in out and "im 01.png" not in out and "im 02.png" not in out
    assert sorted(files(tmp_path / "out")) == ["im 00_sample00000.png"]


def test_another_srspace_version_is_a_warning_not_a_refusal(tmp_path, flow_ckpt, monkeypatch,
                                                             capsys):  # fmt: skip
    """An upgrade between a preempted task and its requeue was refused (exit 2: version "0.2.0",
    not ...), which left --overwrite, a redo of every image; now one warning line naming both
    versions, the images complete kept, and every other setting still compared."""
    inp = images(tmp_path / "in", 4)
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--quiet", "--out", tmp_path / "out"]
    assert run(*base, "--shard", "0/2") == 0
    kept = files(tmp_path / "out")
    monkeypatch.setattr(sr_sample, "__version__", "99.0.0")
    capsys.readouterr()
    assert run(*base, "--shard", "1/2") == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and f"srspace {sr_lib.__version__}, this is 99.0.0" in err
    got = files(tmp_path / "out")
    assert {k: got[k] for k in kept} == kept and len(got) == 4
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["version"] == sr_lib.__version__  # (the folder's first)
    assert run(*base, "--shard", "1/2", "--seed", 7) == 2
    assert "--seed 0, not 7" in capsys.readouterr().err


def test_a_new_srspace_version_is_recorded_once_it_has_sampled_into_the_folder(
    tmp_path, flow_ckpt, monkeypatch, capsys
):
    """A new srspace version was recorded in manifest.json when the run claimed the folder: a
    run stopped before any sample (here a sweep whose other folder refused it) left it recorded,
    and its rerun, which sampled, no longer warned of the upgrade. Now the line is said before
    the first image sampled there, and the version recorded after it. A manifest that records no
    version said "made by srspace None"."""
    inp = images(tmp_path / "in", 2)
    out = tmp_path / "out"
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--quiet"]
    assert run(*base, "--temperature", 0.5, "--shard", "0/2", "--out", out / "T0.5") == 0
    assert run(*base, "--temperature", 0.9, "--seed", 3, "--out", out / "T0.9") == 0
    manifest = out / "T0.5" / "manifest.json"
    monkeypatch.setattr(sr_sample, "__version__", "99.0.0")
    capsys.readouterr()
    assert run(*base, "--temperature", 0.5, 0.9, "--out", out) == 2  # T0.9 was --seed 3
    err = capsys.readouterr().err
    assert "--seed 3, not 0" in err and "holds samples made by" not in err
    assert json.loads(manifest.read_text())["versions"] == [sr_lib.__version__]
    assert run(*base, "--temperature", 0.5, "--out", out / "T0.5") == 0  # samples im 01
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"sr_sample.py: warning: {out / 'T0.5'} holds samples made by srspace "
        f"{sr_lib.__version__}, this is 99.0.0: the images complete keep them, the others are "
        "sampled by this one (a release may change the samples of the same settings; "
        "--overwrite redoes every image)"
    ]
    record = json.loads(manifest.read_text())
    assert (record["version"], record["versions"]) == (sr_lib.__version__,
                                                      [sr_lib.__version__, "99.0.0"])  # fmt: skip
    del record["version"], record["versions"]  # a manifest that records no version
    manifest.write_text(json.dumps(record))
    (out / "T0.5" / "im 01_sample00000.png").unlink()
    monkeypatch.setattr(sr_sample, "__version__", "99.1.0")
    assert run(*base, "--temperature", 0.5, "--out", out / "T0.5") == 0
    assert (f"{out / 'T0.5'} holds samples made by an srspace that did not record its version, "
            "this is 99.1.0: ") in capsys.readouterr().err  # fmt: skip
    assert json.loads(manifest.read_text())["versions"] == [None, "99.1.0"]


def test_a_stop_waits_for_a_manifest_lock_held_elsewhere_a_bounded_time(
    tmp_path, flow_ckpt, monkeypatch, capsys
):
    """A SIGTERM that comes while an image's version record (signals held) waits for the
    folder's manifest lock waited as long as the lock's holder held it: a shard stopped by
    SIGSTOP or a hung file system kept the stop waiting until SLURM's SIGKILL. Now it waits
    STOP_WAIT s after the stop, then says the version is not recorded and stops (exit 75); the
    image is counted, its files complete, and the manifest as the holder leaves it."""
    inp = images(tmp_path / "in", 2)
    out = tmp_path / "out"
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--quiet", "--json", "--out", out]
    assert run(*base, "--shard", "0/2") == 0
    monkeypatch.setattr(sr_sample, "__version__", "99.0.0")
    monkeypatch.setattr(sr_sample, "STOP_WAIT", 0.3, raising=False)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)  # the holder: another open, its own flock
    record, took = sr_sample.record_version, []
    # (let go in the end: the old code waited for it)
    free = threading.Timer(3, sr_sample.fcntl.flock, [fd, sr_sample.fcntl.LOCK_UN])

    def held_elsewhere(folder):
        sr_sample.fcntl.flock(fd, sr_sample.fcntl.LOCK_EX)
        free.start()
        os.kill(os.getpid(), signal.SIGTERM)  # (held: taken once the record is done)
        took.append(time.monotonic())
        record(folder)
        took[0] = time.monotonic() - took[0]

    monkeypatch.setattr(sr_sample, "record_version", held_elsewhere)
    capsys.readouterr()
    try:
        assert run(*base, "--shard", "1/2") == 75
    finally:
        free.cancel()
        free.join()
        os.close(fd)
    said = capsys.readouterr()
    err = said.err.splitlines()
    assert took[0] < 2, took
    assert err[1] == (
        f"sr_sample.py: warning: {out}: its manifest.json still locked by another process 0.3 s "
        "after the stop (a shard stopped or hung, a file system not answering): srspace 99.0.0, "
        'which sampled there, is not recorded in its "versions" yet; the next run there records '
        "it (.unrecorded-versions.json keeps it meanwhile)"
    ), err
    assert json.loads(said.out.splitlines()[-1])["sampled"] == 1 and len(files(out)) == 2
    assert json.loads((out / "manifest.json").read_text())["versions"] == [sr_lib.__version__]
    # A rerun that finds every image complete records it (it recorded nothing, the folder's
    # manifest then never complete); one of a version that sampled nothing there records none.
    monkeypatch.setattr(sr_sample, "record_version", record)
    assert run(*base) == 0 and json.loads(capsys.readouterr().out)["sampled"] == 0
    versions = [sr_lib.__version__, "99.0.0"]
    assert json.loads((out / "manifest.json").read_text())["versions"] == versions
    assert sorted(p.name for p in out.iterdir()) == [
        "im 00_sample00000.png", "im 01_sample00000.png", "manifest.json"]  # fmt: skip
    monkeypatch.setattr(sr_sample, "__version__", "99.5.0")
    assert run(*base) == 0 and json.loads(capsys.readouterr().out)["sampled"] == 0
    assert json.loads((out / "manifest.json").read_text())["versions"] == versions
    (out / ".unrecorded-versions.json").write_text('["98.0.0"]')
    assert run(*base, "--overwrite") == 0  # (the files of that version redone: not recorded)
    assert json.loads((out / "manifest.json").read_text())["versions"] == ["99.5.0"]
    assert not list(out.glob(".*"))


def a_folder_that_keeps_98(tmp_path: Path, flow_ckpt) -> tuple[Path, list]:
    """(OUT, a run's argv into it): a folder sampled, its .unrecorded-versions.json keeping a
    srspace 98.0.0 that gave up its record."""
    inp = images(tmp_path / "in", 1)
    out = tmp_path / "out"
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--quiet", "--out", out]
    assert run(*base) == 0
    (out / ".unrecorded-versions.json").write_text('["98.0.0"]')
    return out, base


def test_a_stop_while_a_claim_records_the_kept_versions_loses_none(tmp_path, flow_ckpt,
                                                                   monkeypatch):  # fmt: skip
    """The claim that records .unrecorded-versions.json renames it to a name of its own, reads
    it, records its versions and deletes it; a SIGTERM between the rename and the deletion (the
    file read, the manifest amended with signals free) left the renamed file, which no claim
    looks for, and its versions never recorded. The whole of it now holds signals: recorded,
    the file gone, then the stop (exit 75)."""
    out, base = a_folder_that_keeps_98(tmp_path, flow_ckpt)
    read = sr_sample.unrecorded

    def stopped_meanwhile(path):
        os.kill(os.getpid(), signal.SIGTERM)
        return read(path)

    monkeypatch.setattr(sr_sample, "unrecorded", stopped_meanwhile)
    assert run(*base) == 75
    assert json.loads((out / "manifest.json").read_text())["versions"] == [
        sr_lib.__version__, "98.0.0"]  # fmt: skip
    assert not list(out.glob(".*"))


def test_a_claim_that_fails_while_it_records_the_kept_versions_leaves_them_to_the_next(
    tmp_path, flow_ckpt, monkeypatch, capsys
):
    """A claim that took .unrecorded-versions.json (renamed to a name of its own: its process
    id) and failed writing the manifest (a full disk; a SIGKILL there alike) left the renamed
    file, which no claim looked for: its versions never recorded. It is TAKEN now, one name,
    which every claim records first."""
    out, base = a_folder_that_keeps_98(tmp_path, flow_ckpt)
    write = sr_sample.save_text

    def full_disk(path, text):
        if Path(path).name == "manifest.json":
            raise sr_sample.OutputError(f"{path}: cannot write (No space left on device)")
        write(path, text)

    monkeypatch.setattr(sr_sample, "save_text", full_disk)
    capsys.readouterr()
    assert run(*base) == 7
    assert "No space left on device" in capsys.readouterr().err
    assert len(list(out.glob(".unrecorded-versions.json*"))) == 1  # (renamed, kept)
    monkeypatch.undo()
    assert run(*base) == 0
    assert json.loads((out / "manifest.json").read_text())["versions"] == [
        sr_lib.__version__, "98.0.0"]  # fmt: skip
    assert not list(out.glob(".*"))
    # One left that cannot be read, where a stop has written the file anew: said, both left
    taken = out / ".unrecorded-versions.json.taken"
    taken.write_text('["97.0.0"')
    (out / ".unrecorded-versions.json").write_text('["96.0.0"]')
    capsys.readouterr()
    assert run(*base) == 0
    assert f"warning: {taken}: not JSON; the srspace versions" in capsys.readouterr().err
    assert len(list(out.glob(".*"))) == 2


def test_a_kept_versions_file_that_cannot_be_read_is_said_and_left(tmp_path, flow_ckpt, capsys):
    """A .unrecorded-versions.json that is not a JSON list of versions (edited by hand, a disk's
    fault) was deleted without a word by the next claim, the versions it kept lost; a folder of
    that name was a traceback. Now one warning line naming it and what to do, the file left as
    it is, the run going on (exit 0); --overwrite deletes the file, leaves the folder."""
    inp = images(tmp_path / "in", 1)
    out = tmp_path / "out"
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--quiet", "--out", out]
    assert run(*base) == 0
    kept = out / ".unrecorded-versions.json"
    for text, why in [('["98.0.0"', "not JSON"), ('{"98.0.0": 1}', "not a JSON list of srspace "
                                                 "versions")]:  # fmt: skip
        kept.write_text(text)
        capsys.readouterr()
        assert run(*base) == 0
        assert capsys.readouterr().err == (
            f"sr_sample.py: warning: {kept}: {why}; the srspace versions it keeps are not "
            'recorded in its folder\'s manifest.json ("versions"); correct or delete it\n'
        )
        assert kept.read_text() == text and sorted(p.name for p in out.glob(".*")) == [kept.name]
    assert run(*base, "--overwrite") == 0 and not list(out.glob(".*"))
    kept.mkdir()
    assert run(*base) == 0
    assert f"{kept}: a folder; the srspace versions" in capsys.readouterr().err
    assert run(*base, "--overwrite") == 0 and kept.is_dir()
    assert json.loads((out / "manifest.json").read_text())["versions"] == [sr_lib.__version__]


def test_a_shards_claim_of_the_folders_own_inputs_does_not_go_through_its_names(
    tmp_path, flow_ckpt, monkeypatch
):
    """manifest.json lists every input's NAME ("names"): each shard's claim of an array went
    through the whole list under the folder's lock (200,000 names: 0.1 s in every shard, the
    others waiting). A run of the inputs the folder records has its NAMEs there already (listed
    with the record): not read; a run of other inputs (--shard 0/1) adds its own."""
    inp = images(tmp_path / "in", 3)
    out = tmp_path / "out"
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--quiet", "--out", out]
    assert run(*base, "--shard", "0/2") == 0
    listed = sr_sample.listed_names
    went = []
    monkeypatch.setattr(sr_sample, "listed_names", lambda names: went.append(1) or listed(names))
    assert run(*base, "--shard", "1/2") == 0
    assert run(*base) == 0 and went == []
    images(tmp_path / "in", 1, names=["im new"])
    assert run(*base) == 0 and went
    assert json.loads((out / "manifest.json").read_text())["names"] == [
        "im 00", "im 01", "im 02", "im new"]  # fmt: skip


def test_two_shards_raising_n_at_once_both_count(tmp_path, monkeypatch):
    """Two shards amending manifest.json at once (a rerun of each with a larger --n): each reads
    the file, and without a lock the later rename drops the other's raise. Deterministic: the
    first shard's change waits for the second's write, or (under the lock) for the second to
    block on it, so the larger n is kept (n = 10, not 5) whatever the threads' timing."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"n": 2, "versions": ["0"]}))
    inside, wrote, blocked = threading.Event(), threading.Event(), threading.Event()
    flock = sr_sample.fcntl.flock

    def flock_said(fd, op):  # (the second shard about to wait for the first's lock)
        if threading.current_thread().name == "second":
            blocked.set()
        return flock(fd, op)

    monkeypatch.setattr(sr_sample.fcntl, "flock", flock_said)

    def raise_to(n, wait):
        def larger(m):
            inside.set()
            deadline = time.monotonic() + 10
            while wait and not (wrote.is_set() or blocked.is_set()):
                assert time.monotonic() < deadline, "the second shard neither wrote nor waited"
                time.sleep(0.005)
            return {"n": max(n, m["n"])}

        sr_sample.amend_manifest(folder, larger)
        if not wait:
            wrote.set()

    first = threading.Thread(target=raise_to, args=(5, True))
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=raise_to, args=(10, False), name="second")
    second.start()
    first.join(15)
    second.join(15)
    assert json.loads((folder / "manifest.json").read_text()) == {"n": 10, "versions": ["0"]}
    with sr_sample.manifest_lock(folder):  # re-entrant in a thread, as claim_folder takes it
        sr_sample.record_version(folder)
    assert json.loads((folder / "manifest.json").read_text())["n"] == 10


def test_manifest_lock_on_a_file_system_without_locks_amends_unlocked(tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    """manifest_lock's way out where the folder cannot be locked (some network mounts: ENOLCK)
    or opened: the manifest is amended as without the lock, not an OSError out of sampling."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"n": 2}))
    tried = []

    def flock(fd, operation):
        tried.append(operation)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(sr_sample.fcntl, "flock", flock)
    sr_sample.amend_manifest(folder, lambda old: {"n": 5})
    assert tried == [sr_sample.fcntl.LOCK_EX]
    assert json.loads((folder / "manifest.json").read_text()) == {"n": 5}
    sr_sample.amend_manifest(folder, lambda old: {"n": 6})  # (said once a folder)
    assert capsys.readouterr().err.splitlines() == [
        f"sr_sample.py: warning: {folder}: cannot lock it ({os.strerror(errno.ENOLCK)}); two "
        "shards changing its manifest.json at once could lose one's change (a raised n, a version)"
    ]
    real_open = os.open
    monkeypatch.setattr(sr_sample.os, "open", lambda path, flags, *a: real_open(
        path, flags, *a) if not flags & os.O_DIRECTORY else flock(None, None))  # fmt: skip
    sr_sample.amend_manifest(folder, lambda old: {"n": 7})
    assert json.loads((folder / "manifest.json").read_text()) == {"n": 7} and len(tried) == 3


def test_a_shard_of_another_list_of_inputs_is_refused_with_layout_stem(tmp_path, flow_ckpt,
                                                                       capsys):  # fmt: skip
    """--layout stem recorded no inputs: an image added to the input folder between two tasks
    of an array moved images between shards (k % N), and 2 of 5 were sampled by no task, exit 0
    without a word. Now the manifest records the names' digest: a --shard of another list is
    refused in one line; a --shard 0/1 run samples every image and records its list."""
    inp = images(tmp_path / "in", 4)
    out = tmp_path / "out"
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--quiet", "--out", out]
    assert run(*base, "--shard", "0/2") == 0  # im 00, im 02
    images(inp, 1, names=["im 00a"])  # now im 00, im 00a, im 01, ...: task 1 would take 00a, 02
    capsys.readouterr()
    assert run(*base, "--shard", "1/2") == 2
    err = capsys.readouterr().err
    assert "another list of inputs (4 images, 5 now" in err and "--shard 1/2" in err
    assert len(err.strip().splitlines()) == 1 and len(list(out.glob("*.png"))) == 2
    assert run(*base, "--shard", "0/1") == 0  # every image: the new list recorded
    assert sorted(p.name for p in out.glob("*.png")) == [
        f"im {x}_sample00000.png" for x in ("00", "00a", "01", "02", "03")
    ]
    assert run(*base, "--shard", "1/2") == 0
    (inp / "im 03.png").unlink()  # removed, too
    assert run(*base, "--shard", "0/2") == 2
    assert "(5 images, 4 now" in capsys.readouterr().err


def test_the_array_variables_that_shard_auto_reads_are_named_where_it_is_explained():
    """The sbatch example's comment named SLURM_ARRAY_TASK_ID, _MIN and _COUNT, the module's
    help ID and COUNT, while `auto` reads _STEP and _MAX too: each variable the code reads is
    named in both."""
    code = inspect.getsource(sr_sample.shard_value)
    read = set(re.findall(r"SLURM_ARRAY_TASK_[A-Z]+", code))
    assert {"SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_MAX"} < read  # (the regex finds them)
    sbatch = (REPO / "examples" / "slurm" / "sample_array.sbatch").read_text()
    comment = " ".join(line for line in sbatch.splitlines() if line.startswith("# "))
    assert {v for v in read if v not in comment} == set()
    assert {v for v in read if v not in sr_sample.__doc__} == set()


def test_json_seconds_is_there_once_every_image_was_gone_through(tmp_path, flow_ckpt, capsys):
    """`seconds` is the time of a run that went through every image: also on exit 3 (an
    unreadable input skipped, the others written; the README said "on success" only), not after
    a write error (exit 7), which stops the run where it is."""
    inp = images(tmp_path / "in", 2)
    (inp / "broken.png").write_bytes(b"not a png")
    argv = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--quiet", "--json"]
    assert run(*argv, "--out", tmp_path / "out") == 3
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (line["sampled"], line["failed"]) == (2, 1) and line["seconds"] >= 0, line
    (tmp_path / "file").write_text("x")
    assert run(*argv, "--out", tmp_path / "file") == 7
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["seconds"] is None


def test_the_alpha_scan_runs_with_the_manifest_lock_free(tmp_path, flow_ckpt, monkeypatch):
    """A rerun with another --alpha-channel reads every input for an alpha channel (a TIFF's
    pixels: minutes for a large folder); under manifest_lock that held every other shard's claim
    and version record as long. The scan runs with the lock free, the claim under it after."""
    inp = images(tmp_path / "in", 3)
    out = tmp_path / "o"
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--out", out]
    assert run(*base) == 0
    scanned, free = [], []
    has_alpha = sr_sample.has_alpha

    def has_alpha_seen(path):  # another shard's claim: would it get the folder's lock now?
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sr_sample.fcntl.flock(fd, sr_sample.fcntl.LOCK_EX | sr_sample.fcntl.LOCK_NB)
            free.append(path)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        scanned.append(path)
        return has_alpha(path)

    monkeypatch.setattr(sr_sample, "has_alpha", has_alpha_seen)
    assert run(*base, "--alpha-channel", "drop") == 0  # no input has alpha: the same files
    assert len(scanned) == 3 and free == scanned


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="tells a lock waited for: Linux")
def test_a_stop_while_another_shard_holds_the_manifest_lock_ends_at_once(tmp_path, flow_ckpt):
    """A shard waiting for another's manifest_lock (its claim, its scan: minutes before the scan
    left the lock) stops at SIGTERM at once: exit 75, one line, and the rerun samples every
    image, the folder of one run."""
    inp = images(tmp_path / "in", 2)
    out = tmp_path / "o"
    out.mkdir()
    base = ["--ckpt", flow_ckpt, "--input", inp, "--n", 1, "--out", out]
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    sr_sample.fcntl.flock(fd, sr_sample.fcntl.LOCK_EX)  # the other shard's
    try:
        p = subprocess.Popen([sys.executable, str(REPO / "sr_sample.py"), *map(str, base)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while f" {p.pid} " not in "".join(
            line for line in Path("/proc/locks").read_text().splitlines(True) if "->" in line
        ):  # (a blocked lock's line: "N: -> FLOCK ADVISORY WRITE PID ...")
            assert time.monotonic() < deadline and p.poll() is None, "it never waited"
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=20)[1].strip()  # (the lock still held: no wait for it)
    finally:
        os.close(fd)
    assert p.returncode == 75 and err.splitlines() == [
        "sr_sample.py: error: stopped by SIGTERM; every file written is complete: rerun the same "
        "command to continue"
    ], err
    assert run(*base) == 0 and len(list(out.glob("*_sample00000.png"))) == 2
