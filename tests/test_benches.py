"""The hand-run benchmarks under tests/bench/ still run and measure what they claim, at tiny sizes
(tests/test_bench_gpu.py covers bench_gpu.py): a broken benchmark is found here, not in the
session that needs its numbers."""

import importlib
import json
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY

from sr_lib.checkpoint import save_checkpoint
from sr_lib.models import build_model

BENCH = Path(__file__).resolve().parent / "bench"


def bench(script: str, *args, cwd=None) -> dict:
    cmd = [sys.executable, str(BENCH / script), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # stdout is the one JSON object


def in_process(script: str, *args, monkeypatch, capfd, cwd=None) -> dict:
    """`bench`, run in this process (`run_as_script`): the torch import of a subprocess saved.
    torch's random state, which a benchmark seeds, is put back after it."""
    if cwd:
        monkeypatch.chdir(cwd)
    with torch.random.fork_rng():
        code = run_as_script(script, list(args), monkeypatch)
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    return json.loads(out)  # stdout is the one JSON object


def test_bench_tiling_finds_seams_without_context_and_none_with_the_halo(monkeypatch, capfd):
    r = in_process("bench_tiling.py", "--models", "edsr", "vspsr", "--lr-size", 24, "--tile", 16,
                   "--contexts", "halo", "0", "--n", 1,
                   monkeypatch=monkeypatch, capfd=capfd)  # fmt: skip
    assert set(r["models"]) == {"edsr (random weights)", "vspsr (random weights)"}
    assert r["torch"] == torch.__version__ and r["cpu"]  # what the numbers were measured on
    for row in r["models"].values():
        halo, none = (row["contexts"][k] for k in (f"halo ({row['tile_halo']} px)", "0 (0 px)"))
        assert halo["max_difference_255"] == 0 and halo["share_of_values_differing"] == 0
        assert none["max_difference_255"] > 0  # the benchmark does see a seam when there is one


def test_bench_sample_amp_compares_each_precision_and_skips_refused_ones(
    tmp_path, monkeypatch, capfd
):
    paths = []
    for name in ("edsr", "srflow"):
        cfg = {**TINY[name], "scale": 4}
        paths.append(tmp_path / f"{name}.pt")
        state = build_model(name, cfg).state_dict()
        save_checkpoint(paths[-1], {"model": name, "model_cfg": cfg, "state_dict": state,
                                    "step": 0})  # fmt: skip
    hr = tmp_path / "hr photos"  # two small photographs: the demo set's 3 took 3 s per run
    hr.mkdir()
    for i in range(2):
        img = np.kron(np.random.default_rng(i).random((6, 8, 3)), np.ones((8, 8, 1)))
        iio.imwrite(hr / f"im{i}.png", (img * 255).astype(np.uint8))
    r = in_process("bench_sample_amp.py", "--ckpt", *paths, "--n", 2, "--amp", "bf16", "fp16",
                   "--input", hr, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)  # fmt: skip
    assert r["input"] == str(hr)
    assert r["torch"] == torch.__version__ and r["cpu"] and r["torch_threads"] >= 1
    edsr, srflow = (r["models"][f"{name} ({p})"] for name, p in zip(("edsr", "srflow"), paths))
    for row, amps in ((edsr, ("bf16", "fp16")), (srflow, ("bf16",))):
        assert row["none"]["PSNR"] > 0 and row["none"]["seconds"] > 0
        for amp in amps:
            change = row[amp]["LRPSNR_change_dB"]
            assert change == pytest.approx(row[amp]["LRPSNR"] - row["none"]["LRPSNR"])
            assert 0 <= row[amp]["max_pixel_difference"] <= 255
    assert srflow["fp16"].startswith("refused")  # the flows leave float16's range
    # each --amp really sampled in its precision: some 8-bit value moved
    assert all(edsr[amp]["max_pixel_difference"] >= 1 for amp in ("bf16", "fp16"))


@pytest.mark.slow
def test_bench_flow_sampling_quick():
    """Every case at tiny sizes, on one thread: two spin-waited at each of a reverse pass's many
    small operations on a loaded 2-core machine (over 200 s instead of under 60)."""
    r = bench("bench_flow_sampling.py", "--quick")
    assert r["quick"] and r["threads"] == 1
    assert [row["case"] for row in r["results"]] == ["x4", "x8", "tile"]
    for row in r["results"]:
        assert row["finite"] and row.get("bit_identical_to_one_at_a_time", True)
        assert row["peak_rss_mb"] > 0


def run_as_script(script: str, argv: list, monkeypatch) -> int:
    """`python tests/bench/SCRIPT ARGV` run in this process (torch is imported here already: a
    subprocess spent 2 s of CPU importing it to print one line): the file executed as __main__,
    its folder first on sys.path, and the exit status Python gives (a SystemExit's message
    printed on stderr, status 1). sys.argv, sys.path, the environment and the working directory
    are put back after the test."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # bench_eval.py sets them to 1
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *map(str, argv)])
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    try:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    return 0


@pytest.mark.parametrize(
    "script, flags",
    [("check_official_parity.py", ["--srflow"]), ("bench_eval.py", ["--released"]),
     ("bench_flow_amp.py", ["--parts", "ops", "--official"]),
     ("check_vspsr_parity.py", ["--released"]), ("check_refvae_parity.py", ["--released"]),
     ("check_edsr_parity.py", ["--released"]), ("check_cem_parity.py", ["--released"]),
     ("check_esrgan_parity.py", ["--released"])],
)  # fmt: skip
def test_a_missing_folder_or_one_that_is_not_the_checkout_is_one_line_before_any_work(
    tmp_path, script, flags, monkeypatch, capfd
):
    other = tmp_path / "other project"  # a folder, but not the released code's checkout
    (other / "code" / "models").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for folder, repo in ((tmp_path / "missing", "no such folder"), (other, "not a checkout")):
        code = run_as_script(script, [*flags, folder], monkeypatch)
        out, err = capfd.readouterr()
        assert code in (1, 2) and out == ""
        assert err.count("\n") == 1 and err.startswith(f"{script}: error: ")
        assert f"{folder}: {repo}" in err  # a folder missing is told from a wrong one


@pytest.mark.parametrize("script", ["bench_sample_amp.py", "bench_tiling.py"])
def test_a_missing_checkpoint_is_one_line_before_any_model_runs(
    tmp_path, script, monkeypatch, capfd
):
    good = tmp_path / "edsr.pt"
    cfg = {**TINY["edsr"], "scale": 4}
    save_checkpoint(good, {"model": "edsr", "model_cfg": cfg, "step": 0,
                           "state_dict": build_model("edsr", cfg).state_dict()})  # fmt: skip
    missing = tmp_path / "run" / "last.pt"  # after a good one: read before that one is measured
    flags = ["--models", "edsr"] if script == "bench_tiling.py" else []
    monkeypatch.chdir(tmp_path)
    code = run_as_script(script, [*flags, "--ckpt", good, missing], monkeypatch)
    out, err = capfd.readouterr()
    assert code == 6 and out == ""
    assert err.startswith(f"{script}: error: {missing}") and err.count("\n") == 1


def bench_module(script: str):
    """A bench script imported as a module (its `main` run in this process)."""
    saved = list(sys.path)  # put back whole: a script also puts the repository there
    sys.path.insert(0, str(BENCH))  # its own imports (machine.py) are in that folder
    try:
        return importlib.import_module(script.removesuffix(".py"))
    finally:
        sys.path[:] = saved


def test_the_parity_checks_stdout_is_one_json_object_its_case_lines_go_to_stderr(
    tmp_path, monkeypatch, capsys
):
    parity = bench_module("check_official_parity.py")

    def released_run(cmd, **kwargs):  # a case's subprocess, as it ends when every value agrees
        row = {"case": cmd[cmd.index("--one") + 1], "ok": True, "notes": [],
               "diffs": {"reverse": {"max_abs": 1e-7, "rel": 1e-6, "ok": True}}}  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(row) + "\n", "")

    monkeypatch.setattr(parity.subprocess, "run", released_run)
    monkeypatch.setattr(parity, "checkout_error", lambda *args: "")
    assert parity.main(["--srflow", str(tmp_path), "--cases", "srflow:4", "srflow:8"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is True  # the whole of stdout: `> parity.json` stays JSON
    assert [line.split()[:2] for line in err.splitlines()] == [
        ["srflow:4", "ok"],
        ["srflow:8", "ok"],
    ]


@pytest.mark.parametrize("number, said", [(9, "SIGKILL"), (60, "signal 60")])
def test_a_parity_case_killed_without_a_word_says_by_which_signal(tmp_path, monkeypatch, capsys,
                                                                  number, said):  # fmt: skip
    """The kernel's OOM killer leaves no output; a signal without a name here (a real-time one,
    60) was a ValueError of the check itself."""
    parity = bench_module("check_official_parity.py")
    killed = lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, -number, "", "")  # noqa: E731
    monkeypatch.setattr(parity.subprocess, "run", killed)
    monkeypatch.setattr(parity, "checkout_error", lambda *args: "")
    assert parity.main(["--srflow", str(tmp_path), "--cases", "srflow:4"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is False
    assert err.split()[:2] == ["srflow:4", "FAIL"] and f"crashed (killed by {said})" in err


def test_a_parity_case_killed_after_its_result_keeps_the_result_and_says_so(
    tmp_path, monkeypatch, capsys
):
    parity = bench_module("check_official_parity.py")
    row = {"case": "srflow:8", "ok": True, "notes": [],
           "diffs": {"reverse": {"max_abs": 1e-7, "rel": 1e-6, "ok": True}}}  # fmt: skip
    done = "RESULT " + json.dumps(row) + "\n"  # every value compared, then the process was killed
    killed = lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, -9, done, "")  # noqa: E731
    monkeypatch.setattr(parity.subprocess, "run", killed)
    monkeypatch.setattr(parity, "checkout_error", lambda *args: "")
    assert parity.main(["--srflow", str(tmp_path), "--cases", "srflow:8"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["max_differences"]["srflow:8"] == {"reverse": 1e-6}
    assert err.split()[:2] == ["srflow:8", "ok"] and "killed by SIGKILL after its result" in err


class Trained(Exception):
    """Ends a learning benchmark at its first training run."""


@pytest.mark.parametrize(
    "script, argv",
    [("bench_learning.py", ["--calibration-rounds", "1"]), ("bench_vae_learning.py", []),
     ("bench_vspsr_learning.py", [])],
)  # fmt: skip
def test_the_learning_benches_keep_sr_trains_log_lines_off_stdout(
    script, argv, monkeypatch, capsys
):
    """sr_train.main prints its progress on stdout: inside a benchmark that would come before the
    JSON object. Its training (minutes) is replaced by that printing."""
    module = bench_module(script)

    def training(train_argv):
        print("step 1 | loss 0.5000 | 0.100 s/step", flush=True)  # as sr_train.main logs
        raise Trained

    monkeypatch.setattr(module.sr_train, "main", training)
    monkeypatch.setattr(sys, "argv", [script, *argv])  # each main reads its flags from sys.argv
    with pytest.raises(Trained):
        module.main()
    out, err = capsys.readouterr()
    assert out == "" and "step 1 | loss" in err


def test_bench_eval_blocks_side_sees_the_memory_of_k_samples_taps(tmp_path, monkeypatch):
    """bench_eval.py --pairwise --block K gave sr_eval the free memory of K samples' taps alone;
    once sr_eval took what the scoring itself needs off the free memory first, that left none:
    --pairwise was refused (exit 4) and the benchmark failed. Its free memory is now the taps of
    K samples beside the scoring's own, which sr_eval computes in blocks of K."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # bench_eval.py sets them to 1
    monkeypatch.syspath_prepend(str(BENCH))
    bench_eval = importlib.import_module("bench_eval")
    import sr_eval

    (h, w), n = (bench_eval.H, bench_eval.W), 10
    iio.imwrite(tmp_path / "0801.png", np.zeros((h, w, 3), np.uint8))  # (its header is read)
    args = types.SimpleNamespace(scale=bench_eval.SCALE)
    methods = [types.SimpleNamespace(name="a", n=n)]
    for k in (1, 5, 9):
        monkeypatch.setattr(
            sr_eval, "free_memory", lambda device, k=k: bench_eval.block_memory(n, k)
        )
        memory = sr_eval.check_pairwise(args, {"0801": tmp_path / "0801.png"}, methods,
                                        torch.device("cpu"), 1)  # fmt: skip
        assert sr_eval.metrics.pairwise_block((h, w), n, bench_eval.SCALE, 1, memory) == k


