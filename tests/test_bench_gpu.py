"""tests/bench/bench_gpu.py in --quick mode on the CPU (tiny models and sizes, dynamo's "eager"
backend): the script a GPU session runs once must work end to end before it gets there."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sr_lib.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def bench(tmp_path, *flags, timeout=600):
    cmd = [sys.executable, str(REPO / "tests" / "bench" / "bench_gpu.py"), "--device", "cpu",
           "--quick", "--compile-backend", "eager", "--budget", "3000",
           "--out", str(tmp_path / "b.json"),
           *flags]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout is the one JSON object
    assert result == json.loads((tmp_path / "b.json").read_text())
    assert not result["errors"] and not result["skipped"]
    return result


def in_process(monkeypatch, capsys, *flags):
    """bench_gpu.main in this process (no interpreter and torch start-up to pay again). What it
    changes for the process, sys.path (its folder and the repository, from its import and from
    main) and torch's TF32 and cuDNN switches, is put back after the test."""
    monkeypatch.syspath_prepend(REPO / "tests" / "bench")
    import bench_gpu

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    switches = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    try:
        code = bench_gpu.main(["--device", "cpu", "--quick", "--compile-backend", "eager", *flags])
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = switches
    return code, json.loads(capsys.readouterr().out)


def test_a_training_measurement_and_a_spent_budget(monkeypatch, capsys):
    code, r = in_process(monkeypatch, capsys, "--sections", "train_srflow", "--variants", "fp32")
    row = r["train"]["srflow_x4"]
    assert code == 0 and not r["errors"] and not r["skipped"]
    assert row["fp32"]["median_s"] > 0 and (row["batch"], row["hr_patch"]) == (2, 32)
    assert len(r["loadavg_start"]) == len(r["loadavg_end"]) == 3 and r["threads"] >= 1
    code, r = in_process(monkeypatch, capsys, "--budget", "0")  # nothing measured: all listed
    assert code == 0 and "train" not in r and {"srflow_x4/fp32", "eval"} <= set(r["skipped"])


def test_a_folder_that_is_not_the_released_checkout_is_refused_before_any_measurement(
    tmp_path, monkeypatch
):
    (tmp_path / "code" / "models").mkdir(parents=True)  # a folder, not andreas128/SRFlow
    with pytest.raises(UsageError, match="not a checkout of andreas128/SRFlow"):
        in_process(monkeypatch, None, "--official", str(tmp_path))
    with pytest.raises(UsageError, match="no such folder"):
        in_process(monkeypatch, None, "--official", str(tmp_path / "missing"))


def test_a_compile_starts_only_with_its_time_left_and_the_targets_come_first(monkeypatch):
    """On a GPU a compiled variant needs minutes: it is skipped with less than COMPILE_S of the
    budget left, while the measurements after it still run. The plan measures the issue's
    targets (SRFlow's eager and graph steps, the released code, eval, fp32 sampling) before the
    first compile."""
    monkeypatch.syspath_prepend(REPO / "tests" / "bench")  # (as it was, after the test)
    import bench_gpu

    ran = []
    steps = [("train_srflow", "srflow_x4/compile", lambda: ran.append("compile")),
             ("eval", "eval", lambda: ran.append("eval"))]  # fmt: skip
    monkeypatch.setattr(bench_gpu, "plan", lambda b: steps)
    for left, want in ((bench_gpu.COMPILE_S - 1, ["eval"]), (bench_gpu.COMPILE_S + 1, None)):
        ran.clear()
        b = SimpleNamespace(cuda=True, left=lambda left=left: left, a=SimpleNamespace(quick=True),
                            result={"skipped": [], "errors": {}})  # fmt: skip
        bench_gpu.run_plan(b)
        assert ran == (want or ["compile", "eval"])
        assert b.result["skipped"] == ([] if want is None else ["srflow_x4/compile"])
    monkeypatch.undo()
    every = ("train_srflow", "graph_check", "official", "profile", "pipeline", "sample", "eval")
    flags = SimpleNamespace(official="SRFlow/", sections=every, variants=list(bench_gpu.VARIANTS))
    b = SimpleNamespace(cuda=True, a=flags)
    labels = [label for _, label, _ in bench_gpu.plan(b)]
    first_compile = min(i for i, label in enumerate(labels) if "compile" in label)
    targets = ["srflow_x4/fp32", "srflow_x4/bf16", "srflow_x4/graphs", "srflow_x4/bf16_graphs",
               "official", "eval", "sample_x4/fp32", "sample_x8/fp32"]  # fmt: skip
    assert max(labels.index(t) for t in targets) < first_compile


