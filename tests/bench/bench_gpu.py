"""Everything issue 17 measures on one GPU, in one run; prints one JSON object (and keeps it in
--out after every measurement, so a run cut short still leaves what it measured).

    python tests/bench/bench_gpu.py --official SRFlow/ --out gpu.json      # on a GPU machine
    python tests/bench/bench_gpu.py --device cpu --quick --compile-backend eager   # smoke test

Measurements (run in plan()'s priority order, not this one; when --budget seconds are spent,
the rest are listed as skipped):
  train_srflow   SRFlow ×4 training step at its recipe (batch 12, HR 160, encoder frozen as in the
                 first half): forward + backward + Adam, fp32, bf16 autocast, --cuda-graphs
                 (sr_train.py's own step, recorded once and replayed) in fp32 and bf16,
                 --compile (regional), bf16 + compile, bf16 + compile + graphs, bf16
                 channels-last; median seconds of --reps steps after warm-up, peak memory;
                 compiled: the first step's seconds (compilation) and the graphs made; graphs:
                 the seconds of the warm-up steps and the recording
  official       (--official PATH, a checkout of andreas128/SRFlow, imported from there at run
                 time) the released code's training step at the same size (fp32, RRDB frozen),
                 and 10 samples of a 128² LR one by one (as its test.py) and batched
  graph_check    --cuda-graphs trains as eager (fp32, bf16): the same 16 SRFlow ×4 steps both
                 ways (two recordings, rate changes inside replays), the largest loss and
                 (relative, per tensor) weight differences
  profile        SRFlow ×4 step, fp32 and bf16, under torch.profiler: kernels per step, their
                 summed time against the unprofiled step (the GPU's busy fraction), the top
                 operations by device time and by calls: where a step's time goes
  pipeline       sr_train.py on the demo images (loader, logging, everything), fp32, bf16 and
                 (CUDA only) with --cuda-graphs: logged s/step after the first log window vs the
                 pure step above, GPU utilisation sampled
  sample         10 samples of a DIV2K-size LR, SRFlow ×4 (339×510) and ×8 (170×255), fp32 and
                 bf16 autocast: median seconds, peak memory; and sr_sample.py end to end on the
                 ×4 LR (checkpoint loading, drawing, the 10 PNGs of 2040×1356 written), with its
                 PNG writer on every core and on one thread
  eval           sr_eval.py --ntire on 2040×1352 images, N = 10: seconds per image, peak memory
  train_others   VSpSR, VarSR, EDSR at their recipes: fp32, bf16, graphs, bf16 + graphs, compile,
                 bf16 + compile
Random weights throughout (ActNorm data-initialised; VGG and LPIPS random): timings do not depend
on the values. TF32 off unless --tf32; cuDNN's benchmark mode on, as sr_train.py sets it on a GPU,
for srspace and the released code alike (--no-cudnn-benchmark: off). Results: docs/benchmarks.md.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import sr_eval  # noqa: E402
import sr_train  # noqa: E402
from sr_lib import distributed  # noqa: E402
from sr_lib.data import write_text  # noqa: E402
from sr_lib.errors import UsageError, exit_on_error  # noqa: E402
from sr_lib.models import MODELS, build_model  # noqa: E402
from sr_lib.models.base import NoiseSource  # noqa: E402

# --quick: tiny models and sizes, a smoke test of the script (seconds on a CPU)
QUICK_CFG = {
    "srflow": dict(nb=2, nf=8, gc=4, rrdb_blocks="0,1", flow_steps=2, hidden_channels=8),
    "vspsr": dict(n_basis=8, basis_channels=4, coef_channels=4, d_channels=4),
    "varsr": dict(z_dim=8, n_feats=8, n_blocks=1, enc_feats=4, d_channels=4),
    "edsr": dict(n_feats=8, n_blocks=1),
}
OFFLINE_CFG = {"varsr": dict(pretrained=False)}  # random VGG: no weights file needed
# The training phase timed, as a fraction of the recipe's steps: SRFlow's first half (the encoder
# frozen, as the released code's numbers are taken), the others' last phase (VarSR: adversarial).
PHASE = {"srflow": 0.0}
VARIANTS = {  # name: (autocast dtype, compiled, channels-last, --cuda-graphs)
    "fp32": (None, False, False, False),
    "bf16": (torch.bfloat16, False, False, False),
    "graphs": (None, False, False, True),
    "bf16_graphs": (torch.bfloat16, False, False, True),
    "compile": (None, True, False, False),
    "bf16_compile": (torch.bfloat16, True, False, False),
    "bf16_compile_graphs": (torch.bfloat16, True, False, True),
    "bf16_channels_last": (torch.bfloat16, False, True, False),
}


COMPILE_S = 150  # seconds a compiled variant may take on a GPU (first step, then the timing)


class Bench:
    """The JSON being built, the clock and the device helpers."""

    def __init__(self, a):
        self.a, self.t0 = a, time.perf_counter()
        self.device = torch.device(a.device)
        self.cuda = self.device.type == "cuda"
        self.result = {
            "bench": "gpu", "quick": a.quick, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(self.device) if self.cuda else platform.machine(),
            "tf32": a.tf32, "cudnn_benchmark": not a.no_cudnn_benchmark,
            "compile_backend": a.compile_backend, "budget_s": a.budget,
            "git": _git(), "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
            "skipped": [], "errors": {},
        }  # fmt: skip

    def left(self) -> float:
        return self.a.budget - (time.perf_counter() - self.t0)

    def put(self, path: str, value) -> None:
        """result[a][b]... = value for path "a/b/...", written to --out at once."""
        *parents, key = path.split("/")
        node = self.result
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
        self.result["wall_s"] = round(time.perf_counter() - self.t0, 1)
        if self.a.out:  # atomically: the run's time limit may kill it mid-write (all lost)
            write_text(self.a.out, json.dumps(self.result, indent=1))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self):
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda else None

    def timed(self, fn, reps: int, warm: int = 1) -> dict:
        for _ in range(warm):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return {"median_s": round(float(np.median(times)), 4), "min_s": round(min(times), 4)}


def _git() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def model_cfg(b: Bench, name: str, scale: int) -> dict:
    return {"scale": scale, **OFFLINE_CFG.get(name, {}), **(QUICK_CFG[name] if b.a.quick else {})}


def recipe_size(b: Bench, name: str, scale: int) -> tuple[int, int]:
    """(batch, LR patch) of the model's recipe (--quick: 2 and a few pixels)."""
    r = MODELS[name].recipe(scale)
    return (2, 8) if b.a.quick else (r.batch, r.patch)


