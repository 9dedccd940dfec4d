"""Write the very-low-resolution face DEMO for VarSR (a demo, not a benchmark: report no numbers).

scikit-image ships 100 aligned 25×25 grayscale LFW faces (`skimage.data.lfw_subset()`, images 0-99;
images 100-199 are non-face patches and are not used), so no download is needed. Each face is cut
to its top-left 24×24 (a multiple of 4 and 8) and saved as an RGB PNG: OUT/train (faces 0-89) and
OUT/val (faces 90-99). At ×4 the LR is 6×6, the size of the paper's MNIST setting (§4.1); the
paper's faces are CelebA 64×64 from 8×8 (×8).

    python examples/make_lfw_demo.py data/lfw24
    python sr_train.py --model varsr --scale 4 --data data/lfw24/train --val-data data/lfw24/val \\
        --patch 6 --batch 16 --lambda-per 0 --out runs/varsr_lfw_demo
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without install
from sr_lib.data import write_png  # noqa: E402

N_FACES, N_VAL, SIZE = 100, 10, 24


def write_lfw_demo(out: str | Path) -> list[Path]:
    """Write the demo faces as uint8 RGB PNGs; returns the written paths."""
    from skimage.data import lfw_subset

    faces = lfw_subset()[:N_FACES, :SIZE, :SIZE]  # (100, 24, 24) float64 in [0, 1]
    written = []
    for i, face in enumerate(faces):
        split = "val" if i >= N_FACES - N_VAL else "train"
        rgb = np.repeat(np.round(face * 255).astype(np.uint8)[..., None], 3, axis=2)
        path = Path(out) / split / f"face{i:03d}.png"
        write_png(path, rgb)
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to create (train/ and val/ inside)")
    paths = write_lfw_demo(parser.parse_args().out)
    print(f"wrote {len(paths)} faces ({SIZE}x{SIZE}) to {parser.parse_args().out}/{{train,val}}")
