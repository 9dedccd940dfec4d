"""Benchmark: sr_eval.py --ntire against the released NTIRE 2021 measure.py, side by side, one core.

    python tests/bench/bench_eval.py --released NTIRE21_CHECKOUT --lpips-code PS_CHECKOUT
                                     [--images 2] [--n 10] [--repeat 1] [--keep DIR] [--cuda]
    python tests/bench/bench_eval.py --pairwise [--images 2] [--n 10] [--repeat 1] [--keep DIR]
                                     [--block K]

--pairwise measures what `sr_eval.py --pairwise` adds instead (no released code): sr_eval --ntire
with and without it, alternately, each in a fresh process on one core: seconds per image (best of
--repeat) and the process's peak resident memory (ru_maxrss) of each, and their differences.
--block K adds a third side: --pairwise where the free memory (sr_eval.free_memory, patched)
holds the taps of K samples only, so the pairs are computed in blocks of K (the others' taps
computed again), and whether its matrices equal those of the run where all fit, to the bit.

NTIRE21_CHECKOUT is a checkout of github:andreas128/NTIRE21_Learning_SR_Space (measure.py,
imresize.py), PS_CHECKOUT one of its PerceptualSimilarity submodule (richzhang/PerceptualSimilarity
@ 05f4ec2; default NTIRE21_CHECKOUT/PerceptualSimilarity). Nothing of them is copied: measure.py's
imports and functions are executed from the checkout at run time (its top-level script part, which
wants 100 DIV2K images and writes CSVs, is not); its model is built and `lpips_analysis(gt, srs,
scale)` called per image, as the script does. measure.py imports packages srspace does not
install: `pip install opencv-python-headless pandas tqdm` (checked before the first run).

Both sides run LPIPS with one seeded random-weight state_dict (ImageNet AlexNet weights cannot be
downloaded here; these are not real LPIPS values): the released `lpips.LPIPS(spatial=True)` is
built with `pnet_rand=True` and the state_dict loaded into it; sr_eval gets it as --lpips-weights.
The data: `--images` 2040x1352 ground truths with N samples each (x4: bicubic up of the imresize
LR plus seeded noise), as PNGs named as the challenge's.

One thread: each side runs in a fresh process (its own imports and allocator state), pinned to
one CPU core, with OMP/MKL/torch/OpenCV at one thread; sr_eval's decode pool then reads the files
one after the other. Prints one JSON object: seconds per image of both (from building the LPIPS
model to the last image; imports excluded; best of --repeat), the speed-up, the same in CPU seconds
(less sensitive to other processes on the core), the largest differences of the four columns and
the load average before and after. Rerun when the load is high. `--cuda` adds sr_eval on the GPU
(all cores, its default threads; start-up and the first image's warm-up included) with the largest
differences from the CPU run.
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch start their pools

import argparse  # noqa: E402
import ast  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import imageio.v3 as iio  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
import sr_eval  # noqa: E402
from sr_lib import metrics  # noqa: E402
from sr_lib.data import read_image  # noqa: E402
from sr_lib.lpips_net import lpips_module  # noqa: E402
from sr_lib.resize import imresize  # noqa: E402

H, W, SCALE = 1352, 2040, 4
COLUMNS = ("LPIPS_mean", "LRPSNR_worst", "LRPSNR_mean", "score")
# module -> PyPI package, for what the released measure.py imports and srspace does not install
RELEASED_NEEDS = {
    "cv2": "opencv-python-headless",
    "pandas": "pandas",
    "setuptools": "setuptools",
    "tqdm": "tqdm",
}


def make_data(root: Path, images: int, n: int) -> tuple[Path, Path, Path]:
    from skimage import data as skdata

    hr_dir, sr_dir = root / "hr", root / "sr"
    hr_dir.mkdir(parents=True, exist_ok=True)
    sr_dir.mkdir(parents=True, exist_ok=True)
    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for k in range(images):
        src = sources[k % len(sources)]
        up = imresize(src, max(H / src.shape[0], W / src.shape[1]) + 0.01)[:H, :W]
        hr = np.clip(np.round(up + rng.normal(0, 4, up.shape)), 0, 255).astype(np.uint8)
        iio.imwrite(hr_dir / f"{801 + k:04d}.png", hr)
        bicubic = imresize(imresize(hr, 1 / SCALE), SCALE).astype(np.float64)
        for i in range(n):
            sr = np.clip(np.round(bicubic + rng.normal(0, 3, hr.shape)), 0, 255).astype(np.uint8)
            iio.imwrite(sr_dir / f"{k:06d}_sample{i:05d}.png", sr)
    torch.manual_seed(0)
    net = lpips_module()  # random trunk (pnet_rand), v0.1 heads of the package
    weights = root / "lpips_random.pth"
    torch.save(net.state_dict(), weights)
    return hr_dir, sr_dir, weights


def kept_or_made_data(root: Path, args) -> tuple[Path, Path, Path]:
    """make_data in `root`, or what an earlier run made there (--keep DIR)."""
    if (root / "lpips_random.pth").exists():
        return root / "hr", root / "sr", root / "lpips_random.pth"
    return make_data(root, args.images, args.n)


def load_released(ntire_dir: Path, ps_dir: Path) -> types.ModuleType:
    """measure.py's imports and functions, run from the checkout (not its script part)."""
    src = (ntire_dir / "measure.py").read_text()
    body = []
    for node in ast.parse(src).body:  # everything up to the script part, which reads sys.argv
        if "sys.argv" in ast.unparse(node):
            break
        body.append(node)
    # Its `from lpips import lpips` must find PerceptualSimilarity's package, not the pip `lpips`
    # sr_eval uses (this runs in a process of its own).
    assert not any(k.split(".")[0] == "lpips" for k in sys.modules), "pip lpips already imported"
    sys.path[:0] = [str(ps_dir), str(ntire_dir)]
    module = types.ModuleType("measure")
    module.__file__ = str(ntire_dir / "measure.py")
    exec(compile(ast.Module(body, []), module.__file__, "exec"), module.__dict__)
    lpips_file = Path(module.lpips.__file__).resolve()
    if ps_dir.resolve() not in lpips_file.parents:
        raise SystemExit(f"measure.py imported lpips from {lpips_file}, not from {ps_dir}")
    return module


