"""sr_eval.py: its out-of-memory line, the temperature of a folder whose latents a control set,
and the --json line's results and csv after a run that wrote no file there."""

import csv
import dataclasses
import json
import os
import re
import signal
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import test_eval_cli
import torch
from conftest import TINY

import sr_eval
import sr_lib.metrics
import sr_sample
import sr_train
from sr_lib import data
from sr_lib.checkpoint import save_checkpoint
from sr_lib.errors import exit_on_error
from sr_lib.models import build_model

SCALE, N = 4, 2
lpips_file = test_eval_cli.lpips_file  # the fixture: a random-weight LPIPS state_dict


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


def out_of_memory_at(monkeypatch, image: int, error: BaseException | None):
    """sr_lib.metrics.evaluate_image raising `error` on the `image`-th HR image (from 0), or
    with None sending this process SIGTERM there (its handler raises in the call)."""
    real, calls = sr_lib.metrics.evaluate_image, []

    def evaluate(gt, samples, **kwargs):
        calls.append(kwargs["gt_name"])
        if len(calls) == image + 1:
            if error is None:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise error
        return real(gt, samples, **kwargs)

    monkeypatch.setattr(sr_lib.metrics, "evaluate_image", evaluate)


CUDA_OOM = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
CPU_OOM = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")
NO_THREAD = RuntimeError("can't start new thread")


# the second of two 32x32 images (the last: none decoded meanwhile), 2 samples per --sr folder
SCORING = "scoring 0001 (32x32: its files decoded take ~9.2 kB, PSNR and SSIM ~74 kB"
NTIRE = "--ntire (no PSNR/SSIM columns: ~74 kB less)"


@pytest.mark.parametrize(
    "flags, error, advice",
    [
        (["--no-lpips", "--ntire"], MemoryError(), "out of memory scoring 0001 (32x32: its files "
         "decoded take ~9.2 kB); free memory, or run on a machine with more"),
        (["--no-lpips", "--ntire"], CUDA_OOM, "out of memory scoring 0001 (32x32: its files "
         "decoded take ~9.2 kB); free memory, or run on a machine with more"),
        (["--no-lpips"], MemoryError(), f"out of memory {SCORING}); use {NTIRE}"),
        # (a thread's stack that cannot be mapped under a ulimit -v: was a traceback, exit 1)
        (["--no-lpips"], NO_THREAD, f"out of memory {SCORING}); use {NTIRE}"),
        (["--no-lpips", "--lr-blur", 2], MemoryError(), f"out of memory {SCORING} and --lr-blur's "
         "downscale ~31 kB); use no --lr-blur (~31 kB less) or --ntire and no --lr-blur (no "
         "PSNR/SSIM columns: ~110 kB less)"),
        (["--no-lpips", "--sr", "b=SR"], MemoryError(), "out of memory scoring 0001 (32x32: its "
         f"files decoded take ~15 kB, PSNR and SSIM ~74 kB); use {NTIRE} or fewer --sr folders "
         "per run (~6.1 kB less each)"),
        ([], MemoryError(), "out of memory scoring 0001 (32x32: its files decoded take ~9.2 kB, "
         "LPIPS ~190 kB, then PSNR and SSIM ~74 kB); use --no-lpips (~120 kB less)"),
        (["--lpips-batch", 3], CPU_OOM, "out of memory scoring 0001 (32x32: its files decoded "
         "take ~9.2 kB, LPIPS ~260 kB, then PSNR and SSIM ~74 kB); use a smaller --lpips-batch "
         "(this run's: 3; ~67 kB a sample) or --no-lpips (~180 kB less)"),
    ],
)  # fmt: skip
def test_out_of_memory_names_what_helps_this_run_and_the_scores_kept(
    tmp_path, capsys, monkeypatch, lpips_file, flags, error, advice
):
    """The line said "use a smaller --batch or --tile", flags of sr_sample.py that sr_eval.py
    has not, and not that the scores of the images done were kept; then, on every run, "a
    smaller --lpips-batch (...), --device cpu, or --no-lpips": on a CPU the --lpips-batch was 1
    already and --device cpu what ran, and with --no-lpips none of the three helps. Now exit 4,
    one line naming what lowers this run's memory (`out_of_memory_line`) and where the scores
    so far are, which a rerun continues from. It named "fewer --sr folders" where they held
    little of the memory (a 3072x3072 image at --n 2: 3.56 GB with one folder, 3.62 with two);
    now it says what the image being scored takes, and what each remedy saves."""
    hr_dir, sr_dir = make_set(tmp_path)
    out = tmp_path / "res" / "r.json"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", N, "--out", out, "--json",
            "--quiet", *flags]  # fmt: skip
    if "--no-lpips" not in flags:
        argv += ["--lpips-weights", lpips_file, "--device", "cpu"]
    argv = [str(a).replace("=SR", f"={sr_dir}") for a in argv]
    out_of_memory_at(monkeypatch, 1 if "b=SR" not in flags else 2, error)
    with pytest.raises(SystemExit) as e:
        sr_eval.main(argv)
    got = capsys.readouterr()
    said = (
        f"{advice}; the scores of 1 of 2 images are kept in {out}.partial: fix that and rerun "
        "the same command to continue"
    )
    assert e.value.code == 4
    assert got.err.splitlines() == [f"sr_eval.py: error: {said}"]
    line = json.loads(got.out.splitlines()[-1])
    assert (line["exit_code"], line["error"], line["scored"], line["kept"]) == (4, said, 1, 1)
    monkeypatch.undo()  # the rerun continues from the image kept
    assert sr_eval.main(argv) == 0
    assert "continuing" not in capsys.readouterr().err  # (--quiet)
    assert json.loads(out.read_text())["settings"]


