"""The ```python blocks of the README and docs/ run as written, against tiny checkpoints and images
made here: a notebook copies them."""

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from sr_lib.checkpoint import save_checkpoint
from sr_lib.models import build_model

REPO = Path(__file__).resolve().parent.parent


def python_blocks() -> list[tuple[str, str]]:
    """(file: first line, code) of every ```python block."""
    blocks = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text[: m.start()].count("\n") + 1
            blocks.append((f"{path.relative_to(REPO)}:{line}", m.group(1)))
    return blocks


def make_world(code: str, root: Path) -> str:
    """`code` with /data/... read below `root`, and the files it names made there: a tiny
    checkpoint for runs/<model>_..._x<s>/last.pt, a folder of small images for other paths."""
    code = code.replace('"/data/', '"data/')
    for path in re.findall(r'"((?:runs|data)/[^"]+)"', code):
        target = root / path
        run = re.match(r"runs/([a-z]+?(?:_da)?)_.*x(\d)/", path)
        if run:
            name, scale = run.groups()
            model = build_model(name, {**TINY[name], "scale": int(scale)})
            payload = {"model": name, "model_cfg": {**TINY[name], "scale": int(scale)}}
            save_checkpoint(target, {**payload, "state_dict": model.state_dict(), "step": 0})
        else:
            target.mkdir(parents=True)
            rng = np.random.default_rng(0)
            for i in range(2):
                pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(target / f"{i}.png")
    return code


def test_the_docs_hold_python_blocks():
    assert any(where.startswith("docs/vae.md") for where, _ in python_blocks())


@pytest.mark.parametrize("where,code", python_blocks(), ids=[w for w, _ in python_blocks()])
def test_a_documented_python_block_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(make_world(code, tmp_path), where, "exec"), {})