def build(b: Bench, name: str, scale: int, channels_last=False):
    """The model on the device, trained one no-grad step's worth of data init (ActNorm)."""
    torch.manual_seed(0)
    model = build_model(name, model_cfg(b, name, scale)).to(b.device).train()
    if name == "vspsr":
        from sr_lib.models.losses import VGGLoss
        from sr_lib.models.vgg import VGGFeatures

        c = model.cfg
        vgg = VGGFeatures((c.per_layer,), c.per_imagenet_norm, pretrained=False)
        model.set_perceptual_loss(VGGLoss(vgg).to(b.device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch, patch = recipe_size(b, name, scale)
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(batch, 3, patch * scale, patch * scale, generator=g)
    lr = torch.nn.functional.avg_pool2d(hr, scale)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lr, hr = (x.to(b.device).contiguous(memory_format=fmt) for x in (lr, hr))
    total = MODELS[name].recipe(scale).steps
    model.on_step(int(PHASE.get(name, 0.99) * total), total)
    with torch.no_grad():
        model(lr, hr)
    return model, lr, hr


def step_fn(b: Bench, name: str, model, forward, lr, hr, recipe, amp, graphs: bool,
            device_rates: bool = False):  # fmt: skip
    """One training step as sr_train.py takes it (its train_step: the finite guard, the gradient
    norm or clipping, fused Adam, the discriminator's step), by default always at the same step
    of the schedule (the phase timed); with `graphs` through StepGraph as --cuda-graphs (WARMUP
    eager steps, a recording, then replays; on a CPU see main); `device_rates`: the float32
    rate tensors a recording reads, also without one. Returns (step(i) -> train_step's
    (out, ok), the StepGraph or None)."""
    optimizers = sr_train.build_optimizers(model, recipe)
    graph = sr_train.StepGraph(model, b.device) if graphs else None
    if device_rates:
        sr_train.rates_on_device(optimizers, b.device)
    autocast = torch.autocast(b.device.type, amp, enabled=amp is not None)
    at = int(PHASE.get(name, 0.99) * recipe.steps)
    batches, dd = itertools.repeat((lr, hr)), distributed.Dist()

    def step(i: int = at):
        return sr_train.train_step(model, forward, optimizers, batches, i, recipe, dd, None,
                                   autocast, graph)  # fmt: skip

    return step, graph


def measure_train(b: Bench, name: str, scale: int, variant: str) -> None:
    amp, compiled, channels_last, graphs = VARIANTS[variant]
    key = f"train/{name}_x{scale}"
    batch, patch = recipe_size(b, name, scale)
    b.put(f"{key}/batch", batch)
    b.put(f"{key}/hr_patch", patch * scale)
    torch._dynamo.reset()
    counters.clear()
    model, lr, hr = build(b, name, scale, channels_last)
    forward = model
    if compiled:
        forward = sr_train.compile_model(model, model, backend=b.a.compile_backend)
    recipe = MODELS[name].recipe(scale)
    step, graph = step_fn(b, name, model, forward, lr, hr, recipe, amp, graphs)
    b.reset_peak()
    row = {}
    if compiled:
        t = time.perf_counter()
        step()
        b.sync()
        row["first_step_s"] = round(time.perf_counter() - t, 2)
        row["graphs"] = counters["stats"]["unique_graphs"]
        row["graph_breaks"] = sum(counters["graph_break"].values())
    if graphs:  # the eager warm-up steps and the recording, then one replay
        t = time.perf_counter()
        for _ in range(sr_train.StepGraph.WARMUP + 1):
            step()
        b.sync()
        row["warmup_and_record_s"] = round(time.perf_counter() - t, 2)
        row["recordings"] = graph.recordings
        if graph.failed:  # then the timing below is of eager steps
            row["recording_failed"] = graph.failed
            b.result["errors"][f"{key}/{variant}"] = f"recording failed: {graph.failed}"
    row.update(b.timed(step, b.a.reps, warm=2), peak_gb=b.peak_gb())
    b.put(f"{key}/{variant}", row)
    base = b.result["train"][key.split("/")[1]].get("fp32", {}).get("median_s")
    if base and variant != "fp32":
        b.put(f"{key}/speedup_vs_fp32/{variant}", round(base / row["median_s"], 3))
    del model, forward, step


def measure_graph_check(b: Bench, variant: str, steps: int = 16) -> None:
    """--cuda-graphs trains as eager steps do on this device: SRFlow ×4 at its recipe's batch and
    size, a 16-step schedule (the encoder unfreezes at step 8: a second recording; the rate
    halves at steps 8, 12 and 15, inside replays), the same initial weights, batch and noise,
    by sr_train.train_step eagerly and through StepGraph: the largest loss difference, and the
    largest weight difference relative to its tensor's largest magnitude."""
    amp, runs = VARIANTS[variant][0], {}
    recipe = replace(MODELS["srflow"].recipe(4), steps=steps)
    for mode in ("eager", "graphs"):
        model, lr, hr = build(b, "srflow", 4)
        # float32 tensor rates in both, as the recording reads them: rounding alone (2.5e-4 vs
        # 2.5000001e-4) would set Adam's steps apart on small weights, most of all in bf16
        step, graph = step_fn(b, "srflow", model, model, lr, hr, recipe, amp, mode == "graphs",
                              device_rates=True)  # fmt: skip
        torch.manual_seed(7)
        losses = [float(step(i)[0]["loss"].detach()) for i in range(steps)]
        runs[mode] = losses, [p.detach().clone() for p in model.parameters()], graph
        del model, step
    (la, wa, _), (lb, wb, graph) = runs["eager"], runs["graphs"]
    rel = [float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)) for x, y in zip(wa, wb)]
    b.put(f"graph_check/srflow_x4/{variant}", {
        "steps": steps, "recordings": graph.recordings, "recording_failed": graph.failed,
        "loss_max_abs_diff": max(abs(x - y) for x, y in zip(la, lb)),
        "weight_max_rel_diff_per_tensor": max(rel),
    })  # fmt: skip


