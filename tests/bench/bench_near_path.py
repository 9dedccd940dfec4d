"""Benchmark: the "did you mean" of a mistyped path beside a folder of many files (`near_path`).

A folder of --files empty files (sample-like names) and one subfolder T0.5, the last made, is
asked for T0.55: `sr_lib.data.near_path` (it reads the folder's first 5,000 entries), then the
same listing and difflib match over the first --caps entries (the whole folder: no cap), each
the median of --repeat runs, warm (the folder's entries in the page cache; a network file
system's first listing costs more). Says where T0.5 came in the listing order, which is the
file system's, not the names'. Prints one JSON object; the load average is included because the
machine may be shared.

    python tests/bench/bench_near_path.py [--files 200000] [--caps 5000 50000 0] [--dir DIR]
"""

import argparse
import difflib
import json
import os
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without install
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from sr_lib.data import near_path  # noqa: E402


def names(folder: Path, cap: int) -> list[str]:
    with os.scandir(folder) as entries:  # (near_path's listing: the first `cap` entries)
        return [e.name for _, e in zip(range(cap), entries) if e.name[:1] != "."]


def timed(fn, repeat: int) -> tuple[float, object]:
    """(the median seconds of `repeat` calls of fn, what it returns)."""
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeat)), fn()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--caps", type=int, nargs="+", default=[5000, 50_000, 0], help="0: all")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default="", help="where the folder is made (default: a temp)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        folder = Path(tmp) / "big"
        folder.mkdir()
        for i in range(args.files):
            (folder / f"{i:07d}_sample00000.png").touch()
        (folder / "T0.5").mkdir()
        typo = folder / "T0.55"
        seconds, said = timed(lambda: near_path(typo), args.repeat)
        rows = {"near_path": {"ms": round(seconds * 1000, 2), "said": said}}
        for cap in args.caps:
            n = cap or args.files + 2
            listing, _ = timed(lambda n=n: names(folder, n), args.repeat)
            match, found = timed(
                lambda n=n: difflib.get_close_matches("T0.55", names(folder, n), n=3), args.repeat
            )
            rows[f"first {cap} entries" if cap else "all entries"] = {
                "listing_ms": round(listing * 1000, 2),
                "listing_and_match_ms": round(match * 1000, 2),
                "found": found,
            }
        position = names(folder, args.files + 2).index("T0.5")
    result = {
        "what": f"near_path of a typo beside a folder of {args.files} files, warm, median of "
        f"{args.repeat}",
        "T0.5_listed_at": position,
        **rows,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        **machine(),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