@pytest.mark.parametrize(
    "device, batch, lpips, methods, error, advice",
    [
        ("cuda", 4, True, 1, CUDA_OOM, "a smaller --lpips-batch (this run's: 4), --device cpu "
         "or --no-lpips"),
        ("cuda:1", 1, True, 2, CUDA_OOM, "--device cpu or --no-lpips"),
        ("cuda", 4, True, 2, MemoryError(), "fewer --sr folders per run"),
        ("cuda", 4, True, 1, CPU_OOM, None),
        ("cuda", 4, True, 2, NO_THREAD, "fewer --sr folders per run"),  # (a host thread's stack)
        ("cpu", 1, True, 1, MemoryError(), "--no-lpips"),
        ("cpu", 2, True, 3, MemoryError(), "a smaller --lpips-batch (this run's: 2), --no-lpips "
         "or fewer --sr folders per run"),
        ("cpu", 1, False, 1, MemoryError(), None),
    ],
)  # fmt: skip
def test_the_out_of_memory_line_of_each_device_and_batch(
    device, batch, lpips, methods, error, advice
):
    """On CUDA, LPIPS alone holds the device's memory: a smaller --lpips-batch where it is over
    1, --device cpu and --no-lpips lower it; the host's memory holds each image's decoded files
    (every --sr folder's samples together), and LPIPS's where it runs on the CPU."""
    line = sr_eval.out_of_memory_line(error, torch.device(device), batch, lpips, methods)
    if advice is None:
        assert line == sr_eval.OUT_OF_MEMORY_IMAGES
    else:
        assert line == f"out of memory; use {advice}"