def measure_profile(b: Bench, variant: str, steps: int = 3) -> None:
    """Where an SRFlow ×4 training step's time goes (torch.profiler over `steps` steps after
    warm-up): device kernels per step and their summed time against the unprofiled step (a busy
    fraction far below 1: the step is bound by the host's launches, not by the GPU's arithmetic),
    and the operations that take the most device time (a CPU: self CPU time) and the most calls."""
    from torch.profiler import ProfilerActivity, profile

    amp = VARIANTS[variant][0]
    model, lr, hr = build(b, "srflow", 4)
    step, _ = step_fn(b, "srflow", model, model, lr, hr, MODELS["srflow"].recipe(4), amp, False)
    unprofiled = b.timed(step, 2, warm=2)["median_s"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        b.sync()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    averages = prof.key_averages()
    ops = [e for e in averages if e.device_type == cpu]  # kernels are rows of their own
    time_of = (lambda e: e.self_device_time_total) if b.cuda else (lambda e: e.self_cpu_time_total)
    device = [e for e in prof.events() if e.device_type == cuda]
    copies = [e for e in device if e.name.startswith(("Memcpy", "Memset"))]
    busy_s = sum(e.time_range.elapsed_us() for e in device) / 1e6 / steps  # s per step
    top = lambda rows, key: sorted(rows, key=key, reverse=True)[:15]  # noqa: E731
    row = {
        "step_s_unprofiled": unprofiled,
        "kernels_per_step": (len(device) - len(copies)) // steps,
        "copies_per_step": len(copies) // steps,  # memcpy and memset
        "kernel_s_per_step": round(busy_s, 4),  # copies included
        "device_busy_fraction": round(busy_s / unprofiled, 3) if b.cuda else None,
        "top_time": [[e.key, round(e.count / steps, 1), round(time_of(e) / 1e3 / steps, 2)]
                     for e in top(ops, time_of)],
        "top_kernels": [[e.key, round(e.count / steps, 1),
                         round(e.self_device_time_total / 1e3 / steps, 2)]
                        for e in top([e for e in averages if e.device_type == cuda],
                                     lambda e: e.self_device_time_total)],
        "top_calls": [[e.key, round(e.count / steps, 1)] for e in top(ops, lambda e: e.count)],
    }  # fmt: skip
    b.put(f"profile/srflow_x4/{variant}", row)  # top_*: [name, calls/step, (ms/step)]
    del model, step


def official_net(b: Bench, scale: int):
    """The released SRFlow network from its own config, random weights, on the device."""
    sys.path.insert(0, str(Path(__file__).parent))
    from check_official_parity import released_flow

    torch.manual_seed(0)
    np.random.seed(0)
    net, _ = released_flow(b.a.official, f"confs/SRFlow_DF2K_{scale}X.yml", gpu=b.cuda)
    return net.to(b.device)


def measure_official(b: Bench) -> None:
    scale = 4
    batch, patch = (2, 8) if b.a.quick else (12, 40)
    net = official_net(b, scale)
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(batch, 3, patch * scale, patch * scale, generator=g).to(b.device)
    lr = torch.nn.functional.avg_pool2d(hr, scale)
    net.train()
    with torch.no_grad():
        net(gt=hr, lr=lr, reverse=False)  # ActNorm data init
    net.set_rrdb_training(False)  # frozen, as the first half of srspace's recipe
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, 2.5e-4, betas=(0.9, 0.99))

    def step():
        _, nll, _ = net(gt=hr, lr=lr, reverse=False)
        opt.zero_grad(set_to_none=True)
        nll.mean().backward()
        opt.step()

    b.reset_peak()
    row = {**b.timed(step, b.a.reps, warm=1 if b.a.quick else 2), "peak_gb": b.peak_gb(),
           "batch": batch, "hr_patch": patch * scale}  # fmt: skip
    b.put("official/train_x4_fp32", row)
    net.eval()
    n, h = (2, 8) if b.a.quick else (10, 128)
    lr1 = torch.rand(1, 3, h, h, generator=g).to(b.device)
    up = net.flowUpsamplerNet
    size = (up.C, int(scale * h // up.scaleH), int(scale * h // up.scaleW))  # its get_z

    def one_by_one():
        for _ in range(n):
            net(lr=lr1, z=0.9 * torch.randn(1, *size, device=b.device), eps_std=0.9, reverse=True)

    def batched():
        z = 0.9 * torch.randn(n, *size, device=b.device)
        net(lr=lr1.expand(n, -1, -1, -1), z=z, eps_std=0.9, reverse=True)

    with torch.no_grad():
        for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
            b.reset_peak()
            b.put(f"official/sample_x4_lr{h}/{name}", {**b.timed(fn, 1 if b.a.quick else 3),
                                                       "peak_gb": b.peak_gb()})  # fmt: skip


def gpu_utilisation(b: Bench, stop: threading.Event, samples: list) -> None:
    """Samples GPU utilisation (%) every 0.2 s: torch.cuda.utilization (NVML), else nvidia-smi."""
    while not stop.wait(0.2):
        try:
            samples.append(float(torch.cuda.utilization(b.device)))
        except Exception:  # no pynvml: ask nvidia-smi
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     "-i", str(b.device.index or 0)], capture_output=True, text=True, timeout=5,
                )  # fmt: skip
                samples.append(float(out.stdout.split()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return


def measure_pipeline(b: Bench, variant: str) -> None:
    steps, every = (6, 2) if b.a.quick else (60, 10)
    # the encoder frozen throughout, as in the pure step it is compared with (the recipe unfreezes
    # it at half the run: a slower step, and with --cuda-graphs a second recording)
    model_flags = ["--freeze-encoder", "1"]
    if b.a.quick:
        for k, v in QUICK_CFG["srflow"].items():
            model_flags += [f"--{k.replace('_', '-')}", str(v)]
        model_flags += ["--batch", "2", "--patch", "8"]
    with tempfile.TemporaryDirectory() as out:
        # sr_train.py in a process with this one's TF32 settings (torch's default lets cuDNN use
        # TF32, which the pure step it is compared with does not)
        tf32 = b.a.tf32
        start = (f"import sys, torch; torch.backends.cudnn.allow_tf32 = {tf32}; "
                 f"torch.backends.cuda.matmul.allow_tf32 = {tf32}; import sr_train; "
                 "sys.exit(sr_train.main())")  # fmt: skip
        cmd = [sys.executable, "-c", start, "--model", "srflow", "--scale", "4",
               "--data", "demo", "--steps", str(steps), "--val-every", "0",
               "--log-every", str(every), "--workers", "4", "--device", str(b.device),
               "--out", out, *model_flags]  # fmt: skip
        if variant.startswith("bf16"):
            cmd += ["--amp", "bf16"]
        if variant.endswith("graphs"):
            cmd += ["--cuda-graphs"]
        stop, samples = threading.Event(), []
        sampler = threading.Thread(target=gpu_utilisation, args=(b, stop, samples), daemon=True)
        if b.cuda:
            sampler.start()
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        stop.set()
        if done.returncode != 0:
            raise RuntimeError(f"sr_train.py exit {done.returncode}: {done.stderr[-500:]}")
        rows = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    logged = [r["s_per_step"] for r in rows if "s_per_step" in r][1:]  # after the first window
    row = {"steps": steps, "wall_s": round(wall, 1), "logged_s_per_step": logged,
           "logged_median_s": round(float(np.median(logged)), 4)}  # fmt: skip
    pure = b.result.get("train", {}).get("srflow_x4", {}).get(variant, {}).get("median_s")
    if pure and not b.a.quick:
        row["over_pure_step"] = round(row["logged_median_s"] / pure, 3)  # target <= 1.05
    if samples:
        busy = samples[len(samples) // 4 :]  # the first quarter: start-up, data, ActNorm init
        row["gpu_utilisation_pct"] = {"median": float(np.median(busy)), "mean": round(
            float(np.mean(busy)), 1), "samples": len(busy)}  # fmt: skip
    b.put(f"pipeline/srflow_x4_{variant}", row)


def measure_sample(b: Bench, scale: int, variant: str) -> None:
    h, w = {4: (339, 510), 8: (170, 255)}[scale]
    if b.a.quick:
        h, w = 12, 18
    model = build(b, "srflow", scale)[0].eval()
    lr = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2)).to(b.device)
    n, amp = 10, VARIANTS[variant][0]

    def draw():
        with torch.autocast(b.device.type, amp, enabled=amp is not None):
            model.sample(lr, n, 0.9, NoiseSource(list(range(n)), b.device))

    b.reset_peak()
    row = {"lr": [h, w], "n": n, **b.timed(draw, 1 if b.a.quick else 3), "peak_gb": b.peak_gb()}
    b.put(f"sample/srflow_x{scale}_lr{h}x{w}/{variant}", row)


def measure_sample_cli(b: Bench, scale: int) -> None:
    """sr_sample.py as a user runs it, n = 10, fp32: seconds from start to the last PNG written."""
    import sr_sample
    from sr_lib.checkpoint import save_checkpoint
    from sr_lib.data import cpu_workers, write_png

    h, w = (12, 18) if b.a.quick else {4: (339, 510), 8: (170, 255)}[scale]
    model = build(b, "srflow", scale)[0]
    ck = {"model": "srflow", "model_cfg": model_cfg(b, "srflow", scale),
          "state_dict": model.state_dict(), "step": 0}  # fmt: skip
    lr = np.random.default_rng(2).integers(0, 256, (h, w, 3), dtype=np.uint8)
    row, threads = {"lr": [h, w], "n": 10}, cpu_workers()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        save_checkpoint(root / "srflow.pt", ck)
        write_png(root / "in" / "0801.png", lr)
        argv = ["--ckpt", root / "srflow.pt", "--input", root / "in", "--n", 10]
        argv += ["--device", b.device]
        try:
            for label, workers in (("warm_up", threads), ("s", threads), ("s_one_writer", 1)):
                sr_sample.cpu_workers = lambda n=workers: n  # the PNG writer's threads
                t = time.perf_counter()
                out = io.StringIO()  # its progress lines
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    code = sr_sample.main([str(x) for x in argv + ["--out", root / label]])
                row[label] = round(time.perf_counter() - t, 3)
                if code != 0:
                    raise RuntimeError(f"sr_sample.py exited {code}")
        finally:
            sr_sample.cpu_workers = cpu_workers
    b.put(f"sample_cli/srflow_x{scale}_lr{h}x{w}", {**row, "writer_threads": threads})


def measure_eval(b: Bench) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_eval

    images, n = (1, 3) if b.a.quick else (2, 10)
    if b.a.quick:
        bench_eval.H, bench_eval.W = 256, 384
    with tempfile.TemporaryDirectory() as root:
        hr, sr, weights = bench_eval.make_data(Path(root), images, n)
        argv = ["--hr", str(hr), "--sr", str(sr), "--scale", "4", "--n", str(n), "--ntire",
                "--lpips-weights", str(weights), "--device", str(b.device),
                "--out", str(Path(root) / "r.json")]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            sr_eval.main(argv)  # warm-up: cuDNN, file cache
            b.reset_peak()
            t = time.perf_counter()
            sr_eval.main(argv)
            dt = time.perf_counter() - t
        settings = json.loads((Path(root) / "r.json").read_text())["settings"]
    b.put("eval/ntire", {"images": images, "size": [bench_eval.H, bench_eval.W], "n": n,
                         "s_per_image": round(dt / images, 3), "peak_gb": b.peak_gb(),
                         "lpips_batch": settings["lpips_batch"]})  # fmt: skip


def plan(b: Bench) -> list[tuple[str, str, object]]:
    """(section, label, thunk) in priority order."""
    t, a = [], b.a
    add = lambda section, label, fn, *args: t.append((section, label, lambda: fn(b, *args)))  # noqa: E731
    # the targets first (cheap before costly: one compiled variant can take minutes), then what
    # explains a miss (the profile), then the rest
    for v in ("fp32", "bf16", "graphs", "bf16_graphs"):
        add("train_srflow", f"srflow_x4/{v}", measure_train, "srflow", 4, v)
    add("graph_check", "graph_check/fp32", measure_graph_check, "fp32")
    if a.official:
        add("official", "official", measure_official)
    add("eval", "eval", measure_eval)
    for scale in (4, 8):
        add("sample", f"sample_x{scale}/fp32", measure_sample, scale, "fp32")
    add("train_srflow", "srflow_x4/compile", measure_train, "srflow", 4, "compile")
    # --cuda-graphs in sr_train.py needs CUDA (the in-process variants above stand in for it)
    pipeline = ("fp32", "bf16_graphs", "bf16", "graphs") if b.cuda else ("fp32", "bf16")
    for v in pipeline[:2]:
        add("pipeline", f"pipeline/{v}", measure_pipeline, v)
    for v in ("fp32", "bf16"):
        add("profile", f"profile/{v}", measure_profile, v)
    add("train_srflow", "srflow_x4/bf16_compile", measure_train, "srflow", 4, "bf16_compile")
    add("graph_check", "graph_check/bf16", measure_graph_check, "bf16")
    for scale in (4, 8):
        add("sample", f"sample_x{scale}/bf16", measure_sample, scale, "bf16")
    add("sample", "sample_cli_x4", measure_sample_cli, 4)
    others = ("vspsr", "varsr", "edsr")
    for name in others:
        for v in ("fp32", "bf16", "bf16_graphs"):
            add("train_others", f"{name}_x4/{v}", measure_train, name, 4, v)
    for v in pipeline[2:]:
        add("pipeline", f"pipeline/{v}", measure_pipeline, v)
    for v in ("bf16_compile_graphs", "bf16_channels_last"):
        add("train_srflow", f"srflow_x4/{v}", measure_train, "srflow", 4, v)
    for name in others:
        for v in ("graphs", "compile", "bf16_compile"):
            add("train_others", f"{name}_x4/{v}", measure_train, name, 4, v)
    variant = lambda label: label.split("/")[-1] if "/" in label else ""  # noqa: E731
    return [x for x in t if x[0] in a.sections
            and not (x[0].startswith("train") and variant(x[1]) not in a.variants)]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--device", default="cuda")
    p.add_argument("--official", default="", help="checkout of andreas128/SRFlow (or its code/)")
    p.add_argument("--quick", action="store_true", help="tiny models and sizes: a smoke test")
    p.add_argument("--budget", type=float, default=540, help="seconds; then skip the rest")
    p.add_argument("--reps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="cuDNN's default algorithms (sr_train.py times them on a GPU)")  # fmt: skip
    p.add_argument("--sections", nargs="+", default=["train_srflow", "graph_check", "official",
                   "profile", "pipeline", "sample", "eval", "train_others"])  # fmt: skip
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="training variants measured")  # fmt: skip
    p.add_argument("--out", default="", help="also write the JSON here, after every measurement")
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from check_official_parity import REPOS, checkout_error

    confs = ["confs/SRFlow_DF2K_4X.yml"]  # the scale measure_official builds
    why = (
        a.official
        and "official" in a.sections
        and checkout_error("--official", a.official, REPOS["srflow"], confs)
    )
    if why:  # now, not as an error entry after the training measurements
        raise UsageError(why)
    if a.quick:
        a.reps = 1
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    b = Bench(a)
    real_capture = sr_train.capture
    if not b.cuda:  # the smoke test: the recorded function itself stands in for the recording
        sr_train.capture = lambda body, device: body
    try:
        run_plan(b)
    finally:
        sr_train.capture = real_capture
    released = b.result.get("official", {}).get("train_x4_fp32", {}).get("median_s")
    ours = {} if a.quick else b.result.get("train", {}).get("srflow_x4", {})  # quick: tiny ours
    for variant, r in ours.items():  # the target: <= 0.5
        if released and isinstance(r, dict) and "median_s" in r:
            b.put(f"official/srflow_x4_time_over_released/{variant}",
                  round(r["median_s"] / released, 3))  # fmt: skip
    b.put("loadavg_end", os.getloadavg())
    b.put("wall_s", round(time.perf_counter() - b.t0, 1))
    print(json.dumps(b.result, indent=1))
    return 1 if a.quick and b.result["errors"] else 0


def run_plan(b: Bench) -> None:
    for _, label, thunk in plan(b):
        # the budget is looked at between measurements: one that compiles (minutes on a cold
        # cache) starts only with time for it left, so that the run ends near its budget
        need = COMPILE_S if b.cuda and "compile" in label else 0
        if b.left() <= need:
            b.result["skipped"].append(label)
            continue
        try:
            thunk()
        except Exception as e:  # a failure (out of memory, a compile error) does not stop the rest
            b.result["errors"][label] = f"{type(e).__name__}: {e}"[:600]
            if b.a.quick:
                traceback.print_exc()
        if b.cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        raise SystemExit(main())