def test_bench_degrade_times_each_size_without_and_with_blur():
    r = bench("bench_degrade.py", "--sizes", "64x48", "--runs", 1, "--blur", 1.5)
    assert [(c["hr"], c["blur"], c["lr"]) for c in r["cases"]] == [
        ("64x48", 0.0, "16x12"),
        ("64x48", 1.5, "16x12"),
    ]
    assert all(c["degrade_s"] > 0 and c["cpu_s"] >= 0 for c in r["cases"])
    assert r["torch"] == torch.__version__  # what the numbers were measured on


def test_bench_degrade_times_sr_evals_columns_without_and_with_the_blur():
    r = bench("bench_degrade.py", "--sizes", "--runs", 1, "--eval", "64x48", "--n", 2)
    e = r["eval"]
    assert (e["hr"], e["n"], e["blur"]) == ("64x48", 2, 2.0) and r["cases"] == []
    assert all(t > 0 for t in e["wall_s"]) and len(e["cpu_s"]) == 2
    assert e["lrpsnr_mean"][0] < e["lrpsnr_mean"][1]  # (blurred LR: its downscale closer)


def test_bench_data_times_degraded_pairs_of_the_patch_shapes():
    r = bench("bench_data.py", "--images", 2, "--workers", 0, "--batch", 2, "--warmup", 1,
              "--steps", 2, "--lr-blur", 1, "--lr-noise", 2, "--lr-jpeg", 80)  # fmt: skip
    assert r["degradation"] == "--lr-blur 1.0 --lr-noise 2.0 --lr-jpeg 80"
    assert r["shapes"] == [[2, 3, 48, 48], [2, 3, 192, 192]]  # LR 48, x4 HR patches
    assert r["timed_batches"] == 2 and r["pairs_per_s"] > 0 and r["cpu_ms_per_batch"] > 0