def test_the_out_of_memory_line_says_what_the_image_takes(tmp_path):
    """A host's out-of-memory line says what the image being scored takes (from its header and
    sr_eval.LPIPS_BYTES) and what each remedy saves; a GPU's names LPIPS's flags alone."""
    gt = tmp_path / "0801.png"
    iio.imwrite(gt, np.zeros((3072, 2048, 3), np.uint8))
    px, cpu = 3072 * 2048, torch.device("cpu")
    need = sr_eval.image_needs("0801", gt, [10, 10], False, "rgb", ahead=True)
    # uint8 RGB: 3 bytes a pixel for each of 21 files; PSNR/SSIM: 3 float64 maps of 3 channels
    assert (need.decoded, need.folder, need.scoring) == (21 * 3 * px, 10 * 3 * px, 72 * px)
    assert sr_eval.out_of_memory_line(MemoryError(), cpu, 1, True, 2, need) == (
        "out of memory scoring 0801 (2048x3072: its files decoded take ~400 MB, as much again "
        "for the next image's, LPIPS ~1.2 GB, then PSNR and SSIM ~450 MB); use --no-lpips (~710 "
        "MB less) or fewer --sr folders per run (~380 MB less each)"
    )  # (LPIPS on the CPU takes more than PSNR and SSIM after it: --ntire would not help)
    y = sr_eval.image_needs("0801", gt, [10], False, "y", ahead=False)  # one channel, the last
    assert (y.decoded, y.scoring) == (11 * 3 * px, 24 * px)
    assert sr_eval.out_of_memory_line(MemoryError(), cpu, 1, False, 1, y) == (
        "out of memory scoring 0801 (2048x3072: its files decoded take ~210 MB, PSNR and SSIM "
        "~150 MB); use --ntire (no PSNR/SSIM columns: ~150 MB less)"
    )
    assert sr_eval.out_of_memory_line(MemoryError(), cpu, 4, True, 1, y) == (
        "out of memory scoring 0801 (2048x3072: its files decoded take ~210 MB, LPIPS ~2.4 GB, "
        "then PSNR and SSIM ~150 MB); use a smaller --lpips-batch (this run's: 4; ~410 MB a "
        "sample) or --no-lpips (~2.2 GB less)"
    )
    ntire = sr_eval.image_needs("0801", gt, [10], True, "rgb", ahead=False)
    assert ntire.scoring == 0
    assert sr_eval.out_of_memory_line(CPU_OOM, cpu, 1, False, 1, ntire) == (
        f"out of memory scoring 0801 (2048x3072: its files decoded take ~210 MB); {sr_eval.FIT}"
    )
    cuda = sr_eval.out_of_memory_line(CUDA_OOM, torch.device("cuda"), 4, True, 2, need)
    assert (
        cuda
        == "out of memory; use a smaller --lpips-batch (this run's: 4), --device cpu or --no-lpips"
    )
    assert sr_eval.image_needs("0801", tmp_path / "none.png", [1], False, "rgb", True) is None


