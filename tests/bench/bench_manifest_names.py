"""Benchmark: manifest.json's "names" (every input's NAME) at a folder of many inputs.

`sr_sample.py` lists the NAMEs of every run's inputs in the sample folder's manifest.json
(`claim_folder`), so that a file of no input is the user's (`other_outputs`). The list grows with
the input folder: this measures what it costs at --names inputs (DIV2K-like stems of 22
characters), calling the manifest's functions on a folder alone: the file's size, a first claim
(written), a rerun's claim (read, checked, not written), a rewrite (`amend_manifest`: each
record, a raised n, a version, the inputs) and a read; then whole runs of `sr_sample.py` (a
bicubic x2 checkpoint, --n 1, --images inputs of 8x8 px) into a fresh folder and into one whose
manifest lists the --names more and another srspace version (so the run records its own), with
the number and sizes of its manifest writes: per image, none. Medians of --repeat. Prints one
JSON object; the load average is included because the machine may be shared.

    python tests/bench/bench_manifest_names.py [--names 200000] [--images 400] [--repeat 3]
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

import sr_sample  # noqa: E402
import sr_train  # noqa: E402


def timed(fn, repeat: int) -> float:
    """The median ms of `repeat` calls of fn."""
    took = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        took.append(time.perf_counter() - t0)
    return round(statistics.median(took) * 1000, 1)


def manifest_calls(root: Path, names: set[str], repeat: int) -> dict:
    """The manifest's functions on a folder of no samples."""
    folder = root / "calls"
    folder.mkdir()
    settings = {"checkpoint_sha256": "0" * 64, "model": "bicubic", "config": {}, "scale": 2,
                "n": 1, "from_hr": False, "tile_context": 0, "version": sr_sample.__version__,
                "flags": {"seed": 0},
                "inputs": {"count": len(names), "names_sha256": "1" * 64}}  # fmt: skip

    def claim():
        with sr_sample.manifest_lock(folder):
            sr_sample.claim_folder(folder, settings, False, names=names)

    first = timed(claim, 1)
    path = folder / "manifest.json"
    return {
        "manifest_MB": round(path.stat().st_size / 1e6, 2),
        "first_claim_ms": first,
        "rerun_claim_ms": timed(claim, repeat),
        "rewrite_ms": timed(
            lambda: sr_sample.amend_manifest(folder, lambda m: {"n": m["n"] + 1}), repeat
        ),  # fmt: skip
        "read_ms": timed(lambda: json.loads(path.read_text()), repeat),
    }


def whole_runs(root: Path, names: set[str], images: int) -> dict:
    """sr_sample.py into a fresh folder and into one listing `names` (another version there)."""
    assert sr_train.main(["--model", "bicubic", "--scale", "2", "--steps", "0", "--val-every",
                          "0", "--out", str(root / "ck")]) == 0  # fmt: skip
    inp, one = root / "in", root / "one"
    inp.mkdir()
    one.mkdir()
    rng = np.random.default_rng(0)
    for k in range(images):
        img = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(img).save(inp / f"im{k:05d}.png")
    os.link(inp / "im00000.png", one / "im00000.png")
    writes, save = [], sr_sample.save_text

    def counted(path, text):
        if Path(path).name == "manifest.json":
            writes.append(round(len(text) / 1e6, 2))
        return save(path, text)

    sr_sample.save_text = counted
    rows = {}
    for listed in (False, True):
        out = root / f"out{int(listed)}"
        argv = ["--ckpt", str(root / "ck" / "last.pt"), "--n", "1", "--quiet", "--out", str(out)]
        assert sr_sample.main([*argv, "--input", str(one)]) == 0
        if listed:
            manifest = json.loads((out / "manifest.json").read_text())
            manifest["names"] = sorted({*manifest["names"], *names})
            manifest["versions"] = ["0.0.1"]
            (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        writes.clear()
        t0 = time.perf_counter()
        assert sr_sample.main([*argv, "--input", str(inp)]) == 0
        took = time.perf_counter() - t0
        rows["listing_names" if listed else "fresh"] = {
            "names_after": len(json.loads((out / "manifest.json").read_text())["names"]),
            "s": round(took, 2),
            "ms_per_image": round(took / (images - 1) * 1000, 2),
            "manifest_writes_MB": list(writes),
        }
    sr_sample.save_text = save
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    result = {"what": f"manifest.json listing {args.names} NAMEs; sr_sample.py runs of "
              f"{args.images} 8x8 images", **machine()}  # fmt: skip
    load = [round(v, 2) for v in os.getloadavg()]
    names = {f"{k:04d}x4_photo_{k:07d}" for k in range(args.names)}
    # (the scripts' own lines on stderr: stdout is the one JSON object)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        result.update(manifest_calls(Path(tmp), names, args.repeat))
        result["runs"] = whole_runs(Path(tmp), names, args.images)
    result["loadavg_before_after"] = [load, [round(v, 2) for v in os.getloadavg()]]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