def test_bench_alpha_times_both_upsamplers_and_the_alpha_pass(monkeypatch, capfd):
    cfg = {name: TINY[name] for name in ("edsr", "srflow")}
    argv = ["--cfg", json.dumps(cfg), "--n", 1, 2, "--images", 1, "--lr-size", 16, "--repeat", 1]
    r = in_process("bench_alpha.py", *argv, monkeypatch=monkeypatch, capfd=capfd)
    assert r["torch"] == torch.__version__ and r["load_average"]  # what, and at what load
    assert [k.split(" ")[0] for k in r["models"]] == ["edsr", "srflow"]
    for rows in r["models"].values():
        assert list(rows) == ["n 1", "n 2"]
        for row in rows.values():
            assert all(row["wall_s"][u] > 0 and row["cpu_s"][u] > 0 for u in ("bicubic", "model"))
            # (a fraction of bicubic's run; not recomputed here from the seconds, rounded to ms)
            assert row["wall_overhead"] > -1 and row["cpu_overhead"] > -1
            assert row["alpha_pass_cpu_s"] > 0  # the model's alpha pass ran, once per image


def test_bench_near_path_finds_the_subfolder_where_its_listing_reaches_it(monkeypatch, capfd):
    r = in_process("bench_near_path.py", "--files", 30, "--caps", 5, 0, "--repeat", 1,
                   monkeypatch=monkeypatch, capfd=capfd)  # fmt: skip
    assert r["near_path"]["said"].endswith("/T0.5?)")  # (30 files: within near_path's 5,000)
    assert r["all entries"]["found"] == ["T0.5"] and r["all entries"]["listing_ms"] > 0
    assert r["first 5 entries"]["found"] == ([] if r["T0.5_listed_at"] >= 5 else ["T0.5"])
    assert r["torch"] == torch.__version__


def test_bench_manifest_names_counts_the_manifests_writes_of_a_run():
    """Its runs write manifest.json at the claim and the run's few records, never per image."""
    said = bench("bench_manifest_names.py", "--names", 500, "--images", 5, "--repeat", 1)
    assert said["runs"]["fresh"]["names_after"] == 5
    assert said["runs"]["listing_names"]["names_after"] == 505
    assert len(said["runs"]["fresh"]["manifest_writes_MB"]) == 2  # (its names, its inputs)
    assert len(said["runs"]["listing_names"]["manifest_writes_MB"]) == 3  # (+ the version)
    assert said["manifest_MB"] > 0 and said["rerun_claim_ms"] >= 0