def test_the_out_of_memory_line_counts_lr_blurs_downscale(tmp_path):
    """--lr-blur's blurred downscales (`degrade` of the GT and of each sample, float64, after
    PSNR and SSIM with their maps still held) were not in what the out-of-memory line says an
    image takes, nor was no --lr-blur among its remedies. Now counted: `degrade_bytes`, about
    what tracemalloc sees one take (docs/benchmarks.md: the process grew 56 MB at 2040x1352 x4),
    and the uint8 LRs kept; --ntire, which refuses --lr-blur, named with it."""
    gt = tmp_path / "0801.png"
    iio.imwrite(gt, np.zeros((1352, 2040, 3), np.uint8))
    plain = sr_eval.image_needs("0801", gt, [10], False, "rgb", ahead=False)
    blurred = sr_eval.image_needs("0801", gt, [10], False, "rgb", ahead=False, blur_scale=4)
    lrs = 11 * 3 * 338 * 510  # (the GT's and 10 samples', uint8)
    assert plain.blur == 0 and blurred.blur == sr_eval.degrade_bytes((1352, 2040), 4) + lrs
    assert 40e6 < blurred.blur < 60e6
    hr = np.zeros((1352, 2040, 3), np.uint8)
    tracemalloc.start()
    try:
        data.degrade(hr, 4, 2.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs(sr_eval.degrade_bytes((1352, 2040), 4) / peak - 1) < 0.15, peak
    line = sr_eval.out_of_memory_line(MemoryError(), torch.device("cpu"), 1, False, 1, blurred)
    assert line == (
        "out of memory scoring 0801 (2040x1352: its files decoded take ~91 MB, PSNR and SSIM "
        "~200 MB and --lr-blur's downscale ~52 MB); use no --lr-blur (~52 MB less) or --ntire "
        "and no --lr-blur (no PSNR/SSIM columns: ~250 MB less)"
    )


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


@pytest.fixture(scope="module")
def flow_folders(tmp_path_factory):
    """A tiny srflow's samples of 2 HR images (--from-hr): at --temperature 0.5, and decoded
    from one of them's --save-latent file with --latent (its manifest.json records the
    default temperature all the same, which made none of them)."""
    root = tmp_path_factory.mktemp("flow")
    hr_dir, _ = make_set(root)
    cfg = {**TINY["srflow"], "scale": SCALE}
    torch.manual_seed(0)
    ckpt = root / "flow.pt"
    save_checkpoint(ckpt, {"model": "srflow", "model_cfg": cfg, "step": 0,
                           "state_dict": build_model("srflow", cfg).state_dict()})  # fmt: skip
    argv = ["--ckpt", ckpt, "--input", hr_dir, "--from-hr", "--n", 1, "--quiet"]
    drawn, decoded = root / "drawn", root / "decoded"
    run = [str(a) for a in [*argv, "--temperature", 0.5, "--save-latent", "--out", drawn]]
    assert sr_sample.main(run) == 0
    latent = drawn / "0000_sample00000.latent.npz"
    assert sr_sample.main([str(a) for a in [*argv, "--latent", latent, "--out", decoded]]) == 0
    return hr_dir, drawn, decoded


def test_a_folder_whose_latents_a_control_set_has_no_temperature(tmp_path, capsys, flow_folders):
    """sr_sample.py --latent: its manifest.json records the default temperature (srflow's 0.9),
    which made none of the samples (their latent is of a --temperature 0.5 run); sr_eval.py
    reported 0.9 as theirs. Now no temperature, as for a deterministic model: null in --out
    (its methods, and its settings for a single folder), empty in --csv and the report's T
    column; the folder of drawn latents keeps its 0.5 everywhere."""
    hr_dir, drawn, decoded = flow_folders
    manifest = json.loads((decoded / "manifest.json").read_text())
    assert manifest["temperature"] == 0.9 and manifest["flags"]["latent"]
    res = tmp_path / "res"
    argv = ["--hr", hr_dir, "--sr", f"drawn={drawn}", f"decoded={decoded}", "--scale", SCALE,
            "--n", 1, "--no-lpips", "--out", res / "r.json", "--csv", res / "r.csv", "--report",
            res / "report", "--quiet"]  # fmt: skip
    assert sr_eval.main([str(a) for a in argv]) == 0
    methods = json.loads((res / "r.json").read_text())["methods"]
    assert (methods["drawn"]["temperature"], methods["decoded"]["temperature"]) == (0.5, None)
    rows = list(csv.DictReader((res / "r.csv").open()))
    assert sorted((r["method"], r["temperature"]) for r in rows) == [
        ("decoded", ""), ("decoded", ""), ("drawn", "0.5"), ("drawn", "0.5")
    ]  # fmt: skip
    page = (res / "report" / "index.html").read_text()
    cells = re.findall(r"<tr><td[^>]*>(\w+)</td><td[^>]*>([^<]*)</td>", page)
    assert cells == [("drawn", "0.5"), ("decoded", "")]
    one = ["--hr", hr_dir, "--sr", decoded, "--scale", SCALE, "--n", 1, "--no-lpips", "--out",
           res / "one.json", "--quiet"]  # fmt: skip
    assert sr_eval.main([str(a) for a in one]) == 0
    assert json.loads((res / "one.json").read_text())["settings"]["temperature"] is None


@pytest.mark.parametrize("end", ["SIGTERM", "out of memory"])
def test_the_json_lines_results_and_csv_name_only_files_this_run_wrote(
    tmp_path, capsys, monkeypatch, end
):
    """After a stop (exit 75) or an error (exit 4) while scoring, the --json line's results and
    csv still named the --out and --csv paths, where this run wrote nothing (an earlier run's
    files there are moved to NAME.old). They are null now, as report is until its page is
    written; a run that completes names its files."""
    hr_dir, sr_dir = make_set(tmp_path)
    res = tmp_path / "res"
    out, table = res / "r.json", res / "r.csv"
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", N, "--no-lpips", "--out",
            out, "--csv", table, "--json", "--quiet"]  # fmt: skip
    argv = [str(a) for a in argv]
    assert sr_eval.main(argv) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (line["results"], line["csv"]) == (str(out), str(table))
    out_of_memory_at(monkeypatch, 1, None if end == "SIGTERM" else MemoryError())
    with pytest.raises(SystemExit) as e:
        sr_eval.main(argv)
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert e.value.code == line["exit_code"] == (75 if end == "SIGTERM" else 4)
    assert (line["results"], line["csv"], line["report"]) == (None, None, None)
    assert not out.exists() and not table.exists()
    assert (res / "r.json.old").is_file() and (res / "r.csv.old").is_file()
    assert line["partial"] == str(out) + ".partial" and line["kept"] == 1