def run_released(ntire_dir: Path, ps_dir: Path, hr_dir: Path, sr_dir: Path, n: int, weights: Path):
    """measure.py's model and its lpips_analysis(gt, srs, scale) per image: rows, seconds.

    Timed from building the model, as sr_eval's seconds include building its own."""
    torch.set_num_threads(1)
    module = load_released(ntire_dir, ps_dir)
    module.cv2.setNumThreads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        loss = module.lpips.LPIPS(spatial=True, pnet_rand=True)  # measure.py's model, no download
    loss.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    module.loss_fn_alex_sp = loss  # the global measure.py's lpips_analysis uses
    rows = []
    for k, gt in enumerate(sorted(hr_dir.glob("*.png"))):
        srs = [str(sr_dir / f"{k:06d}_sample{i:05d}.png") for i in range(n)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            row = module.lpips_analysis(str(gt), srs, SCALE)
        rows.append({c: float(row[c]) for c in COLUMNS})
    return rows, (time.perf_counter() - t0, time.process_time() - c0)


def run_ours(hr_dir: Path, sr_dir: Path, n: int, weights: Path, out: Path, device: str = "cpu"):
    """sr_eval.main(--ntire) on all images: rows, seconds (start-up included), trunk seconds."""
    import lpips  # noqa: F401  (imports are outside the timing, as for the released side)

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # 1 when pinned
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", n, "--device", device]
    argv += ["--lpips-weights", weights, "--out", out, "--ntire"]
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        assert sr_eval.main([str(a) for a in argv]) == 0
    took = (time.perf_counter() - t0, time.process_time() - c0)
    rows = [{c: float(r[c]) for c in COLUMNS} for r in json.loads(out.read_text())["per_image"]]
    if device != "cpu":
        return rows, took, None
    # one AlexNet trunk pass on the first ground truth: the compute floor per sample
    lm = metrics.LpipsMetric.load(weights)
    gt = read_image(next(iter(sorted(hr_dir.glob("*.png")))))
    gt = gt[: gt.shape[0] // 8 * 8, : gt.shape[1] // 8 * 8]
    lm.reference(gt)  # warm-up
    t1 = time.perf_counter()
    lm.reference(gt)
    return rows, took, time.perf_counter() - t1


def run_pairwise_side(hr_dir: Path, sr_dir: Path, n: int, weights: Path, out: Path, pairwise,
                      memory=None):  # fmt: skip
    """sr_eval.main(--ntire [--pairwise]): (wall s, CPU s, peak resident bytes of the process);
    `memory`: the free bytes sr_eval sees (None: the machine's)."""
    import resource

    import lpips  # noqa: F401  (imports outside the timing)

    if memory is not None:
        sr_eval.free_memory = lambda device: memory
    torch.set_num_threads(1)
    argv = ["--hr", hr_dir, "--sr", sr_dir, "--scale", SCALE, "--n", n, "--device", "cpu"]
    argv += ["--lpips-weights", weights, "--out", out, "--ntire", "--quiet"]
    argv += ["--pairwise"] if pairwise else []
    t0, c0 = time.perf_counter(), time.process_time()
    assert sr_eval.main([str(a) for a in argv]) == 0
    took = (time.perf_counter() - t0, time.process_time() - c0)
    return (*took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_environment(core: int, load_before, load_after) -> dict:
    """Where the sides ran, for the JSON: one thread on `core`, the load around the runs."""
    return {
        "threads": 1,
        "cpu_core": core,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }


def block_memory(n: int, block: int) -> int:
    """The free memory that --pairwise sees for the blocks' side: the taps of `block` of the n
    samples, beside what sr_eval counts the scoring itself to take on a CPU at its --lpips-batch
    1 (`sr_eval.scoring_reserve`, which `check_pairwise` takes off first)."""
    reserve = sr_eval.scoring_reserve((H, W), torch.device("cpu"), 1, [n])
    return metrics.pairwise_bytes((H, W), n, SCALE, block) + reserve


def bench_pairwise(args) -> None:
    """--pairwise: sr_eval --ntire without and with --pairwise, alternately, one core."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        hr_dir, sr_dir, weights = kept_or_made_data(root, args)
        images = len(list(hr_dir.glob("*.png")))
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        load_before = os.getloadavg()
        sides = {False: (False, None), True: (True, None)}  # (--pairwise, free memory)
        if args.block:
            sides["blocks"] = (True, block_memory(args.n, args.block))
        runs = {side: [] for side in sides}
        for _ in range(args.repeat):
            for side, (pairwise, memory) in sides.items():
                out = root / f"p{int(pairwise)}{'b' * (memory is not None)}.json"
                runs[side].append(
                    in_new_process(
                        run_pairwise_side, hr_dir, sr_dir, args.n, weights, out, pairwise, memory
                    )
                )
        load_after = os.getloadavg()
        rows = json.loads((root / "p1.json").read_text())["per_image"]
        same = json.loads((root / "p0.json").read_text())["per_image"]
        blocks = json.loads((root / "p1b.json").read_text())["per_image"] if args.block else None
    best = {p: min(r[0] for r in rs) / images for p, rs in runs.items()}
    cpu = {p: min(r[1] for r in rs) / images for p, rs in runs.items()}
    rss = {p: max(r[2] for r in rs) for p, rs in runs.items()}
    official = all(
        {c: a[c] for c in COLUMNS} == {c: b[c] for c in COLUMNS} for a, b in zip(rows, same)
    )
    result = {
        "bench": "sr_eval --ntire with and without --pairwise (random-weight LPIPS), one core",
        "image": f"{W}x{H}",
        "n": args.n,
        "images": images,
        "repeat": args.repeat,
        "s_per_image": {"without": round(best[False], 2), "with": round(best[True], 2)},
        "extra_s_per_image": round(best[True] - best[False], 2),
        "extra_cpu_s_per_image": round(cpu[True] - cpu[False], 2),
        "cpu_s_per_image": {"without": round(cpu[False], 2), "with": round(cpu[True], 2)},
        "runs_s_per_image": {
            "without": [round(r[0] / images, 2) for r in runs[False]],
            "with": [round(r[0] / images, 2) for r in runs[True]],
        },
        "peak_rss_mb": {"without": round(rss[False] / 1e6), "with": round(rss[True] / 1e6)},
        "extra_peak_rss_mb": round((rss[True] - rss[False]) / 1e6),
        "pairwise_bytes_mb": round(metrics.pairwise_bytes((H, W), args.n, SCALE) / 1e6),
        "official_columns_unchanged": official,
        "LPIPS_pairwise": [r["LPIPS_pairwise"] for r in rows],
        **run_environment(core, load_before, load_after),
    }
    if args.block:
        result["blocks"] = {
            "block": args.block,
            "s_per_image": round(best["blocks"], 2),
            "cpu_s_per_image": round(cpu["blocks"], 2),
            "runs_s_per_image": [round(r[0] / images, 2) for r in runs["blocks"]],
            "peak_rss_mb": round(rss["blocks"] / 1e6),
            "pairwise_bytes_mb": round(
                metrics.pairwise_bytes((H, W), args.n, SCALE, args.block) / 1e6
            ),
            "same_rows_as_with": blocks == rows,
        }
    print(json.dumps(result))
    if not official:
        raise SystemExit("--pairwise changed an official column")
    if args.block and blocks != rows:
        raise SystemExit("the pairs in blocks changed a number")


def run_ours_on(cores: set[int], *args):
    """run_ours on these CPU cores (all of them for the GPU run)."""
    os.sched_setaffinity(0, cores)
    return run_ours(*args)


def in_new_process(fn, *args):
    """fn(*args) in a fresh interpreter: each side has its own imports and allocator state."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--released", type=Path, default=None, help="NTIRE21_Learning_SR_Space dir")
    ap.add_argument("--lpips-code", type=Path, default=None, help="PerceptualSimilarity @ 05f4ec2")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1, help="alternate both sides; best of each")
    ap.add_argument("--keep", type=str, default=None, help="reuse/keep the data in this folder")
    ap.add_argument("--cuda", action="store_true", help="also sr_eval on the GPU, all cores")
    ap.add_argument("--pairwise", action="store_true", help="what --pairwise adds (no --released)")
    ap.add_argument("--block", type=int, default=0, help="--pairwise: also in blocks of K samples")
    args = ap.parse_args()
    if args.pairwise:
        return bench_pairwise(args)
    if args.released is None:
        raise SystemExit("bench_eval.py: error: give --released NTIRE21_CHECKOUT (or --pairwise)")
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA GPU here")
    repo = "andreas128/NTIRE21_Learning_SR_Space"  # said now, not after srspace's timed run
    if not args.released.is_dir():
        raise SystemExit(
            f"bench_eval.py: error: --released {args.released}: no such folder; give a checkout "
            f"of {repo}"
        )
    if not (args.released / "measure.py").is_file():
        raise SystemExit(
            f"bench_eval.py: error: --released {args.released}: not a checkout of {repo} (no "
            "measure.py in it)"
        )
    ps_dir = args.lpips_code or args.released / "PerceptualSimilarity"
    if not (ps_dir / "lpips" / "lpips.py").is_file():
        raise SystemExit(f"--lpips-code {ps_dir}: no lpips/lpips.py (PerceptualSimilarity)")
    # measure.py imports these, which srspace does not need: say so before the first timed run
    missing = [p for m, p in RELEASED_NEEDS.items() if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"--released: measure.py needs pip install {' '.join(missing)}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        hr_dir, sr_dir, weights = kept_or_made_data(root, args)
        images = len(list(hr_dir.glob("*.png")))

        all_cores = os.sched_getaffinity(0)
        core = min(all_cores)
        os.sched_setaffinity(0, {core})  # one core for everything, threads included (inherited)
        load_before = os.getloadavg()
        ours_s, ref_s, ours_cpu, ref_cpu = [], [], [], []
        for _ in range(args.repeat):
            ours, (wall, cpu), trunk_s = in_new_process(
                run_ours, hr_dir, sr_dir, args.n, weights, root / "o.json"
            )
            ours_s.append(wall / images)
            ours_cpu.append(cpu / images)
            ref, (wall, cpu) = in_new_process(
                run_released, args.released, ps_dir, hr_dir, sr_dir, args.n, weights
            )
            ref_s.append(wall / images)
            ref_cpu.append(cpu / images)
        load_after = os.getloadavg()
        if args.cuda:  # the GPU target: <= 0.5 s per image, the same numbers as the CPU path
            gpu, gpu_took, _ = in_new_process(
                run_ours_on, all_cores, hr_dir, sr_dir, args.n, weights, root / "g.json", "cuda"
            )

    def diff(col, rel=False):
        d = [abs(o[col] - r[col]) / (abs(r[col]) if rel else 1) for o, r in zip(ours, ref)]
        return max(d)

    diffs = {
        "LRPSNR_worst_abs_dB": diff("LRPSNR_worst"),
        "LRPSNR_mean_abs_dB": diff("LRPSNR_mean"),
        "LPIPS_mean_abs": diff("LPIPS_mean"),
        "LPIPS_mean_rel": diff("LPIPS_mean", rel=True),
        "score_abs": diff("score"),
    }
    lr_psnr_exact = diffs["LRPSNR_worst_abs_dB"] == 0 and diffs["LRPSNR_mean_abs_dB"] == 0
    identical = lr_psnr_exact and diffs["LPIPS_mean_rel"] <= 1e-6 and diffs["score_abs"] <= 1e-4
    result = {
        "bench": "sr_eval --ntire vs released measure.py (random-weight LPIPS trunk), one core",
        "image": f"{W}x{H}",
        "scale": SCALE,
        "n": args.n,
        "images": images,
        "repeat": args.repeat,
        "ours_s_per_image": round(min(ours_s), 2),
        "released_s_per_image": round(min(ref_s), 2),
        "speedup": round(min(ref_s) / min(ours_s), 2),
        "runs_s_per_image": {"ours": [round(s, 2) for s in ours_s]}
        | {"released": [round(s, 2) for s in ref_s]},
        "cpu_s_per_image": {"ours": round(min(ours_cpu), 2), "released": round(min(ref_cpu), 2)},
        "speedup_cpu_time": round(min(ref_cpu) / min(ours_cpu), 2),
        "trunk_s_per_pass": round(trunk_s, 3),
        "floor_s_per_image": round((args.n + 1) * trunk_s, 2),
        "max_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
        "lr_psnr_exact": lr_psnr_exact,
        "identical_within_float_rounding": identical,
        "cpu_count": os.cpu_count(),
        **run_environment(core, load_before, load_after),
    }
    if args.cuda:
        result["cuda"] = {
            "s_per_image": round(gpu_took[0] / images, 3),
            "cores": len(all_cores),
            "gpu": torch.cuda.get_device_name(),
            "max_diff_vs_cpu": {
                c: float(f"{max(abs(g[c] - o[c]) for g, o in zip(gpu, ours)):.3g}") for c in COLUMNS
            },
        }
    print(json.dumps(result))
    if not identical:
        raise SystemExit("numbers differ beyond float rounding")


if __name__ == "__main__":
    main()