def test_graph_check_compares_recorded_and_eager_training(monkeypatch, capsys):
    """On a CPU the recording is stood in by the recorded function: two recordings (the encoder
    unfreezes), then the same losses and weights as the eager steps, exactly."""
    code, r = in_process(monkeypatch, capsys, "--sections", "graph_check")
    assert code == 0 and not r["errors"]
    for variant in ("fp32", "bf16"):
        row = r["graph_check"]["srflow_x4"][variant]
        assert row["recordings"] == 2 and row["steps"] == 16 and row["recording_failed"] is None
        assert row["loss_max_abs_diff"] == 0 and row["weight_max_rel_diff_per_tensor"] == 0


def test_profile_section_says_where_a_step_goes(monkeypatch, capsys):
    """On a CPU: no kernels, the top operations by self CPU time and by calls (a flow step's
    convolutions and its many small elementwise operations)."""
    code, r = in_process(monkeypatch, capsys, "--sections", "profile")
    assert code == 0 and not r["errors"] and not r["skipped"]
    for variant in ("fp32", "bf16"):
        row = r["profile"]["srflow_x4"][variant]
        assert row["kernels_per_step"] == row["copies_per_step"] == 0 and not row["top_kernels"]
        assert row["device_busy_fraction"] is None
        assert row["step_s_unprofiled"] > 0 and len(row["top_time"]) == 15
        names = [name for name, *_ in row["top_time"] + row["top_calls"]]
        assert any("convolution" in name for name in names)
        assert all(calls >= 1 for _, calls in row["top_calls"])
        assert row["top_calls"][0][1] >= row["top_calls"][-1][1]  # sorted by calls
    calls = {v: dict(r["profile"]["srflow_x4"][v]["top_calls"]) for v in ("fp32", "bf16")}
    assert calls["bf16"]["aten::_to_copy"] > calls["fp32"].get("aten::_to_copy", 0)  # the casts


@pytest.mark.slow
def test_training_sampling_and_eval_sections(tmp_path):
    flags = ["--sections", "train_srflow", "sample", "eval", "--variants", "fp32", "bf16"]
    r = bench(tmp_path, *flags)
    srflow = r["train"]["srflow_x4"]
    assert srflow["fp32"]["median_s"] > 0 and srflow["speedup_vs_fp32"]["bf16"] > 0
    assert set(r["sample"]) == {"srflow_x4_lr12x18", "srflow_x8_lr12x18"}
    assert all(set(v) == {"fp32", "bf16"} for v in r["sample"].values())
    assert r["eval"]["ntire"]["s_per_image"] > 0 and r["eval"]["ntire"]["n"] == 3
    assert r["eval"]["ntire"]["lpips_batch"] == 1 and r["eval"]["ntire"]["peak_gb"] is None
    cli = r["sample_cli"]["srflow_x4_lr12x18"]  # sr_sample.py end to end
    assert cli["s"] > 0 and cli["s_one_writer"] > 0 and cli["writer_threads"] >= 1


@pytest.mark.slow
def test_every_section_and_variant(tmp_path):
    r = bench(tmp_path, timeout=1800)
    for name in ("srflow_x4", "vspsr_x4", "varsr_x4", "edsr_x4"):
        row = r["train"][name]
        assert all(row[v]["median_s"] > 0 for v in ("fp32", "bf16", "compile", "bf16_compile"))
        assert row["compile"]["graphs"] >= 1 and row["compile"]["graph_breaks"] == 0
        assert all(row[v]["recordings"] == 1 for v in ("graphs", "bf16_graphs"))
    assert r["train"]["srflow_x4"]["compile"]["graphs"] > 1  # regional: one per block shape
    assert r["train"]["srflow_x4"]["bf16_compile_graphs"]["recordings"] == 1
    assert r["graph_check"]["srflow_x4"]["bf16"]["loss_max_abs_diff"] == 0
    for v in ("fp32", "bf16"):
        assert r["pipeline"][f"srflow_x4_{v}"]["logged_median_s"] > 0