def test_the_settings_n_is_the_n_the_rows_were_scored_with(tmp_path, capsys):
    """The JSON's settings.n was --n even where every --sr DIR:N gave its own (10 for two
    folders scored at N = 1); now it is the N the rows share, null where they differ (each
    method's own n says it)."""
    hr_dir, sr_dir = make_set(tmp_path)
    other = tmp_path / "sr2"
    other.mkdir()
    for f in sr_dir.iterdir():
        os.link(f, other / f.name)
    out = tmp_path / "r.json"
    for ns, want in (((1, 1), 1), ((1, 2), None)):
        argv = ["--hr", hr_dir, "--sr", f"{sr_dir}:{ns[0]}", "--sr", f"{other}:{ns[1]}", "--scale",
                SCALE, "--n", 10, "--no-lpips", "--out", out, "--quiet"]  # fmt: skip
        assert sr_eval.main([str(a) for a in argv]) == 0
        res = json.loads(out.read_text())
        assert [m["n"] for m in res["methods"].values()] == list(ns)
        assert res["settings"]["n"] == want


def test_the_scores_key_holds_the_gpu_model(monkeypatch):
    """The key of the kept scores (OUT.partial) recorded the device as 'cuda', not its model: a
    job requeued onto another GPU model continued from the first's scores, a mix of two models'
    numbers that differ at about 1e-6. Now --out's settings hold the model
    (torch.cuda.get_device_name) that ran LPIPS, and so does the key: another model is another
    command (its scores moved aside, every image scored), as a switch to the CPU is. A CPU run
    has none, nor a --no-lpips run (the device runs nothing: CUDA is not started for a name)."""
    args = sr_eval.EvalArgs(hr="hr", sr=["sr"], scale=4, n=2)
    methods = [sr_eval.Method("sr", Path("sr"), 2, None)]
    lpips = SimpleNamespace(info={"sha256": "0" * 64}, batch=4)
    models = []

    def name(device=None):
        assert torch.device(device).type == "cuda"
        return models[-1]

    monkeypatch.setattr(torch.cuda, "get_device_name", name)

    def key(model, device="cuda", metric=lpips):
        models.append(model)
        settings = sr_eval.run_settings(args, 4, torch.device(device), metric, ["PSNR_mean"],
                                        methods)  # fmt: skip
        return settings["device_name"], sr_eval.scores_key(args, settings)

    a100, h100 = key("NVIDIA A100-SXM4-80GB"), key("NVIDIA H100 80GB HBM3")
    assert a100[0] == "NVIDIA A100-SXM4-80GB" and h100[0] == "NVIDIA H100 80GB HBM3"
    assert a100[1] != h100[1] and key("NVIDIA A100-SXM4-80GB") == a100
    assert key("never asked", "cpu")[0] is None and key("never asked", metric=None)[0] is None


