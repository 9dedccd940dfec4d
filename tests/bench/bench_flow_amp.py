"""SRFlow under bfloat16 autocast on this CPU: what a training step dispatches, and whether it
learns as float32 does. Run by hand; prints one JSON.

    python tests/bench/bench_flow_amp.py [--parts ops curves] [--steps 300] [--batch 4]
        [--official SRFlow/] [--no-compile]

ops: the operations one training step (forward + backward) of SRFlow ×4 at the paper's size
dispatches (a TorchDispatchMode counter; LR 20², HR 80², batch 2), float32 vs bfloat16 autocast,
with the encoder frozen (the first half of training) and trainable: all operations, those that
are not views, and dtype casts (aten._to_copy). A GPU step of these models is bound by how many
operations the host launches, so the count is what bf16 can cost there. With --official, the
released SRFlow's fp32 step (encoder frozen) counted the same way, for comparison.

curves: a small SRFlow trained by sr_train.py on the demo images, float32 and bfloat16 from the
same seed (the same batches and noise: the difference is the arithmetic alone), and float32 from a
second seed (the spread another seed gives), and `--compile` (inductor) in float32 and bfloat16
against float32 with the same noise (its initialisation order); the training NLL in windows of
`--window` steps.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # check_official_parity.code_dir

from check_official_parity import REPOS, checkout_error  # noqa: E402

import sr_train  # noqa: E402
from sr_lib.config import cpu_has_native  # noqa: E402
from sr_lib.errors import UsageError, exit_on_error  # noqa: E402
from sr_lib.models import build_model  # noqa: E402

OFFICIAL_CONF = "confs/SRFlow_DF2K_4X.yml"
SMALL = ["--nb", "4", "--nf", "32", "--gc", "16", "--rrdb-blocks", "0,1,2,3", "--flow-steps", "4",
         "--hidden-channels", "32"]  # fmt: skip


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        view = func.is_view or func.__name__.startswith("detach")
        cast = func is torch.ops.aten._to_copy.default
        self.counts["views" if view else "casts" if cast else "other"] += 1
        return func(*args, **(kwargs or {}))


def count_ops() -> dict:
    torch.manual_seed(0)
    model = build_model("srflow", {"scale": 4}).train()
    lr, hr = torch.rand(2, 3, 20, 20), torch.rand(2, 3, 80, 80)
    out = {}
    for phase, step in (("encoder_frozen", 0), ("encoder_trained", 9)):
        model.on_step(step, 10)
        for amp in ("fp32", "bf16"):
            with torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
                model(lr, hr)["loss"].backward()  # warm-up: ActNorm init, kept casts
            model.zero_grad(set_to_none=True)
            with OpCounter() as c, torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
                model(lr, hr)["loss"].backward()
            model.zero_grad(set_to_none=True)
            n = c.counts
            out[f"{phase}_{amp}"] = {"all": sum(n.values()), "not_views": n["other"] + n["casts"],
                                     "casts": n["casts"]}  # fmt: skip
        fp32, bf16 = out[f"{phase}_fp32"]["all"], out[f"{phase}_bf16"]["all"]
        out[f"{phase}_bf16_over_fp32"] = round(bf16 / fp32, 3)
    return out


def count_released(a) -> dict:
    """The released SRFlow's training step counted the same way (fp32, its RRDB frozen by its
    own set_rrdb_training, random weights, its config imported from the checkout)."""
    from check_official_parity import released_flow

    torch.manual_seed(0)
    net = released_flow(a.official, OFFICIAL_CONF)[0].train()
    hr = torch.rand(2, 3, 80, 80)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    with torch.no_grad():
        net(gt=hr, lr=lr, reverse=False)  # ActNorm data init
    net.set_rrdb_training(False)
    net(gt=hr, lr=lr, reverse=False)[1].mean().backward()  # warm-up, as ours
    net.zero_grad(set_to_none=True)
    with OpCounter() as c:
        net(gt=hr, lr=lr, reverse=False)[1].mean().backward()
    n = c.counts
    return {"all": sum(n.values()), "not_views": n["other"] + n["casts"], "casts": n["casts"]}


def train_curve(amp: str, seed: int, a, *extra: str) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model", "srflow", "--scale", "4", "--data", "demo", *SMALL,
                "--steps", str(a.steps), "--batch", str(a.batch), "--patch", str(a.patch),
                "--learning-rate", "5e-4", "--val-every", "0", "--log-every", "1",
                "--workers", "0", "--seed", str(seed), "--amp", amp, *extra,
                "--out", out]  # fmt: skip
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as lines:  # progress: not our JSON
            code = sr_train.main(argv)
        assert code == 0, f"sr_train.py exit {code}: {lines.getvalue()[-500:]}"
        wall = time.perf_counter() - t
        rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [r["nll"] for r in rows if "nll" in r], wall / a.steps


def curves(a) -> dict:
    plan = [("fp32", "none", 0), ("bf16", "bf16", 0), ("fp32_seed1", "none", 1)]
    if a.compile:  # inductor. Its ActNorm init runs before step 1 (sr_train.initialize), which
        # draws that batch's noise first: other noise than "fp32". --ema runs the init the same
        # way without touching the trained weights: "fp32_init_first" has compile's noise.
        plan += [("compile", "none", 0, "--compile"), ("bf16_compile", "bf16", 0, "--compile"),
                 ("fp32_init_first", "none", 0, "--ema", "0.5")]  # fmt: skip
    runs = {name: train_curve(amp, seed, a, *extra) for name, amp, seed, *extra in plan}
    w = a.window
    means = {k: [round(float(np.mean(v[0][i : i + w])), 4) for i in range(0, a.steps, w)]
             for k, v in runs.items()}  # fmt: skip
    diff = lambda x, y: [round(p - q, 4) for p, q in zip(means[x], means[y])]  # noqa: E731
    return {
        "config": " ".join(SMALL) + f" --batch {a.batch} --patch {a.patch} --steps {a.steps}",
        "window": w,
        "nll_window_means": means,
        "bf16_minus_fp32": diff("bf16", "fp32"),
        "seed1_minus_seed0_fp32": diff("fp32_seed1", "fp32"),
        **{
            f"{k}_minus_fp32_init_first": diff(k, "fp32_init_first")
            for k in ("compile", "bf16_compile")
            if k in runs
        },
        "max_abs_step_difference_compile_fp32": round(
            max(abs(p - q) for p, q in zip(runs["compile"][0], runs["fp32_init_first"][0])), 4
        )
        if a.compile
        else None,
        "max_abs_step_difference_bf16_fp32": round(
            max(abs(p - q) for p, q in zip(runs["bf16"][0], runs["fp32"][0])), 4
        ),
        "s_per_step": {k: round(v[1], 3) for k, v in runs.items()},
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", nargs="+", default=["ops", "curves"], choices=["ops", "curves"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patch", type=int, default=16, help="LR patch")
    p.add_argument("--window", type=int, default=50)
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="curves without the --compile runs (inductor needs a C++ compiler)",
    )
    p.add_argument(
        "--official",
        default="",
        help="ops: also count the released SRFlow's step (a checkout of andreas128/SRFlow)",
    )
    a = p.parse_args()
    why = a.official and checkout_error("--official", a.official, REPOS["srflow"], [OFFICIAL_CONF])
    if why:  # before the minutes of counting, not a traceback after them
        raise UsageError(why)
    result = {"bench": "flow_amp", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_native_bf16": cpu_has_native("bf16"),
              "loadavg_start": os.getloadavg()}  # fmt: skip
    if "ops" in a.parts:
        result["ops_per_training_step"] = count_ops()
        if a.official:
            result["ops_per_training_step"]["released_encoder_frozen_fp32"] = count_released(a)
    if "curves" in a.parts:
        result["curves"] = curves(a)
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    with exit_on_error(Path(__file__).name):
        main()
