"""The README's quick start, `bash demo.sh`, end to end with 3 EDSR steps instead of 1,000: every
command it chains (train bicubic and EDSR, sample the demo images, evaluate) works, bicubic scores
the numbers docs/benchmarks.md gives for it, and a rerun with more STEPS (`--resume auto`)
trains on and samples the new checkpoint, bicubic's samples unchanged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def demo(out: Path, steps: int = 3) -> dict:
    env = {**os.environ, "STEPS": str(steps), "OUT": str(out)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this python
    done = subprocess.run(["bash", str(REPO / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.integration  # 14 script runs (pyproject: pytest -m integration)
def test_demo_sh_runs_end_to_end_and_again(tmp_path):
    out = tmp_path / "quick start"  # a space, as in real paths
    first = demo(out)
    methods = first["methods"]
    assert set(methods) == {"samples_bicubic", "samples_edsr"}
    assert all(len(m["per_image"]) == 3 for m in methods.values())  # the 3 demo photographs
    bicubic = methods["samples_bicubic"]["mean"]
    assert bicubic["PSNR_mean"] == pytest.approx(27.763, abs=1e-3)
    assert bicubic["LRPSNR_mean"] == pytest.approx(41.585, abs=1e-3)
    assert methods["samples_edsr"]["mean"]["PSNR_mean"] > 10  # 3 steps: a number, not a result
    assert (out / "edsr" / "last.pt").is_file() and (out / "edsr" / "best.pt").is_file()
    # A rerun with more STEPS resumes at step 3 and trains on: a new last.pt, whose samples
    # replace the old ones (they were refused: another checkpoint's folder).
    longer = demo(out, steps=4)["methods"]
    assert longer["samples_bicubic"] == methods["samples_bicubic"]
    assert longer["samples_edsr"] != methods["samples_edsr"]