def test_a_no_lpips_run_keeps_one_key_on_nodes_with_and_without_a_gpu(monkeypatch):
    """With --no-lpips the device runs nothing (PSNR and SSIM run on the CPU), yet --out's
    settings recorded the device picked (cuda on a GPU node) and the key of the kept scores held
    it and --device as typed: a job requeued from a GPU node onto a CPU one (or given --device
    cpu there) scored every image again, for the same numbers. Now the settings say cpu, and
    --device and --lpips-batch (both ignored) are in no key."""
    methods = [sr_eval.Method("sr", Path("sr"), 2, None)]

    def key(gpus: int, device: str, batch=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        args = sr_eval.EvalArgs(hr="demo", sr=["sr"], scale=4, n=2, no_lpips=True, device=device,
                                lpips_batch=batch)  # fmt: skip
        shave, picked = sr_eval.check_flags(args)[:2]
        settings = sr_eval.run_settings(args, shave, picked, None, ["PSNR_mean"], methods)
        return settings["device"], sr_eval.scores_key(args, settings)

    cpu = key(0, "auto")
    assert cpu[0] == "cpu"
    assert [key(1, "auto"), key(1, "cuda"), key(2, "cuda:1", 4), key(0, "cpu")] == [cpu] * 4


def test_the_scores_key_holds_the_threads_of_lpips_on_the_cpu(monkeypatch):
    """LPIPS on the CPU with 1 and 2 threads differs in LPIPS_mean's 8th digit and score's 6th
    (docs/metrics.md; measured again here: 0.0026893691 vs 0.0026893689), yet the key of the
    kept scores held no thread count: a job requeued onto a node of other cores continued from
    the first's scores, a mix of the two. Now --out's settings record LPIPS's threads on the
    CPU, and the key with them; a GPU's LPIPS and a --no-lpips run have none (the same key on
    any cores)."""
    args = sr_eval.EvalArgs(hr="hr", sr=["sr"], scale=4, n=2)
    methods = [sr_eval.Method("sr", Path("sr"), 2, None)]
    lpips = SimpleNamespace(info={"sha256": "0" * 64}, batch=1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")

    def key(threads: int, device="cpu", metric=lpips):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        settings = sr_eval.run_settings(args, 4, torch.device(device), metric, ["PSNR_mean"],
                                        methods)  # fmt: skip
        return settings["threads"], sr_eval.scores_key(args, settings)

    one, two = key(1), key(2)
    assert (one[0], two[0]) == (1, 2) and one[1] != two[1] and key(1) == one
    assert key(1, "cuda") == key(2, "cuda") and key(1, "cuda")[0] is None
    assert key(1, metric=None) == key(2, metric=None) and key(1, metric=None)[0] is None


def test_the_scores_key_holds_the_instruction_set_of_lpips_on_the_cpu(monkeypatch):
    """An AVX2 node's LPIPS differs from an AVX-512 node's in LPIPS_mean's 7th digit (oneDNN's
    convolution kernels follow the CPU: `sr_eval.cpu_capability`, docs/benchmarks.md), yet the
    key of the kept scores held no instruction set: a job requeued from one onto the other
    continued from the first's scores, a mix of the two. Now --out's settings record it for
    LPIPS on the CPU, and the key with them; a GPU's LPIPS and a --no-lpips run have none (one
    key on any CPU). A threads-era key (none) is this command's only where it is null."""
    args = sr_eval.EvalArgs(hr="hr", sr=["sr"], scale=4, n=2)
    methods = [sr_eval.Method("sr", Path("sr"), 2, None)]
    lpips = SimpleNamespace(info={"sha256": "0" * 64}, batch=1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")

    def key(isa: str, device="cpu", metric=lpips):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
        settings = sr_eval.run_settings(args, 4, torch.device(device), metric, ["PSNR_mean"],
                                        methods)  # fmt: skip
        later = ("cpu_capability", "cpu_kernels")  # (the threads-era key: neither)
        earlier = {k: v for k, v in settings.items() if k not in later}
        legacy = sr_eval.scores_key(args, earlier) in sr_eval.legacy_keys(args, settings)
        return settings["cpu_capability"], sr_eval.scores_key(args, settings), legacy

    avx2, avx512 = key("AVX2"), key("AVX512")
    assert (avx2[0], avx512[0]) == ("AVX2", "AVX512") and avx2[1] != avx512[1]
    assert key("AVX2") == avx2 and not avx2[2]  # (the threads-era key: not this command's)
    for device, metric in (("cuda", lpips), ("cpu", None)):  # (--no-lpips: no metric)
        either = key("AVX2", device, metric)
        assert either == key("AVX512", device, metric) and either[::2] == (None, True)


def test_the_scores_key_holds_what_picks_the_kernels_of_onednn_and_mkl(monkeypatch, tmp_path):
    """The key held ATen's instruction set alone (cpu_capability), but LPIPS's convolutions run
    in oneDNN and some of its GEMMs in MKL, which take their kernels from the CPU's features
    and their own environment variables: ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU changes
    LPIPS_mean's 7th digit (docs/benchmarks.md) and MKL_CBWR its 8th, cpu_capability the same,
    and a rerun so continued from the first's scores, a mix. Now --out's settings record
    `cpu_kernels` (the machine, the CPU's vendor, its features that pick kernels, the variables
    set), in the key: identical nodes (another model name, stepping, microcode, a mitigation
    flag) share one key; other features, another vendor or a variable set give another; where
    /proc/cpuinfo is missing, the machine's name. None on CUDA and with --no-lpips."""
    args = sr_eval.EvalArgs(hr="hr", sr=["sr"], scale=4, n=2)
    methods = [sr_eval.Method("sr", Path("sr"), 2, None)]
    lpips = SimpleNamespace(info={"sha256": "0" * 64}, batch=1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(sr_eval, "CPUINFO", cpuinfo)
    for name in (*sr_eval.KERNEL_ENV, "ONEDNN_VERBOSE"):
        monkeypatch.delenv(name, raising=False)

    def node(flags: str, vendor="AuthenticAMD", model="AMD EPYC 9654", microcode="0xa101148"):
        cpu = (f"vendor_id\t: {vendor}\ncpu family\t: 25\nmodel name\t: {model}\n"
               f"stepping\t: 1\nmicrocode\t: {microcode}\nflags\t\t: fpu {flags}\n\n")  # fmt: skip
        cpuinfo.write_text("".join(f"processor\t: {i}\n{cpu}" for i in range(2)))

    def key(device="cpu", metric=lpips):
        settings = sr_eval.run_settings(args, 4, torch.device(device), metric, ["PSNR_mean"],
                                        methods)  # fmt: skip
        return settings["cpu_kernels"], sr_eval.scores_key(args, settings)

    avx2 = "sse4_1 sse4_2 avx avx2 fma f16c"
    avx512 = f"{avx2} avx512f avx512dq avx512bw avx512vl avx512_vnni"
    node(avx512)
    first = key()
    assert first[0]["features"] == sorted(avx512.split()) and first[0]["env"] == {}
    assert first[0]["vendor"] == "AuthenticAMD" and "host" not in first[0]
    node(f"{avx512} md_clear", model="AMD EPYC 9655", microcode="0xa10114e")  # (identical)
    assert key() == first
    others = []
    node(avx2)  # an AVX2 node
    others.append(key()[1])
    node(f"{avx512} avx512_bf16 amx_tile amx_bf16")
    others.append(key()[1])
    node(avx512, vendor="GenuineIntel")  # (MKL's paths)
    others.append(key()[1])
    node(avx512)
    capping = [("ONEDNN_MAX_CPU_ISA", "AVX2"), ("DNNL_MAX_CPU_ISA", "AVX2")]
    capping += [("ONEDNN_DEFAULT_FPMATH_MODE", "BF16"), ("MKL_CBWR", "COMPATIBLE")]
    for name, value in capping:
        monkeypatch.setenv(name, value)
        capped = key()
        assert capped[0]["env"] == {name: value}
        others.append(capped[1])
        monkeypatch.delenv(name)
    monkeypatch.setenv("ONEDNN_VERBOSE", "1")  # (changes no number)
    assert key() == first
    assert len({first[1], *others}) == 1 + len(others)
    cpuinfo.unlink()  # (macOS, a BSD): the machine's name stands for the features
    monkeypatch.setattr(sr_eval.socket, "gethostname", lambda: "node1")
    unknown = key()
    assert unknown[0]["features"] is None and unknown[0]["host"] == "node1"
    monkeypatch.setattr(sr_eval.socket, "gethostname", lambda: "node2")
    assert key()[1] not in (unknown[1], first[1])
    for device, metric in (("cuda", lpips), ("cpu", None)):  # (--no-lpips: no metric)
        either = key(device, metric)
        node(avx2)
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
        assert either == key(device, metric) and either[0] is None
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")


def test_the_key_of_moved_data_leaves_out_the_lpips_weights_path():
    """A job that staged its data to the node's $TMPDIR continues (`adopt_key`), but one
    that staged its --lpips-weights file with it scored every image again: the moved data's key
    held the weights' path, though their sha256, in the settings, says which they are."""
    methods = [sr_eval.Method("sr", Path("sr"), 2, None)]
    lpips = SimpleNamespace(info={"sha256": "0" * 64}, batch=1)

    def key(weights, sha="0" * 64):
        args = sr_eval.EvalArgs(hr="hr", sr=["sr"], scale=4, n=2, lpips_weights=weights)
        lpips.info["sha256"] = sha
        settings = sr_eval.run_settings(args, 4, torch.device("cpu"), lpips, ["PSNR_mean"],
                                        methods)  # fmt: skip
        return sr_eval.scores_key(args, settings, methods)

    assert key("/home/u/alex.pth") == key("/tmp/job/alex.pth")
    assert key("/home/u/alex.pth") != key("/tmp/job/alex.pth", "1" * 64)  # other weights
